#!/usr/bin/env bash
# Fused against stored bf16 attention (train.attention), GPT-2 small dense,
# B=4 T=1024, on 1 rank x all cores and 2 ranks x 1 thread, alternating
# fused / stored twice: step time and peak RSS per rank, and their ratios.
# Run by make bench (bench/run.sh); alone: bash bench/attention.sh [--steps S]
set -eu
cd "$(dirname "$0")/.."
for a in "$@"; do [ "$a" = --help ] && { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }; done
STEPS=${BENCH_STEPS:-2}
[ "${1:-}" = --steps ] && STEPS=$2
MPIRUN=(mpirun --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
CORES=$(nproc)
export OMP_WAIT_POLICY=passive
if ! grep -qw avx512_bf16 /proc/cpuinfo; then
    echo "== fused attention: not measured, no AVX-512 BF16 on this CPU =="
    exit 0
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ms() { sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$1"; }
rss() { sed -n 's/.*peak RSS \([0-9]*\) MiB.*/\1/p' "$1"; }
med() { sort -n | awk '{v[NR]=$1} END{if (NR == 0) print ""; else print (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
layouts=("1 $CORES")
[ "$CORES" -ge 2 ] && layouts+=("2 1")
for lt in "${layouts[@]}"; do
    read -r p t <<< "$lt"
    for round in 1 2; do
        for a in fused stored; do
            echo "-- $p rank(s) x $t thread(s), attention $a, round $round --"
            OMP_NUM_THREADS=$t "${MPIRUN[@]}" -np "$p" build/bench/bench_step --seq 1024 --batch 4 \
                --steps "$STEPS" --precision bf16 --attention $a | tee "$OUT/$p-$t-$a-$round" | sed -n '2,3p'
        done
    done
    f=$(for r in 1 2; do ms "$OUT/$p-$t-fused-$r"; done | med)
    s=$(for r in 1 2; do ms "$OUT/$p-$t-stored-$r"; done | med)
    echo "== $p rank(s) x $t thread(s), bf16 dense B4 T1024: fused / stored step = $(awk -v a="$f" -v b="$s" 'BEGIN{printf "%.3f", a / b}') ($f vs $s ms, median of 2) | peak RSS per rank $(rss "$OUT/$p-$t-fused-1") vs $(rss "$OUT/$p-$t-stored-1") MiB =="
done

#!/usr/bin/env bash
# bench/scaling.sh: the whole-node scaling matrix in one call, for a machine with
# many cores (not part of make bench, whose machines have 2). For every layout
# ranks x threads with ranks x threads = CORES (1 x 16, 2 x 8, 4 x 4, 8 x 2,
# 16 x 1 on 16 cores), one GPT-2 small training step (bench/bench_step) of
#   dense, MoE 8 experts top-2 x 1536 at ep 2, 4 and 8 (where ep divides the
#   ranks), and ∞-MoE H 6144 keep 25% K 2 at ep 2 (ranks >= 2),
# printing ms/step, MFU against the peak measured on the same cores, and the
# exposed shares (gradient allreduce, all-to-all) of the slowest rank. Ranks are
# bound to their own cores (--map-by slot:PE=T --bind-to core) and threads to
# cores (OMP_PLACES=cores, OMP_PROC_BIND=close).
#
#   bash bench/scaling.sh [--cores N] [--batch B] [--seq T] [--steps S]
#                         [--precision fp32|bf16] [--out FILE.md]
# Defaults: every core of the machine (nproc), global batch = cores sequences
# (so every layout has whole sequences per rank), T 1024, 2 timed steps, bf16
# where the CPU has AVX-512 BF16. The table is written as markdown to FILE.md too.
set -u
cd "$(dirname "$0")/.."
CORES=$(env -u OMP_NUM_THREADS nproc) BATCH="" SEQ=1024 STEPS=2 PREC="" OUTMD=""
while [ $# -gt 0 ]; do
    case $1 in
    --cores) CORES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --precision) PREC=$2; shift 2 ;;
    --out) OUTMD=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scaling.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $CORES =~ ^[1-9][0-9]*$ ]] || { echo "scaling.sh: --cores must be a positive integer" >&2; exit 2; }
BATCH=${BATCH:-$CORES}
if [ -z "$PREC" ]; then
    PREC=fp32
    grep -qw avx512_bf16 /proc/cpuinfo && PREC=bf16
fi
[ -x build/bench/bench_step ] || { echo "scaling.sh: build/bench/bench_step missing (make all)" >&2; exit 2; }
MPIRUN=(mpirun)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
export OMP_WAIT_POLICY=passive
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

one() { # file, ranks, threads, bench args...
    local f=$1 p=$2 t=$3
    shift 3
    local bind=(--map-by core --bind-to core)
    [ "$t" -gt 1 ] && bind=(--map-by "slot:PE=$t" --bind-to core -x OMP_PLACES=cores -x OMP_PROC_BIND=close)
    OMP_NUM_THREADS=$t "${MPIRUN[@]}" -np "$p" "${bind[@]}" -x OMP_NUM_THREADS -x OMP_WAIT_POLICY \
        build/bench/bench_step --seq "$SEQ" --batch "$BATCH" --steps "$STEPS" --precision "$PREC" "$@" \
        >"$f" 2>&1
}
cell() { # file: "ms / mfu% / exposed%"
    local f=$1
    if ! grep -q 'ms/step' "$f"; then
        echo "failed"
        return
    fi
    local ms mfu ar a2a
    ms=$(sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$f")
    mfu=$(sed -n 's/.*| mfu \([0-9.]*\)%.*/\1/p' "$f" | head -1)
    ar=$(sed -n 's/.*allreduce \([0-9.]*\)%.*/\1/p' "$f")
    a2a=$(sed -n 's/.*all-to-all \([0-9.]*\)%.*/\1/p' "$f" | head -1)
    printf '%.0f ms, %s%% MFU, ar %s%%%s' "$ms" "$mfu" "$ar" "${a2a:+, a2a $a2a%}"
}

echo "== scaling matrix: GPT-2 small, global batch $BATCH x $SEQ, $PREC, $CORES cores, $STEPS timed steps =="
header="| ranks x threads | dense | MoE ep 2 | MoE ep 4 | MoE ep 8 | ∞-MoE ep 2 |"
rows=()
for ((p = 1; p <= CORES; p *= 2)); do
    [ $((CORES % p)) -eq 0 ] || continue
    t=$((CORES / p))
    if [ $((BATCH % p)) -ne 0 ]; then
        rows+=("| $p x $t | batch $BATCH not divisible by $p ranks | | | | |")
        continue
    fi
    echo "-- $p x $t --" >&2
    row="| $p x $t | "
    one "$OUT/d" "$p" "$t"
    row+="$(cell "$OUT/d") | "
    for ep in 2 4 8; do
        if [ "$p" -ge "$ep" ] && [ $((p % ep)) -eq 0 ]; then
            one "$OUT/m$ep" "$p" "$t" --experts 8 --k 2 --expert-hidden 1536 --ep "$ep"
            row+="$(cell "$OUT/m$ep") | "
        else
            row+="— | "
        fi
    done
    if [ "$p" -ge 2 ]; then
        one "$OUT/i" "$p" "$t" --units 6144 --keep 0.25 --samples 2 --block 64 --ep 2
        row+="$(cell "$OUT/i") |"
    else
        one "$OUT/i" "$p" "$t" --units 6144 --keep 0.25 --samples 2 --block 64 --ep 1
        row+="$(cell "$OUT/i") (ep 1) |"
    fi
    rows+=("$row")
    echo "$row"
done
{
    echo "GPT-2 small, global batch $BATCH x $SEQ, $PREC, $CORES cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)); cells: ms/step, MFU, exposed gradient allreduce (ar) and all-to-all (a2a) shares, slowest rank"
    echo
    echo "$header"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT/table.md"
[ -n "$OUTMD" ] && cp "$OUT/table.md" "$OUTMD"
exit 0

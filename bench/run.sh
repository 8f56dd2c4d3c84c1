#!/usr/bin/env bash
# make bench: the benchmarks. Prints figures (not pass/fail): the fp32 and bf16
# peaks, oneDNN GEMM efficiency at GPT-2 small shapes, prep's tokenising rate,
# GPT-2 small training steps (B=4 T=1024) on 1 rank x 2 threads and 2 ranks x 1 thread in fp32 and bf16 with
# MFU against the peak of the precision measured in the same process, MoE (8
# experts top-2, equal active FLOPs) and ∞-MoE against dense in bf16 (fp32 where
# the CPU has no bf16), the layouts' ratios, peak RSS,
# fused against stored bf16 attention, and the PyTorch peer (bf16 autocast) on
# the same model in the same run.
# Quote ratios; absolute times on shared machines drift.
set -eu
cd "$(dirname "$0")/.."
MPIRUN=(mpirun --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
CORES=$(nproc)
STEPS=${BENCH_STEPS:-3}
export OMP_WAIT_POLICY=passive

echo "== fp32 FMA and bf16 dot-product peaks (bench/fma_peak) =="
OMP_NUM_THREADS=$CORES build/bench/fma_peak
echo
echo "== oneDNN GEMM efficiency at GPT-2 small shapes, 4 x 256 tokens (bench/bench_gemm) =="
GEMM_THREADS=1
[ "$CORES" -ge 2 ] && GEMM_THREADS="1 2"
for t in $GEMM_THREADS; do
    OMP_NUM_THREADS=$t build/bench/bench_gemm
    echo
done
if grep -qw avx512_bf16 /proc/cpuinfo; then
    for t in $GEMM_THREADS; do
        OMP_NUM_THREADS=$t build/bench/bench_gemm --bf16
        echo
    done
fi
echo "== prep throughput: MB/s of text, byte-level and GPT-2 BPE (bench/prep.sh) =="
bash bench/prep.sh
ms() { sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$1"; }
rss() { sed -n 's/.*peak RSS \([0-9]*\) MiB.*/\1/p' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.3f", a / b}'; }
BF16=0
grep -qw avx512_bf16 /proc/cpuinfo && BF16=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
step() { # name, ranks, threads, args...
    local name=$1 p=$2 t=$3
    shift 3
    echo "-- $name --"
    OMP_NUM_THREADS=$t "${MPIRUN[@]}" -np "$p" build/bench/bench_step --seq 1024 --batch 4 --steps "$STEPS" "$@" |
        tee "$OUT/$name"
}
# MoE and ∞-MoE run in bf16 where the CPU has AVX-512 BF16, in fp32 where it has
# not (and bf16 is not measured at all).
AUTO=fp32
[ $BF16 -eq 1 ] && AUTO=bf16
layout() { # label, ranks, threads, ep
    local l=$1 p=$2 t=$3 ep=$4
    echo
    step "$l fp32 dense" "$p" "$t" --precision fp32
    if [ $BF16 -eq 0 ]; then
        echo "== $l: no AVX-512 BF16 on this CPU: bf16 not measured, MoE and ∞-MoE in fp32 =="
    else
        step "$l bf16 dense" "$p" "$t" --precision bf16
    fi
    # across ranks, the exchange's time split into waiting for the last rank and moving rows
    local probe=()
    [ "$ep" -gt 1 ] && probe=(--a2a-probe)
    step "$l $AUTO MoE" "$p" "$t" --precision $AUTO --experts 8 --k 2 --expert-hidden 1536 --ep "$ep" "${probe[@]}"
    step "$l $AUTO inf" "$p" "$t" --precision $AUTO --units 6144 --keep 0.25 --samples 2 --block 64 --ep "$ep" "${probe[@]}"
    local d32 da line
    d32=$(ms "$OUT/$l fp32 dense")
    da=$(ms "$OUT/$l $AUTO dense")
    line="== $l:"
    [ $BF16 -eq 1 ] && line+=" bf16 / fp32 dense step = $(ratio "$da" "$d32") |"
    line+=" $AUTO MoE / dense = $(ratio "$(ms "$OUT/$l $AUTO MoE")" "$da") | $AUTO ∞-MoE / dense = $(ratio "$(ms "$OUT/$l $AUTO inf")" "$da")"
    [ $BF16 -eq 1 ] && line+=" | peak RSS per rank bf16 / fp32 = $(ratio "$(rss "$OUT/$l bf16 dense")" "$(rss "$OUT/$l fp32 dense")")"
    echo "$line =="
}
echo
PRECS="fp32 and bf16"
[ $BF16 -eq 1 ] || PRECS="fp32"
echo "== GPT-2 small training step, B=4 T=1024, $PRECS (bench/bench_step, $STEPS timed steps; MoE: 8 experts top-2 of width 1536, equal active FLOPs; ∞-MoE: H 6144, keep 25%, K 2) =="
layout "1 rank x $CORES threads" 1 "$CORES" 1
if [ "$CORES" -ge 2 ]; then
    layout "2 ranks x 1 thread" 2 1 2
    one="1 rank x $CORES threads"
    two="2 ranks x 1 thread"
    echo "== $AUTO step, $one / $two: dense $(ratio "$(ms "$OUT/$one $AUTO dense")" "$(ms "$OUT/$two $AUTO dense")") | MoE $(ratio "$(ms "$OUT/$one $AUTO MoE")" "$(ms "$OUT/$two $AUTO MoE")") | ∞-MoE $(ratio "$(ms "$OUT/$one $AUTO inf")" "$(ms "$OUT/$two $AUTO inf")") =="
fi
echo
echo "== bf16 attention, fused (row statistics) against stored probabilities (bench/attention.sh) =="
bash bench/attention.sh

# The PyTorch peer on the same model and batch, in the same run (torch's bf16 autocast).
PEER=${PEER:-../shared/peers/torch_peer.sh}
echo
if [ $BF16 -eq 1 ] && [ -x "$PEER" ] && /usr/bin/python3 -c 'import torch' 2>/dev/null; then
    echo "== PyTorch peer: GPT-2 small dense, B=4 T=1024, bf16 autocast, $CORES threads ($PEER) =="
    peer=$("$PEER" --config gpt2-small --B 4 --T 1024 --ffn dense --bf16 | tail -1)
    echo "$peer"
    pms=$(printf '%s\n' "$peer" | sed -n 's/.*"ms_median": *\([0-9.]*\).*/\1/p')
    for l in "1 rank x $CORES threads" "2 ranks x 1 thread"; do
        [ -e "$OUT/$l bf16 dense" ] || continue
        echo "== $l: infmoe dense is $(ratio "$pms" "$(ms "$OUT/$l bf16 dense")")x the speed of PyTorch bf16 autocast in bf16, $(ratio "$pms" "$(ms "$OUT/$l fp32 dense")")x in fp32 (train.precision auto picks $(sed -n 's/.*(auto: \([a-z0-9]*\)).*/\1/p' "$OUT/$l bf16 dense") here) =="
    done
else
    echo "== PyTorch peer not run (needs AVX-512 BF16, $PEER and apt-get install python3-torch) =="
fi

echo
echo "== ∞-MoE FFN layer at GPT-2 small shapes vs masked dense and dense of the same active width (bench/bench_infinite) =="
OMP_NUM_THREADS=1 build/bench/bench_infinite
echo
echo "== GPT-2 small: ∞-MoE (H 6144, keep 25%, K 2) against dense, back to back (bench/bench_step) =="
inf_pair() { # label, ranks, threads, ep
    local dense inf
    dense=$(mktemp)
    inf=$(mktemp)
    echo "-- $1: dense --"
    OMP_NUM_THREADS=$3 "${MPIRUN[@]}" -np "$2" build/bench/bench_step --steps "$STEPS" | tee "$dense"
    echo "-- $1: ∞-MoE, ep $4 --"
    OMP_NUM_THREADS=$3 "${MPIRUN[@]}" -np "$2" build/bench/bench_step --steps "$STEPS" \
        --units 6144 --keep 0.25 --samples 2 --block 64 --ep "$4" | tee "$inf"
    awk -v a="$(ms "$inf")" -v b="$(ms "$dense")" -v l="$1" \
        'BEGIN{printf "== %s: step time ∞-MoE / dense = %.3f ==\n", l, a / b}'
    rm -f "$dense" "$inf"
}
inf_pair "1 rank x $CORES threads" 1 "$CORES" 1
if [ "$CORES" -ge 2 ]; then
    inf_pair "2 ranks x 1 thread, ep 2" 2 1 2
fi

echo
echo "== MoE features against plain top-k: shared FFN, expert bias, forced balance (bench/moe_features.sh) =="
bash bench/moe_features.sh
echo
echo "== checkpoint save and load, GPT-2 small ∞-MoE (configs/gpt2s-infinite.yaml), vs sequential write (bench/bench_ckpt) =="
CKDIR=$(mktemp -d -p "${BENCH_CKPT_DIR:-checkpoints}" bench-ckpt.XXXXXX)
OMP_NUM_THREADS=1 "${MPIRUN[@]}" -np 1 build/bench/bench_ckpt configs/gpt2s-infinite.yaml "$CKDIR/p1"
if [ "$CORES" -ge 2 ]; then
    OMP_NUM_THREADS=1 "${MPIRUN[@]}" -np 2 build/bench/bench_ckpt configs/gpt2s-infinite.yaml "$CKDIR/p2" --ep 2
fi
rm -rf "$CKDIR"

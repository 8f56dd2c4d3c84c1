#!/usr/bin/env bash
# make bench: the benchmarks. Prints figures (not pass/fail): the fp32 FMA peak,
# oneDNN GEMM efficiency at GPT-2 small shapes, GPT-2 small training steps on
# 1 rank x 2 threads and 2 ranks x 1 thread with MFU against the peak measured in
# the same process, and the same model with an 8-expert top-2 MoE FFN of equal
# active FLOPs against the dense one, run back to back: step-time ratio MoE/dense.
# Quote ratios; absolute times on shared machines drift.
set -eu
cd "$(dirname "$0")/.."
MPIRUN=(mpirun --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
CORES=$(nproc)
STEPS=${BENCH_STEPS:-3}
export OMP_WAIT_POLICY=passive

echo "== fp32 FMA peak (bench/fma_peak) =="
OMP_NUM_THREADS=$CORES build/bench/fma_peak
echo
echo "== oneDNN GEMM efficiency at GPT-2 small shapes, 4 x 256 tokens (bench/bench_gemm) =="
OMP_NUM_THREADS=1 build/bench/bench_gemm
if [ "$CORES" -ge 2 ]; then
    echo
    OMP_NUM_THREADS=2 build/bench/bench_gemm
fi
ms() { sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$1"; }
step_pair() { # label, ranks, threads, ep
    local dense moe
    dense=$(mktemp)
    moe=$(mktemp)
    echo
    echo "-- $1: dense --"
    OMP_NUM_THREADS=$3 "${MPIRUN[@]}" -np "$2" build/bench/bench_step --steps "$STEPS" | tee "$dense"
    echo "-- $1: MoE, 8 experts top-2 of width 1536 (equal active FLOPs), ep $4 --"
    OMP_NUM_THREADS=$3 "${MPIRUN[@]}" -np "$2" build/bench/bench_step --steps "$STEPS" \
        --experts 8 --k 2 --expert-hidden 1536 --ep "$4" | tee "$moe"
    awk -v a="$(ms "$moe")" -v b="$(ms "$dense")" -v l="$1" \
        'BEGIN{printf "== %s: step time MoE / dense = %.3f ==\n", l, a / b}'
    rm -f "$dense" "$moe"
}
echo
echo "== GPT-2 small training step, B=4 T=256 (bench/bench_step, $STEPS timed steps) =="
step_pair "1 rank x $CORES threads" 1 "$CORES" 1
if [ "$CORES" -ge 2 ]; then
    step_pair "2 ranks x 1 thread, ep 2" 2 1 2
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
echo "== checkpoint save and load, GPT-2 small ∞-MoE (configs/gpt2s-infinite.yaml), vs sequential write (bench/bench_ckpt) =="
CKDIR=$(mktemp -d -p "${BENCH_CKPT_DIR:-checkpoints}" bench-ckpt.XXXXXX)
OMP_NUM_THREADS=1 "${MPIRUN[@]}" -np 1 build/bench/bench_ckpt configs/gpt2s-infinite.yaml "$CKDIR/p1"
if [ "$CORES" -ge 2 ]; then
    OMP_NUM_THREADS=1 "${MPIRUN[@]}" -np 2 build/bench/bench_ckpt configs/gpt2s-infinite.yaml "$CKDIR/p2" --ep 2
fi
rm -rf "$CKDIR"

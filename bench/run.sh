#!/usr/bin/env bash
# make bench: the benchmarks. Prints figures (not pass/fail): the fp32 FMA peak,
# oneDNN GEMM efficiency at GPT-2 small shapes, and GPT-2 small training steps on
# 1 rank x 2 threads and 2 ranks x 1 thread, each with MFU against the peak
# measured in the same process. Quote ratios; absolute times on shared machines drift.
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
echo
echo "== GPT-2 small training step, B=4 T=256 (bench/bench_step, $STEPS timed steps) =="
OMP_NUM_THREADS=$CORES "${MPIRUN[@]}" -np 1 build/bench/bench_step --steps "$STEPS"
if [ "$CORES" -ge 2 ]; then
    echo
    OMP_NUM_THREADS=1 "${MPIRUN[@]}" -np 2 build/bench/bench_step --steps "$STEPS"
fi

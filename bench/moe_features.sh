#!/usr/bin/env bash
# The MoE features against plain top-k, back to back in one run (called by
# bench/run.sh; alone: bash bench/moe_features.sh): GPT-2 small B=4 T=1024, 2 ranks x
# 1 thread, ep 2, bf16 where the CPU has it: noisy top-2 of 8 experts of width 1536
# (equal active FLOPs to dense), the same with a shared FFN of 768 units, with the
# expert bias, with forced even routing (the routing-imbalance-free time), and
# hierarchical: the top-1 of 2 groups of 4 experts, then the top-2 experts in it (the
# same expert FLOPs as top-2 of 8; the cost of the second gate level).
set -eu
cd "$(dirname "$0")/.."
MPIRUN=(mpirun --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
STEPS=${BENCH_STEPS:-3}
PREC=fp32
grep -qw avx512_bf16 /proc/cpuinfo && PREC=bf16
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ms() { sed -n 's/.*ms\/step \([0-9.]*\).*/\1/p' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.3f", a / b}'; }
run() { # name, args...
    local name=$1
    shift
    echo "-- $name --"
    "${MPIRUN[@]}" -np 2 build/bench/bench_step --seq 1024 --batch 4 --steps "$STEPS" --precision "$PREC" \
        --experts 8 --k 2 --expert-hidden 1536 --ep 2 "$@" | tee "$OUT/$name"
}
run topk
run shared --shared-hidden 768
run bias --expert-bias 0.01
run forced --force-balance
run hier --groups 2 --group-k 1
base=$(ms "$OUT/topk")
echo "== MoE features, $PREC, 2 ranks x 1 thread: +shared FFN 768 / topk = $(ratio "$(ms "$OUT/shared")" "$base") | expert bias / topk = $(ratio "$(ms "$OUT/bias")" "$base") | forced balance / topk = $(ratio "$(ms "$OUT/forced")" "$base") | hierarchical / topk = $(ratio "$(ms "$OUT/hier")" "$base") =="

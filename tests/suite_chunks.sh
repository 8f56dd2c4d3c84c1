#!/usr/bin/env bash
# parallel.alltoall_chunks: the MoE exchange split by groups of a rank's experts,
# pipelined with their GEMMs. Every expert sees the rows of the one-piece exchange
# in the same order, so any chunk count gives the one-piece run's losses and
# final tensors bit for bit: fp32 and bf16, 1 and 2 threads, 2 and 4 ranks.
# Prints PASS/FAIL lines (tests/run.sh counts them). Run from the repo root.
. tests/lib.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
run() { # name, ranks, threads, precision, chunks, ep
    OMP_NUM_THREADS=$3 timeout 300 "${MPIRUN[@]}" -np "$2" $INFMOE train tests/configs/tiny-topk.yaml \
        --set ffn.experts=8 --set parallel.ep="$6" --set train.precision="$4" \
        --set parallel.alltoall_chunks="$5" --set train.steps=10 --set train.ckpt_every=10 \
        --set output.dir="$TMP/$1" > "$TMP/$1.log" 2>&1
}
same() { # label, reference run, run
    if [ "$(steps_from "$TMP/$2.log" 1 | wc -l)" -eq 10 ] &&
        [ "$(steps_from "$TMP/$2.log" 1)" = "$(steps_from "$TMP/$3.log" 1)" ] &&
        same_tensors "$TMP/$2/step_000010/model.h5" "$TMP/$3/step_000010/model.h5"; then
        pass "alltoall_chunks: $1: the one-piece run's 10 losses and final tensors, bitwise"
    else
        fail "alltoall_chunks: $1" "$(paste <(steps_from "$TMP/$2.log" 1) <(steps_from "$TMP/$3.log" 1); tail -3 "$TMP/$3.log")"
    fi
}
run fp32-c1 2 1 fp32 1 2
run fp32-c2 2 1 fp32 2 2
run fp32-c4 2 1 fp32 4 2
same "2 chunks, 2 ranks ep 2 (4 experts a rank), fp32" fp32-c1 fp32-c2
same "4 chunks (one expert each), 2 ranks ep 2, fp32" fp32-c1 fp32-c4
if grep -qw avx512_bf16 /proc/cpuinfo; then
    run bf16-c1 2 2 bf16 1 2
    run bf16-c4 2 2 bf16 4 2
    same "4 chunks, 2 ranks x 2 threads ep 2, bf16" bf16-c1 bf16-c4
fi
run p4-c1 4 1 fp32 1 4
run p4-c2 4 1 fp32 2 4
same "2 chunks, 4 ranks ep 4 (2 experts a rank), fp32" p4-c1 p4-c2

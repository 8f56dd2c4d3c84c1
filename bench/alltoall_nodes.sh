#!/usr/bin/env bash
# The MoE token exchange on 2 namespace nodes (launch/netns-nodes, root), 2 ranks
# a node, flat against node-aware (parallel.alltoall), at message sizes from one
# row to 256 rows of GPT-2 small's width a peer; links unshaped, then shaped to
# RATE (tc tbf; default 1gbit). Alone: sudo bash bench/alltoall_nodes.sh [RATE].
# Not part of make bench (it needs root and makes namespaces). Needs build/bench.
set -u
cd "$(dirname "$0")/.."
RATE=${1:-1gbit}
[ "$(id -u)" -eq 0 ] || { echo "alltoall_nodes: needs root (network namespaces)" >&2; exit 2; }
NODES=$(mktemp -d /tmp/infmoe-bench-nodes.XXXXXX)
trap 'launch/netns-nodes down "$NODES" >/dev/null 2>&1; rm -rf "$NODES"' EXIT
trap 'exit 130' INT TERM
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
for shape in "" "$RATE"; do
    rmdir "$NODES" 2>/dev/null
    launch/netns-nodes up "$NODES" 2 ${shape:+--rate "$shape"} > /dev/null || exit 1
    read -r -a ARGS < "$NODES/mpirun-args"
    echo "== 2 nodes x 2 ranks, links ${shape:-unshaped} (veth) =="
    launch/netns-nodes run "$NODES" node1 -- mpirun --allow-run-as-root --oversubscribe --bind-to none \
        "${ARGS[@]}" --mca mpi_yield_when_idle 1 -np 4 build/bench/bench_alltoall --reps 15 --allreduce 4194304
    launch/netns-nodes down "$NODES" > /dev/null
done

#!/usr/bin/env bash
# Multi-node runs on two network-namespace nodes of this machine
# (launch/netns-nodes: each node its own address on a private bridge, so Open
# MPI's TCP transport carries everything between nodes), 2 ranks a node,
# oversubscribed. Shows: 4 ranks on 2 nodes give the 1-node losses, with ep 4
# spanning the nodes; a checkpoint written on 2 nodes resumes on 1 and the
# reverse, with the 1-node run's losses and final tensors; losing one node's
# ranks mid-step ends the whole job within 30 s naming the lost rank, and
# --resume auto carries on. Prints PASS/FAIL lines (tests/run.sh counts them),
# or one SKIP line where namespaces cannot be made (not root, no iproute2).
# Run from anywhere: bash tests/suite_multinode.sh
cd "$(dirname "$0")/.." || exit 1
. tests/lib.sh

TMP=$(mktemp -d /tmp/infmoe-suite-multinode.XXXXXX)
NODES=$TMP/nodes
CHILD=""
cleanup() {
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null # timeout passes it on to mpirun
    launch/netns-nodes down "$NODES" >/dev/null 2>&1   # and every process on the nodes
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ "$(id -u)" -ne 0 ] || ! command -v ip >/dev/null 2>&1; then
    echo "SKIP multinode: network namespaces need root and iproute2"
    exit 0
fi
if ! out=$(launch/netns-nodes up "$NODES" 2 2>&1); then
    echo "SKIP multinode: cannot make namespace nodes here: $(printf '%s\n' "$out" | tail -1)"
    exit 0
fi
read -r -a NODE_ARGS < "$NODES/mpirun-args"
# 4 ranks on 2 cores that wait on TCP: yield while idle (on 1 node Open MPI knows
# it is oversubscribed; across the namespace nodes each sees 2 slots for 2 ranks)
NODE_ARGS+=(--mca mpi_yield_when_idle 1)
# a command in the background, waited for: an interrupt is handled at once (bash
# runs a trap only after a foreground command ends), and cleanup stops it
waited() {
    "$@" &
    CHILD=$!
    wait "$CHILD"
    local rc=$?
    CHILD=""
    return $rc
}
# mpirun on node1; the ranks spread 2 a node over node1 and node2
on_nodes() { # log, train args...
    local log=$1
    shift
    waited timeout 180 launch/netns-nodes run "$NODES" node1 -- "${MPIRUN[@]}" "${NODE_ARGS[@]}" -np 4 \
        $INFMOE train "$@" > "$log" 2>&1
}
on_one() { # log, train args...
    local log=$1
    shift
    waited timeout 180 "${MPIRUN[@]}" -np 4 $INFMOE train "$@" > "$log" 2>&1
}
losses() { steps_from "$1" 1; }
CFG=(tests/configs/tiny-topk.yaml --set parallel.ep=4 --set train.ckpt_every=10)

# ---- 4 ranks on 2 nodes, ep 4 across them, equal the 1-node run ----
on_one "$TMP/one.log" "${CFG[@]}" --set output.dir="$TMP/one"
on_nodes "$TMP/two.log" "${CFG[@]}" --set output.dir="$TMP/two"
hosts=$(grep -c . "$NODES/hosts")
if [ "$(losses "$TMP/one.log" | wc -l)" -eq 20 ] && [ "$(losses "$TMP/one.log")" = "$(losses "$TMP/two.log")" ] &&
    same_tensors "$TMP/one/step_000020/model.h5" "$TMP/two/step_000020/model.h5"; then
    pass "multinode: 4 ranks on $hosts nodes (2 a node, TCP between them), ep 4 across the nodes: the 20 losses and final tensors of 4 ranks on 1 node, bitwise"
else
    fail "multinode: 4 ranks on 2 nodes vs 1 node" "$(paste <(losses "$TMP/one.log") <(losses "$TMP/two.log"); tail -5 "$TMP/two.log")"
fi

# ---- the node-aware all-to-all across real nodes: the flat run's bytes ----
on_nodes "$TMP/node-aware.log" "${CFG[@]}" --set parallel.alltoall=node --set output.dir="$TMP/node-aware"
if [ "$(losses "$TMP/one.log")" = "$(losses "$TMP/node-aware.log")" ] &&
    same_tensors "$TMP/one/step_000020/model.h5" "$TMP/node-aware/step_000020/model.h5" &&
    grep -q '^all-to-all: node-aware, 2 nodes x 2 ranks of each expert group$' "$TMP/node-aware.log"; then
    pass "multinode: parallel.alltoall node (within each node, then node to node) on 2 nodes, ep 4: the flat run's losses and tensors, bitwise"
else
    fail "multinode: node-aware all-to-all on 2 nodes" "$(paste <(losses "$TMP/one.log") <(losses "$TMP/node-aware.log"); tail -5 "$TMP/node-aware.log")"
fi
INF=(tests/configs/tiny-infinite.yaml --set parallel.ep=4 --set train.steps=10)
on_one "$TMP/inf-one.log" "${INF[@]}" --set output.dir="$TMP/inf-one"
on_nodes "$TMP/inf-node.log" "${INF[@]}" --set parallel.alltoall=node --set output.dir="$TMP/inf-node"
if [ "$(losses "$TMP/inf-one.log" | wc -l)" -eq 10 ] && [ "$(losses "$TMP/inf-one.log")" = "$(losses "$TMP/inf-node.log")" ]; then
    pass "multinode: ∞-MoE at ep 4 with the node-aware all-to-all on 2 nodes: the 10 losses of the flat run on 1 node, bitwise"
else
    fail "multinode: ∞-MoE node-aware all-to-all on 2 nodes" "$(paste <(losses "$TMP/inf-one.log") <(losses "$TMP/inf-node.log"); tail -5 "$TMP/inf-node.log")"
fi

# ---- checkpoints move between layouts: 2 nodes -> 1 node and 1 node -> 2 nodes ----
on_one "$TMP/from-two.log" "${CFG[@]}" --set output.dir="$TMP/from-two" --resume "$TMP/two/step_000010"
on_nodes "$TMP/from-one.log" "${CFG[@]}" --set output.dir="$TMP/from-one" --resume "$TMP/one/step_000010"
after10() { steps_from "$1" 11; }
for way in "from-two:2 nodes, resumed on 1 node" "from-one:1 node, resumed on 2 nodes"; do
    d=${way%%:*}
    if grep -q "resumed from .*step_000010" "$TMP/$d.log" && [ "$(after10 "$TMP/$d.log" | wc -l)" -eq 10 ] &&
        [ "$(after10 "$TMP/$d.log")" = "$(after10 "$TMP/one.log")" ] &&
        same_tensors "$TMP/$d/step_000020/model.h5" "$TMP/one/step_000020/model.h5"; then
        pass "multinode: a step-10 checkpoint written on ${way#*:}: steps 11-20 and the final tensors as the straight run's"
    else
        fail "multinode: checkpoint written on ${way#*:}" "$(paste <(after10 "$TMP/one.log") <(after10 "$TMP/$d.log")); tail -5 "$TMP/$d.log")"
    fi
done

# ---- one node lost mid-step: the job ends, naming the rank; --resume auto goes on ----
# long enough to be running when the kill comes, however fast the machine
FAULT=(tests/configs/tiny-topk.yaml --set parallel.ep=4 --set train.ckpt_every=10 --set output.dir="$TMP/fault")
on_nodes "$TMP/fault.log" "${FAULT[@]}" --set train.steps=100000 &
job=$!
for _ in $(seq 1 1200); do # until step 12 (after the checkpoint at 10), at most 120 s
    [ "$(grep -c '^step ' "$TMP/fault.log" 2>/dev/null)" -ge 12 ] && break
    sleep 0.1
done
victims=""
for p in $(launch/netns-nodes pids "$NODES" node2); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = infmoe ] && victims="$victims $p"
done
t0=$(date +%s.%N)
[ -n "$victims" ] && kill -9 $victims
wait "$job"
rc=$?
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
lost=$(grep -o 'process rank [0-9]* with PID [0-9]* on node [^ ]* exited on signal 9' "$TMP/fault.log" | head -1)
at=$(grep '^step ' "$TMP/fault.log" | tail -1 | awk '{print $2}')
if [ -n "$victims" ] && [ $rc -ne 0 ] && [ $rc -ne 124 ] && awk -v t="$took" 'BEGIN{exit !(t < 30)}' &&
    [[ $lost =~ rank\ [23]\  ]]; then
    pass "multinode: node2's ranks killed at step $at: the job ended in $took s (< 30) with '$lost'"
else
    fail "multinode: a lost node ends the job (exit $rc after $took s, victims:${victims:- none})" "$(tail -12 "$TMP/fault.log")"
fi
newest=$(grep -o '[0-9]*$' "$TMP/fault/latest" 2>/dev/null) # the last published checkpoint
end=$((10#${newest:-0} + 10))
on_nodes "$TMP/fault-resume.log" "${FAULT[@]}" --set train.steps=$end --resume auto
from=$(grep -o 'resumed from [^ ]*step_[0-9]*' "$TMP/fault-resume.log" | grep -o '[0-9]*$')
if [ -n "$from" ] && [ "$((10#$from))" -ge 10 ] && [ "$((10#$from))" -eq "$((10#${newest:-0}))" ] &&
    tail -1 "$TMP/fault-resume.log" | grep -q "^done $end steps"; then
    pass "multinode: --resume auto after the lost node went on from its last checkpoint (step $((10#$from))) to $end on both nodes"
else
    fail "multinode: --resume auto after the lost node" "$(tail -5 "$TMP/fault-resume.log")"
fi

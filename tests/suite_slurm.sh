#!/usr/bin/env bash
# Launchers: launch/infmoe-mpirun's layout checks and a 2-rank run, then a real
# one-node SLURM (launch/slurm/local-cluster) running launch/slurm/train.sbatch:
# a plain job, an srun job, and a job that gets SIGUSR1, saves, requeues itself
# and finishes from its checkpoint with the losses of an uninterrupted run.
# Prints PASS/FAIL lines (tests/run.sh counts them), or SKIP when SLURM is
# unavailable. Run from anywhere: bash tests/suite_slurm.sh
set -u
cd "$(dirname "$0")/.." || exit 1
. tests/lib.sh

TMP=$(mktemp -d /tmp/infmoe-suite-slurm.XXXXXX)
CLUSTER=""
cleanup() {
    if [ -n "$CLUSTER" ]; then launch/slurm/local-cluster stop "$CLUSTER" >/dev/null 2>&1; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

pass() { echo "PASS $1"; }
fail() {
    echo "FAIL $1"
    [ $# -gt 1 ] && printf '%s\n' "$2" | tail -25 | sed 's/^/    /'
}
W=launch/infmoe-mpirun
INFMOE=build/infmoe
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) # nproc obeys OMP_NUM_THREADS otherwise
START=$(date +%s)

# ---- (a) the wrapper refuses inconsistent layouts: one line, exit 2 ----
refused() { # name, expected text, wrapper args...
    local name=$1 want=$2 out rc
    shift 2
    out=$("$W" "$@" 2>&1)
    rc=$?
    if [ $rc -eq 2 ] && printf '%s\n' "$out" | grep -qF -- "$want" && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ]; then
        pass "$name"
    else
        fail "$name (exit $rc, want exit 2 and one line: $want)" "$out"
    fi
}
refused "infmoe-mpirun: refuses $((CORES + 1)) ranks x 1 thread on $CORES cores" \
    "infmoe-mpirun: $((CORES + 1)) ranks x 1 thread(s) per node need $((CORES + 1)) cores, but this node has $CORES" \
    -n $((CORES + 1)) -t 1 tests/configs/tiny.yaml
refused "infmoe-mpirun: refuses 1 rank x $((CORES + 1)) threads on $CORES cores" \
    "infmoe-mpirun: 1 ranks x $((CORES + 1)) thread(s) per node need $((CORES + 1)) cores, but this node has $CORES" \
    -n 1 -t $((CORES + 1)) tests/configs/tiny.yaml
refused "infmoe-mpirun: refuses --set parallel.ep=2 on 3 ranks" \
    "infmoe-mpirun: parallel.ep=2 does not divide 3 ranks" \
    -n 3 -t 1 --oversubscribe tests/configs/tiny-topk.yaml --set parallel.ep=2
printf 'data:\n  train: data/demo/train.bin\nffn:\n  kind: topk\n  experts: 8\nparallel:\n  ep: 4  # four ranks a group\n' >"$TMP/ep4.yaml"
refused "infmoe-mpirun: refuses parallel.ep: 4 from the config file on 2 ranks" \
    "infmoe-mpirun: parallel.ep=4 does not divide 2 ranks" \
    -n 2 -t 1 --oversubscribe "$TMP/ep4.yaml"

# ---- (a2) the default layout rule, on nodes described by a stand-in lscpu and nproc ----
fake_node() { # dir, CPUs, lscpu's NODE,SOCKET line for CPU $i (shell arithmetic on i)
    mkdir -p "$1"
    printf '#!/bin/sh\necho "# CPU,Node,Socket"\ni=0; while [ $i -lt %s ]; do echo "%s"; i=$((i + 1)); done\n' "$2" "$3" >"$1/lscpu"
    printf '#!/bin/sh\necho %s\n' "$2" >"$1/nproc"
    chmod +x "$1/lscpu" "$1/nproc"
}
rule_case() { # name, dir, expected text in the command and the summary line
    local out
    out=$(PATH="$2:$PATH" "$W" --dry-run tests/configs/tiny.yaml 2>&1)
    if printf '%s\n' "$out" | grep -qF -- "$3" && printf '%s\n' "$out" | grep -qF -- "$4"; then
        pass "infmoe-mpirun: default layout on $1: $(printf '%s\n' "$out" | sed -n 's/^infmoe-mpirun: //p')"
    else
        fail "infmoe-mpirun: default layout on $1 (want '$3' and '$4')" "$out"
    fi
}
fake_node "$TMP/numa2" 16 '$((i / 8)),$((i / 8))'
rule_case "2 NUMA domains x 8 CPUs" "$TMP/numa2" "--map-by numa:PE=8 --bind-to core -x OMP_PLACES=cores -x OMP_PROC_BIND=close" "2 ranks (2 per node on 1 node(s)) x 8 threads, one rank per numa domain"
fake_node "$TMP/numa4" 32 '$((i / 8)),$((i / 16))'
rule_case "4 NUMA domains in 2 sockets x 8 CPUs" "$TMP/numa4" "--map-by numa:PE=8" "4 ranks (4 per node on 1 node(s)) x 8 threads, one rank per numa domain"
fake_node "$TMP/sock2" 8 ',$((i % 2))'
rule_case "2 sockets, no NUMA domains named" "$TMP/sock2" "--map-by socket:PE=4" "2 ranks (2 per node on 1 node(s)) x 4 threads, one rank per socket domain"
fake_node "$TMP/bare" 6 ','
rule_case "a node lscpu cannot describe" "$TMP/bare" "--map-by slot:PE=6" "1 ranks (1 per node on 1 node(s)) x 6 threads, one rank per node"

# ---- (b) the wrapper trains on 2 ranks ----
over=()
[ "$CORES" -lt 2 ] && over=(--oversubscribe)
"$W" -n 2 "${over[@]}" tests/configs/tiny.yaml --set output.dir="$TMP/w2" >"$TMP/w2.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && tail -1 "$TMP/w2.log" | grep -q '^done 20 steps .*| ranks 2 x threads [0-9]*$'; then
    pass "infmoe-mpirun: tiny on 2 ranks ($(tail -1 "$TMP/w2.log" | sed 's/.*| ranks/ranks/'))"
else
    fail "infmoe-mpirun: tiny on 2 ranks (exit $rc)" "$(cat "$TMP/w2.log")"
fi

"$W" tests/configs/tiny.yaml --set train.steps=5 --set output.dir="$TMP/wdef" >"$TMP/wdef.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && grep -q "one rank per" "$TMP/wdef.log" && tail -1 "$TMP/wdef.log" | grep -q '^done 5 steps'; then
    pass "infmoe-mpirun: the default layout trains here ($(grep -o 'infmoe-mpirun: .*' "$TMP/wdef.log" | head -1 | sed 's/^infmoe-mpirun: //'))"
else
    fail "infmoe-mpirun: the default layout (exit $rc)" "$(cat "$TMP/wdef.log")"
fi

# ---- (c) a real SLURM: start a one-node cluster ----
skip() {
    echo "SKIP slurm: $1"
    exit 0
}
for c in munged slurmctld slurmd sbatch squeue scontrol scancel; do
    command -v $c >/dev/null 2>&1 || skip "$c not installed (Debian packages slurm-wlm and munge: make deps)"
done
[ "$(id -u)" -eq 0 ] || skip "the local cluster needs root"
[ "$CORES" -ge 2 ] || skip "the batch jobs need 2 cores, this machine has $CORES"
if ! out=$(launch/slurm/local-cluster start "$TMP/slurm" 2>&1); then
    skip "the local cluster did not start: $(printf '%s\n' "$out" | tail -1)"
fi
CLUSTER=$TMP/slurm
export SLURM_CONF=$CLUSTER/slurm.conf
echo "slurm: local cluster up in $(($(date +%s) - START)) s ($CLUSTER)"

OUT=$TMP/out
mkdir -p "$OUT"
submit() { # sbatch options... -- train.sbatch args...; prints the job id
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    sbatch --parsable --time=00:10:00 --output="$OUT/%j.out" "${opts[@]}" launch/slurm/train.sbatch "$@" 2>&1
}
# wait until job $1 has left the queue and its output has the batch shell's last line
wait_job() { # jobid, timeout seconds
    local out=$OUT/$1.out t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$2" ]; do
        if [ -z "$(squeue -h -j "$1" -o %i 2>/dev/null)" ] && grep -q '^train.sbatch: finished with status' "$out" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}
diag() { # jobid: the output and the controller's last lines
    grep -v '^step ' "$OUT/$1.out" 2>/dev/null | tail -20
    squeue -j "$1" 2>&1 | tail -2
    tail -5 "$CLUSTER/log/slurmctld.log" 2>/dev/null
}
# usr1_when_training JOB: once JOB has logged 2 steps, SIGUSR1 to its batch shell
usr1_when_training() {
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    for _ in $(seq 600); do
        n=$(grep -c '^step ' "$OUT/$1.out" 2>/dev/null)
        [ "${n:-0}" -ge 2 ] && break
        grep -q '^train.sbatch: finished' "$OUT/$1.out" 2>/dev/null && break
        sleep 0.1
    done
    scancel --signal=USR1 --batch "$1"
}
last_loss() { grep "^step $2/$2 " "$1" | tail -1 | sed 's/.*| loss \([0-9.]*\) |.*/\1/'; }

# a 20-step job through the mpirun launcher: done, checkpoint saved and verified
t0=$SECONDS
job=$(submit -- tests/configs/tiny.yaml --set output.dir="$TMP/sb-tiny")
if [[ $job =~ ^[0-9]+$ ]] && wait_job "$job" 90 && grep -q '^done 20 steps' "$OUT/$job.out" &&
    grep -q '^train.sbatch: finished with status 0' "$OUT/$job.out" &&
    [ "$(cat "$TMP/sb-tiny/latest" 2>/dev/null)" = step_000020 ] &&
    vout=$($INFMOE ckpt verify "$TMP/sb-tiny/latest" 2>&1); then
    pass "slurm: sbatch train.sbatch tiny.yaml (mpirun, 2 ranks): done, step_000020 verified ($(printf '%s' "$vout" | sed 's/.*: ok: /ok: /' | head -1)) in $((SECONDS - t0)) s"
else
    fail "slurm: sbatch train.sbatch tiny.yaml (mpirun launcher), job $job" "$(diag "$job"; printf '%s\n' "${vout:-}")"
fi

# the same through srun --mpi=pmix
t0=$SECONDS
job=$(submit --export=ALL,LAUNCHER=srun -- tests/configs/tiny.yaml --set output.dir="$TMP/sb-srun")
if [[ $job =~ ^[0-9]+$ ]] && wait_job "$job" 90 && grep -q '^done 20 steps .*| ranks 2 x threads 1$' "$OUT/$job.out" &&
    [ "$(last_loss "$OUT/$job.out" 20)" = "$(last_loss "$TMP/w2.log" 20)" ]; then
    pass "slurm: LAUNCHER=srun (srun --mpi=pmix, 2 ranks): done, final loss as infmoe-mpirun's in $((SECONDS - t0)) s"
else
    fail "slurm: LAUNCHER=srun, job $job" "$(diag "$job")"
fi

# ---- (d) SIGUSR1 to the batch shell: save, requeue, resume, same losses as a straight run ----
STEPS=5000
long=(tests/configs/tiny.yaml --set train.steps=$STEPS --set train.log_every=50)
t0=$SECONDS
job=$(submit -- "${long[@]}" --set output.dir="$TMP/sb-sig")
signalled=0
usr1_when_training "$job" && signalled=1
if [ $signalled -eq 1 ] && wait_job "$job" 150; then
    out=$OUT/$job.out
    saved=$(sed -n 's/^signal 10: saved at step \([0-9]*\);.*/\1/p' "$out" | head -1)
    # the uninterrupted run, directly with mpirun
    mpi=(mpirun -np 2 --bind-to core)
    [ "$(id -u)" -eq 0 ] && mpi+=(--allow-run-as-root)
    OMP_NUM_THREADS=1 "${mpi[@]}" $INFMOE train "${long[@]}" --set output.dir="$TMP/straight" >"$TMP/straight.log" 2>&1
    want=$(last_loss "$TMP/straight.log" $STEPS)
    got=$(last_loss "$out" $STEPS)
    if [ -n "$saved" ] && [ "$saved" -lt $STEPS ] &&
        grep -q "^train.sbatch: saved a checkpoint (status 75); requeueing job $job" "$out" &&
        grep -q "^train.sbatch: job $job start 2 " "$out" &&
        grep -q "^resumed from .*step_$(printf %06d "$saved"): step $saved," "$out" &&
        grep -q "^done $STEPS steps" "$out" && grep -q '^train.sbatch: finished with status 0' "$out" &&
        [ -n "$want" ] && [ "$got" = "$want" ]; then
        pass "slurm: USR1 at step $saved: saved, requeued, resumed, done $STEPS steps, final loss $got = uninterrupted run's ($((SECONDS - t0)) s)"
    else
        fail "slurm: USR1 -> save -> requeue -> resume (saved at '${saved:-none}', final loss '$got' vs uninterrupted '$want')" "$(diag "$job")"
    fi
else
    fail "slurm: USR1 -> save -> requeue -> resume: job $job did not finish (signalled: $signalled)" "$(diag "$job")"
fi

# ---- (e) two namespace nodes (local-cluster --nodes 2): sbatch -N 2, mpirun and srun, USR1 ----
launch/slurm/local-cluster stop "$CLUSTER" >/dev/null 2>&1
CLUSTER=""
# a namespace node's slurmd at times dies at once on its first start after the
# one-node cluster stopped (intermittent: 2 of 7 suites on one machine); a second
# try, in a fresh directory, starts it
two=""
if [ -n "$(command -v ip)" ]; then
    for try in 1 2; do
        if out=$(launch/slurm/local-cluster start "$TMP/slurm2-$try" --nodes 2 2>&1); then
            two=$TMP/slurm2-$try
            break
        fi
        [ "$try" = 1 ] && printf '%s\n' "$out" | tail -30 | sed 's/^/    first try: /'
        sleep 2
    done
fi
if [ -z "$two" ]; then
    echo "SKIP slurm: a 2-node cluster cannot be made here: $(printf '%s\n' "${out:-ip not installed}" | tail -1)"
    printf '%s\n' "${out:-}" | tail -30 | sed 's/^/    /'
    echo "slurm: suite took $(($(date +%s) - START)) s"
    exit 0
fi
CLUSTER=$two
OUT=$TMP/out2 # job ids start again at 1
mkdir -p "$OUT"
export SLURM_CONF=$CLUSTER/slurm.conf
on2() { launch/slurm/local-cluster run "$CLUSTER" -- "$@"; }
squeue() { on2 squeue "$@"; }
scancel() { on2 scancel "$@"; }
sbatch() { on2 sbatch "$@"; }
# 4 ranks on 2 shared cores talking TCP: yield while idle; Open MPI on the nodes' network only
NET=10.213.7.0/24
MN=(--nodes=2 --ntasks-per-node=2 --export=ALL,OMPI_MCA_mpi_yield_when_idle=1,OMPI_MCA_btl_tcp_if_include=$NET,OMPI_MCA_oob_tcp_if_include=$NET)
CFG4=(tests/configs/tiny-topk.yaml --set parallel.ep=4)
"${MPIRUN[@]}" -np 4 $INFMOE train "${CFG4[@]}" --set output.dir="$TMP/one4" >"$TMP/one4.log" 2>&1
for launcher in mpirun srun; do
    t0=$SECONDS
    job=$(submit "${MN[@]/#--export=ALL,/--export=ALL,LAUNCHER=$launcher,}" -- "${CFG4[@]}" --set output.dir="$TMP/mn-$launcher")
    if [[ $job =~ ^[0-9]+$ ]] && wait_job "$job" 120 && grep -q "^train.sbatch: job $job start 1 on node\[1-2\]" "$OUT/$job.out" &&
        grep -q '^done 20 steps .*| ranks 4 x threads 1$' "$OUT/$job.out" &&
        [ "$(steps_from "$OUT/$job.out" 1)" = "$(steps_from "$TMP/one4.log" 1)" ]; then
        pass "slurm: sbatch -N 2 (2 namespace nodes x 2 ranks, LAUNCHER=$launcher), ep 4 across the nodes: the 20 losses of 4 ranks on one node, in $((SECONDS - t0)) s"
    else
        fail "slurm: sbatch -N 2 with LAUNCHER=$launcher, job $job" "$(diag "$job")"
    fi
done

t0=$SECONDS
job=$(submit "${MN[@]}" -- "${long[@]}" --set output.dir="$TMP/mn-sig")
signalled=0
usr1_when_training "$job" && signalled=1
if [ $signalled -eq 1 ] && wait_job "$job" 240; then
    out=$OUT/$job.out
    saved=$(sed -n 's/^signal 10: saved at step \([0-9]*\);.*/\1/p' "$out" | head -1)
    if [ -n "$saved" ] && grep -q "^train.sbatch: job $job start 2 on node\[1-2\]" "$out" &&
        grep -q "^resumed from .*step_$(printf %06d "$saved"): step $saved," "$out" &&
        grep -q "^done $STEPS steps .*| ranks 4 x threads 1$" "$out" && grep -q '^train.sbatch: finished with status 0' "$out"; then
        pass "slurm: on 2 nodes, USR1 at step $saved: saved, requeued, resumed on both nodes, done $STEPS steps ($((SECONDS - t0)) s)"
    else
        fail "slurm: on 2 nodes, USR1 -> save -> requeue -> resume (saved at '${saved:-none}')" "$(diag "$job")"
    fi
else
    fail "slurm: on 2 nodes, USR1: job $job did not finish (signalled: $signalled)" "$(diag "$job")"
fi

echo "slurm: suite took $(($(date +%s) - START)) s"

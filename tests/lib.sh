# Sourced by the tests/suite_*.sh scripts (run from the repo root): the test
# environment, the mpirun command line, and the PASS/FAIL lines tests/run.sh counts.
set -u
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
MPIRUN=(mpirun --oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
INFMOE=build/infmoe

pass() { echo "PASS $1"; }
fail() {
    echo "FAIL $1"
    [ $# -gt 1 ] && printf '%s\n' "$2" | head -20 | sed 's/^/    /'
}
# exit status wanted ("nonzero", or a number), name, expected text, command...: the
# command exits so, printing exactly one line, which holds the text
refused_with() {
    local want_rc=$1 name=$2 want=$3 out rc
    shift 3
    out=$("$@" 2>&1)
    rc=$?
    if { [ "$want_rc" = nonzero ] && [ $rc -ne 0 ] || [ "$rc" = "$want_rc" ]; } &&
        printf '%s\n' "$out" | grep -qF -- "$want" && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ]; then
        pass "$name"
    else
        fail "$name (exit $rc, want one line: $want)" "$out"
    fi
}
# "step N/M | loss X" lines of a training log from step $2 on, as "N/M X"
steps_from() { grep '^step ' "$1" | awk -v s="$2" '{split($2, a, "/"); if (a[1] + 0 >= s) print $2, $5}'; }
# params, m and v of two checkpoints equal bit for bit (the config attribute differs: output.dir)
same_tensors() {
    local g
    for g in params adam_m adam_v; do h5diff -q "$1" "$2" "/$g" "/$g" >/dev/null || return 1; done
}
# name, expected text, command...: a non-zero exit with exactly one line holding the text
refused() { refused_with nonzero "$@"; }

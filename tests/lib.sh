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
# 1 where oneDNN's fp32 products keep a row's bits whatever the product's shape and
# thread count (AVX-512), 0 where they do not (AVX2: include/infmoe/gemm.h); runs
# promised bitwise across thread counts or row groupings are compared to round-off there
ROWS_EXACT=$(build/tests/tool_isa --rows-exact 2>/dev/null || echo 1)
ONEDNN_ISA=$(build/tests/tool_isa 2>/dev/null || echo unknown)
# two logs' losses from step $3 on: the same steps, each within relative $4
losses_close() {
    paste <(steps_from "$1" "$3") <(steps_from "$2" "$3") |
        awk -v tol="$4" 'NF != 4 || $1 != $3 || $2 !~ /^[0-9.]+$/ || $4 !~ /^[0-9.]+$/ {bad = 1}
                         {d = $2 - $4; if (d < 0) d = -d; if (d > tol * $2) bad = 1}
                         END {exit (bad || NR == 0)}'
}
# params, m and v of two checkpoints equal bit for bit (the config attribute differs: output.dir)
same_tensors() {
    local g
    for g in params adam_m adam_v; do h5diff -q "$1" "$2" "/$g" "/$g" >/dev/null || return 1; done
}
# name, expected text, command...: a non-zero exit with exactly one line holding the text
refused() { refused_with nonzero "$@"; }

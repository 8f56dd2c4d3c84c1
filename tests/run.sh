#!/usr/bin/env bash
# make test: every infmoe test. Prints PASS/FAIL per test and closes with
# "N passed, N failed"; exits non-zero if anything failed.
set -u
cd "$(dirname "$0")/.."

PASSED=0
FAILED=0
pass() { echo "PASS $1"; PASSED=$((PASSED + 1)); }
fail() {
    echo "FAIL $1"
    [ $# -gt 1 ] && printf '%s\n' "$2" | head -30 | sed 's/^/    /'
    FAILED=$((FAILED + 1))
}

export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
MPIRUN=(mpirun --oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
INFMOE=build/infmoe

# ---- C test programs: kernels, gradients, golden, config and data units ----
for t in build/tests/test_*; do
    out=$("$t" 2>&1)
    rc=$?
    name=$(printf '%s\n' "$out" | sed -n 's/^\(PASS\|FAIL\) //p' | tail -1)
    if [ $rc -eq 0 ] && printf '%s\n' "$out" | grep -q '^PASS '; then
        pass "${name:-$t}"
    else
        fail "${name:-$t} (exit $rc)" "$out"
    fi
done

# ---- config errors: each bad config gives its one expected line and exits non-zero ----
for f in tests/configs/bad/*.yaml; do
    expect=$(sed -n 's/^# expect: //p' "$f")
    ranks=$(sed -n 's/^# ranks: //p' "$f")
    if [ -n "$ranks" ]; then
        out=$("${MPIRUN[@]}" -np "$ranks" $INFMOE train "$f" 2>&1 >/dev/null)
        rc=$?
        lines=$(printf '%s\n' "$out" | grep -cF -- "$expect")
    else
        out=$($INFMOE train "$f" 2>&1)
        rc=$?
        lines=$(printf '%s\n' "$out" | wc -l)
    fi
    if [ $rc -ne 0 ] && printf '%s\n' "$out" | grep -qF -- "$expect" && [ "$lines" -eq 1 ]; then
        pass "config error: $(basename "$f" .yaml)"
    else
        fail "config error: $(basename "$f" .yaml) (exit $rc, want one line: $expect)" "$out"
    fi
done

expect_error() { # name, expected text, command...
    local name=$1 want=$2
    shift 2
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && printf '%s\n' "$out" | grep -qF -- "$want" && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ]; then
        pass "$name"
    else
        fail "$name (exit $rc, want one line: $want)" "$out"
    fi
}

expect_error "config error: missing file" "tests/configs/none.yaml: cannot read config file: No such file or directory" \
    $INFMOE train tests/configs/none.yaml
expect_error "config error: --set unknown key" "--set model.n_layers=3: unknown key 'model.n_layers'" \
    $INFMOE train tests/configs/tiny.yaml --set model.n_layers=3
expect_error "config error: --set bad value" "--set: train.steps: expected an integer, got 'many'" \
    $INFMOE train tests/configs/tiny.yaml --set train.steps=many
expect_error "config error: --set without '='" "--set train.steps: expected section.key=value" \
    $INFMOE train tests/configs/tiny.yaml --set train.steps

# ---- bad token shards ----
printf '' > "$TMP/empty.bin"
head -c 3000 data/demo/val.bin > "$TMP/truncated.bin"
cp data/demo/val.bin "$TMP/magic.bin"
printf '\x01\x00\x00\x00' | dd of="$TMP/magic.bin" bs=1 seek=0 conv=notrunc status=none
cp data/demo/val.bin "$TMP/version.bin"
printf '\x07\x00\x00\x00' | dd of="$TMP/version.bin" bs=1 seek=4 conv=notrunc status=none
cp data/demo/val.bin "$TMP/token.bin"
printf '\xff\x01' | dd of="$TMP/token.bin" bs=1 seek=1100 conv=notrunc status=none
expect_error "data error: empty file" "empty.bin: not a token shard: 0 bytes, shorter than the 1024-byte header" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/empty.bin"
expect_error "data error: truncated file" "truncated.bin: truncated or padded token shard: header says" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/truncated.bin"
expect_error "data error: wrong magic" "magic.bin: not a token shard: magic 1, expected 20240520" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/magic.bin"
expect_error "data error: wrong version" "version.bin: token shard version 7, expected 1" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/version.bin"
expect_error "data error: token outside the vocabulary" "token.bin: token id 511 is outside model.vocab_size 256" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/token.bin"
expect_error "data error: missing shard" "no such token shard" \
    $INFMOE train tests/configs/tiny.yaml --set data.train="$TMP/none*.bin"

# ---- command line ----
cli_ok() { # name, expected text, command...
    local name=$1 want=$2
    shift 2
    local out
    if out=$("$@" 2>&1) && printf '%s\n' "$out" | grep -qF -- "$want"; then pass "$name"; else fail "$name" "$out"; fi
}
cli_ok "cli: infmoe --help" "usage: infmoe COMMAND" $INFMOE --help
cli_ok "cli: infmoe train --help" "usage: infmoe train CONFIG" $INFMOE train --help
cli_ok "cli: infmoe prep --help" "usage: infmoe prep --text" $INFMOE prep --help
expect_error "cli: unknown command" "infmoe: unknown command 'bogus'" sh -c "$INFMOE bogus 2>&1 | head -1; exit \${PIPESTATUS:-1}"
expect_error "cli: unknown train option" "infmoe train: unknown option '--bogus'" $INFMOE train tests/configs/tiny.yaml --bogus
expect_error "cli: prep without --out" "infmoe prep: need --text FILE... and --out DIR" sh -c "$INFMOE prep --text README.md 2>&1 | head -1; exit 1"

# ---- prep round trip: bytes in, the same bytes out as tokens ----
printf 'hello, infmoe\nsecond line of text for the validation split\n' > "$TMP/a.txt"
if $INFMOE prep --text "$TMP/a.txt" --out "$TMP/prep" --val-fraction 0.5 >/dev/null &&
    [ "$(tail -c +1025 "$TMP/prep/train.bin" | od -An -tu2 -v | wc -w)" -eq 30 ] &&
    [ "$(tail -c +1025 "$TMP/prep/val.bin" | od -An -tu2 -v | wc -w)" -eq 29 ] &&
    [ "$(tail -c +1025 "$TMP/prep/train.bin" | od -An -tu2 -v | awk '{print $1}' | head -1)" -eq 104 ]; then
    pass "prep: byte tokens and the train/val split"
else
    fail "prep: byte tokens and the train/val split"
fi

# ---- MPI equivalence: same losses at 1, 2 and 4 ranks (global batch fixed) ----
losses() { grep '^step ' "$1" | sed 's/.*| loss \([0-9.]*\) |.*/\1/'; }
run_ranks() { # ranks, log
    "${MPIRUN[@]}" -np "$1" $INFMOE train tests/configs/tiny.yaml --set output.dir="$TMP/run$1" > "$2" 2>&1
}
if run_ranks 1 "$TMP/p1.log"; then
    l1=$(losses "$TMP/p1.log")
    first=$(echo "$l1" | head -1)
    last=$(echo "$l1" | tail -1)
    if [ "$(echo "$l1" | wc -l)" -eq 20 ] && awk -v a="$first" -v b="$last" 'BEGIN{exit !(b < a - 0.3)}'; then
        pass "train: 20 steps on 1 rank, loss falls ($first -> $last)"
    else
        fail "train: 20 steps on 1 rank, loss falls" "$(cat "$TMP/p1.log")"
    fi
    for p in 2 4; do
        if run_ranks $p "$TMP/p$p.log"; then
            worst=$(paste <(echo "$l1") <(losses "$TMP/p$p.log") |
                awk 'BEGIN{w=0} {d=$1-$2; if(d<0)d=-d; r=d/$1; if(r>w)w=r} END{if(NR!=20)w=1; printf "%.2e", w}')
            if awk -v w="$worst" 'BEGIN{exit !(w <= 1e-5)}'; then
                pass "mpi: 20 steps at $p ranks equal 1 rank (max rel diff $worst <= 1e-5)"
            else
                fail "mpi: 20 steps at $p ranks equal 1 rank (max rel diff $worst > 1e-5)" "$(paste <(echo "$l1") <(losses "$TMP/p$p.log"))"
            fi
        else
            fail "mpi: training at $p ranks" "$(cat "$TMP/p$p.log")"
        fi
    done
else
    fail "train: 20 steps on 1 rank" "$(cat "$TMP/p1.log")"
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

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

# ---- training and MPI equivalence: same losses at every layout (global batch fixed) ----
losses() { grep '^step ' "$1" | sed 's/.*| loss \([0-9.]*\) |.*/\1/'; }
# largest relative difference between two loss columns (1 if their lengths differ)
max_rel_diff() {
    paste <(echo "$1") <(echo "$2") |
        awk -v n="$(echo "$1" | wc -l)" 'BEGIN{w=0} {d=$1-$2; if(d<0)d=-d; r=d/$1; if(r>w)w=r} END{if(NR!=n || $2=="")w=1; printf "%.2e", w}'
}
train_run() { # config, ranks, ep, log
    "${MPIRUN[@]}" -np "$2" $INFMOE train "$1" --set parallel.ep="$3" --set output.dir="$TMP/run-$(basename "$1" .yaml)-$2-$3" > "$4" 2>&1
}
equivalence() { # config, then layouts "P:ep" compared with the first
    local config=$1 name
    name=$(basename "$config" .yaml)
    shift
    local ref_p=${1%:*} ref
    local ref_ep=${1#*:}
    shift
    if ! train_run "$config" "$ref_p" "$ref_ep" "$TMP/$name-ref.log"; then
        fail "mpi: $name at P=$ref_p ep=$ref_ep" "$(cat "$TMP/$name-ref.log")"
        return
    fi
    ref=$(losses "$TMP/$name-ref.log")
    for layout in "$@"; do
        local p=${layout%:*} worst
        local ep=${layout#*:}
        local log="$TMP/$name-$p-$ep.log"
        if train_run "$config" "$p" "$ep" "$log"; then
            worst=$(max_rel_diff "$ref" "$(losses "$log")")
            if awk -v w="$worst" 'BEGIN{exit !(w <= 1e-5)}'; then
                pass "mpi: $name, 20 steps at P=$p ep=$ep equal P=$ref_p (max rel diff $worst <= 1e-5)"
            else
                fail "mpi: $name, 20 steps at P=$p ep=$ep equal P=$ref_p (max rel diff $worst > 1e-5)" \
                    "$(paste <(echo "$ref") <(losses "$log"))"
            fi
        else
            fail "mpi: $name at P=$p ep=$ep" "$(cat "$log")"
        fi
    done
    local first last
    first=$(echo "$ref" | head -1)
    last=$(echo "$ref" | tail -1)
    if [ "$(echo "$ref" | wc -l)" -eq 20 ] && awk -v a="$first" -v b="$last" 'BEGIN{exit !(b < a - 0.3)}'; then
        pass "train: $name, 20 steps, loss falls ($first -> $last)"
    else
        fail "train: $name, 20 steps, loss falls ($first -> $last)" "$(cat "$TMP/$name-ref.log")"
    fi
}
equivalence tests/configs/tiny.yaml 1:1 2:1 4:1
equivalence tests/configs/tiny-topk.yaml 1:1 2:1 2:2 4:2 4:4

# ---- an expert that receives no tokens: no hang, zero gradients, same losses ----
empty_ref=""
for layout in 1:1 2:1 2:2 4:2 4:4; do
    p=${layout%:*}
    ep=${layout#*:}
    if out=$(timeout 120 "${MPIRUN[@]}" -np "$p" build/tests/mpi_moe_empty "$ep" 2>&1) &&
        printf '%s\n' "$out" | grep -q "expert without tokens: zero gradients"; then
        got=$(printf '%s\n' "$out" | grep '^step ' | awk '{print $4}')
        [ -z "$empty_ref" ] && empty_ref=$got
        worst=$(max_rel_diff "$empty_ref" "$got")
        if awk -v w="$worst" 'BEGIN{exit !(w <= 1e-5)}'; then
            pass "mpi: expert with no tokens at P=$p ep=$ep: no hang, zero gradients, losses as P=1 ($worst)"
        else
            fail "mpi: expert with no tokens at P=$p ep=$ep: losses differ from P=1 ($worst)" "$out"
        fi
    else
        fail "mpi: expert with no tokens at P=$p ep=$ep" "$out"
    fi
done

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

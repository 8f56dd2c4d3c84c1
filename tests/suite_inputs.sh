#!/usr/bin/env bash
# Unusual and hostile inputs: damaged stats files, odd config files, FIFOs and
# directories for paths, shards cut short while training, numbers on the command
# line, launcher variables. Run by tests/run.sh from the repo root: one PASS/FAIL
# line per test. The config fuzzer is a C program (tests/test_fuzz_config.c).
set -u
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
INFMOE=build/infmoe
T=tests/configs/tiny.yaml
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# name, whether it held (0) or not, what to show when it did not
report() {
    if [ "$2" -eq 0 ]; then
        echo "PASS $1"
    else
        echo "FAIL $1"
        printf '%s\n' "${3:-}" | head -20 | sed 's/^/    /'
    fi
}
# name, expected text, command...: non-zero exit within 20 s, one line holding the text
refused() {
    local name=$1 want=$2 out rc
    shift 2
    out=$(timeout 20 "$@" 2>&1)
    rc=$?
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && printf '%s\n' "$out" | grep -qF -- "$want" &&
        [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ]
    report "$name" $? "exit $rc, want one line: $want"$'\n'"$out"
}

# ---- stats.h5: damage is reported as damage, in bounded time ----
$INFMOE train tests/configs/tiny-topk.yaml --set train.steps=3 --set train.warmup=0 --set train.stats_every=1 \
    --set output.dir="$TMP/st" > "$TMP/st.log" 2>&1
S=$TMP/st/stats.h5
flip() { # file, offset, out
    cp "$1" "$3"
    printf '%b' "\\x$(printf '%02x' $(( $(od -An -tu1 -j "$2" -N1 "$1") ^ 0x5a )))" |
        dd of="$3" bs=1 seek="$2" conv=notrunc status=none
}
size=$(stat -c %s "$S" 2>/dev/null || echo 0)
bad=""
damaged=0
offsets=""
for frac in 1 8 15 22 40 70 90; do # offsets spread over superblock, object headers and rows
    off=$((size * frac / 100))
    offsets="$offsets $off"
    flip "$S" "$off" "$TMP/flip-$off.h5"
    # in parallel: a damaged file costs each reader about a second of SWMR retries
    (timeout 20 $INFMOE stats "$TMP/flip-$off.h5" > /dev/null 2> "$TMP/flip-$off.err"; echo $? > "$TMP/flip-$off.rc") &
done
wait
for off in $offsets; do
    out=$(cat "$TMP/flip-$off.err")
    rc=$(cat "$TMP/flip-$off.rc")
    if [ "$rc" -eq 124 ] || { [ "$rc" -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -ne 1 ]; }; then
        bad="$bad"$'\n'"byte $off: exit $rc: $out"
    fi
    printf '%s\n' "$out" | grep -q "damaged stats file" && damaged=$((damaged + 1))
done
[ "$size" -gt 0 ] && [ -z "$bad" ] && [ $damaged -ge 5 ]
report "stats: 7 single-byte flips of stats.h5: no hang, each read or refused in one line ($damaged as damaged)" $? \
    "$bad$(tail -2 "$TMP/st.log")"
cp "$S" "$TMP/cut.h5"
truncate -s $((size / 3)) "$TMP/cut.h5"
refused "stats: a truncated stats.h5 is named truncated" "cut.h5: truncated stats file: " $INFMOE stats "$TMP/cut.h5"
start=$(date +%s)
refused "stats --follow on a file that is not HDF5: one line, at once" "README.md: not an HDF5 file" \
    $INFMOE stats --follow README.md
[ $(($(date +%s) - start)) -le 5 ] || report "stats --follow on a file that is not HDF5 took over 5 s" 1

# ---- config files: one document, no NUL, nesting bounded, MoE layers that exist ----
printf 'data:\n  train: data/demo/train.bin\n\0model:\n  n_layer: 3\n' > "$TMP/nul.yaml"
refused "config error: a NUL byte is refused, not taken as the end" "nul.yaml:3:1: a NUL byte: a config file is text" \
    $INFMOE train "$TMP/nul.yaml"
awk 'BEGIN { s = "data: "; for (i = 0; i < 100000; i++) s = s "["; for (i = 0; i < 100000; i++) s = s "]"; print s }' \
    > "$TMP/deep.yaml"
start=$(date +%s%N)
refused "config error: 100000-deep flow nesting refused quickly" "deep.yaml:1:70: nested deeper than 64 levels" \
    $INFMOE train "$TMP/deep.yaml"
ms=$((($(date +%s%N) - start) / 1000000))
[ $ms -le 5000 ] || report "config error: 100000-deep nesting took $ms ms" 1

# ---- paths that are not regular files, and globs ----
mkfifo "$TMP/fifo.yaml" "$TMP/fifo.bin"
refused "config error: a FIFO as config is refused at once" "fifo.yaml: cannot read config file: it is a FIFO, not a regular file" \
    $INFMOE train "$TMP/fifo.yaml"
refused "config error: a directory as config says so" "cannot read config file: it is a directory" $INFMOE train "$TMP"
refused "data error: a FIFO as shard is refused at once" "fifo.bin: cannot open token shard: it is a FIFO, not a regular file" \
    $INFMOE train $T --set data.train="$TMP/fifo.bin"
refused "data error: a directory as shard says so" "cannot open token shard: it is a directory" \
    $INFMOE train $T --set data.train="$TMP"

# a shard cut to half while training: one line naming it, no SIGBUS
cp data/demo/val.bin "$TMP/shrink.bin"
$INFMOE train $T --set data.train="$TMP/shrink.bin" --set train.steps=100000 --set train.log_every=1 \
    --set output.dir="$TMP/shrink" > "$TMP/shrink.log" 2> "$TMP/shrink.err" &
pid=$!
for _ in $(seq 300); do
    [ "$(grep -c '^step ' "$TMP/shrink.log")" -ge 3 ] && break
    sleep 0.1
done
truncate -s $(($(stat -c %s "$TMP/shrink.bin") / 2)) "$TMP/shrink.bin"
for _ in $(seq 200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
kill -KILL $pid 2>/dev/null
wait $pid
rc=$?
[ $rc -ne 0 ] && [ $rc -lt 128 ] && [ "$(grep -c '^infmoe: ' "$TMP/shrink.err")" -eq 1 ] &&
    grep -q "shrink.bin: token shard changed while in use: " "$TMP/shrink.err"
report "data error: a shard truncated while training ends the run with one line naming it, no SIGBUS" $? \
    "exit $rc: $(cat "$TMP/shrink.err")"

# a path that exists is taken as it is, glob characters and all; otherwise it is a glob
cp data/demo/val.bin "$TMP/val[1].bin"
$INFMOE train $T --set train.steps=2 --set train.warmup=0 --set output.dir="$TMP/ck" > "$TMP/ck.log" 2>&1
out=$($INFMOE eval "$TMP/ck/latest" --data "$TMP/val[1].bin" --batches 1 2>&1) &&
    printf '%s\n' "$out" | grep -q "val_loss" &&
    $INFMOE eval "$TMP/ck/latest" --data "$TMP/val*.bin" --batches 1 > /dev/null 2>&1
report "data: a shard path with glob characters is read as it is; a pattern is still a glob" $? "$out"

# ---- numbers on the command line: whole, in range, finite ----
refused "cli: eval --batches 2147483648 refused with its range" "eval: --batches 2147483648: expected an integer in [1, 2147483647]" \
    $INFMOE eval "$TMP/ck/latest" --batches 2147483648
refused "cli: eval --batch 4294967304 refused with its range" "eval: --batch 4294967304: expected an integer in [1, 16777216]" \
    $INFMOE eval "$TMP/ck/latest" --batch 4294967304
refused "cli: sample --tokens 4294967299 refused with its range" "sample: --tokens 4294967299: expected an integer in [0, 16777216]" \
    $INFMOE sample "$TMP/ck/latest" --prompt a --tokens 4294967299
refused "cli: sample --temperature abc refused" "sample: --temperature abc: expected a number in [0, 1000]" \
    $INFMOE sample "$TMP/ck/latest" --prompt a --temperature abc
refused "cli: sample --temperature nan refused" "sample: --temperature nan: expected a number in [0, 1000]" \
    $INFMOE sample "$TMP/ck/latest" --prompt a --temperature nan
refused "cli: stats --layers 4294967296 refused" "--layers 4294967296: expected layers like" \
    $INFMOE stats "$S" --layers 4294967296

# ---- resume below the checkpoint's step ----
refused "ckpt: --resume with train.steps below the checkpoint's step is refused" \
    "step_000002 is at step 2, beyond train.steps (1): raise train.steps" \
    $INFMOE train $T --set train.steps=1 --set train.warmup=0 --set output.dir="$TMP/ck" --resume auto

# ---- launcher variables ----
refused "launch: MAX_REQUEUES=abc refused" "train.sbatch: MAX_REQUEUES must be a whole number of restarts, not 'abc'" \
    env MAX_REQUEUES=abc bash launch/slurm/train.sbatch $T

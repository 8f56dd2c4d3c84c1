#!/usr/bin/env bash
# The run directory (output.dir): no writing through links, latest as the truth
# for --resume auto, one run at a time, long paths, a full disk. Run by
# tests/run.sh from the repo root; prints one PASS/FAIL (or SKIP) line per test.
. tests/lib.sh
T=tests/configs/tiny.yaml
TMP=$(mktemp -d)
MNT="" # the small file system of the full-disk tests, once mounted
trap '[ -n "$MNT" ] && umount "$MNT"; rm -rf "$TMP"' EXIT

train() { $INFMOE train "$T" --set train.warmup=0 "$@"; }

# ---- a link where infmoe writes: refused with one line, nothing outside touched ----
# step_000002.tmp and step_000002 are written by the save at step 2, step_000001
# is what keep_last=1 prunes, the rest are files every run writes
for name in step_000002.tmp step_000002 step_000001 latest latest.tmp config.yaml train.log; do
    R="$TMP/link-$name"
    out_dir="$TMP/outside-$name"
    mkdir -p "$R" "$out_dir"
    echo keep > "$out_dir/keep"
    case $name in
    step_*) ln -s "$out_dir" "$R/$name" ;;
    *) ln -s "$out_dir/keep" "$R/$name" ;;
    esac
    out=$(train --set train.steps=2 --set train.ckpt_every=1 --set train.keep_last=1 --set output.dir="$R" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] &&
        printf '%s\n' "$out" | grep -qF "$R/$name is a symbolic link" &&
        [ "$(ls "$out_dir")" = keep ] && [ "$(cat "$out_dir/keep")" = keep ] && [ -L "$R/$name" ]; then
        pass "rundir: a link at $name is refused with one line; its target is untouched"
    else
        fail "rundir: a link at $name (exit $rc)" "$out"$'\n'"outside: $(ls -l "$out_dir")"
    fi
done

# ---- a hard link at a file infmoe writes: refused, the other name untouched ----
R="$TMP/hard"
mkdir -p "$R"
echo keep > "$TMP/hard-other"
ln "$TMP/hard-other" "$R/train.log"
out=$(train --set train.steps=2 --set output.dir="$R" 2>&1)
rc=$?
if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq 1 ] &&
    printf '%s\n' "$out" | grep -qF "$R/train.log has 2 hard links" && [ "$(cat "$TMP/hard-other")" = keep ]; then
    pass "rundir: a hard link at train.log is refused with one line; the other name is untouched"
else
    fail "rundir: a hard link at train.log (exit $rc)" "$out"
fi

# ---- a step saved again (a branch from an earlier step) replaces the old one in place ----
R="$TMP/resave"
train --set train.steps=2 --set train.ckpt_every=1 --set train.keep_last=0 --set output.dir="$R" > "$TMP/r1.log" 2>&1
first=$(h5dump -a /step "$R/step_000002/model.h5" 2>/dev/null | grep -c "(0): 2")
train --set train.steps=2 --set train.ckpt_every=1 --set train.keep_last=0 --set output.dir="$R" \
    --resume "$R/step_000001" > "$TMP/r2.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$first" -eq 1 ] && [ "$(cat "$R/latest")" = step_000002 ] &&
    [ "$(ls "$R" | tr '\n' ' ')" = "config.yaml latest step_000001 step_000002 train.log " ] &&
    $INFMOE ckpt verify "$R/latest" > /dev/null 2>&1; then
    pass "rundir: saving a step that exists swaps the new checkpoint in; latest names it and it verifies"
else
    fail "rundir: saving a step that exists (exit $rc)" "$(ls -a "$R"; tail -2 "$TMP/r2.log")"
fi

# ---- latest is the truth: a branch resumed into the same directory is not pruned ----
R="$TMP/branch"
train --set train.steps=30 --set train.ckpt_every=10 --set train.keep_last=0 --set output.dir="$R" > "$TMP/a.log" 2>&1
train --set train.steps=15 --set train.ckpt_every=5 --set train.keep_last=2 --set output.dir="$R" \
    --resume "$R/step_000010" > "$TMP/b.log" 2>&1
after_branch=$(ls "$R" | tr '\n' ' ')
train --set train.steps=20 --set train.ckpt_every=5 --set train.keep_last=2 --set output.dir="$R" \
    --resume auto > "$TMP/c.log" 2>&1
rc=$?
if [ "$after_branch" = "config.yaml latest step_000010 step_000015 step_000020 step_000030 train.log " ] &&
    [ $rc -eq 0 ] && grep -q "^resumed from $R/step_000015: step 15," "$TMP/c.log" &&
    [ "$(cat "$R/latest")" = step_000020 ] &&
    [ "$(ls -d "$R"/step_* | xargs -n1 basename | tr '\n' ' ')" = "step_000015 step_000020 step_000030 " ]; then
    pass "rundir: --resume auto takes what latest names (the branch at 15, not the abandoned 30); pruning keeps the branch"
else
    fail "rundir: latest and pruning after a branch (exit $rc)" "after the branch: $after_branch"$'\n'"$(ls "$R"; grep resumed "$TMP/c.log"; tail -2 "$TMP/c.log")"
fi

# ---- one run per directory: a second run stops at once, on every rank ----
R="$TMP/locked"
$INFMOE train "$T" --set train.warmup=0 --set train.steps=100000 --set output.dir="$R" > "$TMP/first.log" 2>&1 &
first=$!
for _ in $(seq 300); do
    [ "$(grep -c '^step ' "$TMP/first.log" 2>/dev/null)" -ge 3 ] && break
    sleep 0.1
done
out=$(timeout 60 "${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=5 --set output.dir="$R" 2>&1)
rc=$?
kill -USR1 $first
wait $first
first_rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$(printf '%s\n' "$out" | grep -c 'infmoe: ')" -eq 1 ] &&
    printf '%s\n' "$out" | grep -qF "output.dir $R is in use by another run (pid $first on $(hostname) holds its .lock)" &&
    [ $first_rc -eq 75 ] && [ "$(grep -c '^infmoe train' "$R/train.log")" -eq 1 ] &&
    $INFMOE ckpt verify "$R/latest" > /dev/null 2>&1 &&
    train --set train.steps=5 --set output.dir="$R" > /dev/null 2>&1; then
    pass "rundir: a second run on a directory in use stops at once on both ranks, naming the holder; the first saves; the lock goes with it"
else
    fail "rundir: two runs on one directory (second exit $rc, first exit $first_rc)" "$out"
fi

# ---- output.dir of 240 characters: saves and resumes on 2 ranks ----
R="$TMP/$(printf 'd%.0s' $(seq $((240 - ${#TMP} - 1))))"
if "${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=2 --set output.dir="$R" > "$TMP/long.log" 2>&1 &&
    "${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=4 --set output.dir="$R" --resume auto > "$TMP/long2.log" 2>&1 &&
    grep -q "^resumed from .*step_000002: step 2" "$TMP/long2.log" && [ "$(cat "$R/latest")" = step_000004 ]; then
    pass "rundir: an output.dir of ${#R} characters saves and resumes on 2 ranks"
else
    fail "rundir: an output.dir of ${#R} characters" "$(tail -5 "$TMP/long.log" "$TMP/long2.log" 2>/dev/null)"
fi

# ---- a full disk: one line with the path and the cause; nothing written is lost ----
MNT="$TMP/small"
mkdir -p "$MNT"
if ! mount -t tmpfs -o size=4m tmpfs "$MNT" 2>/dev/null; then
    MNT=""
    echo "SKIP rundir: full disk (cannot mount a small tmpfs here)"
else
    fill() { # leave $1 KiB free on the small file system
        local avail
        avail=$(df -k --output=avail "$MNT" | tail -1)
        dd if=/dev/zero of="$MNT/fill-$RANDOM" bs=1k count=$((avail - $1)) status=none 2>/dev/null
    }
    R="$MNT/R"
    "${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=2 --set output.dir="$R" > "$TMP/full1.log" 2>&1
    before=$(cd "$R" && md5sum config.yaml latest train.log step_000002/model.h5)
    fill 0
    out=$("${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=4 --set output.dir="$R" --resume auto 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | grep -c 'infmoe: ')" -eq 1 ] &&
        printf '%s\n' "$out" | grep -qF "$R/config.yaml.tmp: No space left on device" &&
        [ "$before" = "$(cd "$R" && md5sum config.yaml latest train.log step_000002/model.h5)" ] &&
        [ ! -e "$R/config.yaml.tmp" ]; then
        pass "rundir: disk full at the start: one line naming config.yaml.tmp and ENOSPC; config.yaml, train.log, the checkpoint unchanged"
    else
        fail "rundir: disk full at the start (exit $rc)" "$out"
    fi
    rm -f "$MNT"/fill-*
    fill 64
    out=$("${MPIRUN[@]}" -np 2 $INFMOE train "$T" --set train.warmup=0 --set train.steps=4 --set output.dir="$R" --resume auto 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && [ "$(printf '%s\n' "$out" | grep -c 'infmoe: ')" -eq 1 ] &&
        printf '%s\n' "$out" | grep -qF "for the checkpoint in $R/step_000004.tmp: No space left on device" &&
        ! printf '%s\n' "$out" | grep -q MPI_ABORT && [ ! -e "$R/step_000004.tmp" ] &&
        [ "$(cat "$R/latest")" = step_000002 ] && $INFMOE ckpt verify "$R/latest" > /dev/null 2>&1; then
        pass "rundir: disk full at a save: one line naming step_000004.tmp and ENOSPC, no abort, the partial save removed, latest intact"
    else
        fail "rundir: disk full at a save (exit $rc)" "$out"$'\n'"$(ls "$R")"
    fi
fi

#!/usr/bin/env bash
# What a checkpoint holds and what loading it checks (docs/formats.md): the
# effective config, architecture keys on resume, no nan or inf saved or loaded,
# the metadata checksum, format 1 still read, configs past 64 KiB. Run by
# tests/run.sh from the repo root; prints one PASS/FAIL line per test.
. tests/lib.sh
TAMPER=build/tests/tool_tamper
K=tests/configs/tiny-topk.yaml
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

val_loss() { "$INFMOE" eval "$@" 2>&1 | sed -n 's/.*val_loss \([0-9.]*\).*/\1/p'; }
# a copy of checkpoint $1 at $2
copy_ckpt() { rm -rf "$2" && cp -r "$1" "$2"; }

# ---- the effective config: overrides that change shapes and ones that do not ----
# R1: n_head and data.val overridden (no shape changes), in a run directory with a
# quote in its name (config.yaml must stay valid YAML); R2 (below): n_embd overridden
R1="$TMP/run\"1"
$INFMOE train $K --set train.warmup=0 --set train.steps=2 --set model.n_head=8 \
    --set data.val=data/demo/train.bin --set output.dir="$R1" > "$TMP/r1.log" 2>&1
ck="$R1/step_000002"
implied=$(val_loss "$ck")
named=$(val_loss "$ck" --data data/demo/train.bin)
file=$(val_loss "$ck" --data data/demo/val.bin)
if [ -n "$implied" ] && [ "$implied" = "$named" ] && [ "$implied" != "$file" ] &&
    grep -qF 'dir: "'"$TMP"'/run\"1"' "$R1/config.yaml"; then
    pass "eval: a run's --set data.val and n_head are what eval uses ($implied), not the config file's ($file); config.yaml quotes the path"
else
    fail "eval: --set data.val of the run (eval $implied, --data train.bin $named, --data val.bin $file)" "$(tail -3 "$TMP/r1.log")"
fi
R2="$TMP/nan"
"${MPIRUN[@]}" -np 2 $INFMOE train $K --set train.warmup=0 --set train.lr=10 --set train.min_lr=10 \
    --set train.ckpt_every=1 --set train.steps=200 --set model.n_embd=64 --set output.dir="$R2" \
    > "$TMP/r2.log" 2> "$TMP/r2.err"
r2_rc=$?
if out=$($INFMOE ckpt verify "$R2/step_000001" 2>&1) && printf '%s\n' "$out" | grep -qF ": ok: 32 tensors x 3" &&
    $INFMOE ckpt info "$R2/step_000001" | grep -q '^  model: 2 layers, C 64,'; then
    pass "ckpt: trained with --set model.n_embd=64: ckpt verify and info rebuild C 64 from the resolved config"
else
    fail "ckpt: --set model.n_embd=64 recorded in the checkpoint" "$out"
fi

# ---- resume: architecture keys must match even where the shapes would ----
for change in model.n_layer:1 model.n_head:4 model.vocab_size:250 ffn.gate:switch; do
    key=${change%:*}
    value=${change#*:}
    was=$(sed -n "s/^  ${key#*.}: //p" "$R1/config.yaml" | head -1)
    refused "ckpt: resume with $key $was -> $value refused: key, both values and the checkpoint named" \
        "$ck: $key is $was in the checkpoint but $value in this run's config" \
        $INFMOE train $K --set model.n_head=8 --set "$key=$value" --set output.dir="$TMP/resume" --resume "$ck"
done

# ---- metadata checksum: a changed counter fails verify and resume ----
for change in step:253 data_position:239 seed:8; do
    name=${change%:*}
    copy_ckpt "$ck" "$TMP/meta"
    $TAMPER "$TMP/meta/model.h5" set-attr "$name" "${change#*:}"
    out=$($INFMOE ckpt verify "$TMP/meta" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && printf '%s\n' "$out" | grep -qF "$TMP/meta: metadata checksum mismatch"; then
        refused "ckpt: $name rewritten (one byte): verify and resume both fail the metadata checksum" \
            "$TMP/meta: metadata checksum mismatch" \
            $INFMOE train $K --set model.n_head=8 --set output.dir="$TMP/resume" --resume "$TMP/meta"
    else
        fail "ckpt verify: $name rewritten, want a metadata checksum mismatch (exit $rc)" "$out"
    fi
done

# ---- non-finite values: never applied, saved, published or loaded ----
rc=$r2_rc
if [ $rc -ne 0 ] && grep -q "^infmoe: step 2: loss .*, grad_norm -*nan: not finite, so the step is not applied" "$TMP/r2.err" &&
    [ "$(grep -c '^infmoe: ' "$TMP/r2.err")" -eq 1 ] && [ "$(cat "$R2/latest")" = step_000001 ] &&
    [ ! -e "$R2/step_000002" ] && $INFMOE ckpt verify "$R2/latest" > /dev/null 2>&1; then
    pass "train: lr 10 on 2 ranks stops at step 2's nan gradients before the update; latest stays step_000001, which verifies"
else
    fail "train: non-finite gradients (exit $rc)" "$(cat "$TMP/r2.err"; ls "$R2"; $INFMOE ckpt verify "$R2/latest" 2>&1)"
fi
copy_ckpt "$R2/step_000001" "$TMP/poisoned"
$TAMPER "$TMP/poisoned/model.h5" nan /params/h.1.attn.proj.w
out=$($INFMOE ckpt verify "$TMP/poisoned" 2>&1)
if [ $? -ne 0 ] && printf '%s\n' "$out" | grep -qF "tensor params/h.1.attn.proj.w holds 2 non-finite values (nan or inf)"; then
    refused "ckpt: a tensor holding nan and inf is named with its count by verify and refused by resume" \
        "tensor params/h.1.attn.proj.w holds 2 non-finite values" \
        $INFMOE train $K --set model.n_embd=64 --set output.dir="$TMP/resume" --resume "$TMP/poisoned"
else
    fail "ckpt verify: non-finite tensor" "$out"
fi

# ---- format 1 (config text only, no checksum) still loads ----
copy_ckpt "$ck" "$TMP/v1"
$TAMPER "$TMP/v1/model.h5" drop-attr config_resolved && $TAMPER "$TMP/v1/model.h5" drop-attr metadata_crc32 &&
    $TAMPER "$TMP/v1/model.h5" set-attr format_version 1
if $INFMOE ckpt verify "$TMP/v1" 2>&1 | grep -qF "ok: 32 tensors x 3 checked" && [ -n "$(val_loss "$TMP/v1")" ]; then
    pass "ckpt: a format 1 checkpoint (config text only, no metadata checksum) verifies and evaluates"
else
    fail "ckpt: format 1 checkpoint" "$($INFMOE ckpt verify "$TMP/v1" 2>&1)"
fi

# ---- a config past HDF5's 64 KiB compact attribute limit ----
{
    cat $K
    for i in $(seq 1200); do echo "# comment line $i, long enough to take the file past 64 KiB in all"; done
} > "$TMP/big.yaml"
$INFMOE train "$TMP/big.yaml" --set train.warmup=0 --set train.steps=2 --set train.stats_every=1 \
    --set output.dir="$TMP/big" > "$TMP/big.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(stat -c %s "$TMP/big.yaml")" -gt 65536 ] && $INFMOE ckpt verify "$TMP/big/latest" > /dev/null 2>&1 &&
    $INFMOE ckpt info "$TMP/big/latest" | grep -qF "# comment line 1200," && [ -n "$($INFMOE stats "$TMP/big/stats.h5" 2>/dev/null)" ]; then
    pass "ckpt: a $(($(stat -c %s "$TMP/big.yaml") / 1024)) KiB config trains, saves its checkpoint and stats.h5, and verifies"
else
    fail "ckpt: config past 64 KiB (exit $rc)" "$(tail -3 "$TMP/big.log")"
fi

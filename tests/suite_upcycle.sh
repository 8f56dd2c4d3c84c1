#!/usr/bin/env bash
# Upcycling (infmoe upcycle): a dense checkpoint becomes a step-0 MoE or ∞-MoE one.
# Where the rule keeps the function (noisy gates, experts as wide as the dense FFN
# or a multiple, no drops; also with a shared FFN taking half), the upcycled model's
# validation loss is the dense one's; an llm.c GPT-2 file written by a generator
# here (tests/tool_llmc.c) is read the same way; the result loads at other rank
# counts and trains on; bad sources are one line. Run by tests/run.sh.
. tests/lib.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

$INFMOE train tests/configs/tiny.yaml --set output.dir="$TMP/dense" > "$TMP/dense.out" 2>&1 ||
    { fail "upcycle: training the dense source" "$(tail -3 "$TMP/dense.out")"; exit 0; }
val() { grep -o 'val_loss [0-9.]*' | awk '{print $2}'; }
dense_val=$($INFMOE eval "$TMP/dense/latest" 2>&1 | val)
# label, source, config, expected "same"/"not", sets...: upcycle, then compare the step-0 val loss
upcycle_case() {
    local label=$1 src=$2 cfg=$3 want=$4 out got
    shift 4
    local dir="$TMP/up-$(printf '%s' "$label" | tr -c 'a-z0-9' '-')"
    if ! out=$($INFMOE upcycle "$src" --config "$cfg" --out "$dir" "$@" 2>&1); then
        fail "upcycle: $label" "$out"
        return
    fi
    got=$($INFMOE eval "$dir/step_000000" 2>&1 | val)
    if [ "$want" = same ]; then
        if printf '%s\n' "$out" | grep -q "the same function as the dense model" && [ -n "$got" ] &&
            awk -v a="$dense_val" -v b="$got" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(d <= 1e-6 * a)}'; then
            pass "upcycle: $label: step-0 val loss $got = the dense model's $dense_val"
        else
            fail "upcycle: $label: val loss $got, dense $dense_val" "$out"
        fi
    elif printf '%s\n' "$out" | grep -q "not the dense model's function" && [ -n "$got" ] &&
        $INFMOE ckpt verify "$dir/step_000000" > /dev/null 2>&1; then
        pass "upcycle: $label: written and verified, said not to keep the function (val loss $got, dense $dense_val)"
    else
        fail "upcycle: $label" "$out"
    fi
}
upcycle_case "topk, experts = dense copies" "$TMP/dense/latest" tests/configs/tiny-topk.yaml same --set ffn.expert_hidden=128
upcycle_case "topk copies + shared FFN, halves" "$TMP/dense/latest" tests/configs/tiny-topk.yaml same \
    --set ffn.expert_hidden=128 --set ffn.shared_hidden=128
upcycle_case "topk, experts twice as wide (units repeated)" "$TMP/dense/latest" tests/configs/tiny-topk.yaml same --set ffn.expert_hidden=256
upcycle_case "topk, experts as slices" "$TMP/dense/latest" tests/configs/tiny-topk.yaml not
upcycle_case "switch copies" "$TMP/dense/latest" tests/configs/tiny-topk.yaml not --set ffn.gate=switch --set ffn.k=1 --set ffn.expert_hidden=128
upcycle_case "infinite, units from the dense FFN" "$TMP/dense/latest" tests/configs/tiny-infinite.yaml not

# ---- llm.c's GPT-2 checkpoint format ----
if build/tests/tool_llmc "$TMP/dense/latest" "$TMP/gpt2.bin" > "$TMP/llmc.out" 2>&1; then
    upcycle_case "llm.c file to a dense model" "$TMP/gpt2.bin" tests/configs/tiny.yaml same
    upcycle_case "llm.c file to topk copies" "$TMP/gpt2.bin" tests/configs/tiny-topk.yaml same --set ffn.expert_hidden=128
else
    fail "upcycle: tool_llmc writes an llm.c file" "$(cat "$TMP/llmc.out")"
fi

# ---- the upcycled checkpoint at other layouts, and training on from it ----
U="$TMP/up-$(printf '%s' "topk, experts = dense copies" | tr -c 'a-z0-9' '-')"
got=$("${MPIRUN[@]}" -np 2 $INFMOE eval "$U/step_000000" --ep 2 2>&1 | val)
if [ -n "$got" ] && [ "$got" = "$dense_val" ]; then
    pass "upcycle: the upcycled checkpoint on 2 ranks, ep 2: val loss $got as on 1"
else
    fail "upcycle: upcycled checkpoint at P=2 ep=2 (val loss '$got', dense $dense_val)" ""
fi
out=$("${MPIRUN[@]}" -np 2 $INFMOE train tests/configs/tiny-topk.yaml --set ffn.expert_hidden=128 \
    --set output.dir="$TMP/on" --resume "$U/step_000000" 2>&1)
first=$(printf '%s\n' "$out" | grep '^step 1/' | sed 's/.*| loss \([0-9.]*\).*/\1/')
if printf '%s\n' "$out" | grep -q "resumed from .*step_000000: step 0" && printf '%s\n' "$out" | grep -q '^done 20 steps' &&
    awk -v a="$first" -v b="$dense_val" 'BEGIN{exit !(a > 0 && a < b + 0.3)}'; then
    pass "upcycle: training on from step 0 at P=2 ep=2 (first loss $first, dense val $dense_val)"
else
    fail "upcycle: training on from the upcycled checkpoint" "$(printf '%s\n' "$out" | tail -4)"
fi

# ---- bad sources: one line each, nothing written ----
build/tests/tool_llmc "$TMP/dense/latest" "$TMP/v5.bin" 5 > /dev/null 2>&1
refused "upcycle: an llm.c bf16 file (version 5) is refused" "llm.c checkpoint version 5; only version 3" \
    $INFMOE upcycle "$TMP/v5.bin" --config tests/configs/tiny.yaml --out "$TMP/x1"
head -c 50000 "$TMP/gpt2.bin" > "$TMP/short.bin"
refused "upcycle: a truncated llm.c file names the tensor" "the file ends inside tensor wpe" \
    $INFMOE upcycle "$TMP/short.bin" --config tests/configs/tiny.yaml --out "$TMP/x2"
refused "upcycle: another model shape is refused" "model.* must match" \
    $INFMOE upcycle "$TMP/gpt2.bin" --config tests/configs/tiny.yaml --set model.n_embd=64 --out "$TMP/x3"
refused "upcycle: a MoE source is refused" "upcycling starts from a dense one" \
    $INFMOE upcycle "$U/step_000000" --config tests/configs/tiny-topk.yaml --out "$TMP/x4"
out=$("${MPIRUN[@]}" -np 2 $INFMOE upcycle "$TMP/dense/latest" --config tests/configs/tiny-topk.yaml --out "$TMP/x5" 2>&1)
if [ $? -ne 0 ] && [ "$(printf '%s\n' "$out" | grep -c 'upcycle: run it as one process')" -eq 1 ] && [ ! -e "$TMP/x5" ]; then
    pass "upcycle: under mpirun with 2 ranks it is refused once, before writing"
else
    fail "upcycle: more than one process" "$out"
fi
if [ ! -e "$TMP/x1" ] && [ ! -e "$TMP/x2" ] && [ ! -e "$TMP/x3" ] && [ ! -e "$TMP/x4" ] && [ ! -e "$TMP/x5" ]; then
    pass "upcycle: a refused source leaves no output directory"
else
    fail "upcycle: a refused source left an output directory" "$(ls -d "$TMP"/x* 2>&1)"
fi

#!/usr/bin/env bash
# Multiple-choice evaluation and the ∞-MoE sweep from the command line: a file in
# llm.c's eval format written by a separate generator here is read and scored,
# damaged files are one line, prep --mc-from builds items from text, the score is
# the same on 1 and 2 ranks (ep 2), and --sweep prints every K, writes the CSV
# and tools/plot_sweep.py plots it. Run by tests/run.sh from the repo root.
. tests/lib.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# a tiny ∞-MoE checkpoint to score with
R="$TMP/inf"
$INFMOE train tests/configs/tiny-infinite.yaml --set train.steps=10 --set train.ckpt_every=10 \
    --set output.dir="$R" > "$TMP/train.out" 2>&1 || { fail "mc: training the tiny ∞-MoE model" "$(tail -3 "$TMP/train.out")"; exit 0; }

# ---- llm.c's format, as its data_common.py lays it out, from a generator of its own ----
gen() { # out, items, then what to damage: none | magic | truncate | completions
    /usr/bin/python3 - "$@" <<'PY'
import random, struct, sys
out, n, damage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = random.Random(5)
body, longest = b"", 0
for i in range(n):
    ctx = [r.randrange(32, 127) for _ in range(r.randrange(3, 20))]
    comps = [[r.randrange(32, 127) for _ in range(r.randrange(1, 9))] for _ in range(4)]
    ncomp = 3 if damage == "completions" else 4
    vals = [65535, 0, i, r.randrange(4), ncomp, len(ctx)] + ctx
    for c in comps[:ncomp]:
        vals += [len(c)] + c
    vals[1] = 2 * len(vals)
    longest = max(longest, vals[1])
    body += struct.pack("<%dH" % len(vals), *vals)
header = [20240522 if damage != "magic" else 20240520, 1, n, longest] + [0] * 252
data = struct.pack("<256i", *header) + body
if damage == "truncate":
    data = data[:-10]
open(out, "wb").write(data)
PY
}
gen "$TMP/gen.bin" 40 none
out=$($INFMOE eval "$R/latest" --mc "$TMP/gen.bin" --batches 1 2>&1)
if [ $? -eq 0 ] && printf '%s\n' "$out" | grep -qE "^mc $TMP/gen.bin \| step 10 \| items 40 \| acc 0\.[0-9]{4} \| acc_norm 0\.[0-9]{4} \| samples 2"; then
    pass "mc: a file in llm.c's eval format from a separate generator is read and scored (40 items)"
else
    fail "mc: llm.c-format file" "$out"
fi
gen "$TMP/magic.bin" 5 magic
gen "$TMP/trunc.bin" 5 truncate
gen "$TMP/three.bin" 5 completions
refused "mc: a file with the wrong magic is one line" "$TMP/magic.bin: not a multiple-choice eval file: magic 20240520, expected 20240522" \
    $INFMOE eval "$R/latest" --mc "$TMP/magic.bin"
refused "mc: a truncated item is one line" "$TMP/trunc.bin: item 4:" $INFMOE eval "$R/latest" --mc "$TMP/trunc.bin"
refused "mc: items of 3 completions are one line" "$TMP/three.bin: item 0 has 3 completions; infmoe scores items of 4" \
    $INFMOE eval "$R/latest" --mc "$TMP/three.bin"
refused "mc: a batch below 4 sequences a rank is one line" "eval: --mc needs at least 4 sequences a rank" \
    $INFMOE eval "$R/latest" --mc "$TMP/gen.bin" --batch 2

# ---- prep --mc-from, and the same score on 1 and 2 ranks (ep 2) ----
$INFMOE prep --mc-from /usr/share/games/fortunes/fortunes --val-fraction 1 --mc-items 48 --out "$TMP/f.bin" > "$TMP/prep.out" 2>&1
one=$($INFMOE eval "$R/latest" --mc "$TMP/f.bin" --data data/demo/val.bin --batches 2 2>&1 | grep '^mc ' | sed 's/ | [0-9.]* s$//')
two=$("${MPIRUN[@]}" -np 2 $INFMOE eval "$R/latest" --ep 2 --mc "$TMP/f.bin" --data data/demo/val.bin --batches 2 2>&1 |
      grep '^mc ' | sed 's/ | [0-9.]* s$//; s/ranks 2/ranks 1/')
if grep -q "^wrote $TMP/f.bin: 48 items (byte tokens" "$TMP/prep.out" && [ -n "$one" ] && [ "$one" = "$two" ]; then
    pass "mc: prep --mc-from writes items from text; 1 rank and 2 ranks (ep 2) score them alike ($(printf '%s' "$one" | grep -o 'acc [0-9.]*'))"
else
    fail "mc: prep --mc-from or 1 vs 2 ranks" "$(cat "$TMP/prep.out")"$'\n'"1: $one"$'\n'"2: $two"
fi
refused "mc: prep --mc-from with too little text is one line" "too few for multiple-choice items" \
    $INFMOE prep --mc-from tests/configs/tiny.yaml --out "$TMP/none.bin"

# ---- --sweep: every K, the CSV, the plot ----
out=$($INFMOE eval "$R/latest" --mc "$TMP/f.bin" --batches 2 --sweep 1,2,4,det --csv "$TMP/sweep.csv" 2>&1)
rows=$(printf '%s\n' "$out" | grep -cE '^  (1|2|4|det) +[0-9]')
csv_rows=$(grep -cE '^(1|2|4|det),' "$TMP/sweep.csv" 2>/dev/null)
k1=$(grep '^1,' "$TMP/sweep.csv" | cut -d, -f6)
k4=$(grep '^4,' "$TMP/sweep.csv" | cut -d, -f6)
if [ "$rows" = 4 ] && [ "$csv_rows" = 4 ] && head -1 "$TMP/sweep.csv" | grep -q '^samples,val_loss,acc,acc_norm,tokens_per_s,ffn_gflop_per_token,ffn_s,ffn_route_s,ffn_alltoall_s,ffn_units_s$' &&
    awk -v a="$k1" -v b="$k4" 'BEGIN { exit !(b > a) }'; then
    pass "sweep: --sweep 1,2,4,det prints and writes every K (FFN GFLOP/token K=1 $k1 < K=4 $k4)"
else
    fail "sweep: table or CSV" "$out"$'\n'"$(cat "$TMP/sweep.csv" 2>&1)"
fi
plot=$(/usr/bin/python3 tools/plot_sweep.py "$TMP/sweep.csv" -o "$TMP/sweep.png" 2>&1)
if [ -s "$TMP/sweep.png" ] && [ "$plot" = "plot_sweep: wrote $TMP/sweep.png (1 sweep)" ]; then
    pass "sweep: tools/plot_sweep.py draws loss and accuracy against FFN cost from the CSV"
else
    fail "sweep: plot_sweep.py" "$plot"
fi
refused "sweep: a bad --sweep list is one line" "eval: --sweep 1,x: expected sample counts 1-1024 or det" \
    $INFMOE eval "$R/latest" --sweep 1,x

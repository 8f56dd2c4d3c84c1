/* bpe: GPT-2's byte-level BPE (see bpe.h). */
#define _POSIX_C_SOURCE 200809L
#define PCRE2_CODE_UNIT_WIDTH 8
#include "infmoe/bpe.h"

#include <jansson.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/util.h"

#define EOT_NAME "<|endoftext|>"
/* Unicode White_Space, the \s of GPT-2's Python encoder */
#define WS "\\t\\n\\x0b\\f\\r \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
static const char PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+"
                              "|[" WS "]+(?![^" WS "])|[" WS "]+";

/* merge table: (left, right) -> rank and result, open addressing */
typedef struct {
    uint32_t key; /* left << 16 | right, + 1 so 0 is empty */
    int32_t rank;
    uint16_t id;
} merge_slot;

struct bpe_vocab {
    int n;       /* tokens */
    int eot;     /* id of <|endoftext|> or -1 */
    char *bytes; /* every token's bytes, back to back */
    size_t *off, *len;
    uint16_t byte_token[256];
    merge_slot *merges;
    uint32_t merge_mask;
    pcre2_code *re;
};

/* ---- the byte <-> character map of GPT-2's files ---- */

/* GPT-2 shows byte b as one printable character: b itself for '!'..'~', '¡'..'¬',
 * '®'..'ÿ', and 256 + n for the n-th other byte. */
static void byte_chars(uint32_t cp_of[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        cp_of[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when s starts an invalid one
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t k;
    uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) k = 2, v = c & 0x1F, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, v = c & 0x0F, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, v = c & 0x07, min = 0x10000;
    else return 0;
    if (n < k) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
    *cp = v;
    return k;
}

/* A token string of the files (characters standing for bytes) as bytes; -1 if a
 * character stands for no byte. */
static long decode_token_string(const char *s, size_t n, const int16_t *byte_of_cp, char *out) {
    size_t i = 0, m = 0;
    while (i < n) {
        uint32_t cp;
        size_t k = utf8_seq((const unsigned char *)s + i, n - i, &cp);
        if (k == 0 || cp >= 512 || byte_of_cp[cp] < 0) return -1;
        out[m++] = (char)byte_of_cp[cp];
        i += k;
    }
    return (long)m;
}

/* ---- a string -> id table used while loading ---- */

typedef struct {
    const bpe_vocab *v;
    int32_t *slot; /* id + 1, 0 empty */
    uint32_t mask;
} str_table;

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static int32_t *str_find(str_table *t, const char *s, size_t n) {
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & t->mask;; i = (i + 1) & t->mask) {
        int32_t id = t->slot[i] - 1;
        if (id < 0 || (t->v->len[id] == n && memcmp(t->v->bytes + t->v->off[id], s, n) == 0))
            return &t->slot[i];
    }
}

static int merge_find(const bpe_vocab *v, uint16_t a, uint16_t b, int32_t *rank, uint16_t *id) {
    uint32_t key = ((uint32_t)a << 16 | b) + 1;
    for (uint32_t i = (uint32_t)rng_mix64(key) & v->merge_mask;; i = (i + 1) & v->merge_mask) {
        if (v->merges[i].key == 0) return 0;
        if (v->merges[i].key == key) {
            *rank = v->merges[i].rank;
            *id = v->merges[i].id;
            return 1;
        }
    }
}

static void merge_put(bpe_vocab *v, uint16_t a, uint16_t b, int32_t rank, uint16_t id) {
    uint32_t key = ((uint32_t)a << 16 | b) + 1;
    uint32_t i = (uint32_t)rng_mix64(key) & v->merge_mask;
    while (v->merges[i].key != 0 && v->merges[i].key != key) i = (i + 1) & v->merge_mask;
    /* a pair listed twice takes its later rank, as GPT-2's dict of merges does */
    v->merges[i] = (merge_slot){key, rank, id};
}

/* ---- loading ---- */

static bpe_vocab *load_fail(bpe_vocab *v, char *err, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static bpe_vocab *load_fail(bpe_vocab *v, char *err, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    bpe_free(v);
    return NULL;
}

/* encoder.json: token string -> id */
static bpe_vocab *load_encoder(bpe_vocab *v, const char *path, const int16_t *byte_of_cp,
                               char *err, size_t cap) {
    const char *why;
    size_t text_len;
    char *text = read_text_file(path, &text_len, &why); /* jansson's own fd reader reads a byte a call */
    if (!text) return load_fail(v, err, cap, "%s: cannot read: %s (scripts/fetch-gpt2-vocab.sh installs it)", path, why);
    json_error_t je;
    json_t *root = json_loadb(text, text_len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!root) return load_fail(v, err, cap, "%s:%d:%d: not GPT-2's encoder.json: %s", path, je.line, je.column, je.text);
    if (!json_is_object(root) || json_object_size(root) < 257 || json_object_size(root) > 65536) {
        size_t n = json_is_object(root) ? json_object_size(root) : 0;
        json_decref(root);
        return load_fail(v, err, cap, "%s: not GPT-2's encoder.json: expected an object of 257 to 65536 "
                         "tokens (string -> id), found %s%zu", path, n ? "" : "no object, ", n);
    }
    v->n = (int)json_object_size(root);
    v->off = xcalloc((size_t)v->n, sizeof(size_t));
    v->len = xcalloc((size_t)v->n, sizeof(size_t));
    char *seen = xcalloc((size_t)v->n, 1);
    size_t total = 0, used = 0;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) total += strlen(key);
    v->bytes = xmalloc(total + 1);
    for (int b = 0; b < 256; b++) v->byte_token[b] = UINT16_MAX;
    int bytes_seen = 0;
    json_object_foreach(root, key, val) {
        json_int_t id = json_is_integer(val) ? json_integer_value(val) : -1;
        const char *bad = NULL;
        if (id < 0 || id >= v->n) bad = "an id outside 0 .. tokens - 1";
        else if (seen[id]) bad = "an id another token has";
        if (bad) {
            free(seen);
            json_decref(root);
            return load_fail(v, err, cap, "%s: token \"%.40s\" has %s (%lld)", path, key, bad, (long long)id);
        }
        seen[id] = 1;
        size_t n = strlen(key);
        long m;
        if (strcmp(key, EOT_NAME) == 0) {
            v->eot = (int)id;
            memcpy(v->bytes + used, key, n);
            m = (long)n;
        } else if ((m = decode_token_string(key, n, byte_of_cp, v->bytes + used)) <= 0) {
            free(seen);
            json_decref(root);
            return load_fail(v, err, cap, "%s: token \"%.40s\" (id %lld) is not a byte-level token string", path, key, (long long)id);
        }
        v->off[id] = used;
        v->len[id] = (size_t)m;
        if (m == 1 && (int)id != v->eot) {
            unsigned char b = (unsigned char)v->bytes[used];
            if (v->byte_token[b] == UINT16_MAX) bytes_seen++;
            v->byte_token[b] = (uint16_t)id;
        }
        used += (size_t)m;
    }
    free(seen);
    json_decref(root);
    if (bytes_seen != 256)
        return load_fail(v, err, cap, "%s: only %d of the 256 single-byte tokens are there: not a byte-level vocabulary", path, bytes_seen);
    return v;
}

/* vocab.bpe: "#version" line, then one "left right" merge a line */
static bpe_vocab *load_merges(bpe_vocab *v, const char *path, const int16_t *byte_of_cp, char *err, size_t cap) {
    size_t len;
    const char *why;
    char *text = read_text_file(path, &len, &why);
    if (!text) return load_fail(v, err, cap, "%s: cannot read: %s (scripts/fetch-gpt2-vocab.sh installs it)", path, why);
    if (strncmp(text, "#version", 8) != 0) {
        free(text);
        return load_fail(v, err, cap, "%s:1: not GPT-2's vocab.bpe: the first line should be \"#version: 0.2\"", path);
    }
    size_t n_lines = 0;
    for (size_t i = 0; i < len; i++) n_lines += text[i] == '\n';
    uint32_t slots = 1;
    while (slots < 2 * n_lines + 2) slots <<= 1;
    v->merges = xcalloc(slots, sizeof(merge_slot));
    v->merge_mask = slots - 1;
    uint32_t tslots = 1;
    while (tslots < 2 * (uint32_t)v->n) tslots <<= 1;
    str_table t = {v, xcalloc(tslots, sizeof(int32_t)), tslots - 1};
    for (int id = 0; id < v->n; id++)
        if (id != v->eot) *str_find(&t, v->bytes + v->off[id], v->len[id]) = id + 1;
    char *a = xmalloc(len + 1), *ab = xmalloc(2 * len + 2);
    const char *p = memchr(text, '\n', len);
    int line = 1, rank = 0;
    const char *problem = NULL;
    while (p && !problem) {
        const char *s = p + 1, *e = memchr(s, '\n', len - (size_t)(s - text));
        line++;
        if (!e) e = text + len;
        p = e < text + len ? e : NULL;
        if (s == e) {
            if (p) problem = "an empty line";
            continue;
        }
        const char *sp = memchr(s, ' ', (size_t)(e - s));
        if (!sp || sp == s || sp + 1 == e || memchr(sp + 1, ' ', (size_t)(e - sp - 1))) {
            problem = "not two tokens separated by one space";
            break;
        }
        long na = decode_token_string(s, (size_t)(sp - s), byte_of_cp, a);
        long nb = decode_token_string(sp + 1, (size_t)(e - sp - 1), byte_of_cp, a + (na > 0 ? na : 0));
        if (na <= 0 || nb <= 0) {
            problem = "a token that is not a byte-level string";
            break;
        }
        int32_t ia = *str_find(&t, a, (size_t)na) - 1, ib = *str_find(&t, a + na, (size_t)nb) - 1;
        memcpy(ab, a, (size_t)(na + nb));
        int32_t iab = *str_find(&t, ab, (size_t)(na + nb)) - 1;
        if (ia < 0 || ib < 0 || iab < 0) {
            problem = "a token that encoder.json does not have";
            break;
        }
        merge_put(v, (uint16_t)ia, (uint16_t)ib, rank++, (uint16_t)iab);
    }
    free(a);
    free(ab);
    free(t.slot);
    free(text);
    if (problem) return load_fail(v, err, cap, "%s:%d: not GPT-2's vocab.bpe: %s", path, line, problem);
    if (rank == 0) return load_fail(v, err, cap, "%s: no merges", path);
    return v;
}

bpe_vocab *bpe_load(const char *dir, char *err, size_t cap) {
    bpe_vocab *v = xcalloc(1, sizeof *v);
    v->eot = -1;
    uint32_t cp_of[256];
    int16_t byte_of_cp[512];
    byte_chars(cp_of);
    for (int i = 0; i < 512; i++) byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++) byte_of_cp[cp_of[b]] = (int16_t)b;
    char path[4096];
    snprintf(path, sizeof path, "%s/encoder.json", dir);
    if (!load_encoder(v, path, byte_of_cp, err, cap)) return NULL;
    snprintf(path, sizeof path, "%s/vocab.bpe", dir);
    if (!load_merges(v, path, byte_of_cp, err, cap)) return NULL;
    int code;
    PCRE2_SIZE at;
    v->re = pcre2_compile((PCRE2_SPTR)PATTERN, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &code, &at, NULL);
    if (!v->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return load_fail(v, err, cap, "PCRE2 cannot compile GPT-2's pattern at %zu: %s", (size_t)at, (char *)msg);
    }
    pcre2_jit_compile(v->re, PCRE2_JIT_COMPLETE); /* interpreted matching when JIT is unavailable */
    return v;
}

void bpe_free(bpe_vocab *v) {
    if (!v) return;
    if (v->re) pcre2_code_free(v->re);
    free(v->bytes);
    free(v->off);
    free(v->len);
    free(v->merges);
    free(v);
}

int bpe_vocab_size(const bpe_vocab *v) { return v->n; }
int bpe_eot(const bpe_vocab *v) { return v->eot; }

const char *bpe_token_bytes(const bpe_vocab *v, int id, size_t *len) {
    ALWAYS(id >= 0 && id < v->n);
    *len = v->len[id];
    return v->bytes + v->off[id];
}

/* ---- encoding ---- */

/* Cache of pieces already encoded: bytes -> tokens; emptied when half full. */
enum { CACHE_SLOTS = 1 << 15, CACHE_MAX_PIECE = 64 };
typedef struct {
    uint64_t hash;
    uint32_t key_off, tok_off;
    uint16_t key_len, n_tok; /* key_len 0: empty */
} cache_slot;

typedef struct {
    int32_t rank, pos;
    uint16_t a, b;
} heap_item;

struct bpe_encoder {
    const bpe_vocab *v;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    cache_slot *cache;
    size_t cache_used;
    char *keys;
    uint16_t *toks;
    size_t keys_n, toks_n, keys_cap, toks_cap;
    /* merge scratch, grown to the longest piece */
    size_t cap;
    int32_t *id, *next, *prev;
    heap_item *heap;
};

bpe_encoder *bpe_encoder_new(const bpe_vocab *v) {
    /* whole cache lines: each thread's encoder is written on every piece */
    size_t bytes = (sizeof(bpe_encoder) + 63) / 64 * 64;
    bpe_encoder *e = aligned_alloc(64, bytes);
    if (!e) INFMOE_FAIL("out of memory");
    memset(e, 0, bytes);
    e->v = v;
    e->md = pcre2_match_data_create(1, NULL);
    e->mctx = pcre2_match_context_create(NULL);
    e->jit = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, NULL);
    if (!e->md || !e->mctx) INFMOE_FAIL("out of memory for PCRE2 match data");
    if (e->jit) pcre2_jit_stack_assign(e->mctx, NULL, e->jit);
    e->cache = xcalloc(CACHE_SLOTS, sizeof(cache_slot));
    e->keys_cap = 1 << 20;
    e->toks_cap = 1 << 19;
    e->keys = xmalloc(e->keys_cap);
    e->toks = xmalloc(e->toks_cap * sizeof(uint16_t));
    return e;
}

void bpe_encoder_free(bpe_encoder *e) {
    if (!e) return;
    pcre2_match_data_free(e->md);
    pcre2_match_context_free(e->mctx);
    if (e->jit) pcre2_jit_stack_free(e->jit);
    free(e->cache);
    free(e->keys);
    free(e->toks);
    free(e->id);
    free(e->next);
    free(e->prev);
    free(e->heap);
    free(e);
}

void bpe_tokens_push(bpe_tokens *t, uint16_t id) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 1024;
        t->ids = xrealloc(t->ids, t->cap * sizeof(uint16_t));
    }
    t->ids[t->n++] = id;
}

void bpe_tokens_free(bpe_tokens *t) {
    free(t->ids);
    t->ids = NULL;
    t->n = t->cap = 0;
}

static int heap_less(const heap_item *x, const heap_item *y) {
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(heap_item *h, size_t *n, heap_item it) {
    size_t i = (*n)++;
    while (i > 0 && heap_less(&it, &h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = it;
}

static heap_item heap_pop(heap_item *h, size_t *n) {
    heap_item top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
        if (!heap_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

static void push_pair(bpe_encoder *e, size_t *hn, int32_t left) {
    int32_t right = left >= 0 ? e->next[left] : -1;
    if (right < 0) return;
    int32_t rank;
    uint16_t id;
    if (merge_find(e->v, (uint16_t)e->id[left], (uint16_t)e->id[right], &rank, &id))
        heap_push(e->heap, hn, (heap_item){rank, left, (uint16_t)e->id[left], (uint16_t)e->id[right]});
}

/* Merge one piece's bytes. Taking the lowest-ranked pair, leftmost first, one at a
 * time is GPT-2's rule (it merges every occurrence of that pair left to right,
 * then looks again): a pair a merge creates holds the new token and so ranks
 * after the merge that made it. */
static void merge_piece(bpe_encoder *e, const unsigned char *s, size_t n, bpe_tokens *out) {
    if (n > e->cap) {
        e->cap = n;
        e->id = xrealloc(e->id, n * sizeof(int32_t));
        e->next = xrealloc(e->next, n * sizeof(int32_t));
        e->prev = xrealloc(e->prev, n * sizeof(int32_t));
        e->heap = xrealloc(e->heap, 3 * n * sizeof(heap_item));
    }
    for (size_t i = 0; i < n; i++) {
        e->id[i] = e->v->byte_token[s[i]];
        e->next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        e->prev[i] = (int32_t)i - 1;
    }
    size_t hn = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(e, &hn, (int32_t)i);
    while (hn > 0) {
        heap_item it = heap_pop(e->heap, &hn);
        int32_t l = it.pos, r = e->next[l];
        if (e->id[l] != it.a || r < 0 || e->id[r] != it.b) continue; /* stale */
        int32_t rank;
        uint16_t id = 0;
        merge_find(e->v, it.a, it.b, &rank, &id);
        e->id[l] = id;
        e->id[r] = -1;
        e->next[l] = e->next[r];
        if (e->next[r] >= 0) e->prev[e->next[r]] = l;
        if (e->prev[l] >= 0) push_pair(e, &hn, e->prev[l]);
        push_pair(e, &hn, l);
    }
    for (int32_t i = 0; i >= 0; i = e->next[i]) bpe_tokens_push(out, (uint16_t)e->id[i]);
}

static void encode_piece(bpe_encoder *e, const char *s, size_t n, bpe_tokens *out) {
    if (n == 1) {
        bpe_tokens_push(out, e->v->byte_token[(unsigned char)s[0]]);
        return;
    }
    if (n > CACHE_MAX_PIECE) {
        merge_piece(e, (const unsigned char *)s, n, out);
        return;
    }
    uint64_t h = hash_bytes(s, n);
    uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);
    for (; e->cache[i].key_len; i = (i + 1) & (CACHE_SLOTS - 1)) {
        cache_slot *c = &e->cache[i];
        if (c->hash == h && c->key_len == n && memcmp(e->keys + c->key_off, s, n) == 0) {
            if (out->n + c->n_tok > out->cap) {
                out->cap = 2 * (out->n + c->n_tok);
                out->ids = xrealloc(out->ids, out->cap * sizeof(uint16_t));
            }
            memcpy(out->ids + out->n, e->toks + c->tok_off, c->n_tok * sizeof(uint16_t));
            out->n += c->n_tok;
            return;
        }
    }
    size_t first = out->n;
    merge_piece(e, (const unsigned char *)s, n, out);
    size_t nt = out->n - first;
    if (e->cache_used >= CACHE_SLOTS / 2 || e->keys_n + n > e->keys_cap || e->toks_n + nt > e->toks_cap) {
        memset(e->cache, 0, CACHE_SLOTS * sizeof(cache_slot));
        e->cache_used = e->keys_n = e->toks_n = 0;
        i = (uint32_t)h & (CACHE_SLOTS - 1);
    }
    memcpy(e->keys + e->keys_n, s, n);
    memcpy(e->toks + e->toks_n, out->ids + first, nt * sizeof(uint16_t));
    e->cache[i] = (cache_slot){h, (uint32_t)e->keys_n, (uint32_t)e->toks_n, (uint16_t)n, (uint16_t)nt};
    e->keys_n += n;
    e->toks_n += nt;
    e->cache_used++;
}

/* Valid UTF-8 text: the pattern's pieces, each merged. */
static void encode_valid(bpe_encoder *e, const char *s, size_t n, bpe_tokens *out) {
    PCRE2_SIZE at = 0;
    while (at < n) {
        int rc = pcre2_match(e->v->re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
        if (rc < 0) {
            if (rc != PCRE2_ERROR_NOMATCH) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                INFMOE_FAIL("PCRE2 match failed: %s", (char *)msg);
            }
            encode_piece(e, s + at, n - at, out); /* cannot happen: every character matches */
            return;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        if (ov[0] > at) encode_piece(e, s + at, ov[0] - at, out);
        encode_piece(e, s + ov[0], ov[1] - ov[0], out);
        at = ov[1];
    }
}

void bpe_encode(bpe_encoder *e, const char *text, size_t len, bpe_tokens *out) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < len) {
        size_t j = i;
        uint32_t cp;
        for (size_t k; j < len && (k = utf8_seq(s + j, len - j, &cp)) > 0;) j += k;
        if (j > i) encode_valid(e, text + i, j - i, out);
        for (; j < len && utf8_seq(s + j, len - j, &cp) == 0; j++) bpe_tokens_push(out, e->v->byte_token[s[j]]);
        i = j;
    }
}

size_t bpe_safe_cut(const char *text, size_t len) {
    for (size_t p = len > 0 ? len - 1 : 0; p >= 2; p--) {
        unsigned char before = (unsigned char)text[p - 2], after = (unsigned char)text[p];
        if (text[p - 1] == '\n' && before >= '!' && before <= '~' && after >= '!' && after <= '~') return p;
    }
    return 0;
}

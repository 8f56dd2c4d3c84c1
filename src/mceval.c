/* mceval: multiple-choice eval files (llm.c's format) and their scoring (see mceval.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/mceval.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "infmoe/util.h"

enum { MC_HEADER_INTS = 256, MC_START = 65535 };

static void push_tokens(mc_set *s, const uint16_t *t, int n) {
    if (s->n_tok + (size_t)n > s->cap_tok) {
        s->cap_tok = 2 * (s->n_tok + (size_t)n) + 1024;
        s->tok = xrealloc(s->tok, s->cap_tok * sizeof(uint16_t));
    }
    memcpy(s->tok + s->n_tok, t, (size_t)n * sizeof(uint16_t));
    s->n_tok += (size_t)n;
}

void mc_add(mc_set *s, int label, const uint16_t *ctx, int ctx_len, const uint16_t *const comp[MC_COMPLETIONS],
            const int comp_len[MC_COMPLETIONS]) {
    int i = s->n++;
    s->label = xrealloc(s->label, (size_t)s->n * sizeof(int));
    s->ctx = xrealloc(s->ctx, (size_t)s->n * sizeof(size_t));
    s->ctx_len = xrealloc(s->ctx_len, (size_t)s->n * sizeof(int));
    s->comp = xrealloc(s->comp, (size_t)s->n * MC_COMPLETIONS * sizeof(size_t));
    s->comp_len = xrealloc(s->comp_len, (size_t)s->n * MC_COMPLETIONS * sizeof(int));
    s->label[i] = label;
    s->ctx[i] = s->n_tok;
    s->ctx_len[i] = ctx_len;
    push_tokens(s, ctx, ctx_len);
    for (int c = 0; c < MC_COMPLETIONS; c++) {
        s->comp[i * MC_COMPLETIONS + c] = s->n_tok;
        s->comp_len[i * MC_COMPLETIONS + c] = comp_len[c];
        push_tokens(s, comp[c], comp_len[c]);
    }
}

void mc_free(mc_set *s) {
    free(s->label);
    free(s->ctx);
    free(s->ctx_len);
    free(s->comp);
    free(s->comp_len);
    free(s->tok);
    memset(s, 0, sizeof *s);
}

/* an item's size in bytes: six header values (the last the context's length), the
 * context, and the completions each after its length */
static size_t item_bytes(const mc_set *s, int i) {
    size_t v = 6 + (size_t)s->ctx_len[i];
    for (int c = 0; c < MC_COMPLETIONS; c++) v += 1 + (size_t)s->comp_len[i * MC_COMPLETIONS + c];
    return 2 * v;
}

int mc_write(const char *path, const mc_set *s) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    for (int i = 0; i < s->n; i++)
        if (item_bytes(s, i) > UINT16_MAX) { /* the format counts an item's bytes in 16 bits */
            errno = EFBIG;
            return -1;
        }
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    int32_t h[MC_HEADER_INTS] = {0};
    h[0] = MC_MAGIC;
    h[1] = MC_VERSION;
    h[2] = s->n;
    for (int i = 0; i < s->n; i++)
        if ((int32_t)item_bytes(s, i) > h[3]) h[3] = (int32_t)item_bytes(s, i);
    int ok = fwrite(h, sizeof h, 1, f) == 1;
    for (int i = 0; ok && i < s->n; i++) {
        uint16_t head[6] = {MC_START, (uint16_t)item_bytes(s, i), (uint16_t)i, (uint16_t)s->label[i], MC_COMPLETIONS,
                            (uint16_t)s->ctx_len[i]};
        ok = fwrite(head, sizeof head, 1, f) == 1 &&
             fwrite(s->tok + s->ctx[i], sizeof(uint16_t), (size_t)s->ctx_len[i], f) == (size_t)s->ctx_len[i];
        for (int c = 0; ok && c < MC_COMPLETIONS; c++) {
            uint16_t len = (uint16_t)s->comp_len[i * MC_COMPLETIONS + c];
            ok = fwrite(&len, sizeof len, 1, f) == 1 &&
                 fwrite(s->tok + s->comp[i * MC_COMPLETIONS + c], sizeof(uint16_t), len, f) == len;
        }
    }
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

#define MC_FAIL(...)                        \
    do {                                    \
        char m_[512];                       \
        snprintf(m_, sizeof m_, __VA_ARGS__); \
        snprintf(err, cap, "%s: %s", path, m_); \
        free(buf);                          \
        mc_free(s);                         \
        return -1;                          \
    } while (0)

int mc_read(const char *path, int vocab_size, mc_set *s, char *err, size_t cap) {
    memset(s, 0, sizeof *s);
    size_t len;
    const char *why;
    char *buf = read_text_file(path, &len, &why);
    if (!buf) {
        snprintf(err, cap, "%s: cannot read multiple-choice file: %s", path, why);
        return -1;
    }
    if (len < MC_HEADER_INTS * 4) MC_FAIL("not a multiple-choice eval file: %zu bytes, shorter than the 1024-byte header", len);
    int32_t h[MC_HEADER_INTS];
    memcpy(h, buf, sizeof h);
    if (h[0] != MC_MAGIC) MC_FAIL("not a multiple-choice eval file: magic %d, expected %d (llm.c's eval format)", h[0], MC_MAGIC);
    if (h[1] != MC_VERSION) MC_FAIL("eval file version %d, expected %d", h[1], MC_VERSION);
    if (h[2] <= 0) MC_FAIL("the header says %d items", h[2]);
    if ((len - sizeof h) % 2) MC_FAIL("odd length: truncated or padded");
    const uint16_t *v = (const uint16_t *)(buf + sizeof h);
    size_t nv = (len - sizeof h) / 2, at = 0;
    for (int i = 0; i < h[2]; i++) {
        if (at + 6 > nv) MC_FAIL("truncated: item %d of %d starts past the end", i, h[2]);
        const uint16_t *e = v + at;
        if (e[0] != MC_START) MC_FAIL("item %d does not start with 65535 (at byte %zu): damaged", i, sizeof h + 2 * at);
        size_t bytes = e[1];
        if (bytes < 12 || bytes % 2 || at + bytes / 2 > nv)
            MC_FAIL("item %d: %zu bytes, %s", i, bytes, at + bytes / 2 > nv ? "past the end of the file (truncated)" : "too few");
        if (e[2] != (uint16_t)i) MC_FAIL("item %d has index %u", i, e[2]);
        if (e[4] != MC_COMPLETIONS) MC_FAIL("item %d has %u completions; infmoe scores items of %d, as llm.c does", i, e[4], MC_COMPLETIONS);
        if (e[3] >= MC_COMPLETIONS) MC_FAIL("item %d: label %u, not below %d completions", i, e[3], MC_COMPLETIONS);
        size_t end = at + bytes / 2, p = at + 6;
        int ctx_len = e[5];
        if (ctx_len == 0 || p + (size_t)ctx_len > end) MC_FAIL("item %d: context of %d tokens does not fit its %zu bytes", i, ctx_len, bytes);
        const uint16_t *ctx = v + p, *comp[MC_COMPLETIONS];
        int comp_len[MC_COMPLETIONS];
        p += (size_t)ctx_len;
        for (int c = 0; c < MC_COMPLETIONS; c++) {
            if (p >= end) MC_FAIL("item %d: completion %d is missing (truncated item)", i, c);
            comp_len[c] = v[p++];
            comp[c] = v + p;
            if (comp_len[c] == 0 || p + (size_t)comp_len[c] > end)
                MC_FAIL("item %d: completion %d of %d tokens does not fit its %zu bytes", i, c, comp_len[c], bytes);
            p += (size_t)comp_len[c];
        }
        if (p != end) MC_FAIL("item %d: %zu bytes of tokens after its last completion", i, 2 * (end - p));
        for (int c = -1; c < MC_COMPLETIONS; c++) {
            const uint16_t *t = c < 0 ? ctx : comp[c];
            for (int k = 0; k < (c < 0 ? ctx_len : comp_len[c]); k++)
                if (t[k] >= vocab_size) MC_FAIL("item %d: token %u is outside the model's vocabulary (%d)", i, t[k], vocab_size);
        }
        mc_add(s, e[3], ctx, ctx_len, comp, comp_len);
        at = end;
    }
    if (at != nv) MC_FAIL("%zu bytes after the %d items the header names", 2 * (nv - at), h[2]);
    free(buf);
    return 0;
}

void mc_evaluate(gpt_model *m, const mc_set *s, const dist_ctx *d, int step, int *correct, int *correct_norm) {
    const int B = m->B, T = m->T, per_rank = B / MC_COMPLETIONS, per_forward = per_rank * d->size;
    ALWAYS(per_rank >= 1);
    int32_t *in = xcalloc((size_t)B * T, sizeof(int32_t)), *tg = xcalloc((size_t)B * T, sizeof(int32_t));
    int *first = xcalloc((size_t)B, sizeof(int)), *count = xcalloc((size_t)B, sizeof(int));
    double right[2] = {0, 0};
    int forwards = (s->n + per_forward - 1) / per_forward;
    for (int f = 0; f < forwards; f++) {
        int item0 = f * per_forward + d->rank * per_rank;
        memset(in, 0, sizeof(int32_t) * (size_t)B * T);
        memset(tg, 0, sizeof(int32_t) * (size_t)B * T);
        for (int row = 0; row < B; row++) {
            int item = item0 + row / MC_COMPLETIONS, c = row % MC_COMPLETIONS;
            count[row] = 0;
            if (row >= per_rank * MC_COMPLETIONS || item >= s->n) continue;
            int cl = s->comp_len[item * MC_COMPLETIONS + c], xl = s->ctx_len[item];
            if (cl > T - 1) cl = T - 1; /* a completion longer than the window: its first T-1 tokens */
            if (xl > T - cl) xl = T - cl; /* the context's last tokens that fit */
            const uint16_t *x = s->tok + s->ctx[item] + (s->ctx_len[item] - xl);
            const uint16_t *y = s->tok + s->comp[item * MC_COMPLETIONS + c];
            int32_t *ri = in + (size_t)row * T, *rt = tg + (size_t)row * T;
            for (int p = 0; p < xl; p++) ri[p] = x[p];
            for (int p = 0; p < cl; p++) { /* xl + cl <= T */
                ri[xl + p] = y[p];
                rt[xl + p - 1] = y[p];
            }
            first[row] = xl - 1;
            count[row] = cl;
        }
        /* draws keyed by global row = item x 4 + completion, whatever the rank count */
        model_set_step(m, step, (int64_t)item0 * MC_COMPLETIONS * T, 0);
        model_forward(m, in, tg);
        for (int j = 0; j < per_rank && item0 + j < s->n; j++) {
            int best = 0, best_norm = 0;
            double sum[MC_COMPLETIONS], mean[MC_COMPLETIONS];
            for (int c = 0; c < MC_COMPLETIONS; c++) {
                int row = j * MC_COMPLETIONS + c;
                double acc = 0;
                for (int p = 0; p < count[row]; p++) acc += m->losses[(size_t)row * T + first[row] + p];
                sum[c] = acc;
                mean[c] = acc / count[row];
                if (sum[c] < sum[best]) best = c;
                if (mean[c] < mean[best_norm]) best_norm = c;
            }
            right[0] += best == s->label[item0 + j];
            right[1] += best_norm == s->label[item0 + j];
        }
    }
    dist_allreduce_sum_d(right, 2, MPI_COMM_WORLD);
    *correct = (int)right[0];
    *correct_norm = (int)right[1];
    free(in);
    free(tg);
    free(first);
    free(count);
}

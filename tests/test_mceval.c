/*
 * test_mceval: the multiple-choice file and scorer. Eight hand-made items on a
 * tiny random model: mc_evaluate's acc and acc_norm equal the answers worked out
 * here, one completion at a time, from the model's own per-token losses (items
 * with completions of different lengths, so the two rules disagree somewhere);
 * the same with B = 4, 8 and 16 rows a forward; a file written by mc_write reads
 * back the same; damaged files get one line each.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "infmoe/dist.h"
#include "infmoe/mceval.h"
#include "infmoe/model.h"
#include "infmoe/util.h"

enum { T = 16, V = 50, N_ITEMS = 8 };

/* the answer worked out one completion at a time: summed (norm 0) or mean loss */
static int answer(gpt_model *m, const mc_set *s, int item, int norm) {
    int best = 0;
    double best_v = 0;
    for (int c = 0; c < MC_COMPLETIONS; c++) {
        int32_t in[T] = {0}, tg[T] = {0};
        int xl = s->ctx_len[item], cl = s->comp_len[item * 4 + c];
        for (int p = 0; p < xl; p++) in[p] = s->tok[s->ctx[item] + p];
        for (int p = 0; p < cl; p++) {
            in[xl + p] = s->tok[s->comp[item * 4 + c] + p];
            tg[xl + p - 1] = in[xl + p];
        }
        /* one sequence in a model of B rows: the others are padding */
        int32_t *bin = xcalloc((size_t)m->B * T, sizeof(int32_t)), *btg = xcalloc((size_t)m->B * T, sizeof(int32_t));
        memcpy(bin, in, sizeof in);
        memcpy(btg, tg, sizeof tg);
        model_set_step(m, 0, 0, 0);
        model_forward(m, bin, btg);
        double sum = 0;
        for (int p = 0; p < cl; p++) sum += m->losses[xl - 1 + p];
        double v = norm ? sum / cl : sum;
        if (c == 0 || v < best_v) best = c, best_v = v;
        free(bin);
        free(btg);
    }
    return best;
}

static void bad_file(const char *name, const unsigned char *bytes, size_t n, const char *want) {
    char path[256];
    snprintf(path, sizeof path, "/tmp/infmoe-mc-%d-%s.bin", (int)getpid(), name);
    FILE *f = fopen(path, "wb");
    fwrite(bytes, 1, n, f);
    fclose(f);
    mc_set s;
    char err[512] = "";
    int rc = mc_read(path, V, &s, err, sizeof err);
    CHECK(rc < 0 && strstr(err, want) && !strchr(err, '\n'), "%s: got '%s', want '%s'", name, err, want);
    remove(path);
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    rng_state r;
    rng_seed(&r, 11);
    mc_set s = {0};
    for (int i = 0; i < N_ITEMS; i++) {
        uint16_t ctx[8], comp[4][6];
        const uint16_t *cp[4];
        int cl[4], xl = 2 + i % 5;
        for (int p = 0; p < xl; p++) ctx[p] = (uint16_t)(rng_u64(&r) % V);
        for (int c = 0; c < 4; c++) {
            cl[c] = 1 + (int)((i + c) % 6);
            for (int p = 0; p < cl[c]; p++) comp[c][p] = (uint16_t)(rng_u64(&r) % V);
            cp[c] = comp[c];
        }
        mc_add(&s, (int)(rng_u64(&r) % 4), ctx, xl, cp, cl);
    }
    char path[256];
    snprintf(path, sizeof path, "/tmp/infmoe-mc-%d.bin", (int)getpid());
    CHECK(mc_write(path, &s) == 0, "mc_write");
    mc_set back;
    char err[512];
    CHECK(mc_read(path, V, &back, err, sizeof err) == 0, "mc_read: %s", err);
    CHECK(back.n == s.n && back.n_tok == s.n_tok && memcmp(back.tok, s.tok, s.n_tok * 2) == 0 &&
              memcmp(back.label, s.label, sizeof(int) * N_ITEMS) == 0,
          "the file does not read back as written");
    mc_free(&back);
    CHECK(mc_read(path, 10, &back, err, sizeof err) < 0 && strstr(err, "outside the model's vocabulary (10)"),
          "a token outside the vocabulary: %s", err);

    int want[2] = {0, 0}, disagree = 0;
    for (int B = 4; B <= 16; B *= 2) {
        run_config cfg;
        config_defaults(&cfg);
        tiny_backbone(&cfg, 16, 2, T, V);
        cfg.ffn_hidden = 64;
        gpt_model m;
        model_build(&m, &cfg, B, NULL);
        model_init_params(&m, 1);
        if (B == 4)
            for (int i = 0; i < N_ITEMS; i++) {
                int a = answer(&m, &s, i, 0), b = answer(&m, &s, i, 1);
                want[0] += a == s.label[i];
                want[1] += b == s.label[i];
                disagree += a != b;
            }
        int got, got_norm;
        mc_evaluate(&m, &s, &d, 0, &got, &got_norm);
        CHECK(got == want[0] && got_norm == want[1], "B %d: acc %d/8 and acc_norm %d/8, worked out %d/8 and %d/8", B,
              got, got_norm, want[0], want[1]);
        if (B == 4) printf("  8 items: acc %d/8, acc_norm %d/8 as worked out one completion at a time (rules differ on %d)\n",
                           got, got_norm, disagree);
        model_free(&m);
        config_free(&cfg);
    }

    /* damaged files: take the good one and break it */
    size_t n;
    const char *why;
    unsigned char *good = (unsigned char *)read_text_file(path, &n, &why);
    unsigned char *b = xmalloc(n + 16);
    memcpy(b, good, n);
    b[0] ^= 1;
    bad_file("magic", b, n, "not a multiple-choice eval file: magic");
    bad_file("short", good, 100, "shorter than the 1024-byte header");
    bad_file("truncated", good, n - 6, "past the end of the file (truncated)");
    memcpy(b, good, n);
    ((uint16_t *)(b + 1024))[4] = 3; /* item 0's completion count */
    bad_file("completions", b, n, "item 0 has 3 completions; infmoe scores items of 4");
    memcpy(b, good, n);
    ((uint16_t *)(b + 1024))[0] = 7;
    bad_file("delimiter", b, n, "item 0 does not start with 65535");
    memcpy(b, good, n);
    memcpy(b + n, "\0\0\0\0", 4);
    bad_file("trailing", b, n + 4, "4 bytes after the 8 items the header names");
    free(b);
    free(good);
    remove(path);
    mc_free(&s);
    int rc = check_finish("mceval: llm.c eval files read back, acc and acc_norm as worked out by hand, damage named");
    dist_finalize(&d);
    return rc;
}

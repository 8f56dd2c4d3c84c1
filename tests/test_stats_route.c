/*
 * Routing statistics of a crafted routing, at any rank count and ep (argv[1],
 * default 1; under mpirun or alone). Two Switch layers (k = 1, no jitter) whose
 * routing is fixed by the weights: attention and the first layer's experts
 * output exactly 0, so LN2 sees x = wte[token] + wpe[pos] = onehot(token mod 4)
 * in both layers; layer 0's router row e reads channel e and layer 1's reads
 * channel (e+1) mod 4, so a token of class c goes to expert c in layer 0 and to
 * expert (c+3) mod 4 in layer 1. No token has class 3 (expert 3 of layer 0 and
 * expert 2 of layer 1 stay unused). Three training steps on different batches,
 * stats_every = 1, no update; rank 0 then reads stats.h5 back: every row's
 * per-expert counts equal the counts of classes in the step's global batch, /step
 * is 1..3, unused 1, confidence and router entropy as computed from the LN2
 * output, gate entropy 0 (k = 1), nothing dropped.
 */
#define _POSIX_C_SOURCE 200809L
#include <hdf5.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/stats.h"
#include "infmoe/util.h"
#include "stats_rows.h"

enum { STEPS = 3, E = 4 };

static int32_t token_at(int step, int i) {
    int32_t t = (int32_t)((i * 5 + step * 3 + (i * i) % 7) % 64);
    return t % 4 == 3 ? t - 1 : t; /* no class 3 */
}

static void zero_tensor(gpt_model *m, const char *name) {
    const tensor_spec *s = tensor_find(&m->tensors, name);
    ALWAYS(s != NULL);
    memset(m->params + s->offset, 0, sizeof(float) * s->numel);
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    int ep = argc > 1 ? atoi(argv[1]) : 1;
    run_config cfg;
    config_defaults(&cfg);
    tiny_backbone(&cfg, 16, 2, 8, 64);
    cfg.ffn_kind = FFN_TOPK;
    cfg.gate = GATE_SWITCH;
    cfg.jitter = 0.0f;
    cfg.experts = E;
    cfg.top_k = 1;
    cfg.expert_hidden = 8;
    cfg.batch_size = 8;
    cfg.stats_every = 1;
    cfg.ep = ep;
    config_check_layout(&cfg, d.size, d.rank != 0);
    dist_set_layout(&d, ep);
    const int B = cfg.batch_size / d.size, T = cfg.seq_len, C = cfg.n_embd;
    gpt_model m;
    model_build(&m, &cfg, B, &d);
    model_init_params(&m, 3);

    /* the crafted routing */
    char name[64];
    zero_tensor(&m, "wpe");
    zero_tensor(&m, "wte");
    for (int v = 0; v < cfg.vocab_size; v++) m.params[m.wte + (size_t)v * C + (size_t)(v % 4)] = 1.0f;
    for (int l = 0; l < m.L; l++) {
        memset(m.params + m.block[l].proj_w, 0, sizeof(float) * (size_t)C * C);
        memset(m.params + m.block[l].proj_b, 0, sizeof(float) * (size_t)C);
        snprintf(name, sizeof name, "h.%d.moe.experts.proj.w", l);
        zero_tensor(&m, name);
        snprintf(name, sizeof name, "h.%d.moe.experts.proj.b", l);
        zero_tensor(&m, name);
        snprintf(name, sizeof name, "h.%d.moe.router.w", l);
        zero_tensor(&m, name);
        const tensor_spec *r = tensor_find(&m.tensors, name);
        for (int e = 0; e < E; e++) m.params[r->offset + (size_t)e * C + (size_t)((e + l) % 4)] = 1.0f;
    }

    char dir[] = "/tmp/infmoe-test-stats-route-XXXXXX";
    if (d.rank == 0) ALWAYS(mkdtemp(dir));
    stats_run *stats = stats_open(dir, &m, &cfg, &d, -1);
    ALWAYS(stats != NULL);
    int32_t *tok = xcalloc((size_t)cfg.batch_size * T + 1, sizeof(int32_t));
    int64_t want[STEPS][2][E];
    memset(want, 0, sizeof want);
    for (int step = 0; step < STEPS; step++) {
        for (int i = 0; i <= cfg.batch_size * T; i++) tok[i] = token_at(step, i);
        for (int i = 0; i < cfg.batch_size * T; i++) {
            int c = tok[i] % 4;
            want[step][0][c]++;
            want[step][1][(c + 3) % 4]++;
        }
        const int32_t *in = tok + (size_t)d.rank * B * T;
        model_set_step(&m, step, (int64_t)d.rank * B * T, 1);
        model_forward(&m, in, in + 1);
        model_zero_grad(&m);
        model_backward(&m);
        model_end_step(&m);
        stats_append(stats, &m, step + 1);
    }
    stats_close(stats);

    if (d.rank == 0) {
        /* the LN2 output of onehot(c): (1 - 1/C) / s at c, -(1/C) / s elsewhere */
        double var = (1.0 / C) * (1.0 - 1.0 / C), s = sqrt(var + 1e-5);
        double gap = 1.0 / s; /* peak minus the others */
        double p = 1.0 / (1.0 + (E - 1) * exp(-gap)), q = (1.0 - p) / (E - 1);
        double h = -p * log(p) - (E - 1) * q * log(q);
        char path[256];
        snprintf(path, sizeof path, "%s/stats.h5", dir);
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, H5P_DEFAULT);
        CHECK(f >= 0, "cannot open %s", path);
        if (f >= 0) {
            int64_t steps[STEPS + 1] = {0};
            hid_t sd = H5Dopen2(f, "step", H5P_DEFAULT);
            hid_t sp = H5Dget_space(sd);
            hsize_t n = 0;
            H5Sget_simple_extent_dims(sp, &n, NULL);
            H5Sclose(sp);
            CHECK(n == STEPS, "/step has %llu rows", (unsigned long long)n);
            if (n == STEPS) H5Dread(sd, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, steps);
            H5Dclose(sd);
            for (int i = 0; i < STEPS; i++) CHECK(steps[i] == i + 1, "step %d is %lld", i, (long long)steps[i]);
            for (int l = 0; l < 2 && n == STEPS; l++) {
                snprintf(name, sizeof name, "layers/h.%d", l);
                hid_t g = H5Gopen2(f, name, H5P_DEFAULT);
                hid_t td = H5Dopen2(g, "rows", H5P_DEFAULT);
                hsize_t dim = E;
                hid_t at = H5Tarray_create2(H5T_NATIVE_INT64, 1, &dim);
                hid_t mt = H5Tcreate(H5T_COMPOUND, sizeof(int64_t) * E);
                H5Tinsert(mt, "tokens", 0, at);
                int64_t got[STEPS][E];
                memset(got, 0xff, sizeof got);
                H5Dread(td, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, got);
                H5Tclose(mt);
                H5Tclose(at);
                H5Dclose(td);
                for (int st = 0; st < STEPS; st++) {
                    CHECK(memcmp(got[st], want[st][l], sizeof got[st]) == 0,
                          "layer %d step %d: tokens %lld %lld %lld %lld, want %lld %lld %lld %lld", l, st + 1,
                          (long long)got[st][0], (long long)got[st][1], (long long)got[st][2], (long long)got[st][3],
                          (long long)want[st][l][0], (long long)want[st][l][1], (long long)want[st][l][2],
                          (long long)want[st][l][3]);
                    CHECK(metric(g, "unused", (hsize_t)st) == 1.0, "one unused expert");
                    CHECK(metric(g, "n_tokens", (hsize_t)st) == cfg.batch_size * T, "n_tokens");
                    CHECK(metric(g, "dropped", (hsize_t)st) == 0.0, "dropped");
                    CHECK(metric(g, "gate_entropy", (hsize_t)st) == 0.0, "gate entropy of k = 1");
                    CHECK(close_enough(metric(g, "confidence", (hsize_t)st), p, 1e-5, 0), "confidence %.7f, want %.7f",
                          metric(g, "confidence", (hsize_t)st), p);
                    CHECK(close_enough(metric(g, "router_entropy", (hsize_t)st), h, 1e-4, 1e-6),
                          "router entropy %.7f, want %.7f", metric(g, "router_entropy", (hsize_t)st), h);
                    double t = metric(g, "t_expert", (hsize_t)st);
                    CHECK(isfinite(t) && t >= 0.0, "expert time %g", t);
                }
                H5Gclose(g);
            }
            H5Fclose(f);
        }
        unlink(path);
        rmdir(dir);
    }
    int bad = check_failures;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, d.world));
    check_failures = bad;
    free(tok);
    model_free(&m);
    gemm_shutdown();
    char label[128];
    snprintf(label, sizeof label, "stats: crafted Switch routing at P=%d ep=%d: per-expert counts in stats.h5 exact",
             d.size, ep);
    int rc = 0;
    if (d.rank == 0) rc = check_finish(label);
    dist_finalize(&d);
    return rc;
}

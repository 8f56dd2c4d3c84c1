/*
 * The gradient reduction (gradreduce.h, model_backward_overlapped) under mpirun
 * at any rank count.
 *
 * 1. gradred on segments of many lengths (0, 1, fewer floats than ranks, odd
 *    sizes), bucket sizes from 1 float up and 1 to 16 slots, queued several at a
 *    time with progress calls between: every element equals the rank-order sum
 *    of every rank's values times the scale, recomputed here from each rank's
 *    seeded values, bit for bit. With 2 ranks it also equals MPI_Allreduce.
 * 2. A model (2 layers; dense, noisy top-k with ep = 2 where the rank count is
 *    even, ∞-MoE likewise) with a 1000-token vocabulary, so each step's batches use
 *    only part of wte: backward then the blocking reduction, and backward with the
 *    reduction overlapped, give the same gradients and norm bit for bit, at
 *    bucket sizes of 64 floats and 4 MiB.
 * Prints PASS lines; exits 1 on the first difference.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/dist.h"
#include "infmoe/gradreduce.h"
#include "infmoe/model.h"
#include "infmoe/util.h"

/* The value rank r puts at element i of segment s: any float, including negative. */
static float value(int r, int s, size_t i) {
    uint64_t h = rng_mix64(((uint64_t)r << 48) ^ ((uint64_t)s << 32) ^ i);
    return (float)((double)(h >> 11) / 9007199254740992.0 * 2.0 - 1.0) * (float)(1 + (h & 7));
}

static int check_segments(const dist_ctx *d) {
    static const size_t lens[] = {0, 1, 2, 3, 5, 97, 1000, 4099, 100003};
    static const size_t buckets[] = {1, 7, 64, 1000, (size_t)1 << 20};
    static const int slots[] = {1, 2, 16};
    const int NL = (int)(sizeof lens / sizeof lens[0]);
    float *buf[sizeof lens / sizeof lens[0]];
    int bad = 0;
    for (size_t bi = 0; bi < sizeof buckets / sizeof buckets[0]; bi++)
        for (size_t si = 0; si < sizeof slots / sizeof slots[0]; si++) {
            grad_reducer *r = gradred_create(d->world, buckets[bi], slots[si]);
            for (int s = 0; s < NL; s++) {
                buf[s] = xcalloc(lens[s] + 1, sizeof(float));
                for (size_t i = 0; i < lens[s]; i++) buf[s][i] = value(d->rank, s, i);
                gradred_add(r, buf[s], lens[s], s % 2 ? 1.0f : 1.0f / (float)d->size);
                gradred_progress(r);
            }
            gradred_wait(r);
            for (int s = 0; s < NL; s++) {
                for (size_t i = 0; i < lens[s]; i++) {
                    float want = value(0, s, i);
                    for (int q = 1; q < d->size; q++) want += value(q, s, i);
                    if (!(s % 2)) want *= 1.0f / (float)d->size;
                    bad |= memcmp(&want, &buf[s][i], sizeof want) != 0;
                }
                free(buf[s]);
            }
            gradred_free(r);
        }
    if (d->size == 2) { /* commutative: MPI's own sum */
        size_t n = 100003;
        float *a = xcalloc(n, sizeof(float)), *b = xcalloc(n, sizeof(float));
        for (size_t i = 0; i < n; i++) a[i] = b[i] = value(d->rank, 99, i);
        grad_reducer *r = gradred_create(d->world, 4096, 4);
        gradred_add(r, a, n, 0.5f);
        gradred_wait(r);
        gradred_free(r);
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, b, (int)n, MPI_FLOAT, MPI_SUM, d->world));
        for (size_t i = 0; i < n; i++) b[i] *= 0.5f;
        bad |= memcmp(a, b, n * sizeof(float)) != 0;
        free(a);
        free(b);
    }
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, d->world));
    return bad;
}

/* One training step's gradients, blocking or overlapped; returns the norm. */
static double grads_of(gpt_model *m, const dist_ctx *d, const int32_t *tok, int overlapped) {
    model_set_step(m, 0, (int64_t)d->rank * m->N, 1);
    model_forward(m, tok, tok + 1);
    model_zero_grad(m);
    if (!overlapped) {
        model_backward(m);
        return model_reduce_gradients(m, d);
    }
    model_backward_overlapped(m, d);
    return model_finish_reduction(m, d);
}

static int check_model(dist_ctx *d, ffn_kind kind, float bucket_mb) {
    run_config cfg;
    config_defaults(&cfg);
    tiny_backbone(&cfg, 32, 2, 16, 1000);
    cfg.batch_size = 2 * d->size;
    cfg.ffn_hidden = 64;
    cfg.grad_bucket_mb = bucket_mb;
    cfg.ffn_kind = kind;
    int ep = d->size % 2 == 0 && kind != FFN_DENSE ? 2 : 1;
    if (kind == FFN_TOPK) {
        cfg.experts = 4;
        cfg.top_k = 2;
        cfg.expert_hidden = 16;
    } else if (kind == FFN_INFINITE) {
        cfg.inf_units = 256;
        cfg.mask_block = 32;
        cfg.keep = 0.25f;
        cfg.samples = 2;
        cfg.latent_dim = 1;
    }
    cfg.ep = ep;
    dist_set_layout(d, ep);
    gpt_model m;
    model_build(&m, &cfg, 2, d);
    model_init_params(&m, 5);
    int32_t *tok = xcalloc((size_t)m.N + 1, sizeof(int32_t));
    for (int64_t i = 0; i <= m.N; i++) /* 1000-token vocabulary, a few hundred used */
        tok[i] = (int32_t)(rng_mix64((uint64_t)d->rank * 7919 + (uint64_t)i) % 400) * 2;
    const size_t n = m.tensors.total;
    double norm_b = grads_of(&m, d, tok, 0);
    float *gb = xcalloc(n, sizeof(float));
    memcpy(gb, m.grads, n * sizeof(float));
    double norm_o = grads_of(&m, d, tok, 1);
    int bad = memcmp(gb, m.grads, n * sizeof(float)) != 0 || memcmp(&norm_b, &norm_o, sizeof norm_b) != 0;
    double norm_o2 = grads_of(&m, d, tok, 1); /* twice: the used-row list is per step */
    bad |= memcmp(gb, m.grads, n * sizeof(float)) != 0 || norm_o2 != norm_b;
    int rows = m.wte_rows; /* 0 again after the reduction: the list is per step */
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, d->world));
    if (d->rank == 0 && !bad)
        printf("PASS gradreduce: %s model at %d ranks, ep %d, buckets %g MiB: overlapped == blocking "
               "(%zu gradients and the norm %.6g bitwise)\n",
               ffn_kind_name(kind), d->size, ep, bucket_mb, n, norm_b);
    bad |= rows != 0;
    free(gb);
    free(tok);
    model_free(&m);
    return bad;
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    if (check_segments(&d)) {
        if (d.rank == 0) printf("FAIL gradreduce: a segment differs from the rank-order sum\n");
        dist_finalize(&d);
        return 1;
    }
    if (d.rank == 0)
        printf("PASS gradreduce: segments of 0-100003 floats, buckets of 1 float to 4 MiB, 1-16 slots, "
               "at %d ranks: the rank-order sum bitwise%s\n",
               d.size, d.size == 2 ? ", and MPI_Allreduce's" : "");
    static const ffn_kind kinds[] = {FFN_DENSE, FFN_TOPK, FFN_INFINITE};
    for (int k = 0; k < 3; k++)
        for (int b = 0; b < 2; b++)
            if (check_model(&d, kinds[k], b ? 4.0f : 64.0f * 4 / (1 << 20))) {
                if (d.rank == 0)
                    printf("FAIL gradreduce: %s model at %d ranks: overlapped != blocking\n",
                           ffn_kind_name(kinds[k]), d.size);
                dist_finalize(&d);
                return 1;
            }
    dist_finalize(&d);
    return 0;
}

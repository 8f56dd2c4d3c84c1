/* infmask: the ∞-MoE block masks, window and learned rules (see infmask.h, docs/infinite.md). */
#include "infmoe/infmask.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ops.h"
#include "infmoe/util.h"

void inf_mask_scratch_init(const inf_mask *m, mask_scratch *s) {
    const int learned = m->rule == MASK_LEARNED;
    const mem_part parts[] = {
        MEM_PART(s->scores, m->H),  MEM_PART(s->blocks, m->kb),          MEM_PART(s->p, m->n_keep),
        MEM_PART(s->dedz, m->n_keep * m->dz), MEM_PART(s->key, m->nb),
        MEM_PART(s->grad_pq, learned ? m->H * m->dz + m->H : 0),
    };
    s->mem = mem_carve(parts, sizeof parts / sizeof parts[0]);
    if (!learned) s->grad_pq = NULL;
}

void inf_mask_scratch_free(mask_scratch *s) {
    free(s->mem);
    memset(s, 0, sizeof *s);
}

/* The kept blocks in ascending order (an arc may wrap round the ring). */
static void sort_blocks(int32_t *blocks, int kb) {
    for (int i = 1; i < kb; i++)
        for (int j = i; j > 0 && blocks[j - 1] > blocks[j]; j--) {
            int32_t t = blocks[j];
            blocks[j] = blocks[j - 1];
            blocks[j - 1] = t;
        }
}

/* Window rule: the kb block centres nearest z, the arc centred on z (block centre i
 * sits at (i + 0.5) / nb, so z lies at centre index x = z nb - 0.5); returns z mod 1. */
static float window_blocks(const inf_mask *f, const float *z, mask_scratch *s) {
    const int nb = f->nb, kb = f->kb;
    float zz = z[0] - floorf(z[0]);
    int start = (int)floorf(zz * nb - 0.5f - (kb - 1) * 0.5f + 0.5f);
    for (int j = 0; j < kb; j++) s->blocks[j] = ((start + j) % nb + nb) % nb;
    return zz;
}

/* Window rule: logits e and d logit / d z of kept block i's units (vectorised). */
static void window_logits(const inf_mask *f, float zz, int i, mask_scratch *s) {
    const int b = f->b, H = f->H, j0 = s->blocks[i] * b;
    const float scale = (float)H / f->n_keep, inv_tau2 = 1.0f / (f->tau * f->tau);
    float *e = s->p + i * b, *de = s->dedz + i * b;
#pragma omp simd
    for (int u = 0; u < b; u++) {
        float diff = zz - ((float)(j0 + u) + 0.5f) / H;
        diff = diff >= 0.5f ? diff - 1.0f : diff < -0.5f ? diff + 1.0f : diff;
        float d = fabsf(diff) * scale;
        e[u] = -d * d * inv_tau2;
        float sign = diff > 0 ? 1.0f : diff < 0 ? -1.0f : 0.0f;
        de[u] = -2.0f * d * inv_tau2 * sign * scale;
    }
}

/* p[0..n) <- exp(p - max), then times inv: inf_mask_sample's elementwise softmax steps. */
static void softmax_scale(float *p, int n, float max, float inv) {
#pragma omp simd
    for (int o = 0; o < n; o++) p[o] = exp_fast(p[o] - max);
#pragma omp simd
    for (int o = 0; o < n; o++) p[o] *= inv;
}

void inf_mask_sample(const inf_mask *f, const float *params, const float *z, mask_scratch *s,
                     int want) {
    const int want_dedz = want == INF_MASK_DEDZ;
    const int nb = f->nb, kb = f->kb, b = f->b, H = f->H, dz = f->dz;
    float zz = 0.0f;
    if (f->rule == MASK_WINDOW) {
        zz = window_blocks(f, z, s);
    } else {
        const float *P = params + f->P, *q = params + f->q;
        for (int j = 0; j < H; j++) {
            float v = q[j];
            for (int d = 0; d < dz; d++) v += P[(size_t)j * dz + d] * z[d];
            s->scores[j] = v;
        }
        for (int i = 0; i < nb; i++) {
            float m = 0.0f;
            for (int u = 0; u < b; u++) m += s->scores[i * b + u];
            s->key[i] = -m / b; /* smaller key = better block */
        }
        /* kb smallest keys, ties to the lower index */
        for (int j = 0; j < kb; j++) {
            int best = -1;
            for (int i = 0; i < nb; i++) {
                if (s->key[i] == INFINITY) continue;
                if (best < 0 || s->key[i] < s->key[best]) best = i;
            }
            s->blocks[j] = best;
            s->key[best] = INFINITY;
        }
    }
    sort_blocks(s->blocks, kb);
    if (want == INF_MASK_BLOCKS) return;
    /* unit logits (vectorised within each block), then the softmax over the kept units */
    for (int i = 0; i < kb; i++) {
        if (f->rule == MASK_WINDOW) {
            window_logits(f, zz, i, s);
            continue;
        }
        const int j0 = s->blocks[i] * b;
        memcpy(s->p + i * b, s->scores + j0, sizeof(float) * b);
        if (want_dedz) memcpy(s->dedz + (size_t)i * b * dz, params + f->P + (size_t)j0 * dz, sizeof(float) * b * dz);
    }
    const int n = f->n_keep;
    float *p = s->p, max = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : max)
    for (int o = 0; o < n; o++) max = p[o] > max ? p[o] : max;
#pragma omp simd reduction(+ : sum)
    for (int o = 0; o < n; o++) {
        p[o] = exp_fast(p[o] - max);
        sum += p[o];
    }
    const float inv = 1.0f / sum;
    s->max = max;
    s->inv = inv;
#pragma omp simd
    for (int o = 0; o < n; o++) p[o] *= inv;
}

void inf_mask_window_part(const inf_mask *f, const float *z, float max, float inv,
                          const int32_t *local_of, mask_scratch *s) {
    const float zz = window_blocks(f, z, s);
    sort_blocks(s->blocks, f->kb); /* in inf_mask_sample's order */
    for (int i = 0; i < f->kb; i++) {
        if (local_of[s->blocks[i]] < 0) continue;
        window_logits(f, zz, i, s);
        softmax_scale(s->p + i * f->b, f->b, max, inv);
    }
}

float inf_mask_window_q(const inf_mask *f, const mask_scratch *s) {
    float Q = 0.0f;
#pragma omp simd reduction(+ : Q)
    for (int o = 0; o < f->n_keep; o++) Q += s->p[o] * s->dedz[o];
    return Q;
}

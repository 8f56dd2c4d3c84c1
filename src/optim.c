/* optim: AdamW, the LR schedule and gradient clipping (see optim.h). */
#include "infmoe/optim.h"

#include <math.h>

float optim_lr(const run_config *cfg, int step) {
    if (step < cfg->warmup) return cfg->lr * (float)(step + 1) / (float)cfg->warmup;
    if (cfg->steps <= cfg->warmup) return cfg->lr;
    double d = (double)(step - cfg->warmup) / (double)(cfg->steps - cfg->warmup);
    if (d > 1.0) d = 1.0;
    double coeff = 0.5 * (1.0 + cos(3.14159265358979323846 * d));
    return (float)(cfg->min_lr + coeff * (cfg->lr - cfg->min_lr));
}

double optim_sum_squares(const float *g, size_t n) {
    double s = 0.0;
#pragma omp parallel for simd reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += (double)g[i] * (double)g[i];
    return s;
}

float optim_clip_scale(float grad_clip, double norm) {
    if (grad_clip > 0.0f && norm > grad_clip) return (float)(grad_clip / (norm + 1e-6));
    return 1.0f;
}

/* One parameter's AdamW update; m and v updated in place. */
static inline float adamw_one(float p, float g, float *m, float *v, float b1, float b2, float c1,
                              float c2, float eps, float lr, float wd) {
    *m = b1 * *m + (1.0f - b1) * g;
    *v = b2 * *v + (1.0f - b2) * g * g;
    float mhat = *m / c1, vhat = *v / c2;
    return p - lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
}

void optim_adamw_step(const tensor_table *tab, float *params, const float *grads, float *m,
                      float *v, const run_config *cfg, float lr, int step, float grad_scale,
                      bf16 *params_h) {
    const float b1 = cfg->beta1, b2 = cfg->beta2, eps = cfg->adam_eps;
    const float c1 = 1.0f - powf(b1, (float)(step + 1)), c2 = 1.0f - powf(b2, (float)(step + 1));
    /* one parallel region for all tensors, each split over the threads without a
     * barrier between them: a region per tensor woke the threads ~150 times a step,
     * most of them for tensors of a few hundred floats */
#pragma omp parallel
    for (int t = 0; t < tab->n; t++) {
        const tensor_spec *s = &tab->t[t];
        const float wd = s->decay ? cfg->weight_decay : 0.0f;
        float *restrict p = params + s->offset, *restrict mm = m + s->offset,
                        *restrict vv = v + s->offset;
        const float *restrict g = grads + s->offset;
        if (!params_h) {
#pragma omp for simd schedule(static) nowait
            for (size_t i = 0; i < s->numel; i++)
                p[i] = adamw_one(p[i], g[i] * grad_scale, &mm[i], &vv[i], b1, b2, c1, c2, eps, lr, wd);
            continue;
        }
        bf16 *restrict h = params_h + s->offset;
#pragma omp for simd schedule(static) nowait
        for (size_t i = 0; i < s->numel; i++) {
            p[i] = adamw_one(p[i], g[i] * grad_scale, &mm[i], &vv[i], b1, b2, c1, c2, eps, lr, wd);
            h[i] = bf16_round(p[i]);
        }
    }
}

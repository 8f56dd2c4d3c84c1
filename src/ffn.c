/* ffn: the FFN interface: the dense GPT-2 MLP here, MoE layers in moe.c (see ffn.h). */
#include "infmoe/ffn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ops.h"
#include "infmoe/util.h"

void ffn_init(ffn_layer *f, const run_config *cfg, int layer, tensor_table *tab,
              int64_t max_tokens, int ep, int ep_rank) {
    memset(f, 0, sizeof *f);
    f->C = cfg->n_embd;
    f->max_tokens = max_tokens;
    if (cfg->ffn_kind != FFN_DENSE && (layer + 1) % cfg->ffn_every == 0) {
        f->kind = cfg->ffn_kind;
        if (f->kind == FFN_INFINITE)
            f->inf = inf_create(cfg, layer, tab, max_tokens, ep, ep_rank);
        else
            f->moe = moe_create(cfg, layer, tab, max_tokens, ep, ep_rank);
        return;
    }
    f->kind = FFN_DENSE;
    f->H = cfg->ffn_hidden;
    char name[64];
    const float std = 0.02f;
    /* GPT-2 scales the init of projections into the residual stream by 1/sqrt(2L). */
    const float proj_std = 0.02f / sqrtf(2.0f * (float)cfg->n_layer);
    int64_t s_fc_w[2] = {f->H, f->C}, s_fc_b[1] = {f->H};
    int64_t s_pr_w[2] = {f->C, f->H}, s_pr_b[1] = {f->C};
    snprintf(name, sizeof name, "h.%d.ffn.fc.w", layer);
    f->fc_w = tensor_add(tab, name, 2, s_fc_w, 1, INIT_NORMAL, std);
    snprintf(name, sizeof name, "h.%d.ffn.fc.b", layer);
    f->fc_b = tensor_add(tab, name, 1, s_fc_b, 0, INIT_ZERO, 0);
    snprintf(name, sizeof name, "h.%d.ffn.proj.w", layer);
    f->proj_w = tensor_add(tab, name, 2, s_pr_w, 1, INIT_NORMAL, proj_std);
    snprintf(name, sizeof name, "h.%d.ffn.proj.b", layer);
    f->proj_b = tensor_add(tab, name, 1, s_pr_b, 0, INIT_ZERO, 0);
    f->pre = xcalloc((size_t)(max_tokens * f->H), sizeof(float));
    f->act = xcalloc((size_t)(max_tokens * f->H), sizeof(float));
}

void ffn_register_sharded(ffn_layer *f, tensor_table *tab) {
    if (f->moe) moe_register_experts(f->moe, tab);
    if (f->inf) inf_register_units(f->inf, tab);
}

size_t ffn_scratch_floats(const ffn_layer *f, int64_t n) { return (size_t)(n * f->H); }

double ffn_forward(ffn_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx) {
    ALWAYS(n <= f->max_tokens);
    if (f->moe) return moe_forward(f->moe, params, out, in, n, ctx);
    if (f->inf) return inf_forward(f->inf, params, out, in, n, ctx);
    matmul_forward(f->pre, in, params + f->fc_w, params + f->fc_b, n, f->C, f->H, 0);
    gelu_forward(f->act, f->pre, n * f->H);
    matmul_forward(out, f->act, params + f->proj_w, params + f->proj_b, n, f->H, f->C, 1);
    return 0.0;
}

void ffn_backward(ffn_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, float *scratch, const ffn_context *ctx) {
    if (f->moe) {
        moe_backward(f->moe, params, grads, din, dout, in, n, ctx);
        return;
    }
    if (f->inf) {
        inf_backward(f->inf, params, grads, din, dout, in, n, ctx);
        return;
    }
    float *dact = scratch; /* (n,H), reused for the pre-activation gradient */
    memset(dact, 0, (size_t)(n * f->H) * sizeof(float));
    matmul_backward(dact, grads + f->proj_w, grads + f->proj_b, dout, f->act,
                    params + f->proj_w, n, f->H, f->C);
    /* GELU backward in place: dpre = GELU'(pre) * dact */
    float *dpre = f->act; /* the GELU output is not needed any more */
    memset(dpre, 0, (size_t)(n * f->H) * sizeof(float));
    gelu_backward(dpre, f->pre, dact, n * f->H);
    matmul_backward(din, grads + f->fc_w, grads + f->fc_b, dpre, in, params + f->fc_w, n, f->C,
                    f->H);
}

void ffn_end_step(ffn_layer *f, const ffn_context *ctx) {
    if (f->moe) moe_end_step(f->moe, ctx);
}

void ffn_set_samples(ffn_layer *f, int samples, int deterministic) {
    if (f->inf) inf_set_samples(f->inf, samples, deterministic);
}

double ffn_matmul_params_per_token(const ffn_layer *f) {
    if (f->inf) return inf_matmul_params_per_token(f->inf);
    return f->moe ? moe_matmul_params_per_token(f->moe) : 2.0 * f->C * f->H;
}

void ffn_free(ffn_layer *f) {
    moe_free(f->moe);
    inf_free(f->inf);
    free(f->pre);
    free(f->act);
    memset(f, 0, sizeof *f);
}

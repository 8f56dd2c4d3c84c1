/*
 * ffn: the FFN interface (see ffn.h). The dense GPT-2 MLP is here; every entry
 * point sends MoE layers to moe.c and ∞-MoE layers to infinite.c. This is the
 * one file that knows which variant a layer is.
 */
#include "infmoe/ffn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/infinite.h"
#include "infmoe/moe.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

struct dense_layer {
    int C, H, bf16;
    size_t fc_w, fc_b, proj_w, proj_b; /* parameter offsets */
    float *pre, *act; /* saved for backward: (max_tokens, H) pre-activation, GELU output */
    bf16 *in_h, *act_h; /* bf16: the input and the GELU output in bf16 instead of act */
    void *mem;
};

/* Tensor names of a dense FFN: the layer's own, or the shared FFN beside routed experts. */
static const char *const DENSE_NAMES[4] = {"h.%d.ffn.fc.w", "h.%d.ffn.fc.b", "h.%d.ffn.proj.w",
                                           "h.%d.ffn.proj.b"};
static const char *const SHARED_NAMES[4] = {"h.%d.ffn.shared.fc.w", "h.%d.ffn.shared.fc.b",
                                            "h.%d.ffn.shared.proj.w", "h.%d.ffn.shared.proj.b"};

static dense_layer *dense_create(const run_config *cfg, int layer, tensor_table *tab,
                                 int64_t max_tokens, int use_bf16, int H,
                                 const char *const names[4]) {
    dense_layer *f = xcalloc(1, sizeof *f);
    f->C = cfg->n_embd;
    f->H = H;
    f->bf16 = use_bf16;
    const float std = 0.02f;
    /* GPT-2 scales the init of projections into the residual stream by 1/sqrt(2L). */
    const float proj_std = 0.02f / sqrtf(2.0f * (float)cfg->n_layer);
    int64_t s_fc_w[2] = {f->H, f->C}, s_fc_b[1] = {f->H};
    int64_t s_pr_w[2] = {f->C, f->H}, s_pr_b[1] = {f->C};
    f->fc_w = tensor_add_layer(tab, names[0], layer, 2, s_fc_w, 1, INIT_NORMAL, std);
    f->fc_b = tensor_add_layer(tab, names[1], layer, 1, s_fc_b, 0, INIT_ZERO, 0);
    f->proj_w = tensor_add_layer(tab, names[2], layer, 2, s_pr_w, 1, INIT_NORMAL, proj_std);
    f->proj_b = tensor_add_layer(tab, names[3], layer, 1, s_pr_b, 0, INIT_ZERO, 0);
    if (use_bf16) {
        const mem_part parts[] = {MEM_PART(f->pre, max_tokens * f->H),
                                  MEM_PART(f->act_h, max_tokens * f->H),
                                  MEM_PART(f->in_h, max_tokens * f->C)};
        f->mem = mem_carve(parts, 3);
    } else {
        const mem_part parts[] = {MEM_PART(f->pre, max_tokens * f->H),
                                  MEM_PART(f->act, max_tokens * f->H)};
        f->mem = mem_carve(parts, 2);
    }
    return f;
}

/* bf16: the same MLP with bf16 operands; what the backward feeds to products is
 * kept in bf16 (the input and the GELU output), the pre-activation in fp32. */
static void dense_forward_bf16(dense_layer *f, const float *params, const bf16 *W, float *out,
                               const float *in, int64_t n) {
    bf16_from_f32(f->in_h, in, n * f->C);
    matmul_forward_bf16(f->pre, 0, f->in_h, W + f->fc_w, params + f->fc_b, n, f->C, f->H, 0);
    gelu_forward_bf16(f->act_h, f->pre, n * f->H);
    matmul_forward_bf16(out, 0, f->act_h, W + f->proj_w, params + f->proj_b, n, f->H, f->C, 1);
}

static void dense_backward_bf16(dense_layer *f, const bf16 *W, float *grads, float *din,
                                const float *dout, int64_t n, float *scratch) {
    const int C = f->C, H = f->H;
    float *dact = scratch;                         /* (n,H) */
    bf16 *dout_h = (bf16 *)(scratch + n * H);      /* (n,C) */
    bf16_from_f32(dout_h, dout, n * C);
    gemm_bf16(0, 0, n, H, C, dout_h, C, W + f->proj_w, H, dact, H, 0, 0, NULL);
    gemm_bf16(1, 0, C, H, n, dout_h, C, f->act_h, H, grads + f->proj_w, H, 0, 1, NULL);
    bias_backward(grads + f->proj_b, dout, n, C);
    bf16 *dpre = f->act_h; /* the GELU output is not needed any more */
    gelu_backward_bf16(dpre, f->pre, dact, n * H);
    matmul_backward_bf16(din, 0, grads + f->fc_w, grads + f->fc_b, dpre, f->in_h, W + f->fc_w, n,
                         C, H);
}

static void dense_forward(dense_layer *f, const float *params, float *out, const float *in,
                          int64_t n) {
    matmul_forward(f->pre, in, params + f->fc_w, params + f->fc_b, n, f->C, f->H, 0);
    gelu_forward(f->act, f->pre, n * f->H);
    matmul_forward(out, f->act, params + f->proj_w, params + f->proj_b, n, f->H, f->C, 1);
}

static void dense_backward(dense_layer *f, const float *params, float *grads, float *din,
                           const float *dout, const float *in, int64_t n, float *scratch) {
    float *dact = scratch; /* (n,H), reused for the pre-activation gradient */
    par_zero(dact, (size_t)(n * f->H) * sizeof(float));
    matmul_backward(dact, grads + f->proj_w, grads + f->proj_b, dout, f->act,
                    params + f->proj_w, n, f->H, f->C);
    /* GELU backward in place: dpre = GELU'(pre) * dact */
    float *dpre = f->act; /* the GELU output is not needed any more */
    par_zero(dpre, (size_t)(n * f->H) * sizeof(float));
    gelu_backward(dpre, f->pre, dact, n * f->H);
    matmul_backward(din, grads + f->fc_w, grads + f->fc_b, dpre, in, params + f->fc_w, n, f->C,
                    f->H);
}

/* The dense MLP token by token with gemm_naive (in is the last forward's input). */
static void dense_reference(const dense_layer *f, const float *params, float *out, const float *in,
                            int64_t n) {
    float *h = xcalloc((size_t)f->H, sizeof(float)), *y = xcalloc((size_t)f->C, sizeof(float));
    for (int64_t t = 0; t < n; t++) {
        gemm_naive(0, 1, 1, f->H, f->C, in + t * f->C, f->C, params + f->fc_w, f->C, h, f->H, 0,
                   params + f->fc_b);
        for (int i = 0; i < f->H; i++) {
            float x = h[i];
            h[i] = 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        }
        gemm_naive(0, 1, 1, f->C, f->H, h, f->H, params + f->proj_w, f->H, y, f->C, 0,
                   params + f->proj_b);
        for (int c = 0; c < f->C; c++) out[t * f->C + c] += y[c];
    }
    free(h);
    free(y);
}

static void dense_free(dense_layer *f) {
    if (!f) return;
    free(f->mem);
    free(f);
}

/* ---- the interface ---- */

int ffn_kind_has_samples(ffn_kind kind) { return kind == FFN_INFINITE; }

void ffn_init(ffn_layer *f, const run_config *cfg, int layer, tensor_table *tab,
              int64_t max_tokens, const ffn_context *ctx) {
    memset(f, 0, sizeof *f);
    f->layer = layer;
    f->max_tokens = max_tokens;
    f->kind = cfg->ffn_kind != FFN_DENSE && (layer + 1) % cfg->ffn_every == 0 ? cfg->ffn_kind : FFN_DENSE;
    if (f->kind != FFN_DENSE && (!ctx || ctx->ep_comm == MPI_COMM_NULL) && max_tokens > 0)
        INFMOE_FAIL("layer %d (%s) exchanges token rows: it needs the MPI layout (a context)", layer,
                    ffn_kind_name(f->kind));
    const int bf = ctx && ctx->bf16;
    switch (f->kind) {
    case FFN_DENSE: f->dense = dense_create(cfg, layer, tab, max_tokens, bf, cfg->ffn_hidden, DENSE_NAMES); break;
    case FFN_TOPK:
    case FFN_MOGE: f->moe = moe_create(cfg, layer, tab, max_tokens, ctx); break;
    case FFN_INFINITE: f->inf = inf_create(cfg, layer, tab, max_tokens, ctx); break;
    }
    if (f->kind != FFN_DENSE && cfg->shared_hidden > 0) { /* replicated, beside the routed FFN */
        f->shared = dense_create(cfg, layer, tab, max_tokens, bf, cfg->shared_hidden, SHARED_NAMES);
        f->ybuf = xcalloc((size_t)(max_tokens * cfg->n_embd) + 1, sizeof(float));
    }
}

void ffn_register_sharded(ffn_layer *f, tensor_table *tab) {
    if (f->moe) moe_register_experts(f->moe, tab);
    if (f->inf) inf_register_units(f->inf, tab);
}

static size_t dense_scratch_floats(const dense_layer *d, int64_t n) {
    /* dense bf16: the output gradient in bf16 after the (n,H) one */
    return (size_t)(n * d->H) + (d->bf16 ? (size_t)(n * d->C + 1) / 2 : 0);
}

size_t ffn_scratch_floats(const ffn_layer *f, int64_t n) {
    if (f->dense) return dense_scratch_floats(f->dense, n);
    return f->shared ? dense_scratch_floats(f->shared, n) : 0;
}

static void dense_run_forward(dense_layer *d, const float *params, float *out, const float *in,
                              int64_t n, const ffn_context *ctx) {
    if (d->bf16) dense_forward_bf16(d, params, ctx->wbf, out, in, n);
    else dense_forward(d, params, out, in, n);
}

static void dense_run_backward(dense_layer *d, const float *params, float *grads, float *din,
                               const float *dout, const float *in, int64_t n, float *scratch,
                               const ffn_context *ctx) {
    if (d->bf16) dense_backward_bf16(d, ctx->wbf, grads, din, dout, n, scratch);
    else dense_backward(d, params, grads, din, dout, in, n, scratch);
}

/* Sum over tokens of the L2 norm of each row of y (n,C). */
static double row_norm_sum(const float *y, int64_t n, int C) {
    double s = 0.0;
#pragma omp parallel for reduction(+ : s)
    for (int64_t t = 0; t < n; t++) {
        double q = 0.0;
        for (int c = 0; c < C; c++) q += (double)y[t * C + c] * y[t * C + c];
        s += sqrt(q);
    }
    return s;
}

static void add_rows(float *out, const float *y, int64_t n) {
#pragma omp parallel for
    for (int64_t i = 0; i < n; i++) out[i] += y[i];
}

static double routed_forward(ffn_layer *f, const float *params, float *out, const float *in,
                             int64_t n, const ffn_context *ctx) {
    return f->moe ? moe_forward(f->moe, params, out, in, n, ctx)
                  : inf_forward(f->inf, params, out, in, n, ctx);
}

double ffn_forward(ffn_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx) {
    ALWAYS(n <= f->max_tokens);
    if (f->dense) {
        dense_run_forward(f->dense, params, out, in, n, ctx);
        return 0.0;
    }
    if (!f->shared) return routed_forward(f, params, out, in, n, ctx);
    /* routed and shared outputs apart, so the log and stats can say each one's share */
    const int C = f->shared->C;
    float *y = f->ybuf;
    par_zero(y, sizeof(float) * (size_t)(n * C));
    double aux = routed_forward(f, params, y, in, n, ctx);
    double norms[2] = {ctx->training ? row_norm_sum(y, n, C) : 0.0, 0.0};
    add_rows(out, y, n * C);
    par_zero(y, sizeof(float) * (size_t)(n * C));
    dense_run_forward(f->shared, params, y, in, n, ctx);
    if (ctx->training) {
        norms[1] = row_norm_sum(y, n, C);
        dist_allreduce_sum_d(norms, 2, ctx->world);
        f->shared_share = norms[0] + norms[1] > 0.0 ? norms[1] / (norms[0] + norms[1]) : 0.0;
    }
    add_rows(out, y, n * C);
    return aux;
}

void ffn_backward(ffn_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, float *scratch, const ffn_context *ctx) {
    if (f->moe) moe_backward(f->moe, params, grads, din, dout, in, n, ctx);
    else if (f->inf) inf_backward(f->inf, params, grads, din, dout, in, n, ctx);
    else dense_run_backward(f->dense, params, grads, din, dout, in, n, scratch, ctx);
    if (f->shared) dense_run_backward(f->shared, params, grads, din, dout, in, n, scratch, ctx);
}

void ffn_end_step(ffn_layer *f, const ffn_context *ctx) {
    if (f->moe) moe_end_step(f->moe, ctx);
    if (f->inf) inf_end_step(f->inf);
}

void ffn_set_samples(ffn_layer *f, int samples, int deterministic) {
    if (f->inf) inf_set_samples(f->inf, samples, deterministic);
}

static double shared_params_per_token(const ffn_layer *f) {
    return f->shared ? 2.0 * f->shared->C * f->shared->H : 0.0;
}

double ffn_matmul_params_per_token(const ffn_layer *f) {
    if (f->inf) return inf_matmul_params_per_token(f->inf) + shared_params_per_token(f);
    if (f->moe) return moe_matmul_params_per_token(f->moe) + shared_params_per_token(f);
    return 2.0 * f->dense->C * f->dense->H;
}

double ffn_active_params_per_token(const ffn_layer *f) {
    return f->inf ? inf_active_params_per_token(f->inf) + shared_params_per_token(f)
                  : ffn_matmul_params_per_token(f);
}

int ffn_stats_describe(const ffn_layer *f, stats_layer_desc *d) {
    if (f->moe) moe_stats_describe(f->moe, d);
    else if (f->inf) inf_stats_describe(f->inf, d);
    if (f->moe || f->inf) d->has_shared = f->shared != NULL;
    return f->moe || f->inf;
}

void ffn_stats_row(const ffn_layer *f, stats_row *r) {
    if (f->moe) moe_stats_row(f->moe, r);
    else if (f->inf) inf_stats_row(f->inf, r);
    else memset(r, 0, sizeof *r);
    r->shared_share = f->shared_share;
}

void ffn_phase_times(const ffn_layer *f, double t[4]) {
    memset(t, 0, 4 * sizeof(double));
    if (f->moe) moe_phase_times(f->moe, t);
    if (f->inf) inf_phase_times(f->inf, t);
}

void ffn_log_fields(const ffn_layer *layers, int n, double aux_loss, char *buf, size_t cap) {
    const moe_layer **moe = xcalloc((size_t)(n > 0 ? n : 1), sizeof *moe);
    const inf_layer **inf = xcalloc((size_t)(n > 0 ? n : 1), sizeof *inf);
    int n_moe = 0, n_inf = 0;
    for (int l = 0; l < n; l++) {
        if (layers[l].moe) moe[n_moe++] = layers[l].moe;
        if (layers[l].inf) inf[n_inf++] = layers[l].inf;
    }
    buf[0] = '\0';
    if (n_moe > 0) moe_log_fields(moe, n_moe, aux_loss, buf, cap);
    if (n_inf > 0) inf_log_fields(inf, n_inf, buf + strlen(buf), cap - strlen(buf));
    double share = 0.0;
    int n_shared = 0;
    for (int l = 0; l < n; l++)
        if (layers[l].shared) {
            share += layers[l].shared_share;
            n_shared++;
        }
    if (n_shared > 0)
        snprintf(buf + strlen(buf), cap - strlen(buf), " | shared %.1f%%", 100.0 * share / n_shared);
    free(moe);
    free(inf);
}

int ffn_state(ffn_layer *f, ffn_state_array *s, int cap) {
    if (f->inf && cap >= 1) {
        int64_t n;
        double *w = inf_balance_state(f->inf, &n);
        if (n == 0) return 0;
        s[0] = (ffn_state_array){"ring_warp", w, n};
        return 1;
    }
    if (!f->moe || cap < 1) return 0;
    int n = 0, E = moe_num_experts(f->moe);
    s[n++] = (ffn_state_array){"guard_totals", moe_guard_totals(f->moe), E};
    double *bias = moe_expert_bias(f->moe);
    if (bias && n < cap) s[n++] = (ffn_state_array){"expert_bias", bias, E};
    return n;
}

void ffn_reference_forward(const ffn_layer *f, const float *params, float *out, const float *in,
                           int64_t n) {
    if (f->moe) moe_reference_forward(f->moe, params, out, in, n);
    else if (f->inf) inf_reference_forward(f->inf, params, out, in, n);
    else dense_reference(f->dense, params, out, in, n);
    if (f->shared) dense_reference(f->shared, params, out, in, n);
}

uint64_t ffn_routing_hash(const ffn_layer *f) {
    if (f->moe) return moe_routing_hash(f->moe);
    if (f->inf) return inf_routing_hash(f->inf);
    return 0; /* dense: no routing */
}

void ffn_free(ffn_layer *f) {
    moe_free(f->moe);
    inf_free(f->inf);
    dense_free(f->dense);
    dense_free(f->shared);
    free(f->ybuf);
    memset(f, 0, sizeof *f);
}

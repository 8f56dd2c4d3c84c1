/* moe: gating, aux losses, expert dispatch and grouped expert GEMMs (see moe.h, docs/moe.md). */
#include "infmoe/moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

struct moe_layer {
    int layer, C, E, k, He, E_local, e0, ep;
    gate_kind gate;
    int moge, guard_steps;
    float w_imp, w_load, aux_alpha, z_loss, jitter, cf, margin;
    float moge_lambda, s_max, s_min, s_gamma;
    int grid_r, grid_c, win;
    size_t wg, wn, w1, b1, w2, b2; /* parameter offsets */
    int64_t max_tokens, max_rows;
    /* forward state, kept for backward */
    int64_t n;
    const float *ur;  /* router input: the FFN input, or its jittered copy */
    float *jit, *jittered; /* (n,C) jitter factors and u * jitter */
    float *logits;    /* (n,E) clean router logits; blocked experts -inf */
    float *nlog;      /* (n,E) noise logits (noisy gate) */
    float *eps;       /* (n,E) noise draws */
    float *score;     /* (n,E) selection scores: logits + eps * softplus(nlog), or logits */
    float *probs;     /* (n,E) softmax of the clean logits */
    float *lse;       /* (n) logsumexp of the clean logits */
    float *gates;     /* (n,k) gate of each choice */
    int32_t *choice;  /* (n,k) chosen experts, best first */
    int32_t *slot;    /* (n,k) row of the choice in the send buffer; -1: dropped */
    int32_t *kth;     /* (n,2) experts with the k-th and (k+1)-th largest score (-1: none) */
    uint8_t *blocked; /* (E) collapse guard */
    /* send side: rows grouped by expert, hence by destination rank */
    float *send, *yrows, *dx_rows; /* (n*k, C+1), (n*k, C), (n*k, C) */
    int64_t *e_count;              /* (E) rows per global expert */
    int *dest_rows;                /* (ep) */
    /* receive side */
    int64_t n_recv;
    float *recv;                   /* (max_rows, C+1) */
    int32_t *perm;                 /* received row -> position in expert order */
    int64_t *l_start;              /* (E_local+1) */
    float *X, *Hpre, *A, *Y, *back;  /* expert-ordered rows; back: received order */
    dispatch_plan plan;
    int have_plan;
    /* backward scratch */
    float *dlog, *dnlog, *dur;     /* (n,E), (n,E), (n,C) */
    float *dgate, *dA;             /* (n,k), (max_rows, He) */
    /* global sums of the last training forward (see pack_sums) */
    double *gsum;
    double sigma;
    float window[9];
    double *guard_tot;
    moe_stats stats;
};

/* Layout of the per-expert sums reduced over all ranks each training step. */
enum { S_IMP, S_LOAD, S_ARGMAX, S_PROB, S_KEPT, S_VECTORS };
#define SUM_AT(m, which) ((m)->gsum + (size_t)(which) * (m)->E)
#define SUM_DROPPED(m) ((m)->gsum[S_VECTORS * (m)->E + 0])
#define SUM_LSE2(m) ((m)->gsum[S_VECTORS * (m)->E + 1])
#define SUM_OMEGA(m) ((m)->gsum[S_VECTORS * (m)->E + 2])
#define SUM_TOKENS(m) ((m)->gsum[S_VECTORS * (m)->E + 3])
#define SUM_GATE_ENT(m) ((m)->gsum[S_VECTORS * (m)->E + 4])
#define SUM_ROUTER_ENT(m) ((m)->gsum[S_VECTORS * (m)->E + 5])
#define SUM_TOP_GATE(m) ((m)->gsum[S_VECTORS * (m)->E + 6])
#define N_SUMS(m) (S_VECTORS * (m)->E + 7)

void moe_grid(int E, int *rows, int *cols) {
    int r = 1;
    for (int i = 1; i * i <= E; i++)
        if (E % i == 0) r = i;
    *rows = r;
    *cols = E / r;
}

/* ---- counter-based random numbers: the same draw for a global token whatever the ranks ---- */

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t token_key(const ffn_context *ctx, int layer, int purpose, int64_t token) {
    return mix64(mix64(mix64(mix64(ctx->seed) ^ (uint64_t)layer * 0x100000001b3ULL) ^
                       ((uint64_t)ctx->step * 31 + (uint64_t)purpose)) ^
                 (uint64_t)token);
}

static float key_uniform(uint64_t key) { return (float)(mix64(key) >> 40) * (1.0f / 16777216.0f); }

static float key_normal(uint64_t key) {
    double u1 = ((double)(mix64(key) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(mix64(key ^ 0x5851f42d4c957f2dULL) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- construction ---- */

moe_layer *moe_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      int ep, int ep_rank) {
    moe_layer *m = xcalloc(1, sizeof *m);
    m->layer = layer;
    m->C = cfg->n_embd;
    m->E = cfg->experts;
    m->k = cfg->top_k;
    m->He = cfg->expert_hidden;
    m->ep = ep;
    m->E_local = m->E / ep;
    m->e0 = ep_rank * m->E_local;
    m->gate = cfg->gate;
    m->moge = cfg->ffn_kind == FFN_MOGE;
    m->w_imp = cfg->w_importance;
    m->w_load = cfg->w_load;
    m->aux_alpha = cfg->aux_alpha;
    m->z_loss = cfg->z_loss;
    m->jitter = cfg->jitter;
    m->cf = cfg->capacity_factor;
    m->guard_steps = cfg->collapse_guard_steps;
    m->margin = cfg->collapse_margin;
    m->moge_lambda = cfg->moge_lambda;
    m->s_max = cfg->moge_sigma_max;
    m->s_min = cfg->moge_sigma_min;
    m->s_gamma = cfg->moge_gamma;
    moe_grid(m->E, &m->grid_r, &m->grid_c);
    m->win = m->grid_r == 2 ? 2 : 3;
    m->max_tokens = max_tokens;
    m->max_rows = (int64_t)ep * max_tokens * m->k;

    /* Router: Switch init (truncated normal, std sqrt(0.1/fan_in)) approximated by a
     * normal; the noisy gate's Wg and Wn start at zero as in Shazeer et al. */
    char name[64];
    int64_t s_router[2] = {m->E, m->C};
    float switch_std = sqrtf(0.1f / (float)m->C);
    snprintf(name, sizeof name, "h.%d.moe.router.w", layer);
    m->wg = tensor_add(tab, name, 2, s_router, 0, m->gate == GATE_SWITCH ? INIT_NORMAL : INIT_ZERO,
                       switch_std);
    if (m->gate == GATE_NOISY) {
        snprintf(name, sizeof name, "h.%d.moe.noise.w", layer);
        m->wn = tensor_add(tab, name, 2, s_router, 0, INIT_ZERO, 0);
    }

    int64_t n = max_tokens, E = m->E, C = m->C, k = m->k, R = m->max_rows;
    m->jit = xcalloc((size_t)(n * C), sizeof(float));
    m->jittered = xcalloc((size_t)(n * C), sizeof(float));
    m->logits = xcalloc((size_t)(n * E), sizeof(float));
    m->nlog = xcalloc((size_t)(n * E), sizeof(float));
    m->eps = xcalloc((size_t)(n * E), sizeof(float));
    m->score = xcalloc((size_t)(n * E), sizeof(float));
    m->probs = xcalloc((size_t)(n * E), sizeof(float));
    m->lse = xcalloc((size_t)n, sizeof(float));
    m->gates = xcalloc((size_t)(n * k), sizeof(float));
    m->choice = xcalloc((size_t)(n * k), sizeof(int32_t));
    m->slot = xcalloc((size_t)(n * k), sizeof(int32_t));
    m->kth = xcalloc((size_t)(n * 2), sizeof(int32_t));
    m->blocked = xcalloc((size_t)E, 1);
    m->send = xcalloc((size_t)(n * k * (C + 1)), sizeof(float));
    m->yrows = xcalloc((size_t)(n * k * C), sizeof(float));
    m->dx_rows = xcalloc((size_t)(n * k * C), sizeof(float));
    m->e_count = xcalloc((size_t)E, sizeof(int64_t));
    m->dest_rows = xcalloc((size_t)ep, sizeof(int));
    m->recv = xcalloc((size_t)(R * (C + 1)), sizeof(float));
    m->perm = xcalloc((size_t)R, sizeof(int32_t));
    m->l_start = xcalloc((size_t)m->E_local + 1, sizeof(int64_t));
    m->X = xcalloc((size_t)(R * C), sizeof(float));
    m->Y = xcalloc((size_t)(R * C), sizeof(float));
    m->back = xcalloc((size_t)(R * C), sizeof(float));
    m->Hpre = xcalloc((size_t)(R * m->He), sizeof(float));
    m->A = xcalloc((size_t)(R * m->He), sizeof(float));
    m->dlog = xcalloc((size_t)(n * E), sizeof(float));
    m->dnlog = xcalloc((size_t)(n * E), sizeof(float));
    m->dur = xcalloc((size_t)(n * C), sizeof(float));
    m->dgate = xcalloc((size_t)(n * k), sizeof(float));
    m->dA = xcalloc((size_t)(R * m->He), sizeof(float));
    m->gsum = xcalloc((size_t)N_SUMS(m), sizeof(double));
    m->guard_tot = xcalloc((size_t)E, sizeof(double));
    m->stats.tokens = xcalloc((size_t)E, sizeof(int64_t));
    return m;
}

void moe_register_experts(moe_layer *m, tensor_table *tab) {
    char name[64];
    int64_t El = m->E_local, E = m->E, C = m->C, He = m->He;
    int64_t s_w1[3] = {El, He, C}, s_b1[2] = {El, He}, s_w2[3] = {El, C, He}, s_b2[2] = {El, C};
    float std = m->gate == GATE_SWITCH ? sqrtf(0.1f / (float)C) : 0.02f;
    float std2 = m->gate == GATE_SWITCH ? sqrtf(0.1f / (float)He) : 0.02f;
    snprintf(name, sizeof name, "h.%d.moe.experts.fc.w", m->layer);
    m->w1 = tensor_add_sharded(tab, name, 3, s_w1, 1, INIT_NORMAL, std, E, m->e0);
    snprintf(name, sizeof name, "h.%d.moe.experts.fc.b", m->layer);
    m->b1 = tensor_add_sharded(tab, name, 2, s_b1, 0, INIT_ZERO, 0, E, m->e0);
    snprintf(name, sizeof name, "h.%d.moe.experts.proj.w", m->layer);
    m->w2 = tensor_add_sharded(tab, name, 3, s_w2, 1, INIT_NORMAL, std2, E, m->e0);
    snprintf(name, sizeof name, "h.%d.moe.experts.proj.b", m->layer);
    m->b2 = tensor_add_sharded(tab, name, 2, s_b2, 0, INIT_ZERO, 0, E, m->e0);
}

void moe_free(moe_layer *m) {
    if (!m) return;
    float *bufs[] = {m->jit, m->jittered, m->logits, m->nlog, m->eps, m->score, m->probs,
                     m->lse, m->gates, m->send, m->yrows, m->dx_rows, m->recv, m->X, m->Y,
                     m->back, m->Hpre, m->A, m->dlog, m->dnlog, m->dur, m->dgate, m->dA};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(m->choice);
    free(m->slot);
    free(m->kth);
    free(m->blocked);
    free(m->e_count);
    free(m->dest_rows);
    free(m->perm);
    free(m->l_start);
    free(m->gsum);
    free(m->guard_tot);
    free(m->stats.tokens);
    if (m->have_plan) dispatch_free(&m->plan);
    free(m);
}

const moe_stats *moe_get_stats(const moe_layer *m) { return &m->stats; }
double *moe_guard_totals(moe_layer *m) { return m->guard_tot; }
int moe_num_experts(const moe_layer *m) { return m->E; }

double moe_matmul_params_per_token(const moe_layer *m) {
    return (double)m->k * 2.0 * m->C * m->He;
}

/* ---- gating ---- */

static float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Experts the collapse guard blocks this step: the most over-assigned, at most E - k. */
static void guard_block(moe_layer *m, const ffn_context *ctx) {
    memset(m->blocked, 0, (size_t)m->E);
    if (!ctx->training || ctx->step >= m->guard_steps) return;
    double total = 0.0;
    for (int e = 0; e < m->E; e++) total += m->guard_tot[e];
    if (total <= 0.0) return;
    double mean = total / m->E, limit = m->margin * total;
    for (int b = 0; b < m->E - m->k; b++) {
        int worst = -1;
        for (int e = 0; e < m->E; e++)
            if (!m->blocked[e] && m->guard_tot[e] - mean > limit &&
                (worst < 0 || m->guard_tot[e] > m->guard_tot[worst]))
                worst = e;
        if (worst < 0) break;
        m->blocked[worst] = 1;
    }
}

/* Route token t: logits -> scores -> top-k -> gates. */
static void route_token(moe_layer *m, int64_t t, const ffn_context *ctx) {
    const int E = m->E, k = m->k;
    float *lg = m->logits + t * E, *sc = m->score + t * E, *pr = m->probs + t * E;
    for (int e = 0; e < E; e++)
        if (m->blocked[e]) lg[e] = -INFINITY;
    float max = -INFINITY;
    for (int e = 0; e < E; e++) max = lg[e] > max ? lg[e] : max;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += (pr[e] = expf(lg[e] - max));
    for (int e = 0; e < E; e++) pr[e] /= sum;
    m->lse[t] = max + logf(sum);
    if (m->gate == GATE_NOISY && ctx->training) {
        uint64_t key = token_key(ctx, m->layer, 1, ctx->token_offset + t);
        for (int e = 0; e < E; e++) {
            float eps = key_normal(key + (uint64_t)e * 0x9e3779b97f4a7c15ULL);
            m->eps[t * E + e] = eps;
            sc[e] = lg[e] + eps * softplus(m->nlog[t * E + e]);
        }
    } else {
        memcpy(sc, lg, sizeof(float) * E);
    }
    /* top-(k+1) by repeated selection (E is small); ties go to the lower index */
    int32_t order[k + 1];
    int taken = 0;
    for (int j = 0; j < k + 1 && j < E; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int used = 0;
            for (int q = 0; q < taken; q++) used |= order[q] == e;
            if (!used && (best < 0 || sc[e] > sc[best])) best = e;
        }
        order[taken++] = best;
    }
    for (int j = 0; j < k; j++) m->choice[t * k + j] = order[j];
    m->kth[t * 2] = order[k - 1];
    m->kth[t * 2 + 1] = k < E ? order[k] : -1;
    float *g = m->gates + t * k;
    if (m->gate == GATE_NOISY) { /* softmax over the kept scores */
        float gmax = sc[order[0]], gs = 0.0f;
        for (int j = 0; j < k; j++) gs += (g[j] = expf(sc[order[j]] - gmax));
        for (int j = 0; j < k; j++) g[j] /= gs;
    } else { /* Switch: the raw probabilities */
        for (int j = 0; j < k; j++) g[j] = pr[order[j]];
    }
}

/* The Gaussian window of the MoGE penalty for the current sigma. */
static void moge_window(moe_layer *m, const ffn_context *ctx) {
    double frac = ctx->total_steps > 0 ? (double)ctx->step / ctx->total_steps : 0.0;
    if (frac > 1.0) frac = 1.0;
    m->sigma = m->s_max - (m->s_max - m->s_min) * pow(frac, m->s_gamma);
    double c0 = (m->win - 1) / 2.0, sum = 0.0;
    for (int a = 0; a < m->win; a++)
        for (int b = 0; b < m->win; b++)
            sum += m->window[a * m->win + b] =
                (float)exp(-((a - c0) * (a - c0) + (b - c0) * (b - c0)) / (2 * m->sigma * m->sigma));
    for (int i = 0; i < m->win * m->win; i++) m->window[i] = (float)(m->window[i] / sum);
}

/* Omega(p) = mean over window positions q of sqrt(S_q + 1e-8); adds scale * dOmega/dp to dp. */
static double moge_omega(const moe_layer *m, const float *p, float *dp, double scale) {
    int R = m->grid_r, Cc = m->grid_c, h = m->win;
    int nq = (R - h + 1) * (Cc - h + 1);
    double omega = 0.0;
    for (int qa = 0; qa + h <= R; qa++)
        for (int qb = 0; qb + h <= Cc; qb++) {
            double S = 0.0;
            for (int a = 0; a < h; a++)
                for (int b = 0; b < h; b++) {
                    float v = p[(qa + a) * Cc + qb + b];
                    S += m->window[a * h + b] * v * v;
                }
            double root = sqrt(S + 1e-8);
            omega += root / nq;
            if (!dp) continue;
            double d = scale / (nq * 2.0 * root);
            for (int a = 0; a < h; a++)
                for (int b = 0; b < h; b++) {
                    int j = (qa + a) * Cc + qb + b;
                    dp[j] += (float)(d * m->window[a * h + b] * 2.0 * p[j]);
                }
        }
    return omega;
}

/* Standard normal CDF and density. */
static double norm_cdf(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }
static double norm_pdf(double z) { return exp(-0.5 * z * z) / 2.5066282746310002; }

/* P(x, e) of the load loss: the chance that e stays in the top k under fresh noise. */
static double load_prob(const moe_layer *m, int64_t t, int e, int in_topk, double *zs, double *s,
                        int *thr) {
    const int E = m->E;
    *thr = m->kth[t * 2 + (in_topk ? 1 : 0)];
    if (m->blocked[e] || *thr < 0 || isinf(m->score[t * E + *thr])) return -1.0; /* constant */
    *s = softplus(m->nlog[t * E + e]);
    *zs = (m->logits[t * E + e] - m->score[t * E + *thr]) / *s;
    return norm_cdf(*zs);
}

static double cv2(const double *v, int E, double *grad) {
    double mean = 0.0, var = 0.0;
    for (int e = 0; e < E; e++) mean += v[e];
    mean /= E;
    for (int e = 0; e < E; e++) var += (v[e] - mean) * (v[e] - mean);
    var /= E;
    if (mean <= 0.0) {
        if (grad) memset(grad, 0, sizeof(double) * E);
        return 0.0;
    }
    if (grad)
        for (int e = 0; e < E; e++)
            grad[e] = 2.0 / (E * mean * mean) * ((v[e] - mean) - var / mean);
    return var / (mean * mean);
}

/* Local sums of this step's statistics, reduced over all ranks into m->gsum. */
static double reduce_aux(moe_layer *m, int64_t n, const ffn_context *ctx) {
    const int E = m->E, k = m->k;
    memset(m->gsum, 0, sizeof(double) * N_SUMS(m));
    for (int64_t t = 0; t < n; t++) {
        for (int j = 0; j < k; j++) {
            int e = m->choice[t * k + j];
            SUM_AT(m, S_IMP)[e] += m->gates[t * k + j];
            if (m->slot[t * k + j] >= 0) SUM_AT(m, S_KEPT)[e] += 1;
            else SUM_DROPPED(m) += 1;
        }
        if (m->gate == GATE_NOISY && m->w_load > 0)
            for (int e = 0; e < E; e++) {
                int in_top = 0;
                for (int j = 0; j < k; j++) in_top |= m->choice[t * k + j] == e;
                double zs, s;
                int thr;
                double p = load_prob(m, t, e, in_top, &zs, &s, &thr);
                SUM_AT(m, S_LOAD)[e] += p < 0 ? (m->blocked[e] ? 0.0 : 1.0) : p;
            }
        SUM_AT(m, S_ARGMAX)[m->choice[t * k]] += 1;
        for (int e = 0; e < E; e++) SUM_AT(m, S_PROB)[e] += m->probs[t * E + e];
        SUM_LSE2(m) += (double)m->lse[t] * m->lse[t];
        if (m->moge) SUM_OMEGA(m) += moge_omega(m, m->probs + t * E, NULL, 0);
        /* statistics only (docs/stats.md): entropy of the k gates normalised to sum 1,
         * entropy of the clean router softmax, the first choice's gate */
        double gs = 0.0, h = 0.0, hr = 0.0;
        for (int j = 0; j < k; j++) gs += m->gates[t * k + j];
        for (int j = 0; j < k; j++) {
            double q = gs > 0.0 ? m->gates[t * k + j] / gs : 0.0;
            if (q > 0.0) h -= q * log(q);
        }
        for (int e = 0; e < E; e++) { /* -sum p log p = lse - sum p logit: no log per expert */
            double p = m->probs[t * E + e];
            if (p > 0.0) hr -= p * m->logits[t * E + e];
        }
        hr += m->lse[t];
        SUM_GATE_ENT(m) += h;
        SUM_ROUTER_ENT(m) += hr;
        SUM_TOP_GATE(m) += m->gates[t * k];
    }
    SUM_TOKENS(m) = (double)n;
    dist_allreduce_sum_d(m->gsum, N_SUMS(m), ctx->world);

    double N = SUM_TOKENS(m), aux = 0.0;
    moe_stats *st = &m->stats;
    memset(&st->aux_importance, 0, 5 * sizeof(double));
    if (m->gate == GATE_NOISY) {
        st->aux_importance = m->w_imp * cv2(SUM_AT(m, S_IMP), E, NULL);
        st->aux_load = m->w_load > 0 ? m->w_load * cv2(SUM_AT(m, S_LOAD), E, NULL) : 0.0;
    } else {
        double s = 0.0;
        for (int e = 0; e < E; e++) s += SUM_AT(m, S_ARGMAX)[e] / N * SUM_AT(m, S_PROB)[e] / N;
        st->aux_switch = m->aux_alpha * E * s;
    }
    st->aux_z = m->z_loss * SUM_LSE2(m) / N;
    st->aux_moge = m->moge ? m->moge_lambda * SUM_OMEGA(m) / N : 0.0;
    aux = st->aux_importance + st->aux_load + st->aux_switch + st->aux_z + st->aux_moge;

    double kept = 0.0, max = 0.0;
    for (int e = 0; e < E; e++) {
        st->tokens[e] = (int64_t)SUM_AT(m, S_KEPT)[e];
        kept += SUM_AT(m, S_KEPT)[e];
        if (SUM_AT(m, S_KEPT)[e] > max) max = SUM_AT(m, S_KEPT)[e];
    }
    st->n_tokens = (int64_t)N;
    st->assignments = (int64_t)N * k;
    st->dropped = (int64_t)SUM_DROPPED(m);
    st->max_over_mean = kept > 0 ? max / (kept / E) : 0.0;
    st->gate_entropy = N > 0 ? SUM_GATE_ENT(m) / N : 0.0;
    st->router_entropy = N > 0 ? SUM_ROUTER_ENT(m) / N : 0.0;
    st->top_gate = N > 0 ? SUM_TOP_GATE(m) / N : 0.0;
    return aux;
}

/* ---- forward ---- */

double moe_forward(moe_layer *m, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx) {
    ALWAYS(n <= m->max_tokens);
    const int E = m->E, k = m->k, C = m->C, W = C + 1;
    m->n = n;
    if (!m->have_plan) {
        dispatch_init(&m->plan, ctx->ep_comm);
        m->have_plan = 1;
    }

    moe_stats *st = &m->stats;
    double t0 = wall_time();
    /* 1. router input: Switch's multiplicative jitter, in training only */
    m->ur = in;
    if (m->gate == GATE_SWITCH && ctx->training && m->jitter > 0) {
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++) {
            uint64_t key = token_key(ctx, m->layer, 2, ctx->token_offset + t);
            for (int c = 0; c < C; c++) {
                float f = 1.0f + m->jitter * (2.0f * key_uniform(key + (uint64_t)c * 0x9e3779b97f4a7c15ULL) - 1.0f);
                m->jit[t * C + c] = f;
                m->jittered[t * C + c] = in[t * C + c] * f;
            }
        }
        m->ur = m->jittered;
    }
    /* 2. logits (fp32) and routing */
    gemm(0, 1, n, E, C, m->ur, C, params + m->wg, C, m->logits, E, 0, NULL);
    if (m->gate == GATE_NOISY) gemm(0, 1, n, E, C, in, C, params + m->wn, C, m->nlog, E, 0, NULL);
    guard_block(m, ctx);
    if (m->moge) moge_window(m, ctx);
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++) route_token(m, t, ctx);

    /* 3. capacity, filled in token order; rows ordered by expert */
    int64_t cap = m->cf > 0 ? (int64_t)ceil(m->cf * (double)n * k / E) : INT64_MAX;
    memset(m->e_count, 0, sizeof(int64_t) * E);
    for (int64_t i = 0; i < n * k; i++) {
        int e = m->choice[i];
        m->slot[i] = m->e_count[e] < cap ? (int32_t)m->e_count[e]++ : -1;
    }
    int64_t start[E + 1];
    start[0] = 0;
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + m->e_count[e];
    for (int64_t i = 0; i < n * k; i++)
        if (m->slot[i] >= 0) m->slot[i] += (int32_t)start[m->choice[i]];
    int64_t n_send = start[E];
    double t1 = wall_time();
    st->t_route += t1 - t0;
#pragma omp parallel for
    for (int64_t i = 0; i < n * k; i++) {
        if (m->slot[i] < 0) continue;
        float *row = m->send + (int64_t)m->slot[i] * W;
        memcpy(row, in + (i / k) * C, sizeof(float) * C);
        int32_t local = m->choice[i] % m->E_local;
        memcpy(row + C, &local, sizeof local);
    }
    for (int r = 0; r < m->ep; r++) {
        int64_t rows = start[(r + 1) * m->E_local] - start[r * m->E_local];
        m->dest_rows[r] = (int)rows;
    }

    /* 4. rows to the expert ranks */
    double t2 = wall_time();
    dispatch_exchange_counts(&m->plan, m->dest_rows);
    ALWAYS(m->plan.n_send == n_send);
    if (m->plan.n_recv > m->max_rows)
        INFMOE_FAIL("%lld rows for this rank's experts, more than the %lld planned",
                    (long long)m->plan.n_recv, (long long)m->max_rows);
    m->n_recv = m->plan.n_recv;
    dispatch_forward(&m->plan, m->send, m->recv, W);
    double t3 = wall_time();
    st->t_alltoall += t3 - t2;

    /* 5. group received rows by local expert, one GEMM pair per expert */
    const int El = m->E_local, He = m->He;
    memset(m->l_start, 0, sizeof(int64_t) * (El + 1));
    for (int64_t i = 0; i < m->n_recv; i++) {
        int32_t le;
        memcpy(&le, m->recv + i * W + C, sizeof le);
        ALWAYS(le >= 0 && le < El);
        m->l_start[le + 1]++;
    }
    for (int e = 0; e < El; e++) m->l_start[e + 1] += m->l_start[e];
    int64_t fill[El];
    for (int e = 0; e < El; e++) fill[e] = m->l_start[e];
    for (int64_t i = 0; i < m->n_recv; i++) {
        int32_t le;
        memcpy(&le, m->recv + i * W + C, sizeof le);
        m->perm[i] = (int32_t)fill[le]++;
        memcpy(m->X + (int64_t)m->perm[i] * C, m->recv + i * W, sizeof(float) * C);
    }
    double t4 = wall_time();
    for (int e = 0; e < El; e++) {
        int64_t r0 = m->l_start[e], rows = m->l_start[e + 1] - r0;
        gemm_var(0, 1, rows, He, C, m->X + r0 * C, C, params + m->w1 + (size_t)e * He * C, C,
                 m->Hpre + r0 * He, He, 0, params + m->b1 + (size_t)e * He);
    }
    gelu_forward(m->A, m->Hpre, m->n_recv * He);
    for (int e = 0; e < El; e++) {
        int64_t r0 = m->l_start[e], rows = m->l_start[e + 1] - r0;
        gemm_var(0, 1, rows, C, He, m->A + r0 * He, He, params + m->w2 + (size_t)e * C * He, He,
                 m->Y + r0 * C, C, 0, params + m->b2 + (size_t)e * C);
    }
    double t5 = wall_time();
    st->t_expert += t5 - t4;
#pragma omp parallel for
    for (int64_t i = 0; i < m->n_recv; i++)
        memcpy(m->back + i * C, m->Y + (int64_t)m->perm[i] * C, sizeof(float) * C);

    /* 6. outputs back to the token owners, combined with their gates */
    double t6 = wall_time();
    dispatch_reverse(&m->plan, m->back, m->yrows, C);
    double t7 = wall_time();
    st->t_alltoall += t7 - t6;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int32_t s = m->slot[t * k + j];
            if (s < 0) continue; /* dropped: the token rides the residual */
            float g = m->gates[t * k + j];
            const float *y = m->yrows + (int64_t)s * C;
            float *o = out + t * C;
            for (int c = 0; c < C; c++) o[c] += g * y[c];
        }
    double t8 = wall_time();
    st->t_dispatch += (t2 - t1) + (t4 - t3) + (t6 - t5) + (t8 - t7);
    double aux = ctx->training ? reduce_aux(m, n, ctx) : 0.0;
    st->t_route += wall_time() - t8;
    return aux;
}

/* ---- backward ---- */

/* d(aux)/d(logits) and d/d(noise logits) of token t, plus the gates' share (dgate per choice). */
static void gate_backward(moe_layer *m, int64_t t, const float *dgate, const ffn_context *ctx,
                          const double *c_imp, const double *c_load, double scale_n) {
    const int E = m->E, k = m->k;
    const float *pr = m->probs + t * E;
    float *dl = m->dlog + t * E, *dn = m->dnlog + t * E;
    float dp[E], ds[E];
    memset(dl, 0, sizeof(float) * E);
    memset(dn, 0, sizeof(float) * E);
    memset(dp, 0, sizeof dp);
    memset(ds, 0, sizeof ds);
    const int train = ctx->training;
    if (m->gate == GATE_NOISY) {
        float dG[k], dot = 0.0f;
        const float *g = m->gates + t * k;
        for (int j = 0; j < k; j++) {
            dG[j] = dgate[j] + (train ? (float)c_imp[m->choice[t * k + j]] : 0.0f);
            dot += g[j] * dG[j];
        }
        float dscore[E];
        memset(dscore, 0, sizeof dscore);
        for (int j = 0; j < k; j++) dscore[m->choice[t * k + j]] += g[j] * (dG[j] - dot);
        if (train && m->w_load > 0)
            for (int e = 0; e < E; e++) {
                int in_top = 0;
                for (int j = 0; j < k; j++) in_top |= m->choice[t * k + j] == e;
                double zs, s;
                int thr;
                if (load_prob(m, t, e, in_top, &zs, &s, &thr) < 0) continue;
                double c = c_load[e] * norm_pdf(zs);
                dl[e] += (float)(c / s);
                ds[e] += (float)(-c * zs / s); /* d/ds of (h0 - thr)/s = -zs/s */
                dscore[thr] += (float)(-c / s);
            }
        for (int e = 0; e < E; e++) {
            dl[e] += dscore[e];
            if (train) ds[e] += dscore[e] * m->eps[t * E + e];
        }
        for (int e = 0; e < E; e++) dn[e] = ds[e] * sigmoid(m->nlog[t * E + e]);
    } else {
        for (int j = 0; j < k; j++) dp[m->choice[t * k + j]] += dgate[j];
        if (train)
            for (int e = 0; e < E; e++)
                dp[e] += (float)(scale_n * m->aux_alpha * E * SUM_AT(m, S_ARGMAX)[e] / SUM_TOKENS(m));
    }
    if (train && m->moge) {
        float dq[E];
        memset(dq, 0, sizeof dq);
        moge_omega(m, pr, dq, scale_n * m->moge_lambda);
        for (int e = 0; e < E; e++) dp[e] += dq[e];
    }
    /* softmax backward of dp, and the z-loss through logsumexp (whose gradient is p) */
    float dot = 0.0f;
    for (int e = 0; e < E; e++) dot += pr[e] * dp[e];
    float dlse = train ? (float)(scale_n * m->z_loss * 2.0 * m->lse[t]) : 0.0f;
    for (int e = 0; e < E; e++) {
        dl[e] += pr[e] * (dp[e] - dot) + dlse * pr[e];
        if (m->blocked[e]) dl[e] = dn[e] = 0.0f;
    }
}

void moe_backward(moe_layer *m, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx) {
    ALWAYS(n == m->n);
    const int E = m->E, k = m->k, C = m->C, El = m->E_local, He = m->He;
    moe_stats *st = &m->stats;
    double t0 = wall_time();
    float *dgate = m->dgate;
    memset(dgate, 0, sizeof(float) * (size_t)(n * k));
    /* 1. per kept choice: the row gradient gate * dout, and d gate = dout . y */
#pragma omp parallel for
    for (int64_t i = 0; i < n * k; i++) {
        int32_t s = m->slot[i];
        if (s < 0) continue;
        const float *d = dout + (i / k) * C, *y = m->yrows + (int64_t)s * C;
        float *row = m->dx_rows + (int64_t)s * C, g = m->gates[i], dot = 0.0f;
        for (int c = 0; c < C; c++) {
            row[c] = g * d[c];
            dot += d[c] * y[c];
        }
        dgate[i] = dot;
    }
    /* 2. row gradients to the experts along the forward plan */
    double t1 = wall_time();
    dispatch_forward(&m->plan, m->dx_rows, m->back, C);
    double t2 = wall_time();
    st->t_alltoall += t2 - t1;
    float *dY = m->Y; /* the forward outputs are no longer needed */
#pragma omp parallel for
    for (int64_t i = 0; i < m->n_recv; i++)
        memcpy(dY + (int64_t)m->perm[i] * C, m->back + i * C, sizeof(float) * C);
    /* 3. expert backward, one GEMM group per local expert */
    float *dA = m->dA, *dH = m->A; /* GELU outputs are consumed by the weight gradient first */
    double t3 = wall_time();
    for (int e = 0; e < El; e++) {
        int64_t r0 = m->l_start[e], rows = m->l_start[e + 1] - r0;
        const float *W2 = params + m->w2 + (size_t)e * C * He;
        gemm_var(0, 0, rows, He, C, dY + r0 * C, C, W2, He, dA + r0 * He, He, 0, NULL);
        gemm_var(1, 0, C, He, rows, dY + r0 * C, C, m->A + r0 * He, He,
                 grads + m->w2 + (size_t)e * C * He, He, 1, NULL);
        float *db2 = grads + m->b2 + (size_t)e * C;
        for (int64_t r = r0; r < r0 + rows; r++)
            for (int c = 0; c < C; c++) db2[c] += dY[r * C + c];
    }
    memset(dH, 0, sizeof(float) * (size_t)(m->n_recv * He));
    gelu_backward(dH, m->Hpre, dA, m->n_recv * He);
    float *dX = m->Y; /* dY has been used */
    for (int e = 0; e < El; e++) {
        int64_t r0 = m->l_start[e], rows = m->l_start[e + 1] - r0;
        const float *W1 = params + m->w1 + (size_t)e * He * C;
        gemm_var(1, 0, He, C, rows, dH + r0 * He, He, m->X + r0 * C, C,
                 grads + m->w1 + (size_t)e * He * C, C, 1, NULL);
        float *db1 = grads + m->b1 + (size_t)e * He;
        for (int64_t r = r0; r < r0 + rows; r++)
            for (int h = 0; h < He; h++) db1[h] += dH[r * He + h];
        gemm_var(0, 0, rows, C, He, dH + r0 * He, He, W1, C, dX + r0 * C, C, 0, NULL);
    }
    double t4 = wall_time();
    st->t_expert += t4 - t3;
#pragma omp parallel for
    for (int64_t i = 0; i < m->n_recv; i++)
        memcpy(m->back + i * C, dX + (int64_t)m->perm[i] * C, sizeof(float) * C);
    /* 4. input gradients back to the token owners */
    double t5 = wall_time();
    dispatch_reverse(&m->plan, m->back, m->dx_rows, C);
    double t6 = wall_time();
    st->t_alltoall += t6 - t5;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int32_t s = m->slot[t * k + j];
            if (s < 0) continue;
            const float *r = m->dx_rows + (int64_t)s * C;
            for (int c = 0; c < C; c++) din[t * C + c] += r[c];
        }
    double t7 = wall_time();
    st->t_dispatch += (t1 - t0) + (t3 - t2) + (t5 - t4) + (t7 - t6);
    /* 5. gates and aux losses into the router. Aux losses are over the global batch;
     * dense gradients are averaged over world_size ranks afterwards, so scale up. */
    double N = ctx->training ? SUM_TOKENS(m) : (double)n, scale_n = ctx->world_size / N;
    double c_imp[E], c_load[E];
    memset(c_imp, 0, sizeof c_imp);
    memset(c_load, 0, sizeof c_load);
    if (ctx->training && m->gate == GATE_NOISY) {
        cv2(SUM_AT(m, S_IMP), E, c_imp);
        for (int e = 0; e < E; e++) c_imp[e] *= ctx->world_size * m->w_imp;
        if (m->w_load > 0) {
            cv2(SUM_AT(m, S_LOAD), E, c_load);
            for (int e = 0; e < E; e++) c_load[e] *= ctx->world_size * m->w_load;
        }
    }
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++) gate_backward(m, t, dgate + t * k, ctx, c_imp, c_load, scale_n);
    /* router GEMMs: logits = ur . Wg^T (+ noise logits = in . Wn^T) */
    gemm(1, 0, E, C, n, m->dlog, E, m->ur, C, grads + m->wg, C, 1, NULL);
    if (m->ur == in) {
        gemm(0, 0, n, C, E, m->dlog, E, params + m->wg, C, din, C, 1, NULL);
    } else { /* through the jitter: d in = d ur * jitter */
        gemm(0, 0, n, C, E, m->dlog, E, params + m->wg, C, m->dur, C, 0, NULL);
#pragma omp parallel for
        for (int64_t i = 0; i < n * C; i++) din[i] += m->dur[i] * m->jit[i];
    }
    if (m->gate == GATE_NOISY) {
        gemm(1, 0, E, C, n, m->dnlog, E, in, C, grads + m->wn, C, 1, NULL);
        gemm(0, 0, n, C, E, m->dnlog, E, params + m->wn, C, din, C, 1, NULL);
    }
    st->t_route += wall_time() - t7;
}

void moe_end_step(moe_layer *m, const ffn_context *ctx) {
    if (ctx->step >= m->guard_steps) return;
    for (int e = 0; e < m->E; e++) m->guard_tot[e] += SUM_AT(m, S_KEPT)[e];
}

/* ---- reference and fingerprint (tests) ---- */

void moe_reference_forward(const moe_layer *m, const float *params, float *out, const float *in,
                           int64_t n) {
    ALWAYS(m->E_local == m->E && n == m->n);
    const int C = m->C, He = m->He, k = m->k;
    float *h = xcalloc((size_t)He, sizeof(float)), *y = xcalloc((size_t)C, sizeof(float));
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            if (m->slot[t * k + j] < 0) continue;
            int e = m->choice[t * k + j];
            gemm_naive(0, 1, 1, He, C, in + t * C, C, params + m->w1 + (size_t)e * He * C, C, h,
                       He, 0, params + m->b1 + (size_t)e * He);
            for (int i = 0; i < He; i++) {
                float x = h[i];
                h[i] = 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
            }
            gemm_naive(0, 1, 1, C, He, h, He, params + m->w2 + (size_t)e * C * He, He, y, C, 0,
                       params + m->b2 + (size_t)e * C);
            for (int c = 0; c < C; c++) out[t * C + c] += m->gates[t * k + j] * y[c];
        }
    free(h);
    free(y);
}

uint64_t moe_routing_hash(const moe_layer *m) {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t i = 0; i < m->n * m->k; i++) {
        h = (h ^ (uint64_t)(uint32_t)m->choice[i]) * 1099511628211ULL;
        h = (h ^ (uint64_t)(uint32_t)m->slot[i]) * 1099511628211ULL;
    }
    return h;
}

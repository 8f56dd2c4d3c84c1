/* moe: gating, aux losses, expert dispatch and grouped expert GEMMs (see moe.h, docs/moe.md). */
#include "infmoe/moe.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

/* Routing counters of the last training forward, reduced over all ranks. */
typedef struct {
    int64_t *tokens;      /* (E) kept assignments per expert */
    int64_t assignments;  /* tokens x k */
    int64_t dropped;      /* assignments over capacity */
    int64_t n_tokens;
    double aux_importance, aux_load, aux_switch, aux_z, aux_moge;
    double aux_group_importance, aux_group_load; /* hierarchical: the primary gate's */
    double max_over_mean; /* max_i tokens_i / mean_i tokens_i */
    /* means over the tokens, for the statistics file (docs/stats.md); no loss uses them */
    double gate_entropy;   /* entropy (nats) of a token's k gates normalised to sum 1 */
    double router_entropy; /* entropy (nats) of the token's clean router softmax over E */
    double top_gate;       /* the gate of the token's first choice (router confidence) */
    /* seconds spent since the layer was created, forward and backward together */
    double t_route;       /* router GEMMs, gating, capacity, aux losses and their gradients */
    double t_dispatch;    /* packing and unpacking rows, combining outputs */
    double t_alltoall;    /* the MPI exchanges (counts and rows, both ways) */
    double t_expert;      /* expert GEMMs and GELU */
} moe_stats;

struct moe_layer {
    int layer, C, E, k, He, E_local, e0, ep;
    int bf16; /* bf16 precision: rows, expert activations and their gradients in bf16, in
               * the fp32-sized buffers below (token rows and payloads: half the bytes) */
    gate_kind gate;
    int moge, guard_steps, force;
    float w_imp, w_load, aux_alpha, z_loss, jitter, cf, eval_cf, margin, bias_rate;
    float moge_lambda, s_max, s_min, s_gamma;
    int moge_official; /* the MoGE code's convention: sum over a rank's tokens / h^2 */
    double moge_weight; /* lambda, or for the official convention lambda n / h^2 this step */
    int grid_r, grid_c, win;
    /* hierarchical (ffn.groups): G groups of E/G experts, gk groups per token and kk
     * experts in each, so k = gk kk; G = 0 for flat routing */
    int G, gk, kk;
    size_t wg, wn, w1, b1, w2, b2; /* parameter offsets */
    size_t wgp, wnp;               /* hierarchical: the primary (group) router */
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
    int64_t *e_count;              /* (E) kept choices per global expert */
    int32_t *bucket, *send_item;   /* (n,k) expert of a kept choice, -1 dropped; (n*k) choice of a send row */
    /* receive side */
    int64_t n_recv;
    float *recv;                   /* (max_rows, C+1) */
    int32_t *recv_expert;          /* (max_rows) local expert of each received row */
    dispatch_groups by_expert;     /* received rows grouped by local expert */
    float *X, *Hpre, *A, *Y, *back;  /* expert-ordered rows; back: received order */
    dispatch_plan plan;
    /* backward scratch */
    float *dlog, *dnlog, *dur;     /* (n,E), (n,E), (n,C) */
    float *dgate, *dA;             /* (n,k), (max_rows, He) */
    /* hierarchical: the primary gate's clean and noise logits, noise draws, scores,
     * clean softmax (n,G); its gates, chosen groups (n,gk) and threshold groups (n,2);
     * the secondary gates (n,k) and per chosen group its threshold experts (n,gk,2)
     * (the secondary gates use logits .. score above, the experts' columns); the
     * primary logit gradients (n,G) */
    float *plog, *pnlog, *peps, *pscore, *pprobs, *pgates, *sgates, *dplog, *dpnlog;
    int32_t *pchoice, *pkth, *skth;
    /* global sums of the last training forward (see pack_sums) */
    double *gsum;
    double sigma;
    float window[9];
    double *guard_tot;
    double *bias; /* (E) aux-loss-free balancing: added to the selection scores only */
    moe_stats stats;
    void *mem; /* every buffer above, one allocation (mem_carve) */
};

/*
 * bf16 expert products: with at least as many local experts as threads, each
 * thread runs whole experts alone (an expert's GEMMs are too small to split well
 * over threads); otherwise experts run one after another on every thread.
 */
static int experts_in_parallel(const moe_layer *m) {
    int nt = omp_get_max_threads();
    return nt > 1 && m->E_local >= nt;
}

/* Layout of the per-expert sums reduced over all ranks each training step. */
enum { S_IMP, S_LOAD, S_ARGMAX, S_PROB, S_KEPT, S_CHOSEN, S_VECTORS };
#define SUM_AT(m, which) ((m)->gsum + (size_t)(which) * (m)->E)
/* hierarchical: the primary gate's importance and load per group, after the scalars
 * (with groups, S_IMP and S_LOAD are the secondary gates', per expert) */
#define SUM_GROUP_IMP(m) ((m)->gsum + S_VECTORS * (m)->E + 7)
#define SUM_GROUP_LOAD(m) ((m)->gsum + S_VECTORS * (m)->E + 7 + (m)->G)
#define SUM_DROPPED(m) ((m)->gsum[S_VECTORS * (m)->E + 0])
#define SUM_LSE2(m) ((m)->gsum[S_VECTORS * (m)->E + 1])
#define SUM_OMEGA(m) ((m)->gsum[S_VECTORS * (m)->E + 2])
#define SUM_TOKENS(m) ((m)->gsum[S_VECTORS * (m)->E + 3])
#define SUM_GATE_ENT(m) ((m)->gsum[S_VECTORS * (m)->E + 4])
#define SUM_ROUTER_ENT(m) ((m)->gsum[S_VECTORS * (m)->E + 5])
#define SUM_TOP_GATE(m) ((m)->gsum[S_VECTORS * (m)->E + 6])
#define N_SUMS(m) (S_VECTORS * (m)->E + 7 + 2 * (m)->G)

void moe_grid(int E, int *rows, int *cols) {
    int r = 1;
    for (int i = 1; i * i <= E; i++)
        if (E % i == 0) r = i;
    *rows = r;
    *cols = E / r;
}

/* ---- construction ---- */

moe_layer *moe_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      const ffn_context *ctx) {
    const int ep = ctx ? ctx->ep : 1, ep_rank = ctx ? ctx->ep_rank : 0;
    moe_layer *m = xcalloc(1, sizeof *m);
    m->layer = layer;
    m->C = cfg->n_embd;
    m->E = cfg->experts;
    m->G = cfg->groups;
    m->gk = m->G > 0 ? cfg->group_k : 1;
    m->kk = cfg->top_k;
    m->k = m->gk * m->kk;
    m->He = cfg->expert_hidden;
    m->ep = ep;
    m->bf16 = ctx && ctx->bf16;
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
    /* NaN: not resolved by config validation (a config built in code): as in training */
    m->eval_cf = isnan(cfg->eval_capacity_factor) ? cfg->capacity_factor : cfg->eval_capacity_factor;
    m->bias_rate = cfg->expert_bias_rate;
    m->force = cfg->force_balance;
    m->guard_steps = cfg->collapse_guard_steps;
    m->margin = cfg->collapse_margin;
    m->moge_lambda = cfg->moge_lambda;
    m->moge_official = cfg->moge_convention == 1;
    m->s_max = cfg->moge_sigma_max;
    m->s_min = cfg->moge_sigma_min;
    m->s_gamma = cfg->moge_gamma;
    moe_grid(m->E, &m->grid_r, &m->grid_c);
    m->win = m->grid_r == 2 ? 2 : 3;
    m->max_tokens = max_tokens;
    m->max_rows = (int64_t)ep * max_tokens * m->k;

    /* Router: Switch init (truncated normal, std sqrt(0.1/fan_in)) approximated by a
     * normal; the noisy gate's Wg and Wn start at zero as in Shazeer et al. */
    int64_t s_router[2] = {m->E, m->C};
    float switch_std = sqrtf(0.1f / (float)m->C);
    m->wg = tensor_add_layer(tab, "h.%d.moe.router.w", layer, 2, s_router, 0,
                             m->gate == GATE_SWITCH ? INIT_NORMAL : INIT_ZERO, switch_std);
    if (m->gate == GATE_NOISY)
        m->wn = tensor_add_layer(tab, "h.%d.moe.noise.w", layer, 2, s_router, 0, INIT_ZERO, 0);
    if (m->G > 0) { /* the primary gate over groups, noisy top-k, also from zero */
        int64_t s_group[2] = {m->G, m->C};
        m->wgp = tensor_add_layer(tab, "h.%d.moe.group_router.w", layer, 2, s_group, 0, INIT_ZERO, 0);
        m->wnp = tensor_add_layer(tab, "h.%d.moe.group_noise.w", layer, 2, s_group, 0, INIT_ZERO, 0);
    }

    int64_t n = max_tokens, E = m->E, C = m->C, k = m->k, R = m->max_rows, He = m->He;
    int64_t G = m->G, ng = G > 0 ? n : 0, gk = m->gk;
    const mem_part parts[] = {
        MEM_PART(m->jit, n * C),        MEM_PART(m->jittered, n * C),  MEM_PART(m->logits, n * E),
        MEM_PART(m->nlog, n * E),       MEM_PART(m->eps, n * E),       MEM_PART(m->score, n * E),
        MEM_PART(m->probs, n * E),      MEM_PART(m->lse, n),           MEM_PART(m->gates, n * k),
        MEM_PART(m->choice, n * k),     MEM_PART(m->slot, n * k),      MEM_PART(m->kth, n * 2),
        MEM_PART(m->blocked, E),        MEM_PART(m->send, n * k * (C + 1)),
        MEM_PART(m->yrows, n * k * C),  MEM_PART(m->dx_rows, n * k * C),
        MEM_PART(m->e_count, E),        MEM_PART(m->bucket, n * k),    MEM_PART(m->send_item, n * k),
        MEM_PART(m->recv, R * (C + 1)),
        MEM_PART(m->recv_expert, R),    MEM_PART(m->X, R * C),         MEM_PART(m->Y, R * C),
        MEM_PART(m->back, R * C),       MEM_PART(m->Hpre, R * He),     MEM_PART(m->A, R * He),
        MEM_PART(m->dlog, n * E),       MEM_PART(m->dnlog, n * E),     MEM_PART(m->dur, n * C),
        MEM_PART(m->dgate, n * k),      MEM_PART(m->dA, R * He),       MEM_PART(m->gsum, N_SUMS(m)),
        MEM_PART(m->guard_tot, E),      MEM_PART(m->stats.tokens, E),  MEM_PART(m->bias, E),
        MEM_PART(m->plog, ng * G),      MEM_PART(m->pnlog, ng * G),    MEM_PART(m->peps, ng * G),
        MEM_PART(m->pscore, ng * G),    MEM_PART(m->pprobs, ng * G),   MEM_PART(m->pgates, ng * gk),
        MEM_PART(m->sgates, ng * k),    MEM_PART(m->dplog, ng * G),    MEM_PART(m->dpnlog, ng * G),
        MEM_PART(m->pchoice, ng * gk),  MEM_PART(m->pkth, ng * 2),     MEM_PART(m->skth, ng * gk * 2),
    };
    m->mem = mem_carve(parts, sizeof parts / sizeof parts[0]);
    dispatch_groups_init(&m->by_expert, m->E_local, R);
    dispatch_init(&m->plan, ctx ? ctx->ep_comm : MPI_COMM_NULL, cfg->alltoall_node);
    dispatch_set_chunks(&m->plan, cfg->alltoall_chunks > 0 ? cfg->alltoall_chunks : 1);
    return m;
}

void moe_register_experts(moe_layer *m, tensor_table *tab) {
    int64_t El = m->E_local, E = m->E, C = m->C, He = m->He;
    int64_t s_w1[3] = {El, He, C}, s_b1[2] = {El, He}, s_w2[3] = {El, C, He}, s_b2[2] = {El, C};
    float std = m->gate == GATE_SWITCH ? sqrtf(0.1f / (float)C) : 0.02f;
    float std2 = m->gate == GATE_SWITCH ? sqrtf(0.1f / (float)He) : 0.02f;
    m->w1 = tensor_add_layer_sharded(tab, "h.%d.moe.experts.fc.w", m->layer, 3, s_w1, 1, INIT_NORMAL,
                                     std, E, m->e0);
    m->b1 = tensor_add_layer_sharded(tab, "h.%d.moe.experts.fc.b", m->layer, 2, s_b1, 0, INIT_ZERO, 0,
                                     E, m->e0);
    m->w2 = tensor_add_layer_sharded(tab, "h.%d.moe.experts.proj.w", m->layer, 3, s_w2, 1,
                                     INIT_NORMAL, std2, E, m->e0);
    m->b2 = tensor_add_layer_sharded(tab, "h.%d.moe.experts.proj.b", m->layer, 2, s_b2, 0, INIT_ZERO,
                                     0, E, m->e0);
}

void moe_free(moe_layer *m) {
    if (!m) return;
    dispatch_groups_free(&m->by_expert);
    dispatch_free(&m->plan);
    free(m->mem);
    free(m);
}

double *moe_guard_totals(moe_layer *m) { return m->guard_tot; }
double *moe_expert_bias(moe_layer *m) { return m->bias_rate > 0 ? m->bias : NULL; }
int moe_num_experts(const moe_layer *m) { return m->E; }

double moe_matmul_params_per_token(const moe_layer *m) {
    return (double)m->k * 2.0 * m->C * m->He;
}

/* ---- gating ---- */

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

/* order[0..min(k+1, M)): the k+1 largest of sel[0..M), largest first, by repeated
 * selection (M is small); ties go to the lower index. */
static void top_select(const float *sel, int M, int k, int32_t *order) {
    int taken = 0;
    for (int j = 0; j < k + 1 && j < M; j++) {
        int best = -1;
        for (int e = 0; e < M; e++) {
            int used = 0;
            for (int q = 0; q < taken; q++) used |= order[q] == e;
            if (!used && (best < 0 || sel[e] > sel[best])) best = e;
        }
        order[taken++] = best;
    }
}

/* g[0..k) = softmax of sc over the kept order[0..k) (the noisy gate's gates). */
static void kept_softmax(const float *sc, const int32_t *order, int k, float *g) {
    float gmax = sc[order[0]], gs = 0.0f;
    for (int j = 1; j < k; j++) gmax = sc[order[j]] > gmax ? sc[order[j]] : gmax;
    for (int j = 0; j < k; j++) gs += (g[j] = expf(sc[order[j]] - gmax));
    for (int j = 0; j < k; j++) g[j] /= gs;
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
        uint64_t key = rng_token_key(ctx->seed, m->layer, ctx->step, 1, ctx->token_offset + t);
        for (int e = 0; e < E; e++) {
            float eps = rng_key_normal(key + (uint64_t)e * RNG_KEY_STRIDE);
            m->eps[t * E + e] = eps;
            sc[e] = lg[e] + eps * softplusf(m->nlog[t * E + e]);
        }
    } else {
        memcpy(sc, lg, sizeof(float) * E);
    }
    int32_t order[k + 1];
    if (m->force) {
        /* forced balance: global token g takes experts gk, gk+1, ..., gk+k-1 (mod E), so
         * any whole number of rounds of E / gcd(E, k) tokens loads every expert alike;
         * the gates still come from the router, the load loss has no threshold */
        int64_t g = ctx->token_offset + t;
        for (int j = 0; j < k; j++) order[j] = (int32_t)((g * k + j) % E);
        m->kth[t * 2] = m->kth[t * 2 + 1] = -1;
    } else {
        /* top-(k+1) by repeated selection (E is small); ties go to the lower index. The
         * expert bias (aux-loss-free balancing) moves the choice, not the gates. */
        float sel[E];
        for (int e = 0; e < E; e++) sel[e] = m->bias_rate > 0 ? sc[e] + (float)m->bias[e] : sc[e];
        top_select(sel, E, k, order);
        m->kth[t * 2] = order[k - 1];
        m->kth[t * 2 + 1] = k < E ? order[k] : -1;
    }
    for (int j = 0; j < k; j++) m->choice[t * k + j] = order[j];
    float *g = m->gates + t * k;
    if (m->gate == GATE_NOISY) { /* softmax over the kept scores */
        kept_softmax(sc, order, k, g);
    } else { /* Switch: the raw probabilities */
        for (int j = 0; j < k; j++) g[j] = pr[order[j]];
    }
}

/* probs[0..M) = softmax(lg[0..M)); returns the logsumexp. */
static float softmax_lse(const float *lg, int M, float *probs) {
    float max = -INFINITY, sum = 0.0f;
    for (int e = 0; e < M; e++) max = lg[e] > max ? lg[e] : max;
    for (int e = 0; e < M; e++) sum += (probs[e] = expf(lg[e] - max));
    for (int e = 0; e < M; e++) probs[e] /= sum;
    return max + logf(sum);
}

/* sc[0..M) = lg + eps * softplus(nl), eps[i] drawn from key + i * stride (training);
 * sc = lg outside training. */
static void noisy_scores(const float *lg, const float *nl, float *eps, float *sc, int M, uint64_t key,
                         int training) {
    for (int e = 0; e < M; e++) {
        if (!training) {
            sc[e] = lg[e];
            continue;
        }
        eps[e] = rng_key_normal(key + (uint64_t)e * RNG_KEY_STRIDE);
        sc[e] = lg[e] + eps[e] * softplusf(nl[e]);
    }
}

/*
 * Route token t through the two levels (Shazeer et al. 2017, appendix B): the
 * primary noisy top-gk over G groups, then in each chosen group a noisy top-kk over
 * its E/G experts. Choice a*kk + j is the j-th expert of the a-th group, its gate
 * the product of the two levels' gates. probs (statistics only) is the clean
 * softmax over groups times the clean softmax within the group.
 */
static void route_token_hier(moe_layer *m, int64_t t, const ffn_context *ctx) {
    const int E = m->E, G = m->G, b = E / G, gk = m->gk, kk = m->kk, k = m->k;
    const int64_t tok = ctx->token_offset + t;
    float *pl = m->plog + t * G, *ps = m->pscore + t * G, *pp = m->pprobs + t * G;
    m->lse[t] = softmax_lse(pl, G, pp);
    noisy_scores(pl, m->pnlog + t * G, m->peps + t * G, ps, G,
                 rng_token_key(ctx->seed, m->layer, ctx->step, 3, tok), ctx->training);
    noisy_scores(m->logits + t * E, m->nlog + t * E, m->eps + t * E, m->score + t * E, E,
                 rng_token_key(ctx->seed, m->layer, ctx->step, 1, tok), ctx->training);
    int32_t porder[gk + 1], sorder[kk + 1];
    top_select(ps, G, gk, porder);
    m->pkth[t * 2] = porder[gk - 1];
    m->pkth[t * 2 + 1] = gk < G ? porder[gk] : -1;
    kept_softmax(ps, porder, gk, m->pgates + t * gk);
    float ws[b];
    for (int g = 0; g < G && ctx->training; g++) { /* for the statistics of training steps only */
        softmax_lse(m->logits + t * E + g * b, b, ws);
        for (int j = 0; j < b; j++) m->probs[t * E + g * b + j] = pp[g] * ws[j];
    }
    for (int a = 0; a < gk; a++) {
        const int g = porder[a], e0 = g * b;
        const float *sc = m->score + t * E + e0;
        m->pchoice[t * gk + a] = g;
        top_select(sc, b, kk, sorder);
        m->skth[(t * gk + a) * 2] = e0 + sorder[kk - 1];
        m->skth[(t * gk + a) * 2 + 1] = kk < b ? e0 + sorder[kk] : -1;
        float *sg = m->sgates + t * k + a * kk;
        kept_softmax(sc, sorder, kk, sg);
        for (int j = 0; j < kk; j++) {
            m->choice[t * k + a * kk + j] = e0 + sorder[j];
            m->gates[t * k + a * kk + j] = m->pgates[t * gk + a] * sg[j];
        }
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

/*
 * The noisy gate's P at one level: the chance that option i (an expert; with
 * groups, a group or an expert of a chosen group) stays in its level's top k
 * under fresh noise, given the threshold option thr (the k-th largest other
 * score; -1: every option is kept, P = 1). lg, nl, sc are that level's clean
 * logits, noise logits and scores.
 */
static double level_prob(const float *lg, const float *nl, const float *sc, int i, int thr,
                         double *zs, double *s) {
    if (thr < 0) return -1.0; /* constant */
    *s = softplusf(nl[i]);
    *zs = (lg[i] - sc[thr]) / *s;
    return norm_cdf(*zs);
}

/* Whether option i is among order[0..k). */
static int chosen_in(const int32_t *order, int k, int i) {
    int in = 0;
    for (int j = 0; j < k; j++) in |= order[j] == i;
    return in;
}

/* P(x, e) of the load loss: the chance that e stays in the top k under fresh noise. */
static double load_prob(const moe_layer *m, int64_t t, int e, int in_topk, double *zs, double *s,
                        int *thr) {
    const int E = m->E;
    *thr = m->kth[t * 2 + (in_topk ? 1 : 0)];
    if (m->blocked[e] || *thr < 0 || isinf(m->score[t * E + *thr])) return -1.0; /* constant */
    if (m->bias_rate == 0)
        return level_prob(m->logits + t * E, m->nlog + t * E, m->score + t * E, e, *thr, zs, s);
    /* with the expert bias, the threshold is compared in selection scores */
    *s = softplusf(m->nlog[t * E + e]);
    *zs = ((m->logits[t * E + e] + (float)m->bias[e]) - (m->score[t * E + *thr] + (float)m->bias[*thr])) / *s;
    return norm_cdf(*zs);
}

/* Entropy (nats) of a token's k gates normalised to sum 1 (statistics only). */
static double gate_entropy(const float *g, int k) {
    double gs = 0.0, h = 0.0;
    for (int j = 0; j < k; j++) gs += g[j];
    for (int j = 0; j < k; j++) {
        double q = gs > 0.0 ? g[j] / gs : 0.0;
        if (q > 0.0) h -= q * log(q);
    }
    return h;
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
/*
 * Hierarchical: this rank's sums of both levels' importance and load (S_IMP and
 * S_LOAD per expert from the secondary gates over the tokens that chose its group,
 * SUM_GROUP_* from the primary gate), and the statistics every layer keeps.
 */
static void sum_hier(moe_layer *m, int64_t n) {
    const int E = m->E, G = m->G, b = E / G, gk = m->gk, kk = m->kk, k = m->k;
    double zs, s;
    for (int64_t t = 0; t < n; t++) {
        const int32_t *pc = m->pchoice + t * gk;
        for (int a = 0; a < gk; a++) {
            SUM_GROUP_IMP(m)[pc[a]] += m->pgates[t * gk + a];
            for (int j = 0; j < kk; j++) {
                int i = a * kk + j, e = m->choice[t * k + i];
                SUM_AT(m, S_IMP)[e] += m->sgates[t * k + i];
                SUM_AT(m, S_CHOSEN)[e] += 1;
                if (m->slot[t * k + i] >= 0) SUM_AT(m, S_KEPT)[e] += 1;
                else SUM_DROPPED(m) += 1;
            }
        }
        if (m->w_load > 0) {
            const float *pl = m->plog + t * G, *pn = m->pnlog + t * G, *ps = m->pscore + t * G;
            for (int g = 0; g < G; g++) {
                double p = level_prob(pl, pn, ps, g, m->pkth[t * 2 + chosen_in(pc, gk, g)], &zs, &s);
                SUM_GROUP_LOAD(m)[g] += p < 0 ? 1.0 : p;
            }
            const float *lg = m->logits + t * E, *nl = m->nlog + t * E, *sc = m->score + t * E;
            for (int a = 0; a < gk; a++)
                for (int e = pc[a] * b; e < (pc[a] + 1) * b; e++) {
                    int in = chosen_in(m->choice + t * k + a * kk, kk, e);
                    double p = level_prob(lg, nl, sc, e, m->skth[(t * gk + a) * 2 + in], &zs, &s);
                    SUM_AT(m, S_LOAD)[e] += p < 0 ? 1.0 : p;
                }
        }
        SUM_AT(m, S_ARGMAX)[m->choice[t * k]] += 1;
        double h = gate_entropy(m->gates + t * k, k), hr = 0.0;
        for (int e = 0; e < E; e++) {
            double p = m->probs[t * E + e];
            SUM_AT(m, S_PROB)[e] += p;
            if (p > 0.0) hr -= p * log(p);
        }
        SUM_GATE_ENT(m) += h;
        SUM_ROUTER_ENT(m) += hr;
        SUM_TOP_GATE(m) += m->gates[t * k];
    }
}

/* Mean over the G groups of cv^2 of v's b = E/G entries of each (grad: per entry). */
static double cv2_groups(const double *v, int E, int G, double *grad) {
    const int b = E / G;
    double sum = 0.0;
    for (int g = 0; g < G; g++) sum += cv2(v + g * b, b, grad ? grad + g * b : NULL) / G;
    if (grad)
        for (int e = 0; e < E; e++) grad[e] /= G;
    return sum;
}

/* Flat routing: this rank's sums of importance, load and the statistics. */
static void sum_flat(moe_layer *m, int64_t n) {
    const int E = m->E, k = m->k;
    for (int64_t t = 0; t < n; t++) {
        for (int j = 0; j < k; j++) {
            int e = m->choice[t * k + j];
            SUM_AT(m, S_IMP)[e] += m->gates[t * k + j];
            SUM_AT(m, S_CHOSEN)[e] += 1;
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
        double h = gate_entropy(m->gates + t * k, k), hr = 0.0;
        for (int e = 0; e < E; e++) { /* -sum p log p = lse - sum p logit: no log per expert */
            double p = m->probs[t * E + e];
            if (p > 0.0) hr -= p * m->logits[t * E + e];
        }
        hr += m->lse[t];
        SUM_GATE_ENT(m) += h;
        SUM_ROUTER_ENT(m) += hr;
        SUM_TOP_GATE(m) += m->gates[t * k];
    }
}

static double reduce_aux(moe_layer *m, int64_t n, const ffn_context *ctx) {
    const int E = m->E, k = m->k;
    memset(m->gsum, 0, sizeof(double) * N_SUMS(m));
    if (m->G > 0) sum_hier(m, n);
    else sum_flat(m, n);
    SUM_TOKENS(m) = (double)n;
    dist_allreduce_sum_d(m->gsum, N_SUMS(m), ctx->world);

    double N = SUM_TOKENS(m), aux = 0.0;
    moe_stats *st = &m->stats;
    memset(&st->aux_importance, 0, 7 * sizeof(double));
    if (m->G > 0) { /* each level's losses at that level (the secondary's: mean over groups) */
        st->aux_importance = m->w_imp * cv2_groups(SUM_AT(m, S_IMP), E, m->G, NULL);
        st->aux_load = m->w_load > 0 ? m->w_load * cv2_groups(SUM_AT(m, S_LOAD), E, m->G, NULL) : 0.0;
        st->aux_group_importance = m->w_imp * cv2(SUM_GROUP_IMP(m), m->G, NULL);
        st->aux_group_load = m->w_load > 0 ? m->w_load * cv2(SUM_GROUP_LOAD(m), m->G, NULL) : 0.0;
    } else if (m->gate == GATE_NOISY) {
        st->aux_importance = m->w_imp * cv2(SUM_AT(m, S_IMP), E, NULL);
        st->aux_load = m->w_load > 0 ? m->w_load * cv2(SUM_AT(m, S_LOAD), E, NULL) : 0.0;
    } else {
        double s = 0.0;
        for (int e = 0; e < E; e++) s += SUM_AT(m, S_ARGMAX)[e] / N * SUM_AT(m, S_PROB)[e] / N;
        st->aux_switch = m->aux_alpha * E * s;
    }
    st->aux_z = m->z_loss * SUM_LSE2(m) / N;
    st->aux_moge = m->moge ? m->moge_weight * SUM_OMEGA(m) / N : 0.0;
    aux = st->aux_importance + st->aux_load + st->aux_switch + st->aux_z + st->aux_moge +
          st->aux_group_importance + st->aux_group_load;

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

/* Wait for chunk g's rows; its local experts [e0, e1) and positions [q0, q1). */
static void chunk_in(moe_layer *m, int g, int *e0, int *e1, int64_t *q0, int64_t *q1) {
    dispatch_wait_out(&m->plan, g);
    dispatch_chunk_buckets(&m->plan, g, e0, e1);
    *q0 = m->plan.rstart[g];
    *q1 = m->plan.rstart[g + 1];
}

/* Chunk g's results (Y at positions [q0, q1)) to received order in back, and posted
 * back to the token owners' rows; adds the seconds of each part to *t_disp, *t_a2a. */
static void chunk_out(moe_layer *m, int g, int64_t q0, int64_t q1, void *rows, double *t_disp,
                      double *t_a2a) {
    const size_t es = m->bf16 ? sizeof(bf16) : sizeof(float);
    double t0 = wall_time();
    dispatch_scatter(m->back, m->C, (char *)m->Y + (size_t)(q0 * m->C) * es, m->by_expert.row + q0,
                     q1 - q0, m->C, es);
    double t1 = wall_time();
    dispatch_reverse_chunk(&m->plan, g, m->back, rows, m->C, es);
    *t_disp += t1 - t0;
    *t_a2a += wall_time() - t1;
}

/* The expert-ordered positions [q0, q1) of local experts [e0, e1): up GEMM, GELU,
 * down GEMM per expert (X -> Y), MPI moved between experts (dispatch_progress). */
static void expert_forward(moe_layer *m, const float *params, const bf16 *wbf, int e0, int e1,
                           int64_t q0, int64_t q1) {
    const int C = m->C, He = m->He;
    const int64_t *l_start = m->by_expert.start;
    if (m->bf16) {
        const bf16 *X = (const bf16 *)m->X;
        bf16 *A = (bf16 *)m->A, *Y = (bf16 *)m->Y;
#pragma omp parallel for schedule(dynamic) if (experts_in_parallel(m))
        for (int e = e0; e < e1; e++) {
            int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
            gemm_var_bf16(0, 1, rows, He, C, X + r0 * C, C, wbf + m->w1 + (size_t)e * He * C, C,
                          m->Hpre + r0 * He, He, 0, 0, params + m->b1 + (size_t)e * He);
            gelu_forward_bf16(A + r0 * He, m->Hpre + r0 * He, rows * He);
            gemm_var_bf16(0, 1, rows, C, He, A + r0 * He, He, wbf + m->w2 + (size_t)e * C * He,
                          He, Y + r0 * C, C, 1, 0, params + m->b2 + (size_t)e * C);
            if (omp_get_thread_num() == 0) dispatch_progress(&m->plan);
        }
        return;
    }
    for (int e = e0; e < e1; e++) {
        int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
        gemm_var(0, 1, rows, He, C, m->X + r0 * C, C, params + m->w1 + (size_t)e * He * C, C,
                 m->Hpre + r0 * He, He, 0, params + m->b1 + (size_t)e * He);
        dispatch_progress(&m->plan);
    }
    gelu_forward(m->A + q0 * He, m->Hpre + q0 * He, (q1 - q0) * He);
    for (int e = e0; e < e1; e++) {
        int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
        gemm_var(0, 1, rows, C, He, m->A + r0 * He, He, params + m->w2 + (size_t)e * C * He, He,
                 m->Y + r0 * C, C, 0, params + m->b2 + (size_t)e * C);
        dispatch_progress(&m->plan);
    }
}

double moe_forward(moe_layer *m, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx) {
    ALWAYS(n <= m->max_tokens);
    const int E = m->E, k = m->k, C = m->C;
    /* a send row: the token's vector, then the expert's local index (an int32: one
     * fp32 slot, or two bf16 ones) */
    const int bf = m->bf16, W = bf ? C + 2 : C + 1;
    const size_t es = bf ? sizeof(bf16) : sizeof(float);
    const bf16 *wbf = ctx->wbf;
    m->n = n;

    moe_stats *st = &m->stats;
    double t0 = wall_time();
    /* 1. router input: Switch's multiplicative jitter, in training only */
    m->ur = in;
    if (m->gate == GATE_SWITCH && ctx->training && m->jitter > 0) {
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++) {
            uint64_t key = rng_token_key(ctx->seed, m->layer, ctx->step, 2, ctx->token_offset + t);
            for (int c = 0; c < C; c++) {
                float f = 1.0f + m->jitter * (2.0f * rng_key_uniform(key + (uint64_t)c * RNG_KEY_STRIDE) - 1.0f);
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
    /* official convention (MoGE's group_sparsity_loss): the sum over the rank's n tokens
     * and the window positions / (h^2 positions), i.e. the per-token mean x n / h^2 */
    m->moge_weight = m->moge_official ? (double)m->moge_lambda * (double)n / ((double)m->win * m->win)
                                      : (double)m->moge_lambda;
    if (m->G > 0) {
        gemm(0, 1, n, m->G, C, in, C, params + m->wgp, C, m->plog, m->G, 0, NULL);
        gemm(0, 1, n, m->G, C, in, C, params + m->wnp, C, m->pnlog, m->G, 0, NULL);
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++) route_token_hier(m, t, ctx);
    } else {
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++) route_token(m, t, ctx);
    }

    /* 3. capacity, filled in token order (a choice over it is dropped); send rows
     * ordered by expert, so by the rank that holds it */
    const double cf = ctx->training ? m->cf : m->eval_cf;
    int64_t cap = cf > 0 ? (int64_t)ceil(cf * (double)n * k / E) : INT64_MAX;
    memset(m->e_count, 0, sizeof(int64_t) * E);
    for (int64_t i = 0; i < n * k; i++) {
        int e = m->choice[i];
        m->bucket[i] = m->e_count[e] < cap ? (m->e_count[e]++, e) : -1;
    }
    int64_t n_send = dispatch_order(&m->plan, m->bucket, n * k, E, m->E_local, m->slot, m->send_item);
    double t1 = wall_time();
    st->t_route += t1 - t0;
    /* a row: the token's vector, then the local index of the expert on its rank */
#pragma omp parallel for
    for (int64_t r = 0; r < n_send; r++) {
        int64_t i = m->send_item[r];
        int32_t local = m->choice[i] % m->E_local;
        if (bf) {
            bf16 *row = (bf16 *)m->send + r * W;
            const float *x = in + (i / k) * C;
            for (int c = 0; c < C; c++) row[c] = bf16_round(x[c]);
            memcpy(row + C, &local, sizeof local);
        } else {
            float *row = m->send + r * W;
            memcpy(row, in + (i / k) * C, sizeof(float) * C);
            memcpy(row + C, &local, sizeof local);
        }
    }

    /* 4. rows to the expert ranks, chunk by chunk (parallel.alltoall_chunks: groups of
     * a rank's experts): a chunk's experts start once its rows are in, while later
     * chunks travel and earlier ones go back. Every expert sees the rows of the
     * one-piece exchange in the same order, so the bits do not depend on the chunks. */
    double t2 = wall_time();
    m->n_recv = dispatch_send_start(&m->plan, m->send, m->recv, W, es, m->max_rows);
    double t3 = wall_time();
    st->t_alltoall += t3 - t2;
    for (int g = 0; g < m->plan.chunks; g++) {
        double ta = wall_time();
        int e0, e1;
        int64_t q0, q1;
        chunk_in(m, g, &e0, &e1, &q0, &q1);
        double tb = wall_time();
        /* 5. group the chunk's rows by local expert, one GEMM pair per expert */
        for (int64_t i = q0; i < q1; i++)
            memcpy(&m->recv_expert[i], (const char *)m->recv + (size_t)(i * W + C) * es, sizeof(int32_t));
        dispatch_group_by_id_range(&m->by_expert, m->recv_expert, q0, q1, e0, e1);
        const int32_t *from = m->by_expert.row; /* received row at each expert-ordered position */
        dispatch_gather((char *)m->X + (size_t)(q0 * C) * es, m->recv, W, from + q0, q1 - q0, C, es);
        double tc = wall_time();
        expert_forward(m, params, wbf, e0, e1, q0, q1);
        double td = wall_time();
        /* 6. the chunk's outputs back to the token owners */
        chunk_out(m, g, q0, q1, m->yrows, &st->t_dispatch, &st->t_alltoall);
        st->t_alltoall += tb - ta;
        st->t_expert += td - tc;
        st->t_dispatch += tc - tb;
    }
    double t6 = wall_time();
    dispatch_wait_back(&m->plan);
    double t7 = wall_time();
    st->t_alltoall += t7 - t6;
    /* combined with their gates */
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int32_t s = m->slot[t * k + j];
            if (s < 0) continue; /* dropped: the token rides the residual */
            float g = m->gates[t * k + j];
            float *o = out + t * C;
            if (bf) {
                const bf16 *y = (const bf16 *)m->yrows + (int64_t)s * C;
                for (int c = 0; c < C; c++) o[c] += g * bf16_float(y[c]);
            } else {
                const float *y = m->yrows + (int64_t)s * C;
                for (int c = 0; c < C; c++) o[c] += g * y[c];
            }
        }
    double t8 = wall_time();
    st->t_dispatch += (t2 - t1) + (t8 - t7);
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
        for (int e = 0; e < E; e++) dn[e] = ds[e] * sigmoidf(m->nlog[t * E + e]);
    } else {
        for (int j = 0; j < k; j++) dp[m->choice[t * k + j]] += dgate[j];
        if (train)
            for (int e = 0; e < E; e++)
                dp[e] += (float)(scale_n * m->aux_alpha * E * SUM_AT(m, S_ARGMAX)[e] / SUM_TOKENS(m));
    }
    if (train && m->moge) {
        float dq[E];
        memset(dq, 0, sizeof dq);
        moge_omega(m, pr, dq, scale_n * m->moge_weight);
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

/*
 * One level of a hierarchical token's gate backward: from dG, the gradient of the
 * level's kept gates g (softmax of sc over order[0..kk)), and the load loss's
 * coefficients c_load per option (NULL: off), into dl (clean logits) and ds (d
 * softplus scale) of the level's M options, with dsc its scores' gradient scratch.
 */
static void level_backward(const float *lg, const float *nl, const float *sc, const float *g,
                           const int32_t *order, int kk, const float *dG, const int32_t *kth, int M,
                           int i0, const double *c_load, float *dl, float *ds, float *dsc) {
    float dot = 0.0f;
    for (int j = 0; j < kk; j++) dot += g[j] * dG[j];
    for (int j = 0; j < kk; j++) dsc[order[j]] += g[j] * (dG[j] - dot);
    if (!c_load) return;
    for (int i = i0; i < i0 + M; i++) {
        double zs, s;
        int thr = kth[chosen_in(order, kk, i)];
        if (level_prob(lg, nl, sc, i, thr, &zs, &s) < 0) continue;
        double c = c_load[i] * norm_pdf(zs);
        dl[i] += (float)(c / s);
        ds[i] += (float)(-c * zs / s);
        dsc[thr] += (float)(-c / s);
    }
}

/*
 * Hierarchical token t: d(output and aux)/d of both levels' clean and noise logits.
 * A choice's gate is pg[a] sg[j], so dpg[a] = sum_j dgate sg and dsg = dgate pg[a],
 * plus each level's importance coefficient; c_* are NULL outside training.
 */
static void gate_backward_hier(moe_layer *m, int64_t t, const float *dgate, const ffn_context *ctx,
                               const double *c_imp, const double *c_load, const double *c_gimp,
                               const double *c_gload) {
    const int E = m->E, G = m->G, b = E / G, gk = m->gk, kk = m->kk, k = m->k;
    const int train = ctx->training;
    float *dl = m->dlog + t * E, *dn = m->dnlog + t * E, *dpl = m->dplog + t * G, *dpn = m->dpnlog + t * G;
    float ds[E], dsc[E], dps[G], dpsc[G], dPG[gk], dSG[kk];
    memset(dl, 0, sizeof(float) * E);
    memset(dpl, 0, sizeof(float) * G);
    memset(ds, 0, sizeof ds);
    memset(dsc, 0, sizeof dsc);
    memset(dps, 0, sizeof dps);
    memset(dpsc, 0, sizeof dpsc);
    const float *pg = m->pgates + t * gk, *sg = m->sgates + t * k;
    const int32_t *pc = m->pchoice + t * gk;
    const float *lg = m->logits + t * E, *nl = m->nlog + t * E, *sc = m->score + t * E;
    for (int a = 0; a < gk; a++) {
        dPG[a] = train ? (float)c_gimp[pc[a]] : 0.0f;
        for (int j = 0; j < kk; j++) {
            int i = a * kk + j;
            dPG[a] += dgate[i] * sg[i];
            dSG[j] = dgate[i] * pg[a] + (train ? (float)c_imp[m->choice[t * k + i]] : 0.0f);
        }
        level_backward(lg, nl, sc, sg + a * kk, m->choice + t * k + a * kk, kk, dSG,
                       m->skth + (t * gk + a) * 2, b, pc[a] * b, train && m->w_load > 0 ? c_load : NULL,
                       dl, ds, dsc);
    }
    level_backward(m->plog + t * G, m->pnlog + t * G, m->pscore + t * G, pg, pc, gk, dPG,
                   m->pkth + t * 2, G, 0, train && m->w_load > 0 ? c_gload : NULL, dpl, dps, dpsc);
    for (int e = 0; e < E; e++) {
        dl[e] += dsc[e];
        if (train) ds[e] += dsc[e] * m->eps[t * E + e];
        dn[e] = ds[e] * sigmoidf(nl[e]);
    }
    for (int g = 0; g < G; g++) {
        dpl[g] += dpsc[g];
        if (train) dps[g] += dpsc[g] * m->peps[t * G + g];
        dpn[g] = dps[g] * sigmoidf(m->pnlog[t * G + g]);
    }
}

/*
 * The experts' backward in bf16: dY (the received row gradients, expert-ordered, in
 * m->Y) -> the weight and bias gradients, and dX in bf16 back in m->Y. The GELU
 * output (m->A) feeds the weight gradient first, then holds dH.
 */
/* bf16 expert backward of local experts [e0, e1) (dY in Y; dX into Y) */
static void expert_backward_bf16(moe_layer *m, const bf16 *wbf, float *grads, int e0, int e1) {
    const int C = m->C, He = m->He;
    const int64_t *l_start = m->by_expert.start;
    bf16 *dY = (bf16 *)m->Y, *A = (bf16 *)m->A, *X = (bf16 *)m->X;
    float *dA = m->dA;
    /* experts are independent (their gradients are disjoint) */
#pragma omp parallel for schedule(dynamic) if (experts_in_parallel(m))
    for (int e = e0; e < e1; e++) {
        int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
        const bf16 *W2 = wbf + m->w2 + (size_t)e * C * He;
        gemm_var_bf16(0, 0, rows, He, C, dY + r0 * C, C, W2, He, dA + r0 * He, He, 0, 0, NULL);
        gemm_var_bf16(1, 0, C, He, rows, dY + r0 * C, C, A + r0 * He, He,
                      grads + m->w2 + (size_t)e * C * He, He, 0, 1, NULL);
        bias_backward_bf16(grads + m->b2 + (size_t)e * C, dY + r0 * C, rows, C);
        bf16 *dH = A, *dX = dY; /* the GELU output and dY of these rows have been used */
        gelu_backward_bf16(dH + r0 * He, m->Hpre + r0 * He, dA + r0 * He, rows * He);
        const bf16 *W1 = wbf + m->w1 + (size_t)e * He * C;
        gemm_var_bf16(1, 0, He, C, rows, dH + r0 * He, He, X + r0 * C, C,
                      grads + m->w1 + (size_t)e * He * C, C, 0, 1, NULL);
        bias_backward_bf16(grads + m->b1 + (size_t)e * He, dH + r0 * He, rows, He);
        gemm_var_bf16(0, 0, rows, C, He, dH + r0 * He, He, W1, C, dX + r0 * C, C, 1, 0, NULL);
        if (omp_get_thread_num() == 0) dispatch_progress(&m->plan);
    }
}

/* fp32 expert backward of local experts [e0, e1), positions [q0, q1) */
static void expert_backward(moe_layer *m, const float *params, float *grads, int e0, int e1,
                            int64_t q0, int64_t q1) {
    const int C = m->C, He = m->He;
    const int64_t *l_start = m->by_expert.start;
    float *dY = m->Y, *dA = m->dA, *dH = m->A; /* GELU outputs are consumed by the weight gradient first */
    for (int e = e0; e < e1; e++) {
        int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
        const float *W2 = params + m->w2 + (size_t)e * C * He;
        gemm_var(0, 0, rows, He, C, dY + r0 * C, C, W2, He, dA + r0 * He, He, 0, NULL);
        gemm_var(1, 0, C, He, rows, dY + r0 * C, C, m->A + r0 * He, He,
                 grads + m->w2 + (size_t)e * C * He, He, 1, NULL);
        bias_backward(grads + m->b2 + (size_t)e * C, dY + r0 * C, rows, C);
        dispatch_progress(&m->plan);
    }
    par_zero(dH + q0 * He, sizeof(float) * (size_t)((q1 - q0) * He));
    gelu_backward(dH + q0 * He, m->Hpre + q0 * He, dA + q0 * He, (q1 - q0) * He);
    float *dX = m->Y; /* dY has been used */
    for (int e = e0; e < e1; e++) {
        int64_t r0 = l_start[e], rows = l_start[e + 1] - r0;
        const float *W1 = params + m->w1 + (size_t)e * He * C;
        gemm_var(1, 0, He, C, rows, dH + r0 * He, He, m->X + r0 * C, C,
                 grads + m->w1 + (size_t)e * He * C, C, 1, NULL);
        bias_backward(grads + m->b1 + (size_t)e * He, dH + r0 * He, rows, He);
        gemm_var(0, 0, rows, C, He, dH + r0 * He, He, W1, C, dX + r0 * C, C, 0, NULL);
        dispatch_progress(&m->plan);
    }
}

void moe_backward(moe_layer *m, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx) {
    ALWAYS(n == m->n);
    const int E = m->E, k = m->k, C = m->C;
    const int bf = m->bf16;
    const size_t es = bf ? sizeof(bf16) : sizeof(float);
    moe_stats *st = &m->stats;
    double t0 = wall_time();
    float *dgate = m->dgate;
    memset(dgate, 0, sizeof(float) * (size_t)(n * k));
    /* 1. per kept choice: the row gradient gate * dout, and d gate = dout . y */
#pragma omp parallel for
    for (int64_t i = 0; i < n * k; i++) {
        int32_t s = m->slot[i];
        if (s < 0) continue;
        const float *d = dout + (i / k) * C;
        float g = m->gates[i], dot = 0.0f;
        if (bf) {
            const bf16 *y = (const bf16 *)m->yrows + (int64_t)s * C;
            bf16 *row = (bf16 *)m->dx_rows + (int64_t)s * C;
            for (int c = 0; c < C; c++) {
                row[c] = bf16_round(g * d[c]);
                dot += d[c] * bf16_float(y[c]);
            }
        } else {
            const float *y = m->yrows + (int64_t)s * C;
            float *row = m->dx_rows + (int64_t)s * C;
            for (int c = 0; c < C; c++) {
                row[c] = g * d[c];
                dot += d[c] * y[c];
            }
        }
        dgate[i] = dot;
    }
    /* 2. row gradients to the experts along the forward plan, chunk by chunk as in
     * forward; 3. the chunk's expert backward; 4. its input gradients back */
    double t1 = wall_time();
    dispatch_forward_start(&m->plan, m->dx_rows, m->back, C, es);
    double t2 = wall_time();
    st->t_alltoall += t2 - t1;
    const int32_t *from = m->by_expert.row;
    double t_mid = 0.0;
    for (int g = 0; g < m->plan.chunks; g++) {
        double ta = wall_time();
        int e0, e1;
        int64_t q0, q1;
        chunk_in(m, g, &e0, &e1, &q0, &q1);
        double tb = wall_time();
        /* dY in Y: the forward outputs are no longer needed */
        dispatch_gather((char *)m->Y + (size_t)(q0 * C) * es, m->back, C, from + q0, q1 - q0, C, es);
        double tc = wall_time();
        if (bf) expert_backward_bf16(m, ctx->wbf, grads, e0, e1);
        else expert_backward(m, params, grads, e0, e1, q0, q1);
        double td = wall_time();
        /* dX in Y: dY has been used */
        chunk_out(m, g, q0, q1, m->dx_rows, &t_mid, &st->t_alltoall);
        st->t_alltoall += tb - ta;
        st->t_expert += td - tc;
        t_mid += tc - tb;
    }
    double t5 = wall_time();
    dispatch_wait_back(&m->plan);
    double t6 = wall_time();
    st->t_alltoall += t6 - t5;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            int32_t s = m->slot[t * k + j];
            if (s < 0) continue;
            if (bf) {
                const bf16 *r = (const bf16 *)m->dx_rows + (int64_t)s * C;
                for (int c = 0; c < C; c++) din[t * C + c] += bf16_float(r[c]);
            } else {
                const float *r = m->dx_rows + (int64_t)s * C;
                for (int c = 0; c < C; c++) din[t * C + c] += r[c];
            }
        }
    double t7 = wall_time();
    st->t_dispatch += (t1 - t0) + t_mid + (t7 - t6);
    /* 5. gates and aux losses into the router. Aux losses are over the global batch;
     * dense gradients are averaged over world_size ranks afterwards, so scale up. */
    double N = ctx->training ? SUM_TOKENS(m) : (double)n, scale_n = ctx->world_size / N;
    double c_imp[E], c_load[E];
    memset(c_imp, 0, sizeof c_imp);
    memset(c_load, 0, sizeof c_load);
    if (ctx->training && m->gate == GATE_NOISY && m->G == 0) {
        cv2(SUM_AT(m, S_IMP), E, c_imp);
        for (int e = 0; e < E; e++) c_imp[e] *= ctx->world_size * m->w_imp;
        if (m->w_load > 0) {
            cv2(SUM_AT(m, S_LOAD), E, c_load);
            for (int e = 0; e < E; e++) c_load[e] *= ctx->world_size * m->w_load;
        }
    }
    if (m->G > 0) {
        double c_gimp[m->G], c_gload[m->G];
        memset(c_gimp, 0, sizeof c_gimp);
        memset(c_gload, 0, sizeof c_gload);
        if (ctx->training) { /* each level's losses, as in reduce_aux */
            cv2_groups(SUM_AT(m, S_IMP), E, m->G, c_imp);
            cv2_groups(SUM_AT(m, S_LOAD), E, m->G, c_load);
            cv2(SUM_GROUP_IMP(m), m->G, c_gimp);
            cv2(SUM_GROUP_LOAD(m), m->G, c_gload);
            for (int e = 0; e < E; e++) {
                c_imp[e] *= ctx->world_size * m->w_imp;
                c_load[e] *= ctx->world_size * m->w_load;
            }
            for (int g = 0; g < m->G; g++) {
                c_gimp[g] *= ctx->world_size * m->w_imp;
                c_gload[g] *= ctx->world_size * m->w_load;
            }
        }
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++)
            gate_backward_hier(m, t, dgate + t * k, ctx, c_imp, c_load, c_gimp, c_gload);
        gemm(1, 0, m->G, C, n, m->dplog, m->G, in, C, grads + m->wgp, C, 1, NULL);
        gemm(0, 0, n, C, m->G, m->dplog, m->G, params + m->wgp, C, din, C, 1, NULL);
        gemm(1, 0, m->G, C, n, m->dpnlog, m->G, in, C, grads + m->wnp, C, 1, NULL);
        gemm(0, 0, n, C, m->G, m->dpnlog, m->G, params + m->wnp, C, din, C, 1, NULL);
    } else {
#pragma omp parallel for
        for (int64_t t = 0; t < n; t++) gate_backward(m, t, dgate + t * k, ctx, c_imp, c_load, scale_n);
    }
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

void moe_bias_update(double *bias, const double *chosen, int E, double rate) {
    double mean = 0.0;
    for (int e = 0; e < E; e++) mean += chosen[e];
    mean /= E;
    for (int e = 0; e < E; e++) bias[e] += rate * (double)((chosen[e] < mean) - (chosen[e] > mean));
}

void moe_end_step(moe_layer *m, const ffn_context *ctx) {
    /* the step's global choices (before capacity), the same on every rank */
    if (m->bias_rate > 0) moe_bias_update(m->bias, SUM_AT(m, S_CHOSEN), m->E, m->bias_rate);
    if (ctx->step >= m->guard_steps) return;
    for (int e = 0; e < m->E; e++) m->guard_tot[e] += SUM_AT(m, S_KEPT)[e];
}

/* ---- statistics and the log line (ffn.h) ---- */

static const char *const MOE_AUX[] = {"importance", "load", "switch", "z", "moge",
                                      "group_importance", "group_load"};

void moe_stats_describe(const moe_layer *m, stats_layer_desc *d) {
    memset(d, 0, sizeof *d);
    d->layer = m->layer;
    d->kind = ffn_kind_name(m->moge ? FFN_MOGE : FFN_TOPK);
    d->bucket = "expert";
    d->n_buckets = m->E;
    d->k = m->k;
    d->n_aux = m->G > 0 ? 7 : 5; /* hierarchical: the primary gate's losses too */
    for (int a = 0; a < d->n_aux; a++) d->aux_names[a] = MOE_AUX[a];
    d->has_bias = m->bias_rate > 0;
    d->groups = m->G;
}

void moe_stats_row(const moe_layer *m, stats_row *r) {
    const moe_stats *st = &m->stats;
    memset(r, 0, sizeof *r);
    r->tokens = st->tokens;
    r->n_tokens = st->n_tokens;
    r->assignments = st->assignments;
    r->dropped = st->dropped;
    r->gate_entropy = st->gate_entropy;
    r->router_entropy = st->router_entropy;
    r->top_gate = st->top_gate;
    r->aux[0] = st->aux_importance;
    r->aux[1] = st->aux_load;
    r->aux[2] = st->aux_switch;
    r->aux[3] = st->aux_z;
    r->aux[4] = st->aux_moge;
    r->aux[5] = st->aux_group_importance;
    r->aux[6] = st->aux_group_load;
    r->bias = m->bias_rate > 0 ? m->bias : NULL;
}

void moe_phase_times(const moe_layer *m, double t[4]) {
    t[0] = m->stats.t_route;
    t[1] = m->stats.t_dispatch;
    t[2] = m->stats.t_alltoall;
    t[3] = m->stats.t_expert;
}

void moe_log_fields(const moe_layer *const *layers, int n, double aux_loss, char *buf, size_t cap) {
    double worst = 0.0, dropped = 0.0, assigned = 0.0, group_worst = -1.0;
    for (int l = 0; l < n; l++) {
        const moe_layer *m = layers[l];
        const moe_stats *st = &m->stats;
        if (st->max_over_mean > worst) worst = st->max_over_mean;
        dropped += (double)st->dropped;
        assigned += (double)st->assignments;
        if (m->G > 0) { /* hierarchical: the primary gate's balance over groups */
            double r = stats_group_max_over_mean(st->tokens, m->E, m->G);
            group_worst = r > group_worst ? r : group_worst;
        }
    }
    int len = snprintf(buf, cap, " | aux %.6f | load max/mean %.3f | dropped %.2f%%", aux_loss, worst,
                       assigned > 0 ? 100.0 * dropped / assigned : 0.0);
    if (group_worst >= 0.0 && len > 0 && (size_t)len < cap)
        snprintf(buf + len, cap - (size_t)len, " | group max/mean %.3f", group_worst);
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

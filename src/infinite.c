/* infinite: the ∞-MoE FFN: Gaussian router, block-sparse masked FFN sharded over ranks (see infinite.h). */
#include "infmoe/infinite.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/infmask.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

#define Z_BINS 32
#define SIGMA_BINS 20

/* Diagnostics of the last forward, reduced over all ranks (training and eval). */
typedef struct {
    int n_blocks;          /* H / mask_block */
    int64_t *block_tokens; /* (n_blocks) tokens using each block (any sample) */
    int n_bins;            /* histogram bins of z mod 1 over [0, 1) (window) */
    int64_t *z_hist;       /* (n_bins) sampled z (window rule) */
    int n_sigma_bins;      /* histogram of sigma over [0, sigma_hi), the last bin open-ended */
    double sigma_hi;
    int64_t *sigma_hist;   /* (n_sigma_bins) every token's sigma, each latent dimension */
    double mean_sigma;     /* mean over tokens and latent dimensions */
    double mask_overlap;   /* mean over tokens of |kept units of sample 1 and 2| / n_keep (0 for K = 1) */
    double active_units;   /* mean units a token uses (union over its samples) */
    double aux_kl;         /* the KL aux loss (training) */
    int64_t n_tokens;
    /* seconds since the layer was created, forward and backward together */
    double t_router;       /* router MLP, sampling, the owner's masks and d z */
    double t_masks;        /* the shards' masks: weights and their gradients */
    double t_units;        /* unit GEMMs, GELU, row gathers and scatters */
    double t_alltoall;     /* the MPI exchanges */
    /* this shard's forward work since the layer was created, in unit rows (a row times
     * a unit): computed (every unit of each chunk a row touches) and kept (the units of
     * the row's arcs in this shard, the rest computed at weight 0) */
    double unit_rows, kept_rows;
} inf_stats;

/*
 * Router init (decisions, docs/infinite.md). The router's gain from u to mu sets
 * how far a token's window moves when u changes, and so the size of the gradient
 * the router sends back into the backbone: with Wm ~ N(0, 1/R) (mu spread over the
 * whole ring) that gradient outgrew the language-model gradient and training
 * diverged; a gain of 0.2 keeps it in proportion. sigma starts at 0.05 (a fifth of
 * a 25% arc): near 0.7 (softplus(0)), samples land anywhere on the ring, routing
 * is random and mu gets no consistent gradient.
 */
#define MU_INIT_GAIN 0.2f
#define SIGMA_INIT 0.05f


struct inf_layer {
    int layer, C, H, b, nb, kb, n_keep, K, K_train, K_max, K_set, deterministic, dz, R, ep;
    /* K: this forward's samples; K_set: inf_set_samples' (evaluation); K_train..K_max:
     * the training range (ffn.samples..samples_max; one K when equal) */
    int H_local, nb_local, ep_rank;
    int bf16; /* bf16 precision: unit GEMMs on bf16 operands; vectors and their gradients
               * travel in bf16, z and the masks' sums in fp32 beside them */
    int cu, per, nc_local;  /* compute chunks: cu units (per whole blocks) each, nc_local per
                             * shard; shard r holds the chunks r, r + ep, r + 2 ep, ... */
    int32_t *local_of;      /* (nb) this shard's index of each block, -1 where another holds it */
    int64_t *stamp;         /* (threads, nb_local) stamp_gen + row where a row last kept a block */
    int64_t stamp_gen;      /* advanced by the rows of each forward, so stamps never need clearing */
    int extra;              /* floats after u in a sent row: K z's, then (window) K norms */
    mask_rule mask;
    float tau, kl, sigma_min;
    int stratified; /* ffn.sampling: stratified (dz = 1): sample k drawn from stratum k of K */
    /* ring balance (window rule, ffn.balance_rate > 0): z is warped through the
     * piecewise-linear map with knots warp[0..nw] (warp[j] at j / nw, 0 and 1 at
     * the ends), an average of the empirical CDF of the raw samples, so that the
     * warped samples spread evenly over the blocks; not a parameter, updated after
     * each step from the step's global counts (warp_counts) */
    float balance_rate;
    int nw;        /* warp intervals: 4 per block, so lumps within a block even out too */
    double *warp, *warp_counts;
    float *zslope;  /* (n,K) d warp / d z of each sample, for the backward */
    int32_t *zbin;  /* (n,K) the raw sample's bin */
    size_t A, a, Wm, bm, Ws, bs, P, q, b2; /* replicated */
    size_t W1, b1, W2;                       /* sharded over units */
    int64_t max_tokens, max_recv;
    int n_threads, K_alloc; /* buffers that grow with K are sized for K_alloc samples */
    inf_mask mk;            /* the mask rule's parameters (infmask.h) */
    mask_scratch *scratch;  /* (n_threads) */
    /* owner side */
    int64_t n;
    int training;
    float *pre_r, *r, *mu, *spre, *sigma, *eps, *z; /* (n,R) (n,R) (n,dz) x3, (n,K,dz) x2 */
    int32_t *blocks_of;                              /* (n,K,kb) kept blocks per sample */
    int32_t *row_token;                              /* (n*ep) token of each sent row */
    int32_t *row_of;                                 /* (n*ep) sent row of token t for shard r at t*ep + r, or -1 */
    int32_t *need;                                   /* (n*ep) shard r at t*ep + r if token t needs it, else -1 */
    uint8_t *seen;                                   /* (nb) diagnostics: blocks a token uses */
    float *Atot, *Stot;                              /* (n,K,dz), (n,K) backward sums over shards */
    float *norm;                                     /* (n,K,NORM) window: each sample's softmax max, 1/sum, Q */
    bf16 *out_h, *back_h;                            /* bf16: rows_out and rows_back packed to send */
    float *send, *back;                              /* (n*ep, C+K*dz), (n*ep, C+K*dz+K) */
    float *dy_send;                                  /* (n*ep, C) */
    /* receiver side */
    int64_t n_recv;
    float *recv;                 /* (max_recv, C+K*dz) */
    float *wrow;                 /* (max_recv, H_local) per-unit weights, then d loss / d weight */
    uint8_t *used;               /* (max_recv, nc_local) rows that use a chunk */
    dispatch_groups by_chunk;    /* received rows grouped by the local chunks they use */
    float *Wt, *Hp, *Ac;         /* (chunk positions, cu) weights, pre-activations, GELU */
    float *rows_out, *rows_back; /* (max_recv, C), (max_recv, C+K*dz+K) */
    int chunks_parallel;         /* unit chunks run on threads of their own (inf_create) */
    int *chunk_order;            /* (nc_local) local chunks, most rows first */
    /* backward scratch (owner) */
    float *dmu, *dsig, *dr;      /* (n,dz) x2, (n,R) */
    dispatch_plan plan;
    inf_stats stats;
    double *sums;
    void *mem, *sample_mem; /* the buffers above, in two allocations (mem_carve) */
};

/* Window rule: what the owner sends with each sample, so that a shard computes only its
 * own units of the arc: the softmax's max and 1 / sum, and Q = sum p de/dz (infmask.h). */
#define NORM 3

/*
 * The unit chunks' gather buffers, one set per thread, shared by every layer of the
 * process (layers run one at a time): xg and yg (max_recv, C), aw and daw (max_recv,
 * cu). A chunk reads and writes only its own thread's set.
 */
typedef struct {
    float *xg, *yg, *aw, *daw;
} chunk_buf;
static struct {
    chunk_buf *buf;
    void **mem;
    int threads, users;
    int64_t rows_c, rows_cu; /* floats in xg / yg, and in aw / daw */
    float *yall;             /* chunks on threads: every position's output rows, (positions, C) */
    int64_t yall_n;
} g_chunk;

static void chunk_bufs_reserve(int threads, int64_t rows_c, int64_t rows_cu, int64_t yall_n) {
    g_chunk.users++;
    if (yall_n > g_chunk.yall_n) { /* pages are touched only as positions use them */
        free(g_chunk.yall);
        g_chunk.yall = xmalloc(sizeof(float) * (size_t)yall_n);
        g_chunk.yall_n = yall_n;
    }
    if (threads <= g_chunk.threads && rows_c <= g_chunk.rows_c && rows_cu <= g_chunk.rows_cu) return;
    for (int t = 0; t < g_chunk.threads; t++) free(g_chunk.mem[t]);
    free(g_chunk.mem);
    free(g_chunk.buf);
    if (threads < g_chunk.threads) threads = g_chunk.threads;
    if (rows_c < g_chunk.rows_c) rows_c = g_chunk.rows_c;
    if (rows_cu < g_chunk.rows_cu) rows_cu = g_chunk.rows_cu;
    g_chunk.threads = threads;
    g_chunk.rows_c = rows_c;
    g_chunk.rows_cu = rows_cu;
    g_chunk.buf = xcalloc((size_t)threads, sizeof(chunk_buf));
    g_chunk.mem = xcalloc((size_t)threads, sizeof(void *));
    for (int t = 0; t < threads; t++) {
        chunk_buf *b = &g_chunk.buf[t];
        const mem_part parts[] = {MEM_PART(b->xg, rows_c), MEM_PART(b->yg, rows_c),
                                  MEM_PART(b->aw, rows_cu), MEM_PART(b->daw, rows_cu)};
        g_chunk.mem[t] = mem_carve(parts, sizeof parts / sizeof parts[0]);
    }
}

static void chunk_bufs_release(void) {
    if (--g_chunk.users > 0) return;
    for (int t = 0; t < g_chunk.threads; t++) free(g_chunk.mem[t]);
    free(g_chunk.mem);
    free(g_chunk.buf);
    free(g_chunk.yall);
    memset(&g_chunk, 0, sizeof g_chunk);
}

/* ---- construction ---- */

/* (Re)allocate the buffers whose size grows with the number of samples K. */
static void alloc_sample_buffers(inf_layer *f, int K) {
    int64_t n = f->max_tokens, M = f->max_recv, ep = f->ep, C = f->C, dz = f->dz;
    const int64_t nn = f->mask == MASK_WINDOW ? NORM : 0, X = K * dz + K * nn;
    free(f->sample_mem);
    const mem_part parts[] = {
        MEM_PART(f->Atot, n * K * dz),  MEM_PART(f->Stot, n * K),
        MEM_PART(f->eps, n * K * dz),   MEM_PART(f->z, n * K * dz),
        MEM_PART(f->blocks_of, n * K * f->kb), MEM_PART(f->norm, n * K * nn),
        MEM_PART(f->send, n * ep * (C + X)),
        MEM_PART(f->back, n * ep * (C + K * dz + K)),
        MEM_PART(f->recv, M * (C + X)),
        MEM_PART(f->rows_back, M * (C + K * dz + K)),
        MEM_PART(f->zslope, n * K), MEM_PART(f->zbin, n * K),
        MEM_PART(f->out_h, M * C),
        MEM_PART(f->back_h, M * (C + 2 * (K * dz + K))),
    };
    f->sample_mem = mem_carve(parts, sizeof parts / sizeof parts[0] - (f->bf16 ? 0 : 2));
    if (!f->bf16) f->out_h = f->back_h = NULL;
    f->K_alloc = K;
    f->extra = (int)X;
}

inf_layer *inf_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      const ffn_context *ctx) {
    const int ep = ctx ? ctx->ep : 1, ep_rank = ctx ? ctx->ep_rank : 0;
    inf_layer *f = xcalloc(1, sizeof *f);
    f->layer = layer;
    f->C = cfg->n_embd;
    f->H = cfg->inf_units;
    f->b = cfg->mask_block;
    f->nb = f->H / f->b;
    f->nw = 4 * f->nb;
    f->kb = (int)lround(cfg->keep * f->nb);
    if (f->kb < 1) f->kb = 1;
    f->n_keep = f->kb * f->b;
    f->K = f->K_set = f->K_train = cfg->samples;
    f->K_max = cfg->samples_max > cfg->samples ? cfg->samples_max : cfg->samples;
    f->dz = cfg->latent_dim;
    f->R = cfg->router_hidden;
    f->mask = cfg->mask;
    f->tau = cfg->tau;
    f->kl = cfg->kl_weight;
    f->sigma_min = cfg->sigma_min;
    f->stratified = cfg->stratified;
    f->balance_rate = cfg->mask == MASK_WINDOW ? cfg->balance_rate : 0.0f;
    f->ep = ep;
    f->bf16 = ctx && ctx->bf16;
    f->H_local = f->H / ep;
    f->nb_local = f->nb / ep;
    f->ep_rank = ep_rank;
    /* Compute in chunks of consecutive blocks: a chunk is computed for every row
     * that keeps any of its blocks (units it did not keep get weight 0). Chunks of
     * ffn.chunk_units make GEMMs and row gathers efficient; the window rule's kept
     * blocks are an arc, so only the arc's ends waste work. The learned rule's
     * blocks are scattered: one block per chunk. The chunks go round the shards in
     * turn, so any arc's work spreads over all of them (contiguous shards would give
     * the shard holding a crowded part of the ring all the work while the others
     * wait); an arc over n chunks still gives some shards one chunk more than others,
     * so narrower chunks split it more evenly. */
    int per = f->mask == MASK_WINDOW ? (cfg->chunk_units + f->b - 1) / f->b : 1;
    if (per < 1) per = 1; /* a width below one unit (the benchmarks' flags) */
    if (per > f->nb_local) per = f->nb_local;
    while (f->nb_local % per) per--;
    f->per = per;
    f->cu = per * f->b;
    f->nc_local = f->nb_local / per;
    f->local_of = xcalloc((size_t)f->nb, sizeof(int32_t));
    for (int g = 0; g < f->nb; g++) {
        const int ch = g / per;
        f->local_of[g] = ch % ep == ep_rank ? ch / ep * per + g % per : -1;
    }
    f->max_tokens = max_tokens;
    f->max_recv = (int64_t)ep * max_tokens;
    const int C = f->C, R = f->R, dz = f->dz, H = f->H;

    /* Router init: MU_INIT_GAIN and SIGMA_INIT above. */
    int64_t sA[2] = {R, C}, sa[1] = {R}, sW[2] = {dz, R}, sb[1] = {dz}, sP[2] = {H, dz}, sq[1] = {H},
            sC[1] = {C};
#define REG(field, fmt, nd, shape, decay, init, std) \
    f->field = tensor_add_layer(tab, fmt, layer, nd, shape, decay, init, std)
    REG(A, "h.%d.inf.router.fc.w", 2, sA, 1, INIT_NORMAL, 1.0f / sqrtf((float)C));
    REG(a, "h.%d.inf.router.fc.b", 1, sa, 0, INIT_ZERO, 0);
    REG(Wm, "h.%d.inf.router.mu.w", 2, sW, 0, INIT_NORMAL, MU_INIT_GAIN / sqrtf((float)R));
    REG(bm, "h.%d.inf.router.mu.b", 1, sb, 0, INIT_ZERO, 0);
    REG(Ws, "h.%d.inf.router.sigma.w", 2, sW, 0, INIT_NORMAL, 0.01f);
    REG(bs, "h.%d.inf.router.sigma.b", 1, sb, 0, INIT_CONST, logf(expm1f(fmaxf(SIGMA_INIT - f->sigma_min, 0.01f))));
    if (f->mask == MASK_LEARNED) {
        REG(P, "h.%d.inf.scores.w", 2, sP, 0, INIT_NORMAL, 1.0f);
        REG(q, "h.%d.inf.scores.b", 1, sq, 0, INIT_ZERO, 0);
    }
    REG(b2, "h.%d.inf.ffn.proj.b", 1, sC, 0, INIT_ZERO, 0);
#undef REG

    int64_t n = max_tokens, M = f->max_recv, Hl = f->H_local, ncl = f->nc_local;
    const mem_part parts[] = {
        MEM_PART(f->pre_r, n * R),      MEM_PART(f->r, n * R),          MEM_PART(f->mu, n * dz),
        MEM_PART(f->spre, n * dz),      MEM_PART(f->sigma, n * dz),     MEM_PART(f->row_token, n * ep),
        MEM_PART(f->row_of, n * ep),    MEM_PART(f->need, n * ep),      MEM_PART(f->seen, f->nb),
        MEM_PART(f->dy_send, n * ep * C), MEM_PART(f->wrow, M * Hl),    MEM_PART(f->used, M * ncl),
        MEM_PART(f->Wt, M * Hl),        MEM_PART(f->Hp, M * Hl),        MEM_PART(f->Ac, M * Hl),
        MEM_PART(f->rows_out, M * C),   MEM_PART(f->dmu, n * dz),
        MEM_PART(f->dsig, n * dz),      MEM_PART(f->dr, n * R),
        MEM_PART(f->stats.block_tokens, f->nb), MEM_PART(f->stats.z_hist, Z_BINS),
        MEM_PART(f->stats.sigma_hist, SIGMA_BINS), MEM_PART(f->sums, f->nb + Z_BINS + 5 + SIGMA_BINS + f->nw),
        MEM_PART(f->warp, f->nw + 1), MEM_PART(f->warp_counts, f->nw),
    };
    f->mem = mem_carve(parts, sizeof parts / sizeof parts[0]);
    for (int j = 0; j <= f->nw; j++) f->warp[j] = (double)j / f->nw; /* the identity */
    alloc_sample_buffers(f, f->K_max); /* training may draw up to samples_max */
    /* a row uses at most every local chunk */
    dispatch_groups_init(&f->by_chunk, f->nc_local, M * ncl);
    dispatch_init(&f->plan, ctx ? ctx->ep_comm : MPI_COMM_NULL, cfg->alltoall_node);
    f->n_threads = omp_get_max_threads();
    /*
     * With at least as many local chunks as threads, each thread runs whole chunks
     * alone (a chunk's products, a few hundred units wide, split badly over threads)
     * and the chunks' row sums are added in chunk order, so the bits are those of one
     * thread; otherwise chunks run one after another on every thread.
     */
    f->chunks_parallel = f->n_threads > 1 && f->nc_local >= f->n_threads;
    chunk_bufs_reserve(f->chunks_parallel ? f->n_threads : 1, M * C, M * f->cu,
                       f->chunks_parallel ? M * f->nc_local * C : 0);
    f->chunk_order = xcalloc((size_t)f->nc_local, sizeof(int));
    f->scratch = xcalloc((size_t)f->n_threads, sizeof(mask_scratch));
    f->stamp = xcalloc((size_t)f->n_threads * (size_t)f->nb_local, sizeof(int64_t));
    f->stamp_gen = 1; /* stamps start at 0: no row */
    f->mk = (inf_mask){f->mask, H, f->b, f->nb, f->kb, f->n_keep, dz, f->tau, f->P, f->q};
    for (int t = 0; t < f->n_threads; t++) inf_mask_scratch_init(&f->mk, &f->scratch[t]);
    f->stats.n_blocks = f->nb;
    f->stats.n_bins = Z_BINS;
    f->stats.n_sigma_bins = SIGMA_BINS;
    /* sigma's histogram range: half the ring (window), or the scores' unit scale (learned) */
    f->stats.sigma_hi = f->mask == MASK_WINDOW ? 0.5 : 2.0;
    return f;
}

void inf_register_units(inf_layer *f, tensor_table *tab) {
    int64_t Hl = f->H_local, C = f->C, cu = f->cu, first = (int64_t)f->ep_rank * cu, stride = f->ep * cu;
    int64_t s1[2] = {Hl, C}, sb[1] = {Hl};
    float proj_std = 0.02f / sqrtf(2.0f * 12.0f);
    f->W1 = tensor_add_layer_strided(tab, "h.%d.inf.ffn.fc.w", f->layer, 2, s1, 1, INIT_NORMAL, 0.02f,
                                     f->H, first, cu, stride);
    f->b1 = tensor_add_layer_strided(tab, "h.%d.inf.ffn.fc.b", f->layer, 1, sb, 0, INIT_ZERO, 0, f->H,
                                     first, cu, stride);
    f->W2 = tensor_add_layer_strided(tab, "h.%d.inf.ffn.proj.w", f->layer, 2, s1, 1, INIT_NORMAL,
                                     proj_std, f->H, first, cu, stride);
}

void inf_free(inf_layer *f) {
    if (!f) return;
    for (int t = 0; t < f->n_threads; t++) inf_mask_scratch_free(&f->scratch[t]);
    free(f->scratch);
    chunk_bufs_release();
    free(f->chunk_order);
    dispatch_groups_free(&f->by_chunk);
    dispatch_free(&f->plan);
    free(f->local_of);
    free(f->stamp);
    free(f->sample_mem);
    free(f->mem);
    free(f);
}

void inf_set_samples(inf_layer *f, int samples, int deterministic) {
    ALWAYS(samples >= 1);
    f->deterministic = deterministic;
    f->K = f->K_set = deterministic ? 1 : samples;
    if (f->K > f->K_alloc) alloc_sample_buffers(f, f->K);
}

int inf_samples(const inf_layer *f) { return f->K; }

int inf_train_samples(uint64_t seed, int step, int lo, int hi) {
    if (hi <= lo) return lo;
    uint64_t key = rng_token_key(seed, -1, step, 4, 0); /* purpose 4: the step's K */
    return lo + (int)(rng_mix64(key) % (uint64_t)(hi - lo + 1));
}

double inf_matmul_params_per_token(const inf_layer *f) {
    /* a training K drawn from samples..samples_max costs their mean */
    return 0.5 * (f->K_train + f->K_max) * f->n_keep * 2.0 * f->C;
}

/* what the last forward computed: the union of a token's samples' units */
double inf_active_params_per_token(const inf_layer *f) {
    return f->stats.active_units * 2.0 * f->C;
}

/* ---- forward ---- */

static void router_forward(inf_layer *f, const float *params, const float *in, int64_t n,
                           const ffn_context *ctx) {
    const int R = f->R, dz = f->dz, C = f->C, K = f->K;
    gemm(0, 1, n, R, C, in, C, params + f->A, C, f->pre_r, R, 0, params + f->a);
    gelu_forward(f->r, f->pre_r, n * R);
    gemm(0, 1, n, dz, R, f->r, R, params + f->Wm, R, f->mu, dz, 0, params + f->bm);
    gemm(0, 1, n, dz, R, f->r, R, params + f->Ws, R, f->spre, dz, 0, params + f->bs);
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++) {
        /* layer + 1000: draws of their own, apart from any MoE layer's */
        uint64_t key = rng_token_key(ctx->seed, f->layer + 1000, ctx->step, 3, ctx->token_offset + t);
        for (int d = 0; d < dz; d++) {
            float sg = softplusf(f->spre[t * dz + d]) + f->sigma_min;
            f->sigma[t * dz + d] = sg;
            for (int k = 0; k < K; k++) {
                uint64_t kd = key + (uint64_t)(k * dz + d) * RNG_KEY_STRIDE;
                float e = f->deterministic ? 0.0f
                          : f->stratified  ? rng_key_normal_stratum(kd, k, K)
                                           : rng_key_normal(kd);
                f->eps[(t * K + k) * dz + d] = e;
                f->z[(t * K + k) * dz + d] = f->mu[t * dz + d] + sg * e;
            }
        }
        if (f->balance_rate > 0) /* window rule: dz = 1 */
            for (int k = 0; k < K; k++) {
                float z = f->z[t * K + k], whole = floorf(z), u = (z - whole) * f->nw;
                int j = (int)u < f->nw ? (int)u : f->nw - 1;
                float c0 = (float)f->warp[j], c1 = (float)f->warp[j + 1];
                f->z[t * K + k] = whole + c0 + (c1 - c0) * (u - (float)j);
                f->zslope[t * K + k] = (c1 - c0) * f->nw;
                f->zbin[t * K + k] = j;
            }
    }
}

/* After a training step: each knot moves by balance_rate towards the empirical CDF
 * of the step's raw samples (all ranks' counts), mixed 9:1 with the identity so
 * that no stretch of the ring collapses to a point (slopes stay >= 0.1). */
void inf_balance_update(double *warp, const double *counts, int nb, double rate) {
    double total = 0, cdf = 0;
    for (int j = 0; j < nb; j++) total += counts[j];
    if (total <= 0 || rate <= 0) return;
    for (int j = 1; j < nb; j++) {
        cdf += counts[j - 1] / total;
        double target = 0.9 * cdf + 0.1 * (double)j / nb;
        warp[j] = (1.0 - rate) * warp[j] + rate * target;
    }
    warp[0] = 0.0;
    warp[nb] = 1.0;
}

void inf_end_step(inf_layer *f) {
    if (f->balance_rate <= 0) return;
    inf_balance_update(f->warp, f->warp_counts, f->nw, f->balance_rate);
    memset(f->warp_counts, 0, sizeof(double) * (size_t)f->nw);
}

double *inf_balance_state(inf_layer *f, int64_t *n) {
    *n = f->balance_rate > 0 ? f->nw + 1 : 0;
    return f->warp;
}

/* The shard holding global block g. */
static int shard_of_block(const inf_layer *f, int g) { return g / f->per % f->ep; }

/* Elements of a sent row: the vector, then the K samples z and (window) their norms
 * (fp32; in bf16 rows each takes two bf16 slots, so the receiver's masks are the
 * owner's bit for bit). */
static int send_width(const inf_layer *f) { return f->bf16 ? f->C + 2 * f->extra : f->C + f->extra; }

/* Received row i's extras (f->extra floats: K*dz z's, then K*NORM norms); buf holds
 * them for a bf16 row. */
static const float *recv_extra(const inf_layer *f, int64_t i, float *buf) {
    const int W = send_width(f);
    if (!f->bf16) return f->recv + i * W + f->C;
    memcpy(buf, (const bf16 *)f->recv + i * W + f->C, sizeof(float) * (size_t)f->extra);
    return buf;
}

/* Receiver: per-unit weights of every received row, and the rows of each local chunk. */
static void build_block_lists(inf_layer *f, const float *params) {
    const int K = f->K, dz = f->dz, b = f->b, Hl = f->H_local;
    const int ncl = f->nc_local, cu = f->cu;
    const int64_t M = f->n_recv;
    memset(f->used, 0, (size_t)(M * ncl));
    /* wrow is written only in the chunks a row uses (zeroed when first used), which are
     * the only parts read later */
    int64_t kept = 0; /* (row, local block) pairs kept by some sample */
#pragma omp parallel for reduction(+ : kept) num_threads(f->n_threads)
    for (int64_t i = 0; i < M; i++) {
        mask_scratch *s = &f->scratch[omp_get_thread_num()];
        float xbuf[f->extra];
        int64_t *stamp = f->stamp + (size_t)omp_get_thread_num() * f->nb_local;
        const float *z = recv_extra(f, i, xbuf), *nrm = z + K * dz;
        for (int k = 0; k < K; k++) {
            if (f->mask == MASK_WINDOW) /* only this shard's part of the arc */
                inf_mask_window_part(&f->mk, z + k * dz, nrm[k * NORM], nrm[k * NORM + 1], f->local_of, s);
            else
                inf_mask_sample(&f->mk, params, z + k * dz, s, INF_MASK_WEIGHTS);
            for (int bi = 0; bi < f->kb; bi++) {
                int lb = f->local_of[s->blocks[bi]];
                if (lb < 0) continue;
                const int c = lb * b / cu;
                if (!f->used[i * ncl + c]) {
                    f->used[i * ncl + c] = 1;
                    memset(f->wrow + i * Hl + (int64_t)c * cu, 0, sizeof(float) * cu);
                }
                if (stamp[lb] != f->stamp_gen + i) {
                    stamp[lb] = f->stamp_gen + i;
                    kept++;
                }
                for (int u = 0; u < b; u++)
                    f->wrow[i * Hl + lb * b + u] += (float)f->n_keep * s->p[bi * b + u] / K;
            }
        }
    }
    f->stamp_gen += M;
    dispatch_group_by_flags(&f->by_chunk, f->used, M);
    const dispatch_groups *g = &f->by_chunk;
    f->stats.unit_rows += (double)g->start[ncl] * cu;
    f->stats.kept_rows += (double)kept * b;
    for (int c = 0; c < ncl; c++)
        for (int64_t pos = g->start[c]; pos < g->start[c + 1]; pos++)
            memcpy(f->Wt + pos * cu, f->wrow + (int64_t)g->row[pos] * Hl + c * cu, sizeof(float) * cu);
}

/* Chunk ch's GEMM pair on the rows that use it (positions base..base+rows): the
 * rows' output share into y (rows, C). */
static void chunk_forward(inf_layer *f, const float *params, const bf16 *wbf, chunk_buf *cb, int ch,
                          int64_t base, int64_t rows, float *y) {
    const int C = f->C, cu = f->cu, W = send_width(f);
    const int32_t *rl = f->by_chunk.row + base;
    float *Hp = f->Hp + base * cu, *Ac = f->Ac + base * cu, *Wt = f->Wt + base * cu;
    if (f->bf16) {
        bf16 *xg = (bf16 *)cb->xg, *aw = (bf16 *)cb->aw;
        dispatch_gather(xg, f->recv, W, rl, rows, C, sizeof(bf16));
        gemm_var_bf16(0, 1, rows, cu, C, xg, C, wbf + f->W1 + (size_t)ch * cu * C, C, Hp, cu, 0, 0,
                      params + f->b1 + (size_t)ch * cu);
        gelu_forward(Ac, Hp, rows * cu);
#pragma omp parallel for simd
        for (int64_t i = 0; i < rows * cu; i++) aw[i] = bf16_round(Ac[i] * Wt[i]);
        gemm_var_bf16(0, 0, rows, C, cu, aw, cu, wbf + f->W2 + (size_t)ch * cu * C, C, y, C, 0, 0,
                      NULL);
        return;
    }
    dispatch_gather(cb->xg, f->recv, W, rl, rows, C, sizeof(float));
    gemm_var(0, 1, rows, cu, C, cb->xg, C, params + f->W1 + (size_t)ch * cu * C, C, Hp, cu, 0,
             params + f->b1 + (size_t)ch * cu);
    gelu_forward(Ac, Hp, rows * cu);
#pragma omp parallel for simd
    for (int64_t i = 0; i < rows * cu; i++) cb->aw[i] = Ac[i] * Wt[i];
    gemm_var(0, 0, rows, C, cu, cb->aw, cu, params + f->W2 + (size_t)ch * cu * C, C, y, C, 0, NULL);
}

/* The local chunks by rows, most first (ties by index), for threads to take in turn:
 * the largest start first, so no thread is left with a large one at the end. */
static const dispatch_groups *g_sort_groups;
static int by_rows_desc(const void *a, const void *b) {
    const int x = *(const int *)a, y = *(const int *)b;
    const int64_t *st = g_sort_groups->start;
    const int64_t rx = st[x + 1] - st[x], ry = st[y + 1] - st[y];
    return rx != ry ? (rx < ry ? 1 : -1) : (x > y) - (x < y);
}

static void order_chunks(inf_layer *f) {
    for (int c = 0; c < f->nc_local; c++) f->chunk_order[c] = c;
    g_sort_groups = &f->by_chunk;
    qsort(f->chunk_order, (size_t)f->nc_local, sizeof(int), by_rows_desc);
}

/* Chunks on threads: every chunk's rows, left in its own positions of yall, added
 * into dst (rows of width W) in chunk order, as one thread adds them. */
static void add_chunks_in_order(const inf_layer *f, float *dst, int W) {
    const int64_t *start = f->by_chunk.start;
    for (int ch = 0; ch < f->nc_local; ch++) {
        int64_t base = start[ch], rows = start[ch + 1] - base;
        if (rows > 0)
            dispatch_scatter_add(dst, W, g_chunk.yall + base * f->C, f->by_chunk.row + base, rows, f->C);
    }
}

/* Receiver: one GEMM pair per local chunk on the rows that use it, the chunks' shares
 * added into rows_out in chunk order (chunks on threads of their own: docs/infinite.md). */
static void blocks_forward(inf_layer *f, const float *params, const bf16 *wbf) {
    const int C = f->C;
    const int64_t *start = f->by_chunk.start;
    par_zero(f->rows_out, sizeof(float) * (size_t)(f->n_recv * C));
    if (!f->chunks_parallel) {
        for (int ch = 0; ch < f->nc_local; ch++) {
            int64_t base = start[ch], rows = start[ch + 1] - base;
            if (rows == 0) continue;
            chunk_forward(f, params, wbf, &g_chunk.buf[0], ch, base, rows, g_chunk.buf[0].yg);
            dispatch_scatter_add(f->rows_out, C, g_chunk.buf[0].yg, f->by_chunk.row + base, rows, C);
        }
        return;
    }
    /* every chunk's rows into its own positions of yall, then added in chunk order */
    order_chunks(f);
#pragma omp parallel for schedule(dynamic, 1) num_threads(f->n_threads)
    for (int i = 0; i < f->nc_local; i++) {
        const int ch = f->chunk_order[i];
        int64_t base = start[ch], rows = start[ch + 1] - base;
        if (rows > 0)
            chunk_forward(f, params, wbf, &g_chunk.buf[omp_get_thread_num()], ch, base, rows,
                          g_chunk.yall + base * C);
    }
    add_chunks_in_order(f, f->rows_out, C);
}

/* Diagnostics of this forward, summed over all ranks; returns the KL aux loss. */
static double forward_stats(inf_layer *f, int64_t n, const ffn_context *ctx) {
    const int nb = f->nb, K = f->K, dz = f->dz, kb = f->kb;
    double *S = f->sums;
    const int S0 = nb + Z_BINS + 5; /* then the sigma histogram */
    const int SB = S0 + SIGMA_BINS; /* then the raw samples' bins (ring balance) */
    const int n_sums = SB + (f->balance_rate > 0 ? f->nw : 0);
    memset(S, 0, sizeof(double) * (size_t)n_sums);
    uint8_t *seen = f->seen;
    for (int64_t t = 0; t < n; t++) {
        memset(seen, 0, (size_t)nb);
        int active = 0;
        for (int k = 0; k < K; k++)
            for (int i = 0; i < kb; i++) {
                int bl = f->blocks_of[(t * K + k) * kb + i];
                if (!seen[bl]) active++;
                seen[bl] = 1;
            }
        for (int bl = 0; bl < nb; bl++) S[bl] += seen[bl];
        S[nb + Z_BINS + 2] += (double)active * f->b;
        if (K > 1) { /* shared blocks of samples 1 and 2 (both lists ascending) */
            const int32_t *x = f->blocks_of + (t * K) * kb, *y = x + kb;
            int i = 0, j = 0, common = 0;
            while (i < kb && j < kb) {
                if (x[i] == y[j]) { common++; i++; j++; }
                else if (x[i] < y[j]) i++;
                else j++;
            }
            S[nb + Z_BINS + 1] += (double)common / kb;
        }
        if (f->balance_rate > 0)
            for (int k = 0; k < K; k++) S[SB + f->zbin[t * K + k]] += 1;
        if (f->mask == MASK_WINDOW)
            for (int k = 0; k < K; k++) {
                float zz = f->z[(t * K + k) * dz] - floorf(f->z[(t * K + k) * dz]);
                int bin = (int)(zz * Z_BINS);
                S[nb + (bin < Z_BINS ? bin : Z_BINS - 1)] += 1;
            }
        for (int d = 0; d < dz; d++) {
            float m = f->mu[t * dz + d], sg = f->sigma[t * dz + d];
            S[nb + Z_BINS] += sg / dz;
            int sbin = (int)(sg / f->stats.sigma_hi * SIGMA_BINS);
            S[S0 + (sbin < SIGMA_BINS ? sbin : SIGMA_BINS - 1)] += 1;
            S[nb + Z_BINS + 3] += 0.5 * (m * m + sg * sg - 1.0 - 2.0 * log(sg));
        }
    }
    S[nb + Z_BINS + 4] = (double)n;
    dist_allreduce_sum_d(S, n_sums, ctx->world);
    if (ctx->training && f->balance_rate > 0)
        for (int j = 0; j < f->nw; j++) f->warp_counts[j] += S[SB + j];
    inf_stats *st = &f->stats;
    double N = S[nb + Z_BINS + 4];
    for (int bl = 0; bl < nb; bl++) st->block_tokens[bl] = (int64_t)S[bl];
    for (int i = 0; i < Z_BINS; i++) st->z_hist[i] = (int64_t)S[nb + i];
    for (int i = 0; i < SIGMA_BINS; i++) st->sigma_hist[i] = (int64_t)S[S0 + i];
    st->mean_sigma = S[nb + Z_BINS] / N;
    st->mask_overlap = K > 1 ? S[nb + Z_BINS + 1] / N : 0.0;
    st->active_units = S[nb + Z_BINS + 2] / N;
    st->n_tokens = (int64_t)N;
    st->aux_kl = ctx->training ? f->kl * S[nb + Z_BINS + 3] / N : 0.0;
    return st->aux_kl;
}

double inf_forward(inf_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx) {
    ALWAYS(n <= f->max_tokens);
    /* a training forward with ffn.samples_max draws its K; backward runs at the same K */
    f->K = ctx->training && f->K_max > f->K_train
               ? inf_train_samples(ctx->seed, ctx->step, f->K_train, f->K_max)
               : f->K_set;
    const int C = f->C, K = f->K, dz = f->dz, kb = f->kb, ep = f->ep, W = send_width(f);
    const int nn = f->mask == MASK_WINDOW ? NORM : 0;
    const size_t es = f->bf16 ? sizeof(bf16) : sizeof(float);
    f->n = n;
    f->training = ctx->training;
    inf_stats *st = &f->stats;
    double t0 = wall_time();
    router_forward(f, params, in, n, ctx);
    /* kept blocks of every sample, and the shards each token needs (item t*ep + r:
     * token t's row for shard r, sent when some sample keeps a block of r) */
    int32_t *need = f->need;
    for (int64_t i = 0; i < n * ep; i++) need[i] = -1;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++) {
        mask_scratch *s = &f->scratch[omp_get_thread_num()];
        for (int k = 0; k < K; k++) {
            const int64_t tk = t * K + k;
            if (f->mask == MASK_WINDOW) { /* the whole arc's softmax once, for every shard */
                inf_mask_sample(&f->mk, params, f->z + tk * dz, s, INF_MASK_WEIGHTS);
                f->norm[tk * NORM] = s->max;
                f->norm[tk * NORM + 1] = s->inv;
                f->norm[tk * NORM + 2] = inf_mask_window_q(&f->mk, s);
            } else {
                inf_mask_sample(&f->mk, params, f->z + tk * dz, s, INF_MASK_BLOCKS);
            }
            memcpy(f->blocks_of + tk * kb, s->blocks, sizeof(int32_t) * kb);
            for (int i = 0; i < kb; i++) {
                int shard = shard_of_block(f, s->blocks[i]);
                need[t * ep + shard] = shard;
            }
        }
    }
    /* one row per (token, shard), grouped by shard: [u | z_1 .. z_K | norms (window)] */
    int64_t rows = dispatch_order(&f->plan, need, n * ep, ep, 1, f->row_of, f->row_token);
#pragma omp parallel for
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = f->row_token[i] / ep;
        f->row_token[i] = (int32_t)t;
        if (f->bf16) {
            bf16 *row = (bf16 *)f->send + i * W;
            for (int c = 0; c < C; c++) row[c] = bf16_round(in[t * C + c]);
            memcpy(row + C, f->z + t * K * dz, sizeof(float) * K * dz);
            memcpy(row + C + 2 * K * dz, f->norm + t * K * nn, sizeof(float) * K * nn);
            continue;
        }
        float *row = f->send + i * W;
        memcpy(row, in + t * C, sizeof(float) * C);
        memcpy(row + C, f->z + t * K * dz, sizeof(float) * K * dz);
        memcpy(row + C + K * dz, f->norm + t * K * nn, sizeof(float) * K * nn);
    }
    double t1 = wall_time();
    f->n_recv = dispatch_send(&f->plan, f->send, f->recv, W, es, f->max_recv);
    double t2 = wall_time();
    build_block_lists(f, params);
    double t3 = wall_time();
    blocks_forward(f, params, ctx->wbf);
    if (f->bf16) bf16_from_f32(f->out_h, f->rows_out, f->n_recv * C);
    double t4 = wall_time();
    /* partial outputs back; they add up at the owner, which adds b2 once */
    float *partial = f->dy_send; /* free until backward */
    dispatch_reverse(&f->plan, f->bf16 ? (const void *)f->out_h : (const void *)f->rows_out,
                     partial, C, es);
    double t5 = wall_time();
    st->t_router += t1 - t0;
    st->t_alltoall += (t2 - t1) + (t5 - t4);
    st->t_masks += t3 - t2;
    st->t_units += t4 - t3;
    const float *b2 = params + f->b2;
    if (f->bf16)
        dispatch_scatter_add_bf16(out, C, (const bf16 *)partial, f->row_token, rows, C);
    else
        dispatch_scatter_add(out, C, partial, f->row_token, rows, C);
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int c = 0; c < C; c++) out[t * C + c] += b2[c];
    return forward_stats(f, n, ctx);
}

/* ---- backward ---- */

/* From daw = d loss / d (a w) of a chunk's rows: d loss / d w into wrow, and daw
 * becomes d loss / d a. */
static void weight_gradients(inf_layer *f, float *daw, int ch, const int32_t *rl, int64_t rows,
                             const float *Ac, const float *Wt) {
    const int Hl = f->H_local, cu = f->cu;
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        float *g = f->wrow + (int64_t)rl[r] * Hl + ch * cu;
        float *da = daw + r * cu;
        const float *ac = Ac + r * cu, *wt = Wt + r * cu;
#pragma omp simd
        for (int u = 0; u < cu; u++) {
            g[u] = da[u] * ac[u]; /* d loss / d w */
            da[u] *= wt[u];       /* d loss / d a */
        }
    }
}

/* One chunk's backward (see blocks_backward): the rows rl of the chunk (positions
 * base..base+rows), their output gradients in the rows dY; the chunk's weight and
 * bias gradients, d loss / d weight into wrow, and the rows' input gradients into
 * dx (rows, C). */
static void chunk_backward(inf_layer *f, const float *params, const bf16 *wbf, float *grads,
                           const void *dY, chunk_buf *cb, int ch, int64_t base, int64_t rows,
                           float *dx) {
    const int C = f->C, cu = f->cu;
    const int32_t *rl = f->by_chunk.row + base;
    const float *Hp = f->Hp + base * cu, *Ac = f->Ac + base * cu, *Wt = f->Wt + base * cu;
    if (f->bf16) {
        const bf16 *W1 = wbf + f->W1 + (size_t)ch * cu * C, *W2 = wbf + f->W2 + (size_t)ch * cu * C;
        bf16 *dy = (bf16 *)cb->yg, *aw = (bf16 *)cb->aw, *xg = (bf16 *)cb->xg;
        dispatch_gather(dy, dY, C, rl, rows, C, sizeof(bf16));
#pragma omp parallel for simd
        for (int64_t i = 0; i < rows * cu; i++) aw[i] = bf16_round(Ac[i] * Wt[i]);
        gemm_var_bf16(0, 1, rows, cu, C, dy, C, W2, C, cb->daw, cu, 0, 0, NULL);
        gemm_var_bf16(1, 0, cu, C, rows, aw, cu, dy, C, grads + f->W2 + (size_t)ch * cu * C, C, 0, 1,
                      NULL);
        weight_gradients(f, cb->daw, ch, rl, rows, Ac, Wt);
        gelu_backward_bf16(aw, Hp, cb->daw, rows * cu); /* aw <- GELU'(Hp) * daw */
        dispatch_gather(xg, f->recv, send_width(f), rl, rows, C, sizeof(bf16));
        gemm_var_bf16(1, 0, cu, C, rows, aw, cu, xg, C, grads + f->W1 + (size_t)ch * cu * C, C, 0, 1,
                      NULL);
        bias_backward_bf16(grads + f->b1 + (size_t)ch * cu, aw, rows, cu);
        gemm_var_bf16(0, 0, rows, C, cu, aw, cu, W1, C, dx, C, 0, 0, NULL);
        return;
    }
    (void)wbf;
    const float *W1 = params + f->W1 + (size_t)ch * cu * C, *W2 = params + f->W2 + (size_t)ch * cu * C;
    dispatch_gather(cb->yg, dY, C, rl, rows, C, sizeof(float));
#pragma omp parallel for simd
    for (int64_t i = 0; i < rows * cu; i++) cb->aw[i] = Ac[i] * Wt[i];
    gemm_var(0, 1, rows, cu, C, cb->yg, C, W2, C, cb->daw, cu, 0, NULL);
    gemm_var(1, 0, cu, C, rows, cb->aw, cu, cb->yg, C, grads + f->W2 + (size_t)ch * cu * C, C, 1, NULL);
    weight_gradients(f, cb->daw, ch, rl, rows, Ac, Wt);
    /* GELU backward: aw <- GELU'(Hp) * daw */
    par_zero(cb->aw, sizeof(float) * (size_t)(rows * cu));
    gelu_backward(cb->aw, Hp, cb->daw, rows * cu);
    dispatch_gather(cb->xg, f->recv, send_width(f), rl, rows, C, sizeof(float));
    gemm_var(1, 0, cu, C, rows, cb->aw, cu, cb->xg, C, grads + f->W1 + (size_t)ch * cu * C, C, 1, NULL);
    bias_backward(grads + f->b1 + (size_t)ch * cu, cb->aw, rows, cu);
    gemm_var(0, 0, rows, C, cu, cb->aw, cu, W1, C, dx, C, 0, NULL);
}

/* Receiver: block GEMMs backward; fills rows_back with [d u | A_k | S_k] per row. */
static void blocks_backward(inf_layer *f, const float *params, const bf16 *wbf, float *grads,
                            const void *dY) {
    const int C = f->C, K = f->K, dz = f->dz, b = f->b, Hl = f->H_local;
    const int WB = C + K * dz + K;
    const int64_t M = f->n_recv, *start = f->by_chunk.start;
    par_zero(f->rows_back, sizeof(float) * (size_t)(M * WB));
    /* wrow becomes d loss / d weight per unit; units a row does not use keep weight 0 and
     * are never read, so only the chunks computed are written (each chunk its own
     * columns; the input gradients are added in chunk order, as in the forward) */
    if (!f->chunks_parallel) {
        for (int ch = 0; ch < f->nc_local; ch++) {
            int64_t base = start[ch], rows = start[ch + 1] - base;
            if (rows == 0) continue;
            chunk_backward(f, params, wbf, grads, dY, &g_chunk.buf[0], ch, base, rows,
                           g_chunk.buf[0].yg);
            dispatch_scatter_add(f->rows_back, WB, g_chunk.buf[0].yg, f->by_chunk.row + base, rows, C);
        }
    } else { /* as in blocks_forward: chunks most rows first, then added in chunk order */
#pragma omp parallel for schedule(dynamic, 1) num_threads(f->n_threads)
        for (int i = 0; i < f->nc_local; i++) {
            const int ch = f->chunk_order[i];
            int64_t base = start[ch], rows = start[ch + 1] - base;
            if (rows > 0)
                chunk_backward(f, params, wbf, grads, dY, &g_chunk.buf[omp_get_thread_num()], ch, base,
                               rows, g_chunk.yall + base * C);
        }
        add_chunks_in_order(f, f->rows_back, WB);
    }
    double t_mask0 = wall_time();
    /* the masks' share: per row and sample, A = n_keep sum p g de/dz and S = sum p g over
     * this shard's kept units (g = d loss / d m = d loss / d w / K); window rule: A minus
     * this shard's part of the normaliser term, n_keep S Q */
    if (f->mask == MASK_LEARNED)
        for (int t = 0; t < f->n_threads; t++)
            memset(f->scratch[t].grad_pq, 0, sizeof(float) * (size_t)(f->H * dz + f->H));
#pragma omp parallel for
    for (int64_t i = 0; i < M; i++) {
        mask_scratch *s = &f->scratch[omp_get_thread_num()];
        float xbuf[f->extra];
        const float *z = recv_extra(f, i, xbuf), *nrm = z + K * dz;
        float *A = f->rows_back + i * WB + C, *S = A + K * dz;
        for (int k = 0; k < K; k++) {
            if (f->mask == MASK_WINDOW)
                inf_mask_window_part(&f->mk, z + k * dz, nrm[k * NORM], nrm[k * NORM + 1], f->local_of, s);
            else
                inf_mask_sample(&f->mk, params, z + k * dz, s, INF_MASK_DEDZ);
            for (int bi = 0; bi < f->kb; bi++) {
                int lb = f->local_of[s->blocks[bi]];
                if (lb < 0) continue;
                if (f->mask == MASK_WINDOW) { /* dz = 1: vectorised */
                    const float *p = s->p + bi * b, *de = s->dedz + bi * b, *g = f->wrow + i * Hl + lb * b;
                    float sa = 0.0f, ss = 0.0f;
#pragma omp simd reduction(+ : sa, ss)
                    for (int u = 0; u < b; u++) {
                        float pg = p[u] * g[u];
                        ss += pg;
                        sa += pg * de[u];
                    }
                    S[k] += ss / K;
                    A[k] += f->n_keep * sa / K;
                    continue;
                }
                for (int u = 0; u < b; u++) {
                    int o = bi * b + u;
                    float pg = s->p[o] * f->wrow[i * Hl + lb * b + u] / K;
                    S[k] += pg;
                    for (int d = 0; d < dz; d++) A[k * dz + d] += f->n_keep * pg * s->dedz[(size_t)o * dz + d];
                    if (f->mask == MASK_LEARNED) {
                        int j = s->blocks[bi] * b + u;
                        for (int d = 0; d < dz; d++) s->grad_pq[(size_t)j * dz + d] += f->n_keep * pg * z[k * dz + d];
                        s->grad_pq[(size_t)f->H * dz + j] += f->n_keep * pg;
                    }
                }
            }
            if (f->mask == MASK_WINDOW) {
                /* the normaliser's share, Q = sum over all kept units of p de/dz (the
                 * owner's, sent with z), is the same for every shard, so the shard
                 * subtracts n_keep S Q itself: the owner then only sums A */
                A[k] -= f->n_keep * S[k] * nrm[k * NORM + 2];
            }
        }
    }
    if (f->mask == MASK_LEARNED)
        for (int t = 0; t < f->n_threads; t++) {
            float *gp = f->scratch[t].grad_pq;
            for (int64_t j = 0; j < (int64_t)f->H * dz; j++) grads[f->P + j] += gp[j];
            for (int j = 0; j < f->H; j++) grads[f->q + j] += gp[(size_t)f->H * dz + j];
        }
    f->stats.t_masks += wall_time() - t_mask0;
}

void inf_backward(inf_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx) {
    ALWAYS(n == f->n);
    const int C = f->C, K = f->K, dz = f->dz, R = f->R, WB = C + K * dz + K;
    /* bf16 back rows: d u in bf16, then A and S in fp32, two bf16 slots each */
    const int bf = f->bf16, WBh = C + 2 * (K * dz + K);
    const size_t es = bf ? sizeof(bf16) : sizeof(float);
    const int64_t rows = f->plan.n_send;
    /* 1. dy to the shards along the forward plan */
    inf_stats *st = &f->stats;
    double t0 = wall_time();
#pragma omp parallel for
    for (int64_t i = 0; i < rows; i++) {
        const float *d = dout + (int64_t)f->row_token[i] * C;
        if (bf)
            for (int c = 0; c < C; c++) ((bf16 *)f->dy_send)[i * C + c] = bf16_round(d[c]);
        else
            memcpy(f->dy_send + i * C, d, sizeof(float) * C);
    }
    dispatch_forward(&f->plan, f->dy_send, f->rows_out, C, es);
    double t1 = wall_time(), masks_before = st->t_masks;
    blocks_backward(f, params, ctx->wbf, grads, f->rows_out);
    if (bf)
#pragma omp parallel for
        for (int64_t i = 0; i < f->n_recv; i++) {
            const float *src = f->rows_back + i * WB;
            bf16 *dst = f->back_h + i * WBh;
            for (int c = 0; c < C; c++) dst[c] = bf16_round(src[c]);
            memcpy(dst + C, src + C, sizeof(float) * (size_t)(K * dz + K));
        }
    double t2 = wall_time();
    st->t_units += (t2 - t1) - (st->t_masks - masks_before);
    dispatch_reverse(&f->plan, bf ? (const void *)f->back_h : (const void *)f->rows_back, f->back,
                     bf ? WBh : WB, es);
    double t3 = wall_time();
    st->t_alltoall += (t1 - t0) + (t3 - t2);
    /* 2. owner: input gradients, and the per-sample sums A and S over all shards */
    float *Atot = f->Atot, *Stot = f->Stot;
    par_zero(Atot, sizeof(float) * (size_t)(n * K * dz));
    par_zero(Stot, sizeof(float) * (size_t)(n * K));
    /* token by token, its rows in send order (ascending shard): the serial order */
    const int ep = f->ep;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++)
        for (int r = 0; r < ep; r++) {
            const int64_t i = f->row_of[t * ep + r];
            if (i < 0) continue;
            float sums[K * dz + K];
            const float *as; /* A (K*dz), then S (K) */
            if (bf) {
                const bf16 *bh = (const bf16 *)f->back + i * WBh;
                for (int c = 0; c < C; c++) din[t * C + c] += bf16_float(bh[c]);
                memcpy(sums, bh + C, sizeof sums);
                as = sums;
            } else {
                const float *bk = f->back + i * WB;
                for (int c = 0; c < C; c++) din[t * C + c] += bk[c];
                as = bk + C;
            }
            for (int j = 0; j < K * dz; j++) Atot[t * K * dz + j] += as[j];
            for (int k = 0; k < K; k++) Stot[t * K + k] += as[K * dz + k];
        }
    bias_backward(grads + f->b2, dout, n, C);
    /* 3. d z = A - n_keep S sum_{kept} p de/dz (window: the shards did the second term);
     * learned: the S share of d/dP, d/dq */
    if (f->mask == MASK_LEARNED)
        for (int t = 0; t < f->n_threads; t++)
            memset(f->scratch[t].grad_pq, 0, sizeof(float) * (size_t)(f->H * dz + f->H));
    double N = (double)f->stats.n_tokens, kl_scale = f->training && f->kl > 0 ? f->kl * ctx->world_size / N : 0.0;
#pragma omp parallel for
    for (int64_t t = 0; t < n; t++) {
        mask_scratch *s = &f->scratch[omp_get_thread_num()];
        for (int d = 0; d < dz; d++) f->dmu[t * dz + d] = f->dsig[t * dz + d] = 0.0f;
        for (int k = 0; k < K; k++) {
            if (f->mask == MASK_WINDOW) { /* the shards subtracted n_keep S Q already */
                float g = Atot[t * K + k];
                if (f->balance_rate > 0) g *= f->zslope[t * K + k]; /* through the ring warp */
                f->dmu[t] += g;
                f->dsig[t] += g * f->eps[t * K + k];
                continue;
            }
            const float *z = f->z + (t * K + k) * dz;
            inf_mask_sample(&f->mk, params, z, s, INF_MASK_DEDZ);
            float St = Stot[t * K + k];
            for (int d = 0; d < dz; d++) {
                float Q = 0.0f;
                for (int o = 0; o < f->n_keep; o++) Q += s->p[o] * s->dedz[(size_t)o * dz + d];
                float g = Atot[(t * K + k) * dz + d] - f->n_keep * St * Q;
                f->dmu[t * dz + d] += g;
                f->dsig[t * dz + d] += g * f->eps[(t * K + k) * dz + d];
            }
            if (f->mask == MASK_LEARNED)
                for (int bi = 0; bi < f->kb; bi++)
                    for (int u = 0; u < f->b; u++) {
                        int j = s->blocks[bi] * f->b + u;
                        float c = -f->n_keep * s->p[bi * f->b + u] * St;
                        for (int d = 0; d < dz; d++) s->grad_pq[(size_t)j * dz + d] += c * z[d];
                        s->grad_pq[(size_t)f->H * dz + j] += c;
                    }
        }
        for (int d = 0; d < dz; d++) {
            float m = f->mu[t * dz + d], sg = f->sigma[t * dz + d];
            f->dmu[t * dz + d] += (float)(kl_scale * m);
            f->dsig[t * dz + d] += (float)(kl_scale * (sg - 1.0f / sg));
            f->dsig[t * dz + d] *= sigmoidf(f->spre[t * dz + d]); /* now d / d pre-softplus */
        }
    }
    if (f->mask == MASK_LEARNED)
        for (int t = 0; t < f->n_threads; t++) {
            float *gp = f->scratch[t].grad_pq;
            for (int64_t j = 0; j < (int64_t)f->H * dz; j++) grads[f->P + j] += gp[j];
            for (int j = 0; j < f->H; j++) grads[f->q + j] += gp[(size_t)f->H * dz + j];
        }
    /* 4. router MLP */
    gemm(1, 0, dz, R, n, f->dmu, dz, f->r, R, grads + f->Wm, R, 1, NULL);
    gemm(1, 0, dz, R, n, f->dsig, dz, f->r, R, grads + f->Ws, R, 1, NULL);
    for (int64_t t = 0; t < n; t++)
        for (int d = 0; d < dz; d++) {
            grads[f->bm + d] += f->dmu[t * dz + d];
            grads[f->bs + d] += f->dsig[t * dz + d];
        }
    gemm(0, 0, n, R, dz, f->dmu, dz, params + f->Wm, R, f->dr, R, 0, NULL);
    gemm(0, 0, n, R, dz, f->dsig, dz, params + f->Ws, R, f->dr, R, 1, NULL);
    float *dpre = f->r; /* r is no longer needed */
    par_zero(dpre, sizeof(float) * (size_t)(n * R));
    gelu_backward(dpre, f->pre_r, f->dr, n * R);
    matmul_backward(din, grads + f->A, grads + f->a, dpre, in, params + f->A, n, C, R);
    st->t_router += wall_time() - t3;
}

/* ---- statistics and the log line (ffn.h) ---- */

void inf_stats_describe(const inf_layer *f, stats_layer_desc *d) {
    memset(d, 0, sizeof *d);
    d->layer = f->layer;
    d->kind = ffn_kind_name(FFN_INFINITE);
    d->bucket = "block";
    d->n_buckets = f->stats.n_blocks;
    d->n_aux = 1;
    d->aux_names[0] = "kl";
    if (f->mask == MASK_WINDOW) { /* z mod 1 on the ring */
        d->z_bins = f->stats.n_bins;
        d->z_lo = 0.0;
        d->z_hi = 1.0;
    }
    d->sigma_bins = f->stats.n_sigma_bins;
    d->sigma_lo = 0.0;
    d->sigma_hi = f->stats.sigma_hi;
}

void inf_stats_row(const inf_layer *f, stats_row *r) {
    const inf_stats *st = &f->stats;
    memset(r, 0, sizeof *r);
    r->tokens = st->block_tokens;
    r->n_tokens = r->assignments = st->n_tokens;
    r->aux[0] = st->aux_kl;
    r->z_hist = st->z_hist;
    r->sigma_hist = st->sigma_hist;
    r->mean_sigma = st->mean_sigma;
    r->mask_overlap = st->mask_overlap;
    r->active_units = st->active_units;
}

/* Routing is the router MLP, sampling, the masks (owner and shards) and packing rows;
 * ∞-MoE has no separate dispatch phase. */
void inf_phase_times(const inf_layer *f, double t[4]) {
    t[0] = f->stats.t_router + f->stats.t_masks;
    t[1] = 0.0;
    t[2] = f->stats.t_alltoall;
    t[3] = f->stats.t_units;
}

void inf_phase_detail(const inf_layer *f, double t[4]) {
    t[0] = f->stats.t_router;
    t[1] = f->stats.t_masks;
    t[2] = f->stats.t_units;
    t[3] = f->stats.t_alltoall;
}

void inf_shard_work(const inf_layer *f, double w[2]) {
    w[0] = f->stats.unit_rows;
    w[1] = f->stats.kept_rows;
}

int inf_chunk_units(const inf_layer *f) { return f->cu; }

void inf_log_fields(const inf_layer *const *layers, int n, char *buf, size_t cap) {
    double sigma = 0.0, active = 0.0, overlap = 0.0, min_use = 1e300;
    for (int l = 0; l < n; l++) {
        const inf_stats *st = &layers[l]->stats;
        sigma += st->mean_sigma / n;
        active += st->active_units / n;
        overlap += st->mask_overlap / n;
        double tot = 0.0, lo = 1e300;
        for (int b = 0; b < st->n_blocks; b++) {
            tot += (double)st->block_tokens[b];
            if ((double)st->block_tokens[b] < lo) lo = (double)st->block_tokens[b];
        }
        if (tot > 0 && lo * st->n_blocks / tot < min_use) min_use = lo * st->n_blocks / tot;
    }
    int len = snprintf(buf, cap, " | sigma %.4f | active units %.0f | overlap %.3f | min block use %.2f",
                       sigma, active, overlap, min_use);
    /* a drawn training K (ffn.samples_max): the one this step ran at, which the fields above follow */
    if (n > 0 && layers[0]->K_max > layers[0]->K_train && len >= 0 && (size_t)len < cap)
        snprintf(buf + len, cap - (size_t)len, " | K %d", layers[0]->K);
}

/* ---- reference and fingerprint (tests) ---- */

void inf_reference_forward(const inf_layer *f, const float *params, float *out, const float *in,
                           int64_t n) {
    ALWAYS(f->ep == 1 && n == f->n);
    const int C = f->C, H = f->H, K = f->K, dz = f->dz, b = f->b;
    float *w = xcalloc((size_t)H, sizeof(float)), *h = xcalloc((size_t)H, sizeof(float));
    float *y = xcalloc((size_t)C, sizeof(float));
    mask_scratch *s = &f->scratch[0];
    for (int64_t t = 0; t < n; t++) {
        memset(w, 0, sizeof(float) * H);
        for (int k = 0; k < K; k++) {
            inf_mask_sample(&f->mk, params, f->z + (t * K + k) * dz, s, INF_MASK_WEIGHTS);
            for (int bi = 0; bi < f->kb; bi++)
                for (int u = 0; u < b; u++) w[s->blocks[bi] * b + u] += (float)f->n_keep * s->p[bi * b + u] / K;
        }
        /* every unit, densely; the mask multiplies afterwards */
        gemm_naive(0, 1, 1, H, C, in + t * C, C, params + f->W1, C, h, H, 0, params + f->b1);
        for (int j = 0; j < H; j++) {
            float x = h[j];
            h[j] = w[j] * 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        }
        gemm_naive(0, 0, 1, C, H, h, H, params + f->W2, C, y, C, 0, params + f->b2);
        for (int c = 0; c < C; c++) out[t * C + c] += y[c];
    }
    free(w);
    free(h);
    free(y);
}

uint64_t inf_routing_hash(const inf_layer *f) {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t i = 0; i < f->n * f->K * f->kb; i++) h = (h ^ (uint64_t)(uint32_t)f->blocks_of[i]) * 1099511628211ULL;
    if (f->balance_rate > 0) /* the warp is piecewise linear: which piece each sample is on */
        for (int64_t i = 0; i < f->n * f->K; i++) h = (h ^ (uint64_t)(uint32_t)f->zbin[i]) * 1099511628211ULL;
    return h;
}

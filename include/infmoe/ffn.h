/*
 * ffn: the feed-forward layer of each block, behind one interface so the
 * variants (ffn.kind) are interchangeable and nothing outside this module
 * needs to know which one a layer is:
 *   dense      the GPT-2 MLP: in (N,C) -> fc (H,C) + GELU -> proj (C,H) -> out (N,C)
 *   topk, moge discrete Mixture-of-Experts (moe.h), in layers every-1, 2*every-1, ...
 *              of the model (ffn.every); the other layers are dense
 *   infinite   ∞-MoE (infinite.h), in the same layers
 *
 * The entry points, in the order a run meets them:
 *   ffn_init             register the layer's replicated parameters, allocate its
 *                        buffers and its dispatch plan
 *   ffn_register_sharded register its expert-sharded parameters (a second pass, so
 *                        every sharded tensor lies after every replicated one)
 *   ffn_forward          out += FFN(in): the layer adds into the residual stream;
 *                        returns the layer's aux loss
 *   ffn_backward         din += dFFN/din . dout, and the parameter gradients
 *   ffn_end_step         once per training step, after the update
 *   ffn_stats_describe / ffn_stats_row / ffn_phase_times
 *                        what the layer writes to stats.h5 (statsfile.h)
 *   ffn_log_fields       what the layers add to the training log line
 *   ffn_state            extra state a checkpoint carries (the collapse guard)
 *   ffn_free
 * A layer keeps what its backward needs (saved activations) itself. Only ffn.c
 * looks at which variant a layer is; the fields of ffn_layer are its own.
 */
#ifndef INFMOE_FFN_H
#define INFMOE_FFN_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "infmoe/bf16.h"
#include "infmoe/config.h"
#include "infmoe/statsfile.h"
#include "infmoe/tensor.h"

/* What a layer needs to know about the step it runs in (set by the trainer). */
typedef struct {
    MPI_Comm world, ep_comm; /* MPI_COMM_NULL: a model built for its tensor table only */
    int world_size, ep, ep_rank;
    uint64_t seed;
    int step, total_steps;
    int64_t token_offset; /* global index of this rank's first token of the step */
    int training;         /* noise, jitter, aux losses and the guard only in training */
    int bf16;             /* bf16 precision: products on bf16 operands (ops.h) */
    const bf16 *wbf;      /* then: the parameters rounded to bf16, at the params' offsets */
} ffn_context;

typedef struct moe_layer moe_layer;
typedef struct inf_layer inf_layer;
typedef struct dense_layer dense_layer;

typedef struct {
    ffn_kind kind; /* FFN_DENSE for dense layers of an MoE model too */
    int layer;
    int64_t max_tokens;
    dense_layer *dense; /* exactly one of these three is set */
    moe_layer *moe;
    inf_layer *inf;
    /* ffn.shared_hidden > 0: a dense FFN every token uses beside the routed one
     * (replicated), its output added to theirs; ybuf holds one of the two outputs */
    dense_layer *shared;
    float *ybuf;
    double shared_share; /* last training forward: its share of the output norm (global) */
} ffn_layer;

/* Whether layers of `kind` draw samples per token (the ∞-MoE inference knob). */
int ffn_kind_has_samples(ffn_kind kind);

/*
 * Layer `layer`'s variant (from cfg->ffn_kind and ffn.every): register its
 * replicated parameters ("h.<layer>.ffn.*", or the router) and allocate for
 * max_tokens. ctx gives the expert-parallel layout and the communicators the
 * layer's dispatch plan is made on; NULL is for dense layers and for a build
 * of the tensor table alone (max_tokens 0).
 */
void ffn_init(ffn_layer *f, const run_config *cfg, int layer, tensor_table *tab,
              int64_t max_tokens, const ffn_context *ctx);
void ffn_register_sharded(ffn_layer *f, tensor_table *tab);
/* Floats of scratch ffn_backward needs for n tokens (shared between layers). */
size_t ffn_scratch_floats(const ffn_layer *f, int64_t n);
/* out (n,C) += FFN(in (n,C)); returns the aux loss (0 outside training) */
double ffn_forward(ffn_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx);
/* din (n,C) += ; parameter gradients += into grads */
void ffn_backward(ffn_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, float *scratch, const ffn_context *ctx);
void ffn_end_step(ffn_layer *f, const ffn_context *ctx);
/* Samples per token from now on, or the deterministic z = mu (layers that sample). */
void ffn_set_samples(ffn_layer *f, int samples, int deterministic);
/* Multiply-adds per token in the FFN's matrices (for FLOP counts). */
double ffn_matmul_params_per_token(const ffn_layer *f);
/* The same for the last forward as run: ∞-MoE counts the units its tokens used
 * (the union of their samples' blocks, so it follows K at inference). */
double ffn_active_params_per_token(const ffn_layer *f);

/*
 * Routing statistics (docs/stats.md). ffn_stats_describe fills d and returns 1
 * for a layer that has rows in stats.h5 (MoE and ∞-MoE), 0 for a dense one.
 * ffn_stats_row fills a row from the last training forward's counters (global
 * over the ranks; the pointers in it point into the layer); its timers are
 * left 0: ffn_phase_times gives this rank's cumulative seconds in the phases
 * route, dispatch, all-to-all and expert compute, forward and backward.
 */
int ffn_stats_describe(const ffn_layer *f, stats_layer_desc *d);
void ffn_stats_row(const ffn_layer *f, stats_row *r);
void ffn_phase_times(const ffn_layer *f, double t[4]);

/*
 * The log line's routing fields for layers[0..n) (" | aux ... | load max/mean
 * ..." for MoE, " | sigma ... | active units ..." for ∞-MoE; "" when every layer
 * is dense), with aux_loss the model's summed aux loss.
 */
void ffn_log_fields(const ffn_layer *layers, int n, double aux_loss, char *buf, size_t cap);

/* State beyond the parameters that a checkpoint saves and restores bit for bit. */
typedef struct {
    const char *name; /* stored as state/h.<layer>.<name> */
    double *data;
    int64_t n;
} ffn_state_array;
/* The layer's state arrays: fills up to cap of them into s and returns how many. */
int ffn_state(ffn_layer *f, ffn_state_array *s, int cap);

/*
 * For tests: the naive reference of the last forward's computation under the
 * same routing (every expert or unit with gemm_naive; all of them must be on
 * this rank), added into out (n,C); and a fingerprint of that routing, so a
 * finite-difference probe can tell when a perturbation changed it.
 */
void ffn_reference_forward(const ffn_layer *f, const float *params, float *out, const float *in,
                           int64_t n);
uint64_t ffn_routing_hash(const ffn_layer *f);
void ffn_free(ffn_layer *f);

#endif

/*
 * moe: discrete Mixture-of-Experts FFN layers (ffn.kind topk and moge).
 *
 * Per layer and step, forward:
 *   route locally (fp32): router logits -> noisy top-k (Shazeer) or Switch
 *   softmax -> optional collapse guard -> capacity in token order;
 *   aux losses from global per-expert sums (one small allreduce), so a run's
 *   numbers do not depend on the rank count;
 *   dispatch the kept (token, expert) rows to the ranks holding the experts
 *   (dispatch.h), one GEMM pair per local expert on its gathered rows, rows
 *   back, out[token] += gate * expert_output.
 * Backward mirrors it, then differentiates the gates and aux losses into the
 * router and the token vectors. Formulas: docs/moe.md.
 */
#ifndef INFMOE_MOE_H
#define INFMOE_MOE_H

#include <mpi.h>
#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/dispatch.h"
#include "infmoe/tensor.h"

/* What a layer needs to know about the step it runs in (set by the trainer). */
typedef struct {
    MPI_Comm world, ep_comm;
    int world_size, ep, ep_rank;
    uint64_t seed;
    int step, total_steps;
    int64_t token_offset; /* global index of this rank's first token of the step */
    int training;         /* noise, jitter, aux losses and the guard only in training */
} ffn_context;

/* Routing counters of the last training forward, reduced over all ranks. */
typedef struct {
    int64_t *tokens;      /* (E) kept assignments per expert */
    int64_t assignments;  /* tokens x k */
    int64_t dropped;      /* assignments over capacity */
    int64_t n_tokens;
    double aux_importance, aux_load, aux_switch, aux_z, aux_moge;
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

typedef struct moe_layer moe_layer;

/* Register the router (replicated) parameters of layer `layer`; allocate for max_tokens. */
moe_layer *moe_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      int ep, int ep_rank);
/* Register this rank's experts (sharded; called after every replicated tensor). */
void moe_register_experts(moe_layer *m, tensor_table *tab);
/* out (n,C) += MoE(in (n,C)); returns the layer's aux loss (0 outside training). */
double moe_forward(moe_layer *m, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx);
/* din (n,C) += ; router and expert gradients += into grads. */
void moe_backward(moe_layer *m, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx);
/* Called once per training step after the update: advances the collapse guard. */
void moe_end_step(moe_layer *m, const ffn_context *ctx);
const moe_stats *moe_get_stats(const moe_layer *m);
/* The collapse guard's running assignment totals (E doubles), saved in checkpoints. */
double *moe_guard_totals(moe_layer *m);
int moe_num_experts(const moe_layer *m);
/* Multiply-adds per token through the active experts. */
double moe_matmul_params_per_token(const moe_layer *m);
void moe_free(moe_layer *m);

/*
 * The naive per-token reference of the last forward's expert computation, for
 * tests: with the routing of the last moe_forward (choices, gates, drops), each
 * token's kept experts are evaluated one by one with gemm_naive and added to out.
 * All experts must be local (ep = 1).
 */
void moe_reference_forward(const moe_layer *m, const float *params, float *out, const float *in,
                           int64_t n);
/* A fingerprint of the last forward's routing (choices and drops). */
uint64_t moe_routing_hash(const moe_layer *m);

/* The most-square r x c map of E experts (r <= c); r = 1 when E has none. */
void moe_grid(int E, int *rows, int *cols);

#endif

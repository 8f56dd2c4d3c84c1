/*
 * moe: discrete Mixture-of-Experts FFN layers (ffn.kind topk and moge).
 *
 * Per layer and step, forward:
 *   route locally (fp32): router logits -> noisy top-k (Shazeer) or Switch
 *   softmax -> optional collapse guard -> capacity in token order; or, with
 *   ffn.groups, hierarchically: a noisy top-k over groups of experts, then one
 *   within each chosen group;
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

#include <stddef.h>
#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/ffn.h"
#include "infmoe/statsfile.h"
#include "infmoe/tensor.h"

typedef struct moe_layer moe_layer;

/*
 * Register the router (replicated) parameters of layer `layer`; allocate for
 * max_tokens and plan the exchange over ctx->ep_comm (ctx NULL: a build of the
 * tensor table alone, which can never exchange; ffn_init refuses it otherwise).
 */
moe_layer *moe_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      const ffn_context *ctx);
/* Register this rank's experts (sharded; called after every replicated tensor). */
void moe_register_experts(moe_layer *m, tensor_table *tab);
/* out (n,C) += MoE(in (n,C)); returns the layer's aux loss (0 outside training). */
double moe_forward(moe_layer *m, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx);
/* din (n,C) += ; router and expert gradients += into grads. */
void moe_backward(moe_layer *m, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx);
/* Called once per training step after the update: advances the collapse guard and
 * the expert bias. */
void moe_end_step(moe_layer *m, const ffn_context *ctx);
/* The layer's stats.h5 description, its last training forward's row, its phase timers (ffn.h). */
void moe_stats_describe(const moe_layer *m, stats_layer_desc *d);
void moe_stats_row(const moe_layer *m, stats_row *r);
void moe_phase_times(const moe_layer *m, double t[4]);
/* " | aux A | load max/mean X | dropped D%" over n layers (the worst load, all drops). */
void moe_log_fields(const moe_layer *const *layers, int n, double aux_loss, char *buf, size_t cap);
/* The collapse guard's running assignment totals (E doubles), saved in checkpoints. */
double *moe_guard_totals(moe_layer *m);
/* The aux-loss-free balancing bias (E doubles; NULL when ffn.expert_bias_rate is 0). */
double *moe_expert_bias(moe_layer *m);
/*
 * The bias update after a step (DeepSeek-V3): bias[e] += rate * sign(mean - chosen[e]),
 * with chosen the step's global choices per expert (before capacity).
 */
void moe_bias_update(double *bias, const double *chosen, int E, double rate);
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

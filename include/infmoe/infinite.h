/*
 * infinite: the ∞-MoE FFN (ffn.kind: infinite; docs/infinite.md).
 *
 * One large FFN of H units (W1 [H,C], b1 [H], W2 [H,C] unit-major, b2 [C]). A
 * router MLP maps a token u to a diagonal Gaussian (mu, sigma) in R^dz; each of
 * K samples z = mu + sigma * eps keeps the top N% of the units, chosen in blocks
 * of mask_block units (the window rule: the arc of units nearest z on a ring;
 * the learned rule: the best blocks under scores P z + q), weighted by a
 * softmax over the kept units; the K masks are averaged:
 *   y = sum_j w_j W2[j] GELU(W1[j] u + b1[j]) + b2,  w = (1/K) sum_k m^(k)
 *
 * The units are split into ep contiguous shards. A token's row [u | z_1..z_K]
 * goes only to the ranks whose shard holds one of its kept blocks; each rank
 * recomputes the masks from z (the same arithmetic as the owner's), runs one
 * GEMM pair per unit block on the rows that use it, and sends back its partial
 * output; partial outputs add up at the owner, which adds b2 once. Backward
 * sends dy the same way and returns, with the input gradient, the per-sample
 * partial sums the owner needs to finish d loss / d z across shards.
 */
#ifndef INFMOE_INFINITE_H
#define INFMOE_INFINITE_H

#include <stddef.h>
#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/ffn.h"
#include "infmoe/statsfile.h"
#include "infmoe/tensor.h"

typedef struct inf_layer inf_layer;

/*
 * Register the replicated parameters of layer `layer` (router, scores, b2);
 * allocate for max_tokens and plan the exchange over ctx->ep_comm (ctx NULL: a
 * build of the tensor table alone, which can never exchange).
 */
inf_layer *inf_create(const run_config *cfg, int layer, tensor_table *tab, int64_t max_tokens,
                      const ffn_context *ctx);
/* Register this rank's shard of the units (called after every replicated tensor). */
void inf_register_units(inf_layer *f, tensor_table *tab);
/* out (n,C) += FFN(in (n,C)); returns the aux (KL) loss in training, else 0. */
double inf_forward(inf_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx);
void inf_backward(inf_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, const ffn_context *ctx);
/* Samples per token from now on (inference knob); deterministic: one sample z = mu. */
void inf_set_samples(inf_layer *f, int samples, int deterministic);
/* The K of a training step when ffn.samples_max is set: uniform on lo..hi, a
 * function of (seed, step) alone, so every rank and a resumed run draw the same. */
int inf_train_samples(uint64_t seed, int step, int lo, int hi);
/* The samples per token of the last forward (tests). */
int inf_samples(const inf_layer *f);
/* Ring balance (ffn.balance_rate, window rule): the knots' update from a step's
 * global counts of raw samples per block (unit-tested); once per training step;
 * the knots as checkpoint state (n = 0 when balance is off). */
void inf_balance_update(double *warp, const double *counts, int nb, double rate);
void inf_end_step(inf_layer *f);
double *inf_balance_state(inf_layer *f, int64_t *n);
/*
 * The layer's stats.h5 description, the last forward's row (unit blocks as
 * buckets: the tokens using each; sigma, overlap, active units; z and sigma
 * histograms), its phase timers (ffn.h).
 */
void inf_stats_describe(const inf_layer *f, stats_layer_desc *d);
void inf_stats_row(const inf_layer *f, stats_row *r);
void inf_phase_times(const inf_layer *f, double t[4]);
/* Cumulative seconds in the router, the shards' masks, the unit GEMMs and the
 * all-to-alls (finer than the four stats phases; for bench_infinite). */
void inf_phase_detail(const inf_layer *f, double t[4]);
/* This shard's forward work since the layer was created, in unit rows (rows x units):
 * w[0] computed (whole chunks), w[1] kept by the rows' masks (the rest ran at weight 0). */
void inf_shard_work(const inf_layer *f, double w[2]);
/* Units per compute chunk as built (ffn.chunk_units rounded to whole blocks). */
int inf_chunk_units(const inf_layer *f);
/* " | sigma S | active units A | overlap O | min block use U" over n layers: means of
 * the first three, and the least used block's share of the mean (0: a block idles). */
void inf_log_fields(const inf_layer *const *layers, int n, char *buf, size_t cap);
/* Multiply-adds per token in the FFN's matrices: K samples x kept units x 2C. */
double inf_matmul_params_per_token(const inf_layer *f);
double inf_active_params_per_token(const inf_layer *f);
/*
 * The masked dense reference of the last forward: every unit of the full FFN
 * computed densely, multiplied by the per-unit weights of the last routing.
 * All units must be local (ep = 1). out (n,C) +=.
 */
void inf_reference_forward(const inf_layer *f, const float *params, float *out, const float *in,
                           int64_t n);
/* Fingerprint of the last forward's kept blocks. */
uint64_t inf_routing_hash(const inf_layer *f);
void inf_free(inf_layer *f);

#endif

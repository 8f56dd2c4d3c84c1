/*
 * ffn: the feed-forward layer of each block, behind one interface so the
 * variants (ffn.kind) are interchangeable:
 *   dense      the GPT-2 MLP: in (N,C) -> fc (H,C) + GELU -> proj (C,H) -> out (N,C)
 *   topk, moge discrete Mixture-of-Experts (moe.h), in layers every-1, 2*every-1, ...
 *              of the model (ffn.every); the other layers are dense
 *   infinite   ∞-MoE (infinite.h), in the same layers
 *
 * The entry points:
 *   ffn_init             register the layer's replicated parameters
 *   ffn_register_sharded register its expert-sharded parameters (a second pass, so
 *                        every sharded tensor lies after every replicated one)
 *   ffn_forward          out += FFN(in): the layer adds into the residual stream;
 *                        returns the layer's aux loss
 *   ffn_backward         din += dFFN/din . dout, and the parameter gradients
 *   ffn_end_step         once per training step, after the update
 *   ffn_free
 * A layer keeps what its backward needs (saved activations) itself.
 */
#ifndef INFMOE_FFN_H
#define INFMOE_FFN_H

#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/infinite.h"
#include "infmoe/moe.h"
#include "infmoe/tensor.h"

typedef struct {
    ffn_kind kind;     /* FFN_DENSE for dense layers of an MoE model too */
    moe_layer *moe;    /* discrete MoE layers only */
    inf_layer *inf;    /* ∞-MoE layers only */
    int C, H;
    int64_t max_tokens;
    /* parameter offsets in the model's buffers */
    size_t fc_w, fc_b, proj_w, proj_b;
    /* saved for backward: pre-activation and GELU output, (max_tokens, H) each */
    float *pre, *act;
} ffn_layer;

/*
 * Register layer `layer`'s replicated parameters ("h.<layer>.ffn.*" or the MoE
 * router) and allocate its buffers; ep and ep_rank place its experts.
 */
void ffn_init(ffn_layer *f, const run_config *cfg, int layer, tensor_table *tab,
              int64_t max_tokens, int ep, int ep_rank);
void ffn_register_sharded(ffn_layer *f, tensor_table *tab);
/* Floats of scratch ffn_backward needs for n tokens (shared between layers). */
size_t ffn_scratch_floats(const ffn_layer *f, int64_t n);
/* out (n,C) += FFN(in (n,C)); returns the aux loss (ctx may be NULL for dense layers) */
double ffn_forward(ffn_layer *f, const float *params, float *out, const float *in, int64_t n,
                   const ffn_context *ctx);
/* din (n,C) += ; parameter gradients += into grads */
void ffn_backward(ffn_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, float *scratch, const ffn_context *ctx);
void ffn_end_step(ffn_layer *f, const ffn_context *ctx);
/* ∞-MoE layers: samples per token from now on, or the deterministic z = mu. */
void ffn_set_samples(ffn_layer *f, int samples, int deterministic);
/* Multiply-adds per token in the FFN's matrices (for FLOP counts). */
double ffn_matmul_params_per_token(const ffn_layer *f);
void ffn_free(ffn_layer *f);

#endif

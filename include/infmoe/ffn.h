/*
 * ffn: the feed-forward layer of each block, behind one interface so the
 * variants (ffn.kind) are interchangeable. This version has the dense GPT-2 MLP:
 * in (N,C) -> fc (H,C) + GELU -> proj (C,H) -> out (N,C).
 *
 * The four entry points:
 *   ffn_init      register the layer's parameters in the model's tensor table
 *   ffn_forward   out += FFN(in): the layer adds into the residual stream
 *   ffn_backward  din += dFFN/din . dout, and the parameter gradients
 *   ffn_free
 * A layer keeps what its backward needs (saved activations) itself.
 */
#ifndef INFMOE_FFN_H
#define INFMOE_FFN_H

#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/tensor.h"

typedef struct {
    ffn_kind kind;
    int C, H;
    int64_t max_tokens;
    /* parameter offsets in the model's buffers */
    size_t fc_w, fc_b, proj_w, proj_b;
    /* saved for backward: pre-activation and GELU output, (max_tokens, H) each */
    float *pre, *act;
} ffn_layer;

/* Register layer `layer`'s parameters (names "h.<layer>.ffn.*") and allocate its buffers. */
void ffn_init(ffn_layer *f, const run_config *cfg, int layer, tensor_table *tab,
              int64_t max_tokens);
/* Floats of scratch ffn_backward needs for n tokens (shared between layers). */
size_t ffn_scratch_floats(const ffn_layer *f, int64_t n);
/* out (n,C) += FFN(in (n,C)) */
void ffn_forward(ffn_layer *f, const float *params, float *out, const float *in, int64_t n);
/* din (n,C) += ; parameter gradients += into grads */
void ffn_backward(ffn_layer *f, const float *params, float *grads, float *din, const float *dout,
                  const float *in, int64_t n, float *scratch);
/* Multiply-adds per token in the FFN's matrices (for FLOP counts). */
double ffn_matmul_params_per_token(const ffn_layer *f);
void ffn_free(ffn_layer *f);

#endif

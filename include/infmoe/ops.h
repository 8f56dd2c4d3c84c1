/*
 * ops: the layers of a GPT-2 decoder, forward and backward, on raw float
 * buffers. One function per layer and direction; shapes in the comments
 * ((N,C): N = B*T tokens, C channels). Backward functions accumulate into
 * their gradient outputs (+=), so callers zero gradients once per step.
 * Matrix products go through gemm (oneDNN); the loops here are the cheap,
 * memory-bound parts, parallelised with OpenMP over tokens.
 */
#ifndef INFMOE_OPS_H
#define INFMOE_OPS_H

#include <math.h>
#include <stdint.h>

#include "infmoe/bf16.h"

/*
 * e^x without calls (libm's expf and tanhf are scalar calls and were the largest
 * non-GEMM cost). Range reduction x = n ln2 + r and a degree-6 polynomial for e^r
 * (Cephes coefficients); relative error below 3e-7 over the clamped range [-87, 88].
 * Without AVX-512 gcc does not vectorise loops over it (the clamps are branches it
 * will not if-convert under -ftrapping-math), so the simd-reduction sums that call
 * it run in order there; with AVX-512 it masks them and sums in lane order. ops.c's
 * GELU, attention softmax rows and cross-entropy run the same steps on vectors
 * (EXP_FAST_REDUCED, for a float or a vector x).
 */
#define EXP_FAST_REDUCED(T, x, n, p)                                                 \
    T n = ((x) * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */ \
    T p;                                                                             \
    {                                                                                \
        T r_ = (x) - n * 0.693359375f;                                               \
        r_ = r_ - n * -2.12194440e-4f;                                               \
        p = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                \
        p = p * r_ + 8.3334519073e-3f;                                               \
        p = p * r_ + 4.1665795894e-2f;                                               \
        p = p * r_ + 1.6666665459e-1f;                                               \
        p = p * r_ + 5.0000001201e-1f;                                               \
        p = p * r_ * r_ + r_ + 1.0f;                                                 \
    }

static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    EXP_FAST_REDUCED(float, x, n, p)
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* tanh(u) = 1 - 2 / (e^{2u} + 1): exact to ~1e-7 absolute, saturates cleanly. */
static inline float tanh_fast(float u) { return 1.0f - 2.0f / (exp_fast(2.0f * u) + 1.0f); }

/* softplus(x) = log(1 + e^x) (x itself above 20, where they agree in float), and its
 * derivative, the logistic sigmoid; libm's exact calls, for routers' scalars. */
static inline float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* out (B,T,C) = wte[inp] + wpe[t] */
void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe, int B,
                     int T, int C);
/* dwte (V,C) += , dwpe (T,C) += from dout (B,T,C) */
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp, int B,
                      int T, int C);

/* out (N,C), mean (N), rstd (N) = LayerNorm(inp (N,C)) * weight (C) + bias (C), eps 1e-5 */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int64_t N, int C);
void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int64_t N, int C);

/* out (N,OC) = inp (N,C) . weight (OC,C)^T + bias (OC); accumulate: out += instead */
void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int64_t N, int C, int OC, int accumulate);
/* dinp (N,C) +=, dweight (OC,C) +=, dbias (OC) += (dbias may be NULL) */
void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int64_t N, int C, int OC);

/*
 * Causal multi-head self-attention. qkv (B,T,3C) holds q, k, v side by side,
 * each split into NH heads of C/NH. att (B,NH,T,T) keeps the softmax
 * probabilities for backward; out (B,T,C) is the heads' outputs side by side.
 */
void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH);
/* dqkv (B,T,3C) += ; scratch holds threads x T*T floats (heads run in parallel, one a
 * thread, when B*NH >= the OpenMP threads and those are at most `threads`) */
void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH, int threads);

/* GELU, tanh form: out (N) = GELU(inp (N)); backward dinp += GELU'(inp) * dout */
void gelu_forward(float *out, const float *inp, int64_t N);
void gelu_backward(float *dinp, const float *inp, const float *dout, int64_t N);

/* out (N) = a (N) + b (N) */
void residual_forward(float *out, const float *a, const float *b, int64_t N);

/*
 * Softmax over the first V of Vp logits per row (the rest are vocabulary
 * padding) and cross-entropy: probs (N,Vp), losses (N).
 */
void crossentropy_forward(float *losses, float *probs, const float *logits,
                          const int32_t *targets, int64_t N, int V, int Vp);
/* dlogits (N,Vp) = (probs - onehot(target)) * dloss; padding columns get 0 */
void crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                           float dloss, int64_t N, int V, int Vp);

/*
 * bf16 precision (train.precision bf16): the same layers with bf16 operands for
 * their matrix products and fp32 sums. Where an output only feeds products it is
 * written in bf16 (and overwritten, not accumulated); where it feeds anything
 * else it stays fp32 and accumulates like the fp32 op. Softmax, the attention
 * scale and every reduction run in fp32.
 */
/* out (N,OC) = inp . weight^T + bias: fp32 (accumulate allowed) or bf16 when out_bf16 */
void matmul_forward_bf16(void *out, int out_bf16, const bf16 *inp, const bf16 *weight,
                         const float *bias, int64_t N, int C, int OC, int accumulate);
/* dinp (N,C): fp32 += , or bf16 = when dinp_bf16; dweight += ; dbias += (may be NULL) */
void matmul_backward_bf16(void *dinp, int dinp_bf16, float *dweight, float *dbias,
                          const bf16 *dout, const bf16 *inp, const bf16 *weight, int64_t N, int C,
                          int OC);
/* dbias (OC) += column sums of dout (N,OC), fp32 or bf16 */
void bias_backward(float *dbias, const float *dout, int64_t N, int OC);
void bias_backward_bf16(float *dbias, const bf16 *dout, int64_t N, int OC);
/*
 * out (B,T,C) and att (B,NH,T,T) in bf16, only the causal part of att computed
 * (entries right of the diagonal's row block are left as they were). scratch:
 * attention_bf16_scratch_floats(T, C, NH, threads) floats, one head's worth per
 * thread: with several threads and enough heads, each thread runs whole heads.
 */
size_t attention_bf16_scratch_floats(int T, int C, int NH, int threads);
void attention_forward_bf16(bf16 *out, bf16 *att, float *scratch, const bf16 *qkv, int B, int T,
                            int C, int NH, int threads);
/* dqkv (B,T,3C) = (written); the same scratch */
void attention_backward_bf16(bf16 *dqkv, float *scratch, const bf16 *dout, const bf16 *qkv,
                             const bf16 *att, int B, int T, int C, int NH, int threads);
/*
 * The same bf16 attention without the (B,NH,T,T) probabilities: stats (B,NH,T,2)
 * keeps each row's softmax max and 1/sum, and the backward recomputes each row
 * block's scores and probabilities from q, k and them (one more product per block).
 * Outputs and gradients are bitwise those of the stored ops above. scratch:
 * attention_fused_scratch_floats(T, C, NH, threads) floats (ATT_BLOCK rows a head).
 */
size_t attention_fused_scratch_floats(int T, int C, int NH, int threads);
void attention_forward_bf16_fused(bf16 *out, float *stats, float *scratch, const bf16 *qkv, int B,
                                  int T, int C, int NH, int threads);
void attention_backward_bf16_fused(bf16 *dqkv, float *scratch, const bf16 *dout, const bf16 *qkv,
                                   const float *stats, int B, int T, int C, int NH, int threads);
/* out (N) = GELU(inp) in bf16; dinp (N) = GELU'(inp) * dout in bf16 (written) */
void gelu_forward_bf16(bf16 *out, const float *inp, int64_t N);
void gelu_backward_bf16(bf16 *dinp, const float *inp, const float *dout, int64_t N);
/* dlogits (N,Vp) = (probs - onehot(target)) * dloss in bf16 */
void crossentropy_backward_bf16(bf16 *dlogits, const float *probs, const int32_t *targets,
                                float dloss, int64_t N, int V, int Vp);

#endif

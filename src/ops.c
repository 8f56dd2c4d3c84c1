/* ops: GPT-2 layers forward and backward (see ops.h). */
#include "infmoe/ops.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "infmoe/gemm.h"

void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe, int B,
                     int T, int C) {
#pragma omp parallel for
    for (int64_t bt = 0; bt < (int64_t)B * T; bt++) {
        const float *e = wte + (int64_t)inp[bt] * C, *p = wpe + (bt % T) * (int64_t)C;
        float *o = out + bt * C;
        for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
    }
}

/* Columns handled by one thread where a reduction runs over rows. */
#define CHANNEL_BLOCK 64

void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp, int B,
                      int T, int C) {
    /* Tokens repeat, so rows of dwte are shared: split channels between threads. */
#pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += CHANNEL_BLOCK) {
        int c1 = c0 + CHANNEL_BLOCK < C ? c0 + CHANNEL_BLOCK : C;
        for (int64_t bt = 0; bt < (int64_t)B * T; bt++) {
            const float *d = dout + bt * C;
            float *we = dwte + (int64_t)inp[bt] * C, *wp = dwpe + (bt % T) * (int64_t)C;
#pragma omp simd
            for (int i = c0; i < c1; i++) {
                we[i] += d[i];
                wp[i] += d[i];
            }
        }
    }
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int64_t N, int C) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float m = 0.0f;
#pragma omp simd reduction(+ : m)
        for (int i = 0; i < C; i++) m += x[i];
        m /= (float)C;
        float v = 0.0f;
#pragma omp simd reduction(+ : v)
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= (float)C;
        float s = 1.0f / sqrtf(v + 1e-5f);
        float *o = out + n * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int64_t N, int C) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * C, *g = dout + n * C;
        float m = mean[n], s = rstd[n];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s, dnorm = weight[i] * g[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= (float)C;
        dnorm_norm_mean /= (float)C;
        float *d = dinp + n * C;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s, dnorm = weight[i] * g[i];
            d[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    /* Parameter gradients sum over tokens: blocks of channels per thread, rows streamed. */
#pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += CHANNEL_BLOCK) {
        int c1 = c0 + CHANNEL_BLOCK < C ? c0 + CHANNEL_BLOCK : C;
        for (int64_t n = 0; n < N; n++) {
            const float *x = inp + n * C, *g = dout + n * C;
            float m = mean[n], s = rstd[n];
#pragma omp simd
            for (int i = c0; i < c1; i++) {
                dweight[i] += (x[i] - m) * s * g[i];
                dbias[i] += g[i];
            }
        }
    }
}

void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int64_t N, int C, int OC, int accumulate) {
    gemm(0, 1, N, OC, C, inp, C, weight, C, out, OC, accumulate, bias);
}

void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int64_t N, int C, int OC) {
    gemm(0, 0, N, C, OC, dout, OC, weight, C, dinp, C, 1, NULL);
    gemm(1, 0, OC, C, N, dout, OC, inp, C, dweight, C, 1, NULL);
    if (dbias) bias_backward(dbias, dout, N, OC);
}

void bias_backward(float *dbias, const float *dout, int64_t N, int OC) {
#pragma omp parallel for
    for (int o0 = 0; o0 < OC; o0 += CHANNEL_BLOCK) {
        int o1 = o0 + CHANNEL_BLOCK < OC ? o0 + CHANNEL_BLOCK : OC;
        for (int64_t n = 0; n < N; n++) {
            const float *d = dout + n * OC;
#pragma omp simd
            for (int o = o0; o < o1; o++) dbias[o] += d[o];
        }
    }
}

void bias_backward_bf16(float *dbias, const bf16 *dout, int64_t N, int OC) {
#pragma omp parallel for
    for (int o0 = 0; o0 < OC; o0 += CHANNEL_BLOCK) {
        int o1 = o0 + CHANNEL_BLOCK < OC ? o0 + CHANNEL_BLOCK : OC;
        for (int64_t n = 0; n < N; n++) {
            const bf16 *d = dout + n * OC;
#pragma omp simd
            for (int o = o0; o < o1; o++) dbias[o] += bf16_float(d[o]);
        }
    }
}

/*
 * exp_fast sixteen elements at a time (GCC vector extensions), for the GELU, the
 * attention's softmax rows and (without AVX-512) the cross-entropy. Without AVX-512
 * gcc leaves loops over exp_fast scalar, even under omp simd: its clamps are
 * branches gcc will not if-convert while the arithmetic after them may trap
 * (-ftrapping-math); with AVX-512 it can mask them. Here the clamps are blends and
 * every lane takes exp_fast's operations in exp_fast's order (no contraction: the
 * Makefile's -ffp-contract=off), so each element's bits are the scalar code's;
 * test_grad_ops compares them on every path. The tails run the scalar code.
 */
/* the helpers are inlined, so the 64-byte vectors' calling convention never applies
 * (the Makefile builds this file with -Wno-psabi: gcc's note ignores the pragma) */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline f32x16 splat16(float c) { return (f32x16){0} + c; }

/* exp_fast lane by lane */
static inline f32x16 exp_fast16(f32x16 x) {
    const i32x16 lo = x < -87.0f, hi = x > 88.0f;
    x = (f32x16)((lo & (i32x16)splat16(-87.0f)) | (~lo & (i32x16)x));
    x = (f32x16)((hi & (i32x16)splat16(88.0f)) | (~hi & (i32x16)x));
    EXP_FAST_REDUCED(f32x16, x, n, p)
    const i32x16 scale = (__builtin_convertvector(n, i32x16) + 127) << 23;
    return p * (f32x16)scale;
}

static inline f32x16 tanh_fast16(f32x16 u) { return 1.0f - 2.0f / (exp_fast16(2.0f * u) + 1.0f); }

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[i] = exp_fast(in[i] - shift) for i < n, sixteen at a time (each with exp_fast's
 * bits; out may be in), and their sum in order i = 0, 1, ..., with no simd reduction */
static inline float exp_shifted_sum(float *out, const float *in, int n, float shift) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const f32x16 e = exp_fast16(load16(in + i) - shift);
        memcpy(out + i, &e, sizeof e);
    }
    for (; i < n; i++) out[i] = exp_fast(in[i] - shift);
    float sum = 0.0f;
    for (i = 0; i < n; i++) sum += out[i];
    return sum;
}

/* Row t of causal attention scores: scaled, max-shifted and exponentiated in place
 * over [0, t]; returns 1 / their sum (the caller normalises) and the max in *max_out. */
static inline float causal_softmax_row_max(float *row, int t, float scale, float *max_out) {
    float max = -INFINITY;
    for (int j = 0; j <= t; j++) {
        row[j] *= scale;
        if (row[j] > max) max = row[j];
    }
    /* summed in order j = 0, 1, ...: one order for every path (fp32, bf16 stored,
     * bf16 fused, which recomputes from the max and 1/sum) and every compiler, the
     * order the scalar loop always had, so the bits stay */
    const float sum = exp_shifted_sum(row, row, t + 1, max);
    *max_out = max;
    return 1.0f / sum;
}

static inline float causal_softmax_row(float *row, int t, float scale) {
    float max;
    return causal_softmax_row_max(row, t, scale, &max);
}

static int heads_in_parallel(int B, int NH, int threads);

void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    /* heads in parallel, or one after another with threaded products: the same bits
     * (oneDNN's fp32 products here split rows, not sums) */
#pragma omp parallel for collapse(2) schedule(dynamic) if (heads_in_parallel(B, NH, omp_get_max_threads()))
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (int64_t)b * T * 3 * C + h * hs;
            const float *k = q + C, *v = q + 2 * C;
            float *a = att + ((int64_t)b * NH + h) * T * T;
            /* scores (T,T) = q (T,hs) . k^T; the upper triangle is masked below */
            gemm(0, 1, T, T, hs, q, 3 * C, k, 3 * C, a, T, 0, NULL);
#pragma omp parallel for
            for (int t = 0; t < T; t++) {
                float *row = a + (int64_t)t * T;
                float inv = causal_softmax_row(row, t, scale);
                for (int j = 0; j <= t; j++) row[j] *= inv;
                for (int j = t + 1; j < T; j++) row[j] = 0.0f;
            }
            /* out_h (T,hs) = att (T,T) . v (T,hs) */
            gemm(0, 0, T, hs, T, a, T, v, 3 * C, out + (int64_t)b * T * C + h * hs, C, 0, NULL);
        }
}

void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH, int threads) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(2) schedule(dynamic) if (heads_in_parallel(B, NH, threads))
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int64_t off = (int64_t)b * T * 3 * C + h * hs;
            const float *q = qkv + off, *k = q + C, *v = q + 2 * C;
            float *dq = dqkv + off, *dk = dq + C, *dv = dq + 2 * C;
            const float *a = att + ((int64_t)b * NH + h) * T * T;
            const float *dy = dout + (int64_t)b * T * C + h * hs;
            float *da = scratch + (size_t)T * T * (size_t)omp_get_thread_num();
            /* datt (T,T) = dy (T,hs) . v^T ; dv (T,hs) += att^T . dy */
            gemm(0, 1, T, T, hs, dy, C, v, 3 * C, da, T, 0, NULL);
            gemm(1, 0, T, hs, T, a, T, dy, C, dv, 3 * C, 1, NULL);
            /* softmax backward, then the 1/sqrt(hs) scale; masked entries have att = 0 */
#pragma omp parallel for
            for (int t = 0; t < T; t++) {
                const float *ar = a + (int64_t)t * T;
                float *dr = da + (int64_t)t * T;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int j = 0; j <= t; j++) dot += ar[j] * dr[j];
                for (int j = 0; j <= t; j++) dr[j] = ar[j] * (dr[j] - dot) * scale;
                for (int j = t + 1; j < T; j++) dr[j] = 0.0f;
            }
            /* dq += dscores . k ; dk += dscores^T . q */
            gemm(0, 0, T, hs, T, da, T, k, 3 * C, dq, 3 * C, 1, NULL);
            gemm(1, 0, T, hs, T, da, T, q, 3 * C, dk, 3 * C, 1, NULL);
        }
}

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */

/* The GELU and its derivative as the scalar and vector code write them. */
#define GELU_OUT(x, tanh) (0.5f * (x) * (1.0f + tanh(GELU_SCALE * ((x) + 0.044715f * (x) * (x) * (x)))))
#define GELU_GRAD(x, tanh, th) /* th: a variable of x's type */                                   \
    (th = tanh(GELU_SCALE * ((x) + 0.044715f * (x) * (x) * (x))),                                  \
     0.5f * (1.0f + th) + 0.5f * (x) * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * (x) * (x)))

void gelu_forward(float *out, const float *inp, int64_t N) {
    const int64_t nv = N / 16;
#pragma omp parallel for
    for (int64_t v = 0; v < nv; v++) {
        const f32x16 x = load16(inp + 16 * v), y = GELU_OUT(x, tanh_fast16);
        memcpy(out + 16 * v, &y, sizeof y);
    }
    for (int64_t i = 16 * nv; i < N; i++) out[i] = GELU_OUT(inp[i], tanh_fast);
}

void gelu_backward(float *dinp, const float *inp, const float *dout, int64_t N) {
    const int64_t nv = N / 16;
#pragma omp parallel for
    for (int64_t v = 0; v < nv; v++) {
        const f32x16 x = load16(inp + 16 * v);
        f32x16 th, d = load16(dinp + 16 * v);
        d += GELU_GRAD(x, tanh_fast16, th) * load16(dout + 16 * v);
        memcpy(dinp + 16 * v, &d, sizeof d);
    }
    for (int64_t i = 16 * nv; i < N; i++) {
        float th;
        dinp[i] += GELU_GRAD(inp[i], tanh_fast, th) * dout[i];
    }
}

void residual_forward(float *out, const float *a, const float *b, int64_t N) {
#pragma omp parallel for
    for (int64_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

void crossentropy_forward(float *losses, float *probs, const float *logits,
                          const int32_t *targets, int64_t N, int V, int Vp) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        /* probs may alias logits: read the target's logit before overwriting */
        const float *l = logits + n * Vp;
        float *p = probs + n * Vp;
        float target_logit = l[targets[n]];
        float max = -INFINITY;
#pragma omp simd reduction(max : max)
        for (int i = 0; i < V; i++) max = l[i] > max ? l[i] : max;
#if defined(__AVX512F__)
        /* With AVX-512 gcc vectorises this simd reduction itself (its clamps as masked
         * lanes), so the sum runs in its lane order: the order the recordings from
         * AVX-512 CPUs hold. */
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) {
            p[i] = exp_fast(l[i] - max);
            sum += p[i];
        }
#else
        /* Without AVX-512 gcc leaves that loop scalar (exp_fast's clamps are branches),
         * so the sum ran in order i = 0, 1, ...: the order exp_shifted_sum keeps (p may
         * be l), so the bits stay. */
        const float sum = exp_shifted_sum(p, l, V, max);
#endif
        float inv = 1.0f / sum;
        for (int i = 0; i < V; i++) p[i] *= inv;
        for (int i = V; i < Vp; i++) p[i] = 0.0f;
        /* log p = l - max - log(sum), exact even when p underflows */
        losses[n] = -(target_logit - max - logf(sum));
    }
}

void crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                           float dloss, int64_t N, int V, int Vp) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *p = probs + n * Vp;
        float *d = dlogits + n * Vp;
        for (int i = 0; i < V; i++) d[i] = p[i] * dloss;
        for (int i = V; i < Vp; i++) d[i] = 0.0f;
        d[targets[n]] -= dloss;
    }
}

/* ---- bf16 precision ---- */

void matmul_forward_bf16(void *out, int out_bf16, const bf16 *inp, const bf16 *weight,
                         const float *bias, int64_t N, int C, int OC, int accumulate) {
    gemm_bf16(0, 1, N, OC, C, inp, C, weight, C, out, OC, out_bf16, accumulate, bias);
}

void matmul_backward_bf16(void *dinp, int dinp_bf16, float *dweight, float *dbias,
                          const bf16 *dout, const bf16 *inp, const bf16 *weight, int64_t N, int C,
                          int OC) {
    gemm_bf16(0, 0, N, C, OC, dout, OC, weight, C, dinp, C, dinp_bf16, !dinp_bf16, NULL);
    gemm_bf16(1, 0, OC, C, N, dout, OC, inp, C, dweight, C, 0, 1, NULL);
    if (dbias) bias_backward_bf16(dbias, dout, N, OC);
}

/*
 * bf16 attention computes only the causal part: rows in blocks of ATT_BLOCK, each
 * against the columns up to its last row (for T = 1024, 56% of the full T x T
 * products), in the forward and in the backward.
 */
#define ATT_BLOCK 128

/* The end of the row block that row t lies in (its causal columns end there too). */
static inline int att_block_end(int t, int T) {
    int end = (t / ATT_BLOCK + 1) * ATT_BLOCK;
    return end < T ? end : T;
}

/* Scratch of one head: scores (or their gradient) T*T, the fp32 sums of dk and dv
 * 2*T*hs, the bf16 score gradient T*T (in floats). */
static size_t head_scratch_floats(int T, int C, int NH) {
    return (size_t)T * T + 2 * (size_t)T * (C / NH) + ((size_t)T * T + 1) / 2;
}

size_t attention_bf16_scratch_floats(int T, int C, int NH, int threads) {
    return head_scratch_floats(T, C, NH) * (size_t)(threads > 0 ? threads : 1);
}

/*
 * Heads are independent: with at least as many (sequence, head) pairs as threads,
 * each thread takes whole heads and runs their products alone (they are too small
 * to split well); otherwise heads run one after another on every thread. `threads`
 * is how many head scratches the caller allocated.
 */
static int heads_in_parallel(int B, int NH, int threads) {
    int nt = omp_get_max_threads();
    return nt > 1 && nt <= threads && B * NH >= nt;
}

static void head_forward_bf16(bf16 *out, bf16 *a, float *scores, const bf16 *q, int T, int C,
                              int hs) {
    const bf16 *k = q + C, *v = q + 2 * C;
    float scale = 1.0f / sqrtf((float)hs);
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        gemm_bf16(0, 1, r1 - r0, r1, hs, q + (int64_t)r0 * 3 * C, 3 * C, k, 3 * C,
                  scores + (int64_t)r0 * T, T, 0, 0, NULL);
    }
#pragma omp parallel for
    for (int t = 0; t < T; t++) {
        float *row = scores + (int64_t)t * T;
        bf16 *ar = a + (int64_t)t * T;
        float inv = causal_softmax_row(row, t, scale);
        /* zeros up to the end of the row's block: all the products read */
        int end = att_block_end(t, T);
#pragma omp simd
        for (int j = 0; j <= t; j++) ar[j] = bf16_round(row[j] * inv);
        for (int j = t + 1; j < end; j++) ar[j] = 0;
    }
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        gemm_bf16(0, 0, r1 - r0, hs, r1, a + (int64_t)r0 * T, T, v, 3 * C,
                  out + (int64_t)r0 * C, C, 1, 0, NULL);
    }
}

static void head_backward_bf16(bf16 *dq, float *scratch, const bf16 *dy, const bf16 *q,
                               const bf16 *a, int T, int C, int hs) {
    const bf16 *k = q + C, *v = q + 2 * C;
    bf16 *dk = dq + C, *dv = dq + 2 * C;
    float scale = 1.0f / sqrtf((float)hs);
    float *da = scratch, *dk_acc = scratch + (size_t)T * T, *dv_acc = dk_acc + (size_t)T * hs;
    bf16 *ds_all = (bf16 *)(dv_acc + (size_t)T * hs);
    /* datt = dy . v^T ; dv = att^T . dy, summed over the row blocks in fp32 */
    memset(dv_acc, 0, sizeof(float) * (size_t)T * hs);
    memset(dk_acc, 0, sizeof(float) * (size_t)T * hs);
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        gemm_bf16(0, 1, r1 - r0, r1, hs, dy + (int64_t)r0 * C, C, v, 3 * C, da + (int64_t)r0 * T,
                  T, 0, 0, NULL);
        gemm_bf16(1, 0, r1, hs, r1 - r0, a + (int64_t)r0 * T, T, dy + (int64_t)r0 * C, C, dv_acc,
                  hs, 0, 1, NULL);
    }
#pragma omp parallel for
    for (int t = 0; t < T; t++) {
        const bf16 *ar = a + (int64_t)t * T;
        const float *dr = da + (int64_t)t * T;
        bf16 *ds = ds_all + (int64_t)t * T;
        int end = att_block_end(t, T);
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j <= t; j++) dot += bf16_float(ar[j]) * dr[j];
#pragma omp simd
        for (int j = 0; j <= t; j++) ds[j] = bf16_round(bf16_float(ar[j]) * (dr[j] - dot) * scale);
        for (int j = t + 1; j < end; j++) ds[j] = 0;
    }
    /* dq = dscores . k (rows of a block read columns up to it); dk = dscores^T . q */
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        gemm_bf16(0, 0, r1 - r0, hs, r1, ds_all + (int64_t)r0 * T, T, k, 3 * C,
                  dq + (int64_t)r0 * 3 * C, 3 * C, 1, 0, NULL);
        gemm_bf16(1, 0, r1, hs, r1 - r0, ds_all + (int64_t)r0 * T, T, q + (int64_t)r0 * 3 * C,
                  3 * C, dk_acc, hs, 0, 1, NULL);
    }
    bf16_from_f32_rows(dk, 3 * C, dk_acc, hs, T, hs);
    bf16_from_f32_rows(dv, 3 * C, dv_acc, hs, T, hs);
}

/*
 * Fused bf16 attention: the same row blocks, but each block's scores and
 * probabilities live only in a per-thread scratch of ATT_BLOCK x T; what is kept
 * for backward is each row's softmax max and 1/sum (stats, 2 floats a row). The
 * backward recomputes a block's scores with the same product, and its
 * probabilities from them with the same operations, so every value (and the
 * order of every sum) is the stored path's: the two agree bit for bit.
 */
/* s (r1 - r0 rows, ld T) = q[r0, r1) . k[0, r1)^T: one row block's scores, fp32 */
static inline void block_scores_bf16(float *s, const bf16 *q, const bf16 *k, int r0, int r1, int T,
                                     int C, int hs) {
    gemm_bf16(0, 1, r1 - r0, r1, hs, q + (int64_t)r0 * 3 * C, 3 * C, k, 3 * C, s, T, 0, 0, NULL);
}

static size_t head_fused_scratch_floats(int T, int C, int NH) {
    /* scores / their gradient (fp32), probabilities and score gradient (bf16), dk and dv sums */
    return (size_t)ATT_BLOCK * T + (size_t)ATT_BLOCK * T + 2 * (size_t)T * (C / NH);
}

size_t attention_fused_scratch_floats(int T, int C, int NH, int threads) {
    return head_fused_scratch_floats(T, C, NH) * (size_t)(threads > 0 ? threads : 1);
}

static void head_fused_forward_bf16(bf16 *out, float *st, float *scratch, const bf16 *q, int T,
                                    int C, int hs) {
    const bf16 *k = q + C, *v = q + 2 * C;
    float scale = 1.0f / sqrtf((float)hs);
    float *s = scratch;
    bf16 *p = (bf16 *)(s + (size_t)ATT_BLOCK * T);
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        block_scores_bf16(s, q, k, r0, r1, T, C, hs);
#pragma omp parallel for
        for (int t = r0; t < r1; t++) {
            float *row = s + (int64_t)(t - r0) * T;
            bf16 *ar = p + (int64_t)(t - r0) * T;
            float max, inv = causal_softmax_row_max(row, t, scale, &max);
            st[2 * (int64_t)t] = max;
            st[2 * (int64_t)t + 1] = inv;
#pragma omp simd
            for (int j = 0; j <= t; j++) ar[j] = bf16_round(row[j] * inv);
            for (int j = t + 1; j < r1; j++) ar[j] = 0;
        }
        gemm_bf16(0, 0, r1 - r0, hs, r1, p, T, v, 3 * C, out + (int64_t)r0 * C, C, 1, 0, NULL);
    }
}

static void head_fused_backward_bf16(bf16 *dq, float *scratch, const bf16 *dy, const bf16 *q,
                                     const float *st, int T, int C, int hs) {
    const bf16 *k = q + C, *v = q + 2 * C;
    bf16 *dk = dq + C, *dv = dq + 2 * C;
    float scale = 1.0f / sqrtf((float)hs);
    float *s = scratch;
    bf16 *p = (bf16 *)(s + (size_t)ATT_BLOCK * T), *ds = p + (size_t)ATT_BLOCK * T;
    float *dk_acc = s + 2 * (size_t)ATT_BLOCK * T, *dv_acc = dk_acc + (size_t)T * hs;
    memset(dv_acc, 0, sizeof(float) * (size_t)T * hs);
    memset(dk_acc, 0, sizeof(float) * (size_t)T * hs);
    for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
        int r1 = att_block_end(r0, T);
        /* the forward's probabilities again: scores, scaled, exp(. - max) * (1/sum) */
        block_scores_bf16(s, q, k, r0, r1, T, C, hs);
#pragma omp parallel for
        for (int t = r0; t < r1; t++) {
            float *row = s + (int64_t)(t - r0) * T;
            bf16 *pr = p + (int64_t)(t - r0) * T;
            const float max = st[2 * (int64_t)t], inv = st[2 * (int64_t)t + 1];
            for (int j = 0; j <= t; j++) row[j] *= scale;
#pragma omp simd
            for (int j = 0; j <= t; j++) {
                float e = exp_fast(row[j] - max);
                pr[j] = bf16_round(e * inv);
            }
            for (int j = t + 1; j < r1; j++) pr[j] = 0;
        }
        /* datt = dy . v^T (into the scores' place) ; dv += att^T . dy */
        gemm_bf16(0, 1, r1 - r0, r1, hs, dy + (int64_t)r0 * C, C, v, 3 * C, s, T, 0, 0, NULL);
        gemm_bf16(1, 0, r1, hs, r1 - r0, p, T, dy + (int64_t)r0 * C, C, dv_acc, hs, 0, 1, NULL);
#pragma omp parallel for
        for (int t = r0; t < r1; t++) {
            const bf16 *ar = p + (int64_t)(t - r0) * T;
            const float *dr = s + (int64_t)(t - r0) * T;
            bf16 *dsr = ds + (int64_t)(t - r0) * T;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int j = 0; j <= t; j++) dot += bf16_float(ar[j]) * dr[j];
#pragma omp simd
            for (int j = 0; j <= t; j++)
                dsr[j] = bf16_round(bf16_float(ar[j]) * (dr[j] - dot) * scale);
            for (int j = t + 1; j < r1; j++) dsr[j] = 0;
        }
        /* dq = dscores . k ; dk += dscores^T . q */
        gemm_bf16(0, 0, r1 - r0, hs, r1, ds, T, k, 3 * C, dq + (int64_t)r0 * 3 * C, 3 * C, 1, 0,
                  NULL);
        gemm_bf16(1, 0, r1, hs, r1 - r0, ds, T, q + (int64_t)r0 * 3 * C, 3 * C, dk_acc, hs, 0, 1,
                  NULL);
    }
    bf16_from_f32_rows(dk, 3 * C, dk_acc, hs, T, hs);
    bf16_from_f32_rows(dv, 3 * C, dv_acc, hs, T, hs);
}

/* Every (sequence, head) of one of the four: stored (att) or fused (stats) probabilities. */
static void heads_forward_bf16(bf16 *out, bf16 *att, float *stats, float *scratch, const bf16 *qkv,
                               int B, int T, int C, int NH, int threads) {
    const int hs = C / NH;
    const size_t per = att ? head_scratch_floats(T, C, NH) : head_fused_scratch_floats(T, C, NH);
#pragma omp parallel for collapse(2) schedule(dynamic) if (heads_in_parallel(B, NH, threads))
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int64_t bh = (int64_t)b * NH + h;
            bf16 *o = out + (int64_t)b * T * C + h * hs;
            float *sc = scratch + per * (size_t)omp_get_thread_num();
            const bf16 *q = qkv + (int64_t)b * T * 3 * C + h * hs;
            if (att)
                head_forward_bf16(o, att + bh * T * T, sc, q, T, C, hs);
            else
                head_fused_forward_bf16(o, stats + bh * 2 * T, sc, q, T, C, hs);
        }
}

static void heads_backward_bf16(bf16 *dqkv, float *scratch, const bf16 *dout, const bf16 *qkv,
                                const bf16 *att, const float *stats, int B, int T, int C, int NH,
                                int threads) {
    const int hs = C / NH;
    const size_t per = att ? head_scratch_floats(T, C, NH) : head_fused_scratch_floats(T, C, NH);
#pragma omp parallel for collapse(2) schedule(dynamic) if (heads_in_parallel(B, NH, threads))
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int64_t off = (int64_t)b * T * 3 * C + h * hs, bh = (int64_t)b * NH + h;
            float *sc = scratch + per * (size_t)omp_get_thread_num();
            const bf16 *dy = dout + (int64_t)b * T * C + h * hs;
            if (att)
                head_backward_bf16(dqkv + off, sc, dy, qkv + off, att + bh * T * T, T, C, hs);
            else
                head_fused_backward_bf16(dqkv + off, sc, dy, qkv + off, stats + bh * 2 * T, T, C,
                                         hs);
        }
}

void attention_forward_bf16(bf16 *out, bf16 *att, float *scratch, const bf16 *qkv, int B, int T,
                            int C, int NH, int threads) {
    heads_forward_bf16(out, att, NULL, scratch, qkv, B, T, C, NH, threads);
}

void attention_backward_bf16(bf16 *dqkv, float *scratch, const bf16 *dout, const bf16 *qkv,
                             const bf16 *att, int B, int T, int C, int NH, int threads) {
    heads_backward_bf16(dqkv, scratch, dout, qkv, att, NULL, B, T, C, NH, threads);
}

void attention_forward_bf16_fused(bf16 *out, float *stats, float *scratch, const bf16 *qkv, int B,
                                  int T, int C, int NH, int threads) {
    heads_forward_bf16(out, NULL, stats, scratch, qkv, B, T, C, NH, threads);
}

void attention_backward_bf16_fused(bf16 *dqkv, float *scratch, const bf16 *dout, const bf16 *qkv,
                                   const float *stats, int B, int T, int C, int NH, int threads) {
    heads_backward_bf16(dqkv, scratch, dout, qkv, NULL, stats, B, T, C, NH, threads);
}

void gelu_forward_bf16(bf16 *out, const float *inp, int64_t N) {
    const int64_t nv = N / 16;
#pragma omp parallel for
    for (int64_t v = 0; v < nv; v++) {
        const f32x16 x = load16(inp + 16 * v), y = GELU_OUT(x, tanh_fast16);
        for (int j = 0; j < 16; j++) out[16 * v + j] = bf16_round(y[j]);
    }
    for (int64_t i = 16 * nv; i < N; i++) out[i] = bf16_round(GELU_OUT(inp[i], tanh_fast));
}

void gelu_backward_bf16(bf16 *dinp, const float *inp, const float *dout, int64_t N) {
    const int64_t nv = N / 16;
#pragma omp parallel for
    for (int64_t v = 0; v < nv; v++) {
        const f32x16 x = load16(inp + 16 * v);
        f32x16 th;
        const f32x16 d = GELU_GRAD(x, tanh_fast16, th) * load16(dout + 16 * v);
        for (int j = 0; j < 16; j++) dinp[16 * v + j] = bf16_round(d[j]);
    }
    for (int64_t i = 16 * nv; i < N; i++) {
        float th;
        dinp[i] = bf16_round(GELU_GRAD(inp[i], tanh_fast, th) * dout[i]);
    }
}

void crossentropy_backward_bf16(bf16 *dlogits, const float *probs, const int32_t *targets,
                                float dloss, int64_t N, int V, int Vp) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float *p = probs + n * Vp;
        bf16 *d = dlogits + n * Vp;
        const int32_t tgt = targets[n];
#pragma omp simd
        for (int i = 0; i < V; i++) d[i] = bf16_round((p[i] - (i == tgt ? 1.0f : 0.0f)) * dloss);
        for (int i = V; i < Vp; i++) d[i] = 0;
    }
}

/*
 * bf16: the 16-bit brain float infmoe's bf16 precision computes with.
 *
 * A bf16 is the upper half of an IEEE fp32 (sign, 8 exponent bits, 7 mantissa
 * bits), stored here as its bit pattern in a uint16_t. fp32 -> bf16 rounds to
 * nearest, ties to even (NaN stays a quiet NaN); bf16 -> fp32 is exact. GEMMs on
 * bf16 operands accumulate in fp32 (gemm.h); everything else keeps fp32.
 */
#ifndef INFMOE_BF16_H
#define INFMOE_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline bf16 bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float bf16_float(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* dst (n) = round(src (n)); OpenMP over the elements. */
void bf16_from_f32(bf16 *dst, const float *src, int64_t n);
/* dst (n) = src (n), exactly. */
void f32_from_bf16(float *dst, const bf16 *src, int64_t n);
/* rows (n, width) at src_stride floats -> dst rows at dst_stride bf16s. */
void bf16_from_f32_rows(bf16 *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                        int64_t n, int width);

#endif

/* bf16: conversions between fp32 and bf16 arrays (see bf16.h). */
#include "infmoe/bf16.h"

void bf16_from_f32(bf16 *dst, const float *src, int64_t n) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_round(src[i]);
}

void f32_from_bf16(float *dst, const bf16 *src, int64_t n) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_float(src[i]);
}

void bf16_from_f32_rows(bf16 *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                        int64_t n, int width) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int i = 0; i < width; i++) dst[r * dst_stride + i] = bf16_round(src[r * src_stride + i]);
}

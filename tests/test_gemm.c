/* oneDNN GEMMs against the naive reference: every transposition, odd shapes, strides,
 * accumulate and bias, the primitive cache, and products split over threads by rows
 * against one thread bit for bit. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/util.h"

static void fill(float *x, long n, rng_state *r) {
    for (long i = 0; i < n; i++) x[i] = rng_uniform(r) * 2.0f - 1.0f;
}

static void one_case(int ta, int tb, int M, int N, int K, int pad, int acc, int use_bias,
                     rng_state *r) {
    int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    long na = (long)(ta ? K : M) * lda, nb = (long)(tb ? N : K) * ldb, nc = (long)M * ldc;
    float *A = xmalloc(sizeof(float) * na), *B = xmalloc(sizeof(float) * nb);
    float *C = xmalloc(sizeof(float) * nc), *R = xmalloc(sizeof(float) * nc);
    float *bias = xmalloc(sizeof(float) * N);
    fill(A, na, r);
    fill(B, nb, r);
    fill(C, nc, r);
    fill(bias, N, r);
    for (long i = 0; i < nc; i++) R[i] = C[i];
    gemm(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, acc, use_bias ? bias : NULL);
    gemm_naive(ta, tb, M, N, K, A, lda, B, ldb, R, ldc, acc, use_bias ? bias : NULL);
    char what[160];
    snprintf(what, sizeof what, "gemm ta=%d tb=%d M=%d N=%d K=%d pad=%d acc=%d bias=%d", ta, tb,
             M, N, K, pad, acc, use_bias);
    /* fp32 sums of K products of values in [-1,1]: relative 1e-5 of sqrt(K) scale */
    check_arrays_close(what, C, R, nc, 1e-4, 2e-5 * (K + 1));
    free(A);
    free(B);
    free(C);
    free(R);
    free(bias);
}

/* bf16 operands: the same case with A, B (and C when c_bf16) rounded to bf16, against
 * the naive sum of the same bf16 values. fp32 output: only the summation order
 * differs, so the fp32 tolerance holds; bf16 output adds one rounding, 2^-8 relative. */
static void bf16_case(int ta, int tb, int M, int N, int K, int pad, int acc, int use_bias,
                      int c_bf16, int var, rng_state *r) {
    int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    long na = (long)(ta ? K : M) * lda, nb = (long)(tb ? N : K) * ldb, nc = (long)M * ldc;
    float *f = xmalloc(sizeof(float) * (na > nb ? na : nb) + 4);
    bf16 *A = xmalloc(sizeof(bf16) * na + 2), *B = xmalloc(sizeof(bf16) * nb + 2);
    float *C = xmalloc(sizeof(float) * nc + 4), *R = xmalloc(sizeof(float) * nc + 4);
    bf16 *Ch = xmalloc(sizeof(bf16) * nc + 2), *Rh = xmalloc(sizeof(bf16) * nc + 2);
    float *bias = xmalloc(sizeof(float) * N);
    fill(f, na, r);
    bf16_from_f32(A, f, na);
    fill(f, nb, r);
    bf16_from_f32(B, f, nb);
    fill(C, nc, r);
    bf16_from_f32(Ch, C, nc);
    for (long i = 0; i < nc; i++) R[i] = C[i], Rh[i] = Ch[i];
    fill(bias, N, r);
    void *c = c_bf16 ? (void *)Ch : (void *)C, *ref = c_bf16 ? (void *)Rh : (void *)R;
    const float *b = use_bias ? bias : NULL;
    if (var)
        gemm_var_bf16(ta, tb, M, N, K, A, lda, B, ldb, c, ldc, c_bf16, acc, b);
    else
        gemm_bf16(ta, tb, M, N, K, A, lda, B, ldb, c, ldc, c_bf16, acc, b);
    gemm_naive_bf16(ta, tb, M, N, K, A, lda, B, ldb, ref, ldc, c_bf16, acc, b);
    if (c_bf16) {
        f32_from_bf16(C, Ch, nc);
        f32_from_bf16(R, Rh, nc);
    }
    char what[200];
    snprintf(what, sizeof what, "gemm_bf16%s ta=%d tb=%d M=%d N=%d K=%d pad=%d acc=%d bias=%d out=%s",
             var ? " (runtime M, K)" : "", ta, tb, M, N, K, pad, acc, use_bias,
             c_bf16 ? "bf16" : "fp32");
    /* bf16 output: both sides round once; they may land one bf16 step (2^-7 relative) apart */
    check_arrays_close(what, C, R, nc, c_bf16 ? 8e-3 : 1e-4, 2e-5 * (K + 1));
    free(f);
    free(A);
    free(B);
    free(C);
    free(R);
    free(Ch);
    free(Rh);
    free(bias);
}

/* A product on 2 threads (split by rows where A is not transposed, gemm.c) against
 * the same product on one thread: the same bits. types: 0 fp32, 1 bf16 operands with
 * fp32 output, 2 bf16 output; var: runtime M and K. */
static void split_case(int ta, int tb, int M, int N, int K, int pad, int acc, int use_bias,
                       int types, int var, rng_state *r) {
    int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    long na = (long)(ta ? K : M) * lda, nb = (long)(tb ? N : K) * ldb, nc = (long)M * ldc;
    float *A = xmalloc(sizeof(float) * na), *B = xmalloc(sizeof(float) * nb);
    float *C0 = xmalloc(sizeof(float) * nc), *C[2], *bias = xmalloc(sizeof(float) * N);
    bf16 *Ah = xmalloc(sizeof(bf16) * na), *Bh = xmalloc(sizeof(bf16) * nb);
    float *part[] = {A, B, C0, bias};
    const long len[] = {na, nb, nc, N};
    for (int i = 0; i < 4; i++) fill(part[i], len[i], r);
    bf16_from_f32(Ah, A, na);
    bf16_from_f32(Bh, B, nb);
    const float *b = use_bias ? bias : NULL;
    for (int t = 0; t < 2; t++) {
        C[t] = xmalloc(sizeof(float) * nc);
        memcpy(C[t], C0, sizeof(float) * nc);
        if (types == 2) bf16_from_f32((bf16 *)C[t], C0, nc);
        omp_set_num_threads(t + 1);
        if (types == 0 && var)
            gemm_var(ta, tb, M, N, K, A, lda, B, ldb, C[t], ldc, acc, b);
        else if (types == 0)
            gemm(ta, tb, M, N, K, A, lda, B, ldb, C[t], ldc, acc, b);
        else if (var)
            gemm_var_bf16(ta, tb, M, N, K, Ah, lda, Bh, ldb, C[t], ldc, types == 2, acc, b);
        else
            gemm_bf16(ta, tb, M, N, K, Ah, lda, Bh, ldb, C[t], ldc, types == 2, acc, b);
    }
    omp_set_num_threads(2);
    size_t bytes = (types == 2 ? sizeof(bf16) : sizeof(float)) * (size_t)nc;
    /* bitwise where oneDNN's kernels keep a row's bits whatever the split (gemm.h);
     * elsewhere (fp32 on AVX2) to round-off */
    int same = memcmp(C[0], C[1], bytes) == 0;
    if (!same && types == 0 && !gemm_rows_exact()) {
        same = 1;
        for (long i = 0; i < nc; i++)
            same &= close_enough(C[1][i], C[0][i], 1e-5, 1e-5 * sqrt((double)K + 1.0));
    }
    CHECK(same, "%s%s ta=%d tb=%d M=%d N=%d K=%d pad=%d acc=%d bias=%d: 2 threads differ from 1",
          types == 0 ? "gemm" : types == 1 ? "gemm_bf16" : "gemm_bf16 (bf16 out)",
          var ? " (runtime M, K)" : "", ta, tb, M, N, K, pad, acc, use_bias);
    free(A);
    free(B);
    free(C0);
    free(C[0]);
    free(C[1]);
    free(bias);
    free(Ah);
    free(Bh);
}

/* par_zero / par_copy write exactly the bytes memset / memcpy would, at any size,
 * thread count and alignment, inside a parallel region too, and nothing beyond.
 * Sizes include nt x 4096 x k + r (0 < r < nt), where shares rounded down to whole
 * pages would leave the last r bytes unwritten. */
static void check_par_bytes(rng_state *r) {
    const size_t sizes[] = {0, 1, 4095, 256 * 1024 - 1, 256 * 1024 + 13, 262148, 266244,
                            3 * 4096 * 22 + 1, 8 * 4096 * 9 + 7, 3 * 1024 * 1024 + 7};
    const size_t guard = 64;
    for (unsigned s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int nt = 1; nt <= 8; nt++)
            for (int nested = 0; nested < 2; nested++) {
                const size_t n = sizes[s], off = (s * 7 + (size_t)nt) % 5; /* unaligned starts */
                const size_t all = n + off + 2 * guard;
                unsigned char *src = xmalloc(all), *dst = xmalloc(all);
                for (size_t i = 0; i < all; i++) {
                    src[i] = (unsigned char)rng_u64(r);
                    dst[i] = (unsigned char)(i * 31 + 7);
                }
                omp_set_num_threads(nt);
                unsigned char *d = dst + guard + off, *sp = src + guard + off;
#pragma omp parallel if (nested) num_threads(2)
#pragma omp single
                par_copy(d, sp, n);
                int ok = memcmp(d, sp, n) == 0;
                for (size_t i = 0; i < guard + off; i++) ok &= dst[i] == (unsigned char)(i * 31 + 7);
                for (size_t i = guard + off + n; i < all; i++) ok &= dst[i] == (unsigned char)(i * 31 + 7);
                CHECK(ok, "par_copy of %zu bytes on %d threads%s differs from memcpy", n, nt,
                      nested ? " inside a parallel region" : "");
#pragma omp parallel if (nested) num_threads(2)
#pragma omp single
                par_zero(d, n);
                ok = 1;
                for (size_t i = 0; i < n; i++) ok &= d[i] == 0;
                for (size_t i = 0; i < guard + off; i++) ok &= dst[i] == (unsigned char)(i * 31 + 7);
                for (size_t i = guard + off + n; i < all; i++) ok &= dst[i] == (unsigned char)(i * 31 + 7);
                CHECK(ok, "par_zero of %zu bytes on %d threads%s differs from memset", n, nt,
                      nested ? " inside a parallel region" : "");
                free(src);
                free(dst);
            }
    omp_set_num_threads(2);
    /* big buffers: on a 2 MiB boundary (huge pages), zeroed; small ones 64-byte
     * aligned (xcalloc's zeroing is par_zero's, checked above at every size) */
    const size_t big = ((size_t)9 << 20) + 5;
    unsigned char *p = xcalloc(big, 1), *q = xcalloc(1000, 1);
    int zero = 1;
    for (size_t i = 0; i < big; i++) zero &= p[i] == 0;
    CHECK(zero && ((uintptr_t)p & (((size_t)2 << 20) - 1)) == 0 && ((uintptr_t)q & 63) == 0,
          "xcalloc: %zu bytes zeroed on a 2 MiB boundary, 1000 bytes on 64", big);
    free(p);
    free(q);
}

int main(void) {
    rng_state r;
    rng_seed(&r, 7);
    const int shapes[][3] = {{1, 1, 1},   {3, 5, 7},     {17, 33, 65},  {64, 64, 64},
                             {129, 31, 200}, {256, 768, 96}, {1, 300, 17}, {250, 1, 33}};
    for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int variant = 0; variant < 3; variant++) {
                    int pad = variant == 1 ? 5 : 0, acc = variant >= 1, bias = variant == 2;
                    one_case(ta, tb, shapes[s][0], shapes[s][1], shapes[s][2], pad, acc, bias, &r);
                }
    /* K longer than one primitive's reduction is split into accumulated chunks. */
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) one_case(ta, tb, 5, 7, 40001, 3, ta, tb, &r);
    /* K = 0 is an empty sum: C = bias (or unchanged with accumulate). */
    one_case(0, 1, 4, 6, 0, 0, 0, 1, &r);
    one_case(0, 1, 4, 6, 0, 0, 1, 0, &r);
    /* Runtime M and K: one primitive per transposition case serves every token count,
     * zero included (forward rows, and the reduction of weight gradients). */
    int64_t before_var = gemm_primitives_created();
    for (int n = 0; n < 40; n += 3)
        for (int ta = 0; ta < 2; ta++) {
            int M = ta ? 24 : n, K = ta ? n : 20, N = 16;
            long na = (long)M * K + 1, nb = (long)K * N + 1, nc = (long)M * N + 1;
            float *A = xmalloc(sizeof(float) * na), *B = xmalloc(sizeof(float) * nb);
            float *C = xmalloc(sizeof(float) * nc), *R = xmalloc(sizeof(float) * nc);
            fill(A, na, &r);
            fill(B, nb, &r);
            fill(C, nc, &r);
            for (long i = 0; i < nc; i++) R[i] = C[i];
            int lda = ta ? M : K;
            gemm_var(ta, 0, M, N, K, A, lda, B, N, C, N, ta, NULL);
            gemm_naive(ta, 0, M, N, K, A, lda, B, N, R, N, ta, NULL);
            check_arrays_close("gemm_var", C, R, (long)M * N, 1e-4, 1e-4);
            free(A);
            free(B);
            free(C);
            free(R);
        }
    CHECK(gemm_primitives_created() - before_var == 2,
          "gemm_var made %lld primitives for 2 transposition cases x 14 sizes",
          (long long)(gemm_primitives_created() - before_var));
    /* bf16 operands, fp32 or bf16 output, every transposition, odd shapes, strides,
     * accumulate, bias, long reductions and runtime M and K (where the CPU runs bf16:
     * elsewhere train.precision bf16 is refused, tests/suite_bf16.sh) */
    if (gemm_bf16_native()) {
    for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int variant = 0; variant < 4; variant++) {
                    int pad = variant & 1 ? 3 : 0, acc = variant >= 1, bias = variant == 2;
                    for (int c_bf16 = 0; c_bf16 < 2; c_bf16++)
                        bf16_case(ta, tb, shapes[s][0], shapes[s][1], shapes[s][2], pad, acc, bias,
                                  c_bf16, variant == 3, &r);
                }
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) bf16_case(ta, tb, 5, 7, 40001, 3, ta, tb, tb, 0, &r);
    bf16_case(0, 1, 4, 6, 0, 0, 0, 1, 1, 0, &r);
    for (int n = 0; n < 40; n += 7) bf16_case(0, 1, n, 16, 20, 0, 1, 0, 0, 1, &r);
    for (int n = 0; n < 40; n += 7) bf16_case(1, 0, 24, 16, n, 0, 1, 0, 1, 1, &r);
    /* the bf16 peak where AMX runs the products: the product's own rate (a number, not a
     * speed claim: make bench prints it beside the vector loop's) */
    double pk = gemm_bf16_peak_gflops(0.02);
    CHECK(isfinite(pk) && pk > 0.0, "oneDNN bf16 product rate %.1f GFLOP/s", pk);
    } else {
        printf("bf16 products skipped: oneDNN runs %s here, without AVX-512 BF16\n", gemm_isa_name());
    }
    if (!gemm_rows_exact())
        printf("fp32 products on 1 and 2 threads compared to round-off: oneDNN's %s kernels change a "
               "row's bits with the product's shape (bitwise on AVX-512)\n", gemm_isa_name());
    /* Split over 2 threads by rows (A as given) against one thread, bit for bit (AVX-512;
     * to round-off in fp32 where gemm_rows_exact() is 0): even
     * and odd row counts, strides, accumulate, bias, runtime M, long reductions, fp32
     * and bf16. Transposed A stays whole, on oneDNN's threads: the same bits in fp32,
     * not in bf16 (it splits a long bf16 reduction over threads: M=97 N=33 K=40001) */
    const int split[][3] = {{64, 48, 40}, {301, 77, 130}, {256, 768, 96}, {1024, 256, 768}, {97, 33, 40001}};
    for (unsigned s = 0; s < sizeof split / sizeof split[0]; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int types = 0; types < (gemm_bf16_native() && !ta ? 3 : 1); types++)
                    for (int variant = 0; variant < 4; variant++)
                        split_case(ta, tb, split[s][0], split[s][1], split[s][2], variant & 1 ? 3 : 0,
                                   variant >= 1, variant == 2, types, variant == 3 && split[s][2] < 40001, &r);
    check_par_bytes(&r);
    /* Conversions: round to nearest even, NaN stays NaN, bf16 -> fp32 exact. */
    CHECK(bf16_round(1.0f) == 0x3f80 && bf16_round(-2.0f) == 0xc000, "bf16 of 1 and -2");
    CHECK(bf16_round(1.00390625f) == 0x3f80, "1 + 2^-8 (a tie) rounds to even 1");
    CHECK(bf16_round(1.01171875f) == 0x3f82, "1 + 3 x 2^-8 (a tie) rounds to even");
    CHECK(bf16_round(1.0048828125f) == 0x3f81, "above the tie rounds up");
    CHECK(bf16_float(bf16_round(NAN)) != bf16_float(bf16_round(NAN)), "NaN stays NaN");
    CHECK(bf16_float(bf16_round(INFINITY)) == INFINITY, "infinity stays infinity");
    CHECK(bf16_float(0x4049) == 3.140625f, "bf16 -> fp32 is exact");
    /* The cache: repeating a shape creates no new primitive. */
    int64_t before = gemm_primitives_created();
    one_case(0, 1, 17, 33, 65, 0, 0, 0, &r);
    CHECK(gemm_primitives_created() == before, "a repeated shape created a new primitive");
    gemm_shutdown();
    return check_finish("gemm: oneDNN equals the naive reference; par_zero / par_copy equal memset / memcpy; big buffers on huge-page boundaries");
}

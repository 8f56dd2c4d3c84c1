/* oneDNN GEMMs against the naive reference: every transposition, odd shapes, strides,
 * accumulate and bias, and the primitive cache. */
#include <stdlib.h>

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
    /* The cache: repeating a shape creates no new primitive. */
    int64_t before = gemm_primitives_created();
    one_case(0, 1, 17, 33, 65, 0, 0, 0, &r);
    CHECK(gemm_primitives_created() == before, "a repeated shape created a new primitive");
    gemm_shutdown();
    return check_finish("gemm: oneDNN equals the naive reference");
}

/*
 * bench_gemm: oneDNN GEMM efficiency at the shapes of a GPT-2 training step,
 * against the fp32 FMA peak measured in the same run with the same threads
 * (OMP_NUM_THREADS). Forward, input-gradient and weight-gradient products of
 * every linear layer, and the per-head attention products. With --bf16, the
 * same products on bf16 operands with fp32 sums and outputs (gemm_bf16), against
 * the bf16 dot-product peak.
 *
 *   bench_gemm [--tokens N] [--embd C] [--hidden H] [--vocab Vp] [--seq T] [--heads NH] [--bf16]
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/bf16.h"
#include "infmoe/gemm.h"
#include "infmoe/peak.h"
#include "infmoe/util.h"

static int arg_int(int argc, char **argv, const char *name, int def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return atoi(argv[i + 1]);
    return def;
}

static double g_peak, g_flops, g_secs;
static int g_bf16;

static void product(int ta, int tb, int64_t M, int64_t N, int64_t K, const void *A, int64_t lda,
                    const void *B, int64_t ldb, float *C, int acc) {
    if (g_bf16)
        gemm_bf16(ta, tb, M, N, K, A, lda, B, ldb, C, N, 0, acc, NULL);
    else
        gemm(ta, tb, M, N, K, A, lda, B, ldb, C, N, acc, NULL);
}

/* Time C[M,N] (+)= op(A) op(B) with dense leading dimensions; print GFLOP/s and % of peak. */
static void run(const char *what, int ta, int tb, int64_t M, int64_t N, int64_t K, int acc) {
    float *A = xcalloc((size_t)(M * K), sizeof(float)), *B = xcalloc((size_t)(K * N), sizeof(float));
    float *C = xcalloc((size_t)(M * N), sizeof(float));
    for (int64_t i = 0; i < M * K; i++) A[i] = 1e-3f * (float)(i % 7);
    for (int64_t i = 0; i < K * N; i++) B[i] = 1e-3f * (float)(i % 5);
    const void *a = A, *b = B;
    bf16 *Ah = NULL, *Bh = NULL;
    if (g_bf16) {
        Ah = xcalloc((size_t)(M * K), sizeof(bf16));
        Bh = xcalloc((size_t)(K * N), sizeof(bf16));
        bf16_from_f32(Ah, A, M * K);
        bf16_from_f32(Bh, B, K * N);
        a = Ah;
        b = Bh;
    }
    int64_t lda = ta ? M : K, ldb = tb ? K : N;
    product(ta, tb, M, N, K, a, lda, b, ldb, C, acc); /* create and warm */
    double flops = 2.0 * M * N * K;
    int reps = (int)(g_peak * 1e8 / flops) + 1; /* about 0.1 s of work at peak */
    double t0 = wall_time();
    for (int r = 0; r < reps; r++) product(ta, tb, M, N, K, a, lda, b, ldb, C, acc);
    double dt = (wall_time() - t0) / reps;
    printf("  %-28s M%6lld N%6lld K%6lld  %7.1f GFLOP/s  %5.1f%% of peak\n", what, (long long)M,
           (long long)N, (long long)K, flops / dt * 1e-9, flops / dt * 1e-9 / g_peak * 100);
    g_flops += flops;
    g_secs += dt;
    free(Ah);
    free(Bh);
    free(A);
    free(B);
    free(C);
}

static void linear(const char *name, int64_t N, int64_t C, int64_t OC) {
    char what[64];
    snprintf(what, sizeof what, "%s forward", name);
    run(what, 0, 1, N, OC, C, 0);
    snprintf(what, sizeof what, "%s d input", name);
    run(what, 0, 0, N, C, OC, 1);
    snprintf(what, sizeof what, "%s d weight", name);
    run(what, 1, 0, OC, C, N, 1);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            printf("usage: bench_gemm [--tokens N] [--embd C] [--hidden H] [--vocab Vp] [--seq T] "
                   "[--heads NH] [--bf16]\nGEMM efficiency at GPT-2 training shapes (default GPT-2 small, "
                   "N = 4 x 256 tokens), fp32 or\n(--bf16) bf16 operands with fp32 sums, against the "
                   "peak of that precision.\nThreads: OMP_NUM_THREADS.\n");
            return 0;
        }
    int64_t N = arg_int(argc, argv, "--tokens", 1024), C = arg_int(argc, argv, "--embd", 768);
    int64_t H = arg_int(argc, argv, "--hidden", 3072), V = arg_int(argc, argv, "--vocab", 50304);
    int64_t T = arg_int(argc, argv, "--seq", 256), NH = arg_int(argc, argv, "--heads", 12);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--bf16") == 0) g_bf16 = 1;
    if (g_bf16 && !(peak_has_bf16() && gemm_bf16_native())) {
        fprintf(stderr, "bench_gemm: --bf16 needs AVX-512 BF16 or AMX, which this CPU (or "
                        "ONEDNN_MAX_CPU_ISA) does not give\n");
        return 1;
    }
    g_peak = g_bf16 ? peak_bf16_gflops(0.2) : peak_fma_gflops(0.2);
    if (g_bf16)
        printf("bench_gemm: bf16 | threads %d | peak %.0f GFLOP/s (%s) | oneDNN 2048^3 product "
               "%.0f GFLOP/s | tokens %lld\n",
               omp_get_max_threads(), g_peak, peak_bf16_source(),
               gemm_bf16_amx() ? g_peak : gemm_bf16_peak_gflops(0.2), (long long)N);
    else
        printf("bench_gemm: fp32 | threads %d | peak %.0f GFLOP/s (FMA, %d lanes) | tokens %lld\n",
               omp_get_max_threads(), g_peak, peak_fma_lanes(), (long long)N);
    linear("attn qkv", N, C, 3 * C);
    linear("attn proj", N, C, C);
    linear("ffn fc", N, C, H);
    linear("ffn proj", N, H, C);
    linear("lm head", N, C, V);
    run("attn scores q.k^T (1 head)", 0, 1, T, T, C / NH, 0);
    run("attn att.v (1 head)", 0, 0, T, C / NH, T, 0);
    printf("  all shapes above, weighted by FLOPs: %.1f GFLOP/s, %.1f%% of peak\n",
           g_flops / g_secs * 1e-9, g_flops / g_secs * 1e-9 / g_peak * 100);
    gemm_shutdown();
    return 0;
}

/*
 * bench_gemm: oneDNN GEMM efficiency at the shapes of a GPT-2 training step,
 * against the fp32 FMA peak measured in the same run with the same threads
 * (OMP_NUM_THREADS). Forward, input-gradient and weight-gradient products of
 * every linear layer, and the per-head attention products.
 *
 *   bench_gemm [--tokens N] [--embd C] [--hidden H] [--vocab Vp] [--seq T] [--heads NH]
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/gemm.h"
#include "infmoe/peak.h"
#include "infmoe/util.h"

static int arg_int(int argc, char **argv, const char *name, int def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return atoi(argv[i + 1]);
    return def;
}

static double g_peak, g_flops, g_secs;

/* Time C[M,N] (+)= op(A) op(B) with dense leading dimensions; print GFLOP/s and % of peak. */
static void run(const char *what, int ta, int tb, int64_t M, int64_t N, int64_t K, int acc) {
    float *A = xcalloc((size_t)(M * K), sizeof(float)), *B = xcalloc((size_t)(K * N), sizeof(float));
    float *C = xcalloc((size_t)(M * N), sizeof(float));
    for (int64_t i = 0; i < M * K; i++) A[i] = 1e-3f * (float)(i % 7);
    for (int64_t i = 0; i < K * N; i++) B[i] = 1e-3f * (float)(i % 5);
    int64_t lda = ta ? M : K, ldb = tb ? K : N;
    gemm(ta, tb, M, N, K, A, lda, B, ldb, C, N, acc, NULL); /* create and warm */
    double flops = 2.0 * M * N * K;
    int reps = (int)(2e10 / flops) + 1; /* about 0.1 s of work at peak */
    double t0 = wall_time();
    for (int r = 0; r < reps; r++) gemm(ta, tb, M, N, K, A, lda, B, ldb, C, N, acc, NULL);
    double dt = (wall_time() - t0) / reps;
    printf("  %-28s M%6lld N%6lld K%6lld  %7.1f GFLOP/s  %5.1f%% of peak\n", what, (long long)M,
           (long long)N, (long long)K, flops / dt * 1e-9, flops / dt * 1e-9 / g_peak * 100);
    g_flops += flops;
    g_secs += dt;
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
                   "[--heads NH]\nGEMM efficiency at GPT-2 training shapes (default GPT-2 small, "
                   "N = 4 x 256 tokens).\nThreads: OMP_NUM_THREADS.\n");
            return 0;
        }
    int64_t N = arg_int(argc, argv, "--tokens", 1024), C = arg_int(argc, argv, "--embd", 768);
    int64_t H = arg_int(argc, argv, "--hidden", 3072), V = arg_int(argc, argv, "--vocab", 50304);
    int64_t T = arg_int(argc, argv, "--seq", 256), NH = arg_int(argc, argv, "--heads", 12);
    g_peak = peak_fma_gflops(0.2);
    printf("bench_gemm: threads %d | peak %.0f GFLOP/s (FMA, %d lanes) | tokens %lld\n",
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

/*
 * bench_infinite: time of one ∞-MoE FFN layer (forward + backward, one rank)
 * at GPT-2 small shapes, against two baselines measured in the same run:
 *   masked dense  every one of the H units computed with dense GEMMs, the
 *                 per-unit mask applied to the activations (the naive way)
 *   dense active  a dense FFN as wide as the units a token actually uses
 *                 (K x keep x H)
 *   bench_infinite [--tokens N] [--embd C] [--units H] [--block B] [--chunk-units U] [--reps R]
 *                  [--keep F --samples K]
 */
#include <mpi.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ffn.h"
#include "infmoe/gemm.h"
#include "infmoe/infinite.h"
#include "infmoe/ops.h"
#include "infmoe/peak.h"
#include "infmoe/util.h"

static int arg_int(int argc, char **argv, const char *name, int def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return atoi(argv[i + 1]);
    return def;
}

static float *randn(size_t n, float s, rng_state *r) {
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = s * rng_normal(r);
    return x;
}

/* Masked dense FFN of H units, forward and backward; returns seconds per call. */
static double masked_dense(int64_t N, int C, int H, int reps, rng_state *r) {
    float *X = randn((size_t)(N * C), 1, r), *W1 = randn((size_t)H * C, 0.02f, r), *W2 = randn((size_t)H * C, 0.02f, r);
    float *b1 = xcalloc((size_t)H, 4), *mask = randn((size_t)(N * H), 1, r), *dY = randn((size_t)(N * C), 1, r);
    float *Hp = xcalloc((size_t)(N * H), 4), *A = xcalloc((size_t)(N * H), 4), *dA = xcalloc((size_t)(N * H), 4);
    float *dH = xcalloc((size_t)(N * H), 4), *Y = xcalloc((size_t)(N * C), 4), *dX = xcalloc((size_t)(N * C), 4);
    float *dW1 = xcalloc((size_t)H * C, 4), *dW2 = xcalloc((size_t)H * C, 4);
    double best = 1e30;
    for (int rep = 0; rep <= reps; rep++) {
        double t0 = wall_time();
        gemm(0, 1, N, H, C, X, C, W1, C, Hp, H, 0, b1);
        gelu_forward(A, Hp, N * H);
        for (int64_t i = 0; i < N * H; i++) A[i] *= mask[i];
        gemm(0, 0, N, C, H, A, H, W2, C, Y, C, 0, NULL);
        gemm(0, 1, N, H, C, dY, C, W2, C, dA, H, 0, NULL);
        gemm(1, 0, H, C, N, A, H, dY, C, dW2, C, 1, NULL);
        for (int64_t i = 0; i < N * H; i++) dA[i] *= mask[i];
        memset(dH, 0, sizeof(float) * (size_t)(N * H));
        gelu_backward(dH, Hp, dA, N * H);
        gemm(1, 0, H, C, N, dH, H, X, C, dW1, C, 1, NULL);
        gemm(0, 0, N, C, H, dH, H, W1, C, dX, C, 0, NULL);
        double dt = wall_time() - t0;
        if (rep > 0 && dt < best) best = dt;
    }
    float *bufs[] = {X, W1, W2, b1, mask, dY, Hp, A, dA, dH, Y, dX, dW1, dW2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    return best;
}

/* A layer behind the FFN interface (dense or ∞-MoE), forward and backward; seconds per call. */
static double layer_time(run_config *cfg, int64_t N, int reps, rng_state *r, double *active) {
    tensor_table tab = {0};
    ffn_layer f;
    ffn_context ctx = {MPI_COMM_WORLD, MPI_COMM_WORLD, 1, 1, 0, 5, 1, 10, 0, 1, 0, NULL};
    ffn_init(&f, cfg, 0, &tab, N, &ctx);
    ffn_register_sharded(&f, &tab);
    float *P = xcalloc(tab.total, 4), *G = xcalloc(tab.total, 4);
    tensor_init_values(&tab, P, 3);
    float *X = randn((size_t)(N * cfg->n_embd), 1, r), *dY = randn((size_t)(N * cfg->n_embd), 1, r);
    float *out = xcalloc((size_t)(N * cfg->n_embd), 4), *dX = xcalloc((size_t)(N * cfg->n_embd), 4);
    float *scratch = xcalloc(ffn_scratch_floats(&f, N) + 1, 4);
    double best = 1e30;
    for (int rep = 0; rep <= reps; rep++) {
        double t0 = wall_time();
        ffn_forward(&f, P, out, X, N, &ctx);
        ffn_backward(&f, P, G, dX, dY, X, N, scratch, &ctx);
        double dt = wall_time() - t0;
        if (rep > 0 && dt < best) best = dt;
    }
    stats_row row;
    ffn_stats_row(&f, &row);
    if (active) *active = f.kind == FFN_INFINITE ? row.active_units : cfg->ffn_hidden;
    if (f.kind == FFN_INFINITE) {
        double t[4];
        inf_phase_detail(f.inf, t);
        double tot = t[0] + t[1] + t[2] + t[3];
        printf("    (router %.0f%% | masks %.0f%% | unit GEMMs and gathers %.0f%% | all-to-all %.0f%%)\n",
               100 * t[0] / tot, 100 * t[1] / tot, 100 * t[2] / tot, 100 * t[3] / tot);
    }
    ffn_free(&f);
    tensor_table_free(&tab);
    free(P);
    free(G);
    free(X);
    free(dY);
    free(out);
    free(dX);
    free(scratch);
    return best;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        printf("usage: bench_infinite [--tokens N] [--embd C] [--units H] [--block B] [--chunk-units U] [--reps R]\n"
               "                      [--keep F --samples K]   one setting instead of the table\n");
        MPI_Finalize();
        return 0;
    }
    int64_t N = arg_int(argc, argv, "--tokens", 1024);
    int C = arg_int(argc, argv, "--embd", 768), H = arg_int(argc, argv, "--units", 6144);
    int block = arg_int(argc, argv, "--block", 64), reps = arg_int(argc, argv, "--reps", 3);
    int chunk_units = arg_int(argc, argv, "--chunk-units", 256);
    rng_state r;
    rng_seed(&r, 1);
    double peak = peak_fma_gflops(0.2);
    double md = masked_dense(N, C, H, reps, &r);
    printf("bench_infinite: tokens %lld | C %d | H %d units in blocks of %d, chunks of %d | threads %d | "
           "peak %.0f GFLOP/s\n",
           (long long)N, C, H, block, chunk_units, omp_get_max_threads(), peak);
    printf("  masked dense (all %d units): %.1f ms forward+backward (%.1f%% of peak)\n", H, md * 1e3,
           100.0 * 12.0 * N * C * H / md / (peak * 1e9));
    float keeps[] = {0.125f, 0.25f, 0.5f, 1.0f};
    int n_keeps = 4, k_lo = 1, k_hi = 2;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--keep") == 0) {
            keeps[0] = (float)atof(argv[i + 1]);
            n_keeps = 1;
            k_lo = k_hi = arg_int(argc, argv, "--samples", 1);
        }
    for (int samples = k_lo; samples <= k_hi; samples++)
        for (int i = 0; i < n_keeps; i++) {
            run_config cfg;
            config_defaults(&cfg);
            cfg.n_embd = C;
            cfg.n_layer = 12;
            cfg.ffn_kind = FFN_INFINITE;
            cfg.inf_units = H;
            cfg.mask_block = block;
            cfg.chunk_units = chunk_units;
            cfg.keep = keeps[i];
            cfg.samples = samples;
            cfg.latent_dim = 1;
            double active;
            double t = layer_time(&cfg, N, reps, &r, &active);
            run_config dense;
            config_defaults(&dense);
            dense.n_embd = C;
            dense.ffn_hidden = (int)(active + 0.5);
            double td = layer_time(&dense, N, reps, &r, NULL);
            printf("  keep %5.1f%% K %d: %.1f ms | %.3f of masked dense (keep x K = %.3f, target <= %.2f) | "
                   "%.2fx a dense FFN of the %.0f units it uses (%.1f ms)\n",
                   100 * keeps[i], samples, t * 1e3, t / md, keeps[i] * samples,
                   1.3 * keeps[i] * samples > 1 ? 1.3 : 1.3 * keeps[i] * samples, t / td, active, td * 1e3);
        }
    gemm_shutdown();
    MPI_Finalize();
    return 0;
}

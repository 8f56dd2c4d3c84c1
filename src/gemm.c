/* gemm: cached oneDNN matmul primitives and the naive reference (see gemm.h). */
#include "infmoe/gemm.h"

#include <dnnl.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/bf16.h"
#include "infmoe/util.h"

static void dnnl_check_at(dnnl_status_t st, const char *call, const char *file, int line) {
    if (st == dnnl_success) return;
    infmoe_fail_at(file, line, "oneDNN call failed: %s: status %d", call, (int)st);
}
#define DNNL_CHECK(call) dnnl_check_at((call), #call, __FILE__, __LINE__)

typedef struct {
    int64_t M, N, K, lda, ldb, ldc; /* M, K = DNNL_RUNTIME_DIM_VAL for gemm_var */
    int trans_a, trans_b, accumulate, bias;
    int types; /* GEMM_TYPES_*: the operands' data types */
} gemm_key;

enum { GEMM_TYPES_F32 = 0, GEMM_TYPES_BF16 = 1, GEMM_TYPES_BF16_OUT = 2 };

/* A thread's memory objects for one primitive, re-pointed at each call's buffers. */
typedef struct {
    dnnl_memory_t src, wei, dst, bia, pad;
} gemm_mems;

typedef struct {
    gemm_key key;
    dnnl_primitive_t prim;
    dnnl_memory_desc_t a_md, b_md, c_md, bias_md, pad_md;
    size_t pad_bytes; /* the primitive's scratchpad (user-managed: one buffer per thread) */
    gemm_mems *mem;   /* (g_threads), each made by its thread on first use */
} gemm_entry;

/*
 * gemm may be called from several OpenMP threads at once (independent small
 * products, one thread each): entries never move once made (the table holds
 * pointers), the table is searched and grown in one critical section, and each
 * thread has its own stream, memory objects and scratchpad.
 */
static dnnl_engine_t g_engine;
static int g_threads;
static dnnl_stream_t *g_streams;     /* (g_threads) */
static void **g_pad;                 /* (g_threads) scratchpad buffers */
static size_t *g_pad_cap;
static gemm_entry **g_table;
static int64_t g_cap, g_count, g_created;

static uint64_t key_hash(const gemm_key *k) {
    const int64_t v[11] = {k->M, k->N, k->K, k->lda, k->ldb, k->ldc,
                           k->trans_a, k->trans_b, k->accumulate, k->bias, k->types};
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 11; i++) h = (h ^ (uint64_t)v[i]) * 1099511628211ULL;
    return h;
}

static int key_eq(const gemm_key *a, const gemm_key *b) {
    return a->M == b->M && a->N == b->N && a->K == b->K && a->lda == b->lda &&
           a->ldb == b->ldb && a->ldc == b->ldc && a->trans_a == b->trans_a &&
           a->trans_b == b->trans_b && a->accumulate == b->accumulate && a->bias == b->bias &&
           a->types == b->types;
}

static void init_engine(void) {
    if (g_engine) return;
    DNNL_CHECK(dnnl_engine_create(&g_engine, dnnl_cpu, 0));
    g_threads = omp_get_max_threads() > omp_get_num_procs() ? omp_get_max_threads() : omp_get_num_procs();
    g_streams = xcalloc((size_t)g_threads, sizeof *g_streams);
    for (int t = 0; t < g_threads; t++)
        DNNL_CHECK(dnnl_stream_create(&g_streams[t], g_engine, dnnl_stream_default_flags));
    g_pad = xcalloc((size_t)g_threads, sizeof *g_pad);
    g_pad_cap = xcalloc((size_t)g_threads, sizeof *g_pad_cap);
    g_cap = 64;
    g_table = xcalloc((size_t)g_cap, sizeof *g_table);
}

static gemm_entry **slot_for(gemm_entry **table, int64_t cap, const gemm_key *k) {
    int64_t i = (int64_t)(key_hash(k) & (uint64_t)(cap - 1));
    while (table[i] && !key_eq(&table[i]->key, k)) i = (i + 1) & (cap - 1);
    return &table[i];
}

static void grow(void) {
    int64_t cap = g_cap * 2;
    gemm_entry **t = xcalloc((size_t)cap, sizeof *t);
    for (int64_t i = 0; i < g_cap; i++)
        if (g_table[i]) *slot_for(t, cap, &g_table[i]->key) = g_table[i];
    free(g_table);
    g_table = t;
    g_cap = cap;
}

static int is_var(const gemm_key *k) { return k->M == DNNL_RUNTIME_DIM_VAL; }

/* Descriptors of the operands for M rows and reduction K (runtime values allowed). */
static void make_mds(const gemm_key *k, int64_t M, int64_t K, dnnl_memory_desc_t *a_md,
                     dnnl_memory_desc_t *b_md, dnnl_memory_desc_t *c_md) {
    dnnl_dims_t a_dims = {M, K}, b_dims = {K, k->N}, c_dims = {M, k->N};
    dnnl_dims_t a_str = {k->trans_a ? 1 : k->lda, k->trans_a ? k->lda : 1};
    dnnl_dims_t b_str = {k->trans_b ? 1 : k->ldb, k->trans_b ? k->ldb : 1};
    dnnl_dims_t c_str = {k->ldc, 1};
    dnnl_data_type_t in = k->types == GEMM_TYPES_F32 ? dnnl_f32 : dnnl_bf16;
    dnnl_data_type_t out = k->types == GEMM_TYPES_BF16_OUT ? dnnl_bf16 : dnnl_f32;
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(a_md, 2, a_dims, in, a_str));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(b_md, 2, b_dims, in, b_str));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(c_md, 2, c_dims, out, c_str));
}

static gemm_entry *create_entry(const gemm_key *k) {
    gemm_entry *e = xcalloc(1, sizeof *e);
    make_mds(k, k->M, k->K, &e->a_md, &e->b_md, &e->c_md);
    dnnl_dims_t bias_dims = {1, k->N}, bias_str = {k->N, 1};
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&e->bias_md, 2, bias_dims, dnnl_f32, bias_str));

    dnnl_matmul_desc_t desc;
    DNNL_CHECK(dnnl_matmul_desc_init(&desc, &e->a_md, &e->b_md, k->bias ? &e->bias_md : NULL,
                                     &e->c_md));
    dnnl_primitive_attr_t attr;
    DNNL_CHECK(dnnl_primitive_attr_create(&attr));
    DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    if (k->accumulate) {
        dnnl_post_ops_t po;
        DNNL_CHECK(dnnl_post_ops_create(&po));
        DNNL_CHECK(dnnl_post_ops_append_sum(po, 1.0f));
        DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, po));
        DNNL_CHECK(dnnl_post_ops_destroy(po));
    }
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_primitive_desc_create(&pd, &desc, attr, g_engine, NULL);
    if (st != dnnl_success)
        INFMOE_FAIL("oneDNN has no matmul for M=%lld N=%lld K=%lld trans=(%d,%d) "
                    "ld=(%lld,%lld,%lld) %s (status %d)",
                    (long long)k->M, (long long)k->N, (long long)k->K, k->trans_a, k->trans_b,
                    (long long)k->lda, (long long)k->ldb, (long long)k->ldc,
                    k->types == GEMM_TYPES_F32 ? "fp32" : "bf16", (int)st);
    DNNL_CHECK(dnnl_primitive_create(&e->prim, pd));
    e->pad_md = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    e->pad_bytes = dnnl_memory_desc_get_size(&e->pad_md);
    DNNL_CHECK(dnnl_primitive_desc_destroy(pd));
    DNNL_CHECK(dnnl_primitive_attr_destroy(attr));
    e->mem = xcalloc((size_t)g_threads, sizeof *e->mem);
    e->key = *k;
    g_created++;
    return e;
}

/*
 * Longest reduction one primitive gets. oneDNN 2.6 drops from ~94% to ~65% of
 * peak on the LM head's input gradient (K = 50304); chunks of K at most this
 * long, accumulated, run at full speed (bench/bench_gemm measures it).
 */
#define GEMM_MAX_K 16384

static gemm_entry *lookup(const gemm_key *k);
static void gemm_typed(int types, int var, int trans_a, int trans_b, int64_t M, int64_t N,
                       int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb, void *C,
                       int64_t ldc, int accumulate, const float *bias);

/* Fewest rows of C a thread gets when a product is split over threads. */
#define GEMM_SPLIT_MIN_ROWS 32
static int g_row_split = 1;

void gemm_set_row_split(int on) { g_row_split = on != 0; }

/*
 * Called outside a parallel region with n > 1 threads, a product A B with A not
 * transposed and at least n * GEMM_SPLIT_MIN_ROWS rows runs as n products of
 * consecutive rows of A and C, one per thread, each on that thread alone (inside a
 * parallel region oneDNN runs on one thread: OpenMP's default of one active
 * level). At GPT-2 small shapes (4096 tokens, 2 threads) oneDNN 2.6 splitting a
 * forward or input-gradient product itself reached 73-85% of the bf16 peak, split
 * by rows 76-91%, a single thread's rate (bench/bench_gemm). With A as given, a
 * row's sums come out the same whatever rows share its product, so the bits are
 * one thread's (tests/run.sh, `threads:`); with A transposed (the weight
 * gradients, a sum over tokens) any split, even on one thread, changes the bits
 * of oneDNN's one product, so those stay whole and oneDNN splits them itself, as
 * it does to the same bits. Returns 0 where the product is not split.
 */
static int split_rows(int types, int var, int trans_a, int trans_b, int64_t M, int64_t N,
                      int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb, void *C,
                      int64_t ldc, int accumulate, const float *bias) {
    const int nt = omp_get_max_threads();
    if (!g_row_split || nt < 2 || trans_a || omp_in_parallel() ||
        M < (int64_t)nt * GEMM_SPLIT_MIN_ROWS)
        return 0;
    const size_t es = types == GEMM_TYPES_F32 ? sizeof(float) : sizeof(bf16);
    const size_t ces = types == GEMM_TYPES_BF16_OUT ? sizeof(bf16) : sizeof(float);
    const int64_t rows = (M + nt - 1) / nt;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        const int64_t i0 = t * rows, m = M - i0 < rows ? M - i0 : rows;
        if (m <= 0) continue;
        const char *a = (const char *)A + (size_t)(trans_a ? i0 : i0 * lda) * es;
        gemm_typed(types, var, trans_a, trans_b, m, N, K, a, lda, B, ldb,
                   (char *)C + (size_t)(i0 * ldc) * ces, ldc, accumulate, bias);
    }
    return 1;
}

static void execute(gemm_entry *e, int64_t M, int64_t K, const void *A, const void *B, void *C,
                    const float *bias);

/*
 * One product of any operand types. K == 0 (an empty sum, which oneDNN rejects)
 * is the naive loop's; reductions longer than GEMM_MAX_K run as accumulated
 * chunks; var: runtime M and K.
 */
static void gemm_typed(int types, int var, int trans_a, int trans_b, int64_t M, int64_t N,
                       int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb, void *C,
                       int64_t ldc, int accumulate, const float *bias) {
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (types == GEMM_TYPES_F32)
            gemm_naive(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate, bias);
        else
            gemm_naive_bf16(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc,
                            types == GEMM_TYPES_BF16_OUT, accumulate, bias);
        return;
    }
    if (split_rows(types, var, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate, bias))
        return;
    if (var) {
        gemm_key k = {DNNL_RUNTIME_DIM_VAL, N, DNNL_RUNTIME_DIM_VAL, lda, ldb, ldc, trans_a != 0,
                      trans_b != 0, accumulate != 0, bias != NULL, types};
        execute(lookup(&k), M, K, A, B, C, bias);
        return;
    }
    size_t es = types == GEMM_TYPES_F32 ? sizeof(float) : sizeof(bf16);
    int64_t chunks = (K + GEMM_MAX_K - 1) / GEMM_MAX_K, kc = (K + chunks - 1) / chunks;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t kk = K - k0 < kc ? K - k0 : kc;
        const char *a = (const char *)A + (size_t)(trans_a ? k0 * lda : k0) * es;
        const char *b = (const char *)B + (size_t)(trans_b ? k0 : k0 * ldb) * es;
        gemm_key k = {M, N, kk, lda, ldb, ldc, trans_a != 0, trans_b != 0,
                      accumulate || k0 > 0, k0 == 0 && bias != NULL, types};
        execute(lookup(&k), M, kk, a, b, C, k0 == 0 ? bias : NULL);
    }
}

void gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
          int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
          const float *bias) {
    gemm_typed(GEMM_TYPES_F32, 0, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate,
               bias);
}

void gemm_var(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
              int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
              const float *bias) {
    gemm_typed(GEMM_TYPES_F32, 1, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate,
               bias);
}

void gemm_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
               int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
               int accumulate, const float *bias) {
    gemm_typed(c_bf16 ? GEMM_TYPES_BF16_OUT : GEMM_TYPES_BF16, 0, trans_a, trans_b, M, N, K, A,
               lda, B, ldb, C, ldc, accumulate, bias);
}

void gemm_var_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
                   int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
                   int accumulate, const float *bias) {
    gemm_typed(c_bf16 ? GEMM_TYPES_BF16_OUT : GEMM_TYPES_BF16, 1, trans_a, trans_b, M, N, K, A,
               lda, B, ldb, C, ldc, accumulate, bias);
}

/* The cached primitive for `k`, created on first use. */
static gemm_entry *lookup(const gemm_key *k) {
    gemm_entry *e;
#pragma omp critical(infmoe_gemm_cache)
    {
        init_engine();
        gemm_entry **slot = slot_for(g_table, g_cap, k);
        if (!*slot) {
            if (2 * (g_count + 1) > g_cap) {
                grow();
                slot = slot_for(g_table, g_cap, k);
            }
            *slot = create_entry(k);
            g_count++;
        }
        e = *slot;
    }
    return e;
}

static void execute(gemm_entry *e, int64_t M, int64_t K, const void *A, const void *B, void *C,
                    const float *bias) {
    const int tid = omp_in_parallel() ? omp_get_thread_num() : 0;
    ALWAYS(tid < g_threads);
    gemm_mems *mm = &e->mem[tid];
    dnnl_memory_t src, wei, dst;
    if (is_var(&e->key)) { /* runtime dimensions: memory objects for this call's sizes */
        dnnl_memory_desc_t a_md, b_md, c_md;
        make_mds(&e->key, M, K, &a_md, &b_md, &c_md);
        DNNL_CHECK(dnnl_memory_create(&src, &a_md, g_engine, (void *)A));
        DNNL_CHECK(dnnl_memory_create(&wei, &b_md, g_engine, (void *)B));
        DNNL_CHECK(dnnl_memory_create(&dst, &c_md, g_engine, C));
    } else {
        if (!mm->src) {
            DNNL_CHECK(dnnl_memory_create(&mm->src, &e->a_md, g_engine, DNNL_MEMORY_NONE));
            DNNL_CHECK(dnnl_memory_create(&mm->wei, &e->b_md, g_engine, DNNL_MEMORY_NONE));
            DNNL_CHECK(dnnl_memory_create(&mm->dst, &e->c_md, g_engine, DNNL_MEMORY_NONE));
        }
        src = mm->src, wei = mm->wei, dst = mm->dst;
        DNNL_CHECK(dnnl_memory_set_data_handle(src, (void *)A));
        DNNL_CHECK(dnnl_memory_set_data_handle(wei, (void *)B));
        DNNL_CHECK(dnnl_memory_set_data_handle(dst, C));
    }
    dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    int nargs = 3;
    if (bias) {
        if (!mm->bia) DNNL_CHECK(dnnl_memory_create(&mm->bia, &e->bias_md, g_engine, DNNL_MEMORY_NONE));
        DNNL_CHECK(dnnl_memory_set_data_handle(mm->bia, (void *)bias));
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, mm->bia};
    }
    if (e->pad_bytes > 0) {
        if (e->pad_bytes > g_pad_cap[tid]) { /* the thread's buffer: only it touches it */
            free(g_pad[tid]);
            g_pad[tid] = xmalloc(e->pad_bytes);
            g_pad_cap[tid] = e->pad_bytes;
        }
        if (!mm->pad) DNNL_CHECK(dnnl_memory_create(&mm->pad, &e->pad_md, g_engine, DNNL_MEMORY_NONE));
        DNNL_CHECK(dnnl_memory_set_data_handle(mm->pad, g_pad[tid]));
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, mm->pad};
    }
    DNNL_CHECK(dnnl_primitive_execute(e->prim, g_streams[tid], nargs, args));
    DNNL_CHECK(dnnl_stream_wait(g_streams[tid]));
    if (is_var(&e->key)) {
        DNNL_CHECK(dnnl_memory_destroy(src));
        DNNL_CHECK(dnnl_memory_destroy(wei));
        DNNL_CHECK(dnnl_memory_destroy(dst));
    }
}

void gemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
                const float *bias) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = bias ? bias[j] : 0.0;
            for (int64_t p = 0; p < K; p++) {
                float a = trans_a ? A[p * lda + i] : A[i * lda + p];
                float b = trans_b ? B[j * ldb + p] : B[p * ldb + j];
                s += (double)a * (double)b;
            }
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + (float)s : (float)s;
        }
}

void gemm_naive_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
                     int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
                     int accumulate, const float *bias) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = bias ? bias[j] : 0.0;
            for (int64_t p = 0; p < K; p++) {
                float a = bf16_float(trans_a ? A[p * lda + i] : A[i * lda + p]);
                float b = bf16_float(trans_b ? B[j * ldb + p] : B[p * ldb + j]);
                s += (double)a * (double)b;
            }
            if (c_bf16) {
                bf16 *c = (bf16 *)C + i * ldc + j;
                *c = bf16_round(accumulate ? bf16_float(*c) + (float)s : (float)s);
            } else {
                float *c = (float *)C + i * ldc + j;
                *c = accumulate ? *c + (float)s : (float)s;
            }
        }
}

int64_t gemm_primitives_created(void) { return g_created; }

void gemm_shutdown(void) {
    if (!g_engine) return;
    for (int64_t i = 0; i < g_cap; i++) {
        gemm_entry *e = g_table[i];
        if (!e) continue;
        dnnl_primitive_destroy(e->prim);
        for (int t = 0; t < g_threads; t++) {
            gemm_mems *mm = &e->mem[t];
            if (mm->src) dnnl_memory_destroy(mm->src);
            if (mm->wei) dnnl_memory_destroy(mm->wei);
            if (mm->dst) dnnl_memory_destroy(mm->dst);
            if (mm->bia) dnnl_memory_destroy(mm->bia);
            if (mm->pad) dnnl_memory_destroy(mm->pad);
        }
        free(e->mem);
        free(e);
    }
    free(g_table);
    g_table = NULL;
    g_cap = g_count = 0;
    for (int t = 0; t < g_threads; t++) {
        dnnl_stream_destroy(g_streams[t]);
        free(g_pad[t]);
    }
    free(g_streams);
    free(g_pad);
    free(g_pad_cap);
    g_streams = NULL;
    g_pad = NULL;
    g_pad_cap = NULL;
    dnnl_engine_destroy(g_engine);
    g_engine = NULL;
}

int gemm_bf16_native(void) {
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_bf16) ==
           (unsigned)dnnl_cpu_isa_avx512_core_bf16;
}

int gemm_bf16_amx(void) {
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_amx) ==
           (unsigned)dnnl_cpu_isa_avx512_core_amx;
}

/* GFLOP/s of a 2048-square bf16 product (fp32 sum and C) on this process's threads:
 * calibrated by one product, then the best of five rounds of ~seconds/5 each. */
double gemm_bf16_peak_gflops(double seconds) {
    const int64_t n = 2048;
    bf16 *a = xmalloc((size_t)(n * n) * sizeof(bf16));
    bf16 *b = xmalloc((size_t)(n * n) * sizeof(bf16));
    float *c = xmalloc((size_t)(n * n) * sizeof(float));
    for (int64_t i = 0; i < n * n; i++) {
        a[i] = bf16_round((float)(i % 7) * 0.25f - 0.75f);
        b[i] = bf16_round((float)(i % 5) * 0.5f - 1.0f);
    }
    double flops = 2.0 * (double)n * (double)n * (double)n;
    double t0 = wall_time();
    gemm_bf16(0, 0, n, n, n, a, n, b, n, c, n, 0, 0, NULL); /* primitive, first touch */
    double dt = wall_time() - t0;
    int reps = (int)(seconds / 5 / (dt > 1e-6 ? dt : 1e-6));
    if (reps < 1) reps = 1;
    double best = 0.0;
    for (int r = 0; r < 5; r++) {
        t0 = wall_time();
        for (int i = 0; i < reps; i++)
            gemm_bf16(0, 0, n, n, n, a, n, b, n, c, n, 0, 0, NULL);
        dt = wall_time() - t0;
        double g = flops * reps / dt * 1e-9;
        if (g > best) best = g;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

int gemm_rows_exact(void) { /* the ISAs are bit sets: AVX-512 core's bits all present */
    return ((unsigned)dnnl_get_effective_cpu_isa() & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core;
}

const char *gemm_isa_name(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "other";
    }
}

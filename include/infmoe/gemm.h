/*
 * gemm: every matrix product in infmoe, on oneDNN matmul primitives.
 *
 * Row-major, BLAS-like: C[M,N] = op(A)[M,K] . op(B)[K,N] (+ bias[N]), or += with
 * accumulate. op(X) = X, or X^T when the trans flag is set (then X is stored
 * transposed, with its own leading dimension). Leading dimensions let callers
 * multiply strided views, e.g. one head of a (T, 3C) qkv buffer.
 *
 * oneDNN primitives are created once per (shape, strides, transposition,
 * accumulate, bias, operand types) and cached: creation costs 0.1-0.6 ms, a
 * cached call microseconds. gemm_naive has the same signature and is the
 * reference the tests compare against.
 *
 * Every call may come from any OpenMP thread, several at once (independent small
 * products, one thread each: attention heads, experts): the cache is shared under
 * a lock, each thread has its own stream, memory objects and scratchpad. A call
 * from inside a parallel region runs on its thread alone.
 */
#ifndef INFMOE_GEMM_H
#define INFMOE_GEMM_H

#include <stdint.h>

#include "infmoe/bf16.h"

void gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
          int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
          const float *bias);

/*
 * Same product where M and K change from call to call (tokens per expert: the
 * rows of a forward product, the reduction of a weight gradient): the
 * primitive is created with runtime M and K, so one primitive per (N, strides,
 * transposition, accumulate, bias) serves every token count.
 */
void gemm_var(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
              int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
              const float *bias);

void gemm_naive(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
                const float *bias);

/*
 * bf16 products (train.precision bf16): A and B are bf16, the sum is fp32, C is
 * fp32, or bf16 when c_bf16 (the fp32 sum, plus C's value with accumulate and the
 * fp32 bias, rounded once). gemm_var_bf16 takes runtime M and K like gemm_var.
 */
void gemm_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
               int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
               int accumulate, const float *bias);
void gemm_var_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
                   int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
                   int accumulate, const float *bias);
/* The reference: exact products of the bf16 values summed in double. */
void gemm_naive_bf16(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const bf16 *A,
                     int64_t lda, const bf16 *B, int64_t ldb, void *C, int64_t ldc, int c_bf16,
                     int accumulate, const float *bias);

/*
 * Whether oneDNN runs bf16 products natively on this CPU (AVX-512 BF16 or AMX,
 * within any ONEDNN_MAX_CPU_ISA limit), and the name of the ISA it uses.
 */
int gemm_bf16_native(void);
/* Whether oneDNN runs AMX tiles here (bf16 products far above the vector rate). */
int gemm_bf16_amx(void);
const char *gemm_isa_name(void);
/*
 * 1 where oneDNN's fp32 products give a row of C the same bits whatever rows share
 * its product and however many threads run it: AVX-512 and up, where oneDNN 2.6 runs
 * its brgemm kernels. On AVX2 and below it runs its jit sgemm, whose sums change with
 * the product's shape (a 64-row product's rows differ from two 32-row halves'), so
 * there the thread count and the grouping of rows move the last bits of a run.
 */
int gemm_rows_exact(void);
/* The rate of oneDNN's bf16 product itself (a 2048-square one on this process's
 * threads, best of five rounds in ~`seconds`): the bf16 peak where AMX tiles run
 * the products, whose rate no vector loop shows. */
double gemm_bf16_peak_gflops(double seconds);

/* Whether products with A as given run as one row slice per thread (on by default;
 * off: oneDNN splits every product itself, as before the row split). A benchmark's
 * switch (bench_step --row-split): thread-count bit equality is promised with it on. */
void gemm_set_row_split(int on);

/* Number of primitives created so far (tests check that the cache is hit). */
int64_t gemm_primitives_created(void);

/* Release every cached primitive and the engine. */
void gemm_shutdown(void);

#endif

/* peak: FMA microbenchmarks for the fp32 and bf16 peaks (see peak.h). */
#include "infmoe/peak.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "infmoe/gemm.h"
#include "infmoe/util.h"

/* FMA_ACC independent chains: enough to cover the FMA latency on two pipes (8 or
 * more), few enough to stay in registers with the two constants: AVX-512 has 32
 * vector registers, AVX2 and SSE 16 (16 chains there spill three to the stack and
 * the loop runs at about 0.57 of the core's rate on Zen 3). */
#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define FMA_ACC 16
#define VSET(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(x) _mm512_reduce_add_ps(x)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define FMA_ACC 12
#define VSET(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static float vsum8(__m256 x) {
    float t[8];
    _mm256_storeu_ps(t, x);
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#define VSUM(x) vsum8(x)
#else
typedef float vec;
#define LANES 1
#define FMA_ACC 12
#define VSET(x) (x)
#define VFMA(a, b, c) fmaf(a, b, c)
#define VSUM(x) (x)
#endif

#define ACC 16 /* the bf16 loop's chains (AVX-512 only: 32 registers) */

/* `iters` rounds of FMA_ACC independent FMA chains; returns a value so nothing is elided. */
/* noipa: an opaque call the compiler cannot move across the clock reads. */
__attribute__((noinline, noipa)) static float fma_loop(long iters) {
    vec acc[FMA_ACC];
    for (int k = 0; k < FMA_ACC; k++) acc[k] = VSET(1.0f + 1e-3f * (float)k);
    const vec a = VSET(0.999999f), b = VSET(1e-7f);
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < FMA_ACC; k++) acc[k] = VFMA(acc[k], a, b);
    float s = 0.0f;
    for (int k = 0; k < FMA_ACC; k++) s += VSUM(acc[k]);
    return s;
}

int peak_fma_lanes(void) { return LANES; }

/*
 * bf16: vdpbf16ps, each instruction 32 bf16 products summed pairwise into 16 fp32
 * lanes (64 FLOPs). Compiled for AVX-512 BF16 whatever the build targets, run only
 * where the CPU has it.
 */
#if defined(__x86_64__) && __GNUC__ >= 10
#define HAVE_BF16_LOOP 1
__attribute__((noinline, noipa, target("avx512f,avx512bw,avx512bf16"))) static float
dpbf16_loop(long iters) {
    __m512 acc[ACC];
    for (int k = 0; k < ACC; k++) acc[k] = _mm512_set1_ps(1.0f + 1e-3f * (float)k);
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < ACC; k++) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
    float s = 0.0f;
    for (int k = 0; k < ACC; k++) s += _mm512_reduce_add_ps(acc[k]);
    return s;
}
#endif

int peak_has_bf16(void) {
#ifdef HAVE_BF16_LOOP
    return __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* One measurement of about `seconds` of loop() on every thread at once (on the
 * calling thread alone unless `all`); flops per iteration of the loop. */
static double measure_loop(float (*loop)(long), double flops_per_iter, double seconds, int all) {
    double total = 0.0;
#pragma omp parallel if (all) reduction(+ : total)
    {
        /* Calibrate, then time a run of about `seconds`. */
        long iters = 1 << 16;
        double t0 = wall_time();
        volatile float sink = loop(iters);
        double dt = wall_time() - t0;
        long run = (long)((double)iters * seconds / (dt > 1e-6 ? dt : 1e-6));
        if (run < iters) run = iters;
#pragma omp barrier
        t0 = wall_time();
        sink = loop(run);
        dt = wall_time() - t0;
        (void)sink;
        total += flops_per_iter * (double)run / dt * 1e-9;
    }
    return total;
}

/* the best of five rounds: another process on the cores lowers a round, never raises it */
static double best_of_five(float (*loop)(long), double flops_per_iter, double seconds) {
    double best = 0.0;
    for (int r = 0; r < 5; r++) {
        double g = measure_loop(loop, flops_per_iter, seconds / 5, 1);
        if (g > best) best = g;
    }
    return best;
}

double peak_fma_gflops(double seconds) { return best_of_five(fma_loop, 2.0 * FMA_ACC * LANES, seconds); }

double peak_bf16_gflops(double seconds) {
    if (gemm_bf16_amx()) return gemm_bf16_peak_gflops(seconds);
#ifdef HAVE_BF16_LOOP
    if (peak_has_bf16()) return best_of_five(dpbf16_loop, 64.0 * ACC, seconds);
#endif
    return 0.0;
}

const char *peak_bf16_source(void) {
    if (gemm_bf16_amx()) return "AMX: oneDNN 2048^3 product";
    return peak_has_bf16() ? "vdpbf16ps loop" : "none";
}

/*
 * bf16 products against fp32 ones on one thread, measured once per process: eight
 * rounds of each, alternating (fp32, bf16, fp32, ...), the best of each kind. A
 * stretch of interference (another process starting, the kernel reclaiming memory)
 * then lowers rounds of both kinds rather than all rounds of one: measured one kind
 * after the other, such a stretch once read 1.20 on a core whose rate is 2.0.
 * Where vdpbf16ps issues on one port only (Intel cores before AMX) it reads ~0.5;
 * where it issues like an FMA (AMD Zen 4 and 5) ~2.0.
 */
double peak_bf16_ratio(void) {
    static double ratio = -1.0;
    if (ratio >= 0.0) return ratio;
    ratio = 0.0;
#ifdef HAVE_BF16_LOOP
    if (peak_has_bf16()) {
        double f = 0.0, b = 0.0;
        for (int r = 0; r < 8; r++) {
            double gf = measure_loop(fma_loop, 2.0 * FMA_ACC * LANES, 0.006, 0);
            double gb = measure_loop(dpbf16_loop, 64.0 * ACC, 0.006, 0);
            if (gf > f) f = gf;
            if (gb > b) b = gb;
        }
        ratio = f > 0.0 ? b / f : 0.0;
    }
#endif
    return ratio;
}

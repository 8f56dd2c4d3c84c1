/* peak: FMA microbenchmark for the fp32 peak (see peak.h). */
#include "infmoe/peak.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "infmoe/util.h"

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define VSET(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(x) _mm512_reduce_add_ps(x)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define LANES 8
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
#define VSET(x) (x)
#define VFMA(a, b, c) fmaf(a, b, c)
#define VSUM(x) (x)
#endif

#define ACC 16

/* `iters` rounds of ACC independent FMA chains; returns a value so nothing is elided. */
/* noipa: an opaque call the compiler cannot move across the clock reads. */
__attribute__((noinline, noipa)) static float fma_loop(long iters) {
    vec acc[ACC];
    for (int k = 0; k < ACC; k++) acc[k] = VSET(1.0f + 1e-3f * (float)k);
    const vec a = VSET(0.999999f), b = VSET(1e-7f);
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < ACC; k++) acc[k] = VFMA(acc[k], a, b);
    float s = 0.0f;
    for (int k = 0; k < ACC; k++) s += VSUM(acc[k]);
    return s;
}

int peak_fma_lanes(void) { return LANES; }

/* One measurement of about `seconds` on every thread at once. */
static double measure(double seconds) {
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        /* Calibrate, then time a run of about `seconds`. */
        long iters = 1 << 16;
        double t0 = wall_time();
        volatile float sink = fma_loop(iters);
        double dt = wall_time() - t0;
        long run = (long)((double)iters * seconds / (dt > 1e-6 ? dt : 1e-6));
        if (run < iters) run = iters;
#pragma omp barrier
        t0 = wall_time();
        sink = fma_loop(run);
        dt = wall_time() - t0;
        (void)sink;
        total += 2.0 * ACC * LANES * (double)run / dt * 1e-9;
    }
    return total;
}

double peak_fma_gflops(double seconds) {
    /* the best of five rounds: another process on the cores lowers a round, never raises it */
    double best = 0.0;
    for (int r = 0; r < 5; r++) {
        double g = measure(seconds / 5);
        if (g > best) best = g;
    }
    return best;
}

/*
 * fma_peak: the fp32 and bf16 peaks of this machine, measured with register-
 * resident loops on 1..OMP_NUM_THREADS threads (the denominators of every MFU figure).
 */
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "infmoe/peak.h"

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        printf("usage: fma_peak\nfp32 FMA and bf16 dot-product (AVX-512 BF16) peaks on "
               "1..OMP_NUM_THREADS threads.\n");
        return 0;
    }
    int max = omp_get_max_threads();
    for (int t = 1; t <= max; t++) {
        omp_set_num_threads(t);
        double best = 0;
        for (int r = 0; r < 3; r++) {
            double g = peak_fma_gflops(0.2);
            if (g > best) best = g;
        }
        printf("fma_peak: %d thread(s) | %d-lane FMA | %.1f GFLOP/s (%.1f per thread)\n", t,
               peak_fma_lanes(), best, best / t);
        double bb = 0;
        for (int r = 0; r < 3; r++) {
            double g = peak_bf16_gflops(0.2);
            if (g > bb) bb = g;
        }
        if (bb > 0)
            printf("fma_peak: %d thread(s) | bf16 vdpbf16ps | %.1f GFLOP/s (%.1f per thread, "
                   "%.2fx fp32)\n", t, bb, bb / t, bb / best);
        else
            printf("fma_peak: %d thread(s) | bf16: this CPU has no AVX-512 BF16\n", t);
    }
    return 0;
}

/*
 * fma_peak: the fp32 peak of this machine, measured with a register-resident
 * FMA loop on 1..OMP_NUM_THREADS threads (the denominator of every MFU figure).
 */
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "infmoe/peak.h"

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        printf("usage: fma_peak\nfp32 FMA peak on 1..OMP_NUM_THREADS threads.\n");
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
    }
    return 0;
}

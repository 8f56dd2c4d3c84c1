/*
 * peak: the machine's measured fp32 peak, the denominator of model FLOP
 * utilisation. A register-resident FMA loop (16 independent accumulators, the
 * widest vectors the build targets) runs on every OpenMP thread at once.
 */
#ifndef INFMOE_PEAK_H
#define INFMOE_PEAK_H

/* GFLOP/s of all OpenMP threads of this process together: the best of five rounds
 * taking ~`seconds` in all (load from other processes lowers a round). */
double peak_fma_gflops(double seconds);
/* Lanes of the FMA the build uses (16 with AVX-512, 8 with AVX2, 1 otherwise). */
int peak_fma_lanes(void);

#endif

/*
 * peak: the machine's measured fp32 and bf16 peaks, the denominators of model
 * FLOP utilisation (a run's MFU is against the peak of the precision it computes
 * in). A register-resident loop of 16 independent accumulators runs on every
 * OpenMP thread at once: fp32 FMAs on the widest vectors the build targets, or
 * AVX-512 BF16 dot products (vdpbf16ps: 32 bf16 products into 16 fp32 lanes).
 */
#ifndef INFMOE_PEAK_H
#define INFMOE_PEAK_H

/* GFLOP/s of all OpenMP threads of this process together: the best of five rounds
 * taking ~`seconds` in all (load from other processes lowers a round). */
double peak_fma_gflops(double seconds);
/* Lanes of the FMA the build uses (16 with AVX-512, 8 with AVX2, 1 otherwise). */
int peak_fma_lanes(void);
/* The bf16 peak the same way (0 where the CPU has no AVX-512 BF16); where oneDNN
 * runs AMX tiles, the rate of its bf16 product instead (gemm_bf16_peak_gflops):
 * AMX's tile rate is far above vdpbf16ps, which issues at half the FMA rate there,
 * so the vector loop would put MFU above 100%. */
double peak_bf16_gflops(double seconds);
/* What peak_bf16_gflops measures here, in words. */
const char *peak_bf16_source(void);
int peak_has_bf16(void);
/* The bf16 dot-product rate over the fp32 FMA rate on one thread (0 without
 * AVX-512 BF16): ~2 where vdpbf16ps issues like an FMA, ~0.5 where it has one port.
 * Measured once per process (~0.1 s) and kept. */
double peak_bf16_ratio(void);

#endif

/* The arithmetic ceiling of this CPU: how many FLOP/s its vector units can do at all.
 *
 * speed.py reports GFLOP/s for the network; this says how close that is to the hardware.
 * Each thread keeps twelve independent AVX-512 accumulators busy (enough to hide the
 * instructions' latency) with nothing else in the loop: no memory traffic, no data
 * layout, so no real convolution can beat it.
 *
 *   bf16: VDPBF16PS, 32 multiply-adds of bf16 pairs into fp32 per instruction (64 FLOP);
 *   fp32: VFMADD, 16 multiply-adds per instruction (32 FLOP).
 *
 * Needs a CPU with AVX-512 BF16 (Zen 4 and later, Intel Cooper Lake and later):
 *
 *   gcc -O2 -mavx512f -mavx512bf16 -fopenmp benchmarks/cpu_peak.c -o /tmp/cpu_peak
 *   /tmp/cpu_peak            # one OpenMP thread per core, as torch uses them
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define ACCUMULATORS 12
#define ITERATIONS 100000000L

static double bf16_seconds(void) {
    double started = omp_get_wtime();
#pragma omp parallel
    {
        __m512 sums[ACCUMULATORS];
        for (int i = 0; i < ACCUMULATORS; i++) sums[i] = _mm512_setzero_ps();
        __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80); /* 1.0 in bf16 */
        for (long n = 0; n < ITERATIONS; n++) {
#pragma GCC unroll 12
            for (int i = 0; i < ACCUMULATORS; i++) sums[i] = _mm512_dpbf16_ps(sums[i], ones, ones);
        }
        float total = 0.0f;
        for (int i = 0; i < ACCUMULATORS; i++) total += _mm512_reduce_add_ps(sums[i]);
        if (total == 42.0f) printf(" "); /* keeps the loop from being optimised away */
    }
    return omp_get_wtime() - started;
}

static double fp32_seconds(void) {
    double started = omp_get_wtime();
#pragma omp parallel
    {
        __m512 sums[ACCUMULATORS];
        for (int i = 0; i < ACCUMULATORS; i++) sums[i] = _mm512_setzero_ps();
        __m512 ones = _mm512_set1_ps(1.0f), tiny = _mm512_set1_ps(1e-9f);
        for (long n = 0; n < ITERATIONS; n++) {
#pragma GCC unroll 12
            for (int i = 0; i < ACCUMULATORS; i++) sums[i] = _mm512_fmadd_ps(sums[i], ones, tiny);
        }
        float total = 0.0f;
        for (int i = 0; i < ACCUMULATORS; i++) total += _mm512_reduce_add_ps(sums[i]);
        if (total == 42.0f) printf(" ");
    }
    return omp_get_wtime() - started;
}

int main(void) {
    double instructions = (double)omp_get_max_threads() * ITERATIONS * ACCUMULATORS;
    bf16_seconds(); /* warm-up: lets the clock settle */
    printf("threads %d\n", omp_get_max_threads());
    printf("bf16 peak: %.0f GFLOP/s\n", instructions * 64 / bf16_seconds() / 1e9);
    printf("fp32 peak: %.0f GFLOP/s\n", instructions * 32 / fp32_seconds() / 1e9);
    return 0;
}

/* TLC's channel attention in one pass over the map (see mprnet_cli/model/kernels.py).
 *
 * For gate rows [first, last) of one channels-last image: the box sums of y (the gate's
 * first convolution, R channels) over each h x w window inside the map, in fp64: column
 * sums slid down the map a row at a time, then differences of running sums along the
 * row; their mean, rounded to the model's dtype and ReLU'd; at each window position the
 * second 1x1 convolution and the sigmoid, in registers, in fp32; then
 * x = x * gate + residual on the image rows that gate row covers, the rows and columns
 * outside the windows taking the nearest gate (TLC's edge replication). The gate is never
 * written out at full size, which is what makes TLC cost little more than the global mean.
 *
 * Written with GCC/Clang vector extensions, so the compiler picks the machine's widest
 * vectors (built with -march=native on the machine that runs it), and with AVX-512's
 * instructions where the CPU has them. On bf16 maps: the sigmoid to 5e-5 (the tensor
 * operations round the gate to bf16: 2e-3); with AVX-512's bf16 instructions, the second
 * convolution as dot products of bf16 pairs (exact products and fp32 sums, as in fp32)
 * and the result rounded to bf16 in one instruction (to nearest even as PyTorch rounds,
 * but subnormals flushed to zero).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float lanes __attribute__((vector_size(64)));  /* 16 fp32 lanes */
typedef int32_t int_lanes __attribute__((vector_size(64)));
#define LANES 16

static inline float from_bf16(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* Round to nearest even, as PyTorch does; NaN stays a (quiet) NaN. */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet = (bits >> 16) | 0x40u;
    return (uint16_t)(value != value ? quiet : rounded);
}

static inline lanes lanes_at(const void *data) {
    lanes value;
    memcpy(&value, data, sizeof value);
    return value;
}

#ifndef __AVX512F__
/* where `mask`, `chosen`, else `other` (AVX-512 has min and max for the sigmoid's clamps) */
static inline lanes choose(int_lanes mask, lanes chosen, lanes other) {
    int_lanes a, b;
    memcpy(&a, &chosen, sizeof a);
    memcpy(&b, &other, sizeof b);
    a = (a & mask) | (b & ~mask);
    lanes result;
    memcpy(&result, &a, sizeof result);
    return result;
}
#endif

/* 1 / (1 + exp(-x)), exp by range reduction to 2^n e^r with |r| <= ln(2)/2 and Cephes'
 * polynomial for e^r (about 1 ulp), its argument clamped to fp32's range; NaN stays NaN.
 * `rough` (for bf16 maps, with AVX-512): e^-x as 2^n 2^f, 2^f by a degree-4 polynomial
 * (3e-6), and the reciprocal to 14 bits: within 5e-5 of the exact gate (4e-5 measured). */
static inline __attribute__((always_inline)) lanes sigmoid(lanes x, const int rough) {
#ifdef __AVX512F__
    if (rough) {
        __m512 t = x * -1.44269504088896341f;
        __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        lanes f = t - n;
        lanes p = f * 9.560519829392433e-3f + 5.591712146997452e-2f;
        p = p * f + 2.4024981260299683e-1f;
        p = p * f + 6.931219696998596e-1f;
        p = p * f + 9.999991655349731e-1f;
        return _mm512_rcp14_ps(_mm512_scalef_ps(p, n) + 1.0f);
    }
    __m512 z = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), -x));
    __m512 n = _mm512_roundscale_ps(z * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    (void)rough;
    const lanes zero = {0}, floor = zero - 87.0f, ceiling = zero + 88.0f;
    lanes z = choose(-x < floor, floor, -x);
    z = choose(z > ceiling, ceiling, z);
    lanes n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
#endif
    lanes r = z - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    lanes p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
#ifdef __AVX512F__
    __m512 d = _mm512_scalef_ps(p, n) + 1.0f;
    __m512 y = _mm512_rcp14_ps(d);
    return y * (2.0f - d * y);  /* one Newton step: to about 1 ulp */
#else
    int_lanes exponent = (__builtin_convertvector(n, int_lanes) + 127) << 23;
    lanes scale;
    memcpy(&scale, &exponent, sizeof scale);
    return 1.0f / (1.0f + p * scale);
#endif
}

/* The gate at one window position, channels [block, block + count * LANES): bias +
 * weight^T mean through the sigmoid, accumulated in registers and stored at `out`.
 * `mean` is R fp32 values (ReLU'd), `weight` R x padded; or, `paired`, the same means as
 * bf16 pairs and `weight` the pairs' rows of padded x 2 bf16 (`pair_weights`). */
static inline __attribute__((always_inline)) void gate_block(
        const float *restrict mean, const uint32_t *restrict pairs, const void *restrict weight,
        const float *restrict bias, int64_t reduced, int64_t padded, int64_t block, float *restrict out,
        const int count, const int bf16, const int paired) {
    (void)pairs, (void)paired;  /* unused without AVX-512's bf16 instructions */
    lanes sum[4];
    for (int b = 0; b < count; b++)
        sum[b] = lanes_at(bias + block + b * LANES);
#ifdef __AVX512BF16__
    if (paired) {
        for (int64_t q = 0; q < (reduced + 1) / 2; q++) {
            __m512bh means = (__m512bh)_mm512_set1_epi32((int)pairs[q]);
            const uint16_t *row = (const uint16_t *)weight + (q * padded + block) * 2;
            for (int b = 0; b < count; b++)
                sum[b] = _mm512_dpbf16_ps(sum[b], means, (__m512bh)_mm512_loadu_si512(row + b * 2 * LANES));
        }
    } else
#endif
    {
        for (int64_t q = 0; q < reduced; q++) {
            const float *row = (const float *)weight + q * padded + block;
            float m = mean[q];
            for (int b = 0; b < count; b++)
                sum[b] += lanes_at(row + b * LANES) * m;
        }
    }
    for (int b = 0; b < count; b++) {
        lanes gate = sigmoid(sum[b], bf16);
        memcpy(out + block + b * LANES, &gate, sizeof gate);
    }
}

/* The gate at one window position, all channels, stored at `out` in whole vectors: the
 * lanes past the channels spill into the next position's gate, which is stored after it,
 * so `out` needs padded - channels floats to spare past the row's last gate. */
static inline __attribute__((always_inline)) void gate_at(
        const float *restrict mean, const void *restrict weight, const float *restrict bias, int64_t reduced,
        int64_t padded, float *restrict out, const int bf16, const int paired) {
    uint32_t pairs[paired ? (reduced + 1) / 2 : 1];  /* their top halves: exact, the means are bf16 values */
    if (paired)
        for (int64_t q = 0; q < (reduced + 1) / 2; q++) {
            uint32_t low, high = 0;
            memcpy(&low, mean + 2 * q, sizeof low);
            if (2 * q + 1 < reduced)
                memcpy(&high, mean + 2 * q + 1, sizeof high);
            pairs[q] = (low >> 16) | (high & 0xffff0000u);
        }
    int64_t block = 0;
    for (; block + 4 * LANES <= padded; block += 4 * LANES)
        gate_block(mean, pairs, weight, bias, reduced, padded, block, out, 4, bf16, paired);
    for (; block < padded; block += LANES)
        gate_block(mean, pairs, weight, bias, reduced, padded, block, out, 1, bf16, paired);
}

/* x[k] = x[k] * gate[k] + residual[k] for k < count. */
static inline void gate_run(void *restrict x, const void *restrict residual, const float *restrict gate,
                            int64_t count, int bf16) {
    if (bf16) {
        uint16_t *restrict out = x;
        const uint16_t *restrict add = residual;
        int64_t k = 0;
#ifdef __AVX512BF16__
        for (; k < count; k += LANES) {
            __mmask16 mask = count - k >= LANES ? 0xffff : (__mmask16)((1u << (count - k)) - 1);
            __m512 value = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, out + k)), 16));
            __m512 plus = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, add + k)), 16));
            __m512 result = _mm512_fmadd_ps(value, _mm512_maskz_loadu_ps(mask, gate + k), plus);
            _mm256_mask_storeu_epi16(out + k, mask, (__m256i)_mm512_cvtneps_pbh(result));
        }
#endif
        for (; k < count; k++)
            out[k] = to_bf16(from_bf16(out[k]) * gate[k] + from_bf16(add[k]));
    } else {
        float *restrict out = x;
        const float *restrict add = residual;
        for (int64_t k = 0; k < count; k++)
            out[k] = out[k] * gate[k] + add[k];
    }
}

static inline float load(const void *data, int64_t index, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)data)[index]) : ((const float *)data)[index];
}

static inline __attribute__((always_inline)) int run(
        const void *y, void *x, const void *residual, const void *weight, const float *bias,
        int64_t height, int64_t width, int64_t reduced, int64_t channels, int64_t padded,
        int64_t window_height, int64_t window_width, int64_t first, int64_t last, int bf16, int paired) {
    int64_t gate_height = height - window_height + 1, gate_width = width - window_width + 1;
    int64_t top = (window_height - 1) / 2, left = (window_width - 1) / 2, size = bf16 ? 2 : 4;
    int64_t line = width * reduced;  /* values in a row of y */
    double *columns = malloc(sizeof(double) * line);
    double *prefix = malloc(sizeof(double) * (line + reduced));
    float *mean = malloc(sizeof(float) * gate_width * reduced);
    float *gate = malloc(sizeof(float) * (gate_width * channels + padded));
    if (!columns || !prefix || !mean || !gate) {
        free(columns), free(prefix), free(mean), free(gate);
        return 1;
    }
    double scale = 1.0 / ((double)window_height * (double)window_width);
    const char *rows = y;
    for (int64_t i = first; i < last; i++) {
        if (i == first) {  /* this chunk's first window: summed afresh */
            memset(columns, 0, sizeof(double) * line);
            for (int64_t r = i; r < i + window_height; r++)
                for (int64_t k = 0; k < line; k++)
                    columns[k] += load(rows + r * line * size, k, bf16);
        } else {  /* slid down a row */
            const char *entering = rows + (i + window_height - 1) * line * size, *leaving = rows + (i - 1) * line * size;
            for (int64_t k = 0; k < line; k++)
                columns[k] += (double)load(entering, k, bf16) - (double)load(leaving, k, bf16);
        }
        for (int64_t q = 0; q < reduced; q++)  /* running sums along the row, then each window's */
            prefix[q] = 0;
        for (int64_t j = 0; j < width; j++) {
            const double *before = prefix + j * reduced, *column = columns + j * reduced;
            double *after = prefix + (j + 1) * reduced;
            for (int64_t q = 0; q < reduced; q++)
                after[q] = before[q] + column[q];
        }
        const double *ends = prefix + window_width * reduced;
        for (int64_t k = 0; k < gate_width * reduced; k++) {  /* each window's mean, in the model's dtype, ReLU'd */
            float value = (float)((ends[k] - prefix[k]) * scale);
            value = bf16 ? from_bf16(to_bf16(value)) : value;
            mean[k] = value > 0 ? value : 0;
        }
        for (int64_t j = 0; j < gate_width; j++)  /* the gate row, laid out as the image row is */
            gate_at(mean + j * reduced, weight, bias, reduced, padded, gate + j * channels, bf16, paired);
        int64_t start = i == 0 ? 0 : i + top;
        int64_t stop = i == gate_height - 1 ? height : i + top + 1;
        for (int64_t r = start; r < stop; r++) {
            char *out = (char *)x + r * width * channels * size;
            const char *add = (const char *)residual + r * width * channels * size;
            for (int64_t column = 0; column < left; column++)
                gate_run(out + column * channels * size, add + column * channels * size, gate, channels, bf16);
            gate_run(out + left * channels * size, add + left * channels * size, gate, gate_width * channels, bf16);
            for (int64_t column = left + gate_width; column < width; column++)
                gate_run(out + column * channels * size, add + column * channels * size,
                         gate + (gate_width - 1) * channels, channels, bf16);
        }
    }
    free(columns), free(prefix), free(mean), free(gate);
    return 0;
}

/* `weight` (R x padded fp32) as the pairs' rows for bf16 dot products: for each pair of
 * reduced channels, padded x 2 bf16, the odd channel's partner zero. */
static uint16_t *pair_weights(const float *weight, int64_t reduced, int64_t padded) {
    int64_t pairs = (reduced + 1) / 2;
    uint16_t *packed = malloc(sizeof(uint16_t) * pairs * padded * 2);
    if (packed)
        for (int64_t q = 0; q < pairs * 2; q++)
            for (int64_t c = 0; c < padded; c++)
                packed[((q / 2) * padded + c) * 2 + q % 2] = q < reduced ? to_bf16(weight[q * padded + c]) : 0;
    return packed;
}

/* Every image's gate rows split among OpenMP's threads. Built with -fopenmp, the library
 * binds to the OpenMP runtime PyTorch has loaded (the same soname), so it runs on
 * PyTorch's own threads rather than beside them. */
static int gate_and_add(const char *y, char *x, const char *residual, const float *weight, const float *bias,
                        int64_t batch, int64_t height, int64_t width, int64_t reduced, int64_t channels,
                        int64_t padded, int64_t window_height, int64_t window_width, int bf16) {
    int64_t rows = height - window_height + 1, size = bf16 ? 2 : 4;
#ifdef __AVX512BF16__
    const int paired = bf16;
#else
    const int paired = 0;
#endif
    uint16_t *packed = NULL;
    if (paired && !(packed = pair_weights(weight, reduced, padded)))
        return 1;
    const void *weights = paired ? (const void *)packed : (const void *)weight;
#ifdef _OPENMP
    int64_t chunks = omp_get_max_threads();
#else
    int64_t chunks = 1;
#endif
    chunks = chunks < rows ? chunks : rows;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < batch * chunks; task++) {
        int64_t image = task / chunks, part = task % chunks;
        const char *image_y = y + image * height * width * reduced * size;
        char *image_x = x + image * height * width * channels * size;
        const char *image_residual = residual + image * height * width * channels * size;
        int64_t first = rows * part / chunks, last = rows * (part + 1) / chunks;
        failed |= paired ? run(image_y, image_x, image_residual, weights, bias, height, width, reduced, channels,
                               padded, window_height, window_width, first, last, 1, 1)
                         : run(image_y, image_x, image_residual, weights, bias, height, width, reduced, channels,
                               padded, window_height, window_width, first, last, bf16, 0);
    }
    free(packed);
    return failed;
}

int mprnet_tlc_bf16(const void *y, void *x, const void *residual, const float *weight, const float *bias,
                    int64_t batch, int64_t height, int64_t width, int64_t reduced, int64_t channels,
                    int64_t padded, int64_t window_height, int64_t window_width) {
    return gate_and_add(y, x, residual, weight, bias, batch, height, width, reduced, channels, padded,
                        window_height, window_width, 1);
}

int mprnet_tlc_fp32(const void *y, void *x, const void *residual, const float *weight, const float *bias,
                    int64_t batch, int64_t height, int64_t width, int64_t reduced, int64_t channels,
                    int64_t padded, int64_t window_height, int64_t window_width) {
    return gate_and_add(y, x, residual, weight, bias, batch, height, width, reduced, channels, padded,
                        window_height, window_width, 0);
}

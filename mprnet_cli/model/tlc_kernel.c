/* TLC's channel attention in one pass over the map (see mprnet_cli/model/kernels.py).
 *
 * For gate rows [first, last) of one channels-last image: the box sums of y (the gate's
 * first convolution, R channels) over each h x w window inside the map, in fp64: column
 * sums slid down the map a row at a time, then differences of running sums along the
 * row; their mean, rounded to the model's dtype and ReLU'd; the
 * second 1x1 convolution and the sigmoid, a gate row at a time in fp32; then
 * x = x * gate + residual on the image rows that gate row covers, the rows and columns
 * outside the windows taking the nearest gate (TLC's edge replication). The gate is never
 * written out at full size, which is what makes TLC cost little more than the global mean.
 *
 * Written with GCC/Clang vector extensions, so the compiler picks the machine's widest
 * vectors (built with -march=native on the machine that runs it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float lanes __attribute__((vector_size(64)));  /* 16 fp32 lanes */
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

/* 1 / (1 + exp(-x)), exp by range reduction to 2^n e^r with |r| <= ln(2)/2 and Cephes'
 * polynomial for e^r (about 1 ulp), its argument clamped to fp32's range. Plain scalar
 * code, which the compiler vectorises (with -fno-trapping-math). */
static inline float sigmoid(float x) {
    float z = -x;
    z = z < -87.0f ? -87.0f : z;
    z = z > 88.0f ? 88.0f : z;
    float n = __builtin_floorf(z * 1.44269504088896341f + 0.5f);
    float r = z - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t exponent = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &exponent, sizeof scale);
    return 1.0f / (1.0f + p * scale);
}

static inline float load(const void *data, int64_t index, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)data)[index]) : ((const float *)data)[index];
}

/* x[k] = x[k] * gate[k] + residual[k] for k < count. */
static inline void gate_run(void *restrict x, const void *restrict residual, const float *restrict gate,
                            int64_t count, int bf16) {
    if (bf16) {
        uint16_t *restrict out = x;
        const uint16_t *restrict add = residual;
        for (int64_t k = 0; k < count; k++)
            out[k] = to_bf16(from_bf16(out[k]) * gate[k] + from_bf16(add[k]));
    } else {
        float *restrict out = x;
        const float *restrict add = residual;
        for (int64_t k = 0; k < count; k++)
            out[k] = out[k] * gate[k] + add[k];
    }
}

static inline lanes lanes_at(const float *data) {
    lanes value;
    memcpy(&value, data, sizeof value);
    return value;
}

/* The second convolution at one window position: bias + weight^T relu(mean), over C
 * padded to whole vectors (`padded`; `weight` is R x padded), kept in registers four
 * vectors at a time. */
static inline void convolve_at(const float *restrict mean, const float *restrict weight, const float *restrict bias,
                               int64_t reduced, int64_t padded, float *restrict out) {
    int64_t block = 0;
    for (; block + 4 * LANES <= padded; block += 4 * LANES) {
        lanes s0 = lanes_at(bias + block), s1 = lanes_at(bias + block + LANES);
        lanes s2 = lanes_at(bias + block + 2 * LANES), s3 = lanes_at(bias + block + 3 * LANES);
        for (int64_t q = 0; q < reduced; q++) {
            const float *row = weight + q * padded + block;
            float m = mean[q];
            s0 += lanes_at(row) * m;
            s1 += lanes_at(row + LANES) * m;
            s2 += lanes_at(row + 2 * LANES) * m;
            s3 += lanes_at(row + 3 * LANES) * m;
        }
        memcpy(out + block, &s0, sizeof s0);
        memcpy(out + block + LANES, &s1, sizeof s1);
        memcpy(out + block + 2 * LANES, &s2, sizeof s2);
        memcpy(out + block + 3 * LANES, &s3, sizeof s3);
    }
    for (; block < padded; block += LANES) {
        lanes sum = lanes_at(bias + block);
        for (int64_t q = 0; q < reduced; q++)
            sum += lanes_at(weight + q * padded + block) * mean[q];
        memcpy(out + block, &sum, sizeof sum);
    }
}

static inline __attribute__((always_inline)) int run(
        const void *y, void *x, const void *residual, const float *weight, const float *bias,
        int64_t height, int64_t width, int64_t reduced, int64_t channels, int64_t padded,
        int64_t window_height, int64_t window_width, int64_t first, int64_t last, int bf16) {
    int64_t gate_height = height - window_height + 1, gate_width = width - window_width + 1;
    int64_t top = (window_height - 1) / 2, left = (window_width - 1) / 2, size = bf16 ? 2 : 4;
    int64_t line = width * reduced;  /* values in a row of y */
    double *columns = malloc(sizeof(double) * line);
    double *prefix = malloc(sizeof(double) * (line + reduced));
    float *mean = malloc(sizeof(float) * gate_width * reduced);
    float *sums = malloc(sizeof(float) * gate_width * padded);
    float *gate = malloc(sizeof(float) * gate_width * channels);
    if (!columns || !prefix || !mean || !sums || !gate) {
        free(columns), free(prefix), free(mean), free(sums), free(gate);
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
        for (int64_t k = 0; k < gate_width * reduced; k++) {
            float value = (float)((ends[k] - prefix[k]) * scale);
            value = bf16 ? from_bf16(to_bf16(value)) : value;  /* the mean in the model's dtype */
            mean[k] = value > 0 ? value : 0;
        }
        for (int64_t j = 0; j < gate_width; j++)
            convolve_at(mean + j * reduced, weight, bias, reduced, padded, sums + j * padded);
        for (int64_t j = 0; j < gate_width; j++)  /* the gate row, laid out as the image row is */
            for (int64_t c = 0; c < channels; c++)
                gate[j * channels + c] = sigmoid(sums[j * padded + c]);
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
    free(columns), free(prefix), free(mean), free(sums), free(gate);
    return 0;
}

/* Every image's gate rows split among OpenMP's threads. Built with -fopenmp, the library
 * binds to the OpenMP runtime PyTorch has loaded (the same soname), so it runs on
 * PyTorch's own threads rather than beside them. */
static int gate_and_add(const char *y, char *x, const char *residual, const float *weight, const float *bias,
                        int64_t batch, int64_t height, int64_t width, int64_t reduced, int64_t channels,
                        int64_t padded, int64_t window_height, int64_t window_width, int bf16) {
    int64_t rows = height - window_height + 1, size = bf16 ? 2 : 4;
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
        failed |= run(y + image * height * width * reduced * size, x + image * height * width * channels * size,
                      residual + image * height * width * channels * size, weight, bias, height, width, reduced,
                      channels, padded, window_height, window_width, rows * part / chunks,
                      rows * (part + 1) / chunks, bf16);
    }
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

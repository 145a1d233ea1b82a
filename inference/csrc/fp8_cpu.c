// FP8 (e4m3fn) x float32 matmul kernels for CPUs, with DeepSeek-V3 128x128 block scales.
//
// Why this exists: on CPU, PyTorch converts float8 to float32 at ~0.25 G elements/s and
// _scaled_mm runs at ~0.2 GFLOP/s, both far below memory speed. These kernels decode e4m3
// bytes with integer bit arithmetic (which the compiler vectorises) one 128-wide tile at a
// time, so the full-width weight never exists in memory.
//
// Layouts: x [M, K] float32 row-major; w [N, K] uint8 (e4m3fn bytes) row-major;
// s [ceil(N/128), ceil(K/128)] float32 (the weight_scale_inv tensor); y [M, N] float32.
// Threads: OpenMP, linked against the libgomp that PyTorch itself loads, so both share one
// thread pool instead of two pools spinning against each other.
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define MAX_FUSED_ROWS 16

static inline float e4m3_to_float(uint8_t b) {
    uint32_t sign = (uint32_t)(b >> 7) << 31;
    uint32_t e = (b >> 3) & 0xF;
    uint32_t m = b & 0x7;
    // Normal numbers: rebias the exponent (7 -> 127) and move the 3 mantissa bits up.
    uint32_t bits = ((e + 120u) << 23) | (m << 20);
    float normal;
    memcpy(&normal, &bits, sizeof normal);
    float sub = (float)m * 0.001953125f;  // subnormal: m * 2^-9
    float mag = e ? normal : sub;
    uint32_t out;
    memcpy(&out, &mag, sizeof out);
    out |= sign;
    float f;
    memcpy(&f, &out, sizeof f);
    return f;  // 0x7F/0xFF (NaN) never come out of the quantiser, so they are not special-cased
}

static inline void decode_tile(const uint8_t *w, float scale, int64_t len, float *out) {
    for (int64_t j = 0; j < len; j++) out[j] = e4m3_to_float(w[j]) * scale;
}

// Rows [n0, n1) of the weight, dequantised into out [(n1 - n0), K].
void fp8_dequant_rows(const uint8_t *w, const float *s, float *out, int64_t n0, int64_t n1,
                      int64_t K, int nthreads) {
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const float *srow = s + (n / BLOCK) * kb;
        for (int64_t b = 0; b < kb; b++) {
            int64_t k0 = b * BLOCK, len = K - k0 < BLOCK ? K - k0 : BLOCK;
            decode_tile(w + n * K + k0, srow[b], len, out + (n - n0) * K + k0);
        }
    }
}

// y = x @ dequant(w).T for M <= MAX_FUSED_ROWS (decode-sized batches): each output column
// decodes its weight row tile by tile and reuses the tile for all M rows of x.
int fp8_gemm_fused(const float *x, const uint8_t *w, const float *s, float *y, int64_t M,
                   int64_t N, int64_t K, int nthreads) {
    if (M > MAX_FUSED_ROWS) return -1;
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float tile[BLOCK];
        float acc[MAX_FUSED_ROWS] = {0};
        const float *srow = s + (n / BLOCK) * kb;
        for (int64_t b = 0; b < kb; b++) {
            int64_t k0 = b * BLOCK, len = K - k0 < BLOCK ? K - k0 : BLOCK;
            decode_tile(w + n * K + k0, srow[b], len, tile);
            for (int64_t m = 0; m < M; m++) {
                const float *xr = x + m * K + k0;
                float a = 0.f;
                for (int64_t j = 0; j < len; j++) a += xr[j] * tile[j];
                acc[m] += a;
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = acc[m];
    }
    return 0;
}

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

// ---- register-blocked kernel for any M ---------------------------------------------------
// y[m][n] = sum_k x[m][k] * W[n][k]. For each group of NR weight rows, the rows are decoded
// once into a small float buffer (L1/L2-resident) and reused by every block of MR rows of
// x, with MR x NR vector accumulators running over k: the decode is amortised over up to
// MC rows of x, and the float weight never exists beyond NR rows.
#include <stdlib.h>

#define MR 4    // rows of x per register block
#define NR 4    // weight rows per register block
#define MC 64   // rows of x per pass over the weight (bounds the x working set)
#define VL 16   // floats per vector

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf load_vf(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

// Decode weight rows [n, n + NR) (rows >= N become zeros) into buf [NR][K].
static void decode_rows(const uint8_t *w, const float *s, int64_t n, int64_t N, int64_t K,
                        float *buf) {
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
    for (int c = 0; c < NR; c++) {
        float *dst = buf + c * K;
        if (n + c >= N) {
            memset(dst, 0, K * sizeof(float));
            continue;
        }
        const float *srow = s + ((n + c) / BLOCK) * kb;
        for (int64_t b = 0; b < kb; b++) {
            int64_t k0 = b * BLOCK, len = K - k0 < BLOCK ? K - k0 : BLOCK;
            decode_tile(w + (n + c) * K + k0, srow[b], len, dst + k0);
        }
    }
}

// MR x NR block: rows m..m+mr of x against the NR decoded rows in buf.
static inline void block_mr_nr(const float *x, const float *buf, float *y, int64_t m, int mr,
                               int64_t n, int64_t N, int64_t K) {
    vf acc[MR][NR];
    float tail[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) {
            acc[r][c] = (vf){0};
            tail[r][c] = 0.f;
        }
    const int64_t kv = K - K % VL;
    if (mr == MR) {
        for (int64_t k = 0; k < kv; k += VL) {
            vf wv[NR];
            for (int c = 0; c < NR; c++) wv[c] = load_vf(buf + c * K + k);
            for (int r = 0; r < MR; r++) {
                vf xv = load_vf(x + (m + r) * K + k);
                for (int c = 0; c < NR; c++) acc[r][c] += xv * wv[c];
            }
        }
    } else {
        for (int64_t k = 0; k < kv; k += VL) {
            vf wv[NR];
            for (int c = 0; c < NR; c++) wv[c] = load_vf(buf + c * K + k);
            for (int r = 0; r < mr; r++) {
                vf xv = load_vf(x + (m + r) * K + k);
                for (int c = 0; c < NR; c++) acc[r][c] += xv * wv[c];
            }
        }
    }
    for (int64_t k = kv; k < K; k++)
        for (int r = 0; r < mr; r++)
            for (int c = 0; c < NR; c++) tail[r][c] += x[(m + r) * K + k] * buf[c * K + k];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < NR && n + c < N; c++) y[(m + r) * N + n + c] = hsum(acc[r][c]) + tail[r][c];
}

int fp8_gemm_blocked(const float *x, const uint8_t *w, const float *s, float *y, int64_t M,
                     int64_t N, int64_t K, int nthreads) {
    const int64_t groups = (N + NR - 1) / NR;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc(NR * K * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            int64_t m1 = m0 + MC < M ? m0 + MC : M;
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                if (!buf) continue;
                decode_rows(w, s, g * NR, N, K, buf);
                for (int64_t m = m0; m < m1; m += MR) {
                    int mr = m1 - m < MR ? (int)(m1 - m) : MR;
                    block_mr_nr(x, buf, y, m, mr, g * NR, N, K);
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

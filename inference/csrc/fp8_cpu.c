// FP8 (e4m3fn) x float32 matmul kernels for CPUs, with DeepSeek-V3 128x128 block scales, and
// (at the end) a float32 kernel for decode-sized batches.
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

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_F16C 1
// Eight e4m3 bytes -> eight floats, each 2^-8 times its value. e4m3fn's sign, 4-bit exponent
// and 3-bit mantissa drop into half precision's fields as they are (sign to bit 15, the rest
// shifted left by 7); the exponent biases differ by 8 (15 - 7), and half precision's range
// turns every e4m3 subnormal into a normal or subnormal of the same 2^-8 ratio. So one
// integer shift/mask and the F16C conversion decode eight weights: callers fold the 2^8
// into the block scale.
static inline __m256 e4m3x8(const uint8_t *p) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
    __m128i mag = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7);
    return _mm256_cvtph_ps(_mm_or_si128(sign, mag));
}
#endif

static inline void decode_tile(const uint8_t *w, float scale, int64_t len, float *out) {
    int64_t j = 0;
#ifdef HAVE_F16C
    const __m256 sv = _mm256_set1_ps(scale * 256.f);
    for (; j + 8 <= len; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(e4m3x8(w + j), sv));
#endif
    for (; j < len; j++) out[j] = e4m3_to_float(w[j]) * scale;
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
// decodes its weight row eight bytes at a time, straight into FMA registers, and reuses
// each decoded vector for up to four rows of x; nothing is written back but y.
#ifdef HAVE_F16C
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Row n of the weight against one row of x: four independent accumulators over 32-byte
// steps, so the FMA latency is hidden (this is the batch-1 decode path).
static inline float fused_row1(const float *x, const uint8_t *wr, const float *srow, int64_t K) {
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.f;
    for (int64_t b = 0; b < kb; b++) {
        const int64_t k0 = b * BLOCK, len = K - k0 < BLOCK ? K - k0 : BLOCK;
        const uint8_t *wb = wr + k0;
        const float *xb = x + k0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 32 <= len; j += 32) {
            a0 = _mm256_fmadd_ps(e4m3x8(wb + j), _mm256_loadu_ps(xb + j), a0);
            a1 = _mm256_fmadd_ps(e4m3x8(wb + j + 8), _mm256_loadu_ps(xb + j + 8), a1);
            a2 = _mm256_fmadd_ps(e4m3x8(wb + j + 16), _mm256_loadu_ps(xb + j + 16), a2);
            a3 = _mm256_fmadd_ps(e4m3x8(wb + j + 24), _mm256_loadu_ps(xb + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8)
            a0 = _mm256_fmadd_ps(e4m3x8(wb + j), _mm256_loadu_ps(xb + j), a0);
        const __m256 blk = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        acc = _mm256_fmadd_ps(blk, _mm256_set1_ps(srow[b] * 256.f), acc);
        for (; j < len; j++) tail += e4m3_to_float(wb[j]) * srow[b] * xb[j];
    }
    return hsum256(acc) + tail;
}

// Rows m0 .. m0+MRF of x against weight row n: each decoded vector feeds MRF FMAs.
#define MRF 4
static inline void fused_row4(const float *x, const uint8_t *wr, const float *srow, float *y,
                              int64_t m0, int64_t n, int64_t N, int64_t K) {
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    float tail[MRF] = {0.f, 0.f, 0.f, 0.f};
    const float *x0 = x + m0 * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    for (int64_t b = 0; b < kb; b++) {
        const int64_t k0 = b * BLOCK, len = K - k0 < BLOCK ? K - k0 : BLOCK;
        const int64_t lv = len - len % 8;
        __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
        for (int64_t j = k0; j < k0 + lv; j += 8) {
            const __m256 wv = e4m3x8(wr + j);
            b0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + j), b0);
            b1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + j), b1);
            b2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + j), b2);
            b3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + j), b3);
        }
        const __m256 sv = _mm256_set1_ps(srow[b] * 256.f);
        acc0 = _mm256_fmadd_ps(b0, sv, acc0);
        acc1 = _mm256_fmadd_ps(b1, sv, acc1);
        acc2 = _mm256_fmadd_ps(b2, sv, acc2);
        acc3 = _mm256_fmadd_ps(b3, sv, acc3);
        for (int64_t j = k0 + lv; j < k0 + len; j++) {
            const float wf = e4m3_to_float(wr[j]) * srow[b];
            tail[0] += wf * x0[j];
            tail[1] += wf * x1[j];
            tail[2] += wf * x2[j];
            tail[3] += wf * x3[j];
        }
    }
    y[m0 * N + n] = hsum256(acc0) + tail[0];
    y[(m0 + 1) * N + n] = hsum256(acc1) + tail[1];
    y[(m0 + 2) * N + n] = hsum256(acc2) + tail[2];
    y[(m0 + 3) * N + n] = hsum256(acc3) + tail[3];
}
#endif

int fp8_gemm_fused(const float *x, const uint8_t *w, const float *s, float *y, int64_t M,
                   int64_t N, int64_t K, int nthreads) {
    if (M > MAX_FUSED_ROWS) return -1;
    const int64_t kb = (K + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *srow = s + (n / BLOCK) * kb;
#ifdef HAVE_F16C
        int64_t m = 0;
        for (; m + MRF <= M; m += MRF) fused_row4(x, w + n * K, srow, y, m, n, N, K);
        for (; m < M; m++) y[m * N + n] = fused_row1(x + m * K, w + n * K, srow, K);
#else
        float tile[BLOCK];
        float acc[MAX_FUSED_ROWS] = {0};
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
#endif
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

// ---- float32 weights, few rows: the batched-decode GEMV ---------------------------------
// y[m][n] = sum_k x[m][k] * w[n][k] for M <= F32_MAX_ROWS, w float32 [N, K] row-major.
// Decode-sized matmuls are bound by streaming the weight from memory: each weight row is
// read once, sequentially, and feeds every row of x (four rows per pass over the row,
// which stays in L1 for the next four). BLAS libraries often route such shapes through
// their general GEMM path, with packing that costs more than the arithmetic.
#define F32_MAX_ROWS 16
#ifdef HAVE_F16C
static inline float f32_row1(const float *x, const float *wr, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
    float tail = 0.f;
    for (; k < K; k++) tail += wr[k] * x[k];
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
}

static inline void f32_row4(const float *x, const float *wr, float *y, int64_t m0, int64_t n,
                            int64_t N, int64_t K) {
    __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
    const float *x0 = x + m0 * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 wv = _mm256_loadu_ps(wr + k);
        b0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), b0);
        b1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + k), b1);
        b2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + k), b2);
        b3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + k), b3);
    }
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
    for (; k < K; k++) {
        t0 += wr[k] * x0[k];
        t1 += wr[k] * x1[k];
        t2 += wr[k] * x2[k];
        t3 += wr[k] * x3[k];
    }
    y[m0 * N + n] = hsum256(b0) + t0;
    y[(m0 + 1) * N + n] = hsum256(b1) + t1;
    y[(m0 + 2) * N + n] = hsum256(b2) + t2;
    y[(m0 + 3) * N + n] = hsum256(b3) + t3;
}
#endif

#ifdef HAVE_F16C
static void f32_rows(const float *x, const void *wv, const float *s, float *y, int64_t M,
                     int64_t N, int64_t K, int nthreads) {
    const float *w = (const float *)wv;
    (void)s;  // float32 weights have no scales (the signature is rows_fn's, below)
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * K;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) f32_row4(x, wr, y, m, n, N, K);
        for (; m < M; m++) y[m * N + n] = f32_row1(x + m * K, wr, K);
    }
}
#endif

int f32_gemm_small(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    if (M > F32_MAX_ROWS) return -1;
#ifdef HAVE_F16C
    f32_rows(x, w, NULL, y, M, N, K, nthreads);
    return 0;
#else
    (void)x, (void)w, (void)y, (void)N, (void)K, (void)nthreads;
    return -2;  // no vector path: let the BLAS do it
#endif
}

// ---- routed experts, few tokens: one call per MoE layer ---------------------------------
// y[t] += sum over token t's chosen experts e (weight g) of
//         g * down_e(silu(gate_e . x[t]) * (up_e . x[t]))
// for T <= F32_MAX_ROWS tokens. In a decode step this replaces the Python dispatch over the
// chosen experts (sort, gather, three matmuls, two elementwise ops and a scatter per expert:
// some thirty small PyTorch calls per layer at batch 1) with one call. Experts are visited
// in id order, and each chosen expert's three weights are streamed once for all its tokens.
// idx, g: [T, topk] expert ids (int64) and routing weights (float32). gate, up, down: the
// addresses of every expert's weights, gate and up [I, K], down [K, I], row-major: float32
// (f32_moe_small), or e4m3 bytes with their 128x128 block scales at gs, us, ds
// (fp8_moe_small, through the fused decode-in-the-dot-product kernel above).
#include <math.h>
typedef void (*rows_fn)(const float *x, const void *w, const float *s, float *y, int64_t M,
                        int64_t N, int64_t K, int nthreads);

static void fp8_rows(const float *x, const void *w, const float *s, float *y, int64_t M,
                     int64_t N, int64_t K, int nthreads) {
    fp8_gemm_fused(x, (const uint8_t *)w, s, y, M, N, K, nthreads);
}

static int moe_small(const float *x, const int64_t *idx, const float *g, float *y, int64_t T,
                     int64_t topk, int64_t E, int64_t K, int64_t I, const int64_t *gate,
                     const int64_t *up, const int64_t *down, const int64_t *gs,
                     const int64_t *us, const int64_t *ds, rows_fn rows_of, int nthreads) {
    if (T > F32_MAX_ROWS || T > MAX_FUSED_ROWS) return -1;
    float *xs = malloc(sizeof(float) * F32_MAX_ROWS * K);      // the expert's tokens
    float *hs = malloc(sizeof(float) * F32_MAX_ROWS * I * 2);  // gate, then up, outputs
    float *os = malloc(sizeof(float) * F32_MAX_ROWS * K);      // down outputs
    if (!xs || !hs || !os) {
        free(xs), free(hs), free(os);
        return -3;
    }
    float *ups = hs + F32_MAX_ROWS * I;
    int64_t rows[F32_MAX_ROWS];
    float rw[F32_MAX_ROWS];
    for (int64_t e = 0; e < E; e++) {
        int64_t m = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < topk; j++)
                if (idx[t * topk + j] == e) {
                    rows[m] = t;
                    rw[m++] = g[t * topk + j];
                }
        if (!m) continue;
        for (int64_t r = 0; r < m; r++) memcpy(xs + r * K, x + rows[r] * K, sizeof(float) * K);
#define SCALES(a) ((a) ? (const float *)(intptr_t)(a)[e] : NULL)
        rows_of(xs, (const void *)(intptr_t)gate[e], SCALES(gs), hs, m, I, K, nthreads);
        rows_of(xs, (const void *)(intptr_t)up[e], SCALES(us), ups, m, I, K, nthreads);
        for (int64_t q = 0; q < m * I; q++) hs[q] = hs[q] / (1.f + expf(-hs[q])) * ups[q];
        rows_of(hs, (const void *)(intptr_t)down[e], SCALES(ds), os, m, K, I, nthreads);
#undef SCALES
        for (int64_t r = 0; r < m; r++) {
            float *yr = y + rows[r] * K;
            const float *orow = os + r * K;
            for (int64_t k = 0; k < K; k++) yr[k] += orow[k] * rw[r];
        }
    }
    free(xs), free(hs), free(os);
    return 0;
}

int f32_moe_small(const float *x, const int64_t *idx, const float *g, float *y, int64_t T,
                  int64_t topk, int64_t E, int64_t K, int64_t I, const int64_t *gate,
                  const int64_t *up, const int64_t *down, int nthreads) {
#ifdef HAVE_F16C
    return moe_small(x, idx, g, y, T, topk, E, K, I, gate, up, down, NULL, NULL, NULL,
                     f32_rows, nthreads);
#else
    (void)x, (void)idx, (void)g, (void)y, (void)T, (void)topk, (void)E, (void)K, (void)I;
    (void)gate, (void)up, (void)down, (void)nthreads;
    return -2;
#endif
}

int fp8_moe_small(const float *x, const int64_t *idx, const float *g, float *y, int64_t T,
                  int64_t topk, int64_t E, int64_t K, int64_t I, const int64_t *gate,
                  const int64_t *up, const int64_t *down, const int64_t *gs, const int64_t *us,
                  const int64_t *ds, int nthreads) {
    return moe_small(x, idx, g, y, T, topk, E, K, I, gate, up, down, gs, us, ds, fp8_rows,
                     nthreads);
}

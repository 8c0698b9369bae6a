/* y (M, N) = x (M, K) @ w (N, K)^T [+ b (N)] in fp32, for few rows M (decoding, verification),
 * and the same with INT8 weights and per-output-channel scales.
 *
 * Memory-bound: each block of 8 weight rows is read from DRAM once and reused for all M
 * input rows while it sits in L1/L2, so a forward over a handful of tokens costs little
 * more than over one. The next blocks are prefetched in software while one is computed:
 * on the AMD Zen 4 machines this was tuned on, that lifts fp32 from ~18 to ~22-25 GB/s
 * and INT8 (whose loop covers 4x fewer bytes per step) from ~9 to ~22 GB/s. Blocks are split over the OpenMP threads (the runtime PyTorch has
 * already loaded, so no second thread pool competes with it). GCC vector extensions give
 * 16-wide fp32 vectors: AVX-512 registers where the CPU has them, pairs of AVX2 ones if not.
 */
#include <stddef.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

typedef float v16 __attribute__((vector_size(64)));
#define RB 8 /* weight rows per block */
#ifndef PF_F32
#define PF_F32 1 /* fp32 weights are prefetched this many blocks ahead */
#endif
#ifndef PF_I8
#define PF_I8 2 /* INT8 weights are prefetched this many blocks ahead */
#endif

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
/* Software prefetch for the block `ahead` blocks after the one at `block` (each `block_bytes`
 * long): a step of the k loop that covers `step_off` into the block prefetches the matching
 * `step_bytes` of the future block, so the whole block is requested once per pass. */
static inline void prefetch_ahead(const void *block, size_t block_bytes, int ahead, size_t step_off, int step_bytes) {
    const char *p = (const char *)block + (size_t)ahead * block_bytes + step_off;
    for (int line = 0; line < step_bytes; line += 64) __builtin_prefetch(p + line, 0, 0);
}

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* y[m, n] = s[n] * sum_k x[m, k] * w8[n, k] (+ b[n]): exact weight-only INT8 (activations
 * stay fp32); reads a quarter of the fp32 bytes. 16 int8 weights are widened to fp32 in
 * registers right before their multiply-add. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 load16_i8(const signed char *p) {
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    v16 v;
    memcpy(&v, &f, sizeof v);
    return v;
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline v16 load16_i8(const signed char *p) {
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))));
    v16 v;
    memcpy(&v, &lo, 32);
    memcpy((char *)&v + 32, &hi, 32);
    return v;
}
#else
static inline v16 load16_i8(const signed char *p) {
    v16 v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
    return v;
}
#endif

/* R (1-3) rows of x against rows [n0, n0 + RB) of w (row stride K): fp32 weights (i8 == 0, raw
 * sums into y) or INT8 ones (i8 == 1, y = s[n] * sum + b[n]). Each loaded weight vector - widened
 * to fp32 in registers for INT8 - feeds R multiply-adds (24 accumulators at R = 3). Always inlined
 * with constant i8 and R, so each combination compiles to its own loop. */
static inline __attribute__((always_inline)) void rows(int i8, const float *x, const void *w, const float *s,
                                                       const float *b, float *y, int m, int R, int N, int K,
                                                       int n0) {
    const float *wf = (const float *)w;
    const signed char *wq = (const signed char *)w;
    int K16 = K & ~15;
    v16 a[3][RB];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < RB; j++) a[r][j] = (v16){0};
    for (int k = 0; k < K16; k += 16) {
        v16 xv[3];
        for (int r = 0; r < R; r++) xv[r] = load16(x + (size_t)(m + r) * K + k);
        if (m == 0) {
            if (i8)
                prefetch_ahead(wq, (size_t)RB * K, PF_I8, (size_t)k * RB, RB * 16);
            else
                prefetch_ahead(wf, (size_t)RB * K * 4, PF_F32, (size_t)k * RB * 4, RB * 64);
        }
        for (int j = 0; j < RB; j++) {
            v16 wv = i8 ? load16_i8(wq + (size_t)j * K + k) : load16(wf + (size_t)j * K + k);
            for (int r = 0; r < R; r++) a[r][j] += xv[r] * wv;
        }
    }
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)(m + r) * K;
        for (int j = 0; j < RB; j++) {
            float acc = hsum(a[r][j]);
            for (int k = K16; k < K; k++) acc += xr[k] * (i8 ? (float)wq[(size_t)j * K + k] : wf[(size_t)j * K + k]);
            y[(size_t)(m + r) * N + n0 + j] = i8 ? acc * s[n0 + j] + (b ? b[n0 + j] : 0.f) : acc;
        }
    }
}

/* Every row of x against one block of RB weight rows: passes of 3 rows, then 2, then 1 (4 = 2 + 2). */
static inline __attribute__((always_inline)) void block(int i8, const float *x, const void *w, const float *s,
                                                        const float *b, float *y, int M, int N, int K, int n0) {
    int m = 0;
    while (M - m >= 3 && M - m != 4) {
        rows(i8, x, w, s, b, y, m, 3, N, K, n0);
        m += 3;
    }
    for (; M - m >= 2; m += 2) rows(i8, x, w, s, b, y, m, 2, N, K, n0);
    if (m < M) rows(i8, x, w, s, b, y, m, 1, N, K, n0);
}

static void block_f32(const float *x, const float *wr, float *y, int M, int N, int K, int n0) {
    block(0, x, wr, NULL, NULL, y, M, N, K, n0);
}

static void tail_rows(const float *x, const float *w, float *y, int M, int N, int K, int from) {
    for (int n = from; n < N; n++)
        for (int m = 0; m < M; m++) {
            float s = 0.f;
            for (int k = 0; k < K; k++) s += x[(size_t)m * K + k] * w[(size_t)n * K + k];
            y[(size_t)m * N + n] = s;
        }
}

void sc_linear_f32(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
    int nb = N - N % RB;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < nb; n0 += RB) block_f32(x, w + (size_t)n0 * K, y, M, N, K, n0);
    tail_rows(x, w, y, M, N, K, nb);
    if (b)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) y[(size_t)m * N + n] += b[n];
}


static void block_i8(const float *x, const signed char *wr, const float *s, const float *b, float *y,
                     int M, int N, int K, int n0) {
    block(1, x, wr, s, b, y, M, N, K, n0);
}

void sc_linear_i8(const float *x, const signed char *w, const float *s, const float *b, float *y,
                  int M, int N, int K) {
    int nb = N - N % RB;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < nb; n0 += RB) block_i8(x, w + (size_t)n0 * K, s, b, y, M, N, K, n0);
    for (int n = nb; n < N; n++)
        for (int m = 0; m < M; m++) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) acc += x[(size_t)m * K + k] * (float)w[(size_t)n * K + k];
            y[(size_t)m * N + n] = acc * s[n] + (b ? b[n] : 0.f);
        }
}

/* Small fused element-wise steps of a decoder layer; each replaces several PyTorch ops
 * whose per-call overhead dominates at one token. */

/* y[m, n] = sum_g sum_{k in g} x[m, k] * (d[n, g] * q[n, k] + mn[n, g]) (+ b[n]): 4-bit weights in
 * groups of 32 along K, asymmetric (the layout of GGML's Q4_1): byte j of a group holds element j in
 * its low nibble and element j + 16 in its high nibble; sm[n, g] = (d, mn). The min term is
 * sum_g mn[n, g] * (sum of x over the group), computed once per row and group. */
#if defined(__AVX512F__)
static inline void load32_q4(const unsigned char *p, v16 *lo, v16 *hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 l = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    __m512 h = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    memcpy(lo, &l, sizeof l);
    memcpy(hi, &h, sizeof h);
}
#elif defined(__AVX2__)
static inline void load32_q4(const unsigned char *p, v16 *lo, v16 *hi) {
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    __m256i m = _mm256_set1_epi32(15);
    __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m)), l1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m));
    __m256 h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
    memcpy(lo, &l0, 32);
    memcpy((char *)lo + 32, &l1, 32);
    memcpy(hi, &h0, 32);
    memcpy((char *)hi + 32, &h1, 32);
}
#else
static inline void load32_q4(const unsigned char *p, v16 *lo, v16 *hi) {
    for (int i = 0; i < 16; i++) {
        (*lo)[i] = (float)(p[i] & 15);
        (*hi)[i] = (float)(p[i] >> 4);
    }
}
#endif

static inline __attribute__((always_inline)) void q4_rows(const float *x, const float *xs, const unsigned char *wr,
                                                          const float *sm, const float *b, float *y, int m, int R,
                                                          int N, int K, int n0) {
    int G = K / 32;
    v16 a[3][RB];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < RB; j++) a[r][j] = (v16){0};
    for (int g = 0; g < G; g++) {
        v16 xl[3], xh[3];
        for (int r = 0; r < R; r++) {
            xl[r] = load16(x + (size_t)(m + r) * K + 32 * g);
            xh[r] = load16(x + (size_t)(m + r) * K + 32 * g + 16);
        }
        if (m == 0) prefetch_ahead(wr, (size_t)RB * K / 2, PF_I8, (size_t)g * 16 * RB, RB * 16);
        for (int j = 0; j < RB; j++) {
            v16 lo, hi;
            load32_q4(wr + (size_t)j * K / 2 + 16 * g, &lo, &hi);
            float d = sm[((size_t)(n0 + j) * G + g) * 2];
            for (int r = 0; r < R; r++) a[r][j] += d * (xl[r] * lo + xh[r] * hi);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < RB; j++) {
            const float *smj = sm + (size_t)(n0 + j) * G * 2, *xsr = xs + (size_t)(m + r) * G;
            float acc = hsum(a[r][j]);
            for (int g = 0; g < G; g++) acc += smj[2 * g + 1] * xsr[g];
            y[(size_t)(m + r) * N + n0 + j] = acc + (b ? b[n0 + j] : 0.f);
        }
}

static void block_q4(const float *x, const float *xs, const unsigned char *wr, const float *sm, const float *b,
                     float *y, int M, int N, int K, int n0) {
    int m = 0;
    while (M - m >= 3 && M - m != 4) {
        q4_rows(x, xs, wr, sm, b, y, m, 3, N, K, n0);
        m += 3;
    }
    for (; M - m >= 2; m += 2) q4_rows(x, xs, wr, sm, b, y, m, 2, N, K, n0);
    if (m < M) q4_rows(x, xs, wr, sm, b, y, m, 1, N, K, n0);
}

/* K must be a multiple of 32 and N of RB (the Python side checks). Returns 1 on allocation failure. */
int sc_linear_q4(const float *x, const unsigned char *w, const float *sm, const float *b, float *y, int M, int N,
                 int K) {
    int G = K / 32;
    float *xs = (float *)malloc((size_t)M * G * sizeof(float));
    if (!xs) return 1;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int i = 0; i < 32; i++) t += x[(size_t)m * K + 32 * g + i];
            xs[(size_t)m * G + g] = t;
        }
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += RB) block_q4(x, xs, w + (size_t)n0 * K / 2, sm, b, y, M, N, K, n0);
    free(xs);
    return 0;
}

/* y (M, K) = x / sqrt(mean(x^2) + eps) * w */
void sc_rmsnorm(const float *x, const float *w, float *y, int M, int K, float eps) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float ss = 0.f;
        for (int k = 0; k < K; k++) ss += xm[k] * xm[k];
        float r = 1.0f / sqrtf(ss / K + eps);
        float *ym = y + (size_t)m * K;
        for (int k = 0; k < K; k++) ym[k] = xm[k] * r * w[k];
    }
}

/* y (M, H) = silu(gu[:, :H]) * gu[:, H:], gu (M, 2H) */
void sc_silu_mul(const float *gu, float *y, int M, int H) {
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * H, *u = g + H;
        float *ym = y + (size_t)m * H;
        for (int h = 0; h < H; h++) ym[h] = g[h] / (1.0f + expf(-g[h])) * u[h];
    }
}

/* One decoder layer's attention for T new tokens of one row, positions start..start+T-1:
 * RoPE on q and k (interleaved pairs, rotations given as (cos, sin) pairs per position),
 * k and v written into the row's cache at slots start.., then causal softmax attention
 * over slots [0, start + t] for each new token t. Replaces ~25 small PyTorch ops.
 *   qkv: (T, (nh + 2 nkv) * hd)   rot: (T, hd / 2, 2)   out: (T, nh * hd)
 *   kc, vc: (nkv, S_max, hd) for this layer and row (contiguous)                     */
void sc_attention(const float *qkv, const float *rot, float *kc, float *vc, float *out,
                  int T, int start, int S_max, int nh, int nkv, int hd, float scale) {
    int width = (nh + 2 * nkv) * hd, half = hd / 2, group = nh / nkv;
    float *q = (float *)__builtin_alloca((size_t)T * nh * hd * sizeof(float));
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (size_t)t * width, *r = rot + (size_t)t * hd;
        for (int h = 0; h < nh + nkv; h++) {
            const float *src = row + (size_t)h * hd;
            float *dst = h < nh ? q + ((size_t)t * nh + h) * hd : kc + ((size_t)(h - nh) * S_max + start + t) * hd;
            for (int i = 0; i < half; i++) {
                float a = src[2 * i], b = src[2 * i + 1], c = r[2 * i], s = r[2 * i + 1];
                dst[2 * i] = a * c - b * s;
                dst[2 * i + 1] = a * s + b * c;
            }
        }
        for (int g = 0; g < nkv; g++)
            memcpy(vc + ((size_t)g * S_max + start + t) * hd, row + (size_t)(nh + nkv + g) * hd, hd * sizeof(float));
    }
    int S = start + T;
#pragma omp parallel for schedule(static) if ((size_t)S * T * nh > 2048)
    for (int job = 0; job < nh * T; job++) {
        int h = job % nh, t = job / nh, n = start + t + 1;
        const float *qh = q + ((size_t)t * nh + h) * hd;
        const float *kg = kc + (size_t)(h / group) * S_max * hd, *vg = vc + (size_t)(h / group) * S_max * hd;
        float *sc = (float *)__builtin_alloca((size_t)n * sizeof(float));
        float mx = -INFINITY;
        for (int s = 0; s < n; s++) {
            const float *ks = kg + (size_t)s * hd;
            float d = 0.f;
#pragma omp simd reduction(+:d)
            for (int i = 0; i < hd; i++) d += qh[i] * ks[i];
            sc[s] = d * scale;
            if (sc[s] > mx) mx = sc[s];
        }
        float sum = 0.f;
        for (int s = 0; s < n; s++) {
            sc[s] = expf(sc[s] - mx);
            sum += sc[s];
        }
        float *o = out + (size_t)t * nh * hd + (size_t)h * hd;
        if (hd % 16 == 0 && hd <= 256) { /* accumulate in registers */
            v16 acc[16];
            int nv = hd / 16;
            for (int i = 0; i < nv; i++) acc[i] = (v16){0};
            for (int s = 0; s < n; s++) {
                const float *vs = vg + (size_t)s * hd;
                float p = sc[s];
                for (int i = 0; i < nv; i++) acc[i] += p * load16(vs + 16 * i);
            }
            float inv = 1.0f / sum;
            for (int i = 0; i < nv; i++) {
                v16 r = acc[i] * inv;
                memcpy(o + 16 * i, &r, sizeof r);
            }
        } else {
            for (int i = 0; i < hd; i++) o[i] = 0.f;
            for (int s = 0; s < n; s++) {
                const float *vs = vg + (size_t)s * hd;
                float p = sc[s] / sum;
                for (int i = 0; i < hd; i++) o[i] += p * vs[i];
            }
        }
    }
}

/* A whole decoder layer for T new tokens of one row, in one call:
 *   x_out = x + Wo attn(RoPE(Wqkv rmsnorm(x)));  x_out += W2 (silu(Wg h) * Wu h), h = rmsnorm(x_out)
 * Weights are fp32 (int8 == 0; scales unused), INT8 with per-row scales (int8 == 1) or 4-bit
 * groups with (scale, min) pairs (int8 == 2).
 * At one token per call, PyTorch's per-op overhead (~25 ops a layer) costs more than
 * the arithmetic outside the matrix products; this removes it. */
static void lin(int int8, const float *x, const void *w, const float *s, const float *b, float *y,
                int M, int N, int K) {
    if (int8 == 2)
        sc_linear_q4(x, (const unsigned char *)w, s, b, y, M, N, K);
    else if (int8)
        sc_linear_i8(x, (const signed char *)w, s, b, y, M, N, K);
    else
        sc_linear_f32(x, (const float *)w, b, y, M, N, K);
}

int sc_layer(int int8, const float *x, float *x_out, const float *attn_norm, const float *ffn_norm, float eps,
              const void *wqkv, const float *sqkv, const float *bqkv, const void *wo, const float *so,
              const float *bo, const void *w13, const float *s13, const float *b13, const void *w2,
              const float *s2, const float *b2, const float *rot, float *kc, float *vc, int T, int start,
              int S_max, int D, int nh, int nkv, int hd, int H) {
    int qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd;
    size_t need = (size_t)T * (D + qkv_w + att_w + D + 2 * H + H);
    float *buf = (float *)malloc(need * sizeof(float));
    if (!buf) return 1;
    float *h = buf, *qkv = h + (size_t)T * D, *att = qkv + (size_t)T * qkv_w, *o = att + (size_t)T * att_w;
    float *gu = o + (size_t)T * D, *act = gu + (size_t)T * 2 * H;
    sc_rmsnorm(x, attn_norm, h, T, D, eps);
    lin(int8, h, wqkv, sqkv, bqkv, qkv, T, qkv_w, D);
    sc_attention(qkv, rot, kc, vc, att, T, start, S_max, nh, nkv, hd, 1.0f / sqrtf((float)hd));
    lin(int8, att, wo, so, bo, o, T, D, att_w);
    for (size_t i = 0; i < (size_t)T * D; i++) x_out[i] = x[i] + o[i];
    sc_rmsnorm(x_out, ffn_norm, h, T, D, eps);
    lin(int8, h, w13, s13, b13, gu, T, 2 * H, D);
    sc_silu_mul(gu, act, T, H);
    lin(int8, act, w2, s2, b2, o, T, D, H);
    for (size_t i = 0; i < (size_t)T * D; i++) x_out[i] += o[i];
    free(buf);
    return 0;
}

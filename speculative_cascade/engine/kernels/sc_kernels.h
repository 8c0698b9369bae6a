/* The decoder's CPU kernels, written once and compiled once per instruction set.
 *
 * Each variant file (avx512.c, avx2.c, generic.c, neon.c) defines the vector type and a few
 * primitives for its instruction set, plus its register blocking, then includes this file:
 *
 *   SC_VARIANT          the variant's name
 *   VW                  fp32 lanes per vector; vf the vector type (GCC vector extension)
 *   vfma(a, b, c)       a * b + c (one rounding where the ISA has FMA)
 *   vdeq(q, d, m)       q * d + m with one rounding (dequantization); vfma unless defined
 *   vload(p), vsplat(x)
 *   cvt_i8(p)           VW int8          -> vf
 *   cvt_u4(p, hi)       VW bytes' low (hi = 0) or high (hi = 1) nibbles -> vf
 *   cvt_f16(p), cvt_bf16(p), half_to_float(h)
 *   RMAX, RB_FOR(R)     rows of x per pass (1..RMAX) and weight rows per block for R rows
 *
 * Weights stay in their stored format (sc_mat.fmt, mirrored by engine/formats.py's Format):
 * fp32, fp16, bf16, int8 with a (scale, min) pair per group of `group` inputs, or 4-bit
 * nibbles with a (scale, min) pair per 32 (GGML's Q4_1 layout: byte i of a group holds
 * element i in its low nibble and element i + 16 in its high one). Each weight vector is
 * dequantized in registers (q * scale + min, one rounding: exactly the fp32 dequantization)
 * and multiplied into fp32 accumulators. Activations stay fp32.
 *
 * Batch invariance: output (m, n) is one accumulator chain over k in a fixed order, reduced
 * in a fixed lane order, whatever the number of rows M, the row's place in the pass, the
 * block size or the thread split. So a row's result of an M-row product is bit-identical to
 * the one-row product, and a forward over T tokens gives each token the logits of a forward
 * over that token alone (attention likewise: one job per token and head, over its visible
 * slots in slot order). Greedy speculative decoding therefore emits exactly plain decoding's
 * tokens. The register blocking only decides how many chains run side by side.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { SC_F32 = 0, SC_F16 = 1, SC_BF16 = 2, SC_I8 = 3, SC_Q4 = 4 };

/* A weight matrix (n outputs, k inputs), row-major in its format; sm: (n, k / group, 2) (scale, min)
 * pairs, fp32, or fp16 when sm_f16 (GGUF's own fp16 scales, kept as stored). */
typedef struct {
    int fmt, group, n, k, sm_f16;
    const void *w;
    const void *sm;
    const float *bias;
} sc_mat;

typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, hidden;
    float eps;
} sc_dims;

typedef struct {
    const float *attn_norm, *ffn_norm;
    sc_mat qkv, o, gate_up, down;
} sc_layer;

#ifndef vdeq
#define vdeq(q, d, m) vfma(q, d, m)
#endif
#define SC_UNROLL _Pragma("GCC unroll 16")
#define RBMAX 8

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* VW weights of row n at input k, dequantized; d, m: the group's scale and min. */
static inline __attribute__((always_inline)) vf load_w(const int fmt, const sc_mat *W, size_t n, int k, float d,
                                                      float m) {
    size_t K = (size_t)W->k;
    switch (fmt) {
    case SC_F32: return vload((const float *)W->w + n * K + k);
    case SC_F16: return cvt_f16((const uint16_t *)W->w + n * K + k);
    case SC_BF16: return cvt_bf16((const uint16_t *)W->w + n * K + k);
    case SC_I8: return vdeq(cvt_i8((const int8_t *)W->w + n * K + k), vsplat(d), vsplat(m));
    default: {
        const uint8_t *p = (const uint8_t *)W->w + n * (K / 2) + (size_t)(k / 32) * 16 + (k & 15);
        return vdeq(cvt_u4(p, (k & 31) >= 16), vsplat(d), vsplat(m));
    }
    }
}

/* R rows of x (row stride ldx) against weight rows n0..n0+RB-1: y[r * ldy + n] = x_r . w_n + b_n. */
static inline __attribute__((always_inline)) void tile(const int fmt, const int R, const int RB, const sc_mat *W,
                                                      const float *x, int ldx, float *y, int ldy, int n0) {
    const int K = W->k, G = W->group, ng = K / G;
    const int quant = fmt == SC_I8 || fmt == SC_Q4;
    vf acc[RMAX][RBMAX];
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) acc[r][j] = vsplat(0.f);
    for (int g = 0; g < ng; g++) {
        float d[RBMAX], m[RBMAX];
        SC_UNROLL for (int j = 0; j < RB; j++) {
            size_t at = ((size_t)(n0 + j) * ng + g) * 2;
            if (!quant) d[j] = m[j] = 0.f;
            else if (W->sm_f16) {
                d[j] = half_to_float(((const uint16_t *)W->sm)[at]);
                m[j] = half_to_float(((const uint16_t *)W->sm)[at + 1]);
            } else {
                d[j] = ((const float *)W->sm)[at];
                m[j] = ((const float *)W->sm)[at + 1];
            }
        }
        for (int kk = 0; kk < G; kk += VW) {
            int k = g * G + kk;
            vf xv[RMAX];
            SC_UNROLL for (int r = 0; r < R; r++) xv[r] = vload(x + (size_t)r * ldx + k);
            SC_UNROLL for (int j = 0; j < RB; j++) {
                vf w = load_w(fmt, W, (size_t)(n0 + j), k, d[j], m[j]);
                SC_UNROLL for (int r = 0; r < R; r++) acc[r][j] = vfma(xv[r], w, acc[r][j]);
            }
        }
    }
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) {
        float s = hsum(acc[r][j]);
        y[(size_t)r * ldy + n0 + j] = W->bias ? s + W->bias[n0 + j] : s;
    }
}

/* One block of weight rows [n0, n0 + rb) against every row of x, in passes of R and R - 1 rows
 * (M split evenly: 9 rows = 3 + 3 + 3). rb is RB_FOR(R), or smaller for the last block. */
#define TILE_R(F, RR)                                                                                 \
    if (R == RR) {                                                                                    \
        if (rb == RB_FOR(RR)) tile(F, RR, RB_FOR(RR), W, xm, ldx, ym, ldy, n0);                       \
        else if (rb == RB_FOR(RR + 1)) tile(F, RR, RB_FOR(RR + 1), W, xm, ldx, ym, ldy, n0);          \
        else for (int j = 0; j < rb; j++) tile(F, RR, 1, W, xm, ldx, ym, ldy, n0 + j);                \
        continue;                                                                                     \
    }

static inline __attribute__((always_inline)) void block_rows(const int fmt, const sc_mat *W, const float *x,
                                                            int ldx, int M, float *y, int ldy, int n0, int rb,
                                                            int passes) {
    int base = M / passes, extra = M % passes, m0 = 0;
    for (int p = 0; p < passes; p++) {
        int R = base + (p < extra);
        const float *xm = x + (size_t)m0 * ldx;
        float *ym = y + (size_t)m0 * ldy;
        m0 += R;
        TILE_R(fmt, 1)
#if RMAX >= 2
        TILE_R(fmt, 2)
#endif
#if RMAX >= 3
        TILE_R(fmt, 3)
#endif
#if RMAX >= 4
        TILE_R(fmt, 4)
#endif
#if RMAX >= 5
        TILE_R(fmt, 5)
#endif
#if RMAX >= 6
        TILE_R(fmt, 6)
#endif
    }
}

/* Inside a parallel region: y (M, n) at column offset 0 of rows with stride ldy = x @ W^T + b.
 * Blocks of weight rows are split statically over the threads; ends with a barrier. */
static void par_matmul(const sc_mat *W, const float *x, int M, float *y, int ldy) {
    int passes = (M + RMAX - 1) / RMAX, R0 = (M + passes - 1) / passes, RB = RB_FOR(R0);
    int nb = (W->n + RB - 1) / RB, ldx = W->k;
#pragma omp for schedule(static)
    for (int b = 0; b < nb; b++) {
        int n0 = b * RB, rb = W->n - n0 < RB ? W->n - n0 : RB;
        switch (W->fmt) {
        case SC_F32: block_rows(SC_F32, W, x, ldx, M, y, ldy, n0, rb, passes); break;
        case SC_F16: block_rows(SC_F16, W, x, ldx, M, y, ldy, n0, rb, passes); break;
        case SC_BF16: block_rows(SC_BF16, W, x, ldx, M, y, ldy, n0, rb, passes); break;
        case SC_I8: block_rows(SC_I8, W, x, ldx, M, y, ldy, n0, rb, passes); break;
        default: block_rows(SC_Q4, W, x, ldx, M, y, ldy, n0, rb, passes); break;
        }
    }
}

/* y (M, W.n) = x (M, W.k) @ W^T (+ bias). */
void sc_matmul(const sc_mat *W, const float *x, int M, float *y) {
#pragma omp parallel
    par_matmul(W, x, M, y, W->n);
}

static void rmsnorm_row(const float *x, const float *w, float *y, int K, float eps) {
    vf acc = vsplat(0.f);
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf v = vload(x + k);
        acc = vfma(v, v, acc);
    }
    float ss = hsum(acc);
    for (; k < K; k++) ss += x[k] * x[k];
    float r = 1.0f / sqrtf(ss / K + eps);
    for (k = 0; k < K; k++) y[k] = x[k] * r * w[k];
}

/* y (M, K) = x / sqrt(mean(x^2) + eps) * w */
void sc_rmsnorm(const float *x, const float *w, float *y, int M, int K, float eps) {
    for (int m = 0; m < M; m++) rmsnorm_row(x + (size_t)m * K, w, y + (size_t)m * K, K, eps);
}

static float dot(const float *a, const float *b, int n) {
    vf acc = vsplat(0.f);
    int i = 0;
    for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Is slot s visible to new token t? Cached slots (s < start) always; new slot start + u when
 * mask[t, u] (a tree), or u <= t (causal) without a mask. */
static inline int visible(const unsigned char *mask, int T, int start, int t, int s) {
    if (s < start) return 1;
    int u = s - start;
    return mask ? mask[(size_t)t * T + u] : u <= t;
}

/* Attention of one layer for T new tokens of one sequence (inside a parallel region).
 *   qkv (T, (nh + 2 nkv) hd), q and k rows in interleaved RoPE order; rot (T, hd / 2, 2) (cos, sin)
 *   kc, vc (nkv, S_max, hd): the layer's cache for this sequence; new tokens go to slots start + t
 *   q (T, nh, hd) scratch; sc: this thread's scratch of start + T floats; out (T, nh hd) */
static void attention(const float *qkv, const float *rot, float *kc, float *vc, float *q, float *out, float *sc,
                      const unsigned char *mask, int T, int start, int S_max, int nh, int nkv, int hd) {
    int width = (nh + 2 * nkv) * hd, half = hd / 2, group = nh / nkv;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
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
    int n = start + T;
#pragma omp for schedule(static)
    for (int job = 0; job < nh * T; job++) {
        int h = job % nh, t = job / nh;
        const float *qh = q + ((size_t)t * nh + h) * hd;
        const float *kg = kc + (size_t)(h / group) * S_max * hd, *vg = vc + (size_t)(h / group) * S_max * hd;
        float mx = -INFINITY;
        for (int s = 0; s < n; s++) {
            if (!visible(mask, T, start, t, s)) continue;
            sc[s] = dot(qh, kg + (size_t)s * hd, hd) * scale;
            if (sc[s] > mx) mx = sc[s];
        }
        float sum = 0.f;
        for (int s = 0; s < n; s++) {
            if (!visible(mask, T, start, t, s)) continue;
            sc[s] = expf(sc[s] - mx);
            sum += sc[s];
        }
        float inv = 1.0f / sum, *o = out + (size_t)t * nh * hd + (size_t)h * hd;
        if (hd % VW == 0 && hd <= 32 * VW) { /* accumulate in registers */
            vf acc[32];
            int nv = hd / VW;
            for (int i = 0; i < nv; i++) acc[i] = vsplat(0.f);
            for (int s = 0; s < n; s++) {
                if (!visible(mask, T, start, t, s)) continue;
                const float *vs = vg + (size_t)s * hd;
                vf p = vsplat(sc[s]);
                for (int i = 0; i < nv; i++) acc[i] = vfma(p, vload(vs + VW * i), acc[i]);
            }
            for (int i = 0; i < nv; i++) {
                vf r = acc[i] * vsplat(inv);
                memcpy(o + VW * i, &r, sizeof r);
            }
        } else {
            for (int i = 0; i < hd; i++) o[i] = 0.f;
            for (int s = 0; s < n; s++) {
                if (!visible(mask, T, start, t, s)) continue;
                const float *vs = vg + (size_t)s * hd;
                for (int i = 0; i < hd; i++) o[i] += sc[s] * vs[i];
            }
            for (int i = 0; i < hd; i++) o[i] *= inv;
        }
    }
}

/* Every decoder layer for T new tokens of one sequence, in one call and one parallel region:
 *   x += Wo attn(RoPE(Wqkv rmsnorm(x)));  x += Wd (silu(Wg h) * Wu h), h = rmsnorm(x)
 * x (T, dim) is updated in place. The layer l's cache is kc0 + l * layer_stride (and vc0),
 * laid out (nkv, S_max, hd). mask: (T, T) bytes for a token tree, or NULL for causal.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int sc_forward(const sc_layer *L, int n_layers, const sc_dims *dm, float *x, int T, const float *rot,
               const unsigned char *mask, float *kc0, float *vc0, long long layer_stride, int start, int S_max) {
    int D = dm->dim, nh = dm->n_heads, nkv = dm->n_kv_heads, hd = dm->head_dim, H = dm->hidden;
    int qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd;
    size_t need = (size_t)T * (D + qkv_w + att_w + att_w + D + 2 * H + H);
    float *buf = (float *)malloc(need * sizeof(float));
    if (!buf) return 1;
    float *h = buf, *qkv = h + (size_t)T * D, *q = qkv + (size_t)T * qkv_w, *att = q + (size_t)T * att_w;
    float *o = att + (size_t)T * att_w, *gu = o + (size_t)T * D, *act = gu + (size_t)T * 2 * H;
    int failed = 0;
#pragma omp parallel
    {
        float *sc = (float *)malloc((size_t)(start + T) * sizeof(float));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            for (int l = 0; l < n_layers; l++) {
                const sc_layer *ly = L + l;
                float *kc = kc0 + (size_t)l * layer_stride, *vc = vc0 + (size_t)l * layer_stride;
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) rmsnorm_row(x + (size_t)t * D, ly->attn_norm, h + (size_t)t * D, D, dm->eps);
                par_matmul(&ly->qkv, h, T, qkv, qkv_w);
                attention(qkv, rot, kc, vc, q, att, sc, mask, T, start, S_max, nh, nkv, hd);
                par_matmul(&ly->o, att, T, o, D);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    float *xt = x + (size_t)t * D, *ot = o + (size_t)t * D;
                    for (int i = 0; i < D; i++) xt[i] += ot[i];
                    rmsnorm_row(xt, ly->ffn_norm, h + (size_t)t * D, D, dm->eps);
                }
                par_matmul(&ly->gate_up, h, T, gu, 2 * H);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    const float *g = gu + (size_t)t * 2 * H, *u = g + H;
                    float *a = act + (size_t)t * H;
                    for (int i = 0; i < H; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                }
                par_matmul(&ly->down, act, T, o, D);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    float *xt = x + (size_t)t * D, *ot = o + (size_t)t * D;
                    for (int i = 0; i < D; i++) xt[i] += ot[i];
                }
            }
        }
        free(sc);
    }
    free(buf);
    return failed;
}

/* Sum of n floats read once, split over the threads: a streaming-read bandwidth probe. */
float sc_stream_sum(const float *p, long long n) {
    float total = 0.f;
#pragma omp parallel
    {
        vf acc[4] = {vsplat(0.f), vsplat(0.f), vsplat(0.f), vsplat(0.f)};
        long long nv = n / (4 * VW);
#pragma omp for schedule(static)
        for (long long i = 0; i < nv; i++)
            for (int j = 0; j < 4; j++) acc[j] = acc[j] + vload(p + (i * 4 + j) * VW);
        float s = hsum(acc[0] + acc[1] + acc[2] + acc[3]);
#pragma omp atomic
        total += s;
    }
    return total;
}

const char *sc_variant(void) { return SC_VARIANT; }
int sc_vector_width(void) { return VW; }
int sc_rows_per_pass(void) { return RMAX; }

/* Which x86-64 variants this CPU runs: 2 = avx512 (F, BW, VL, DQ), 1 = avx2 (with FMA and F16C), 0 = baseline. */
int sc_cpu_level(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

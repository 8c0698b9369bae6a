/* The decoder's CPU kernels, written once and compiled once per instruction set (docs/kernels.md).
 *
 * Each variant file (avx512.c, avx2.c, generic.c, neon.c) defines its vector type and primitives, then
 * includes this file: SC_VARIANT (name), VW (fp32 lanes; vf the GCC vector type), vfma, vdeq (q * d + m,
 * one rounding), vload, vsplat, cvt_i8, cvt_f16, cvt_bf16, half_to_float; its register blocking RMAX
 * (rows of x a pass, at most 6) and RB_FOR(R) (weight rows a block; RB_DENSE, RB_I8, RB_Q4 per format);
 * optionally SC_HSUM/SC_HSUM8 (the lanes' tree sum in registers), SC_LUT16 (4-bit lookups),
 * SC_DOT4_I8 (I8Q8's integer dot) and QR_SIMD with the qi_* primitives of sc_qr.h.
 *
 * Weights stay in their stored format (sc_mat.fmt = engine/formats.py's Format): fp32, fp16, bf16; int8
 * or 4-bit codes with a (scale, min) per group (GGML Q4_1 nibble order, rows interleaved by Q4_ROWS),
 * dequantized in registers against fp32 activations; I8Q8 (drafts only) and QR (sc_qr.h: GGUF blocks
 * against int8 activations) take integer dot products.
 *
 * Batch invariance: output (m, n) is one accumulation in a fixed order whatever the number of rows M,
 * the row's place in the pass, the block size or the thread split, so a forward over T tokens gives
 * each token the logits of a forward over that token alone; the register blocking only decides how
 * many chains run side by side. Greedy speculative decoding therefore emits plain decoding's tokens. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { SC_F32 = 0, SC_F16 = 1, SC_BF16 = 2, SC_I8 = 3, SC_Q4 = 4, SC_I8Q8 = 5, SC_QR = 6, SC_RAW = 7 /* lookups only */ };

/* A weight matrix (n outputs, k inputs), row-major in its format; sm: (n, k / group, 2) (scale, min)
 * pairs, fp32, or fp16 when sm_f16 (GGUF's own fp16 scales, kept as stored); has_min: some min is
 * not 0 (int8 only: without it the mins' term, exactly 0, is skipped). */
typedef struct sc_mat {
    int fmt, group, n, k, sm_f16, has_min;
    const void *w;
    const void *sm;
    const float *bias;
    const struct sc_mat *next; /* QR: the matrix's further rows, in another QR type (sc_qr.h); else NULL */
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
/* Hide a pointer's value from the optimizer: x is read again from L1 for each weight row instead
 * of being kept in (and spilled from) the few vector registers. */
#define SC_OPAQUE(p) __asm__("" : "+r"(p))
#define RBMAX 8

/* Software prefetch of weights: a tile reads its block of rows (contiguous in memory, block after
 * block) and fetches into L2, front to back, the bytes as far ahead as whole blocks of at least
 * PF_AHEAD bytes reach: one sequential stream ahead of the tile's rows (measured on a Zen 4 EPYC,
 * against a line per row one block ahead into L1: fp32 one-row products ~15% faster; the INT8
 * draft's one- and two-token forwards ~30% faster; short blocks (2 int8 rows) need the distance). */
#ifndef PF_AHEAD
#define PF_AHEAD 8192
#endif
static inline const char *pf_ahead(const void *block, size_t block_bytes) {
    return (const char *)block + block_bytes * ((PF_AHEAD + block_bytes - 1) / block_bytes);
}
/* The lines of n bytes from p into L2 (n: the bytes of the stream a step of the tile reads). */
static inline __attribute__((always_inline)) void pf_l2(const char *p, int n) {
    SC_UNROLL for (int l = 0; l < n; l += 64) __builtin_prefetch(p + l, 0, 2);
}
#ifndef RB_DENSE
#define RB_DENSE(R) RB_FOR(R)
#endif
/* weight rows per block for format F and R rows of x */
#ifndef RB_I8
#define RB_I8(R) RB_FOR(R)
#endif
#ifndef RB_Q4
#define RB_Q4(R) RB_FOR(R)
#endif
#define RB_OF(F, R) ((F) <= SC_BF16 ? RB_DENSE(R) : (F) == SC_I8 ? RB_I8(R) : (F) == SC_Q4 ? RB_Q4(R) : RB_FOR(R))
#define Q4_ROWS 8
#ifndef RMAX_Q4
#define RMAX_Q4 RMAX /* rows of x per pass of the 4-bit tile (at most RMAX) */
#endif
#if RMAX > 6 || RMAX_Q4 > RMAX /* block_rows and the Q8 tile instantiate passes of 1 to 6 rows */
#error "RMAX: at most 6 rows of x a pass; RMAX_Q4: at most RMAX"
#endif
#ifndef Q4_DEQUANT_ONCE /* more 4-bit products' rows than one pass holds: each block of weight rows dequantized */
#define Q4_DEQUANT_ONCE 1 /* once into fp32 for every pass (1), or the 4-bit tile run pass by pass (0) */
#endif

typedef int vi __attribute__((vector_size(VW * 4)));

/* VW bytes, zero-extended to 32-bit lanes (LD_U8: the variant's instruction for it). */
#ifdef LD_U8
static inline vi ld_u8(const uint8_t *p) { return (vi)LD_U8(p); }
#else
typedef unsigned char sc_vu8 __attribute__((vector_size(VW)));
static inline vi ld_u8(const uint8_t *p) {
    sc_vu8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vi);
}
#endif

static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp(x) for VW lanes: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, then
 * 2^n through the exponent bits. Relative error ~2e-7; the same arithmetic in every pass. */
static inline vf vexp(vf x) {
    const vf lo = vsplat(-87.0f), hi = vsplat(88.0f), magic = vsplat(12582912.0f); /* 1.5 * 2^23 */
    x = vselect(x < lo, lo, x);
    x = vselect(x > hi, hi, x);
    vf n = (x * vsplat(1.44269504088896341f) + magic) - magic; /* round(x / ln2) */
    vf r = vfma(n, vsplat(-0.693359375f), x);
    r = vfma(n, vsplat(2.12194440e-4f), r);
    vf p = vsplat(1.9875691500e-4f);
    p = vfma(p, r, vsplat(1.3981999507e-3f));
    p = vfma(p, r, vsplat(8.3334519073e-3f));
    p = vfma(p, r, vsplat(4.1665795894e-2f));
    p = vfma(p, r, vsplat(1.6666665459e-1f));
    p = vfma(p, r, vsplat(5.0000001201e-1f));
    p = vfma(p, r * r, r + vsplat(1.0f));
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* The lanes' sum as a tree (fixed order: lanes i and i + w/2 first), log2(VW) dependent adds.
 * SC_HSUM: the variant gives the same tree in registers (this one goes through memory, and a
 * vector stored then read back in halves stalls store-to-load forwarding on x86-64). */
#ifndef SC_HSUM
static inline float hsum(vf v) {
    float a[VW];
    memcpy(a, &v, sizeof v);
    for (int w = VW / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}
#endif

/* VW weights of row n at input k, dequantized; d, m: the group's scale and min. */
static inline __attribute__((always_inline)) vf load_w(const int fmt, const sc_mat *W, size_t n, int k, float d,
                                                      float m) {
    size_t K = (size_t)W->k;
    switch (fmt) {
    case SC_F32: return vload((const float *)W->w + n * K + k);
    case SC_F16: return cvt_f16((const uint16_t *)W->w + n * K + k);
    case SC_BF16: return cvt_bf16((const uint16_t *)W->w + n * K + k);
    case SC_I8: return vdeq(cvt_i8((const int8_t *)W->w + n * K + k), vsplat(d), vsplat(m));
    default: return vsplat(0.f); /* Q4: tile() reads each group whole, never through here */
    }
}

/* Entry i of a matrix's (scale, min) array, fp16 or fp32 as stored. */
static inline float sm_at(const sc_mat *W, size_t i) {
    return W->sm_f16 ? half_to_float(((const uint16_t *)W->sm)[i]) : ((const float *)W->sm)[i];
}

/* VW 4-bit weights from VW bytes zero-extended: their low nibbles (hi = 0) or high ones, as
 * q * d + m with one rounding: exactly the fp32 dequantization. */
static inline vf q4_deq(vi q, int hi, vf d, vf m) { return vdeq(__builtin_convertvector(hi ? q >> 4 : q & 15, vf), d, m); }

/* int8 weights, one group g of G inputs, for weight rows n0..n0+RB-1 and R rows of x: per (row, weight
 * row), t = the group's q . x in input order (one chain), then acc += t * d. The same arithmetic
 * whatever R and RB: batch-invariant. (w = q * d + m; the min's part is min_term's.) */
static inline __attribute__((always_inline)) void i8_group(const int G, const int R, const int RB, const sc_mat *W,
                                                          const float *x, int ldx, int n0, int g, const float *d,
                                                          vf acc[RMAX][RBMAX]) {
    SC_UNROLL for (int j = 0; j < RB; j++) {
        const int8_t *wq = (const int8_t *)W->w + (size_t)(n0 + j) * W->k + (size_t)g * G;
        const float *xg = x + (size_t)g * G;
        SC_OPAQUE(xg);
        vf dj = vsplat(d[j]);
        if (R > 1 && G >= VW && G <= 4 * VW) { /* rows of x: the group's codes converted once, then one row at a time */
            vf q[4];
            SC_UNROLL for (int v = 0; v < G / VW; v++) q[v] = cvt_i8(wq + v * VW);
            SC_UNROLL for (int r = 0; r < R; r++) {
                const float *xr = xg + (size_t)r * ldx;
                vf t = q[0] * vload(xr);
                SC_UNROLL for (int v = 1; v < G / VW; v++) t = vfma(q[v], vload(xr + v * VW), t);
                acc[r][j] = vfma(t, dj, acc[r][j]);
            }
            continue;
        }
        vf t[RMAX];
        {
            vf q = cvt_i8(wq);
            SC_UNROLL for (int r = 0; r < R; r++) t[r] = q * vload(xg + (size_t)r * ldx);
        }
        for (int kk = VW; kk < G; kk += VW) {
            vf q = cvt_i8(wq + kk);
            SC_UNROLL for (int r = 0; r < R; r++) t[r] = vfma(q, vload(xg + (size_t)r * ldx + kk), t[r]);
        }
        SC_UNROLL for (int r = 0; r < R; r++) acc[r][j] = vfma(t[r], dj, acc[r][j]);
    }
}

/* int8 weights with one scale per row (group = K, the INT8 drafts): i8_group's arithmetic for one
 * group (t = q . x in input order, then acc += t * d), with the weight rows' chains interleaved
 * (one long chain per row would wait on the multiply-add's latency). */
static inline __attribute__((always_inline)) void i8_row(const int R, const int RB, const sc_mat *W, const float *x,
                                                        int ldx, int n0, vf acc[RMAX][RBMAX]) {
    const int K = W->k;
    float d[RBMAX];
    SC_UNROLL for (int j = 0; j < RB; j++) {
        size_t at = 2 * (size_t)(n0 + j);
        d[j] = sm_at(W, at);
    }
    const int8_t *w0 = (const int8_t *)W->w + (size_t)n0 * K;
    const char *ahead = pf_ahead(w0, (size_t)RB * K);
    vf t[RMAX][RBMAX];
    {
        vf xv[RMAX];
        SC_UNROLL for (int r = 0; r < R; r++) xv[r] = vload(x + (size_t)r * ldx);
        SC_UNROLL for (int j = 0; j < RB; j++) {
            vf q = cvt_i8(w0 + (size_t)j * K);
            SC_UNROLL for (int r = 0; r < R; r++) t[r][j] = q * xv[r];
        }
    }
    for (int k = VW; k < K; k += VW) {
        pf_l2(ahead + (size_t)k * RB, RB * VW);
        vf xv[RMAX];
        SC_UNROLL for (int r = 0; r < R; r++) xv[r] = vload(x + (size_t)r * ldx + k);
        SC_UNROLL for (int j = 0; j < RB; j++) {
            vf q = cvt_i8(w0 + (size_t)j * K + k);
            SC_UNROLL for (int r = 0; r < R; r++) t[r][j] = vfma(q, xv[r], t[r][j]);
        }
    }
    SC_UNROLL for (int j = 0; j < RB; j++) {
        vf dj = vsplat(d[j]);
        SC_UNROLL for (int r = 0; r < R; r++) acc[r][j] = vfma(t[r][j], dj, acc[r][j]);
    }
}

/* The sum of G inputs (lanes, then the lanes' tree): what a group's min multiplies. */
static inline float group_sum(const float *x, int G) {
    vf a = vsplat(0.f);
    int i = 0;
    for (; i + VW <= G; i += VW) a = a + vload(x + i);
    float s = hsum(a);
    for (; i < G; i++) s += x[i];
    return s;
}

#define XS_MAX 512 /* groups per row whose sums a pass keeps on the stack; more: summed where used */

/* The mins' part of an int8 row's product with x: sum over groups of m_g * group_sum(x_g), in
 * group order; xs: those sums, or NULL to sum here. */
static inline float min_term(const sc_mat *W, size_t n, const float *x, const float *xs) {
    int ng = W->k / W->group;
    float s = 0.f;
    for (int g = 0; g < ng; g++) {
        size_t at = 2 * (n * ng + g) + 1;
        s += sm_at(W, at) * (xs ? xs[g] : group_sum(x + (size_t)g * W->group, W->group));
    }
    return s;
}

/* sums[r * RB + j] = hsum(acc[r][j]) (SC_HSUM8: eight accumulators' trees at once, the same adds
 * in vector registers). */
static inline __attribute__((always_inline)) void reduce_acc(const int R, const int RB, vf acc[RMAX][RBMAX],
                                                            float *sums) {
#ifdef SC_HSUM8
    vf flat[RMAX * RBMAX];
    int i = 0;
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) flat[r * RB + j] = acc[r][j];
    for (; i + 8 <= R * RB; i += 8) hsum8(flat + i, sums + i);
    for (; i < R * RB; i++) sums[i] = hsum(flat[i]);
#else
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) sums[r * RB + j] = hsum(acc[r][j]);
#endif
}

/* R rows of x (row stride ldx) against weight rows n0..n0+RB-1: y[r * ldy + n] = x_r . w_n + b_n.
 * pf: the software prefetch of the weights ahead (int8 and dense formats). */
static inline __attribute__((always_inline)) void tile_pf(const int fmt, const int R, const int RB, const int pf,
                                                         const sc_mat *W, const float *x, int ldx, const float *xs,
                                                         float *y, int ldy, int n0) {
    const int K = W->k, G = W->group, ng = K / G;
    const int quant = fmt == SC_I8; /* (4-bit groups read their scales above) */
    const int eb = fmt == SC_F32 ? 4 : fmt == SC_I8 ? 1 : 2; /* bytes a weight (int8 and dense formats) */
    const char *ahead = pf_ahead((const char *)W->w + (size_t)n0 * K * eb, (size_t)RB * K * eb); /* (4-bit: unused) */
    vf acc[RMAX][RBMAX];
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) acc[r][j] = vsplat(0.f);
    /* int8 with one scale per row: no group loop, so the accumulators are not live across it */
    if (fmt == SC_I8 && ng == 1) i8_row(R, RB, W, x, ldx, n0, acc);
    else for (int g = 0; g < ng; g++) {
        if (fmt == SC_Q4) {
            /* group g of n0's block of Q4_ROWS rows: the rows' 16 bytes and (scale, min) pairs follow each other */
            const size_t blk = ((size_t)(n0 / Q4_ROWS) * ng + g) * Q4_ROWS;
            const int o = RB == Q4_ROWS ? 0 : n0 % Q4_ROWS; /* n0's row in the block (a whole block: a constant) */
            const uint8_t *base = (const uint8_t *)W->w + (blk + o) * 16;
            float dmc[2 * Q4_ROWS];
            const float *dm = dmc + 2 * o; /* the rows' pairs as fp32, two floats apart */
            if (W->sm_f16) /* the block's 16 halves converted at once */
                SC_UNROLL for (int i = 0; i < 2 * Q4_ROWS; i += VW) {
                    vf v = cvt_f16((const uint16_t *)W->sm + 2 * blk + i);
                    memcpy(dmc + i, &v, sizeof v);
                }
            else dm = (const float *)W->sm + 2 * (blk + o);
            SC_OPAQUE(dm); /* each scale is broadcast from memory where it is used, not kept in registers */
#ifdef SC_LUT16 /* q * d + m for q = 0..15 once per group, then one permute per 16 weights */
            vf lut[RBMAX];
            SC_UNROLL for (int j = 0; j < RB; j++) lut[j] = vdeq(IOTA16, vsplat(dm[2 * j]), vsplat(dm[2 * j + 1]));
            SC_UNROLL for (int hi = 0; hi < 2; hi++) {
                int k = g * 32 + 16 * hi;
                vf xv[RMAX];
                SC_UNROLL for (int r = 0; r < R; r++) xv[r] = vload(x + (size_t)r * ldx + k);
                SC_UNROLL for (int j = 0; j < RB; j++) {
                    vf w = lut_u4(base + (size_t)j * 16, hi, lut[j]);
                    SC_UNROLL for (int r = 0; r < R; r++) acc[r][j] = vfma(xv[r], w, acc[r][j]);
                }
            }
#else /* each loaded byte gives two weights: its low nibble (k) and its high one (k + 16) */
            const float *xg = x + (size_t)g * 32;
            SC_UNROLL for (int j = 0; j < RB; j++) {
                vi b[16 / VW];
                SC_UNROLL for (int h = 0; h < 16 / VW; h++) b[h] = ld_u8(base + (size_t)j * 16 + h * VW);
                vf dj = vsplat(dm[2 * j]), mj = vsplat(dm[2 * j + 1]);
                SC_UNROLL for (int hi = 0; hi < 2; hi++) SC_UNROLL for (int h = 0; h < 16 / VW; h++) {
                    vf w = q4_deq(b[h], hi, dj, mj);
                    SC_UNROLL for (int r = 0; r < R; r++)
                        acc[r][j] = vfma(vload(xg + (size_t)r * ldx + 16 * hi + h * VW), w, acc[r][j]);
                }
            }
#endif
            continue;
        }
        float d[RBMAX], m[RBMAX];
        SC_UNROLL for (int j = 0; j < RB; j++) {
            size_t at = 2 * ((size_t)(n0 + j) * ng + g);
            d[j] = quant ? sm_at(W, at) : 0.f;
            m[j] = quant ? sm_at(W, at + 1) : 0.f;
        }
        if (fmt == SC_I8) { /* acc += d * (the group's q . x); the mins' term is added at the end */
            if (pf) pf_l2(ahead + (size_t)g * RB * G, RB * G); /* a block's slice per group */
            if (G == 32) i8_group(32, R, RB, W, x, ldx, n0, g, d, acc);
            else if (G == 16) i8_group(16, R, RB, W, x, ldx, n0, g, d, acc);
            else i8_group(G, R, RB, W, x, ldx, n0, g, d, acc);
            continue;
        }
        for (int kk = 0; kk < G; kk += VW) { /* dense: fp32 or a 16-bit float */
            int k = g * G + kk;
            if (pf) pf_l2(ahead + (size_t)k * RB * eb, RB * VW * eb);
            vf xv[RMAX];
            SC_UNROLL for (int r = 0; r < R; r++) xv[r] = vload(x + (size_t)r * ldx + k);
            SC_UNROLL for (int j = 0; j < RB; j++) {
                vf w = load_w(fmt, W, (size_t)(n0 + j), k, d[j], m[j]);
                SC_UNROLL for (int r = 0; r < R; r++) acc[r][j] = vfma(xv[r], w, acc[r][j]);
            }
        }
    }
    float sums[RMAX * RBMAX];
    reduce_acc(R, RB, acc, sums);
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) {
        float s = sums[r * RB + j];
        if (fmt == SC_I8 && W->has_min) s += min_term(W, (size_t)(n0 + j), x + (size_t)r * ldx, xs ? xs + (size_t)r * ng : NULL);
        y[(size_t)r * ldy + n0 + j] = W->bias ? s + W->bias[n0 + j] : s;
    }
}

#define tile(fmt, R, RB, ...) tile_pf(fmt, R, RB, 1, __VA_ARGS__)

/* One block of weight rows [n0, n0 + rb) against every row of x, in passes of R and R - 1 rows
 * (M split evenly: 9 rows = 3 + 3 + 3). rb is RB_OF(fmt, R), or smaller for the last block. */
#define TILE_R(F, RR)                                                                                 \
    if (R == RR) {                                                                                    \
        if (rb == RB_OF(F, RR)) tile(F, RR, RB_OF(F, RR), W, xm, ldx, xsm, ym, ldy, n0);                   \
        else if (rb == RB_OF(F, RR + 1)) tile(F, RR, RB_OF(F, RR + 1), W, xm, ldx, xsm, ym, ldy, n0);      \
        else for (int j = 0; j < rb; j++) tile(F, RR, 1, W, xm, ldx, xsm, ym, ldy, n0 + j);                \
        continue;                                                                                     \
    }

static inline __attribute__((always_inline)) void block_rows(const int fmt, const sc_mat *W, const float *x,
                                                            int ldx, int M, float *y, int ldy, int n0, int rb,
                                                            int passes) {
    int base = M / passes, extra = M % passes, m0 = 0, ng = W->k / W->group;
    const int mins = fmt == SC_I8 && W->has_min && ng <= XS_MAX;
    float xs[mins ? RMAX * XS_MAX : 1];
    for (int p = 0; p < passes; p++) {
        int R = base + (p < extra);
        const float *xm = x + (size_t)m0 * ldx, *xsm = mins ? xs : NULL;
        if (mins)
            for (int r = 0; r < R; r++)
                for (int g = 0; g < ng; g++) xs[r * ng + g] = group_sum(xm + (size_t)r * ldx + (size_t)g * W->group, W->group);
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
/* 4-bit rows n0..n0+Q4_ROWS-1 dequantized into buf (Q4_ROWS, K): the values the 4-bit tile makes in
 * registers (q * scale + min, one rounding), so the fp32 tile over buf gives its results bit for bit. */
static void q4_dequantize_block(const sc_mat *W, int n0, float *buf) {
    const int K = W->k, ng = K / 32;
    const uint8_t *blk = (const uint8_t *)W->w + (size_t)(n0 / Q4_ROWS) * ng * Q4_ROWS * 16;
    for (int g = 0; g < ng; g++) {
        __builtin_prefetch(blk + (size_t)(ng + g) * Q4_ROWS * 16); /* the next block, as this one is read */
        __builtin_prefetch(blk + (size_t)(ng + g) * Q4_ROWS * 16 + 64);
        for (int j = 0; j < Q4_ROWS; j++) {
            size_t at = 2 * (((size_t)(n0 / Q4_ROWS) * ng + g) * Q4_ROWS + j);
            vf d = vsplat(sm_at(W, at)), m = vsplat(sm_at(W, at + 1));
            const uint8_t *b = blk + ((size_t)g * Q4_ROWS + j) * 16;
            float *out = buf + (size_t)j * K + (size_t)g * 32;
            SC_UNROLL for (int h = 0; h < 16 / VW; h++) {
                vi q = ld_u8(b + h * VW);
                vf lo = q4_deq(q, 0, d, m), hi = q4_deq(q, 1, d, m);
                memcpy(out + h * VW, &lo, sizeof lo);
                memcpy(out + 16 + h * VW, &hi, sizeof hi);
            }
        }
    }
}

#include "sc_qr.h"

/* ---- I8Q8: int8 weights (one scale per row, codes in -127..127) times int8 activations ---------- */

#define Q8_BLOCK 32 /* inputs per activation scale */

#ifndef SC_DOT4_I8
static inline vi dot4_i8(const int8_t *w, const uint8_t *xa, const int8_t *xq) {
    (void)xa;
    vi s;
    for (int l = 0; l < VW; l++) {
        int t = 0;
        for (int i = 0; i < 4; i++) t += (int)w[4 * l + i] * (int)xq[4 * l + i];
        s[l] = t;
    }
    return s;
}
#endif

/* x (M, K) -> codes xq (M, K) = round(x * 127 / amax) per block of Q8_BLOCK inputs, xa = |xq|, and
 * xsl (M, K / 4): the scale amax / 127 of the block of each 4-input lane (what dot4_i8's lanes sum). */
static void quantize_q8(const float *x, int M, int K, int8_t *xq, uint8_t *xa, float *xsl) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / Q8_BLOCK; b++) {
            size_t o = (size_t)m * K + (size_t)b * Q8_BLOCK;
            float amax = 0.f;
            for (int i = 0; i < Q8_BLOCK; i++) {
                float a = fabsf(x[o + i]);
                amax = a > amax ? a : amax;
            }
            float inv = amax > 0.f ? 127.0f / amax : 0.f, s = amax / 127.0f;
            for (int i = 0; i < Q8_BLOCK; i++) {
                float v = nearbyintf(x[o + i] * inv);
                int q = v > 127.f ? 127 : v < -127.f ? -127 : (int)v;
                xq[o + i] = (int8_t)q;
                xa[o + i] = (uint8_t)(q < 0 ? -q : q);
            }
            for (int l = 0; l < Q8_BLOCK / 4; l++) xsl[o / 4 + l] = s;
        }
}

/* R quantized rows of x against weight rows n0..n0+RB-1: y = scale_n * sum over lanes of (integer
 * dot of 4 inputs) * (their block's scale), + bias. */
static inline __attribute__((always_inline)) void tile_q8(const int R, const int RB, const sc_mat *W, const int8_t *xq,
                                                         const uint8_t *xa, const float *xsl, float *y, int ldy,
                                                         int n0) {
    const int K = W->k;
    const int8_t *w0 = (const int8_t *)W->w + (size_t)n0 * K;
    const char *ahead = pf_ahead(w0, (size_t)RB * K);
    vf acc[RMAX][RBMAX];
    SC_UNROLL for (int r = 0; r < R; r++) SC_UNROLL for (int j = 0; j < RB; j++) acc[r][j] = vsplat(0.f);
    for (int k = 0; k < K; k += 4 * VW) {
        pf_l2(ahead + (size_t)k * RB, RB * 4 * VW);
        vf s[RMAX];
        SC_UNROLL for (int r = 0; r < R; r++) s[r] = vload(xsl + ((size_t)r * K + k) / 4);
        SC_UNROLL for (int j = 0; j < RB; j++) SC_UNROLL for (int r = 0; r < R; r++) {
            vi p = dot4_i8(w0 + (size_t)j * K + k, xa + (size_t)r * K + k, xq + (size_t)r * K + k);
            acc[r][j] = vfma(__builtin_convertvector(p, vf), s[r], acc[r][j]);
        }
    }
    float sums[RMAX * RBMAX];
    reduce_acc(R, RB, acc, sums);
    SC_UNROLL for (int j = 0; j < RB; j++) {
        float d = sm_at(W, 2 * (size_t)(n0 + j)), b = W->bias ? W->bias[n0 + j] : 0.f;
        SC_UNROLL for (int r = 0; r < R; r++) y[(size_t)r * ldy + n0 + j] = sums[r * RB + j] * d + b;
    }
}

#ifndef RB_Q8
#define RB_Q8(R) RB_FOR(R)
#endif
#define TILE_Q8(RR)                                                                                   \
    if (R == RR) {                                                                                    \
        if (rb == RB_Q8(RR)) tile_q8(RR, RB_Q8(RR), W, xq, xa, xsl, ym, ldy, n0);                     \
        else for (int j = 0; j < rb; j++) tile_q8(RR, 1, W, xq, xa, xsl, ym, ldy, n0 + j);            \
        continue;                                                                                     \
    }

/* Inside a parallel region: I8Q8's product. Each thread quantizes x itself (a few microseconds),
 * so no barrier is needed before the blocks; without memory for it, the exact int8 product. */
static void par_matmul_q8(const sc_mat *W, const float *x, int M, float *y, int ldy) {
    const int K = W->k;
    int passes = (M + RMAX - 1) / RMAX, R0 = (M + passes - 1) / passes, RB = RB_Q8(R0);
    int nb = (W->n + RB - 1) / RB;
    int8_t *xq = NULL;
    if (K % (4 * VW) == 0 && K % Q8_BLOCK == 0) xq = (int8_t *)malloc((size_t)M * K * (2 + sizeof(float) / 4));
    uint8_t *xa = xq ? (uint8_t *)(xq + (size_t)M * K) : NULL;
    float *xsl = xq ? (float *)(xa + (size_t)M * K) : NULL;
    if (xq) quantize_q8(x, M, K, xq, xa, xsl);
    sc_mat I = *W;
    I.fmt = SC_I8;
    I.group = K;
    int RBi = RB_OF(SC_I8, R0);
#pragma omp for schedule(static)
    for (int b = 0; b < nb; b++) {
        int n0 = b * RB, rb = W->n - n0 < RB ? W->n - n0 : RB;
        if (!xq) { /* the exact int8 product, block by block */
            for (int n = n0; n < n0 + rb; n += RBi)
                block_rows(SC_I8, &I, x, K, M, y, ldy, n, n0 + rb - n < RBi ? n0 + rb - n : RBi, passes);
            continue;
        }
        int base = M / passes, extra = M % passes, m0 = 0;
        for (int p = 0; p < passes; p++) {
            int R = base + (p < extra);
            const int8_t *xqm = xq + (size_t)m0 * K;
            const uint8_t *xam = xa + (size_t)m0 * K;
            const float *xslm = xsl + (size_t)m0 * K / 4;
            float *ym = y + (size_t)m0 * ldy;
            m0 += R;
            {
                const int8_t *xq = xqm;
                const uint8_t *xa = xam;
                const float *xsl = xslm;
                TILE_Q8(1)
#if RMAX >= 2
                TILE_Q8(2)
#endif
#if RMAX >= 3
                TILE_Q8(3)
#endif
#if RMAX >= 4
                TILE_Q8(4)
#endif
#if RMAX >= 5
                TILE_Q8(5)
#endif
#if RMAX >= 6
                TILE_Q8(6)
#endif
            }
        }
    }
    free(xq);
}

/* Q4_ROWS 4-bit rows from n0 dequantized into buf, then every pass of the fp32 tile over them. A
 * function of its own: inlined into par_matmul, its code came out slower (measured: 9-row 4-bit
 * products ~10% slower when par_matmul's other tiles changed). */
static __attribute__((noinline)) void q4_block_passes(const sc_mat *W, const float *x, int M, float *y, int ldy,
                                                      int n0, float *buf, int RBd, int passes) {
    q4_dequantize_block(W, n0, buf);
    sc_mat D = {SC_F32, W->k, Q4_ROWS, W->k, 0, 0, buf, NULL, W->bias ? W->bias + n0 : NULL};
    for (int n = 0; n < Q4_ROWS; n += RBd) {
        int rb = Q4_ROWS - n < RBd ? Q4_ROWS - n : RBd;
        block_rows(SC_F32, &D, x, W->k, M, y + n0, ldy, n, rb, passes);
    }
}

#ifndef DENSE_ROW1 /* a variant that defines it 1 takes par_row1_dense below for one row of x */
#define DENSE_ROW1 0 /* off unless measured: the baseline build, whose one chain per row waits on
                        each multiply-add in turn, ran the fp32 target's one-token forwards 2.7x slower */
#endif
#if DENSE_ROW1
/* Inside a parallel region: one row of x against a dense matrix (fp32, fp16, bf16), its weight rows
 * one after another without software prefetch, so each thread reads its share as one stream that
 * the hardware prefetcher runs ahead of (docs/performance-log.md: ~1.03x the streaming probe against
 * ~0.78x for blocks of 8 rows). The same sums as the blocks (a row's chain does not depend on the
 * rows beside it). A function of its own, so that the blocks' code is the same as without it. */
static __attribute__((noinline)) void par_row1_dense(const sc_mat *W, const float *x, float *y) {
#pragma omp for schedule(static)
    for (int n = 0; n < W->n; n++) {
        if (W->fmt == SC_F32) tile_pf(SC_F32, 1, 1, 0, W, x, W->k, NULL, y, W->n, n);
        else if (W->fmt == SC_F16) tile_pf(SC_F16, 1, 1, 0, W, x, W->k, NULL, y, W->n, n);
        else tile_pf(SC_BF16, 1, 1, 0, W, x, W->k, NULL, y, W->n, n);
    }
}
#endif

static void par_matmul(const sc_mat *W, const float *x, int M, float *y, int ldy, void *qbuf) {
    if (W->fmt == SC_QR) {
        par_matmul_qr(W, x, M, y, ldy, qbuf);
        return;
    }
#if DENSE_ROW1
    if (M == 1 && W->fmt <= SC_BF16) {
        par_row1_dense(W, x, y);
        return;
    }
#endif
    if (W->fmt == SC_I8Q8) {
        par_matmul_q8(W, x, M, y, ldy);
        return;
    }
    const int rmax = W->fmt == SC_Q4 ? RMAX_Q4 : RMAX;
    int passes = (M + rmax - 1) / rmax, R0 = (M + passes - 1) / passes, RB = RB_OF(W->fmt, R0);
    int nb = (W->n + RB - 1) / RB, ldx = W->k;
    if (W->fmt == SC_Q4 && passes > 1 && Q4_DEQUANT_ONCE) {
        /* more rows than one pass holds: each block of 4-bit rows is dequantized once (not once per
         * pass) and the passes run the fp32 tile over it; the same values, so the same results */
        float *buf = (float *)malloc((size_t)Q4_ROWS * W->k * sizeof(float)); /* this thread's */
        int RBd = RB_DENSE(R0);
#pragma omp for schedule(static)
        for (int b = 0; b < W->n / Q4_ROWS; b++) {
            int n0 = b * Q4_ROWS;
            if (!buf) { /* no memory for it: the 4-bit tile, pass by pass */
                for (int n = n0; n < n0 + Q4_ROWS; n += RB) block_rows(SC_Q4, W, x, ldx, M, y, ldy, n, RB, passes);
                continue;
            }
            q4_block_passes(W, x, M, y, ldy, n0, buf, RBd, passes);
        }
        free(buf);
        return;
    }
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
    void *qbuf = W->fmt == SC_QR ? malloc(qr_act_bytes(M, W->k)) : NULL;
    if (W->fmt == SC_QR && !qbuf) return;
    int n = 0; /* the output's width: a QR matrix's chain together */
    for (const sc_mat *p = W; p; p = p->fmt == SC_QR ? p->next : NULL) n += p->n;
#pragma omp parallel
    par_matmul(W, x, M, y, n, qbuf);
    free(qbuf);
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

/* dot(q, k[u], n) for eight keys at once (n a multiple of VW): each key's chain and reduction are
 * dot()'s, bit for bit; eight independent chains instead of one. */
static inline void dot8(const float *q, const float *const *k, int n, float *out) {
    vf a[8];
    SC_UNROLL for (int u = 0; u < 8; u++) a[u] = vsplat(0.f);
    for (int i = 0; i < n; i += VW) {
        vf qv = vload(q + i);
        SC_UNROLL for (int u = 0; u < 8; u++) a[u] = vfma(qv, vload(k[u] + i), a[u]);
    }
#ifdef SC_HSUM8
    hsum8(a, out);
#else
    SC_UNROLL for (int u = 0; u < 8; u++) out[u] = hsum(a[u]);
#endif
}

/* Attention reads the visible keys of each new token in a fixed order (the cached prefix, then
 * its visible new slots) in chunks of KV_CHUNK: a chunk's softmax partial (max, sum, weighted
 * values) is computed by one job for all the query heads that share a KV head (each key and
 * value is read once per group, and from memory once for a block of new tokens), and the partials
 * are merged in chunk order. The chunks are a count of visible keys, not slots or threads, so a
 * token's result is the same whatever the number of new tokens, their tree or the thread count. */
#define KV_CHUNK 64
#define T_BLOCK 16 /* new tokens whose partials are held at once */

/* The i-th visible slot of new token t: the cached prefix, then the new slots its mask allows. */
static inline int vis_slot(const int *vis_new, int T, int start, int t, int i) {
    if (i < start) return i;
    return start + (vis_new ? vis_new[(size_t)t * T + (i - start)] : i - start);
}

/* Where a batch's sequences are: for sequence s, its Ts[s] new tokens (rows off[s].. of the batch),
 * its layer-0 cache kcs[s], vcs[s] (nkv, S_maxs[s], hd) with starts[s] slots filled, and the
 * visible new slots of its tokens (vis_new[s], NULL: causal); per batch row t, its sequence seg[t]. */
typedef struct {
    const int *Ts, *off, *starts, *S_maxs, *seg;
    float *const *kcs, *const *vcs;
    int *const *vis_new;
} sc_batch;

/* acc (hd) = sum over the chunk's keys i0..i1 of se[i - i0] * V row i, NA vectors of acc at a time
 * held in registers (named by constant indices after unrolling: an array whose address is taken
 * stays on the stack, a store and a reload on every key). Each lane's multiply-adds run in key
 * order, as in the scalar loop, whatever NA. */
static inline __attribute__((always_inline)) void pv_chunk(const int NA, const float *vg, const int *vis_new, int Tn,
                                                          int start, int tl, int i0, int i1, const float *se, int hd,
                                                          float *acc) {
    for (int d0 = 0; d0 < hd; d0 += NA * VW) {
        vf a[8];
        SC_UNROLL for (int c = 0; c < NA; c++) a[c] = vsplat(0.f);
        for (int i = i0; i < i1; i++) {
            const float *vrow = vg + (size_t)vis_slot(vis_new, Tn, start, tl, i) * hd + d0;
            vf p = vsplat(se[i - i0]);
            SC_UNROLL for (int c = 0; c < NA; c++) a[c] = vfma(p, vload(vrow + c * VW), a[c]);
        }
        SC_UNROLL for (int c = 0; c < NA; c++) {
            vf t = a[c];
            memcpy(acc + d0 + c * VW, &t, sizeof t);
        }
    }
}

/* Attention of one layer for the T new tokens of a batch (inside a parallel region): qkv (T, (nh + 2 nkv)
 * hd), q and k in interleaved RoPE order; rot (T, hd / 2, 2); new keys go to slot start + t of their
 * sequence's cache at layer_off; q, part (T_BLOCK * nh * max_chunks * (hd + 2)) and sc (this thread's
 * group * KV_CHUNK) are scratch; out (T, nh hd). Tokens are taken T_BLOCK at a time across sequences
 * (one forward's barriers for a batch of one-token sequences); a token's arithmetic is the same in any block. */
static void attention(const float *qkv, const float *rot, const sc_batch *bt, size_t layer_off, float *q, float *part,
                      float *sc, const int *n_vis, float *out, int T, int max_chunks, int nh, int nkv, int hd) {
    int width = (nh + 2 * nkv) * hd, half = hd / 2, group = nh / nkv, stride = hd + 2;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
        int s = bt->seg[t], tl = t - bt->off[s], start = bt->starts[s], S_max = bt->S_maxs[s];
        float *kc = bt->kcs[s] + layer_off, *vc = bt->vcs[s] + layer_off;
        const float *row = qkv + (size_t)t * width, *r = rot + (size_t)t * hd;
        for (int h = 0; h < nh + nkv; h++) {
            const float *src = row + (size_t)h * hd;
            float *dst = h < nh ? q + ((size_t)t * nh + h) * hd : kc + ((size_t)(h - nh) * S_max + start + tl) * hd;
            for (int i = 0; i < half; i++) {
                float a = src[2 * i], b = src[2 * i + 1], c = r[2 * i], sn = r[2 * i + 1];
                dst[2 * i] = a * c - b * sn;
                dst[2 * i + 1] = a * sn + b * c;
            }
        }
        for (int g = 0; g < nkv; g++)
            memcpy(vc + ((size_t)g * S_max + start + tl) * hd, row + (size_t)(nh + nkv + g) * hd, hd * sizeof(float));
    }
    for (int t0 = 0; t0 < T; t0 += T_BLOCK) {
        int tb = T - t0 < T_BLOCK ? T - t0 : T_BLOCK;
#pragma omp for schedule(static)
        for (int job = 0; job < tb * nkv * max_chunks; job++) {
            /* token-minor: a thread's consecutive jobs read the same chunk of keys and values, from
             * memory once and from cache for the block's other tokens */
            int t = t0 + job % tb, c = (job / tb) % max_chunks, g = job / (tb * max_chunks);
            int i0 = c * KV_CHUNK, i1 = i0 + KV_CHUNK < n_vis[t] ? i0 + KV_CHUNK : n_vis[t];
            if (i0 >= i1) continue;
            int s = bt->seg[t], tl = t - bt->off[s], start = bt->starts[s], S_max = bt->S_maxs[s], Tn = bt->Ts[s];
            const int *vis_new = bt->vis_new[s];
            const float *kg = bt->kcs[s] + layer_off + (size_t)g * S_max * hd;
            const float *vg = bt->vcs[s] + layer_off + (size_t)g * S_max * hd;
            for (int e = 0; e < group; e++) {
                int h = g * group + e;
                const float *qh = q + ((size_t)t * nh + h) * hd;
                float *se = sc + (size_t)e * KV_CHUNK, mx = -INFINITY;
                int i8 = i0;
                if (hd % VW == 0)
                    for (; i8 + 8 <= i1; i8 += 8) { /* eight keys at a time, each exactly as below */
                        const float *kp[8];
                        float v8[8];
                        for (int u = 0; u < 8; u++) kp[u] = kg + (size_t)vis_slot(vis_new, Tn, start, tl, i8 + u) * hd;
                        dot8(qh, kp, hd, v8);
                        for (int u = 0; u < 8; u++) {
                            float v = v8[u] * scale;
                            se[i8 + u - i0] = v;
                            if (v > mx) mx = v;
                        }
                    }
                for (int i = i8; i < i1; i++) {
                    float v = dot(qh, kg + (size_t)vis_slot(vis_new, Tn, start, tl, i) * hd, hd) * scale;
                    se[i - i0] = v;
                    if (v > mx) mx = v;
                }
                int len = i1 - i0, i = 0;
                vf vs = vsplat(0.f);
                for (; i + VW <= len; i += VW) {
                    vf ex = vexp(vload(se + i) - vsplat(mx));
                    memcpy(se + i, &ex, sizeof ex);
                    vs = vs + ex;
                }
                float sum = hsum(vs);
                if (i < len) { /* the chunk's tail, through the same vector exp */
                    float tmp[VW];
                    for (int l = 0; l < VW; l++) tmp[l] = i + l < len ? se[i + l] - mx : -100.f;
                    vf ex = vexp(vload(tmp));
                    for (int l = 0; i + l < len; l++) {
                        se[i + l] = ex[l];
                        sum += ex[l];
                    }
                }
                float *pp = part + (((size_t)(t - t0) * nh + h) * max_chunks + c) * stride;
                pp[0] = mx;
                pp[1] = sum;
                float *acc = pp + 2;
                if (hd % (4 * VW) == 0) { /* NA vectors of acc held in registers over the chunk's keys; the
                                           * same multiply-adds in the same order as the loop below */
                    if (hd % (8 * VW) == 0) pv_chunk(8, vg, vis_new, Tn, start, tl, i0, i1, se, hd, acc);
                    else pv_chunk(4, vg, vis_new, Tn, start, tl, i0, i1, se, hd, acc);
                    continue;
                }
                for (int d = 0; d < hd; d++) acc[d] = 0.f;
                for (int i = i0; i < i1; i++) {
                    const float *vrow = vg + (size_t)vis_slot(vis_new, Tn, start, tl, i) * hd;
                    float p = se[i - i0];
                    int d = 0;
                    for (; d + VW <= hd; d += VW) {
                        vf a = vfma(vsplat(p), vload(vrow + d), vload(acc + d));
                        memcpy(acc + d, &a, sizeof a);
                    }
                    for (; d < hd; d++) acc[d] += p * vrow[d];
                }
            }
        }
#pragma omp for schedule(static)
        for (int th = 0; th < tb * nh; th++) {
            int t = t0 + th / nh, h = th % nh, nc = (n_vis[t] + KV_CHUNK - 1) / KV_CHUNK;
            const float *pp = part + ((size_t)(t - t0) * nh + h) * max_chunks * stride;
            float mx = -INFINITY, sum = 0.f, *o = out + (size_t)t * nh * hd + (size_t)h * hd;
            for (int c = 0; c < nc; c++)
                if (pp[c * stride] > mx) mx = pp[c * stride];
            for (int d = 0; d < hd; d++) o[d] = 0.f;
            for (int c = 0; c < nc; c++) {
                float w = expf(pp[c * stride] - mx);
                sum += w * pp[c * stride + 1];
                for (int d = 0; d < hd; d++) o[d] += w * pp[c * stride + 2 + d];
            }
            float inv = 1.0f / sum;
            for (int d = 0; d < hd; d++) o[d] *= inv;
        }
    }
}

/* Every decoder layer for the new tokens of n_seq sequences in one call: x += Wo attn(RoPE(Wqkv rmsnorm(x)));
 * x += Wd (silu(Wg h) * Wu h), h = rmsnorm(x); then (head given) logits = head rmsnorm(x) of the last n_outs[s]
 * tokens of each sequence. x (sum Ts, dim) and rot hold sequence s's Ts[s] tokens one sequence after another;
 * its cache is kcs[s]/vcs[s] + l * layer_stride, (nkv, S_maxs[s], hd) with starts[s] slots filled; masks[s]:
 * (Ts, Ts) bytes of a token tree or NULL (causal). Products read each weight once for every sequence; a
 * token's result does not depend on its batch. Returns 0, or 1 when scratch could not be allocated. */
int sc_forward_batch(const sc_layer *L, int n_layers, const sc_dims *dm, float *x, int n_seq, const int *Ts,
                     const float *rot, const unsigned char *const *masks, float *const *kcs, float *const *vcs,
                     long long layer_stride, const int *starts, const int *S_maxs, const float *norm_w,
                     const sc_mat *head, float *logits, const int *n_outs) {
    int D = dm->dim, nh = dm->n_heads, nkv = dm->n_kv_heads, hd = dm->head_dim, H = dm->hidden;
    int qkv_w = (nh + 2 * nkv) * hd, att_w = nh * hd;
    if (n_seq < 1) return 0;
    int T = 0, N = 0, max_chunks = 0;
    size_t vis_n = 0;
    for (int s = 0; s < n_seq; s++) {
        int n_chunks = (starts[s] + Ts[s] + KV_CHUNK - 1) / KV_CHUNK;
        if (n_chunks > max_chunks) max_chunks = n_chunks;
        if (masks && masks[s]) vis_n += (size_t)Ts[s] * Ts[s];
        T += Ts[s];
        N += head ? n_outs[s] : 0;
    }
    size_t part_n = (size_t)(T < T_BLOCK ? T : T_BLOCK) * nh * max_chunks * (hd + 2);
    size_t need = (size_t)T * (D + qkv_w + att_w + att_w + D + 2 * H + H) + part_n;
    float *buf = (float *)malloc(need * sizeof(float));
    int kmax = D > att_w ? D : att_w; /* the int8 activations of the widest product's input */
    kmax = kmax > H ? kmax : H;
    int qr = head && head->fmt == SC_QR; /* int8 activations' scratch, where a QR product runs */
    for (int l = 0; l < n_layers && !qr; l++)
        qr = L[l].qkv.fmt == SC_QR || L[l].o.fmt == SC_QR || L[l].gate_up.fmt == SC_QR || L[l].down.fmt == SC_QR;
    void *qbuf = qr ? malloc(qr_act_bytes(T > N ? T : N, kmax)) : NULL;
    int *n_vis = (int *)malloc((size_t)T * sizeof(int)), *vis_all = NULL, *seg = (int *)malloc((size_t)T * sizeof(int));
    int *off = (int *)malloc((size_t)(n_seq + 1) * sizeof(int)), **vis_new = (int **)calloc(n_seq, sizeof(int *));
    if (vis_n) vis_all = (int *)malloc(vis_n * sizeof(int));
    if (!buf || (qr && !qbuf) || !n_vis || !seg || !off || !vis_new || (vis_n && !vis_all)) {
        free(buf);
        free(qbuf);
        free(n_vis);
        free(seg);
        free(off);
        free(vis_new);
        free(vis_all);
        return 1;
    }
    float *h = buf, *qkv = h + (size_t)T * D, *q = qkv + (size_t)T * qkv_w, *att = q + (size_t)T * att_w;
    float *o = att + (size_t)T * att_w, *gu = o + (size_t)T * D, *act = gu + (size_t)T * 2 * H;
    float *part = act + (size_t)T * H;
    off[0] = 0;
    for (int s = 0, used = 0; s < n_seq; s++) { /* each token's visible new slots, in slot order */
        const unsigned char *mask = masks ? masks[s] : NULL;
        int Tn = Ts[s];
        off[s + 1] = off[s] + Tn;
        if (mask) {
            vis_new[s] = vis_all + used;
            used += Tn * Tn;
        }
        for (int t = 0; t < Tn; t++) {
            seg[off[s] + t] = s;
            int n = 0;
            for (int u = 0; u < Tn; u++)
                if (mask ? mask[(size_t)t * Tn + u] : u <= t) {
                    if (mask) vis_new[s][(size_t)t * Tn + n] = u;
                    n++;
                }
            n_vis[off[s] + t] = starts[s] + n;
        }
    }
    sc_batch bt = {Ts, off, starts, S_maxs, seg, kcs, vcs, vis_new};
    int failed = 0;
#pragma omp parallel
    {
        float *sc = (float *)malloc((size_t)(nh / nkv) * KV_CHUNK * sizeof(float));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            for (int l = 0; l < n_layers; l++) {
                const sc_layer *ly = L + l;
                if (l == 0) /* later layers' input norm comes with the previous layer's residual add */
#pragma omp for schedule(static)
                    for (int t = 0; t < T; t++) rmsnorm_row(x + (size_t)t * D, ly->attn_norm, h + (size_t)t * D, D, dm->eps);
                par_matmul(&ly->qkv, h, T, qkv, qkv_w, qbuf);
                attention(qkv, rot, &bt, (size_t)l * layer_stride, q, part, sc, n_vis, att, T, max_chunks, nh, nkv, hd);
                par_matmul(&ly->o, att, T, o, D, qbuf);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    float *xt = x + (size_t)t * D, *ot = o + (size_t)t * D;
                    for (int i = 0; i < D; i++) xt[i] += ot[i];
                    rmsnorm_row(xt, ly->ffn_norm, h + (size_t)t * D, D, dm->eps);
                }
                par_matmul(&ly->gate_up, h, T, gu, 2 * H, qbuf);
                int nv = H / VW; /* silu(g) * u: split over the vectors of every token (a row's tail: one job) */
#pragma omp for schedule(static)
                for (int c = 0; c < T * (nv + 1); c++) {
                    int t = c / (nv + 1), v = c % (nv + 1);
                    const float *g = gu + (size_t)t * 2 * H, *u = g + H;
                    float *a = act + (size_t)t * H;
                    if (v < nv) {
                        int i = v * VW;
                        vf gv = vload(g + i), r = gv / (vsplat(1.0f) + vexp(vsplat(0.f) - gv)) * vload(u + i);
                        memcpy(a + i, &r, sizeof r);
                    } else
                        for (int i = nv * VW; i < H; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                }
                par_matmul(&ly->down, act, T, o, D, qbuf);
#pragma omp for schedule(static)
                for (int t = 0; t < T; t++) {
                    float *xt = x + (size_t)t * D, *ot = o + (size_t)t * D;
                    for (int i = 0; i < D; i++) xt[i] += ot[i];
                    if (l + 1 < n_layers) rmsnorm_row(xt, L[l + 1].attn_norm, h + (size_t)t * D, D, dm->eps);
                }
            }
            if (head) {
#pragma omp for schedule(static)
                for (int s = 0; s < n_seq; s++) { /* the rows wanted, sequence after sequence */
                    int first = 0;
                    for (int r = 0; r < s; r++) first += n_outs[r];
                    for (int t = 0; t < n_outs[s]; t++)
                        rmsnorm_row(x + (size_t)(off[s + 1] - n_outs[s] + t) * D, norm_w, h + (size_t)(first + t) * D,
                                    D, dm->eps);
                }
                par_matmul(head, h, N, logits, head->n, qbuf);
            }
        }
        free(sc);
    }
    free(buf);
    free(qbuf);
    free(n_vis);
    free(seg);
    free(off);
    free(vis_new);
    free(vis_all);
    return failed;
}

/* sc_forward_batch for one sequence: T new tokens, mask (T, T) or NULL, the cache kc0/vc0 (nkv, S_max, hd)
 * per layer with start slots filled; logits of the last n_out tokens. */
int sc_forward(const sc_layer *L, int n_layers, const sc_dims *dm, float *x, int T, const float *rot,
               const unsigned char *mask, float *kc0, float *vc0, long long layer_stride, int start, int S_max,
               const float *norm_w, const sc_mat *head, float *logits, int n_out) {
    return sc_forward_batch(L, n_layers, dm, x, 1, &T, rot, &mask, &kc0, &vc0, layer_stride, &start, &S_max, norm_w,
                            head, logits, &n_out);
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

/* Hand the calling thread's OpenMP workers back to the runtime (its next parallel region makes them
 * again). libgomp gives every thread that starts parallel regions a pool of its own; while more
 * threads are in pools than there are CPUs, its barriers stop spinning and sleep in the kernel, and a
 * forward crosses ~240 of them: a server whose scheduler thread runs the forwards decoded a lone
 * request at half speed while the thread that had loaded the model still held its pool (measured on
 * a 2-core AMD EPYC: 95-111 against 192-224 tok/s). A runtime without omp_pause_resource_all: nothing. */
#if defined(_OPENMP) && (defined(__clang__) || __GNUC__ >= 9) /* omp.h declares it (OpenMP 5.0) */
#define SC_PAUSE 1
#pragma weak omp_pause_resource_all
#endif
void sc_release_threads(void) {
#ifdef SC_PAUSE
    if (omp_pause_resource_all) omp_pause_resource_all(omp_pause_hard);
#endif
}

const char *sc_variant(void) { return SC_VARIANT; }
/* Does this variant run QR products in vectors (1), or only lane by lane (0: a reference)? */
int sc_qr_native(void) {
#ifdef QR_SIMD
    return 1;
#else
    return 0;
#endif
}
int sc_vector_width(void) { return VW; }
int sc_rows_per_pass(void) { return RMAX; }

/* Which x86-64 variants this CPU runs, as bits: 1 avx2 (with FMA and F16C), 2 avx512 (F, BW, VL, DQ),
 * 4 avx512vnni (avx512 and AVX512-VNNI), 8 avxvnni (avx2 and AVX-VNNI); 0: the baseline only. */
int sc_cpu_level(void) {
    int level = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    level = avx2 | avx512 << 1 | (avx512 && __builtin_cpu_supports("avx512vnni")) << 2 |
            (avx2 && __builtin_cpu_supports("avxvnni")) << 3;
#endif
    return level;
}

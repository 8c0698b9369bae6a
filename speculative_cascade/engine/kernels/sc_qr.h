/* QR: quantized weights times int8 activations with integer dot products (llama.cpp's arithmetic),
 * rows interleaved so that the weights of a forward are read once for all its tokens.
 *
 * Layout (the same for every variant): rows in blocks of QR_ROWS = 16, each block a run of records,
 * one per super-block of S inputs, front to back:
 *   codes  S / 4 chunks of 4 inputs, 64 bytes a chunk: row r at bytes 4r..4r+3 (8-bit codes);
 *          4-bit codes: per 32 inputs, four 64-byte vectors v, row r's 4 bytes holding
 *          inputs 4v..4v+3 in their low nibbles and 16+4v..16+4v+3 in their high ones;
 *          6-bit codes (Q6_K): the 4-bit layout of the low bits, then per 32 inputs two vectors
 *          of the top two bits (vector v / 2, bits (v & 1) * 4 of a byte: the low nibble's, + 2: the high's)
 *   sc     per sub-block of G inputs, 16 integer scales (u8, or s8 for Q6_K)   [K-quants]
 *   mn     per sub-block, 16 integer mins (u8)                                 [Q4_K]
 *   d, dm  16 fp16 scales, 16 fp16 min multipliers (the file's own)             [dm: Q4_1, Q4_K]
 * A weight is d * sc * (u - zero) + dm * mn (mn = 1 for Q4_1, sc = 1 where absent): every GGUF value
 * exactly. Activations are quantized per row in blocks of S (dx = amax / 127, codes in -127..127),
 * with the codes' sums per 16 inputs. Output n of row t is then, super-block after super-block,
 *   acc = fma(float(sum_j sc_j * (u_j . x_j - zero * xs_j)), d * dx, acc)
 *   acc = fma(float(sum_j mn_j * xs_j), dm * dx, acc)                     [with mins]
 * The integer parts are exact and the fp32 steps run in one order whatever the number of rows of x,
 * their pass or the thread split: batch-invariant, bit for bit. Lanes are weight rows, so no
 * horizontal sums: a vector of QW int32 lanes holds QW rows' dot products. */

enum { QR_Q4_0 = 0, QR_Q4_1 = 1, QR_Q8_0 = 2, QR_Q4_K = 3, QR_Q6_K = 4, QR_TYPES = 5 };
#define QR_ROWS 16

/* S: inputs per super-block (one activation scale), G: per sub-block (one integer scale), bits of a
 * code, zero: the integer subtracted from every code, sc: 0 none, 1 u8, 2 s8; mn: 0 none, 1 implicit
 * (Q4_1: dm * xs), 2 u8 per sub-block (Q4_K). */
typedef struct {
    int S, G, bits, zero, sc, mn;
} qr_type;
static const qr_type QR_T[QR_TYPES] = {
    {32, 32, 4, 8, 0, 0},   /* Q4_0: d * (q - 8) */
    {32, 32, 4, 0, 0, 1},   /* Q4_1: d * q + m */
    {32, 32, 8, 128, 0, 0}, /* Q8_0: d * q, stored as q + 128 */
    {256, 32, 4, 0, 1, 2},  /* Q4_K: d * sc * q - dmin * mn */
    {256, 16, 6, 32, 2, 0}, /* Q6_K: d * sc * (q - 32): 4-bit layout for the low bits, 2 more bits each */
};
#define QR_CODES(t) (QR_ROWS * (t).S * (t).bits / 8)
#define QR_HI2 (QR_ROWS * 256 / 2) /* 6-bit codes (S = 256): where the top two bits follow the nibbles */
#define QR_SCB(t) ((t).sc ? QR_ROWS * (t).S / (t).G : 0)
#define QR_MNB(t) ((t).mn == 2 ? QR_ROWS * (t).S / (t).G : 0)
/* a record: codes, scales, mins, then d (and dm) as the file's fp16, rounded up to whole cache lines */
#define QR_REC(t) ((QR_CODES(t) + QR_SCB(t) + QR_MNB(t) + 2 * QR_ROWS * (1 + ((t).mn != 0)) + 63) / 64 * 64)

/* Bytes of an (n, k) matrix of type qt in this layout (k a multiple of S), or -1. */
long long sc_qr_bytes(int qt, int n, int k) {
    if (qt < 0 || qt >= QR_TYPES || k % QR_T[qt].S) return -1;
    return (long long)((n + QR_ROWS - 1) / QR_ROWS) * (k / QR_T[qt].S) * QR_REC(QR_T[qt]);
}

/* Row n's codes, scales and mins of super-block s from its GGUF blocks (raw: the row's bytes):
 * u[S] codes (with the zero added), sc and mn per sub-block, d and dm. Returns 0, or 1 for a Q8_0
 * code of -128 (the sign-trick products of the variants without VNNI need |q| <= 127). */
static uint16_t qr_h(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static int qr_unpack(int qt, const uint8_t *raw, int s, uint8_t *u, int *sc, int *mn, uint16_t *d, uint16_t *dm) {
    switch (qt) {
    case QR_Q4_0:
    case QR_Q4_1: {
        const uint8_t *b = raw + (size_t)s * (qt == QR_Q4_0 ? 18 : 20);
        *d = qr_h(b);
        *dm = qt == QR_Q4_1 ? qr_h(b + 2) : 0;
        const uint8_t *qs = b + (qt == QR_Q4_0 ? 2 : 4);
        for (int i = 0; i < 16; i++) u[i] = qs[i] & 15, u[i + 16] = qs[i] >> 4;
        sc[0] = mn[0] = 1;
        return 0;
    }
    case QR_Q8_0: {
        const uint8_t *b = raw + (size_t)s * 34;
        *d = qr_h(b);
        *dm = 0;
        int bad = 0;
        for (int i = 0; i < 32; i++) {
            int q = (int8_t)b[2 + i];
            bad |= q == -128;
            u[i] = (uint8_t)(q + 128);
        }
        sc[0] = mn[0] = 1;
        return bad;
    }
    case QR_Q4_K: {
        const uint8_t *b = raw + (size_t)s * 144, *q = b + 4, *qs = b + 16;
        *d = qr_h(b);
        *dm = qr_h(b + 2) ^ 0x8000; /* -dmin */
        for (int j = 0; j < 8; j++) {
            if (j < 4) sc[j] = q[j] & 63, mn[j] = q[j + 4] & 63;
            else sc[j] = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
        for (int p = 0; p < 4; p++)
            for (int l = 0; l < 32; l++) u[64 * p + l] = qs[32 * p + l] & 15, u[64 * p + 32 + l] = qs[32 * p + l] >> 4;
        return 0;
    }
    default: { /* Q6_K: ql[128], qh[64], scales[16] (s8), d */
        const uint8_t *b = raw + (size_t)s * 210, *ql = b, *qh = b + 128;
        *d = qr_h(b + 208);
        *dm = 0;
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)b[192 + j];
        for (int h = 0; h < 2; h++, ql += 64, qh += 32)
            for (int l = 0; l < 32; l++) {
                uint8_t *o = u + 128 * h;
                o[l] = (ql[l] & 15) | (((qh[l] >> 0) & 3) << 4);
                o[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        return 0;
    }
    }
}

static const int QR_GGUF_BLOCK[QR_TYPES][2] = {{32, 18}, {32, 20}, {32, 34}, {256, 144}, {256, 210}};

/* GGUF rows (n, k) of type qt, row after row (row_bytes each), into out (sc_qr_bytes). rows: the order
 * in which to take the file's rows (NULL: as stored). Returns 0, 1 for a Q8_0 code of -128, -1 for a
 * shape this layout cannot hold. */
int sc_qr_repack(int qt, const uint8_t *src, const int *rows, int n, int k, uint8_t *out) {
    if (sc_qr_bytes(qt, n, k) < 0) return -1;
    const qr_type t = QR_T[qt];
    const int nsb = k / t.S, nsub = t.S / t.G, rec = QR_REC(t);
    const size_t row_bytes = (size_t)k / QR_GGUF_BLOCK[qt][0] * QR_GGUF_BLOCK[qt][1];
    const int nb = (n + QR_ROWS - 1) / QR_ROWS;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int job = 0; job < nb * nsb; job++) {
        int b = job / nsb, s = job % nsb;
        uint8_t *r = out + ((size_t)b * nsb + s) * rec, *codes = r, *scp = r + QR_CODES(t), *mnp = scp + QR_SCB(t);
        uint16_t *d = (uint16_t *)(mnp + QR_MNB(t)), *dm = d + QR_ROWS;
        memset(r, 0, rec); /* rows past n: zero codes and scales */
        if (t.bits == 8 && t.zero) /* a padding row's codes at the zero: its dot products are 0 */
            for (int i = 0; i < QR_CODES(t); i++) codes[i] = (uint8_t)t.zero;
        for (int l = 0; l < QR_ROWS && b * QR_ROWS + l < n; l++) {
            int row = b * QR_ROWS + l;
            uint8_t u[256];
            int sc[16], mn[16];
            uint16_t dd, mm;
            bad |= qr_unpack(qt, src + (size_t)(rows ? rows[row] : row) * row_bytes, s, u, sc, mn, &dd, &mm);
            d[l] = dd;
            if (t.mn) dm[l] = mm;
            for (int j = 0; j < nsub; j++) {
                if (t.sc) scp[j * QR_ROWS + l] = (uint8_t)sc[j];
                if (t.mn == 2) mnp[j * QR_ROWS + l] = (uint8_t)mn[j];
            }
            if (t.bits == 8)
                for (int c = 0; c < t.S / 4; c++) memcpy(codes + (size_t)c * 64 + 4 * l, u + 4 * c, 4);
            else
                for (int j = 0; j < t.S / 32; j++)
                    for (int v = 0; v < 4; v++)
                        for (int i = 0; i < 4; i++) {
                            int a = u[32 * j + 4 * v + i], c = u[32 * j + 16 + 4 * v + i];
                            codes[(size_t)(j * 4 + v) * 64 + 4 * l + i] = (uint8_t)((a & 15) | (c & 15) << 4);
                            if (t.bits == 6) /* bits 4-5 of both, at (v & 1) * 4 and + 2 of their byte */
                                codes[QR_HI2 + (size_t)(j * 2 + v / 2) * 64 + 4 * l + i] |=
                                    (uint8_t)(((a >> 4) | (c >> 4) << 2) << ((v & 1) * 4));
                        }
        }
    }
    return bad;
}

/* n GGUF rows of k values of type qt (row_bytes apart, from src) dequantized into out (n, k): the
 * file's values, for lookups in an embedding table kept as stored. */
void sc_gguf_dequant(int qt, const uint8_t *src, int n, int k, float *out) {
    const qr_type t = QR_T[qt];
    const size_t row_bytes = (size_t)k / QR_GGUF_BLOCK[qt][0] * QR_GGUF_BLOCK[qt][1];
    for (int i = 0; i < n; i++)
        for (int s = 0; s < k / t.S; s++) {
            uint8_t u[256];
            int sc[16], mn[16];
            uint16_t d, dm;
            qr_unpack(qt, src + (size_t)i * row_bytes, s, u, sc, mn, &d, &dm);
            double dd = half_to_float(d), mm = half_to_float(dm);
            for (int x = 0; x < t.S; x++) {
                int j = x / t.G;
                double v = dd * (t.sc ? sc[j] : 1) * (u[x] - t.zero) + (t.mn ? mm * (t.mn == 2 ? mn[j] : 1) : 0.0);
                out[(size_t)i * k + (size_t)s * t.S + x] = (float)v;
            }
        }
}

/* Row n's code at input i of super-block record r, and its sub-block's scale and min. */
static inline int qr_code(const qr_type *t, const uint8_t *r, int l, int i) {
    if (t->bits == 8) return r[(size_t)(i / 4) * 64 + 4 * l + i % 4];
    int j = i / 32, w = i % 32, hi = w >= 16, v = (w % 16) / 4;
    uint8_t byte = r[(size_t)(j * 4 + v) * 64 + 4 * l + w % 4];
    int q = hi ? byte >> 4 : byte & 15;
    if (t->bits == 6) q |= ((r[QR_HI2 + (size_t)(j * 2 + v / 2) * 64 + 4 * l + w % 4] >> ((v & 1) * 4 + 2 * hi)) & 3) << 4;
    return q;
}

/* Rows row0..row0+m-1 of W (type qt) dequantized into out (m, k), fp32 (double arithmetic, one rounding). */
void sc_qr_dequant(int qt, const uint8_t *w, int k, int row0, int m, float *out) {
    const qr_type t = QR_T[qt];
    const int nsb = k / t.S, rec = QR_REC(t);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < m; i++) {
        int row = row0 + i, b = row / QR_ROWS, l = row % QR_ROWS;
        for (int s = 0; s < nsb; s++) {
            const uint8_t *r = w + ((size_t)b * nsb + s) * rec, *scp = r + QR_CODES(t), *mnp = scp + QR_SCB(t);
            const uint16_t *d = (const uint16_t *)(mnp + QR_MNB(t)), *dm = d + QR_ROWS;
            for (int x = 0; x < t.S; x++) {
                int j = x / t.G;
                double sc = t.sc == 1 ? scp[j * QR_ROWS + l] : t.sc == 2 ? (int8_t)scp[j * QR_ROWS + l] : 1;
                double mn = t.mn == 2 ? mnp[j * QR_ROWS + l] : 1;
                double v = (double)half_to_float(d[l]) * sc * (qr_code(&t, r, l, x) - t.zero) + (t.mn ? (double)half_to_float(dm[l]) * mn : 0.0);
                out[(size_t)i * k + (size_t)s * t.S + x] = (float)v;
            }
        }
    }
}

/* ---- activations ---------------------------------------------------------------------------- */

/* x (M, K) quantized per row in blocks of S: codes qx, sums xs per 16 inputs, scales dx per block. */
typedef struct {
    int8_t *qx;
    int32_t *xs;
    float *dx;
} qr_act;

/* Bytes of scratch for M rows of K inputs (K a multiple of 32). */
static size_t qr_act_bytes(int M, int K) { return (size_t)M * K + (size_t)M * (K / 16) * 4 + (size_t)M * (K / 32) * 4 + 64; }

static qr_act qr_act_at(void *buf, int M, int K) {
    qr_act a;
    a.qx = (int8_t *)buf;
    a.xs = (int32_t *)(a.qx + (size_t)M * K);
    a.dx = (float *)(a.xs + (size_t)M * (K / 16));
    return a;
}

/* Inside a parallel region (ends with a barrier): one block of one row per job, each the same
 * arithmetic whatever M. q = round(x * 127 / amax), half to even; |x * 127 / amax| cannot round past 127. */
typedef signed char qr_vc __attribute__((vector_size(VW)));
static void par_quantize_qr(int S, const float *x, int M, int K, qr_act a) {
    const int nsb = K / S;
#pragma omp for schedule(static)
    for (int job = 0; job < M * nsb; job++) {
        int m = job / nsb, s = job % nsb;
        const float *xb = x + (size_t)m * K + (size_t)s * S;
        vf mx = vsplat(0.f);
        for (int i = 0; i < S; i += VW) {
            vf v = vload(xb + i);
            v = vselect(v < vsplat(0.f), vsplat(0.f) - v, v);
            mx = vselect(v > mx, v, mx);
        }
        float amax = 0.f;
        for (int l = 0; l < VW; l++) amax = mx[l] > amax ? mx[l] : amax;
        float inv = amax > 0.f ? 127.0f / amax : 0.f;
        a.dx[(size_t)m * (K / 32) + (size_t)s * S / 32] = amax / 127.0f;
        int8_t *q = a.qx + (size_t)m * K + (size_t)s * S;
        int32_t *xs = a.xs + (size_t)m * (K / 16) + (size_t)s * S / 16;
        const vf magic = vsplat(12582912.0f); /* 1.5 * 2^23: adding it rounds half to even, as nearbyintf */
        vi part = {0};
        for (int i = 0; i < S; i += VW) {
            vf r = (vload(xb + i) * vsplat(inv) + magic) - magic;
            vi qi = __builtin_convertvector(r, vi);
            qr_vc c = __builtin_convertvector(qi, qr_vc);
            memcpy(q + i, &c, sizeof c);
            part += qi;
            if ((i + VW) % 16 == 0) { /* the codes' sum of each 16 inputs */
                int sum = 0;
                for (int l = 0; l < VW; l++) sum += part[l];
                xs[(i + VW) / 16 - 1] = sum;
                part = (vi){0};
            }
        }
    }
}

/* ---- products ---------------------------------------------------------------------------------- */

static inline int qr_xs(const qr_type *t, const int32_t *xs, int s, int j) { /* the codes' sum of sub-block j */
    const int32_t *p = xs + (size_t)s * t->S / 16 + (size_t)j * t->G / 16;
    return t->G == 16 ? p[0] : p[0] + p[1];
}

#ifndef QR_PF_RECS
#define QR_PF_RECS 4 /* records ahead that a tile's first pass prefetches into L2 */
#endif

#ifdef QR_SIMD
/* The variant's vectors of QW int32 lanes (QW = VW), one lane a weight row, and its products:
 *   qi_dot(acc, u, x): acc + the sums of 4 byte products (u unsigned, x signed) per lane, where the
 *   caller guarantees that no pair of products overflows 16 bits when QR_DP is not defined. */
#define QW VW
#define QR_HALVES (QR_ROWS / QW)
#ifndef QR_RMAX
#define QR_RMAX 4 /* rows of activations a pass (at most 6) */
#endif

/* Each lane's 16-bit value in both 16-bit halves of the lane (a row's scale for vpmaddwd). */
static inline __attribute__((always_inline)) qi qr_pair16(qi v) { return qi_or(qi_and(v, qi_splat(0xFFFF)), qi_shl16(v)); }

static inline __attribute__((always_inline)) qi qr_bc(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return qi_splat(v);
}

/* Rows of half h of row block b (QW rows) against R rows of activations from t0: y (R, ldy). */
static inline __attribute__((always_inline)) void qr_tile(const int qt, const int R, const sc_mat *W, qr_act a, int K,
                                                         int t0, float *y, int ldy, int b, int h) {
    const qr_type t = QR_T[qt];
    const int nsb = K / t.S, nsub = t.S / t.G, rec = QR_REC(t);
    const uint8_t *r0 = (const uint8_t *)W->w + (size_t)b * nsb * rec;
    vf acc[6];
    SC_UNROLL for (int r = 0; r < R; r++) acc[r] = vsplat(0.f);
    for (int s = 0; s < nsb; s++) {
        const uint8_t *rr = r0 + (size_t)s * rec, *codes = rr + h * QW * 4, *scp = rr + QR_CODES(t) + h * QW;
        if (t0 == 0 && h == 0) pf_l2((const char *)rr + QR_PF_RECS * rec, rec); /* the stream ahead, once */
        const uint8_t *mnp = rr + QR_CODES(t) + QR_SCB(t) + h * QW;
        const uint16_t *d = (const uint16_t *)(rr + QR_CODES(t) + QR_SCB(t) + QR_MNB(t)) + h * QW, *dm = d + QR_ROWS;
        SC_OPAQUE(codes);
        qi isum[6], imin[6];
        SC_UNROLL for (int j = 0; j < nsub; j++) {
            const int8_t *xq[6];
            int xsj[6];
            SC_UNROLL for (int r = 0; r < R; r++) {
                xq[r] = a.qx + (size_t)(t0 + r) * K + (size_t)s * t.S + (size_t)j * t.G;
                xsj[r] = qr_xs(&t, a.xs + (size_t)(t0 + r) * (K / 16), s, j);
            }
            if (t.bits == 6) { /* Q6_K: sub-blocks j (the low nibbles' inputs) and j + 1 (the high ones') at once */
                if (j & 1) continue;
                const int g = j / 2;
                int xs1[6];
                SC_UNROLL for (int r = 0; r < R; r++) xs1[r] = qr_xs(&t, a.xs + (size_t)(t0 + r) * (K / 16), s, j + 1);
                qi sc0 = qi_s8(scp + j * QR_ROWS), sc1 = qi_s8(scp + (j + 1) * QR_ROWS), I[6];
#ifdef QR_DP
                qi A[6], B[6];
                SC_UNROLL for (int r = 0; r < R; r++) A[r] = qi_splat(-t.zero * xsj[r]), B[r] = qi_splat(-t.zero * xs1[r]);
#else
                qi s16a = qr_pair16(sc0), s16b = qr_pair16(sc1);
                qi PA[6], PB[6];
#endif
                SC_UNROLL for (int v = 0; v < 4; v++) {
                    qi raw = qi_load(codes + (size_t)(g * 4 + v) * 64), H = qi_load(codes + QR_HI2 + (size_t)(g * 2 + v / 2) * 64);
                    qi h0 = v & 1 ? H : qi_sll16(H, 4), h1 = v & 1 ? qi_srl16(H, 2) : qi_sll16(H, 2); /* bits 4-5 */
                    qi lo = qi_or(qi_lo4(raw), qi_and(h0, qi_bytes(0x30))), hi = qi_or(qi_hi4(raw), qi_and(h1, qi_bytes(0x30)));
                    SC_UNROLL for (int r = 0; r < R; r++) {
#ifdef QR_DP
                        A[r] = qi_dot(A[r], lo, qr_bc(xq[r] + 4 * v));
                        B[r] = qi_dot(B[r], hi, qr_bc(xq[r] + 16 + 4 * v));
#else /* codes 0..63: two chunks' pairs fit 16 bits */
                        qi pa = qi_pairs(lo, qr_bc(xq[r] + 4 * v)), pb = qi_pairs(hi, qr_bc(xq[r] + 16 + 4 * v));
                        if (v & 1) {
                            qi m = qi_add(qi_madd(qi_add16(PA[r], pa), s16a), qi_madd(qi_add16(PB[r], pb), s16b));
                            I[r] = v == 1 ? m : qi_add(I[r], m);
                        } else
                            PA[r] = pa, PB[r] = pb;
#endif
                    }
                }
                SC_UNROLL for (int r = 0; r < R; r++) {
#ifdef QR_DP
                    I[r] = qi_add(qi_mul(A[r], sc0), qi_mul(B[r], sc1));
#else
                    I[r] = qi_sub(I[r], qi_add(qi_mul(sc0, qi_splat(t.zero * xsj[r])), qi_mul(sc1, qi_splat(t.zero * xs1[r]))));
#endif
                    isum[r] = j ? qi_add(isum[r], I[r]) : I[r];
                }
                continue;
            }
            qi scv = t.sc == 1 ? qi_u8(scp + j * QR_ROWS) : t.sc == 2 ? qi_s8(scp + j * QR_ROWS) : qi_splat(1);
            qi I[6];
#ifdef QR_DP
            qi I2[6];
            SC_UNROLL for (int r = 0; r < R; r++) I[r] = qi_splat(-t.zero * xsj[r]), I2[r] = qi_splat(0);
            if (t.bits == 4) {
                SC_UNROLL for (int v = 0; v < 4; v++) {
                    qi raw = qi_load(codes + (size_t)(j * 4 + v) * 64), lo = qi_lo4(raw), hi = qi_hi4(raw);
                    SC_UNROLL for (int r = 0; r < R; r++) {
                        I[r] = qi_dot(I[r], lo, qr_bc(xq[r] + 4 * v));
                        if (R == 1) I2[r] = qi_dot(I2[r], hi, qr_bc(xq[r] + 16 + 4 * v)); /* two chains for one row */
                        else I[r] = qi_dot(I[r], hi, qr_bc(xq[r] + 16 + 4 * v));
                    }
                }
            } else {
                SC_UNROLL for (int c = 0; c < t.G / 4; c++) {
                    qi w = qi_load(codes + (size_t)(j * t.G / 4 + c) * 64);
                    SC_UNROLL for (int r = 0; r < R; r++) {
                        if ((c & 1) && R == 1) I2[r] = qi_dot(I2[r], w, qr_bc(xq[r] + 4 * c));
                        else I[r] = qi_dot(I[r], w, qr_bc(xq[r] + 4 * c));
                    }
                }
            }
            SC_UNROLL for (int r = 0; r < R; r++) {
                if (R == 1) I[r] = qi_add(I[r], I2[r]);
                if (t.sc) I[r] = qi_mul(I[r], scv);
            }
#else /* pairs of byte products in 16 bits (vpmaddubsw), summed in 16 bits while no sum can overflow,
       * then into 32 bits with the sub-block's scale (vpmaddwd) */
            qi sc16 = qr_pair16(scv);
            if (t.bits == 4) {
                qi P[6];
                SC_UNROLL for (int v = 0; v < 4; v++) {
                    qi raw = qi_load(codes + (size_t)(j * 4 + v) * 64), lo = qi_lo4(raw), hi = qi_hi4(raw);
                    SC_UNROLL for (int r = 0; r < R; r++) {
                        qi p = qi_add16(qi_pairs(lo, qr_bc(xq[r] + 4 * v)), qi_pairs(hi, qr_bc(xq[r] + 16 + 4 * v)));
                        P[r] = v ? qi_add16(P[r], p) : p; /* 16 products of at most 15 * 127 each */
                    }
                }
                SC_UNROLL for (int r = 0; r < R; r++) I[r] = qi_madd(P[r], sc16);
            } else { /* Q8_0: signed codes (q + 128 with its top bit flipped), the sign trick */
                SC_UNROLL for (int c = 0; c < t.G / 4; c++) {
                    qi w = qi_flip(qi_load(codes + (size_t)(j * t.G / 4 + c) * 64));
                    SC_UNROLL for (int r = 0; r < R; r++) {
                        qi p = qi_madd(qi_signed_pairs(w, qr_bc(xq[r] + 4 * c)), qi_splat(0x00010001));
                        I[r] = c ? qi_add(I[r], p) : p;
                    }
                }
            }
            if (t.zero && qt != QR_Q8_0)
                SC_UNROLL for (int r = 0; r < R; r++) I[r] = qi_sub(I[r], qi_mul(scv, qi_splat(t.zero * xsj[r])));
#endif
            SC_UNROLL for (int r = 0; r < R; r++) {
                isum[r] = j ? qi_add(isum[r], I[r]) : I[r];
                if (t.mn == 2) {
                    qi m = qi_mul(qi_u8(mnp + j * QR_ROWS), qi_splat(xsj[r]));
                    imin[r] = j ? qi_add(imin[r], m) : m;
                }
            }
        }
        vf dv = cvt_f16(d), dmv = t.mn ? cvt_f16(dm) : vsplat(0.f);
        SC_UNROLL for (int r = 0; r < R; r++) {
            float dx = a.dx[(size_t)(t0 + r) * (K / 32) + (size_t)s * t.S / 32];
            acc[r] = vfma(qi_float(isum[r]), dv * vsplat(dx), acc[r]);
            if (t.mn == 1) acc[r] = vfma(vsplat((float)qr_xs(&t, a.xs + (size_t)(t0 + r) * (K / 16), s, 0)), dmv * vsplat(dx), acc[r]);
            if (t.mn == 2) acc[r] = vfma(qi_float(imin[r]), dmv * vsplat(dx), acc[r]);
        }
    }
    const int n0 = b * QR_ROWS + h * QW;
    SC_UNROLL for (int r = 0; r < R; r++) {
        float o[QW];
        memcpy(o, &acc[r], sizeof o);
        float *yr = y + (size_t)(t0 + r) * ldy;
        for (int l = 0; l < QW && n0 + l < W->n; l++) yr[n0 + l] = W->bias ? o[l] + W->bias[n0 + l] : o[l];
    }
}
#else
#define QR_HALVES 1
#define QR_RMAX 1
/* One row of activations against the 16 rows of block b, lane by lane: the same arithmetic as the
 * vector variants (fp32 steps unfused here, as this variant's other products). */
static void qr_tile_scalar(const int qt, const sc_mat *W, qr_act a, int K, int t0, float *y, int ldy, int b) {
    const qr_type t = QR_T[qt];
    const int nsb = K / t.S, nsub = t.S / t.G, rec = QR_REC(t);
    float acc[QR_ROWS] = {0};
    const int8_t *xq = a.qx + (size_t)t0 * K;
    const int32_t *xs = a.xs + (size_t)t0 * (K / 16);
    for (int s = 0; s < nsb; s++) {
        const uint8_t *rr = (const uint8_t *)W->w + ((size_t)b * nsb + s) * rec, *scp = rr + QR_CODES(t);
        const uint8_t *mnp = scp + QR_SCB(t);
        const uint16_t *d = (const uint16_t *)(mnp + QR_MNB(t)), *dm = d + QR_ROWS;
        float dx = a.dx[(size_t)t0 * (K / 32) + (size_t)s * t.S / 32];
        for (int l = 0; l < QR_ROWS; l++) {
            int isum = 0, imin = 0;
            for (int j = 0; j < nsub; j++) {
                int dot = 0, xsj = qr_xs(&t, xs, s, j);
                for (int i = 0; i < t.G; i++) dot += qr_code(&t, rr, l, j * t.G + i) * xq[(size_t)s * t.S + j * t.G + i];
                dot -= t.zero * xsj;
                isum += (t.sc == 1 ? scp[j * QR_ROWS + l] : t.sc == 2 ? (int8_t)scp[j * QR_ROWS + l] : 1) * dot;
                if (t.mn == 2) imin += mnp[j * QR_ROWS + l] * xsj;
            }
            if (t.mn == 1) imin = qr_xs(&t, xs, s, 0);
            acc[l] = (float)isum * (half_to_float(d[l]) * dx) + acc[l];
            if (t.mn) acc[l] = (float)imin * (half_to_float(dm[l]) * dx) + acc[l];
        }
    }
    float *yr = y + (size_t)t0 * ldy;
    for (int l = 0; l < QR_ROWS && b * QR_ROWS + l < W->n; l++)
        yr[b * QR_ROWS + l] = W->bias ? acc[l] + W->bias[b * QR_ROWS + l] : acc[l];
}
#endif

#define QR_CASE(QT)                                                                                           \
    case QT:                                                                                                  \
        if (R == 1) qr_tile(QT, 1, W, a, K, t0, y, ldy, b, h);                                                \
        else if (R == 2) qr_tile(QT, 2, W, a, K, t0, y, ldy, b, h);                                           \
        else if (R == 3) qr_tile(QT, 3, W, a, K, t0, y, ldy, b, h);                                           \
        else if (R == 4 || QR_RMAX < 5) qr_tile(QT, 4, W, a, K, t0, y, ldy, b, h);                            \
        else if (R == 5 || QR_RMAX < 6) qr_tile(QT, 5, W, a, K, t0, y, ldy, b, h);                            \
        else qr_tile(QT, 6, W, a, K, t0, y, ldy, b, h);                                                       \
        break;

/* Inside a parallel region: y (M, W.n) (row stride ldy) = x @ W^T + b for a QR matrix, then its tail
 * (W->next: the matrix's further rows in another type, e.g. a fused q/k/v whose v is Q6_K) into the
 * columns after it. buf: shared scratch of qr_act_bytes(M, K). Quantizes x (a barrier), then blocks of
 * QR_ROWS weight rows (halves of them where a vector holds fewer lanes) split over the threads, each
 * against the rows of x in passes of at most QR_RMAX (M split evenly). */
static void par_matmul_qr(const sc_mat *W, const float *x, int M, float *y, int ldy, void *buf) {
    const int K = W->k;
    qr_act a = qr_act_at(buf, M, K);
    int quantized_S = 0;
    for (; W; y += W->n, W = W->next) {
        const int qt = W->group, S = QR_T[qt].S; /* a QR matrix's group field holds its type */
        if (S != quantized_S) par_quantize_qr(S, x, M, K, a);
        quantized_S = S;
        const int nb = (W->n + QR_ROWS - 1) / QR_ROWS;
        const int passes = (M + QR_RMAX - 1) / QR_RMAX, base = M / passes, extra = M % passes;
#pragma omp for schedule(static)
        for (int job = 0; job < nb * QR_HALVES; job++) {
            int b = job / QR_HALVES, h = job % QR_HALVES;
            (void)h;
            for (int p = 0, t0 = 0; p < passes; p++) {
                int R = base + (p < extra);
#ifdef QR_SIMD
                switch (qt) {
                QR_CASE(QR_Q4_0)
                QR_CASE(QR_Q4_1)
                QR_CASE(QR_Q8_0)
                QR_CASE(QR_Q4_K)
                default: QR_CASE(QR_Q6_K)
                }
#else
                qr_tile_scalar(qt, W, a, K, t0, y, ldy, b);
#endif
                t0 += R;
            }
        }
    }
}

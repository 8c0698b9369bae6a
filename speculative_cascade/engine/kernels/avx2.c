/* x86-64 with AVX2, FMA and F16C: 8 fp32 lanes, 16 vector registers. */
#include <immintrin.h>

#ifdef SC_VARIANT_NAME
#define SC_VARIANT SC_VARIANT_NAME
#else
#define SC_VARIANT "avx2"
#endif
#define VW 8
typedef float vf __attribute__((vector_size(32)));

static inline vf vfma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
static inline vf vload(const float *p) { return (vf)_mm256_loadu_ps(p); }
static inline vf vsplat(float x) { return (vf)_mm256_set1_ps(x); }
static inline vf cvt_i8(const signed char *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#define LD_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
static inline vf cvt_f16(const unsigned short *p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline float half_to_float(unsigned short h) { return _cvtsh_ss(h); }
static inline vf cvt_bf16(const unsigned short *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

#define SC_DOT4_I8
#include "x86_dot_i8.h"
#define dot4_i8(w, xa, xq) ((vi)dot4_i8_256((w), (xa), (xq)))

/* hsum's tree in registers: lanes i + 4, then i + 2, i + 1 (the generic one goes through memory;
 * level with it on a Zen 4 EPYC, where AVX-512's gained 10-14%). */
#define SC_HSUM
static inline float hsum(vf v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/* hsum of eight vectors at once, with hsum's adds (lanes i + i+4, then i + i+2, then 0 + 1): the
 * 128-bit halves of pairs, then in-lane shuffles; lane order out of the last add: a0 a2 a4 a6 a1 a3 a5 a7. */
#define SC_HSUM8
static inline void hsum8(const vf *a, float *out) {
    __m256 s[4], u[2];
    for (int i = 0; i < 4; i++) {
        __m256 x = (__m256)a[2 * i], y = (__m256)a[2 * i + 1];
        s[i] = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    }
    for (int i = 0; i < 2; i++)
        u[i] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 v = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    float t[8];
    _mm256_storeu_ps(t, v);
    for (int m = 0; m < 4; m++) {
        out[2 * m] = t[m];
        out[2 * m + 1] = t[4 + m];
    }
}

/* 16 registers: R x RB accumulators + R x vectors + the weight vector and its scale, min and mask. */
#define RMAX 4
#define RB_FOR(R) ((R) <= 1 ? 8 : (R) == 2 ? 4 : 2)
/* Dense formats need no registers to dequantize: 3 rows x 4 weight rows (measured: a 9-row fp32
 * product ~30% faster than with 2 weight rows); 2 rows x 8, though 16 accumulators spill (the fp32
 * target's 2-row products ~9% faster than with 4); 4 rows x 4 (with 2, the 9-row products, which
 * run 3 x 4, came out ~15% slower: the compiler's code for the whole function changes with it). */
/* int8 (each group's scale factored out): R x RB accumulators + R group sums; 2 weight rows
 * beyond one row of x (measured on a 9-row product of a 49152 x 576 head: 8.1 ms against 10.6 with 4). */
#define RB_I8(R) ((R) <= 1 ? 8 : 2)
#define RB_DENSE(R) ((R) <= 2 ? 8 : 4)
/* 4-bit: a whole interleaved block of eight rows for any R, though R x 8 accumulators spill beyond
 * R = 1 (measured, the embedded target's 4-bit layers: 2-, 3- and 4-row products 19%, 21% and 15%
 * faster than with RB_FOR's 4, 2 and 2 weight rows). */
#define RB_Q4(R) 8
/* Beyond four rows of x, the 4-bit tile pass by pass: the embedded target's whole forwards over 5,
 * 8 and 64 tokens (stored format, medians, the two builds alternating) took 25.2, 37.9 and 300 ms
 * against 30.9, 48.7 and 326 with each block dequantized once into fp32 for every pass (9-17
 * tokens: level). */
#define Q4_DEQUANT_ONCE 0

/* One row of x against dense weights: the weight rows one at a time, one stream (par_row1_dense;
 * measured with this variant on a Zen 4 EPYC, the builds alternating: the fp32 target's one-token
 * forwards 15-19% faster in the VM's fast bandwidth state, its forwards over 2-9 tokens level). */
#define DENSE_ROW1 1

/* QR (sc_qr.h): 8 weight rows a vector; vpmaddubsw pairs, or vpdpbusd where AVX-VNNI is compiled in. */
#define QR_SIMD
typedef __m256i qi;
#define qi_splat(v) _mm256_set1_epi32(v)
#define qi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define qi_lo4(v) _mm256_and_si256((v), _mm256_set1_epi8(15))
#define qi_hi4(v) _mm256_and_si256(_mm256_srli_epi16((v), 4), _mm256_set1_epi8(15))
#define qi_add(a, b) _mm256_add_epi32((a), (b))
#define qi_sub(a, b) _mm256_sub_epi32((a), (b))
#define qi_mul(a, b) _mm256_mullo_epi32((a), (b))
#define qi_and(a, b) _mm256_and_si256((a), (b))
#define qi_sll16(v, n) _mm256_slli_epi16((v), (n))
#define qi_srl16(v, n) _mm256_srli_epi16((v), (n))
#define qi_bytes(c) _mm256_set1_epi8((char)(c))
#define qi_or(a, b) _mm256_or_si256((a), (b))
#define qi_shl16(v) _mm256_slli_epi32((v), 16)
#define qi_u8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define qi_s8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define qi_pairs(u, x) _mm256_maddubs_epi16((u), (x))
#define qi_add16(a, b) _mm256_add_epi16((a), (b))
#define qi_madd(a, b) _mm256_madd_epi16((a), (b))
#define qi_flip(v) _mm256_xor_si256((v), _mm256_set1_epi8((char)0x80))
#define qi_signed_pairs(w, x) _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8((w), (x)))
#define qi_float(v) ((vf)_mm256_cvtepi32_ps(v))
#ifdef __AVXVNNI__
#define QR_DP
#define qi_dot(acc, u, x) _mm256_dpbusd_avx_epi32((acc), (u), (x))
#endif

#include "sc_kernels.h"

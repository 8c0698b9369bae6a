/* x86-64 with AVX-512 (F, BW, VL, DQ) and FMA: 16 fp32 lanes, 32 vector registers. */
#include <immintrin.h>

#ifdef SC_VARIANT_NAME
#define SC_VARIANT SC_VARIANT_NAME
#else
#define SC_VARIANT "avx512"
#endif
#define VW 16
typedef float vf __attribute__((vector_size(64)));

static inline vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static inline vf vload(const float *p) { return (vf)_mm512_loadu_ps(p); }
static inline vf vsplat(float x) { return (vf)_mm512_set1_ps(x); }
static inline vf cvt_i8(const signed char *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf cvt_f16(const unsigned short *p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline float half_to_float(unsigned short h) { return _cvtsh_ss(h); }
static inline vf cvt_bf16(const unsigned short *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

/* hsum's tree in registers: lanes i + 8, then i + 4, i + 2, i + 1 (measured on an AMD EPYC Zen 4,
 * against the generic one through memory: the stored-format target's forwards over 1 to 9
 * tokens 10-14% faster, fp32 ones 3-16%, the same logits bit for bit). */
#define SC_HSUM
static inline float hsum(vf v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256((__m512)v), _mm512_extractf32x8_ps((__m512)v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/* 16 nibbles as indices into the group's 16 dequantized values: vpermps reads the low 4 bits of
 * each index, so the low nibbles need no mask. */
#define SC_LUT16
#define IOTA16 ((vf){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
static inline vf lut_u4(const unsigned char *p, int hi, vf lut) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    if (hi) b = _mm512_srli_epi32(b, 4);
    return (vf)_mm512_permutexvar_ps(b, (__m512)lut);
}

/* I8Q8: AVX2's sequence on each half (lanes 0-7 from bytes 0-31). */
#define SC_DOT4_I8
#include "x86_dot_i8.h"
#define dot4_i8(w, xa, xq)                                                                                 \
    ((vi)_mm512_inserti64x4(_mm512_castsi256_si512(dot4_i8_256((w), (xa), (xq))),                          \
                            dot4_i8_256((w) + 32, (xa) + 32, (xq) + 32), 1))

/* R rows x RB weight rows accumulators, plus R x vectors and a weight vector, within 32 registers. */
#define RMAX 6
#define RB_FOR(R) ((R) <= 2 ? 8 : 4)
/* 4-bit: at most 4 rows of x a pass, the 4-bit tile pass by pass (measured on an AMD EPYC Zen 4, the
 * embedded target's whole stored-format forwards over 3, 7, 9, 13 and 17 tokens, medians of 11, the
 * builds alternating: 8.8, 18.4, 24.4, 32.9 and 41.6 ms against 9.2, 28.0, 30.5, 39.0 and 47.8 with
 * 6 rows a pass and each block dequantized once into fp32 for every pass; 5 tokens 15.1 against
 * 14.2). The fp32 target keeps 6 rows a pass (4: its 9- and 13-token forwards 8% and 19% slower). */
#define RMAX_Q4 4
#define Q4_DEQUANT_ONCE 0

/* One row of x against dense weights: the weight rows one at a time, one stream (par_row1_dense;
 * measured with this variant on a Zen 4 EPYC, the builds alternating: the fp32 target's one-token
 * forwards 15-19% faster in the VM's fast bandwidth state, its forwards over 2-9 tokens level). */
#define DENSE_ROW1 1

/* QR (sc_qr.h): 16 weight rows a vector; vpdpbusd where AVX-512 VNNI is compiled in (avx512vnni.c),
 * else vpmaddubsw pairs. */
#define QR_SIMD
typedef __m512i qi;
#define qi_splat(v) _mm512_set1_epi32(v)
#define qi_load(p) _mm512_loadu_si512((const void *)(p))
#define qi_lo4(v) _mm512_and_si512((v), _mm512_set1_epi8(15))
#define qi_hi4(v) _mm512_and_si512(_mm512_srli_epi16((v), 4), _mm512_set1_epi8(15))
#define qi_add(a, b) _mm512_add_epi32((a), (b))
#define qi_sub(a, b) _mm512_sub_epi32((a), (b))
#define qi_mul(a, b) _mm512_mullo_epi32((a), (b))
#define qi_and(a, b) _mm512_and_si512((a), (b))
#define qi_sll16(v, n) _mm512_slli_epi16((v), (n))
#define qi_srl16(v, n) _mm512_srli_epi16((v), (n))
#define qi_bytes(c) _mm512_set1_epi8((char)(c))
#define qi_or(a, b) _mm512_or_si512((a), (b))
#define qi_shl16(v) _mm512_slli_epi32((v), 16)
#define qi_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define qi_s8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define qi_pairs(u, x) _mm512_maddubs_epi16((u), (x))
#define qi_add16(a, b) _mm512_add_epi16((a), (b))
#define qi_madd(a, b) _mm512_madd_epi16((a), (b))
#define qi_flip(v) _mm512_xor_si512((v), _mm512_set1_epi8((char)0x80))
/* no 512-bit vpsignb: w negated where x is negative, under x's sign mask */
#define qi_signed_pairs(w, x)                                                                                  \
    _mm512_maddubs_epi16(_mm512_abs_epi8(x), _mm512_mask_sub_epi8((w), _mm512_movepi8_mask(x), _mm512_setzero_si512(), (w)))
#define qi_float(v) ((vf)_mm512_cvtepi32_ps(v))
#ifdef __AVX512VNNI__
#define QR_DP
#define qi_dot(acc, u, x) _mm512_dpbusd_epi32((acc), (u), (x))
#endif

#include "sc_kernels.h"

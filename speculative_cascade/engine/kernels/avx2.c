/* x86-64 with AVX2, FMA and F16C: 8 fp32 lanes, 16 vector registers. */
#include <immintrin.h>

#define SC_VARIANT "avx2"
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

/* 16 registers: R x RB accumulators + R x vectors + the weight vector and its scale, min and mask. */
#define RMAX 4
#define RB_FOR(R) ((R) <= 1 ? 8 : (R) == 2 ? 4 : 2)
/* Dense formats need no registers to dequantize: 3 rows x 4 weight rows (measured: a 9-row fp32
 * product ~30% faster than with 2 weight rows; for 4-bit and int8 2 stays faster). */
#define RB_DENSE(R) ((R) <= 1 ? 8 : (R) <= 3 ? 4 : 2)

#include "sc_kernels.h"

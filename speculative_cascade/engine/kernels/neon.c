/* aarch64 (NEON is part of the base ISA): 4 fp32 lanes, 32 vector registers, fused multiply-add.
 * Built only on aarch64 (kernels.VARIANTS); compiled for another architecture it is empty. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <string.h>

#define SC_VARIANT "neon"
#define VW 4
typedef float vf __attribute__((vector_size(16)));

static inline vf vfma(vf a, vf b, vf c) { return (vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b); }
#include "scalar_convert.h"

/* I8Q8: 16 weights times 16 activation codes, widened products summed in pairs, then pairs of pairs. */
#define SC_DOT4_I8
static inline int32x4_t dot4_i8_neon(const int8_t *w, const int8_t *xq) {
    int8x16_t a = vld1q_s8(w), b = vld1q_s8(xq);
    int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpaddq_s32(lo, vpaddlq_s16(vmull_high_s8(a, b)));
}
#define dot4_i8(w, xa, xq) ((vi)dot4_i8_neon((w), (xq)))

#define RMAX 6
#define RB_FOR(R) ((R) <= 2 ? 8 : 4)

#include "sc_kernels.h"
#endif

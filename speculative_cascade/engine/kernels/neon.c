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

#define RMAX 6
#define RB_FOR(R) ((R) <= 2 ? 8 : 4)

#include "sc_kernels.h"
#endif

/* Any CPU: 4 fp32 lanes in GCC's portable vectors (SSE2 on x86-64, NEON on aarch64), no FMA
 * (compiled with -ffp-contract=off, so a * b + c rounds twice, the same way in every pass). */
#include <string.h>

#define SC_VARIANT "generic"
#define VW 4
typedef float vf __attribute__((vector_size(16)));

static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
/* Dequantization with one rounding, as the FMA variants: q * d is exact in double, and so is the
 * sum for the scales and mins GGUF blocks hold; the only rounding is the conversion to float. */
typedef double vd __attribute__((vector_size(VW * 8)));
static inline vf generic_deq(vf q, vf d, vf m) {
    return __builtin_convertvector(__builtin_convertvector(q, vd) * __builtin_convertvector(d, vd) +
                                   __builtin_convertvector(m, vd), vf);
}
#define vdeq generic_deq
#include "scalar_convert.h"

#define RMAX 4
#define RB_FOR(R) ((R) <= 1 ? 8 : (R) == 2 ? 4 : 2)
/* 4-bit: the whole block of eight rows for any R (measured on x86-64, products of the 4-bit
 * layers: 2, 3 and 4 rows 17%, 30% and 30% faster than with RB_FOR's 4, 2 and 2 weight rows). */
#define RB_Q4(R) 8

#include "sc_kernels.h"

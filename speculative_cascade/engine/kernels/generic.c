/* Any CPU: 4 fp32 lanes in GCC's portable vectors (SSE2 on x86-64, NEON on aarch64), no FMA
 * (compiled with -ffp-contract=off, so a * b + c rounds twice everywhere, in every pass). */
#include <string.h>

#define SC_VARIANT "generic"
#define VW 4
typedef float vf __attribute__((vector_size(16)));

static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
#include "scalar_convert.h"

#define RMAX 4
#define RB_FOR(R) ((R) <= 1 ? 8 : (R) == 2 ? 4 : (R) == 3 ? 3 : 2)

#include "sc_kernels.h"

/* x86-64 with AVX-512 (F, BW, VL, DQ) and VNNI: avx512.c, its QR products on vpdpbusd. */
#define SC_VARIANT_NAME "avx512vnni"
#include "avx512.c"

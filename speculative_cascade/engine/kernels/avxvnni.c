/* x86-64 with AVX2 and AVX-VNNI (256-bit vpdpbusd without AVX-512): avx2.c, its QR products on vpdpbusd. */
#define SC_VARIANT_NAME "avxvnni"
#include "avx2.c"

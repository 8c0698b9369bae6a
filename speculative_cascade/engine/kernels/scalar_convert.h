/* Conversions for the variants without dedicated intrinsics: GCC's portable vectors
 * (__builtin_convertvector), and fp16 lane by lane. */
typedef signed char vi8 __attribute__((vector_size(VW)));
static inline float half_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal half: normalize */
        exp = 113;
        while (!(man & 1024)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline vf cvt_i8(const signed char *p) {
    vi8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vf);
}
static inline vf cvt_f16(const unsigned short *p) { vf v; for (int i = 0; i < VW; i++) v[i] = half_to_float(p[i]); return v; }
static inline vf cvt_bf16(const unsigned short *p) {
    vf v;
    for (int i = 0; i < VW; i++) {
        unsigned int bits = (unsigned int)p[i] << 16;
        memcpy(&v[i], &bits, 4);
    }
    return v;
}
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vsplat(float x) { vf v; for (int i = 0; i < VW; i++) v[i] = x; return v; }

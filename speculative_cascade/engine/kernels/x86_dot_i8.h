/* I8Q8 on x86-64 (AVX2, and twice for AVX-512, which has no 512-bit vpsignb): 32 int8 weights
 * times 32 activation codes, lane l the sum of the products of bytes 4l..4l+3: w with x's signs
 * (vpsignb) times |x| (vpmaddubsw: pairs of products, at most 2 * 127 * 127, no saturation),
 * then pairs of pairs (vpmaddwd). */
static inline __m256i dot4_i8_256(const signed char *w, const unsigned char *xa, const signed char *xq) {
    __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), _mm256_loadu_si256((const __m256i *)xq));
    __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)xa), sw);
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

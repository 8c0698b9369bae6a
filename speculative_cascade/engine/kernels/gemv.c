/* y (M, N) = x (M, K) @ w (N, K)^T [+ b (N)] in fp32, for few rows M (decoding, verification).
 *
 * Memory-bound: each weight row is read from DRAM once and reused for all M input
 * rows while it sits in L1, so a forward over M <= ~16 tokens costs about as much as
 * over one. Rows of w are split over the OpenMP threads (the runtime PyTorch already
 * loaded, so no second thread pool competes with it).
 */
#include <stddef.h>

static void rows4(const float *x, const float *w, const float *b, float *y,
                  int M, int N, int K, int n0) {
    const float *w0 = w + (size_t)n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+:a0, a1, a2, a3)
        for (int k = 0; k < K; k++) {
            float xv = xm[k];
            a0 += xv * w0[k];
            a1 += xv * w1[k];
            a2 += xv * w2[k];
            a3 += xv * w3[k];
        }
        float *ym = y + (size_t)m * N + n0;
        ym[0] = a0 + (b ? b[n0] : 0.f);
        ym[1] = a1 + (b ? b[n0 + 1] : 0.f);
        ym[2] = a2 + (b ? b[n0 + 2] : 0.f);
        ym[3] = a3 + (b ? b[n0 + 3] : 0.f);
    }
}

static void row1(const float *x, const float *w, const float *b, float *y,
                 int M, int N, int K, int n) {
    const float *wn = w + (size_t)n * K;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float a = 0.f;
#pragma omp simd reduction(+:a)
        for (int k = 0; k < K; k++) a += xm[k] * wn[k];
        y[(size_t)m * N + n] = a + (b ? b[n] : 0.f);
    }
}

void sc_linear_f32(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
    int n4 = N & ~3;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < n4; n0 += 4) rows4(x, w, b, y, M, N, K, n0);
    for (int n = n4; n < N; n++) row1(x, w, b, y, M, N, K, n);
}

/* The same product with INT8 weights and per-output-channel scales:
 * y[m, n] = s[n] * sum_k x[m, k] * w8[n, k] (+ b[n]). Exact weight-only INT8 (no
 * activation quantization); reads a quarter of the fp32 bytes. */
static void rows4_i8(const float *x, const signed char *w, const float *s, const float *b,
                     float *y, int M, int N, int K, int n0) {
    /* Widen the 4 int8 rows to fp32 once (9-24 KB, stays in L1), then reuse the fp32
     * dot products for every input row; the scale is applied to the sums. */
    float buf[4 * K];
    const signed char *w0 = w + (size_t)n0 * K;
#pragma omp simd
    for (int i = 0; i < 4 * K; i++) buf[i] = (float)w0[i];
    float sb[4];
    for (int j = 0; j < 4; j++) sb[j] = 0.f;
    rows4(x, buf - (size_t)n0 * K, NULL, y, M, N, K, n0);
    for (int m = 0; m < M; m++) {
        float *ym = y + (size_t)m * N + n0;
        for (int j = 0; j < 4; j++) ym[j] = ym[j] * s[n0 + j] + (b ? b[n0 + j] : sb[j]);
    }
}

void sc_linear_i8(const float *x, const signed char *w, const float *s, const float *b, float *y,
                  int M, int N, int K) {
    int n4 = N & ~3;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < n4; n0 += 4) rows4_i8(x, w, s, b, y, M, N, K, n0);
    for (int n = n4; n < N; n++) {
        const signed char *wn = w + (size_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            float a = 0.f;
            for (int k = 0; k < K; k++) a += xm[k] * (float)wn[k];
            y[(size_t)m * N + n] = a * s[n] + (b ? b[n] : 0.f);
        }
    }
}

/* A plain fp32 linear for the fp32 fused decode step, standing in until the GGUF-block fp32 linear (branch
 * qkernels) is merged: only type F32 (0), the weight's rows read in place, 4 rows of W per pass so each x vector
 * loaded serves four dot products. Not measured beyond the step it serves. */
#include "kernels.h"

#define F32_TYPE 0
#define LANES 16
#define ROWS_PER_PASS 4
#define CHUNK_ROWS 64  /* rows of W per OpenMP chunk */

INLINE vf loadv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE float hsum16(vf v) {
    float s = 0.f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

int linear_f32(const float *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const float *bias,
               float *y, int num_threads) {
    if (type != F32_TYPE) return 1;
    const float *W = (const float *)w;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n0 = 0; n0 < N; n0 += CHUNK_ROWS) {
        const int64_t n1 = n0 + CHUNK_ROWS < N ? n0 + CHUNK_ROWS : N;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            int64_t n = n0;
            for (; n + ROWS_PER_PASS <= n1; n += ROWS_PER_PASS) {
                vf acc[ROWS_PER_PASS] = {{0}};
                int64_t k = 0;
                for (; k + LANES <= K; k += LANES) {
                    const vf xv = loadv(xm + k);
                    for (int r = 0; r < ROWS_PER_PASS; r++) acc[r] += xv * loadv(W + (n + r) * K + k);
                }
                for (int r = 0; r < ROWS_PER_PASS; r++) {
                    float s = hsum16(acc[r]);
                    for (int64_t j = k; j < K; j++) s += xm[j] * W[(n + r) * K + j];
                    y[m * N + n + r] = s + (bias ? bias[n + r] : 0.f);
                }
            }
            for (; n < n1; n++) {
                float s = 0.f;
                for (int64_t j = 0; j < K; j++) s += xm[j] * W[n * K + j];
                y[m * N + n] = s + (bias ? bias[n] : 0.f);
            }
        }
    }
    return 0;
}

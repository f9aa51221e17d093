/* fp32 activation rows quantized to int8 blocks, for quant_linear.c's integer dot products with GGUF weights.
 *
 * A weight block times an activation block is then one integer dot product (vpmaddubsw / vpmaddwd on AVX2) and
 * one fp32 multiply by the two scales, instead of 32 fp32 FMAs on weights widened from 4 or 8 bits. Per block
 * of x (32 values, or a K-quant's 256): d = max |x| / 127, q = round(x / d) in [-127, 127]: each value off by at
 * most d / 2, so a row's dot product with a weight block is off by at most max |x_block| / 254 * sum |w_block|
 * (tests/test_quant_kernels.py asserts that bound). A row of K = 1536 takes ~1 us: the weights' read dwarfs it. */
#include "kernels.h"

#define Q8_MAX 127.f  /* symmetric int8: -127 .. 127, so that negating a q (Q8_0's sign trick) never overflows */

/* n values (a multiple of 32) -> d and q with |q| <= 127; returns d. q rounded to nearest (ties to even) */
static inline float quantize_span(const float *x, int64_t n, int8_t *q) {
#if HAVE_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float max = _mm_cvtss_f32(m4), d = max / Q8_MAX, id = max > 0 ? Q8_MAX / max : 0.f;
    const __m256 scale = _mm256_set1_ps(id);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes the packs' lane interleave */
    for (int64_t i = 0; i < n; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; j++)
            v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), scale));  /* nearest even */
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(w, order));
    }
    return d;
#else
    float max = 0.f;
    for (int64_t i = 0; i < n; i++) max = fmaxf(max, fabsf(x[i]));
    const float d = max / Q8_MAX, id = max > 0 ? Q8_MAX / max : 0.f;
    for (int64_t i = 0; i < n; i++) q[i] = (int8_t)lrintf(x[i] * id);  /* |x id| <= 127 (rounded: <= 127.00001) */
    return d;
#endif
}

static inline int32_t sum_q(const int8_t *q, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += q[i];
    return s;
}

/* One row of K values (a multiple of 32) -> K / 32 blocks */
void quantize_blocks(const float *x, int64_t K, QBlock *out) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        QBlock *o = out + b;
        o->d = quantize_span(x + b * BLOCK, BLOCK, o->q);
        o->s = o->d * (float)sum_q(o->q, BLOCK);
    }
}

/* One row of K values (a multiple of 256) -> K / 256 super-blocks, with the sums of their 16-value groups */
void quantize_super_blocks(const float *x, int64_t K, QSuperBlock *out) {
    for (int64_t b = 0; b < K / SUPER_BLOCK; b++) {
        QSuperBlock *o = out + b;
        o->d = quantize_span(x + b * SUPER_BLOCK, SUPER_BLOCK, o->q);
        for (int g = 0; g < SUPER_BLOCK / 16; g++) o->sums[g] = (int16_t)sum_q(o->q + 16 * g, 16);
    }
}

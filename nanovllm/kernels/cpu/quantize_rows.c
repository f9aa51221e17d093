/* fp32 activation rows quantized to int8 blocks, for quant_linear.c's integer dot products with GGUF weights.
 *
 * A weight block times an activation block is then an integer dot product (vpmaddubsw / vpmaddwd on AVX2) and
 * one fp32 multiply by the two scales, instead of 32 fp32 FMAs on weights widened from 4 or 8 bits. Per block
 * of x (32 values, or a K-quant's 256): d = max |x| / 127, q = round(x / d) in [-127, 127], each value off by at
 * most d / 2. One plane (llama.cpp's way) leaves a row's dot product with a weight block off by up to
 * max |x_block| / 254 * sum |w_block|, and that flipped the embedded model's greedy choice at 3.9% of positions
 * (benchmarks/quant_agreement.py). So by default a second plane holds what the first left,
 * lo = round((x / d - q) LOW_SCALE): each value off by at most d / LOW_SCALE, 128x less (top-1 99.95%).
 * tests/kernels/test_quant_kernels.py asserts both bounds. A row of K = 1536 takes ~1-2 us: the weights' read
 * dwarfs it. */
#include "kernels.h"

#define Q8_MAX 127.f  /* symmetric int8: -127 .. 127, so that negating a q (Q8_0's sign trick) never overflows */

/* n values (a multiple of 32) -> d and q with |q| <= 127, and where lo is given the low plane lo with
 * |lo| <= 127 (a residue of 128 LOW_SCALE-ths, half a step of q, saturates); returns d. Rounded to nearest (ties
 * to even) */
static inline float quantize_span(const float *x, int64_t n, int8_t *q, int8_t *lo) {
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
        __m256i v[4], l[4];
        for (int j = 0; j < 4; j++) {
            const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), scale);
            v[j] = _mm256_cvtps_epi32(scaled);  /* nearest even */
            const __m256 residue = _mm256_sub_ps(scaled, _mm256_cvtepi32_ps(v[j]));  /* in [-1/2, 1/2], exact */
            l[j] = _mm256_cvtps_epi32(_mm256_mul_ps(residue, _mm256_set1_ps(LOW_SCALE)));
        }
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(w, order));
        if (lo) {  /* the packs saturate a residue of 128 to 127; -128 is held to -127 (Q8_0 negates it) */
            __m256i wl = _mm256_packs_epi16(_mm256_packs_epi32(l[0], l[1]), _mm256_packs_epi32(l[2], l[3]));
            wl = _mm256_max_epi8(wl, _mm256_set1_epi8(-127));
            _mm256_storeu_si256((__m256i *)(lo + i), _mm256_permutevar8x32_epi32(wl, order));
        }
    }
    return d;
#else
    float max = 0.f;
    for (int64_t i = 0; i < n; i++) max = fmaxf(max, fabsf(x[i]));
    const float d = max / Q8_MAX, id = max > 0 ? Q8_MAX / max : 0.f;
    for (int64_t i = 0; i < n; i++) {
        const float scaled = x[i] * id;  /* |x id| <= 127 (rounded: <= 127.00001) */
        q[i] = (int8_t)lrintf(scaled);
        if (lo) lo[i] = (int8_t)fminf(127.f, fmaxf(-127.f, rintf((scaled - (float)q[i]) * LOW_SCALE)));
    }
    return d;
#endif
}

static inline int32_t sum_q(const int8_t *q, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += q[i];
    return s;
}

/* The sum of n quantized values: d (sum q + sum lo / LOW_SCALE) */
static inline float sum_x(float d, const int8_t *q, const int8_t *lo, int n, int planes) {
    const int32_t low = planes == 2 ? sum_q(lo, n) : 0;
    return d * ((float)sum_q(q, n) + (float)low / LOW_SCALE);
}

/* One row of K values (a multiple of 32) -> K / 32 blocks, in `planes` (1 or 2) int8 planes */
void quantize_blocks(const float *x, int64_t K, QBlock *out, int planes) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        QBlock *o = out + b;
        o->d = quantize_span(x + b * BLOCK, BLOCK, o->q, planes == 2 ? o->lo : NULL);
        o->s = sum_x(o->d, o->q, o->lo, BLOCK, planes);
    }
}

/* One row of K values (a multiple of 256) -> K / 256 super-blocks, with the sums of their 16-value groups */
void quantize_super_blocks(const float *x, int64_t K, QSuperBlock *out, int planes) {
    for (int64_t b = 0; b < K / SUPER_BLOCK; b++) {
        QSuperBlock *o = out + b;
        o->d = quantize_span(x + b * SUPER_BLOCK, SUPER_BLOCK, o->q, planes == 2 ? o->lo : NULL);
        for (int g = 0; g < SUPER_BLOCK / 16; g++) o->sums[g] = sum_x(o->d, o->q + 16 * g, o->lo + 16 * g, 16, planes);
    }
}

/* The dot products of quant_linear.c, for that file alone: a weight row's blocks times R rows of x's quantized
 * blocks (in P planes), for every GGUF type it reads, on AVX2 and in plain C. A header, not a .c file, so that
 * each (type, R, P) inlines into its own loop in quant_linear.c (DOTS there): as calls into another file they
 * would not. What they measured is said in quant_linear.c. */
#ifndef NANOVLLM_QUANT_DOTS_H
#define NANOVLLM_QUANT_DOTS_H
#include "kernels.h"

#define X_ROWS 4  /* rows of x dotted with a weight row at once: its blocks decoded once for them */

#if HAVE_AVX2
/* 16 bytes of nibbles -> 32 bytes: the low nibbles (elements 0-15), then the high ones (16-31). The bytes
 * loaded into both halves, the upper half shifted by 4: three instructions */
INLINE __m256i nibbles32(const uint8_t *qs) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
}

/* Q5_0 / Q5_1's 32 fifth bits -> byte i = 16 where bit i is set */
INLINE __m256i fifth_bits(uint32_t h) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                            3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)h), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

/* 32 unsigned bytes times 32 signed ones -> 8 int32 sums of 4 products, times `scale` (no saturation: |u| <= 63
 * here, or 128 for Q8_0's |w|: 2 * 128 * 127 < 2^15) */
INLINE __m256i dot_u8_s8(__m256i u, __m256i s, short scale) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(scale));
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

INLINE int32_t hsum_i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

INLINE __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
#else
/* Element i of a 32-block's 16 bytes of nibbles: i < 16 the low nibble of byte i, else the high one of byte
 * i - 16 */
static inline int nibble(const uint8_t *qs, int i) { return i < 16 ? qs[i] & 15 : qs[i - 16] >> 4; }

/* A 32-block's weights as signed integers w = q - offset (Q4_0: q - 8, Q5_0: q - 16), so that the block's
 * weights are d w (+ m for Q4_1 / Q5_1) */
INLINE void block_ints(const uint8_t *blk, const int type, int w[BLOCK]) {
    const uint8_t *qs = blk + (type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8);
    const uint32_t h = type == Q5_0 ? read_u32(blk + 2) : type == Q5_1 ? read_u32(blk + 4) : 0;
    for (int i = 0; i < BLOCK; i++) {
        if (type == Q8_0) w[i] = (int8_t)blk[2 + i];
        else w[i] = (nibble(qs, i) | (int)((h >> i & 1) << 4)) - (type == Q4_0 ? 8 : type == Q5_0 ? 16 : 0);
    }
}
#endif

#if HAVE_AVX2
/* One weight block (block b of the row) times block b of R rows of x, into acc[r] (the integer dot times both
 * scales; with P = 2 planes the dot is q LOW_SCALE + lo: acc is LOW_SCALE times too large) and lane 1 of
 * extra[r] (the weight block's minimum, or d for an offset, times the activation block's sum; lane 0 gathers
 * what is not used). The scales go in pairs: (d, m) or (d, d) times (d_x, s_x) in one multiply; per block the
 * loop is ~15 instructions (4 more a row for the second plane), and their count is what M = 1 costs (not the
 * memory) */
INLINE void block_step(const uint8_t *blk, const char *x, int64_t x_stride, int64_t b, const int type, const int R,
                       const int P, __m256 *acc, __m128 *extra) {
    const int has_min = type == Q4_1 || type == Q5_1;
    __m128 dm;  /* lanes 0, 1: d and m (or d again) */
    if (has_min) dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)read_u32(blk)));
    else dm = _mm_cvtph_ps(_mm_set1_epi16((short)(blk[0] | blk[1] << 8)));
    __m256i q, sign = _mm256_setzero_si256();
    if (type == Q4_0) q = nibbles32(blk + 2);
    else if (type == Q4_1) q = nibbles32(blk + 4);
    else if (type == Q5_0) q = _mm256_or_si256(nibbles32(blk + 6), fifth_bits(read_u32(blk + 2)));
    else if (type == Q5_1) q = _mm256_or_si256(nibbles32(blk + 8), fifth_bits(read_u32(blk + 4)));
    else {  /* Q8_0: signed times signed as |w| times x with w's sign */
        sign = load256(blk + 2);
        q = _mm256_sign_epi8(sign, sign);
    }
    for (int r = 0; r < R; r++) {
        const QBlock *xb = (const QBlock *)(x + r * x_stride) + b;
        __m256i xq = load256(xb->q);
        if (type == Q8_0) xq = _mm256_sign_epi8(xq, sign);
        __m256i dot = dot_u8_s8(q, xq, P == 2 ? LOW_SCALE : 1);
        if (P == 2) {
            __m256i xl = load256(xb->lo);
            if (type == Q8_0) xl = _mm256_sign_epi8(xl, sign);
            dot = _mm256_add_epi32(dot, dot_u8_s8(q, xl, 1));  /* |sum| < 32 128 127 LOW_SCALE: int32 */
        }
        const __m128 scales = _mm_mul_ps(dm, _mm_castpd_ps(_mm_load_sd((const double *)&xb->d)));  /* d dx, m sx */
        acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(dot), acc[r]);
        if (type != Q8_0) extra[r] = _mm_add_ps(extra[r], scales);
    }
}
#endif

/* out[r] = (weight row w) . (quantized x row r), r < R, for the 32-blocks (Q4_0 .. Q8_0); x's rows
 * x_stride bytes apart, in P planes. R, P and type are constants where this is inlined: each its own loop. */
INLINE void dot_blocks(const uint8_t *w, const char *x, int64_t x_stride, int64_t nb, float *out, const int type,
                       const int R, const int P) {
    const float unit = P == 2 ? 1.f / LOW_SCALE : 1.f;  /* what the integer dots are counted in */
    const int bytes = block_bytes(type);
#if HAVE_AVX2
    /* one row of x: two sums, even and odd blocks, so that one block's FMAs need not wait for the last's
     * (their latency bounded M = 1: 1.3x faster); R rows: R sums already */
    enum { SUMS = 2 };
    const int U = R == 1 ? SUMS : 1;
    const float offset = type == Q4_0 ? -8.f : type == Q5_0 ? -16.f : 1.f;  /* what extra's lane 1 is times */
    __m256 acc[SUMS][X_ROWS];
    __m128 extra[SUMS][X_ROWS];
    for (int u = 0; u < SUMS; u++)
        for (int r = 0; r < R; r++) acc[u][r] = _mm256_setzero_ps(), extra[u][r] = _mm_setzero_ps();
    int64_t b = 0;
    for (; b + U <= nb; b += U)
        for (int u = 0; u < U; u++) block_step(w + (b + u) * bytes, x, x_stride, b + u, type, R, P, acc[u], extra[u]);
    for (; b < nb; b++) block_step(w + b * bytes, x, x_stride, b, type, R, P, acc[0], extra[0]);
    for (int r = 0; r < R; r++) {
        const __m128 e = _mm_add_ps(extra[0][r], extra[1][r]);
        out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) * unit + (type == Q8_0 ? 0.f : offset * _mm_cvtss_f32(_mm_movehdup_ps(e)));
    }
#else
    const int has_min = type == Q4_1 || type == Q5_1;
    float acc[X_ROWS] = {0};
    int wq[BLOCK];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bytes;
        const float d = read_half(blk), m = has_min ? read_half(blk + 2) : 0.f;
        block_ints(blk, type, wq);
        for (int r = 0; r < R; r++) {
            const QBlock *xb = (const QBlock *)(x + r * x_stride) + b;
            int32_t isum = 0;
            for (int i = 0; i < BLOCK; i++) isum += wq[i] * (P == 2 ? xb->q[i] * LOW_SCALE + xb->lo[i] : xb->q[i]);
            acc[r] += d * xb->d * (float)isum * unit + (has_min ? m * xb->s : 0.f);
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
#endif
}

/* The same for the K-quants' super-blocks of 256: the weights are d sc q - dmin mn per sub-block of 32 (Q4_K,
 * Q5_K) or d scale (q - 32) per 16 (Q6_K); the integer sums are scaled by the sub-blocks' integer scales before
 * the super-block's one fp32 multiply, and the mins (offsets) multiply the activation's 16-value group sums.
 * With P = 2 planes the low plane's integer sums (isum_lo) come at 1/LOW_SCALE (apart: q LOW_SCALE + lo could
 * pass int32 over a super-block). */
INLINE void dot_super_blocks(const uint8_t *w, const char *x, int64_t x_stride, int64_t nb, float *out,
                             const int type, const int R, const int P) {
    const int bytes = block_bytes(type);
    float acc[X_ROWS] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bytes;
        int32_t isum[X_ROWS] = {0}, isum_lo[X_ROWS] = {0};  /* sum sc q qx, per plane */
        float offset[X_ROWS] = {0};  /* the mins' (offsets') part: sums of x times the integer mins */
        float d, dmin = 0.f;
        if (type == Q6_K) {
            const uint8_t *ql = blk, *qh = blk + 128;
            const int8_t *scales = (const int8_t *)(blk + 192);
            d = read_half(blk + 208);
            for (int r = 0; r < R; r++) {
                const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                for (int g = 0; g < SUPER_BLOCK / 16; g++) offset[r] += (float)(32 * scales[g]) * xb->sums[g];
            }
#if HAVE_AVX2
            __m256i vsum[X_ROWS], vlo[X_ROWS];
            for (int r = 0; r < R; r++) vsum[r] = vlo[r] = _mm256_setzero_si256();
            const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
            for (int h = 0; h < 2; h++) {  /* halves of 128: ql bytes 64 h .., qh bytes 32 h .. */
                const __m256i a = load256(ql + 64 * h), c = load256(ql + 64 * h + 32), hb = load256(qh + 32 * h);
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
                q[1] = _mm256_or_si256(_mm256_and_si256(c, low4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), low2), 4));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), low2), 4));
                for (int s = 0; s < 4; s++) {  /* 32 weights: two groups of 16, one scale each (128-bit halves) */
                    const int g = 8 * h + 2 * s;
                    const __m256i sc = _mm256_setr_m128i(_mm_set1_epi16(scales[g]), _mm_set1_epi16(scales[g + 1]));
                    for (int r = 0; r < R; r++) {
                        const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                        const __m256i p = _mm256_maddubs_epi16(q[s], load256(xb->q + 128 * h + 32 * s));
                        vsum[r] = _mm256_add_epi32(vsum[r], _mm256_madd_epi16(p, sc));
                        if (P == 2) {
                            const __m256i pl = _mm256_maddubs_epi16(q[s], load256(xb->lo + 128 * h + 32 * s));
                            vlo[r] = _mm256_add_epi32(vlo[r], _mm256_madd_epi16(pl, sc));
                        }
                    }
                }
            }
            for (int r = 0; r < R; r++) isum[r] = hsum_i(vsum[r]), isum_lo[r] = P == 2 ? hsum_i(vlo[r]) : 0;
#else
            for (int h = 0; h < 2; h++)
                for (int s = 0; s < 4; s++)
                    for (int half = 0; half < 2; half++) {
                        const int g = 8 * h + 2 * s + half;
                        int wq[16];
                        for (int l = 16 * half; l < 16 * half + 16; l++) {
                            const int byte = ql[64 * h + 32 * (s & 1) + l];
                            wq[l - 16 * half] = (s < 2 ? byte & 15 : byte >> 4) | (qh[32 * h + l] >> (2 * s) & 3) << 4;
                        }
                        for (int r = 0; r < R; r++) {
                            const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                            int32_t sum = 0, sum_lo = 0;
                            for (int l = 0; l < 16; l++) sum += wq[l] * xb->q[16 * g + l];
                            if (P == 2)
                                for (int l = 0; l < 16; l++) sum_lo += wq[l] * xb->lo[16 * g + l];
                            isum[r] += scales[g] * sum;
                            isum_lo[r] += scales[g] * sum_lo;
                        }
                    }
#endif
        } else {  /* Q4_K, Q5_K */
            d = read_half(blk), dmin = read_half(blk + 2);
            uint8_t sc[8], mn[8];
            k_scales(blk + 4, sc, mn);
            const uint8_t *qh = blk + 4 + K_SCALE_BYTES, *qs = type == Q5_K ? qh + 32 : qh;
            for (int r = 0; r < R; r++) {
                const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                for (int j = 0; j < 8; j++) offset[r] += (float)mn[j] * (xb->sums[2 * j] + xb->sums[2 * j + 1]);
            }
#if HAVE_AVX2
            __m256i vsum[X_ROWS], vlo[X_ROWS];
            for (int r = 0; r < R; r++) vsum[r] = vlo[r] = _mm256_setzero_si256();
            const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
            __m256i hb = type == Q5_K ? load256(qh) : _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {  /* bytes 32 j ..: sub-block 2 j low, 2 j + 1 high */
                const __m256i raw = load256(qs + 32 * j);
                __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                if (type == Q5_K) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4));
                    hb = _mm256_srli_epi16(hb, 2);
                }
                const __m256i sl = _mm256_set1_epi16(sc[2 * j]), sh = _mm256_set1_epi16(sc[2 * j + 1]);
                for (int r = 0; r < R; r++) {
                    const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                    const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(xb->q + 64 * j)), sl);
                    const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(xb->q + 64 * j + 32)), sh);
                    vsum[r] = _mm256_add_epi32(vsum[r], _mm256_add_epi32(pl, ph));
                    if (P == 2) {
                        const __m256i ll = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(xb->lo + 64 * j)), sl);
                        const __m256i lh = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(xb->lo + 64 * j + 32)), sh);
                        vlo[r] = _mm256_add_epi32(vlo[r], _mm256_add_epi32(ll, lh));
                    }
                }
            }
            for (int r = 0; r < R; r++) isum[r] = hsum_i(vsum[r]), isum_lo[r] = P == 2 ? hsum_i(vlo[r]) : 0;
#else
            for (int j = 0; j < 8; j++) {
                int wq[32];
                for (int l = 0; l < 32; l++) {
                    const uint8_t byte = qs[32 * (j / 2) + l];
                    wq[l] = ((j & 1) ? byte >> 4 : byte & 15) | (type == Q5_K ? (qh[l] >> j & 1) << 4 : 0);
                }
                for (int r = 0; r < R; r++) {
                    const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                    int32_t sum = 0, sum_lo = 0;
                    for (int l = 0; l < 32; l++) sum += wq[l] * xb->q[32 * j + l];
                    if (P == 2)
                        for (int l = 0; l < 32; l++) sum_lo += wq[l] * xb->lo[32 * j + l];
                    isum[r] += sc[j] * sum;
                    isum_lo[r] += sc[j] * sum_lo;
                }
            }
#endif
        }
        for (int r = 0; r < R; r++) {
            const float dx = ((const QSuperBlock *)(x + r * x_stride) + b)->d;
            const float dot = dx * ((float)isum[r] + (float)isum_lo[r] * (1.f / LOW_SCALE));
            if (type == Q6_K) acc[r] += d * (dot - offset[r]);
            else acc[r] += d * dot - dmin * offset[r];
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* F32 / F16 weights: fp32 FMAs of the weight row with R rows of x (not quantized), K any length */
INLINE void dot_floats(const uint8_t *w, const char *x, int64_t x_stride, int64_t K, float *out, const int type,
                       const int R, const int P) {
    (void)P;  /* x as given: no planes */
    int64_t k = 0;
#if HAVE_AVX2
    __m256 acc[X_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16)
        for (int u = 0; u < 2; u++) {  /* two accumulators a row: one FMA's latency hidden behind the other */
            const __m256 wv = type == F32 ? _mm256_loadu_ps((const float *)w + k + 8 * u)
                                          : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k + 8 * u)));
            for (int r = 0; r < R; r++)
                acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps((const float *)(x + r * x_stride) + k + 8 * u), acc[r][u]);
        }
    for (int r = 0; r < R; r++) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < R; r++) out[r] = 0.f;
#endif
    for (int r = 0; r < R; r++) {  /* the tail (portable: everything); -ffast-math lets gcc vectorize the sum */
        const float *xr = (const float *)(x + r * x_stride);
        float sum = 0.f;
        for (int64_t i = k; i < K; i++)
            sum += (type == F32 ? ((const float *)w)[i] : half_to_float(((const uint16_t *)w)[i])) * xr[i];
        out[r] += sum;
    }
}

#endif

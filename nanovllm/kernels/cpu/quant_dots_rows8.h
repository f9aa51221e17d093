/* The dot products of quant_linear.c on rows interleaved 8 at a time (ROWS8, kernels.h): 8 weight rows times R
 * rows of x's quantized blocks (in P planes) at once, for that file alone (a header so that each (type, R, P)
 * inlines into its own loop there).
 *
 * Why: on GGUF's own row order a 32-block costs ~15 instructions a row of x (~19 with the second plane), and
 * 6 of them apply the block's scales to one row's sum (convert, multiply, broadcast, FMA, the minimum's part) and
 * the row's lanes still need a horizontal sum. With 8 rows interleaved, vpmaddubsw / vpmaddwd leave row i's sum
 * of 4 products in int32 lane i: the 8 rows' scales are one fp16 load and convert, their FMA one instruction,
 * and the 8 outputs are stored as one vector. The 4-bit types sum in int16 over the whole block first (8
 * products of at most 15 x 127 per lane pair < 2^15): ~5.5 instructions a block of a row (~9 with the second
 * plane). Q5_0 / Q5_1's fifth bits are spread into the nibbles per unit, once for all the rows of x; Q8_0 with
 * two planes takes x whole as int16 (wide_sums); the K-quants unpack their sub-block scales as vectors of the
 * 8 rows'. Each run asks for the lines PREFETCH_AHEAD bytes on (kernels.h). What it measured is said in
 * quant_linear.c. */
#ifndef NANOVLLM_QUANT_DOTS_ROWS8_H
#define NANOVLLM_QUANT_DOTS_ROWS8_H
#include "quant_dots.h"

#if HAVE_AVX2
/* 4 bytes of x (values 4c .. 4c + 3 of a block) in every int32 lane */
INLINE __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 8 rows' fp16 scales, side by side -> fp32 */
INLINE __m256 halves8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* The products of a 4- or 5-bit block's values (q[c]: values 4c .. 4c + 3 of each row, q[4 + c]: 16 + 4c ..)
 * with x's 32 values xq, summed per row, times `scale`: int32 lanes, one per row. Summed in int16 first: 8
 * products of at most 15 x 127 per lane pair, or for 5 bits 4 of 31 x 127 (< 2^15) */
INLINE __m256i nibble_dot(const __m256i *q, const int8_t *xq, __m256i scale, const int five) {
    __m256i low = _mm256_setzero_si256(), high = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        low = _mm256_add_epi16(low, _mm256_maddubs_epi16(q[c], broadcast4(xq + 4 * c)));
        high = _mm256_add_epi16(high, _mm256_maddubs_epi16(q[4 + c], broadcast4(xq + 16 + 4 * c)));
    }
    if (five) return _mm256_add_epi32(_mm256_madd_epi16(low, scale), _mm256_madd_epi16(high, scale));
    return _mm256_madd_epi16(_mm256_add_epi16(low, high), scale);
}

/* Q5_0 / Q5_1: the 8 rows' fifth bits (row i's 32 in int32 lane i) -> byte t of lane i = 16 where bit
 * base + t is set (values base .. base + 3): the lane's byte holding them copied into its 4 bytes, one bit
 * tested in each */
INLINE __m256i fifth_bits8(__m256i h, const int base) {
    const __m256i lanes = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4,
                                           8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << base % 8));
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(h, _mm256_add_epi8(lanes, _mm256_set1_epi8((char)(base / 8)))), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

/* The same for Q8_0's signed bytes, one plane (|w| and x with w's sign): int32 lanes, one per row */
INLINE __m256i byte_sums(const __m256i *absw, const __m256i *w, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        const __m256i p = _mm256_maddubs_epi16(absw[c], _mm256_sign_epi8(broadcast4(xq + 4 * c), w[c]));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
    }
    return sum;
}

/* Q8_0 with x in two planes: R rows' dots with one run (its 8 units of 4 values of 8 rows at qs), x taken whole as
 * int16, q LOW_SCALE + lo (at most 127 * 256 + 127 < 2^15), times the weights widened to int16: per unit and row
 * of x one broadcast and two vpmaddwd (rows 0-3, 4-7; two lanes a row), against two sign flips, two vpmaddubsw
 * and two vpmaddwd per plane. The same integers (|sum| < 8 * 2 * 128 * 2^15 < 2^31). */
INLINE void wide_sums(const uint8_t *qs, const char *x, int64_t x_stride, int64_t b, const int R, __m256i *out) {
    int16_t x16[X_ROWS][BLOCK] __attribute__((aligned(32)));
    __m256i low[X_ROWS], high[X_ROWS];  /* weight rows 0-3 and 4-7 */
    for (int r = 0; r < R; r++) {
        const QBlock *xb = (const QBlock *)(x + r * x_stride) + b;
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xb->q + 16 * h)));
            const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xb->lo + 16 * h)));
            _mm256_store_si256((__m256i *)&x16[r][16 * h], _mm256_add_epi16(_mm256_slli_epi16(q, 8), lo));
        }
        low[r] = high[r] = _mm256_setzero_si256();
    }
    for (int c = 0; c < 8; c++) {
        const __m256i w03 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * c)));
        const __m256i w47 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * c + 16)));
        for (int r = 0; r < R; r++) {
            int64_t v;
            memcpy(&v, &x16[r][4 * c], 8);
            const __m256i xv = _mm256_set1_epi64x(v);
            low[r] = _mm256_add_epi32(low[r], _mm256_madd_epi16(w03, xv));
            high[r] = _mm256_add_epi32(high[r], _mm256_madd_epi16(w47, xv));
        }
    }
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  /* hadd gives rows 0 1 4 5 2 3 6 7 */
    for (int r = 0; r < R; r++) out[r] = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(low[r], high[r]), order);
}

/* Q4_K and Q5_K (five) on 8 interleaved rows: per super-block the 8 rows' d and dmin, their 6-bit sub-block
 * scales and mins unpacked as vectors (lane i: row i; the 12 bytes' three units read as 32-bit lanes), then per
 * pair of sub-blocks (2j low nibbles, 2j + 1 high ones) the units' products summed in int16 (8 of at most
 * 15 x 127; Q5_K's values, 31 at most, 4 at a time) and multiplied by the row's scale in vpmaddwd; the mins
 * times x's sub-block sums in fp32. Q5_K's fifth bits: qh's unit u holds values 4u .. 4u + 3 of every
 * sub-block, bit j for sub-block j. x's planes are summed apart (q 256 + lo times the scales could pass int32
 * over a super-block). out[8 r + i] as dot_rows8's. */
INLINE void q4_k_rows8(const uint8_t *w, const char *x, int64_t x_stride, int64_t nb, float *out, const int R,
                       const int P, const int five) {
    const __m256i low4 = _mm256_set1_epi8(15), six = _mm256_set1_epi32(63), nib = _mm256_set1_epi32(15);
    const __m256i top2 = _mm256_set1_epi32(3), one = _mm256_set1_epi8(1);
    const int bytes = five ? Q5_K_BLOCK_BYTES : Q4_K_BLOCK_BYTES, span = five ? 4 : 8;  /* units per int16 sum */
    __m256 acc[X_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *run = w + b * INTERLEAVE * bytes;
        prefetch_ahead(run, INTERLEAVE * bytes);
        const __m256 d = halves8(run), dmin = halves8(run + 2 * INTERLEAVE);
        const uint8_t *packed = run + 4 * INTERLEAVE, *qh = packed + K_SCALE_BYTES * INTERLEAVE;
        const uint8_t *qs = five ? qh + 32 * INTERLEAVE : qh;
        const __m256i u0 = load256(packed), u1 = load256(packed + 32), u2 = load256(packed + 64);
        __m256i scale[8];  /* as int16 pairs for vpmaddwd */
        __m256 mins[8];
        for (int k = 0; k < 4; k++) {  /* kernels.h k_scales, 8 rows at once */
            const __m256i s = _mm256_and_si256(_mm256_srli_epi32(u0, 8 * k), six);
            const __m256i m = _mm256_and_si256(_mm256_srli_epi32(u1, 8 * k), six);
            const __m256i s4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 8 * k), nib),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 8 * k + 6), top2), 4));
            const __m256i m4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 8 * k + 4), nib),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 8 * k + 6), top2), 4));
            scale[k] = _mm256_or_si256(s, _mm256_slli_epi32(s, 16));
            scale[4 + k] = _mm256_or_si256(s4, _mm256_slli_epi32(s4, 16));
            mins[k] = _mm256_cvtepi32_ps(m);
            mins[4 + k] = _mm256_cvtepi32_ps(m4);
        }
        for (int r = 0; r < R; r++) {
            const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
            __m256i hi = _mm256_setzero_si256(), lo = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++)
                for (int u0 = 0; u0 < 8; u0 += span) {
                    __m256i s0 = _mm256_setzero_si256(), s1 = s0, l0 = s0, l1 = s0;
                    for (int u = u0; u < u0 + span; u++) {
                        const __m256i v = load256(qs + 32 * (8 * j + u));
                        __m256i a = _mm256_and_si256(v, low4), h = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                        if (five) {
                            const __m256i hb = load256(qh + 32 * u);
                            a = _mm256_or_si256(a, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one), 4));
                            h = _mm256_or_si256(h, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one), 4));
                        }
                        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(a, broadcast4(xb->q + 64 * j + 4 * u)));
                        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(h, broadcast4(xb->q + 64 * j + 32 + 4 * u)));
                        if (P == 2) {
                            l0 = _mm256_add_epi16(l0, _mm256_maddubs_epi16(a, broadcast4(xb->lo + 64 * j + 4 * u)));
                            l1 = _mm256_add_epi16(l1, _mm256_maddubs_epi16(h, broadcast4(xb->lo + 64 * j + 32 + 4 * u)));
                        }
                    }
                    hi = _mm256_add_epi32(hi, _mm256_add_epi32(_mm256_madd_epi16(s0, scale[2 * j]),
                                                               _mm256_madd_epi16(s1, scale[2 * j + 1])));
                    if (P == 2)
                        lo = _mm256_add_epi32(lo, _mm256_add_epi32(_mm256_madd_epi16(l0, scale[2 * j]),
                                                                   _mm256_madd_epi16(l1, scale[2 * j + 1])));
                }
            __m256 dot = _mm256_cvtepi32_ps(hi), offset = _mm256_setzero_ps();
            if (P == 2) dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(1.f / LOW_SCALE), dot);
            for (int s = 0; s < 8; s++)
                offset = _mm256_fmadd_ps(mins[s], _mm256_set1_ps(xb->sums[2 * s] + xb->sums[2 * s + 1]), offset);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)), dot, acc[r]);
            acc[r] = _mm256_fnmadd_ps(dmin, offset, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);
}

/* Q6_K on 8 interleaved rows: a super-block's 128 bytes of low nibbles (ql), 64 of 2-bit highs (qh) and 16 int8
 * scales (one per 16 values) in 4-byte units, then the 8 rows' d. Per half h and unit c of 4 values: ql units
 * 16h + c and 16h + 8 + c and qh unit 8h + c give values 128h + 32s + 4c .. + 3 for s = 0..3 (low nibbles of the
 * first, of the second, high nibbles of the first, of the second; qh's bit pairs 0-1, 2-3, 4-5, 6-7). Products of
 * two units (6 bits x 127, 4 a lane pair < 2^15) are summed in int16, then times the row's scale of their 16
 * values in vpmaddwd; the offset (q - 32) times the scales and x's 16-value sums in fp32. out as dot_rows8's.
 * The run's scales and d lie at its end and are read first: without prefetch_ahead the hardware prefetcher lost
 * the stream at every run, and at one row this kernel lost to GGUF's order (Q4_K_M's 14 Q6_K down projections
 * and the rest in one engine: 117.9 against 120.6 tok/s); with it, 165.2 against 151.9. */
INLINE void q6_k_rows8(const uint8_t *w, const char *x, int64_t x_stride, int64_t nb, float *out, const int R,
                       const int P) {
    const __m256i low4 = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3), half16 = _mm256_set1_epi32(0xFFFF);
    __m256 acc[X_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *run = w + b * INTERLEAVE * Q6_K_BLOCK_BYTES, *ql = run, *qh = run + 128 * INTERLEAVE;
        const uint8_t *packed = run + 192 * INTERLEAVE;
        const __m256 d = halves8(run + 208 * INTERLEAVE);
        prefetch_ahead(run, INTERLEAVE * Q6_K_BLOCK_BYTES);
        __m256i scale[16];  /* as int16 pairs for vpmaddwd */
        __m256 scalef[16];
        for (int g = 0; g < 16; g++) {
            const __m256i u = load256(packed + 32 * (g / 4));
            const __m256i v = _mm256_srai_epi32(_mm256_slli_epi32(u, 24 - 8 * (g % 4)), 24);  /* signed byte g % 4 */
            scale[g] = _mm256_or_si256(_mm256_and_si256(v, half16), _mm256_slli_epi32(v, 16));
            scalef[g] = _mm256_cvtepi32_ps(v);
        }
        __m256i hi[X_ROWS], lo[X_ROWS];
        for (int r = 0; r < R; r++) hi[r] = lo[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 8; c += 2) {
                __m256i q[2][4];  /* units c and c + 1: values 128h + 32s + 4(c + k) .. */
                for (int k = 0; k < 2; k++) {
                    const __m256i a = load256(ql + 32 * (16 * h + c + k)), e = load256(ql + 32 * (16 * h + 8 + c + k));
                    const __m256i t = load256(qh + 32 * (8 * h + c + k));
                    q[k][0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_slli_epi16(_mm256_and_si256(t, two), 4));
                    q[k][1] = _mm256_or_si256(_mm256_and_si256(e, low4),
                                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(t, 2), two), 4));
                    q[k][2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(t, 4), two), 4));
                    q[k][3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(e, 4), low4),
                                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(t, 6), two), 4));
                }
                for (int r = 0; r < R; r++) {
                    const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
                    for (int s = 0; s < 4; s++) {
                        const int v0 = 128 * h + 32 * s + 4 * c, g = v0 / 16;  /* units c, c + 1: one group */
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(q[0][s], broadcast4(xb->q + v0)),
                                                           _mm256_maddubs_epi16(q[1][s], broadcast4(xb->q + v0 + 4)));
                        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(p, scale[g]));
                        if (P == 2) {
                            const __m256i l = _mm256_add_epi16(_mm256_maddubs_epi16(q[0][s], broadcast4(xb->lo + v0)),
                                                               _mm256_maddubs_epi16(q[1][s], broadcast4(xb->lo + v0 + 4)));
                            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(l, scale[g]));
                        }
                    }
                }
            }
        for (int r = 0; r < R; r++) {
            const QSuperBlock *xb = (const QSuperBlock *)(x + r * x_stride) + b;
            __m256 dot = _mm256_cvtepi32_ps(hi[r]), offset = _mm256_setzero_ps();
            if (P == 2) dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[r]), _mm256_set1_ps(1.f / LOW_SCALE), dot);
            for (int g = 0; g < 16; g++) offset = _mm256_fmadd_ps(scalef[g], _mm256_set1_ps(32.f * xb->sums[g]), offset);
            acc[r] = _mm256_fmadd_ps(d, _mm256_fmsub_ps(_mm256_set1_ps(xb->d), dot, offset), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);
}
#endif

/* out[8 r + i] = weight row 8g + i . x row r, i < 8, r < R: the group's runs at w (nb blocks), x's rows x_stride
 * bytes apart. Without AVX2 each row's block is gathered back into GGUF's order for quant_dots.h's dot
 * product: the same values, slower (interleaves() says where the engine should interleave). */
INLINE void dot_rows8(const uint8_t *w, const char *x, int64_t x_stride, int64_t nb, float *out, const int type,
                      const int R, const int P) {
    const int bytes = block_bytes(type);
#if HAVE_AVX2
    if (type == Q4_K || type == Q5_K) {
        q4_k_rows8(w, x, x_stride, nb, out, R, P, type == Q5_K);
        return;
    }
    if (type == Q6_K) {
        q6_k_rows8(w, x, x_stride, nb, out, R, P);
        return;
    }
    if (type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0) {
        const int five = type == Q5_0 || type == Q5_1, has_min = type == Q4_1 || type == Q5_1;
        const float unit = P == 2 ? 1.f / LOW_SCALE : 1.f;
        const __m256i ones = _mm256_set1_epi16(1), high = _mm256_set1_epi16(LOW_SCALE), low4 = _mm256_set1_epi8(15);
        __m256 acc[X_ROWS], extra[X_ROWS];  /* the integer dots scaled; the minimum's (offset's) part */
        for (int r = 0; r < R; r++) acc[r] = extra[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *run = w + b * INTERLEAVE * bytes, *qh = run + INTERLEAVE * scale_bytes(type);
            prefetch_ahead(run, INTERLEAVE * bytes);
            const uint8_t *qs = five ? qh + 4 * INTERLEAVE : qh;  /* Q5: the fifth bits' unit first */
            const __m256 d = halves8(run);
            __m256i q[8], sign[8];  /* Q4, Q5: the 4 units' low nibbles in q[0..3], high ones in q[4..7] */
            if (type == Q8_0 && P == 1)
                for (int c = 0; c < 8; c++) sign[c] = load256(qs + 32 * c), q[c] = _mm256_sign_epi8(sign[c], sign[c]);
            else
                for (int c = 0; c < 4; c++) {
                    const __m256i v = load256(qs + 32 * c);
                    q[c] = _mm256_and_si256(v, low4);
                    q[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if (five) {
                        const __m256i h = load256(qh);
                        q[c] = _mm256_or_si256(q[c], fifth_bits8(h, 4 * c));
                        q[4 + c] = _mm256_or_si256(q[4 + c], fifth_bits8(h, 16 + 4 * c));
                    }
                }
            __m256i wide[X_ROWS];  /* Q8_0, two planes: each row's dot from wide_sums */
            if (type == Q8_0 && P == 2) wide_sums(qs, x, x_stride, b, R, wide);
            for (int r = 0; r < R; r++) {
                const QBlock *xb = (const QBlock *)(x + r * x_stride) + b;
                __m256i dot;
                if (type == Q8_0 && P == 2)
                    dot = wide[r];
                else if (type == Q8_0)
                    dot = byte_sums(q, sign, xb->q);
                else if (P == 2)
                    dot = _mm256_add_epi32(nibble_dot(q, xb->q, high, five), nibble_dot(q, xb->lo, ones, five));
                else
                    dot = nibble_dot(q, xb->q, ones, five);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)), _mm256_cvtepi32_ps(dot), acc[r]);
                if (has_min) extra[r] = _mm256_fmadd_ps(halves8(run + 2 * INTERLEAVE), _mm256_set1_ps(xb->s), extra[r]);
                else if (type != Q8_0) extra[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(xb->s), extra[r]);
            }
        }
        const __m256 offset = _mm256_set1_ps(type == Q4_0 ? -8.f : type == Q5_0 ? -16.f : 1.f);
        for (int r = 0; r < R; r++)
            _mm256_storeu_ps(out + 8 * r, _mm256_fmadd_ps(extra[r], offset, _mm256_mul_ps(acc[r], _mm256_set1_ps(unit))));
        return;
    }
#endif
    uint8_t blk[MAX_INTERLEAVED_BYTES];
    for (int i = 0; i < R * INTERLEAVE; i++) out[i] = 0.f;
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < INTERLEAVE; i++) {
            float o[X_ROWS];
            gather_block(w + b * INTERLEAVE * bytes, type, i, blk);
            if (type == Q4_K || type == Q5_K || type == Q6_K)
                dot_super_blocks(blk, x + b * (int64_t)sizeof(QSuperBlock), x_stride, 1, o, type, R, P);
            else
                dot_blocks(blk, x + b * (int64_t)sizeof(QBlock), x_stride, 1, o, type, R, P);
            for (int r = 0; r < R; r++) out[8 * r + i] += o[r];
        }
}

#endif

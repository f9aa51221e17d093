/* Decode attention's inner loops, for decode_attention.c alone: its per-thread work arrays, the next chunk's
 * prefetch cursor, and the scores and value sums of its three paths (plain vectors; vdpbf16ps on AVX512-BF16;
 * AMX tiles). A header, not a .c file, so that they inline into attend(), specialised for each head size and
 * path: as calls into another file they would not be. Measured (docs/benchmarks.md, compute alone, 30 layers
 * at 44 sequences): scores on AMX 24.5 -> 19.8 ms, value sums on AMX 20.5 -> 16 ms, the prefetch cursor
 * advanced without a division 21.9-24.2 -> 20.4-21.3 ms; the paired value sums halve the instructions. */
#ifndef NANOVLLM_DECODE_ATTENTION_LOOPS_H
#define NANOVLLM_DECODE_ATTENTION_LOOPS_H
#include "kernels.h"

#define CHUNK 128              /* cached positions per pass of scores, softmax and value sums */
#define MAX_UNIT_HEADS MAX_GROUP  /* query heads of one work unit: whole groups, at least one */
#define MAX_Q_TILES 16         /* AMX scores: the unit's queries as B tiles (32 dims each) */
#define KEYS_AHEAD 32          /* key rows prefetched two groups of 16 ahead of the scores */
#define VALUES_AHEAD 32        /* value rows prefetched ahead of the paired value sums */
#define NEXT_KEYS_AT_ONCE 32   /* unpaired value sums: the next chunk's first key rows prefetched at once */
#define NEXT_LINES_PER_PAIR 4  /* per token pair of value sums: the next chunk's key lines prefetched, and as many
                                * value lines (8 in all) */

/* Work arrays of one sequence's chunk, per thread: the chunk's token rows, its scores/probabilities per query
 * head and (bf16 with AVX512-BF16) their probabilities in bf16 pairs. */
typedef struct {
    const char *tok[CHUNK];
    const char *next[CHUNK];                           /* the next chunk's key rows (the unit's heads) */
    int64_t next_row, next_rows, next_col, row_lines, vbase;  /* prefetch cursor over them: row, 64-byte line */
    float s[MAX_UNIT_HEADS][CHUNK] __attribute__((aligned(64)));
    uint32_t p[MAX_UNIT_HEADS][CHUNK / 2];             /* bf16 probability pairs (t, t + 1) */
    uint32_t qt[MAX_Q_TILES][TILE_WORDS] __attribute__((aligned(64)));  /* AMX scores: the queries as B tiles */
    float c[TILE_WORDS] __attribute__((aligned(64)));  /* AMX scores: one [16 keys x 16 queries] block */
    uint32_t stage[2][4][TILE_WORDS] __attribute__((aligned(64)));  /* AMX value sums: 32 value rows, 4 B tiles */
} Scratch;

/* The next chunk's key and value rows, `pairs` lines of each further along the cursor */
INLINE void prefetch_next(Scratch *w, int pairs) {
    for (int j = 0; j < pairs && w->next_row < w->next_rows; j++) {
        const char *line = w->next[w->next_row] + w->next_col * CACHE_LINE;
        __builtin_prefetch(line);
        __builtin_prefetch(line + w->vbase);
        if (++w->next_col == w->row_lines) w->next_col = 0, w->next_row++;  /* no division: ~10% of the kernel */
    }
}

/* q . k as 16 partial sums (lanes to be added). bf16 rows on a CPU with AVX512-BF16: vdpbf16ps multiplies
 * bf16 pairs exactly and accumulates in fp32, half the instructions of widening and FMAs. */
INLINE vf dot_partial(const char *restrict q, const char *restrict k, const int nv, const int bf16) {
#if NATIVE_BF16
    if (bf16 && nv % 2 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < nv / 2; c++)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c * 64), (__m512bh)_mm512_loadu_si512(k + c * 64));
        return (vf)acc;
    }
#endif
    const int64_t elem = bf16 ? 2 : 4;
    vf acc = load16(q, bf16) * load16(k, bf16);
    for (int c = 1; c < nv; c++) acc += load16(q + c * 16 * elem, bf16) * load16(k + c * 16 * elem, bf16);
    return acc;
}

#if HAVE_AVX2 && !defined(__AVX512F__)
/* 8 values (fp32 or bf16) widened to fp32 */
INLINE __m256 load8(const char *p, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p);
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* The value sums on AVX2, in 8-lane registers: o[g] += sum_t p[g][t] v[t] for the group's query heads. Written
 * with the 16-lane vectors (two registers each here), gcc moved every accumulator through the stack and built
 * the broadcast probability with four scalar stores per token: the fp32 value sums took two thirds of decode
 * attention (44 sequences of 300-700 tokens, 30 layers, compute alone: 130-150 ms in all) */
INLINE void pv_avx2(vf *o, Scratch *w, int64_t i0, int64_t off, int64_t n, int64_t group, const int nv, const int bf16) {
    const int64_t elem = bf16 ? 2 : 4;
    for (int64_t g = 0; g < group; g++) {
        __m256 acc[2 * MAX_VECTORS];
        for (int c = 0; c < 2 * nv; c++) memcpy(&acc[c], (const char *)(o + g * nv) + 32 * c, 32);
        for (int64_t t = 0; t < n; t++) {
            const __m256 p = _mm256_set1_ps(w->s[i0 + g][t]);
            const char *v = w->tok[t] + off;
            for (int c = 0; c < 2 * nv; c++) acc[c] = _mm256_fmadd_ps(p, load8(v + 8 * c * elem, bf16), acc[c]);
        }
        for (int c = 0; c < 2 * nv; c++) memcpy((char *)(o + g * nv) + 32 * c, &acc[c], 32);
    }
}

/* 8 vectors of 8 lanes in, lane t of the result the sum of h[t]'s: three rounds of horizontal adds */
INLINE __m256 sum8_rows(const __m256 *h) {
    const __m256 s01 = _mm256_hadd_ps(h[0], h[1]), s23 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 s45 = _mm256_hadd_ps(h[4], h[5]), s67 = _mm256_hadd_ps(h[6], h[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);  /* 128-bit halves apart */
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

/* 16 scores q . k[t0 + j] (j < count; the lanes past count are -inf) in one vector. On AVX2 in 8-lane registers
 * (the 16-lane version's products and transposed sum cost the scores ~2x there) */
INLINE vf scores16(const char *restrict q, const char *const *restrict tok, int64_t count, int64_t off,
                   const int nv, const int bf16) {
#if HAVE_AVX2 && !defined(__AVX512F__)
    const int64_t elem = bf16 ? 2 : 4;
    __m256 part[16];
    for (int j = 0; j < 16; j++) {
        const char *k = tok[j < count ? j : 0] + off;
        __m256 acc = _mm256_mul_ps(load8(q, bf16), load8(k, bf16));
        for (int c = 1; c < 2 * nv; c++) acc = _mm256_fmadd_ps(load8(q + 8 * c * elem, bf16), load8(k + 8 * c * elem, bf16), acc);
        part[j] = acc;
    }
    const __m256 low = sum8_rows(part), high = sum8_rows(part + 8);
    vf r;
    memcpy(&r, &low, sizeof low);
    memcpy((char *)&r + sizeof low, &high, sizeof high);
#else
    vf part[16];
    for (int j = 0; j < 16; j++) part[j] = dot_partial(q, tok[j < count ? j : 0] + off, nv, bf16);
    vf r = sum16_rows(part);
#endif
    for (int j = 0; j < 16; j++) r[j] = j < count ? r[j] : -INFINITY;
    return r;
}

#if NATIVE_BF16
#define PAIRED_PV(bf16, nv) ((bf16) && (nv) % 2 == 0)
INLINE void round_pairs(Scratch *w, int64_t i, int64_t n) {
    for (int64_t t = 0; t < n; t += 32) {
        const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(&w->s[i][t + 16]), _mm512_loadu_ps(&w->s[i][t]));
        memcpy(&w->p[i][t / 2], &p, sizeof p);
    }
}

/* The value sum with vdpbf16ps: two tokens per instruction (their rows interleaved by unpack, their
 * probabilities rounded to bf16, as flash attention rounds P before its PV matmul): half the instructions of
 * widening rows and FMAs. Each row pair is unpacked once for all the group's query heads. The accumulators hold
 * dims in unpack order (vector pairs cover 32 dims), undone by unpair() at the end. */
INLINE void pv_pairs(vf *restrict o, Scratch *w, int64_t i0, int64_t off, int64_t n, int64_t group, const int nv) {
    vf acc[group * nv];
    for (int64_t i = 0; i < group * nv; i++) acc[i] = o[i];
    for (int64_t t = 0; t < n; t += 2) {
        if (t + VALUES_AHEAD < n)
            __builtin_prefetch(w->tok[t + VALUES_AHEAD] + off), __builtin_prefetch(w->tok[t + VALUES_AHEAD + 1] + off);
        prefetch_next(w, NEXT_LINES_PER_PAIR);  /* the next chunk's rows: in flight while this one computes */
        for (int c = 0; c < nv / 2; c++) {
            const __m512i a = _mm512_loadu_si512(w->tok[t] + off + c * 64);
            const __m512i b = t + 1 < n ? _mm512_loadu_si512(w->tok[t + 1] + off + c * 64) : _mm512_setzero_si512();
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
            for (int64_t g = 0; g < group; g++) {
                const __m512bh p = (__m512bh)_mm512_set1_epi32(w->p[i0 + g][t / 2]);
                acc[g * nv + 2 * c] = (vf)_mm512_dpbf16_ps((__m512)acc[g * nv + 2 * c], lo, p);
                acc[g * nv + 2 * c + 1] = (vf)_mm512_dpbf16_ps((__m512)acc[g * nv + 2 * c + 1], hi, p);
            }
        }
    }
    for (int64_t i = 0; i < group * nv; i++) o[i] = acc[i];
}

/* lo holds dims 0-3, 8-11, 16-19, 24-27 of 32; hi the others */
INLINE void unpair(vf *v) {
    const vf lo = v[0], hi = v[1];
    v[0] = SHUF(lo, hi, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    v[1] = SHUF(lo, hi, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
}
#else
#define PAIRED_PV(bf16, nv) 0
#define pv_pairs(...) ((void)0)
#define round_pairs(...) ((void)0)
#define unpair(v) ((void)0)
#endif

/* Scores on AMX (bf16 caches, block size a multiple of 16): S^T = K Q^T per KV head, 16 keys a tile product.
 * A = 16 key rows x 32 dims, loaded in place from the cache (the 16 positions of a tile share a block, so
 * their rows are token_bytes apart); B = the group's queries in pair layout (packed once per work unit);
 * C = [16 keys x 16 queries], whose first `group` columns are the heads' scores. The products of bf16 pairs
 * are exact and summed in fp32, as vdpbf16ps does (same values up to the order of the sum). */
#if HAVE_AMX
#define AMX_SCORES 1
/* q heads [h0 * group, h1 * group) -> qt[(h - h0) * (nv / 2) + c]: rows = dim pairs of dims 32c..32c+31,
 * columns = the group's heads, zero past group */
INLINE void pack_queries(uint32_t (*qt)[TILE_WORDS], const char *q, int64_t h0, int64_t h1, int64_t group, int nv) {
    const int64_t row = nv * 32;
    for (int64_t h = h0; h < h1; h++)
        for (int c = 0; c < nv / 2; c++) {
            uint32_t *t = qt[(h - h0) * (nv / 2) + c];
            memset(t, 0, TILE_BYTES);
            for (int64_t g = 0; g < group; g++) {
                const uint32_t *src = (const uint32_t *)(q + (h * group + g) * row + c * 64);
                for (int pr = 0; pr < 16; pr++) t[pr * 16 + g] = src[pr];
            }
        }
}

/* scores of keys t0 .. t0 + 15 (rows from `key`, token_bytes apart) for every head of the unit */
INLINE void scores_amx(Scratch *w, const char *key, int64_t token_bytes, int64_t t0, int64_t count, int64_t h0,
                       int64_t h1, int64_t group, int nv, float scale) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    const __mmask16 valid = count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1);
    for (int64_t h = h0; h < h1; h++) {
        _tile_zero(0);
        for (int c = 0; c < nv / 2; c++) {
            _tile_loadd(1, key + h * nv * 32 + c * 64, token_bytes);
            _tile_loadd(2, w->qt[(h - h0) * (nv / 2) + c], TILE_ROW_BYTES);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, w->c, TILE_ROW_BYTES);
        for (int64_t g = 0; g < group; g++) {
            const __m512 x = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32((int)g)),
                                                               w->c, 4), _mm512_set1_ps(scale));
            _mm512_store_ps(&w->s[(h - h0) * group + g][t0], _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), x));
        }
    }
}

/* The value sums on AMX: O[group heads][dims] += P V over this chunk's n tokens. A (tile 7) = the heads'
 * probabilities in bf16 (`group` rows x 32 tokens, read in place), B (tiles 1, 2) = 32 value rows staged in
 * pair layout (16 token pairs x 16 dims, unpacked as pv_pairs unpacks them), C (tiles 3-6) = the heads'
 * accumulators for 64 dims, `group` rows, loaded from and stored back to o in place; dims end in pv_pairs'
 * unpack order (unpair() at the end). Value rows past n are zeros (their probabilities are not). */
INLINE void pv_amx(vf *o, Scratch *w, int64_t i0, int64_t off, int64_t n, const int nv) {
    const __m512i zero = _mm512_setzero_si512();
    for (int d = 0; d < nv; d += 4) {
        char *acc = (char *)(o + i0 * nv + d);
        const int64_t ld = nv * 64;
        _tile_loadd(3, acc, ld);
        _tile_loadd(4, acc + 64, ld);
        _tile_loadd(5, acc + 128, ld);
        _tile_loadd(6, acc + 192, ld);
        for (int64_t t0 = 0; t0 < n; t0 += 32) {
            uint32_t (*st)[TILE_WORDS] = w->stage[(t0 >> 5) & 1];
            for (int p = 0; p < 16; p++) {
                const int64_t t = t0 + 2 * p;
                prefetch_next(w, NEXT_LINES_PER_PAIR);  /* as in pv_pairs */
                const char *a = t < n ? w->tok[t] + off + d * 32 : NULL;
                const char *b = t + 1 < n ? w->tok[t + 1] + off + d * 32 : NULL;
                const __m512i a0 = a ? _mm512_loadu_si512(a) : zero, a1 = a ? _mm512_loadu_si512(a + 64) : zero;
                const __m512i b0 = b ? _mm512_loadu_si512(b) : zero, b1 = b ? _mm512_loadu_si512(b + 64) : zero;
                _mm512_store_si512(st[0] + p * 16, _mm512_unpacklo_epi16(a0, b0));
                _mm512_store_si512(st[1] + p * 16, _mm512_unpackhi_epi16(a0, b0));
                _mm512_store_si512(st[2] + p * 16, _mm512_unpacklo_epi16(a1, b1));
                _mm512_store_si512(st[3] + p * 16, _mm512_unpackhi_epi16(a1, b1));
            }
            _tile_loadd(7, &w->p[i0][t0 / 2], sizeof w->p[0]);
            _tile_loadd(1, st[0], TILE_ROW_BYTES);
            _tile_dpbf16ps(3, 7, 1);
            _tile_loadd(2, st[1], TILE_ROW_BYTES);
            _tile_dpbf16ps(4, 7, 2);
            _tile_loadd(1, st[2], TILE_ROW_BYTES);
            _tile_dpbf16ps(5, 7, 1);
            _tile_loadd(2, st[3], TILE_ROW_BYTES);
            _tile_dpbf16ps(6, 7, 2);
        }
        _tile_stored(3, acc, ld);
        _tile_stored(4, acc + 64, ld);
        _tile_stored(5, acc + 128, ld);
        _tile_stored(6, acc + 192, ld);
    }
}

/* tiles 0-2 (scores) 16 rows, 3-7 (value sums) `group` rows; every tile 64 bytes a row */
static void attention_tiles(int group) {
    static __thread TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.colsb[i] = TILE_ROW_BYTES, cfg.rows[i] = i < 3 ? TILE_ROWS : (uint8_t)group;
    __asm__ volatile("" ::: "memory");  /* the stores above are read by ldtilecfg, which gcc cannot see */
    _tile_loadconfig(&cfg);
}
#else
#define AMX_SCORES 0
#define pack_queries(...) ((void)0)
#define scores_amx(...) ((void)0)
#define pv_amx(...) ((void)0)
#define attention_tiles(group) ((void)0)
#endif

#endif

/* Decode attention over the paged KV cache on CPU: one query token per sequence, keys and values read in
 * place through the block table (torch has to gather them into a contiguous copy first).
 * Built by nanovllm/kernels/cpu.py with gcc -O3 -march=native -ffast-math -fopenmp. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define MAX_VECTORS 16  /* head_dim <= 256 */

typedef float vf __attribute__((vector_size(64)));     /* 16 floats: one AVX-512 register, two AVX2 ones */
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(64)));

/* 16 values (fp32 or bf16) widened to fp32: bf16 is the top half of an fp32, so a shift is exact */
INLINE vf load16(const char *p, const int bf16) {
    vf r;
    if (!bf16) { memcpy(&r, p, sizeof r); return r; }
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    memcpy(&r, &u, sizeof r);
    return r;
}

INLINE void store16(char *p, vf v, const int bf16) {
    if (!bf16) { memcpy(p, &v, sizeof v); return; }
    vu u;
    memcpy(&u, &v, sizeof u);
    vh h = __builtin_convertvector((u + 0x7fff + ((u >> 16) & 1)) >> 16, vh);  /* round to nearest even */
    memcpy(p, &h, sizeof h);
}

/* 16 partial-sum vectors in, one vector out whose lane t is the sum (or with `max`, the maximum) of a[t]'s
 * lanes: four rounds of shuffles and adds, each halving the vectors (a horizontal sum per vector costs ~2.5x
 * more). */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define COMBINE(x, y) (max ? (vf)(((x) > (y) & (vi)(x)) | (~((x) > (y)) & (vi)(y))) : (x) + (y))
INLINE vf reduce16_op(const vf *a, const int max) {
    vf r[8], u[4], w[2];
    for (int k = 0; k < 8; k++)
        r[k] = COMBINE(SHUF(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                       SHUF(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    for (int k = 0; k < 4; k++)
        u[k] = COMBINE(SHUF(r[2 * k], r[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                       SHUF(r[2 * k], r[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    for (int k = 0; k < 2; k++)
        w[k] = COMBINE(SHUF(u[2 * k], u[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                       SHUF(u[2 * k], u[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    return COMBINE(SHUF(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                   SHUF(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}
#undef COMBINE
#define reduce16(a) reduce16_op(a, 0)
vf sum16_rows(const vf *a) { return reduce16_op(a, 0); }  /* for cpu_prefill.c */
vf max16_rows(const vf *a) { return reduce16_op(a, 1); }

/* q . k as 16 partial sums (lanes to be added). bf16 rows on a CPU with AVX512-BF16: vdpbf16ps multiplies
 * bf16 pairs exactly and accumulates in fp32, half the instructions of widening and FMAs. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define NATIVE_BF16 1
#else
#define NATIVE_BF16 0
#endif

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

INLINE vf max16(vf a, vf b) {
    const vi gt = a > b;
    return (vf)((gt & (vi)a) | (~gt & (vi)b));
}

/* exp(x) for x <= 0 (every exponent of a softmax whose max is subtracted), 16 at a time: libm's expf is
 * scalar and took most of this kernel's time. 2^(x log2 e) split into 2^i (put into the float's exponent) and
 * 2^f, |f| <= 0.5, by a degree-6 Taylor series: relative error ~2e-7. Below -87 the result is ~1e-38. */
INLINE vf exp16(vf x) {
    const vi low = x < -87.f;
    x = (vf)((low & (vi)((vf){0} - 87.f)) | (~low & (vi)x));
    const vf t = x * 1.44269504f;
    const vi i = __builtin_convertvector(t - 0.5f, vi);  /* t <= 0: truncation of t - 0.5 rounds to nearest */
    const vf f = (t - __builtin_convertvector(i, vf)) * 0.693147181f;
    vf p = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
    return (vf)((vi)p + (i << 23));
}

vf exp16_ps(vf x) { return exp16(x); }  /* for cpu_prefill.c */

/* Work arrays of one sequence's chunk, per thread: the chunk's token rows, its scores/probabilities per query
 * head and (bf16 with AVX512-BF16) their probabilities in bf16 pairs. */
#define CHUNK 128
#define HEADROOM 8.f  /* see attend() */
#define MAX_UNIT_HEADS 64
#define MAX_Q_TILES 16
typedef struct {
    const char *tok[CHUNK];
    const char *next[CHUNK];                           /* the next chunk's key rows (the unit's heads) */
    int64_t next_row, next_rows, next_col, row_lines, vbase;  /* prefetch cursor over them: row, 64-byte line */
    float s[MAX_UNIT_HEADS][CHUNK] __attribute__((aligned(64)));
    uint32_t p[MAX_UNIT_HEADS][CHUNK / 2];             /* bf16 probability pairs (t, t + 1) */
    uint32_t qt[MAX_Q_TILES][256] __attribute__((aligned(64)));  /* AMX scores: the queries as B tiles */
    float c[256] __attribute__((aligned(64)));         /* AMX scores: one [16 keys x 16 queries] block */
    uint32_t stage[2][4][256] __attribute__((aligned(64)));  /* AMX value sums: 32 value rows as 4 B tiles */
} Scratch;

/* The next chunk's key and value rows, `pairs` lines of each further along the cursor */
INLINE void prefetch_next(Scratch *w, int pairs) {
    for (int j = 0; j < pairs && w->next_row < w->next_rows; j++) {
        const char *line = w->next[w->next_row] + w->next_col * 64;
        __builtin_prefetch(line);
        __builtin_prefetch(line + w->vbase);
        if (++w->next_col == w->row_lines) w->next_col = 0, w->next_row++;  /* no division: ~10% of the kernel */
    }
}

/* 16 scores q . k[t0 + j] (j < count; the lanes past count are -inf) in one vector */
INLINE vf scores16(const char *restrict q, const char *const *restrict tok, int64_t count, int64_t off,
                   const int nv, const int bf16) {
    vf part[16];
    for (int j = 0; j < 16; j++) part[j] = dot_partial(q, tok[j < count ? j : 0] + off, nv, bf16);
    vf r = reduce16(part);
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
        if (t + 32 < n) __builtin_prefetch(w->tok[t + 32] + off), __builtin_prefetch(w->tok[t + 33] + off);
        prefetch_next(w, 4);  /* the next chunk's rows, 8 lines per token pair: in flight while this one computes */
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
#define pv_pairs(...)
#define round_pairs(...)
#define unpair(v)
#endif

/* Scores on AMX (bf16 caches, block size a multiple of 16): S^T = K Q^T per KV head, 16 keys a tile product.
 * A = 16 key rows x 32 dims, loaded in place from the cache (the 16 positions of a tile share a block, so
 * their rows are token_bytes apart); B = the group's queries in pair layout (packed once per work unit);
 * C = [16 keys x 16 queries], whose first `group` columns are the heads' scores. The products of bf16 pairs
 * are exact and summed in fp32, as vdpbf16ps does (same values up to the order of the sum). The kernel's
 * compute alone: 24.5 -> 19.8 ms for 30 layers at 44 sequences (docs/benchmarks.md). amx_enabled is set by
 * linear_amx_init (cpu_linear.c) once AMX is granted. */
int amx_enabled = 0;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && NATIVE_BF16
#define AMX_SCORES 1
/* q heads [h0 * group, h1 * group) -> qt[(h - h0) * (nv / 2) + c]: rows = dim pairs of dims 32c..32c+31,
 * columns = the group's heads, zero past group */
INLINE void pack_queries(uint32_t (*qt)[256], const char *q, int64_t h0, int64_t h1, int64_t group, int nv) {
    const int64_t row = nv * 32;
    for (int64_t h = h0; h < h1; h++)
        for (int c = 0; c < nv / 2; c++) {
            uint32_t *t = qt[(h - h0) * (nv / 2) + c];
            memset(t, 0, 1024);
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
            _tile_loadd(2, w->qt[(h - h0) * (nv / 2) + c], 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, w->c, 64);
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
            uint32_t (*st)[256] = w->stage[(t0 >> 5) & 1];
            for (int p = 0; p < 16; p++) {
                const int64_t t = t0 + 2 * p;
                prefetch_next(w, 4);  /* as in pv_pairs */
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
            _tile_loadd(1, st[0], 64);
            _tile_dpbf16ps(3, 7, 1);
            _tile_loadd(2, st[1], 64);
            _tile_dpbf16ps(4, 7, 2);
            _tile_loadd(1, st[2], 64);
            _tile_dpbf16ps(5, 7, 1);
            _tile_loadd(2, st[3], 64);
            _tile_dpbf16ps(6, 7, 2);
        }
        _tile_stored(3, acc, ld);
        _tile_stored(4, acc + 64, ld);
        _tile_stored(5, acc + 128, ld);
        _tile_stored(6, acc + 192, ld);
    }
}

/* tiles 0-2 (scores) 16 rows, 3-7 (value sums) `group` rows; every tile 64 bytes a row */
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;
static void attention_tiles(int group) {
    static __thread TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = i < 3 ? 16 : (uint8_t)group;
    __asm__ volatile("" ::: "memory");  /* the stores above are read by ldtilecfg, which gcc cannot see */
    _tile_loadconfig(&cfg);
}
#else
#define AMX_SCORES 0
#define pack_queries(...)
#define scores_amx(...)
#define pv_amx(...)
#define attention_tiles(group)
#endif

/* One sequence's attention for its KV heads [h0, h1) (group query heads each), CHUNK cached positions at a
 * time: the chunk's scores for every query head, an online softmax update per head over the whole chunk
 * (running max m and sum l; the partial output is rescaled when the max grows), then the value sums.
 * Token rows are found through the chunk's pointer table, so blocks may have any size. Inlined with nv
 * (head_dim / 16) and the cache type as constants. */
INLINE void attend(const char *restrict q, char *restrict out, float scale, const char *restrict k_cache,
                   const char *restrict v_cache, const int64_t *restrict table, int64_t len, int64_t block_size,
                   int64_t token_bytes, int64_t h0, int64_t h1, int64_t group, Scratch *w, const int nv,
                   const int bf16, const int amx) {
    const int64_t elem = bf16 ? 2 : 4, row = nv * 16 * elem, heads = (h1 - h0) * group, vbase = v_cache - k_cache;
    float m[MAX_UNIT_HEADS], l[MAX_UNIT_HEADS];
    vf o[MAX_UNIT_HEADS * MAX_VECTORS];
    for (int64_t i = 0; i < heads; i++) { m[i] = -INFINITY; l[i] = 0.f; }
    for (int64_t i = 0; i < heads * nv; i++) o[i] = (vf){0};
    if (amx) pack_queries(w->qt, q, h0, h1, group, nv);
    for (int64_t start = 0; start < len; start += CHUNK) {
        const int64_t n = len - start < CHUNK ? len - start : CHUNK;
        for (int64_t t = 0, blk = start / block_size, off = start % block_size; t < n; t++) {  /* no division per token */
            w->tok[t] = k_cache + (table[blk] * block_size + off) * token_bytes;
            if (++off == block_size) off = 0, blk++;
        }
        /* Prefetches keep the reads going while the cores compute (no gain for the hardware prefetcher, which
         * sees short runs of scattered blocks). With paired value sums: the next chunk's key and value rows are
         * prefetched during this chunk's value sums, 8 lines per token pair, spread evenly (in bursts the line
         * fill buffers stall the core and reads and compute add up: 44 -> 38.5 ms for 30 layers); the first
         * chunk's values, and everything on the other path, per group of 16 as its scores are computed. Key
         * rows two groups ahead in any case. */
        for (int64_t t0 = 0; t0 < n; t0 += 16) {
            for (int64_t t = t0 + 32; t < t0 + 48 && t < n; t++)
                for (int64_t b = h0 * row; b < h1 * row; b += 64) __builtin_prefetch(w->tok[t] + b);
            if (start == 0 || !PAIRED_PV(bf16, nv))
                for (int64_t t = t0; t < t0 + 16 && t < n; t++)
                    for (int64_t b = h0 * row; b < h1 * row; b += 64) __builtin_prefetch(w->tok[t] + vbase + b, 0, 2);
            if (amx) {
                scores_amx(w, w->tok[t0], token_bytes, t0, n - t0, h0, h1, group, nv, scale);
                continue;
            }
            for (int64_t i = 0; i < heads; i++) {
                const vf x = scores16(q + (h0 * group + i) * row, w->tok + t0, n - t0, (h0 + i / group) * row, nv, bf16) * scale;
                memcpy(&w->s[i][t0], &x, sizeof x);
            }
        }
        w->next_row = w->next_rows = w->next_col = 0;
        w->row_lines = (h1 - h0) * row / 64;
        w->vbase = vbase;
        for (int64_t pos = start + CHUNK, blk = pos / block_size, off = pos % block_size;
             pos < start + 2 * CHUNK && pos < len; pos++) {
            const char *key = k_cache + (table[blk] * block_size + off) * token_bytes + h0 * row;
            if (++off == block_size) off = 0, blk++;
            w->next[w->next_rows++] = key;
            if (pos < start + CHUNK + 32 && !PAIRED_PV(bf16, nv))  /* the value sums below prefetch the rest */
                for (int64_t b = 0; b < (h1 - h0) * row; b += 64) __builtin_prefetch(key + b);
        }
        for (int64_t i = 0; i < heads; i++) {
            vf mx = (vf){0} + m[i], sum = (vf){0};
            for (int64_t c = 0; c < n; c += 16) {
                vf x;
                memcpy(&x, &w->s[i][c], sizeof x);
                mx = max16(x, mx);
            }
            /* m[i]: the head's reference, HEADROOM above its largest score when it last moved (as in
             * cpu_prefill.c): it moves only when a score passes it, so the outputs are seldom rescaled */
            float mnew = m[i], total = 0.f;
            for (int k = 0; k < 16; k++) mnew = mx[k] > mnew ? mx[k] : mnew;
            if (mnew > m[i]) mnew += HEADROOM;
            for (int64_t c = 0; c < n; c += 16) {
                vf x;
                memcpy(&x, &w->s[i][c], sizeof x);
                x = exp16(x - mnew);
                sum += x;
                memcpy(&w->s[i][c], &x, sizeof x);
            }
            for (int k = 0; k < 16; k++) total += sum[k];
            const float c = m[i] == -INFINITY ? 0.f : exp16((vf){0} + (m[i] - mnew))[0];
            l[i] = l[i] * c + total;
            m[i] = mnew;
            if (c != 1.f)
                for (int k = 0; k < nv; k++) o[i * nv + k] *= c;
            if (PAIRED_PV(bf16, nv)) round_pairs(w, i, n);
        }
        for (int64_t h = h0; h < h1; h++) {
            const int64_t i0 = (h - h0) * group;
            if (amx && nv % 4 == 0) {
                pv_amx(o, w, i0, vbase + h * row, n, nv);
                continue;
            }
            if (PAIRED_PV(bf16, nv)) {
                pv_pairs(o + i0 * nv, w, i0, vbase + h * row, n, group, nv);
                continue;
            }
            for (int64_t g = 0; g < group; g++) {
                vf acc[nv];
                for (int c = 0; c < nv; c++) acc[c] = o[(i0 + g) * nv + c];
                for (int64_t t = 0; t < n; t++)
                    for (int c = 0; c < nv; c++) acc[c] += w->s[i0 + g][t] * load16(w->tok[t] + vbase + h * row + c * 16 * elem, bf16);
                for (int c = 0; c < nv; c++) o[(i0 + g) * nv + c] = acc[c];
            }
        }
    }
    if (PAIRED_PV(bf16, nv))
        for (int64_t i = 0; i < heads * nv; i += 2) unpair(o + i);
    for (int64_t i = 0; i < heads; i++)
        for (int c = 0; c < nv; c++) store16(out + (i * nv + c) * 16 * elem, o[i * nv + c] * (1.f / l[i]), bf16);
}

#define ATTEND(NV, BF16, AMX) attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, \
                                     h1, group, &scratch, NV, BF16, AMX)

/* q: [tokens, q_stride] rows whose first heads * head_dim values are the queries; out: [tokens, heads,
 * head_dim]; both the cache's dtype; caches: [blocks, block_size, kv_heads, head_dim] fp32 or bf16; row b of the
 * batch is sequence rows[b] (its block table and context length) with its query at token tokens[b].
 * Work units: one sequence with all its KV heads (whole token rows: contiguous reads) when there are enough
 * sequences to keep the threads busy, else one (sequence, KV head). Returns 0, or -1 if a size exceeds this
 * kernel's limits (checked by the caller too). */
int decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                     const int64_t *tokens, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t block_size, float scale, int bf16, int num_threads) {
    const int64_t group = heads / kv_heads, elem = bf16 ? 2 : 4, token_bytes = kv_heads * head_dim * elem;
    if (group > MAX_UNIT_HEADS || head_dim % 16 || head_dim > 16 * MAX_VECTORS) return -1;
    int64_t per_unit = batch >= 4 * num_threads ? kv_heads : 1;
    while (per_unit * group > MAX_UNIT_HEADS) per_unit--;
    const int64_t units_per_seq = -(-kv_heads / per_unit);
    const int nv = head_dim / 16;
    const int amx = AMX_SCORES && amx_enabled && bf16 && nv % 2 == 0 && block_size % 16 == 0 && group <= 16
                    && per_unit * nv / 2 <= MAX_Q_TILES;
#pragma omp parallel num_threads(num_threads)
    {
    if (amx) attention_tiles((int)group);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < batch * units_per_seq; u++) {
        static __thread Scratch scratch;
        const int64_t b = u / units_per_seq, h0 = u % units_per_seq * per_unit;
        const int64_t h1 = h0 + per_unit < kv_heads ? h0 + per_unit : kv_heads;
        const char *qb = (const char *)q + tokens[b] * q_stride * elem;
        char *ob = (char *)out + (tokens[b] * heads + h0 * group) * head_dim * elem;
        const int64_t *table = tables + rows[b] * table_stride, len = lens[rows[b]];
        if (amx && nv == 4) ATTEND(4, 1, 1);
        else if (amx) ATTEND(nv, 1, 1);
        else if (nv == 4 && !bf16) ATTEND(4, 0, 0);
        else if (nv == 4) ATTEND(4, 1, 0);
        else if (nv == 8 && !bf16) ATTEND(8, 0, 0);
        else if (nv == 8) ATTEND(8, 1, 0);
        else if (!bf16) ATTEND(nv, 0, 0);
        else ATTEND(nv, 1, 0);
    }
    }
    return 0;
}

/* Write this step's key and value rows (token i's at k + i * k_stride bytes) into the paged caches at their
 * slots (slot -1: a padding row, skipped). index_copy_ took ~65 us a layer at 44 rows in bf16; this ~1 us.
 * Its time is the first touches of fresh cache pages (a page fault each, ~4-12 us in a VM): taken in parallel,
 * which the kernel allows, they cost half (a 2048-token prefill step: 137 -> ~70 ms). */
void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_bytes, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(tokens >= 16 ? num_threads : 1)
    for (int64_t i = 0; i < tokens; i++) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + slots[i] * row_bytes, k + i * k_stride, row_bytes);
        memcpy(v_cache + slots[i] * row_bytes, v + i * v_stride, row_bytes);
    }
}

/* bf16 helpers for the elementwise kernels below: each result rounded to bf16 where torch's op would round it,
 * so they match torch's bf16 ops up to the order of a row's sum of squares. */
INLINE uint16_t to_bf16(float x) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

INLINE float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

INLINE float bf16_round(float x) { return from_bf16(to_bf16(x)); }

#if NATIVE_BF16
INLINE __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

INLINE __m512 round_bf16x16(__m512 x) {  /* to the nearest bf16, kept in fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
#endif

/* HF's RMSNorm of bf16 rows: x / rms(x) in fp32, rounded to bf16, then times the weight (rounded). With `add`
 * (the residual stream's update), x first becomes x + add in place, rounded as torch's bf16 add rounds it:
 * the residual add and the next norm in one pass. */
void rms_norm_bf16(uint16_t *x, const uint16_t *add, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t dim, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * dim, *o = out + r * dim;
        int64_t i = 0;
        float sq = 0.f;
#if NATIVE_BF16  /* 16 at a time, one instruction per bf16 conversion: 2048 rows with the add 398 -> 288 us */
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= dim; i += 16) {
            __m512 v = bf16x16(xr + i);
            if (add) {
                v = round_bf16x16(_mm512_add_ps(v, bf16x16(add + r * dim + i)));
                _mm256_storeu_si256((__m256i *)(xr + i), (__m256i)_mm512_cvtneps_pbh(v));
            }
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        sq = _mm512_reduce_add_ps(acc);
#endif
        for (int64_t j = i; j < dim; j++) {
            if (add) xr[j] = to_bf16(from_bf16(xr[j]) + from_bf16(add[r * dim + j]));
            sq += from_bf16(xr[j]) * from_bf16(xr[j]);
        }
        const float inv = 1.f / sqrtf(sq / dim + eps);
        int64_t k = 0;
#if NATIVE_BF16
        for (const __m512 iv = _mm512_set1_ps(inv); k + 16 <= dim; k += 16)
            _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(bf16x16(weight + k), round_bf16x16(_mm512_mul_ps(bf16x16(xr + k), iv)))));
#endif
        for (; k < dim; k++) o[k] = to_bf16(from_bf16(weight[k]) * bf16_round(from_bf16(xr[k]) * inv));
    }
}

/* silu(gate) * up for bf16 [rows, 2 * dim] (gate first), as torch rounds it: silu to bf16, then the product.
 * With AVX-512, 16 at a time: sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|) <= 1
 * (exp16), the reciprocal approximated and refined by a Newton step (libm's vector expf and a division: 2.2 G
 * elements/s; this 3.9, docs/benchmarks.md). */
void silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = x + r * 2 * dim, *up = gate + dim;
        uint16_t *o = out + r * dim;
        int64_t i = 0;
#if NATIVE_BF16
        const __m512 two = _mm512_set1_ps(2.f), one = _mm512_set1_ps(1.f);
        for (; i + 16 <= dim; i += 16) {
            const __m512 g = bf16x16(gate + i);
            const __m512 e = (__m512)exp16((vf)_mm512_or_ps(g, _mm512_set1_ps(-0.f)));
            const __m512 d = _mm512_add_ps(one, e), rc = _mm512_rcp14_ps(d);
            const __m512 s = _mm512_mul_ps(rc, _mm512_fnmadd_ps(d, rc, two));
            const __m512 sig = _mm512_mask_mul_ps(s, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), s, e);
            const __m512 silu = round_bf16x16(_mm512_mul_ps(g, sig));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, bf16x16(up + i))));
        }
#endif
        for (; i < dim; i++) {
            const float g = from_bf16(gate[i]);
            o[i] = to_bf16(bf16_round(g / (1.f + expf(-g))) * from_bf16(up[i]));
        }
    }
}

/* Rotary embedding of bf16 heads in place (rotate-half layout): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin,
 * each product and sum rounded to bf16 as torch's bf16 ops round them. Rows of `heads` heads at `stride`
 * elements apart: the query and key heads side by side in the QKV projection's output, rotated in one call. */
void rope_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const uint16_t *cos,
               const uint16_t *sin, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(tokens >= 64 ? num_threads : 1)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + t * stride + h * head_dim, *x2 = x1 + half;
            const uint16_t *c = cos + t * half, *s = sin + t * half;
            int64_t i = 0;
#if NATIVE_BF16  /* 16 at a time, one instruction per bf16 rounding */
            for (; i + 16 <= half; i += 16) {
                const __m512 a = bf16x16(x1 + i), b = bf16x16(x2 + i), ci = bf16x16(c + i), si = bf16x16(s + i);
#define RP(x, y) round_bf16x16(_mm512_mul_ps(x, y))
                const __m512 r1 = _mm512_sub_ps(RP(a, ci), RP(b, si)), r2 = _mm512_add_ps(RP(b, ci), RP(a, si));
#undef RP
                _mm256_storeu_si256((__m256i *)(x1 + i), (__m256i)_mm512_cvtneps_pbh(r1));
                _mm256_storeu_si256((__m256i *)(x2 + i), (__m256i)_mm512_cvtneps_pbh(r2));
            }
#endif
            for (; i < half; i++) {
                const float a = from_bf16(x1[i]), b = from_bf16(x2[i]), ci = from_bf16(c[i]), si = from_bf16(s[i]);
                x1[i] = to_bf16(bf16_round(a * ci) - bf16_round(b * si));
                x2[i] = to_bf16(bf16_round(b * ci) + bf16_round(a * si));
            }
        }
}

/* One token per row of fp32 or bf16 logits [rows, vocab], read in place: the argmax where temperature is 0,
 * else a draw from softmax(logits / temperature) by the inverse CDF at u * total. For rows without top-k,
 * top-p, min-p or penalties (the sampler checks): a pass for the max, one for the exponentials' total, and a
 * partial one for the draw, 16 lanes at a time. */
INLINE vf load_logits(const char *row, int64_t i, int64_t vocab, int bf16) {
    if (i + 16 <= vocab) return load16(row + i * (bf16 ? 2 : 4), bf16);
    vf x = (vf){0} - FLT_MAX;  /* not -inf: -ffast-math assumes finite values */
    for (int64_t j = i; j < vocab; j++) x[j - i] = bf16 ? from_bf16(((const uint16_t *)row)[j]) : ((const float *)row)[j];
    return x;
}

void sample_rows(const void *logits, int64_t rows, int64_t vocab, int bf16, const float *temperature, const float *u,
                 int64_t *out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)logits + r * vocab * (bf16 ? 2 : 4);
        vf mx = (vf){0} - FLT_MAX;
        for (int64_t i = 0; i < vocab; i += 16) mx = max16(mx, load_logits(row, i, vocab, bf16));
        float m = -FLT_MAX;
        for (int k = 0; k < 16; k++) m = mx[k] > m ? mx[k] : m;
        if (temperature[r] == 0.f) {  /* the first index holding the max, as torch's argmax */
            out[r] = 0;
            for (int64_t i = 0, k = 16; k == 16; i += 16) {
                const vf x = load_logits(row, i, vocab, bf16);
                for (k = 0; k < 16 && x[k] != m; k++) {}
                if (k < 16) out[r] = i + k;
            }
            continue;
        }
        const float inv = 1.f / temperature[r];
        /* the weights' sums per 16 tokens (sixteen at a time, by a transposed reduction), then a scan of those
         * sums for the 16 tokens where the running sum passes u * total: one exp pass, not two */
        const int64_t chunks = (vocab + 15) / 16;
        float sums[chunks + 16];
        vf part[16], total16 = (vf){0};
        for (int64_t c0 = 0; c0 < chunks; c0 += 16) {
            for (int j = 0; j < 16; j++)
                part[j] = c0 + j < chunks ? exp16((load_logits(row, (c0 + j) * 16, vocab, bf16) - m) * inv) : (vf){0};
            const vf s16 = reduce16(part);
            memcpy(sums + c0, &s16, sizeof s16);
            total16 += s16;
        }
        float total = 0.f, run = 0.f;
        for (int k = 0; k < 16; k++) total += total16[k];
        const float target = u[r] * total;
        int64_t c = 0;
        while (c < chunks && run + sums[c] <= target) run += sums[c++];
        int64_t pick = -1, last = 0;  /* last: the last token with any weight, where rounding runs past the end */
        if (c < chunks) {
            const vf w = exp16((load_logits(row, c * 16, vocab, bf16) - m) * inv);
            for (int k = 0; k < 16 && c * 16 + k < vocab; k++) {
                run += w[k];
                if (w[k] > 0.f) last = c * 16 + k;
                if (run > target) { pick = c * 16 + k; break; }
            }
        }
        if (pick < 0) {  /* past the end by rounding: the last token with any weight */
            for (c = chunks - 1; c > 0 && sums[c] <= 0.f; c--) {}
            const vf w = exp16((load_logits(row, c * 16, vocab, bf16) - m) * inv);
            for (int k = 0; k < 16 && c * 16 + k < vocab; k++) last = w[k] > 0.f ? c * 16 + k : last;
        }
        out[r] = pick >= 0 ? pick : last;
    }
}

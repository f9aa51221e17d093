/* bf16 linear layers for decode steps on CPU with AMX: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small.
 *
 * A decode step's matmuls have a few dozen rows, so their time is the weights' read from memory (oneDNN reaches
 * ~10 GB/s there, about half of what the memory gives). Here the weight is read once, in place, in its plain
 * row-major layout, as AMX's A operand: a tile is 16 weight rows x 32 inputs, loaded with the row stride. The
 * activations are the B operand, repacked per call into AMX's pair layout (x is small: rows x K). Each tile
 * product gives a [16 outputs x 16 rows] block of y^T, transposed in registers on the way out.
 * Tiles: C 0-3 (up to 64 rows of x per pass over a weight block), B 4-5 and A 6-7, each pair alternating.
 * A GGUF model's Q4_1 / Q8_0 weights are read in their blocks instead, dequantized a tile at a time (below).
 * Measured (docs/benchmarks.md, benchmarks/linear_kernel.py, 30 layers of SmolLM2's linears): 44 rows 23.9 ms
 * (oneDNN, packed weight) -> 20.4 ms (AMX, 2 MB pages), 1 row 17.8 -> 12.3 ms; the four projections read from
 * Q4_1 blocks instead of bf16 at 44 rows 17.8 -> 10.8 ms, the LM head from Q8_0 2.54 -> 2.15 ms. */
#include "kernels.h"

#if HAVE_AMX
#define ROW_TILES 4        /* C tiles: up to 64 rows of x per pass over a weight block */
#define DEQUANT_RING 3     /* GGUF: tiles dequantized a step ahead, in a ring */

/* acc [16 outputs][16 rows] fp32 -> y[row][n0 .. n0 + 15] in bf16 (rounded to nearest even), rows < `rows` */
static inline void store_block(const float *acc, uint16_t *y, int64_t ldy, int rows, const uint16_t *bias) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(acc + 16 * i);
    transpose16(r);
    const __m512 b = bias ? bf16x16(bias) : _mm512_setzero_ps();
    for (int m = 0; m < rows; m++) {
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[m]), b);
        _mm256_storeu_si256((__m256i *)(y + m * ldy), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* GGUF's Q4_1 and Q8_0 weights, read as they are stored and dequantized tile by tile into L1: w = d q + m
 * (Q4_1: q 4 bits, d and m fp16) or w = d q (Q8_0: q 8 bits signed, d fp16), as gguf-py's dequantize computes
 * them in fp32 (d q is exact there, so an FMA rounds alike), rounded to bf16 as torch rounds: the bf16 tile
 * the loader's weight would give. Our layout, per 16 rows x 32 inputs (one GGUF block per row): the rows' q
 * (Q4_1: 16 bytes a row, element i < 16 in the low nibble of byte i, i + 16 in its high nibble; Q8_0: 32
 * bytes), then the 16 d, then (Q4_1) the 16 m. */
#define Q4_1_D (16 * 16)           /* where a Q4_1 tile's 16 d start */
#define Q4_1_M (Q4_1_D + 16 * 2)   /* and its 16 m */
#define Q8_0_D (16 * 32)           /* where a Q8_0 tile's 16 d start */
#define GGUF_TILE_BYTES(type) ((type) == Q4_1 ? 16 * Q4_1_BLOCK_BYTES : (type) == Q8_0 ? 16 * Q8_0_BLOCK_BYTES : 0)

static inline void dequant_q4_1(const uint8_t *blk, uint16_t *tile) {
    float s[32] __attribute__((aligned(64)));
    _mm512_store_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q4_1_D))));
    _mm512_store_ps(s + 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q4_1_M))));
    /* two rows at a time: their 16 possible values (q = 0..15) as one table of 32 bf16, then a lookup */
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i low4 = _mm512_set1_epi16(15), second = _mm512_inserti64x4(_mm512_setzero_si512(),
                                                                             _mm256_set1_epi16(16), 1);
    for (int r = 0; r < 16; r += 2) {
        const __m512 v0 = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[r]), _mm512_set1_ps(s[16 + r]));
        const __m512 v1 = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[r + 1]), _mm512_set1_ps(s[17 + r]));
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);  /* row r: words 0-15, row r + 1: 16-31 */
        const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + r * 16)));
        const __m512i lo = _mm512_ternarylogic_epi32(q, low4, second, 0xEA);  /* (q & 15) | second */
        const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(q, 4), second);
        _mm512_store_si512(tile + r * 32, _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0x44), table));
        _mm512_store_si512(tile + r * 32 + 32, _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0xEE), table));
    }
}

static inline void dequant_q8_0(const uint8_t *blk, uint16_t *tile) {
    float s[16] __attribute__((aligned(64)));
    _mm512_store_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + Q8_0_D))));
    for (int r = 0; r < 16; r++) {
        const __m512 d = _mm512_set1_ps(s[r]);
        const __m128i *q = (const __m128i *)(blk + r * 32);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
        _mm512_store_si512(tile + r * 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, d), _mm512_mul_ps(lo, d)));
    }
}

/* C tiles 0 .. nt - 1 += A B: A = tile `A` (16 weight rows x 32 inputs from wk, lda bytes a row), B = the pass's
 * packed activation tiles from b, loaded into tiles 4 and 5 in turn, so that a load need not wait for the
 * product that reads the tile's previous contents. A macro: the tile intrinsics take tile numbers as literals. */
#define TILE_PRODUCTS(A, wk, lda, b, nt)                                                                      \
    do {                                                                                                      \
        _tile_loadd(A, wk, lda);                                                                              \
        _tile_loadd(4, b, TILE_ROW_BYTES);                                                                    \
        _tile_dpbf16ps(0, A, 4);                                                                              \
        if ((nt) > 1) { _tile_loadd(5, (b) + TILE_BYTES, TILE_ROW_BYTES); _tile_dpbf16ps(1, A, 5); }         \
        if ((nt) > 2) { _tile_loadd(4, (b) + 2 * TILE_BYTES, TILE_ROW_BYTES); _tile_dpbf16ps(2, A, 4); }     \
        if ((nt) > 3) { _tile_loadd(5, (b) + 3 * TILE_BYTES, TILE_ROW_BYTES); _tile_dpbf16ps(3, A, 5); }     \
    } while (0)

/* y = x W^T (+ bias) with W either bf16 in place or GGUF blocks in our tile layout (per block of 16 rows, its
 * tiles for inputs 0-31, 32-63, ...; the blocks one after another), dequantized a tile at a time into L1 as it
 * is read: Q4_1 is 31% of the bf16 bytes, Q8_0 53%, for the same bf16 values. */
static inline int linear_amx(const uint16_t *x, int64_t M, const void *w, int64_t N, int64_t K,
                             const uint16_t *bias, uint16_t *y, int num_threads, const int type) {
    if (N % 16 || K % 32 || M < 1) return 1;
    const int64_t blocks = N / 16, ksteps = K / 32, tiles = (M + 15) / 16, ldw = K * 2;
    const int64_t tile_bytes = GGUF_TILE_BYTES(type), block_bytes = type != BF16 ? ksteps * tile_bytes : 16 * ldw;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* each thread packs x for itself: a packed copy written by one core and read by the other costs more
         * (cache lines moving between cores) than packing it twice */
        uint32_t *xb = aligned_alloc(64, ksteps * tiles * TILE_BYTES);
        if (!xb) failed = 1;
        else pack_rows(x, K, M, K, tiles, xb);
        amx_tiles_16x64();
        float acc[ROW_TILES][TILE_WORDS] __attribute__((aligned(64)));
        uint16_t wt[DEQUANT_RING][TILE_BYTES / 2] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < blocks; j++) {
            if (!xb) continue;
            const char *a = (const char *)w + j * block_bytes;  /* this block's 16 rows: contiguous */
            for (int64_t t0 = 0; t0 < tiles; t0 += ROW_TILES) {
                const int nt = tiles - t0 > ROW_TILES ? ROW_TILES : (int)(tiles - t0);
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                if (type != BF16) {  /* the block's first tile */
                    if (type == Q4_1) dequant_q4_1((const uint8_t *)a, wt[0]);
                    else dequant_q8_0((const uint8_t *)a, wt[0]);
                }
                for (int64_t k = 0; k < ksteps; k++) {
                    const char *wk;  /* this step's A: 16 weight rows x 32 inputs */
                    int64_t lda;
                    if (type != BF16) {
                        /* the next block prefetched into L2 as this one is read; this block's tiles dequantized a
                         * step ahead (a tile load waits for the stores it reads to retire) */
                        if (t0 == 0)
                            for (int l = 0; l < tile_bytes; l += CACHE_LINE)
                                _mm_prefetch(a + block_bytes + k * tile_bytes + l, _MM_HINT_T2);
                        if (k + 1 < ksteps) {
                            const uint8_t *next = (const uint8_t *)a + (k + 1) * tile_bytes;
                            uint16_t *tile = wt[(k + 1) % DEQUANT_RING];
                            if (type == Q4_1) dequant_q4_1(next, tile);
                            else dequant_q8_0(next, tile);
                        }
                        wk = (const char *)wt[k % DEQUANT_RING], lda = TILE_ROW_BYTES;
                    } else {
                        /* the next block's rows are prefetched into L2 in the order that block will read them
                         * (at step k, its 16 rows' k-th 64 bytes: the whole block by the end of this one); the
                         * hardware prefetcher alone leaves the weight reads and the tile products taking turns */
                        if (t0 == 0)
                            for (int l = 0; l < 16; l++)
                                _mm_prefetch(a + 16 * ldw + l * ldw + k * TILE_ROW_BYTES, _MM_HINT_T2);
                        wk = a + k * TILE_ROW_BYTES, lda = ldw;
                    }
                    const char *b = (const char *)(xb + (k * tiles + t0) * TILE_WORDS);
                    if (k & 1) TILE_PRODUCTS(7, wk, lda, b, nt);
                    else TILE_PRODUCTS(6, wk, lda, b, nt);
                }
                _tile_stored(0, acc[0], TILE_ROW_BYTES);
                if (nt > 1) _tile_stored(1, acc[1], TILE_ROW_BYTES);
                if (nt > 2) _tile_stored(2, acc[2], TILE_ROW_BYTES);
                if (nt > 3) _tile_stored(3, acc[3], TILE_ROW_BYTES);
                for (int t = 0; t < nt; t++) {
                    const int64_t row = (t0 + t) * 16;
                    store_block(acc[t], y + row * N + j * 16, N, M - row < 16 ? (int)(M - row) : 16,
                                bias ? bias + j * 16 : NULL);
                }
            }
        }
        _tile_release();
        free(xb);
    }
    return failed ? 2 : 0;
}

/* type: BF16 (w the plain weight), Q4_1 or Q8_0 (w its blocks in the tile layout above); each a specialized
 * copy. Returns 0; 1 if N is not a multiple of 16 or K of 32, 2 without memory, 3 for an unknown type. */
int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads) {
    if (type == BF16) return linear_amx(x, M, w, N, K, bias, y, num_threads, BF16);
    if (type == Q4_1) return linear_amx(x, M, w, N, K, bias, y, num_threads, Q4_1);
    if (type == Q8_0) return linear_amx(x, M, w, N, K, bias, y, num_threads, Q8_0);
    return 3;
}
#else
int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads) {
    (void)x, (void)M, (void)w, (void)type, (void)N, (void)K, (void)bias, (void)y, (void)num_threads;
    return -1;  /* built without AMX */
}
#endif

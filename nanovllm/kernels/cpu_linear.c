/* bf16 linear layers for decode steps on CPU with AMX: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small.
 *
 * A decode step's matmuls have a few dozen rows, so their time is the weights' read from memory (oneDNN reaches
 * ~10 GB/s there, about half of what the memory gives). Here the weight is read once, in place, in its plain
 * row-major layout, as AMX's A operand: a tile is 16 weight rows x 32 inputs, loaded with the row stride. The
 * activations are the B operand, repacked per call into AMX's pair layout (x is small: rows x K). Each tile
 * product gives a [16 outputs x 16 rows] block of y^T, transposed in registers on the way out.
 * Tiles: C 0-3 (up to 64 rows of x per pass over a weight block), B 4-5 and A 6-7, each pair alternating.
 * A GGUF model's Q4_1 / Q8_0 weights are read in their blocks instead, dequantized a tile at a time (below).
 * Built with cpu_attention.c by kernels/cpu.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out AMX's 8 KB of tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA); 0 once granted. */
extern int amx_enabled;  /* cpu_attention.c: its decode scores use AMX once granted */
int linear_amx_init(void) {
    const int rc = (int)syscall(SYS_arch_prctl, 0x1023, 18);
    amx_enabled = rc == 0;
    return rc;
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

/* This thread's 8 tiles as 16 rows x 64 bytes each (the only shape our kernels use; cpu_prefill.c too). A
 * constant in memory: gcc drops stores into a local config as dead (the builtin's read is invisible to it). */
static const TileConfig TILES_16x64 = {.palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
                                       .rows = {16, 16, 16, 16, 16, 16, 16, 16}};
void amx_tiles_16x64(void) { _tile_loadconfig(&TILES_16x64); }

/* 16x16 32-bit transpose in registers: r[i] lane j -> r[j] lane i */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
}

/* x [M, K] (rows `stride` bf16 apart) -> [K/32][tiles][16 input pairs][16 rows] of bf16 pairs (32 bits), rows
 * past M zero: AMX's B operand with x's rows as its columns (also the keys of cpu_prefill.c) */
void pack_rows(const uint16_t *x, int64_t stride, int64_t M, int64_t K, int64_t tiles, uint32_t *out) {
    for (int64_t k = 0; k < K / 32; k++)
        for (int64_t t = 0; t < tiles; t++) {
            __m512i r[16];
            for (int m = 0; m < 16; m++)
                r[m] = t * 16 + m < M ? _mm512_loadu_si512(x + (t * 16 + m) * stride + k * 32)
                                      : _mm512_setzero_si512();
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512(out + ((k * tiles + t) * 16 + p) * 16, r[p]);
        }
}

/* acc [16 outputs][16 rows] fp32 -> y[row][n0 .. n0 + 15] in bf16 (rounded to nearest even), rows < `rows` */
static inline void store_block(const float *acc, uint16_t *y, int64_t ldy, int rows, const uint16_t *bias) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(acc + 16 * i);
    transpose16(r);
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                _mm256_loadu_si256((const __m256i *)bias)), 16)) : _mm512_setzero_ps();
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
enum { BF16 = 0, Q4_1 = 1, Q8_0 = 2 };
static const int64_t TILE_BYTES[] = {0, 16 * 16 + 64, 16 * 32 + 32};

static inline void dequant_q4_1(const uint8_t *blk, uint16_t *tile) {
    float s[32] __attribute__((aligned(64)));
    _mm512_store_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256))));
    _mm512_store_ps(s + 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288))));
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
    _mm512_store_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 512))));
    for (int r = 0; r < 16; r++) {
        const __m512 d = _mm512_set1_ps(s[r]);
        const __m128i *q = (const __m128i *)(blk + r * 32);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
        _mm512_store_si512(tile + r * 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, d), _mm512_mul_ps(lo, d)));
    }
}

/* y = x W^T (+ bias) with W either bf16 in place or GGUF blocks in our tile layout (per block of 16 rows, its
 * tiles for inputs 0-31, 32-63, ...; the blocks one after another), dequantized a tile at a time into L1 as it
 * is read: Q4_1 is 31% of the bf16 bytes, Q8_0 53%, for the same bf16 values. */
static inline int linear_amx(const uint16_t *x, int64_t M, const void *w, int64_t N, int64_t K,
                             const uint16_t *bias, uint16_t *y, int num_threads, const int type) {
    if (N % 16 || K % 32 || M < 1) return 1;
    const int64_t blocks = N / 16, ksteps = K / 32, tiles = (M + 15) / 16, ldw = K * 2;
    const int64_t tile_bytes = TILE_BYTES[type], block_bytes = type ? ksteps * tile_bytes : 16 * ldw;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* each thread packs x for itself: a packed copy written by one core and read by the other costs more
         * (cache lines moving between cores) than packing it twice */
        uint32_t *xb = aligned_alloc(64, ksteps * tiles * 1024);
        if (!xb) failed = 1;
        else pack_rows(x, K, M, K, tiles, xb);
        amx_tiles_16x64();
        float acc[4][256] __attribute__((aligned(64)));
        uint16_t wt[3][512] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < blocks; j++) {
            if (!xb) continue;
            const char *a = (const char *)w + j * block_bytes;  /* this block's 16 rows: contiguous */
            for (int64_t t0 = 0; t0 < tiles; t0 += 4) {
                const int nt = tiles - t0 > 4 ? 4 : (int)(tiles - t0);
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
#define DEQUANT(k, buf) (type == Q4_1 ? dequant_q4_1((const uint8_t *)a + (k) * tile_bytes, buf) \
                                       : dequant_q8_0((const uint8_t *)a + (k) * tile_bytes, buf))
                if (type) DEQUANT(0, wt[0]);
                for (int64_t k = 0; k < ksteps; k++) {
                    const char *wk;  /* this step's A: 16 weight rows x 32 inputs */
                    int64_t lda;
                    if (type) {
                        /* the next block prefetched into L2 as this one is read; this block's tiles dequantized a
                         * step ahead (a tile load waits for the stores it reads to retire) */
                        if (t0 == 0)
                            for (int l = 0; l < tile_bytes; l += 64)
                                _mm_prefetch(a + block_bytes + k * tile_bytes + l, _MM_HINT_T2);
                        if (k + 1 < ksteps) DEQUANT(k + 1, wt[(k + 1) % 3]);
                        wk = (const char *)wt[k % 3], lda = 64;
                    } else {
                        /* the next block's rows are prefetched into L2 in the order that block will read them
                         * (at step k, its 16 rows' k-th 64 bytes: the whole block by the end of this one); the
                         * hardware prefetcher alone leaves the weight reads and the tile products taking turns */
                        if (t0 == 0)
                            for (int l = 0; l < 16; l++) _mm_prefetch(a + 16 * ldw + l * ldw + k * 64, _MM_HINT_T2);
                        wk = a + k * 64, lda = ldw;
                    }
                    const char *b = (const char *)(xb + (k * tiles + t0) * 256);
                    /* C tiles 0-3, B 4-5 and A 6-7 alternating, so that a load need not wait for the product
                     * that reads the tile's previous contents */
#define PRODUCTS(A)                                                                          \
                    _tile_loadd(A, wk, lda);                                                 \
                    _tile_loadd(4, b, 64);                                                   \
                    _tile_dpbf16ps(0, A, 4);                                                 \
                    if (nt > 1) { _tile_loadd(5, b + 1024, 64); _tile_dpbf16ps(1, A, 5); }   \
                    if (nt > 2) { _tile_loadd(4, b + 2048, 64); _tile_dpbf16ps(2, A, 4); }   \
                    if (nt > 3) { _tile_loadd(5, b + 3072, 64); _tile_dpbf16ps(3, A, 5); }
                    if (k & 1) { PRODUCTS(7) } else { PRODUCTS(6) }
#undef PRODUCTS
                }
#undef DEQUANT
                _tile_stored(0, acc[0], 64);
                if (nt > 1) _tile_stored(1, acc[1], 64);
                if (nt > 2) _tile_stored(2, acc[2], 64);
                if (nt > 3) _tile_stored(3, acc[3], 64);
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

/* type: BF16 (w the plain weight), Q4_1 or Q8_0 (w its blocks in the tile layout above); each a specialized copy */
int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads) {
    if (type == BF16) return linear_amx(x, M, w, N, K, bias, y, num_threads, BF16);
    if (type == Q4_1) return linear_amx(x, M, w, N, K, bias, y, num_threads, Q4_1);
    if (type == Q8_0) return linear_amx(x, M, w, N, K, bias, y, num_threads, Q8_0);
    return 3;
}
#else
int linear_amx_init(void) { return -1; }
int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads) { return -1; }
#endif

/* The one header of nanovllm's C kernels for CPU: every .c file in this folder includes it, and build.py
 * compiles them all into one library (gcc -O3 -march=native -ffast-math -fopenmp). It holds what more than one
 * file uses: the 16-lane vector types and their helpers (bf16 widening and rounding, the transposed 16-row
 * reductions, exp16), what the compiler targets (AVX2, AVX512-BF16, AMX), the AMX tile configuration, the weight
 * types the linears read (ggml's ids and block layouts), the quantized activation blocks, the kernels' size
 * limits, and the prototype of every exported function.
 * Why C at all: torch's ops cost a gather, a copy or a fp32 round trip each; these kernels read the paged KV
 * cache, the bf16 weights and GGUF blocks in place (figures in each file and docs/benchmarks.md). Of the helpers
 * here: exp16 replaced libm's scalar expf, which took most of decode attention's time (and in SiLU-and-mul,
 * with an approximate reciprocal: 2.2 -> 3.9 G elements/s); a transposed reduction of 16 vectors costs ~1/2.5
 * of 16 horizontal sums. */
#ifndef NANOVLLM_KERNELS_H
#define NANOVLLM_KERNELS_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* AVX2 with FMA and F16C: the integer dot products of quant_linear.c (vpmaddubsw, vpmaddwd) and its fp32 FMA;
 * without it (build.py's portable variant, -march=x86-64) plain C serves, the same arithmetic */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

/* AVX512-BF16 (vdpbf16ps: bf16 pairs multiplied exactly, summed in fp32; one-instruction bf16 conversions) and
 * AMX (tile products of bf16 pairs) where -march has them; the plain-C paths serve everything else */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define NATIVE_BF16 1
#else
#define NATIVE_BF16 0
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && NATIVE_BF16
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define INLINE static inline __attribute__((always_inline))

/* Limits: decode attention's per-thread scratch holds MAX_GROUP query heads of MAX_HEAD_DIM values (16-lane
 * vectors: head dims in multiples of 16); kernels/cpu/__init__.py checks the same limits before calling */
#define MAX_GROUP 64
#define MAX_HEAD_DIM 256
#define MAX_VECTORS (MAX_HEAD_DIM / 16)

#define CACHE_LINE 64  /* bytes: what one prefetch brings */

/* Weight types, by ggml's own ids (one numbering for every kernel and the GGUF file). linear_bf16 (AMX) reads
 * BF16, or GGUF blocks of Q4_1 / Q8_0 rearranged by loader/gguf.py pack_blocks (see linear.c); linear_f32 and
 * dequantize_rows (quant_linear.c, dequantize.c) read every type below but BF16 in GGUF's own row layout.
 * Blocks (gguf-py's gguf/quants.py is the reference for each layout and its dequantization):
 *   Q4_0  fp16 d, 16 bytes of 4-bit q (element i < 16: low nibble of byte i, i + 16: its high nibble); d (q - 8)
 *   Q4_1  fp16 d, fp16 m, 16 bytes of 4-bit q as Q4_0; d q + m
 *   Q5_0  fp16 d, uint32 of fifth bits (bit i: element i), 16 bytes of low nibbles as Q4_0; d (q - 16)
 *   Q5_1  fp16 d, fp16 m, the fifth bits, the low nibbles; d q + m
 *   Q8_0  fp16 d, 32 x int8 q; d q
 *   Q4_K  256 weights in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of
 *         4-bit q (bytes 32j .. 32j + 31: sub-block 2j in the low nibbles, 2j + 1 in the high); d sc q - dmin m
 *   Q5_K  as Q4_K with 32 bytes of fifth bits after the scales (bit j of byte i: element i of sub-block j)
 *   Q6_K  256 weights: 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales (one per 16), fp16 d;
 *         d scale (q - 32) */
enum {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30
};
#define BLOCK 32         /* weights per block of Q4_0 .. Q8_0 */
#define SUPER_BLOCK 256  /* weights per super-block of the K-quants */
#define Q4_0_BLOCK_BYTES 18
#define Q4_1_BLOCK_BYTES 20
#define Q5_0_BLOCK_BYTES 22
#define Q5_1_BLOCK_BYTES 24
#define Q8_0_BLOCK_BYTES 34
#define Q4_K_BLOCK_BYTES 144
#define Q5_K_BLOCK_BYTES 176
#define Q6_K_BLOCK_BYTES 210
#define K_SCALE_BYTES 12  /* Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins */

/* A weight type's block: how many weights, how many bytes; 0 for a type linear_f32 does not read */
static inline int block_elems(int type) {
    switch (type) {
    case F32: case F16: return 1;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return BLOCK;
    case Q4_K: case Q5_K: case Q6_K: return SUPER_BLOCK;
    default: return 0;
    }
}

static inline int block_bytes(int type) {
    switch (type) {
    case F32: return 4;
    case F16: return 2;
    case Q4_0: return Q4_0_BLOCK_BYTES;
    case Q4_1: return Q4_1_BLOCK_BYTES;
    case Q5_0: return Q5_0_BLOCK_BYTES;
    case Q5_1: return Q5_1_BLOCK_BYTES;
    case Q8_0: return Q8_0_BLOCK_BYTES;
    case Q4_K: return Q4_K_BLOCK_BYTES;
    case Q5_K: return Q5_K_BLOCK_BYTES;
    case Q6_K: return Q6_K_BLOCK_BYTES;
    default: return 0;
    }
}

/* A weight is read once per token, from memory, in many short streams (each thread's chunk of each linear, and
 * in an 8-row run the scales may lie at its end), and the hardware prefetcher restarts on each: so each 8-row
 * dot-product loop (quant_dots_rows8.h) asks for the lines PREFETCH_AHEAD bytes beyond those it is about to read.
 * Measured (EPYC, AVX2, 2 threads, one process alternating): 30 layers of SmolLM2's Q4_1 (66 MB) at one row
 * 4.46 -> 3.96 ms (1024 / 4096 bytes ahead: 4.12 / 3.93), unchanged at 8 and 32 rows; the embedded model's
 * decode 135 -> 149 tok/s. The GGUF-order loops (one row's blocks in one stream) gained nothing measurable. */
#define PREFETCH_AHEAD 2048
INLINE void prefetch_ahead(const uint8_t *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch(p + PREFETCH_AHEAD + o);
}

/* ROWS8 on linear_f32's and dequantize_rows' weight type: the rows are interleaved 8 at a time (layers/quant.py
 * interleave_rows; every quantized type, N a multiple of 8), so that one 32-byte load holds 4 bytes of
 * each of 8 rows and an integer dot product's 8 int32 lanes are 8 outputs (quant_dots_rows8.h): no horizontal
 * sums, the blocks' scales applied as one vector for the 8 rows. Rows 8g .. 8g + 7's blocks b lie in one run of
 * 8 block_bytes: first the leading fp16 scales (d, then m or dmin where the type has one), the 8 rows' side by
 * side; then the rest of the block (fifth bits, packed scales, q) in units of 4 bytes, unit by unit, the 8 rows'
 * side by side; last a trailing fp16 scale (Q6_K's d), the 8 rows' side by side. */
#define ROWS8 0x200
#define INTERLEAVE 8
static inline int scale_bytes(int type) {
    return type == Q4_1 || type == Q5_1 || type == Q4_K || type == Q5_K ? 4 : type == Q6_K ? 0 : 2;
}
static inline int tail_bytes(int type) { return type == Q6_K ? 2 : 0; }
#define MAX_INTERLEAVED_BYTES Q6_K_BLOCK_BYTES  /* the largest block that is interleaved: Q6_K's */

/* Where byte j of row r's block lies in its run */
static inline int interleaved_byte(int type, int r, int j) {
    const int s = scale_bytes(type), body = block_bytes(type) - tail_bytes(type);
    if (j < s) return (j / 2 * INTERLEAVE + r) * 2 + j % 2;
    if (j >= body) return INTERLEAVE * body + ((j - body) / 2 * INTERLEAVE + r) * 2 + j % 2;
    j -= s;
    return INTERLEAVE * s + (j / 4 * INTERLEAVE + r) * 4 + j % 4;
}

/* Row r's block out of a run, as GGUF stores it */
static inline void gather_block(const uint8_t *run, int type, int r, uint8_t *out) {
    const int s = scale_bytes(type), bytes = block_bytes(type), body = bytes - tail_bytes(type);
    for (int j = 0; j < s; j += 2) memcpy(out + j, run + interleaved_byte(type, r, j), 2);
    for (int j = s; j < body; j += 4) memcpy(out + j, run + interleaved_byte(type, r, j), 4);
    for (int j = body; j < bytes; j += 2) memcpy(out + j, run + interleaved_byte(type, r, j), 2);
}

/* An IEEE half (GGUF's block scales, F16 weights) widened to fp32, exactly (subnormals, infinities and NaN
 * too): F16C's one instruction where the CPU has it, else the bits moved by hand */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0x1f) u = sign | 0x7f800000 | (man << 13);  /* infinity, NaN */
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);  /* normal: rebias 15 -> 127 */
    else if (!man) u = sign;  /* zero */
    else {  /* subnormal: man 2^-24, normalized for fp32 */
        int e = 113;
        uint32_t m = man;
        while (!(m & 0x400)) { m <<= 1; e--; }
        u = sign | ((uint32_t)e << 23) | ((m & 0x3ff) << 13);
    }
    float x;
    memcpy(&x, &u, 4);
    return x;
#endif
}

static inline float read_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

static inline uint32_t read_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K / Q5_K: the 12 bytes of 6-bit scales and mins -> sc[8], mn[8] (bytes 0-3: scales 0-3 in their low 6
 * bits, the top 2 bits of scales 4-7; bytes 4-7: the same for the mins; bytes 8-11: the low nibbles of scales
 * 4-7 and, high, of mins 4-7) */
static inline void k_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[4 + j] & 63;
        sc[4 + j] = (uint8_t)((s[8 + j] & 15) | ((s[j] >> 2) & 0x30));
        mn[4 + j] = (uint8_t)((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30));
    }
}

/* Activations quantized for the integer dot products of linear_f32 (quantize_rows.c): x's rows in blocks, one fp32
 * scale each. In two int8 planes by default, x ~ d (q + lo / LOW_SCALE): 16 bits of precision, so that the kept
 * GGUF weights give what the same weights dequantized give (top-1 99.95% against 96.1% with one plane on the
 * embedded SmolLM2, benchmarks/quant_agreement.py); each weight block then takes two integer dot products with
 * an activation block. With X_INT8 in linear_f32's type, one plane: llama.cpp's numerics, ~1.3x faster at 8 and
 * more rows. s = the block's sum of x (as quantized): what a weight block's minimum (Q4_1, Q5_1) or offset
 * (Q4_0: q - 8, Q5_0: q - 16) multiplies. The K-quants' super-block keeps the sums of its 16-element groups
 * instead (their mins and Q6_K's offset apply per 32 or per 16). */
#define LOW_SCALE 256
#define X_INT8 0x100  /* a flag on linear_f32's weight type: x in one int8 plane */
typedef struct { float d, s; int8_t q[BLOCK]; int8_t lo[BLOCK]; } QBlock;
typedef struct { float d; float sums[SUPER_BLOCK / 16]; int8_t q[SUPER_BLOCK]; int8_t lo[SUPER_BLOCK]; } QSuperBlock;
void quantize_blocks(const float *x, int64_t K, QBlock *out, int planes);
void quantize_super_blocks(const float *x, int64_t K, QSuperBlock *out, int planes);

/* Vectors of 16 lanes: one AVX-512 register, two AVX2 ones */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(64)));
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

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

/* One bf16 value: rounded to nearest even as torch's .to(bfloat16), widened exactly */
INLINE uint16_t to_bf16(float x) {
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

INLINE vf max16(vf a, vf b) {
    const vi gt = a > b;
    return (vf)((gt & (vi)a) | (~gt & (vi)b));
}

INLINE vf combine16(vf x, vf y, const int max) { return max ? max16(x, y) : x + y; }

/* 16 partial-sum vectors in, one vector out whose lane t is the sum (or with `max`, the maximum) of a[t]'s
 * lanes: four rounds of shuffles and adds, each halving the vectors (a horizontal sum per vector costs ~2.5x
 * more) */
INLINE vf reduce16(const vf *a, const int max) {
    vf r[8], u[4], w[2];
    for (int k = 0; k < 8; k++) {
        const vf lo = SHUF(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        const vf hi = SHUF(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        r[k] = combine16(lo, hi, max);
    }
    for (int k = 0; k < 4; k++) {
        const vf lo = SHUF(r[2 * k], r[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
        const vf hi = SHUF(r[2 * k], r[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
        u[k] = combine16(lo, hi, max);
    }
    for (int k = 0; k < 2; k++) {
        const vf lo = SHUF(u[2 * k], u[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
        const vf hi = SHUF(u[2 * k], u[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
        w[k] = combine16(lo, hi, max);
    }
    const vf lo = SHUF(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const vf hi = SHUF(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return combine16(lo, hi, max);
}

INLINE vf sum16_rows(const vf *a) { return reduce16(a, 0); }
INLINE vf max16_rows(const vf *a) { return reduce16(a, 1); }

/* The attention kernels' online softmax keeps each row's reference HEADROOM above its largest score when it
 * last moved (e^8: probabilities up to ~3000 x the running maximum's, exact in fp32 and bf16): it moves only
 * when a score passes it, so the outputs are seldom rescaled */
#define HEADROOM 8.f

/* exp(x) for x <= 0 (every exponent of a softmax whose max is subtracted), 16 at a time: libm's expf is
 * scalar and took most of decode attention's time. 2^(x log2 e) split into 2^i (put into the float's exponent)
 * and 2^f, |f| <= 0.5, by a degree-6 Taylor series: relative error ~2e-7. Below EXP16_MIN the result is ~1e-38. */
#define EXP16_MIN (-87.f)
INLINE vf exp16(vf x) {
    const vi low = x < EXP16_MIN;
    x = (vf)((low & (vi)((vf){0} + EXP16_MIN)) | (~low & (vi)x));
    const vf t = x * 1.44269504f;
    const vi i = __builtin_convertvector(t - 0.5f, vi);  /* t <= 0: truncation of t - 0.5 rounds to nearest */
    const vf f = (t - __builtin_convertvector(i, vf)) * 0.693147181f;
    vf p = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
    return (vf)((vi)p + (i << 23));
}

#if NATIVE_BF16
INLINE __m512 widen_bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

INLINE __m512 bf16x16(const uint16_t *p) { return widen_bf16x16(_mm256_loadu_si256((const __m256i *)p)); }

INLINE __m512 round_bf16x16(__m512 x) {  /* to the nearest bf16, kept in fp32 */
    return widen_bf16x16((__m256i)_mm512_cvtneps_pbh(x));
}
#endif

/* AMX: 8 tiles of up to 16 rows x 64 bytes; a tile product multiplies A [rows x 32 bf16] by B [16 bf16 pairs x
 * 16 columns] (B in pair layout: row p holds inputs 2p and 2p + 1 of each column) into C [rows x 16 fp32] */
#define TILE_ROWS 16
#define TILE_ROW_BYTES 64
#define TILE_BYTES (TILE_ROWS * TILE_ROW_BYTES)
#define TILE_WORDS (TILE_BYTES / 4)
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

#if HAVE_AMX
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

/* amx.c: this thread's 8 tiles as 16 rows x 64 bytes; rows as AMX's B operand (used by linear.c and
 * prefill_attention.c) */
void amx_tiles_16x64(void);
void pack_rows(const uint16_t *x, int64_t stride, int64_t M, int64_t K, int64_t tiles, uint32_t *out);
#endif

/* The exported kernels (kernels/cpu/build.py declares each for ctypes). `amx`: amx_init()'s verdict (1 when it
 * returned 0); linear_bf16 and prefill_attention_bf16 exist only for AMX: call them only after amx_init()
 * returned 0 (built without AMX they return -1). */
int amx_init(void);
int decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                     const int64_t *tokens, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t block_size, float scale, int bf16, int amx, int num_threads);
int prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const int64_t *kv, const int64_t *starts,
                           const int64_t *seqs, int64_t nseqs, uint16_t *out, int64_t heads, int64_t kv_heads,
                           int64_t dim, float scale, int num_threads);
int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads);
int linear_f32(const float *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const float *bias, float *y,
               int64_t ldy, int num_threads);
int dequantize_rows(const void *w, int type, int64_t K, const int64_t *ids, int64_t n, float *out, int num_threads);
int interleaves(int type);
void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_bytes, int num_threads);
void rms_norm_bf16(uint16_t *x, const uint16_t *add, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t dim, float eps, int num_threads);
void silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t dim, int num_threads);
void rope_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const uint16_t *cos,
               const uint16_t *sin, int num_threads);
void sample_rows(const void *logits, int64_t rows, int64_t vocab, int bf16, const float *temperature, const float *u,
                 int64_t *out, int num_threads);
void rms_norm_f32(float *x, const float *add, const float *weight, float *out, int64_t rows, int64_t dim, float eps,
                  int num_threads);
void silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t dim, int num_threads);
void rope_f32(float *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const float *cos,
              const float *sin, int num_threads);
int decode_layers(int64_t layers, const int64_t *layer, const int64_t *dims, int64_t M, void *residual,
                  void *mlp_out, const void *cos, const void *sin, const int64_t *slots, const int64_t *tables,
                  int64_t table_stride, const int64_t *lens, const int64_t *rows, const int64_t *tokens, void *h,
                  void *qkv, void *attn, void *gate_up, void *act, float eps, float scale, int bf16, int amx,
                  int num_threads);

#endif

/* fp32 linear layers on GGUF weights read as they are stored: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * Dequantizing a GGUF file to fp32 at load makes a decode step read 4 bytes a weight (Q4_1: 0.625) and torch's
 * fp32 matrix-vector product runs on about one core. Here the weights stay in their blocks, llama.cpp's way:
 * x's rows are quantized once per call to int8 blocks (quantize_rows.c), and each weight block times an
 * activation block is an integer dot product (AVX2: vpmaddubsw, unsigned weight q times signed x q, then
 * vpmaddwd) scaled by the two blocks' scales in fp32; a minimum or offset of the weight block multiplies the
 * activation block's sum. x is held in two int8 planes (16 bits: the float path's greedy choices, 99.95%
 * top-1), the second's dot product added at 1/LOW_SCALE; X_INT8 in the type asks for one (llama.cpp's
 * numerics, 96.1%). The second plane cost, under load, 8.3 -> 9.3 ms per 30 layers at 1 row (+12%) and 31 -> 41
 * ms at 8 rows (+30%). The weight's F32 and F16 types take fp32 FMAs instead (no quantization of x).
 * Threads take output rows a chunk at a time (dynamic: a thread whose core another process took does not hold
 * the others at the end), CHUNKS_PER_THREAD chunks a thread: chunks of 16 rows (a few KB) interleaved between
 * the threads kept the hardware prefetcher from streaming, and the LM head's 17.7 MB took 1.31-1.41 ms against
 * 0.89-0.95 in 4 chunks a thread (30 layers at 1 row 6.6-7.1 -> 5.3-5.4 ms). Each weight row is read once per
 * call: dotted with X_ROWS rows of x at a time, its blocks decoded once for them. Rows interleaved 8 at a time
 * (ROWS8: quant_dots_rows8.h) leave the 8 rows' sums in one vector's lanes: at 1 / 8 / 32 rows, 30 layers of
 * Q4_1 6.7 / 18.4 / 57.6 ms against 8.2 / 25.3 / 89.3 in GGUF's order (both at 16-row chunks). Those kernels
 * prefetch PREFETCH_AHEAD bytes ahead (kernels.h): 30 layers of Q4_1 at one row 4.46 -> 3.96 ms, the embedded
 * model's single stream 135 -> 149 tok/s in one process; the GGUF-order loops gained nothing measurable.
 * Measured (benchmarks/linear_kernel.py, SmolLM2's 30 layers of linears, random blocks of the real shapes; one
 * thread, on a machine loaded by other work, so not final figures): CPU time per Q4_1 block at 1 row 2.5 ->
 * 2.05 ns (~15 instructions a block, below), 1.16 ns a block-row at 4 rows; wall ms per 30 layers at 1 / 8 / 32
 * rows: ours Q4_1 27 / 103 / 379, F.linear on the fp32 weights 93 / 239 / 398, torch's int8pack 305 / 2615 /
 * 9560 and int4pack 647 / 5223 / 20698. At 512 rows torch's fp32 matmul wins (7.8 s against 14.9 s): the
 * Python wrapper then dequantizes tiles instead (10.1 s). With 2 threads under that load the region's join,
 * waiting for a thread whose core another process holds, cost more than the kernel (50-150 ms per 30 layers). */
#include "kernels.h"
#include "quant_dots.h"
#include "quant_dots_rows8.h"

#define CHUNK 16  /* output rows a thread takes at a time, at least */
#define CHUNKS_PER_THREAD 4  /* else as many rows as this gives each thread */
#define PARALLEL_QUANTIZE_ROWS 64  /* from here x's rows are quantized by all the threads (~1 us a row of 1536) */

/* A type's dot products, R = 1 and R = X_ROWS, P = 1 and 2 planes: each a specialized copy of the loops in quant_dots.h */
typedef void (*DotFn)(const uint8_t *w, const char *x, int64_t x_stride, int64_t n, float *out);
typedef struct { DotFn one, rows; } Dots;  /* for one row of x, and for X_ROWS */
#define DOTS(name, kernel, type)                                                                              \
    static void name##_1(const uint8_t *w, const char *x, int64_t s, int64_t n, float *o) {                   \
        kernel(w, x, s, n, o, type, 1, 2);                                                                    \
    }                                                                                                         \
    static void name##_rows(const uint8_t *w, const char *x, int64_t s, int64_t n, float *o) {                \
        kernel(w, x, s, n, o, type, X_ROWS, 2);                                                               \
    }                                                                                                         \
    static void name##_1_int8(const uint8_t *w, const char *x, int64_t s, int64_t n, float *o) {              \
        kernel(w, x, s, n, o, type, 1, 1);                                                                    \
    }                                                                                                         \
    static void name##_rows_int8(const uint8_t *w, const char *x, int64_t s, int64_t n, float *o) {           \
        kernel(w, x, s, n, o, type, X_ROWS, 1);                                                               \
    }
DOTS(f32, dot_floats, F32)
DOTS(f16, dot_floats, F16)
DOTS(q4_0, dot_blocks, Q4_0)
DOTS(q4_1, dot_blocks, Q4_1)
DOTS(q5_0, dot_blocks, Q5_0)
DOTS(q5_1, dot_blocks, Q5_1)
DOTS(q8_0, dot_blocks, Q8_0)
DOTS(q4_k, dot_super_blocks, Q4_K)
DOTS(q5_k, dot_super_blocks, Q5_K)
DOTS(q6_k, dot_super_blocks, Q6_K)

/* The same on rows interleaved 8 at a time (ROWS8): the 32-blocks, out[8 r + i] for 8 weight rows */
DOTS(q4_0_rows8, dot_rows8, Q4_0)
DOTS(q4_1_rows8, dot_rows8, Q4_1)
DOTS(q5_0_rows8, dot_rows8, Q5_0)
DOTS(q5_1_rows8, dot_rows8, Q5_1)
DOTS(q8_0_rows8, dot_rows8, Q8_0)
DOTS(q4_k_rows8, dot_rows8, Q4_K)
DOTS(q5_k_rows8, dot_rows8, Q5_K)
DOTS(q6_k_rows8, dot_rows8, Q6_K)

static int dots8(int type, int planes, Dots *out) {
    switch (type) {
#define CASE(T, name)                                                                                         \
    case T:                                                                                                   \
        *out = planes == 2 ? (Dots){name##_1, name##_rows} : (Dots){name##_1_int8, name##_rows_int8};        \
        return 0;
    CASE(Q4_0, q4_0_rows8) CASE(Q4_1, q4_1_rows8) CASE(Q5_0, q5_0_rows8) CASE(Q5_1, q5_1_rows8)
    CASE(Q8_0, q8_0_rows8) CASE(Q4_K, q4_k_rows8) CASE(Q5_K, q5_k_rows8) CASE(Q6_K, q6_k_rows8)
#undef CASE
    default: return 1;
    }
}

/* Whether this build reads `type` faster interleaved (ROWS8) than in GGUF's order: what the engine asks before
 * it interleaves a weight (ops/cpu_ops.py prepare) */
int interleaves(int type) { return HAVE_AVX2 && block_elems(type) > 1; }

/* The dot products for a type, x in `planes` planes; 1 for a type it cannot read */
static int dots(int type, int planes, Dots *out) {
    switch (type) {
#define CASE(T, name)                                                                                         \
    case T:                                                                                                   \
        *out = planes == 2 ? (Dots){name##_1, name##_rows} : (Dots){name##_1_int8, name##_rows_int8};        \
        return 0;
    CASE(F32, f32) CASE(F16, f16) CASE(Q4_0, q4_0) CASE(Q4_1, q4_1) CASE(Q5_0, q5_0) CASE(Q5_1, q5_1)
    CASE(Q8_0, q8_0) CASE(Q4_K, q4_k) CASE(Q5_K, q5_k) CASE(Q6_K, q6_k)
#undef CASE
    default: return 1;
    }
}

static void quantize(const float *x, int64_t M, int64_t K, int super, int planes, char *xq, int64_t x_stride) {
    for (int64_t m = 0; m < M; m++) {
        if (super) quantize_super_blocks(x + m * K, K, (QSuperBlock *)(xq + m * x_stride), planes);
        else quantize_blocks(x + m * K, K, (QBlock *)(xq + m * x_stride), planes);
    }
}

/* Outputs 8g .. 8g + 7 of every row of x, from the group's interleaved rows at w */
static void rows8_outputs(const Dots *dot, const uint8_t *w, const char *xq, int64_t x_stride, int64_t n, int64_t M,
                          const float *bias, int64_t g, int64_t ldy, float *y) {
    float out[X_ROWS * INTERLEAVE];
    for (int64_t m = 0; m < M;) {
        const int R = M - m >= X_ROWS ? X_ROWS : 1;
        (R == X_ROWS ? dot->rows : dot->one)(w, xq + m * x_stride, x_stride, n, out);
        for (int r = 0; r < R; r++)
            for (int i = 0; i < INTERLEAVE; i++)
                y[(m + r) * ldy + g * INTERLEAVE + i] = out[INTERLEAVE * r + i] + (bias ? bias[g * INTERLEAVE + i] : 0.f);
        m += R;
    }
}

/* y's rows are ldy floats apart (N for a whole y; more where y is N columns of a wider one). Returns 0; 1 for a
 * type it cannot read, 2 for K not a multiple of the type's block, 3 without memory, 4 for interleaved rows
 * (ROWS8) when N is not a multiple of 8. The type may carry X_INT8 (x in one int8 plane instead of two) and ROWS8 */
int linear_f32(const float *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const float *bias, float *y,
               int64_t ldy, int num_threads) {
    const int planes = type & X_INT8 ? 1 : 2, rows8 = (type & ROWS8) != 0;
    type &= ~(X_INT8 | ROWS8);
    Dots dot;
    if (rows8 ? dots8(type, planes, &dot) : dots(type, planes, &dot)) return 1;
    const int64_t elems = block_elems(type), row_bytes = K / elems * block_bytes(type);
    if (K % elems) return 2;
    if (rows8 && N % INTERLEAVE) return 4;
    if (M <= 0 || N <= 0) return 0;
    /* x as the dot products read it: fp32 rows for F32 / F16, else its quantized blocks */
    const int quantized = elems > 1, super = elems == SUPER_BLOCK;
    const int64_t n = quantized ? K / elems : K;  /* what a dot product counts: blocks, or values */
    const int64_t x_stride = !quantized ? K * (int64_t)sizeof(float)
                             : super    ? n * (int64_t)sizeof(QSuperBlock)
                                        : n * (int64_t)sizeof(QBlock);
    char *xq = quantized ? malloc(M * x_stride) : (char *)x;
    if (!xq) return 3;
    /* a few rows (every decode step) are quantized here, before the threads start: a loop shared by the threads
     * ends in a barrier, where a thread whose core another process holds would keep the others waiting */
    const int serial = M < PARALLEL_QUANTIZE_ROWS;
    /* rows a thread takes at a time: CHUNKS_PER_THREAD runs per thread, each read in one stream */
    const int64_t share = N / (CHUNKS_PER_THREAD * num_threads) / INTERLEAVE * INTERLEAVE;
    const int64_t chunk = share > CHUNK ? share : CHUNK;
    if (quantized && serial) quantize(x, M, K, super, planes, xq, x_stride);
#pragma omp parallel num_threads(num_threads)
    {
        if (quantized && !serial) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) quantize(x + m * K, 1, K, super, planes, xq + m * x_stride, x_stride);
        }
        if (rows8) {
#pragma omp for schedule(dynamic, chunk / INTERLEAVE)
            for (int64_t g = 0; g < N / INTERLEAVE; g++)
                rows8_outputs(&dot, (const uint8_t *)w + g * INTERLEAVE * row_bytes, xq, x_stride, n, M, bias, g, ldy, y);
        } else
#pragma omp for schedule(dynamic, chunk)
        for (int64_t j = 0; j < N; j++) {
            const uint8_t *wr = (const uint8_t *)w + j * row_bytes;
            const float b = bias ? bias[j] : 0.f;
            float out[X_ROWS];
            int64_t m = 0;
            for (; m + X_ROWS <= M; m += X_ROWS) {
                dot.rows(wr, xq + m * x_stride, x_stride, n, out);
                for (int r = 0; r < X_ROWS; r++) y[(m + r) * ldy + j] = out[r] + b;
            }
            for (; m < M; m++) {
                dot.one(wr, xq + m * x_stride, x_stride, n, out);
                y[m * ldy + j] = out[0] + b;
            }
        }
    }
    if (quantized) free(xq);
    return 0;
}

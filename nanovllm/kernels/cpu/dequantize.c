/* GGUF weight rows dequantized to fp32, value for value what gguf-py's gguf.dequantize computes.
 *
 * For an embedding lookup (the rows of the tokens asked for), for a prefill that dequantizes a tile of rows and
 * hands it to torch.mm, and for tests. Exact: every product here (d q, d sc, d sc q with q of at most 6 bits and
 * scales of at most 8) fits fp32's 24-bit mantissa, so only the one add of a minimum rounds, as in numpy; an
 * FMA or -ffast-math's reassociation gives the same bits. Plain C: gcc vectorizes the loops well enough for what
 * reads it (a 256-row tile of SmolLM2's gate/up, 576 inputs, in ~0.1 ms). */
#include "kernels.h"

#define ROWS_PER_TASK 16  /* rows a thread takes at a time */

INLINE void dequantize_block(const uint8_t *b, const int type, float *out) {
    switch (type) {
    /* the 32-blocks: element i < 16 in the low nibble of byte i, i + 16 in its high nibble (two stores a byte:
     * loops gcc vectorizes, ~3x the speed of one element at a time) */
    case Q4_0: {
        const float d = read_half(b);
        const uint8_t *qs = b + 2;
        for (int i = 0; i < 16; i++) {
            out[i] = d * (float)((qs[i] & 15) - 8);
            out[i + 16] = d * (float)((qs[i] >> 4) - 8);
        }
        break;
    }
    case Q4_1: {
        const float d = read_half(b), m = read_half(b + 2);
        const uint8_t *qs = b + 4;
        for (int i = 0; i < 16; i++) {
            out[i] = d * (float)(qs[i] & 15) + m;
            out[i + 16] = d * (float)(qs[i] >> 4) + m;
        }
        break;
    }
    case Q5_0: {
        const float d = read_half(b);
        const uint32_t h = read_u32(b + 2);
        const uint8_t *qs = b + 6;
        for (int i = 0; i < 16; i++) {
            out[i] = d * (float)((int)((qs[i] & 15) | (h >> i & 1) << 4) - 16);
            out[i + 16] = d * (float)((int)((qs[i] >> 4) | (h >> (i + 16) & 1) << 4) - 16);
        }
        break;
    }
    case Q5_1: {
        const float d = read_half(b), m = read_half(b + 2);
        const uint32_t h = read_u32(b + 4);
        const uint8_t *qs = b + 8;
        for (int i = 0; i < 16; i++) {
            out[i] = d * (float)((qs[i] & 15) | (h >> i & 1) << 4) + m;
            out[i + 16] = d * (float)((qs[i] >> 4) | (h >> (i + 16) & 1) << 4) + m;
        }
        break;
    }
    case Q8_0: {
        const float d = read_half(b);
        for (int i = 0; i < BLOCK; i++) out[i] = d * (float)(int8_t)b[2 + i];
        break;
    }
    case Q4_K:
    case Q5_K: {
        const float d = read_half(b), dmin = read_half(b + 2);
        uint8_t sc[8], mn[8];
        k_scales(b + 4, sc, mn);
        const uint8_t *qh = b + 4 + K_SCALE_BYTES, *qs = type == Q5_K ? qh + 32 : qh;
        for (int j = 0; j < 8; j++) {  /* sub-block j: nibbles of bytes 32 (j / 2) .., low for even j */
            const float scale = d * (float)sc[j], min = dmin * (float)mn[j];
            const uint8_t *q = qs + 32 * (j / 2);
            for (int l = 0; l < 32; l++) {
                int v = (j & 1) ? q[l] >> 4 : q[l] & 15;
                if (type == Q5_K) v |= (qh[l] >> j & 1) << 4;
                out[32 * j + l] = scale * (float)v - min;
            }
        }
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = read_half(b + 208);
        for (int h = 0; h < 2; h++)  /* halves of 128: ql bytes 64 h .., qh bytes 32 h .. */
            for (int s = 0; s < 4; s++)  /* quarters of 32: low nibbles of ql 0-31, 32-63, then high nibbles */
                for (int l = 0; l < 32; l++) {
                    const int e = 128 * h + 32 * s + l, byte = ql[64 * h + 32 * (s & 1) + l];
                    const int low = s < 2 ? byte & 15 : byte >> 4, high = qh[32 * h + l] >> (2 * s) & 3;
                    out[e] = d * (float)scales[e / 16] * (float)((low | high << 4) - 32);
                }
        break;
    }
    }
}

/* Row i's block out of a run of 8 interleaved ones (ROWS8, kernels.h), the same values as dequantize_block: Q4_0,
 * Q4_1 and Q8_0 read in place (a 256-row tile of them 15% faster than gathered first), the others gathered back
 * to GGUF's order */
INLINE void dequantize_run_row(const uint8_t *run, const int type, int i, float *out) {
    const uint8_t *q = run + INTERLEAVE * scale_bytes(type) + 4 * i;  /* unit c of row i: q + 32 c */
    const float d = read_half(run + 2 * i), m = type == Q4_1 ? read_half(run + 2 * INTERLEAVE + 2 * i) : 0.f;
    switch (type) {
    case Q8_0:
        for (int c = 0; c < 8; c++)
            for (int t = 0; t < 4; t++) out[4 * c + t] = d * (float)(int8_t)q[32 * c + t];
        return;
    case Q4_0:
    case Q4_1:
        for (int c = 0; c < 4; c++)
            for (int t = 0; t < 4; t++) {
                const int lo = q[32 * c + t] & 15, hi = q[32 * c + t] >> 4;
                out[4 * c + t] = type == Q4_0 ? d * (float)(lo - 8) : d * (float)lo + m;
                out[16 + 4 * c + t] = type == Q4_0 ? d * (float)(hi - 8) : d * (float)hi + m;
            }
        return;
    default: {
        uint8_t blk[MAX_INTERLEAVED_BYTES];
        gather_block(run, type, i, blk);
        dequantize_block(blk, type, out);
    }
    }
}

/* Row `row` of weights interleaved 8 rows at a time */
static void dequantize_interleaved(const uint8_t *w, int type, int64_t K, int64_t row, float *out) {
    const int64_t bytes = block_bytes(type), elems = block_elems(type), nb = K / elems;
    const uint8_t *runs = w + row / INTERLEAVE * INTERLEAVE * nb * bytes;
    const int i = (int)(row % INTERLEAVE);
    switch (type) {  /* a loop for each type, as in dequantize_rows */
#define RUNS(T)                                                                                               \
    case T:                                                                                                   \
        for (int64_t b = 0; b < nb; b++) dequantize_run_row(runs + b * INTERLEAVE * bytes, T, i, out + b * elems); \
        break;
        RUNS(Q4_0) RUNS(Q4_1) RUNS(Q5_0) RUNS(Q5_1) RUNS(Q8_0) RUNS(Q4_K) RUNS(Q5_K) RUNS(Q6_K)
#undef RUNS
    }
}

/* out[r, :] = row ids[r] (or r) of w dequantized; the type may carry ROWS8 (a 32-block type interleaved).
 * Returns 0; 1 for a type it cannot read, 2 for K not a multiple of the type's block */
int dequantize_rows(const void *w, int type, int64_t K, const int64_t *ids, int64_t n, float *out, int num_threads) {
    const int rows8 = (type & ROWS8) != 0;
    type &= ~ROWS8;
    const int64_t elems = block_elems(type), bytes = block_bytes(type);
    if (!elems || (rows8 && elems == 1)) return 1;
    if (K % elems) return 2;
    const int64_t row_bytes = K / elems * bytes;
#pragma omp parallel for schedule(dynamic, ROWS_PER_TASK) num_threads(num_threads)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = (const uint8_t *)w + (ids ? ids[r] : r) * row_bytes;
        float *o = out + r * K;
        if (rows8) dequantize_interleaved(w, type, K, ids ? ids[r] : r, o);
        else if (type == F32) memcpy(o, row, K * sizeof(float));
        else if (type == F16)
            for (int64_t i = 0; i < K; i++) o[i] = read_half(row + 2 * i);
        else
            switch (type) {  /* a loop for each type: its block's code inlined, the type's tests folded away */
#define ROW(T)                                                                                                \
    case T:                                                                                                   \
        for (int64_t b = 0; b < K / elems; b++) dequantize_block(row + b * bytes, T, o + b * elems);          \
        break;
                ROW(Q4_0) ROW(Q4_1) ROW(Q5_0) ROW(Q5_1) ROW(Q8_0) ROW(Q4_K) ROW(Q5_K) ROW(Q6_K)
#undef ROW
            }
    }
    return 0;
}

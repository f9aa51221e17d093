/* Decode attention over the paged KV cache: one query token per sequence, keys and values read in place through
 * the block table (torch has to gather them into a contiguous copy first). Per work unit a chunk of CHUNK
 * cached positions at a time: the chunk's scores, an online softmax, the value sums. Scores and value sums on
 * AMX where granted (amx), with vdpbf16ps on AVX512-BF16, else in plain vectors.
 * Measured (docs/benchmarks.md, benchmarks/attention_kernel.py: 30 layers, 44 sequences, contexts 300-700):
 * scores on AMX took the compute alone 24.5 -> 19.8 ms, value sums on AMX 20.5 -> 16 ms; the next chunk's
 * prefetches spread over the value sums 43.8 -> 38.3-38.9 ms from memory; the softmax's reference moved only
 * when a score passes it 15.9-16.3 -> 15.4-15.7 ms (compute); chunks of 64 or 256 tokens were not faster. */
#include "decode_attention_loops.h"

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
            for (int64_t t = t0 + KEYS_AHEAD; t < t0 + KEYS_AHEAD + 16 && t < n; t++)
                for (int64_t b = h0 * row; b < h1 * row; b += CACHE_LINE) __builtin_prefetch(w->tok[t] + b);
            if (start == 0 || !PAIRED_PV(bf16, nv))
                for (int64_t t = t0; t < t0 + 16 && t < n; t++)
                    for (int64_t b = h0 * row; b < h1 * row; b += CACHE_LINE)
                        __builtin_prefetch(w->tok[t] + vbase + b, 0, 2);
            if (amx) {
                scores_amx(w, w->tok[t0], token_bytes, t0, n - t0, h0, h1, group, nv, scale);
                continue;
            }
            for (int64_t i = 0; i < heads; i++) {
                const vf x = scores16(q + (h0 * group + i) * row, w->tok + t0, n - t0, (h0 + i / group) * row, nv,
                                      bf16) * scale;
                memcpy(&w->s[i][t0], &x, sizeof x);
            }
        }
        w->next_row = w->next_rows = w->next_col = 0;
        w->row_lines = (h1 - h0) * row / CACHE_LINE;
        w->vbase = vbase;
        for (int64_t pos = start + CHUNK, blk = pos / block_size, off = pos % block_size;
             pos < start + 2 * CHUNK && pos < len; pos++) {
            const char *key = k_cache + (table[blk] * block_size + off) * token_bytes + h0 * row;
            if (++off == block_size) off = 0, blk++;
            w->next[w->next_rows++] = key;
            if (pos < start + CHUNK + NEXT_KEYS_AT_ONCE && !PAIRED_PV(bf16, nv))  /* paired: the value sums do */
                for (int64_t b = 0; b < (h1 - h0) * row; b += CACHE_LINE) __builtin_prefetch(key + b);
        }
        for (int64_t i = 0; i < heads; i++) {
            vf mx = (vf){0} + m[i], sum = (vf){0};
            for (int64_t c = 0; c < n; c += 16) {
                vf x;
                memcpy(&x, &w->s[i][c], sizeof x);
                mx = max16(x, mx);
            }
            /* m[i]: the head's reference, HEADROOM above its largest score when it last moved (kernels.h) */
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
#if HAVE_AVX2 && !defined(__AVX512F__)
            pv_avx2(o + i0 * nv, w, i0, vbase + h * row, n, group, nv, bf16);
            continue;
#endif
            for (int64_t g = 0; g < group; g++) {
                vf acc[nv];
                for (int c = 0; c < nv; c++) acc[c] = o[(i0 + g) * nv + c];
                for (int64_t t = 0; t < n; t++)
                    for (int c = 0; c < nv; c++)
                        acc[c] += w->s[i0 + g][t] * load16(w->tok[t] + vbase + h * row + c * 16 * elem, bf16);
                for (int c = 0; c < nv; c++) o[(i0 + g) * nv + c] = acc[c];
            }
        }
    }
    if (PAIRED_PV(bf16, nv))
        for (int64_t i = 0; i < heads * nv; i += 2) unpair(o + i);
    for (int64_t i = 0; i < heads; i++)
        for (int c = 0; c < nv; c++) store16(out + (i * nv + c) * 16 * elem, o[i * nv + c] * (1.f / l[i]), bf16);
}


/* Each thread's work arrays, their address taken once from a call the compiler cannot repeat: with the
 * thread-local variable named in attend(), gcc recomputed its address (a __tls_get_addr call in a shared
 * library) inside the fp32 value sums' innermost loop (perf, AVX2). Alone this gained nothing measurable there:
 * the cost was the accumulators moved through the stack, which pv_avx2 removed (decode_attention_loops.h) */
static __thread Scratch thread_work;
static __attribute__((noinline)) Scratch *thread_scratch(void) { return &thread_work; }

/* q: [tokens, q_stride] rows whose first heads * head_dim values are the queries; out: [tokens, heads,
 * head_dim]; both the cache's dtype; caches: [blocks, block_size, kv_heads, head_dim] fp32 or bf16; row b of the
 * batch is sequence rows[b] (its block table and context length) with its query at token tokens[b]. amx: 1 once
 * amx_init() granted AMX (bf16 scores and value sums then run on tiles where the sizes allow).
 * Work units: one sequence with all its KV heads (whole token rows: contiguous reads) when there are enough
 * sequences to keep the threads busy, else one (sequence, KV head). Returns 0, or -1 if a size exceeds this
 * kernel's limits (checked by the caller too). */
int decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                     const int64_t *tokens, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t block_size, float scale, int bf16, int amx, int num_threads) {
    const int64_t group = heads / kv_heads, elem = bf16 ? 2 : 4, token_bytes = kv_heads * head_dim * elem;
    if (group > MAX_UNIT_HEADS || head_dim % 16 || head_dim > 16 * MAX_VECTORS) return -1;
    int64_t per_unit = batch >= 4 * num_threads ? kv_heads : 1;
    while (per_unit * group > MAX_UNIT_HEADS) per_unit--;
    const int64_t units_per_seq = -(-kv_heads / per_unit);
    const int nv = head_dim / 16;
    const int tiles = AMX_SCORES && amx && bf16 && nv % 2 == 0 && block_size % 16 == 0 && group <= TILE_ROWS
                      && per_unit * nv / 2 <= MAX_Q_TILES;
#pragma omp parallel num_threads(num_threads)
    {
    if (tiles) attention_tiles((int)group);
    Scratch *scratch = thread_scratch();
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < batch * units_per_seq; u++) {
        const int64_t b = u / units_per_seq, h0 = u % units_per_seq * per_unit;
        const int64_t h1 = h0 + per_unit < kv_heads ? h0 + per_unit : kv_heads;
        const char *qb = (const char *)q + tokens[b] * q_stride * elem;
        char *ob = (char *)out + (tokens[b] * heads + h0 * group) * head_dim * elem;
        const int64_t *table = tables + rows[b] * table_stride, len = lens[rows[b]];
        /* attend() with the common head sizes (nv 4 and 8), the cache type and the path as constants: each call
         * inlines its own specialised copy */
        if (tiles && nv == 4)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, 4, 1, 1);
        else if (tiles)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, nv, 1, 1);
        else if (nv == 4 && !bf16)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, 4, 0, 0);
        else if (nv == 4)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, 4, 1, 0);
        else if (nv == 8 && !bf16)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, 8, 0, 0);
        else if (nv == 8)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, 8, 1, 0);
        else if (!bf16)
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, nv, 0, 0);
        else
            attend(qb, ob, scale, k_cache, v_cache, table, len, block_size, token_bytes, h0, h1, group, scratch, nv, 1, 0);
    }
    }
    return 0;
}

/* Causal prefill attention on CPU with AMX (flash attention): bf16 prompt chunks, each sequence's queries over
 * its keys and values: the chunk's own, read in place from the QKV projection's output, or a cached prefix and
 * them, gathered from the paged cache.
 *
 * torch's flash SDPA for CPU reaches ~0.1-0.25 TFLOP/s here (a fifth of a prefill step). Per (sequence, KV
 * head) the keys are packed as AMX's B operand and the values in key pairs; then per (query head, block of 16
 * queries): S = Q K^T on tiles for 32 keys at a time, an online softmax in AVX-512 (probabilities rounded to
 * bf16 as flash attention does), O += P V with O kept in fp32 and loaded into the accumulator tiles.
 * Measured (docs/benchmarks.md, benchmarks/attention_kernel.py --prefill: 30 layers of 7 prompts, 2,161
 * tokens): SDPA 196-220 ms, this kernel 84-92 ms at first; the softmax's row maxima and sums by transposed
 * reductions and its 16 rescale factors from one exp16 then 84-86 -> 65 ms, the moving reference 54-58 -> 50-54. */
#include "kernels.h"

#if HAVE_AMX
#define KEY_BLOCK 32                 /* keys per block of scores: two C tiles of 16 */
#define TILE_BF16 (TILE_BYTES / 2)   /* bf16 values in a packed tile */

/* exp16 and the 16-row reductions as calls, not inlined into the softmax: the code measured above called them
 * in another file (noipa: the caller saves its registers around them as it did then) */
static __attribute__((noipa)) __m512 exp16_call(__m512 x) { return (__m512)exp16((vf)x); }
static __attribute__((noipa)) vf max16_rows_call(const vf *a) { return max16_rows(a); }
static __attribute__((noipa)) vf sum16_rows_call(const vf *a) { return sum16_rows(a); }

/* values [n, dim] (rows `stride` apart) -> [key pairs / 16][dim / 16][16 pairs][16 dims] of (v[2p][d], v[2p+1][d]):
 * AMX's B operand for P V, 32 keys x 16 dims a tile; keys past n zero */
static void pack_values(const uint16_t *v, int64_t stride, int64_t n, int64_t dim, int64_t blocks, uint32_t *out) {
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t d = 0; d < dim / 16; d++)
            for (int p = 0; p < 16; p++) {
                const int64_t k0 = b * KEY_BLOCK + 2 * p;
                const uint16_t *row = v + k0 * stride + d * 16;
                const __m512i lo = k0 < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)row))
                                          : _mm512_setzero_si512();
                const __m512i hi = k0 + 1 < n
                    ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + stride)))
                    : _mm512_setzero_si512();
                _mm512_store_si512(out + ((b * (dim / 16) + d) * 16 + p) * 16,
                                   _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
}

/* q: [T, heads, dim] bf16 rows q_stride elements apart; starts [B + 1]: each sequence's first row; seqs: the
 * sequences to attend, and per listed sequence i, kv[4 i ..]: its keys' and values' first rows (bf16 [nk,
 * kv_heads, dim], rows kv[4 i + 2] elements apart, keys and values alike) and their count nk: a cached prefix
 * then the step's own rows, or those alone (views of the QKV output). The step's n query rows sit at positions
 * nk - n .. nk - 1. out [T, heads, dim] bf16. dim a multiple of 32 up to MAX_HEAD_DIM. Returns 0, -1 if a size is
 * out of range, -2 without memory for the packed keys and values. */
int prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const int64_t *kv, const int64_t *starts,
                           const int64_t *seqs, int64_t nseqs, uint16_t *out, int64_t heads, int64_t kv_heads,
                           int64_t dim, float scale, int num_threads) {
    if (dim % 32 || dim > MAX_HEAD_DIM || heads % kv_heads) return -1;
    const int64_t group = heads / kv_heads, dsteps = dim / 32;
    /* packed keys and values of every (sequence, KV head), KEY_BLOCK keys a block */
    int64_t *offset = malloc((nseqs + 1) * sizeof(int64_t)), *unit_start = malloc((nseqs + 1) * sizeof(int64_t));
    if (!offset || !unit_start) return free(offset), free(unit_start), -2;
    offset[0] = 0;
    for (int64_t i = 0; i < nseqs; i++) {
        if (kv[4 * i + 3] < starts[seqs[i] + 1] - starts[seqs[i]]) return free(offset), free(unit_start), -1;
        offset[i + 1] = offset[i] + (kv[4 * i + 3] + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK * dim * kv_heads;
    }
    uint16_t *kp = aligned_alloc(64, offset[nseqs] * 2 + 64), *vp = aligned_alloc(64, offset[nseqs] * 2 + 64);
    if (!kp || !vp) return free(kp), free(vp), free(offset), free(unit_start), -2;  /* the caller falls back */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t u = 0; u < nseqs * kv_heads; u++) {
        const int64_t i = u / kv_heads, h = u % kv_heads, stride = kv[4 * i + 2], nk = kv[4 * i + 3];
        const int64_t base = offset[i] + h * (offset[i + 1] - offset[i]) / kv_heads;
        pack_rows((const uint16_t *)kv[4 * i] + h * dim, stride, nk, dim, (nk + 15) / 16, (uint32_t *)(kp + base));
        pack_values((const uint16_t *)kv[4 * i + 1] + h * dim, stride, nk, dim, (nk + KEY_BLOCK - 1) / KEY_BLOCK,
                    (uint32_t *)(vp + base));
    }
    /* work units: (sequence, query head, block of 16 queries) */
    unit_start[0] = 0;
    for (int64_t i = 0; i < nseqs; i++)
        unit_start[i + 1] = unit_start[i] + heads * ((starts[seqs[i] + 1] - starts[seqs[i]] + 15) / 16);
#pragma omp parallel num_threads(num_threads)
    {
        amx_tiles_16x64();
        float o[TILE_ROWS * MAX_HEAD_DIM] __attribute__((aligned(64)));
        float sc[TILE_ROWS * KEY_BLOCK] __attribute__((aligned(64)));
        uint16_t p[TILE_ROWS * KEY_BLOCK] __attribute__((aligned(64)));
        uint16_t qpad[TILE_ROWS * MAX_HEAD_DIM] __attribute__((aligned(64)));
        float m[16], l[16], alpha[16];
        int64_t i = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < unit_start[nseqs]; u++) {
            while (u >= unit_start[i + 1]) i++;  /* units are handed out in order: i only moves forward */
            while (u < unit_start[i]) i--;
            const int64_t s = starts[seqs[i]], n = starts[seqs[i] + 1] - s, blocks16 = (n + 15) / 16;
            const int64_t nk = kv[4 * i + 3], cached = nk - n;  /* keys before this step's first query */
            const int64_t h = (u - unit_start[i]) / blocks16, i0 = (u - unit_start[i]) % blocks16 * 16;
            const int rows = n - i0 < 16 ? (int)(n - i0) : 16;
            const int64_t per_head = (offset[i + 1] - offset[i]) / kv_heads;
            const uint16_t *kh = kp + offset[i] + h / group * per_head, *vh = vp + offset[i] + h / group * per_head;
            const uint16_t *qh = q + (s + i0) * q_stride + h * dim;
            int64_t qstride = q_stride;
            if (rows < 16) {  /* the last block: copy its rows, so the tile loads read no row past the sequence */
                memset(qpad, 0, sizeof qpad);
                for (int r = 0; r < rows; r++) memcpy(qpad + r * dim, qh + r * q_stride, dim * 2);
                qh = qpad, qstride = dim;
            }
            for (int r = 0; r < 16; r++) m[r] = -FLT_MAX, l[r] = 0.f;  /* not -inf: built with -ffast-math */
            memset(o, 0, 16 * dim * sizeof(float));
            const int64_t last = cached + i0 + rows - 1;  /* the last query's position: no later key is seen */
            for (int64_t kb = 0; kb * KEY_BLOCK <= last; kb++) {
                _tile_zero(0);
                _tile_zero(1);
                for (int64_t d = 0; d < dsteps; d++) {
                    _tile_loadd(4, qh + d * 32, qstride * 2);
                    const uint16_t *kt = kh + (d * ((nk + 15) / 16) + kb * 2) * TILE_BF16;
                    _tile_loadd(6, kt, TILE_ROW_BYTES);
                    _tile_dpbf16ps(0, 4, 6);
                    if (kb * KEY_BLOCK + 16 < nk) {
                        _tile_loadd(7, kt + TILE_BF16, TILE_ROW_BYTES);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                }
                _tile_stored(0, sc, KEY_BLOCK * sizeof(float));
                _tile_stored(1, sc + 16, KEY_BLOCK * sizeof(float));
                /* the online softmax of the block's 16 rows, vectorized across rows where it can be: the rows'
                 * maxima and sums by transposed reductions, their rescale factors in one exp */
                __m512 best[16], sums[16];
                __mmask16 k0[16], k1[16];
                const __m512 ninf = _mm512_set1_ps(-FLT_MAX), sv = _mm512_set1_ps(scale);
                for (int r = 0; r < 16; r++) {
                    /* causal: key j is seen by the query at position cached + i0 + r when j <= that position
                     * (rows past the block's end too: they are never written out) */
                    const int64_t seen = cached + i0 + r - kb * KEY_BLOCK + 1;  /* keys of this block seen by this row */
                    k0[r] = seen >= 16 ? 0xffff : seen <= 0 ? 0 : (__mmask16)((1u << seen) - 1);
                    k1[r] = seen >= KEY_BLOCK ? 0xffff : seen <= 16 ? 0 : (__mmask16)((1u << (seen - 16)) - 1);
                    const __m512 s0 = _mm512_mask_mul_ps(ninf, k0[r], _mm512_load_ps(sc + r * KEY_BLOCK), sv);
                    const __m512 s1 = _mm512_mask_mul_ps(ninf, k1[r], _mm512_load_ps(sc + r * KEY_BLOCK + 16), sv);
                    _mm512_store_ps(sc + r * KEY_BLOCK, s0);
                    _mm512_store_ps(sc + r * KEY_BLOCK + 16, s1);
                    best[r] = _mm512_max_ps(s0, s1);
                }
                /* m: each row's reference, HEADROOM above the largest score when last moved; it moves only when
                 * a score passes it (exponents stay <= 0), so O is seldom rescaled: rescaling O in memory right
                 * before the tile loads read it stalled them (a sixth of the kernel) */
                const __m512 m_old = _mm512_loadu_ps(m), m_blk = (__m512)max16_rows_call((const vf *)best);
                const __m512 m_new = _mm512_mask_add_ps(m_old, _mm512_cmp_ps_mask(m_blk, m_old, _CMP_GT_OQ), m_blk,
                                                        _mm512_set1_ps(HEADROOM));
                _mm512_storeu_ps(alpha, exp16_call(_mm512_sub_ps(m_old, m_new)));  /* 1 where the reference stayed */
                _mm512_storeu_ps(m, m_new);
                for (int r = 0; r < 16; r++) {  /* rows that have seen nothing yet get no weights (all masked) */
                    const __m512 mv = _mm512_set1_ps(m[r]);
                    const __m512 s0 = _mm512_load_ps(sc + r * KEY_BLOCK), s1 = _mm512_load_ps(sc + r * KEY_BLOCK + 16);
                    const __m512 e0 = _mm512_maskz_mov_ps(k0[r], exp16_call(_mm512_sub_ps(s0, mv)));
                    const __m512 e1 = _mm512_maskz_mov_ps(k1[r], exp16_call(_mm512_sub_ps(s1, mv)));
                    const __m256bh b0 = _mm512_cvtneps_pbh(e0), b1 = _mm512_cvtneps_pbh(e1);
                    /* the sum uses the rounded probabilities, the ones P V multiplies */
                    const __m512 p0 = widen_bf16x16((__m256i)b0), p1 = widen_bf16x16((__m256i)b1);
                    sums[r] = _mm512_add_ps(p0, p1);
                    _mm256_store_si256((__m256i *)(p + r * KEY_BLOCK), (__m256i)b0);
                    _mm256_store_si256((__m256i *)(p + r * KEY_BLOCK + 16), (__m256i)b1);
                }
                _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), _mm512_loadu_ps(alpha),
                                                    (__m512)sum16_rows_call((const vf *)sums)));
                for (int r = 0; r < 16; r++)
                    if (alpha[r] != 1.f)
                        for (int64_t d = 0; d < dim; d += 16)
                            _mm512_store_ps(o + r * dim + d,
                                            _mm512_mul_ps(_mm512_load_ps(o + r * dim + d), _mm512_set1_ps(alpha[r])));
                _tile_loadd(4, p, TILE_ROW_BYTES);
                const uint16_t *vt = vh + kb * (dim / 16) * TILE_BF16;
                for (int64_t d = 0; d < dim / 16; d += 4) {  /* 64 output dims (4 accumulator tiles) at a time */
                    const int nd = dim / 16 - d < 4 ? (int)(dim / 16 - d) : 4;
                    _tile_loadd(0, o + d * 16, dim * 4);
                    _tile_loadd(6, vt + d * TILE_BF16, TILE_ROW_BYTES);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_stored(0, o + d * 16, dim * 4);
                    if (nd > 1) { _tile_loadd(1, o + (d + 1) * 16, dim * 4);
                                  _tile_loadd(7, vt + (d + 1) * TILE_BF16, TILE_ROW_BYTES);
                                  _tile_dpbf16ps(1, 4, 7); _tile_stored(1, o + (d + 1) * 16, dim * 4); }
                    if (nd > 2) { _tile_loadd(2, o + (d + 2) * 16, dim * 4);
                                  _tile_loadd(6, vt + (d + 2) * TILE_BF16, TILE_ROW_BYTES);
                                  _tile_dpbf16ps(2, 4, 6); _tile_stored(2, o + (d + 2) * 16, dim * 4); }
                    if (nd > 3) { _tile_loadd(3, o + (d + 3) * 16, dim * 4);
                                  _tile_loadd(7, vt + (d + 3) * TILE_BF16, TILE_ROW_BYTES);
                                  _tile_dpbf16ps(3, 4, 7); _tile_stored(3, o + (d + 3) * 16, dim * 4); }
                }
            }
            for (int r = 0; r < rows; r++) {
                const __m512 inv = _mm512_set1_ps(1.f / l[r]);
                uint16_t *dst = out + ((s + i0 + r) * heads + h) * dim;
                for (int64_t d = 0; d < dim; d += 16) {
                    const __m512 x = _mm512_mul_ps(_mm512_load_ps(o + r * dim + d), inv);
                    _mm256_storeu_si256((__m256i *)(dst + d), (__m256i)_mm512_cvtneps_pbh(x));
                }
            }
        }
        _tile_release();
    }
    free(kp), free(vp), free(offset), free(unit_start);
    return 0;
}
#else
int prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const int64_t *kv, const int64_t *starts,
                           const int64_t *seqs, int64_t nseqs, uint16_t *out, int64_t heads, int64_t kv_heads,
                           int64_t dim, float scale, int num_threads) {
    (void)q, (void)q_stride, (void)kv, (void)starts, (void)seqs, (void)nseqs, (void)out, (void)heads;
    (void)kv_heads, (void)dim, (void)scale, (void)num_threads;
    return -1;  /* built without AMX */
}
#endif

/* Decode attention over the paged KV cache on CPU: one query token per sequence, keys and values read in
 * place through the block table (torch has to gather them into a contiguous copy first).
 * Built by nanovllm/kernels/cpu.py with gcc -O3 -march=native -ffast-math -fopenmp. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define MAX_GROUP 16
#define MAX_BLOCK 64
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

/* 16 partial-sum vectors in, one vector out whose lane t is the sum of a[t]'s lanes: four rounds of
 * shuffles and adds, each halving the vectors (a horizontal sum per vector costs ~2.5x more). */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
INLINE vf reduce16(const vf *a) {
    vf r[8], u[4], w[2];
    for (int k = 0; k < 8; k++)
        r[k] = SHUF(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUF(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int k = 0; k < 4; k++)
        u[k] = SHUF(r[2 * k], r[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SHUF(r[2 * k], r[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int k = 0; k < 2; k++)
        w[k] = SHUF(u[2 * k], u[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SHUF(u[2 * k], u[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUF(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUF(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* q . k as 16 partial sums (lanes to be added). bf16 rows on a CPU with AVX512-BF16: vdpbf16ps multiplies
 * bf16 pairs exactly and accumulates in fp32, half the instructions of widening and FMAs. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define NATIVE_BF16 1
#else
#define NATIVE_BF16 0
#endif

INLINE vf dot_partial(const vf *restrict q, const char *restrict qraw, const char *restrict k, const int nv,
                      const int bf16) {
#if NATIVE_BF16
    if (bf16 && nv % 2 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < nv / 2; c++)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qraw + c * 64),
                                   (__m512bh)_mm512_loadu_si512(k + c * 64));
        return (vf)acc;
    }
#endif
    const int64_t elem = bf16 ? 2 : 4;
    vf acc = q[0] * load16(k, bf16);
    for (int c = 1; c < nv; c++) acc += q[c] * load16(k + c * 16 * elem, bf16);
    return acc;
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

/* One (sequence, KV head): its `group` query heads (q, o: nv vectors of 16 each) against `len` cached
 * positions, in one pass over the blocks with an online softmax (a running max and sum per head; the partial
 * output is rescaled when the max grows). Each cached key/value row is loaded once for every query head of the
 * group. Inlined with nv and the cache type as constants, so the loops over a row unroll into registers. */
INLINE void attend(const vf *restrict q, const char *restrict qraw, float scale, const char *restrict k_cache,
                   const char *restrict v_cache,
                   const int64_t *restrict table, int64_t len, int64_t row_bytes, int64_t token_bytes,
                   int64_t block_size, int64_t group, const int nv, const int bf16, vf *restrict o) {
    const int64_t elem = bf16 ? 2 : 4;
    float s[MAX_GROUP][MAX_BLOCK + 16] = {{0}}, m[MAX_GROUP], l[MAX_GROUP];  /* + 16: a whole last vector */
    for (int64_t g = 0; g < group; g++) { m[g] = -INFINITY; l[g] = 0.f; }
    for (int64_t i = 0; i < group * nv; i++) o[i] = (vf){0};
    for (int64_t start = 0; start < len; start += block_size) {
        const char *kb = k_cache + table[start / block_size] * block_size * token_bytes + row_bytes;
        const char *vb = v_cache + (kb - k_cache);
        const int64_t n = len - start < block_size ? len - start : block_size;
        if (start + block_size < len) {  /* blocks are scattered: the hardware cannot guess the next one */
            const int64_t next = (table[start / block_size + 1] - table[start / block_size]) * block_size * token_bytes;
            for (int64_t t = 0; t < block_size; t++)
                for (int64_t b = 0; b < nv * 16 * elem; b += 64) {
                    __builtin_prefetch(kb + next + t * token_bytes + b);
                    __builtin_prefetch(vb + next + t * token_bytes + b);
                }
        }
        for (int64_t t0 = 0; t0 < n; t0 += 16)
            for (int64_t g = 0; g < group; g++) {
                vf part[16] = {0};
                for (int64_t t = t0; t < n && t < t0 + 16; t++)
                    part[t - t0] = dot_partial(q + g * nv, qraw + g * nv * 16 * elem, kb + t * token_bytes, nv, bf16);
                const vf scores = reduce16(part) * scale;
                memcpy(&s[g][t0], &scores, sizeof scores);
            }
        for (int64_t g = 0; g < group; g++) {
            float mx = m[g];
            for (int64_t t = 0; t < n; t++) mx = s[g][t] > mx ? s[g][t] : mx;
            if (mx > m[g]) {
                const float c = m[g] == -INFINITY ? 0.f : exp16((vf){0} + (m[g] - mx))[0];
                l[g] *= c;
                for (int i = 0; i < nv; i++) o[g * nv + i] *= c;
                m[g] = mx;
            }
            for (int64_t c = 0; c < n; c += 16) {  /* lanes past n hold stale finite scores, never used */
                vf x;
                memcpy(&x, &s[g][c], sizeof x);
                x = exp16(x - mx);
                memcpy(&s[g][c], &x, sizeof x);
            }
            for (int64_t t = 0; t < n; t++) l[g] += s[g][t];
        }
        for (int64_t t = 0; t < n; t++) {
            vf row[nv];
            for (int c = 0; c < nv; c++) row[c] = load16(vb + t * token_bytes + c * 16 * elem, bf16);
            for (int64_t g = 0; g < group; g++)
                for (int c = 0; c < nv; c++) o[g * nv + c] += s[g][t] * row[c];
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int c = 0; c < nv; c++) o[g * nv + c] *= 1.f / l[g];
}

#define ATTEND(NV, BF16) attend(qv, qb, scale, k_cache, v_cache, table, len, h * head_dim * elem, \
                                kv_heads * head_dim * elem, block_size, group, NV, BF16, ov)

/* q, out: [tokens, heads, head_dim], the cache's dtype; caches: [blocks, block_size, kv_heads, head_dim]
 * fp32 or bf16; row b of the batch is sequence rows[b] (its block table and context length) with its query
 * at token tokens[b]. Returns 0, or -1 if a size exceeds this kernel's limits (checked by the caller too). */
int decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                     int64_t table_stride, const int64_t *lens, const int64_t *rows, const int64_t *tokens,
                     void *out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t block_size, float scale, int bf16, int num_threads) {
    const int64_t group = heads / kv_heads, elem = bf16 ? 2 : 4;
    if (group > MAX_GROUP || block_size > MAX_BLOCK || head_dim % 16 || head_dim > 16 * MAX_VECTORS) return -1;
    const int nv = head_dim / 16;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < kv_heads; h++) {
            vf qv[MAX_GROUP * MAX_VECTORS], ov[MAX_GROUP * MAX_VECTORS];
            const char *qb = (const char *)q + (tokens[b] * heads + h * group) * head_dim * elem;
            for (int64_t i = 0; i < group * nv; i++) qv[i] = load16(qb + i * 16 * elem, bf16);
            const int64_t *table = tables + rows[b] * table_stride, len = lens[rows[b]];
            if (nv == 4 && !bf16) ATTEND(4, 0);
            else if (nv == 4) ATTEND(4, 1);
            else if (nv == 8 && !bf16) ATTEND(8, 0);
            else if (nv == 8) ATTEND(8, 1);
            else if (!bf16) ATTEND(nv, 0);
            else ATTEND(nv, 1);
            char *ob = (char *)out + (qb - (const char *)q);
            for (int64_t i = 0; i < group * nv; i++) store16(ob + i * 16 * elem, ov[i], bf16);
        }
    return 0;
}

/* Write this step's key and value rows (token i's at k + i * k_stride bytes) into the paged caches at their
 * slots (slot -1: a padding row, skipped). index_copy_ took ~65 us a layer at 44 rows in bf16; this ~1 us. */
void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_bytes) {
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

/* HF's RMSNorm of bf16 rows: x / rms(x) in fp32, rounded to bf16, then times the weight (rounded). */
void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim, float eps,
                   int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *o = out + r * dim;
        float sq = 0.f;
        for (int64_t i = 0; i < dim; i++) sq += from_bf16(xr[i]) * from_bf16(xr[i]);
        const float inv = 1.f / sqrtf(sq / dim + eps);
        for (int64_t i = 0; i < dim; i++)
            o[i] = to_bf16(from_bf16(weight[i]) * bf16_round(from_bf16(xr[i]) * inv));
    }
}

/* silu(gate) * up for bf16 [rows, 2 * dim] (gate first), as torch rounds it: silu to bf16, then the product. */
void silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = x + r * 2 * dim, *up = gate + dim;
        uint16_t *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) {
            const float g = from_bf16(gate[i]);
            o[i] = to_bf16(bf16_round(g / (1.f + expf(-g))) * from_bf16(up[i]));
        }
    }
}

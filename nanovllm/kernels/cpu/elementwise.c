/* The elementwise kernels of a decoder layer, bf16 rows in and out, each rounded where torch's bf16 op would
 * round it (bit for bit torch's ops, up to the order of a row's sum of squares): RMSNorm with the residual add,
 * SiLU-and-mul, rotary embedding; and the KV store, which writes this step's keys and values into the paged
 * cache. Each replaces several torch ops and their fp32 copies with one pass over the rows.
 * Measured (docs/benchmarks.md): RMSNorm with the residual add, 2,048 rows, 398 -> 288 us; rotary, 2,048
 * tokens, 473 -> 232 us; SiLU-and-mul 2.2 -> 3.9 G elements/s; the KV store ~1 us a layer at 44 rows where
 * index_copy_ took ~65 us. */
#include "kernels.h"

#define STORE_PARALLEL_ROWS 16  /* fewer rows: the KV store on one thread */
#define ROPE_PARALLEL_ROWS 64   /* fewer tokens: rotary on one thread */

/* Write this step's key and value rows (token i's at k + i * k_stride bytes) into the paged caches at their
 * slots (slot -1: a padding row, skipped). index_copy_ took ~65 us a layer at 44 rows in bf16; this ~1 us.
 * Its time is the first touches of fresh cache pages (a page fault each, ~4-12 us in a VM): taken in parallel,
 * which the kernel allows, they cost half (a 2048-token prefill step: 137 -> ~70 ms). */
void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_bytes, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(tokens >= STORE_PARALLEL_ROWS ? num_threads : 1)
    for (int64_t i = 0; i < tokens; i++) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + slots[i] * row_bytes, k + i * k_stride, row_bytes);
        memcpy(v_cache + slots[i] * row_bytes, v + i * v_stride, row_bytes);
    }
}

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
            const __m512 y = _mm512_mul_ps(silu, bf16x16(up + i));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(y));
        }
#endif
        for (; i < dim; i++) {
            const float g = from_bf16(gate[i]);
            o[i] = to_bf16(bf16_round(g / (1.f + expf(-g))) * from_bf16(up[i]));
        }
    }
}

#if NATIVE_BF16
INLINE __m512 mul_round(__m512 x, __m512 y) { return round_bf16x16(_mm512_mul_ps(x, y)); }  /* as torch's bf16 mul */
#endif

/* Rotary embedding of bf16 heads in place (rotate-half layout): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin,
 * each product and sum rounded to bf16 as torch's bf16 ops round them. Rows of `heads` heads at `stride`
 * elements apart: the query and key heads side by side in the QKV projection's output, rotated in one call. */
void rope_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const uint16_t *cos,
               const uint16_t *sin, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(tokens >= ROPE_PARALLEL_ROWS ? num_threads : 1)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + t * stride + h * head_dim, *x2 = x1 + half;
            const uint16_t *c = cos + t * half, *s = sin + t * half;
            int64_t i = 0;
#if NATIVE_BF16  /* 16 at a time, one instruction per bf16 rounding */
            for (; i + 16 <= half; i += 16) {
                const __m512 a = bf16x16(x1 + i), b = bf16x16(x2 + i), ci = bf16x16(c + i), si = bf16x16(s + i);
                const __m512 r1 = _mm512_sub_ps(mul_round(a, ci), mul_round(b, si));
                const __m512 r2 = _mm512_add_ps(mul_round(b, ci), mul_round(a, si));
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

/* The elementwise kernels of a decoder layer for fp32 rows: RMSNorm with the residual add in place, SiLU-and-mul,
 * rotary embedding in place. The fused fp32 decode step (decode_step.c) calls them between its projections, so a
 * layer costs no torch op at all; torch's own fp32 versions take ~4 ops (RMSNorm ~6, rotary ~20) each.
 * Written with the header's 16-lane vector types (two AVX2 registers, one AVX-512 one, plain C elsewhere: gcc
 * lowers them for any target), every row's tail (dims not a multiple of 16) in scalar C.
 * Measured against torch_ops on random rows (tests/test_fused_step.py): RMSNorm and rotary within 2 ulp (the order
 * of the sum of squares; rotary's products fused), SiLU-and-mul within ~4e-7 relative (exp16's error). */
#include "kernels.h"

#define LANES 16
#define SIGN_BIT 0x80000000u
#define ROPE_PARALLEL_ROWS 64  /* fewer tokens: rotary on one thread (a decode step's few rows cost ~1 us) */
#define ELEMENTWISE_PARALLEL_ROWS 8  /* fewer rows: RMSNorm and SiLU-and-mul on one thread, no fork/join */

INLINE vf loadf(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void storef(float *p, vf v) { memcpy(p, &v, sizeof v); }

INLINE float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* HF's RMSNorm of fp32 rows: x / sqrt(mean(x^2) + eps) * weight. With `add` (the residual stream's update), x first
 * becomes x + add in place: the residual add and the next norm in one pass over the row. */
void rms_norm_f32(float *x, const float *add, const float *weight, float *out, int64_t rows, int64_t dim, float eps,
                  int num_threads) {
#pragma omp parallel for schedule(static) num_threads(rows >= ELEMENTWISE_PARALLEL_ROWS ? num_threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * dim, *o = out + r * dim;
        const float *a = add ? add + r * dim : 0;
        vf acc = {0};
        int64_t i = 0;
        for (; i + LANES <= dim; i += LANES) {
            vf v = loadf(xr + i);
            if (a) {
                v += loadf(a + i);
                storef(xr + i, v);
            }
            acc += v * v;
        }
        float sq = hsum(acc);
        for (; i < dim; i++) {
            if (a) xr[i] += a[i];
            sq += xr[i] * xr[i];
        }
        const float inv = 1.f / sqrtf(sq / dim + eps);
        int64_t k = 0;
        for (; k + LANES <= dim; k += LANES) storef(o + k, loadf(weight + k) * (loadf(xr + k) * inv));
        for (; k < dim; k++) o[k] = weight[k] * (xr[k] * inv);
    }
}

/* silu(gate) * up for fp32 rows [rows, 2 * dim] (gate first). sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e)
 * below, with e = exp(-|g|) <= 1 (exp16, relative error ~2e-7), so no exponent overflows. */
void silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(rows >= ELEMENTWISE_PARALLEL_ROWS ? num_threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * dim, *up = gate + dim;
        float *o = out + r * dim;
        int64_t i = 0;
        for (; i + LANES <= dim; i += LANES) {
            const vf g = loadf(gate + i);
            const vf e = exp16((vf)((vu)g | ((vu){0} + SIGN_BIT)));  /* -|g|: the sign bit set */
            const vi negative = g < 0;
            const vf numerator = (vf)((negative & (vi)e) | (~negative & (vi)((vf){0} + 1.f)));
            storef(o + i, g * (numerator / (1.f + e)) * loadf(up + i));
        }
        for (; i < dim; i++) {  /* as above: -ffast-math assumes no infinity, so exp(-g) must not overflow */
            const float g = gate[i], e = expf(-fabsf(g));
            o[i] = g * ((g < 0 ? e : 1.f) / (1.f + e)) * up[i];
        }
    }
}

/* Rotary embedding of fp32 heads in place (rotate-half layout): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
 * Rows of `heads` heads at `stride` elements apart: the query and key heads side by side in the QKV projection's
 * output, rotated in one call. cos, sin: [tokens, head_dim / 2]. */
void rope_f32(float *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const float *cos,
              const float *sin, int num_threads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(tokens >= ROPE_PARALLEL_ROWS ? num_threads : 1)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * stride + h * head_dim, *x2 = x1 + half;
            const float *c = cos + t * half, *s = sin + t * half;
            int64_t i = 0;
            for (; i + LANES <= half; i += LANES) {
                const vf a = loadf(x1 + i), b = loadf(x2 + i), ci = loadf(c + i), si = loadf(s + i);
                storef(x1 + i, a * ci - b * si);
                storef(x2 + i, b * ci + a * si);
            }
            for (; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
}

/* Sampling from the logits in place: one token per row, the argmax or a draw from softmax(logits / temperature),
 * for rows without top-k, top-p, min-p or penalties (layers/sampler.py checks). torch's softmax and multinomial
 * make fp32 copies of the logits and several passes; here a pass for the max, one for the exponentials (their
 * sums per 16 tokens kept), and a scan of those sums for the draw. Measured (docs/benchmarks.md): 44 x 49,152
 * bf16 logits 1.1 -> 0.46 ms once the second exp pass became the scan of the kept sums. */
#include "kernels.h"

/* 16 logits from i on, fp32 whatever the row's dtype; past the vocabulary -FLT_MAX */
INLINE vf load_logits(const char *row, int64_t i, int64_t vocab, int bf16) {
    if (i + 16 <= vocab) return load16(row + i * (bf16 ? 2 : 4), bf16);
    vf x = (vf){0} - FLT_MAX;  /* not -inf: -ffast-math assumes finite values */
    for (int64_t j = i; j < vocab; j++) x[j - i] = bf16 ? from_bf16(((const uint16_t *)row)[j]) : ((const float *)row)[j];
    return x;
}

/* One token per row of fp32 or bf16 logits [rows, vocab], read in place: the argmax where temperature is 0,
 * else a draw from softmax(logits / temperature) by the inverse CDF at u * total. */
void sample_rows(const void *logits, int64_t rows, int64_t vocab, int bf16, const float *temperature, const float *u,
                 int64_t *out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)logits + r * vocab * (bf16 ? 2 : 4);
        vf mx = (vf){0} - FLT_MAX;
        for (int64_t i = 0; i < vocab; i += 16) mx = max16(mx, load_logits(row, i, vocab, bf16));
        float m = -FLT_MAX;
        for (int k = 0; k < 16; k++) m = mx[k] > m ? mx[k] : m;
        if (temperature[r] == 0.f) {  /* the first index holding the max, as torch's argmax */
            out[r] = 0;
            for (int64_t i = 0, k = 16; k == 16; i += 16) {
                const vf x = load_logits(row, i, vocab, bf16);
                for (k = 0; k < 16 && x[k] != m; k++) {}
                if (k < 16) out[r] = i + k;
            }
            continue;
        }
        const float inv = 1.f / temperature[r];
        /* the weights' sums per 16 tokens (sixteen at a time, by a transposed reduction), then a scan of those
         * sums for the 16 tokens where the running sum passes u * total: one exp pass, not two */
        const int64_t chunks = (vocab + 15) / 16;
        float sums[chunks + 16];
        vf part[16], total16 = (vf){0};
        for (int64_t c0 = 0; c0 < chunks; c0 += 16) {
            for (int j = 0; j < 16; j++)
                part[j] = c0 + j < chunks ? exp16((load_logits(row, (c0 + j) * 16, vocab, bf16) - m) * inv) : (vf){0};
            const vf s16 = sum16_rows(part);
            memcpy(sums + c0, &s16, sizeof s16);
            total16 += s16;
        }
        float total = 0.f, run = 0.f;
        for (int k = 0; k < 16; k++) total += total16[k];
        const float target = u[r] * total;
        int64_t c = 0;
        while (c < chunks && run + sums[c] <= target) run += sums[c++];
        int64_t pick = -1, last = 0;  /* last: the last token with any weight, where rounding runs past the end */
        if (c < chunks) {
            const vf w = exp16((load_logits(row, c * 16, vocab, bf16) - m) * inv);
            for (int k = 0; k < 16 && c * 16 + k < vocab; k++) {
                run += w[k];
                if (w[k] > 0.f) last = c * 16 + k;
                if (run > target) { pick = c * 16 + k; break; }
            }
        }
        if (pick < 0) {  /* past the end by rounding: the last token with any weight */
            for (c = chunks - 1; c > 0 && sums[c] <= 0.f; c--) {}
            const vf w = exp16((load_logits(row, c * 16, vocab, bf16) - m) * inv);
            for (int k = 0; k < 16 && c * 16 + k < vocab; k++) last = w[k] > 0.f ? c * 16 + k : last;
        }
        out[r] = pick >= 0 ? pick : last;
    }
}

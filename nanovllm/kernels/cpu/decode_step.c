/* A whole decode step's decoder layers in one call: the same C kernels, in the order models/llama.py calls them,
 * in bf16 (projections on AMX: linear_bf16) or fp32 (any CPU: linear_f32, plain fp32 weights or GGUF blocks).
 *
 * Between kernels that stream tens of MB of weights and K/V, Python's own working set is evicted: the ~15
 * torch and ctypes calls a layer makes cost ~0.6 ms a layer there (5 ms a step when the kernels are stubbed
 * out, ~18 ms when they run). Here they cost nothing: a bf16 decode step at 44 sequences 77-81 -> 63.5 ms
 * (docs/benchmarks.md). In bf16 bit for bit the per-layer path (same kernels, inputs and order); in fp32 the
 * per-layer path runs torch's elementwise ops, which elementwise_f32.c matches to a few ulp. */
#include "kernels.h"

/* One layer's entries in the pointer table (int64 each): its six weights in the order the layer applies them,
 * each as (the weight or its GGUF blocks, the bias or 0, the weight type as the step's linear reads it: in bf16
 * linear_bf16's, in fp32 ggml's type id for linear_f32; the norms: their weight, 0, 0), then its K cache and V
 * cache. In fp32 a fused weight kept per part (a larger model's Q4_K_M: q/k in Q4_K, v in Q6_K) has PARTS | the
 * number of parts as its type and, as its weight, a table of its parts in output order, each (its blocks, its
 * type for linear_f32, its rows): each part's linear writes its columns of y. */
enum { INPUT_NORM, QKV_PROJ, O_PROJ, POST_NORM, GATE_UP_PROJ, DOWN_PROJ, WEIGHTS };
enum { WEIGHT, BIAS, TYPE, WEIGHT_ENTRIES };
enum { K_CACHE = WEIGHTS * WEIGHT_ENTRIES, V_CACHE, LAYER_ENTRIES };
enum { PART_BLOCKS, PART_TYPE, PART_ROWS, PART_ENTRIES };
#define PARTS 0x10000

static inline const void *norm_weight(const int64_t *layer, int which) {
    return (const void *)layer[which * WEIGHT_ENTRIES + WEIGHT];
}

/* y [M, N] = x [M, K] @ the layer's weight `which` (+ its bias) */
static inline int linear(const int64_t *layer, int which, const void *x, int64_t M, int64_t N, int64_t K, void *y,
                         int bf16, int num_threads) {
    const int64_t *w = layer + which * WEIGHT_ENTRIES;
    if (bf16)
        return linear_bf16(x, M, (const void *)w[WEIGHT], (int)w[TYPE], N, K, (const uint16_t *)w[BIAS], y,
                           num_threads);
    const float *bias = (const float *)w[BIAS];
    if (!(w[TYPE] & PARTS)) return linear_f32(x, M, (const void *)w[WEIGHT], (int)w[TYPE], N, K, bias, y, N, num_threads);
    const int64_t *part = (const int64_t *)w[WEIGHT];
    for (int64_t p = 0, col = 0; p < (w[TYPE] & ~PARTS); p++, part += PART_ENTRIES) {
        const int64_t rows = part[PART_ROWS];
        const int rc = linear_f32(x, M, (const void *)part[PART_BLOCKS], (int)part[PART_TYPE], rows, K,
                                  bias ? bias + col : 0, (float *)y + col, N, num_threads);
        if (rc) return rc;
        col += rows;
    }
    return 0;
}

static inline void rms_norm(void *x, const void *add, const void *weight, void *out, int64_t rows, int64_t dim,
                            float eps, int bf16, int num_threads) {
    if (bf16)
        rms_norm_bf16(x, add, weight, out, rows, dim, eps, num_threads);
    else
        rms_norm_f32(x, add, weight, out, rows, dim, eps, num_threads);
}

static inline void rope(void *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const void *cos,
                        const void *sin, int bf16, int num_threads) {
    if (bf16)
        rope_bf16(x, stride, tokens, heads, head_dim, cos, sin, num_threads);
    else
        rope_f32(x, stride, tokens, heads, head_dim, cos, sin, num_threads);
}

static inline void silu_and_mul(const void *x, void *out, int64_t rows, int64_t dim, int bf16, int num_threads) {
    if (bf16)
        silu_and_mul_bf16(x, out, rows, dim, num_threads);
    else
        silu_and_mul_f32(x, out, rows, dim, num_threads);
}

/* M single-token rows (every row a decode: a prompt chunk's tokens each one, attending over its sequence's cache up
 * to itself, which holds the chunk's K/V once store_kv ran) through `layers` layers, all in bf16 (`bf16`) or all
 * in fp32.
 * layer[l * LAYER_ENTRIES + ...]: that layer's weights and caches (above). dims: hidden, heads, kv_heads,
 * head_dim, intermediate, block_size. residual [M, hidden]: the embeddings in, the residual stream out;
 * mlp_out [M, hidden]: the last layer's MLP output (models/llama.py adds it in the final norm).
 * rows, tokens: each row's sequence and flat position, as decode_attention takes them.
 * Scratch: h [M, hidden], qkv [M, (heads + 2 kv_heads) head_dim], attn [M, heads head_dim],
 * gate_up [M, 2 intermediate], act [M, intermediate]. amx: 1 once amx_init() granted AMX, which the bf16
 * projections need (linear_bf16). Returns 0, -1 for bf16 without AMX, or the first failing kernel's code. */
int decode_layers(int64_t layers, const int64_t *layer, const int64_t *dims, int64_t M, void *residual,
                  void *mlp_out, const void *cos, const void *sin, const int64_t *slots, const int64_t *tables,
                  int64_t table_stride, const int64_t *lens, const int64_t *rows, const int64_t *tokens, void *h,
                  void *qkv, void *attn, void *gate_up, void *act, float eps, float scale, int bf16, int amx,
                  int num_threads) {
    const int64_t hidden = dims[0], heads = dims[1], kv_heads = dims[2], head_dim = dims[3], inter = dims[4];
    const int64_t block_size = dims[5];
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    const int64_t bytes = bf16 ? 2 : 4;  /* per element */
    const char *k = (const char *)qkv + q_size * bytes, *v = k + kv_size * bytes;
    if (bf16 && !amx) return -1;
    int rc;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *p = layer + l * LAYER_ENTRIES;
        char *k_cache = (char *)p[K_CACHE], *v_cache = (char *)p[V_CACHE];
        rms_norm(residual, l ? mlp_out : 0, norm_weight(p, INPUT_NORM), h, M, hidden, eps, bf16, num_threads);
        if ((rc = linear(p, QKV_PROJ, h, M, qkv_size, hidden, qkv, bf16, num_threads))) return rc;
        rope(qkv, qkv_size, M, heads + kv_heads, head_dim, cos, sin, bf16, num_threads);
        store_kv(k, v, qkv_size * bytes, qkv_size * bytes, k_cache, v_cache, slots, M, kv_size * bytes, num_threads);
        if ((rc = decode_attention(qkv, qkv_size, k_cache, v_cache, tables, table_stride, lens, rows, tokens, attn,
                                   M, heads, kv_heads, head_dim, block_size, scale, bf16, amx, num_threads)))
            return rc;
        if ((rc = linear(p, O_PROJ, attn, M, hidden, q_size, mlp_out, bf16, num_threads))) return rc;
        rms_norm(residual, mlp_out, norm_weight(p, POST_NORM), h, M, hidden, eps, bf16, num_threads);
        if ((rc = linear(p, GATE_UP_PROJ, h, M, 2 * inter, hidden, gate_up, bf16, num_threads))) return rc;
        silu_and_mul(gate_up, act, M, inter, bf16, num_threads);
        if ((rc = linear(p, DOWN_PROJ, act, M, hidden, inter, mlp_out, bf16, num_threads))) return rc;
    }
    return 0;
}

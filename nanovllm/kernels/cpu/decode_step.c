/* A whole decode step's decoder layers in one call: the same C kernels, in the order models/llama.py calls them.
 *
 * Between kernels that stream tens of MB of weights and K/V, Python's own working set is evicted: the ~15
 * torch and ctypes calls a layer makes cost ~0.6 ms a layer there (5 ms a step when the kernels are stubbed
 * out, ~18 ms when they run). Here they cost nothing: a decode step at 44 sequences 77-81 -> 63.5 ms
 * (docs/benchmarks.md). Bit for bit the per-layer path (same kernels, inputs and order). */
#include "kernels.h"

/* One layer's entries in the pointer table (int64 each): its six weights in the order the layer applies them,
 * each as (the bf16 weight or its GGUF blocks, the bias or 0, the weight type: BF16, Q4_1, Q8_0; the norms:
 * their weight, 0, BF16), then its K cache and V cache. */
enum { INPUT_NORM, QKV_PROJ, O_PROJ, POST_NORM, GATE_UP_PROJ, DOWN_PROJ, WEIGHTS };
enum { WEIGHT, BIAS, TYPE, WEIGHT_ENTRIES };
enum { K_CACHE = WEIGHTS * WEIGHT_ENTRIES, V_CACHE, LAYER_ENTRIES };

static inline const uint16_t *norm_weight(const int64_t *layer, int which) {
    return (const uint16_t *)layer[which * WEIGHT_ENTRIES + WEIGHT];
}

/* y [M, N] = x [M, K] @ the layer's weight `which` (+ its bias) */
static inline int linear(const int64_t *layer, int which, const uint16_t *x, int64_t M, int64_t N, int64_t K,
                         uint16_t *y, int num_threads) {
    const int64_t *w = layer + which * WEIGHT_ENTRIES;
    return linear_bf16(x, M, (const void *)w[WEIGHT], (int)w[TYPE], N, K, (const uint16_t *)w[BIAS], y, num_threads);
}

/* M single-token rows (every row a decode) through `layers` layers, bf16 throughout.
 * layer[l * LAYER_ENTRIES + ...]: that layer's weights and caches (above). dims: hidden, heads, kv_heads,
 * head_dim, intermediate, block_size. residual [M, hidden]: the embeddings in, the residual stream out;
 * mlp_out [M, hidden]: the last layer's MLP output (models/llama.py adds it in the final norm).
 * rows, tokens: each row's sequence and flat position, as decode_attention takes them.
 * Scratch: h [M, hidden], qkv [M, (heads + 2 kv_heads) head_dim], attn [M, heads head_dim],
 * gate_up [M, 2 intermediate], act [M, intermediate]. amx: 1 once amx_init() granted AMX, which the
 * projections need (linear_bf16). Returns 0, -1 without AMX, or the first failing kernel's code. */
int decode_layers_bf16(int64_t layers, const int64_t *layer, const int64_t *dims, int64_t M, uint16_t *residual,
                       uint16_t *mlp_out, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                       const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                       const int64_t *tokens, uint16_t *h, uint16_t *qkv, uint16_t *attn, uint16_t *gate_up,
                       uint16_t *act, float eps, float scale, int amx, int num_threads) {
    const int64_t hidden = dims[0], heads = dims[1], kv_heads = dims[2], head_dim = dims[3], inter = dims[4];
    const int64_t block_size = dims[5];
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    if (!amx) return -1;
    int rc;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *p = layer + l * LAYER_ENTRIES;
        char *k_cache = (char *)p[K_CACHE], *v_cache = (char *)p[V_CACHE];
        rms_norm_bf16(residual, l ? mlp_out : 0, norm_weight(p, INPUT_NORM), h, M, hidden, eps, num_threads);
        if ((rc = linear(p, QKV_PROJ, h, M, qkv_size, hidden, qkv, num_threads))) return rc;
        rope_bf16(qkv, qkv_size, M, heads + kv_heads, head_dim, cos, sin, num_threads);
        store_kv((const char *)(qkv + q_size), (const char *)(qkv + q_size + kv_size), qkv_size * 2, qkv_size * 2,
                 k_cache, v_cache, slots, M, kv_size * 2, num_threads);
        if ((rc = decode_attention(qkv, qkv_size, k_cache, v_cache, tables, table_stride, lens, rows, tokens, attn,
                                   M, heads, kv_heads, head_dim, block_size, scale, 1, amx, num_threads))) return rc;
        if ((rc = linear(p, O_PROJ, attn, M, hidden, q_size, mlp_out, num_threads))) return rc;
        rms_norm_bf16(residual, mlp_out, norm_weight(p, POST_NORM), h, M, hidden, eps, num_threads);
        if ((rc = linear(p, GATE_UP_PROJ, h, M, 2 * inter, hidden, gate_up, num_threads))) return rc;
        silu_and_mul_bf16(gate_up, act, M, inter, num_threads);
        if ((rc = linear(p, DOWN_PROJ, act, M, hidden, inter, mlp_out, num_threads))) return rc;
    }
    return 0;
}

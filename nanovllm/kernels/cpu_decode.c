/* A whole decode step's decoder layers in one call: the same C kernels, in the order models/llama.py calls them.
 *
 * Between kernels that stream tens of MB of weights and K/V, Python's own working set is evicted: the ~15
 * torch and ctypes calls a layer makes cost ~0.6 ms a layer there (5 ms a step when the kernels are stubbed
 * out, ~18 ms when they run). Here they cost nothing. Bit for bit the per-layer path (same kernels, inputs
 * and order). Built with the other kernel files by kernels/cpu.py. */
#include <stdint.h>

int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K, const uint16_t *bias,
                uint16_t *y, int num_threads);
void rms_norm_bf16(uint16_t *x, const uint16_t *add, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t dim, float eps, int num_threads);
void silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t dim, int num_threads);
void rope_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim, const uint16_t *cos,
               const uint16_t *sin, int num_threads);
void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row_bytes, int num_threads);
int decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                     const int64_t *tokens, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t block_size, float scale, int bf16, int num_threads);

/* QKV .. DOWN: the projection's bf16 weight, or its GGUF blocks; QKV_TYPE .. DOWN_TYPE: which (cpu_linear.c) */
enum { IN_NORM, QKV, QKV_BIAS, O_PROJ, POST_NORM, GATE_UP, DOWN, K_CACHE, V_CACHE, QKV_TYPE, O_PROJ_TYPE,
       GATE_UP_TYPE, DOWN_TYPE, POINTERS };

/* M single-token rows (every row a decode) through `layers` layers, bf16 throughout.
 * layer[l * POINTERS + ...]: that layer's weights and caches (QKV_BIAS may be 0). dims: hidden, heads,
 * kv_heads, head_dim, intermediate, block_size. residual [M, hidden]: the embeddings in, the residual stream
 * out; mlp_out [M, hidden]: the last layer's MLP output (models/llama.py adds it in the final norm).
 * rows, tokens: each row's sequence and flat position, as decode_attention takes them.
 * Scratch: h [M, hidden], qkv [M, (heads + 2 kv_heads) head_dim], attn [M, heads head_dim],
 * gate_up [M, 2 intermediate], act [M, intermediate]. Returns 0, or the first failing kernel's code. */
int decode_layers_bf16(int64_t layers, const int64_t *layer, const int64_t *dims, int64_t M, uint16_t *residual,
                       uint16_t *mlp_out, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                       const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
                       const int64_t *tokens, uint16_t *h, uint16_t *qkv, uint16_t *attn, uint16_t *gate_up,
                       uint16_t *act, float eps, float scale, int num_threads) {
    const int64_t hidden = dims[0], heads = dims[1], kv_heads = dims[2], head_dim = dims[3], inter = dims[4];
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    int rc;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *p = layer + l * POINTERS;
#define W(i) ((const uint16_t *)p[i])
#define LINEAR(x, w, ...) linear_bf16(x, M, (const void *)p[w], (int)p[w##_TYPE], __VA_ARGS__, num_threads)
        rms_norm_bf16(residual, l ? mlp_out : 0, W(IN_NORM), h, M, hidden, eps, num_threads);
        if ((rc = LINEAR(h, QKV, qkv_size, hidden, W(QKV_BIAS), qkv))) return rc;
        rope_bf16(qkv, qkv_size, M, heads + kv_heads, head_dim, cos, sin, num_threads);
        store_kv((const char *)(qkv + q_size), (const char *)(qkv + q_size + kv_size), qkv_size * 2, qkv_size * 2,
                 (char *)p[K_CACHE], (char *)p[V_CACHE], slots, M, kv_size * 2, num_threads);
        if ((rc = decode_attention(qkv, qkv_size, (const void *)p[K_CACHE], (const void *)p[V_CACHE], tables,
                                   table_stride, lens, rows, tokens, attn, M, heads, kv_heads, head_dim, dims[5],
                                   scale, 1, num_threads))) return rc;
        if ((rc = LINEAR(attn, O_PROJ, hidden, q_size, 0, mlp_out))) return rc;
        rms_norm_bf16(residual, mlp_out, W(POST_NORM), h, M, hidden, eps, num_threads);
        if ((rc = LINEAR(h, GATE_UP, 2 * inter, hidden, 0, gate_up))) return rc;
        silu_and_mul_bf16(gate_up, act, M, inter, num_threads);
        if ((rc = LINEAR(act, DOWN, hidden, inter, 0, mlp_out))) return rc;
#undef W
#undef LINEAR
    }
    return 0;
}

"""Triton kernels for paged attention (the GPU backend; the torch backend in layers/attention.py is the reference).

- store_kv: this step's K/V rows into their cache slots (slot -1: a padding row, skipped).
- decode: one query token per sequence, flash-decoding: the context is cut into splits that run as separate
  programs, each writing a partial output and its log-sum-exp; a second kernel combines the splits. The query
  heads that share a KV head (GQA/MQA) are one program's rows, so each K/V tile is read once per group.
- prefill: a chunk of query tokens per sequence over its whole context in the paged cache (a cached prefix plus
  the chunk itself), causal within the chunk.
Keys are fetched a tile of positions at a time through the block table, so any block size works. Softmax in
fp32 with exp2; the inputs may be fp32 (exact: the interpreter tests), bf16 or fp16.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride,
              N: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        k = tl.load(k_ptr + t * k_stride + offs, mask=mask)
        v = tl.load(v_ptr + t * v_stride + offs, mask=mask)
        tl.store(k_cache_ptr + slot * N + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * N + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (rows may be strided, heads and dims contiguous); caches [blocks, block_size, Hkv, D]."""
    n = k.shape[1] * k.shape[2]
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(2) == 1 and v.stride(1) == v.shape[2]
    _store_kv[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), N=n,
                             BLOCK=triton.next_power_of_2(n))


@triton.jit
def _decode_split(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, rows_ptr, tokens_ptr,
                  part_out_ptr, part_lse_ptr, scale, tables_stride, blocks_per_split,
                  H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  DP: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows_ptr + b)
    token = tl.load(tokens_ptr + b)
    ctx = tl.load(lens_ptr + row)
    offs_g, offs_d, offs_n = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    g_mask, d_mask = offs_g < G, offs_d < D
    q = tl.load(q_ptr + (token * H + heads)[:, None] * D + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * (scale * 1.4426950408889634)  # scores in log2 units: exp2 below
    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    start = split * blocks_per_split * BS
    end = tl.minimum(start + blocks_per_split * BS, ctx)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        block = tl.load(tables_ptr + row * tables_stride + pos // BS, mask=n_mask, other=0)
        kv_off = ((block * BS + pos % BS) * HKV + kvh)[:, None] * D + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out_off = ((b * H + heads) * SPLITS + split)
    has_keys = l > 0
    tl.store(part_out_ptr + out_off[:, None] * D + offs_d[None, :],
             acc / tl.where(has_keys, l, 1.0)[:, None], mask=g_mask[:, None] & d_mask[None, :])
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
    tl.store(part_lse_ptr + out_off, lse, mask=g_mask)


@triton.jit
def _decode_reduce(part_out_ptr, part_lse_ptr, out_ptr, tokens_ptr,
                   H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr,
                   SP: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    token = tl.load(tokens_ptr + b)
    offs_s, offs_d = tl.arange(0, SP), tl.arange(0, DP)
    s_mask, d_mask = offs_s < SPLITS, offs_d < D
    base = (b * H + h) * SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (a padding row): output zeros
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (token * H + h) * D + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor,
                     scale: float, max_context: int, num_splits: int | None = None, block_n: int | None = None,
                     num_warps: int = 4) -> None:
    """out[tokens[b]] = attention of q[tokens[b]] over sequence rows[b]'s cached context, for every b.
    q, out: [T, H, D] contiguous. max_context bounds the contexts (it sizes the splits; for CUDA graphs pass
    max_model_len so the launch does not depend on the step)."""
    nb = rows.shape[0]
    _, bs, hkv, d = k_cache.shape
    h = q.shape[1]
    blocks = max(1, -(-max_context // bs))
    if num_splits is None:  # ~4096 programs: at 128 sequences x 8 KV heads, 4 splits ran 1.45x faster than 1 (H200)
        num_splits = min(blocks, max(1, 4096 // max(1, nb * hkv)), 16)
    blocks_per_split = -(-blocks // num_splits)
    num_splits = -(-blocks // blocks_per_split)
    part_out = torch.empty(nb, h, num_splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(nb, h, num_splits, dtype=torch.float32, device=q.device)
    g = h // hkv
    dp = triton.next_power_of_2(d)
    block_n = block_n or min(64, triton.next_power_of_2(max(bs, 16)))
    _decode_split[(nb, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, rows, tokens, part_out, part_lse, scale,
        block_tables.stride(0), blocks_per_split, H=h, HKV=hkv, G=g, GP=triton.next_power_of_2(g), D=d, DP=dp,
        BS=bs, BLOCK_N=block_n, SPLITS=num_splits, num_warps=num_warps)
    _decode_reduce[(nb, h)](part_out, part_lse, out, tokens, H=h, D=d, DP=dp, SPLITS=num_splits,
                            SP=triton.next_power_of_2(num_splits))


@triton.jit
def _prefill(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr, query_start_ptr, rows_ptr, scale,
             tables_stride, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
             BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i, h, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows_ptr + i)
    q_start = tl.load(query_start_ptr + row)
    q_len = tl.load(query_start_ptr + row + 1) - q_start
    if mt * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + row)
        kvh = h // (H // HKV)
        offs_m, offs_d, offs_n = mt * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, DP), tl.arange(0, BLOCK_N)
        m_mask, d_mask = offs_m < q_len, offs_d < D
        q = tl.load(q_ptr + ((q_start + offs_m) * H + h)[:, None] * D + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        q_pos = ctx - q_len + offs_m  # query j sees keys 0..its own position
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        end = tl.minimum(ctx, ctx - q_len + (mt + 1) * BLOCK_M)  # the tile's last query's position + 1
        for n0 in range(0, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            block = tl.load(tables_ptr + row * tables_stride + pos // BS, mask=n_mask, other=0)
            kv_off = ((block * BS + pos % BS) * HKV + kvh)[:, None] * D + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * 1.4426950408889634)
            s = tl.where(n_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padding query row sees no keys
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + ((q_start + offs_m) * H + h)[:, None] * D + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_start: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                      scale: float, max_query: int) -> None:
    """For every sequence in rows: its query chunk q[query_start[r]:query_start[r+1]] attends to its context
    (context_lens[r] tokens, the chunk's own K/V already stored), causally; results into out at the same rows."""
    _, bs, hkv, d = k_cache.shape
    h = q.shape[1]
    block_m = 16 if max_query <= 16 else 32
    grid = (rows.shape[0], h, -(-max_query // block_m))
    _prefill[grid](q, k_cache, v_cache, out, block_tables, context_lens, query_start, rows, scale,
                   block_tables.stride(0), H=h, HKV=hkv, D=d, DP=triton.next_power_of_2(d), BS=bs,
                   BLOCK_M=block_m, BLOCK_N=32)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """The GPU attention backend: the same interface and results as layers.attention.torch_attention."""
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    q = q.contiguous()
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.decode_rows,
                         meta.decode_tokens, out, scale, meta.decode_max_context)
    if meta.prefill_rows.numel():
        prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start,
                          meta.prefill_rows, out, scale, meta.prefill_max_query)
    return out

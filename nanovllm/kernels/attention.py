"""Triton kernels for paged attention (the GPU backend; the torch backend in layers/attention.py is the reference).

- store_kv: this step's K/V rows into their cache slots (slot -1: a padding row, skipped).
- decode: one query token per sequence; it reads the whole K/V context for one token, so it is bound by memory
  bandwidth and is shaped to read each K/V byte once, in large pipelined tiles, from enough programs to keep
  every SM's loads in flight. The query heads that share a KV head (the GQA group) are the rows of one
  tensor-core tile; flash-decoding splits each context over several programs (partial outputs and their
  log-sum-exp), their count set by the batch, each split's length by its sequence's context on the device; a
  small second kernel combines the splits.
- prefill: a chunk of query tokens per sequence over its whole context in the paged cache (a cached prefix plus
  the chunk itself), causal within the chunk: compute-bound, query tiles x key tiles on tensor cores.
Keys are fetched a tile of positions at a time through the block table, so any block size works and a tile may
span several blocks. Softmax in fp32 with exp2; the inputs may be fp32 (exact: the interpreter tests), bf16 or
fp16.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride, N: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        k = tl.load(k_ptr + t * k_stride + offs, mask=mask)
        v = tl.load(v_ptr + t * v_stride + offs, mask=mask)
        tl.store(k_cache_ptr + slot * N + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * N + offs, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hkv, D] (rows may be strided, heads and dims contiguous); caches [blocks, block_size, Hkv, D]."""
    n = k.shape[1] * k.shape[2]
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(2) == 1 and v.stride(1) == v.shape[2]
    _store_kv[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), N=n, BLOCK=triton.next_power_of_2(n)
    )


@triton.jit
def _decode_split(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    lens_ptr,
    rows_ptr,
    tokens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    tables_stride,
    min_tiles,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """One (sequence, KV head, split): the GQA group's G query heads are the rows of a [GP >= 16, D] tile, so
    scores and values are two tensor-core dots per K/V tile ([GP, D] x [D, BLOCK_N], [GP, BLOCK_N] x
    [BLOCK_N, D]) and each K/V byte is read once for the group. A K/V tile is BLOCK_N positions (several
    cache blocks), gathered through the block table; the loop's loads are software-pipelined (num_stages).
    The context's tiles are cut on the device into SPLITS equal runs of at least min_tiles, so a launch's
    grid depends on the batch alone (CUDA graphs) while every sequence fills as many programs as its own
    length allows. SPLITS == 1: the output directly; else a partial output and its log-sum-exp per split."""
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows_ptr + b)
    token = tl.load(tokens_ptr + b)
    ctx = tl.load(lens_ptr + row)
    tiles = (ctx + BLOCK_N - 1) // BLOCK_N
    per_split = tl.maximum((tiles + SPLITS - 1) // SPLITS, min_tiles)
    first = split * per_split
    last = tl.minimum(first + per_split, tiles)
    offs_g, offs_d, offs_n = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    g_mask, d_mask = offs_g < G, offs_d < D
    q = tl.load(
        q_ptr + (token * H + heads)[:, None] * D + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0
    )
    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    for t in range(first, last):  # every tile holds at least one key: m is finite after the first
        pos = t * BLOCK_N + offs_n
        n_mask = pos < ctx
        block = tl.load(tables_ptr + row * tables_stride + pos // BS, mask=n_mask, other=0)
        kv_off = ((block * BS + pos % BS) * HKV + kvh)[:, None] * D + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GP, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:  # no reduce: a sequence without keys (a graph's padding row) gets zeros
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(
            out_ptr + (token * H + heads)[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask
        )
    elif first < last:  # an empty split writes nothing: the reduce counts the splits that have keys
        part = (b * H + heads) * SPLITS + split
        tl.store(part_out_ptr + part[:, None] * D + offs_d[None, :], acc / l[:, None], mask=o_mask)
        tl.store(part_lse_ptr + part, m + tl.log2(l), mask=g_mask)


@triton.jit
def _decode_reduce(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lens_ptr,
    rows_ptr,
    tokens_ptr,
    min_tiles,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    SP: tl.constexpr,
):
    """One (sequence, KV head): the group's partial outputs weighted by exp2(lse - max) over the splits that have
    keys. It reads G x SPLITS x D floats where the split kernel read the whole context: a few percent at most."""
    b, kvh = tl.program_id(0), tl.program_id(1)
    token = tl.load(tokens_ptr + b)
    tiles = (tl.load(lens_ptr + tl.load(rows_ptr + b)) + BLOCK_N - 1) // BLOCK_N
    per_split = tl.maximum((tiles + SPLITS - 1) // SPLITS, min_tiles)  # as the split kernel cuts them
    used = (tiles + per_split - 1) // per_split
    offs_g, offs_s, offs_d = tl.arange(0, GP), tl.arange(0, SP), tl.arange(0, DP)
    heads = kvh * G + offs_g
    gs_mask = (offs_g < G)[:, None] & (offs_s < used)[None, :]
    part = (b * H + heads)[:, None] * SPLITS + offs_s[None, :]  # [GP, SP]
    lse = tl.load(part_lse_ptr + part, mask=gs_mask, other=float("-inf"))
    m = tl.max(lse, axis=1)
    w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)[:, None])  # a row without keys: all weights 0
    parts = tl.load(
        part_out_ptr + part[:, :, None] * D + offs_d[None, None, :],
        mask=gs_mask[:, :, None] & (offs_d < D)[None, None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=1)
    o = tl.sum(w[:, :, None] * parts, axis=1) / tl.where(total > 0, total, 1.0)[:, None]  # no keys: zeros
    tl.store(
        out_ptr + (token * H + heads)[:, None] * D + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=(offs_g < G)[:, None] & (offs_d < D)[None, :],
    )


TARGET_PROGRAMS = 4096  # at 128 sequences x 8 KV heads, 4 splits ran 1.45x faster than 1 (H200, the old kernel)
MAX_SPLITS = 16
SPLIT_MIN_TOKENS = 256  # a shorter split saves less reading than its partial write and reduce cost


def num_splits_for(num_seqs: int, kv_heads: int, max_context: int, split_min: int = SPLIT_MIN_TOKENS) -> int:
    """How many programs share one sequence's context: enough for ~TARGET_PROGRAMS in all, no more than the
    longest context fills with splits of split_min tokens. It depends only on the batch and a bound on the
    contexts: under CUDA graphs (max_context = max_model_len) the grid is fixed by the batch bucket, and each
    sequence's split length is derived on the device from its own context."""
    wanted = TARGET_PROGRAMS // max(1, num_seqs * kv_heads)
    return max(1, min(wanted, MAX_SPLITS, -(-max_context // split_min)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    max_context: int,
    num_splits: int | None = None,
    split_min: int = SPLIT_MIN_TOKENS,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    """out[tokens[b]] = attention of q[tokens[b]] over sequence rows[b]'s cached context, for every b.
    q, out: [T, H, D] contiguous. max_context bounds the contexts: the step's longest (eager), max_model_len
    under CUDA graphs (the launch must not depend on the step). split_min: the shortest split, in tokens."""
    nb = rows.shape[0]
    _, bs, hkv, d = k_cache.shape
    h = q.shape[1]
    g = h // hkv
    dp = triton.next_power_of_2(d)
    block_n = block_n or (64 if dp * q.element_size() <= 256 else 32)  # K+V stages within shared memory
    splits = num_splits or num_splits_for(nb, hkv, max_context, split_min)
    min_tiles = max(1, -(-split_min // block_n))
    part_out = torch.empty(nb, h, splits, d, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_lse = torch.empty(nb, h, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    _decode_split[(nb, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        rows,
        tokens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        block_tables.stride(0),
        min_tiles,
        H=h,
        HKV=hkv,
        G=g,
        GP=max(16, triton.next_power_of_2(g)),
        D=d,
        DP=dp,
        BS=bs,
        BLOCK_N=block_n,
        SPLITS=splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _decode_reduce[(nb, hkv)](
            part_out,
            part_lse,
            out,
            context_lens,
            rows,
            tokens,
            min_tiles,
            H=h,
            G=g,
            GP=triton.next_power_of_2(g),
            D=d,
            DP=dp,
            BLOCK_N=block_n,
            SPLITS=splits,
            SP=triton.next_power_of_2(splits),
        )


@triton.jit
def _prefill(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    query_start_ptr,
    rows_ptr,
    scale,
    tables_stride,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One (sequence, query head, tile of BLOCK_M query tokens) over the sequence's paged context: two
    tensor-core dots per key tile ([BLOCK_M, D] x [D, BLOCK_N], then [BLOCK_M, BLOCK_N] x [BLOCK_N, D]), keys
    gathered through the block table (a cached prefix and the chunk itself alike), loads pipelined
    (num_stages). The loop stops at the tile's last query position: causal tiles past it are never read."""
    i, h, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows_ptr + i)
    q_start = tl.load(query_start_ptr + row)
    q_len = tl.load(query_start_ptr + row + 1) - q_start
    if mt * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + row)
        kvh = h // (H // HKV)
        offs_m, offs_d, offs_n = mt * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, DP), tl.arange(0, BLOCK_N)
        m_mask, d_mask = offs_m < q_len, offs_d < D
        q = tl.load(
            q_ptr + ((q_start + offs_m) * H + h)[:, None] * D + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
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
        tl.store(
            out_ptr + ((q_start + offs_m) * H + h)[:, None] * D + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    max_query: int,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> None:
    """For every sequence in rows: its query chunk q[query_start[r]:query_start[r+1]] attends to its context
    (context_lens[r] tokens, the chunk's own K/V already stored), causally; results into out at the same rows.
    Long chunks take 128-query tiles (8 warps; 64 for fp32 or head dims over 128, so 3 stages of K/V tiles fit
    in shared memory): each K/V tile is reused by more queries; short chunks 16 or 32."""
    _, bs, hkv, d = k_cache.shape
    h = q.shape[1]
    wide = triton.next_power_of_2(d) * q.element_size() <= 256
    block_m = block_m or (16 if max_query <= 16 else 32 if max_query <= 64 else 128 if wide else 64)
    block_n = block_n or (64 if block_m >= 64 and wide else 32)
    grid = (rows.shape[0], h, -(-max_query // block_m))
    _prefill[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        query_start,
        rows,
        scale,
        block_tables.stride(0),
        H=h,
        HKV=hkv,
        D=d,
        DP=triton.next_power_of_2(d),
        BS=bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps or (8 if block_m >= 128 else 4),
        num_stages=num_stages,
    )


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float
) -> torch.Tensor:
    """The GPU attention backend: the same interface and results as layers.attention.torch_attention."""
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    q = q.contiguous()
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            meta.decode_rows,
            meta.decode_tokens,
            out,
            scale,
            meta.decode_max_context,
        )
    if meta.prefill_rows.numel():
        prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            meta.query_start,
            meta.prefill_rows,
            out,
            scale,
            meta.prefill_max_query,
        )
    return out

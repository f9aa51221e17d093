from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm.kernels import cpu as cpu_kernel


@dataclass
class AttentionMetadata:
    """Where each sequence's queries sit in the flat batch and where its keys sit in the paged cache.

    Built once per step by the model runner and read by every attention layer, whatever the backend.
    """
    query_start: torch.Tensor     # [B+1] offsets of each sequence's query tokens in the flat batch
    context_lens: torch.Tensor    # [B] tokens in the cache once this step's tokens are written
    block_tables: torch.Tensor    # [B, max_blocks] block ids, padded with 0
    slot_mapping: torch.Tensor    # [T] cache slot (block * block_size + offset) of each new token
    query_start_cpu: list[int]    # the same on the host: per-sequence loops must not sync with the device
    context_lens_cpu: list[int]
    decode_rows: torch.Tensor     # [Bd] sequences with a single query token, batched together
    decode_tokens: torch.Tensor   # [Bd] their positions in the flat batch
    decode_max_context: int       # longest context among them
    prefill_rows: torch.Tensor    # [Bp] sequences with several query tokens (prefill chunks)
    prefill_max_query: int        # longest query chunk among them


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V ([T, Hkv, D]) into the paged caches ([num_blocks, block_size, Hkv, D])."""
    if cpu_kernel.store_kv(k, v, k_cache, v_cache, slot_mapping):
        return
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Paged attention with torch ops (the CPU path and the reference for GPU kernels).

    The backend interface: q [T, H, D] and this step's k, v [T, Hkv, D] in, attention output [T, H, D] out;
    the backend also stores k, v into the paged caches at meta.slot_mapping.

    Single-token queries (decodes) run through our C kernel on CPU (kernels/cpu_attention.c: it reads the
    blocks in place; docs/benchmarks.md has its speed-up over a gather and SDPA), else as one batched SDPA over
    their gathered blocks. Prompt chunks (whole prompts, or chunks after a cached prefix gathered from the
    cache) in bf16 run through our AMX flash attention on CPUs that have it (kernels/cpu_prefill.c), else
    through SDPA one sequence at a time, causal within the chunk.
    """
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = q.new_empty(q.shape)  # contiguous, whatever q's strides (a view of the QKV output)
    block_size = k_cache.shape[1]
    if len(meta.decode_rows) and cpu_kernel.available(q, k_cache):
        cpu_kernel.decode_attention(q, out, k_cache, v_cache, meta, scale)
    elif len(meta.decode_rows):
        lens = meta.context_lens[meta.decode_rows]
        width = -(-meta.decode_max_context // block_size)
        tables = meta.block_tables[meta.decode_rows, :width].flatten()
        shape = (len(meta.decode_rows), width * block_size, *k_cache.shape[2:])
        # index_select on the block dim: about 3x faster on CPU than advanced indexing
        keys = k_cache.index_select(0, tables).view(shape).transpose(1, 2)     # [Bd, Hkv, L, D]
        values = v_cache.index_select(0, tables).view(shape).transpose(1, 2)
        mask = torch.arange(keys.shape[2], device=q.device)[None, :] < lens[:, None]
        # GQA without expanding K/V: the query heads sharing a KV head act as that head's query rows
        queries = q[meta.decode_tokens].view(len(lens), keys.shape[1], -1, q.shape[-1])  # [Bd, Hkv, G, D]
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
        out[meta.decode_tokens] = o.flatten(1, 2)
    starts = meta.query_start_cpu
    chunks = [i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] > 1]  # prefill chunks
    kv = [chunk_keys(i, k, v, k_cache, v_cache, meta) for i in chunks]
    done = bool(chunks) and cpu_kernel.prefill_attention(q, out, meta.query_start, chunks, *zip(*kv), scale)
    for i, (keys, values) in zip(chunks, [] if done else kv):
        s, e, ctx = starts[i], starts[i + 1], meta.context_lens_cpu[i]
        qlen = e - s
        # query j sits at position ctx - qlen + j and sees keys 0..that position
        mask = None if ctx == qlen else torch.ones(qlen, ctx, dtype=torch.bool, device=q.device).tril(ctx - qlen)
        # 4-D inputs: with 3-D ones torch on CPU takes its math path instead of flash attention, 2-3.5x slower
        o = F.scaled_dot_product_attention(q[None, s:e].transpose(1, 2), keys[None].transpose(1, 2),
                                           values[None].transpose(1, 2), attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


def chunk_keys(i: int, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill chunk i's keys and values [context, Hkv, D]: its own rows of this step's k, v where it has no cached
    prefix, else its whole context gathered from the paged cache (this step's rows are already stored there)."""
    s, e, ctx = meta.query_start_cpu[i], meta.query_start_cpu[i + 1], meta.context_lens_cpu[i]
    if ctx == e - s:
        return k[s:e], v[s:e]
    blocks = meta.block_tables[i, :-(-ctx // k_cache.shape[1])]
    return k_cache.index_select(0, blocks).flatten(0, 1)[:ctx], v_cache.index_select(0, blocks).flatten(0, 1)[:ctx]

"""The paged KV pool: how many blocks it has, and the one tensor [2, layers, blocks, block_size, kv_heads, head_dim]
that holds every layer's keys and values."""

import math

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.parallel import tp_size
from nanovllm.memory import huge_page_buffer, keep_freed_memory


def num_blocks(runner, config: EngineConfig, bytes_per_block: int) -> int:
    """num_kv_blocks if given; else what kv_cache_gib holds (CPU) or what the GPU has left (CUDA), but no more than
    max_num_seqs full-length sequences could use."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.device == "cuda":
        blocks = blocks_from_gpu_memory(runner, config, bytes_per_block)
    else:
        blocks = int(config.kv_cache_gib * 2**30 // bytes_per_block)
    blocks = min(blocks, config.max_num_seqs * -(-config.max_model_len // config.block_size))
    if blocks < 1:
        raise ValueError(f"kv_cache_gib={config.kv_cache_gib} holds no KV block of {bytes_per_block} bytes")
    return blocks


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: padded slots are masked out, but NaN garbage times a zero weight is still NaN. On CPU
    every page is touched here, at start-up, as vLLM does: a page first written during generate() costs a fault
    (~7 us a 4 KB page in a VM), and the KV writes of a prefill step took 133 ms instead of 10. There the pool
    sits on 2 MB pages: decode attention reads scattered blocks, ~8% faster (fewer TLB misses)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    pool = huge_page_buffer(math.prod(shape) * dtype.itemsize).zero_().view(dtype).view(shape)
    keep_freed_memory()
    return pool


def blocks_from_gpu_memory(runner, config: EngineConfig, bytes_per_block: int) -> int:
    """Blocks that fit in gpu_memory_utilization of the card once the weights and the activations of the
    largest step (max_num_batched_tokens tokens, logits for max_num_seqs rows) are accounted for."""
    model, dev = runner.model, runner.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    attn = model.model.layers[0].self_attn
    dummy = torch.zeros(1, config.block_size, attn.num_kv_heads, attn.head_dim, dtype=runner.dtype, device=dev)
    for layer in model.model.layers:  # a one-block cache: the profiling step writes nothing (slots -1)
        layer.self_attn.k_cache = layer.self_attn.v_cache = dummy
    n = config.max_num_batched_tokens
    meta = AttentionMetadata.one_prompt(n, config.block_size, dev)
    rows = torch.arange(min(n, config.max_num_seqs), device=dev)
    logits = runner.eager_forward(
        torch.zeros(n, dtype=torch.long, device=dev), torch.arange(n, device=dev) % config.max_model_len, meta, rows
    )
    if logits is not None:  # the sampler works on a float copy and a sorted one
        torch.sort(logits.float().softmax(-1), dim=-1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    others = total - free - torch.cuda.memory_reserved()  # the CUDA context, NCCL, other processes
    blocks = int((total * config.gpu_memory_utilization - peak - others) // bytes_per_block)
    if tp_size() > 1:  # every rank must hold the same pool
        t = torch.tensor([blocks], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        blocks = int(t.item())
    if blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no room for the KV cache: "
            f"{total / 2**30:.1f} GiB on the card, {peak / 2**30:.1f} GiB for weights and activations, "
            f"{others / 2**30:.1f} GiB used by others"
        )
    return blocks

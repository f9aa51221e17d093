"""What only the CUDA path does: size the KV pool from the memory a profiled forward leaves free, and replay
decode steps from CUDA graphs captured at start-up (one per batch-size bucket)."""
import sys
import time

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.parallel import tp_size


def kv_blocks_from_memory(runner, config: EngineConfig, bytes_per_block: int) -> int:
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
    blocks = -(-n // config.block_size)
    long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)
    meta = AttentionMetadata(
        query_start=long([0, n]), context_lens=long([n]), block_tables=torch.zeros(1, blocks, dtype=torch.long,
                                                                                  device=dev),
        slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev), query_start_cpu=[0, n], context_lens_cpu=[n],
        decode_rows=long([]), decode_tokens=long([]), decode_max_context=0, prefill_rows=long([0]),
        prefill_max_query=n)
    rows = torch.arange(min(n, config.max_num_seqs), device=dev)
    logits = runner.forward(torch.zeros(n, dtype=torch.long, device=dev),
                            torch.arange(n, device=dev) % config.max_model_len, meta, rows)
    if logits is not None:  # the sampler works on a float copy and a sorted one
        torch.sort(logits.float().softmax(-1), dim=-1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    others = total - free - torch.cuda.memory_reserved()  # the CUDA context, NCCL, other processes
    num_blocks = int((total * config.gpu_memory_utilization - peak - others) // bytes_per_block)
    if tp_size() > 1:  # every rank must hold the same pool
        t = torch.tensor([num_blocks], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        num_blocks = int(t.item())
    if num_blocks < 1:
        raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no room for the KV cache: "
                         f"{total / 2**30:.1f} GiB on the card, {peak / 2**30:.1f} GiB for weights and activations, "
                         f"{others / 2**30:.1f} GiB used by others")
    return num_blocks


class DecodeGraphs:
    """Decode-only steps of up to max(buckets) sequences replay a graph captured for the smallest bucket that
    holds them; the padded rows write nothing (slot -1) and attend to nothing (context 0). Block tables are
    sized for max_model_len and the attention splits for it, so nothing in a capture depends on the step."""

    def __init__(self, runner, config: EngineConfig):
        start = time.perf_counter()
        dev, self.runner = runner.device, runner
        max_bs = min(config.max_num_seqs, 512)
        self.buckets = sorted({b for b in [1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs] if b <= max_bs})
        width = -(-config.max_model_len // config.block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.lens = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_bs, width, dtype=torch.long, device=dev)
        # the graphs read these through raw pointers: they must outlive __init__ (else the allocator hands their
        # memory to later tensors and a replay gathers with whatever lies there)
        self.rows = rows = torch.arange(max_bs + 1, device=dev)
        self.graphs, self.logits, pool = {}, {}, None
        for bs in reversed(self.buckets):  # largest first: the smaller ones fit in its memory pool
            meta = AttentionMetadata(
                query_start=rows[:bs + 1], context_lens=self.lens[:bs], block_tables=self.tables[:bs],
                slot_mapping=self.slots[:bs], query_start_cpu=[], context_lens_cpu=[], decode_rows=rows[:bs],
                decode_tokens=rows[:bs], decode_max_context=config.max_model_len, prefill_rows=rows[:0],
                prefill_max_query=0)
            args = (self.input_ids[:bs], self.positions[:bs], meta, rows[:bs])
            runner.eager_forward(*args)  # warm-up: kernels compiled, allocator primed
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = runner.eager_forward(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        print(f"nanovllm: captured CUDA graphs for {len(self.buckets)} decode batch sizes (1..{max_bs}) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    def covers(self, input_ids: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor) -> bool:
        n = input_ids.shape[0]
        return n <= self.buckets[-1] and meta.decode_rows.shape[0] == n and last.shape[0] == n

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:bs] = -1
        self.lens[:n] = meta.context_lens
        self.lens[n:bs] = 0
        self.tables[:n, :meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bs].replay()
        logits = self.logits[bs]
        return None if logits is None else logits[:n]

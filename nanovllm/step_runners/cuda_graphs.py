"""Decode steps on CUDA replayed from CUDA graphs captured at start-up, one per batch-size bucket: the step runner
the CUDA ops pick (ops/cuda_ops.py)."""

import sys
import time

import torch

from nanovllm.config import EngineConfig
from nanovllm.layers.attention import AttentionMetadata


class DecodeGraphs:
    """Decode-only steps of up to max(buckets) sequences replay a graph captured for the smallest bucket that
    holds them; the padded rows write nothing (slot -1) and attend to nothing (context 0). Block tables are
    sized for max_model_len; the decode attention's split count is set by the bucket alone and each sequence's
    split length is derived on the device from its own context (kernels/attention.py), so nothing in a capture
    depends on the step and a short context still fills its splits, whatever max_model_len is."""

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
            meta = AttentionMetadata.decode_only(
                rows, self.lens[:bs], self.tables[:bs], self.slots[:bs], config.max_model_len
            )
            args = (self.input_ids[:bs], self.positions[:bs], meta, rows[:bs])
            runner.eager_forward(*args)  # warm-up: kernels compiled, allocator primed
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = runner.eager_forward(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        print(
            f"nanovllm: captured CUDA graphs for {len(self.buckets)} decode batch sizes (1..{max_bs}) in "
            f"{time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )

    def covers(self, input_ids: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor) -> bool:
        n = input_ids.shape[0]
        return n <= self.buckets[-1] and meta.decode_rows.shape[0] == n and last.shape[0] == n

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor
    ) -> torch.Tensor | None:
        """The logits of every row (covers() takes steps whose `last` rows are all of them)."""
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:bs] = -1
        self.lens[:n] = meta.context_lens
        self.lens[n:bs] = 0
        self.tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bs].replay()
        logits = self.logits[bs]
        return None if logits is None else logits[:n]

import math

import numpy as np
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.sampler import SamplingBatch, sample


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: padded slots are masked out, but NaN garbage times a zero weight is still NaN.
    On CPU through numpy's calloc, whose pages are zeroed lazily by the OS: torch.zeros would touch
    every page of a multi-GiB pool at start-up (seconds)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    """Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype, eos_token_ids: set[int]):
        self.model, self.device, self.block_size = model, torch.device(config.device), config.block_size
        self.eos_token_ids = sorted(eos_token_ids)
        attn = model.model.layers[0].self_attn
        layers = len(model.model.layers)
        bytes_per_block = 2 * layers * config.block_size * attn.num_kv_heads * attn.head_dim * dtype.itemsize
        self.num_blocks = config.num_kv_blocks or int(config.kv_cache_gib * 2**30 // bytes_per_block)
        if config.num_kv_blocks is None:
            # no use for more blocks than max_num_seqs full-length sequences could hold
            self.num_blocks = min(self.num_blocks, config.max_num_seqs * -(-config.max_model_len // self.block_size))
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_gib={config.kv_cache_gib} holds no KV block of {bytes_per_block} bytes")
        shape = (2, layers, self.num_blocks, config.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = zeros(shape, dtype, self.device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.generator = torch.Generator(self.device).manual_seed(config.seed)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, query_start, context_lens = [], [], [], [0], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            for pos in range(start, end):
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        decode_rows = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            query_start=as_tensor(query_start), context_lens=as_tensor(context_lens),
            block_tables=as_tensor(tables), slot_mapping=as_tensor(slots),
            query_start_cpu=query_start, context_lens_cpu=context_lens,
            decode_rows=as_tensor(decode_rows), decode_tokens=as_tensor([query_start[i] for i in decode_rows]),
            decode_max_context=max((context_lens[i] for i in decode_rows), default=0))
        return as_tensor(input_ids), as_tensor(positions), meta

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        ps = [s.params for s in seqs]
        f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=self.device)
        b = SamplingBatch(temperature=f([p.temperature for p in ps]),
                          top_k=torch.tensor([p.top_k for p in ps], device=self.device),
                          top_p=f([p.top_p for p in ps]), min_p=f([p.min_p for p in ps]),
                          generators=[s.generator for s in seqs])
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in ps):
            b.repetition_penalty = f([p.repetition_penalty for p in ps])
            b.presence_penalty = f([p.presence_penalty for p in ps])
            b.frequency_penalty = f([p.frequency_penalty for p in ps])
            b.prompt_ids = [s.token_ids[:s.num_prompt_tokens] for s in seqs]
            b.output_ids = [s.output_token_ids for s in seqs]
        # min_tokens: EOS and stop tokens cannot be drawn before it is reached (as in vLLM)
        b.banned = [(i, t) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                    for t in (*self.eos_token_ids, *s.params.stop_token_ids)]
        return b

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> list[int]:
        """Forward the batch; sample a next token for the sequences at `sample_rows` (those whose whole
        context is now computed), from the logits of their last scheduled token."""
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        if not sample_rows:
            return []
        last = meta.query_start[1:][torch.tensor(sample_rows, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[last])
        seqs = [batch.seqs[i] for i in sample_rows]
        return sample(logits, self.sampling_batch(seqs), self.generator).tolist()

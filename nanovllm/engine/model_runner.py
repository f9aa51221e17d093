import numpy as np
import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.sampler import SamplingBatch


class ModelRunner:
    """Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

    The ops backend (nanovllm/ops) is the one the resolved config names; its step runner, if it has one (CUDA
    graphs, the fused CPU decode step), runs the steps it covers in place of the model's forward."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype, eos_token_ids: set[int],
                 workers=None):
        self.workers, self.failed = workers, False  # rank 0 of a tensor-parallel engine drives the workers
        self.model, self.device, self.block_size = model, torch.device(config.device), config.block_size
        self.dtype, self.eos_token_ids = dtype, sorted(eos_token_ids)
        self.ops = ops.backend(config.ops)
        ops.use(self.ops)
        attn = model.model.layers[0].self_attn
        layers = len(model.model.layers)
        bytes_per_block = 2 * layers * config.block_size * attn.num_kv_heads * attn.head_dim * dtype.itemsize
        self.num_blocks = kv_cache.num_blocks(self, config, bytes_per_block)
        shape = (2, layers, self.num_blocks, config.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = kv_cache.allocate(shape, dtype, self.device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step_runner = self.ops.step_runner(self, config)

    @property
    def graphs(self):
        """The CUDA graphs, where the step runner is them."""
        return self.step_runner if self.ops.NAME == "cuda" else None

    def pack(self, batch: ScheduledBatch, sample_rows: list[int]) -> np.ndarray:
        """A step's inputs as one int64 array: what tensor-parallel workers receive, and what every rank
        (rank 0 included) builds its tensors from. Layout: [T, B, W, D, S, decode_max_context], then input ids,
        positions, slots (T each), query starts (B+1), context lengths (B), block tables (B*W), decode rows and
        their token indices (D each), the rows whose logits are sampled (S)."""
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
        tables = [b for seq in batch.seqs for b in seq.block_table + [0] * (width - len(seq.block_table))]
        decode_rows = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        decode_max = max((context_lens[i] for i in decode_rows), default=0)
        last = [query_start[i + 1] - 1 for i in sample_rows]
        header = [len(input_ids), len(batch.seqs), width, len(decode_rows), len(last), decode_max]
        return np.array(header + input_ids + positions + slots + query_start + context_lens + tables + decode_rows
                        + [query_start[i] for i in decode_rows] + last, dtype=np.int64)

    def unpack(self, packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        T, B, W, D, S, decode_max = packed[:6].tolist()
        sizes = [T, T, T, B + 1, B, B * W, D, D, S]
        host = np.split(packed[6:], np.cumsum(sizes)[:-1])
        dev = torch.from_numpy(packed[6:].copy()).to(self.device).split(sizes)
        input_ids, positions, slots, query_start, context_lens, tables, decode_rows, decode_tokens, last = dev
        meta = AttentionMetadata.for_step(query_start, context_lens, tables.view(B, W), slots, decode_rows,
                                          decode_tokens, host[3].tolist(), host[4].tolist(), decode_max)
        return input_ids, positions, meta, last

    def prepare(self, batch: ScheduledBatch, sample_rows: list[int] = ()):
        return self.unpack(self.pack(batch, list(sample_rows)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last: torch.Tensor) -> torch.Tensor | None:
        """The model over one step; the logits of the `last` rows (on rank 0; None elsewhere or if no rows).
        The step runner takes the steps it covers (every rank decides alike: same inputs)."""
        if ops.active is not self.ops:  # another engine in this process chose another backend since
            ops.use(self.ops)
        if self.step_runner is not None and self.step_runner.covers(input_ids, meta, last):
            return self.step_runner.run(input_ids, positions, meta)
        return self.eager_forward(input_ids, positions, meta, last)

    def eager_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                      last: torch.Tensor) -> torch.Tensor | None:
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden[last]) if last.numel() else None

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        ps = [s.params for s in seqs]
        vocab = self.model.vocab_size  # a larger top_k is no limit (and may not fit in an int64)
        f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=self.device)
        b = SamplingBatch(temperature=f([p.temperature for p in ps]),
                          top_k=torch.tensor([min(p.top_k, vocab) for p in ps], device=self.device),
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
        # a bad word's last token, where the output ends with the rest of it (as in vLLM)
        b.banned += [(i, word[-1]) for i, s in enumerate(seqs) for word in s.bad_words
                     if len(word) == 1 or s.output_token_ids[-(len(word) - 1):] == word[:-1]]
        b.bias = [(i, t, v) for i, p in enumerate(ps) for t, v in (p.logit_bias or {}).items()]
        b.allowed = [(i, p.allowed_token_ids) for i, p in enumerate(ps) if p.allowed_token_ids]
        return b

    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> list[int]:
        """Forward the batch; sample a next token for the sequences at `sample_rows` (those whose whole
        context is now computed), from the logits of their last scheduled token."""
        if self.workers is None:
            logits = self.forward(*self.prepare(batch, sample_rows))
        else:
            if self.failed:
                raise RuntimeError("tensor parallelism failed earlier; this engine cannot continue")
            try:
                packed = self.pack(batch, sample_rows)
                self.workers.send(packed)
                logits = self.forward(*self.unpack(packed))
            except BaseException as e:  # the ranks are out of step now (Ctrl-C included): stop them all
                self.failed = True
                if isinstance(e, Exception):
                    raise self.workers.failure(e) from e
                self.workers.kill()
                raise
        if not sample_rows:
            return []
        with torch.inference_mode():
            seqs = [batch.seqs[i] for i in sample_rows]
            return ops.sample(logits, self.sampling_batch(seqs), self.generator).tolist()

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()

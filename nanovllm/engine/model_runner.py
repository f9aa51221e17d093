import numpy as np
import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.sampler import SamplingBatch, StepLogprobs, logprobs_of
from nanovllm.spec import rejection


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

    def pack(self, batch: ScheduledBatch, sample_rows: list[int],
             prompt_positions: dict[int, range] | None = None) -> np.ndarray:
        """A step's inputs as one int64 array: what tensor-parallel workers receive, and what every rank
        (rank 0 included) builds its tensors from. Layout: [T, B, W, D, S, decode_max_context], then input ids,
        positions, slots (T each), query starts (B+1), context lengths (B), block tables (B*W), decode rows and
        their token indices (D each), the tokens whose logits are computed (S): the sampled rows' last ones (and
        each speculative proposal's before them) and the `prompt_positions` of rows that asked for prompt
        logprobs, in token order."""
        input_ids, positions, slots, query_start, context_lens = [], [], [], [0], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            input_ids += seq.token_ids[start:end] + seq.spec_token_ids  # proposals follow the last token
            positions += range(start, end)
            for pos in range(start, end):
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [b for seq in batch.seqs for b in seq.block_table + [0] * (width - len(seq.block_table))]
        decode_rows = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        decode_max = max((context_lens[i] for i in decode_rows), default=0)
        last = [j for i in sample_rows
                for j in range(query_start[i + 1] - 1 - len(batch.seqs[i].spec_token_ids), query_start[i + 1])]
        if prompt_positions:  # in token order, as a step runner returns logits
            last = sorted(last + [query_start[i] + p - batch.seqs[i].num_computed
                                  for i, positions in prompt_positions.items() for p in positions])
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

    def prepare(self, batch: ScheduledBatch, sample_rows: list[int] = (), prompt_positions: dict | None = None):
        return self.unpack(self.pack(batch, list(sample_rows), prompt_positions))

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
        # structured outputs: the constrained rows' grammars' masks (the other rows pay nothing)
        b.constrained = [i for i, s in enumerate(seqs) if s.constraint is not None and s.constraint.usable]
        if b.constrained:
            b.token_bitmask = torch.empty(len(b.constrained), (vocab + 31) // 32, dtype=torch.int32)
            for row, i in enumerate(b.constrained):
                seqs[i].constraint.fill(b.token_bitmask, row)
        return b

    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> tuple[list[list[int]], StepLogprobs | None]:
        """Forward the batch; sample the next tokens of the sequences at `sample_rows` (those whose whole
        context is now computed), from the logits of their last scheduled token: one each, or for a sequence
        with speculative proposals the ones the target keeps and one more (nanovllm/spec/rejection.py). The
        logprobs of the rows that asked for them (None if none did)."""
        prompt_positions = prompt_logprob_positions(batch)
        if self.workers is None:
            logits = self.forward(*self.prepare(batch, sample_rows, prompt_positions))
        else:
            if self.failed:
                raise RuntimeError("tensor parallelism failed earlier; this engine cannot continue")
            try:
                packed = self.pack(batch, sample_rows, prompt_positions)
                self.workers.send(packed)
                logits = self.forward(*self.unpack(packed))
            except BaseException as e:  # the ranks are out of step now (Ctrl-C included): stop them all
                self.failed = True
                if isinstance(e, Exception):
                    raise self.workers.failure(e) from e
                self.workers.kill()
                raise
        if not sample_rows and not prompt_positions:
            return [], None
        with torch.inference_mode():
            if prompt_positions:
                sample_at, prompt_at = logit_rows(len(batch.seqs), sample_rows, prompt_positions)
                logits, prompt_logits = logits[sample_at], logits[prompt_at]
            seqs = [batch.seqs[i] for i in sample_rows]
            if any(s.spec_token_ids for s in seqs):  # never beside logprobs (see Speculator.propose)
                return rejection.verify(logits, seqs, self.sampling_batch, self.generator), None
            asked = [j for j, s in enumerate(seqs) if s.logprobs is not None]
            raw = logits[asked] if asked else None  # a copy: the sampler may change the logits in place
            tokens = ops.sample(logits, self.sampling_batch(seqs), self.generator) if seqs else torch.zeros(0)
            if not asked and not prompt_positions:
                return [[t] for t in tokens.tolist()], None
            step = StepLogprobs({}, {})
            if asked:
                entries = self.logprobs(raw, tokens[asked], [seqs[j].params.logprobs for j in asked])
                step.sampled = {sample_rows[j]: e for j, e in zip(asked, entries)}
            if prompt_positions:
                rows = list(prompt_positions)
                targets = [batch.seqs[i].token_ids[p + 1] for i in rows for p in prompt_positions[i]]
                entries = self.logprobs(prompt_logits, torch.tensor(targets, device=logits.device),
                                        [batch.seqs[i].params.prompt_logprobs for i in rows
                                         for _ in prompt_positions[i]])
                at = np.cumsum([0] + [len(prompt_positions[i]) for i in rows]).tolist()
                step.prompt = {i: entries[at[k]:at[k + 1]] for k, i in enumerate(rows)}
            return [[t] for t in tokens.tolist()], step

    @staticmethod
    def logprobs(logits: torch.Tensor, chosen: torch.Tensor, nums: list[int]) -> list[tuple]:
        """Per row: (ids, logprobs, rank) of the chosen token and that row's number of most likely ones (-1: the
        whole vocabulary)."""
        vocab = logits.shape[-1]
        nums = [vocab if k == -1 else k for k in nums]
        ids, values, ranks = logprobs_of(logits, chosen.long(), max(nums))
        return [(i[:k + 1], v[:k + 1], r) for i, v, r, k in zip(ids, values, ranks, nums)]

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()


def prompt_logprob_positions(batch: ScheduledBatch) -> dict[int, range]:
    """Per row of a request that asked for prompt logprobs (its first sequence computes them): this step's
    positions whose logits give one (those that predict a prompt token) and that are not recorded yet, so that a
    preempted request's recompute adds none twice."""
    out = {}
    for i in [i for i, seq in enumerate(batch.seqs) if seq.prompt_logprobs is not None]:
        seq, n = batch.seqs[i], batch.num_new_tokens[i]
        positions = range(max(seq.num_computed, len(seq.prompt_logprobs) - 1),
                          min(seq.num_computed + n, seq.num_prompt_tokens - 1))
        if positions:
            out[i] = positions
    return out


def logit_rows(num_rows: int, sample_rows: list[int], prompt_positions: dict[int, range]) -> tuple[list, list]:
    """Where the sampled rows' logits and the prompt positions' logits are among a step's logits (token order:
    each row's prompt positions, then its last token if it is sampled)."""
    sampled, sample_at, prompt_at, j = set(sample_rows), [], [], 0
    for i in range(num_rows):
        n = len(prompt_positions.get(i, ()))
        prompt_at += range(j, j + n)
        j += n
        if i in sampled:
            sample_at.append(j)
            j += 1
    return sample_at, prompt_at

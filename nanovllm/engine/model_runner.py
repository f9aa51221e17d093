from dataclasses import dataclass

import numpy as np
import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.logprobs import logit_rows, prompt_logprob_positions, step_logprobs
from nanovllm.sampling.persistent_batch import LogitsProcessors
from nanovllm.sampling.sampler import SamplingBatch, StepLogprobs
from nanovllm.sampling.table import Column, Flag, SamplingTable
from nanovllm.spec import rejection


@dataclass
class Step:
    """A step's inputs on the device, unpacked."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last: torch.Tensor  # the flat-batch index of each sampled row's last token
    sample_table_rows: np.ndarray  # each sampled row's row of the sampling table, on the host
    sample_table_rows_dev: torch.Tensor  # and on the device


@dataclass
class Launched:
    """A step on its way: its batch, and its sampled token ids on the device with their copy to the host."""

    batch: ScheduledBatch
    sample_rows: list[int]
    tokens: torch.Tensor | None
    host: torch.Tensor | None
    event: object  # the copy's CUDA event (None on CPU)
    needs_tokens: bool  # a sampled row's next draw depends on its token (penalties, a bad word
    # of several tokens), or the step computed logprobs: the host must have
    # them before the next step is scheduled
    logprobs: StepLogprobs | None = None  # on the host already, for the rows that asked (None if none did)
    kept: list[list[int]] | None = None  # a verification's tokens per sampled row (on the host)

    def token_ids(self) -> list[list[int]]:
        """Each sampled row's new tokens on the host: one, or a verification's kept proposals and one more (waits
        for their copy: the step's one transfer to the host)."""
        if self.kept is not None:
            return self.kept
        if self.event is not None:
            self.event.synchronize()
        return [] if self.host is None else [[t] for t in self.host.tolist()]


class ModelRunner:
    """Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

    The ops backend (nanovllm/ops) is the one the resolved config names; its step runner, if it has one (CUDA
    graphs, the fused CPU decode step), runs the steps it covers in place of the model's forward."""

    def __init__(
        self, config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype, eos_token_ids: set[int], workers=None
    ):
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
        rows = config.max_num_seqs
        self.block_tables: np.ndarray | None = None  # the block manager's; the engine hands it over
        self.sampling_table = SamplingTable(rows, model.vocab_size, self.device)  # per row of the block tables
        self.logits_processors = LogitsProcessors(config.logits_processors or [], config, self.device, eos_token_ids)
        self.last_sampled = torch.zeros(rows, dtype=torch.long, device=self.device)  # per row, on the device
        self.step_runner = self.ops.step_runner(self, config)

    @property
    def graphs(self):
        """The CUDA graphs, where the step runner is them."""
        return self.step_runner if self.ops.NAME == "cuda" else None

    def pack(
        self, batch: ScheduledBatch, sample_rows: list[int], prompt_positions: dict[int, range] | None = None
    ) -> np.ndarray:
        """A step's inputs as one int64 array: what tensor-parallel workers receive, and what every rank
        (rank 0 included) builds its tensors from. Layout: [T, B, W, D, S, decode_max_context, P, L], then input
        ids, positions, slots (T each), query starts (B+1), context lengths (B), block tables (B*W), decode rows
        and their token indices (D each), the tokens whose logits are computed (L, in token order: the sampled
        rows' last ones, each speculative proposal's before them, and the `prompt_positions` of rows that asked
        for prompt logprobs), the sampled rows' sampling-table rows (S), and for the P input tokens still on the
        device (async scheduling) where they go and their sequences' rows (P each). Vectorized: no loop over
        tokens, one over sequences per field."""
        seqs, bs = batch.seqs, self.block_size
        n = np.array(batch.num_new_tokens, dtype=np.int64)
        start = np.array([s.num_computed for s in seqs], dtype=np.int64)
        table_rows = np.array([s.row for s in seqs], dtype=np.int64)
        lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        B, ends = len(seqs), start + n
        query_start = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(n, out=query_start[1:])
        T = int(query_start[-1])
        sampled = np.array(sample_rows, dtype=np.int64)
        last = query_start[sampled + 1] - 1
        # decodes only (not a prefill chunk of one token): a sequence's one input token is its last one (a pending
        # one is filled in later)
        if T == B and (ends >= lens).all():
            input_ids = [s.token_ids[-1] for s in seqs]
            token_seq, positions = np.arange(B), start
        else:  # a pending token's slice is empty: its placeholder 0, filled in on the device; proposals follow
            input_ids = [
                t
                for s, a, k in zip(seqs, start.tolist(), batch.num_new_tokens)
                for t in (s.token_ids[a : a + k] + s.spec_token_ids) or [0]
            ]
            token_seq = np.repeat(np.arange(B), n)
            positions = np.arange(T) - np.repeat(query_start[:-1] - start, n)
            if batch.verifies:  # a verifying row's logits: its last token's and each proposal's
                k = [len(seqs[i].spec_token_ids) for i in sample_rows]
                last = np.concatenate([np.arange(e - j, e + 1) for e, j in zip(last.tolist(), k)])
        tables = self.block_tables[table_rows, : -(-int(ends.max()) // bs)]
        slots = tables[token_seq, positions // bs] * bs + positions % bs
        decode_rows = np.flatnonzero(n == 1)
        decode_max = int(ends[decode_rows].max()) if len(decode_rows) else 0
        pending = np.flatnonzero(start == lens)  # their last token is still on the device
        dst, src = query_start[pending], table_rows[pending]
        if prompt_positions:  # in token order, as a step runner returns logits
            last = np.sort(
                np.concatenate(
                    [
                        last,
                        [query_start[i] + p - seqs[i].num_computed for i, ps in prompt_positions.items() for p in ps],
                    ]
                )
            )
        header = [T, B, tables.shape[1], len(decode_rows), len(sampled), decode_max, len(dst), len(last)]
        return np.concatenate(
            [
                header,
                input_ids,
                positions,
                slots,
                query_start,
                ends,
                tables.ravel(),
                decode_rows,
                query_start[decode_rows],
                last,
                table_rows[sampled],
                dst,
                src,
            ]
        ).astype(np.int64, copy=False)

    def unpack(self, packed: np.ndarray) -> Step:
        """The packed inputs as tensors on the device; a pending input token is its row's last sampled token."""
        T, B, W, D, S, decode_max, P, L = packed[:8].tolist()
        dev = (
            torch.from_numpy(packed[8:].copy())
            .to(self.device, non_blocking=True)
            .split([T, T, T, B + 1, B, B * W, D, D, L, S, P, P])
        )
        input_ids, positions, slots, query_start, context_lens, tables, decode_rows, decode_tokens, last = dev[:9]
        if P:
            input_ids[dev[10]] = self.last_sampled[dev[11]]
        at = 8 + 3 * T  # the query starts and context lengths on the host too, and the sampling-table rows
        meta = AttentionMetadata.for_step(
            query_start,
            context_lens,
            tables.view(B, W),
            slots,
            decode_rows,
            decode_tokens,
            packed[at : at + B + 1].tolist(),
            packed[at + B + 1 : at + 2 * B + 1].tolist(),
            decode_max,
        )
        at += 2 * B + 1 + B * W + 2 * D + L
        return Step(input_ids, positions, meta, last, packed[at : at + S], dev[9])

    def prepare(self, batch: ScheduledBatch, sample_rows: list[int] = ()):
        step = self.unpack(self.pack(batch, list(sample_rows)))
        return step.input_ids, step.positions, step.meta, step.last

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor
    ) -> torch.Tensor | None:
        """The model over one step; the logits of the `last` rows (on rank 0; None elsewhere or if no rows).
        The step runner takes the steps it covers (every rank decides alike: same inputs)."""
        if ops.active is not self.ops:  # another engine in this process chose another backend since
            ops.use(self.ops)
        if self.step_runner is not None and self.step_runner.covers(input_ids, meta, last):
            return self.step_runner.run(input_ids, positions, meta)
        return self.eager_forward(input_ids, positions, meta, last)

    def eager_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor
    ) -> torch.Tensor | None:
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden[last]) if last.numel() else None

    def sampling_batch(self, seqs: list[Sequence], rows: np.ndarray, rows_dev: torch.Tensor) -> SamplingBatch:
        """The sampled sequences' parameters: their rows of the sampling table gathered on the device; what the
        sampler branches on is read here, on the host. Only the rows that need it (penalties, seeds, grammars) are
        looked at one by one."""
        table = self.sampling_table
        table.write_missing(seqs)
        values, flags = table.values[rows], table.flags[rows]
        low, high = values.min(0), values.max(0)
        any_flag = flags.any(0)
        t = table.values_dev[rows_dev]
        b = SamplingBatch(
            temperature=t[:, Column.TEMPERATURE],
            top_k=t[:, Column.TOP_K],
            top_p=t[:, Column.TOP_P],
            min_p=t[:, Column.MIN_P],
            generators=None,
            all_greedy=bool(high[Column.TEMPERATURE] == 0),
            any_greedy=bool(low[Column.TEMPERATURE] == 0),
            top_k_width=int(high[Column.TOP_K]) if low[Column.TOP_K] < self.model.vocab_size else 0,
            use_top_p=bool(low[Column.TOP_P] < 1),
            use_min_p=bool(high[Column.MIN_P] > 0),
        )
        if any_flag[Flag.SEEDED]:
            b.generators = [s.generator for s in seqs]
        if any_flag[Flag.PENALTIES]:
            b.repetition_penalty = t[:, Column.REPETITION_PENALTY]
            b.presence_penalty = t[:, Column.PRESENCE_PENALTY]
            b.frequency_penalty = t[:, Column.FREQUENCY_PENALTY]
            b.prompt_ids = [s.token_ids[: s.num_prompt_tokens] for s in seqs]
            b.output_ids = [s.output_token_ids for s in seqs]
        # structured outputs: the constrained rows' grammars' masks (the other rows pay nothing)
        b.constrained = [i for i in np.flatnonzero(flags[:, Flag.GRAMMAR]).tolist() if seqs[i].constraint.usable]
        if b.constrained:
            b.token_bitmask = torch.empty(len(b.constrained), (self.model.vocab_size + 31) // 32, dtype=torch.int32)
            for row, i in enumerate(b.constrained):
                seqs[i].constraint.fill(b.token_bitmask, row)
        b.uses_processors = bool(any_flag[Flag.PROCESSORS])
        return b

    def sampling_batch_of(self, seqs: list[Sequence]) -> SamplingBatch:
        """sampling_batch for sequences as they are (speculative decoding: each verified position's)."""
        rows = np.array([s.row for s in seqs], dtype=np.int64)
        return self.sampling_batch(seqs, rows, torch.from_numpy(rows).to(self.device))

    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> Launched:
        """Launch the batch's step: forward, and a next token sampled for the sequences at `sample_rows` (those
        whose whole context is now computed) from the logits of their last scheduled token. The sampled ids stay
        on the device, in their rows of `last_sampled` (where the next step reads the inputs the host does not
        have yet, async scheduling), and start their one copy to the host. The logprobs of the rows that asked
        for them (sampled tokens' and prompt tokens') are computed from the raw logits and read at once: a second
        copy, only in steps where a request asked. A step that verifies speculative proposals (never beside
        logprobs, never async) keeps what the target agrees with, and one token more (nanovllm/spec/rejection.py)."""
        prompt_positions = prompt_logprob_positions(batch)
        if self.workers is None:
            step = self.unpack(self.pack(batch, sample_rows, prompt_positions))
            logits = self.forward(step.input_ids, step.positions, step.meta, step.last)
        else:
            if self.failed:
                raise RuntimeError("tensor parallelism failed earlier; this engine cannot continue")
            try:
                packed = self.pack(batch, sample_rows, prompt_positions)
                self.workers.send(packed)
                step = self.unpack(packed)
                logits = self.forward(step.input_ids, step.positions, step.meta, step.last)
            except BaseException as e:  # the ranks are out of step now (Ctrl-C included): stop them all
                self.failed = True
                if isinstance(e, Exception):
                    raise self.workers.failure(e) from e
                self.workers.kill()
                raise
        if not sample_rows and not prompt_positions:
            return Launched(batch, sample_rows, tokens=None, host=None, event=None, needs_tokens=False)
        seqs, tokens, host, event, raw, asked = [batch.seqs[i] for i in sample_rows], None, None, None, None, []
        prompt_logits = None
        flags = self.sampling_table.flags
        with torch.inference_mode():
            if prompt_positions:
                sample_at, prompt_at = logit_rows(len(batch.seqs), sample_rows, prompt_positions)
                logits, prompt_logits = logits[sample_at], logits[prompt_at]
            if batch.verifies:
                kept = rejection.verify(
                    logits, seqs, self.sampling_batch_of, self.logits_processors.apply_once, self.generator
                )
                return Launched(batch, sample_rows, tokens=None, host=None, event=None, needs_tokens=True, kept=kept)
            if seqs:
                b = self.sampling_batch(seqs, step.sample_table_rows, step.sample_table_rows_dev)
                asked = np.flatnonzero(flags[step.sample_table_rows, Flag.LOGPROBS]).tolist()
                raw = logits[asked] if asked else None  # a copy: the sampler may change the logits in place
                logits = self.logits_processors.apply(logits, seqs, b.uses_processors, b.all_greedy)
                tokens = ops.sample(logits, b, self.generator)
                self.last_sampled[step.sample_table_rows_dev] = tokens
                host = tokens.to("cpu", non_blocking=True)
                if tokens.is_cuda:
                    event = torch.cuda.Event()
                    event.record()
            if not asked and not prompt_positions:
                needs_tokens = bool(
                    flags[step.sample_table_rows, Flag.NEEDS_OWN_TOKENS].any()
                    or self.logits_processors.needs_output_tokens
                )
                return Launched(batch, sample_rows, tokens=tokens, host=host, event=event, needs_tokens=needs_tokens)
            logprobs = step_logprobs(batch, sample_rows, asked, raw, tokens, prompt_positions, prompt_logits)
        return Launched(batch, sample_rows, tokens=tokens, host=host, event=event, needs_tokens=True, logprobs=logprobs)

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()

from dataclasses import dataclass, fields

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
class PackedStep:
    """A step's inputs on the host: what tensor-parallel workers receive, and what every rank (rank 0 included)
    builds its tensors from, packed into one int64 array by `pack` from these fields: a header (each array's
    length, then the numbers), then the arrays in this order."""

    input_ids: np.ndarray  # [T] the step's tokens (a pending one is a placeholder, filled in on the device)
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] where each token's K/V goes in the pool
    query_start: np.ndarray  # [B + 1] each sequence's first token in the flat batch
    context_lens: np.ndarray  # [B] each sequence's context after the step
    block_tables: np.ndarray  # [B * table_width]
    decode_rows: np.ndarray  # [D] the sequences with one token this step
    decode_tokens: np.ndarray  # [D] and that token's index
    logit_tokens: np.ndarray  # [L] the tokens whose logits are computed, in token order
    sample_table_rows: np.ndarray  # [S] each sampled row's row of the sampling table
    pending_dst: np.ndarray  # [P] the input tokens still on the device (async scheduling): where they go
    pending_src: np.ndarray  # [P] and their sequences' rows of last_sampled
    table_width: int  # W: the block tables' columns
    decode_max_context: int  # the longest context among the decode rows

    def pack(self) -> np.ndarray:
        arrays = [getattr(self, name) for name in PACKED_ARRAYS]
        header = [len(a) for a in arrays] + [getattr(self, name) for name in PACKED_NUMBERS]
        return np.concatenate([header, *arrays]).astype(np.int64, copy=False)

    @staticmethod
    def layout(packed: np.ndarray) -> tuple[dict[str, int], dict[str, int], np.ndarray]:
        """A packed step's array lengths and numbers by name, and the arrays' values (one array)."""
        header = packed[:PACKED_HEADER].tolist()
        lengths = dict(zip(PACKED_ARRAYS, header))
        numbers = dict(zip(PACKED_NUMBERS, header[len(PACKED_ARRAYS) :]))
        return lengths, numbers, packed[PACKED_HEADER:]


PACKED_ARRAYS = [f.name for f in fields(PackedStep) if f.type is np.ndarray]
PACKED_NUMBERS = [f.name for f in fields(PackedStep) if f.type is int]
PACKED_HEADER = len(PACKED_ARRAYS) + len(PACKED_NUMBERS)


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
        """A step's inputs (PackedStep) as one int64 array. The tokens whose logits are computed: the sampled rows'
        last ones, each speculative proposal's before them, and the `prompt_positions` of rows that asked for
        prompt logprobs. Vectorized: no loop over tokens, one over sequences per field."""
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
        step = PackedStep(
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            query_start=query_start,
            context_lens=ends,
            block_tables=tables.ravel(),
            decode_rows=decode_rows,
            decode_tokens=query_start[decode_rows],
            logit_tokens=last,
            sample_table_rows=table_rows[sampled],
            pending_dst=dst,
            pending_src=src,
            table_width=tables.shape[1],
            decode_max_context=decode_max,
        )
        return step.pack()

    def unpack(self, packed: np.ndarray) -> Step:
        """The packed inputs as tensors on the device; a pending input token is its row's last sampled token."""
        lengths, numbers, values = PackedStep.layout(packed)
        split = torch.from_numpy(values.copy()).to(self.device, non_blocking=True).split(list(lengths.values()))
        dev = dict(zip(lengths, split))
        if lengths["pending_dst"]:
            dev["input_ids"][dev["pending_dst"]] = self.last_sampled[dev["pending_src"]]
        host, at = {}, 0  # what is also read on the host
        for name, n in lengths.items():
            host[name] = values[at : at + n]
            at += n
        num_seqs = lengths["context_lens"]
        meta = AttentionMetadata.for_step(
            dev["query_start"],
            dev["context_lens"],
            dev["block_tables"].view(num_seqs, numbers["table_width"]),
            dev["slots"],
            dev["decode_rows"],
            dev["decode_tokens"],
            host["query_start"].tolist(),
            host["context_lens"].tolist(),
            numbers["decode_max_context"],
        )
        return Step(
            dev["input_ids"],
            dev["positions"],
            meta,
            dev["logit_tokens"],
            host["sample_table_rows"],
            dev["sample_table_rows"],
        )

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

    def execute(self, packed: np.ndarray) -> tuple[Step, torch.Tensor | None]:
        """The packed step on every rank (the tensor-parallel workers receive it first): its inputs and logits."""
        if self.workers is None:
            step = self.unpack(packed)
            return step, self.forward(step.input_ids, step.positions, step.meta, step.last)
        if self.failed:
            raise RuntimeError("tensor parallelism failed earlier; this engine cannot continue")
        try:
            self.workers.send(packed)
            step = self.unpack(packed)
            return step, self.forward(step.input_ids, step.positions, step.meta, step.last)
        except BaseException as e:  # the ranks are out of step now (Ctrl-C included): stop them all
            self.failed = True
            if isinstance(e, Exception):
                raise self.workers.failure(e) from e
            self.workers.kill()
            raise

    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> Launched:
        """Launch the batch's step: forward, and a next token sampled for the sequences at `sample_rows` (those
        whose whole context is now computed) from the logits of their last scheduled token. The sampled ids stay
        on the device, in their rows of `last_sampled` (where the next step reads the inputs the host does not
        have yet, async scheduling), and start their one copy to the host. The logprobs of the rows that asked
        for them (sampled tokens' and prompt tokens') are computed from the raw logits and read at once: a second
        copy, only in steps where a request asked. A step that verifies speculative proposals (never beside
        logprobs, never async) keeps what the target agrees with, and one token more (nanovllm/spec/rejection.py)."""
        prompt_positions = prompt_logprob_positions(batch)
        step, logits = self.execute(self.pack(batch, sample_rows, prompt_positions))
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

"""A step's sampling: the logits of the scheduled batch in, a SamplerOutput out. The logits processors adjust the
sampled rows' logits, `ops.sample` draws a token per row, the logprobs of the rows that asked are read off the raw
logits (nanovllm/logprobs.py), and a batch that carries tentative tokens (speculative decoding's proposals) goes to
the verifier hook instead, which keeps a run of them per row (nanovllm/spec)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine.batch import ScheduledBatch, Step
from nanovllm.engine.sequence import Sequence
from nanovllm.logprobs import logit_rows, step_logprobs
from nanovllm.sampling.persistent_batch import LogitsProcessors
from nanovllm.sampling.sampler import SamplingBatch, StepLogprobs
from nanovllm.sampling.table import Column, Flag, SamplingTable

# The verifier hook: (the sampled rows' logits, their sequences, the sampler) -> each sequence's new tokens (its
# tentative tokens kept and one more). Speculative decoding's Speculator.verify is one.
Verifier = Callable[[torch.Tensor, list[Sequence], "Sampler"], list[list[int]]]


@dataclass
class SamplerOutput:
    """What a step sampled: a token per sampled row on the device with its copy to the host under way, or (a
    verification) each row's kept tokens already on the host; and the logprobs of the rows that asked."""

    needs_tokens: bool  # a sampled row's next draw depends on its token (penalties, a bad word of several tokens, a
    # grammar, a user's logits processor), or the step computed logprobs: the host must have them before the next
    # step is scheduled
    tokens: torch.Tensor | None = None  # [S] on the device (None: nothing sampled, or a verification)
    host: torch.Tensor | None = None  # their copy to the host, under way
    event: object = None  # the copy's CUDA event (None on CPU)
    kept: list[list[int]] | None = None  # a verification's new tokens per sampled row, on the host
    logprobs: StepLogprobs | None = None  # on the host already, for the rows that asked (None if none did)

    def token_ids(self) -> list[list[int]]:
        """Each sampled row's new tokens on the host: one, or a verification's kept run (waits for their copy: the
        step's one transfer to the host)."""
        if self.kept is not None:
            return self.kept
        if self.event is not None:
            self.event.synchronize()
        return [] if self.host is None else [[t] for t in self.host.tolist()]

    @property
    def num_extra_tokens(self) -> int:
        """Tokens beyond one per sampled row: a verification's kept tentative tokens."""
        return 0 if self.kept is None else sum(len(new) - 1 for new in self.kept)


class Sampler:
    """Turns a step's logits into a SamplerOutput. It owns the sampling table (each row's parameters), the logits
    processors, the engine's generator and `last_sampled` (each row's latest token on the device, where a step
    whose input token the host does not have yet reads it: async scheduling)."""

    def __init__(self, config: EngineConfig, vocab_size: int, device: torch.device, eos_token_ids: set[int]):
        self.vocab_size, self.device = vocab_size, device
        rows = config.max_num_seqs
        self.table = SamplingTable(rows, vocab_size, device)  # per row of the block manager's tables
        self.logits_processors = LogitsProcessors(config.logits_processors or [], config, device, eos_token_ids)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self.last_sampled = torch.zeros(rows, dtype=torch.long, device=device)
        self.verifier: Verifier | None = None  # set by the engine with speculative decoding

    def __call__(self, batch: ScheduledBatch, step: Step, logits: torch.Tensor | None) -> SamplerOutput:
        """A next token for each sampled row (`batch.sample_rows`, those whose whole context is computed now) from
        the logits of its last scheduled token; the logprobs of the rows that asked (sampled tokens' and prompt
        tokens', `step.prompt_positions`). A batch with tentative tokens (never beside logprobs) is the verifier's."""
        if not batch.sample_rows and not step.prompt_positions:
            return SamplerOutput(needs_tokens=False)
        seqs = [batch.seqs[i] for i in batch.sample_rows]
        prompt_logits = None
        with torch.inference_mode():
            if step.prompt_positions:
                sample_at, prompt_at = logit_rows(len(batch.seqs), batch.sample_rows, step.prompt_positions)
                logits, prompt_logits = logits[sample_at], logits[prompt_at]
            if batch.tentative_rows:
                return SamplerOutput(needs_tokens=True, kept=self.verifier(logits, seqs, self))
            if not seqs:  # only prompt logprobs
                logprobs = step_logprobs(batch, [], [], None, None, step.prompt_positions, prompt_logits)
                return SamplerOutput(needs_tokens=True, logprobs=logprobs)
            b = self.sampling_batch(seqs, step.sample_table_rows, step.sample_table_rows_dev)
            asked = np.flatnonzero(self.table.flags[step.sample_table_rows, Flag.LOGPROBS]).tolist()
            raw = logits[asked] if asked else None  # a copy: the sampler may change the logits in place
            logits = self.logits_processors.apply(logits, seqs, b.uses_processors, b.all_greedy)
            tokens = ops.sample(logits, b, self.generator)
            self.last_sampled[step.sample_table_rows_dev] = tokens
            output = SamplerOutput(needs_tokens=True, tokens=tokens, host=tokens.to("cpu", non_blocking=True))
            if tokens.is_cuda:
                output.event = torch.cuda.Event()
                output.event.record()
            if asked or step.prompt_positions:
                output.logprobs = step_logprobs(
                    batch, batch.sample_rows, asked, raw, tokens, step.prompt_positions, prompt_logits
                )
            else:
                output.needs_tokens = bool(
                    self.table.flags[step.sample_table_rows, Flag.NEEDS_OWN_TOKENS].any()
                    or self.logits_processors.needs_output_tokens
                )
        return output

    def sampling_batch(self, seqs: list[Sequence], rows: np.ndarray, rows_dev: torch.Tensor) -> SamplingBatch:
        """The sampled sequences' parameters: their rows of the sampling table gathered on the device; what the
        sampler branches on is read here, on the host. Only the rows that need it (penalties, seeds, grammars) are
        looked at one by one."""
        table = self.table
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
            top_k_width=int(high[Column.TOP_K]) if low[Column.TOP_K] < self.vocab_size else 0,
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
            b.token_bitmask = torch.empty(len(b.constrained), (self.vocab_size + 31) // 32, dtype=torch.int32)
            for row, i in enumerate(b.constrained):
                seqs[i].constraint.fill(b.token_bitmask, row)
        b.uses_processors = bool(any_flag[Flag.PROCESSORS])
        return b

    def sampling_batch_of(self, seqs: list[Sequence]) -> SamplingBatch:
        """sampling_batch for sequences as they are (speculative decoding: each verified position's)."""
        rows = np.array([s.row for s in seqs], dtype=np.int64)
        return self.sampling_batch(seqs, rows, torch.from_numpy(rows).to(self.device))

"""The logits processors' view of the engine: a persistent batch. Our steps sample whatever sequences the scheduler
picked, in its order; a processor instead keeps per-row state, so each sequence keeps its row from step to step
and every step's BatchUpdate says which sequences left, joined or moved rows (as vLLM's persistent batch does: a
new sequence takes the lowest free row, and the last rows move down into holes so the batch stays dense).

When no sampled sequence asks for a built-in adjustment, no built-in processor holds a row and there is no user
processor, nothing runs at all: the plain path pays one test per step."""

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC

import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.builtin import (
    AllowedTokenIdsLogitsProcessor,
    BadWordsLogitsProcessor,
    BuiltinLogitsProcessor,
    LogitBiasLogitsProcessor,
    MinTokensLogitsProcessor,
)
from nanovllm.sampling.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality, load
from nanovllm.sampling_params import SamplingParams


class OutputTokenIds(SequenceABC):
    """A sequence's output token ids, live: what BatchUpdate.added hands a processor (vLLM's running list). With
    async scheduling the last sampled token can still be on the device when the next step samples:
    `num_pending` is then 1."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq

    def __len__(self) -> int:
        return self.seq.num_output_tokens

    def __getitem__(self, index):
        return self.seq.output_token_ids[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.seq.output_token_ids)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self.seq.output_token_ids)

    @property
    def num_pending(self) -> int:
        return int(self.seq.num_computed == len(self.seq.token_ids))


def added(index: int, seq: Sequence) -> tuple[int, SamplingParams, list[int], OutputTokenIds]:
    return index, seq.params, seq.token_ids[: seq.num_prompt_tokens], OutputTokenIds(seq)


def uses_builtin(params: SamplingParams) -> bool:
    """Whether a request asks for one of the built-in processors (the sampling table keeps this as a flag)."""
    return bool(
        params.min_tokens
        or params.logit_bias
        or params.allowed_token_ids
        or getattr(params, "_bad_words_token_ids", None)
    )


class LogitsProcessors:
    """The engine's logits processors, built-in and the user's, over the persistent batch of sampled sequences."""

    def __init__(
        self,
        classes: list,
        config: EngineConfig,
        device: torch.device,
        eos_token_ids: SequenceABC[int],
    ) -> None:
        self.config, self.device, self.eos_token_ids = config, device, list(eos_token_ids)
        self.custom_classes = [load(c) for c in classes]
        self.pin_memory = device.type == "cuda"
        self.builtin = self.make_builtin()
        self.custom: list[LogitsProcessor] = [c(config, device, self.pin_memory) for c in self.custom_classes]
        self.slots: list[Sequence] = []  # the persistent batch: the sequence at each row

    def make_builtin(self) -> list[BuiltinLogitsProcessor]:
        args = (self.config, self.device, self.pin_memory)
        return [
            AllowedTokenIdsLogitsProcessor(*args),
            LogitBiasLogitsProcessor(*args),
            MinTokensLogitsProcessor(*args, eos_token_ids=self.eos_token_ids),
            BadWordsLogitsProcessor(*args),
        ]

    def validate(self, params: SamplingParams) -> None:
        """Each user processor's validate_params (a ValueError refuses the request)."""
        for cls in self.custom_classes:
            cls.validate_params(params)

    @property
    def needs_output_tokens(self) -> bool:
        """A user processor may read every row's output tokens: each step's must reach the host before the next
        samples (async scheduling then gains nothing)."""
        return bool(self.custom)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence], asked: bool, all_greedy: bool) -> torch.Tensor:
        """The sampled rows' logits [len(seqs), vocab] after every processor (fp32; changed in place where they
        already were). `asked`: some sequence here asks for a built-in one."""
        if not asked and not self.custom and not self.slots:
            return logits
        update, order = self.batch_update(seqs)
        for processor in self.builtin + self.custom:
            processor.update_state(update)
        if not self.custom and not any(p.active() for p in self.builtin):
            self.slots.clear()  # nobody keeps rows: the next steps take the plain path until a request asks again
            return logits
        return self.run(logits.float(), order, all_greedy)

    def run(self, logits: torch.Tensor, order: list[int] | None, all_greedy: bool) -> torch.Tensor:
        """Every processor over the logits in the persistent batch's row order (`order`: the logits row of each
        batch row, None where they are the same)."""
        batch = logits if order is None else logits[order]
        for processor in self.builtin + self.custom:
            if not (all_greedy and processor.is_argmax_invariant()):
                batch = processor.apply(batch)
        if order is None:
            return batch
        logits[order] = batch
        return logits

    def apply_once(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The built-in processors over rows that are not the persistent batch (speculative decoding verifies
        several positions of a sequence at once: each row a sequence as it stands at one position), with fresh
        processors; nothing when no row asks."""
        if not any(uses_builtin(s.params) for s in seqs):
            return logits
        update = BatchUpdate(len(seqs), [], [added(i, s) for i, s in enumerate(seqs)], [])
        processors = self.make_builtin()
        for processor in processors:
            processor.update_state(update)
        logits = logits.float()
        for processor in processors:
            logits = processor.apply(logits)
        return logits

    def batch_update(self, seqs: list[Sequence]) -> tuple[BatchUpdate | None, list[int] | None]:
        """This step's sampled sequences placed in the persistent batch: the BatchUpdate from the last step (None:
        no change) and the logits row of each batch row (None: row i is logits row i)."""
        row_of = {seq: i for i, seq in enumerate(seqs)}
        slots: list[Sequence | None] = list(self.slots)
        removed = [i for i, seq in enumerate(slots) if seq not in row_of]
        for i in removed:
            slots[i] = None
        placed = set(slots)
        holes = list(removed)
        additions = []
        for seq in [s for s in seqs if s not in placed]:
            if holes:
                index = holes.pop(0)
                slots[index] = seq
            else:
                index = len(slots)
                slots.append(seq)
            additions.append(added(index, seq))
        removed = [i for i in removed if slots[i] is None]  # a row taken again is not reported as removed
        moved = []
        while slots and slots[-1] is None:
            slots.pop()
        for hole in sorted(removed):  # the last rows move down into the holes: the batch stays dense
            if hole >= len(slots):
                break
            moved.append((len(slots) - 1, hole, MoveDirectionality.UNIDIRECTIONAL))
            slots[hole] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
        self.slots = slots
        update = BatchUpdate(len(slots), removed, additions, moved) if removed or additions or moved else None
        order = [row_of[seq] for seq in slots]
        return update, None if order == list(range(len(order))) else order

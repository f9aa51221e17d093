"""The sampling table: one row per row of the block manager's tables (one per sequence holding blocks), written
once when a sequence first samples in its row (all it holds follows from the request's parameters), so that a
step's sampling parameters are one gather on the device and what the sampler branches on is read on the host."""

from enum import IntEnum

import numpy as np
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


class Column(IntEnum):
    """The table's values, also on the device (the same memory on CPU)."""

    TEMPERATURE = 0
    TOP_K = 1  # the vocabulary's size for none
    TOP_P = 2
    MIN_P = 3
    REPETITION_PENALTY = 4
    PRESENCE_PENALTY = 5
    FREQUENCY_PENALTY = 6


class Flag(IntEnum):
    """The table's flags, on the host only."""

    PROCESSORS = 0  # asks for a built-in logits processor: min_tokens, logit_bias, allowed_token_ids, bad_words
    PENALTIES = 1
    SEEDED = 2
    NEEDS_OWN_TOKENS = 3  # its next draw depends on its last token (see needs_own_tokens)
    LOGPROBS = 4
    GRAMMAR = 5


def needs_own_tokens(seq: Sequence) -> bool:
    """Its next draw depends on the token before (penalties, a bad word of several tokens, a grammar)."""
    p = seq.params
    return bool(
        p.repetition_penalty != 1
        or p.presence_penalty
        or p.frequency_penalty
        or any(len(w) > 1 for w in seq.bad_words)
        or seq.constraint is not None
    )


class SamplingTable:
    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.values = np.zeros((rows, len(Column)), dtype=np.float32)
        self.flags = np.zeros((rows, len(Flag)), dtype=bool)
        if device.type == "cpu":
            self.values_dev = torch.from_numpy(self.values)
        else:
            self.values_dev = torch.zeros(rows, len(Column), device=device)
        self.row_owner: list[SamplingParams | None] = [None] * rows  # whose parameters a row holds
        self.dirty_rows: list[int] = []  # written on the host since the device's copy was updated

    def write_missing(self, seqs: list[Sequence]) -> None:
        """Write the rows of the sequences whose row holds another's parameters, and bring the device's copy up to
        date (on CUDA; on CPU the two are one)."""
        for seq in [s for s in seqs if self.row_owner[s.row] is not s.params]:
            self.write(seq)
        if self.dirty_rows:
            index = torch.tensor(self.dirty_rows)
            self.values_dev[index.to(self.device)] = torch.from_numpy(self.values[index.numpy()]).to(self.device)
            self.dirty_rows.clear()

    def write(self, seq: Sequence) -> None:
        """A sequence's row: written again only when a sequence of other parameters takes it."""
        p, vocab = seq.params, self.vocab_size
        values = self.values[seq.row]
        values[Column.TEMPERATURE] = p.temperature
        values[Column.TOP_K] = min(p.top_k, vocab) if p.top_k > 0 else vocab
        values[Column.TOP_P] = p.top_p
        values[Column.MIN_P] = p.min_p
        values[Column.REPETITION_PENALTY] = p.repetition_penalty
        values[Column.PRESENCE_PENALTY] = p.presence_penalty
        values[Column.FREQUENCY_PENALTY] = p.frequency_penalty
        flags = self.flags[seq.row]
        flags[Flag.PROCESSORS] = bool(p.min_tokens or seq.bad_words or p.logit_bias or p.allowed_token_ids)
        flags[Flag.PENALTIES] = bool(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty)
        flags[Flag.SEEDED] = seq.generator is not None
        flags[Flag.NEEDS_OWN_TOKENS] = needs_own_tokens(seq)
        flags[Flag.LOGPROBS] = seq.logprobs is not None
        flags[Flag.GRAMMAR] = seq.constraint is not None
        self.row_owner[seq.row] = p
        if self.device.type != "cpu":
            self.dirty_rows.append(seq.row)

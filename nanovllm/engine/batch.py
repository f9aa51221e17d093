"""A step's data as it passes along the loop: the scheduler's choice (ScheduledBatch), its inputs on the host, packed
into one array for every rank (PackedStep), and its inputs on the device (Step)."""

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of each sequence computed this step (1 for a decode, a chunk for a prefill,
    # 1 + k for a decode with k tentative tokens)
    sample_rows: list[int] = field(default_factory=list)  # the sequences whose whole context is computed after it
    tentative_rows: list[int] = field(default_factory=list)  # the sequences whose tentative tokens it computes (the
    # sampler's verifier keeps a run of them)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def token_counts(self) -> tuple[int, int]:
        """(prefill tokens, decode tokens) of the step as scheduled, for progress reports. A row with tentative
        tokens is a decode step of its sequence (Launched.token_counts adds the tokens it kept)."""
        if self.tentative_rows:
            decodes = [n for s, n in zip(self.seqs, self.num_new_tokens) if n == 1 + s.num_tentative]
            return self.num_tokens - sum(decodes), len(decodes)
        decodes = self.num_new_tokens.count(1)
        return self.num_tokens - decodes, decodes


@dataclass
class PackedStep:
    """A step's inputs on the host: what tensor-parallel workers receive, and what every rank (rank 0 included)
    builds its tensors from, packed into one int64 array by `pack` from its array and number fields: a header (each
    array's length, then the numbers), then the arrays in this order."""

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
    # rank 0's only, not packed (the workers sample nothing): per row that asked for prompt logprobs, this step's
    # positions whose logits give one
    prompt_positions: dict[int, range]

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
    prompt_positions: dict[int, range]  # per row that asked for prompt logprobs, this step's positions that give one

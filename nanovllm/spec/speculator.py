"""What the engine holds for speculative decoding, and its two hooks: the scheduler's proposer (before each step
it has the n-gram lookup or the draft guess the next tokens of every decoding sequence, as tentative tokens) and the
sampler's verifier (the target keeps a run of them, spec/rejection.py; counted for vLLM's spec_decode metrics)."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.spec import ngram, rejection
from nanovllm.spec.config import SpeculativeConfig
from nanovllm.spec.draft import DraftProposer

if TYPE_CHECKING:
    from nanovllm.sampling.step_sampler import Sampler


@dataclass
class SpecDecodingStats:
    num_drafts: int = 0  # verifications: a sequence's step with proposals
    num_draft_tokens: int = 0  # proposals checked
    num_accepted_tokens: int = 0  # proposals kept
    accepted_per_pos: list[int] = field(default_factory=list)  # proposals kept at position 0, 1, ... of a draft


# Batch size from which a step proposes nothing, when speculative_config does not say (vLLM's
# disable_by_batch_size): on a CPU a forward of a few rows is already bound by arithmetic, so a verification's
# 1 + k query tokens per row cost about what they save from 4 rows on (docs/benchmarks.md); on a GPU a forward is
# bound by reading the weights up to far larger batches (not measured yet: no limit).
DISABLE_BY_BATCH_SIZE = {"cpu": 4, "cuda": None}


class Speculator:
    """The scheduler's proposer (`propose`, `release`) and the sampler's verifier (`verify`)."""

    def __init__(
        self, config: SpeculativeConfig, max_model_len: int, draft: DraftProposer | None = None, device: str = "cpu"
    ):
        self.config, self.max_model_len, self.draft = config, max_model_len, draft
        self.disable_by_batch_size = config.disable_by_batch_size or DISABLE_BY_BATCH_SIZE[device]
        self.stats = SpecDecodingStats(accepted_per_pos=[0] * config.num_speculative_tokens)

    def propose(self, running: list[Sequence], waiting: Iterable[Sequence]) -> None:
        """Proposals for every sequence about to decode, up to k and no further than it may still grow (the
        target's token after them must fit max_tokens and max_model_len). None while a request that asks for
        logprobs or prompt logprobs is running or waiting: those are computed one token per sequence and step.
        None for a sequence under a grammar (structured outputs): its matcher accepts the tokens one by one. None
        in a step where disable_by_batch_size sequences or more run."""
        for seq in running:
            seq.clear_tentative()
        if self.disable_by_batch_size and len(running) >= self.disable_by_batch_size:
            return
        if any(s.params.logprobs is not None or s.params.prompt_logprobs is not None for s in (*running, *waiting)):
            return
        rows = []
        for seq in running:
            room = self.max_model_len - seq.num_tokens
            if seq.params.max_tokens is not None:
                room = min(room, seq.params.max_tokens - seq.num_output_tokens)
            k = min(self.config.num_speculative_tokens, room - 1)
            if seq.num_tokens - seq.num_computed == 1 and k > 0 and seq.constraint is None:
                rows.append((seq, k))
        if self.draft is not None:
            self.draft.propose(rows)
            return
        c = self.config
        for seq, k in rows:
            seq.spec_token_ids = ngram.propose(seq.token_ids, k, c.prompt_lookup_min, c.prompt_lookup_max)

    def verify(self, logits: torch.Tensor, seqs: list[Sequence], sampler: "Sampler") -> list[list[int]]:
        """The sampler's verifier: each sampled sequence's new tokens (the proposals kept and one of the target's;
        one sampled token for a sequence without proposals), counted in the metrics."""
        kept = rejection.verify(
            logits, seqs, sampler.sampling_batch_of, sampler.logits_processors.apply_once, sampler.generator
        )
        self.record(seqs, kept)
        return kept

    def record(self, seqs: list[Sequence], tokens: list[list[int]]) -> None:
        """After verification: seqs the sampled sequences (proposals still set), tokens what each got."""
        s = self.stats
        for seq, new in zip(seqs, tokens):
            if seq.spec_token_ids:
                s.num_drafts += 1
                s.num_draft_tokens += len(seq.spec_token_ids)
                s.num_accepted_tokens += len(new) - 1
                for j in range(len(new) - 1):
                    s.accepted_per_pos[j] += 1

    def release(self, seq: Sequence) -> None:
        """A sequence leaves the running batch (finished, aborted, preempted): its proposals, and the draft's blocks,
        go with it."""
        seq.clear_tentative()
        if self.draft is not None:
            self.draft.free(seq)

    def metrics(self) -> dict:
        """engine.stats()'s spec_decode_* entries: vLLM's counters, the acceptance rate (proposals kept / checked)
        and the mean acceptance length (tokens a verification yields, the target's own included)."""
        s = self.stats
        return {
            "spec_decode_num_drafts": s.num_drafts,
            "spec_decode_num_draft_tokens": s.num_draft_tokens,
            "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(s.accepted_per_pos),
            "spec_decode_acceptance_rate": s.num_accepted_tokens / max(s.num_draft_tokens, 1),
            "spec_decode_mean_acceptance_length": 1 + s.num_accepted_tokens / max(s.num_drafts, 1),
        }

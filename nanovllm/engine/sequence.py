from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from nanovllm.sampling_params import SamplingParams
from nanovllm.structured_outputs import Constraint


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """One completion's state (a request with n > 1 has n of them). Tokens 0..num_computed-1 have their
    K/V in the cache, or are on their way there in a launched step. With async scheduling a sampled token can
    still be on the device: then num_computed == len(token_ids) (pending), the next step reads it there and the
    host appends it one step later."""

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission; -1 before
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    bad_words: list[list[int]] = field(default_factory=list)  # SamplingParams.bad_words as token ids
    logprobs: list | None = None  # per output token {token id: Logprob}, when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None
    prompt_logprobs: list | None = None  # the request's, held (and computed) by its first sequence only
    # the length from which postprocess looks at each appended token: 0 where every one needs a look (stop strings
    # and tokens, min_tokens, a grammar to advance), else where max_tokens (and, once scheduled, max_model_len)
    # ends it; EOS is looked for apart
    check_at: int = field(init=False)
    row: int = -1  # its row in the block manager's tables while it holds blocks
    num_keyed_blocks: int = 0  # leading blocks keyed for the prefix cache
    # tentative tokens after token_ids (speculative decoding's proposals, nanovllm/spec): computed in the next step
    # with the sequence's own, kept where the sampler's verifier agrees; and the draft's distributions they were
    # drawn from [k, V] (None: a point mass, as n-gram or a greedy draft)
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    constraint: Constraint | None = None  # its structured-output grammar and matcher

    def __post_init__(self) -> None:
        p = self.params
        every = p.stop or p.stop_token_ids or p.min_tokens or self.constraint is not None
        self.check_at = 0 if every else self.num_prompt_tokens + p.max_tokens if p.max_tokens else 2**62

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        """Its own tokens still to compute; a token still on the device (async scheduling, `num_computed ==
        len(token_ids)`) counts as one: the step reads it there."""
        return len(self.token_ids) - self.num_computed or 1

    @property
    def num_tentative(self) -> int:
        return len(self.spec_token_ids)

    @property
    def num_to_compute(self) -> int:
        """What a step computes to bring it up to date: its own tokens left and its tentative ones."""
        # num_uncomputed inline: the scheduler asks every running sequence each step
        return (len(self.token_ids) - self.num_computed or 1) + len(self.spec_token_ids)

    def cut_tentative(self, num_new_tokens: int) -> None:
        """A step computes `num_new_tokens` of what it has left: the tentative tokens past those go."""
        del self.spec_token_ids[max(num_new_tokens - self.num_uncomputed, 0) :]

    def clear_tentative(self) -> None:
        self.spec_token_ids, self.spec_probs = [], None

    @property
    def cacheable_prefix(self) -> int:
        """The longest prefix whose K/V may come from the prefix cache: all but the last token (a step computes one
        token at least), and none of the prompt positions whose prompt logprobs are still to come (they need their
        logits)."""
        if self.prompt_logprobs is not None:
            return min(len(self.prompt_logprobs), len(self.token_ids)) - 1
        return len(self.token_ids) - 1

    @property
    def ready(self) -> bool:
        """It can be admitted: what it waits for (its structured-output grammar compiling) is done."""
        return self.constraint is None or self.constraint.ready

    @property
    def waits_for(self) -> Future | None:
        """What keeps it from being ready, to wait on (its grammar's compile), or None."""
        return None if self.ready else self.constraint.grammar

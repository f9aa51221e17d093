"""vLLM's logprob types (`vllm.logprobs`): what `SamplingParams(logprobs=N, prompt_logprobs=M)` returns."""
from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's log-probability at one position, its rank in the vocabulary (1 = the most likely) and its
    text decoded alone (None with detokenize=False)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


LogprobsOnePosition = dict[int, Logprob]         # token id -> Logprob: the chosen token and the N most likely
SampleLogprobs = list[LogprobsOnePosition]        # one per generated token
PromptLogprobs = list[LogprobsOnePosition | None]  # one per prompt token; the first is None (nothing predicts it)


def logprob_dict(ids: list[int], values: list[float], rank: int,
                 decoded: list[str | None]) -> LogprobsOnePosition:
    """The chosen token first (its own rank), then the most likely ones (ranks 1, 2, ...). A chosen token that is
    also among them is one entry, so a position holds N or N + 1 entries (as vLLM)."""
    ranks = [rank, *range(1, len(ids))]
    return {t: Logprob(v, r, d) for t, v, r, d in zip(ids, values, ranks, decoded)}

"""vLLM's logprob types (`vllm.logprobs`): what `SamplingParams(logprobs=N, prompt_logprobs=M)` returns; where a
step's logits hold them, how they are read off, and how they reach the requests (add_step_logprobs)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.sampling.sampler import StepLogprobs, logprobs_of


@dataclass
class Logprob:
    """One token's log-probability at one position, its rank in the vocabulary (1 = the most likely) and its
    text decoded alone (None with detokenize=False)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


LogprobsOnePosition = dict[int, Logprob]  # token id -> Logprob: the chosen token and the N most likely
SampleLogprobs = list[LogprobsOnePosition]  # one per generated token
PromptLogprobs = list[LogprobsOnePosition | None]  # one per prompt token; the first is None (nothing predicts it)


def logprob_dict(ids: list[int], values: list[float], rank: int, decoded: list[str | None]) -> LogprobsOnePosition:
    """The chosen token first (its own rank), then the most likely ones (ranks 1, 2, ...). A chosen token that is
    also among them is one entry, so a position holds N or N + 1 entries (as vLLM)."""
    ranks = [rank, *range(1, len(ids))]
    return {t: Logprob(v, r, d) for t, v, r, d in zip(ids, values, ranks, decoded)}


def prompt_logprob_positions(batch) -> dict[int, range]:
    """Per row of a request that asked for prompt logprobs (its first sequence computes them): this step's
    positions whose logits give one (those that predict a prompt token) and that are not recorded yet, so that a
    preempted request's recompute adds none twice."""
    out = {}
    for i in [i for i, seq in enumerate(batch.seqs) if seq.prompt_logprobs is not None]:
        seq, n = batch.seqs[i], batch.num_new_tokens[i]
        positions = range(
            max(seq.num_computed, len(seq.prompt_logprobs) - 1), min(seq.num_computed + n, seq.num_prompt_tokens - 1)
        )
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


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, nums: list[int]) -> list[tuple]:
    """Per row: (ids, logprobs, rank) of the chosen token and that row's number of most likely ones (-1: the
    whole vocabulary)."""
    vocab = logits.shape[-1]
    nums = [vocab if k == -1 else k for k in nums]
    ids, values, ranks = logprobs_of(logits, chosen.long(), max(nums))
    return [(i[: k + 1], v[: k + 1], r) for i, v, r, k in zip(ids, values, ranks, nums)]


def step_logprobs(
    batch,
    sample_rows: list[int],
    asked: list[int],
    raw: torch.Tensor | None,
    tokens: torch.Tensor,
    prompt_positions: dict[int, range],
    prompt_logits: torch.Tensor | None,
) -> StepLogprobs:
    """A step's logprobs: of the token sampled for each sampled row that asked (`asked` its indices among them,
    `raw` their logits before the sampler changed them), and of the prompt tokens that the `prompt_positions`
    predict (their logits `prompt_logits`), as each row's entries."""
    out = StepLogprobs({}, {})
    if asked:
        entries = top_logprobs(raw, tokens[asked], [batch.seqs[sample_rows[j]].params.logprobs for j in asked])
        out.sampled = {sample_rows[j]: e for j, e in zip(asked, entries)}
    if prompt_positions:
        rows = list(prompt_positions)
        targets = [batch.seqs[i].token_ids[p + 1] for i in rows for p in prompt_positions[i]]
        entries = top_logprobs(
            prompt_logits,
            torch.tensor(targets, device=prompt_logits.device),
            [batch.seqs[i].params.prompt_logprobs for i in rows for _ in prompt_positions[i]],
        )
        at = np.cumsum([0] + [len(prompt_positions[i]) for i in rows]).tolist()
        out.prompt = {i: entries[at[k] : at[k + 1]] for k, i in enumerate(rows)}
    return out


def add_step_logprobs(logprobs: StepLogprobs, seqs: list, requests: dict, fail: Callable) -> dict:
    """A step's logprobs to their requests, by batch row (`seqs`): each row's prompt logprobs first, then its
    sampled token's; none for a sequence that ended while the step ran. A request whose logprobs cannot be decoded
    fails alone (`fail(request, error)`); returns those requests, by id."""
    failed = {}
    for row, prompt, entries in [
        *((r, True, e) for r, e in logprobs.prompt.items()),
        *((r, False, e) for r, e in logprobs.sampled.items()),
    ]:
        seq = seqs[row]
        if seq.finished:
            continue
        request = requests[seq.request_id]
        try:
            if prompt:
                request.add_prompt_logprobs(seq, entries)
            else:
                request.add_logprobs(seq, *entries)
        except Exception as e:
            fail(request, e)
            failed[seq.request_id] = request
    return failed

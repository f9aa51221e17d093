"""Verification: which proposed tokens the target keeps, so that speculation changes no output.

Greedy: the target's argmax at each proposed position; the proposals are kept while they equal it, then the
target's own token follows (the output is token for token what decoding without speculation gives).
Sampling: rejection sampling (Leviathan et al. 2023, Chen et al. 2023). Proposal d_j, drawn from the draft's
distribution q_j, is kept with probability min(1, p_j(d_j) / q_j(d_j)) under the target's distribution p_j; at the
first rejection the token comes from max(0, p_j - q_j) renormalized instead, and when all k are kept one more
comes from p_k. Each emitted token is then distributed as p: the target's. An n-gram proposal (or a greedy draft's)
is a point mass: q_j(d_j) = 1, and the residual is p_j without d_j."""

import dataclasses

import torch

import nanovllm.ops as ops
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.sampler import SamplingBatch, adjust, apply_top_k_top_p_min_p


def probabilities(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The distribution each row's token is drawn from [B, V]: the sampler's, after bias, bans, penalties,
    temperature and filters (greedy rows at temperature 1: only their argmax is used)."""
    logits = adjust(logits.float(), b)
    return apply_top_k_top_p_min_p(logits / torch.where(b.temperature == 0, 1.0, b.temperature)[:, None], b).softmax(
        dim=-1
    )


def positions(seq: Sequence) -> list[Sequence]:
    """The sequence as it stands at each verified position (its proposals up to there appended), so that
    min_tokens, penalties and bad words see what they would see decoding one token at a time."""
    spec = seq.spec_token_ids
    return [dataclasses.replace(seq, token_ids=seq.token_ids + spec[:j]) for j in range(len(spec) + 1)]


def verify(
    logits: torch.Tensor,
    seqs: list[Sequence],
    sampling_batch,
    logits_processors,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """logits [sum(1 + k_i), V]: sequence i's rows for its last token and each of its k_i proposals, in order.
    Returns each sequence's new tokens: the proposals kept and one token of the target's. A sequence without
    proposals is sampled as without speculation (a seeded one draws the same whatever else is in the step).
    `sampling_batch(seqs)` gives rows' sampling parameters, `logits_processors(logits, seqs)` applies the built-in
    logits processors to rows that each hold a sequence as it stands at one position."""
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + 1 + len(s.spec_token_ids))
    out: list[list[int]] = [[] for _ in seqs]
    plain = [i for i, s in enumerate(seqs) if not s.spec_token_ids]
    if plain:
        plain_seqs = [seqs[i] for i in plain]
        b = sampling_batch(plain_seqs)
        plain_logits = logits_processors(logits[[starts[i] for i in plain]], plain_seqs)
        for i, t in zip(plain, ops.sample(plain_logits, b, generator).tolist()):
            out[i] = [t]
    spec = [i for i, s in enumerate(seqs) if s.spec_token_ids]
    verified = [v for i in spec for v in positions(seqs[i])]
    b = sampling_batch(verified)
    logits = logits_processors(logits[[r for i in spec for r in range(starts[i], starts[i + 1])]], verified)
    greedy = b.temperature == 0
    if bool(greedy.all()):
        target, probs = ops.sample(logits, b, generator).tolist(), None
    else:
        probs = probabilities(logits, b)
        target = probs.argmax(dim=-1).tolist()
    row = 0
    for i in spec:
        s, k = seqs[i], len(seqs[i].spec_token_ids)
        if bool(greedy[row]):
            kept = next((j for j in range(k) if s.spec_token_ids[j] != target[row + j]), k)
            out[i] = target[row : row + kept + 1]
        else:
            out[i] = accept(probs[row : row + k + 1], s.spec_token_ids, s.spec_probs, s.generator or generator)
        row += k + 1
    return out


def accept(p: torch.Tensor, draft: list[int], q: torch.Tensor | None, g: torch.Generator | None) -> list[int]:
    """One sequence's rejection sampling: p [k+1, V] the target's distributions, `draft` its k proposals drawn
    from q [k, V] (None: point masses on them). The kept proposals and one token drawn by the target."""
    k = len(draft)
    d = torch.tensor(draft, dtype=torch.long, device=p.device)
    pd = p[torch.arange(k, device=p.device), d]
    qd = q[torch.arange(k, device=p.device), d] if q is not None else torch.ones_like(pd)
    rejected = (torch.rand(k, generator=g, device=p.device) * qd >= pd).nonzero()  # keep if u < p / q
    if not len(rejected):
        return draft + [int(torch.multinomial(p[k], 1, generator=g))]
    j = int(rejected[0])
    residual = (p[j] - q[j]).clamp_(min=0) if q is not None else p[j].index_fill(0, d[j : j + 1], 0)
    if not bool(residual.sum() > 0):  # p_j == q_j up to rounding: a rejection was (almost) impossible
        residual = p[j]
    return draft[:j] + [int(torch.multinomial(residual, 1, generator=g))]

"""Vectorized sampling: one call for the whole batch, every row with its own parameters."""
from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor          # [B] float; 0 = greedy
    top_k: torch.Tensor                # [B] int; -1 = off
    top_p: torch.Tensor                # [B] float
    min_p: torch.Tensor                # [B] float
    generators: list                   # [B] torch.Generator for seeded rows, else None
    # penalties: only built when some row uses one
    repetition_penalty: torch.Tensor | None = None   # [B]
    presence_penalty: torch.Tensor | None = None     # [B]
    frequency_penalty: torch.Tensor | None = None    # [B]
    prompt_ids: list[list[int]] | None = None
    output_ids: list[list[int]] | None = None
    banned: list[tuple[int, int]] | None = None      # (row, token) pairs masked out (EOS before min_tokens)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """vLLM's semantics: repetition over prompt+output tokens, presence/frequency over output tokens only."""
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab, dtype=logits.dtype, device=logits.device)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=logits.device)
    for i in range(rows):
        out = torch.tensor(b.output_ids[i], dtype=torch.long, device=logits.device)
        counts[i].index_add_(0, out, torch.ones(len(out), dtype=logits.dtype, device=logits.device))
        seen[i, b.prompt_ids[i]] = True
    seen |= counts > 0
    rep = b.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - b.frequency_penalty[:, None] * counts - b.presence_penalty[:, None] * (counts > 0)


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k, top-p nucleus and min-p floor.

    Each filter depends on its own row only, so a row keeps the same tokens whatever shares its batch."""
    if bool((b.top_k > 0).any()):  # a threshold at the k-th largest value (ties with it stay), no full sort
        k = torch.where(b.top_k > 0, b.top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        top = logits.topk(int(k.max()), dim=-1).values
        logits = logits.masked_fill(logits < top.gather(-1, (k - 1)[:, None]), float("-inf"))
    if bool((b.top_p < 1).any()):  # the nucleus needs the full order: a sort (slow over a large vocab)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the smallest prefix whose mass reaches top_p: a token goes once the mass before it does
        drop = (mass_before >= b.top_p[:, None]) & (b.top_p < 1)[:, None]
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((b.min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < b.min_p[:, None] * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Temperature 0 rows take the argmax; the others draw from their
    filtered distribution. Seeded rows draw their noise from their own generator, so their tokens do not
    depend on what else is in the batch."""
    logits = logits.float()
    if b.banned:
        rows, toks = zip(*b.banned)
        logits[list(rows), list(toks)] = float("-inf")
    if b.repetition_penalty is not None:
        logits = apply_penalties(logits, b)
    greedy = b.temperature == 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    argmax = logits.argmax(dim=-1)
    logits = logits / torch.where(greedy, 1.0, b.temperature)[:, None]
    probs = apply_top_k_top_p_min_p(logits, b).softmax(dim=-1)
    # Inverse CDF: one uniform number per row (drawing noise for the whole vocabulary costs ~40x more);
    # a seeded row draws its number from its own generator.
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device)
    for i, g in enumerate(b.generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    # right=True: a zero-probability token has the same cdf as the one before it and can never be picked
    sampled = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    past_end = sampled >= probs.shape[-1]
    if bool(past_end.any()):  # u * total rounded up to the total: take the last token with any probability
        last_nonzero = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
        sampled = torch.where(past_end, last_nonzero, sampled)
    return torch.where(greedy, argmax, sampled)

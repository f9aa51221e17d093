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
    """Mask (to -inf) every token outside each row's top-k, top-p nucleus and min-p floor."""
    vocab = logits.shape[-1]
    if bool((b.top_k > 0).any()) or bool((b.top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(b.top_k > 0, b.top_k, vocab)[:, None]
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the smallest prefix whose mass reaches top_p: a token goes once the mass before it does
        drop = (mass_before >= b.top_p[:, None]) & (b.top_p < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
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
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and each row's noise is its own.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, g in enumerate(b.generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, argmax, sampled)

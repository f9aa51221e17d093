"""Vectorized sampling in torch: one call for the whole batch, every row with its own parameters (the reference
sampler; ops/cpu_ops.py runs plain temperature sampling in C)."""

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_k: torch.Tensor  # [B] int; -1 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    generators: list | None  # [B] torch.Generator for seeded rows, else None (None: no row is seeded)
    # penalties: only built when some row uses one
    repetition_penalty: torch.Tensor | None = None  # [B]
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    prompt_ids: list[list[int]] | None = None
    output_ids: list[list[int]] | None = None
    # min_tokens, bad words, logit_bias and allowed_token_ids are logits processors now (nanovllm/sampling/builtin.py),
    # applied to the logits before the sampler: these stay None, kept while nanovllm/ops/cpu_ops.py still asks
    banned: None = None
    bias: None = None
    allowed: None = None
    uses_processors: bool = False  # some row asks for a built-in logits processor (run before the sampler)
    constrained: list[int] | None = None  # rows with a structured-output grammar
    token_bitmask: torch.Tensor | None = None  # [len(constrained), ceil(V / 32)] int32 on the CPU: bit t set
    # where that row's grammar allows token t
    # what the host knows of the rows, so that the sampler never waits on the device to ask (None: read off the
    # tensors, a device sync each)
    all_greedy: bool | None = None
    any_greedy: bool | None = None
    top_k_width: int | None = None  # topk's width: the largest top_k in use (2**62: some row has none), 0: none
    use_top_p: bool | None = None
    use_min_p: bool | None = None

    def __post_init__(self) -> None:
        if self.all_greedy is None:
            greedy = self.temperature == 0
            self.all_greedy, self.any_greedy = bool(greedy.all()), bool(greedy.any())
        if self.top_k_width is None:
            on = self.top_k > 0
            self.top_k_width = 0 if not bool(on.any()) else int(self.top_k.max()) if bool(on.all()) else 2**62
        if self.use_top_p is None:
            self.use_top_p, self.use_min_p = bool((self.top_p < 1).any()), bool((self.min_p > 0).any())


@dataclass
class StepLogprobs:
    """The logprobs a step computed, by batch row, each as (token ids: the chosen one first, then the most likely;
    their logprobs; the chosen one's rank): of the token sampled for each row that asked, and of the prompt tokens
    that row's positions predict, in order."""

    sampled: dict[int, tuple[list[int], list[float], int]]
    prompt: dict[int, list[tuple[list[int], list[float], int]]]


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
    if b.top_k_width:  # a threshold at the k-th largest value (ties with it stay), no full sort
        k = torch.where(b.top_k > 0, b.top_k, logits.shape[-1]).clamp(max=logits.shape[-1]).long()
        top = logits.topk(min(b.top_k_width, logits.shape[-1]), dim=-1).values
        logits = logits.masked_fill(logits < top.gather(-1, (k - 1)[:, None]), float("-inf"))
    if b.use_top_p:  # the nucleus needs the full order: a sort (slow over a large vocab)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the smallest prefix whose mass reaches top_p: a token goes once the mass before it does
        drop = (mass_before >= b.top_p[:, None]) & (b.top_p < 1)[:, None]
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if b.use_min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < b.min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Temperature 0 rows take the argmax; the others draw from their
    filtered distribution. Seeded rows draw their noise from their own generator, so their tokens do not
    depend on what else is in the batch."""
    greedy = b.temperature == 0
    copied = logits.dtype != torch.float32
    logits = adjust(logits.float(), b)  # from here on a bf16 LM head's logits are our own copy, changed in place
    if b.all_greedy:
        return logits.argmax(dim=-1)
    argmax = logits.argmax(dim=-1) if b.any_greedy else None
    scale = torch.where(greedy, 1.0, b.temperature)[:, None]
    logits = logits.div_(scale) if copied else logits / scale
    logits = apply_top_k_top_p_min_p(logits, b)
    # unnormalized: the draw below scales its uniform number by each row's total
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp_()
    sampled = inverse_cdf(weights, uniform(b, generator, weights.device))
    return torch.where(greedy, argmax, sampled) if b.any_greedy else sampled


def adjust(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The logits [B, V] (fp32, changed in place where it can) after the grammars' masks and penalties: what
    temperature and the filters then act on (the sampler, and speculative decoding's verification). The logits
    processors ran before (nanovllm/sampling/persistent_batch.py)."""
    if b.token_bitmask is not None:
        apply_token_bitmask(logits, b.constrained, b.token_bitmask)
    if b.repetition_penalty is not None:
        logits = apply_penalties(logits, b)
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """-inf, in place, on every token of `rows` that its row of `bitmask` does not allow (bit t of a row's little-endian
    int32 words = token t); the other rows are not read."""
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    allowed = (bitmask.view(torch.uint8)[:, :, None] & bits).view(len(rows), -1)[:, : logits.shape[-1]]
    index = torch.tensor(rows, device=logits.device)
    logits.index_copy_(
        0, index, logits.index_select(0, index).masked_fill_(allowed.to(logits.device) == 0, float("-inf"))
    )


def filtered(b: SamplingBatch) -> bool:
    return bool(b.top_k_width or b.use_top_p or b.use_min_p)


def uniform(b: SamplingBatch, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform number per row for an inverse-CDF draw (noise for the whole vocabulary costs ~40x more);
    a seeded row draws its number from its own generator."""
    u = torch.rand(len(b.temperature), generator=generator, device=device)
    for i, g in enumerate(b.generators or ()):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)
    return u


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per row, the token where the running sum of `weights` [B, V] passes u * total (u [B] in [0, 1)).

    In two levels, since a cumulative sum over the whole vocabulary is sequential and slow (9 ms at 44 x 49152
    on 2 cores): the running sum of chunk totals picks the chunk, then a running sum inside that one chunk
    picks the token. A zero-weight token is never picked (searchsorted right=True skips a flat step)."""
    rows, vocab = weights.shape
    pad = -vocab % chunk  # F.pad copies even when it adds nothing: 2.4 ms per step at 44 x 49152
    chunks = (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(rows, -1, chunk)
    totals = chunks.sum(dim=-1)  # [B, vocab / chunk]
    cdf = totals.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    c = last_nonzero_if_past_end(torch.searchsorted(cdf, target, right=True).squeeze(1), totals)
    # the mass before chunk c as the running sum holds it (cdf[c - 1] <= target), not cdf[c] - totals[c]: that
    # difference can round above the target, and a negative offset would pick the chunk's first token, weight 0
    # or not
    before = torch.nn.functional.pad(cdf, (1, 0))[:, :-1].gather(1, c[:, None]).squeeze(1)
    target = (target.squeeze(1) - before).clamp_(min=0)
    inside = chunks[torch.arange(rows, device=weights.device), c]  # [B, chunk]
    t = torch.searchsorted(inside.cumsum(dim=-1), target[:, None], right=True).squeeze(1)
    return c * chunk + last_nonzero_if_past_end(t, inside)


def last_nonzero_if_past_end(index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A rounded-up target can fall past the end of a row: take its last entry with any weight instead (always
    computed: asking whether any row needs it would wait on the device)."""
    last_nonzero = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    return torch.where(index >= weights.shape[-1], last_nonzero, index)


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, num: int) -> tuple[list, list, list]:
    """Per row of raw logits [R, V] (before temperature, penalties and filters: the model's own distribution, vLLM's
    default raw_logprobs), in fp32: the ids of the chosen token [R] followed by the `num` most likely tokens, their
    log-probabilities, and the chosen token's rank (how many tokens are at least as likely, as vLLM counts it)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = chosen[:, None]
    chosen_lp = logprobs.gather(-1, chosen)
    ranks = (logprobs >= chosen_lp).sum(dim=-1)
    top = logprobs.topk(num, dim=-1)
    ids, values = torch.cat([chosen, top.indices], dim=1), torch.cat([chosen_lp, top.values], dim=1)
    return ids.tolist(), values.tolist(), ranks.tolist()

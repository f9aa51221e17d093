"""The sampler on hand-made logits: exactly the right token sets survive each filter; seeds reproduce."""

import torch

from nanovllm.config import EngineConfig
from nanovllm.logits_processor import BatchUpdate, MinTokensLogitsProcessor
from nanovllm.sampling.sampler import SamplingBatch, apply_penalties, apply_top_k_top_p_min_p, inverse_cdf, sample
from nanovllm.sampling_params import SamplingParams

NEG = float("-inf")


def batch(rows: int, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, generators=None) -> SamplingBatch:
    def f(x):
        return torch.tensor([x] * rows if not isinstance(x, list) else x, dtype=torch.float32)

    return SamplingBatch(
        temperature=f(temperature),
        top_k=torch.tensor([top_k] * rows if isinstance(top_k, int) else top_k),
        top_p=f(top_p),
        min_p=f(min_p),
        generators=generators or [None] * rows,
    )


def kept(logits: torch.Tensor, b: SamplingBatch) -> list[set[int]]:
    out = apply_top_k_top_p_min_p(logits, b)
    return [set(torch.nonzero(row > NEG).flatten().tolist()) for row in out]


# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on tokens 3, 0, 4, 1, 2
PROBS = torch.tensor([[0.3, 0.1, 0.05, 0.4, 0.15]])
LOGITS = PROBS.log()


def test_top_k():
    assert kept(LOGITS, batch(1, top_k=1)) == [{3}]
    assert kept(LOGITS, batch(1, top_k=3)) == [{3, 0, 4}]
    assert kept(LOGITS, batch(1, top_k=-1)) == [{0, 1, 2, 3, 4}]


def test_top_p():
    assert kept(LOGITS, batch(1, top_p=0.35)) == [{3}]  # 0.4 alone reaches 0.35
    assert kept(LOGITS, batch(1, top_p=0.5)) == [{3, 0}]  # 0.4 < 0.5, 0.7 >= 0.5
    assert kept(LOGITS, batch(1, top_p=0.8)) == [{3, 0, 4}]  # 0.85 >= 0.8
    assert kept(LOGITS, batch(1, top_p=0.9)) == [{3, 0, 4, 1}]
    assert kept(LOGITS, batch(1, top_p=1.0)) == [{0, 1, 2, 3, 4}]


def test_min_p():
    # floor = min_p * 0.4
    assert kept(LOGITS, batch(1, min_p=0.5)) == [{3, 0}]  # floor 0.2
    assert kept(LOGITS, batch(1, min_p=0.3)) == [{3, 0, 4}]  # floor 0.12
    assert kept(LOGITS, batch(1, min_p=1.0)) == [{3}]


def test_filters_per_row_and_combined():
    logits = LOGITS.repeat(3, 1)
    b = batch(3, top_k=[2, -1, 4], top_p=[1.0, 0.5, 0.9], min_p=[0.0, 0.0, 0.3])
    assert kept(logits, b) == [{3, 0}, {3, 0}, {3, 0, 4}]


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    b = batch(16, temperature=0.0, top_k=5, top_p=0.5)
    assert torch.equal(sample(logits, b), logits.argmax(-1))
    # greedy rows stay argmax when mixed with sampled rows
    temps = [0.0 if i % 2 == 0 else 1.0 for i in range(16)]
    out = sample(logits, batch(16, temperature=temps))
    assert torch.equal(out[::2], logits[::2].argmax(-1))


def test_sampling_respects_filters_and_distribution():
    logits = LOGITS.repeat(20000, 1)
    out = sample(logits, batch(20000, top_k=3), torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {3, 0, 4}
    freq = torch.bincount(out, minlength=5).float() / len(out)
    expected = torch.tensor([0.3, 0, 0, 0.4, 0.15]) / 0.85
    assert torch.allclose(freq, expected, atol=0.02)


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 500)

    def gen():
        return torch.Generator().manual_seed(1234)

    alone = [sample(logits[2:3], batch(1, generators=[g])).item() for g in [gen()] for _ in range(5)]
    g = gen()
    mixed = [sample(logits, batch(6, generators=[None, None, g, None, None, None]))[2].item() for _ in range(5)]
    assert alone == mixed
    assert len(set(alone)) > 1  # the generator advances: not the same token every step


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    b = batch(1)
    b.repetition_penalty, b.presence_penalty, b.frequency_penalty = (
        torch.tensor([2.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
    )
    b.prompt_ids, b.output_ids = [[0]], [[1]]
    assert apply_penalties(logits, b).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    b.repetition_penalty, b.presence_penalty, b.frequency_penalty = (
        torch.tensor([1.0]),
        torch.tensor([0.5]),
        torch.tensor([0.25]),
    )
    b.prompt_ids, b.output_ids = [[3]], [[2, 2, 0]]  # prompt tokens do not count for presence/frequency
    assert apply_penalties(logits, b).tolist() == [[2.0 - 0.75, -2.0, 1.0 - 1.0, 0.5]]


def test_banned_tokens_never_sampled():
    """A token a logits processor bans (here EOS before min_tokens) is never the sampler's pick."""
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    b = batch(1, temperature=0.0)
    processor = MinTokensLogitsProcessor(EngineConfig(), torch.device("cpu"), False, eos_token_ids=[0])
    processor.update_state(BatchUpdate(1, [], [(0, SamplingParams(min_tokens=2), [1], [])], []))
    assert sample(processor.apply(logits), b).item() != 0


def test_zero_probability_tokens_never_drawn_even_at_the_edges():
    logits = torch.tensor([[0.0, NEG, 0.0, NEG]]).repeat(4, 1)
    b = batch(4)
    for u in (0.0, 0.4999999, 0.5, 0.9999999):
        torch.manual_seed(0)
        orig = torch.rand
        try:
            torch.rand = lambda *a, **k: torch.full((4,), u)  # the one uniform number per row
            out = sample(logits, b)
        finally:
            torch.rand = orig
        assert set(out.tolist()) <= {0, 2}


def test_top_k_keeps_the_same_set_whatever_shares_the_batch():
    """Ties at the k-th value stay; a neighbour row with top_p < 1 must not change that."""
    logits = torch.tensor([[2.0, 2.0, 2.0, 0.0, -1.0]])
    alone = kept(logits, batch(1, top_k=2))
    mixed = kept(logits.repeat(2, 1), batch(2, top_k=[2, -1], top_p=[1.0, 0.5]))
    assert alone == [{0, 1, 2}] and mixed[0] == alone[0]


def test_a_zero_weight_token_is_never_drawn_at_a_chunk_edge():
    """Weights 0.001 at token 0 and 1 at token 257 (the rest masked to 0 by top-k), draws right at the edge
    between the two chunks: only tokens 0 and 257 come out (the chunk offset once went negative there and gave
    token 256). Then random masked rows with draws at every chunk boundary: never a zero-weight token."""
    weights = torch.zeros(1, 512)
    weights[0, 0], weights[0, 257] = 0.001, 1.0
    edge = torch.tensor(0.001 / 1.001)
    u = (edge + torch.linspace(-2e-6, 2e-6, 4001)).clamp(0, 1 - 1e-7)
    got = inverse_cdf(weights.expand(len(u), -1).contiguous(), u)
    assert set(got.tolist()) == {0, 257}
    gen = torch.Generator().manual_seed(23)
    rows, vocab = 64, 1000
    w = torch.rand(rows, vocab, generator=gen) * (torch.rand(rows, vocab, generator=gen) < 0.05)
    w[:, 255::256] = 0  # zero weights right at chunk ends and starts
    w[:, 256::256] = 0
    chunk_cdf = torch.nn.functional.pad(w, (0, -vocab % 256)).view(rows, -1, 256).sum(-1).cumsum(-1)
    for k in range(chunk_cdf.shape[1]):  # every chunk boundary, and a hair either side of it
        edge_u = chunk_cdf[:, k] / chunk_cdf[:, -1]
        for eps in (-1e-7, 0.0, 1e-7):
            picked = inverse_cdf(w, (edge_u + eps).clamp(0, 1 - 1e-7))
            assert bool((w.gather(1, picked[:, None]) > 0).all())

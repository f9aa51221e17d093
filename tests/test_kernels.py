"""Our Triton attention kernels against the torch backend, in fp32. Without CUDA they run in Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported): slow, so shapes are small, but exact."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from nanovllm.kernels.attention import triton_attention  # noqa: E402
from nanovllm.layers.attention import AttentionMetadata, torch_attention  # noqa: E402
from conftest import make_step as _make_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_step(seqs, block_size, num_blocks, gen):
    return _make_step(seqs, block_size, num_blocks, gen, DEVICE)


CASES = [  # block size, heads, kv heads, head dim, sequences (context, query tokens)
    (16, 4, 4, 16, [(1, 1), (17, 1), (33, 1), (48, 1)]),                       # decodes across block edges
    (8, 8, 2, 32, [(70, 1), (9, 1), (40, 40), (45, 12)]),                      # GQA 4, mixed, cached prefix
    (16, 4, 1, 16, [(100, 1), (20, 20), (37, 5)]),                              # MQA
    (32, 6, 3, 24, [(65, 1), (64, 30), (3, 3)]),                                # head dim not a power of 2
    (4, 4, 2, 16, [(23, 1), (19, 7)]),                                          # small blocks
]


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,seqs", CASES)
def test_kernels_match_torch_backend(block_size, heads, kv_heads, head_dim, seqs):
    gen = torch.Generator().manual_seed(block_size * 1000 + heads * 10 + kv_heads)
    num_blocks = sum(-(-c // block_size) for c, _ in seqs) + 3
    meta = make_step(seqs, block_size, num_blocks, gen)
    tokens = meta.query_start_cpu[-1]
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)
    # the cached prefix is random; this step's K/V arrive through k and v
    k_cache, v_cache = rand(num_blocks, block_size, kv_heads, head_dim), rand(num_blocks, block_size, kv_heads, head_dim)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)  # strided views, as the model's fused projection gives
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(tokens, heads, head_dim)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    scale = head_dim ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    expected = torch_attention(q, k, v, kc_ref, vc_ref, meta, scale)
    got = triton_attention(q, k, v, k_cache, v_cache, meta, scale)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)  # store_kv wrote the same slots
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_splits_agree():
    """Flash-decoding: however the context is split across programs, the combined result is the same."""
    from nanovllm.kernels.attention import decode_attention
    gen = torch.Generator().manual_seed(1)
    meta = make_step([(90, 1), (7, 1), (64, 1)], 8, 32, gen)
    q = torch.randn(3, 4, 16, generator=gen).to(DEVICE)
    k_cache, v_cache = torch.randn(2, 32, 8, 2, 16, generator=gen).to(DEVICE)
    outs = []
    for splits in (1, 3, 12):
        out = torch.zeros_like(q)
        decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.decode_rows,
                         meta.decode_tokens, out, 0.25, max_context=90, num_splits=splits)
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_padding_rows_write_and_see_nothing():
    """CUDA graphs pad a decode batch with rows of slot -1 and context 0: they must not touch the cache, and
    the real rows' results must not change."""
    gen = torch.Generator().manual_seed(2)
    meta = make_step([(30, 1), (12, 1)], 8, 12, gen)
    pad = lambda t, value: torch.cat([t, torch.full((2,), value, dtype=t.dtype, device=DEVICE)])
    padded = AttentionMetadata(
        query_start=torch.arange(5, device=DEVICE), context_lens=pad(meta.context_lens, 0),
        block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)]),
        slot_mapping=pad(meta.slot_mapping, -1), query_start_cpu=[], context_lens_cpu=[],
        decode_rows=torch.arange(4, device=DEVICE), decode_tokens=torch.arange(4, device=DEVICE),
        decode_max_context=64, prefill_rows=torch.arange(0, device=DEVICE), prefill_max_query=0)
    q, k, v = (torch.randn(4, n, 16, generator=gen).to(DEVICE) for n in (4, 2, 2))
    k_cache, v_cache = torch.randn(2, 12, 8, 2, 16, generator=gen).to(DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    expected = torch_attention(q[:2], k[:2], v[:2], kc, vc, meta, 0.25)
    got = triton_attention(q, k, v, k_cache, v_cache, padded, 0.25)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    torch.testing.assert_close(got[:2], expected, rtol=1e-5, atol=1e-5)
    assert torch.all(got[2:] == 0)


def test_engine_with_triton_backend_equals_torch_backend(llm):
    """The whole engine (mixed batches, chunked prefill over a cached prefix) with the Triton kernels in place of
    the torch backend gives the same greedy tokens."""
    from conftest import random_prompts
    from nanovllm import SamplingParams
    prompts = random_prompts(3, 5, 40, seed=9) + random_prompts(2, 3, 10, seed=9, prefix=list(range(2, 40)))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    import nanovllm.ops.cuda_ops as cuda_ops  # the CUDA ops: Triton attention, torch elsewhere
    runner = llm.engine.runner
    own = runner.ops
    try:
        runner.ops = cuda_ops
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        runner.ops = own
    assert got == expected

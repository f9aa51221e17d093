"""Our Triton attention kernels against the torch backend, in fp32. Without CUDA they run in Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported): slow, so shapes are small, but exact."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import make_step as _make_step  # noqa: E402

from nanovllm.kernels.attention import triton_attention  # noqa: E402
from nanovllm.layers.attention import AttentionMetadata, torch_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_step(seqs, block_size, num_blocks, gen):
    return _make_step(seqs, block_size, num_blocks, gen, DEVICE)


CASES = [  # block size, heads, kv heads, head dim, sequences (context, query tokens)
    (16, 4, 4, 16, [(1, 1), (17, 1), (33, 1), (48, 1)]),  # decodes across block edges
    (8, 8, 2, 32, [(70, 1), (9, 1), (40, 40), (45, 12)]),  # GQA 4, mixed, cached prefix
    (16, 4, 1, 16, [(100, 1), (20, 20), (37, 5)]),  # MQA
    (32, 6, 3, 24, [(65, 1), (64, 30), (3, 3)]),  # head dim not a power of 2
    (4, 4, 2, 16, [(23, 1), (19, 7)]),  # small blocks
    (16, 2, 1, 128, [(150, 100), (70, 70), (90, 1)]),  # 128-query prefill tiles
]


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,seqs", CASES)
def test_kernels_match_torch_backend(block_size, heads, kv_heads, head_dim, seqs):
    gen = torch.Generator().manual_seed(block_size * 1000 + heads * 10 + kv_heads)
    num_blocks = sum(-(-c // block_size) for c, _ in seqs) + 3
    meta = make_step(seqs, block_size, num_blocks, gen)
    tokens = meta.query_start_cpu[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    # the cached prefix is random; this step's K/V arrive through k and v
    k_cache, v_cache = (
        rand(num_blocks, block_size, kv_heads, head_dim),
        rand(num_blocks, block_size, kv_heads, head_dim),
    )
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)  # strided views, as the model's fused projection gives
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(tokens, heads, head_dim)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    scale = head_dim**-0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    expected = torch_attention(q, k, v, kc_ref, vc_ref, meta, scale)
    got = triton_attention(q, k, v, k_cache, v_cache, meta, scale)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)  # store_kv wrote the same slots
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def decode_case(heads, kv_heads, head_dim, contexts, block_size=16, seed=0):
    """A decode-only step over scattered blocks, its inputs, and the reference output (layers/attention.py)."""
    from nanovllm.layers.attention import decode_attention as reference

    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    meta = make_step([(c, 1) for c in contexts], block_size, num_blocks, gen)
    q = torch.randn(len(contexts), heads, head_dim, generator=gen).to(DEVICE)
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE)
    expected = torch.empty_like(q)
    reference(q, expected, k_cache, v_cache, meta, head_dim**-0.5)
    return meta, q, k_cache, v_cache, expected


def run_decode(meta, q, k_cache, v_cache, **kw):
    from nanovllm.kernels.attention import decode_attention

    out = torch.full_like(q, float("nan"))
    decode_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        meta.decode_rows,
        meta.decode_tokens,
        out,
        q.shape[-1] ** -0.5,
        meta.decode_max_context,
        **kw,
    )
    return out


ONE_SPLIT = dict(num_splits=1, block_n=16)
MANY_SPLITS = dict(num_splits=5, split_min=32, block_n=32)  # 100 tokens: 32 + 32 + 32 + 4, the fifth split empty


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(1, 1, 64), (2, 1, 128), (6, 2, 64), (4, 1, 128), (7, 1, 64), (8, 1, 128)]
)  # GQA groups 1, 2, 3, 4, 7, 8
def test_decode_matches_reference(heads, kv_heads, head_dim):
    """The query heads of a KV head as the rows of one tensor-core tile (padded to 16), contexts of 1 token
    (shorter than any split), across a block edge and over several scattered blocks; in one split and in many."""
    meta, q, k_cache, v_cache, expected = decode_case(heads, kv_heads, head_dim, [1, 17, 100], seed=heads)
    for kw in (ONE_SPLIT, MANY_SPLITS):
        torch.testing.assert_close(
            run_decode(meta, q, k_cache, v_cache, **kw), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}"
        )


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_splits=3, split_min=64, block_n=32),  # tiles of 2 blocks, 2 per split
        dict(split_min=32, block_n=16),  # planned from the contexts: 3 splits
        dict(num_splits=2, split_min=16, block_n=64),
    ],  # tiles longer than a context
    ids=["tiles of blocks", "planned", "long tiles"],
)
def test_decode_split_shapes(kw):
    meta, q, k_cache, v_cache, expected = decode_case(4, 2, 64, [3, 33, 70], seed=7)
    torch.testing.assert_close(run_decode(meta, q, k_cache, v_cache, **kw), expected, rtol=1e-5, atol=1e-5)


def test_split_count_follows_the_batch_not_max_model_len():
    """The split count: enough programs for the batch, no more than the longest context fills; under CUDA graphs
    (max_context = max_model_len) bounded by the batch bucket alone, whatever max_model_len is."""
    from nanovllm.kernels.attention import MAX_SPLITS, TARGET_PROGRAMS, num_splits_for

    assert num_splits_for(128, 8, 1000) == 4  # a ~1,000-token step: 4 splits of 256 tokens, all busy
    assert num_splits_for(128, 8, 2048) == num_splits_for(128, 8, 40960) == 4
    assert num_splits_for(512, 8, 40960) == 1 and num_splits_for(1, 1, 40960) == MAX_SPLITS
    assert num_splits_for(16, 8, 100) == 1  # a context shorter than one split
    assert all(b * 8 * num_splits_for(b, 8, 40960) <= max(TARGET_PROGRAMS, b * 8) for b in (1, 8, 48, 256, 1024))


def test_graph_bucket_grid():
    """A decode batch padded to a CUDA graph's bucket: dummy rows of context 0 (or 1, reading block 0) after the
    real ones, the split count planned from the bucket and max_model_len as a capture plans it. The real rows
    get the eager result, the rows of context 0 zeros."""
    from nanovllm.kernels.attention import MAX_SPLITS, decode_attention, num_splits_for

    meta, q, k_cache, v_cache, expected = decode_case(2, 1, 64, [1, 40, 100], seed=5)
    bucket, max_model_len = 6, 40960
    lens = torch.cat([meta.context_lens, torch.tensor([0, 1, 0], device=DEVICE)])
    tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)])
    rows = torch.arange(bucket, device=DEVICE)
    qp = torch.cat([q, torch.randn(3, *q.shape[1:], device=DEVICE)])
    splits = num_splits_for(bucket, 1, max_model_len)
    assert splits == num_splits_for(bucket, 1, 4096) == MAX_SPLITS  # bounded by the batch, not max_model_len
    for kw in (dict(num_splits=splits, split_min=32, block_n=32), dict(num_splits=1, block_n=32)):
        out = torch.full_like(qp, float("nan"))
        decode_attention(qp, k_cache, v_cache, tables, lens, rows, rows, out, 64**-0.5, max_model_len, **kw)
        torch.testing.assert_close(out[:3], expected, rtol=1e-5, atol=1e-5)
        assert torch.all(out[[3, 5]] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (64, 32)])
def test_prefill_tile_shapes(block_m, block_n):
    """Prefill over a cached prefix and a whole prompt, with the tile shapes the GPU defaults pick (128 x 64 in
    bf16, 64 x 32 in fp32): the same result as the reference."""
    from nanovllm.kernels.attention import prefill_attention

    gen = torch.Generator().manual_seed(block_m)
    meta = make_step([(150, 100), (70, 70)], 16, 20, gen)
    q = torch.randn(170, 2, 64, generator=gen).to(DEVICE)
    k, v = torch.randn(2, 170, 1, 64, generator=gen).to(DEVICE)
    k_cache, v_cache = torch.randn(2, 20, 16, 1, 64, generator=gen).to(DEVICE)
    expected = torch_attention(q, k, v, k_cache, v_cache, meta, 0.125)  # also stores k, v into the caches
    out = torch.full_like(q, float("nan"))
    prefill_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        meta.query_start,
        meta.prefill_rows,
        out,
        0.125,
        meta.prefill_max_query,
        block_m=block_m,
        block_n=block_n,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_padding_rows_write_and_see_nothing():
    """CUDA graphs pad a decode batch with rows of slot -1 and context 0: they must not touch the cache, and
    the real rows' results must not change."""
    gen = torch.Generator().manual_seed(2)
    meta = make_step([(30, 1), (12, 1)], 8, 12, gen)

    def pad(t, value):
        return torch.cat([t, torch.full((2,), value, dtype=t.dtype, device=DEVICE)])

    padded = AttentionMetadata(
        query_start=torch.arange(5, device=DEVICE),
        context_lens=pad(meta.context_lens, 0),
        block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)]),
        slot_mapping=pad(meta.slot_mapping, -1),
        query_start_cpu=[],
        context_lens_cpu=[],
        decode_rows=torch.arange(4, device=DEVICE),
        decode_tokens=torch.arange(4, device=DEVICE),
        decode_max_context=64,
        prefill_rows=torch.arange(0, device=DEVICE),
        prefill_max_query=0,
    )
    q, k, v = (torch.randn(4, n, 16, generator=gen).to(DEVICE) for n in (4, 2, 2))
    k_cache, v_cache = torch.randn(2, 12, 8, 2, 16, generator=gen).to(DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    expected = torch_attention(q[:2], k[:2], v[:2], kc, vc, meta, 0.25)
    got = triton_attention(q, k, v, k_cache, v_cache, padded, 0.25)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    torch.testing.assert_close(got[:2], expected, rtol=1e-5, atol=1e-5)
    assert torch.all(got[2:] == 0)


@pytest.mark.skipif(
    not os.path.exists(
        os.path.join(os.path.dirname(pytest.importorskip("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    ),
    reason="no ptxas",
)
def test_kernels_compile_for_hopper():
    """What the interpreter cannot show (tools/compile_hopper.py, its own process): the bf16 kernels at
    Qwen3-0.6B's shape compile for an H100/H200 with the engine's default tiles; decode's and prefill's K/V
    loads are software-pipelined (async copies), prefill runs on Hopper's warpgroup tensor cores and decode's
    16-row tiles on mma.sync; nothing spills and shared memory stays within the 227 KiB a block may use."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "..", "..", "tools", "compile_hopper.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    k = json.loads(done.stdout.splitlines()[-1])
    assert k["decode"]["pipelined"] and k["decode"]["mma_sync"] and k["prefill"]["pipelined"] and k["prefill"]["wgmma"]
    assert all(v["spills"] == 0 and v["shared"] < 227 * 1024 for v in k.values()), k


def test_cuda_defaults_fit_a_big_card():
    """max_num_seqs left open: 512 sequences a step on CUDA (CUDA graphs are captured up to it), 256 on CPU."""
    from types import SimpleNamespace

    from nanovllm.config import EngineConfig
    from nanovllm.engine.llm_engine import resolve

    model = SimpleNamespace(max_position_embeddings=128)
    assert resolve(EngineConfig(device="cuda"), model).max_num_seqs == 512
    assert resolve(EngineConfig(device="cpu", ops="torch"), model).max_num_seqs == 256
    assert resolve(EngineConfig(device="cuda", max_num_seqs=8), model).max_num_seqs == 8
    assert EngineConfig().max_num_seqs is None  # the user's config stays as given until the device is known


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

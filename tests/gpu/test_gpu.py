"""On a CUDA machine only (marked gpu, skipped elsewhere): the Triton kernels in bf16 at real sizes, the engine
against HF transformers, CUDA graphs against eager.  Run: python -m pytest -q tests/gpu -m gpu"""

import pytest
import torch
from conftest import hf_greedy, random_prompts, save_tiny_model

from nanovllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("heads,kv_heads,block_size", [(16, 8, 16), (32, 8, 16), (28, 4, 32)])
def test_kernels_bf16_at_real_sizes(heads, kv_heads, block_size):
    from test_kernels import make_step

    from nanovllm.kernels.attention import triton_attention
    from nanovllm.layers.attention import torch_attention

    gen = torch.Generator().manual_seed(heads)
    seqs = [(int(c), 1) for c in torch.randint(1, 4000, (48,), generator=gen)] + [(3000, 1000), (700, 700), (1500, 37)]
    num_blocks = sum(-(-c // block_size) for c, _ in seqs) + 8
    meta = make_step(seqs, block_size, num_blocks, gen)
    tokens, d = meta.query_start_cpu[-1], 128
    bf = dict(dtype=torch.bfloat16, device="cuda")
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, **bf)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, **bf)
    q, k, v = (torch.randn(tokens, n, d, **bf) for n in (heads, kv_heads, kv_heads))
    kc, vc = k_cache.clone(), v_cache.clone()
    expected = torch_attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), meta, d**-0.5)
    got = triton_attention(q, k, v, k_cache, v_cache, meta, d**-0.5)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("seqs", [1, 7, 128])
def test_decode_splits_bf16_at_the_benchmark_shape(seqs):
    """Qwen3-0.6B's heads, ~1,000-token contexts over scattered blocks: the eager plan, a CUDA graph capture's plan
    (max_model_len 40960), and forced split counts and tile sizes all agree with the fp32 reference."""
    from test_kernels import make_step

    from nanovllm.kernels.attention import decode_attention
    from nanovllm.layers.attention import decode_attention as reference

    gen = torch.Generator().manual_seed(seqs)
    lens = torch.randint(1, 1500, (seqs,), generator=gen).tolist()
    num_blocks = sum(-(-c // 16) for c in lens) + 4
    meta = make_step([(c, 1) for c in lens], 16, num_blocks, gen)
    k_cache, v_cache = torch.randn(2, num_blocks, 16, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(seqs, 16, 128, generator=gen).to("cuda", torch.bfloat16)
    expected = torch.empty(q.shape, device="cuda")
    reference(q.float(), expected, k_cache.float(), v_cache.float(), meta, 128**-0.5)
    longest = meta.decode_max_context
    for max_context, kw in [
        (longest, {}),
        (40960, {}),
        (longest, dict(num_splits=1)),
        (longest, dict(num_splits=16, split_min=16, block_n=16)),
        (longest, dict(block_n=128, num_warps=8)),
    ]:
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
            128**-0.5,
            max_context,
            **kw,
        )
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2, msg=lambda m: f"{kw}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_equals_hf_greedy_fp32(arch, tmp_path):
    path = save_tiny_model(arch, str(tmp_path / arch))
    prompts = random_prompts(8, 5, 60)
    llm = LLM(path, dtype="float32", device="cuda")
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == hf_greedy(path, prompts, 24)


def test_cuda_graphs_and_eager_give_identical_tokens(tmp_path):
    path = save_tiny_model("llama", str(tmp_path / "llama"))
    prompts = random_prompts(40, 5, 100, seed=3)  # 40 decodes: a padded bucket (48)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    graphs = LLM(path, dtype="bfloat16", device="cuda")
    assert graphs.engine.runner.graphs.buckets[-1] == graphs.engine.config.max_num_seqs == 512  # CUDA's default
    eager = LLM(path, dtype="bfloat16", device="cuda", enforce_eager=True)
    assert eager.engine.runner.graphs is None
    a = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert a == b

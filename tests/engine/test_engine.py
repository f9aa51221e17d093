"""Engine behaviour on a tiny Llama: stops, seeds, per-prompt params, the step/abort API."""

import json
import os
import shutil

import pytest
from conftest import random_prompts

from nanovllm import LLM, SamplingParams


def greedy(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(temperature=0, **kw), use_tqdm=False)[0].outputs[0]


def test_outputs_in_input_order_and_per_prompt_params(llm):
    prompts = random_prompts(5, 2, 30, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 1, 5, 12, 3)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 1, 5, 12, 3]
    assert all(o.outputs[0].finish_reason == "length" and o.finished for o in outs)


def test_stop_string_is_cut_from_text(llm):
    full = greedy(llm, "Hello", max_tokens=20, ignore_eos=True)
    stop = full.text[5:8]
    assert len(stop) == 3 and stop not in full.text[:5] + full.text[6:7]  # first occurrence at 5
    out = greedy(llm, "Hello", max_tokens=20, ignore_eos=True, stop=[stop])
    assert out.text == full.text[:5] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = greedy(llm, "Hello", max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full.text[:8]


def test_stop_token_ids(llm):
    full = greedy(llm, "Hello", max_tokens=20, ignore_eos=True)
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = greedy(llm, "Hello", max_tokens=20, ignore_eos=True, stop_token_ids=[target])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_and_min_tokens(model_path, tmp_path):
    """A copy of the model whose EOS is the token greedy decoding emits third: it stops there, unless
    min_tokens delays it (EOS is masked until then, as in vLLM)."""
    base = LLM(model_path, dtype="float32")
    full = greedy(base, "Hello", max_tokens=20, ignore_eos=True).token_ids
    eos = full[2]
    copy = str(tmp_path / "eos")
    shutil.copytree(model_path, copy)
    cfg = json.load(open(os.path.join(copy, "config.json")))
    cfg["eos_token_id"] = eos
    json.dump(cfg, open(os.path.join(copy, "config.json"), "w"))
    llm = LLM(copy, dtype="float32")
    stopped = greedy(llm, "Hello", max_tokens=20)
    assert stopped.token_ids == full[: full.index(eos) + 1] and stopped.finish_reason == "stop"
    delayed = greedy(llm, "Hello", max_tokens=20, min_tokens=8)
    assert len(delayed.token_ids) >= 9 and eos not in delayed.token_ids[:8]
    ignored = greedy(llm, "Hello", max_tokens=20, ignore_eos=True)
    assert ignored.token_ids == full and ignored.finish_reason == "length"


def test_generation_config_eos_ids(model_path, tmp_path):
    """Llama 3 lists several EOS ids in generation_config.json: each of them stops generation."""
    full = greedy(LLM(model_path, dtype="float32"), "Hello", max_tokens=20, ignore_eos=True).token_ids
    copy = str(tmp_path / "gen")
    shutil.copytree(model_path, copy)
    json.dump({"eos_token_id": [1, full[3]]}, open(os.path.join(copy, "generation_config.json"), "w"))
    out = greedy(LLM(copy, dtype="float32"), "Hello", max_tokens=20)
    assert out.token_ids == full[: full.index(full[3]) + 1] and out.finish_reason == "stop"


def test_bfloat16_runs(model_path):
    out = greedy(LLM(model_path, dtype="bfloat16"), "Hello", max_tokens=12, ignore_eos=True)
    assert len(out.token_ids) == 12 and all(0 <= t < 258 for t in out.token_ids)


def test_seed_reproducible_whatever_shares_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Hello"], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    mixed = llm.generate(["abc", "Hello", "xyz", "Hello"], [others[0], p, others[1], others[2]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = (
        llm.generate(
            ["Hello"], SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    assert other_seed != alone


def test_n_completions(llm):
    out = llm.generate(
        ["Hello"], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out[0].prompt_token_ids == llm.get_tokenizer()("<|user|>Hi\n<|assistant|>").input_ids


def test_step_api_and_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", "Hello there", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", "General Kenobi", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seen = {}
    while "b" not in seen or not seen["b"].finished:
        for out in engine.step():
            seen[out.request_id] = out
    assert engine.has_unfinished() and engine.block_manager.num_free < engine.block_manager.num_blocks
    engine.abort("a")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert len(seen["b"].outputs[0].token_ids) == 3


def test_streamed_text_equals_full_decode_with_multibyte(llm):
    """Byte tokens of a multi-byte character come one at a time: the text never holds half a character."""
    tok = llm.get_tokenizer()
    for prompt in ["héllo wörld ", "日本語", "emoji 🙂 "]:
        out = greedy(llm, prompt, max_tokens=24, ignore_eos=True)
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True).removesuffix("\ufffd")


def test_failure_mid_generate_leaves_engine_clean(llm, monkeypatch):
    """An error (or Ctrl-C) inside generate aborts that batch's requests: no blocks stay held, and the next
    generate works."""
    real_run, calls = llm.engine.runner.run, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_run(*args)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(["Hello", "World"], SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    llm.engine.block_manager.check_all_free()
    out = llm.generate(["Hello"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_stop_token_text_is_left_out_unless_asked(llm):
    tok = llm.get_tokenizer()
    full = greedy(llm, "Hello", max_tokens=20, ignore_eos=True)
    target = full.token_ids[4]
    out = greedy(llm, "Hello", max_tokens=20, ignore_eos=True, stop_token_ids=[target])
    assert out.text == tok.decode(out.token_ids[:-1]).removesuffix("\ufffd")
    kept = greedy(
        llm, "Hello", max_tokens=20, ignore_eos=True, stop_token_ids=[target], include_stop_str_in_output=True
    )
    assert kept.text == tok.decode(kept.token_ids).removesuffix("\ufffd")


def test_stop_strings_end_after_min_tokens_and_may_begin_before():
    from conftest import byte_tokenizer

    from nanovllm.engine.detokenizer import IncrementalDetokenizer

    tok = byte_tokenizer()
    nine = tok("9").input_ids[0]
    results = []
    for stops in (["99"], ["99", "~~~~~~~~~~"]):
        ids = []
        d = IncrementalDetokenizer(tok, ids, stop=stops)
        for i in range(8):
            ids.append(nine)
            if found := d.add(find_stop=i >= 3):
                break
        results.append((i, d.text, found))
    # the first three 9s were made before a stop was allowed; the fourth may end one, and "99" may begin before it
    # (vLLM's rule: the search looks back over the stop string's length)
    assert results[0] == results[1] == (3, "99", "99")


def test_prefix_stats_count_first_admission_only(model_path):
    prompts = random_prompts(6, 20, 40, seed=5)
    llm = LLM(model_path, dtype="float32", block_size=8, num_kv_blocks=12, max_model_len=96)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0
    assert stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert all(0 <= o.num_cached_tokens < len(o.prompt_token_ids) for o in outs)

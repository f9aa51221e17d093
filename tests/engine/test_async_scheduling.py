"""async_scheduling: step N+1 is scheduled and prepared while step N runs, its inputs read step N's sampled tokens
on the device, and step N's stops and outputs come one step later. On CPU the same code runs without overlap:
it must give what the plain loop gives (greedy and seeded tokens, texts, stop behaviour), and HF's greedy tokens,
with every KV block free afterwards (conftest checks that after every test)."""

import json
import os
import shutil

import pytest
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
FEATURES = {  # engine arguments that exercise prefix caching, chunked prefill and preemption
    "prefix cache": dict(block_size=8),
    "chunked prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(block_size=8, num_kv_blocks=12, max_model_len=96),
}


def pair(path: str, **kwargs) -> tuple[LLM, LLM]:
    return LLM(path, dtype="float32", **kwargs), LLM(path, dtype="float32", async_scheduling=True, **kwargs)


def results(outs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("feature", FEATURES)
def test_greedy_tokens_equal_the_plain_loop_and_hf(model_path, feature):
    shared = random_prompts(1, 40, 40, seed=5)[0]
    prompts = random_prompts(3, 3, 20, seed=2, prefix=shared) + random_prompts(4, 20, 40, seed=1)
    plain, overlapped = pair(model_path, **FEATURES[feature])

    # the first prompt alone, then the rest: its blocks are keyed by then and the others share them
    def run(llm):
        return llm.generate(prompts[:1], GREEDY, use_tqdm=False) + llm.generate(prompts[1:], GREEDY, use_tqdm=False)

    got = run(overlapped)
    assert results(got) == results(run(plain))
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(model_path, prompts, 24)
    stats = overlapped.engine.stats()
    if feature == "preemption":
        assert stats["preemptions"] > 0
    if feature == "prefix cache":
        assert stats["prefix_cache_hits"] >= 2 * 40


def test_stops_equal_the_plain_loop(model_path):
    plain, overlapped = pair(model_path)
    full = plain.generate(["Hello"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 7)]
    params += [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[full.text[5:8]]),
        SamplingParams(
            temperature=0, max_tokens=30, ignore_eos=True, stop=[full.text[5:8]], include_stop_str_in_output=True
        ),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[full.token_ids[4]]),
        SamplingParams(
            temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[full.token_ids[4]], min_tokens=10
        ),
        SamplingParams(temperature=0.8, seed=3, max_tokens=20, n=3, ignore_eos=True),
        SamplingParams(
            temperature=0.8,
            seed=4,
            max_tokens=20,
            n=2,
            ignore_eos=True,
            stop_token_ids=[full.token_ids[2]],
            repetition_penalty=1.3,
            bad_words=["ab"],
        ),
    ]
    prompts = ["Hello"] * len(params)
    got = overlapped.generate(prompts, params, use_tqdm=False)
    assert results(got) == results(plain.generate(prompts, params, use_tqdm=False))
    assert [len(o.outputs[0].token_ids) for o in got[:3]] == [1, 2, 7]  # no wasted token shown
    assert got[3].outputs[0].finish_reason == "stop" and got[5].outputs[0].stop_reason == full.token_ids[4]


def test_eos_and_min_tokens_equal_the_plain_loop(model_path, tmp_path):
    """A copy of the model whose EOS is the token greedy decoding emits third."""
    full = LLM(model_path, dtype="float32").generate(["Hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    copy = str(tmp_path / "eos")
    shutil.copytree(model_path, copy)
    cfg = json.load(open(os.path.join(copy, "config.json")))
    cfg["eos_token_id"] = full[2]
    json.dump(cfg, open(os.path.join(copy, "config.json"), "w"))
    plain, overlapped = pair(copy)
    params = [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=0, max_tokens=20, min_tokens=8)]
    got = overlapped.generate(["Hello", "Hello"], params, use_tqdm=False)
    assert results(got) == results(plain.generate(["Hello", "Hello"], params, use_tqdm=False))
    assert got[0].outputs[0].token_ids == full[: full.index(full[2]) + 1]


def test_stream_deltas_join_to_generate(model_path):
    llm = LLM(model_path, dtype="float32", async_scheduling=True)
    for params in [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["é", "ab"]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=30, n=2),
    ]:
        full = llm.generate("héllo wörld ", params, use_tqdm=False)[0]
        texts, ids = {}, {}
        for delta in llm.stream("héllo wörld ", params):
            for c in delta.outputs:
                texts[c.index] = texts.get(c.index, "") + c.text
                ids[c.index] = ids.get(c.index, []) + c.token_ids
        assert texts == {c.index: c.text for c in full.outputs}
        assert ids == {c.index: c.token_ids for c in full.outputs}


def test_abort_mid_flight_drops_the_token_in_flight(model_path):
    plain, overlapped = pair(model_path)
    engine = overlapped.engine
    for rid in "abc":
        engine.add_request(rid, f"Hello {rid}", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    seen = {}
    for _ in range(4):
        for out in engine.step():
            seen[out.request_id] = out
    assert engine.in_flight is not None  # a step is on its way with b in it
    engine.abort("b")
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != "b"
            seen[out.request_id] = out
    engine.step()  # the last launched step, whose every sequence had ended
    want = plain.generate(
        ["Hello a", "Hello c"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    assert [seen[r].outputs[0].token_ids for r in "ac"] == [o.outputs[0].token_ids for o in want]
    assert not engine.requests


def test_refused_with_tensor_parallelism(model_path):
    with pytest.raises(ValueError, match="async_scheduling=True is not supported with tensor_parallel_size > 1"):
        LLM(model_path, dtype="float32", async_scheduling=True, tensor_parallel_size=2)


@pytest.mark.parametrize("feature", FEATURES)
def test_logprobs_equal_the_plain_loop(model_path, feature):
    """A step that computed logprobs is postprocessed before the next is scheduled (one step without overlap);
    requests beside it that did not ask keep theirs, and get none."""

    def logprobs(outs):
        return [
            (
                [{t: (round(p.logprob, 4), p.rank) for t, p in pos.items()} for pos in o.outputs[0].logprobs or []],
                [pos and {t: (round(p.logprob, 4), p.rank) for t, p in pos.items()} for pos in o.prompt_logprobs or []],
            )
            for o in outs
        ]

    shared = random_prompts(1, 24, 24, seed=5)[0]
    prompts = random_prompts(4, 3, 20, seed=2, prefix=shared)
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=1, max_tokens=16, ignore_eos=True, logprobs=0, prompt_logprobs=3),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1),
    ]
    plain, overlapped = pair(model_path, **FEATURES[feature])

    def run(llm):
        return llm.generate(prompts[:1], params[:1], use_tqdm=False) + llm.generate(prompts, params, use_tqdm=False)

    got, want = run(overlapped), run(plain)
    assert results(got) == results(want)
    assert logprobs(got) == logprobs(want)
    assert len(got[1].outputs[0].logprobs) == 16 and got[2].outputs[0].logprobs is None
    assert got[2].prompt_logprobs is None and got[4].outputs[0].logprobs is None
    assert len(got[3].prompt_logprobs) == len(prompts[2]) and len(got[4].prompt_logprobs) == len(prompts[3])

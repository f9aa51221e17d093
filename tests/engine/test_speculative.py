"""Speculative decoding (nanovllm/spec): vLLM's speculative_config; n-gram and draft-model proposals verified in the
target's forward; greedy output token for token what HF transformers gives, under prefix caching, a small token
budget and preemption; rejection sampling keeps the target's distribution; stops inside an accepted run, abort,
streaming and n > 1 as without speculation; every block (the draft's too) free afterwards."""

import json

import pytest
import torch
from conftest import VOCAB, hf_greedy, save_tiny_model

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine_args import engine_config
from nanovllm.entrypoints.cli import build_parser, engine_kwargs
from nanovllm.spec import ngram
from nanovllm.spec.config import SpeculativeConfig
from nanovllm.spec.rejection import accept
from nanovllm.spec.speculator import Speculator

# the tests run several sequences at once and want them all to speculate: no batch-size limit (see the last test)
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
    "disable_by_batch_size": 64,
}
ALWAYS = {"disable_by_batch_size": 64}
GREEDY = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)


def repeating_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, so that n-gram lookup finds something to propose."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrase = torch.randint(2, VOCAB, (3 + i % 5,), generator=g).tolist()
        tail = torch.randint(2, VOCAB, (i % 4,), generator=g).tolist()
        out.append(phrase * (3 + i % 3) + tail)
    return out


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [
        o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ]


def check_spec_engine_clean(llm: LLM) -> None:
    spec = llm.engine.speculator
    if spec.draft is not None:
        assert not spec.draft.shadows
        spec.draft.block_manager.check_all_free()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def arch_case(request, tmp_path_factory) -> tuple[str, str, list[list[int]], list[list[int]]]:
    """(arch, model path, prompts, HF's greedy completions of them): prompts that repeat a phrase, two of them
    sharing the first one's blocks."""
    path = save_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    prompts = repeating_prompts(5)
    prompts += [prompts[0] + prompts[1]]
    return request.param, path, prompts, hf_greedy(path, prompts, GREEDY.max_tokens)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


# ---- configuration -----------------------------------------------------------------------------------------
def test_vllms_speculative_config():
    assert SpeculativeConfig.from_dict(NGRAM) == SpeculativeConfig("ngram", 4, None, 3, 1, 64)
    # vLLM's defaults: a missing lookup bound takes the other's value, both missing are 5; `model` means a draft
    assert (
        SpeculativeConfig.from_dict(
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}
        ).prompt_lookup_min
        == 4
    )
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_max == 5
    assert SpeculativeConfig.from_dict({"model": "d", "num_speculative_tokens": 3}).method == "draft_model"
    for bad, match in [
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method='eagle' is not supported"),
        ({**NGRAM, "prompt_lookup_min": 5}, "prompt_lookup_min <= prompt_lookup_max"),
        ({**NGRAM, "disable_by_batch_size": 0}, "disable_by_batch_size must be an integer >= 1"),
        ({**NGRAM, "draft_tensor_parallel_size": 1}, "'draft_tensor_parallel_size'"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine_config(speculative_config=bad)
    assert engine_config(speculative_config=NGRAM).speculative_config == NGRAM
    with pytest.raises(ValueError, match="cannot be combined with async_scheduling"):
        engine_config(speculative_config=NGRAM, async_scheduling=True)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_cli_takes_speculative_config_json(command):
    args = build_parser().parse_args(command + ["--speculative-config", json.dumps(NGRAM)])
    assert engine_kwargs(args)["speculative_config"] == NGRAM


def test_ngram_proposals():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    assert ngram.propose(tokens, 3, 1, 3) == [7, 1, 2]  # the latest earlier occurrence of [1, 2, 3]
    assert ngram.propose(tokens, 10, 1, 3) == [7, 1, 2, 3]  # no further than the sequence goes
    assert ngram.propose([5, 1, 2, 3, 8, 2, 3], 2, 1, 3) == [8, 2]  # the longest match wins: [2, 3]
    assert ngram.propose([5, 6, 7, 8], 2, 1, 3) == []  # nothing seen before
    assert ngram.propose([4, 5, 9, 5], 2, 2, 3) == []  # only a 1-token match, fewer than min_n
    assert ngram.propose([4, 4, 4, 4], 2, 1, 2) == [4]  # the match ends right before the suffix


# ---- exactness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_greedy_equals_hf_under_pressure(arch_case, draft, tmp_path):
    """Prefix caching (shared prefixes), a small token budget (prefills chunked, proposals cut to fit) and a pool
    small enough to preempt: the output is still HF's, token for token."""
    arch, path, prompts, expected = arch_case
    if draft == "ngram":
        spec = NGRAM
    else:  # a smaller model of the same family and vocabulary: another net, so it is sometimes wrong
        spec = {
            "model": save_tiny_model(arch, str(tmp_path / "draft"), intermediate_size=96),
            "num_speculative_tokens": 3,
            **ALWAYS,
        }
    llm = LLM(
        path,
        dtype="float32",
        speculative_config=spec,
        max_num_batched_tokens=32,
        num_kv_blocks=20,
        block_size=8,
        max_num_seqs=8,
    )
    assert generate_ids(llm, prompts, GREEDY) == expected
    stats = llm.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    check_spec_engine_clean(llm)


def test_the_target_as_its_own_draft_keeps_every_proposal(llama):
    """A draft identical to the target proposes what the target would generate: every proposal is kept."""
    llm = LLM(llama, dtype="float32", speculative_config={"model": llama, "num_speculative_tokens": 4, **ALWAYS})
    prompts = repeating_prompts(3, seed=1)
    assert generate_ids(llm, prompts, GREEDY) == generate_ids(LLM(llama, dtype="float32"), prompts, GREEDY)
    s = llm.engine.stats()
    assert s["spec_decode_acceptance_rate"] == 1 and s["spec_decode_mean_acceptance_length"] > 4
    check_spec_engine_clean(llm)


@pytest.fixture(scope="module")
def plain_and_self_draft(llama):
    """The engine without speculation, and with the target as its own draft (k = 4, every proposal kept): stops
    fall inside accepted runs."""
    return (
        LLM(llama, dtype="float32"),
        LLM(llama, dtype="float32", speculative_config={"model": llama, "num_speculative_tokens": 4, **ALWAYS}),
    )


def test_stops_inside_an_accepted_run(plain_and_self_draft):
    plain, spec = plain_and_self_draft
    prompt = repeating_prompts(1, seed=2)[0]
    ids = generate_ids(plain, [prompt], GREEDY)[0]
    text = plain.tokenizer.decode(ids[6:9])
    cases = [
        dict(max_tokens=7),
        dict(max_tokens=13),
        dict(stop_token_ids=[ids[5]]),
        dict(stop=[text]),
        dict(stop=[text], include_stop_str_in_output=True),
        dict(stop_token_ids=[ids[2]], min_tokens=6),
        dict(max_tokens=40, ignore_eos=False),
    ]
    for case in cases:
        params = SamplingParams(**{"temperature": 0, "max_tokens": 40, "ignore_eos": True, **case})
        want = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
            want.stop_reason,
        ), case
    check_spec_engine_clean(spec)


def test_streaming_deltas_join_to_the_full_text(plain_and_self_draft):
    _, spec = plain_and_self_draft
    prompt = {"prompt_token_ids": repeating_prompts(1, seed=3)[0]}
    full = spec.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    deltas = list(spec.stream(prompt, GREEDY))
    assert "".join(d.outputs[0].text for d in deltas) == full.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == full.token_ids
    assert any(len(d.outputs[0].token_ids) > 1 for d in deltas)  # several tokens arrived in one delta
    check_spec_engine_clean(spec)


def test_abort_mid_speculation(plain_and_self_draft):
    _, spec = plain_and_self_draft
    engine = spec.engine
    for i, p in enumerate(repeating_prompts(3, seed=4)):
        engine.add_request(f"a{i}", p, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.speculator.draft.shadows  # the draft holds blocks for them now
    for i in range(3):
        engine.abort(f"a{i}")
    assert not engine.has_unfinished()
    check_spec_engine_clean(spec)


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_sampling_seeded_and_n(plain_and_self_draft, llama, kind):
    """temperature > 0: a seeded request gives the same completions again, alone or beside others; n > 1 gives
    n completions, each within max_tokens."""
    llm = plain_and_self_draft[1] if kind == "model" else LLM(llama, dtype="float32", speculative_config=NGRAM)
    prompt = {"prompt_token_ids": repeating_prompts(1, seed=5)[0]}
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=7, n=3, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    others = [{"prompt_token_ids": p} for p in repeating_prompts(2, seed=6)]
    again = llm.generate(
        [prompt] + others, [params] + [SamplingParams(temperature=1.0, max_tokens=30)] * 2, use_tqdm=False
    )
    assert [c.token_ids for c in again[0].outputs] == first
    assert len(first) == 3 and all(len(t) == 24 for t in first) and len({tuple(t) for t in first}) > 1
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0
    check_spec_engine_clean(llm)


# ---- rejection sampling ------------------------------------------------------------------------------------
CHI2_5_DOF_P001 = 20.515  # the chi-square distribution's 99.9th percentile at 5 degrees of freedom


def chi_square(samples: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=len(p)).double()
    expected = p.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", ["point_mass", "distribution"])
def test_rejection_sampling_keeps_the_targets_distribution(draft):
    """Hand-made target p and draft q over 6 tokens: the first token rejection sampling emits (kept proposal or
    the residual's draw) and the second (after a kept first, or the bonus) are distributed as p, not as q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor(
        [
            [0.05, 0.40, 0.10, 0.25, 0.15, 0.05],
            [0.30, 0.05, 0.05, 0.10, 0.20, 0.30],
            [0.10, 0.10, 0.30, 0.20, 0.20, 0.10],
        ]
    )
    q = torch.tensor([[0.40, 0.05, 0.20, 0.05, 0.10, 0.20], [0.10, 0.50, 0.10, 0.10, 0.10, 0.10]])
    firsts, seconds, n = [], [], 5000
    for _ in range(n):
        if draft == "point_mass":  # n-gram: always the same proposals, a point mass on each
            proposal, probs = [0, 1], None
        else:
            proposal, probs = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)], q
        out = accept(p, proposal, probs, g)
        firsts.append(out[0])
        if len(out) > 1:  # the first was kept: the second is p[1]'s, whether kept or drawn
            seconds.append(out[1])
    assert chi_square(firsts, p[0]) < CHI2_5_DOF_P001
    assert chi_square(seconds, p[1]) < CHI2_5_DOF_P001
    assert chi_square(firsts, q[0]) > 10 * CHI2_5_DOF_P001  # and the test could tell the two apart


def test_spec_decode_metrics(plain_and_self_draft):
    from prometheus_client import generate_latest

    from nanovllm.entrypoints.metrics import ServerMetrics

    plain, spec = plain_and_self_draft
    spec.generate([{"prompt_token_ids": repeating_prompts(1, seed=8)[0]}], GREEDY, use_tqdm=False)
    s = spec.engine.stats()
    text = generate_latest(ServerMetrics(spec.engine.stats).registry).decode()
    assert f"nanovllm:spec_decode_num_drafts_total {float(s['spec_decode_num_drafts'])}" in text
    assert f"nanovllm:spec_decode_num_accepted_tokens_total {float(s['spec_decode_num_accepted_tokens'])}" in text
    assert 'nanovllm:spec_decode_num_accepted_tokens_per_pos_total{position="3"}' in text
    assert "nanovllm:spec_decode_acceptance_rate 1.0" in text
    assert "spec_decode" not in generate_latest(ServerMetrics(plain.engine.stats).registry).decode()


def test_no_proposals_while_logprobs_are_asked_for(llama):
    """Logprobs are computed one token per sequence and step: while a request asks for them nothing is proposed,
    and the output is as without speculation."""
    spec, plain = LLM(llama, dtype="float32", speculative_config=NGRAM), LLM(llama, dtype="float32")
    prompts = [{"prompt_token_ids": p} for p in repeating_prompts(2, seed=9)]
    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=2), GREEDY]
    got, want = spec.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert got[0].outputs[0].logprobs == want[0].outputs[0].logprobs and len(got[0].outputs[0].logprobs) == 12
    drafts = spec.engine.stats()["spec_decode_num_drafts"]
    spec.generate(prompts[1:], GREEDY, use_tqdm=False)  # alone again: proposals again
    assert spec.engine.stats()["spec_decode_num_drafts"] > drafts


def test_disable_by_batch_size():
    """vLLM's disable_by_batch_size: no proposals in a step where that many sequences run; on CPU it defaults to 4
    (a verification of several rows costs there what it saves), on CUDA to none."""
    seqs = [Sequence(str(i), 0, [5 + i, 6, 7] * 4, 12, GREEDY) for i in range(3)]  # each proposes [5 + i, 6, 7]
    for s in seqs:
        s.num_computed = s.num_tokens - 1  # about to decode
    spec = Speculator(SpeculativeConfig.from_dict({**NGRAM, "disable_by_batch_size": 3}), 1024)
    spec.propose(seqs, [])
    assert not any(s.spec_token_ids for s in seqs)
    spec.propose(seqs[:2], [])
    assert all(s.spec_token_ids for s in seqs[:2])
    default = {k: v for k, v in NGRAM.items() if k != "disable_by_batch_size"}
    assert Speculator(SpeculativeConfig.from_dict(default), 1024, device="cpu").disable_by_batch_size == 4
    assert Speculator(SpeculativeConfig.from_dict(default), 1024, device="cuda").disable_by_batch_size is None


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_under_tensor_parallelism(llama, draft):
    """The workers run the same packed step, proposals and all (a draft model runs whole on rank 0): TP=2 gives
    what one process gives."""
    prompts = repeating_prompts(3, seed=4)
    want = generate_ids(LLM(llama, dtype="float32"), prompts, GREEDY)
    spec = NGRAM if draft == "ngram" else {"model": llama, "num_speculative_tokens": 3, **ALWAYS}
    with LLM(llama, dtype="float32", tensor_parallel_size=2, speculative_config=spec) as llm:
        assert generate_ids(llm, prompts, GREEDY) == want
        assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0

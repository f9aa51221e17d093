"""Logprobs: SamplingParams(logprobs=N, prompt_logprobs=M) equal torch.log_softmax of HF transformers' logits (fp32,
<= 1e-4) for the chosen and the most likely tokens, with their ranks, at generated and prompt positions, under
prefix caching, chunked prefill and preemption; streamed deltas carry their own tokens' logprobs; and the OpenAI
server shows them (completions' legacy format with echo, chat's content list), streamed and not, as the official
client parses them. Also: the server's known-but-unsupported fields are refused by name."""

import asyncio
import json

import openai
import pytest
import torch
from conftest import VOCAB, random_prompts, save_tiny_model, start_server, stop_server

from nanovllm import LLM, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def path(request, tmp_path_factory) -> str:
    return save_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def hf(path):
    """log_softmax of HF's logits over a whole token sequence: [len(ids), vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def check_position(position: dict, chosen: int, ref: torch.Tensor, num: int, tokenizer=None) -> None:
    """One position's {token id: Logprob} against HF's log-probabilities there: the chosen token with its rank,
    and the `num` most likely tokens, ranks 1..num (the chosen one counted once)."""
    lp = position[chosen]
    assert abs(lp.logprob - ref[chosen].item()) <= TOL
    # ties within float noise may order either way: the rank lies between the strict and the loose count
    assert (ref > ref[chosen] + TOL).sum() + 1 <= lp.rank <= (ref >= ref[chosen] - TOL).sum()
    top = sorted((p.rank, t, p.logprob) for t, p in position.items() if p.rank <= num)
    assert [r for r, _, _ in top] == list(range(1, num + 1))
    assert len(position) == num + (lp.rank > num)
    for (_, t, value), best in zip(top, ref.topk(num).values.tolist()):
        assert abs(value - ref[t].item()) <= TOL and abs(value - best) <= TOL
    if tokenizer is not None:
        assert all(p.decoded_token == tokenizer.decode([t]) for t, p in position.items())


def check_output(out, hf, num: int | None, num_prompt: int | None, tokenizer=None) -> None:
    """Every logprob of a RequestOutput against HF's forward over its prompt and each completion."""
    prompt = out.prompt_token_ids
    for c in out.outputs:
        ref = hf(prompt + c.token_ids)
        if num is None:
            assert c.logprobs is None and c.cumulative_logprob is None
        else:
            assert len(c.logprobs) == len(c.token_ids)
            for j, (token, position) in enumerate(zip(c.token_ids, c.logprobs)):
                check_position(position, token, ref[len(prompt) - 1 + j], num, tokenizer)
            assert abs(c.cumulative_logprob - sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs))) <= TOL
    if num_prompt is None:
        assert out.prompt_logprobs is None
        return
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for k in range(1, len(prompt)):
        check_position(out.prompt_logprobs[k], prompt[k], ref[k - 1], num_prompt, tokenizer)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, **{"max_tokens": 6, **kw})


def test_logprobs_equal_hf_and_cost_nothing_when_not_asked(path, hf):
    llm = LLM(path, dtype="float32", max_model_len=256)
    prompts = random_prompts(3, 8, 40, seed=1)
    params = [greedy(logprobs=5, prompt_logprobs=3), greedy(logprobs=0), greedy()]
    outs = llm.generate(prompts, params, use_tqdm=False)
    check_output(outs[0], hf, 5, 3, llm.get_tokenizer())
    check_output(outs[1], hf, 0, None)
    check_output(outs[2], hf, None, None)
    assert all(len(p) == 1 for p in outs[1].outputs[0].logprobs)  # the sampled token alone
    assert all(p[t].rank == 1 for t, p in zip(outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs))
    # sampled tokens outside the top N: N + 1 entries, their true rank; n > 1 shares one prompt_logprobs
    sampled = llm.generate(
        prompts[:1],
        SamplingParams(n=2, temperature=1.5, seed=3, max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=1),
        use_tqdm=False,
    )[0]
    check_output(sampled, hf, 1, 1)
    assert any(len(p) == 2 for c in sampled.outputs for p in c.logprobs)
    # the whole vocabulary (-1) where the engine allows it (max_logprobs=-1)
    with pytest.raises(ValueError, match=r"SamplingParams.logprobs \(21\) is more than .* max_logprobs=20"):
        llm.generate(prompts[:1], greedy(logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs .* max_logprobs=20"):
        llm.generate(prompts[:1], greedy(prompt_logprobs=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams.logprobs must be None, -1"):
        SamplingParams(logprobs=-2)
    every = LLM(path, dtype="float32", max_model_len=256, max_logprobs=-1)
    out = every.generate(prompts[:1], greedy(logprobs=-1, prompt_logprobs=-1, max_tokens=2), use_tqdm=False)[0]
    check_output(out, hf, VOCAB, VOCAB)


def test_prefix_cache_chunked_prefill_and_preemption(path, hf):
    # prefix caching: a request with prompt logprobs computes the positions it needs (vLLM's choice); one without
    # takes the cached prefix and its sample logprobs are still right
    llm = LLM(path, dtype="float32", max_model_len=256)
    prompt = random_prompts(1, 50, 50, seed=2)[0]
    llm.generate([prompt], greedy(), use_tqdm=False)
    again = llm.generate([prompt], greedy(logprobs=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    check_output(again, hf, 2, 2)
    cached = llm.generate([prompt], greedy(logprobs=2), use_tqdm=False)[0]
    assert cached.num_cached_tokens == 48
    check_output(cached, hf, 2, None)
    # chunked prefill (16 tokens a step) and preemption (a pool of 12 blocks for 4 sequences of up to 100 tokens)
    small = LLM(path, dtype="float32", max_model_len=128, max_num_batched_tokens=16, num_kv_blocks=12)
    prompts = random_prompts(4, 30, 60, seed=4)
    outs = small.generate(prompts, greedy(logprobs=3, prompt_logprobs=2, max_tokens=40), use_tqdm=False)
    assert small.engine.stats()["preemptions"] > 0
    for out in outs:
        check_output(out, hf, 3, 2)


def test_stream_deltas_carry_their_own_logprobs(path):
    llm = LLM(path, dtype="float32", max_model_len=256)
    prompt = random_prompts(1, 10, 10, seed=5)[0]
    params = greedy(logprobs=2, prompt_logprobs=1, max_tokens=8)
    full = llm.generate([prompt], params, use_tqdm=False)[0]
    deltas = list(llm.stream(prompt, params))
    assert deltas[0].prompt_logprobs == full.prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert [p for d in deltas for c in d.outputs for p in c.logprobs] == full.outputs[0].logprobs
    assert all(len(c.logprobs) == len(c.token_ids) for d in deltas for c in d.outputs)
    assert deltas[-1].outputs[0].cumulative_logprob == full.outputs[0].cumulative_logprob
    # the async engine's DELTA outputs the same
    from nanovllm.engine.async_engine import AsyncEngine
    from nanovllm.sampling_params import RequestOutputKind

    engine = AsyncEngine(llm.engine)
    delta = params.clone()
    delta.output_kind = RequestOutputKind.DELTA

    async def collect():
        return [o async for o in engine.generate(engine.make_request(prompt, delta))]

    outs = asyncio.run(collect())
    assert outs[0].prompt_logprobs == full.prompt_logprobs and all(o.prompt_logprobs is None for o in outs[1:])
    assert [p for o in outs for c in o.outputs for p in c.logprobs] == full.outputs[0].logprobs


def test_a_role_the_template_leaves_out_is_an_error(path):
    llm = LLM(path, dtype="float32", max_model_len=256)
    template = (
        "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['role'] }}: {{ m['content'] }}"
        "\n{% endif %}{% endfor %}"
    )
    llm.chat([{"role": "user", "content": "hi"}], greedy(max_tokens=1), chat_template=template, use_tqdm=False)
    with pytest.raises(ValueError, match="does not know the role 'narrator'"):
        llm.chat(
            [{"role": "narrator", "content": "Once"}, {"role": "user", "content": "hi"}],
            greedy(max_tokens=1),
            chat_template=template,
            use_tqdm=False,
        )


# ---- the server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def served(llama):
    proc, url = start_server([llama, "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gib", "0.05"])
    yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    stop_server(proc)


@pytest.fixture(scope="module")
def offline(llama):
    return LLM(llama, dtype="float32", max_model_len=256)


PROMPT = "The quick brown fox"


def same_logprobs(a: dict, b: dict) -> bool:
    """Legacy-format logprobs equal up to float noise (a request that hits the prefix cache computes its prompt's
    K/V in another order)."""
    return (
        a["tokens"] == b["tokens"]
        and a["text_offset"] == b["text_offset"]
        and a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)
        and all(x == pytest.approx(y, abs=1e-5) for x, y in zip(a["top_logprobs"], b["top_logprobs"]))
    )


def streamed_logprobs(chunks) -> tuple[str, dict]:
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.text
            for key in lp:
                lp[key] += getattr(choice.logprobs, key) if choice.logprobs else []
    return text, lp


def test_completions_logprobs_and_echo(served, offline):
    url, client = served
    tok = offline.get_tokenizer()
    ref = offline.generate(PROMPT, greedy(logprobs=3, prompt_logprobs=3), use_tqdm=False)[0]
    c = ref.outputs[0]
    args = dict(
        model=served_model(client),
        prompt=PROMPT,
        temperature=0,
        max_tokens=6,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    got = client.completions.create(**args).choices[0]
    assert got.text == c.text
    assert got.logprobs.tokens == [tok.decode([t]) for t in c.token_ids]
    assert got.logprobs.token_logprobs == pytest.approx(
        [p[t].logprob for t, p in zip(c.token_ids, c.logprobs)], abs=1e-6
    )
    for top, position in zip(got.logprobs.top_logprobs, c.logprobs):
        assert top == pytest.approx({p.decoded_token: p.logprob for p in position.values()}, abs=1e-6)
    offsets = [0]
    for token in got.logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert got.logprobs.text_offset == offsets
    text, lp = streamed_logprobs(client.completions.create(**args, stream=True))
    assert text == got.text and same_logprobs(lp, got.logprobs.model_dump())
    # echo: the prompt and its logprobs first; with max_tokens 0 the prompt is scored (what lm-eval sends)
    scored = client.completions.create(**{**args, "max_tokens": 0, "echo": True})
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [tok.decode([t]) for t in ref.prompt_token_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [p[t].logprob for t, p in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])], abs=1e-6
    )
    echoed = client.completions.create(**{**args, "echo": True}).choices[0]
    assert echoed.text == PROMPT + c.text
    assert echoed.logprobs.token_logprobs[0] is None
    assert echoed.logprobs.token_logprobs[1:] == pytest.approx(
        choice.logprobs.token_logprobs[1:] + got.logprobs.token_logprobs, abs=1e-5
    )
    text, lp = streamed_logprobs(client.completions.create(**{**args, "echo": True}, stream=True))
    assert text == echoed.text and same_logprobs(lp, echoed.logprobs.model_dump())
    # vLLM's prompt_logprobs extra, not streamed
    body = client.completions.create(**{**args, "extra_body": {"ignore_eos": True, "prompt_logprobs": 1}})
    prompt_lps = body.choices[0].model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(ref.prompt_token_ids)
    t = ref.prompt_token_ids[1]
    assert prompt_lps[1][str(t)]["logprob"] == pytest.approx(ref.prompt_logprobs[1][t].logprob, abs=1e-6)


def test_chat_logprobs(served, offline):
    _, client = served
    messages = [{"role": "user", "content": "Hello there"}]
    ref = offline.chat(messages, greedy(logprobs=2, max_tokens=6), use_tqdm=False)[0].outputs[0]
    args = dict(
        model=served_model(client),
        messages=messages,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = client.chat.completions.create(**args).choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, t, position in zip(content, ref.token_ids, ref.logprobs):
        assert entry.token == position[t].decoded_token and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(position[t].logprob, abs=1e-6)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(
            sorted((p.logprob for p in position.values() if p.rank <= 2), reverse=True), abs=1e-6
        )
    chunks = client.chat.completions.create(**args, stream=True)
    streamed = [e for chunk in chunks for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.bytes, [x.token for x in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [x.token for x in e.top_logprobs]) for e in content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None


def test_sampling_fields_pass_through_and_known_fields_are_never_ignored(served, offline):
    url, client = served
    model = served_model(client)
    prompt = [5, 6, 7, 8, 9, 10]

    def served_ids(**extra) -> str:
        return (
            client.completions.create(
                model=model, prompt=prompt, temperature=0, max_tokens=8, extra_body={"ignore_eos": True, **extra}
            )
            .choices[0]
            .text
        )

    def offline_text(**kw) -> str:
        return offline.generate([prompt], greedy(max_tokens=8, **kw), use_tqdm=False)[0].outputs[0].text

    first = offline.generate([prompt], greedy(max_tokens=1), use_tqdm=False)[0].outputs[0].token_ids[0]
    word = offline.get_tokenizer().decode([first])
    assert served_ids(logit_bias={"42": 100}) == offline_text(logit_bias={42: 100.0})
    assert served_ids(allowed_token_ids=[20, 21, 22]) == offline_text(allowed_token_ids=[20, 21, 22])
    assert served_ids(bad_words=[word]) == offline_text(bad_words=[word]) != offline_text()
    v1 = url + "/v1"
    cases = [
        ("completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
        ("completions", {"prompt": "hi", "best_of": 3}, "best_of"),
        ("completions", {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
        ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        (
            "chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
            "tools",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (
            "chat/completions",
            {
                "messages": [{"role": "narrator", "content": "Once"}],
                "chat_template": "{% for m in messages %}{% if m['role'] == 'user' %}"
                "{{ m['content'] }}{% endif %}{% endfor %}",
            },
            "messages",
        ),
    ]
    for path, body, param in cases:
        status, answer = post(f"{v1}/{path}", {"max_tokens": 2, **body})
        assert status == 400 and answer["error"]["param"] == param, (body, answer)
    # unknown fields stay ignored, and "off" values of known ones ask for nothing
    status, answer = post(
        f"{v1}/completions",
        {"prompt": "hi", "max_tokens": 2, "no_such_field": 1, "best_of": 1, "use_beam_search": False, "user": "me"},
    )
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def served_model(client) -> str:
    return client.models.list().data[0].id


def post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_known_unsupported_field_is_refused_by_name_and_documented():
    import pathlib
    import re

    from nanovllm.entrypoints.protocol import APIError, ChatRequest, CompletionRequest

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "from-vllm.md").read_text()
    refused = set(re.findall(r"\w+", doc.split("- Refused with a 400")[1].split("- Unknown")[0]))
    for model, base in ((CompletionRequest, {"prompt": "hi"}), (ChatRequest, {"messages": []})):
        for name in model.unsupported:
            assert name in refused, f"{name} is refused but not in docs/from-vllm.md"
            with pytest.raises(APIError) as e:
                model(**base, **{name: 12345})
            assert e.value.status == 400 and e.value.param == name
            for off in model.unsupported[name]:  # the values that ask for nothing are accepted
                model(**base, **{name: off})
        with pytest.raises(APIError, match="continuous_usage_stats"):
            model(**base, stream_options={"continuous_usage_stats": True})


def test_tensor_parallel_logprobs_equal_one_process(tmp_path):
    # vocab 259: the last vocabulary range is padded; a small budget and pool: chunks and preemption on 2 ranks
    path = save_tiny_model("llama", str(tmp_path / "llama"), vocab_size=259)
    prompts = random_prompts(3, 30, 50, seed=6)
    params = greedy(logprobs=3, prompt_logprobs=2, max_tokens=30)
    ref = LLM(path, dtype="float32", max_model_len=128).generate(prompts, params, use_tqdm=False)
    with LLM(
        path, dtype="float32", max_model_len=128, tensor_parallel_size=2, num_kv_blocks=10, max_num_batched_tokens=24
    ) as llm:
        out = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.stats()["preemptions"] > 0
    for a, b in zip(out, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) <= TOL for t in x)

"""A real `nanovllm serve` process on 127.0.0.1 with the embedded SmolLM2, driven by the official openai client:
its greedy outputs equal offline LLM.generate, streamed or not, for one client or 32 at once."""

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import start_server, stop_server

from nanovllm import SamplingParams
from nanovllm.loader import default_model_path

KEY = "test-key"
MAX_LEN = 1024


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(
        # dequantized weights: a stream's tokens then do not depend on what shares its steps, as the tests compare
        ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--kv-cache-gib", "0.5"]
        + ["--quantization", "dequantize"],
        env={**os.environ, "NANOVLLM_API_KEY": KEY},
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    """Makes an async client; each asyncio.run needs its own (a client's connections belong to one event loop)."""
    return lambda: openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def http(url: str, body=None, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in French, with accents."}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    card = client.models.list().data[0].model_dump()  # vLLM's model card: `vllm bench serve` reads root
    assert card["root"] == default_model_path() and card["parent"] is None and card["max_model_len"] == MAX_LEN
    assert urllib.request.urlopen(server + "/health").status == 200


def test_chat_streamed_equals_unstreamed_equals_offline(client, embedded_llm):
    full = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0, max_tokens=48
    )
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=QUESTION,
            temperature=0,
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    offline = embedded_llm.chat(QUESTION, greedy(48), use_tqdm=False)[0].outputs[0]
    assert full.choices[0].message.content == streamed == offline.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(offline.token_ids)
    assert full.usage.completion_tokens == len(offline.token_ids)


def test_completions_streamed_equals_unstreamed_equals_offline(client, embedded_llm):
    prompt = "Une liste de villes françaises : Paris, Lyon,"
    full = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, temperature=0, max_tokens=40)
    stream = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, temperature=0, max_tokens=40, stream=True
    )
    streamed = "".join(c.choices[0].text for c in stream)
    offline = embedded_llm.generate(prompt, greedy(40), use_tqdm=False)[0].outputs[0]
    assert full.choices[0].text == streamed == offline.text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40


def test_stop_strings_n_and_extra_body(client, embedded_llm):
    prompt = "Count: one, two, three, four, five,"
    out = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=[prompt, prompt + " six,"],
        n=2,
        temperature=0,
        max_tokens=30,
        stop=[" eight"],
        stream=True,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.0,
            "ignore_eos": True,
            "min_tokens": 2,
            "stop_token_ids": [2],
        },
    )
    texts = {}
    for chunk in out:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    offline = embedded_llm.generate(
        [prompt, prompt + " six,"],
        greedy(30, stop=[" eight"], n=2, min_tokens=2, ignore_eos=True, stop_token_ids=[2]),
        use_tqdm=False,
    )
    assert texts == {i * 2 + j: offline[i].outputs[j].text for i in range(2) for j in range(2)}
    assert all(" eight" not in t for t in texts.values())


def test_32_concurrent_streams_get_their_offline_outputs(server, aclient, embedded_llm):
    prompts = [
        f"Write a short note number {i} about {'cats dogs birds fish trees'.split()[i % 5]}:" + " please" * (i % 7)
        for i in range(32)
    ]
    lengths = [8 + (i * 7) % 33 for i in range(32)]
    seen_running: list[float] = []

    async def one(client, prompt: str, n: int) -> str:
        stream = await client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompt, temperature=0, max_tokens=n, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            seen_running.append((await asyncio.to_thread(metrics, server))["nanovllm:num_requests_running"])
            await asyncio.sleep(0.05)

    async def main() -> list[str]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        client = aclient()
        texts = await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))
        done.set()
        await watcher
        return texts

    texts = asyncio.run(main())
    offline = embedded_llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    assert texts == [o.outputs[0].text for o in offline]
    assert max(seen_running) > 1, "the clients were never batched together"


def test_disconnect_aborts_and_frees_blocks(server, aclient, embedded_llm):
    others = ["Tell me about the sea.", "Tell me about the mountains."]

    async def main():
        client = aclient()
        long = await client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt="Once upon a time",
            max_tokens=900,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        tasks = [
            asyncio.create_task(
                client.completions.create(
                    model="SmolLM2-135M-Instruct",
                    prompt=p,
                    temperature=0,
                    max_tokens=60,
                    extra_body={"ignore_eos": True},
                )
            )
            for p in others
        ]
        got = 0
        async for _ in long:
            got += 1
            if got == 5:
                break
        before = metrics(server)
        await long.close()  # the client goes away mid-stream
        deadline = time.time() + 10
        while metrics(server).get('nanovllm:request_success_total{finished_reason="abort"}', 0) < 1:
            assert time.time() < deadline, "the disconnected request was not aborted"
            await asyncio.sleep(0.05)
        return before, await asyncio.gather(*tasks)

    before, outs = asyncio.run(main())
    assert before["nanovllm:kv_cache_usage_perc"] > 0
    offline = embedded_llm.generate(others, greedy(60, ignore_eos=True), use_tqdm=False)
    assert [o.choices[0].text for o in outs] == [o.outputs[0].text for o in offline]
    after = metrics(server)
    assert after["nanovllm:num_requests_running"] == 0 and after["nanovllm:num_requests_waiting"] == 0
    assert after["nanovllm:kv_cache_usage_perc"] == 0  # every block is back in the free pool

    # a non-streaming client that gives up is not waited for either
    impatient = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(
            model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=900, extra_body={"ignore_eos": True}
        )
    aborted = 'nanovllm:request_success_total{finished_reason="abort"}'
    deadline = time.time() + 10
    while metrics(server)[aborted] < 2 or metrics(server)["nanovllm:kv_cache_usage_perc"] > 0:
        assert time.time() < deadline, "the abandoned non-streaming request was not aborted"
        time.sleep(0.1)


def test_bad_inputs_get_errors_and_do_not_disturb_a_stream(server, aclient, embedded_llm):
    v1 = server + "/v1"
    long_prompt = "word " * (MAX_LEN + 10)
    cases = [
        (dict(raw=b"{not json"), 400, None),
        (dict(body={"model": "gpt-4", "prompt": "hi"}), 400, "model"),
        (dict(body={"prompt": "hi", "temperature": -1}), 400, "temperature"),
        (dict(body={"prompt": "hi", "top_p": 2}), 400, "top_p"),
        (dict(body={"prompt": "hi", "n": 0}), 400, "n"),
        (dict(body={"prompt": "hi", "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={"prompt": 123}), 400, "prompt"),
        (dict(body={"prompt": long_prompt}), 400, "prompt"),
        (dict(body={"prompt": "hi", "max_tokens": MAX_LEN}), 400, "max_tokens"),
        (dict(body={"prompt": [10**9]}), 400, None),
        (dict(body={"prompt": "hi", "n": 10**6}), 400, None),
        (dict(body={"prompt": "hi"}, key="wrong"), 401, None),
        (dict(body={"prompt": "hi"}, key=None), 401, None),
    ]

    async def main():
        stream = await aclient().completions.create(
            model="SmolLM2-135M-Instruct", prompt="The history of Rome", temperature=0, max_tokens=48, stream=True
        )
        results = []
        for kw, _, _ in cases:
            results.append(await asyncio.to_thread(http, v1 + "/completions", **kw))
        results.append(await asyncio.to_thread(http, v1 + "/chat/completions", {"messages": "nope"}))
        results.append(
            await asyncio.to_thread(
                http,
                v1 + "/chat/completions",
                {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            )
        )
        results.append(await asyncio.to_thread(http, server + "/nowhere", {}))
        text = "".join([c.choices[0].text async for c in stream])
        return results, text

    results, text = asyncio.run(main())
    expected = [(status, param) for _, status, param in cases] + [(400, "messages"), (400, "messages"), (404, None)]
    for (status, body), (want, param) in zip(results, expected):
        assert status == want, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        if param:
            assert body["error"]["param"] == param, body
    long_error = results[7][1]["error"]["message"]
    assert f"{MAX_LEN}" in long_error and "prompt has" in long_error  # names both lengths
    assert text == embedded_llm.generate("The history of Rome", greedy(48), use_tqdm=False)[0].outputs[0].text
    # and the server keeps serving; nulls mean defaults, and a top_k beyond the vocabulary is no limit
    status, body = http(
        v1 + "/completions", {"prompt": "hi", "max_tokens": 2, "temperature": None, "n": None, "top_k": 2**63}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert urllib.request.urlopen(server + "/health").status == 200


def test_tokenize_detokenize_and_metrics(server, embedded_llm):
    status, body = http(server + "/tokenize", {"prompt": "Bonjour à tous"})
    assert status == 200 and body["tokens"] == embedded_llm.tokenizer("Bonjour à tous").input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_LEN
    status, body = http(server + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and body["prompt"] == "Bonjour à tous"
    status, body = http(server + "/tokenize", {"messages": QUESTION})
    assert body["tokens"] == embedded_llm.apply_chat_template(QUESTION)
    m = metrics(server)
    for name in [
        "nanovllm:num_requests_running",
        "nanovllm:num_requests_waiting",
        "nanovllm:kv_cache_usage_perc",
        "nanovllm:prefix_cache_hit_rate",
        "nanovllm:prompt_tokens_total",
        "nanovllm:generation_tokens_total",
        "nanovllm:time_to_first_token_seconds_count",
        "nanovllm:inter_token_latency_seconds_count",
    ]:
        assert name in m, name
    assert m["nanovllm:generation_tokens_total"] > 0 and m["nanovllm:time_to_first_token_seconds_count"] > 0

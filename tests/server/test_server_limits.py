"""The limits a public server needs, each a clear 4xx naming the limit while other requests run unchanged; the
API key compared in constant time; and faults: an engine loop that fails (500 for the requests in flight,
/health 503, `nanovllm serve` exits 1) and a tensor-parallel worker that dies (the same); a chat stream's first chunk
comes with the first output, as vLLM's (clients time the first token by it)."""

import asyncio
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx2 as httpx
from conftest import serve_in_thread, start_server

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.async_engine import AsyncEngine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.entrypoints.server import ServerLimits, build_app

PROMPT = "The history of Rome"


@contextmanager
def serving(
    model_path: str,
    limits: ServerLimits | None = None,
    request_timeout: float | None = None,
    step_delay: float = 0.0,
    api_key: str | None = None,
    **config,
):
    """An in-process server (uvicorn on a thread) over a fresh engine; step_delay slows every step, so that
    requests overlap for as long as a test needs."""
    engine = LLMEngine(EngineConfig(model_path, dtype="float32", max_model_len=128, **{"kv_cache_gib": 0.05, **config}))
    run = engine.runner.run
    engine.runner.run = lambda *a: (time.sleep(step_delay), run(*a))[1]
    deaths = []
    async_engine = AsyncEngine(engine, request_timeout, on_death=deaths.append)
    app = build_app(async_engine, "tiny", api_key, limits=limits)
    server, thread, url = serve_in_thread(app)
    try:
        yield url, async_engine, deaths
    finally:
        server.should_exit = True
        thread.join(10)
        for rid in list(engine.requests):  # a dead loop leaves its requests; the invariant check runs after us
            engine.abort(rid)


def post(url: str, body: dict, path: str = "/v1/completions", **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kw)


def stream_events(url: str, body: dict) -> list[dict]:
    """A streamed completion's events (the [DONE] left out)."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def offline_text(model_path: str, max_tokens: int) -> str:
    llm = LLM(model_path, dtype="float32", max_model_len=128)
    return (
        llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]
        .outputs[0]
        .text
    )


def assert_clean(engine: AsyncEngine) -> None:
    """No request state left anywhere and every KV block free (once the loop has caught up)."""
    deadline = time.time() + 10
    while engine.streams or engine.engine.requests or engine.engine.has_unfinished():
        assert time.time() < deadline, "request state left in the engine"
        time.sleep(0.02)
    engine.engine.block_manager.check_all_free()


def test_each_limit_is_a_4xx_naming_it_and_a_stream_runs_unchanged(model_path):
    limits = ServerLimits(max_request_body_bytes=4096, max_n=3, max_stop_strings=2, max_stop_string_length=8)
    with serving(model_path, limits, step_delay=0.01) as (url, engine, _):
        greedy = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        streamed = {}
        reader = threading.Thread(target=lambda: streamed.update(events=stream_events(url, greedy)))
        reader.start()
        cases = [  # (body or raw bytes, status, param, words the message must hold)
            ({"prompt": "x" * 5000}, 413, None, ["4096 bytes", "--max-request-body-bytes"]),
            ({"prompt": "hi", "n": 4}, 400, "n", ["n=4", "limit of 3", "--max-n"]),
            (
                {"prompt": "hi", "stop": ["a", "b", "c"]},
                400,
                "stop",
                ["3 stop strings", "limit of 2", "--max-stop-strings"],
            ),
            (
                {"prompt": "hi", "stop": "123456789"},
                400,
                "stop",
                ["9 characters", "limit of 8", "--max-stop-string-length"],
            ),
            ({"prompt": "hi", "max_tokens": 200}, 400, "max_tokens", ["max_tokens=200", "max_model_len is 128"]),
        ]
        for body, status, param, words in cases:
            r = post(url, body)
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["param"] == param and all(w in error["message"] for w in words), error
        chat = post(
            url, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 500}, "/v1/chat/completions"
        )
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_tokens"
        # a body that does not say its length (chunked) is counted as it arrives
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.request(
            "POST",
            "/v1/completions",
            body=iter([b'{"prompt": "', b"y" * 5000, b'"}']),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413 and b"--max-request-body-bytes" in response.read()
        conn.close()
        reader.join(60)
        # just under every limit is served
        ok = post(url, {"prompt": "hi", "n": 3, "stop": ["ab", "12345678"], "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
        assert_clean(engine)
    text = "".join(c["text"] for e in streamed["events"] for c in e["choices"])
    assert text == offline_text(model_path, 40)


def test_chat_stream_sends_the_role_chunk_with_the_first_output(model_path):
    """As vLLM does: `vllm bench serve --backend openai-chat` times the first token by the first chunk."""
    with serving(model_path, step_delay=1.0) as (url, engine, _):  # the prefill step takes at least 1 s
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "stream": True}
        start = time.perf_counter()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            arrivals = [(time.perf_counter() - start, line) for line in r.iter_lines() if line.startswith("data: {")]
        waited, first = arrivals[0]
        assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert waited >= 1.0 and len(arrivals) >= 2
        assert_clean(engine)


def test_full_waiting_queue_is_503_with_retry_after(model_path):
    with serving(model_path, ServerLimits(max_waiting_requests=2), step_delay=0.02, max_num_seqs=1) as (url, engine, _):

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                long = asyncio.create_task(
                    client.post(
                        "/v1/completions",
                        json={"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "temperature": 0},
                    )
                )
                while engine.stats["running"] < 1:  # the batch (one sequence) is full
                    await asyncio.sleep(0.01)
                waiting = [
                    asyncio.create_task(client.post("/v1/completions", json={"prompt": f"w{i}", "max_tokens": 2}))
                    for i in range(2)
                ]
                await asyncio.sleep(0.2)
                refused = await client.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 2})
                return await long, await asyncio.gather(*waiting), refused

        long, waiting, refused = asyncio.run(main())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "too_many_waiting_requests"
        assert "limit of 2 waiting requests" in error["message"] and "--max-waiting-requests" in error["message"]
        assert long.status_code == 200 and [w.status_code for w in waiting] == [200, 200]
        assert long.json()["choices"][0]["text"] == offline_text(model_path, 60)
        assert post(url, {"prompt": "now there is room", "max_tokens": 2}).status_code == 200
        assert_clean(engine)


def test_request_timeout_aborts_frees_blocks_and_answers_408(model_path):
    with serving(model_path, request_timeout=0.5, step_delay=0.02) as (url, engine, _):
        slow = {"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}  # 100 steps of 20 ms: 2 s
        start = time.time()
        r = post(url, slow)
        assert r.status_code == 408 and time.time() - start < 1.5
        error = r.json()["error"]
        assert error["code"] == "request_timeout" and "0.5 s (--request-timeout)" in error["message"], error
        events = stream_events(url, slow)
        assert events[-1]["error"]["code"] == "request_timeout"
        assert sum(len(c["text"]) for e in events[:-1] for c in e["choices"]) > 0  # some tokens came first
        assert_clean(engine)
        quick = post(url, {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "temperature": 0})
        assert quick.status_code == 200 and quick.json()["choices"][0]["text"] == offline_text(model_path, 5)
        assert_clean(engine)


def test_api_key_is_compared_in_constant_time(model_path, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with serving(model_path, api_key="sesame-1234") as (url, engine, _):
        body = {"prompt": "hi", "max_tokens": 2}
        for key, status in [("sesame-1234", 200), ("sesame-1235", 401), ("short", 401), (None, 401)]:
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            r = post(url, body, headers=headers)
            assert r.status_code == status, r.text
            if status == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert (b"Bearer sesame-1235", b"Bearer sesame-1234") in compared
        assert len(compared) == 4  # every check went through hmac.compare_digest
        assert_clean(engine)


def test_engine_fault_fails_requests_in_flight_with_500_and_health_503(model_path):
    with serving(model_path, step_delay=0.01) as (url, engine, deaths):
        real_step = engine.engine.step

        def faulty():
            if engine.engine.scheduler.running and engine.engine.scheduler.running[0].num_output_tokens >= 5:
                raise RuntimeError("injected fault")
            return real_step()

        engine.engine.step = faulty
        body = {"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True}
        plain = {}
        thread = threading.Thread(target=lambda: plain.update(r=post(url, body)))
        thread.start()
        events = stream_events(url, body)
        thread.join(30)
        for error in [events[-1]["error"], plain["r"].json()["error"]]:
            assert error["code"] == "engine_dead" and "the engine failed while serving this request" in error["message"]
            assert "RuntimeError: injected fault" in error["message"]
        assert plain["r"].status_code == 500
        assert [str(e) for e in deaths] == ["injected fault"]
        assert httpx.get(url + "/health").status_code == 503
        late = post(url, body)
        assert late.status_code == 503 and "engine loop has stopped" in late.json()["error"]["message"]


FAULT = """import nanovllm.engine.llm_engine as m
step = m.LLMEngine.step
def faulty(self):  # injected by the test: the engine fails once a sequence has 5 tokens
    if self.scheduler.running and self.scheduler.running[0].num_output_tokens >= 5:
        raise RuntimeError("injected fault")
    return step(self)
m.LLMEngine.step = faulty
"""


def stream_until_error(url: str, body: dict, on_first_token=None) -> dict:
    """Streams a completion and returns its error event (it must have one)."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return event["error"]
                if on_first_token:
                    on_first_token()
                    on_first_token = None
    raise AssertionError("the stream ended without an error")


def wait_exit(proc: subprocess.Popen, timeout: float = 30) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_exits_nonzero_when_the_engine_fails(model_path, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAULT)  # imported at start-up by the server process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc, url = start_server([model_path, "--dtype", "float32", "--max-model-len", "128"], env=env)
    try:
        error = stream_until_error(url, {"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True})
        assert error["code"] == "engine_dead" and "injected fault" in error["message"]
    finally:
        assert wait_exit(proc) == 1
    assert "the engine loop has stopped: RuntimeError: injected fault" in proc.stdout.read()


def test_tp_worker_death_fails_requests_and_serve_exits_nonzero(model_path):
    def worker_pids(proc: subprocess.Popen) -> list[int]:
        pids = []  # spawned by the engine's loop thread: children are listed per thread
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        return pids

    args = [model_path, "--dtype", "float32", "--max-model-len", "512", "--tensor-parallel-size", "2"]
    # killed mid-stream: the stream's answer is the 500, and the server exits 1
    proc, url = start_server(args)
    body = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}
    try:
        error = stream_until_error(url, body, lambda: [os.kill(p, signal.SIGKILL) for p in worker_pids(proc)])
        assert error["code"] == "engine_dead" and "worker 1 died" in error["message"], error
    finally:
        assert wait_exit(proc) == 1
    # killed while idle, staying up (--no-exit-on-engine-death): /health notices, new requests are refused
    proc, url = start_server(args + ["--no-exit-on-engine-death"])
    try:
        for pid in worker_pids(proc):
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while httpx.get(url + "/health").status_code == 200:
            assert time.time() < deadline, "/health did not notice the dead worker"
            time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
        r = post(url, body)
        assert r.status_code == 503 and "worker 1 died" in r.json()["error"]["message"]
        assert proc.poll() is None
    finally:
        proc.terminate()
        wait_exit(proc)


def test_short_soak_leaves_nothing_behind(model_path):
    """scripts/soak.py in small: a few hundred requests from 32 clients, streamed, dropped mid-stream, invalid."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "soak", os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "soak.py")
    )
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert (
        soak.main(
            [
                "--model",
                model_path,
                "--requests",
                "240",
                "--clients",
                "32",
                "--max-tokens",
                "6",
                "--max-model-len",
                "128",
            ]
        )
        == 0
    )

"""Streaming on a tiny Llama: LLM.stream, the async engine (a failing request, a dead loop), `nanovllm chat`."""

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import serve_in_thread

from nanovllm import SamplingParams
from nanovllm.engine.async_engine import AsyncEngine, EngineDeadError


def test_stream_deltas_join_to_generate(llm):
    for params in [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["é", "ab"]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=30, n=2),
    ]:
        for prompt in ["héllo wörld ", "日本語"]:
            full = llm.generate(prompt, params, use_tqdm=False)[0]
            texts, ids, reasons = {}, {}, {}
            for delta in llm.stream(prompt, params):
                for c in delta.outputs:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    ids[c.index] = ids.get(c.index, []) + c.token_ids
                    if not params.stop:  # never half a character (random bytes may be invalid ones: \ufffd inside)
                        assert not c.text.endswith("\ufffd")
                    reasons[c.index] = c.finish_reason
            assert texts == {c.index: c.text for c in full.outputs}
            assert ids == {c.index: c.token_ids for c in full.outputs}
            assert reasons == {c.index: c.finish_reason for c in full.outputs}


def test_leaving_a_stream_early_frees_its_blocks(llm):
    for i, _ in enumerate(llm.stream("Hello", SamplingParams(max_tokens=50, ignore_eos=True))):
        if i == 3:
            break
    assert not llm.engine.has_unfinished()
    llm.engine.block_manager.check_all_free()


async def collect(engine: AsyncEngine, prompt, params) -> str:
    out = None
    async for out in engine.generate(engine.make_request(prompt, params)):
        pass
    return out.outputs[0].text


def test_async_engine_batches_clients_and_isolates_a_failing_request(llm, monkeypatch):
    engine = AsyncEngine(llm.engine)
    prompts = [f"client {i} says" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    from nanovllm.engine.request import Request

    real_check = Request.check

    def check(self, seq, token, *args):
        if seq.request_id == "bad" and seq.num_output_tokens == 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "cannot decode this token")
        return real_check(self, seq, token, *args)

    monkeypatch.setattr(Request, "check", check)
    running = []

    async def bad():
        with pytest.raises(RuntimeError, match="request bad failed: UnicodeDecodeError"):
            # (a stop string: each of its tokens is checked, and the patched check fails the fourth)
            async for _ in engine.generate(
                engine.make_request(
                    "the bad one",
                    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["never said"]),
                    "bad",
                )
            ):
                running.append(engine.stats["running"])

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts), bad())

    texts = asyncio.run(main())[:-1]
    assert texts == expected
    assert max(running) > 1  # it shared its batch with the others
    assert not engine.dead


def test_dead_loop_fails_fast_and_health_says_503(llm, monkeypatch):
    from nanovllm.entrypoints.server import build_app

    engine = AsyncEngine(llm.engine)
    app = build_app(engine, "tiny")
    server, thread, url = serve_in_thread(app)
    try:
        assert urllib.request.urlopen(url + "/health").status == 200
        real_run = llm.engine.runner.run

        def broken(*args):
            time.sleep(0.2)
            raise MemoryError("the device ran out of memory")

        monkeypatch.setattr(llm.engine.runner, "run", broken)
        params = SamplingParams(max_tokens=50, ignore_eos=True)

        async def main():
            results = await asyncio.gather(
                *(collect(engine, f"p{i}", params) for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, EngineDeadError) and "out of memory" in str(r) for r in results), results
            start = time.perf_counter()
            with pytest.raises(EngineDeadError):
                await collect(engine, "late", params)
            assert time.perf_counter() - start < 0.1  # refused at once, no hang

        asyncio.run(main())
        assert engine.dead
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health")
        assert e.value.code == 503
        req = urllib.request.Request(
            url + "/v1/completions", data=b'{"prompt": "hi"}', headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 503 and b"engine loop has stopped" in e.value.read()
    finally:
        server.should_exit = True
        thread.join(10)
        monkeypatch.setattr(llm.engine.runner, "run", real_run)
        for rid in list(llm.engine.requests):  # the dead loop left these; the invariant check runs after us
            llm.engine.abort(rid)


def test_chat_cli_streams_replies(model_path, llm):
    turns = ["hello there", "and again"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanovllm.entrypoints.cli",
            "chat",
            "--model",
            model_path,
            "--dtype",
            "float32",
            "--max-tokens",
            "12",
        ],
        input=("\n".join(turns) + "\n").encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    messages, expected = [], []
    for turn in turns:  # the same conversation offline, each reply fed back as the assistant's turn
        messages.append({"role": "user", "content": turn})
        reply = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        expected.append(reply)
    assert proc.stdout.decode() == "".join(r + "\n" for r in expected)


def test_one_cli_lists_engine_knobs_everywhere():
    from nanovllm.entrypoints.cli import build_parser

    parser = build_parser()
    for command in ["generate", "chat", "serve"]:
        sub = parser._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        for knob in ["--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--dtype"]:
            assert knob in text, (command, knob)


@pytest.mark.parametrize("first_is_longer", [True, False])
def test_a_reused_request_id_is_refused_to_its_second_caller_only(model_path, first_is_longer):
    """Two requests made with the same id before either is added: the second add is refused with a ValueError
    naming the id, to its caller alone; the first runs to its own end with its own text, and the loop lives."""
    from nanovllm import LLM

    llm = LLM(model_path, dtype="float32")  # its own: the loop thread keeps the engine after the test
    engine = AsyncEngine(llm.engine)
    long, short = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 4))
    params = (long, short) if first_is_longer else (short, long)
    expected = llm.generate(["the first one"], params[0], use_tqdm=False)[0].outputs[0]

    async def run(request):
        out = None
        async for out in engine.generate(request):
            pass
        return out

    async def main():
        first = engine.make_request("the first one", params[0], "same")
        second = engine.make_request("another prompt", params[1], "same")
        return await asyncio.wait_for(asyncio.gather(run(first), run(second), return_exceptions=True), 60)

    first, second = asyncio.run(main())
    assert isinstance(second, ValueError) and "'same' is already in use" in str(second)
    assert first.finished and first.outputs[0].token_ids == expected.token_ids
    assert first.outputs[0].text == expected.text
    assert not engine.dead


def test_generate_is_refused_while_a_stream_is_open(llm):
    """A stream steps the engine itself: a generate() while it is open would eat its outputs (the stream then
    looped forever on empty steps). It is refused; once the stream ends, generate() runs again."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    stream = llm.stream("a streamed prompt", params)
    first = next(stream)
    with pytest.raises(RuntimeError, match="stream"):
        llm.generate(["another prompt"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    rest = list(stream)
    assert rest[-1].finished and sum(len(d.outputs[0].token_ids) for d in [first, *rest] if d.outputs) == 6
    assert len(llm.generate(["another prompt"], params, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_a_stream_whose_request_is_taken_away_ends(llm):
    """A stream whose request leaves the engine without a final output (aborted from outside) raises instead of
    stepping an empty engine forever."""
    stream = llm.stream("a streamed prompt", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    first = next(stream)
    llm.engine.abort(first.request_id)
    with pytest.raises(RuntimeError, match="taken out of the engine"):
        next(stream)

"""Soak `nanovllm serve`: thousands of requests from many concurrent clients, a share streamed, a share dropped
mid-stream, a share invalid. It passes when every valid request got its full answer (finish_reason "length" and
max_tokens tokens: EOS is ignored), the same greedy answer for the same question every time, every invalid one
its 4xx, and afterwards nothing is left: no request in the engine, every KV block free, and the server's memory
(RSS) flat over the second half.

    python scripts/soak.py                      # the embedded SmolLM2-135M, 3000 requests, 64 clients
    python scripts/soak.py --model DIR --requests 300 --clients 32 --max-tokens 8
    python scripts/soak.py --fuzz-examples 200   # then schemathesis over /openapi.json with that budget

tests/test_server_limits.py runs a short one (a few hundred requests, a tiny random-weight model)."""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx2 as httpx

DROPPED_EXTRA = 32
PROMPTS = [
    "The history of Rome",
    "A recipe for bread:",
    "Once upon a time",
    "The three laws of motion",
    "Dear diary, today",
    "def fibonacci(n):",
    "Les villes de France :",
    "Why is the sky blue?",
    "The best way to learn",
    "In the year 2100,",
    "Ten facts about cats:",
    "A haiku about rain:",
]
BODY_LIMIT = 64 * 1024  # the server's --max-request-body-bytes here: an oversized body costs little to send
INVALID = [  # (path, body, the status it must get)
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 100}, 400),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400),
    ("/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)}, 413),
    ("/v1/completions", {"prompt": [10**9]}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
]


@dataclass
class Report:
    sent: dict = field(default_factory=dict)  # kind -> requests
    failures: list = field(default_factory=list)  # what went wrong, one line each
    answers: dict = field(default_factory=dict)  # (path, prompt, max_tokens) -> the first greedy text
    rss_mib: list = field(default_factory=list)  # (seconds, server RSS) samples
    tokens: int = 0
    done: int = 0
    aborted: int = 0  # sequences the server aborted (dropped streams it saw go before they finished)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def one(
    client: httpx.AsyncClient, kind: str, rng: random.Random, report: Report, chat: bool, max_tokens: int
) -> None:
    if kind == "invalid":
        path, body, status = rng.choice(INVALID)
        r = await client.post(path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
        if r.status_code != status or set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
            report.failures.append(f"invalid {body!r:.60}: {r.status_code} {r.text[:200]}")
        return
    prompt, n = rng.choice(PROMPTS), rng.randint(1, max_tokens)
    path = "/v1/chat/completions" if chat and rng.random() < 0.5 else "/v1/completions"
    body = {
        # a dropped stream asks for DROPPED_EXTRA tokens beyond the n it may read, so that the server is still
        # generating when the client leaves, however fast its steps (a tiny model's 6 tokens can all be sent first)
        "max_tokens": n + (DROPPED_EXTRA if kind == "dropped" else 0),
        "temperature": 0,
        "ignore_eos": True,
        **({"messages": [{"role": "user", "content": prompt}]} if "chat" in path else {"prompt": prompt}),
    }
    if kind == "plain":
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return report.failures.append(f"{path} {r.status_code}: {r.text[:200]}")
        out = r.json()
        choice = out["choices"][0]
        text = choice["message"]["content"] if "chat" in path else choice["text"]
        finish, tokens = choice["finish_reason"], out["usage"]["completion_tokens"]
    else:
        body.update(stream=True, stream_options={"include_usage": True})
        text, finish, tokens, chunks, done = "", None, None, 0, False
        drop_after = rng.randint(1, n) if kind == "dropped" else None
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return report.failures.append(f"{path} stream {r.status_code}: {(await r.aread())[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return report.failures.append(f"{path} stream error: {event['error']}")
                for c in event["choices"]:
                    text += (c.get("delta") or {}).get("content") or c.get("text") or ""
                    finish = c.get("finish_reason") or finish
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                chunks += 1
                if chunks == drop_after:
                    return  # leaving the block closes the connection mid-stream: the server must abort
        if not done:
            return report.failures.append(f"{path} stream ended without [DONE]")
    if finish != "length" or tokens != n:
        return report.failures.append(f"{path} incomplete: finish_reason={finish} tokens={tokens} of {n}")
    report.tokens += n
    first = report.answers.setdefault((path, prompt, n), text)
    if text != first:
        report.failures.append(f"{path} {prompt!r} max_tokens={n}: greedy answer differs from an earlier one")


async def soak(url: str, pid: int, requests: int, clients: int, max_tokens: int, seed: int = 0) -> Report:
    """Sends `requests` requests from `clients` concurrent clients (kinds drawn with fixed shares), sampling the
    server's RSS as it goes, then waits for the server to be idle and checks that nothing is left."""
    rng, report = random.Random(seed), Report()
    chat = (
        httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            timeout=60,
        ).status_code
        == 200
    )
    kinds = rng.choices(["plain", "streamed", "dropped", "invalid"], weights=[40, 30, 15, 15], k=requests)
    for k in kinds:
        report.sent[k] = report.sent.get(k, 0) + 1
    todo = iter(kinds)
    start = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient, rng: random.Random) -> None:
        for kind in todo:
            try:
                await one(client, kind, rng, report, chat, max_tokens)
            except Exception as e:  # a dropped or refused connection: a failure, not the end of the soak
                report.failures.append(f"{kind}: {type(e).__name__}: {e}")
            report.done += 1

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            report.rss_mib.append((time.perf_counter() - start, rss_mib(pid)))
            if len(report.rss_mib) % 30 == 0:
                print(
                    f"  {report.rss_mib[-1][0]:.0f} s: {report.done} of {requests} done, server RSS "
                    f"{report.rss_mib[-1][1]:.0f} MiB, {len(report.failures)} failures",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(1)

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stop))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, random.Random(seed * 1000 + i)) for i in range(clients)))
    stop.set()
    await sampler
    report.sent["seconds"] = round(time.perf_counter() - start, 1)
    deadline = time.time() + 30
    while True:  # the aborts of the last dropped streams may still be on their way
        m = metrics(url)
        left = {
            k: m[f"nanovllm:{k}"]
            for k in ("num_requests_running", "num_requests_waiting", "num_requests_in_engine", "kv_cache_usage_perc")
        }
        if not any(left.values()):
            break
        if time.time() > deadline:
            report.failures.append(f"state left after the soak: {left}")
            break
        await asyncio.sleep(0.2)
    report.aborted = aborted = int(m.get('nanovllm:request_success_total{finished_reason="abort"}', 0))
    if report.sent.get("dropped") and not aborted:
        report.failures.append("no dropped stream was aborted")
    return report


def rss_growth(report: Report) -> tuple[float, float]:
    """(RSS at the middle of the run, MiB grown over the second half: the mean of its last quarter minus that
    of its third, so one sample's noise does not count)."""
    samples = [mib for _, mib in report.rss_mib]
    q, middle = len(samples) // 4, samples[len(samples) // 2]
    if q == 0:  # a run too short for quarters: the last sample against the middle one
        return middle, samples[-1] - middle
    return middle, sum(samples[-q:]) / q - sum(samples[2 * q : 3 * q]) / q


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanovllm.entrypoints.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="of the RSS at the middle (default 5%%)")
    p.add_argument("--fuzz-examples", type=int, default=0, help="then run schemathesis with this many per operation")
    args = p.parse_args(argv)
    server_args = [
        *([args.model] if args.model else []),
        "--dtype",
        "float32",
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.clients),
        "--kv-cache-gib",
        "1",
        "--max-request-body-bytes",
        str(BODY_LIMIT),
    ]
    proc, url = start_server(server_args)
    sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is stopped on the way out
    try:
        report = asyncio.run(soak(url, proc.pid, args.requests, args.clients, args.max_tokens, args.seed))
        middle, growth = rss_growth(report)
        if growth > args.max_rss_growth * middle:
            report.failures.append(f"RSS grew {growth:.1f} MiB over the second half (from {middle:.0f} MiB)")
        seconds = report.sent.pop("seconds")
        print(
            f"{args.requests} requests, {args.clients} clients, {seconds} s: {report.sent}; "
            f"{report.tokens} tokens answered ({report.tokens / seconds:.0f} tokens/s), {report.aborted} "
            f"sequences aborted by the server; server RSS "
            f"{report.rss_mib[0][1]:.0f} MiB at start, {middle:.0f} at the middle, {report.rss_mib[-1][1]:.0f} "
            f"at the end ({growth:+.1f} MiB over the second half); {len(report.failures)} failures"
        )
        for line in report.failures[:20]:
            print("  FAILED:", line)
        if args.fuzz_examples and not report.failures:
            with tempfile.TemporaryDirectory() as cwd:  # schemathesis keeps a cache in its working directory
                fuzz = subprocess.run(
                    [
                        shutil.which("schemathesis") or "schemathesis",
                        "run",
                        url + "/openapi.json",
                        "--max-examples",
                        str(args.fuzz_examples),
                        "--request-timeout",
                        "120",
                        "--checks",
                        "not_a_server_error,status_code_conformance,"
                        "content_type_conformance,response_headers_conformance,"
                        "response_schema_conformance",
                    ],
                    cwd=cwd,
                    text=True,
                    capture_output=True,
                )
            print(fuzz.stdout[-3000:])
            if fuzz.returncode:
                report.failures.append("schemathesis found failures")
        return 1 if report.failures else 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

"""Online serving: N concurrent streaming clients against `nanovllm serve`, like vLLM's serving benchmark.

    python benchmarks/serving.py                          # starts `nanovllm serve` (embedded model) itself
    python benchmarks/serving.py --concurrency 1 8 32 64 --input-len 256 --output-len 128
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model NAME   # an already running server

Each level sends `--prompts-per-client` x N requests of random token ids (ignore_eos, so every request makes
exactly its output length) through the official openai client, N at a time. Per request: TTFT (send to first
token), TPOT ((end - first token) / (tokens - 1)), ITL (the gaps between streamed chunks). Per level: p50/p99 of
each and the output tokens per second of wall time.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

import numpy as np
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanovllm.entrypoints.cli", "serve", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"the server did not start:\n{proc.stderr.read()}")
        time.sleep(0.5)


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    times, tokens = [], 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {
        "ttft": times[0] - start,
        "tpot": (end - times[0]) / max(tokens - 1, 1),
        "itl": np.diff(times).tolist(),
        "tokens": tokens,
        "latency": end - start,
    }


async def run_level(
    url: str, model: str, concurrency: int, prompts: list[list[int]], output_len: int, api_key: str
) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    queue = list(prompts)
    results = []

    async def worker():
        while queue:
            results.append(await one_request(client, model, queue.pop(), output_len))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()

    def pct(xs, q):
        return float(np.percentile(xs, q) * 1000) if len(xs) else float("nan")

    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "req_s": len(results) / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50),
        "tpot_p99_ms": pct(tpot, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start `nanovllm serve` here)")
    p.add_argument("--model", default=None, help="the served model name (default: the server's only model)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY", "none"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompts-per-client", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: arguments for `nanovllm serve`")
    args = p.parse_args()
    extra = [a for a in args.server_args if a != "--"]
    proc, url = (None, args.url) if args.url else start_server(extra)
    try:
        models = json.load(
            urllib.request.urlopen(
                urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"})
            )
        )
        model = args.model or models["data"][0]["id"]
        rng = random.Random(args.seed)
        print(
            f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cpus; model {model}; input {args.input_len} tokens, output {args.output_len} "
            f"(ignore_eos, greedy); command: {' '.join(sys.argv)}"
        )
        print(
            f"{'clients':>7} {'reqs':>5} {'out tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} "
            f"{'ITL p50':>8} {'p99':>8}   (ms)"
        )
        rows = []
        for c in args.concurrency:
            # ids from 1000 up: ordinary tokens, clear of the special ones at the start of the vocabulary
            prompts = [
                [rng.randint(1000, 30000) for _ in range(args.input_len)] for _ in range(c * args.prompts_per_client)
            ]
            r = asyncio.run(run_level(url, model, c, prompts, args.output_len, args.api_key))
            rows.append(r)
            print(
                f"{c:>7} {r['requests']:>5} {r['output_tok_s']:>9.1f} {r['ttft_p50_ms']:>9.0f} "
                f"{r['ttft_p99_ms']:>8.0f} {r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>8.1f} "
                f"{r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}",
                flush=True,
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"argv": sys.argv, "results": rows}, f, indent=1)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

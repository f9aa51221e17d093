"""llama.cpp and nanovllm on the same GGUF file, the same thread count, in one invocation: engines alternate, each
figure is the median of --runs rounds.

    python benchmarks/vs_llamacpp.py --llama-python ~/venvs/llama/bin/python \
        --llama-bin ~/peers/llama.cpp-bin --json /tmp/vs_llamacpp.json
    python benchmarks/vs_llamacpp.py ... --busy 1      # the same with one busy-loop process beside it

What is measured (docs/benchmarks.md, "llama.cpp as a peer", says why each is fair):
  single stream: TTFT and decode tok/s of `--tokens` greedy tokens, EOS ignored, for the chat-template prompt of
      37 tokens and a plain 4-token prompt. llama.cpp: llama-cpp-python's C API in a subprocess of the llama venv
      (a greedy sampler chain with EOS biased to -inf); nanovllm: `LLM.stream` timestamps.
  prompt tok/s: `--prompt-lengths` tokens (default 128 and 512). llama.cpp: `llama-bench -p L -n 0` (or the
      Python API without --llama-bin); nanovllm: one prompt of L tokens, max_tokens=1.
  batched: B prompts of `--batch-prompt` tokens, `--tokens` generated each, B in `--batch-sizes`, with
      llama-batched-bench's definitions: S_PP = B*PP / T_PP, S_TG = B*TG / T_TG, S = B*(PP+TG) / (T_PP + T_TG).
      nanovllm: `LLM.generate` on B prompts; T_PP ends with the step that finishes the last prompt.
The ratio column is nanovllm's speed over llama.cpp's (> 1: nanovllm is faster; for TTFT, llama.cpp's time over
ours).
"""

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

CHAT_MESSAGE = "What is the capital of France?"  # with SmolLM2's chat template (and its default system prompt): 37
PLAIN_TEXT = "Once upon a time"  # 4 tokens, no template
RANDOM_TOKENS = (1000, 40000)  # ids drawn for synthetic prompts: ordinary tokens of SmolLM2's 49152, no specials

# Runs in the llama venv. One process per round: it loads the model (untimed), warms up, then times what the
# round asks. The sampler chain is llama.cpp's own C code: a logit bias of -inf on EOS, then greedy.
LLAMA_SCRIPT = r"""
import ctypes, json, sys, time
import llama_cpp
from llama_cpp._internals import LlamaSampler

args = json.load(open(sys.argv[1]))
llm = llama_cpp.Llama(model_path=args["model"], n_threads=args["threads"], n_threads_batch=args["threads"],
                      n_ctx=args["n_ctx"], n_batch=args["n_batch"], n_ubatch=args["n_batch"],
                      flash_attn=args["flash_attn"], verbose=False)
ctx = llm.ctx
memory = llama_cpp.llama_get_memory(ctx)
eos = llm.token_eos()

def decode(ids):
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")

def single(prompt, n):
    llama_cpp.llama_memory_clear(memory, True)
    sampler = LlamaSampler()
    sampler.add_logit_bias(llm.n_vocab(), {eos: float("-inf")})
    sampler.add_greedy()
    start = time.perf_counter()
    decode(prompt)
    token = sampler.sample(llm._ctx, -1)
    sampler.accept(token)
    first = time.perf_counter()
    tokens = [token]
    for _ in range(n - 1):
        decode([token])
        token = sampler.sample(llm._ctx, -1)
        sampler.accept(token)
        tokens.append(token)
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_s": end - first, "tokens": tokens}

def prompt_rate(ids):
    llama_cpp.llama_memory_clear(memory, True)
    start = time.perf_counter()
    decode(ids)
    llama_cpp.llama_synchronize(ctx)
    return time.perf_counter() - start

single(args["warmup"], 4)
result = {"single": [single(p, args["tokens"]) for p in args["single"]],
          "prompt_s": [prompt_rate(p) for p in args["prompts"]],
          "version": getattr(llama_cpp, "__version__", "?")}
print("RESULT " + json.dumps(result))
"""


@dataclass
class Rounds:
    """Each measure's value per round, for both engines: {measure: {engine: [value per round]}}."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, measure: str, engine: str, value: float) -> None:
        self.values.setdefault(measure, {}).setdefault(engine, []).append(value)

    def median(self, measure: str, engine: str) -> float | None:
        runs = self.values.get(measure, {}).get(engine)
        return statistics.median(runs) if runs else None


@dataclass(frozen=True)
class Measure:
    """One row of the table: its key in Rounds, its label, its unit, and whether lower is better (times)."""

    key: str
    label: str
    unit: str
    lower_is_better: bool = False


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(*RANDOM_TOKENS) for _ in range(length)]


def run_llama_python(
    python: str,
    model: str,
    threads: int,
    single: list[list[int]],
    prompts: list[list[int]],
    tokens: int,
    flash_attn: str,
) -> dict:
    """One round of llama-cpp-python in its venv: single-stream runs of `single`, then prompt evaluations."""
    longest = max(len(p) for p in single + prompts) + tokens
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {
                "model": model,
                "threads": threads,
                "n_ctx": longest + 16,
                "n_batch": max(512, max((len(p) for p in prompts), default=0)),
                "single": single,
                "prompts": prompts,
                "tokens": tokens,
                "warmup": single[0][:8],
                "flash_attn": flash_attn == "on",
            },
            f,
        )
    proc = subprocess.run([python, "-c", LLAMA_SCRIPT, f.name], capture_output=True, text=True)
    os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"llama-cpp-python failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def tool_env(bin_dir: str) -> dict[str, str]:
    """The tools' shared libraries (libllama, libggml*) sit beside them: found there whatever their RUNPATH says."""
    paths = [bin_dir] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}


def run_llama_bench(bin_dir: str, model: str, threads: int, lengths: list[int], flash_attn: str) -> dict[int, float]:
    """{prompt length: tok/s} from one llama-bench run (one repetition after its own warm-up)."""
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-n", "0", "-r", "1", "-o", "json"]
    cmd += ["-p", ",".join(map(str, lengths)), "-fa", flash_attn]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(bin_dir))
    if proc.returncode != 0:
        sys.exit(f"llama-bench failed (rc {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return {r["n_prompt"]: r["avg_ts"] for r in json.loads(proc.stdout) if r["n_gen"] == 0}


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """llama-batched-bench's markdown table, {B: {column: value}}; its header names the columns
    (PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s)."""
    rows, header = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_PP t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[0].isdigit():
            row = dict(zip(header, map(float, cells)))
            rows[int(row["B"])] = row
    return rows


def run_batched_bench(
    bin_dir: str, model: str, threads: int, prompt: int, tokens: int, batches: list[int], flash_attn: str
) -> dict:
    # every sequence needs prompt + tokens cells; the context is split evenly among max(B) sequences, and a row
    # that does not fit is skipped silently by the tool, hence the check below
    n_ctx = max(batches) * (prompt + tokens)
    cmd = [os.path.join(bin_dir, "llama-batched-bench"), "-m", model, "-t", str(threads), "-tb", str(threads)]
    cmd += ["-c", str(n_ctx), "-npp", str(prompt), "-ntg", str(tokens), "-npl", ",".join(map(str, batches))]
    cmd += ["-fa", flash_attn]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(bin_dir))
    rows = parse_batched_bench(proc.stdout + proc.stderr)  # the table goes to the log, stderr or stdout by version
    if proc.returncode != 0 or set(rows) != set(batches):
        sys.exit(
            f"llama-batched-bench failed (rc {proc.returncode}, rows for B={sorted(rows)}, asked {batches}): "
            f"{shlex.join(cmd)}\n{proc.stderr[-3000:]}"
        )
    return rows


class Ours:
    """nanovllm's LLM, loaded once for the whole invocation, and the three measures on it."""

    def __init__(self, model: str, args: argparse.Namespace, longest: int):
        from nanovllm import LLM

        kwargs = {
            "dtype": args.dtype,
            "num_threads": args.threads,
            "max_num_seqs": max(args.batch_sizes),
            "max_model_len": longest,
            "kv_cache_gib": args.kv_cache_gib,  # the pool is capped at max_num_seqs x max_model_len tokens anyway
            # the same prompt is run every round: a cached prefix would skip its prefill
            "enable_prefix_caching": False,
        }
        if args.quantization:  # only when asked: the engine's argument may not exist in every version
            kwargs["quantization"] = args.quantization
        self.llm = LLM(model, **kwargs)
        self.kv_check(max(args.batch_sizes) * (args.batch_prompt + args.tokens))
        self.warm_up()

    def kv_check(self, tokens: int) -> None:
        """The largest batch must fit in the KV pool at once, or the engine would preempt and the figure lie."""
        manager = self.llm.engine.block_manager
        capacity = manager.num_blocks * manager.block_size
        if capacity < tokens:
            sys.exit(
                f"nanovllm's KV pool holds {capacity} tokens, the largest batch needs {tokens}: raise --kv-cache-gib"
            )

    def warm_up(self) -> None:
        from nanovllm import SamplingParams

        self.llm.generate([[1000, 1001, 1002]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)

    def single(self, prompt: list[int], tokens: int) -> dict:
        from nanovllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        out, stamps = [], []
        start = time.perf_counter()
        for delta in self.llm.stream({"prompt_token_ids": prompt}, params):
            new = delta.outputs[0].token_ids
            if new:
                stamps.append(time.perf_counter())
                out += new
        return {"ttft_s": stamps[0] - start, "decode_s": stamps[-1] - stamps[0], "tokens": out}

    def prompt_seconds(self, prompt: list[int]) -> float:
        from nanovllm import SamplingParams

        start = time.perf_counter()
        self.llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    def batched(self, prompts: list[list[int]], tokens: int) -> dict[str, float]:
        """llama-batched-bench's T_PP, S_PP, T_TG, S_TG, T, S for `prompts`, each generating `tokens` tokens.
        Steps are timed from the engine's side: T_PP ends with the last step that prefilled prompt tokens; the
        tokens sampled by then (one per finished prompt, and any decodes mixed into those steps) are not
        counted in S_TG, whose time is what remains."""
        from nanovllm import SamplingParams

        engine = self.llm.engine
        step, steps = engine.step, []

        def timed_step():
            out = step()
            steps.append((time.perf_counter(), *engine.last_step))
            return out

        engine.step = timed_step
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        try:
            start = time.perf_counter()
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            end = time.perf_counter()
        finally:
            engine.step = step
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        last_prefill = max(i for i, (_, prefill, _) in enumerate(steps) if prefill > 0)
        t_pp = steps[last_prefill][0] - start
        sampled_in_pp = len(prompts) + sum(decode for _, _, decode in steps[: last_prefill + 1])
        prompt_tokens = sum(map(len, prompts))
        return {
            "T_PP s": t_pp,
            "S_PP t/s": prompt_tokens / t_pp,
            "T_TG s": end - start - t_pp,
            "S_TG t/s": (generated - sampled_in_pp) / (end - start - t_pp),
            "T s": end - start,
            "S t/s": (prompt_tokens + generated) / (end - start),
        }


def lscpu_lines() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ["lscpu: not available"]
    return [line for line in out.splitlines() if line.startswith(("Model name:", "Flags:"))]


def start_busy(n: int) -> list[subprocess.Popen]:
    """n processes that spin a core each, for the whole run: how each engine copes with a neighbour."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=".gguf file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--llama-python", required=True, metavar="PATH", help="python of the venv with llama-cpp-python")
    ap.add_argument(
        "--llama-bin",
        metavar="DIR",
        help="folder of llama-bench and llama-batched-bench (without it: prompt tok/s through llama-cpp-python, "
        "no batched rows)",
    )
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines")
    ap.add_argument(
        "--flash-attn",
        choices=["on", "off"],
        default="on",
        help="llama.cpp's flash attention, the same for its Python API and its tools (the tools' default, auto, "
        "turns it on for a CPU; llama-cpp-python's default is off)",
    )
    ap.add_argument("--busy", type=int, default=0, metavar="N", help="run N busy-loop processes for the whole run")
    ap.add_argument("--runs", type=int, default=3, help="rounds; each figure is the median")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="ours")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="ours: the KV pool's size")
    ap.add_argument("--quantization", help="ours, passed to LLM(...) only when given")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated (single stream and batched)")
    ap.add_argument("--prompt-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    ap.add_argument("--batch-prompt", type=int, default=128, help="prompt tokens of each batched sequence")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be >= 2: decode tok/s needs tokens after the first")

    from nanovllm.loader import default_model_path

    model = os.path.abspath(args.model) if args.model else default_model_path()
    command = "python " + shlex.join(sys.argv)
    load_before = os.getloadavg()
    busy = start_busy(args.busy)
    try:
        rounds, samples = measure(model, args)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    load_after = os.getloadavg()
    report(model, args, command, load_before, load_after, rounds, samples)


def measure(model: str, args: argparse.Namespace) -> tuple[Rounds, dict]:
    longest = max(37, max(args.prompt_lengths), args.batch_prompt) + args.tokens + 16
    ours = Ours(model, args, longest)
    chat = ours.llm.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}])
    plain = ours.llm.tokenizer.encode(PLAIN_TEXT, add_special_tokens=False)
    singles = {"chat": chat, "plain": plain}
    rounds, samples = Rounds(), {"chat_tokens": len(chat), "plain_tokens": len(plain), "tokens": {}}
    rng = random.Random(0)
    for r in range(args.runs):
        # a fresh prompt each round for the synthetic measures; the order of the engines alternates by round
        prompts = {n: random_prompt(rng, n) for n in args.prompt_lengths}
        batch = {b: [random_prompt(rng, args.batch_prompt) for _ in range(b)] for b in args.batch_sizes}
        engines = ["llama.cpp", "nanovllm"] if r % 2 == 0 else ["nanovllm", "llama.cpp"]
        for engine in engines:
            print(f"round {r + 1}/{args.runs}: {engine}", file=sys.stderr, flush=True)
            if engine == "llama.cpp":
                measure_llama(model, args, singles, prompts, rounds, samples)
            else:
                measure_ours(ours, args, singles, prompts, batch, rounds, samples)
    return rounds, samples


def measure_llama(model: str, args, singles: dict, prompts: dict, rounds: Rounds, samples: dict) -> None:
    via_python = [] if args.llama_bin else list(prompts.values())
    r = run_llama_python(
        args.llama_python, model, args.threads, list(singles.values()), via_python, args.tokens, args.flash_attn
    )
    samples["llama_cpp_python"] = r["version"]
    for name, s in zip(singles, r["single"]):
        rounds.add(f"{name} ttft", "llama.cpp", s["ttft_s"])
        rounds.add(f"{name} decode", "llama.cpp", (args.tokens - 1) / s["decode_s"])
        samples["tokens"].setdefault(name, {})["llama.cpp"] = s["tokens"]
    if args.llama_bin:
        for n, rate in run_llama_bench(args.llama_bin, model, args.threads, list(prompts), args.flash_attn).items():
            rounds.add(f"prompt {n}", "llama.cpp", rate)
        rows = run_batched_bench(
            args.llama_bin, model, args.threads, args.batch_prompt, args.tokens, args.batch_sizes, args.flash_attn
        )
        for b, row in rows.items():
            for col in ["S_PP t/s", "S_TG t/s", "S t/s"]:
                rounds.add(f"batched {b} {col}", "llama.cpp", row[col])
    else:
        for n, seconds in zip(prompts, r["prompt_s"]):
            rounds.add(f"prompt {n}", "llama.cpp", n / seconds)


def measure_ours(ours: Ours, args, singles: dict, prompts: dict, batch: dict, rounds: Rounds, samples: dict) -> None:
    for name, prompt in singles.items():
        s = ours.single(prompt, args.tokens)
        rounds.add(f"{name} ttft", "nanovllm", s["ttft_s"])
        rounds.add(f"{name} decode", "nanovllm", (len(s["tokens"]) - 1) / s["decode_s"])
        samples["tokens"].setdefault(name, {})["nanovllm"] = s["tokens"]
    for n, prompt in prompts.items():
        rounds.add(f"prompt {n}", "nanovllm", n / ours.prompt_seconds(prompt))
    if args.llama_bin:  # without llama.cpp's batched rows there is nothing to compare ours with
        for b, prompts_b in batch.items():
            row = ours.batched(prompts_b, args.tokens)
            for col in ["S_PP t/s", "S_TG t/s", "S t/s"]:
                rounds.add(f"batched {b} {col}", "nanovllm", row[col])


def measures(args: argparse.Namespace, samples: dict) -> list[Measure]:
    rows = [
        Measure("chat ttft", f"TTFT, chat prompt ({samples['chat_tokens']} tokens)", "ms", lower_is_better=True),
        Measure("chat decode", f"decode, chat prompt, {args.tokens} tokens", "tok/s"),
        Measure("plain ttft", f"TTFT, plain prompt ({samples['plain_tokens']} tokens)", "ms", lower_is_better=True),
        Measure("plain decode", f"decode, plain prompt, {args.tokens} tokens", "tok/s"),
    ]
    rows += [Measure(f"prompt {n}", f"prompt, {n} tokens", "tok/s") for n in args.prompt_lengths]
    for b in args.batch_sizes:
        for col, name in [("S_PP t/s", "S_PP"), ("S_TG t/s", "S_TG"), ("S t/s", "S")]:
            label = f"batched B={b}, {args.batch_prompt}+{args.tokens}: {name}"
            rows.append(Measure(f"batched {b} {col}", label, "tok/s"))
    return rows


def report(model: str, args, command: str, load_before, load_after, rounds: Rounds, samples: dict) -> None:
    print(f"command: {command}")
    print(f"date:    {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    for line in lscpu_lines():
        print(line)
    print(f"model:   {model}")
    print(f"threads: {args.threads} each; dtype (nanovllm): {args.dtype}; runs: {args.runs} (medians)")
    print(f"llama.cpp flash attention: {args.flash_attn}")
    print(f"llama-cpp-python: {samples.get('llama_cpp_python', '?')}")
    if args.busy:
        print(f"busy:    {args.busy} busy-loop process(es) ran beside the engines for the whole run")
    print(
        f"load:    before {' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}"
    )
    print()
    print("| measure | llama.cpp | nanovllm | ratio |")
    print("| --- | ---: | ---: | ---: |")
    table = []
    for m in measures(args, samples):
        theirs, ours = rounds.median(m.key, "llama.cpp"), rounds.median(m.key, "nanovllm")
        if theirs is None or ours is None:
            continue
        scale = 1000 if m.unit == "ms" else 1
        ratio = theirs / ours if m.lower_is_better else ours / theirs
        print(f"| {m.label}, {m.unit} | {theirs * scale:.1f} | {ours * scale:.1f} | {ratio:.2f}x |")
        table.append(
            {"measure": m.key, "label": m.label, "unit": m.unit, "llama.cpp": theirs, "nanovllm": ours, "ratio": ratio}
        )
    print("\nratio: nanovllm's speed over llama.cpp's (> 1: nanovllm faster; TTFT: llama.cpp's time over ours)")
    for name, toks in samples["tokens"].items():
        if len(toks) == 2:
            same = common_prefix(toks["llama.cpp"], toks["nanovllm"])
            print(f"{name} prompt: the greedy outputs agree on their first {same} of {args.tokens} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": command,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "lscpu": lscpu_lines(),
                    "model": model,
                    "threads": args.threads,
                    "busy": args.busy,
                    "load_before": load_before,
                    "load_after": load_after,
                    "table": table,
                    "runs": rounds.values,
                    "samples": samples,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()

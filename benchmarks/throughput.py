"""Offline throughput: nano-vLLM's bench workload on our engine and on HF transformers, in one invocation.

    python benchmarks/throughput.py --preset cpu          # SmolLM2-135M (embedded GGUF), 64 prompts
    python benchmarks/throughput.py --preset nano-vllm    # Qwen3-0.6B shape, random weights, 256 prompts
    python benchmarks/throughput.py --preset cpu-tp --tensor-parallel-size 1 2 --skip-hf
                                                          # SmolLM2-135M shape with 8 heads (TP=2 splits
                                                          # them), random weights: tensor-parallel overhead
    python benchmarks/throughput.py --preset moe          # Qwen3-MoE shape scaled down (128 experts, top 8),
                                                          # random weights, 16 prompts
    python benchmarks/throughput.py --preset cpu --vllm-python PATH --repeat 3
                                                          # vLLM-CPU as a peer; medians of 3 runs each

The method is in docs/design.md, "How we measure". The output is meant to be pasted into docs/benchmarks.md.
"""

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from random import randint, seed

import torch

PRESETS = {  # (num_prompts, input_len, output_len)
    "cpu": (64, 512, 256),
    "cpu-tp": (64, 512, 256),
    "nano-vllm": (256, 1024, 1024),
    "moe": (16, 256, 128),
}
TEMPERATURE = 0.6


def make_workload(n: int, input_len: int, output_len: int) -> tuple[list[list[int]], list[int]]:
    """nano-vLLM's bench.py, call for call (same seed, same randint order), so the workloads match."""
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, input_len))] for _ in range(n)]
    max_tokens = [randint(100, output_len) for _ in range(n)]
    return prompts, max_tokens


def random_model(folder: str, preset: str) -> str:
    """A model with random weights, plus a placeholder tokenizer: nothing is downloaded. nano-vllm: Qwen3-0.6B's
    architecture; cpu-tp: SmolLM2-135M's sizes but 8 heads / 4 KV heads (its 9 / 3 do not split in two)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

    if preset == "moe":  # Qwen3-30B-A3B's routing (128 experts, top 8, normalized) at a quarter of its width
        config = Qwen3MoeConfig(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            moe_intermediate_size=192,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=32768,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=1000000,
        )
    elif preset == "nano-vllm":
        config = Qwen3Config(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            rope_theta=1000000,
        )
    else:
        config = LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            rope_theta=100000,
        )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    # the engine detokenizes what it generates, so every one of the 151936 ids needs a token
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)
    return folder


def matmul_roof(dtype: torch.dtype, device: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of one model-shaped matmul (tokens x hidden @ hidden x intermediate), repeated for ~`seconds`."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: thread pool, kernels, caches
        torch.matmul(a, b)
    iters, start = 0, time.perf_counter()
    sync()
    while time.perf_counter() - start < seconds:
        for _ in range(10):  # batches of 10 keep the clock and sync out of the measurement
            torch.matmul(a, b)
        iters += 10
        sync()
    return 2 * m * n * k * iters / (time.perf_counter() - start) / 1e9


def run_engine(
    model: str | None, dtype: str, max_model_len: int, prompts: list[list[int]], max_tokens: list[int], tp: int
) -> tuple[int, float, int, list[tuple[float, int, int, int]], float]:
    """(output tokens, seconds, engine steps, decode-only steps as (seconds, sequences, context tokens, bytes of the
    experts the step's tokens selected on rank 0), start-up seconds) for our engine; only generate() is timed."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.layers.moe import FusedMoE

    start = time.perf_counter()
    with LLM(model, dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tp) as llm:
        startup = time.perf_counter() - start
        reads = []  # per MoE layer of this step: the bytes of the experts its tokens selected
        for m in llm.engine.runner.model.modules():
            if isinstance(m, FusedMoE):
                m.register_forward_hook(
                    lambda m, args, out: reads.append(
                        args[2].unique().numel() * (m.w13_weight[0].nbytes + m.w2_weight[0].nbytes)
                    )
                )
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        params = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
        steps, step, decodes, sched = [0], llm.engine.step, [], llm.engine.scheduler

        def counted_step():
            steps[0] += 1
            decode_only = not sched.waiting and all(s.num_computed == s.num_tokens - 1 for s in sched.running)
            context = sum(s.num_tokens for s in sched.running)
            reads.clear()
            t = time.perf_counter()
            out = step()  # returns after sampling, which waits for the device
            if decode_only and llm.engine.last_step[0] == 0:
                decodes.append((time.perf_counter() - t, len(sched.running), context, sum(reads)))
            return out

        llm.engine.step = counted_step
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds, steps[0], decodes, startup


def copy_bandwidth(device: str, mib: int = 512) -> float:
    """GB/s of a large device-to-device copy (bytes read + written): what a decode step's reads can reach."""
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    y.copy_(x)
    sync()
    start, n = time.perf_counter(), 10
    for _ in range(n):
        y.copy_(x)
    sync()
    return 2 * x.numel() * n / (time.perf_counter() - start) / 1e9


def count_parameters(model: str) -> tuple[int, int]:
    """The whole model's parameters (tied weights once), whatever the tensor-parallel split, and how many of them
    are mixture-of-experts experts."""
    from nanovllm.loader import load_hf_config
    from nanovllm.models.llama import MODELS

    cfg = load_hf_config(model)
    with torch.device("meta"):
        params = dict(MODELS[cfg.architectures[0]](cfg, 16).named_parameters())
    return sum(p.numel() for p in params.values()), sum(p.numel() for n, p in params.items() if ".experts." in n)


def load_hf(model: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    if model.endswith(".gguf"):  # transformers dequantizes the GGUF to `dtype`
        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model), gguf_file=os.path.basename(model), dtype=dtype
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    cfg = hf.generation_config
    # the workload is ignore_eos, pure temperature sampling: drop EOS and HF's default top_k=50
    cfg.eos_token_id, cfg.pad_token_id = None, 0
    cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p = True, TEMPERATURE, 0, 1.0
    return hf.to(device).eval()


@torch.inference_mode()
def hf_generate(hf, batch: list[list[int]], max_new_tokens: int, device: str) -> None:
    width = max(len(p) for p in batch)  # left padding: every row's last prompt token sits in the same column
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens)


def run_hf(
    model: str, dtype: torch.dtype, device: str, prompts: list[list[int]], max_tokens: list[int], batch_size: int
) -> tuple[int, float]:
    """(useful output tokens, seconds). Batches of similar length waste less on padding; each batch runs to its
    longest max_tokens, but only each prompt's own max_tokens count, since that is what the workload asks for."""
    hf = load_hf(model, dtype, device)
    hf_generate(hf, [[1, 2, 3]], 4, device)  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    torch.manual_seed(0)
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        hf_generate(hf, [prompts[i] for i in idx], max(max_tokens[i] for i in idx), device)
    if device == "cuda":
        torch.cuda.synchronize()
    return sum(max_tokens), time.perf_counter() - start


VLLM_SCRIPT = r"""
import json, sys, time
args = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams
start = time.perf_counter()
llm = LLM(model=args["model"], dtype=args["dtype"], max_model_len=args["max_model_len"], seed=0)
startup = time.perf_counter() - start
llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
params = [SamplingParams(temperature=args["temperature"], ignore_eos=True, max_tokens=m) for m in args["max_tokens"]]
runs = []
for _ in range(args["repeat"]):
    llm.reset_prefix_cache()  # each run prefills its prompts again, as a fresh engine would
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params, use_tqdm=False)
    runs.append(time.perf_counter() - start)
print("RESULT " + json.dumps({"output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                              "runs": runs, "startup": startup}))
"""


def hf_folder(model: str, folder: str) -> str:
    """vLLM reads HF folders: a GGUF is dequantized by transformers and saved as safetensors once."""
    if not model.endswith(".gguf"):
        return model
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model), gguf_file=os.path.basename(model), dtype=torch.float32
        )
        hf.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(folder)
        from nanovllm.loader import gguf_converted

        AutoTokenizer.from_pretrained(gguf_converted(model)).save_pretrained(folder)
    return folder


def run_vllm(
    python: str,
    model: str,
    dtype: str,
    max_model_len: int,
    prompts: list[list[int]],
    max_tokens: list[int],
    repeat: int,
) -> tuple[int, list[float], float]:
    """(output tokens, seconds of each run, start-up seconds) of vLLM's offline LLM, run by `python` (its own
    venv): one engine, `repeat` timed runs with its prefix cache reset before each."""
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {
                "model": model,
                "dtype": dtype,
                "max_model_len": max_model_len,
                "prompts": prompts,
                "max_tokens": max_tokens,
                "temperature": TEMPERATURE,
                "repeat": repeat,
            },
            f,
        )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    proc = subprocess.run([python, "-c", VLLM_SCRIPT, f.name], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"vLLM failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line[7:])
    return r["output_tokens"], r["runs"], r["startup"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        name += f", GPU {torch.cuda.get_device_name()}"
    return f"{name} ({os.cpu_count()} CPUs), torch threads {torch.get_num_threads()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="HF folder or .gguf file (default: the preset's model)")
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--input-len", type=int, help="longest prompt, >= 100")
    ap.add_argument("--output-len", type=int, help="largest max_tokens, >= 100")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--vllm-python",
        metavar="PATH",
        help="run vLLM as a peer with this interpreter (its own venv; see docs/benchmarks.md)",
    )
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        nargs="+",
        default=[1],
        metavar="TP",
        help="run our engine once per size given (e.g. 1 2)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="time our engine and vLLM N times each (ours: a fresh engine per run; vLLM: one engine, its "
        "prefix cache reset before each run) and compare medians: a shared host's speed drifts",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args()
    n, lin, lout = PRESETS[args.preset]
    n, lin, lout = args.num_prompts or n, args.input_len or lin, args.output_len or lout
    if lin < 100 or lout < 100:
        ap.error("--input-len and --output-len must be >= 100 (lengths are drawn from [100, L])")

    from nanovllm.config import EngineConfig
    from nanovllm.loader import default_model_path

    probe = EngineConfig(dtype=args.dtype)  # "auto" resolves exactly as the engine will resolve it
    dtype, device = probe.torch_dtype(), probe.resolved_device()
    dtype_name = str(dtype).removeprefix("torch.")

    tmp = tempfile.TemporaryDirectory(prefix="nanovllm-bench-")
    if args.model:
        model = os.path.abspath(args.model)
    else:
        model = default_model_path() if args.preset == "cpu" else random_model(tmp.name, args.preset)
    label = (
        model
        if args.model or args.preset == "cpu"
        else {
            "moe": "Qwen3-MoE shape: hidden 512, 8 layers, 8 heads / 4 KV heads of 64, 128 experts of 192, top 8, "
            "vocab 32768, random weights",
            "nano-vllm": "Qwen3-0.6B shape, random weights",
            "cpu-tp": "SmolLM2-135M shape with 8 heads / 4 KV heads, random weights",
        }[args.preset]
    )
    prompts, max_tokens = make_workload(n, lin, lout)
    prompt_tokens = sum(map(len, prompts))

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {command}")
    print(f"date:    {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, dtype {dtype_name}, device {device}")
    print(f"model:   {label}")
    print(
        f"workload: {n} prompts, {prompt_tokens} prompt tokens (100-{lin} each), {sum(max_tokens)} output tokens "
        f"(100-{lout} each), ignore_eos, temperature {TEMPERATURE}, seed 0"
    )

    from transformers import AutoConfig

    cfg_dir, gguf = (os.path.dirname(model), os.path.basename(model)) if model.endswith(".gguf") else (model, None)
    hf_cfg = AutoConfig.from_pretrained(cfg_dir, gguf_file=gguf)
    # roof shape: a prefill-sized token block through the MLP's up projection, the model's typical big matmul
    m, k, n_ = 256 if device == "cpu" else 4096, hf_cfg.hidden_size, hf_cfg.intermediate_size  # GPUs need more rows
    roof = matmul_roof(dtype, device, m, k, n_)
    print(f"roof:    {roof:.1f} GFLOP/s (matmul {m}x{k} @ {k}x{n_}, {dtype_name})\n")

    results, (n_params, n_experts) = [], count_parameters(model)
    # a token computes with its top-k experts only
    experts = getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "num_local_experts", None)
    n_active = n_params - n_experts + (n_experts * hf_cfg.num_experts_per_tok // experts if experts else 0)
    bandwidth = copy_bandwidth(device)
    kv_bytes_per_token = (
        2
        * hf_cfg.num_hidden_layers
        * (getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads)
        * (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
        * dtype.itemsize
    )
    print(f"copy:    {bandwidth:.1f} GB/s (device-to-device copy, read + write)")
    for tp in args.tensor_parallel_size:
        runs, decodes = [], []
        for _ in range(args.repeat):
            out_tokens, seconds, steps, run_decodes, startup = run_engine(
                model, args.dtype, lin + lout, prompts, max_tokens, tp
            )
            runs.append(seconds)
            decodes += run_decodes
            gc.collect()
        seconds = statistics.median(runs)
        if out_tokens != sum(max_tokens):
            print(f"warning: the engine returned {out_tokens} tokens, the workload asks for {sum(max_tokens)}")
        r = {
            "engine": "nanovllm" + (f" TP={tp}" if len(args.tensor_parallel_size) > 1 or tp > 1 else ""),
            "output_tokens": out_tokens,
            "seconds": seconds,
            "runs": runs,
            "steps": steps,
            "startup_s": startup,
        }
        if decodes:
            # the floor of a decode step: every weight (of a MoE layer's experts, those the step's tokens selected)
            # and every cached K/V byte read once, at copy bandwidth
            t, seqs, ctx, experts = (sum(x) / len(decodes) for x in zip(*decodes))
            floor = ((n_params - n_experts) * dtype.itemsize + experts + ctx * kv_bytes_per_token) / (bandwidth * 1e9)
            r.update(decode_steps=len(decodes), decode_step_ms=t * 1000, decode_seqs=seqs, decode_floor_ms=floor * 1000)
            if n_experts:
                r["decode_expert_share"] = experts / (n_experts * dtype.itemsize)
        results.append(r)
        print(f"{r['engine']}: {out_tokens} tokens in {seconds:.1f} s = {out_tokens / seconds:.1f} tok/s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    if args.vllm_python:
        folder = hf_folder(model, os.path.join(tmp.name, "hf-export"))
        out_tokens, runs, startup = run_vllm(
            args.vllm_python, folder, dtype_name, lin + lout, prompts, max_tokens, args.repeat
        )
        results.append(
            {
                "engine": "vLLM-CPU",
                "output_tokens": out_tokens,
                "seconds": statistics.median(runs),
                "runs": runs,
                "startup_s": startup,
            }
        )
    if not args.skip_hf:
        out_tokens, seconds = run_hf(model, dtype, device, prompts, max_tokens, args.hf_batch_size)
        results.append(
            {"engine": f"HF transformers (batch {args.hf_batch_size})", "output_tokens": out_tokens, "seconds": seconds}
        )

    for r in results:
        r["tok_per_s"] = r["output_tokens"] / r["seconds"]
    hf_tps = results[-1]["tok_per_s"] if not args.skip_hf else None
    vllm_tps = next((r["tok_per_s"] for r in results if r["engine"] == "vLLM-CPU"), None)
    print(
        f"{'engine':<28} {'out tokens':>10} {'wall s':>9} {'out tok/s':>10} {'vs HF':>7} {'vs vLLM':>8} "
        f"{'MFU':>7} {'ms/step':>8}"
    )
    for r in results:
        r["vs_vllm"] = r["tok_per_s"] / vllm_tps if vllm_tps else None
        # MFU counts the useful tokens only: prompts once, plus the outputs the workload asked for
        r["mfu"] = 2 * n_active * (prompt_tokens + r["output_tokens"]) / r["seconds"] / (roof * 1e9)
        r["vs_hf"] = r["tok_per_s"] / hf_tps if hf_tps else None
        ratio = f"{r['vs_hf']:.2f}x" if hf_tps else "-"
        per_step = f"{r['seconds'] / r['steps'] * 1000:.1f}" if "steps" in r else "-"
        vs_vllm = f"{r['vs_vllm']:.2f}x" if vllm_tps else "-"
        print(
            f"{r['engine']:<28} {r['output_tokens']:>10} {r['seconds']:>9.1f} {r['tok_per_s']:>10.1f} "
            f"{ratio:>7} {vs_vllm:>8} {r['mfu']:>7.1%} {per_step:>8}"
        )
    print(
        f"\n({n_params / 1e6:.1f}M parameters, {n_active / 1e6:.1f}M active per token; MFU = 2 x active parameters "
        "x (prompt + output tokens) / time / roof)"
    )
    for r in results:
        if len(r.get("runs", [])) > 1:
            print(f"{r['engine']}: runs " + ", ".join(f"{x:.1f} s" for x in r["runs"]) + " (the table: the median)")
        if "startup_s" in r:
            print(f"{r['engine']}: LLM(...) start-up {r['startup_s']:.1f} s")
        if "decode_steps" in r:
            print(
                f"{r['engine']}: {r['decode_steps']} decode-only steps, mean {r['decode_step_ms']:.1f} ms at "
                f"{r['decode_seqs']:.0f} sequences; floor (weights + KV read once at copy bandwidth) "
                f"{r['decode_floor_ms']:.1f} ms = {r['decode_floor_ms'] / r['decode_step_ms']:.0%} of the step"
                + (
                    f" (the selected experts: {r['decode_expert_share']:.0%} of the experts' bytes)"
                    if "decode_expert_share" in r
                    else ""
                )
            )

    if args.json:
        report = {
            "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "torch": torch.__version__,
            "dtype": dtype_name,
            "device": device,
            "model": label,
            "preset": args.preset,
            "num_prompts": n,
            "input_len": lin,
            "output_len": lout,
            "prompt_tokens": prompt_tokens,
            "n_params": n_params,
            "roof_gflops": roof,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: preset cpu's first prompts prefilled, then decode steps timed and profiled.

    python benchmarks/profile_step.py                 # 44 sequences, the embedded model, dtype auto
    python benchmarks/profile_step.py --seqs 64 --ops 30 --prefill

--prefill profiles the prefill steps of the preset's remaining prompts instead (2048-token steps).
"""

import argparse
import time

import torch
from throughput import TEMPERATURE, make_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=44)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ops", type=int, default=20, help="rows of the profiler's table")
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args()
    from nanovllm import LLM, SamplingParams

    prompts, _ = make_workload(64, 512, 256)
    llm = LLM(args.model, max_model_len=1024)
    engine = llm.engine
    params = SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=200)
    for i, p in enumerate(prompts[: args.seqs]):
        engine.add_request(str(i), p, params)
    sched = engine.scheduler
    steps = []
    while sched.waiting or any(s.num_computed < s.num_tokens - 1 for s in sched.running):
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    context = sum(s.num_tokens for s in sched.running)
    print(
        f"{len(sched.running)} sequences, {context} context tokens; prefill steps (s): "
        + " ".join(f"{s:.3f}" for s in steps)
    )
    if args.prefill:  # prompts not seen yet: no prefix-cache hits
        for i, p in enumerate(prompts[args.seqs :]):
            engine.add_request(f"p{i}", p, params)
        with torch.profiler.profile() as prof:
            while sched.waiting:
                engine.step()
    else:
        engine.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        print(f"decode step: {(time.perf_counter() - t) / args.steps * 1e3:.1f} ms")
        with torch.profiler.profile() as prof:
            for _ in range(3):
                engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    llm.shutdown()


if __name__ == "__main__":
    main()

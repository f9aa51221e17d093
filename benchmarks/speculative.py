"""Speculative decoding's speed: decode tok/s with and without n-gram speculation, on the embedded model.

    python benchmarks/speculative.py                       # both workloads, 1 and 8 streams, k = 4
    python benchmarks/speculative.py --streams 1 --output-len 64 --workload repeat
    python benchmarks/speculative.py --streams 2 4 8 --disable-by-batch-size 64   # what proposing costs at each size

Two workloads, greedy: `repeat` asks the model to repeat or lightly edit a passage shipped below (its output copies
its input: n-gram lookup finds most of it); `random` is random-token prompts, as benchmarks/throughput.py's (little to
look up: what trying costs). Single-stream runs the prompts one after another; 8-stream runs 8 at once. Only decode
is timed: from the step after every request in the run has its first token to the end. The output is meant to be
pasted into docs/benchmarks.md.
"""

import argparse
import platform
import time
from random import randint, seed

import torch

from nanovllm import LLM, SamplingParams

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the great "
    "lens, and wound the clockwork that turned the light. Ships far out at sea saw the beam sweep across the water "
    "every ten seconds, and they knew the rocks were near. In winter the storms came from the north, and the keeper "
    "stayed awake through the night, listening to the waves break against the tower.",
    "To make bread, mix four cups of flour with a spoonful of salt and a packet of yeast. Add warm water slowly and "
    "stir until the dough comes together. Knead it on a floured table for ten minutes, until it is smooth and "
    "springs back when pressed. Leave it in a covered bowl to rise for an hour, then shape it into a loaf and bake "
    "it in a hot oven for forty minutes.",
    "def moving_average(values, window):\n    result = []\n    total = 0.0\n    for i, value in enumerate(values):\n"
    "        total += value\n        if i >= window:\n            total -= values[i - window]\n"
    "        if i >= window - 1:\n            result.append(total / window)\n    return result\n",
    "The committee met on Tuesday to review the budget for the coming year. The chair opened the meeting and asked "
    "the treasurer to present the figures. Spending on maintenance had risen by twelve percent, while income from "
    "membership fees had fallen slightly. After a long discussion, the committee agreed to raise the fees by five "
    "percent and to postpone the repairs to the roof until the spring.",
]
TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text, changing nothing except that every sentence must stay the same:\n\n{}",
]


def workload(name: str, n: int, llm: LLM) -> list[list[int]]:
    if name == "random":  # benchmarks/throughput.py's prompts, shorter
        seed(0)
        return [[randint(0, 10000) for _ in range(randint(100, 300))] for _ in range(n)]
    prompts = [TASKS[i // len(PASSAGES) % len(TASKS)].format(PASSAGES[i % len(PASSAGES)]) for i in range(n)]
    return [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def decode_run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """(tokens generated after every request's first, seconds they took)."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    counts, start, first = {}, None, 0
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if start is None and len(counts) == len(prompts):
            start, first = time.perf_counter(), sum(counts.values())
    return sum(counts.values()) - first, time.perf_counter() - (start or time.perf_counter())


def measure(llms: list[LLM], prompts: list[list[int]], streams: int, params: SamplingParams) -> list[float]:
    """Each engine's decode tok/s over the prompts, `streams` at a time; the engines take turns on each group, the
    first to go alternating, so that a machine slowing down or speeding up shifts them alike."""
    tokens, seconds = [0] * len(llms), [0.0] * len(llms)
    for i in range(0, len(prompts), streams):
        for j in range(len(llms))[:: 1 if i // streams % 2 == 0 else -1]:
            llm = llms[j]
            t, s = decode_run(llm, prompts[i : i + streams], params)
            tokens[j], seconds[j] = tokens[j] + t, seconds[j] + s
    return [t / s for t, s in zip(tokens, seconds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", nargs="+", default=["repeat", "random"], choices=["repeat", "random"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload (a multiple of the streams)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--disable-by-batch-size",
        type=int,
        default=None,
        help="no proposals from this many running sequences on (default: the engine's for its device)",
    )
    args = ap.parse_args()
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_max": args.lookup_max,
        "prompt_lookup_min": args.lookup_min,
    }
    if args.disable_by_batch_size:
        spec["disable_by_batch_size"] = args.disable_by_batch_size
    engine_args = dict(max_num_seqs=8, kv_cache_gib=1, num_threads=args.num_threads)
    plain, fast = LLM(**engine_args), LLM(**engine_args, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, embedded SmolLM2-135M-Instruct ({plain.engine.dtype}), greedy, {args.output_len} tokens, "
        f"speculative_config={spec}\n"
    )
    print("| workload | streams | tok/s without | tok/s with | ratio | acceptance | mean acceptance length |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.workload:
        prompts = workload(name, args.prompts, plain)
        for streams in args.streams:
            measure([plain, fast], prompts[:streams], streams, SamplingParams(temperature=0, max_tokens=8))  # warm-up
            before = fast.engine.speculator.metrics()
            base, with_spec = measure([plain, fast], prompts, streams, params)
            after = fast.engine.speculator.metrics()
            drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
            proposed = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
            kept = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
            print(
                f"| {name} | {streams} | {base:.1f} | {with_spec:.1f} | {with_spec / base:.2f}x | "
                f"{kept / max(proposed, 1):.0%} ({kept}/{proposed}) | {1 + kept / max(drafts, 1):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

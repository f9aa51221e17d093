"""Host work per decode step: the engine's real step loop (scheduling, input preparation, sampling parameters,
sampler, stop checks, detokenization, outputs) around a stub forward that returns logits at once, on CPU.

    python benchmarks/host_overhead.py                          # 64, 256 and 512 running sequences
    python benchmarks/host_overhead.py --sizes 256 --profile    # and where the time goes (cProfile)
    python benchmarks/host_overhead.py --async-scheduling       # the overlapped loop

The model is a tiny random-weight Llama with a byte-level BPE tokenizer (258 tokens), the stub's logits that wide.
The requests are the throughput benchmark's (temperature 0.6, ignore_eos, detokenized, prompts of 100-500 random
tokens), run with output_kind FINAL_ONLY, as LLM.generate runs them. Each size: prompts prefilled, 5 decode steps
of warm-up, then --steps decode steps timed; the median is printed. Timed: the thread's CPU time (other processes
on a shared machine do not count), less the time inside ops.sample, the sampler's arithmetic over the logits (the
device's work on a GPU; printed apart). One torch thread: the host's loop is one thread.
"""

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch


def tiny_model(path: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(
        models.BPE(vocab={"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(alphabet))}}, merges=[])
    )
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def measure(path: str, n: int, steps: int, async_scheduling: bool, profile: bool) -> tuple[float, float]:
    import nanovllm.ops as ops
    from nanovllm import SamplingParams
    from nanovllm.config import EngineConfig
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.sampling_params import RequestOutputKind

    blocks = n * (500 + steps + 32) // 16 + n
    extra = {"async_scheduling": True} if async_scheduling else {}  # (main's EngineConfig had no such field)
    engine = LLMEngine(
        EngineConfig(model=path, dtype="float32", max_num_seqs=n, num_kv_blocks=blocks, num_threads=1, **extra)
    )
    logits = torch.randn(n, 258, generator=torch.Generator().manual_seed(0))
    engine.runner.forward = lambda input_ids, positions, meta, last: logits[: last.shape[0]]  # the stub
    # the sampler's arithmetic over the logits is the device's work on a GPU: timed apart and left out
    real_sample, sampler_time = ops.sample, [0.0]

    def timed_sample(*args):
        start = time.thread_time()
        tokens = real_sample(*args)
        sampler_time[0] += time.thread_time() - start
        return tokens

    ops.sample = timed_sample
    g = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1000, output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(n):
        engine.add_request(
            str(i),
            torch.randint(2, 258, (int(torch.randint(100, 501, (1,), generator=g)),), generator=g).tolist(),
            params,
        )
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed < s.num_tokens - 1 for s in sched.running):
        engine.step()
    for _ in range(5):
        engine.step()
    assert len(sched.running) == n, f"{len(sched.running)} sequences running, expected {n}"
    times, sampler = [], []
    prof = cProfile.Profile(time.thread_time) if profile else None
    for _ in range(steps):
        if prof:
            prof.enable()
        sampler_time[0] = 0.0
        t = time.thread_time()
        engine.step()
        times.append(time.thread_time() - t - sampler_time[0])
        sampler.append(sampler_time[0])
        if prof:
            prof.disable()
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"nanovllm|torch|numpy|tokenizers", 30)
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.shutdown()
    ops.sample = real_sample
    return statistics.median(times) * 1e3, statistics.median(sampler) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps (slower; the times too)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model(tmp)
        for n in args.sizes:
            ms, sampler_ms = measure(path, n, args.steps, args.async_scheduling, args.profile)
            print(f"host ms/step at {n} sequences: {ms:.2f}", flush=True)
            print(f"  (left out: the sampler's arithmetic over the logits, {sampler_ms:.2f} ms/step)", flush=True)


if __name__ == "__main__":
    main()

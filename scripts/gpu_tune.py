"""GPU (issue 5) tuning in one call: decode-attention variants at the nano-vllm preset's decode shape, where a
decode step's time goes (host / forward / sampler), then the preset end to end with the best variant and with
the default. Usage on the lent GPU: python3 scripts/gpu_tune.py [seconds budget]"""
import functools
import gc
import os
import sys
import tempfile
import time

sys.path[:0] = ["benchmarks", "tests"]
import torch
import triton

from nanovllm.kernels import attention as ka

cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
out_dir = os.environ.get("OUT", "/tmp")
sync = torch.cuda.synchronize if cuda else (lambda: None)


def bench(fn):
    if cuda:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def kernel_sweep():
    H, HKV, D, BS = 16, 8, 128, 16
    nb, max_len = (128, 2048) if cuda else (3, 64)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(100 if cuda else 5, max_len + 1, (nb,), generator=g)
    nblk = (lens + BS - 1) // BS
    perm = torch.randperm(int(nblk.sum()), generator=g)
    tables = torch.zeros(nb, max_len // BS, dtype=torch.long)
    at = 0
    for i, n in enumerate(nblk.tolist()):
        tables[i, :n] = perm[at:at + n]; at += n
    dt = torch.bfloat16 if cuda else torch.float32
    kc = torch.randn(at, BS, HKV, D, dtype=dt, device=dev)
    vc = torch.randn(at, BS, HKV, D, dtype=dt, device=dev)
    q = torch.randn(nb, H, D, dtype=dt, device=dev)
    tables, lens, rows = tables.to(dev), lens.to(dev), torch.arange(nb, device=dev)
    gbytes = int(lens.sum()) * HKV * D * 2 * kc.element_size() / 1e9
    ref = torch.empty_like(q)
    ka.decode_attention(q, kc, vc, tables, lens, rows, rows, ref, D ** -0.5, max_len)
    print(f"decode attention, {nb} seqs, mean context {lens.float().mean():.0f}, {gbytes * 1e3:.0f} MB of K/V")
    results = []
    for block_n in [None, 16, 32, 64, 128]:
        for warps in [4, 8] if cuda else [4]:
            for splits in [None, 2, 4] if cuda else [None]:
                out = torch.full_like(q, float("nan"))
                fn = functools.partial(ka.decode_attention, q, kc, vc, tables, lens, rows, rows, out, D ** -0.5,
                                       max_len, num_splits=splits, block_n=block_n, num_warps=warps)
                try:
                    t = bench(fn)
                except Exception as e:
                    print(f"  block_n {block_n} warps {warps} splits {splits}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                results.append((t, block_n, warps, splits))
                print(f"  block_n {str(block_n):>4} warps {warps} splits {str(splits):>4}: {t * 1e6:8.1f} us "
                      f"{gbytes / t:7.1f} GB/s  rel err {err:.1e}", flush=True)
    return min(r for r in results if r[1] is not None)


def step_phases(model_path, n_seqs):
    """Mean per decode step of each phase, with a device sync after each (so each phase owns its GPU time)."""
    from nanovllm import LLM, SamplingParams
    from throughput import make_workload
    prompts, _ = make_workload(n_seqs, 1024, 1024)
    llm = LLM(model_path, max_model_len=2048)
    eng, runner = llm.engine, llm.engine.runner
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1024))
    while eng.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in eng.scheduler.running):
        eng.step()
    phases = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(); t = time.perf_counter(); r = fn(*a, **k); sync()
            phases[name] = phases.get(name, 0) + time.perf_counter() - t
            return r
        return wrapper
    import nanovllm.ops as mr  # the model runner samples through ops.sample
    runner.prepare = timed("prepare (pack + copy in)", runner.prepare)
    runner.forward = timed("forward (graph replay)", runner.forward)
    runner.sampling_batch = timed("sampling params to device", runner.sampling_batch)
    orig_sample = mr.sample
    mr.sample = timed("sample", orig_sample)
    steps, t0 = 30, time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = time.perf_counter() - t0
    mr.sample = orig_sample
    print(f"decode step at {n_seqs} sequences: {total / steps * 1e3:.2f} ms")
    for k, v in phases.items():
        print(f"  {k:<28} {v / steps * 1e3:7.2f} ms")
    print(f"  {'rest (scheduler, outputs)':<28} {(total - sum(phases.values())) / steps * 1e3:7.2f} ms")
    for r in list(eng.requests):
        eng.abort(r)
    del llm


def end_to_end(model_path, label):
    from throughput import make_workload, run_engine
    prompts, max_tokens = make_workload(256, 1024, 1024)
    out, seconds, steps, decodes, _ = run_engine(model_path, "auto", 2048, prompts, max_tokens, 1)
    gc.collect()  # run_engine's engine sits in a reference cycle: free its memory before the next one sizes its pool
    t = sum(d[0] for d in decodes) / max(1, len(decodes))
    print(f"end to end, {label}: {out} tokens in {seconds:.1f} s = {out / seconds:.1f} tok/s, {steps} steps, "
          f"decode step {t * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    best = kernel_sweep()
    print("best:", best, flush=True)
    from throughput import random_model
    folder = tempfile.mkdtemp()
    model = random_model(folder, "nano-vllm")
    if cuda:
        step_phases(model, 128)
        torch.cuda.empty_cache()
    orig = ka.decode_attention
    ka.decode_attention = functools.partial(orig, block_n=best[1], num_warps=best[2])
    end_to_end(model, f"decode block_n {best[1]} warps {best[2]}")
    ka.decode_attention = orig
    torch.cuda.empty_cache() if cuda else None
    end_to_end(model, "default decode kernel")

"""The attention kernels on the benchmark shape (issue 17): decode attention's effective K/V read bandwidth and
prefill attention's TFLOP/s, for the default configuration and a sweep of tile sizes, warps, pipeline stages and
split counts, each checked against the torch reference. Qwen3-0.6B's heads (16 query heads, 8 KV heads, head
dim 128), block size 16, blocks scattered over the pool, bf16.

    python3 tools/gpu_tune.py                      # on a GPU: 128 and 256 sequences, ~1,000-token contexts
    python3 tools/gpu_tune.py --budget 60          # stop sweeping after 60 s (the defaults are always run)
    TRITON_INTERPRET=1 python3 tools/gpu_tune.py --tiny   # CPU smoke test: tiny shapes, fp32, interpreter
"""

import argparse
import itertools
import sys
import time

import torch

sys.path.insert(0, "tests")


def scattered_step(lens: list[int], block_size: int, gen: torch.Generator, device: str, query: int = 1):
    """A step's metadata with block tables over a shuffled pool (as a long-running server's)."""
    from conftest import make_step

    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    return make_step([(n, query) for n in lens], block_size, num_blocks, gen, device), num_blocks


def variants(default: dict, axes: dict) -> list[dict]:
    """The default, each axis varied alone around it, then the whole product: a budget cut still sees each axis."""
    alone = [dict(default, **{k: x}) for k, xs in axes.items() for x in xs]
    product = [dict(zip(axes, xs)) for xs in itertools.product(*axes.values())]
    out = []
    for v in [default, *alone, *product]:
        if v not in out:
            out.append(v)
    return out


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3

    def once(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return once


def timed(bench, run, out: torch.Tensor, expected: torch.Tensor, kw: dict) -> tuple[float, float] | None:
    """(seconds per call of run(), its largest error against the reference), or None (said) where the compiler
    refuses the configuration (shared memory): the other variants still run."""
    try:
        run()
        seconds = bench(run)
    except Exception as e:
        print(f"  {str(kw):<60} {type(e).__name__}: {str(e)[:60]}")
        return None
    return seconds, float((out.float() - expected).abs().max())


def decode_sweep(args, device: str, dtype: torch.dtype, deadline: float) -> None:
    from nanovllm.kernels.attention import decode_attention, num_splits_for
    from nanovllm.layers.attention import decode_attention as reference

    heads, kv_heads, dim, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    bench = timer(device)
    for n, seqs in enumerate(args.seqs):
        share = time.perf_counter() + (deadline - time.perf_counter()) / (len(args.seqs) - n)  # each batch its share
        gen = torch.Generator().manual_seed(seqs)
        lens = torch.randint(args.context // 2, args.context * 3 // 2 + 1, (seqs,), generator=gen).tolist()
        meta, num_blocks = scattered_step(lens, bs, gen, device)
        k_cache, v_cache = torch.randn(2, num_blocks, bs, kv_heads, dim, generator=gen).to(device, dtype)
        q = torch.randn(seqs, heads, dim, generator=gen).to(device, dtype)
        expected = torch.empty(q.shape, device=device)
        reference(q.float(), expected, k_cache.float(), v_cache.float(), meta, dim**-0.5)
        gbytes = sum(lens) * kv_heads * dim * 2 * k_cache.element_size() / 1e9
        auto = num_splits_for(seqs, kv_heads, max(lens))
        print(
            f"\ndecode attention: {seqs} sequences, contexts {min(lens)}-{max(lens)} (mean {sum(lens) / seqs:.0f}), "
            f"{gbytes * 1e3:.0f} MB of K/V per call; planned splits {auto}"
        )
        print(
            f"  {'block_n':>7} {'warps':>5} {'stages':>6} {'splits':>6} {'max_context':>11} {'us':>9} {'TB/s':>6} "
            f"{'max err':>8}"
        )
        default = dict(block_n=None, num_warps=4, num_stages=3, num_splits=None)
        todo = [(default, True)] + [
            (kw, False)
            for kw in variants(
                default,
                dict(block_n=args.block_n, num_warps=args.warps, num_stages=args.stages, num_splits=args.splits),
            )
        ]
        todo[:2] = todo[1], todo[0]  # the eager plan, then the same as a CUDA graph capture plans it
        best = None
        for i, (kw, graph) in enumerate(todo):
            if i >= 2 and time.perf_counter() > share:
                print(f"  (budget spent: {len(todo) - i} variants not run)")
                break
            max_context = args.max_model_len if graph else meta.decode_max_context
            out = torch.full_like(q, float("nan"))

            def run():
                decode_attention(
                    q,
                    k_cache,
                    v_cache,
                    meta.block_tables,
                    meta.context_lens,
                    meta.decode_rows,
                    meta.decode_tokens,
                    out,
                    dim**-0.5,
                    max_context,
                    **kw,
                )

            if (result := timed(bench, run, out, expected, kw)) is None:
                continue
            seconds, err = result
            splits = kw["num_splits"] or num_splits_for(seqs, kv_heads, max_context)
            print(
                f"  {str(kw['block_n'] or 'auto'):>7} {kw['num_warps']:>5} {kw['num_stages']:>6} {splits:>6} "
                f"{max_context:>11} {seconds * 1e6:>9.1f} {gbytes / seconds / 1e3:>6.2f} {err:>8.1e}",
                flush=True,
            )
            if err < args.tolerance and (best is None or seconds < best[0]):
                best = (seconds, kw)
        if best:
            print(
                f"decode, {seqs} sequences: best {gbytes / best[0] / 1e3:.2f} TB/s effective K/V read with {best[1]} "
                f"(target 2.5 TB/s)"
            )


def prefill_sweep(args, device: str, dtype: torch.dtype, deadline: float) -> None:
    from nanovllm.kernels.attention import prefill_attention
    from nanovllm.layers.attention import prefill_attention as reference

    heads, kv_heads, dim, bs, chunk = args.heads, args.kv_heads, args.head_dim, args.block_size, args.chunk
    bench = timer(device)
    for prefix in (0, chunk):  # a whole prompt, then a chunk after a cached prefix of the same length
        gen = torch.Generator().manual_seed(prefix)
        ctx = prefix + chunk
        meta, num_blocks = scattered_step([ctx], bs, gen, device, query=chunk)
        k_cache, v_cache = torch.randn(2, num_blocks, bs, kv_heads, dim, generator=gen).to(device, dtype)
        q = torch.randn(chunk, heads, dim, generator=gen).to(device, dtype)
        expected = torch.empty(q.shape, device=device)
        blocks = meta.block_tables[0, : -(-ctx // bs)]
        keys, values = (c.float().index_select(0, blocks).flatten(0, 1)[:ctx] for c in (k_cache, v_cache))
        reference(q.float(), expected, keys, values, meta, 0, dim**-0.5)
        # causal: query j sees prefix + j + 1 keys; 2 FLOPs per multiply-add, QK^T and PV
        flops = 4 * heads * dim * sum(prefix + j + 1 for j in range(chunk))
        print(
            f"\nprefill attention: a {chunk}-token chunk after {prefix} cached tokens, {flops / 1e9:.1f} GFLOP per call"
        )
        print(f"  {'block_m':>7} {'block_n':>7} {'warps':>5} {'stages':>6} {'us':>9} {'TFLOP/s':>8} {'max err':>8}")
        todo = variants(
            dict(block_m=None, block_n=None, num_warps=None, num_stages=3),
            dict(block_m=args.block_m, block_n=args.block_n, num_warps=args.warps, num_stages=args.stages),
        )
        best = None
        for i, kw in enumerate(todo):
            if i >= 1 and time.perf_counter() > deadline:
                print(f"  (budget spent: {len(todo) - i} variants not run)")
                break
            out = torch.full_like(q, float("nan"))

            def run():
                prefill_attention(
                    q,
                    k_cache,
                    v_cache,
                    meta.block_tables,
                    meta.context_lens,
                    meta.query_start,
                    meta.prefill_rows,
                    out,
                    dim**-0.5,
                    chunk,
                    **kw,
                )

            if (result := timed(bench, run, out, expected, kw)) is None:
                continue
            seconds, err = result
            print(
                f"  {str(kw['block_m'] or 'auto'):>7} {str(kw['block_n'] or 'auto'):>7} "
                f"{str(kw['num_warps'] or 'auto'):>5} {kw['num_stages']:>6} {seconds * 1e6:>9.1f} "
                f"{flops / seconds / 1e12:>8.1f} {err:>8.1e}",
                flush=True,
            )
            if err < args.tolerance and (best is None or seconds < best[0]):
                best = (seconds, kw)
        if best:
            print(f"prefill, {chunk} tokens after {prefix}: best {flops / best[0] / 1e12:.1f} TFLOP/s with {best[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes in fp32 (the interpreter's smoke test)")
    ap.add_argument("--budget", type=float, default=75, help="seconds for the sweeps (defaults always run)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--context", type=int, default=1000, help="mean context; lengths uniform in [c/2, 3c/2]")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    ap.add_argument("--max-model-len", type=int, default=40960, help="what a CUDA graph capture plans for")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 5])  # decode: 3 and 4 compile alike (sm_90)
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tolerance", type=float, default=0.05, help="max abs error vs the fp32 reference")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter is exact only in fp32
    if args.tiny:
        args.seqs, args.context, args.chunk, args.max_model_len = [3], 40, 40, 2048
        args.heads, args.kv_heads, args.head_dim = 4, 2, 32
        args.block_n, args.block_m, args.warps, args.stages, args.splits = [32], [16], [4], [3], [2]
        args.tolerance = 1e-4
    elif device != "cuda":
        raise SystemExit("no CUDA device: run with --tiny (and TRITON_INTERPRET=1) for the interpreter's smoke test")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    import triton

    print(
        f"{name}, torch {torch.__version__}, triton {triton.__version__}, {str(dtype)[6:]}; heads {args.heads}, "
        f"KV heads {args.kv_heads}, head dim {args.head_dim}, block size {args.block_size}"
    )
    start = time.perf_counter()
    decode_sweep(args, device, dtype, start + args.budget * 0.6)
    prefill_sweep(args, device, dtype, start + args.budget)
    print(f"\nsweep took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""The CPU attention kernels alone, SmolLM2's heads, bf16 (or fp32: --fp32), 30 layers. Decode: 44 sequences
(contexts 300-700); prefill (--prefill): a 2048-token step of whole prompts (100-512 tokens), ours (AMX) against
torch's SDPA.

    python benchmarks/attention_kernel.py              # each layer its own cache: reads come from memory
    python benchmarks/attention_kernel.py --resident   # every table points into 24 blocks: compute alone
    python benchmarks/attention_kernel.py --block-size 128
    python benchmarks/attention_kernel.py --prefill
    python benchmarks/attention_kernel.py --fp32      # fp32 caches (an fp32 model's: dtype auto on AVX2)
"""

import argparse
import random
import time
from types import SimpleNamespace

import torch

from nanovllm.kernels import cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resident", action="store_true")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--fp32", action="store_true", help="decode over fp32 caches (default bf16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    if args.prefill:
        return prefill()
    seqs, heads, kv_heads, dim, bs, layers = 44, 9, 3, 64, args.block_size, 30
    lens = [random.randint(300, 700) for _ in range(seqs)]
    blocks = sum(-(-n // bs) for n in lens)
    order = torch.randperm(blocks) % 24 if args.resident else torch.randperm(blocks)  # scattered, like a pool
    tables = torch.zeros(seqs, max(-(-n // bs) for n in lens), dtype=torch.long)
    i = 0
    for b, n in enumerate(lens):
        tables[b, : -(-n // bs)] = order[i : i + -(-n // bs)]
        i += -(-n // bs)
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    caches = [torch.randn(2, blocks, bs, kv_heads, dim).to(dtype) for _ in range(1 if args.resident else layers)]
    caches *= layers // len(caches)
    meta = SimpleNamespace(
        block_tables=tables,
        context_lens=torch.tensor(lens),
        decode_rows=torch.arange(seqs),
        decode_tokens=torch.arange(seqs),
    )
    q = torch.randn(seqs, heads, dim).to(dtype)
    out = torch.empty_like(q)
    times = []
    for _ in range(8):
        start = time.perf_counter()
        for kv in caches:
            cpu.decode_attention(q, out, kv[0], kv[1], meta, dim**-0.5)
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    read = 2 * sum(lens) * kv_heads * dim * caches[0].element_size() * layers
    print(
        f"{layers} layers: min {best * 1e3:.1f} ms, median {sorted(times[1:])[3] * 1e3:.1f} ms; "
        f"{read / 1e6:.0f} MB of K/V -> {read / best / 1e9:.1f} GB/s"
    )


def prefill(heads: int = 9, kv_heads: int = 3, dim: int = 64, layers: int = 30) -> None:
    lens = []
    while sum(lens) < 2048 - 100:
        lens.append(random.randint(100, 512))
    qkv = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim).bfloat16()
    q, k, v = (t.unflatten(1, (-1, dim)) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    out = torch.empty(sum(lens), heads, dim).bfloat16()

    def sdpa() -> None:  # the engine's fallback: one sequence at a time
        for s, e in zip(starts[:-1].tolist(), starts[1:].tolist()):
            o = torch.nn.functional.scaled_dot_product_attention(
                *(t[None, s:e].transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=dim**-0.5, enable_gqa=True
            )
            out[s:e] = o[0].transpose(0, 1)

    bounds = list(zip(starts[:-1].tolist(), starts[1:].tolist()))

    def ours() -> None:
        if not cpu.prefill_attention(
            q, out, starts, list(range(len(lens))), [k[s:e] for s, e in bounds], [v[s:e] for s, e in bounds], dim**-0.5
        ):
            raise SystemExit("the AMX prefill kernel does not run on this CPU")

    flops = sum(4 * n * n / 2 * dim * heads for n in lens) * layers  # causal: half of QK^T and PV
    for name, fn in [("SDPA", sdpa), ("ours", ours)] * 2:
        fn()
        start = time.perf_counter()
        for _ in range(layers):
            fn()
        took = time.perf_counter() - start
        print(
            f"{name}: {took * 1e3:.0f} ms for {layers} layers of {len(lens)} prompts ({sum(lens)} tokens), "
            f"{flops / took / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()

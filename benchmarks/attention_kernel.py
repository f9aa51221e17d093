"""The CPU decode-attention kernel alone: 44 sequences (contexts 300-700), SmolLM2's heads, bf16, 30 layers.

    python benchmarks/attention_kernel.py              # each layer its own cache: reads come from memory
    python benchmarks/attention_kernel.py --resident   # every table points into 24 blocks: compute alone
    python benchmarks/attention_kernel.py --block-size 128
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
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    seqs, heads, kv_heads, dim, bs, layers = 44, 9, 3, 64, args.block_size, 30
    lens = [random.randint(300, 700) for _ in range(seqs)]
    blocks = sum(-(-n // bs) for n in lens)
    order = torch.randperm(blocks) % 24 if args.resident else torch.randperm(blocks)  # scattered, like a pool
    tables = torch.zeros(seqs, max(-(-n // bs) for n in lens), dtype=torch.long)
    i = 0
    for b, n in enumerate(lens):
        tables[b, :-(-n // bs)] = order[i:i + -(-n // bs)]
        i += -(-n // bs)
    caches = [torch.randn(2, blocks, bs, kv_heads, dim).bfloat16() for _ in range(1 if args.resident else layers)]
    caches *= layers // len(caches)
    meta = SimpleNamespace(block_tables=tables, context_lens=torch.tensor(lens), decode_rows=torch.arange(seqs),
                           decode_tokens=torch.arange(seqs))
    q = torch.randn(seqs, heads, dim).bfloat16()
    out = torch.empty_like(q)
    times = []
    for _ in range(8):
        start = time.perf_counter()
        for kv in caches:
            cpu.decode_attention(q, out, kv[0], kv[1], meta, dim ** -0.5)
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    read = 2 * sum(lens) * kv_heads * dim * 2 * layers
    print(f"{layers} layers: min {best * 1e3:.1f} ms, median {sorted(times[1:])[3] * 1e3:.1f} ms; "
          f"{read / 1e6:.0f} MB of K/V -> {read / best / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()

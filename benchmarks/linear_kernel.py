"""SmolLM2-135M's linears (hidden 576, intermediate 1536, 30 layers: QKV, O, gate/up, down; and the 49152 x 576 LM
head) in one process, candidates alternating, each timed as ms per 30 layers (and per LM head) at each row count.

fp32 activations, GGUF weights (default; random blocks of the real shapes: the times do not depend on the values):
F.linear          torch's linear on the fp32 weights (what loading a GGUF dequantized to fp32 gives today)
int4pack          torch._weight_int4pack_mm_for_cpu (4-bit, group size 32, scale and zero per group)
int8pack          torch._weight_int8pack_mm (int8, one scale per output)
ours Q4_1 / Q8_0  kernels.quant_linear (quant_linear.c: activations in two int8 planes (16 bits), integer block dot
                  products; from kernels/cpu/quant.py's TILE_FROM_ROWS rows on, dequantized tiles and torch.mm as
                  "tile Q4_1" below)
int8 Q4_1 / Q8_0  the same with activations in one int8 plane (quantization="gguf_int8": llama.cpp's numerics)
dots Q4_1         the C kernel's integer dot products at every row count (linear_f32 called directly)
ours Q4_K         the same on Q4_K where K is a multiple of 256 (only the down projection, K = 1536) and Q5_0
                  elsewhere (K = 576): what a Q4_K_M GGUF of SmolLM2 holds
ours F32          kernels.quant_linear on the fp32 weights (our fp32 FMA matrix-vector product)
tile Q4_1         dequantize 256 rows at a time into an fp32 scratch (L2-sized) and torch.mm each into the output
                  (for many rows: the matmul's compute then dominates, and torch's is the faster one)

--bf16: the AMX comparison on bf16 weights (needs AMX): oneDNN's packed weight, our AMX kernel on 4 KB and 2 MB
pages, F.linear.

python benchmarks/linear_kernel.py                       # rows 1 8 32 512
python benchmarks/linear_kernel.py --rows 1 --repeats 9 --threads 1
python benchmarks/linear_kernel.py --rows 512 --candidates F.linear "dots Q4_1" "tile Q4_1"
python benchmarks/linear_kernel.py --bf16 --rows 1 16 44 64 128
"""

import argparse
import statistics
import subprocess
import time

import torch

from nanovllm.kernels import cpu
from nanovllm.layers.quant import interleave_rows
from nanovllm.memory import huge_page_buffer

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (outputs, inputs): QKV, O, gate/up, down
LM_HEAD = (49152, 576)
LAYERS = 30
TILE_ROWS = 256  # tile candidate: 256 x 1536 fp32 = 1.5 MB at most, about the L2 of the cores it was tried on


def random_blocks(qtype: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] of GGUF type qtype: random bytes, the fp16 scales (first 2 or 4 bytes of a block, last
    2 of Q6_K) set to small finite values so that the values are finite (timing does not depend on them)."""
    shape = cpu.BLOCK_SHAPES[cpu.GGUF_TYPES[qtype]]
    blocks = torch.randint(0, 256, (n, k // shape.elems, shape.nbytes), dtype=torch.uint8, generator=gen)
    scale = torch.full((n, k // shape.elems, 1), 0.01, dtype=torch.float16).view(torch.uint8)
    if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale
    elif qtype == "Q6_K":
        blocks[..., -2:] = scale
    else:
        blocks[..., 0:2] = scale
    return blocks.view(n, -1)


def tile_linear(x: torch.Tensor, qtype: str, blocks: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """x @ W.T by dequantizing TILE_ROWS rows of W at a time into scratch, torch.mm into the output's columns."""
    n, k = blocks.shape[0], x.shape[1]
    y = x.new_empty(x.shape[0], n)
    for start in range(0, n, TILE_ROWS):
        rows = min(TILE_ROWS, n - start)
        tile = cpu.dequantize(qtype, blocks[start : start + rows], k, out=scratch[: rows * k].view(rows, k))
        y[:, start : start + rows] = x @ tile.T
    return y


def int8_dots(x: torch.Tensor, qtype: str, blocks: torch.Tensor) -> torch.Tensor:
    """The C kernel's integer dot products whatever the row count (quant_linear switches to tiles for many)."""
    return cpu.linear_f32(x, blocks, cpu.GGUF_TYPES[qtype], blocks.shape[0])


def quantized_candidates(gen: torch.Generator) -> dict:
    """name -> (function(x, weight), [per-layer weights in SHAPES order, then the LM head's])."""
    shapes = [*SHAPES * LAYERS, LM_HEAD]
    weights = {name: [] for name in ("F.linear", "int4pack", "int8pack", "ours Q4_1", "ours Q8_0", "ours Q4_K")}
    weights |= {"ours F32": weights["F.linear"], "dots Q4_1": weights["ours Q4_1"], "tile Q4_1": weights["ours Q4_1"]}
    weights |= {"int8 Q4_1": weights["ours Q4_1"], "int8 Q8_0": weights["ours Q8_0"]}
    for name in ("rows8 Q4_1", "rows8 Q8_0"):  # the same blocks, rows interleaved 8 at a time
        weights[name] = []
        weights[name.replace("rows8", "int8 rows8")] = weights[name]
    for n, k in shapes:
        q4_1 = random_blocks("Q4_1", n, k, gen)
        w = cpu.dequantize("Q4_1", q4_1, k)
        weights["F.linear"].append(w)
        weights["ours Q4_1"].append(q4_1)
        weights["ours Q8_0"].append(random_blocks("Q8_0", n, k, gen))
        weights["rows8 Q4_1"].append(interleave_rows(q4_1, cpu.GGUF_TYPES["Q4_1"]))
        weights["rows8 Q8_0"].append(interleave_rows(weights["ours Q8_0"][-1], cpu.GGUF_TYPES["Q8_0"]))
        k_type = "Q4_K" if k % 256 == 0 else "Q5_0"
        weights["ours Q4_K"].append((k_type, random_blocks(k_type, n, k, gen)))
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        scales_zeros = torch.rand(k // 32, n, 2, generator=gen) * 0.01
        weights["int4pack"].append((torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros))
        weights["int8pack"].append((torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n)))
    scratch = torch.empty(TILE_ROWS * max(k for _, k in shapes))
    f32 = cpu.GGUF_TYPES["F32"]
    runs = {
        "F.linear": lambda x, w: torch.nn.functional.linear(x, w),
        "int4pack": lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1]),
        "int8pack": lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]),
        "ours Q4_1": lambda x, w: cpu.quant_linear(x, "Q4_1", w),
        "ours Q8_0": lambda x, w: cpu.quant_linear(x, "Q8_0", w),
        "int8 Q4_1": lambda x, w: cpu.quant_linear(x, "Q4_1", w, int8_activations=True),
        "int8 Q8_0": lambda x, w: cpu.quant_linear(x, "Q8_0", w, int8_activations=True),
        "rows8 Q4_1": lambda x, w: cpu.quant_linear(x, "Q4_1", w, interleaved=True),
        "rows8 Q8_0": lambda x, w: cpu.quant_linear(x, "Q8_0", w, interleaved=True),
        "int8 rows8 Q4_1": lambda x, w: cpu.quant_linear(x, "Q4_1", w, int8_activations=True, interleaved=True),
        "int8 rows8 Q8_0": lambda x, w: cpu.quant_linear(x, "Q8_0", w, int8_activations=True, interleaved=True),
        "ours Q4_K": lambda x, w: cpu.quant_linear(x, w[0], w[1]),
        "ours F32": lambda x, w: cpu.quant_linear(x, f32, w.view(torch.uint8)),
        "dots Q4_1": lambda x, w: int8_dots(x, "Q4_1", w),
        "tile Q4_1": lambda x, w: tile_linear(x, "Q4_1", w, scratch),
    }
    return {name: (fn, weights[name]) for name, fn in runs.items()}


def quantized(args) -> None:
    gen = torch.Generator().manual_seed(0)
    candidates = quantized_candidates(gen)
    if args.candidates:
        candidates = {name: candidates[name] for name in args.candidates}
    print(f"torch threads {torch.get_num_threads()}; ours Q4_K: Q4_K on the down projection (K = 1536), Q5_0 on")
    print("the others and the LM head (K = 576 is not a multiple of Q4_K's 256); ms, median of", args.repeats)
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    print(next((line for line in flags if line.startswith("Flags")), "Flags: (lscpu gave none)"))
    print(f"{'rows':>5s}  {'candidate':16s}{'30 layers':>12s}{'LM head':>10s}   (ms, median)")
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k, generator=gen) for k in {k for _, k in [*SHAPES, LM_HEAD]}}
        times = {name: ([], []) for name in candidates}
        for _ in range(args.repeats):
            for name, (fn, weights) in candidates.items():
                start = time.perf_counter()
                for i, w in enumerate(weights[:-1]):
                    fn(inputs[SHAPES[i % len(SHAPES)][1]], w)
                middle = time.perf_counter()
                fn(inputs[LM_HEAD[1]], weights[-1])
                times[name][0].append(middle - start)
                times[name][1].append(time.perf_counter() - middle)
        for name, (layers, head) in times.items():
            print(
                f"{rows:5d}  {name:16s}{statistics.median(layers) * 1e3:12.2f}{statistics.median(head) * 1e3:10.2f}",
                flush=True,
            )


def bf16_amx(args) -> None:
    """The AMX comparison on bf16 weights (the benchmark of kernels/cpu/linear.c)."""
    if not cpu.has_amx():
        raise SystemExit("this CPU (or its compiler) has no AMX: the kernel does not run here")
    torch.manual_seed(0)
    total = sum(n * k for n, k in SHAPES) * 2 * LAYERS
    huge, plain = huge_page_buffer(total), torch.empty(total, dtype=torch.uint8)
    weights = {"amx-huge": [], "amx-4k": [], "oneDNN": [], "F.linear": []}
    offset = 0
    for _ in range(LAYERS):
        for n, k in SHAPES:
            w = torch.randn(n, k).bfloat16()
            for name, buf in (("amx-huge", huge), ("amx-4k", plain)):
                weights[name].append(buf[offset : offset + n * k * 2].view(torch.bfloat16).view(n, k).copy_(w))
            weights["oneDNN"].append(torch.ops.mkldnn._reorder_linear_weight(w))
            weights["F.linear"].append(weights["amx-huge"][-1])
            offset += n * k * 2
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k).bfloat16() for _, k in SHAPES}
        runs = {
            "oneDNN": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            "amx-4k": lambda x, w: cpu.amx_linear(x, w, None),
            "amx-huge": lambda x, w: cpu.amx_linear(x, w, None),
            "F.linear": lambda x, w: torch.nn.functional.linear(x, w),
        }
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                for i, w in enumerate(weights[name]):
                    fn(inputs[SHAPES[i % len(SHAPES)][1]], w)
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            print(
                f"{rows:4d} rows  {name:9s} median {statistics.median(t) * 1e3:6.2f} ms, min {min(t) * 1e3:6.2f} ms "
                f"per {LAYERS} layers ({total / statistics.median(t) / 1e9:.1f} GB/s of weights)"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--candidates", nargs="+", help="only these (names as printed)")
    ap.add_argument("--bf16", action="store_true", help="the AMX comparison on bf16 weights")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch's and our kernels' threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16_amx(args) if args.bf16 else quantized(args)


if __name__ == "__main__":
    main()

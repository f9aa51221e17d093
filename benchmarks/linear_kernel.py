"""SmolLM2's 30 layers of linears (QKV, O, gate/up, down) at decode sizes, bf16, in one process, alternating:

oneDNN      torch.ops.mkldnn._linear_pointwise on the weight packed by _reorder_linear_weight (our CPU path
            before kernels/cpu/linear.c; still the path without AMX)
amx-4k      our AMX kernel on weights in ordinary 4 KB pages
amx-huge    our AMX kernel on weights in 2 MB pages (nanovllm/memory.py, huge_page_buffer: how the loader
            places them)
F.linear    torch's plain linear (what prefills use)

python benchmarks/linear_kernel.py              # 44 rows (preset cpu's mean decode batch)
python benchmarks/linear_kernel.py --rows 1 16 44 64 128
"""

import argparse
import statistics
import time

import torch

from nanovllm.kernels import cpu
from nanovllm.memory import huge_page_buffer

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (outputs, inputs): QKV, O, gate/up, down
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[44])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()

"""Our bf16 Triton kernels at Qwen3-0.6B's shape (16 query heads, 8 KV heads, head dim 128, block size 16), with the
engine's default tiles, compiled for sm_90 (H100/H200) to cubins by Triton's own ptxas: no GPU needed. Prints
JSON per kernel: K/V loads pipelined (async copies), the tensor-core instructions, shared memory, registers and
spill bytes. Its own process: the Triton interpreter (TRITON_INTERPRET=1) must not be on.
    python tools/compile_hopper.py"""

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanovllm.kernels import attention as ka

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for_hopper(kernel, dtype: str, num_warps: int, num_stages: int = 3, **constexprs) -> dict:
    ints = ("tables", "lens", "rows", "tokens", "query_start")
    types = {
        name: "constexpr"
        if name in constexprs
        else "fp32"
        if "scale" in name
        else "i32"
        if "_ptr" not in name
        else "*i64"
        if name[:-4] in ints
        else "*fp32"
        if name.startswith("part_")
        else f"*{dtype}"
        for name in kernel.arg_names
    }
    names = list(types)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if types[n].startswith("*")}  # as launched
    source = ASTSource(kernel, types, {(names.index(n),): v for n, v in constexprs.items()}, aligned)
    k = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    ttgir = k.asm["ttgir"]
    return dict(
        pipelined="async_copy_global_to_local" in ttgir,
        wgmma="warp_group_dot" in ttgir,
        mma_sync="nvidia_mma<{versionMajor = 2" in ttgir,
        shared=k.metadata.shared,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        spills=int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1)),
    )


def main() -> None:
    shape = dict(D=128, DP=128, BS=16)
    print(
        json.dumps(
            {
                "decode": compile_for_hopper(
                    ka._decode_split, "bf16", 4, H=16, HKV=8, G=2, GP=16, BLOCK_N=64, SPLITS=4, **shape
                ),
                "reduce": compile_for_hopper(
                    ka._decode_reduce, "bf16", 4, H=16, G=2, GP=2, D=128, DP=128, BLOCK_N=64, SPLITS=4, SP=4
                ),
                "prefill": compile_for_hopper(ka._prefill, "bf16", 8, H=16, HKV=8, BLOCK_M=128, BLOCK_N=64, **shape),
            }
        )
    )


if __name__ == "__main__":
    main()

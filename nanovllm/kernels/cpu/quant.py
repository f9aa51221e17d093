"""Our C kernels on GGUF weights as stored, for torch tensors: the weight types (ggml's ids) and their blocks,
quant_linear (quant_linear.c: x quantized to int8 blocks, integer dot products; tiles of dequantized rows for many
rows of x) and dequantize (dequantize.c: gguf-py's values bit for bit). Re-exported by kernels/cpu/__init__.py."""

from dataclasses import dataclass

import torch

from nanovllm.kernels.cpu.build import library
from nanovllm.layers.quant import INTERLEAVE, INTERLEAVED_TYPES, Q4_K, Q5_K, Q6_K, deinterleave_rows

# Weight types by ggml's own ids (kernels.h), one numbering for every kernel: what linear_bf16 reads (the plain
# bf16 weight, or its Q4_1 / Q8_0 GGUF blocks in pack_blocks' layout) and what linear_f32 / dequantize_rows read
GGUF_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
}

# A flag on linear_f32's weight type (kernels.h): x quantized to one int8 plane per block, llama.cpp's numerics, instead
# of two (16 bits, the default: the dequantized weights' greedy choices). quantization="gguf_int8" asks for it.
X_INT8 = 0x100
# A flag on linear_f32's and dequantize_rows' weight type (kernels.h): the rows interleaved 8 at a time
# (layers/quant.py interleave_rows), the layout the AVX2 kernel reads fastest; interleaves(type) says where it is
ROWS8 = 0x200

# up to here linear_f32's int8 dots beat dequantized tiles through torch's fp32 GEMM: a 37-token chat prefill 156-287 ms
# at 32 -> ~100 ms at 64 (2026-12-07, quiet EPYC; docs/benchmarks.md)
QUANT_KERNEL_ROWS = 64
# the same, per type, for the 32-blocks' rows interleaved 8 at a time (ROWS8), read faster: SmolLM2's 30 layers of
# linears (benchmarks/linear_kernel.py shapes), dots against the weight dequantized whole, 2026-12-08, quiet EPYC
# (docs/benchmarks-history.md): Q4_1 at 320 / 512 / 1024 / 2048 rows 457 / 750 / 1556 / 3103 ms against 554 / 764 /
# 1633 / 2573, Q5_0 at 320 / 512 510 / 831 against 518 / 712, Q8_0 at 160 / 256 283-297 / 463-574 against
# 316-337 / 444-507
INTERLEAVED_KERNEL_ROWS = {
    GGUF_TYPES[t]: rows for t, rows in [("Q4_0", 512), ("Q4_1", 512), ("Q5_0", 320), ("Q5_1", 320), ("Q8_0", 160)]
}
# with x in one int8 plane: Q8_0's products (a sign flip and a widening per unit) up to here; the 4- and 5-bit
# rows' always (kernel_rows)
INTERLEAVED_INT8_Q8_0_ROWS = 256
K_QUANT_CODES = (Q4_K, Q5_K, Q6_K)


@dataclass(frozen=True)
class BlockShape:
    """A GGUF weight type's block as stored: `elems` weights in `nbytes` bytes (kernels.h has the layouts)."""

    elems: int
    nbytes: int


BLOCK_SHAPES: dict[int, BlockShape] = {  # by ggml id: every type quant_linear and dequantize read
    GGUF_TYPES["F32"]: BlockShape(1, 4),
    GGUF_TYPES["F16"]: BlockShape(1, 2),
    GGUF_TYPES["Q4_0"]: BlockShape(32, 18),
    GGUF_TYPES["Q4_1"]: BlockShape(32, 20),
    GGUF_TYPES["Q5_0"]: BlockShape(32, 22),
    GGUF_TYPES["Q5_1"]: BlockShape(32, 24),
    GGUF_TYPES["Q8_0"]: BlockShape(32, 34),
    GGUF_TYPES["Q4_K"]: BlockShape(256, 144),
    GGUF_TYPES["Q5_K"]: BlockShape(256, 176),
    GGUF_TYPES["Q6_K"]: BlockShape(256, 210),
}
TYPE_NAMES = {v: k for k, v in GGUF_TYPES.items()}


def block_shape(qtype: int | str, k: int) -> tuple[int, BlockShape]:
    """The ggml id and block of `qtype` (a ggml id or name), for rows of k weights; ValueError naming the type and
    the rule where the kernels cannot read it."""
    code = GGUF_TYPES.get(qtype) if isinstance(qtype, str) else int(qtype)
    if code not in BLOCK_SHAPES:
        raise ValueError(f"GGUF type {qtype!r} is not one the CPU kernels read; they read {sorted(GGUF_TYPES)}")
    shape = BLOCK_SHAPES[code]
    if k % shape.elems:
        raise ValueError(
            f"GGUF type {TYPE_NAMES[code]} stores rows in blocks of {shape.elems} weights; a row of {k} is not a "
            f"multiple of {shape.elems}"
        )
    return code, shape


def row_bytes(qtype: int | str, k: int) -> int:
    """Bytes of one row of k weights of `qtype` as GGUF stores it."""
    _, shape = block_shape(qtype, k)
    return k // shape.elems * shape.nbytes


# From this many rows of x on, quant_linear dequantizes W a tile of rows at a time and multiplies each with torch.mm:
# the int8 dot products cost the same per row of x whatever M, and at 32-64 rows equal torch's fp32 matmul, which then
# gains with M (benchmarks/linear_kernel.py); the engine's dispatch (ops/cpu_ops.py) switches at the same point
TILE_FROM_ROWS = QUANT_KERNEL_ROWS + 1
# A tile holds as many of W's rows as fit this many fp32 values (8 MB): SmolLM2's weights whole, so one GEMM and no
# copy into y's columns. Tiles of 256 rows (1.5 MB, a core's L2) were slower: 30 layers of Q4_1 at 128 / 512 / 2048
# rows 264.5 / 825.9 / 2736-3562 ms against 257.8 / 809.2 / 2567-3126 whole (one process, alternating)
TILE_FLOATS = 1 << 21


def kernel_rows(code: int, interleaved: bool, int8_activations: bool) -> float:
    """Up to how many rows of x quant_linear runs the integer dot products (above: dequantized tiles), for
    SmolLM2's 30 layers of linears (benchmarks/linear_kernel.py shapes): interleaved 4- and 5-bit rows with x in
    one int8 plane beat torch's fp32 GEMM at every size measured (Q4_1 at 512 rows 451 ms against 702-739, at
    2048 2082 against 2759); Q8_0's one-plane products (a sign flip and a widening per unit) do not. The
    K-quants' interleaved rows with two planes stop at QUANT_KERNEL_ROWS like GGUF's order: 14 weights of
    576 x 1536 at 96 / 128 / 256 rows, interleaved dots against tiles, Q4_K 23.4 / 34.6 / - against 22.1 / 27.7 / -,
    Q5_K 32.7 / 43.5 / 85.5 against 24.4 / 30.4 / 48.3, Q6_K - / 31.3 / 79.7 against - / 34.6 / 59.6 ms."""
    if not interleaved or (code in K_QUANT_CODES and not int8_activations):
        return QUANT_KERNEL_ROWS
    if int8_activations:
        return INTERLEAVED_INT8_Q8_0_ROWS if code == GGUF_TYPES["Q8_0"] else float("inf")
    return INTERLEAVED_KERNEL_ROWS[code]


def interleaves(qtype: int, lib=None) -> bool:
    """Whether the kernel library reads weights of this ggml type faster with their rows interleaved (ROWS8)."""
    lib = lib if lib is not None else library()
    return lib is not None and bool(lib.interleaves(qtype))


def tiled_linear(x: torch.Tensor, code: int, blocks: torch.Tensor, lib, interleaved: bool = False) -> torch.Tensor:
    """x [M, K] fp32 @ W.T for many rows: W's rows dequantized into one scratch tile of at most TILE_FLOATS values
    (whole groups of INTERLEAVE rows), each tile's outputs computed by F.linear, into their columns of y where W
    takes more than one tile (a few % faster, under load, than torch.mm into rows of y.T and one transpose)."""
    n, k = blocks.shape[0], x.shape[1]
    if code == GGUF_TYPES["F32"]:
        return torch.nn.functional.linear(x, blocks.view(torch.float32))
    per_tile = max(INTERLEAVE, TILE_FLOATS // k // INTERLEAVE * INTERLEAVE)
    scratch = torch.empty(min(n, per_tile) * k)
    if n <= per_tile:  # one tile: W whole
        tile = dequantize(code, blocks, k, lib=lib, out=scratch.view(n, k), interleaved=interleaved)
        return torch.nn.functional.linear(x, tile)
    y = x.new_empty(x.shape[0], n)
    for start in range(0, n, per_tile):
        rows = min(per_tile, n - start)
        tile = scratch[: rows * k].view(rows, k)
        tile = dequantize(code, blocks[start : start + rows], k, lib=lib, out=tile, interleaved=interleaved)
        y[:, start : start + rows] = torch.nn.functional.linear(x, tile)
    return y


def linear_f32(
    x: torch.Tensor,
    weight: torch.Tensor,
    kind: int,
    n: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lib=None,
) -> torch.Tensor:
    """x [M, K] fp32 @ W[n, K]^T (+ bias) by the C linear_f32: W a plain fp32 weight (kind F32) or its GGUF blocks as
    stored (kind: ggml's type id, with X_INT8 for x in one int8 plane). Into `out` [M, n] where given (its rows may
    lie further apart: n columns of a wider tensor). lib: the kernel library (default: the native one)."""
    y = x.new_empty(x.shape[0], n) if out is None else out
    if y.shape != (x.shape[0], n) or y.stride(1) != 1:
        raise ValueError(f"linear_f32 writes [{x.shape[0]}, {n}] with unit column stride, not {tuple(y.shape)}")
    rc = (lib or library()).linear_f32(
        x.data_ptr(),
        x.shape[0],
        weight.data_ptr(),
        kind,
        n,
        x.shape[1],
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        y.stride(0),
        torch.get_num_threads(),
    )
    if rc:
        raise ValueError(f"linear_f32 does not take weight type {kind} with K = {x.shape[1]}, {n} rows (code {rc})")
    return y


def quant_linear(
    x: torch.Tensor,
    qtype: int | str,
    blocks: torch.Tensor,
    bias: torch.Tensor | None = None,
    lib=None,
    int8_activations: bool = False,
    interleaved: bool = False,
) -> torch.Tensor | None:
    """y [M, N] = x [M, K] @ W.T (+ bias), W's N rows as GGUF stores them in `blocks` (uint8 [N, row bytes],
    contiguous), read in place (quant_linear.c: x quantized to int8 blocks, integer dot products); above
    kernel_rows rows (QUANT_KERNEL_ROWS; for interleaved rows INTERLEAVED_KERNEL_ROWS, per type), tiles of W
    dequantized and torch.mm.
    x fp32 or bf16 (computed in fp32, returned in x's dtype). None where the kernel does not apply (not CPU,
    another dtype or layout, no compiler): the caller uses torch. ValueError for a type it cannot read or K not
    in its blocks.
    lib: the kernel library (tests pass library("portable")). int8_activations: x in one int8 plane per block
    (X_INT8) instead of two. interleaved: W's rows interleaved 8 at a time (ROWS8)."""
    lib = lib if lib is not None else library()
    if not (
        lib is not None
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous()
        and blocks.dtype == torch.uint8
        and blocks.dim() == 2
        and blocks.is_contiguous()
        and (bias is None or (bias.dtype in (torch.float32, torch.bfloat16) and bias.is_contiguous()))
    ):
        return None
    m, k = x.shape
    code = GGUF_TYPES.get(qtype) if isinstance(qtype, str) else qtype
    shape = BLOCK_SHAPES.get(code)
    if shape is None or k % shape.elems or blocks.shape[1] != k // shape.elems * shape.nbytes:  # ~130 calls a step
        code, _ = block_shape(qtype, k)  # raises for the type or K
        raise ValueError(
            f"GGUF {TYPE_NAMES[code]} rows of {k} weights take {row_bytes(code, k)} bytes; blocks has rows of "
            f"{blocks.shape[1]}"
        )
    xf = x.float()
    bf = None if bias is None else bias.float()
    if m > kernel_rows(code, interleaved, int8_activations):
        y = tiled_linear(xf, code, blocks, lib, interleaved)
        if bf is not None:
            y += bf
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    kind = code | (X_INT8 if int8_activations else 0) | (ROWS8 if interleaved else 0)
    y = linear_f32(xf, blocks, kind, blocks.shape[0], bf, lib=lib)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def dequantize(
    qtype: int | str,
    blocks: torch.Tensor,
    k: int,
    ids: torch.Tensor | None = None,
    lib=None,
    out: torch.Tensor | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rows of a GGUF weight (blocks: uint8, contiguous, rows of k weights as stored) as fp32 [n, k], the values
    gguf-py's gguf.dequantize computes: all rows, or those at `ids` (int64, e.g. an embedding lookup). Without a
    compiler, gguf-py's numpy code computes them. out: where to write them (contiguous fp32 [n, k], e.g. a
    scratch tile reused), else a new tensor. interleaved: the rows interleaved 8 at a time (ROWS8; ids still
    count rows)."""
    lib = lib if lib is not None else library()
    code, _ = block_shape(qtype, k)
    nbytes = row_bytes(code, k)
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous() or blocks.numel() % nbytes:
        raise ValueError(
            f"dequantize reads contiguous uint8 rows of {nbytes} bytes ({TYPE_NAMES[code]}, {k} weights); got "
            f"{blocks.dtype} {tuple(blocks.shape)}"
        )
    rows = blocks.numel() // nbytes
    if interleaved and (rows % INTERLEAVE or code not in INTERLEAVED_TYPES):
        raise ValueError(
            f"interleaved rows are {'/'.join(TYPE_NAMES[t] for t in INTERLEAVED_TYPES)} blocks in groups of "
            f"{INTERLEAVE}; got {rows} rows of {TYPE_NAMES[code]}"
        )
    if ids is not None:
        ids = ids.to(torch.int64).contiguous().view(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            raise IndexError(f"row ids must lie in [0, {rows}); got {int(ids.min())} .. {int(ids.max())}")
    n = rows if ids is None else len(ids)
    if lib is None:
        import gguf

        stored = deinterleave_rows(blocks.view(rows, nbytes), code) if interleaved else blocks.view(rows, nbytes)
        picked = stored if ids is None else stored[ids]
        values = torch.from_numpy(gguf.dequantize(picked.numpy(), gguf.GGMLQuantizationType(code)).reshape(n, k))
        return values.clone() if out is None else out.copy_(values)
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    elif not (out.dtype == torch.float32 and out.is_contiguous() and out.shape == (n, k)):
        raise ValueError(f"dequantize writes into a contiguous fp32 [{n}, {k}]; got {out.dtype} {tuple(out.shape)}")
    rc = lib.dequantize_rows(
        blocks.data_ptr(),
        code | (ROWS8 if interleaved else 0),
        k,
        None if ids is None else ids.data_ptr(),
        n,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"dequantize_rows failed ({rc}) on {TYPE_NAMES[code]} rows of {k}")
    return out

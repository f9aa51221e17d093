"""The C kernels that read GGUF weights as stored (kernels/cpu/quant_linear.c, dequantize.c), for every type they
read and both library variants (native: AVX2 where the CPU has it; portable: -march=x86-64, the plain-C paths),
against gguf-py's own dequantize and a float64 torch reference.

Tolerance of quant_linear: x is quantized per block (32 values, or a K-quant's 256) to int8, q = round(x / d) with
d = max |x_block| / 127, so each value is off by at most d / 2 = max |x_block| / 254, and a block's dot product with
weights w by at most max |x_block| / 254 * sum |w_block|. Per output: the sum of that over the row's blocks (a
relative error of ~1/254 .. 1/127 of a block's dot in the worst case), plus fp32 rounding (1e-5 of sum |x| |w|).
That is one plane (int8_activations=True, llama.cpp's numerics). By default a second plane holds the rest to
1/LOW_SCALE = 1/256 of d: each value off by at most d / 256 (a residue of exactly half a step saturates at 127/256),
the bound 128 times tighter. F32 and F16 weights take fp32 FMAs on x as given: 1e-5 of sum |x| |w|."""

import gguf
import numpy as np
import pytest
import torch

from nanovllm.kernels import cpu
from nanovllm.kernels.cpu import quant
from nanovllm.kernels.cpu.build import library
from nanovllm.layers.quant import INTERLEAVED_TYPES, QuantWeight, dequantize_rows, dequantize_torch, interleave_rows

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler here")

VARIANTS = ["native", "portable"]
SCALE_OFFSETS = {  # where each type's fp16 scales lie in its block (the rest: quantized values, random bytes)
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
ROWS = [1, 3, 17, 33]  # N: not multiples of the kernel's CHUNK (16) or X_ROWS (4)
BATCH = [1, 2, 5, 33]  # M: X_ROWS groups and their remainders
FP32_SLACK = 1e-5


def half_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """n sane fp16 scales, some zero, some extreme (the largest fp16, the smallest normal one, a subnormal)."""
    v = (rng.standard_normal(n) * 0.02).astype(np.float16)
    pick = rng.random(n)
    v[pick < 0.1] = 0
    v[(pick >= 0.1) & (pick < 0.13)] = 65504
    v[(pick >= 0.13) & (pick < 0.16)] = 6e-5
    v[(pick >= 0.16) & (pick < 0.18)] = -6e-8
    return v


def random_blocks(name: str, n: int, k: int, seed: int) -> torch.Tensor:
    """uint8 [n, row bytes] of type `name`: random bytes (so random q, fifth bits and K-quant 6-bit scales), the
    fp16 scales overwritten with half_values; F32 / F16: random weights."""
    rng = np.random.default_rng(seed)
    if name == "F32":
        return torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32).view(np.uint8).copy())
    if name == "F16":
        return torch.from_numpy(half_values(rng, n * k).reshape(n, k).view(np.uint8).copy())
    shape = cpu.BLOCK_SHAPES[cpu.GGUF_TYPES[name]]
    blocks = rng.integers(0, 256, (n, k // shape.elems, shape.nbytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        blocks[..., offset : offset + 2] = half_values(rng, n * k // shape.elems).reshape(n, -1, 1).view(np.uint8)
    return torch.from_numpy(blocks.reshape(n, -1))


def reference(name: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    w = gguf.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(len(blocks), k))


def row_length(name: str) -> int:
    return {1: 80, 32: 160, 256: 512}[cpu.BLOCK_SHAPES[cpu.GGUF_TYPES[name]].elems]  # F32/F16: not in 16s


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(cpu.GGUF_TYPES))
def test_dequantize_equals_gguf_bit_for_bit(name, variant):
    k, lib = row_length(name), library(variant)
    for n in ROWS:
        blocks = random_blocks(name, n, k, seed=n)
        expected = reference(name, blocks, k)
        got = cpu.dequantize(name, blocks, k, lib=lib)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (name, n)
        ids = torch.tensor([n - 1, 0, n // 2, 0])
        assert torch.equal(cpu.dequantize(cpu.GGUF_TYPES[name], blocks, k, ids=ids, lib=lib), expected[ids])


def error_bound(name: str, x: torch.Tensor, w: torch.Tensor, planes: int = 2) -> torch.Tensor:
    """[M, N]: what activations in `planes` int8 planes may cost each output (module docstring), in float64."""
    x, w = x.double(), w.double()
    total = x.abs() @ w.abs().T
    elems = cpu.BLOCK_SHAPES[cpu.GGUF_TYPES[name]].elems
    if elems == 1:  # F32, F16: x not quantized
        return FP32_SLACK * total
    m, k = x.shape
    x_max = x.abs().view(m, k // elems, elems).amax(2)  # [M, blocks]
    w_sum = w.abs().view(len(w), k // elems, elems).sum(2)  # [N, blocks]
    per_value = 1 / 254 if planes == 1 else 1 / (127 * 256)  # of max |x_block|
    return x_max @ w_sum.T * per_value * 1.001 + FP32_SLACK * total


@pytest.mark.parametrize("planes", [2, 1])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(cpu.GGUF_TYPES))
def test_quant_linear_within_its_bound(name, variant, planes):
    k, lib = row_length(name), library(variant)
    gen = torch.Generator().manual_seed(0)
    for n in ROWS:
        blocks = random_blocks(name, n, k, seed=100 + n)
        w = reference(name, blocks, k)
        bias = torch.randn(n, generator=gen)
        for m in BATCH:
            x = torch.randn(m, k, generator=gen)
            x[:, :16] *= 50  # one block far larger than the others: the bound is per block
            expected = x.double() @ w.double().T
            got = cpu.quant_linear(x, name, blocks, lib=lib, int8_activations=planes == 1)
            assert got.dtype == torch.float32 and got.shape == (m, n)
            err = (got.double() - expected).abs()
            bound = error_bound(name, x, w, planes)
            assert (err <= bound).all(), (name, n, m, (err - bound).max().item())
            with_bias = cpu.quant_linear(x, name, blocks, bias, lib=lib, int8_activations=planes == 1)
            assert torch.allclose(with_bias, got + bias, rtol=0, atol=1e-6 * got.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_second_plane_is_used(name, variant):
    """The two-plane bound is tight enough that one plane's results fall outside it: the second plane counts."""
    k, n, lib = row_length(name), 17, library(variant)
    blocks = random_blocks(name, n, k, seed=11)
    w = reference(name, blocks, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(11))
    one_plane = cpu.quant_linear(x, name, blocks, lib=lib, int8_activations=True)
    err = (one_plane.double() - x.double() @ w.double().T).abs()
    assert (err > error_bound(name, x, w, planes=2)).any()


def test_quant_linear_is_not_vacuous():
    """The bound is tight enough to catch a dropped term: Q4_1 without its minimum is far outside it."""
    k, n = 160, 17
    blocks = random_blocks("Q4_1", n, k, seed=7)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(7))
    no_min = blocks.clone().view(n, k // 32, 20)
    no_min[..., 2:4] = 0  # m = 0
    w_without = reference("Q4_1", no_min.view(n, -1), k)
    got = cpu.quant_linear(x, "Q4_1", blocks)
    assert got is not None
    err = (got.double() - x.double() @ w_without.double().T).abs()
    assert (err > error_bound("Q4_1", x, w_without)).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_activations_round_trip_through_fp32(variant):
    k, n, lib = 160, 33, library(variant)
    blocks = random_blocks("Q8_0", n, k, seed=3)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    got = cpu.quant_linear(x, "Q8_0", blocks, lib=lib)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, cpu.quant_linear(x.float(), "Q8_0", blocks, lib=lib).bfloat16())


def test_bad_inputs_name_the_type_and_the_rule():
    x = torch.randn(2, 576)
    with pytest.raises(ValueError, match="Q2_K"):
        cpu.quant_linear(x, "Q2_K", torch.zeros(3, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="99"):
        cpu.quant_linear(x, 99, torch.zeros(3, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"Q4_K .*blocks of 256.*576"):
        cpu.quant_linear(x, "Q4_K", torch.zeros(3, 324, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"Q4_1 rows of 576 weights take 360 bytes"):
        cpu.quant_linear(x, "Q4_1", torch.zeros(3, 359, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"Q6_K .*blocks of 256.*100"):
        cpu.dequantize("Q6_K", torch.zeros(3, 210, dtype=torch.uint8), 100)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        cpu.dequantize("Q8_0", torch.zeros(3, 34, dtype=torch.uint8), 32, ids=torch.tensor([3]))
    lib = library()  # the C functions themselves: nonzero, never a crash
    y = torch.empty(2, 3)
    w = torch.zeros(3, 360, dtype=torch.uint8)
    assert lib.linear_f32(x.data_ptr(), 2, w.data_ptr(), 99, 3, 576, None, y.data_ptr(), 3, 1) != 0
    assert lib.linear_f32(x.data_ptr(), 2, w.data_ptr(), cpu.GGUF_TYPES["Q4_K"], 3, 576, None, y.data_ptr(), 3, 1) != 0
    assert lib.dequantize_rows(w.data_ptr(), 99, 576, None, 3, y.data_ptr(), 1) != 0


def test_declines_what_it_does_not_serve():
    blocks = random_blocks("Q8_0", 4, 64, seed=1)
    assert cpu.quant_linear(torch.randn(2, 64).half(), "Q8_0", blocks) is None  # fp16 activations
    assert cpu.quant_linear(torch.randn(64, 2).T, "Q8_0", blocks) is None  # not contiguous
    assert cpu.quant_linear(torch.randn(2, 64), "Q8_0", blocks.view(-1)) is None  # not [N, row bytes]


def test_ggml_ids_are_ggufs():
    for name, code in cpu.GGUF_TYPES.items():
        assert gguf.GGMLQuantizationType[name] == code
        shape = cpu.BLOCK_SHAPES[code]
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (shape.elems, shape.nbytes)
    assert cpu.BF16 == gguf.GGMLQuantizationType.BF16


def test_dequantize_into_a_scratch_and_without_a_compiler(monkeypatch):
    """`out` receives the rows (a reused tile); without a compiler gguf-py computes the same values and
    quant_linear declines (the caller then uses torch)."""
    blocks = random_blocks("Q5_0", 9, 576, seed=5)
    expected = reference("Q5_0", blocks, 576)
    scratch = torch.empty(4, 576)
    assert cpu.dequantize("Q5_0", blocks[2:6], 576, out=scratch) is scratch
    assert torch.equal(scratch, expected[2:6])
    with pytest.raises(ValueError, match=r"contiguous fp32 \[4, 576\]"):
        cpu.dequantize("Q5_0", blocks[2:6], 576, out=torch.empty(4, 575))
    monkeypatch.setattr(quant, "library", lambda: None)
    ids = torch.tensor([8, 1])
    assert torch.equal(cpu.dequantize("Q5_0", blocks, 576, ids=ids), expected[ids])
    assert cpu.quant_linear(torch.randn(2, 576), "Q5_0", blocks) is None


def test_no_rows():
    blocks = random_blocks("Q4_1", 3, 64, seed=2)
    assert cpu.quant_linear(torch.empty(0, 64), "Q4_1", blocks).shape == (0, 3)
    assert cpu.dequantize("Q4_1", blocks, 64, ids=torch.empty(0, dtype=torch.int64)).shape == (0, 64)


@pytest.mark.parametrize("tile_floats", [quant.TILE_FLOATS, 64 * 256])
@pytest.mark.parametrize("name", ["F32", "F16", "Q4_1", "Q5_0", "Q6_K"])
def test_many_rows_take_dequantized_tiles(name, tile_floats, monkeypatch):
    """From TILE_FROM_ROWS rows on, W is dequantized a tile at a time (exact values) and multiplied in fp32: within
    fp32 rounding of the reference, W whole in one tile and across tiles (the last one shorter), bf16 x too."""
    monkeypatch.setattr(quant, "TILE_FLOATS", tile_floats)
    k, n, m = row_length(name), 3 * 64 + 37, quant.TILE_FROM_ROWS + 3
    blocks = random_blocks(name, n, k, seed=11)
    w = reference(name, blocks, k)
    gen = torch.Generator().manual_seed(11)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    got = cpu.quant_linear(x, name, blocks, bias)
    expected = x.double() @ w.double().T + bias.double()
    assert got.shape == (m, n) and got.is_contiguous()
    assert ((got.double() - expected).abs() <= FP32_SLACK * (x.double().abs() @ w.double().abs().T + 1)).all()
    assert cpu.quant_linear(x.bfloat16(), name, blocks).dtype == torch.bfloat16


INTERLEAVED = [cpu.TYPE_NAMES[t] for t in INTERLEAVED_TYPES]


@pytest.mark.parametrize("planes", [2, 1])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", INTERLEAVED)
def test_interleaved_rows_give_the_same_products(name, variant, planes):
    """Rows interleaved 8 at a time (ROWS8: 8 rows' blocks side by side, what the AVX2 kernel reads fastest) give
    what the rows in GGUF's order give, within the same bound, in the kernel and in dequantize (bit for bit)."""
    k, lib, code = row_length(name), library(variant), cpu.GGUF_TYPES[name]
    gen = torch.Generator().manual_seed(1)
    for n in [8, 24, 40]:  # groups of 8; more groups than the threads' chunk of 2
        blocks = random_blocks(name, n, k, seed=200 + n)
        mixed = interleave_rows(blocks, code)
        assert not torch.equal(mixed, blocks)
        w = reference(name, blocks, k)
        got = cpu.dequantize(name, mixed, k, lib=lib, interleaved=True)
        assert torch.equal(got.view(torch.int32), w.view(torch.int32))
        ids = torch.tensor([n - 1, 0, 9 % n, 3])
        assert torch.equal(cpu.dequantize(name, mixed, k, ids=ids, lib=lib, interleaved=True), w[ids])
        weight = QuantWeight(code, mixed, (n, k), interleaved=True)
        assert torch.equal(dequantize_torch(weight), w) and torch.equal(dequantize_rows(weight, ids), w[ids])
        bias = torch.randn(n, generator=gen)
        for m in BATCH + [8]:
            x = torch.randn(m, k, generator=gen)
            x[:, :16] *= 50
            expected = x.double() @ w.double().T
            got = cpu.quant_linear(x, name, mixed, lib=lib, int8_activations=planes == 1, interleaved=True)
            ordered = cpu.quant_linear(x, name, blocks, lib=lib, int8_activations=planes == 1)
            err = (got.double() - expected).abs()
            assert (err <= error_bound(name, x, w, planes)).all(), (name, n, m)
            assert torch.allclose(got, ordered, rtol=1e-5, atol=1e-5 * ordered.abs().max().item()), (name, n, m)
            with_bias = cpu.quant_linear(x, name, mixed, bias, lib=lib, int8_activations=planes == 1, interleaved=True)
            assert torch.allclose(with_bias, got + bias, rtol=0, atol=1e-6 * got.abs().max().item() + 1e-6)
        many = max(cpu.INTERLEAVED_KERNEL_ROWS.values()) + 3  # rows: dequantized tiles, torch's GEMM
        x = torch.randn(many, k, generator=gen)
        tiles = cpu.quant_linear(x, name, mixed, lib=lib, interleaved=True)
        assert torch.allclose(tiles, x @ w.T, rtol=1e-5, atol=1e-5 * (x.abs() @ w.abs().T).max().item())


def test_interleaving_needs_groups_of_8():
    blocks = random_blocks("Q4_1", 12, 64, seed=0)
    with pytest.raises(ValueError, match="groups of 8"):
        cpu.dequantize("Q4_1", blocks, 64, interleaved=True)
    with pytest.raises(ValueError, match="code 4"):
        cpu.quant_linear(torch.randn(1, 64), "Q4_1", blocks, interleaved=True)


def test_kernel_rows_per_layout_and_type():
    """Where quant_linear hands over to dequantized tiles: GGUF's order and the K-quants' interleaved rows with two
    planes at QUANT_KERNEL_ROWS, the 32-blocks' interleaved rows at INTERLEAVED_KERNEL_ROWS (per type: where
    their dots and the tiles crossed); with one plane, interleaved 4- and 5-bit rows never, Q8_0 at 256."""
    from nanovllm.kernels.cpu.quant import kernel_rows

    codes = cpu.GGUF_TYPES
    for name in ("Q4_1", "Q4_K", "Q6_K"):
        assert kernel_rows(codes[name], False, False) == cpu.QUANT_KERNEL_ROWS
    for name in ("Q4_K", "Q5_K", "Q6_K"):
        assert kernel_rows(codes[name], True, False) == cpu.QUANT_KERNEL_ROWS
        assert kernel_rows(codes[name], True, True) == float("inf")
    expected = {"Q4_0": 512, "Q4_1": 512, "Q5_0": 320, "Q5_1": 320, "Q8_0": 160}
    for name, rows in expected.items():
        assert kernel_rows(codes[name], True, False) == cpu.INTERLEAVED_KERNEL_ROWS[codes[name]] == rows
    assert kernel_rows(codes["Q8_0"], True, True) == 256

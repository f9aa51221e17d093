"""A GGUF weight kept quantized (QuantWeight), and its dequantization in plain torch: the formats' equations.

Each row of a [N, K] matrix is K / block_elems blocks of bytes, as llama.cpp writes them. A block holds fp16
scale(s) and small integers q; the weights are w = d * q (+ m, or - dmin * m). Every function here computes in
fp32 in the same order as gguf-py's numpy code, so `dequantize_torch` equals `gguf.dequantize` bit for bit: it is
the reference our C kernels (kernels/cpu) are tested against and what ops/torch_ops.linear reads."""

import functools
from dataclasses import dataclass

import torch

QK_K = 256  # the K-quants' super-block: 256 weights in 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks of their own scale
# the types a layer can keep quantized: ggml's type ids (as gguf.GGMLQuantizationType numbers them; written out
# here so that the reference needs no gguf import)
F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 1, 2, 3, 6, 7, 8, 12, 13, 14
NAMES = {F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0"}
NAMES |= {Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
# type -> (weights per block, bytes per block)
BLOCK_SIZES = {F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34)}
BLOCK_SIZES |= {Q4_K: (QK_K, 144), Q5_K: (QK_K, 176), Q6_K: (QK_K, 210)}
SUPPORTED = ", ".join(NAMES.values())


@dataclass
class QuantWeight:
    """A [N, K] weight as GGUF stores it: `blocks` uint8 [N, K / block_elems * block_bytes], one row per output."""

    qtype: int  # the ggml type id (F16, Q4_0, ... above)
    blocks: torch.Tensor
    shape: tuple[int, int]  # (N, K)
    # multiplied with x rounded to int8 per block, as llama.cpp does (quantization="gguf_int8"), instead of to 16 bits
    int8_activations: bool = False
    # rows interleaved INTERLEAVE at a time (interleave_rows), as the CPU kernel reads them fastest; else GGUF's order
    interleaved: bool = False


@dataclass
class QuantParts:
    """A fused weight (qkv, gate/up) whose parts GGUF stores in types no one type holds exactly (a larger model's
    Q4_K_M: q/k in Q4_K beside v in Q6_K): each part's rows their own QuantWeight, in the fused order along the
    outputs. The linear runs once per part into its columns of y."""

    parts: list[QuantWeight]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]


def parts_of(w: "QuantWeight | QuantParts") -> list[QuantWeight]:
    """The QuantWeights a kept weight is made of: its parts, or itself."""
    return w.parts if isinstance(w, QuantParts) else [w]


def fp16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2] -> fp32 [..., 1] (exact)."""
    return b.contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes [n, groups * group] -> 4-bit values [n, groups * 2 * group]: within each group of bytes, the low
    nibbles first, then the high ones (the order llama.cpp packs them in)."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][16 bytes: 32 x 4-bit q]: w = d * (q - 8)."""
    d = fp16(b[:, :2])
    q = nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][m fp16][16 bytes: 32 x 4-bit q]: w = d * q + m."""
    d, m = fp16(b[:, :2]), fp16(b[:, 2:4])
    q = nibbles(b[:, 4:], 16).float()
    return d * q + m


def high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1's 4 bytes of fifth bits -> [n, 32]: weight j's is bit j of the little-endian uint32."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][4 bytes: 32 high bits][16 bytes: 32 x 4 low bits]: w = d * (q - 16), q 5 bits."""
    d = fp16(b[:, :2])
    q = (nibbles(b[:, 6:], 16) | (high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][m fp16][4 bytes: 32 high bits][16 bytes: 32 x 4 low bits]: w = d * q + m, q 5 bits."""
    d, m = fp16(b[:, :2]), fp16(b[:, 2:4])
    q = (nibbles(b[:, 8:], 16) | (high_bits(b[:, 4:8]) << 4)).float()
    return d * q + m


def q8_0(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][32 x int8 q]: w = q * d."""
    d = fp16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return q * d


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and 6-bit mins. Bytes 0-3 hold scales 0-3 (low 6
    bits), 4-7 mins 0-3; scales and mins 4-7 are byte 8-11's low / high nibble plus bytes 0-3 / 4-7's top 2 bits."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, mins


def q4_k(b: torch.Tensor) -> torch.Tensor:
    """[d fp16][dmin fp16][12 bytes: 8 scales, 8 mins][128 bytes: 256 x 4-bit q]: sub-block i's
    w = (d * scale_i) * q - (dmin * min_i)."""
    n = b.shape[0]
    scale, mins = k_scales(b[:, 4:16])
    d = (fp16(b[:, :2]) * scale.float()).reshape(n, -1, 1)
    dm = (fp16(b[:, 2:4]) * mins.float()).reshape(n, -1, 1)
    q = nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K with a fifth bit per weight: [d][dmin][12 bytes of scales][32 bytes: bit j of byte i is weight
    32 j + i's][128 bytes: 256 x 4 low bits]."""
    n = b.shape[0]
    scale, mins = k_scales(b[:, 4:16])
    d = (fp16(b[:, :2]) * scale.float()).reshape(n, -1, 1)
    dm = (fp16(b[:, 2:4]) * mins.float()).reshape(n, -1, 1)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1  # [n, 8 sub-blocks, 32]
    q = (nibbles(b[:, 48:], 32).reshape(n, 8, 32) | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    """[128 bytes: 256 x 4 low bits][64 bytes: 256 x 2 high bits][16 x int8 scales][d fp16]: each 16 weights'
    w = (d * scale) * (q - 32), q 6 bits. Per half of 128 weights: low bits from 64 bytes (low then high
    nibbles), high bits from 32 bytes (bits 0-1, 2-3, 4-5, 6-7: a quarter each)."""
    n = b.shape[0]
    scale = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (fp16(b[:, 208:210]) * scale).reshape(n, QK_K // 16, 1)
    low = nibbles(b[:, :128], 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, -1)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


def f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


BLOCKS = {F16: f16, Q4_0: q4_0, Q4_1: q4_1, Q5_0: q5_0, Q5_1: q5_1, Q8_0: q8_0, Q4_K: q4_k, Q5_K: q5_k, Q6_K: q6_k}


def dequantize_torch(w: QuantWeight | QuantParts) -> torch.Tensor:
    """The weight as fp32 [N, K], equal to gguf.dequantize of the same bytes (a QuantParts: its parts' rows)."""
    if isinstance(w, QuantParts):
        return torch.cat([dequantize_torch(p) for p in w.parts])
    n, k = w.shape
    elems, size = BLOCK_SIZES[w.qtype]
    stored = deinterleave_rows(w.blocks, w.qtype) if w.interleaved else w.blocks
    blocks = stored.reshape(n * (k // elems), size)
    return BLOCKS[w.qtype](blocks).reshape(n, k)


# Rows interleaved for the CPU kernel (kernels.h ROWS8): rows 8g .. 8g + 7's block b lie in one run of 8 blocks'
# bytes, first the fp16 scales (d, then m) of the 8 rows side by side, then the rest of each block (fifth bits, q)
# in units of 4 bytes, unit by unit, the 8 rows' side by side: a 32-byte load then holds 4 values of each of 8 rows
INTERLEAVE = 8
INTERLEAVED_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)  # every quantized type
SCALE_BYTES = {Q4_0: 2, Q4_1: 4, Q5_0: 2, Q5_1: 4, Q8_0: 2, Q4_K: 4, Q5_K: 4, Q6_K: 0}  # leading fp16 scales
TAIL_BYTES = {Q6_K: 2}  # a trailing fp16 scale (Q6_K's d)


@functools.cache
def run_order(qtype: int) -> torch.Tensor:
    """For each byte of an interleaved run, where it comes from in the 8 blocks [8, block bytes] (flattened).
    Computed once per type (an embedding lookup of the reference deinterleaves its rows' groups every step)."""
    size, scales = BLOCK_SIZES[qtype][1], SCALE_BYTES[qtype]
    body = size - TAIL_BYTES.get(qtype, 0)
    order = torch.empty(INTERLEAVE * size, dtype=torch.long)
    for r in range(INTERLEAVE):
        for j in range(size):
            if j < scales:
                at = (j // 2 * INTERLEAVE + r) * 2 + j % 2
            elif j >= body:
                at = INTERLEAVE * body + ((j - body) // 2 * INTERLEAVE + r) * 2 + j % 2
            else:
                at = INTERLEAVE * scales + ((j - scales) // 4 * INTERLEAVE + r) * 4 + (j - scales) % 4
            order[at] = r * size + j
    return order


def interleave_rows(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """GGUF's rows [N, row bytes] (N a multiple of INTERLEAVE) -> the same bytes interleaved (same shape)."""
    n, nbytes = blocks.shape
    size = BLOCK_SIZES[qtype][1]
    runs = blocks.reshape(n // INTERLEAVE, INTERLEAVE, nbytes // size, size).transpose(1, 2)
    runs = runs.reshape(n // INTERLEAVE, nbytes // size, INTERLEAVE * size)
    return runs[..., run_order(qtype)].reshape(n, nbytes).contiguous()


def deinterleave_rows(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """interleave_rows undone: GGUF's rows again."""
    n, nbytes = blocks.shape
    size = BLOCK_SIZES[qtype][1]
    runs = torch.empty_like(blocks).reshape(n // INTERLEAVE, nbytes // size, INTERLEAVE * size)
    runs[..., run_order(qtype)] = blocks.reshape(runs.shape)
    return runs.reshape(n // INTERLEAVE, nbytes // size, INTERLEAVE, size).transpose(1, 2).reshape(n, nbytes)


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of K weights."""
    elems, size = BLOCK_SIZES[qtype]
    return k // elems * size


def dequantize_rows(w: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the weight as fp32 [len(ids), K]: an embedding lookup (only those rows' blocks are read)."""
    flat = ids.flatten()
    if w.interleaved:  # the groups of INTERLEAVE rows that hold them, back in GGUF's order
        width = w.blocks.shape[1]
        groups = deinterleave_rows(w.blocks.view(-1, INTERLEAVE, width)[flat // INTERLEAVE].flatten(0, 1), w.qtype)
        rows = groups.view(-1, INTERLEAVE, width)[torch.arange(len(flat)), flat % INTERLEAVE]
    else:
        rows = w.blocks[flat]
    return dequantize_torch(QuantWeight(w.qtype, rows, (rows.shape[0], w.shape[1]))).view(*ids.shape, w.shape[1])

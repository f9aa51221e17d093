"""The fused mixture-of-experts Triton kernels (the GPU backend's ops.fused_experts; torch_ops has the reference).

The (token, choice) pairs are sorted by expert and each expert's run is padded to a whole number of BLOCK_M rows
(`align`, in torch ops on the GPU: no host sync, so a decode step can be captured in a CUDA graph); a tile of
BLOCK_M rows then belongs to one expert, read from the stacked weights.
- _gate_up: per tile and per BLOCK_N columns of the intermediate size, x[token] @ the expert's gate and up rows,
  silu(gate) * up into an intermediate buffer (one row per sorted pair).
- _down: per tile and per BLOCK_N columns of the hidden size, the intermediate rows @ the expert's down rows,
  times the pair's routing weight, into the pair's output row; the k rows of a token are summed after.
Accumulation in fp32 (ieee dots: exact in fp32, the interpreter tests); inputs fp32, bf16 or fp16. Compiled for
sm_90 in bf16 without a GPU (Triton's ptxas): 16-row tiles on mma.sync, 64-row tiles on wgmma, no spills; never run
on a GPU yet.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up(
    x_ptr,
    w_ptr,
    out_ptr,
    ids_ptr,
    experts_ptr,
    num_pairs,
    top_k,
    H,
    I,
    num_experts,
    sx,
    sw0,
    sw1,
    so,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b, nb = tl.program_id(0), tl.program_id(1)
    e = tl.load(experts_ptr + b)
    if e < num_experts:  # else a tile past the last expert's run
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(ids_ptr + rows)
        valid = pairs < num_pairs  # padding rows carry num_pairs
        tokens = tl.where(valid, pairs // top_k, 0)
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w = w_ptr + e.to(tl.int64) * sw0
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + tokens[:, None] * sx + ks[None, :], mask=valid[:, None] & (ks[None, :] < H), other=0.0)
            wmask = (ks[:, None] < H) & (cols[None, :] < I)
            wg = tl.load(w + cols[None, :] * sw1 + ks[:, None], mask=wmask, other=0.0)
            wu = tl.load(w + (cols[None, :] + I) * sw1 + ks[:, None], mask=wmask, other=0.0)
            gate += tl.dot(a, wg, input_precision="ieee")
            up += tl.dot(a, wu, input_precision="ieee")
        h = gate * tl.sigmoid(gate) * up
        tl.store(
            out_ptr + rows[:, None] * so + cols[None, :],
            h.to(out_ptr.dtype.element_ty),
            mask=valid[:, None] & (cols[None, :] < I),
        )


@triton.jit
def _down(
    h_ptr,
    w_ptr,
    out_ptr,
    weights_ptr,
    ids_ptr,
    experts_ptr,
    num_pairs,
    H,
    I,
    num_experts,
    sh,
    sw0,
    sw1,
    so,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b, nb = tl.program_id(0), tl.program_id(1)
    e = tl.load(experts_ptr + b)
    if e < num_experts:
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(ids_ptr + rows)
        valid = pairs < num_pairs
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w = w_ptr + e.to(tl.int64) * sw0
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(h_ptr + rows[:, None] * sh + ks[None, :], mask=valid[:, None] & (ks[None, :] < I), other=0.0)
            wd = tl.load(w + cols[None, :] * sw1 + ks[:, None], mask=(ks[:, None] < I) & (cols[None, :] < H), other=0.0)
            acc += tl.dot(a, wd, input_precision="ieee")
        weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + pairs[:, None] * so + cols[None, :],
            (acc * weight[:, None]).to(out_ptr.dtype.element_ty),
            mask=valid[:, None] & (cols[None, :] < H),
        )


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids, tile_experts): the pair indices (token * k + choice) sorted by expert, each expert's run padded
    to a multiple of block_m with the index num_pairs; the expert of each block_m tile (num_experts past the last
    run). Sized by the worst case, so the shapes depend only on the number of pairs."""
    flat = topk_ids.flatten()
    n = flat.numel()
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))  # (bincount would sync)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # place within its expert's run
    tiles = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m)
    sorted_ids = torch.full((tiles * block_m,), n, dtype=torch.int64, device=flat.device)
    sorted_ids[(ends - padded)[expert] + rank] = order
    starts = torch.arange(tiles, device=flat.device) * block_m
    return sorted_ids, torch.searchsorted(ends, starts, right=True)


def triton_fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The GPU backend's fused_experts: the same interface and results as torch_ops.fused_experts."""
    (t, hidden), (num_experts, inter2, _), top_k = x.shape, w13.shape, topk_ids.shape[1]
    inter, n = inter2 // 2, t * top_k
    block_m = 64 if n >= 64 * num_experts else 16  # decode steps: a few rows per expert
    warps = 8 if block_m == 64 else 4  # sm_90, bf16: 64-row gate/up tiles spill with 4 warps, not with 8
    sorted_ids, tile_experts = align(topk_ids, num_experts, block_m)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    h = x.new_empty(len(sorted_ids), inter)
    grid = (len(tile_experts), triton.cdiv(inter, 64))
    _gate_up[grid](
        x,
        w13,
        h,
        sorted_ids,
        tile_experts,
        n,
        top_k,
        hidden,
        inter,
        num_experts,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        h.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
        num_warps=warps,
    )
    out = torch.empty(n, hidden, device=x.device, dtype=topk_weights.dtype)  # Mixtral: the product in fp32
    grid = (len(tile_experts), triton.cdiv(hidden, 64))
    _down[grid](
        h,
        w2,
        out,
        topk_weights.contiguous(),
        sorted_ids,
        tile_experts,
        n,
        hidden,
        inter,
        num_experts,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
        num_warps=warps,
    )
    return out.to(x.dtype).view(t, top_k, hidden).sum(dim=1)

"""The reference ops in plain torch: the equations, no C, no Triton. The other backends are tested against these,
and `EngineConfig(ops="torch")` or NANOVLLM_OPS=torch runs the engine on them alone."""

import torch
import torch.nn.functional as F

from nanovllm.layers.attention import torch_attention as attention  # noqa: F401 (an op of this backend)
from nanovllm.layers.quant import QuantParts, QuantWeight, dequantize_torch
from nanovllm.sampling.sampler import sample  # noqa: F401 (an op of this backend)

NAME = "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 and cast back before the weight (as HF does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's add, then its norm: (RMSNorm(residual + x), residual + x)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated in the rotate-half layout: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys at their positions; cos, sin [T, 1, D / 2] (layers/rotary.py)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up, for x = [gate | up]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one [tokens, intermediate] buffer fewer


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x W^T + b of a Linear layer; a weight kept quantized (Linear.quant) is dequantized first."""
    if layer.weight is None:
        return quant_linear(x, layer.quant, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def quant_linear(x: torch.Tensor, w: QuantWeight | QuantParts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for W in GGUF blocks: W dequantized to fp32 (gguf's values), cast to x's dtype as the float
    path's loader casts it, then F.linear: the float path's result."""
    return F.linear(x, dequantize_torch(w).to(x.dtype), bias)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    blocks: tuple | None = None,
    quant: tuple | None = None,
) -> torch.Tensor:
    """A mixture-of-experts layer's experts as a grouped product (grouped_experts): x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], topk_weights / topk_ids [T, k]. `blocks`: the experts' GGUF blocks in the AMX layout where the
    loader kept them beside the weights (FusedMoE), the same values: the reference reads the weights. `quant`:
    (w13, w2) each expert's QuantWeight where the experts were kept quantized (a stacked weight is then None)."""
    q13, q2 = quant or (None, None)

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        h = F.linear(xs, w13[e]) if w13 is not None else quant_linear(xs, q13[e])
        h = silu_and_mul(h)
        return F.linear(h, w2[e]) if w2 is not None else quant_linear(h, q2[e])

    return grouped_experts(x, topk_weights, topk_ids, len(q13) if w13 is None else w13.shape[0], expert)


def grouped_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, expert
) -> torch.Tensor:
    """The (token, choice) pairs sorted by expert, `expert(e, rows)` (its MLP) once per expert that has tokens (the
    others are never read). Each output row is weighted in the weights' dtype (Mixtral's fp32), cast, and a
    token's rows are added in expert order, as HF does."""
    ids, choice = topk_ids.sort(dim=1)  # each token's choices in expert order
    weights = topk_weights.gather(1, choice)
    order = ids.flatten().argsort(stable=True)  # the pairs, by expert
    counts = torch.bincount(ids.flatten(), minlength=num_experts).tolist()
    xs, ys, start = x[order // ids.shape[1]], x.new_empty(len(order), x.shape[1]), 0
    for e, n in enumerate(counts):
        if n:
            ys[start : start + n] = expert(e, xs[start : start + n])
            start += n
    pairs = torch.empty_like(ys)
    pairs[order] = (ys * weights.flatten()[order, None]).to(x.dtype)  # back in (token, choice) order
    pairs = pairs.view(*ids.shape, -1)
    out = pairs[:, 0].clone()
    for j in range(1, ids.shape[1]):  # (not index_add_: on CPU it took ~0.2 s for a few rows)
        out += pairs[:, j]
    return out


def prepare(model: torch.nn.Module) -> None:
    """After loading: nothing to do, the weights stay as loaded."""


def packs_weights(dtype: torch.dtype) -> bool:
    """Whether prepare() repacks the weights (then the loader keeps them out of its 2 MB-page buffer)."""
    return False


def keeps_gguf_blocks(dtype: torch.dtype) -> bool:
    """Whether the loader keeps a GGUF's quantized blocks beside the weights for this backend to read."""
    return False


def step_runner(runner, config) -> None:
    """No faster way to run whole steps than the model's forward."""
    return None

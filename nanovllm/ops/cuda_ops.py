"""The CUDA ops: our Triton paged attention (kernels/attention.py: KV store, flash-decoding, chunked prefill over a
cached prefix) and fused mixture-of-experts (kernels/moe.py), torch elsewhere, and decode steps replayed from CUDA
graphs (step_runners/cuda_graphs.py)."""

import torch

from nanovllm.kernels.attention import triton_attention as attention  # noqa: F401 (an op of this backend)
from nanovllm.kernels.moe import triton_fused_experts
from nanovllm.ops.torch_ops import (  # noqa: F401
    add_rms_norm,
    keeps_gguf_blocks,
    linear,
    packs_weights,
    prepare,
    rms_norm,
    rotary,
    sample,
    silu_and_mul,
)

NAME = "cuda"


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    blocks: tuple | None = None,
    quant: tuple | None = None,
) -> torch.Tensor:
    """The fused MoE Triton kernel on the stacked weights (no GGUF blocks are kept on GPU)."""
    return triton_fused_experts(x, w13, w2, topk_weights, topk_ids)


def step_runner(runner, config):
    """Decode-only steps replay CUDA graphs captured at start-up, unless enforce_eager."""
    if config.enforce_eager:
        return None
    from nanovllm.step_runners.cuda_graphs import DecodeGraphs

    return DecodeGraphs(runner, config)

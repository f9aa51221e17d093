"""A mixture-of-experts layer's experts, stacked (vLLM's FusedMoE): w13 [E, 2I, H] holds each expert's gate rows
then its up rows (fused as in the dense MLP), w2 [E, H, I] its down projection. The loader fills them expert by
expert from the checkpoint's per-expert tensors (models/moe.py). The grouped product over the experts the tokens
chose runs behind the ops seam (ops.fused_experts).
Under tensor parallelism each rank holds every expert's share of the intermediate size (I / tp rows of gate and
of up, I / tp columns of down): a rank's output is a partial sum, all-reduced by the caller like the dense MLP's."""

import torch
from torch import nn

import nanovllm.ops as ops
from nanovllm.layers.parallel import tp_size
from nanovllm.layers.quant import QuantWeight


class FusedMoE(nn.Module):
    # a GGUF's quantized experts, kept by the loader where the backend reads them (as Linear.blocks): (block type,
    # uint8 [E, bytes], each expert's blocks in the CPU kernel's layout), the same values as the weights
    w13_blocks: tuple[int, torch.Tensor] | None = None
    w2_blocks: tuple[int, torch.Tensor] | None = None
    # a GGUF's experts kept quantized on CPU: each expert's gate-then-up rows (w13) and down (w2) as stored, the
    # stacked float weights then None (loader/gguf_quant.py)
    w13_quant: list[QuantWeight] | None = None
    w2_quant: list[QuantWeight] | None = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        size = intermediate_size // tp_size()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_ids [T, k] the experts each token chose, topk_weights [T, k] their weights:
        sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])."""
        return ops.fused_experts(
            x,
            self.w13_weight,
            self.w2_weight,
            topk_weights,
            topk_ids,
            blocks=(self.w13_blocks, self.w2_blocks),
            quant=(self.w13_quant, self.w2_quant),
        )

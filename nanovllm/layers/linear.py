import torch
from torch import nn

import nanovllm.ops as ops
from nanovllm.layers.quant import QuantParts, QuantWeight


class Linear(nn.Linear):
    """y = x W^T + b. The backend may keep a faster form of W beside it (ops/cpu_ops.py: `packed` for oneDNN,
    `blocks` for a GGUF's quantized blocks in the bf16 decode kernel's tile layout, the same values); the op
    picks what it reads. A GGUF weight kept quantized on CPU is `quant` alone, its `weight` None
    (loader/gguf_quant.py)."""

    packed: torch.Tensor | None = None
    blocks: tuple[int, torch.Tensor] | None = None  # (block type, blocks), from the loader
    quant: QuantWeight | QuantParts | None = None  # GGUF blocks as stored (per part if types differ), from the loader

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint (and the first init on the meta device
        costs ~0.7 s of torch's lazy set-up, a seventh of `nanovllm generate`'s time to first token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self)

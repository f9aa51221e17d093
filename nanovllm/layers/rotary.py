import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class Rotary(nn.Module):
    """Rotary position embedding's tables: cos and sin of position * frequency, per position. The rotation itself,
    (x1 cos - x2 sin, x2 cos + x1 sin) in the rotate-half layout of HF checkpoints, is ops.rotary.

    Frequencies for scaled variants (llama3, yarn, linear, ...) come from transformers' own rope functions.
    """

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        self.hf_config, self.head_dim, self.max_positions = hf_config, head_dim, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.build()

    @torch.no_grad()
    def build(self) -> None:
        """Fill the cos/sin tables (again after the model is materialized from the meta device)."""
        if self.cos.is_meta:
            return
        params = dict(getattr(self.hf_config, "rope_parameters", None) or {})
        if "rope_theta" not in params:  # transformers < 5 keeps these in two fields
            params = {**(getattr(self.hf_config, "rope_scaling", None) or {}), "rope_theta": self.hf_config.rope_theta}
        rope_type = params.get("rope_type", params.get("type", "default"))
        d = self.head_dim
        if rope_type == "default":
            inv_freq, scaling = 1.0 / params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, "cpu")
        else:
            raise ValueError(
                f"rope type {rope_type!r} is not supported (supported: default, "
                f"{', '.join(k for k in ROPE_INIT_FUNCTIONS if k != 'dynamic')})"
            )
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float), inv_freq.float().cpu())
        self.cos = (freqs.cos() * scaling).to(self.cos.device)
        self.sin = (freqs.sin() * scaling).to(self.sin.device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim / 2] of these positions in `dtype`: looked up once per step, not per layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

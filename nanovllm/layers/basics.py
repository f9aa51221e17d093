import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nanovllm.kernels import cpu as cpu_kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); or, given the residual stream, (RMSNorm(residual + x), residual + x), where on CPU in bf16
        the residual is updated in place in the same pass as the norm."""
        if residual is not None:
            if cpu_kernel.fused_bf16(x, residual, self.weight):
                return cpu_kernel.rms_norm(residual, self.weight, self.eps, add=x), residual
            residual = residual + x
            return self(residual), residual
        if cpu_kernel.fused_bf16(x, self.weight):
            return cpu_kernel.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with CPU fast paths, each measured in docs/benchmarks.md:
    - bf16 decode steps (up to 128 rows) on a CPU with AMX: our kernel (kernels/cpu_linear.c), which reads the
      plain weight at up to twice oneDNN's speed there (gate/up at 44 rows: 391 -> 231 us);
    - bf16 without AMX but with native bf16: the weight packed once into oneDNN's blocked layout
      (`pack_for_cpu`), 1.7-2.5x faster than F.linear at decode sizes, same results;
    - otherwise, with 2-96 rows, (W @ x.T).T, which MKL runs faster there: a 4-sequence fp32 SmolLM2 decode
      step 120 -> 63 ms; at 1 row even, from 128 rows slower."""
    ROWS = range(2, 97)
    packed: torch.Tensor | None = None
    blocks: tuple[int, torch.Tensor] | None = None  # GGUF (type, blocks) of the weight (loader keep_gguf_blocks)

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint (and the first init on the meta device
        costs ~0.7 s of torch's lazy set-up, a seventh of `nanovllm generate`'s time to first token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if x.device.type != "cpu" or x.dim() != 2:
            return nn.functional.linear(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16:
            y = cpu_kernel.amx_linear(x, self.weight, self.bias, self.blocks)
            return nn.functional.linear(x, self.weight, self.bias) if y is None else y
        if x.shape[0] not in self.ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        y = (self.weight @ x.t()).t().contiguous()
        return y if self.bias is None else y + self.bias


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether bf16 Linear weights get packed for oneDNN here: a CPU with native bf16 but no AMX."""
    return (dtype == torch.bfloat16 and not cpu_kernel.has_amx() and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_for_cpu(model: nn.Module) -> None:
    """Where onednn_packs: pack every bf16 Linear's weight for oneDNN. The plain weight is dropped (no second copy
    in memory) unless another module shares it (a tied embedding)."""
    if not onednn_packs(torch.bfloat16):
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
            if id(m.weight) not in shared:
                m.weight = None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if cpu_kernel.fused_bf16(x):
        return cpu_kernel.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate).mul_(up)  # in place: one [tokens, intermediate] buffer fewer


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout, as in HF checkpoints), cos/sin precomputed per position.

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
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, "
                             f"{', '.join(k for k in ROPE_INIT_FUNCTIONS if k != 'dynamic')})")
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float), inv_freq.float().cpu())
        self.cos = (freqs.cos() * scaling).to(self.cos.device)
        self.sin = (freqs.sin() * scaling).to(self.sin.device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim / 2] of these positions in `dtype`: looked up once per step, not per layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(tables: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim] -> rotated, same dtype (the tables' dtype)."""
        cos, sin = tables
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

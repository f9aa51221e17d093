"""The mixture-of-experts MLP of Qwen3-MoE, Mixtral and OLMoE (used by models/llama.py's decoder layer):

    p     = softmax(W_router x)                                  (in fp32)
    S     = the k experts of largest p; w_e = p_e, or p_e / sum_{e' in S} p_e' where the model renormalizes
    MoE(x) = sum_{e in S} w_e W_down_e (silu(W_gate_e x) * W_up_e x)
The experts' weights are stacked per layer (layers/moe.py) and filled expert by expert from the checkpoint."""

import re
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.layers.linear import Linear
from nanovllm.layers.moe import FusedMoE
from nanovllm.layers.parallel import all_reduce, shard


@dataclass(frozen=True)
class MoeRouting:
    """How a family weights its experts. renormalize: always (Mixtral) or as the config's norm_topk_prob says
    (None: Qwen3-MoE, OLMoE). fp32_weights: Mixtral multiplies the experts' outputs by the fp32 probabilities;
    the others cast the probabilities to the activations' dtype first (a difference in bf16 only)."""

    renormalize: bool | None
    fp32_weights: bool


def num_experts(cfg) -> int:
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts  # Mixtral's name


def is_sparse(cfg, layer: int) -> bool:
    """Qwen3-MoE's rule (a layer is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer);
    Mixtral and OLMoE have neither field: every layer is sparse."""
    return (
        num_experts(cfg) > 0
        and layer not in (getattr(cfg, "mlp_only_layers", None) or [])
        and (layer + 1) % (getattr(cfg, "decoder_sparse_step", None) or 1) == 0
    )


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, routing: MoeRouting):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = routing.renormalize if routing.renormalize is not None else cfg.norm_topk_prob
        self.fp32_weights = routing.fp32_weights
        self.gate = Linear(cfg.hidden_size, num_experts(cfg), bias=False)  # the router, whole on every rank
        intermediate = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        self.experts = FusedMoE(num_experts(cfg), cfg.hidden_size, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return all_reduce(self.experts(x, weights if self.fp32_weights else weights.to(x.dtype), ids))


# ---- loading: a checkpoint's per-expert tensors -> this rank's slice of the stacked weights ------------------
EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)")
PARTS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}  # Mixtral: w1 gate, w3 up, w2 down
STACKED = ("mlp.experts.w13_weight", "mlp.experts.w13_weight", "mlp.experts.w2_weight")


def locate_expert(module: str) -> tuple[str, tuple[int, int]] | None:
    """A layer's module name `mlp.experts.E.gate_proj` (or Mixtral's `mlp.experts.E.w1`) -> (our
    stacked parameter in the layer, (expert, part)): part 0 gate, 1 up (the halves of w13), 2 down (w2)."""
    m = EXPERT.fullmatch(module)
    if m is None:
        return None
    part = PARTS[m[2]]
    return STACKED[part], (int(m[1]), part)


def expert_slice(param: torch.Tensor, tensor, expert: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(where in the stacked parameter, this rank's part of the checkpoint tensor): gate and up are
    column-parallel (this rank's rows), down is row-parallel (its columns)."""
    param = param[expert]
    if part == 2:
        return param, shard(tensor, 1, param.shape[1])
    rows = param.shape[0] // 2
    return param[part * rows : (part + 1) * rows], shard(tensor, 0, rows)


def expected_expert_parts(name: str, param: torch.Tensor) -> list[str]:
    """The names load_weight returns for every expert's parts of a stacked parameter (name#expert.part)."""
    parts = (0, 1) if name.endswith("w13_weight") else (2,)
    return [f"{name}#{e}.{p}" for e in range(param.shape[0]) for p in parts]

"""The Llama decoder and its close relatives (Mistral, Qwen2: q/k/v biases, Qwen3: per-head q/k RMSNorm), and their
mixture-of-experts kin (Qwen3-MoE, Mixtral, OLMoE: q/k RMSNorm over the whole projection), whose MLP is
models/moe.py's MoE(x) in every sparse layer.

    h   = x + Attn(RMSNorm(x))                 out = h + MLP(RMSNorm(h))
    Attn(x) = W_o softmax(rope(W_q x) rope(W_k x)^T / sqrt(d)) W_v x      (over the sequence's cached keys)
    MLP(x)  = W_down (silu(W_gate x) * W_up x)
Each residual add is done by the RMSNorm after it (a backend may fuse the two), so a layer passes on (MLP output,
residual). q/k/v and gate/up are fused into one matmul each; the loader fills the fused weights by slices.
Under tensor parallelism each rank builds the same model with its share of the heads, of the intermediate size
and of the vocabulary (layers/parallel.py); o_proj and down_proj outputs are all-reduced.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import nanovllm.ops as ops
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.linear import Linear
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.parallel import all_gather, all_reduce, embed, gather_logits, shard, tp_rank, tp_size, vocab_range
from nanovllm.layers.quant import dequantize_rows
from nanovllm.layers.rotary import Rotary
from nanovllm.models.moe import (
    MoeRouting,
    SparseMoeBlock,
    expected_expert_parts,
    expert_slice,
    is_sparse,
    locate_expert,
)


@dataclass(frozen=True)
class LayerWeight:
    """A weight-holding module of a decoder layer: its name in the layer, the checkpoint modules that fill it (in
    order: q, k, v fill one qkv_proj), and how tensor parallelism splits its weight: along 0 (its output rows:
    column-parallel), along 1 (its input columns: row-parallel, output all-reduced) or None (whole on each rank)."""

    name: str
    sources: tuple[str, ...]
    split: int | None


# A decoder layer's weights in the order it applies them: the one list that loading, tensor-parallel sharding,
# the GGUF block packing and the fused CPU decode step (step_runners/cpu_decode_step.py) read.
LLAMA_LAYER = (
    LayerWeight("input_layernorm", ("input_layernorm",), None),
    LayerWeight("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 0),
    LayerWeight("self_attn.o_proj", ("self_attn.o_proj",), 1),
    LayerWeight("post_attention_layernorm", ("post_attention_layernorm",), None),
    LayerWeight("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), 0),
    LayerWeight("mlp.down_proj", ("mlp.down_proj",), 1),
)
QK_NORM = (
    LayerWeight("self_attn.q_norm", ("self_attn.q_norm",), None),
    LayerWeight("self_attn.k_norm", ("self_attn.k_norm",), None),
)
ROUTER = LayerWeight("mlp.gate", ("mlp.gate",), None)  # a MoE layer's router (its experts: models/moe.py)


class Attention(nn.Module):
    def __init__(self, cfg, head_dim: int, qkv_bias: bool, qk_norm: str | None):
        super().__init__()
        tp = tp_size()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = qk_norm  # "head" (Qwen3: each head), "projection" (OLMoE: all of q, all of k) or None
        q_dim, k_dim = (self.q_size * tp, self.kv_size * tp) if qk_norm == "projection" else (head_dim, head_dim)
        self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps) if qk_norm else None
        self.scale = head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # this layer's paged caches, set by the model runner

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        if self.qk_norm == "projection":  # over every rank's heads: normalize the gathered whole, keep our part
            q = self.q_norm(all_gather(q)).narrow(-1, tp_rank() * self.q_size, self.q_size)
            k = self.k_norm(all_gather(k)).narrow(-1, tp_rank() * self.kv_size, self.kv_size)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rotary(q, k, *rope)
        o = ops.attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return all_reduce(self.o_proj(o.flatten(1)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        size = cfg.intermediate_size // tp_size()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * size, bias=False)
        self.down_proj = Linear(size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(ops.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, qkv_bias: bool, qk_norm: str | None, moe: MoeRouting | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, head_dim, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg, moe) if moe else MLP(cfg)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, not yet added to the residual stream (at the first layer: the
        embeddings, and no residual). Each add is done by the norm after it."""
        h, residual = self.input_layernorm(x, residual) if residual is not None else (self.input_layernorm(x), x)
        h, residual = self.post_attention_layernorm(self.self_attn(rope, h, meta), residual)
        return self.mlp(h), residual


class Model(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary: Rotary, qkv_bias: bool, qk_norm: str | None, moe: MoeRouting | None):
        super().__init__()
        self.vocab_size, self.rotary = cfg.vocab_size, rotary
        vocab = vocab_range(cfg.vocab_size)[1]  # given a weight, nn.Embedding skips its random init (see Linear)
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.embed_tokens.quant = None  # a GGUF embedding kept quantized (its weight then None): rows dequantized
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, head_dim, qkv_bias, qk_norm, moe if moe and is_sparse(cfg, i) else None)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens
        if table.weight is not None:
            return embed(input_ids, lambda ids: F.embedding(ids, table.weight), self.vocab_size)
        dtype = self.norm.weight.dtype  # the model's (the embedding has no float weight to tell)
        return embed(input_ids, lambda ids: dequantize_rows(table.quant, ids).to(dtype), self.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        rope = self.rotary.tables(positions, x.dtype)  # looked up once per step, not per layer
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    qkv_bias, qk_norm = False, None
    moe: MoeRouting | None = None  # a mixture-of-experts family: how it weights its experts (models/moe.py)

    def __init__(self, cfg, max_positions: int):
        super().__init__()
        if getattr(cfg, "clip_qkv", None) is not None:
            raise ValueError(f"clip_qkv={cfg.clip_qkv} (clamped q/k/v) is not supported")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = Rotary(cfg, head_dim, max_positions)
        qkv_bias = self.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        self.model = Model(cfg, head_dim, self.rotary, qkv_bias, self.qk_norm, self.moe)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.vocab_size = cfg.vocab_size
        self.lm_head = Linear(cfg.hidden_size, vocab_range(cfg.vocab_size)[1], bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.layer_weights = LLAMA_LAYER[:2] + QK_NORM + LLAMA_LAYER[2:] if self.qk_norm else LLAMA_LAYER
        self.layer_weights += (ROUTER,) if self.moe else ()
        a = self.model.layers[0].self_attn
        self.fused_sizes = {
            "self_attn.qkv_proj": [a.q_size, a.kv_size, a.kv_size],  # this rank's rows of each part
            "mlp.gate_up_proj": [cfg.intermediate_size // tp_size()] * 2,
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits over the whole vocabulary on rank 0 (None on the other ranks)."""
        return gather_logits(self.lm_head(hidden), self.vocab_size)

    # ---- loading --------------------------------------------------------------------------------------
    def locate(self, name: str) -> tuple[str, LayerWeight | None, int | tuple[int, int] | None]:
        """Where the checkpoint tensor `name` goes: our parameter, its layer weight (None outside the layers) and,
        for a fused parameter, the index of its part (for an expert's tensor: (expert, part), weight None)."""
        if not name.startswith("model.layers."):
            return name, None, None
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if self.moe:
            module = module.replace("block_sparse_moe.", "mlp.")  # Mixtral's name for its MoE MLP
        if self.moe and (expert := locate_expert(module)):
            return f"model.layers.{i}.{expert[0]}", None, expert[1]
        for w in self.layer_weights:
            if module in w.sources:
                part = w.sources.index(module) if len(w.sources) > 1 else None
                return f"model.layers.{i}.{w.name}.{kind}", w, part
        return name, None, None

    def load_weight(self, name: str, tensor, params: dict[str, nn.Parameter]) -> str | None:
        """Copy this rank's part of one checkpoint tensor (a tensor, or a lazy safetensors slice) into its
        (possibly fused) parameter; returns the name it filled."""
        if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        target, weight, part = self.locate(name)
        try:
            if target not in params:
                raise ValueError(f"has no place in {type(self).__name__}")
            param = params[target].data
            module = target.rsplit(".", 1)[0]
            if isinstance(part, tuple):  # one expert's gate, up or down: its place in the stacked weight
                param, src = expert_slice(param, tensor, *part)
            elif part is not None:  # this rank's rows of one part of a fused weight (or bias)
                sizes = self.fused_sizes[weight.name]
                param = param[sum(sizes[:part]) : sum(sizes[: part + 1])]
                src = shard(tensor, 0, sizes[part])
            elif module in ("model.embed_tokens", "lm_head"):  # a vocabulary range per rank: the last one padded
                src = shard(tensor, 0, param.shape[0], full=self.vocab_size)
                param.zero_()
                param = param[: src.shape[0]]
            elif weight is not None and weight.split is not None and param.dim() > weight.split:
                src = shard(tensor, weight.split, param.shape[weight.split])  # a row-parallel bias stays whole
            else:
                src = tensor[:]
            if src.shape != param.shape:
                raise ValueError(
                    f"this rank's part has shape {tuple(src.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(src)
            label = ".".join(map(str, part)) if isinstance(part, tuple) else part  # expert.part, or part
            return target if part is None else f"{target}#{label}"
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None

    def expected_weights(self) -> set[str]:
        """Every parameter the checkpoint must fill; a fused one once per part (name#i)."""
        parts = {w.name: len(w.sources) for w in self.layer_weights if len(w.sources) > 1}
        names = set()
        for name, param in self.named_parameters():
            module = name.rsplit(".", 1)[0].split(".", 3)[-1] if name.startswith("model.layers.") else None
            if ".mlp.experts." in name:
                names.update(expected_expert_parts(name, param))
                continue
            names.update([f"{name}#{i}" for i in range(parts[module])] if module in parts else [name])
        return names


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = "head"


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm, moe = "head", MoeRouting(renormalize=None, fp32_weights=False)


class MixtralForCausalLM(LlamaForCausalLM):
    moe = MoeRouting(renormalize=True, fp32_weights=True)


class OlmoeForCausalLM(LlamaForCausalLM):
    qk_norm, moe = "projection", MoeRouting(renormalize=None, fp32_weights=False)


MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}

"""The Llama decoder and its close relatives (Mistral, Qwen2: q/k/v biases, Qwen3: per-head q/k RMSNorm).

    h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h));  MLP(x) = W_down(silu(W_gate x) * W_up x)
q/k/v and gate/up are fused into one matmul each; the loader fills the fused weights by slices.
"""
import torch
from torch import nn

from nanovllm.layers.attention import AttentionMetadata, torch_attention
from nanovllm.layers.basics import RMSNorm, Rotary, silu_and_mul


class Attention(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary: Rotary, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # set by the model runner
        self.backend = torch_attention  # the model runner may swap in another with the same signature

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q), self.rotary(positions, k)
        o = self.backend(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary: Rotary, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, head_dim, rotary, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary: Rotary, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, head_dim, rotary, qkv_bias, qk_norm)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    qkv_bias, qk_norm = False, False
    # HF checkpoint name -> (our fused parameter, shard index)
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg, max_positions: int):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = Rotary(cfg, head_dim, max_positions)
        qkv_bias = self.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        self.model = Model(cfg, head_dim, self.rotary, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        a = self.model.layers[0].self_attn
        self.shard_sizes = {"qkv_proj": [a.q_size, a.kv_size, a.kv_size],
                            "gate_up_proj": [cfg.intermediate_size] * 2}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weight(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> str | None:
        """Copy one checkpoint tensor into its (possibly fused) parameter; returns the name it filled."""
        if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        for hf_name, (fused, shard) in self.packed.items():
            if f".{hf_name}." in name:
                target = name.replace(hf_name, fused)
                sizes = self.shard_sizes[fused]
                params[target].data[sum(sizes[:shard]):sum(sizes[:shard + 1])].copy_(tensor)
                return f"{target}#{shard}"
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        return name

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            fused = next((f for f in self.shard_sizes if f".{f}." in name), None)
            if fused:
                names.update(f"{name}#{i}" for i in range(len(self.shard_sizes[fused])))
            else:
                names.add(name)
        return names


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


MODELS = {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": LlamaForCausalLM,
          "Qwen2ForCausalLM": Qwen2ForCausalLM, "Qwen3ForCausalLM": Qwen3ForCausalLM}

"""The Llama decoder and its close relatives (Mistral, Qwen2: q/k/v biases, Qwen3: per-head q/k RMSNorm).

    h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h));  MLP(x) = W_down(silu(W_gate x) * W_up x)
Each residual add is done by the RMSNorm after it (one pass on CPU), so a layer passes on (MLP output, residual).
q/k/v and gate/up are fused into one matmul each; the loader fills the fused weights by slices.
Under tensor parallelism each rank builds the same model with its share of the heads, of the intermediate size
and of the vocabulary (layers/parallel.py); o_proj and down_proj outputs are all-reduced.
"""
import torch
from torch import nn

from nanovllm.kernels import cpu as cpu_kernel
from nanovllm.layers.attention import AttentionMetadata, torch_attention
from nanovllm.layers.basics import Linear, RMSNorm, Rotary, silu_and_mul
from nanovllm.layers.parallel import all_reduce, embed, gather_logits, shard, tp_size, vocab_range


class Attention(nn.Module):
    def __init__(self, cfg, head_dim: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        tp = tp_size()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # set by the model runner
        self.backend = torch_attention  # the model runner may swap in another with the same signature

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        sizes = [self.q_size, self.kv_size, self.kv_size]
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv.split(sizes, -1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # on CPU in bf16, q and k are rotated where they are, in one pass (rotary is ~20 small torch ops)
        qk = qkv[:, :self.q_size + self.kv_size]
        if self.q_norm is not None or not cpu_kernel.rope_in_place(qk, rope, self.head_dim):
            q, k = Rotary.apply(rope, q), Rotary.apply(rope, k)
        o = self.backend(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return all_reduce(self.o_proj(o.flatten(1)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        size = cfg.intermediate_size // tp_size()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * size, bias=False)
        self.down_proj = Linear(size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, head_dim, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, not yet added to the residual stream (at the first layer: the
        embeddings, and no residual). Each add is done by the norm after it (one pass on CPU)."""
        h, residual = self.input_layernorm(x, residual) if residual is not None else (self.input_layernorm(x), x)
        h, residual = self.post_attention_layernorm(self.self_attn(rope, h, meta), residual)
        return self.mlp(h), residual


class Model(nn.Module):
    def __init__(self, cfg, head_dim: int, rotary: Rotary, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.vocab_size, self.rotary = cfg.vocab_size, rotary
        vocab = vocab_range(cfg.vocab_size)[1]  # given a weight, nn.Embedding skips its random init (see Linear)
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, head_dim, qkv_bias, qk_norm)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = embed(input_ids, self.embed_tokens.weight, self.vocab_size)
        rope = self.rotary.tables(positions, x.dtype)
        # on CPU, a decode-only bf16 step's layers in one C call: the same kernels as below, bit for bit
        if (mlp_out := cpu_kernel.decode_layers(self, x, rope, meta)) is not None:
            return self.norm(mlp_out, x)[0]
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        return self.norm(x, residual)[0]


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
        self.vocab_size = cfg.vocab_size
        self.lm_head = Linear(cfg.hidden_size, vocab_range(cfg.vocab_size)[1], bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        a = self.model.layers[0].self_attn
        self.shard_sizes = {"qkv_proj": [a.q_size, a.kv_size, a.kv_size],  # this rank's rows of each
                            "gate_up_proj": [self.model.layers[0].mlp.down_proj.in_features] * 2}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits over the whole vocabulary on rank 0 (None on the other ranks)."""
        return gather_logits(self.lm_head(hidden), self.vocab_size)

    def load_weight(self, name: str, tensor, params: dict[str, nn.Parameter]) -> str | None:
        """Copy this rank's part of one checkpoint tensor (a tensor, or a lazy safetensors slice) into its
        (possibly fused) parameter; returns the name it filled."""
        if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        try:
            for hf_name, (fused, i) in self.packed.items():
                if f".{hf_name}." in name:
                    target, sizes = self.param_name(name), self.shard_sizes[fused]
                    part = shard(tensor, 0, sizes[i])
                    dst = params[target].data[sum(sizes[:i]):sum(sizes[:i + 1])]
                    check_shape(part, dst)
                    dst.copy_(part)
                    return f"{target}#{i}"
            if name not in params:
                raise ValueError(f"has no place in {type(self).__name__}")
            param = params[name].data
            dim = next((d for key, d in SPLIT_DIMS.items() if f"{key}." in name), None)
            if dim is None:
                part = tensor[:]
            elif "embed_tokens" in name or "lm_head" in name:  # a vocab range: the last one may be padding
                part = shard(tensor, dim, param.shape[dim], full=self.vocab_size)
                param.zero_()
                param = param.narrow(dim, 0, part.shape[dim])
            else:
                part = shard(tensor, dim, param.shape[dim])
            check_shape(part, param)
            param.copy_(part)
            return name
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None

    def param_name(self, name: str) -> str:
        """Our parameter that the checkpoint tensor `name` fills (q/k/v and gate/up: a fused one)."""
        hf_name = next((n for n in self.packed if f".{n}." in name), None)
        return name.replace(hf_name, self.packed[hf_name][0]) if hf_name else name

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            fused = next((f for f in self.shard_sizes if f".{f}." in name), None)
            if fused:
                names.update(f"{name}#{i}" for i in range(len(self.shard_sizes[fused])))
            else:
                names.add(name)
        return names


SPLIT_DIMS = {"o_proj": 1, "down_proj": 1, "embed_tokens": 0, "lm_head": 0}  # qkv, gate/up: packed, dim 0


def check_shape(part: torch.Tensor, param: torch.Tensor) -> None:
    if part.shape != param.shape:
        raise ValueError(f"this rank's part has shape {tuple(part.shape)}, the model expects {tuple(param.shape)}")


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


MODELS = {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": LlamaForCausalLM,
          "Qwen2ForCausalLM": Qwen2ForCausalLM, "Qwen3ForCausalLM": Qwen3ForCausalLM}

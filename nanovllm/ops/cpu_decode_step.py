"""A decode-only bf16 step's decoder layers in one C call (kernels/cpu: the fused decode step), picked by the model
runner like CUDA graphs are. The same kernels in the same order as the layer-by-layer path, bit for bit; what it
saves is Python between them: the ~15 torch and ctypes calls a layer makes cost ~0.6 ms a layer once the kernels
have evicted Python's working set (docs/benchmarks.md)."""

import torch

from nanovllm.kernels import cpu as kernels
from nanovllm.layers.parallel import tp_size

# the layer the C step computes, weight by weight (the model's `layer_weights`, models/llama.py)
LAYER = (
    "input_layernorm",
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)


class FusedDecodeStep:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, dims: list[int]):
        self.model, self.dims = model, torch.tensor(dims, dtype=torch.int64)

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        pointers = []
        for i, layer in enumerate(model.model.layers):
            for w in model.layer_weights:
                m = layer.get_submodule(w.name)
                blocks = getattr(m, "blocks", None)
                kind = blocks[0] if blocks else kernels.BF16
                pointers += [ptr(blocks[1] if blocks else m.weight), ptr(getattr(m, "bias", None)), kind]
            pointers += [kv_cache[0, i].data_ptr(), kv_cache[1, i].data_ptr()]
        self.pointers = torch.tensor(pointers, dtype=torch.int64)  # kept: the table outlives every step

    @classmethod
    def build(cls, runner) -> "FusedDecodeStep | None":
        """Where every kernel of the step applies: bf16 on a CPU with AMX, one rank, the layer the C step computes
        (no q/k norm), plain bf16 weights (not packed for oneDNN), sizes the kernels take."""
        model, cache = runner.model, runner.kv_cache
        if not (
            runner.dtype == torch.bfloat16
            and cache.device.type == "cpu"
            and kernels.has_amx()
            and tp_size() == 1
            and tuple(w.name for w in model.layer_weights) == LAYER
        ):
            return None
        layer = model.model.layers[0]
        a, inter = layer.self_attn, layer.mlp.down_proj.in_features
        hidden = layer.self_attn.qkv_proj.in_features
        if not (
            a.qkv_proj.weight is not None
            and a.qkv_proj.weight.dtype == torch.bfloat16
            and cache.is_contiguous()
            and a.num_heads // a.num_kv_heads <= kernels.MAX_GROUP
            and a.head_dim % 16 == 0
            and a.head_dim <= kernels.MAX_HEAD_DIM
            and hidden % 32 == 0
            and a.q_size % 32 == 0
            and (a.q_size + 2 * a.kv_size) % 16 == 0
            and inter % 32 == 0
        ):
            return None
        return cls(model, cache, [hidden, a.num_heads, a.num_kv_heads, a.head_dim, inter, cache.shape[3]])

    def covers(self, input_ids: torch.Tensor, meta, last: torch.Tensor) -> bool:
        """Steps whose every row is a decode that is sampled, at most as many as the C linear takes."""
        n = input_ids.shape[0]
        return 0 < n <= kernels.LINEAR_ROWS and len(meta.decode_rows) == n and last.shape[0] == n

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        model = self.model.model
        with torch.inference_mode():
            residual = model.embed(input_ids)
            tables = model.rotary.tables(positions, residual.dtype)
            mlp_out = kernels.decode_layers(
                self.pointers, self.dims, residual, tables, meta, model.norm.eps, model.layers[0].self_attn.scale
            )
            return self.model.compute_logits(model.norm(mlp_out, residual)[0])

"""A step's decoder layers in one C call (kernels/cpu: the fused decode step), picked by the model runner like CUDA
graphs are: in bf16 on a CPU with AMX (decode-only steps), and in fp32 on any CPU (decodes, and prompt chunks whose
tokens each attend as a decode row). In bf16 the same kernels in the same order as the layer-by-layer path, bit for
bit; in fp32 the C elementwise kernels stand in for torch's (a few ulp apart), the decode attention for the prompt's
SDPA (another order of sums), and each projection is linear_f32 over the plain fp32 weight or the GGUF blocks the
loader kept (part by part for a fused weight kept per part). What it saves is
Python between the kernels: the ~15 torch and ctypes calls a layer makes cost ~0.6 ms a layer once the kernels have
evicted Python's working set (docs/benchmarks.md). In fp32 the rest of the step is trimmed too: its buffers are
kept from step to step, and the embedding, rotary rows, final norm and LM head are one call each."""

import torch

from nanovllm.kernels import cpu as kernels
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.parallel import tp_size
from nanovllm.layers.quant import BLOCK_SIZES, QuantParts, QuantWeight
from nanovllm.ops.cpu_threads import ThreadGovernor

# the layer the C step computes, weight by weight (the model's `layer_weights`, models/llama.py)
LAYER = (
    "input_layernorm",
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def stored_type(quant: QuantWeight) -> int:
    """How the blocks lie, as dequantize_rows reads them: ggml's id, with ROWS8 for interleaved rows."""
    return quant.qtype | (kernels.ROWS8 if quant.interleaved else 0)


def kernel_type(quant: QuantWeight) -> int:
    """The weight type as linear_f32 reads it: stored_type, with X_INT8 for activations in one int8 plane."""
    return stored_type(quant) | (kernels.X_INT8 if quant.int8_activations else 0)


# decode_step.c: a weight type that says the weight is a table of parts (PARTS | their number)
PARTS = 0x10000


def reads(quant: QuantWeight) -> bool:
    """Whether linear_f32 reads these blocks in place: a type it takes, whole blocks a row, contiguous."""
    k = quant.shape[1]
    return quant.qtype in BLOCK_SIZES and k % BLOCK_SIZES[quant.qtype][0] == 0 and quant.blocks.is_contiguous()


def f32_weight(m: torch.nn.Module) -> tuple[int, torch.Tensor] | None:
    """What linear_f32 reads for this Linear: (ggml type, its kept GGUF blocks: rows as stored, contiguous) where
    the loader kept them (`m.quant`), else (F32, the fp32 weight); for a weight kept per part (QuantParts),
    (PARTS | the number of parts, the table of parts decode_step.c reads: blocks, type, rows each; the caller keeps
    it alive); None where it cannot read them."""
    quant = getattr(m, "quant", None)
    if isinstance(quant, QuantParts):
        if not all(reads(p) for p in quant.parts):
            return None
        table = [[p.blocks.data_ptr(), kernel_type(p), p.shape[0]] for p in quant.parts]
        return PARTS | len(quant.parts), torch.tensor(table, dtype=torch.int64)
    if quant is not None:
        return (kernel_type(quant), quant.blocks) if reads(quant) else None
    w = m.weight
    if w is None or w.dtype != torch.float32 or not w.is_contiguous():
        return None
    return kernels.F32, w


def tokens_as_decodes(meta: AttentionMetadata, n: int) -> AttentionMetadata:
    """The step's n tokens each as a decode row: a prompt chunk's token attends over its sequence's cache up to
    itself (the chunk's K/V are stored before any row attends), which is the causal attention of a prefill. A
    decode-only step's metadata as it is."""
    if len(meta.decode_rows) == n:
        return meta
    starts = meta.query_start
    seq = torch.repeat_interleave(torch.arange(len(starts) - 1), starts[1:] - starts[:-1])
    token = torch.arange(n + 1)
    lens = meta.context_lens[seq] - (starts[seq + 1] - 1 - token[:n])  # the row's position + 1
    return AttentionMetadata.decode_only(token, lens, meta.block_tables[seq], meta.slot_mapping, int(lens.max()))


class FusedDecodeStep:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, dims: list[int], dtype: torch.dtype):
        self.model, self.dims, self.bf16 = model, torch.tensor(dims, dtype=torch.int64), dtype == torch.bfloat16
        self.governor = ThreadGovernor(torch.get_num_threads())  # fewer threads while other processes hold cores

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        pointers, self.part_tables = [], []  # the tables of parts: kept, the C step reads them
        for i, layer in enumerate(model.model.layers):
            for w in model.layer_weights:
                m = layer.get_submodule(w.name)
                if self.bf16:
                    blocks = getattr(m, "blocks", None)
                    kind, weight = blocks if blocks else (kernels.BF16, m.weight)
                else:  # a norm's weight, or what linear_f32 reads
                    kind, weight = f32_weight(m) if w.name in PROJECTIONS else (0, m.weight)
                    if kind & PARTS:
                        self.part_tables.append(weight)
                pointers += [ptr(weight), ptr(getattr(m, "bias", None)), kind]
            pointers += [kv_cache[0, i].data_ptr(), kv_cache[1, i].data_ptr()]
        self.pointers = torch.tensor(pointers, dtype=torch.int64)  # kept: the table outlives every step
        if not self.bf16:
            self.head = f32_weight(model.lm_head)
            self.buffers, self.capacity = {}, 0

    @classmethod
    def build(cls, runner, plain_fp32_weights: bool = False) -> "FusedDecodeStep | None":
        """Where every kernel of the step applies: one rank, the layer the C step computes (no q/k norm), sizes the
        kernels take; in bf16 a CPU with AMX and plain bf16 weights (not packed for oneDNN), in fp32 any CPU and
        projections kept in GGUF blocks linear_f32 reads. Plain fp32 weights only when asked (`plain_fp32_weights`):
        there linear_f32 sums in another order than MKL's F.linear, so decode steps would no longer give what HF,
        the prefill and a speculative verification compute bit for bit (greedy ties would part)."""
        model, cache = runner.model, runner.kv_cache
        if not (
            runner.dtype in (torch.bfloat16, torch.float32)
            and cache.device.type == "cpu"
            and kernels.library() is not None
            and tp_size() == 1
            and tuple(w.name for w in model.layer_weights) == LAYER
        ):
            return None
        layer = model.model.layers[0]
        a, inter = layer.self_attn, layer.mlp.down_proj.in_features
        hidden = layer.self_attn.qkv_proj.in_features
        if not (
            cache.is_contiguous()
            and a.num_heads // a.num_kv_heads <= kernels.MAX_GROUP
            and a.head_dim % 16 == 0
            and a.head_dim <= kernels.MAX_HEAD_DIM
        ):
            return None
        if runner.dtype == torch.bfloat16 and not (
            kernels.has_amx()
            and a.qkv_proj.weight is not None
            and a.qkv_proj.weight.dtype == torch.bfloat16
            and hidden % 32 == 0
            and a.q_size % 32 == 0
            and (a.q_size + 2 * a.kv_size) % 16 == 0
            and inter % 32 == 0
        ):
            return None
        projections = [layer.get_submodule(name) for layer in model.model.layers for name in PROJECTIONS]
        if runner.dtype == torch.float32 and not all(f32_weight(m) is not None for m in [model.lm_head, *projections]):
            return None
        kept = all(getattr(m, "quant", None) is not None for m in projections)
        if runner.dtype == torch.float32 and not (kept or plain_fp32_weights):
            return None
        dims = [hidden, a.num_heads, a.num_kv_heads, a.head_dim, inter, cache.shape[3]]
        return cls(model, cache, dims, runner.dtype)

    def covers(self, input_ids: torch.Tensor, meta, last: torch.Tensor) -> bool:
        """Steps of at most as many rows as the C linear serves: in bf16 up to where AMX beats oneDNN, every row a
        sampled decode (bit for bit the per-layer path); in fp32 as many as the per-layer path gives linear_f32
        (more: MKL's GEMM on dequantized tiles), prompt chunks too (`tokens_as_decodes`: each token as a decode)."""
        n = input_ids.shape[0]
        if self.bf16:
            return 0 < n <= kernels.LINEAR_ROWS and len(meta.decode_rows) == n and last.shape[0] == n
        return 0 < n <= kernels.QUANT_KERNEL_ROWS

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, last: torch.Tensor) -> torch.Tensor:
        """The logits of the step's `last` rows."""
        self.governor.adjust()
        if not self.bf16:
            return self.run_f32(input_ids, positions, tokens_as_decodes(meta, input_ids.shape[0]), last)
        model = self.model.model
        with torch.inference_mode():
            residual = model.embed(input_ids)
            tables = model.rotary.tables(positions, residual.dtype)
            mlp_out = kernels.decode_layers(
                self.pointers, self.dims, residual, tables, meta, model.norm.eps, model.layers[0].self_attn.scale
            )
            return self.model.compute_logits(model.norm(mlp_out, residual)[0])

    def rows(self, m: int) -> dict[str, torch.Tensor]:
        """The step's buffers for m rows: views of ones kept for the most rows seen (a fresh set each step cost
        ~10 allocations)."""
        if m > self.capacity:
            hidden, half = self.dims[0].item(), self.dims[3].item() // 2
            self.capacity = m
            self.buffers = kernels.decode_scratch(self.dims.tolist(), m, torch.float32)
            self.buffers.update(residual=torch.empty(m, hidden), normed=torch.empty(m, hidden))
            self.buffers.update(cos=torch.empty(m, half), sin=torch.empty(m, half))
        return {name: b[:m] for name, b in self.buffers.items()}

    def run_f32(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, last: torch.Tensor) -> torch.Tensor:
        """The fp32 step: embedding rows and rotary rows gathered into kept buffers, the layers in C, the final
        norm (with the last residual add) and the LM head in C on the `last` rows; returns fresh logits (the
        sampler may change them)."""
        model, b = self.model.model, self.rows(input_ids.shape[0])
        with torch.inference_mode():
            table = model.embed_tokens
            if table.weight is not None:
                torch.index_select(table.weight, 0, input_ids, out=b["residual"])
            else:  # kept in GGUF blocks: the rows dequantized in place
                kernels.dequantize_rows_into(stored_type(table.quant), table.quant.blocks, input_ids, b["residual"])
            torch.index_select(model.rotary.cos, 0, positions, out=b["cos"])
            torch.index_select(model.rotary.sin, 0, positions, out=b["sin"])
            eps, scale = model.norm.eps, model.layers[0].self_attn.scale
            mlp_out = kernels.decode_layers(
                self.pointers, self.dims, b["residual"], (b["cos"], b["sin"]), meta, eps, scale, b
            )
            kernels.rms_norm(b["residual"], model.norm.weight, eps, add=mlp_out, out=b["normed"])
            normed = b["normed"] if last.shape[0] == input_ids.shape[0] else b["normed"][last]
            kind, head = self.head
            return kernels.linear_f32(normed, head, kind, self.model.lm_head.out_features)  # one rank: all

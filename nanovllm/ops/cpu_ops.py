"""The CPU ops: our C kernels (kernels/cpu/) where they apply, torch's ops where they do not.

Whether a kernel applies is decided here from the tensors (dtype, layout, sizes) and from what the library was
built with (AMX, AVX512-BF16), and nowhere else; the layers only call the op. In fp32 the elementwise ops and
the prefill attention stay torch's (bit for bit what HF computes); decode attention, the KV store and plain
temperature sampling run in C in both dtypes. Speed-ups: docs/benchmarks.md."""

import torch
import torch.nn.functional as F

import nanovllm.ops.torch_ops as torch_ops
from nanovllm.kernels import cpu as kernels
from nanovllm.layers import attention as reference
from nanovllm.layers.parallel import tp_size
from nanovllm.layers.quant import INTERLEAVE, QuantParts, QuantWeight, dequantize_torch, interleave_rows, parts_of
from nanovllm.sampling.sampler import SamplingBatch, filtered, uniform

NAME = "cpu"
# fp32 linears with 2-96 rows as (W @ x^T)^T, which MKL runs faster there: a 4-sequence fp32 SmolLM2 decode step
# 120 -> 63 ms; at 1 row even, from 128 rows slower
SMALL_ROWS = range(2, 97)
# a weight kept in GGUF blocks: up to this many rows (decodes) our C kernel reads the blocks (int8 activations);
# above, a prefill dequantizes the weight a tile of rows at a time and keeps MKL's GEMM speed (kernels/cpu/quant.py)
QUANT_KERNEL_ROWS = kernels.QUANT_KERNEL_ROWS
INTERLEAVED_KERNEL_ROWS = kernels.INTERLEAVED_KERNEL_ROWS  # the same per type for rows interleaved 8 at a time


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernels.fused_bf16(x, weight):
        return kernels.rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In bf16 the residual is updated in place, in the same pass as the norm."""
    if kernels.fused_bf16(x, residual, weight):
        return kernels.rms_norm(residual, weight, eps, add=x), residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In bf16, q and k are rotated where they are (torch's rotary is ~20 small ops): in one pass when k's heads
    follow q's in memory (views of the QKV output), else one pass each."""
    if not (
        kernels.fused_bf16(cos, sin)
        and q.dtype == k.dtype == torch.bfloat16
        and all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (q, k))
    ):
        return torch_ops.rotary(q, k, cos, sin)
    row = q.shape[1] * q.shape[2]
    if k.data_ptr() == q.data_ptr() + row * q.element_size() and q.stride(0) == k.stride(0):
        kernels.rope_in_place(
            q.as_strided((q.shape[0], row + k.shape[1] * k.shape[2]), (q.stride(0), 1)), (cos, sin), q.shape[2]
        )
    else:
        for x in (q, k):
            kernels.rope_in_place(x.flatten(1), (cos, sin), x.shape[2])
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if kernels.fused_bf16(x):
        return kernels.silu_and_mul(x)
    return torch_ops.silu_and_mul(x)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """The weight packed for oneDNN where prepare() packed it; a weight kept only in GGUF blocks: quant_linear;
    bf16 decode rows on AMX (reading the GGUF blocks where the loader kept them beside the weight); fp32 small
    batches as (W x^T)^T; else F.linear."""
    if layer.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
    if layer.weight is None:
        return quant_linear(x.reshape(-1, x.shape[-1]), layer.quant, layer.bias).view(*x.shape[:-1], -1)
    if x.dim() != 2:
        return F.linear(x, layer.weight, layer.bias)
    if x.dtype == torch.bfloat16:
        return bf16_linear(x, layer.weight, layer.bias, layer.blocks)
    if x.shape[0] not in SMALL_ROWS:
        return F.linear(x, layer.weight, layer.bias)
    y = (layer.weight @ x.t()).t().contiguous()
    return y if layer.bias is None else y + layer.bias


def quant_linear(x: torch.Tensor, w: QuantWeight | QuantParts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp32 or bf16) times a weight in GGUF blocks: our kernels (kernels/cpu/quant.py: the int8 kernel for
    up to QUANT_KERNEL_ROWS rows, dequantized tiles into torch's GEMM above); without our library, the torch
    reference's dequantized weight. A QuantParts: each part into its columns of y, then the bias."""
    if isinstance(w, QuantParts):
        y = torch.cat([quant_linear(x, part) for part in w.parts], dim=-1)
        return y if bias is None else y.add_(bias)
    y = kernels.quant_linear(
        x.contiguous(), w.qtype, w.blocks, bias, int8_activations=w.int8_activations, interleaved=w.interleaved
    )
    if y is not None:
        return y
    return F.linear(x, dequantize_torch(w).to(x.dtype), bias)


def bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: tuple[int, torch.Tensor] | None
) -> torch.Tensor:
    """Decode rows on AMX (reading the GGUF blocks where given), else F.linear."""
    y = kernels.amx_linear(x, weight, bias, blocks)
    return F.linear(x, weight, bias) if y is None else y


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    blocks: tuple | None = None,
    quant: tuple | None = None,
) -> torch.Tensor:
    """The reference's grouped product: one gate/up and one down matmul per expert that has tokens, so a decode
    step reads only the experts its tokens chose. Experts kept in GGUF blocks (`quant`: each expert's QuantWeight,
    the stacked weight None) go through quant_linear, in fp32 and bf16. In bf16 the others go through `linear`'s
    path: decode rows on AMX, reading the expert's GGUF blocks where the loader kept them (FusedMoE.w13_blocks /
    w2_blocks)."""
    q13, q2 = quant or (None, None)
    if w13 is None or w2 is None:

        def quantized(e: int, xs: torch.Tensor) -> torch.Tensor:
            h = quant_linear(xs, q13[e]) if w13 is None else F.linear(xs, w13[e])
            h = silu_and_mul(h)
            return quant_linear(h, q2[e]) if w2 is None else F.linear(h, w2[e])

        return torch_ops.grouped_experts(x, topk_weights, topk_ids, len(q13 or q2), quantized)
    if x.dtype != torch.bfloat16:
        return torch_ops.fused_experts(x, w13, w2, topk_weights, topk_ids)
    b13, b2 = blocks or (None, None)

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        h = bf16_linear(xs, w13[e], None, b13 and (b13[0], b13[1][e]))
        return bf16_linear(silu_and_mul(h), w2[e], None, b2 and (b2[0], b2[1][e]))

    return torch_ops.grouped_experts(x, topk_weights, topk_ids, w13.shape[0], expert)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: reference.AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The reference's interface (layers/attention.py). Decodes: our kernel reads the blocks in place (any dtype
    it takes). Prompt chunks in bf16 with AMX: our flash attention; else the reference's SDPA."""
    if not kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping):
        reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = q.new_empty(q.shape)  # contiguous, whatever q's strides (a view of the QKV output)
    if len(meta.decode_rows):
        decode = kernels.decode_attention if kernels.available(q, k_cache) else reference.decode_attention
        decode(q, out, k_cache, v_cache, meta, scale)
    chunks = reference.prefill_chunks(meta)
    kv = [reference.chunk_keys(i, k, v, k_cache, v_cache, meta) for i in chunks]
    if chunks and kernels.prefill_attention(q, out, meta.query_start, chunks, *zip(*kv), scale):
        return out
    for i, (keys, values) in zip(chunks, kv):
        reference.prefill_attention(q, out, keys, values, meta, i, scale)
    return out


def sample(logits: torch.Tensor, b: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain temperature sampling (no filter, penalty, bias, ban or grammar; not all greedy): one C pass per row over
    the logits, read in place. Everything else: the reference sampler."""
    if (
        b.repetition_penalty is None
        and not b.banned
        and not b.bias
        and not b.allowed
        and b.token_bitmask is None
        and kernels.can_sample(logits)
        and not b.all_greedy
        and not filtered(b)
    ):
        return kernels.sample(logits, b.temperature, uniform(b, generator, logits.device))
    return torch_ops.sample(logits, b, generator)


def packs_weights(dtype: torch.dtype) -> bool:
    """Whether prepare() packs the bf16 weights for oneDNN: a CPU with native bf16 but no AMX, where oneDNN's
    blocked layout is 1.7-2.5x faster than F.linear at decode sizes (with AMX our kernel reads the plain weight)."""
    return (
        dtype == torch.bfloat16
        and not kernels.has_amx()
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def keeps_gguf_blocks(dtype: torch.dtype) -> bool:
    """Whether decode steps read a GGUF's Q4_1 / Q8_0 blocks (dequantized in the AMX linear, the same values)."""
    return dtype == torch.bfloat16 and kernels.has_amx() and tp_size() == 1


def interleave_gguf_rows(model: torch.nn.Module) -> None:
    """Each GGUF weight kept quantized (a Linear's or the embedding's `quant`; a tied one once) whose type our
    kernel reads faster with its rows interleaved 8 at a time (kernels.interleaves: AVX2, every quantized
    type) is rearranged so, in place: the same bytes, the same values (layers/quant.py interleave_rows)."""
    done = set()
    kept = [getattr(m, "quant", None) for m in model.modules()]
    for w in [part for q in kept if isinstance(q, (QuantWeight, QuantParts)) for part in parts_of(q)]:
        if id(w) in done or w.interleaved:
            continue
        done.add(id(w))
        if w.shape[0] % INTERLEAVE == 0 and w.blocks.is_contiguous() and kernels.interleaves(w.qtype):
            w.blocks.copy_(interleave_rows(w.blocks, w.qtype))
            w.interleaved = True


def prepare(model: torch.nn.Module) -> None:
    """GGUF weights kept quantized: their rows interleaved where our kernel reads them faster so. Where
    packs_weights: every bf16 Linear's weight packed for oneDNN. The plain weight is dropped (no second copy in
    memory) unless another module shares it (a tied embedding)."""
    interleave_gguf_rows(model)
    if not packs_weights(torch.bfloat16):
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not None and m.weight.dtype == torch.bfloat16:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
            if id(m.weight) not in shared:
                m.weight = None


def step_runner(runner, config):
    """A step's layers in one C call (bf16 with AMX: decode-only steps; fp32 anywhere: decodes and short prompt
    chunks), where the model allows it (step_runners/cpu_decode_step.py)."""
    from nanovllm.step_runners.cpu_decode_step import FusedDecodeStep

    return FusedDecodeStep.build(runner)

"""Our C kernels for CPU, for torch tensors: each function checks what its kernel takes (dtype, layout, limits)
and calls it through ctypes (kernels/cpu/build.py builds and loads the library). Functions that may decline
return False or None, and the caller (ops/cpu_ops.py) then uses torch. They know tensors, never the model."""

import torch

from nanovllm.kernels.cpu.build import has_amx, library
from nanovllm.kernels.cpu.quant import (  # noqa: F401 (this package's API: GGUF blocks, quant.py)
    BLOCK_SHAPES,
    GGUF_TYPES,
    INTERLEAVED_KERNEL_ROWS,
    QUANT_KERNEL_ROWS,
    ROWS8,
    TYPE_NAMES,
    X_INT8,
    BlockShape,
    block_shape,
    dequantize,
    interleaves,
    linear_f32,
    quant_linear,
    row_bytes,
)

MAX_GROUP, MAX_HEAD_DIM = 64, 256  # decode attention's fixed-size scratch (kernels.h)


def decode_attention(
    q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float
) -> None:
    """The single-token queries (meta.decode_rows, at meta.decode_tokens of q [T, H, D], rows may be strided) over
    their cached keys/values, into the same rows of `out` (contiguous); fp32 or bf16, metadata read in place."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    tables, lib = meta.block_tables, library()
    rc = lib.decode_attention(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        meta.context_lens.data_ptr(),
        meta.decode_rows.data_ptr(),
        meta.decode_tokens.data_ptr(),
        out.data_ptr(),
        len(meta.decode_rows),
        q.shape[1],
        kv_heads,
        head_dim,
        block_size,
        scale,
        k_cache.dtype == torch.bfloat16,
        lib.amx,
        torch.get_num_threads(),
    )
    if rc:
        raise ValueError(
            f"CPU decode attention supports at most {MAX_GROUP} query heads per KV head and head dims "
            f"that are multiples of 16 up to {MAX_HEAD_DIM}; got {q.shape[1] // kv_heads} and {head_dim}"
        )


def available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention serves this layer: CPU, fp32 or bf16, heads contiguous within q's rows, a
    contiguous cache, within its limits (head dims in vectors of 16: every common model), a compiler found."""
    _, _, kv_heads, head_dim = k_cache.shape
    return (
        q.device.type == "cpu"
        and q.dtype == k_cache.dtype
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.stride(2) == 1
        and q.stride(1) == head_dim
        and k_cache.is_contiguous()
        and q.shape[1] // kv_heads <= MAX_GROUP
        and head_dim % 16 == 0
        and head_dim <= MAX_HEAD_DIM
        and library() is not None
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> bool:
    """Write this step's K/V ([T, Hkv, D], rows may be strided) into the caches at their slots; False (nothing
    written) where the kernel does not apply."""
    row = k_cache.shape[2] * k_cache.shape[3]
    if not (
        k.device.type == "cpu"
        and k.dtype == v.dtype == k_cache.dtype
        and k.dtype in (torch.float32, torch.bfloat16)
        and all(x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in (k, v))
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
        and library() is not None
    ):
        return False
    e = k.element_size()
    library().store_kv(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0) * e,
        v.stride(0) * e,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        len(slot_mapping),
        row * e,
        torch.get_num_threads(),
    )
    return True


LINEAR_ROWS = 128  # up to here the AMX kernel beats oneDNN (docs/benchmarks.md); prefills stay on torch


def amx_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: tuple[int, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K].T (+ bias) for bf16 decode steps (M <= LINEAR_ROWS) on AMX, reading `blocks` (type,
    pack_blocks' output: the same bf16 values) where given; None where the kernel does not apply."""
    n, k = weight.shape
    if not (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.dim() == 2
        and 0 < x.shape[0] <= LINEAR_ROWS
        and n % 16 == 0
        and k % 32 == 0
        and x.device.type == "cpu"
        and x.is_contiguous()
        and weight.is_contiguous()
        and (bias is None or bias.dtype == torch.bfloat16)
        and has_amx()
    ):
        return None
    y = x.new_empty(x.shape[0], n)
    kind, w = blocks or (BF16, weight)
    library().linear_bf16(
        x.data_ptr(),
        x.shape[0],
        w.data_ptr(),
        kind,
        n,
        k,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


BF16, Q4_1, Q8_0 = 30, GGUF_TYPES["Q4_1"], GGUF_TYPES["Q8_0"]  # 30: ggml's GGML_TYPE_BF16
F32 = GGUF_TYPES["F32"]  # linear_f32's type for a plain fp32 weight
# decode_layers' table (decode_step.c), per layer: 6 weights in the order the layer applies them (input norm, qkv,
# o, post norm, gate/up, down), each as (weight or GGUF blocks, bias or 0, type), then the K and V cache
LAYER_POINTERS = 6 * 3 + 2
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}  # per 32 weights: Q4_1 fp16 d, fp16 m, 32 x 4 bits of q; Q8_0 fp16 d, 32 x int8


def decode_scratch(dims: list[int], m: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """decode_layers' buffers for m rows: its output (the last MLP output) and its scratch, by name."""
    hidden, heads, kv_heads, head_dim, inter, _ = dims

    def empty(*shape):
        return torch.empty(*shape, dtype=dtype)

    return {
        "mlp_out": empty(m, hidden),
        "h": empty(m, hidden),
        "qkv": empty(m, (heads + 2 * kv_heads) * head_dim),
        "attn": empty(m, heads * head_dim),
        "gate_up": empty(m, 2 * inter),
        "act": empty(m, inter),
    }


def decode_layers(
    pointers: torch.Tensor,
    dims: torch.Tensor,
    residual: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    meta,
    eps: float,
    scale: float,
    scratch: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A step's decoder layers in one C call (decode_step.c), its rows decodes (a prompt chunk's tokens each as
    one: `meta` from tokens_as_decodes), bf16 (on AMX) or fp32. dims: hidden,
    heads, kv_heads, head_dim, intermediate, block_size. residual [M, hidden]: the embeddings, updated in place into
    the residual stream. scratch: decode_scratch's buffers for these M rows (made here if None). Returns the last
    layer's MLP output (the final norm adds it): scratch["mlp_out"]."""
    m, bf16 = residual.shape[0], residual.dtype == torch.bfloat16
    s = scratch or decode_scratch(dims.tolist(), m, residual.dtype)
    cos, sin = tables
    t, lib = meta.block_tables, library()
    rc = lib.decode_layers(
        len(pointers) // LAYER_POINTERS,
        pointers.data_ptr(),
        dims.data_ptr(),
        m,
        residual.data_ptr(),
        s["mlp_out"].data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        meta.slot_mapping.data_ptr(),
        t.data_ptr(),
        t.stride(0),
        meta.context_lens.data_ptr(),
        meta.decode_rows.data_ptr(),
        meta.decode_tokens.data_ptr(),
        s["h"].data_ptr(),
        s["qkv"].data_ptr(),
        s["attn"].data_ptr(),
        s["gate_up"].data_ptr(),
        s["act"].data_ptr(),
        eps,
        scale,
        bf16,
        lib.amx,
        torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"decode_layers failed ({rc}) on sizes {dims.tolist()} in {residual.dtype}")
    return s["mlp_out"]


PARALLEL_ROWS = 16  # fewer embedding rows: dequantized on one thread (~1 us a row; a fork/join costs more)


def dequantize_rows_into(qtype: int, blocks: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """out [n, K] (fp32, contiguous) = rows `ids` (int64, contiguous) of a weight kept in GGUF blocks, dequantized:
    an embedding lookup with no float table and no allocation. qtype: ggml's id, with ROWS8 for interleaved rows."""
    threads = torch.get_num_threads() if len(ids) >= PARALLEL_ROWS else 1  # a decode step's rows: no fork/join
    rc = library().dequantize_rows(
        blocks.data_ptr(), qtype, out.shape[1], ids.data_ptr(), len(ids), out.data_ptr(), threads
    )
    if rc:
        raise ValueError(f"dequantize_rows cannot read ggml type {qtype} with K = {out.shape[1]} (code {rc})")


def prefill_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    starts: torch.Tensor,
    seqs: list[int],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scale: float,
) -> bool:
    """Causal attention of prompt chunks in bf16 on AMX (prefill_attention.c): the queries of each sequence in `seqs`
    (rows starts[s]..starts[s+1] of q [T, H, D]) over its keys[i] and values[i] ([nk, Hkv, D], k's and v's rows
    strided alike), its n queries at positions nk - n ..; into the same rows of out. False where it does not apply."""
    _, heads, dim = q.shape
    if not (
        seqs
        and q.dtype == out.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.stride(2) == 1
        and q.stride(1) == dim
        and out.is_contiguous()
        and dim % 32 == 0
        and dim <= MAX_HEAD_DIM
        and starts.dtype == torch.int64
        and starts.is_contiguous()
        and has_amx()
        and all(
            k.dtype == v.dtype == torch.bfloat16
            and k.stride(0) == v.stride(0)
            and k.shape == v.shape
            and all(t.stride(2) == 1 and t.stride(1) == dim for t in (k, v))
            for k, v in zip(keys, values)
        )
    ):
        return False
    kv = torch.tensor(
        [x for k, v in zip(keys, values) for x in (k.data_ptr(), v.data_ptr(), k.stride(0), len(k))], dtype=torch.int64
    )
    rows = torch.tensor(seqs, dtype=torch.int64)
    return (
        library().prefill_attention_bf16(
            q.data_ptr(),
            q.stride(0),
            kv.data_ptr(),
            starts.data_ptr(),
            rows.data_ptr(),
            len(seqs),
            out.data_ptr(),
            heads,
            keys[0].shape[1],
            dim,
            scale,
            torch.get_num_threads(),
        )
        == 0
    )


def fused_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels serve these: contiguous bf16 CPU tensors (fp32 stays on torch,
    bit for bit what HF computes)."""
    for t in tensors:  # a loop, not all(genexpr): this runs ~130 times a step
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            return False
    return library() is not None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF's RMSNorm of bf16 or fp32 rows [..., dim] (contiguous) in one pass (torch takes six ops and, in bf16, two
    fp32 copies). With `add`, x += add in place first (the residual stream), in the same pass. Into `out` (contiguous,
    x's shape) where given."""
    out = torch.empty_like(x) if out is None else out
    kernel = library().rms_norm_bf16 if x.dtype == torch.bfloat16 else library().rms_norm_f32
    kernel(
        x.data_ptr(),
        None if add is None else add.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.numel() // x.shape[-1],
        x.shape[-1],
        eps,
        torch.get_num_threads(),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous bf16 or fp32 rows [..., 2 * dim] (gate first)."""
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    kernel = library().silu_and_mul_bf16 if x.dtype == torch.bfloat16 else library().silu_and_mul_f32
    kernel(x.data_ptr(), out.data_ptr(), out.numel() // out.shape[-1], out.shape[-1], torch.get_num_threads())
    return out


def rope_in_place(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], head_dim: int) -> bool:
    """Rotate the heads of bf16 or fp32 rows x [T, heads * head_dim] (a view of the QKV output: query and key heads)
    in place with the step's cos/sin tables ([T, 1, head_dim / 2], contiguous, x's dtype); False (nothing done)
    where it does not apply."""
    cos, sin = tables
    if not (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.stride(-1) == 1
        and all(t.dtype == x.dtype and t.is_contiguous() and t.device.type == "cpu" for t in (cos, sin))
        and library() is not None
    ):
        return False
    kernel = library().rope_bf16 if x.dtype == torch.bfloat16 else library().rope_f32
    kernel(
        x.data_ptr(),
        x.stride(0),
        x.shape[0],
        x.shape[1] // head_dim,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        torch.get_num_threads(),
    )
    return True


def can_sample(logits: torch.Tensor) -> bool:
    return (
        logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.dim() == 2
        and logits.is_contiguous()
        and library() is not None
    )


def sample(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of logits [B, V] (fp32 or bf16, CPU; see can_sample): the argmax where temperature is 0, else the
    token where the running sum of exp(logits / temperature) passes u * total."""
    out = torch.empty(len(logits), dtype=torch.int64)
    temperature, u = temperature.float().contiguous(), u.float().contiguous()
    library().sample_rows(
        logits.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        logits.dtype == torch.bfloat16,
        temperature.data_ptr(),
        u.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out

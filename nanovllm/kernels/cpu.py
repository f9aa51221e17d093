"""Our C kernels for CPU (cpu_attention.c: decode attention, KV store, sampling, and in bf16 rotary, RMSNorm with
the residual add, SiLU-and-mul; cpu_linear.c: decode-step bf16 matmuls on AMX), compiled with gcc on first use and
loaded with ctypes.

Plain C and ctypes instead of a torch C++ extension: it builds in about a second (no torch headers) and
needs nothing but gcc. The OpenMP runtime it links is the one torch already loaded (same soname), so the
kernels share torch's thread pool. Without gcc the engine keeps torch ops (a warning says so).
"""
import ctypes
import functools
import os
import platform
import subprocess
import tempfile
import warnings

import torch
import xxhash

from nanovllm.config import cache_dir

SOURCES = [os.path.join(os.path.dirname(__file__), name) for name in ("cpu_attention.c", "cpu_linear.c",
                                                                          "cpu_decode.c", "cpu_prefill.c")]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source, flags and CPU (-march=native), or None without a compiler."""
    source = b"".join(open(path, "rb").read() for path in SOURCES)
    cpu = platform.processor() + open("/proc/cpuinfo").read().split("flags", 1)[-1].split("\n", 1)[0] \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    key = xxhash.xxh64_hexdigest(source + " ".join(FLAGS).encode() + cpu.encode())
    path = os.path.join(cache_dir("kernels"), f"cpu_attention-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache_dir("kernels"), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir("kernels"))
            os.close(fd)
            subprocess.run(["gcc", *FLAGS, *SOURCES, "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, path)  # atomic: processes building at once each install a whole file
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or e
            warnings.warn(f"nanovllm: cannot build the CPU attention kernel ({detail}); using torch ops instead")
            return None
    lib = ctypes.CDLL(path)
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
                                     + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
                                     + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
    lib.store_kv.restype = None
    lib.store_kv.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
                             + [ctypes.c_int])
    lib.rms_norm_bf16.restype = lib.silu_and_mul_bf16.restype = None
    lib.rms_norm_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.silu_and_mul_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rope_bf16.restype = lib.sample_rows.restype = None
    lib.sample_rows.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                                + [ctypes.c_int])
    lib.rope_bf16.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    lib.linear_bf16.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 2
                                + [ctypes.c_void_p] * 2 + [ctypes.c_int])
    lib.decode_layers_bf16.argtypes = ([ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                                       + [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_void_p] * 8
                                       + [ctypes.c_float] * 2 + [ctypes.c_int])
    lib.prefill_attention_bf16.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
                                           + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3
                                           + [ctypes.c_float, ctypes.c_int])
    lib.amx = lib.linear_amx_init() == 0  # built with AMX, and the kernel let this process use it
    return lib


MAX_GROUP, MAX_HEAD_DIM = 64, 256  # the kernel's fixed-size scratch (cpu_attention.c)


def decode_attention(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta, scale: float) -> None:
    """Attention of the single-token queries (meta.decode_rows, at meta.decode_tokens of q [T, H, D]) over their
    sequences' cached keys/values ([num_blocks, block_size, Hkv, D]), written into the same rows of `out`
    ([T, H, D], contiguous). q's rows may be strided (a view of the QKV output). q, out and the caches share one
    dtype, fp32 or bf16; the metadata's int64 tensors are read in place."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    tables = meta.block_tables
    rc = library().decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
        meta.context_lens.data_ptr(), meta.decode_rows.data_ptr(), meta.decode_tokens.data_ptr(), out.data_ptr(),
        len(meta.decode_rows), q.shape[1], kv_heads, head_dim, block_size, scale, k_cache.dtype == torch.bfloat16,
        torch.get_num_threads())
    if rc:
        raise ValueError(f"CPU decode attention supports at most {MAX_GROUP} query heads per KV head and head dims "
                         f"that are multiples of 16 up to {MAX_HEAD_DIM}; got {q.shape[1] // kv_heads} and {head_dim}")


def available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel serves this layer: CPU tensors of one dtype (fp32 or bf16), a contiguous cache, query
    heads contiguous within each (possibly strided) row, within its limits (head dims in vectors of 16: every
    common model), and a compiler was found."""
    _, _, kv_heads, head_dim = k_cache.shape
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and q.stride(2) == 1 and q.stride(1) == head_dim and k_cache.is_contiguous()
            and q.shape[1] // kv_heads <= MAX_GROUP and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM
            and library() is not None)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """Write this step's K/V ([T, Hkv, D], rows may be strided views of the QKV output) into the caches at
    their slots; False (nothing written) where the kernel does not apply: the caller then uses torch."""
    row = k_cache.shape[2] * k_cache.shape[3]
    if not (k.device.type == "cpu" and k.dtype == v.dtype == k_cache.dtype and k.dtype in (torch.float32, torch.bfloat16)
            and all(x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in (k, v))
            and k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous() and library() is not None):
        return False
    e = k.element_size()
    library().store_kv(k.data_ptr(), v.data_ptr(), k.stride(0) * e, v.stride(0) * e, k_cache.data_ptr(),
                       v_cache.data_ptr(), slot_mapping.data_ptr(), len(slot_mapping), row * e,
                       torch.get_num_threads())
    return True


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU buffer that Linux backs with 2 MB pages where it can (madvise MADV_HUGEPAGE,
    honoured when transparent huge pages are 'always' or 'madvise'). Streaming reads of weights run ~1.4x faster
    there (fewer TLB misses; docs/benchmarks.md); the first touch of each page is slower, paid at load time."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % HUGE_PAGE
    if platform.system() == "Linux" and nbytes >= HUGE_PAGE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(buf.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, 14)  # MADV_HUGEPAGE; advice only
    return buf[start:start + nbytes]


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS. A prefill step
    allocates and frees ~1 GB of activations; returned pages come back as fresh ones, each first write a page
    fault (~7 us a 4 KB page in a VM): SiLU's outputs alone then cost 0.6 s of a preset-cpu run. Blocks up to
    32 MB (glibc's limit) come from the heap, whose top is never trimmed. Process-wide; glibc only."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (an int: 2 GiB, in effect never)
    libc.mallopt(-2, 64 << 20)  # M_TOP_PAD: the heap grows 64 MB at a time


LINEAR_ROWS = 128  # up to here the AMX kernel beats oneDNN (docs/benchmarks.md); prefills stay on torch


def has_amx() -> bool:
    lib = library()
    return lib is not None and lib.amx


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               blocks: tuple[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K].T (+ bias) for bf16 decode steps (M <= LINEAR_ROWS) on a CPU with AMX, reading
    the weight's GGUF blocks where it has them (`blocks`: (type, pack_blocks' output), the same bf16 values);
    None where the kernel does not apply (the caller then uses torch)."""
    n, k = weight.shape
    if not (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2
            and 0 < x.shape[0] <= LINEAR_ROWS and n % 16 == 0 and k % 32 == 0 and x.device.type == "cpu"
            and x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
            and has_amx()):
        return None
    y = x.new_empty(x.shape[0], n)
    kind, w = blocks or (BF16, weight)
    library().linear_bf16(x.data_ptr(), x.shape[0], w.data_ptr(), kind, n, k, None if bias is None else bias.data_ptr(),
                          y.data_ptr(), torch.get_num_threads())
    return y


BF16, Q4_1, Q8_0 = 0, 1, 2  # what linear_bf16 reads (cpu_linear.c): the plain weight, or its GGUF blocks
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}  # per 32 weights: Q4_1 fp16 d, fp16 m, 32 x 4 bits of q; Q8_0 fp16 d, 32 x int8


def pack_blocks(blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """GGUF rows (uint8 [N, K / 32 * BLOCK_BYTES[kind]]) -> the layout linear_bf16 streams: per 16 rows, per 32
    inputs, the 16 rows' q, then their d, then (Q4_1) their m; in 2 MB pages like the other weights."""
    n = blocks.shape[0]
    b = blocks.view(n // 16, 16, -1, BLOCK_BYTES[kind]).transpose(1, 2)  # [N / 16, K / 32, 16 rows, block]
    parts = [b[..., 4:], b[..., :2], b[..., 2:4]] if kind == Q4_1 else [b[..., 2:], b[..., :2]]
    tiles = torch.cat([p.flatten(2) for p in parts], dim=2)
    out = huge_page_buffer(tiles.numel())
    out.view(tiles.shape).copy_(tiles)
    return out


def decodes_in_c(model, x: torch.Tensor, meta) -> bool:
    """Whether a step of models/llama.py's Model can run as cpu_decode.c: bf16 on a CPU with AMX, every row a
    decode (at most LINEAR_ROWS), one rank, no q/k norm, the torch attention backend, sizes every kernel takes."""
    if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and has_amx()):  # every other step: at once
        return False
    from nanovllm.layers.attention import torch_attention  # not at the top: both modules import this one
    from nanovllm.layers.parallel import tp_size
    a, mlp = model.layers[0].self_attn, model.layers[0].mlp
    hidden, inter = x.shape[1], mlp.down_proj.in_features
    return (x.is_contiguous() and 0 < x.shape[0] == len(meta.decode_rows) and x.shape[0] <= LINEAR_ROWS
            and tp_size() == 1 and a.q_norm is None and a.backend is torch_attention
            and a.qkv_proj.weight is not None and a.qkv_proj.weight.dtype == torch.bfloat16
            and a.k_cache.dtype == torch.bfloat16 and a.k_cache.is_contiguous()
            and a.num_heads // a.num_kv_heads <= MAX_GROUP and a.head_dim % 16 == 0 and a.head_dim <= MAX_HEAD_DIM
            and hidden % 32 == 0 and a.q_size % 32 == 0 and (a.q_size + 2 * a.kv_size) % 16 == 0
            and inter % 32 == 0)


def layer_pointers(model) -> torch.Tensor:
    """Per layer, in cpu_decode.c's order: norms, projections (their GGUF blocks where they have them, and the QKV
    bias, 0 if none), K and V caches, the projections' types (BF16, Q4_1, Q8_0).
    Built once (~0.4 ms) and kept on the model while its first layer's weight and cache stay where they are."""
    a = model.layers[0].self_attn
    key = (a.qkv_proj.weight.data_ptr(), a.k_cache.data_ptr())
    if getattr(model, "c_pointers", (None,))[0] != key:
        ptr = lambda t: 0 if t is None else t.data_ptr()
        pointers = []
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            weights = [ptr(m.blocks[1] if m.blocks else m.weight) for m in linears]
            pointers += [ptr(layer.input_layernorm.weight), weights[0], ptr(a.qkv_proj.bias), weights[1],
                         ptr(layer.post_attention_layernorm.weight), *weights[2:], ptr(a.k_cache), ptr(a.v_cache)]
            pointers += [m.blocks[0] if m.blocks else BF16 for m in linears]
        model.c_pointers = key, torch.tensor(pointers, dtype=torch.int64)
    return model.c_pointers[1]


def decode_layers(model, residual: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                  meta) -> torch.Tensor | None:
    """A decode-only bf16 step's decoder layers (models/llama.py's Model) in one C call (cpu_decode.c), or None
    where one of its kernels would not apply (see decodes_in_c). residual [M, hidden]: the embeddings, updated in
    place into the residual stream. Returns the last layer's MLP output."""
    if not decodes_in_c(model, residual, meta):
        return None
    a = model.layers[0].self_attn
    heads, kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
    inter = model.layers[0].mlp.down_proj.in_features
    dims = torch.tensor([residual.shape[1], heads, kv_heads, head_dim, inter, a.k_cache.shape[1]], dtype=torch.int64)
    m = residual.shape[0]
    mlp_out, h = torch.empty_like(residual), torch.empty_like(residual)
    qkv = residual.new_empty(m, (heads + 2 * kv_heads) * head_dim)
    attn, act = residual.new_empty(m, heads * head_dim), residual.new_empty(m, inter)
    gate_up = residual.new_empty(m, 2 * inter)
    cos, sin = tables
    t = meta.block_tables
    rc = library().decode_layers_bf16(
        len(model.layers), layer_pointers(model).data_ptr(), dims.data_ptr(), m, residual.data_ptr(),
        mlp_out.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(), t.data_ptr(), t.stride(0),
        meta.context_lens.data_ptr(), meta.decode_rows.data_ptr(), meta.decode_tokens.data_ptr(), h.data_ptr(),
        qkv.data_ptr(), attn.data_ptr(), gate_up.data_ptr(), act.data_ptr(), model.norm.eps, a.scale,
        torch.get_num_threads())
    if rc:
        raise RuntimeError(f"decode_layers_bf16 failed ({rc}) on sizes decodes_in_c accepted: {dims.tolist()}")
    return mlp_out


def prefill_attention(q: torch.Tensor, out: torch.Tensor, starts: torch.Tensor, seqs: list[int],
                      keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> bool:
    """Causal attention of prompt chunks in bf16 on AMX (cpu_prefill.c): the queries of each sequence in `seqs`
    (rows starts[s]..starts[s+1] of q [T, H, D], rows may be strided) over its keys[i] and values[i] ([nk,
    Hkv, D], rows may be strided, k's and v's alike: the chunk's own rows, or a cached prefix then them), the
    chunk's n queries at positions nk - n ..; into the same rows of out [T, H, D]. False (nothing done) where
    it does not apply: the caller then uses SDPA."""
    _, heads, dim = q.shape
    if not (seqs and q.dtype == out.dtype == torch.bfloat16 and q.device.type == "cpu" and q.stride(2) == 1
            and q.stride(1) == dim and out.is_contiguous() and dim % 32 == 0 and dim <= MAX_HEAD_DIM
            and starts.dtype == torch.int64 and starts.is_contiguous() and has_amx()
            and all(k.dtype == v.dtype == torch.bfloat16 and k.stride(0) == v.stride(0) and k.shape == v.shape
                    and all(t.stride(2) == 1 and t.stride(1) == dim for t in (k, v)) for k, v in zip(keys, values))):
        return False
    kv = torch.tensor([x for k, v in zip(keys, values) for x in (k.data_ptr(), v.data_ptr(), k.stride(0), len(k))],
                      dtype=torch.int64)
    rows = torch.tensor(seqs, dtype=torch.int64)
    return library().prefill_attention_bf16(
        q.data_ptr(), q.stride(0), kv.data_ptr(), starts.data_ptr(), rows.data_ptr(), len(seqs), out.data_ptr(),
        heads, keys[0].shape[1], dim, scale, torch.get_num_threads()) == 0


def fused_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels serve these: contiguous bf16 CPU tensors (fp32 stays on torch,
    bit for bit what HF computes)."""
    for t in tensors:  # a loop, not all(genexpr): this runs ~130 times a step
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            return False
    return library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """HF's RMSNorm of bf16 rows [..., dim] in one pass (torch takes six ops and two fp32 copies). With `add`,
    x += add in place first (the residual stream), in the same pass."""
    out = torch.empty_like(x)
    library().rms_norm_bf16(x.data_ptr(), None if add is None else add.data_ptr(), weight.data_ptr(), out.data_ptr(),
                            x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    library().silu_and_mul_bf16(x.data_ptr(), out.data_ptr(), out.numel() // out.shape[-1], out.shape[-1],
                                torch.get_num_threads())
    return out


def rope_in_place(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], head_dim: int) -> bool:
    """Rotate the heads of bf16 rows x [T, heads * head_dim] (a view of the QKV output: query and key heads) in
    place with the step's cos/sin tables ([T, 1, head_dim / 2]); False (nothing done) where it does not apply."""
    cos, sin = tables
    if not (fused_bf16(cos, sin) and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.stride(-1) == 1):
        return False
    library().rope_bf16(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1] // head_dim, head_dim, cos.data_ptr(),
                        sin.data_ptr(), torch.get_num_threads())
    return True


def can_sample(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() == 2
            and logits.is_contiguous() and library() is not None)


def sample(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of logits [B, V] (fp32 or bf16, CPU; see can_sample): the argmax where temperature is 0, else the
    token where the running sum of exp(logits / temperature) passes u * total."""
    out = torch.empty(len(logits), dtype=torch.int64)
    temperature, u = temperature.float().contiguous(), u.float().contiguous()
    library().sample_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.dtype == torch.bfloat16,
                          temperature.data_ptr(), u.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out

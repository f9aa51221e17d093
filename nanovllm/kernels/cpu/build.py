"""Builds our C kernels for CPU (every .c file in this folder, with kernels.h) into one shared library on first
use, and loads it with ctypes.

Plain C and ctypes instead of a torch C++ extension: it builds in about a second (no torch headers) and needs
nothing but gcc. The OpenMP runtime it links is the one torch already loaded (same soname), so the kernels share
torch's thread pool. The library is cached per source, flags and CPU (-march=native) in cache_dir("kernels").
Without gcc, library() warns and returns None, and the engine keeps torch ops.
"""
import ctypes
import functools
import glob
import os
import platform
import subprocess
import tempfile
import warnings

import xxhash

from nanovllm.config import cache_dir

FOLDER = os.path.dirname(os.path.abspath(__file__))
# -Wno-psabi: the 64-byte vector helpers in kernels.h are static inline; gcc warns about their ABI without
# AVX-512 all the same
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi"]

i64, f32, cint, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {  # name: (restype, argtypes), each under the C prototype it mirrors (kernels.h)
    # int amx_init(void)
    "amx_init": (cint, []),
    # int decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
    #                      const int64_t *tables, int64_t table_stride, const int64_t *lens, const int64_t *rows,
    #                      const int64_t *tokens, void *out, int64_t batch, int64_t heads, int64_t kv_heads,
    #                      int64_t head_dim, int64_t block_size, float scale, int bf16, int amx, int num_threads)
    "decode_attention": (cint, [ptr, i64, ptr, ptr,
                                ptr, i64, ptr, ptr,
                                ptr, ptr, i64, i64, i64,
                                i64, i64, f32, cint, cint, cint]),
    # int prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const int64_t *kv, const int64_t *starts,
    #                            const int64_t *seqs, int64_t nseqs, uint16_t *out, int64_t heads, int64_t kv_heads,
    #                            int64_t dim, float scale, int num_threads)
    "prefill_attention_bf16": (cint, [ptr, i64, ptr, ptr,
                                      ptr, i64, ptr, i64, i64,
                                      i64, f32, cint]),
    # int linear_bf16(const uint16_t *x, int64_t M, const void *w, int type, int64_t N, int64_t K,
    #                 const uint16_t *bias, uint16_t *y, int num_threads)
    "linear_bf16": (cint, [ptr, i64, ptr, cint, i64, i64,
                           ptr, ptr, cint]),
    # void store_kv(const char *k, const char *v, int64_t k_stride, int64_t v_stride, char *k_cache, char *v_cache,
    #               const int64_t *slots, int64_t tokens, int64_t row_bytes, int num_threads)
    "store_kv": (None, [ptr, ptr, i64, i64, ptr, ptr,
                        ptr, i64, i64, cint]),
    # void rms_norm_bf16(uint16_t *x, const uint16_t *add, const uint16_t *weight, uint16_t *out, int64_t rows,
    #                    int64_t dim, float eps, int num_threads)
    "rms_norm_bf16": (None, [ptr, ptr, ptr, ptr, i64,
                             i64, f32, cint]),
    # void silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t dim, int num_threads)
    "silu_and_mul_bf16": (None, [ptr, ptr, i64, i64, cint]),
    # void rope_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t head_dim,
    #                const uint16_t *cos, const uint16_t *sin, int num_threads)
    "rope_bf16": (None, [ptr, i64, i64, i64, i64,
                         ptr, ptr, cint]),
    # void sample_rows(const void *logits, int64_t rows, int64_t vocab, int bf16, const float *temperature,
    #                  const float *u, int64_t *out, int num_threads)
    "sample_rows": (None, [ptr, i64, i64, cint, ptr,
                           ptr, ptr, cint]),
    # int decode_layers_bf16(int64_t layers, const int64_t *layer, const int64_t *dims, int64_t M,
    #                        uint16_t *residual, uint16_t *mlp_out, const uint16_t *cos, const uint16_t *sin,
    #                        const int64_t *slots, const int64_t *tables, int64_t table_stride,
    #                        const int64_t *lens, const int64_t *rows, const int64_t *tokens, uint16_t *h,
    #                        uint16_t *qkv, uint16_t *attn, uint16_t *gate_up, uint16_t *act, float eps,
    #                        float scale, int amx, int num_threads)
    "decode_layers_bf16": (cint, [i64, ptr, ptr, i64,
                                  ptr, ptr, ptr, ptr,
                                  ptr, ptr, i64,
                                  ptr, ptr, ptr, ptr,
                                  ptr, ptr, ptr, ptr, f32,
                                  f32, cint, cint]),
}


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(FOLDER, "*.c")))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, flags and CPU (-march=native), or None without a compiler.
    lib.amx: whether amx_init() returned 0 (built with AMX, and the kernel lets this process use it), asked once."""
    source = b"".join(read(path) for path in sources() + sorted(glob.glob(os.path.join(FOLDER, "*.h"))))
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu += read("/proc/cpuinfo").decode().split("flags", 1)[-1].split("\n", 1)[0]
    key = xxhash.xxh64_hexdigest(source + " ".join(FLAGS).encode() + cpu.encode())
    path = os.path.join(cache_dir("kernels"), f"nanovllm_cpu-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache_dir("kernels"), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir("kernels"))
            os.close(fd)
            subprocess.run(["gcc", *FLAGS, *sources(), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, path)  # atomic: processes building at once each install a whole file
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or e
            warnings.warn(f"nanovllm: cannot build the CPU attention kernel ({detail}); using torch ops instead")
            return None
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    lib.amx = lib.amx_init() == 0
    return lib


def has_amx() -> bool:
    """Whether the kernels may use AMX: built with it (-march=native on a CPU that has it) and granted by Linux."""
    lib = library()
    return lib is not None and lib.amx

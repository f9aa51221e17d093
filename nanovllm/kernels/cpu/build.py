"""Builds our C kernels for CPU (every .c file in this folder, with kernels.h) into one shared library on first
use, and loads it with ctypes.

Plain C and ctypes instead of a torch C++ extension: it builds in about a second (no torch headers) and needs
nothing but gcc. The OpenMP runtime it links is the one torch already loaded (same soname), so the kernels share
torch's thread pool. The library is cached per source, flags and CPU (-march=native) in cache_dir("kernels"); a
second, portable variant (-march=x86-64) lets tests run the plain-C paths on any x86-64.
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
FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi"]
# What each variant targets: "native" this CPU (what the engine loads), "portable" any x86-64 (no AVX2), so
# that tests run the plain-C paths of the kernels on a CPU that has AVX2
VARIANTS = {"native": "-march=native", "portable": "-march=x86-64"}

i64, f32, cint, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {  # name: (restype, argtypes), in the order of the C prototypes in kernels.h
    "amx_init": (cint, []),
    "decode_attention": (
        cint,
        [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, cint, cint, cint],
    ),
    "prefill_attention_bf16": (cint, [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, f32, cint]),
    "linear_bf16": (cint, [ptr, i64, ptr, cint, i64, i64, ptr, ptr, cint]),
    "linear_f32": (cint, [ptr, i64, ptr, cint, i64, i64, ptr, ptr, i64, cint]),
    "dequantize_rows": (cint, [ptr, cint, i64, ptr, i64, ptr, cint]),
    "interleaves": (cint, [cint]),
    "store_kv": (None, [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, cint]),
    "rms_norm_bf16": (None, [ptr, ptr, ptr, ptr, i64, i64, f32, cint]),
    "silu_and_mul_bf16": (None, [ptr, ptr, i64, i64, cint]),
    "rope_bf16": (None, [ptr, i64, i64, i64, i64, ptr, ptr, cint]),
    "sample_rows": (None, [ptr, i64, i64, cint, ptr, ptr, ptr, cint]),
    "rms_norm_f32": (None, [ptr, ptr, ptr, ptr, i64, i64, f32, cint]),
    "silu_and_mul_f32": (None, [ptr, ptr, i64, i64, cint]),
    "rope_f32": (None, [ptr, i64, i64, i64, i64, ptr, ptr, cint]),
    "decode_layers": (
        cint,
        [i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f32, f32]
        + [cint, cint, cint],
    ),
}


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(FOLDER, "*.c")))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@functools.cache
def library(variant: str = "native") -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, flags and CPU (-march=native), or None without a compiler.
    variant: a key of VARIANTS ("portable": the plain-C paths, for tests). lib.amx: whether amx_init() returned 0
    (built with AMX, and the kernel lets this process use it), asked once."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel library variant {variant!r}; expected one of {sorted(VARIANTS)}")
    flags = [*FLAGS, VARIANTS[variant]]
    source = b"".join(read(path) for path in sources() + sorted(glob.glob(os.path.join(FOLDER, "*.h"))))
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu += read("/proc/cpuinfo").decode().split("flags", 1)[-1].split("\n", 1)[0]
    key = xxhash.xxh64_hexdigest(source + " ".join(flags).encode() + cpu.encode())
    path = os.path.join(cache_dir("kernels"), f"nanovllm_cpu-{variant}-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache_dir("kernels"), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir("kernels"))
            os.close(fd)
            subprocess.run(["gcc", *flags, *sources(), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
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

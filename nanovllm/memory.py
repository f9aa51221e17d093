"""Where CPU memory comes from: 2 MB pages for what decode steps stream (weights, the KV pool), and a malloc that
keeps what it frees. Both measured in docs/benchmarks.md; neither changes a result."""

import ctypes
import platform

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU buffer that Linux backs with 2 MB pages where it can (madvise MADV_HUGEPAGE,
    honoured when transparent huge pages are 'always' or 'madvise'). Streaming reads of weights run ~1.4x faster
    there (fewer TLB misses); the first touch of each page is slower, paid at load time."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % HUGE_PAGE
    if platform.system() == "Linux" and nbytes >= HUGE_PAGE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(buf.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)  # advice only
    return buf[start : start + nbytes]


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS. A prefill step
    allocates and frees ~1 GB of activations; returned pages come back as fresh ones, each first write a page
    fault (~7 us a 4 KB page in a VM): SiLU's outputs alone then cost 0.6 s of a preset-cpu run. Blocks up to
    32 MB (glibc's limit) come from the heap, whose top is never trimmed. Process-wide; glibc only."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: 2 GiB, in effect never
    libc.mallopt(M_TOP_PAD, 64 << 20)  # the heap grows 64 MB at a time

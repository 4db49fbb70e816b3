"""Keep the host memory a timing loop frees inside the process (glibc malloc's settings).

glibc returns freed memory to the kernel in two ways: a block above the mmap threshold (128 KiB
at first, raised as such blocks are freed, up to 32 MiB) is unmapped when freed, and free space
at the top of the heap beyond the trim threshold is given back. A profile's timing loop frees
its activations every iteration and allocates them again in the next, so both turn into page
faults on fresh pages each time, which a training process stops paying once its heap has
settled (measured in benchmarks/README.md: no faults from its sixth step, while the profile's
layer benches at tp = 4 faulted some 10,000 pages an iteration). PyTorch's CUDA caching
allocator keeps freed device memory for the same reason; this keeps freed host memory, so the
profile times its layers in the regime of a training step after warm-up.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory() -> bool:
    """Blocks up to 32 MiB come from the heap and the heap is never trimmed; True when set.

    Only glibc has these settings (musl, macOS: False, nothing changed). Blocks above 32 MiB are
    still mapped and unmapped: glibc refuses a larger threshold. The process keeps its peak.
    """
    if platform.libc_ver()[0] != "glibc":  # also covers macOS and Windows: no glibc there
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # NOTE: a trim threshold of -1 disables trimming altogether (mallopt(3)).
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1

"""The training process's host memory policy.

glibc returns a freed block larger than its mmap threshold (it grows with use, up to 32 MiB) to the
kernel at once, and trims the heap's free top beyond its trim threshold; a training step frees and
re-allocates the same activation-sized blocks every step, so each step faults its memory in again
page by page (the demo's stage 2 on the CPU: about 13,000 page faults and a fifth of its time in the
kernel per step). Keeping freed memory in the
process ends that; the process's resident size stays at its peak, which is what a training job holds
anyway. bench/NOTES.md has the measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks up to 32 MiB (glibc's own ceiling for it) come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30  # the heap keeps up to 1 GiB of free memory for reuse


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse; False where the C library is not glibc
    (macOS, musl): nothing changes there."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return mmap_set and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

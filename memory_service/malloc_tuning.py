"""Keep glibc from returning big buffers to the kernel after every use.

Measured here (DESIGN.md section 4): page faults are slow on this machine, and glibc
unmaps large freed blocks at once, so each step's fresh logits/rows buffers fault
their pages in again. Raising the mmap and trim thresholds (what the environment
variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_ARENA_MAX do at
start-up) keeps freed memory for reuse: 1.4x on a tiny train step, 2-4x on gRPC.

"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


# Buffers below this come from the heap and are reused; above it, every allocation is a fresh
# mapping that faults its pages in again (a tiny train step's 67 MB logits, a 33 MB lookup reply).
# Some glibc builds refuse values this high (mallopt returns 0); then we fall back to 32 MiB.
MAX_MMAP_THRESHOLD = 1 << 30


def tune_glibc_malloc(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = (1 << 31) - 1, arena_max: int = 1) -> bool:
    """Apply the thresholds with mallopt(); False when the C library is not glibc or refuses a value."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, MAX_MMAP_THRESHOLD)) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    ok &= mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, (1 << 31) - 1))
    ok &= mallopt(_M_ARENA_MAX, arena_max)
    return bool(ok)

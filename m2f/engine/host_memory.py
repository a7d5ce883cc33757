"""glibc malloc settings for runs whose large tensors live in host memory (CPU inference and training)."""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory at the top of the heap beyond which glibc still returns it to the OS: the largest value
# mallopt takes (its argument is an int).
TRIM_THRESHOLD_BYTES = 2**31 - 1
MALLOC_ENVIRONMENT = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)

_applied = False


def keep_freed_host_memory() -> bool:
    """Makes glibc's malloc serve every allocation from its heap and keep what is freed for reuse (mallopt:
    M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB), for the whole process.

    By default glibc maps each block of more than 32 MB afresh and unmaps it when it is freed, so a forward
    pass on the CPU page-faults its large tensors (an encoder FFN's hidden layer, the 1/4-resolution maps) on
    every call: with the R-50 model at 800 x 1067, 140,000-220,000 page faults and about 10 % of the time per
    image. The process keeps its peak memory instead of returning it between calls. Returns whether the
    settings were applied: False where the C library is not glibc, or where the environment already sets glibc's
    malloc options (MALLOC_*_ variables, glibc.malloc tunables in GLIBC_TUNABLES), which are left as they are.
    """
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied

"""Launch helpers shared by the Triton kernel modules: interpreter detection, shape classes, autotune configs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def size_class(n: int) -> int:
    """Power-of-two bucket of a size, so autotuning keys on the shape class rather than the exact size."""
    return 1 << max(0, n - 1).bit_length()


def block_configs(fixed: triton.Config, blocks: Sequence[dict], warps: Sequence[int]) -> list[triton.Config]:
    """Every (block sizes, num_warps) pair on GPU; only `fixed` under TRITON_INTERPRET=1."""
    if interpreting():
        return [fixed]
    return [triton.Config(dict(block), num_warps=num_warps) for block in blocks for num_warps in warps]


def launch(kernel, grid: Callable[[dict], tuple], args: tuple, fixed: triton.Config, pinned: bool) -> None:
    """Runs an autotuned kernel, or the kernel pinned to `fixed` when `pinned`.

    Pinning serves results whose summation order depends on the block sizes: the autotuner's choice comes
    from timings and may differ between processes, the pinned config does not.
    """
    if pinned:
        kernel.fn[grid](*args, **fixed.all_kwargs())
    else:
        kernel[grid](*args)

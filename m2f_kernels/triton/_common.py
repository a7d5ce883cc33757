"""Helpers shared by the Triton kernel modules: interpreter detection, shape classes, autotune configs, launches and
the matrix product."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .._backend import switch

# Launch options of the kernels that turn a normalized location into a pixel coordinate, x = u * W - 0.5:
# without FMA contraction the product is rounded on its own, as in the reference and the C++/CUDA kernels, so a
# location on a pixel boundary falls into the same cell on every backend.
SAMPLING_OPTIONS = {"enable_fp_fusion": False}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit chooses between the interpreter and the compiler when a kernel is defined, so the kernels of these
# modules run as they were imported, whatever TRITON_INTERPRET says later.
IMPORTED_INTERPRETED = interpreting()


def multiprocessor_count(device: torch.device) -> int:
    """The multiprocessor count of a CUDA device, asked of the driver once per device (the launch plans read it
    on every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index)


@functools.cache
def _multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def size_class(n: int) -> int:
    """Power-of-two bucket of a size, so autotuning keys on the shape class rather than the exact size."""
    return 1 << max(0, n - 1).bit_length()


def autotuning() -> bool:
    """False under TRITON_INTERPRET=1 or M2F_KERNELS_TRITON_AUTOTUNE=0 (read at import): every kernel then runs
    its fixed config, with no autotuning pass on the first call of a shape class."""
    return switch("M2F_KERNELS_TRITON_AUTOTUNE", default=True) and not interpreting()


def block_configs(fixed: triton.Config, blocks: Sequence[dict], warps: Sequence[int]) -> list[triton.Config]:
    """Every (block sizes, num_warps) pair when autotuning(); otherwise only `fixed`."""
    if not autotuning():
        return [fixed]
    return [triton.Config(dict(block), num_warps=num_warps) for block in blocks for num_warps in warps]


def launch(
    kernel, grid: Callable[[dict], tuple], args: tuple, fixed: triton.Config, pinned: bool, **options
) -> None:
    """Runs an autotuned kernel, or the kernel pinned to `fixed` when `pinned`; `options` are launch options
    (e.g. SAMPLING_OPTIONS).

    Pinning serves results whose summation order depends on the block sizes: the autotuner's choice comes
    from timings and may differ between processes, the pinned config does not.
    """
    if pinned:
        kernel.fn[grid](*args, **fixed.all_kwargs(), **options)
    else:
        kernel[grid](*args, **options)


@triton.jit
def dot(a, b, INTERPRETED: tl.constexpr):
    """a @ b summed in float32, or float64 for float64 tiles.

    float32 tiles take three tf32 tensor-core products (about float32 accuracy), 16-bit tiles the tensor cores
    directly, float64 tiles IEEE products. The CPU interpreter sums 32- and 16-bit tiles in float64 and rounds
    once to float32. Its float32 product (numpy's BLAS) rounds in an order that on some CPUs depends on the
    tiles' shapes and orientation: on an AMD EPYC masked attention's backward recomputed scores near 1e11 two
    ulps above the forward's, and exp made its gradients infinite (the GPU kernels pass that test). It also
    gets bfloat16 products wrong.
    """
    if a.dtype == tl.float64:
        return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float64)
    if INTERPRETED:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee", out_dtype=tl.float64).to(
            tl.float32
        )
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)

"""Bilinear point sampling (detectron2's point_sample), DESIGN.md 2.3."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._backend import OpKernels
from ._common import (
    call_op,
    cast_for_autocast,
    check_same_device,
    check_shape,
    check_tensor,
    reference_vjp,
)


def _torch_forward(input, coords):
    return reference.point_sample(input, coords).contiguous()


def _torch_backward(grad_output, input, coords, deterministic):
    return reference_vjp(reference.point_sample, (input, coords), (0, 1), (grad_output,))


KERNELS = OpKernels("point_sample", {"forward": _torch_forward, "backward": _torch_backward})


@torch.library.custom_op("m2f_kernels::point_sample", mutates_args=())
def _point_sample(input: Tensor, coords: Tensor, backend: str) -> Tensor:
    if input.numel() == 0 or coords.numel() == 0:
        return input.new_zeros(input.shape[0], input.shape[1], coords.shape[1])
    return KERNELS.get(backend, input.device, "forward")(input, coords)


@_point_sample.register_fake
def _(input, coords, backend):
    return input.new_empty(input.shape[0], input.shape[1], coords.shape[1])


@torch.library.custom_op("m2f_kernels::point_sample_backward", mutates_args=())
def _point_sample_backward(
    grad_output: Tensor, input: Tensor, coords: Tensor, backend: str, deterministic: bool
) -> tuple[Tensor, Tensor]:
    if input.numel() == 0 or coords.numel() == 0:
        return torch.zeros_like(input), torch.zeros_like(coords)
    backward = KERNELS.get(backend, input.device, "backward")
    return backward(grad_output.contiguous(), input, coords, deterministic)


@_point_sample_backward.register_fake
def _(grad_output, input, coords, backend, deterministic):
    return torch.empty_like(input), torch.empty_like(coords)


def _setup_context(ctx, inputs, output):
    input, coords, backend = inputs
    ctx.save_for_backward(input, coords)
    ctx.backend = backend


def _backward(ctx, grad_output):
    input, coords = ctx.saved_tensors
    grad_input, grad_coords = call_op(
        _point_sample_backward,
        grad_output,
        input,
        coords,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_input, grad_coords, None


_point_sample.register_autograd(_backward, setup_context=_setup_context)


def point_sample(input: Tensor, coords: Tensor, *, backend: str = "auto") -> Tensor:
    """Bilinear samples of input (N, C, H, W) at coords (N, P, 2), normalized (x, y) in [0, 1] -> (N, C, P).

    align_corners=False, zero padding outside the image (detectron2's point_sample / grid_sample semantics);
    NaN coordinates sample zero. coords have input's dtype or float32: float32 coords keep the points of a
    float16 / bfloat16 image where they are (bfloat16 moves a point of a 1024-pixel row by up to 2 pixels);
    under autocast only input is cast. Output in input's dtype. Differentiable w.r.t. input and coords.
    """
    check_tensor("input", input, ndim=4, floating=True)
    check_tensor("coords", coords, ndim=3, floating=True)
    check_shape("coords", coords, (input.shape[0], None, 2), "N, P, (x, y)")
    check_same_device("input", input, coords=coords)
    if coords.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"coords must be float32 or have input's dtype ({input.dtype}), got {coords.dtype}")
    (input,) = cast_for_autocast(input.device, input)
    if coords.dtype not in (input.dtype, torch.float32):
        coords = coords.float()  # autocast changed input's dtype; float32 coords are taken with any
    return call_op(_point_sample, input.contiguous(), coords.contiguous(), backend)

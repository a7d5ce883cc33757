"""Multi-scale deformable attention: checks, custom op, autograd and backend dispatch (DESIGN.md 2.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._backend import OpKernels
from ._common import (
    call_op,
    cast_for_autocast,
    check_index,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    reference_vjp,
)


def _torch_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return reference.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _torch_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    deterministic,
):
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return reference_vjp(reference.ms_deform_attn, inputs, (0, 3, 4), (grad_output,))


KERNELS = OpKernels("ms_deform_attn", {"forward": _torch_forward, "backward": _torch_backward})


@torch.library.custom_op("m2f_kernels::ms_deform_attn", mutates_args=())
def _ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> Tensor:
    check_level_values(value, spatial_shapes, level_start_index)
    batch, _, heads, channels = value.shape
    if value.numel() == 0 or attention_weights.numel() == 0:
        return value.new_zeros(batch, sampling_locations.shape[1], heads * channels)
    forward = KERNELS.get(backend, value.device, "forward")
    return forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * channels)


@torch.library.custom_op("m2f_kernels::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if value.numel() == 0 or attention_weights.numel() == 0:
        return (
            torch.zeros_like(value),
            torch.zeros_like(sampling_locations),
            torch.zeros_like(attention_weights),
        )
    backward = KERNELS.get(backend, value.device, "backward")
    return backward(
        grad_output.contiguous(),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        deterministic,
    )


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *flags):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _backward(ctx, grad_output):
    grad_value, grad_locations, grad_weights = call_op(
        _ms_deform_attn_backward,
        grad_output,
        *ctx.saved_tensors,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_value, None, None, grad_locations, grad_weights, None


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


def checked_levels(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> tuple[Tensor, Tensor]:
    """The level table on value's device, its shapes and devices checked. check_level_values checks its
    values in the op body, or here for a CPU table bound for another device: free before the move, while the
    op body then sees a table on the device, which it trusts."""
    levels = spatial_shapes.shape[0]
    check_shape("level_start_index", level_start_index, (levels,), "one start row per level")
    for name, table in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if table.is_meta and not value.is_meta:
            raise ValueError(
                f"{name} is on the meta device, which holds no values, but value is on {value.device}; "
                "put the level table on the CPU or on value's device"
            )
    if value.device.type != "cpu" and not torch.compiler.is_compiling():
        check_level_values(value, spatial_shapes, level_start_index)
    return spatial_shapes.to(value.device), level_start_index.to(value.device)


def check_level_values(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> None:
    """Checks that the level table describes ``value``'s S rows, when the table is on the CPU (free); a table
    on an accelerator is trusted, so that an op call never waits for the device. The custom ops call it:
    their bodies see the real tables in eager, traced and compiled calls alike."""
    if spatial_shapes.device.type != "cpu" or level_start_index.device.type != "cpu":
        return
    shapes = spatial_shapes.tolist()  # a few levels: plain Python is cheaper than tensor ops here
    if any(size < 0 for shape in shapes for size in shape):
        raise ValueError(f"spatial_shapes must be non-negative, got {shapes}")
    sizes = [height * width for height, width in shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(sizes)} positions but value has "
            f"S={value.shape[1]} (value must be (N, S, M, D) with S = sum of H*W)"
        )
    expected_starts = [sum(sizes[:level]) for level in range(len(sizes))]
    if level_start_index.tolist() != expected_starts:
        raise ValueError(
            f"level_start_index must be the running sum of H*W, {expected_starts}, "
            f"got {level_start_index.tolist()}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention.

    value (N, S, M, D), S = sum_l H_l * W_l; spatial_shapes (L, 2) integer rows (H_l, W_l); level_start_index (L,);
    sampling_locations (N, Q, M, L, P, 2) normalized (x, y) in [0, 1] (align_corners=False, zero padding
    outside; NaN contributes nothing); attention_weights (N, Q, M, L, P), already softmaxed (the weight of a
    sample wholly outside its level is not read, as in Deformable-DETR's kernel).
    Returns (N, Q, M * D). backend: "auto", "cuda", "triton", "cpu" or "torch".
    """
    check_tensor("value", value, ndim=4, floating=True)
    check_tensor("sampling_locations", sampling_locations, ndim=6, floating=True)
    check_tensor("attention_weights", attention_weights, ndim=5, floating=True)
    check_same_device(
        "value", value, sampling_locations=sampling_locations, attention_weights=attention_weights
    )
    spatial_shapes = check_index("spatial_shapes", spatial_shapes)
    level_start_index = check_index("level_start_index", level_start_index)
    check_shape("spatial_shapes", spatial_shapes, (None, 2), "L levels of (H, W)")
    batch, _, heads, _ = value.shape
    levels = spatial_shapes.shape[0]
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    check_shape(
        "sampling_locations",
        sampling_locations,
        (batch, queries, heads, levels, points, 2),
        "N, Q, M, L, P, (x, y)",
    )
    check_shape(
        "attention_weights", attention_weights, (batch, queries, heads, levels, points), "N, Q, M, L, P"
    )
    spatial_shapes, level_start_index = checked_levels(value, spatial_shapes, level_start_index)
    value, sampling_locations, attention_weights = cast_for_autocast(
        value.device, value, sampling_locations, attention_weights
    )
    check_same_dtype(
        "value", value, sampling_locations=sampling_locations, attention_weights=attention_weights
    )
    return call_op(
        _ms_deform_attn,
        value.contiguous(),
        spatial_shapes,
        level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        backend,
    )


class MSDeformAttnFunction:
    """The official Deformable-DETR call: ``MSDeformAttnFunction.apply(value, shapes, starts, locs, weights, step)``.

    ``im2col_step`` is accepted and ignored: there is no batch divisibility rule here.
    """

    @staticmethod
    def apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
    ):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

"""Fused multi-scale deformable attention from offsets and logits (DESIGN.md 2.1, fused variant).

Locations (reference + offset / (W_l, H_l)) and softmaxed weights are formed inside the kernel, so the
(N, Q, M, L, P, 2) location tensor and the weights are never stored. Backends without a fused kernel compose
the reference's location/softmax step with the ``ms_deform_attn`` kernels of the same backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._backend import OpKernels
from ..reference.ms_deform_attn_fused import sampling_locations_and_weights
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
from .ms_deform_attn import KERNELS as UNFUSED_KERNELS
from .ms_deform_attn import check_level_values, checked_levels


def _torch_forward(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits
):
    return reference.ms_deform_attn_fused(
        value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits
    )


def _torch_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    sampling_offsets,
    attention_logits,
    deterministic,
):
    inputs = (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits)
    return reference_vjp(reference.ms_deform_attn_fused, inputs, (0, 3, 4, 5), (grad_output,))


KERNELS = OpKernels("ms_deform_attn_fused", {"forward": _torch_forward, "backward": _torch_backward})


def _composed_forward(backend, value, spatial_shapes, level_start_index, reference_points, offsets, logits):
    locations, weights = sampling_locations_and_weights(spatial_shapes, reference_points, offsets, logits)
    forward = UNFUSED_KERNELS.get(backend, value.device, "forward")
    return forward(value, spatial_shapes, level_start_index, locations.to(value.dtype), weights.contiguous())


def _composed_backward(
    backend,
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    logits,
    deterministic,
):
    """Unfused kernel backward, then the chain rule through the location and softmax step."""
    locations, weights = sampling_locations_and_weights(spatial_shapes, reference_points, offsets, logits)
    backward = UNFUSED_KERNELS.get(backend, value.device, "backward")
    grad_value, grad_locations, grad_weights = backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        locations.to(value.dtype),
        weights.contiguous(),
        deterministic,
    )
    grad_reference, grad_offsets, grad_logits = reference_vjp(
        sampling_locations_and_weights,
        (spatial_shapes, reference_points, offsets, logits),
        (1, 2, 3),
        (grad_locations, grad_weights),
    )
    return grad_value, grad_reference, grad_offsets, grad_logits


def _uses_fused_kernel(backend: str, device: torch.device, stage: str) -> bool:
    try:
        return KERNELS.resolve(backend, device, stage) != "torch" or backend == "torch"
    except RuntimeError:
        return False


@torch.library.custom_op("m2f_kernels::ms_deform_attn_fused", mutates_args=())
def _ms_deform_attn_fused(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    backend: str,
) -> Tensor:
    check_level_values(value, spatial_shapes, level_start_index)
    batch, _, heads, channels = value.shape
    if value.numel() == 0 or attention_logits.numel() == 0:
        return value.new_zeros(batch, sampling_offsets.shape[1], heads * channels)
    inputs = (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits)
    if _uses_fused_kernel(backend, value.device, "forward"):
        return KERNELS.get(backend, value.device, "forward")(*inputs)
    return _composed_forward(backend, *inputs)


@_ms_deform_attn_fused.register_fake
def _(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits, backend
):
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_offsets.shape[1], heads * channels)


@torch.library.custom_op("m2f_kernels::ms_deform_attn_fused_backward", mutates_args=())
def _ms_deform_attn_fused_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if value.numel() == 0 or attention_logits.numel() == 0:
        return tuple(
            torch.zeros_like(t) for t in (value, reference_points, sampling_offsets, attention_logits)
        )
    inputs = (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits)
    grad_output = grad_output.contiguous()
    if _uses_fused_kernel(backend, value.device, "backward"):
        return KERNELS.get(backend, value.device, "backward")(grad_output, *inputs, deterministic)
    return _composed_backward(backend, grad_output, *inputs, deterministic)


@_ms_deform_attn_fused_backward.register_fake
def _(
    grad_output, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, logits, *flags
):
    return tuple(torch.empty_like(t) for t in (value, reference_points, sampling_offsets, logits))


def _setup_context(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _backward(ctx, grad_output):
    grad_value, grad_reference, grad_offsets, grad_logits = call_op(
        _ms_deform_attn_fused_backward,
        grad_output,
        *ctx.saved_tensors,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_value, None, None, grad_reference, grad_offsets, grad_logits, None


_ms_deform_attn_fused.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_fused(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention from raw offsets and logits.

    value (N, S, M, D); spatial_shapes (L, 2) rows (H_l, W_l); level_start_index (L,); reference_points
    (N, Q, L, 2) normalized (x, y); sampling_offsets (N, Q, M, L, P, 2) in pixels of level l; attention_logits
    (N, Q, M, L * P). location = reference + offset / (W_l, H_l), weights = softmax over the L * P samples.
    Returns (N, Q, M * D).
    """
    check_tensor("value", value, ndim=4, floating=True)
    check_tensor("reference_points", reference_points, ndim=4, floating=True)
    check_tensor("sampling_offsets", sampling_offsets, ndim=6, floating=True)
    check_tensor("attention_logits", attention_logits, ndim=4, floating=True)
    check_same_device(
        "value",
        value,
        reference_points=reference_points,
        sampling_offsets=sampling_offsets,
        attention_logits=attention_logits,
    )
    spatial_shapes = check_index("spatial_shapes", spatial_shapes)
    level_start_index = check_index("level_start_index", level_start_index)
    check_shape("spatial_shapes", spatial_shapes, (None, 2), "L levels of (H, W)")
    batch, _, heads, _ = value.shape
    levels = spatial_shapes.shape[0]
    queries, points = sampling_offsets.shape[1], sampling_offsets.shape[4]
    check_shape("reference_points", reference_points, (batch, queries, levels, 2), "N, Q, L, (x, y)")
    check_shape(
        "sampling_offsets",
        sampling_offsets,
        (batch, queries, heads, levels, points, 2),
        "N, Q, M, L, P, (x, y)",
    )
    check_shape(
        "attention_logits", attention_logits, (batch, queries, heads, levels * points), "N, Q, M, L*P"
    )
    spatial_shapes, level_start_index = checked_levels(value, spatial_shapes, level_start_index)
    value, reference_points, sampling_offsets, attention_logits = cast_for_autocast(
        value.device, value, reference_points, sampling_offsets, attention_logits
    )
    check_same_dtype(
        "value",
        value,
        reference_points=reference_points,
        sampling_offsets=sampling_offsets,
        attention_logits=attention_logits,
    )
    return call_op(
        _ms_deform_attn_fused,
        value.contiguous(),
        spatial_shapes,
        level_start_index,
        reference_points.contiguous(),
        sampling_offsets.contiguous(),
        attention_logits.contiguous(),
        backend,
    )

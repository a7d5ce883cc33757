"""Sigmoid cross-entropy + dice on sampled points, sampling fused into the loss (DESIGN.md 2.3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .._backend import OpKernels
from ._common import (
    accumulate_dtype,
    binary_mask_bytes,
    call_op,
    cast_for_autocast,
    check_same_device,
    check_shape,
    check_tensor,
    check_unit_interval,
    real_number,
    reference_vjp,
    soft_target_dtype,
)


def _torch_forward(mask_logits, target_masks, coords):
    return reference.point_mask_loss_per_mask(mask_logits, target_masks, coords)


def _torch_backward(grad_ce, grad_dice, mask_logits, target_masks, coords, dice_sums, deterministic):
    (grad_logits,) = reference_vjp(
        reference.point_mask_loss_per_mask,
        (mask_logits, target_masks, coords),
        (0,),
        (grad_ce, grad_dice, None),
    )
    return grad_logits


KERNELS = OpKernels("point_mask_loss", {"forward": _torch_forward, "backward": _torch_backward})


@torch.library.custom_op("m2f_kernels::point_mask_loss", mutates_args=())
def _point_mask_loss(
    mask_logits: Tensor, target_masks: Tensor, coords: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    masks = mask_logits.shape[0]
    if mask_logits.numel() == 0 or coords.numel() == 0 or target_masks.numel() == 0:
        zeros = mask_logits.new_zeros(masks, dtype=accumulate_dtype(mask_logits.dtype))
        return zeros, zeros.clone(), mask_logits.new_zeros(masks, 3, dtype=zeros.dtype)
    forward = KERNELS.get(backend, mask_logits.device, "forward")
    return forward(mask_logits, target_masks, coords)


@_point_mask_loss.register_fake
def _(mask_logits, target_masks, coords, backend):
    dtype = accumulate_dtype(mask_logits.dtype)
    masks = mask_logits.shape[0]
    return (
        mask_logits.new_empty(masks, dtype=dtype),
        mask_logits.new_empty(masks, dtype=dtype),
        mask_logits.new_empty(masks, 3, dtype=dtype),
    )


@torch.library.custom_op("m2f_kernels::point_mask_loss_backward", mutates_args=())
def _point_mask_loss_backward(
    grad_ce: Tensor,
    grad_dice: Tensor,
    mask_logits: Tensor,
    target_masks: Tensor,
    coords: Tensor,
    dice_sums: Tensor,
    backend: str,
    deterministic: bool,
) -> Tensor:
    if mask_logits.numel() == 0 or coords.numel() == 0 or target_masks.numel() == 0:
        return torch.zeros_like(mask_logits)
    backward = KERNELS.get(backend, mask_logits.device, "backward")
    return backward(
        grad_ce.contiguous(),
        grad_dice.contiguous(),
        mask_logits,
        target_masks,
        coords,
        dice_sums,
        deterministic,
    )


@_point_mask_loss_backward.register_fake
def _(grad_ce, grad_dice, mask_logits, *rest):
    return torch.empty_like(mask_logits)


def _setup_context(ctx, inputs, output):
    mask_logits, target_masks, coords, backend = inputs
    ctx.save_for_backward(mask_logits, target_masks, coords, output[2])
    ctx.backend = backend


def _backward(ctx, grad_ce, grad_dice, grad_sums):
    mask_logits, target_masks, coords, dice_sums = ctx.saved_tensors
    if grad_ce is None:
        grad_ce = torch.zeros_like(dice_sums[:, 0])
    if grad_dice is None:
        grad_dice = torch.zeros_like(dice_sums[:, 0])
    grad_logits = call_op(
        _point_mask_loss_backward,
        grad_ce,
        grad_dice,
        mask_logits,
        target_masks,
        coords,
        dice_sums,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_logits, None, None, None


_point_mask_loss.register_autograd(_backward, setup_context=_setup_context)


def _checked_num_masks(num_masks: float | Tensor) -> float | Tensor:
    """num_masks as a number or a 0-d tensor; ValueError unless it is positive and finite."""
    if isinstance(num_masks, Tensor):
        if num_masks.numel() != 1 or num_masks.dtype == torch.bool or num_masks.is_complex():
            raise ValueError(
                f"num_masks must be a number or a one-element real tensor, got a {num_masks.dtype} tensor of "
                f"shape {tuple(num_masks.shape)}"
            )
        num_masks = num_masks.reshape(())
        if num_masks.device.type != "cpu":
            return num_masks
        if torch.compiler.is_compiling():  # no value while tracing: the compiled graph checks it
            torch._assert_async(
                (num_masks > 0) & torch.isfinite(num_masks), "num_masks must be positive and finite"
            )
            return num_masks
    value = real_number("num_masks", num_masks)
    if not 0 < value < math.inf:
        raise ValueError(f"num_masks must be positive and finite, got {value}")
    return num_masks if isinstance(num_masks, Tensor) else value


def point_mask_loss(
    mask_logits: Tensor,
    target_masks: Tensor,
    coords: Tensor,
    num_masks: float | Tensor,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Mask2Former's mask losses on sampled points, sampling fused into the loss.

    mask_logits (N, H, W) predicted mask logits (e.g. at 1/4 resolution); target_masks (N, Ht, Wt) (e.g. at
    full resolution): float in [0, 1] (ValueError otherwise, for targets on the CPU), read in float32 or
    wider, never rounded to half logits' dtype; or a bool/uint8 mask, where any nonzero value is 1 (a uint8
    mask is copied as such; a bool one is read in place); coords (N, P, 2) normalized (x, y) in [0, 1];
    num_masks the normalizer (Mask2Former: matched masks averaged over processes), a number or a one-element
    tensor (whose value is checked on the CPU only, in eager and compiled calls: reading it from a GPU would
    wait for the device). Both maps are sampled bilinearly (align_corners=False, zero padding).
    Returns (ce, dice), float32 scalars (float64 for float64 logits): the sum over masks of the mean
    BCE-with-logits over points, and of 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), each divided by num_masks.
    An empty map (H, W, Ht or Wt = 0) samples as zeros. With no mask or no point both losses are 0.
    Differentiable w.r.t. mask_logits only; nothing of size (N, P) is kept for the backward.
    """
    check_tensor("mask_logits", mask_logits, ndim=3, floating=True)
    check_tensor("target_masks", target_masks, ndim=3)
    check_tensor("coords", coords, ndim=3, floating=True)
    masks = mask_logits.shape[0]
    check_shape("target_masks", target_masks, (masks, None, None), "N, Ht, Wt")
    check_shape("coords", coords, (masks, None, 2), "N, P, (x, y)")
    check_same_device("mask_logits", mask_logits, target_masks=target_masks, coords=coords)
    num_masks = _checked_num_masks(num_masks)
    (mask_logits,) = cast_for_autocast(mask_logits.device, mask_logits)
    # Zero padding samples 0 everywhere from an empty map, as from a 1x1 map of zeros. For the logits that map
    # is their sum over the empty map, which keeps them in the autograd graph.
    if 0 in mask_logits.shape[1:]:
        mask_logits = mask_logits.sum(dim=(1, 2), keepdim=True)
    if 0 in target_masks.shape[1:]:
        target_masks = target_masks.new_zeros(masks, 1, 1)
    if target_masks.dtype in (torch.bool, torch.uint8):
        target_masks = binary_mask_bytes(target_masks)
    elif target_masks.dtype.is_floating_point:
        check_unit_interval("target_masks", target_masks)
        target_masks = target_masks.to(soft_target_dtype(target_masks, mask_logits))
    else:
        raise TypeError(f"target_masks must be bool, uint8 or floating, got {target_masks.dtype}")
    # float32 even for half logits: half precision cannot address every pixel of a 1024 map
    coords = coords.to(accumulate_dtype(mask_logits.dtype))
    ce, dice, _ = call_op(
        _point_mask_loss, mask_logits.contiguous(), target_masks.contiguous(), coords.contiguous(), backend
    )
    return ce.sum() / num_masks, dice.sum() / num_masks

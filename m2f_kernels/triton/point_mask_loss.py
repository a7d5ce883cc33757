"""Triton kernels of point_mask_loss: sigmoid CE and dice on bilinearly sampled points, DESIGN.md 2.3.

The forward splits each mask's points into ranges, one program per (mask, range): each samples logits and
targets at its points and writes four partial sums, which a second kernel adds per mask. The backward samples
them again (only the per-mask dice sums are kept) and scatters the point gradients to the four logit corners.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SAMPLING_OPTIONS, block_configs, interpreting, launch, multiprocessor_count, size_class
from .point_sample import (
    POINT_BLOCKS,
    accumulate_dtype,
    add_pairs_in_order,
    locate_points,
    program_points,
    sample_plane,
    scatter_corners,
    triton_accumulate_dtype,
)

FORWARD_FIXED = triton.Config({"BLOCK": 512}, num_warps=4)
FINALIZE_BLOCK = 128
BACKWARD_FIXED = triton.Config({"BLOCK": 512}, num_warps=4)


@triton.jit
def _sample_logits_and_targets(
    logits_ptr,
    targets_ptr,
    coords_ptr,
    n,
    points,
    point_mask,
    height,
    width,
    target_height,
    target_width,
    num_points,
    ACC: tl.constexpr,
):
    coord_offset = (n * num_points + points) * 2
    coord_x = tl.load(coords_ptr + coord_offset, mask=point_mask, other=0).to(ACC)
    coord_y = tl.load(coords_ptr + coord_offset + 1, mask=point_mask, other=0).to(ACC)
    x0, y0, lx, ly, valid = locate_points(coord_x, coord_y, point_mask, height, width)
    logit = sample_plane(logits_ptr + n * height * width, x0, y0, lx, ly, valid, height, width, ACC)
    tx0, ty0, tlx, tly, target_valid = locate_points(
        coord_x, coord_y, point_mask, target_height, target_width
    )
    target = sample_plane(
        targets_ptr + n * target_height * target_width,
        tx0,
        ty0,
        tlx,
        tly,
        target_valid,
        target_height,
        target_width,
        ACC,
    )
    return logit, target, x0, y0, lx, ly, valid


@triton.autotune(
    configs=block_configs(FORWARD_FIXED, [{"BLOCK": block} for block in (256, 512, 1024, 2048)], (4, 8)),
    key=["points_per_split", "PLANE_CLASS", "TARGET_PLANE_CLASS"],
)
@triton.jit
def _point_mask_loss_forward_kernel(
    logits_ptr,
    targets_ptr,
    coords_ptr,
    partial_ptr,
    height,
    width,
    target_height,
    target_width,
    num_points,
    points_per_split,
    num_splits,
    PLANE_CLASS,
    TARGET_PLANE_CLASS,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program n * num_splits + s: points [s * points_per_split, (s + 1) * points_per_split) of mask n;
    writes partial[n, s] = [sum ce, sum p t, sum p, sum t]. points_per_split is a multiple of BLOCK. A mask's
    splits are consecutive programs, so they run together and share the mask's planes in L2."""
    n = (tl.program_id(0) // num_splits).to(tl.int64)
    split = tl.program_id(0) % num_splits
    begin = split * points_per_split
    end = tl.minimum(begin + points_per_split, num_points)
    ce_acc = tl.zeros([BLOCK], dtype=ACC)
    prob_target_acc = tl.zeros([BLOCK], dtype=ACC)
    prob_acc = tl.zeros([BLOCK], dtype=ACC)
    target_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(begin, end, BLOCK):
        points = start + tl.arange(0, BLOCK)
        point_mask = points < num_points
        logit, target, _, _, _, _, _ = _sample_logits_and_targets(
            logits_ptr,
            targets_ptr,
            coords_ptr,
            n,
            points,
            point_mask,
            height,
            width,
            target_height,
            target_width,
            num_points,
            ACC,
        )
        prob = tl.where(point_mask, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
        ce = tl.maximum(logit, 0.0) - logit * target + tl.log(1.0 + tl.exp(-tl.abs(logit)))
        ce_acc += tl.where(point_mask, ce, 0.0)
        prob_target_acc += prob * target
        prob_acc += prob
        target_acc += target
    partial = partial_ptr + tl.program_id(0).to(tl.int64) * 4
    tl.store(partial, tl.sum(ce_acc, axis=0))
    tl.store(partial + 1, tl.sum(prob_target_acc, axis=0))
    tl.store(partial + 2, tl.sum(prob_acc, axis=0))
    tl.store(partial + 3, tl.sum(target_acc, axis=0))


@triton.jit
def _point_mask_loss_finalize_kernel(
    partial_ptr, ce_ptr, dice_ptr, sums_ptr, num_masks, num_splits, num_points, BLOCK: tl.constexpr
):
    """One lane per mask: adds partial (N, splits, 4) over the splits in order, writes ce (N,) = sum ce / P,
    dice (N,) and dice sums (N, 3) = [sum p t, sum p, sum t]."""
    masks = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask_mask = masks < num_masks
    row = partial_ptr + masks * num_splits * 4
    ce_sum = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    prob_target_sum = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    prob_sum = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    target_sum = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for split in range(num_splits):
        ce_sum += tl.load(row + split * 4, mask=mask_mask, other=0)
        prob_target_sum += tl.load(row + split * 4 + 1, mask=mask_mask, other=0)
        prob_sum += tl.load(row + split * 4 + 2, mask=mask_mask, other=0)
        target_sum += tl.load(row + split * 4 + 3, mask=mask_mask, other=0)
    tl.store(ce_ptr + masks, ce_sum / num_points, mask=mask_mask)
    dice = 1.0 - (2.0 * prob_target_sum + 1.0) / (prob_sum + target_sum + 1.0)
    tl.store(dice_ptr + masks, dice, mask=mask_mask)
    tl.store(sums_ptr + 3 * masks, prob_target_sum, mask=mask_mask)
    tl.store(sums_ptr + 3 * masks + 1, prob_sum, mask=mask_mask)
    tl.store(sums_ptr + 3 * masks + 2, target_sum, mask=mask_mask)


@triton.autotune(
    configs=block_configs(BACKWARD_FIXED, POINT_BLOCKS, (2, 4, 8)),
    key=["POINTS_CLASS", "PLANE_CLASS", "TARGET_PLANE_CLASS", "DETERMINISTIC"],
    reset_to_zero=["grad_ptr"],
)
@triton.jit
def _point_mask_loss_backward_kernel(
    grad_ce_ptr,
    grad_dice_ptr,
    logits_ptr,
    targets_ptr,
    coords_ptr,
    sums_ptr,
    grad_ptr,
    index_ptr,
    value_ptr,
    height,
    width,
    target_height,
    target_width,
    num_points,
    POINTS_CLASS,
    PLANE_CLASS,
    TARGET_PLANE_CLASS,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    n, points = program_points(num_points, BLOCK)
    point_mask = points < num_points
    logit, target, x0, y0, lx, ly, valid = _sample_logits_and_targets(
        logits_ptr,
        targets_ptr,
        coords_ptr,
        n,
        points,
        point_mask,
        height,
        width,
        target_height,
        target_width,
        num_points,
        ACC,
    )
    grad_ce = tl.load(grad_ce_ptr + n).to(ACC)
    grad_dice = tl.load(grad_dice_ptr + n).to(ACC)
    prob_target_sum = tl.load(sums_ptr + 3 * n).to(ACC)
    prob_sum = tl.load(sums_ptr + 3 * n + 1).to(ACC)
    target_sum = tl.load(sums_ptr + 3 * n + 2).to(ACC)
    numerator = 2.0 * prob_target_sum + 1.0
    inv_denominator = 1.0 / (prob_sum + target_sum + 1.0)
    # d(dice)/d(p_i) = -(2 t_i * denominator - numerator) / denominator^2
    dice_target_scale = -2.0 * grad_dice * inv_denominator
    dice_constant = grad_dice * numerator * inv_denominator * inv_denominator
    prob = 1.0 / (1.0 + tl.exp(-logit))
    grad = grad_ce / num_points * (prob - target) + (dice_target_scale * target + dice_constant) * prob * (
        1.0 - prob
    )
    grad = tl.where(valid, grad, 0.0)
    pair_offset = (n * num_points + points) * 4
    scatter_corners(
        grad_ptr + n * height * width,
        index_ptr + pair_offset,
        value_ptr + pair_offset,
        grad,
        x0,
        y0,
        lx,
        ly,
        valid,
        point_mask,
        height,
        width,
        DETERMINISTIC,
    )


def _target_view(target_masks: torch.Tensor) -> torch.Tensor:
    return target_masks.view(torch.uint8) if target_masks.dtype == torch.bool else target_masks


def _points_per_split(device: torch.device, num_masks: int, num_points: int) -> int:
    """Points of each forward program: a multiple of the largest autotuned BLOCK, so that the split does not
    depend on the config. On a GPU, at least about 4 programs per multiprocessor; in the interpreter, one block
    each (several splits at test sizes)."""
    unit = max(config.kwargs["BLOCK"] for config in _point_mask_loss_forward_kernel.configs)
    if interpreting():
        return unit
    multiprocessors = multiprocessor_count(device)
    splits = triton.cdiv(4 * multiprocessors, max(num_masks, 1))
    return max(1, num_points // (splits * unit)) * unit


def point_mask_loss_forward(
    mask_logits: torch.Tensor, target_masks: torch.Tensor, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask_logits (N, H, W), target_masks (N, Ht, Wt) uint8/bool/logits' dtype/float32, coords (N, P, 2).

    Returns ce (N,) (mean over points, 0 for P = 0), dice (N,) and dice_sums (N, 3) = [sum p t, sum p, sum t],
    float32 (float64 for float64 logits).

    Each mask's points are split into ranges of _points_per_split (set by the shapes and the GPU's
    multiprocessor count); one program per (mask, range) writes partial sums (N, splits, 4), which
    _point_mask_loss_finalize_kernel adds per mask in split order. Within a range the sums run in BLOCK lanes
    and a tree, so their rounding depends on the config: the autotuned one by default (fixed per shape class
    within a process), FORWARD_FIXED while torch.are_deterministic_algorithms_enabled(), so that results
    repeat across processes.
    """
    num_masks, height, width = mask_logits.shape
    target_height, target_width = target_masks.shape[1:]
    num_points = coords.shape[1]
    acc_dtype = accumulate_dtype(mask_logits.dtype)
    device = mask_logits.device
    points_per_split = _points_per_split(device, num_masks, num_points)
    num_splits = max(1, triton.cdiv(num_points, points_per_split))
    partial = torch.empty(num_masks, num_splits, 4, dtype=acc_dtype, device=device)
    ce = torch.empty(num_masks, dtype=acc_dtype, device=device)
    dice = torch.empty(num_masks, dtype=acc_dtype, device=device)
    dice_sums = torch.empty(num_masks, 3, dtype=acc_dtype, device=device)
    if num_masks == 0:
        return ce, dice, dice_sums
    args = (
        mask_logits,
        _target_view(target_masks),
        coords,
        partial,
        height,
        width,
        target_height,
        target_width,
        num_points,
        points_per_split,
        num_splits,
        size_class(height * width),
        size_class(target_height * target_width),
        triton_accumulate_dtype(mask_logits.dtype),
    )
    launch(
        _point_mask_loss_forward_kernel,
        lambda meta: (num_masks * num_splits,),
        args,
        FORWARD_FIXED,
        pinned=torch.are_deterministic_algorithms_enabled(),
        **SAMPLING_OPTIONS,
    )
    _point_mask_loss_finalize_kernel[(triton.cdiv(num_masks, FINALIZE_BLOCK),)](
        partial, ce, dice, dice_sums, num_masks, num_splits, max(num_points, 1), BLOCK=FINALIZE_BLOCK
    )
    return ce, dice, dice_sums


def point_mask_loss_backward(
    grad_ce: torch.Tensor,
    grad_dice: torch.Tensor,
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    coords: torch.Tensor,
    dice_sums: torch.Tensor,
    deterministic: bool,
) -> torch.Tensor:
    """Gradient of sum(grad_ce * ce + grad_dice * dice) for mask_logits, (N, H, W) in the logits' dtype.

    Each point's gradient is computed by one lane; with deterministic, the corners are summed by
    add_pairs_in_order, so the result does not depend on the autotuned config. Otherwise atomics.
    """
    num_masks, height, width = mask_logits.shape
    target_height, target_width = target_masks.shape[1:]
    num_points = coords.shape[1]
    acc_dtype = accumulate_dtype(mask_logits.dtype)
    device = mask_logits.device
    grad = torch.zeros(num_masks, height * width, dtype=acc_dtype, device=device)
    if deterministic:
        index = torch.empty(num_masks, num_points * 4, dtype=torch.int64, device=device)
        values = torch.empty(num_masks, num_points * 4, dtype=acc_dtype, device=device)
    else:
        index = values = grad  # unused
    _point_mask_loss_backward_kernel[lambda meta: (num_masks * triton.cdiv(num_points, meta["BLOCK"]),)](
        grad_ce.to(acc_dtype).contiguous(),
        grad_dice.to(acc_dtype).contiguous(),
        mask_logits,
        _target_view(target_masks),
        coords,
        dice_sums.to(acc_dtype).contiguous(),
        grad,
        index,
        values,
        height,
        width,
        target_height,
        target_width,
        num_points,
        size_class(num_points),
        size_class(height * width),
        size_class(target_height * target_width),
        ACC=triton_accumulate_dtype(mask_logits.dtype),
        DETERMINISTIC=deterministic,
        **SAMPLING_OPTIONS,
    )
    if deterministic:
        add_pairs_in_order(grad, index, values)
    return grad.view(mask_logits.shape).to(mask_logits.dtype)

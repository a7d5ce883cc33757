"""The Hungarian matcher's pairwise mask costs without the (Q, T, P) intermediate (DESIGN.md 2.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._backend import OpKernels
from ._common import (
    accumulate_dtype,
    binary_mask_bytes,
    call_op,
    check_same_device,
    check_tensor,
    check_unit_interval,
    soft_target_dtype,
)

KERNELS = OpKernels("pairwise_mask_cost", {"pairwise_mask_cost": reference.pairwise_mask_cost})


@torch.library.custom_op("m2f_kernels::pairwise_mask_cost", mutates_args=())
def _pairwise_mask_cost(
    pred_point_logits: Tensor, target_point_labels: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    queries, targets = pred_point_logits.shape[0], target_point_labels.shape[0]
    if queries == 0 or targets == 0:
        empty = pred_point_logits.new_zeros(queries, targets, dtype=accumulate_dtype(pred_point_logits.dtype))
        return empty, empty.clone()
    kernel = KERNELS.get(backend, pred_point_logits.device, "pairwise_mask_cost")
    return kernel(pred_point_logits, target_point_labels)


@_pairwise_mask_cost.register_fake
def _(pred_point_logits, target_point_labels, backend):
    dtype = accumulate_dtype(pred_point_logits.dtype)
    shape = (pred_point_logits.shape[0], target_point_labels.shape[0])
    return pred_point_logits.new_empty(shape, dtype=dtype), pred_point_logits.new_empty(shape, dtype=dtype)


def pairwise_mask_cost(
    pred_point_logits: Tensor, target_point_labels: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Mask2Former's matcher costs between Q predictions and T targets sampled at the same P points.

    pred_point_logits (Q, P) mask logits; target_point_labels (T, P): float labels in [0, 1] (ValueError
    otherwise, for labels on the CPU), read in float32 or wider, never rounded to half logits' dtype; or a
    bool/uint8 mask, where any nonzero value is 1 (0/255 masks read as 0/1).
    Returns (ce, dice), each (Q, T) float32 (float64 for float64 logits): the mean sigmoid cross-entropy and
    the dice loss of every (prediction, target) pair. Not differentiable (the matcher needs no gradient).
    """
    check_tensor("pred_point_logits", pred_point_logits, ndim=2, floating=True)
    check_tensor("target_point_labels", target_point_labels, ndim=2)
    check_same_device("pred_point_logits", pred_point_logits, target_point_labels=target_point_labels)
    if target_point_labels.shape[1] != pred_point_logits.shape[1]:
        raise ValueError(
            f"target_point_labels must have the same number of points P as pred_point_logits "
            f"({pred_point_logits.shape[1]}), got shape {tuple(target_point_labels.shape)}"
        )
    if not (
        target_point_labels.dtype.is_floating_point or target_point_labels.dtype in (torch.bool, torch.uint8)
    ):
        raise TypeError(
            f"target_point_labels must be floating, bool or uint8, got {target_point_labels.dtype}"
        )
    if pred_point_logits.shape[1] == 0:
        raise ValueError("pred_point_logits must have at least one point (P >= 1)")
    if target_point_labels.dtype.is_floating_point:
        check_unit_interval("target_point_labels", target_point_labels)
        labels = target_point_labels.to(soft_target_dtype(target_point_labels, pred_point_logits))
    else:
        labels = binary_mask_bytes(target_point_labels).to(pred_point_logits.dtype)
    return call_op(
        _pairwise_mask_cost, pred_point_logits.detach().contiguous(), labels.detach().contiguous(), backend
    )

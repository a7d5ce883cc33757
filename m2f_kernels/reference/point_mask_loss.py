"""Sigmoid cross-entropy and dice loss on sampled points (Mask2Former's mask losses), DESIGN.md 2.3."""

import torch
import torch.nn.functional as F

from .point_sample import point_sample


def point_mask_loss_per_mask(
    mask_logits: torch.Tensor, target_masks: torch.Tensor, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask losses: mask_logits (N, H, W), target_masks (N, Ht, Wt), coords (N, P, 2) normalized (x, y).

    Returns ce (N,) = mean over points of BCE-with-logits (0 for P = 0), dice (N,) = 1 - (2 sum(p t) + 1) /
    (sum p + sum t + 1) and dice_sums (N, 3) = [sum p t, sum p, sum t], all float32 (float64 for float64 logits).
    """
    compute_dtype = torch.float64 if mask_logits.dtype == torch.float64 else torch.float32
    logits = point_sample(mask_logits.unsqueeze(1).to(compute_dtype), coords.to(compute_dtype)).squeeze(1)
    targets = point_sample(target_masks.unsqueeze(1).to(compute_dtype), coords.to(compute_dtype)).squeeze(1)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1) / max(
        1, coords.shape[1]
    )
    probs = logits.sigmoid()
    dice_sums = torch.stack([(probs * targets).sum(-1), probs.sum(-1), targets.sum(-1)], dim=-1)
    dice = 1 - (2 * dice_sums[:, 0] + 1) / (dice_sums[:, 1] + dice_sums[:, 2] + 1)
    return ce, dice, dice_sums


def point_mask_loss(
    mask_logits: torch.Tensor, target_masks: torch.Tensor, coords: torch.Tensor, num_masks: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, dice) scalars: per-mask losses summed over masks and divided by ``num_masks``."""
    ce, dice, _ = point_mask_loss_per_mask(mask_logits, target_masks, coords)
    return ce.sum() / num_masks, dice.sum() / num_masks

"""The Hungarian matcher's mask costs between every prediction and every target, DESIGN.md 2.3."""

import torch
import torch.nn.functional as F


def pairwise_mask_cost(
    pred_point_logits: torch.Tensor, target_point_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred_point_logits (Q, P) and target_point_labels (T, P) in [0, 1] -> (ce (Q, T), dice (Q, T)).

    ce[i, j] = mean over points of BCE-with-logits(pred_i, target_j);
    dice[i, j] = 1 - (2 sum(sigmoid(pred_i) target_j) + 1) / (sum sigmoid(pred_i) + sum target_j + 1).
    ValueError for P = 0 (no mean over no points).
    """
    if pred_point_logits.shape[1] == 0:
        raise ValueError("pred_point_logits must have at least one point (P >= 1)")
    compute_dtype = torch.float64 if pred_point_logits.dtype == torch.float64 else torch.float32
    logits = pred_point_logits.to(compute_dtype)
    targets = target_point_labels.to(compute_dtype)
    num_points = logits.shape[1]
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    ce = (positive @ targets.T + negative @ (1 - targets).T) / num_points
    probs = logits.sigmoid()
    dice = 1 - (2 * probs @ targets.T + 1) / (probs.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
    return ce, dice

"""Hungarian matching of predicted masks to ground-truth masks (Mask2Former's point-sampled matcher)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import m2f_kernels

from ..checks import check_int

TARGETS_PER_SAMPLE = 16  # target masks made floating at once (64 MB at 1024 x 1024)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimizing, per image,

        cost = cost_class * (-softmax(pred_logits)[q, label_t])
             + cost_mask * mean-over-points BCE-with-logits(mask_q, target_t)
             + cost_dice * (1 - (2 sum(p t) + 1) / (sum p + sum t + 1)),

    with the masks compared at `num_points` uniform random points shared by all queries and targets of the
    image (m2f_kernels.point_sample + pairwise_mask_cost): `torch.rand(num_points, 2, generator=generator)`
    on the masks' device, drawn once per image that has targets, in batch order (prediction after prediction
    with match_predictions). The assignment is scipy's linear_sum_assignment on the CPU; the cost matrices of
    one call reach the CPU in one copy, so the GPU is waited for once per call, not once per image.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        backend: str = "auto",
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one of cost_class, cost_mask, cost_dice must be non-zero")
        num_points = check_int("num_points", num_points, 1)
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.backend = backend

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        coords,
    ) -> torch.Tensor:
        """(Q, T) float32 cost for one image: pred_logits (Q, C+1), pred_masks (Q, h, w) logits, labels (T,),
        masks (T, H, W), coords (P, 2) normalized (x, y) points shared by all masks."""
        cost_class = -pred_logits.float().softmax(-1)[:, labels.long()]  # uint8 would index as a mask
        # Sampled in float32 (or wider) whatever the logits' dtype or autocast, as Mask2Former's grid_sample; the
        # masks are the channels of one image, so the points are not repeated per mask, and the full-resolution
        # targets are made floating a few at a time.
        dtype = torch.promote_types(pred_masks.dtype, torch.float32)
        with torch.autocast(pred_masks.device.type, enabled=False):
            pred_points = m2f_kernels.point_sample(
                pred_masks[None].to(dtype), coords[None], backend=self.backend
            )[0]
            target_points = torch.cat(
                [
                    m2f_kernels.point_sample(chunk[None].to(dtype), coords[None], backend=self.backend)[0]
                    for chunk in masks.split(TARGETS_PER_SAMPLE)
                ]
            )
        cost_mask, cost_dice = m2f_kernels.pairwise_mask_cost(
            pred_points.float(), target_points.float(), backend=self.backend
        )
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(
        self, outputs: dict, targets: list[dict], generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (B, Q, C+1), pred_masks (B, Q, h, w); targets: B dicts of labels (T,) and
        masks (T, H, W). Masks smaller than the batch's largest are zero-padded at the bottom and right to its
        size, as the mask losses pad them. Returns per image (query indices, target indices), int64 CPU tensors
        of length min(Q, T), sorted by query index."""
        return self.match_predictions([outputs], targets, generator)[0]

    @torch.no_grad()
    def match_predictions(
        self, predictions: list[dict], targets: list[dict], generator: torch.Generator | None = None
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """forward for several predictions of one batch (the decoder's layers), each matched on its own points:
        the same as calling forward on each in turn, with one device-to-host copy for all of them."""
        for i, outputs in enumerate(predictions):
            if len(targets) != outputs["pred_logits"].shape[0]:
                raise ValueError(
                    f"got {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} "
                    f"(prediction {i})"
                )
        if not predictions:
            return []
        device = predictions[0]["pred_masks"].device
        height = max((t["masks"].shape[-2] for t in targets), default=0)
        width = max((t["masks"].shape[-1] for t in targets), default=0)
        padded_masks = []
        for target in targets:
            masks = target["masks"].to(device)
            if masks.shape[-2:] != (height, width):
                masks = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
            padded_masks.append(masks)
        costs = []  # (prediction, image) -> (Q, T) on the device, None for an image without targets
        for outputs in predictions:
            pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
            for b, target in enumerate(targets):
                labels = target["labels"]
                if labels.numel() == 0:
                    costs.append(None)
                    continue
                coords = torch.rand(
                    self.num_points, 2, dtype=torch.float32, device=pred_masks.device, generator=generator
                )
                costs.append(self.cost_matrix(pred_logits[b], pred_masks[b], labels, padded_masks[b], coords))
        host_costs = _to_host(costs)
        indices = []
        for i in range(len(predictions)):
            image_indices = []
            for b in range(len(targets)):
                cost = host_costs[i * len(targets) + b]
                if cost is None:
                    empty = torch.empty(0, dtype=torch.int64)
                    image_indices.append((empty, empty.clone()))
                    continue
                if not torch.isfinite(cost).all():
                    raise FloatingPointError(
                        f"matcher cost matrix of image {b} in the batch (prediction {i}) has NaN/inf entries"
                    )
                rows, cols = linear_sum_assignment(cost.numpy())
                image_indices.append(
                    (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                )
            indices.append(image_indices)
        return indices


def _to_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The tensors on the CPU, copied in one transfer (None stays None)."""
    present = [tensor for tensor in tensors if tensor is not None]
    if not present:
        return list(tensors)
    flat = torch.cat([tensor.reshape(-1) for tensor in present]).cpu()
    pieces = iter(flat.split([tensor.numel() for tensor in present]))
    return [None if tensor is None else next(pieces).view(tensor.shape) for tensor in tensors]

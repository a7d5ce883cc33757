"""Mask2Former's set criterion: Hungarian matching, then class cross-entropy and point-sampled mask losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import m2f_kernels

from ..checks import check_int
from ..config import ModelConfig
from .matcher import HungarianMatcher


class Criterion(nn.Module):
    """criterion(outputs, targets) -> dict of WEIGHTED losses; their sum is the training loss.

    outputs: pred_logits (B, Q, C+1), pred_masks (B, Q, h, w) logits, optionally aux_outputs (list of dicts
    of the same keys); targets: B dicts of labels (T,) int64 in [0, C) and masks (T, H, W) bool at the padded
    image resolution (pred masks cover the same image at 1/4 scale).

    Keys: loss_ce = class_weight * cross-entropy over all queries (unmatched queries target "no object",
    weighted no_object_weight), loss_mask = mask_weight * BCE and loss_dice = dice_weight * dice loss of the
    matched masks on `num_points` points per mask (importance-sampled by uncertainty, m2f_kernels
    sample_uncertain_points + point_mask_loss), summed over masks and divided by num_masks (the number of
    target masks in the batch, averaged over processes when torch.distributed is initialized, at least 1).
    Aux outputs add loss_ce_{i}, loss_mask_{i}, loss_dice_{i} (i = 0 for the first decoder prediction).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, 1)
        # 0 points gave mask and dice losses of 0, so training went on without them.
        num_points = check_int("num_points", num_points, 1)
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.backend = backend
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(
        self, outputs: dict, targets: list[dict], num_masks: float | None = None
    ) -> dict[str, torch.Tensor]:
        """The weighted losses of every layer. num_masks divides the mask losses: by default this batch's
        target masks averaged over processes (average_num_masks); a caller accumulating gradients over
        micro-batches passes the count of the whole step."""
        self._check_targets(outputs, targets)
        if num_masks is None:
            num_masks = self.average_num_masks(targets, outputs["pred_logits"].device)
        device = outputs["pred_masks"].device
        target_masks = batch_target_masks(targets, device)
        target_labels = torch.cat([t["labels"].to(device, torch.int64) for t in targets])
        predictions = [outputs]
        if self.deep_supervision:
            predictions += outputs.get("aux_outputs", [])
        # Every prediction matched first: the matcher then waits for the device once, not once per prediction.
        all_indices = self.matcher.match_predictions(predictions, targets)
        all_pairs = matched_pairs(all_indices, [len(t["labels"]) for t in targets], device)
        losses = {}
        for i, (prediction, pairs) in enumerate(zip(predictions, all_pairs)):
            suffix = "" if i == 0 else f"_{i - 1}"
            for key, value in self.layer_losses(
                prediction, pairs, num_masks, target_labels, target_masks
            ).items():
                losses[key + suffix] = value
        return losses

    def layer_losses(
        self,
        outputs: dict,
        pairs: torch.Tensor,
        num_masks: float,
        target_labels: torch.Tensor,
        target_masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Weighted loss_ce, loss_mask, loss_dice of one prediction whose matched pairs are `pairs` (as
        matched_pairs gives them); target_labels (T,) and target_masks (T, H, W): every target of the batch,
        image after image (batch_target_masks)."""
        loss_ce = self.loss_labels(outputs["pred_logits"], pairs, target_labels)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], target_masks, pairs, num_masks)
        return {
            "loss_ce": self.class_weight * loss_ce,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def loss_labels(
        self, pred_logits: torch.Tensor, pairs: torch.Tensor, target_labels: torch.Tensor
    ) -> torch.Tensor:
        """Unweighted cross-entropy (mean weighted by class weights, as F.cross_entropy with `weight`)."""
        batch, num_queries, _ = pred_logits.shape
        device = pred_logits.device
        target_classes = torch.full((batch, num_queries), self.num_classes, dtype=torch.int64, device=device)
        image_idx, query_idx, target_idx = pairs
        target_classes[image_idx, query_idx] = target_labels[target_idx]
        dtype = torch.promote_types(pred_logits.dtype, torch.float32)  # float64 stays float64 (gradcheck)
        weight = self.empty_weight.to(device, dtype)
        return F.cross_entropy(pred_logits.to(dtype).transpose(1, 2), target_classes, weight)

    def loss_masks(
        self, pred_masks: torch.Tensor, target_masks: torch.Tensor, pairs: torch.Tensor, num_masks: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (BCE, dice) of the matched masks on importance-sampled points, / num_masks. target_masks:
        every target mask of the batch (batch_target_masks)."""
        image_idx, query_idx, target_idx = pairs
        if query_idx.numel() == 0:
            # Linked to the graph without reading a value: sum(x) * 0 is NaN for an infinite x.
            zero = pred_masks[:0].float().sum()
            return zero, zero.clone()
        matched_logits = pred_masks[image_idx, query_idx]  # (N, h, w)
        coords = m2f_kernels.sample_uncertain_points(
            matched_logits.detach(),
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            backend=self.backend,
        )
        if len(target_idx) < len(target_masks):  # fewer queries than targets somewhere
            return m2f_kernels.point_mask_loss(
                matched_logits, target_masks[target_idx], coords, num_masks, backend=self.backend
            )
        # Every target matched: the losses sum over the masks, so the pairs go in target order and every layer's
        # loss keeps the batch's one copy of the targets for its backward, not a gathered copy of its own.
        order = torch.argsort(target_idx)
        return m2f_kernels.point_mask_loss(
            matched_logits[order], target_masks, coords[order], num_masks, backend=self.backend
        )

    @staticmethod
    def average_num_masks(targets: list[dict], device: torch.device, num_batches: int = 1) -> float:
        """Target masks per batch (`targets` holding num_batches batches), averaged over processes when
        torch.distributed is initialized; >= 1."""
        num_masks = float(sum(len(t["labels"]) for t in targets))
        world_size = 1
        if dist.is_available() and dist.is_initialized():  # one process alone reads no device value
            total = torch.tensor(num_masks, device=device)
            dist.all_reduce(total)
            num_masks, world_size = total.item(), dist.get_world_size()
        return max(num_masks / (world_size * num_batches), 1.0)

    def _check_targets(self, outputs: dict, targets: list[dict]) -> None:
        if not targets:
            raise ValueError("targets is empty: the losses of an empty batch are not defined")
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"targets[{b}]: labels must be (T,) and masks (T, H, W), got {tuple(labels.shape)} and "
                    f"{tuple(masks.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"targets[{b}]['labels'] must be integer class indices, got {labels.dtype}")
            if masks.dtype.is_complex:
                raise TypeError(f"targets[{b}]['masks'] must be bool (or 0/1 values), got {masks.dtype}")
        # The value ranges of the whole batch read in one copy: a read from the device waits for its queue.
        device = targets[0]["labels"].device
        ranges = []
        for target in targets:
            labels, masks = target["labels"], target["masks"]
            label_range = (
                torch.stack(torch.aminmax(labels)) if labels.numel() else torch.zeros(2, device=device)
            )
            mask_range = torch.tensor([0.0, 1.0], device=device)
            if masks.dtype != torch.bool and masks.numel():
                mask_range = torch.stack(torch.aminmax(masks))
            ranges.append(torch.cat([label_range.double().to(device), mask_range.double().to(device)]))
        for b, (label_low, label_high, mask_low, mask_high) in enumerate(torch.stack(ranges).tolist()):
            if label_low < 0 or label_high >= self.num_classes:
                raise ValueError(
                    f"targets[{b}]['labels'] must be in [0, {self.num_classes}), got {targets[b]['labels'].tolist()}"
                )
            if mask_low < 0 or mask_high > 1:
                raise ValueError(
                    f"targets[{b}]['masks'] must be bool or hold values in [0, 1] (a 0/255 image is not a "
                    f"mask), got values in [{mask_low:g}, {mask_high:g}]"
                )


def matched_pairs(all_indices: list, target_counts: list[int], device: torch.device) -> list[torch.Tensor]:
    """The matcher's answers for several predictions (each a list over images of (query indices, target
    indices)) -> per prediction a (3, pairs) int64 tensor on device: image, query and target index of each
    pair, the target index counting the batch's targets image after image; pairs image after image.

    All predictions' pairs reach the device in one copy, from pinned memory on a GPU so that the host does not
    wait for the device there (a copy from pageable memory waits for all the queued work, once per tensor).
    """
    offsets = [sum(target_counts[:b]) for b in range(len(target_counts))]
    per_prediction = []
    for indices in all_indices:
        columns = [
            torch.stack([torch.full_like(query_idx, b), query_idx, target_idx + offsets[b]]).long()
            for b, (query_idx, target_idx) in enumerate(indices)
        ]
        per_prediction.append(torch.cat(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.int64))
    if not per_prediction:
        return []
    flat = torch.cat(per_prediction, dim=1)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split([pairs.shape[1] for pairs in per_prediction], dim=1))


def batch_target_masks(targets: list[dict], device: torch.device) -> torch.Tensor:
    """Every target mask of the batch, image after image, zero-padded to the largest (H, W) in the batch."""
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    padded = []
    for target in targets:
        masks = target["masks"]
        pad_h, pad_w = height - masks.shape[-2], width - masks.shape[-1]
        if pad_h or pad_w:
            masks = F.pad(masks, (0, pad_w, 0, pad_h))
        padded.append(masks.to(device))
    return torch.cat(padded)


def build_criterion(config: ModelConfig, num_classes: int | None = None, backend: str = "auto") -> Criterion:
    """The criterion of a ModelConfig (its loss group); num_classes defaults to config.num_classes."""
    loss = config.loss
    matcher = HungarianMatcher(
        cost_class=loss.class_weight,
        cost_mask=loss.mask_weight,
        cost_dice=loss.dice_weight,
        num_points=loss.num_points,
        backend=backend,
    )
    return Criterion(
        num_classes=config.num_classes if num_classes is None else num_classes,
        matcher=matcher,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        deep_supervision=loss.deep_supervision,
        backend=backend,
    )

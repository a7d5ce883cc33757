"""Inference post-processing of one image's Mask2Former predictions (panoptic, instance, semantic).

Inputs for one image: mask_cls (Q, C+1) class logits (last = no object) and mask_pred (Q, H, W) mask logits
at the size of the result (`resize_masks` takes the model's 1/4-resolution masks there, `ImageMasks` on
request and for chosen queries only; m2f.engine.evaluate.postprocess resizes the masks before panoptic and
instance inference and the semantic scores after semantic inference, Mask2Former's order).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import torchvision


def resize_masks(
    pred_masks: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Mask logits at 1/4 of the padded input -> logits at the output (original image) size.

    pred_masks (Q, h, w) or (B, Q, h, w): upsampled to padded_size (the padded network input), cropped to
    image_size (the resized image inside the padding), resized to output_size; bilinear, align_corners=False.
    """
    squeeze = pred_masks.dim() == 3
    if squeeze:
        pred_masks = pred_masks[None]
    if pred_masks.dim() != 4:
        raise ValueError(f"pred_masks must be (Q, h, w) or (B, Q, h, w), got {tuple(pred_masks.shape)}")
    masks = _bilinear(pred_masks, padded_size)[..., : image_size[0], : image_size[1]]
    masks = _bilinear(masks, output_size)
    return masks[0] if squeeze else masks


def _bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., *size), bilinear, align_corners=False; maps themselves when already at size
    (the interpolation would copy them unchanged), an empty tensor when there are no maps (a 0 in ...)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[:-2].numel() == 0:
        return maps.new_empty((*maps.shape[:-2], *size))
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


@dataclasses.dataclass(frozen=True)
class ImageMasks:
    """One image's mask logits as the model predicts them, resized on request.

    logits (Q, h, w) float32 at 1/4 of padded_size (the padded network input); image_size: the image inside
    the padding. Each query is resized on its own, so the logits of a few queries cost a fraction of those of
    all and have the same values.
    """

    logits: torch.Tensor
    padded_size: tuple[int, int]
    image_size: tuple[int, int]

    def at(self, size: tuple[int, int], queries: torch.Tensor | None = None) -> torch.Tensor:
        """(len(queries) or Q, *size) logits of queries (an index or bool tensor; default all):
        resize_masks' upsampling to padded_size, crop to image_size and resize to size."""
        logits = self.logits if queries is None else self.logits[queries]
        return resize_masks(logits, self.padded_size, self.image_size, size)


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(C, H, W) class scores: sum over queries of softmax class probability (no-object dropped) x mask
    probability. argmax over dim 0 gives the label map."""
    _check(mask_cls, mask_pred)
    probs = mask_cls.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_classes: set[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Panoptic segmentation by non-overlapping assignment of pixels to confident queries.

    Queries whose top class is not "no object" with probability > object_mask_threshold are kept. Each pixel
    goes to the kept query maximizing class score x mask probability. A query's segment is its pixels that
    also have mask probability >= 0.5; it is dropped if empty or if it keeps less than overlap_threshold of
    the query's own (probability >= 0.5) area. Stuff segments of the same class merge into one segment (the
    first one's id). Returns panoptic_seg (H, W) int32 (0 = void, segments numbered from 1) and segments_info
    [{"id", "category_id" (contiguous class index), "isthing", "score"}] ("score" of a merged stuff segment
    is that of its first query).
    """
    _check(mask_cls, mask_pred)
    scores, labels = mask_cls.float().softmax(-1).max(-1)
    keep = confident_queries(mask_cls, object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep].float().sigmoid()
    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info

    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff_segment_ids: dict[int, int] = {}
    for k in range(cur_classes.shape[0]):
        category = int(cur_classes[k])
        is_thing = category in thing_classes
        own = cur_masks[k] >= 0.5
        original_area = int(own.sum())
        owned_area = int((owner == k).sum())
        segment = (owner == k) & own
        if owned_area == 0 or original_area == 0 or not bool(segment.any()):
            continue
        if owned_area / original_area < overlap_threshold:
            continue
        if not is_thing and category in stuff_segment_ids:
            panoptic_seg[segment] = stuff_segment_ids[category]
            continue
        segment_id = len(segments_info) + 1
        if not is_thing:
            stuff_segment_ids[category] = segment_id
        panoptic_seg[segment] = segment_id
        segments_info.append(
            {"id": segment_id, "category_id": category, "isthing": is_thing, "score": float(cur_scores[k])}
        )
    return panoptic_seg, segments_info


def confident_queries(mask_cls: torch.Tensor, object_mask_threshold: float = 0.8) -> torch.Tensor:
    """(Q,) bool: the queries panoptic_inference keeps, those whose top class is not "no object" with
    probability > object_mask_threshold."""
    scores, labels = mask_cls.float().softmax(-1).max(-1)
    return labels.ne(mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    top_k: int = 100,
    thing_classes: set[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs by class probability; each is an instance.

    score = class probability x mask score, mask score = mean mask probability inside the predicted mask
    (logit > 0). With thing_classes (panoptic models), pairs of other classes are dropped after the top-k.
    Returns masks (K, H, W) bool, scores (K,), labels (K,) int64 contiguous class indices, boxes (K, 4) xyxy
    float in pixels, the tight box of each mask (max pixel index + 1; zeros for an empty mask); ordered by
    descending score.
    """
    _check(mask_cls, mask_pred)
    class_scores, labels, query_index = top_instance_queries(mask_cls, num_classes, top_k, thing_classes)
    return instances_from_logits(class_scores, labels, mask_pred[query_index])


def top_instance_queries(
    mask_cls: torch.Tensor,
    num_classes: int,
    top_k: int = 100,
    thing_classes: set[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """instance_inference's choice of (query, class) pairs: class probabilities (K,), labels (K,) and query
    indices (K,), by descending probability (a query may come more than once)."""
    if mask_cls.dim() != 2 or mask_cls.shape[-1] != num_classes + 1:
        raise ValueError(
            f"mask_cls must have num_classes + 1 = {num_classes + 1} columns, got {tuple(mask_cls.shape)}"
        )
    probs = mask_cls.float().softmax(-1)[:, :-1]
    class_scores, flat_index = probs.flatten().topk(min(top_k, probs.numel()), sorted=True)
    labels = flat_index % num_classes
    query_index = flat_index // num_classes
    if thing_classes is not None:
        is_thing = torch.tensor([int(c) in thing_classes for c in labels.tolist()], dtype=torch.bool)
        is_thing = is_thing.to(labels.device)
        class_scores, labels, query_index = class_scores[is_thing], labels[is_thing], query_index[is_thing]
    return class_scores, labels, query_index


def instances_from_logits(
    class_scores: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """instance_inference's result for the chosen pairs (top_instance_queries) and their (K, H, W) mask
    logits."""
    logits = mask_logits.float()
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = class_scores * mask_scores
    order = scores.argsort(descending=True)
    masks = masks[order]
    return {"masks": masks, "scores": scores[order], "labels": labels[order], "boxes": masks_to_boxes(masks)}


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) float xyxy: [min x, min y, max x + 1, max y + 1]; zeros for empty masks."""
    boxes = torchvision.ops.masks_to_boxes(masks)  # inclusive max x, max y; zeros for an empty mask
    nonempty = boxes.any(1) | masks[:, 0, 0]  # the box of the single pixel (0, 0) is zeros too
    boxes[nonempty, 2:] += 1
    return boxes


def _check(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> None:
    if mask_cls.dim() != 2 or mask_cls.shape[-1] < 2:
        raise ValueError(f"mask_cls must be (Q, C+1) with C >= 1, got {tuple(mask_cls.shape)}")
    if mask_pred.dim() != 3 or mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(
            f"mask_pred must be (Q, H, W) with Q = {mask_cls.shape[0]}, got {tuple(mask_pred.shape)}"
        )

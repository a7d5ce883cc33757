"""Semantic segmentation metrics from a confusion matrix: mIoU, frequency-weighted IoU, mean class accuracy
and pixel accuracy (detectron2's definitions: classes absent from the ground truth are left out of the means;
ground-truth pixels equal to ignore_index are skipped)."""

from __future__ import annotations

import numpy as np

from m2f.checks import check_int
from m2f.evaluation.arrays import per_class_keys, to_numpy


class SemanticEvaluator:
    """update(pred, gt): pred (H, W) class indices or (C, H, W) scores (argmax taken), gt (H, W) class indices
    with ignore_index for unlabeled pixels. compute() -> {"task": "semantic", "mIoU", "fwIoU", "mACC", "pACC"
    (percent), "per_class": {name: {"IoU", "ACC"}} (a name that several classes share becomes
    "name (class index)"), "num_images"}."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None):
        num_classes = check_int("num_classes", num_classes, 1)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [gt, pred]
        self.num_images = 0

    def update(self, pred, gt) -> None:
        pred, gt = to_numpy(pred), to_numpy(gt).astype(np.int64)
        if pred.ndim == 3:
            if pred.shape[0] != self.num_classes:
                raise ValueError(
                    f"pred must be (H, W) labels or ({self.num_classes}, H, W) scores, got {pred.shape}"
                )
            pred = pred.argmax(0)
        pred = pred.astype(np.int64)
        if pred.shape != gt.shape or gt.ndim != 2:
            raise ValueError(f"pred and gt must be (H, W) of the same size, got {pred.shape} and {gt.shape}")
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        for name, values in (("gt", gt), ("pred", pred)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(
                    f"{name} has class indices outside [0, {self.num_classes}) and != ignore_index"
                )
        counts = np.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)
        self.num_images += 1

    def get_state(self) -> dict:
        """The confusion counts as JSON-able lists and the number of images, to gather across processes or
        store."""
        return {"confusion": self.confusion.tolist(), "num_images": self.num_images}

    def merge_state(self, state: dict) -> None:
        confusion = np.asarray(state["confusion"], dtype=np.int64)
        if confusion.shape != self.confusion.shape:
            raise ValueError(
                f"state has a confusion matrix of shape {confusion.shape}, expected {self.confusion.shape}"
            )
        num_images = state["num_images"]
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
            raise ValueError(f"state['num_images'] must be an int >= 0, got {num_images!r}")
        self.confusion += confusion
        self.num_images += num_images

    def compute(self) -> dict:
        true_positive = np.diag(self.confusion).astype(np.float64)
        gt_pixels = self.confusion.sum(1).astype(np.float64)
        pred_pixels = self.confusion.sum(0).astype(np.float64)
        present = gt_pixels > 0
        union = gt_pixels + pred_pixels - true_positive
        iou = np.where(present, true_positive / np.maximum(union, 1), np.nan)
        accuracy = np.where(present, true_positive / np.maximum(gt_pixels, 1), np.nan)
        total = gt_pixels.sum()
        if not present.any():
            raise ValueError("no labeled ground-truth pixel was seen")
        return {
            "task": "semantic",
            "mIoU": float(100 * np.nanmean(iou)),
            "fwIoU": float(100 * np.nansum(iou * gt_pixels / total)),
            "mACC": float(100 * np.nanmean(accuracy)),
            "pACC": float(100 * true_positive.sum() / total),
            "per_class": {
                key: {"IoU": float(100 * iou[k]), "ACC": float(100 * accuracy[k])}
                for k, key in enumerate(per_class_keys(self.class_names, range(len(self.class_names))))
                if present[k]
            },
            "num_images": self.num_images,
        }

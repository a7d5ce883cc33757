"""Panoptic quality (PQ = SQ x RQ), computed like the official COCO panopticapi, vectorized with numpy.

Per image, a predicted segment matches a ground-truth segment of the same category when IoU > 0.5 (unique by
construction). The union leaves out the prediction's pixels on void (id 0). Crowd ground truth is never
matched or counted as a false negative; an unmatched prediction is not a false positive when more than half of
it lies on void plus the crowd region of its category (the last crowd segment of that category in the
ground-truth list, as in panopticapi). PQ averages over the categories with TP + FP + FN > 0. Ground-truth
areas are pixel counts of the PNG.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from m2f.data.common import DatasetMetadata, index_map_from_ids, pool_context, read_json, read_panoptic_png
from m2f.evaluation.arrays import check_new_images, per_class_keys, to_numpy


@dataclass
class PQStats:
    """Per-category sums, arrays of shape (K,): IoU of matches, true/false positives, false negatives."""

    iou: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def zeros(cls, num_categories: int) -> PQStats:
        return cls(
            np.zeros(num_categories, np.float64),
            np.zeros(num_categories, np.int64),
            np.zeros(num_categories, np.int64),
            np.zeros(num_categories, np.int64),
        )

    def __iadd__(self, other: PQStats) -> PQStats:
        shapes = {name: getattr(other, name).shape for name in ("iou", "tp", "fp", "fn")}
        if any(shape != self.iou.shape for shape in shapes.values()):
            raise ValueError(
                f"PQ stats of shapes {shapes} cannot be added to stats of {self.iou.shape[0]} categories"
            )
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


def _segment_arrays(segments: list[dict], num_categories: int, kind: str, image_id, with_crowd: bool):
    """(ids, categories, crowd flags or None) of a segments list; ValueError naming the image and the segment
    for an id listed twice or a category outside [0, num_categories). kind: "predicted" or "ground-truth"."""
    ids = np.array([s["id"] for s in segments], dtype=np.int64)
    categories = np.array([s["category"] for s in segments], dtype=np.int64)
    crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments], dtype=bool) if with_crowd else None
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"image {image_id}: {kind} segment id {int(unique[counts > 1][0])} is listed twice")
    for segment_id, category in zip(ids.tolist(), categories.tolist()):
        if not 0 <= category < num_categories:
            raise ValueError(
                f"image {image_id}: {kind} segment id {segment_id} has unknown category {category}"
            )
    return ids, categories, crowd


def image_pq_stats(
    gt_ids: np.ndarray,
    gt_segments: list[dict],
    pred_ids: np.ndarray,
    pred_segments: list[dict],
    num_categories: int,
    image_id=None,
) -> PQStats:
    """PQ statistics of one image.

    gt_ids, pred_ids: (H, W) integer segment ids, 0 = void. Segments: dicts with "id", "category" (index in
    [0, num_categories)) and, for the ground truth, "iscrowd". Raises ValueError (naming image_id and the
    segment) when a predicted id is in the map but not in the list or the reverse, a list names an id twice,
    or a category is invalid.
    """
    gt_ids = np.asarray(gt_ids).astype(np.int64, copy=False)
    pred_ids = np.asarray(pred_ids).astype(np.int64, copy=False)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"image {image_id}: prediction size {pred_ids.shape} differs from ground truth {gt_ids.shape}"
        )
    gt_seg_ids, gt_cats, gt_crowd = _segment_arrays(
        gt_segments, num_categories, "ground-truth", image_id, with_crowd=True
    )
    pred_seg_ids, pred_cats, _ = _segment_arrays(
        pred_segments, num_categories, "predicted", image_id, with_crowd=False
    )
    num_gt, num_pred = len(gt_seg_ids), len(pred_seg_ids)

    # Compact indices: gt 0 = void, 1..G segments, G+1 = ids missing from the list; pred 0 = void, 1..P.
    gt_index = index_map_from_ids(gt_ids, gt_seg_ids).astype(np.int64) + 1
    gt_index[(gt_index == 0) & (gt_ids != 0)] = num_gt + 1
    pred_index = index_map_from_ids(pred_ids, pred_seg_ids).astype(np.int64) + 1
    unknown = (pred_index == 0) & (pred_ids != 0)
    if unknown.any():
        segment_id = int(pred_ids[unknown][0])
        raise ValueError(
            f"image {image_id}: segment id {segment_id} is in the predicted map but not in segments_info"
        )

    columns = num_pred + 1
    intersection = np.bincount((gt_index * columns + pred_index).ravel(), minlength=(num_gt + 2) * columns)
    intersection = intersection.reshape(num_gt + 2, columns)
    pred_area = intersection.sum(0)[1:]
    if (pred_area == 0).any():
        segment_id = int(pred_seg_ids[np.argmax(pred_area == 0)])
        raise ValueError(
            f"image {image_id}: segment id {segment_id} is in segments_info but not in the predicted map"
        )
    gt_area = intersection.sum(1)[1 : num_gt + 1]
    pair = intersection[1 : num_gt + 1, 1:]
    pred_on_void = intersection[0, 1:]

    stats = PQStats.zeros(num_categories)
    union = gt_area[:, None] + pred_area[None, :] - pair - pred_on_void[None, :]
    iou = pair / np.maximum(union, 1)
    same_category = gt_cats[:, None] == pred_cats[None, :]
    matched = same_category & ~gt_crowd[:, None] & (iou > 0.5)
    gt_match, pred_match = np.nonzero(matched)
    np.add.at(stats.tp, gt_cats[gt_match], 1)
    np.add.at(stats.iou, gt_cats[gt_match], iou[gt_match, pred_match])

    gt_matched = np.zeros(num_gt, bool)
    gt_matched[gt_match] = True
    gt_unmatched = ~gt_matched & ~gt_crowd
    np.add.at(stats.fn, gt_cats[gt_unmatched], 1)

    crowd_of_category = {int(gt_cats[g]): g for g in np.flatnonzero(gt_crowd)}
    ignored = pred_on_void.astype(np.float64)
    for p in range(num_pred):
        crowd = crowd_of_category.get(int(pred_cats[p]))
        if crowd is not None:
            ignored[p] += pair[crowd, p]
    pred_matched = np.zeros(num_pred, bool)
    pred_matched[pred_match] = True
    false_positive = ~pred_matched & (ignored / pred_area <= 0.5)
    np.add.at(stats.fp, pred_cats[false_positive], 1)
    return stats


def summarize_pq(stats: PQStats, metadata: DatasetMetadata) -> dict:
    """PQ/SQ/RQ in percent for All, Things (suffix _th) and Stuff (_st), the number of categories N counted,
    and per_class {name: {PQ, SQ, RQ, TP, FP, FN, category_id}} (a name that several categories share becomes
    "name (category id)")."""
    counted = (stats.tp + stats.fp + stats.fn) > 0
    denominator = np.maximum(stats.tp + 0.5 * stats.fp + 0.5 * stats.fn, 1e-12)
    pq = np.where(counted, stats.iou / denominator, 0.0)
    sq = np.where(stats.tp > 0, stats.iou / np.maximum(stats.tp, 1), 0.0)
    rq = np.where(counted, stats.tp / denominator, 0.0)
    is_thing = np.array([c.get("isthing", 1) == 1 for c in metadata.categories], dtype=bool)
    results: dict = {"task": "panoptic"}
    for suffix, selected in (("", np.ones_like(is_thing)), ("_th", is_thing), ("_st", ~is_thing)):
        use = selected & counted
        n = int(use.sum())
        for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            results[name + suffix] = float(100 * values[use].mean()) if n else 0.0
        results["N" + suffix] = n
    keys = per_class_keys(metadata.class_names, metadata.contiguous_to_category_id)
    results["per_class"] = {
        keys[k]: {
            "category_id": metadata.contiguous_to_category_id[k],
            "PQ": float(100 * pq[k]),
            "SQ": float(100 * sq[k]),
            "RQ": float(100 * rq[k]),
            "TP": int(stats.tp[k]),
            "FP": int(stats.fp[k]),
            "FN": int(stats.fn[k]),
        }
        for k in range(metadata.num_classes)
    }
    return results


def _ground_truth_segments(annotation: dict, metadata: DatasetMetadata, json_path: str) -> list[dict]:
    segments = []
    for s in annotation["segments_info"]:
        if s["category_id"] not in metadata.category_id_to_contiguous:
            raise ValueError(
                f"{json_path}: image id {annotation['image_id']} segment id {s['id']} has unknown "
                f"category_id {s['category_id']}"
            )
        category = metadata.category_id_to_contiguous[s["category_id"]]
        segments.append({"id": s["id"], "category": category, "iscrowd": s.get("iscrowd", 0)})
    return segments


def _evaluate_image(gt_png: str, gt_segments, pred_ids, pred_segments, num_categories, image_id) -> PQStats:
    return image_pq_stats(
        read_panoptic_png(gt_png), gt_segments, pred_ids, pred_segments, num_categories, image_id
    )


def _evaluate_file_pairs(jobs: list[tuple]) -> PQStats:
    total = None
    for gt_png, gt_segments, pred_png, pred_segments, num_categories, image_id in jobs:
        stats = _evaluate_image(
            gt_png, gt_segments, read_panoptic_png(pred_png), pred_segments, num_categories, image_id
        )
        if total is None:
            total = stats
        else:
            total += stats
    return total


class PanopticEvaluator:
    """Accumulates PQ over images against the dataset's panoptic JSON and PNGs (metadata.panoptic_json/_root).

    update(image_id, panoptic_seg (H, W) int at the original image size, 0 = void, segments_info list of
    {"id", "category_id" (contiguous class index), ...}); compute() -> summarize_pq's dict over the images
    seen. With num_workers > 0 images are evaluated in a process pool while the caller keeps predicting.
    """

    def __init__(self, metadata: DatasetMetadata, *, num_workers: int = 0):
        if not metadata.panoptic_json or not metadata.panoptic_root:
            raise ValueError("metadata has no panoptic_json / panoptic_root to evaluate against")
        self.metadata = metadata
        self.num_workers = int(num_workers)
        data = read_json(metadata.panoptic_json)
        self._ground_truth = {
            a["image_id"]: (
                os.path.join(metadata.panoptic_root, a["file_name"]),
                _ground_truth_segments(a, metadata, metadata.panoptic_json),
            )
            for a in data["annotations"]
        }
        self.reset()

    def reset(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(cancel_futures=True)
        self.stats = PQStats.zeros(self.metadata.num_classes)
        self.image_ids: list = []
        self._seen: set = set()
        self._pending = []
        self._pool = None

    def update(self, image_id, panoptic_seg, segments_info: list[dict]) -> None:
        if image_id not in self._ground_truth:
            raise ValueError(f"image_id {image_id} is not in {self.metadata.panoptic_json}")
        if image_id in self._seen:
            raise ValueError(f"image_id {image_id} was already evaluated")
        pred_ids = to_numpy(panoptic_seg).astype(np.int64, copy=False)
        if pred_ids.ndim != 2:
            raise ValueError(f"panoptic_seg must be (H, W), got shape {pred_ids.shape}")
        pred_segments = [{"id": int(s["id"]), "category": int(s["category_id"])} for s in segments_info]
        gt_png, gt_segments = self._ground_truth[image_id]
        job = (gt_png, gt_segments, pred_ids, pred_segments, self.metadata.num_classes, image_id)
        if self.num_workers <= 0:
            self.stats += _evaluate_image(*job)
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.num_workers, mp_context=pool_context())
            self._pending.append(self._pool.submit(_evaluate_image, *job))
            while len(self._pending) > 4 * self.num_workers:
                self.stats += self._pending.pop(0).result()
        # Recorded last: a prediction evaluated here and refused leaves no trace.
        self.image_ids.append(image_id)
        self._seen.add(image_id)

    def _drain(self) -> None:
        while self._pending:
            self.stats += self._pending.pop(0).result()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def get_state(self) -> dict:
        """The sums so far as JSON-able lists, to gather across processes or store, and pass to merge_state."""
        self._drain()
        stats = {name: getattr(self.stats, name).tolist() for name in ("iou", "tp", "fp", "fn")}
        return {"stats": stats, "image_ids": list(self.image_ids)}

    def merge_state(self, state: dict) -> None:
        self._drain()
        check_new_images(self._seen, state["image_ids"])
        stats = state["stats"]
        self.stats += PQStats(
            np.asarray(stats["iou"], np.float64),
            np.asarray(stats["tp"], np.int64),
            np.asarray(stats["fp"], np.int64),
            np.asarray(stats["fn"], np.int64),
        )
        self.image_ids.extend(state["image_ids"])
        self._seen.update(state["image_ids"])

    def compute(self) -> dict:
        self._drain()
        results = summarize_pq(self.stats, self.metadata)
        results["num_images"] = len(self.image_ids)
        return results


def evaluate_panoptic_files(
    gt_json: str,
    pred_json: str,
    gt_folder: str | None = None,
    pred_folder: str | None = None,
    num_workers: int = 0,
) -> dict:
    """PQ of predictions stored in the COCO panoptic format (JSON + PNG folder), category ids as in the
    ground truth. Folders default to the JSON path without ".json". Every ground-truth image needs a
    prediction. Images are split over num_workers processes when num_workers > 1."""
    gt_folder = gt_folder or gt_json[: -len(".json")]
    pred_folder = pred_folder or pred_json[: -len(".json")]
    gt_data, pred_data = read_json(gt_json), read_json(pred_json)
    metadata = DatasetMetadata(gt_data["categories"])
    predictions = {a["image_id"]: a for a in pred_data["annotations"]}
    jobs = []
    for annotation in gt_data["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in predictions:
            raise ValueError(f"{pred_json}: no prediction for image id {image_id}")
        prediction = predictions[image_id]
        pred_segments = []
        for s in prediction["segments_info"]:
            if s["category_id"] not in metadata.category_id_to_contiguous:
                raise ValueError(
                    f"{pred_json}: image id {image_id} segment id {s['id']} has unknown category_id "
                    f"{s['category_id']}"
                )
            pred_segments.append(
                {"id": s["id"], "category": metadata.category_id_to_contiguous[s["category_id"]]}
            )
        jobs.append(
            (
                os.path.join(gt_folder, annotation["file_name"]),
                _ground_truth_segments(annotation, metadata, gt_json),
                os.path.join(pred_folder, prediction["file_name"]),
                pred_segments,
                metadata.num_classes,
                image_id,
            )
        )
    stats = PQStats.zeros(metadata.num_classes)
    if num_workers > 1 and len(jobs) > 1:
        chunks = [
            chunk.tolist() for chunk in np.array_split(np.arange(len(jobs)), min(num_workers, len(jobs)))
        ]
        with ProcessPoolExecutor(num_workers, mp_context=pool_context()) as pool:
            for chunk_stats in pool.map(_evaluate_file_pairs, [[jobs[i] for i in chunk] for chunk in chunks]):
                stats += chunk_stats
    elif jobs:
        stats += _evaluate_file_pairs(jobs)
    results = summarize_pq(stats, metadata)
    results["num_images"] = len(jobs)
    return results

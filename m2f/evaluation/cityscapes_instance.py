"""Cityscapes instance segmentation AP as cityscapesscripts' evaluation (evalInstanceLevelSemanticLabeling)
computes it for the benchmark and Mask2Former's tables: AP averaged over the IoU thresholds 0.50:0.05:0.95 and
AP50, for each of the 8 thing classes and their mean; ground-truth objects under 100 pixels and groups of
objects are ignored, and an unmatched prediction that lies mostly on void or ignored pixels is no false
positive. It needs the `cityscapesscripts` package (the "cityscapes" extra).

The script reads each prediction back from a mask PNG and compares it with every ground-truth object of its
class, which takes minutes per hundred images; the evaluator counts the same overlaps with one pass over each
prediction's bounding box when it is given the prediction, keeps only those counts, and hands them to the
script's own matching and AP code (evaluateMatches, computeAverages). Tested against the script run on files."""

from __future__ import annotations

import copy
import math

import numpy as np

from m2f.data.cityscapes import label_ids
from m2f.data.common import DatasetMetadata, read_label_png
from m2f.evaluation.arrays import check_new_images
from m2f.evaluation.instance import check_instances


def _load_cityscapes_evaluation():
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling
    except ImportError as error:
        raise ImportError(
            "Cityscapes instance AP is computed by cityscapesscripts: pip install cityscapesscripts (or the "
            "package's [cityscapes] extra)"
        ) from error
    return evalInstanceLevelSemanticLabeling


class CityscapesInstanceEvaluator:
    """Accumulates the overlaps of predicted instances with the instance id maps and computes Cityscapes' AP.

    annotation_paths: {image_id: its *_gtFine_instanceIds.png}. update(image_id, instances) as
    InstanceEvaluator's: masks (K, H, W) bool at the original size, scores (K,), labels (K,) contiguous
    classes of `metadata` (their category ids are Cityscapes' label ids).
    compute() -> {"task": "instance", "benchmark": "cityscapes", "segm": {"AP", "AP50", "per_class": {name:
    AP}}, "num_images"}, in percent; a class with no ground-truth object has no AP (left out of the mean and
    of per_class, as cityscapesscripts does).
    """

    def __init__(self, metadata: DatasetMetadata, annotation_paths: dict[str, str]):
        evaluation = _load_cityscapes_evaluation()
        from cityscapesscripts.helpers.labels import labels

        self.metadata = metadata
        self.annotation_paths = dict(annotation_paths)
        self._void_label_ids = np.array([label.id for label in labels if label.ignoreInEval])
        self._args = copy.deepcopy(evaluation.args)
        evaluation.setInstanceLabels(self._args)
        self._name_of = {label.id: label.name for label in labels}
        self.reset()

    def reset(self) -> None:
        # image id -> {"objects": [[id, pixels], ...], "predictions": [{label_id, score, pixels, void,
        # overlaps: [[id, pixels], ...]}, ...]}
        self.images: dict = {}

    def update(self, image_id, instances: dict) -> None:
        if image_id not in self.annotation_paths:
            raise ValueError(f"image_id {image_id} is not in the ground truth")
        check_new_images(set(self.images), [image_id])
        ids = read_label_png(self.annotation_paths[image_id])
        masks, scores, labels = check_instances(image_id, instances, ids.shape, self.metadata.num_classes)
        pixels_of = np.bincount(ids.ravel())  # a PNG holds at most 16 bits per value
        values = np.flatnonzero(pixels_of)
        value_label_ids = label_ids(values)
        is_void = np.isin(values, self._void_label_ids)
        rows, columns = masks.any(2), masks.any(1)  # numpy: ~5x faster than torch masks_to_boxes on CPU
        predictions = []
        for mask, row, column, score, label in zip(masks, rows, columns, scores.tolist(), labels.tolist()):
            label_id = self.metadata.contiguous_to_category_id[label]
            if not row.any() or self._name_of.get(label_id) not in self._args.instLabels:
                continue  # the script skips empty masks and classes it does not evaluate
            top, bottom = np.flatnonzero(row)[[0, -1]]
            left, right = np.flatnonzero(column)[[0, -1]]
            box = (slice(top, bottom + 1), slice(left, right + 1))
            counts = np.bincount(ids[box][mask[box]], minlength=len(pixels_of))[values]
            overlapping = (counts > 0) & (value_label_ids == label_id)
            predictions.append(
                {
                    "label_id": label_id,
                    "score": score,
                    "pixels": int(counts.sum()),
                    "void": int(counts[is_void].sum()),
                    "overlaps": np.stack([values[overlapping], counts[overlapping]], 1).tolist(),
                }
            )
        self.images[image_id] = {
            "objects": np.stack([values, pixels_of[values]], 1).tolist(),
            "predictions": predictions,
        }

    def get_state(self) -> dict:
        """The counts so far (JSON-able), to gather across processes or store, and pass to merge_state."""
        return {"images": self.images}

    def merge_state(self, state: dict) -> None:
        images = state["images"]
        if not isinstance(images, dict) or not all(
            isinstance(image, dict) and {"objects", "predictions"} <= image.keys()
            for image in images.values()
        ):
            raise ValueError("state['images'] must map image ids to their objects and predictions")
        check_new_images(set(self.images), list(images))
        self.images.update(images)

    def _matches(self) -> dict:
        """The matches of every image in the form cityscapesscripts' assignGt2Preds gives them."""
        matches = {}
        for image_id, image in self.images.items():
            ground_truth = {name: [] for name in self._args.instLabels}
            by_id = {}
            for value, pixels in image["objects"]:
                label_id = int(label_ids(np.array(value)))
                name = self._name_of.get(label_id)
                if name in ground_truth:
                    by_id[value] = {
                        "instID": value,
                        "labelID": label_id,
                        "pixelCount": pixels,
                        "medDist": -1,
                        "distConf": 0.0,
                    }
                    ground_truth[name].append({**by_id[value], "matchedPred": []})
            matched = {entry["instID"]: entry for entries in ground_truth.values() for entry in entries}
            predictions = {name: [] for name in self._args.instLabels}
            for number, prediction in enumerate(image["predictions"]):
                entry = {
                    "imgName": f"{image_id}/{number}",
                    "predID": number,
                    "labelID": prediction["label_id"],
                    "pixelCount": prediction["pixels"],
                    "confidence": prediction["score"],
                    "voidIntersection": prediction["void"],
                }
                matched_gt = []
                for value, pixels in prediction["overlaps"]:
                    matched_gt.append({**by_id[value], "intersection": pixels})
                    matched[value]["matchedPred"].append({**entry, "intersection": pixels})
                entry["matchedGt"] = matched_gt
                predictions[self._name_of[prediction["label_id"]]].append(entry)
            matches[image_id] = {"groundTruth": ground_truth, "prediction": predictions}
        return matches

    def compute(self) -> dict:
        evaluation = _load_cityscapes_evaluation()
        averages = evaluation.computeAverages(
            evaluation.evaluateMatches(self._matches(), self._args), self._args
        )
        per_class = {
            name: 100 * float(values["ap"])
            for name, values in averages["classes"].items()
            if not math.isnan(values["ap"])
        }
        return {
            "task": "instance",
            "benchmark": "cityscapes",
            "segm": {
                "AP": 100 * float(averages["allAp"]),
                "AP50": 100 * float(averages["allAp50%"]),
                "per_class": per_class,
            },
            "num_images": len(self.images),
        }

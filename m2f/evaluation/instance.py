"""Instance segmentation AP with pycocotools: mask AP ("segm") and box AP computed from the boxes that enclose
the predicted masks ("box AP (from masks)"; the model predicts no boxes). Standard COCO settings: IoU
thresholds 0.50:0.05:0.95, 101 recall points, up to 100 detections per image, area ranges small < 32^2 <=
medium < 96^2 <= large (mask area for segm, box area for boxes)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f.data.common import DatasetMetadata
from m2f.evaluation.arrays import check_new_images, per_class_keys, to_numpy

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def masks_to_rles(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool or uint8 masks -> COCO RLEs {"size": [H, W], "counts": str}, as results files hold them."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def check_instances(image_id, instances: dict, size: tuple[int, int], num_classes: int):
    """An instance prediction dict (masks (K, H, W) bool at the image's size, scores (K,), labels (K,) in
    [0, num_classes)) as numpy (masks bool, scores float64, labels int64); ValueError naming what is wrong."""
    masks = to_numpy(instances["masks"])
    scores = to_numpy(instances["scores"]).astype(np.float64)
    labels = to_numpy(instances["labels"]).astype(np.int64)
    if (
        masks.ndim != 3
        or scores.ndim != 1
        or labels.ndim != 1
        or not len(masks) == len(scores) == len(labels)
    ):
        raise ValueError(
            f"instances need masks (K, H, W), scores (K,), labels (K,); got {masks.shape}, "
            f"{scores.shape}, {labels.shape}"
        )
    if masks.dtype != bool:  # probabilities or logits would be cut to garbage
        raise ValueError(f"image_id {image_id}: masks must be bool, got {masks.dtype}")
    if len(masks) and masks.shape[1:] != tuple(size):
        raise ValueError(
            f"image_id {image_id}: masks have size {masks.shape[1:]}, the image is {tuple(size)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"image_id {image_id}: labels must be in [0, {num_classes})")
    return masks, scores, labels


def check_results_state(state: dict, result_keys: dict[str, str]) -> None:
    """ValueError unless state["image_ids"] is a list and each state[key] of result_keys a list of result
    dicts with image_id, category_id, score and result_keys[key] (an evaluator state read back from JSON)."""
    for key, result_key in result_keys.items():
        results = state[key]
        needed = {"image_id", "category_id", "score", result_key}
        if not isinstance(results, list) or not all(
            isinstance(r, dict) and needed <= r.keys() for r in results
        ):
            raise ValueError(f"state[{key!r}] must be a list of results with the keys {sorted(needed)}")
    if not isinstance(state["image_ids"], list):
        raise ValueError(f"state['image_ids'] must be a list, got {type(state['image_ids']).__name__}")


def _fill_optional_keys(coco_gt: COCO) -> None:
    """Adds what pycocotools needs and COCO files may leave out (the loader reads them as optional): iscrowd
    (0), and area and bbox from the segmentation."""
    for annotation in coco_gt.dataset["annotations"]:
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation or "bbox" not in annotation:
            rle = coco_gt.annToRLE(annotation)
            annotation.setdefault("area", float(mask_utils.area(rle)))
            annotation.setdefault("bbox", mask_utils.toBbox(rle).tolist())


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """The detections as a COCO object. loadRes adds keys to the dicts it is given, so it gets copies; it
    refuses an empty list, which becomes a COCO object of the same images without annotations."""
    if results:
        return coco_gt.loadRes([dict(result) for result in results])
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _evaluate(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list, class_names: dict) -> dict:
    """COCOeval of `results`: AP values in percent plus per_class AP (classes without ground truth are left
    out)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = _load_results(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools reports -1 when no ground truth falls in an area range: NaN here, as detectron2 does.
    metrics = {
        name: float(100 * v) if v >= 0 else float("nan") for name, v in zip(AP_NAMES, evaluator.stats[:6])
    }
    precision = evaluator.eval["precision"]  # (iou thresholds, recall points, classes, areas, max dets)
    category_ids = evaluator.params.catIds
    keys = per_class_keys([class_names.get(i, str(i)) for i in category_ids], category_ids)
    per_class = {}
    for k, key in enumerate(keys):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        if values.size:
            per_class[key] = float(100 * values.mean())
    metrics["per_class"] = per_class
    return metrics


class InstanceEvaluator:
    """Accumulates predicted instances and computes COCO AP against `gt_json` (default
    metadata.instances_json).

    update(image_id, instances): instances dict with masks (K, H, W) bool at the original image size, scores
    (K,), labels (K,) contiguous class indices of `metadata` (mapped to the JSON's category ids).
    compute() -> {"task": "instance", "segm": {AP..., per_class}, "bbox_from_masks": {AP..., per_class},
    "num_images"}; per_class is {name: AP} ("name (category id)" for a name that several categories share).
    """

    def __init__(self, metadata: DatasetMetadata, gt_json: str | None = None):
        gt_json = gt_json or metadata.instances_json
        if not gt_json:
            raise ValueError("gt_json is required when metadata has no instances_json")
        self.metadata = metadata
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO(gt_json)
        _fill_optional_keys(self.coco_gt)
        self.class_names = {c["id"]: c["name"] for c in self.coco_gt.loadCats(self.coco_gt.getCatIds())}
        self.reset()

    def reset(self) -> None:
        self.segm_results: list[dict] = []
        self.box_results: list[dict] = []
        self.image_ids: list = []
        self._seen: set = set()

    def update(self, image_id, instances: dict) -> None:
        if image_id not in self.coco_gt.imgs:
            raise ValueError(f"image_id {image_id} is not in the ground truth")
        check_new_images(self._seen, [image_id])
        image = self.coco_gt.imgs[image_id]
        masks, scores, labels = check_instances(
            image_id, instances, (image["height"], image["width"]), self.metadata.num_classes
        )
        self.image_ids.append(image_id)
        self._seen.add(image_id)
        if not len(masks):
            return
        rles = masks_to_rles(masks)
        boxes = mask_utils.toBbox(rles)
        for rle, box, score, label in zip(rles, boxes, scores.tolist(), labels.tolist()):
            category_id = self.metadata.contiguous_to_category_id[label]
            if category_id not in self.class_names:
                continue  # a stuff class of a panoptic model: no instance ground truth
            common = {"image_id": image_id, "category_id": category_id, "score": score}
            self.segm_results.append({**common, "segmentation": rle})
            self.box_results.append({**common, "bbox": [float(v) for v in box]})

    def get_state(self) -> dict:
        """The results so far (JSON-able), to gather across processes or store, and pass to merge_state."""
        return {"segm": self.segm_results, "box": self.box_results, "image_ids": self.image_ids}

    def merge_state(self, state: dict) -> None:
        check_results_state(state, {"segm": "segmentation", "box": "bbox"})
        check_new_images(self._seen, state["image_ids"])
        self.segm_results.extend(state["segm"])
        self.box_results.extend(state["box"])
        self.image_ids.extend(state["image_ids"])
        self._seen.update(state["image_ids"])

    def compute(self) -> dict:
        image_ids = sorted(set(self.image_ids))
        return {
            "task": "instance",
            "segm": _evaluate(self.coco_gt, self.segm_results, "segm", image_ids, self.class_names),
            "bbox_from_masks": _evaluate(self.coco_gt, self.box_results, "bbox", image_ids, self.class_names),
            "num_images": len(image_ids),
        }

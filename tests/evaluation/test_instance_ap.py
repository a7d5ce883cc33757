import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f.data import CocoInstanceDataset, CocoPanopticDataset, DatasetMetadata
from m2f.evaluation import InstanceEvaluator, format_table

CATEGORIES = [{"id": 4, "name": "square", "isthing": 1}]


def _square(top, left, size=6, shape=(24, 24)):
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


@pytest.fixture
def two_squares_gt(tmp_path):
    """One 24x24 image with two 6x6 ground-truth squares of one category (small objects)."""
    annotations = []
    for i, (top, left) in enumerate([(1, 1), (12, 12)]):
        polygon = [left, top, left + 6, top, left + 6, top + 6, left, top + 6]
        annotations.append(
            {"id": i + 1, "image_id": 7, "category_id": 4, "segmentation": [polygon], "area": 36,
             "bbox": [left, top, 6, 6], "iscrowd": 0}
        )  # fmt: skip
    data = {
        "images": [{"id": 7, "file_name": "x.jpg", "height": 24, "width": 24}],
        "annotations": annotations,
    }
    data["categories"] = CATEGORIES
    path = str(tmp_path / "gt.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _evaluate(gt_json, masks, scores):
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), gt_json)
    labels = torch.zeros(len(masks), dtype=torch.int64)
    evaluator.update(
        7, {"masks": torch.from_numpy(np.stack(masks)), "scores": torch.tensor(scores), "labels": labels}
    )
    return evaluator.compute()


@pytest.mark.parametrize("missing", [("iscrowd",), ("area",), ("bbox",), ("iscrowd", "area", "bbox")])
def test_ground_truth_without_optional_keys(two_squares_gt, missing):
    """The loader reads iscrowd as optional; pycocotools raised KeyError at the end of an evaluation. The
    same results as with the keys: area and bbox come from the polygons."""
    with open(two_squares_gt) as f:
        data = json.load(f)
    for annotation in data["annotations"]:
        for key in missing:
            del annotation[key]
    with open(two_squares_gt, "w") as f:
        json.dump(data, f)
    results = _evaluate(two_squares_gt, [_square(1, 1), _square(12, 13)], [0.9, 0.8])
    for metrics in (results["segm"], results["bbox_from_masks"]):
        # One exact square; one shifted by a pixel: IoU 30 / 42 = 0.71 (found at thresholds 0.5 to 0.7).
        assert metrics["AP50"] == pytest.approx(100.0)
        assert metrics["AP"] == pytest.approx(100 * (5 * 1 + 5 * 51 / 101) / 10)


def test_one_of_two_found_gives_51_of_101_recall_points(two_squares_gt):
    # recall 0.5 at precision 1 for every IoU threshold: 51 of COCO's 101 recall points (0, 0.01, ..., 0.5)
    results = _evaluate(two_squares_gt, [_square(1, 1)], [0.9])
    for metrics in (results["segm"], results["bbox_from_masks"]):
        assert metrics["AP"] == pytest.approx(100 * 51 / 101)
        assert metrics["AP50"] == pytest.approx(100 * 51 / 101) and metrics["APs"] == pytest.approx(
            100 * 51 / 101
        )
        assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])  # no medium or large ground truth


def test_no_detections_score_as_useless_ones(two_squares_gt):
    """An image without detections is scored as one whose detections all miss (AP 0 for the ranges and
    classes with ground truth, NaN for the empty ranges), not 0 everywhere."""
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    no_labels = torch.zeros(0, dtype=torch.int64)
    evaluator.update(
        7, {"masks": torch.zeros(0, 24, 24, dtype=torch.bool), "scores": torch.zeros(0), "labels": no_labels}
    )
    empty = evaluator.compute()
    missing = _evaluate(two_squares_gt, [_square(18, 0, size=4)], [0.5])
    for iou_type in ("segm", "bbox_from_masks"):
        assert missing[iou_type]["AP"] == 0.0 and math.isnan(missing[iou_type]["APl"])
        for name, value in missing[iou_type].items():
            if name != "per_class" and math.isnan(value):
                assert math.isnan(empty[iou_type][name]), name
            else:
                assert empty[iou_type][name] == value, name


def test_state_stays_json_after_compute(two_squares_gt):
    """compute() must not change the stored results that get_state() hands out to be gathered or saved."""
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    masks = torch.from_numpy(np.stack([_square(1, 1), _square(12, 12)]))
    evaluator.update(7, {"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.zeros(2).long()})
    before = json.dumps(evaluator.get_state())
    first = evaluator.compute()
    assert json.dumps(evaluator.get_state()) == before
    assert evaluator.compute()["segm"]["AP"] == first["segm"]["AP"] == pytest.approx(100.0)


def test_bfloat16_scores_are_accepted(two_squares_gt):
    masks = torch.from_numpy(np.stack([_square(1, 1), _square(12, 12)]))
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    scores = torch.tensor([0.9, 0.8], dtype=torch.bfloat16)
    evaluator.update(7, {"masks": masks, "scores": scores, "labels": torch.zeros(2).long()})
    assert evaluator.compute()["segm"]["AP"] == pytest.approx(100.0)


def test_false_positive_ranked_first_halves_precision(two_squares_gt):
    later = _evaluate(two_squares_gt, [_square(1, 1), _square(0, 17)], [0.9, 0.5])
    first = _evaluate(two_squares_gt, [_square(1, 1), _square(0, 17)], [0.9, 0.95])
    assert later["segm"]["AP"] == pytest.approx(100 * 51 / 101)
    assert first["segm"]["AP"] == pytest.approx(100 * 0.5 * 51 / 101)


def test_box_from_masks_differs_from_mask_iou(two_squares_gt):
    # An L-shaped mask: its enclosing box equals the ground-truth box, its mask IoU is 20/36 (< 0.75).
    l_shape = _square(1, 1) & ~_square(3, 3, size=4)
    results = _evaluate(two_squares_gt, [l_shape, _square(12, 12)], [0.9, 0.8])
    assert results["bbox_from_masks"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP50"] == pytest.approx(100.0) and results["segm"]["AP75"] < 100
    assert "box AP (from masks)" in format_table(results)


def test_ground_truth_masks_score_100_on_synthetic(synthetic_root):
    dataset = CocoInstanceDataset(synthetic_root, "val")
    evaluator = InstanceEvaluator(dataset.metadata)
    for index in range(len(dataset)):
        item = dataset[index]
        scores = torch.linspace(1.0, 0.5, len(item["labels"]))
        evaluator.update(
            item["image_id"], {"masks": item["masks"], "scores": scores, "labels": item["labels"]}
        )
    results = evaluator.compute()
    assert results["segm"]["AP"] == pytest.approx(100.0) and results["bbox_from_masks"][
        "AP"
    ] == pytest.approx(100.0)
    assert results["num_images"] == len(dataset)
    assert set(results["segm"]["per_class"]) <= {"circle", "rectangle", "triangle"}


def test_panoptic_metadata_skips_stuff_labels(synthetic_root):
    metadata = CocoPanopticDataset(synthetic_root, "val").metadata
    evaluator = InstanceEvaluator(metadata)
    coco = COCO(os.path.join(synthetic_root, "annotations", "instances_val2017.json"))
    image_id = sorted(coco.imgs)[0]
    annotation = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))[0]
    thing = metadata.category_id_to_contiguous[annotation["category_id"]]
    stuff = metadata.category_id_to_contiguous[100]
    mask = torch.from_numpy(coco.annToMask(annotation).astype(bool))
    evaluator.update(image_id, {"masks": torch.stack([mask, mask]), "scores": torch.tensor([0.9, 0.8]),
                                "labels": torch.tensor([thing, stuff])})  # fmt: skip
    assert (
        len(evaluator.segm_results) == 1
        and evaluator.segm_results[0]["category_id"] == annotation["category_id"]
    )


def test_bad_input_raises(two_squares_gt):
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    good = {
        "masks": torch.zeros(1, 24, 24, dtype=torch.bool),
        "scores": torch.ones(1),
        "labels": torch.zeros(1),
    }
    with pytest.raises(ValueError, match="image_id"):
        evaluator.update(8, good)
    with pytest.raises(ValueError, match="size"):
        evaluator.update(7, dict(good, masks=torch.zeros(1, 20, 24, dtype=torch.bool)))
    with pytest.raises(ValueError, match="label"):
        evaluator.update(7, dict(good, labels=torch.tensor([3])))
    # Probabilities or logits were cut to uint8 (0.9 -> 0, -3 -> 253) and scored AP 0 silently.
    with pytest.raises(ValueError, match="masks must be bool, got float32"):
        evaluator.update(7, dict(good, masks=torch.full((1, 24, 24), 0.9)))
    # A 0-d score failed in len(); (K, 1) scores failed later inside pycocotools.
    for scores in (torch.tensor(1.0), torch.ones(1, 1)):
        with pytest.raises(ValueError, match=r"scores \(K,\)"):
            evaluator.update(7, dict(good, scores=scores))
    with pytest.raises(ValueError, match=r"labels \(K,\)"):
        evaluator.update(7, dict(good, labels=torch.zeros(1, 1)))
    evaluator.update(7, good)
    # The same image again kept both sets of detections (AP 100 -> 83.5).
    with pytest.raises(ValueError, match=r"image ids \[7\] were already evaluated"):
        evaluator.update(7, good)
    with pytest.raises(ValueError, match=r"image ids \[7\] were already evaluated"):
        evaluator.merge_state(evaluator.get_state())
    # An edited or foreign state was taken as it was and failed later inside pycocotools.
    fresh = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    state = evaluator.get_state()
    for bad, message in (
        ({**state, "segm": "edited"}, r"state\['segm'\] must be a list of results"),
        ({**state, "box": [{"image_id": 7, "score": 0.5}]}, r"state\['box'\] must be a list of results"),
        ({**state, "image_ids": "7"}, r"state\['image_ids'\] must be a list, got str"),
    ):
        with pytest.raises(ValueError, match=message):
            fresh.merge_state(bad)
    assert fresh.get_state() == {"segm": [], "box": [], "image_ids": []}
    nothing = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt).compute()
    assert math.isnan(nothing["segm"]["AP"]) and nothing["num_images"] == 0  # no image: no ground truth


def test_categories_sharing_a_name_keep_their_own_ap(tmp_path):
    categories = [{"id": 4, "name": "square", "isthing": 1}, {"id": 5, "name": "square", "isthing": 1}]
    annotations = [
        {"id": i + 1, "image_id": 7, "category_id": category, "area": 36, "bbox": [left, top, 6, 6], "iscrowd": 0,
         "segmentation": [[left, top, left + 6, top, left + 6, top + 6, left, top + 6]]}
        for i, (category, top, left) in enumerate([(4, 1, 1), (5, 12, 12)])
    ]  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "x.jpg", "height": 24, "width": 24}],
                "annotations": annotations,
                "categories": categories,
            }
        )
    )
    evaluator = InstanceEvaluator(DatasetMetadata(categories), str(path))
    masks = torch.from_numpy(np.stack([_square(1, 1), _square(0, 0)]))
    evaluator.update(7, {"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])})
    per_class = evaluator.compute()["segm"]["per_class"]
    assert per_class == {"square (4)": pytest.approx(100.0), "square (5)": pytest.approx(0.0)}


def _write_ground_truth(path, categories, squares, shape=(24, 24)):
    """A one-image (id 7) COCO instances JSON of square annotations [(category_id, top, left, size)]."""
    annotations = [
        {"id": i + 1, "image_id": 7, "category_id": category, "area": size * size, "bbox": [left, top, size, size],
         "iscrowd": 0, "segmentation": [[left, top, left + size, top, left + size, top + size, left, top + size]]}
        for i, (category, top, left, size) in enumerate(squares)
    ]  # fmt: skip
    image = {"id": 7, "file_name": "x.jpg", "height": shape[0], "width": shape[1]}
    with open(path, "w") as f:
        json.dump({"images": [image], "annotations": annotations, "categories": categories}, f)
    return str(path)


def _pycocotools_stats(gt_json, results, iou_type):
    """pycocotools' own COCOeval of the results (its summarize() reads AP at maxDets=100), and its precision."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats, evaluator.eval["precision"]


def test_per_class_ap_is_read_at_100_detections_per_image(two_squares_gt):
    """Both squares found exactly: AP 100 at COCO's 100 detections per image. Read at maxDets=1 (the first
    column of pycocotools' precision) the one class would score 51 / 101 (recall 0.5)."""
    masks = torch.from_numpy(np.stack([_square(1, 1), _square(12, 12)]))
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), two_squares_gt)
    evaluator.update(7, {"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.zeros(2).long()})
    results = evaluator.compute()
    for metrics, stored, iou_type in (
        (results["segm"], evaluator.segm_results, "segm"),
        (results["bbox_from_masks"], evaluator.box_results, "bbox"),
    ):
        stats, precision = _pycocotools_stats(two_squares_gt, stored, iou_type)
        assert stats[0] == pytest.approx(1.0)  # one class: its AP is the AP
        assert 100 * precision[:, :, 0, 0, 0].mean() == pytest.approx(100 * 51 / 101)  # maxDets=1
        assert metrics["per_class"] == {"square": pytest.approx(100 * stats[0])}


def test_a_category_without_ground_truth_is_left_out_of_per_class(tmp_path):
    """Category 5 (circle) is in the JSON's categories and predicted, but has no annotation: pycocotools gives it
    precision -1 everywhere; it must be absent from per_class (not -100 or NaN)."""
    categories = [{"id": 4, "name": "square", "isthing": 1}, {"id": 5, "name": "circle", "isthing": 1}]
    gt_json = _write_ground_truth(tmp_path / "gt.json", categories, [(4, 1, 1, 6)])
    evaluator = InstanceEvaluator(DatasetMetadata(categories), gt_json)
    masks = torch.from_numpy(np.stack([_square(1, 1), _square(12, 12)]))
    evaluator.update(7, {"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])})
    results = evaluator.compute()
    _, precision = _pycocotools_stats(gt_json, evaluator.segm_results, "segm")
    assert (precision[:, :, 1] == -1).all()  # pycocotools' "no ground truth" for circle
    for iou_type in ("segm", "bbox_from_masks"):
        assert results[iou_type]["per_class"] == {"square": pytest.approx(100.0)}
        assert results[iou_type]["AP"] == pytest.approx(100.0)  # the mean leaves circle out too


def test_a_medium_object_scores_in_apm_not_apl(tmp_path):
    """One 40x40 square (area 1600: 32^2 <= 1600 < 96^2, medium) found exactly: APm 100, APs and APl NaN (no
    ground truth of those sizes), as pycocotools' stats[3:6] (small, medium, large) say."""
    gt_json = _write_ground_truth(tmp_path / "gt.json", CATEGORIES, [(4, 10, 20, 40)], shape=(100, 100))
    evaluator = InstanceEvaluator(DatasetMetadata(CATEGORIES), gt_json)
    mask = torch.from_numpy(_square(10, 20, size=40, shape=(100, 100)))[None]
    evaluator.update(7, {"masks": mask, "scores": torch.tensor([0.9]), "labels": torch.zeros(1).long()})
    results = evaluator.compute()
    for metrics, stored, iou_type in (
        (results["segm"], evaluator.segm_results, "segm"),
        (results["bbox_from_masks"], evaluator.box_results, "bbox"),
    ):
        stats, _ = _pycocotools_stats(gt_json, stored, iou_type)
        assert list(stats[3:6]) == [-1, pytest.approx(1.0), -1]
        assert metrics["APm"] == pytest.approx(100.0) and metrics["AP"] == pytest.approx(100.0)
        assert math.isnan(metrics["APs"]) and math.isnan(metrics["APl"])

import json
import os

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute
from PIL import Image

from m2f.data import DatasetMetadata, id_to_rgb, read_panoptic_png
from m2f.evaluation import PanopticEvaluator, evaluate_panoptic_files, image_pq_stats, summarize_pq


def _stats_tuple(stats, k):
    return stats.iou[k], stats.tp[k], stats.fp[k], stats.fn[k]


def test_perfect_prediction():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
    gt_segments = [{"id": 1, "category": 0}, {"id": 2, "category": 1}, {"id": 3, "category": 1}]
    pred = gt * 10
    pred_segments = [{"id": 10, "category": 0}, {"id": 20, "category": 1}, {"id": 30, "category": 1}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments, num_categories=2)
    assert _stats_tuple(stats, 0) == (1.0, 1, 0, 0) and _stats_tuple(stats, 1) == (2.0, 2, 0, 0)


def test_hand_computed_void_fp_fn():
    # gt: A (category 0) is 8 pixels, B (category 1) 4 pixels, the rest void.
    gt = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [2, 2, 2, 2, 0, 0],
        ]
    )
    # pred: P5 (category 0) covers 6 pixels of A and 2 void pixels -> IoU = 6 / (8 + 8 - 6 - 2) = 0.75.
    # P6 (category 1) lies on void only -> ignored. P7 (category 0) covers B -> false positive; B is missed.
    pred = np.array(
        [
            [5, 5, 5, 5, 5, 6],
            [5, 5, 0, 0, 5, 6],
            [7, 7, 7, 7, 0, 0],
        ]
    )
    gt_segments = [{"id": 1, "category": 0}, {"id": 2, "category": 1}]
    pred_segments = [{"id": 5, "category": 0}, {"id": 6, "category": 1}, {"id": 7, "category": 0}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments, num_categories=2)
    assert _stats_tuple(stats, 0) == (0.75, 1, 1, 0)
    assert _stats_tuple(stats, 1) == (0.0, 0, 0, 1)
    metadata = DatasetMetadata(
        [{"id": 7, "name": "thing", "isthing": 1}, {"id": 9, "name": "stuff", "isthing": 0}]
    )
    results = summarize_pq(stats, metadata)
    assert results["PQ_th"] == pytest.approx(100 * 0.75 / 1.5)
    assert results["SQ_th"] == pytest.approx(75.0) and results["RQ_th"] == pytest.approx(100 * 1 / 1.5)
    assert results["PQ_st"] == 0.0 and results["N_st"] == 1
    assert results["PQ"] == pytest.approx(25.0) and results["N"] == 2
    assert results["per_class"]["thing"] == {
        "category_id": 7, "PQ": pytest.approx(50.0), "SQ": 75.0, "RQ": pytest.approx(200 / 3), "TP": 1, "FP": 1, "FN": 0
    }  # fmt: skip


def test_categories_sharing_a_name_keep_their_own_results():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 0, 0]])
    stats = image_pq_stats(
        gt, [{"id": 1, "category": 0}, {"id": 2, "category": 1}], pred, [{"id": 1, "category": 0}], 2
    )
    metadata = DatasetMetadata(
        [{"id": 7, "name": "car", "isthing": 1}, {"id": 9, "name": "car", "isthing": 1}]
    )
    per_class = summarize_pq(stats, metadata)["per_class"]
    assert set(per_class) == {"car (7)", "car (9)"}
    assert (per_class["car (7)"]["category_id"], per_class["car (7)"]["PQ"], per_class["car (7)"]["TP"]) == (
        7,
        100.0,
        1,
    )
    assert (per_class["car (9)"]["category_id"], per_class["car (9)"]["PQ"], per_class["car (9)"]["FN"]) == (
        9,
        0.0,
        1,
    )


def test_iou_of_exactly_half_is_not_a_match():
    gt = np.array([[1, 1, 1, 1]])
    pred = np.array([[2, 2, 3, 3]])
    stats = image_pq_stats(
        gt, [{"id": 1, "category": 0}], pred, [{"id": 2, "category": 0}, {"id": 3, "category": 0}], 1
    )
    assert _stats_tuple(stats, 0) == (0.0, 0, 2, 1)


def test_crowd_regions():
    # gt: crowd region of category 0 (id 9) and a normal segment of category 0 (id 1).
    gt = np.array([[9, 9, 9, 9, 1, 1], [9, 9, 9, 9, 1, 1]])
    gt_segments = [{"id": 9, "category": 0, "iscrowd": 1}, {"id": 1, "category": 0, "iscrowd": 0}]
    # P1 (category 0) mostly on the crowd -> ignored; P2 (category 1) on the crowd -> false positive;
    # P3 (category 0) matches the normal segment exactly.
    pred = np.array([[4, 4, 4, 5, 6, 6], [4, 4, 4, 5, 6, 6]])
    pred_segments = [{"id": 4, "category": 0}, {"id": 5, "category": 1}, {"id": 6, "category": 0}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments, 2)
    assert _stats_tuple(stats, 0) == (1.0, 1, 0, 0)  # the crowd itself is neither matched nor missed
    assert _stats_tuple(stats, 1) == (0.0, 0, 1, 0)


def test_inconsistent_predictions_raise():
    gt = np.array([[1, 1]])
    segments = [{"id": 1, "category": 0}]
    with pytest.raises(ValueError, match="segment id 3 is in the predicted map"):
        image_pq_stats(gt, segments, np.array([[1, 3]]), segments, 1, image_id=12)
    with pytest.raises(ValueError, match="image 12: segment id 2 is in segments_info"):
        image_pq_stats(
            gt, segments, np.array([[1, 1]]), [*segments, {"id": 2, "category": 0}], 1, image_id=12
        )
    with pytest.raises(ValueError, match="size"):
        image_pq_stats(gt, segments, np.array([[1]]), segments, 1)
    with pytest.raises(ValueError, match="unknown category"):
        image_pq_stats(gt, segments, gt, [{"id": 1, "category": 4}], 1)
    # Ground-truth categories were not checked: -1 counted as the last category, 1 raised numpy's IndexError.
    for category in (-1, 1):
        with pytest.raises(ValueError, match=f"ground-truth segment id 1 has unknown category {category}"):
            image_pq_stats(gt, [{"id": 1, "category": category}], gt, segments, 1, image_id=12)
    # An id listed twice: said "not in the predicted map" of a predicted one, and gave an extra false
    # negative for a ground-truth one.
    for kind, gt_list, pred_list in (
        ("predicted", segments, segments * 2),
        ("ground-truth", segments * 2, segments),
    ):
        with pytest.raises(ValueError, match=f"image 12: {kind} segment id 1 is listed twice"):
            image_pq_stats(gt, gt_list, gt, pred_list, 1, image_id=12)


def _perturb(ids, segments, categories, rng):
    """A prediction from ground truth: shifted, dropped, relabelled, merged segments and spurious blobs."""
    pred = ids.copy()
    info = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
    for s in list(info):
        mask = pred == s["id"]
        action = rng.integers(6)
        if action == 0:
            pred[mask] = 0
            info.remove(s)
        elif action == 1:
            shifted = np.roll(mask, int(rng.integers(-8, 9)), axis=int(rng.integers(2)))
            pred[mask] = 0
            pred[shifted] = s["id"]
        elif action == 2:
            s["category_id"] = int(rng.choice(categories))
        elif action == 3:
            eroded = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 1)
            pred[mask & ~eroded] = 0
    y, x = rng.integers(0, ids.shape[0] - 12, size=2)
    blob_id = int(rng.integers(1, 256**3))
    while blob_id in {s["id"] for s in info}:
        blob_id = int(rng.integers(1, 256**3))
    pred[y : y + 12, x : x + 12] = blob_id
    info.append({"id": blob_id, "category_id": int(rng.choice(categories))})
    present = set(np.unique(pred).tolist())
    return pred, [s for s in info if s["id"] in present]


def _ground_truth_with_void_and_crowd(root, out):
    """Copy of the val ground truth where some segments became void or crowd (areas recounted)."""
    with open(os.path.join(root, "annotations", "panoptic_val2017.json")) as f:
        data = json.load(f)
    rng = np.random.default_rng(11)
    os.makedirs(os.path.join(out, "gt"))
    for annotation in data["annotations"]:
        ids = read_panoptic_png(
            os.path.join(root, "annotations", "panoptic_val2017", annotation["file_name"])
        )
        kept = []
        for segment in annotation["segments_info"]:
            choice = rng.integers(5)
            if choice == 0 and len(annotation["segments_info"]) > 2:
                ids[ids == segment["id"]] = 0
                continue
            segment["iscrowd"] = int(choice == 1)
            kept.append(segment)
        for segment in kept:
            segment["area"] = int((ids == segment["id"]).sum())
        annotation["segments_info"] = kept
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(out, "gt", annotation["file_name"]))
    gt_json = os.path.join(out, "gt.json")
    with open(gt_json, "w") as f:
        json.dump(data, f)
    return gt_json, data


def test_matches_official_pq_compute(synthetic_root, tmp_path):
    gt_json, gt_data = _ground_truth_with_void_and_crowd(synthetic_root, str(tmp_path))
    categories = [c["id"] for c in gt_data["categories"]]
    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / "pred")
    predictions = []
    metadata = DatasetMetadata(
        gt_data["categories"], panoptic_json=gt_json, panoptic_root=str(tmp_path / "gt")
    )
    evaluator = PanopticEvaluator(metadata)
    for annotation in gt_data["annotations"]:
        ids = read_panoptic_png(os.path.join(tmp_path, "gt", annotation["file_name"]))
        pred, info = _perturb(ids, annotation["segments_info"], categories, rng)
        Image.fromarray(id_to_rgb(pred)).save(tmp_path / "pred" / annotation["file_name"])
        predictions.append(
            {"image_id": annotation["image_id"], "file_name": annotation["file_name"], "segments_info": info}
        )
        contiguous = [
            {"id": s["id"], "category_id": metadata.category_id_to_contiguous[s["category_id"]]} for s in info
        ]
        evaluator.update(annotation["image_id"], pred.astype(np.int32), contiguous)
    pred_json = str(tmp_path / "pred.json")
    with open(pred_json, "w") as f:
        json.dump({"annotations": predictions}, f)

    official = pq_compute(gt_json, pred_json, str(tmp_path / "gt"), str(tmp_path / "pred"))
    ours_files = evaluate_panoptic_files(gt_json, pred_json, str(tmp_path / "gt"), str(tmp_path / "pred"))
    ours_pool = evaluate_panoptic_files(
        gt_json, pred_json, str(tmp_path / "gt"), str(tmp_path / "pred"), num_workers=2
    )
    ours_online = evaluator.compute()
    assert 10 < official["All"]["pq"] * 100 < 90  # the perturbations leave a non-trivial score
    for ours in (ours_files, ours_pool, ours_online):
        for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("pq", "sq", "rq"):
                assert ours[metric.upper() + suffix] == pytest.approx(100 * official[name][metric], abs=1e-9)
            assert ours["N" + suffix] == official[name]["n"]
        for category in gt_data["categories"]:
            expected = official["per_class"][category["id"]]
            got = ours["per_class"][category["name"]]
            assert got["PQ"] == pytest.approx(100 * expected["pq"], abs=1e-9)
            assert got["SQ"] == pytest.approx(100 * expected["sq"], abs=1e-9)


def test_evaluator_pool_equals_serial_and_checks_input(synthetic_root, tmp_path):
    from m2f.data import CocoPanopticDataset

    metadata = CocoPanopticDataset(synthetic_root, "val").metadata
    with open(metadata.panoptic_json) as f:
        data = json.load(f)
    serial, pooled = PanopticEvaluator(metadata), PanopticEvaluator(metadata, num_workers=2)
    rng = np.random.default_rng(0)
    for annotation in data["annotations"]:
        ids = read_panoptic_png(os.path.join(metadata.panoptic_root, annotation["file_name"]))
        pred, info = _perturb(ids, annotation["segments_info"], metadata.contiguous_to_category_id, rng)
        info = [
            {"id": s["id"], "category_id": metadata.category_id_to_contiguous[s["category_id"]]} for s in info
        ]
        serial.update(annotation["image_id"], pred, info)
        pooled.update(annotation["image_id"], pred, info)
    assert serial.compute() == pooled.compute()
    assert serial.compute()["num_images"] == len(data["annotations"])
    with pytest.raises(ValueError, match="already evaluated"):
        serial.update(data["annotations"][0]["image_id"], pred, info)
    with pytest.raises(ValueError, match="not in"):
        serial.update(-5, pred, info)
    with pytest.raises(ValueError, match="were already evaluated"):  # merging a state twice counted it twice
        serial.merge_state(pooled.get_state())


def test_a_state_of_another_category_count_is_refused(synthetic_root):
    """Stats of one category were broadcast over every category of the evaluator."""
    from m2f.data import CocoPanopticDataset

    metadata = CocoPanopticDataset(synthetic_root, "val").metadata
    evaluator = PanopticEvaluator(metadata)
    state = {"stats": {"iou": [0.9], "tp": [1], "fp": [0], "fn": [0]}, "image_ids": [123]}
    with pytest.raises(ValueError, match=f"cannot be added to stats of {metadata.num_classes} categories"):
        evaluator.merge_state(state)
    assert evaluator.get_state() == PanopticEvaluator(metadata).get_state()


def test_a_refused_prediction_leaves_no_trace_in_the_evaluator(synthetic_root):
    """The image was recorded before its prediction was checked: the corrected retry was refused as
    "already evaluated" and the image counted with nothing in it."""
    from m2f.data import CocoPanopticDataset

    metadata = CocoPanopticDataset(synthetic_root, "val").metadata
    with open(metadata.panoptic_json) as f:
        annotation = json.load(f)["annotations"][0]
    ids = read_panoptic_png(os.path.join(metadata.panoptic_root, annotation["file_name"]))
    info = [
        {"id": s["id"], "category_id": metadata.category_id_to_contiguous[s["category_id"]]}
        for s in annotation["segments_info"]
    ]
    evaluator = PanopticEvaluator(metadata)
    with pytest.raises(ValueError, match="is in the predicted map but not in segments_info"):
        evaluator.update(annotation["image_id"], ids, info[1:])
    evaluator.update(annotation["image_id"], ids, info)
    results = evaluator.compute()
    assert results["num_images"] == 1 and results["PQ"] == pytest.approx(100.0)


def _official_and_ours(tmp_path, categories, images):
    """panopticapi's pq_compute and evaluate_panoptic_files on images [(gt ids, gt segments_info, pred ids,
    pred segments_info)] written as COCO panoptic PNGs and JSON (category ids as in `categories`)."""
    gt_annotations, pred_annotations = [], []
    for folder in ("gt", "pred"):
        os.makedirs(tmp_path / folder)
    for image_id, (gt, gt_info, pred, pred_info) in enumerate(images, start=1):
        file_name = f"{image_id}.png"
        gt_info = [dict(s, area=int((gt == s["id"]).sum())) for s in gt_info]  # panopticapi reads it
        Image.fromarray(id_to_rgb(gt)).save(tmp_path / "gt" / file_name)
        Image.fromarray(id_to_rgb(pred)).save(tmp_path / "pred" / file_name)
        gt_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": gt_info})
        pred_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": pred_info})
    gt_json, pred_json = str(tmp_path / "gt.json"), str(tmp_path / "pred.json")
    with open(gt_json, "w") as f:
        json.dump({"categories": categories, "annotations": gt_annotations}, f)
    with open(pred_json, "w") as f:
        json.dump({"annotations": pred_annotations}, f)
    folders = (str(tmp_path / "gt"), str(tmp_path / "pred"))
    return pq_compute(gt_json, pred_json, *folders), evaluate_panoptic_files(gt_json, pred_json, *folders)


def _assert_same_as_official(official, ours):
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            assert ours[metric.upper() + suffix] == pytest.approx(100 * official[name][metric], abs=1e-9)
        assert ours["N" + suffix] == official[name]["n"]


THING_STUFF_THING = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "s", "isthing": 0},
    {"id": 3, "name": "b", "isthing": 1},
]


def test_a_category_with_only_false_positives_counts_in_the_mean(tmp_path):
    """Category b is absent from the ground truth but predicted: TP 0, FP 1, FN 0 counts (panopticapi counts a
    category when TP + FP + FN > 0) with PQ 0; counting only TP + FN > 0 left it out and raised PQ to 87.5."""
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]])
    pred = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]])  # b (id 3) takes 2 of the 8 pixels of s
    gt_segments = [{"id": 1, "category": 0}, {"id": 2, "category": 1}]
    pred_segments = [{"id": 1, "category": 0}, {"id": 2, "category": 1}, {"id": 3, "category": 2}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments, 3)
    assert _stats_tuple(stats, 0) == (1.0, 1, 0, 0)
    assert _stats_tuple(stats, 1) == (0.75, 1, 0, 0)  # IoU 6 / 8
    assert _stats_tuple(stats, 2) == (0.0, 0, 1, 0)
    results = summarize_pq(stats, DatasetMetadata(THING_STUFF_THING))
    assert results["N"] == 3 and results["N_th"] == 2 and results["N_st"] == 1
    assert results["PQ"] == pytest.approx(100 * (1 + 0.75 + 0) / 3)
    assert results["PQ_th"] == pytest.approx(50.0) and results["RQ_th"] == pytest.approx(50.0)
    assert results["per_class"]["b"]["PQ"] == 0.0 and results["per_class"]["b"]["FP"] == 1

    gt_info = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]
    pred_info = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 3}]
    official, ours = _official_and_ours(tmp_path, THING_STUFF_THING, [(gt, gt_info, pred, pred_info)])
    assert official["All"]["n"] == 3
    _assert_same_as_official(official, ours)


def test_the_last_crowd_segment_of_a_category_is_the_one_used(tmp_path):
    """Two crowd segments of category a (ids 8 then 9): like panopticapi (a dict from category to crowd
    segment, the later one overwriting), only the last listed one (9) excuses a prediction of a. A prediction
    on crowd 9 is ignored; one on crowd 8 is a false positive."""
    gt = np.array([[8, 8, 8, 8, 9, 9, 9, 9, 1, 1, 2, 2]])
    gt_segments = [
        {"id": 8, "category": 0, "iscrowd": 1},
        {"id": 9, "category": 0, "iscrowd": 1},
        {"id": 1, "category": 0, "iscrowd": 0},
        {"id": 2, "category": 1, "iscrowd": 0},
    ]
    on_second = np.array([[0, 0, 0, 0, 5, 5, 5, 5, 1, 1, 2, 2]])
    on_first = np.array([[5, 5, 5, 5, 0, 0, 0, 0, 1, 1, 2, 2]])
    pred_segments = [{"id": 5, "category": 0}, {"id": 1, "category": 0}, {"id": 2, "category": 1}]
    stats = image_pq_stats(gt, gt_segments, on_second, pred_segments, 2)
    assert _stats_tuple(stats, 0) == (1.0, 1, 0, 0)  # ignored; the crowds are neither matched nor missed
    stats = image_pq_stats(gt, gt_segments, on_first, pred_segments, 2)
    assert _stats_tuple(stats, 0) == (1.0, 1, 1, 0)  # crowd 8 does not excuse it
    assert _stats_tuple(stats, 1) == (1.0, 1, 0, 0)

    gt_info = [
        {"id": 8, "category_id": 1, "iscrowd": 1},
        {"id": 9, "category_id": 1, "iscrowd": 1},
        {"id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 2, "category_id": 2, "iscrowd": 0},
    ]
    pred_info = [{"id": 5, "category_id": 1}, {"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}]
    for pred, things_pq in ((on_second, 1.0), (on_first, 1 / 1.5)):
        folder = tmp_path / ("second" if pred is on_second else "first")
        official, ours = _official_and_ours(folder, THING_STUFF_THING[:2], [(gt, gt_info, pred, pred_info)])
        assert official["Things"]["pq"] == pytest.approx(things_pq)
        _assert_same_as_official(official, ours)


def test_a_prediction_exactly_half_on_void_and_crowd_is_a_false_positive(tmp_path):
    """panopticapi ignores an unmatched prediction only when MORE than half of it lies on void plus the crowd
    of its category. P (category a, 4 pixels): 1 on void, 1 on a's crowd, 2 on the stuff segment -> 2 / 4 =
    0.5 -> a false positive."""
    gt = np.array([[1, 1, 1, 1, 0, 9, 2, 2, 2, 2, 2, 2]])
    gt_segments = [
        {"id": 1, "category": 0, "iscrowd": 0},
        {"id": 9, "category": 0, "iscrowd": 1},
        {"id": 2, "category": 1, "iscrowd": 0},
    ]
    pred = np.array([[1, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2]])
    pred_segments = [{"id": 1, "category": 0}, {"id": 5, "category": 0}, {"id": 2, "category": 1}]
    stats = image_pq_stats(gt, gt_segments, pred, pred_segments, 2)
    assert _stats_tuple(stats, 0) == (1.0, 1, 1, 0)
    # The stuff segment: 4 of its 6 pixels predicted, IoU 4 / 6 -> matched.
    assert stats.tp[1] == 1 and stats.iou[1] == pytest.approx(4 / 6) and stats.fp[1] == stats.fn[1] == 0

    gt_info = [
        {"id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 9, "category_id": 1, "iscrowd": 1},
        {"id": 2, "category_id": 2, "iscrowd": 0},
    ]
    pred_info = [{"id": 1, "category_id": 1}, {"id": 5, "category_id": 1}, {"id": 2, "category_id": 2}]
    official, ours = _official_and_ours(tmp_path, THING_STUFF_THING[:2], [(gt, gt_info, pred, pred_info)])
    assert official["Things"]["pq"] == pytest.approx(1 / 1.5)
    _assert_same_as_official(official, ours)


def test_a_category_without_isthing_is_a_thing():
    """DatasetMetadata takes a category without "isthing" as a thing (as COCO instance JSONs leave it out);
    the PQ split must agree: it goes to Things, not Stuff."""
    metadata = DatasetMetadata([{"id": 1, "name": "plain"}, {"id": 2, "name": "s", "isthing": 0}])
    assert metadata.thing_classes == {0}
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 0, 0]])
    stats = image_pq_stats(
        gt, [{"id": 1, "category": 0}, {"id": 2, "category": 1}], pred, [{"id": 1, "category": 0}], 2
    )
    results = summarize_pq(stats, metadata)
    assert (results["N_th"], results["PQ_th"]) == (1, 100.0)
    assert (results["N_st"], results["PQ_st"]) == (1, 0.0)

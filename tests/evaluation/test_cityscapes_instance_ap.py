"""CityscapesInstanceEvaluator: the same AP as cityscapesscripts' evaluation run on files of the predictions,
each prediction counted with its image, class and score against the raw instance id maps (groups and void
ignored as the benchmark does)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.data import DatasetMetadata, cityscapes_thing_categories
from m2f.evaluation import CityscapesInstanceEvaluator, format_table

PERSON, CAR = 0, 2  # classes of the 8 thing categories


def scene() -> np.ndarray:
    """A 40 x 40 instance id map: two cars and a person of 120 pixels, a group of cars, road and void."""
    ids = np.full((40, 40), 7, dtype=np.uint16)
    ids[0:10, 0:12] = 26000
    ids[20:30, 0:12] = 26001
    ids[0:10, 20:32] = 24000
    ids[30:40, 20:40] = 26  # a group of cars
    ids[12:18, 30:40] = 0  # void
    return ids


@pytest.fixture
def ground_truth(tmp_path):
    """{image_id: id map path} of two images, the second with the objects mirrored left-right."""
    paths = {}
    for image_id, ids in (("aachen_000000_000000", scene()), ("aachen_000000_000001", scene()[:, ::-1])):
        paths[image_id] = str(tmp_path / f"{image_id}_gtFine_instanceIds.png")
        Image.fromarray(np.ascontiguousarray(ids)).save(paths[image_id])
    return paths


def evaluator(paths) -> CityscapesInstanceEvaluator:
    return CityscapesInstanceEvaluator(DatasetMetadata(cityscapes_thing_categories()), paths)


def objects(path) -> dict:
    """The image's objects as an instances dict (masks, scores 0.9, labels)."""
    ids = np.asarray(Image.open(path)).astype(np.int64)
    values = [v for v in np.unique(ids).tolist() if v >= 1000]
    labels = [PERSON if v // 1000 == 24 else CAR for v in values]
    return {
        "masks": torch.from_numpy(np.stack([ids == v for v in values])),
        "scores": torch.full((len(values),), 0.9),
        "labels": torch.tensor(labels),
    }


def with_extra(instances: dict, mask: np.ndarray, score: float, label: int) -> dict:
    return {
        "masks": torch.cat([instances["masks"], torch.from_numpy(mask)[None]]),
        "scores": torch.cat([instances["scores"], torch.tensor([score])]),
        "labels": torch.cat([instances["labels"], torch.tensor([label])]),
    }


def test_ground_truth_objects_score_100(ground_truth):
    metric = evaluator(ground_truth)
    for image_id, path in ground_truth.items():
        metric.update(image_id, objects(path))
    results = metric.compute()
    assert results["segm"] == {"AP": 100.0, "AP50": 100.0, "per_class": {"person": 100.0, "car": 100.0}}
    assert results["num_images"] == 2 and results["benchmark"] == "cityscapes"
    table = format_table(results)
    assert "Cityscapes AP" in table and "100.000" in table and "AP75" not in table


def test_each_image_is_compared_with_its_own_map(ground_truth):
    first, second = ground_truth
    metric = evaluator(ground_truth)
    metric.update(first, objects(ground_truth[second]))  # the mirrored objects miss the first image's
    metric.update(second, objects(ground_truth[first]))
    assert metric.compute()["segm"]["AP"] == 0.0


def test_score_order_reaches_the_evaluation(ground_truth):
    """A false positive (a car on the road) costs nothing ranked below every true object, and precision ranked
    above them."""
    image_id = next(iter(ground_truth))
    road = np.zeros((40, 40), dtype=bool)
    road[12:22, 14:26] = True
    aps = []
    for score in (0.1, 0.99):
        metric = evaluator({image_id: ground_truth[image_id]})
        metric.update(image_id, with_extra(objects(ground_truth[image_id]), road, score, CAR))
        aps.append(metric.compute()["segm"]["per_class"])
    assert aps[0] == {"person": 100.0, "car": 100.0}
    assert aps[1]["person"] == 100.0 and aps[1]["car"] < 100.0


@pytest.mark.parametrize("region", ["group", "void"])
def test_predictions_on_groups_and_void_are_no_false_positives(ground_truth, region):
    image_id = next(iter(ground_truth))
    ignored = np.asarray(Image.open(ground_truth[image_id])) == (26 if region == "group" else 0)
    metric = evaluator({image_id: ground_truth[image_id]})
    metric.update(image_id, with_extra(objects(ground_truth[image_id]), ignored, 0.99, CAR))
    assert metric.compute()["segm"]["per_class"]["car"] == 100.0


def test_wrong_class_finds_nothing(ground_truth):
    """Riders where persons and cars are: those classes score 0; rider, without ground truth, has no AP."""
    image_id = next(iter(ground_truth))
    instances = objects(ground_truth[image_id])
    instances["labels"] = torch.full_like(instances["labels"], 1)  # rider
    metric = evaluator({image_id: ground_truth[image_id]})
    metric.update(image_id, instances)
    per_class = metric.compute()["segm"]["per_class"]
    assert per_class == {"person": 0.0, "car": 0.0}


def test_states_merge_as_one_evaluation(ground_truth):
    first, second = ground_truth
    road = np.zeros((40, 40), dtype=bool)
    road[12:22, 14:26] = True
    predictions = {
        first: with_extra(objects(ground_truth[first]), road, 0.95, CAR),
        second: objects(ground_truth[second]),
    }
    whole = evaluator(ground_truth)
    merged = evaluator(ground_truth)
    for image_id, instances in predictions.items():
        whole.update(image_id, instances)
        part = evaluator(ground_truth)
        part.update(image_id, instances)
        merged.merge_state(json.loads(json.dumps(part.get_state())))
    assert merged.compute() == whole.compute()
    with pytest.raises(ValueError, match="already evaluated"):
        merged.merge_state(json.loads(json.dumps(part.get_state())))
    with pytest.raises(ValueError, match=r"state\['images'\] must map image ids to their objects"):
        evaluator(ground_truth).merge_state({"images": {first: {"objects": []}}})


def test_bad_input_is_named(ground_truth):
    first = next(iter(ground_truth))
    metric = evaluator(ground_truth)
    good = objects(ground_truth[first])
    with pytest.raises(ValueError, match="image_id frankfurt_1 is not in the ground truth"):
        metric.update("frankfurt_1", good)
    with pytest.raises(ValueError, match=r"masks have size \(20, 40\), the image is \(40, 40\)"):
        metric.update(first, {**good, "masks": good["masks"][:, :20]})
    with pytest.raises(ValueError, match="masks must be bool"):
        metric.update(first, {**good, "masks": good["masks"].float()})
    with pytest.raises(ValueError, match=r"labels must be in \[0, 8\)"):
        metric.update(first, {**good, "labels": good["labels"] + 8})
    metric.update(first, good)
    with pytest.raises(ValueError, match="already evaluated"):
        metric.update(first, good)


def test_without_cityscapesscripts_the_error_says_what_to_install(ground_truth, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts.evaluation", None)
    with pytest.raises(ImportError, match="pip install cityscapesscripts"):
        evaluator(ground_truth)


def random_scene(rng) -> np.ndarray:
    """A 64 x 96 instance id map: road, two kinds of void, a caravan, groups of cars and persons, and 1-5 objects each of
    person, car and bicycle (some under 100 pixels), overlapping in random order."""
    ids = np.full((64, 96), 7, dtype=np.int64)
    ids[:, :8] = 0
    ids[:, 88:] = 5  # "dynamic": void too
    regions = [29000, 26, 24] + [
        label * 1000 + n for label in (24, 26, 33) for n in range(rng.integers(1, 6))
    ]
    for value in rng.permutation(regions):
        top, left = rng.integers(0, 56), rng.integers(0, 88)
        height, width = rng.integers(4, 30), rng.integers(4, 30)
        ids[top : top + height, left : left + width] = value
    return ids


def random_predictions(rng, ids: np.ndarray) -> dict:
    """Ground-truth objects grown, shrunk or moved, groups and void, random boxes; random classes of the 8
    for a quarter of them, distinct random scores."""
    masks, labels = [], []
    class_of = {24: 0, 26: 2, 29: 2, 33: 7, 0: 2, 5: 0}  # label id (void, caravans: car, person) -> class
    for value in [*np.unique(ids[ids >= 1000]).tolist(), 26, 24, 0, 5]:
        shifted = np.roll(ids == value, (rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1))
        masks.append(shifted)
        labels.append(class_of[value // 1000 if value >= 1000 else value])
    for _ in range(6):
        box = np.zeros_like(ids, dtype=bool)
        top, left = rng.integers(0, 56), rng.integers(0, 88)
        box[top : top + rng.integers(3, 25), left : left + rng.integers(3, 25)] = True
        masks.append(box)
        labels.append(int(rng.integers(0, 8)))
    labels = [int(rng.integers(0, 8)) if rng.random() < 0.25 else label for label in labels]
    masks.append(np.zeros_like(ids, dtype=bool))  # empty: skipped by both
    labels.append(0)
    return {
        "masks": torch.from_numpy(np.stack(masks)),
        "scores": torch.from_numpy(rng.permutation(len(masks)) / len(masks) + 0.01),
        "labels": torch.tensor(labels),
    }


THING_LABEL_IDS = [24, 25, 26, 27, 28, 31, 32, 33]


@pytest.mark.parametrize("seed", range(4))
def test_same_ap_as_cityscapesscripts_on_files(tmp_path, seed):
    """cityscapesscripts' evaluation of the predictions written as its files (mask PNGs and one list per image)
    gives the evaluator's AP, AP50 and per-class AP exactly."""
    import copy
    import os

    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as evaluation

    from m2f.engine.cityscapes_results import write_instance_files

    rng = np.random.default_rng(seed)
    paths, prediction_files = {}, []
    metric = None
    predictions = {}
    for number in range(3):
        image_id = f"aachen_000000_00000{number}"
        ids = random_scene(rng)
        paths[image_id] = str(tmp_path / f"{image_id}_gtFine_instanceIds.png")
        Image.fromarray(ids.astype(np.uint16)).save(paths[image_id])
        predictions[image_id] = random_predictions(rng, ids)
    metric = evaluator(paths)
    folder = tmp_path / "results"
    for image_id, instances in predictions.items():
        metric.update(image_id, instances)
        label_ids = [THING_LABEL_IDS[label] for label in instances["labels"].tolist()]
        rows = zip(instances["masks"].numpy(), label_ids, instances["scores"].tolist())
        prediction_files.append(write_instance_files(str(folder), image_id, rows))
    ours = metric.compute()["segm"]

    args = copy.deepcopy(evaluation.args)
    args.predictionPath, args.gtInstancesFile = str(folder), str(tmp_path / "gtInstances.json")
    args.JSONOutput, args.quiet = False, True
    working = os.getcwd()
    os.chdir(tmp_path)
    try:
        averages = evaluation.evaluateImgLists(prediction_files, list(paths.values()), args)["averages"]
    finally:
        os.chdir(working)
    assert ours["AP"] == pytest.approx(100 * averages["allAp"], abs=1e-9)
    assert ours["AP50"] == pytest.approx(100 * averages["allAp50%"], abs=1e-9)
    official = {name: 100 * v["ap"] for name, v in averages["classes"].items() if not np.isnan(v["ap"])}
    assert ours["per_class"] == pytest.approx(official, abs=1e-9)
    assert 0 < ours["AP"] < 100 and len(ours["per_class"]) >= 3

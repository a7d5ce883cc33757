import json
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from m2f.data import (
    SYNTHETIC_CATEGORIES,
    ADE20KDataset,
    CocoInstanceDataset,
    DatasetError,
    make_synthetic,
    make_synthetic_ade20k,
    validate_dataset,
)
from m2f.data import validate as validate_module


@pytest.fixture
def root(tmp_path):
    return make_synthetic(str(tmp_path), num_train=2, num_val=0, image_size=64, seed=0)


def _json_path(root, kind):
    return os.path.join(root, "annotations", f"{kind}_train2017.json")


def _edit_json(root, kind, edit):
    path = _json_path(root, kind)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return data


def _problems(root, task, **kwargs):
    with pytest.raises(DatasetError) as error:
        validate_dataset(root, "train", task, **kwargs)
    assert str(error.value).count("\n") >= len(error.value.problems[:50])
    return error.value


def test_clean_dataset_passes(root):
    assert validate_dataset(root, "train", "panoptic") == {
        "images": 2,
        "annotations": 2,
        "segments": _count_segments(root),
    }
    assert validate_dataset(root, "train", "instance")["images"] == 2


def _count_segments(root):
    with open(_json_path(root, "panoptic")) as f:
        return sum(len(a["segments_info"]) for a in json.load(f)["annotations"])


def test_unknown_category_is_named(root):
    def edit(data):
        data["annotations"][1]["segments_info"][0]["category_id"] = 999

    data = _edit_json(root, "panoptic", edit)
    segment = data["annotations"][1]["segments_info"][0]
    error = _problems(root, "panoptic")
    assert len(error.problems) == 1
    message = error.problems[0]
    assert "panoptic_train2017.json" in message and "unknown category_id 999" in message
    assert (
        f"image id {data['annotations'][1]['image_id']}" in message
        and f"segment id {segment['id']}" in message
    )
    assert message in str(error)


def test_missing_png_is_named(root):
    os.remove(os.path.join(root, "annotations", "panoptic_train2017", "000000000002.png"))
    (message,) = _problems(root, "panoptic").problems
    assert "panoptic_train2017/000000000002.png" in message and "missing panoptic PNG" in message
    assert "image id 2" in message


def test_missing_image_is_named_for_both_tasks(root):
    os.remove(os.path.join(root, "train2017", "000000000001.jpg"))
    for task in ("panoptic", "instance"):
        (message,) = _problems(root, task).problems
        assert (
            "train2017/000000000001.jpg" in message and "missing image" in message and "image id 1" in message
        )


def test_empty_segment_is_named(root):
    def edit(data):
        data["annotations"][0]["segments_info"][1]["area"] = 0

    data = _edit_json(root, "panoptic", edit)
    (message,) = _problems(root, "panoptic").problems
    assert (
        f"segment id {data['annotations'][0]['segments_info'][1]['id']}" in message
        and "empty segment" in message
    )


def test_segment_in_json_but_not_in_png_and_the_reverse(root, monkeypatch):
    removed = {}

    def edit(data):
        data["annotations"][0]["segments_info"].append(
            {"id": 4242, "category_id": 1, "area": 5, "iscrowd": 0}
        )
        removed.update(data["annotations"][1]["segments_info"].pop())

    _edit_json(root, "panoptic", edit)
    problems = _problems(root, "panoptic").problems
    assert len(problems) == 2
    assert "000000000001.png" in problems[0] and "segment id 4242 in JSON but not in PNG" in problems[0]
    assert "000000000002.png" in problems[1]
    assert f"segment id {removed['id']} in PNG but not in JSON" in problems[1]
    monkeypatch.setattr(validate_module, "PNGS_PER_WORKER", 1)  # two PNGs: checked by two processes
    assert _problems(root, "panoptic", num_workers=2).problems == problems
    assert validate_dataset(root, "train", "panoptic", check_files=False)["annotations"] == 2


def test_instance_problems_are_named(root):
    def edit(data):
        data["annotations"][0]["category_id"] = 77
        data["annotations"][1]["segmentation"] = []
        data["annotations"].append(dict(data["annotations"][2], id=500, image_id=31337))

    data = _edit_json(root, "instances", edit)
    problems = _problems(root, "instance").problems
    assert len(problems) == 3
    first, second = data["annotations"][0], data["annotations"][1]
    assert f"annotation id {first['id']} has unknown category_id 77" in problems[0]
    assert f"image id {second['image_id']}: annotation id {second['id']} is an empty segment" in problems[1]
    assert "image id 31337: annotation id 500 has an unknown image id" in problems[2]
    assert all("instances_train2017.json" in p for p in problems)
    # Without the content checks (training's), the empty segment is not rasterized, the rest still counts.
    quick = _problems(root, "instance", check_files=False).problems
    assert quick == [problems[0], problems[2]]


def test_semantic_problems_are_named(tmp_path):
    root = make_synthetic_ade20k(str(tmp_path), num_train=3, num_val=0, image_size=64)
    labels = os.path.join(root, "annotations", "training")
    os.remove(os.path.join(labels, "ADE_train_00000001.png"))
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(os.path.join(labels, "ADE_train_00000002.png"))
    problems = _problems(root, "semantic").problems
    assert len(problems) == 2
    assert "ADE_train_00000001.png" in problems[0] and "missing annotation" in problems[0]
    assert "ADE_train_00000002.png" in problems[1] and "unknown category 200" in problems[1]


def test_semantic_unreadable_and_multichannel_files_are_listed_with_the_others(tmp_path):
    """An empty image and an RGB / LA label PNG are problems of their own (the first stopped validation with
    PIL's error; the others passed, or showed the alpha channel as category 255), and the rest is still
    checked."""
    root = make_synthetic_ade20k(str(tmp_path), num_train=4, num_val=0, image_size=64)
    images, labels = os.path.join(root, "images", "training"), os.path.join(root, "annotations", "training")
    open(os.path.join(images, "ADE_train_00000001.jpg"), "wb").close()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.path.join(labels, "ADE_train_00000002.png"))
    Image.new("LA", (64, 64), (1, 255)).save(os.path.join(labels, "ADE_train_00000003.png"))
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(os.path.join(labels, "ADE_train_00000004.png"))
    problems = _problems(root, "semantic").problems
    assert len(problems) == 4
    assert "ADE_train_00000001.jpg: unreadable" in problems[0]
    assert "ADE_train_00000002.png: expected a single-channel label PNG, got shape (64, 64, 3)" in problems[1]
    assert "ADE_train_00000003.png: expected a single-channel label PNG, got shape (64, 64, 2)" in problems[2]
    assert "ADE_train_00000004.png" in problems[3] and "unknown category 200" in problems[3]


@pytest.mark.parametrize(
    "task, kind, edit, key",
    [
        ("panoptic", "panoptic", lambda data: data.pop("categories"), "'categories'"),
        (
            "panoptic",
            "panoptic",
            lambda data: data["annotations"][0]["segments_info"][0].pop("category_id"),
            "'category_id'",
        ),
        ("instance", "instances", lambda data: data.pop("images"), "'images'"),
    ],
)
def test_json_without_the_coco_keys_is_one_problem_naming_the_file(root, task, kind, edit, key):
    """A KeyError traceback before; now a DatasetError (a one-line CLI error) naming the JSON and the key."""
    _edit_json(root, kind, edit)
    (problem,) = _problems(root, task).problems
    assert (
        problem
        == f"{_json_path(root, kind)}: not a COCO {task} annotation file (a record lacks the key {key})"
    )


def test_bad_task_and_missing_json(root):
    with pytest.raises(ValueError, match="task"):
        validate_dataset(root, "train", "detection")
    with pytest.raises(DatasetError, match=r"panoptic_test2017\.json: file not found"):
        validate_dataset(root, "test", "panoptic")


def test_images_in_subfolders_are_found(root):
    """COCO file names may hold a folder; the loaders read them, so validation must find them."""
    os.makedirs(os.path.join(root, "train2017", "sub"))
    os.rename(
        os.path.join(root, "train2017", "000000000001.jpg"),
        os.path.join(root, "train2017", "sub", "000000000001.jpg"),
    )

    def edit(data):
        for image in data["images"]:
            if image["id"] == 1:
                image["file_name"] = "sub/000000000001.jpg"

    for kind, task in (("panoptic", "panoptic"), ("instances", "instance")):
        _edit_json(root, kind, edit)
        assert validate_dataset(root, "train", task)["images"] == 2
    assert CocoInstanceDataset(root, "train")[0]["file_name"] == "sub/000000000001.jpg"


def test_flat_polygon_is_named(root):
    def edit(data):
        data["annotations"][0]["segmentation"] = [2, 2, 10, 2, 10, 10]

    first = _edit_json(root, "instances", edit)["annotations"][0]
    (message,) = _problems(root, "instance", check_files=False).problems
    assert f"annotation id {first['id']}: segmentation must be a list of polygons" in message
    with pytest.raises(DatasetError, match=f"annotation id {first['id']}: segmentation must be"):
        CocoInstanceDataset(root, "train")


def test_semantic_images_are_checked_as_the_dataset_reads_them(tmp_path):
    """An upper-case .JPG is an image, and the size compared with the label map is the EXIF-rotated one."""
    root = make_synthetic_ade20k(str(tmp_path), num_train=2, num_val=0, image_size=64)
    images, labels = os.path.join(root, "images", "training"), os.path.join(root, "annotations", "training")
    os.rename(os.path.join(images, "ADE_train_00000001.jpg"), os.path.join(images, "ADE_train_00000001.JPG"))
    # Stored 23 wide and 17 high; orientation 6 (rotate 90 degrees) shows it 17 wide and 23 high.
    exif = Image.Exif()
    exif[ImageOps.ExifTags.Base.Orientation] = 6
    Image.new("RGB", (23, 17)).save(os.path.join(images, "ADE_train_00000002.jpg"), exif=exif)
    label_path = os.path.join(labels, "ADE_train_00000002.png")
    Image.new("L", (17, 23), 1).save(label_path)
    assert validate_dataset(root, "train", "semantic") == {"images": 2}
    assert [tuple(item["image"].shape) for item in ADE20KDataset(root, "train")] == [(3, 64, 64), (3, 23, 17)]
    Image.new("L", (23, 17), 1).save(label_path)
    (message,) = _problems(root, "semantic").problems
    assert "ADE_train_00000002.png: size (23, 17) differs from the image's (17, 23)" in message


def _truncate(path):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])


def test_unreadable_panoptic_png_is_listed_with_the_others(root):
    """A truncated panoptic PNG stopped validation with PIL's error, naming no file."""
    png = os.path.join(root, "annotations", "panoptic_train2017", "000000000001.png")
    _truncate(png)
    _edit_json(
        root, "panoptic", lambda data: data["annotations"][1]["segments_info"][0].update(category_id=77)
    )
    problems = _problems(root, "panoptic").problems
    assert len(problems) == 2
    assert "unknown category_id 77" in problems[0]
    assert problems[1].startswith(f"{png}: unreadable (") and problems[1].endswith("(image id 1)")


def test_unreadable_image_is_named_when_the_item_is_read(root):
    from m2f.data import CocoPanopticDataset

    image = os.path.join(root, "train2017", "000000000001.jpg")
    _truncate(image)
    for dataset in (CocoPanopticDataset(root, "train"), CocoInstanceDataset(root, "train")):
        with pytest.raises(DatasetError, match=f"{image}: unreadable"):
            dataset[0]


@pytest.mark.parametrize(
    "counts, message",
    [
        ([0, 5], "RLE runs cover 5 pixels, not 64 \\* 64"),
        ([0, 5000], "RLE runs cover 5000 pixels, not 64 \\* 64"),
        ("0`", "malformed RLE counts"),
    ],
)
def test_rle_whose_runs_do_not_cover_the_image_is_refused(root, counts, message):
    """pycocotools decoded an RLE covering 5 of 4,096 pixels into a mask whose rest was uninitialized
    memory, and one covering more failed with "Invalid RLE mask representation", naming nothing."""

    def edit(data):
        data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": counts}

    annotation = _edit_json(root, "instances", edit)["annotations"][0]
    problems = _problems(root, "instance", check_files=False).problems
    assert len(problems) == 1 and re.search(f"annotation id {annotation['id']}: {message}", problems[0])
    with pytest.raises(DatasetError, match=f"annotation id {annotation['id']}: {message}"):
        CocoInstanceDataset(root, "train")


def test_rle_runs_are_read_as_pycocotools_writes_them():
    """Compressed RLE strings of random masks: the runs decoded here rebuild the mask pycocotools encoded."""
    from pycocotools import mask as mask_utils

    from m2f.data.coco_instance import _compressed_runs, rle_problem

    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(n) for n in rng.integers(1, 80, 2))
        mask = np.asfortranarray(rng.random((height, width)) < rng.random())
        rle = mask_utils.encode(mask.astype(np.uint8))
        runs = _compressed_runs(rle["counts"])
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
        assert np.array_equal(flat.reshape(width, height).T, mask)
        assert rle_problem(rle, height, width) is None


def test_synthetic_ade20k_refuses_a_folder_with_files_it_would_not_write(tmp_path):
    """A second, smaller run into the same folder left the first run's extra scenes in the dataset."""
    root = make_synthetic_ade20k(str(tmp_path), num_train=3, num_val=1, image_size=32)
    assert make_synthetic_ade20k(str(tmp_path), num_train=3, num_val=1, image_size=32, seed=1) == root
    with pytest.raises(
        ValueError, match=r"images/training holds 1 ADE20K files besides the 2 .*ADE_train_00000003"
    ):
        make_synthetic_ade20k(str(tmp_path), num_train=2, num_val=1, image_size=32)
    assert len(ADE20KDataset(root, "train")) == 3


def test_semantic_values_are_checked_against_the_dataset_class_list(tmp_path):
    """With a classes.txt of 5 names, the synthetic labels' value 6 is unknown (labels are 0..5)."""
    root = make_synthetic_ade20k(str(tmp_path), num_train=3, num_val=0, image_size=64)
    assert validate_dataset(root, "train", "semantic") == {"images": 3}
    names = [category["name"] for category in SYNTHETIC_CATEGORIES]
    with open(os.path.join(root, "classes.txt"), "w") as file:
        file.write("\n".join(names[:5]))
    labels = os.path.join(root, "annotations", "training")
    with_six = sorted(
        name
        for name in os.listdir(labels)
        if 6 in np.unique(np.asarray(Image.open(os.path.join(labels, name))))
    )
    problems = _problems(root, "semantic").problems
    assert with_six and problems == [
        f"{os.path.join(labels, name)}: unknown category 6 (labels are 0..5)" for name in with_six
    ]

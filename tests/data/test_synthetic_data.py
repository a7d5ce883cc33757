import json
import os
import re

import numpy as np
import pytest
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO

from m2f.data import SYNTHETIC_CATEGORIES, make_synthetic, validate_dataset


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def _read_png_ids(path):
    return rgb2id(np.array(Image.open(path), dtype=np.uint32))


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    first = make_synthetic(str(tmp_path / "a"), num_train=3, num_val=2, image_size=64, seed=7)
    second = make_synthetic(str(tmp_path / "b"), num_train=3, num_val=2, image_size=64, seed=7)
    other = make_synthetic(str(tmp_path / "c"), num_train=3, num_val=2, image_size=64, seed=8)
    files = _all_files(first)
    assert files == _all_files(second) == _all_files(other)
    assert len(files) == 4 + 2 * 5  # 4 JSON, a JPEG and a PNG per image
    assert not any(os.path.basename(f).startswith(".tmp-") for f in files)
    for name in files:
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(first, files[-1]), "rb") as a, open(os.path.join(other, files[-1]), "rb") as c:
        assert a.read() != c.read()


def test_png_ids_match_the_panoptic_json(synthetic_root):
    for split in ("train", "val"):
        with open(os.path.join(synthetic_root, "annotations", f"panoptic_{split}2017.json")) as f:
            data = json.load(f)
        categories = {c["id"]: c for c in data["categories"]}
        assert {c["id"] for c in SYNTHETIC_CATEGORIES} == set(categories)
        images = {image["id"]: image for image in data["images"]}
        assert len(data["annotations"]) == len(images)
        for annotation in data["annotations"]:
            image = images[annotation["image_id"]]
            ids = _read_png_ids(
                os.path.join(synthetic_root, "annotations", f"panoptic_{split}2017", annotation["file_name"])
            )
            assert ids.shape == (image["height"], image["width"])
            jpeg = Image.open(os.path.join(synthetic_root, f"{split}2017", image["file_name"]))
            assert jpeg.size == (image["width"], image["height"])
            present = set(np.unique(ids).tolist()) - {0}
            segments = {s["id"]: s for s in annotation["segments_info"]}
            assert present == set(segments)
            for segment_id, segment in segments.items():
                mask = ids == segment_id
                assert segment["area"] == mask.sum()
                ys, xs = np.nonzero(mask)
                assert segment["bbox"] == [
                    xs.min(),
                    ys.min(),
                    xs.max() - xs.min() + 1,
                    ys.max() - ys.min() + 1,
                ]
                assert segment["category_id"] in categories
            kinds = [categories[s["category_id"]]["isthing"] for s in annotation["segments_info"]]
            assert 2 <= kinds.count(0) <= 3


def test_instance_annotations_equal_the_panoptic_thing_segments(synthetic_root):
    formats = set()
    for split in ("train", "val"):
        annotations = os.path.join(synthetic_root, "annotations")
        coco = COCO(os.path.join(annotations, f"instances_{split}2017.json"))
        with open(os.path.join(annotations, f"panoptic_{split}2017.json")) as f:
            panoptic = json.load(f)
        for annotation in panoptic["annotations"]:
            ids = _read_png_ids(os.path.join(annotations, f"panoptic_{split}2017", annotation["file_name"]))
            things = [s for s in annotation["segments_info"] if s["category_id"] in coco.cats]
            instances = coco.loadAnns(coco.getAnnIds(imgIds=[annotation["image_id"]]))
            assert len(instances) == len(things)
            for instance in instances:
                formats.add(type(instance["segmentation"]).__name__)
                mask = coco.annToMask(instance).astype(bool)
                matches = [s for s in things if np.array_equal(ids == s["id"], mask)]
                assert len(matches) == 1
                assert matches[0]["category_id"] == instance["category_id"]
                assert instance["area"] == mask.sum()
    assert formats == {"list", "dict"}  # both polygons and RLE occur


def test_synthetic_dataset_passes_validation(synthetic_root):
    assert validate_dataset(synthetic_root, "train", "panoptic")["images"] == 6
    assert validate_dataset(synthetic_root, "val", "instance")["images"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": -1}, "num_train must be a non-negative int, got -1"),
        ({"num_val": 1.5}, "num_val must be a non-negative int, got 1.5"),
        ({"num_train": True}, "num_train must be a non-negative int, got True"),
        ({"image_size": 8}, "image_size must be an int >= 32, got 8"),
        ({"image_size": "128"}, "image_size must be an int >= 32, got '128'"),
        ({"seed": -3}, "seed must be a non-negative int, got -3"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_synthetic(str(tmp_path), **kwargs)
    assert not any(tmp_path.iterdir())

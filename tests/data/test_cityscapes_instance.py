"""Cityscapes instance segmentation: CityscapesInstanceDataset reads the *_gtFine_instanceIds.png maps; its
items are checked against the panoptic files of the same synthetic scenes (which another code path writes and
CocoPanopticDataset reads) and against hand-made maps with groups and classes outside the 8."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.data import (
    CityscapesInstanceDataset,
    CocoPanopticDataset,
    DatasetError,
    SemanticAugmentation,
    make_synthetic_cityscapes,
    validate_dataset,
)

THING_NAMES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_cityscapes(
        str(tmp_path_factory.mktemp("cityscapes")), num_train=5, num_val=3, image_size=80
    )


def thing_segments(item, metadata) -> dict[tuple, int]:
    """{(category id, mask bytes): count} of an item's thing segments that the crop leaves pixels of."""
    segments = {}
    for label, mask in zip(item["labels"].tolist(), item["masks"]):
        category = metadata.categories[label]
        if category["isthing"] and mask.any():
            key = (category["id"], mask.numpy().tobytes())
            segments[key] = segments.get(key, 0) + 1
    return segments


def test_classes_ids_and_files(root):
    dataset = CityscapesInstanceDataset(root, "val")
    assert dataset.metadata.class_names == THING_NAMES
    assert dataset.metadata.contiguous_to_category_id == [24, 25, 26, 27, 28, 31, 32, 33]
    assert dataset.metadata.thing_classes == set(range(8))
    assert dataset.file_names == [
        "frankfurt/frankfurt_000000_000000_leftImg8bit.png",
        "frankfurt/frankfurt_000000_000002_leftImg8bit.png",
        "lindau/lindau_000000_000001_leftImg8bit.png",
    ]
    paths = dataset.annotation_paths()
    assert paths["lindau_000000_000001"] == os.path.join(
        root, "gtFine", "val", "lindau", "lindau_000000_000001_gtFine_instanceIds.png"
    )
    assert dataset[2]["image_id"] == "lindau_000000_000001"
    assert sorted(dataset.source_files()) == sorted(
        [os.path.join(dataset.image_root, name) for name in dataset.file_names] + list(paths.values())
    )


@pytest.mark.parametrize("transforms", [None, SemanticAugmentation((24, 48))], ids=["original", "crop"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_items_are_the_panoptic_things_of_the_same_scenes(root, split, transforms):
    instances = CityscapesInstanceDataset(root, split, transforms, seed=3)
    panoptic = CocoPanopticDataset(root, split, transforms, seed=3, layout="cityscapes")
    assert [record[1] for record in panoptic.records] == instances.file_names
    objects = 0
    for index in range(len(instances)):
        item, expected = instances[index], panoptic[index]
        assert item["image_id"] == expected["image_id"] and item["orig_size"] == expected["orig_size"]
        assert torch.equal(item["image"], expected["image"])
        assert item["masks"].dtype == torch.bool and item["masks"].flatten(1).any(1).all()
        assert thing_segments(item, instances.metadata) == thing_segments(expected, panoptic.metadata)
        objects += len(item["labels"])
    assert objects > 0


def write_scene(root, split: str, stem: str, ids: np.ndarray) -> None:
    city = stem.split("_")[0]
    image_folder = os.path.join(root, "leftImg8bit", split, city)
    label_folder = os.path.join(root, "gtFine", split, city)
    os.makedirs(image_folder, exist_ok=True)
    os.makedirs(label_folder, exist_ok=True)
    Image.fromarray(np.zeros((*ids.shape, 3), dtype=np.uint8)).save(
        os.path.join(image_folder, stem + "_leftImg8bit.png")
    )
    Image.fromarray(ids.astype(np.uint16)).save(os.path.join(label_folder, stem + "_gtFine_instanceIds.png"))


def test_groups_other_classes_and_stuff_are_no_targets(tmp_path):
    """26 is a group of cars, 29000 a caravan (an instance class the benchmark ignores), 7 road, 0 void."""
    ids = np.array(
        [
            [26000, 26000, 26, 26, 7],
            [26001, 24003, 29000, 0, 7],
            [33000, 33000, 33000, 24003, 24003],
        ]
    )
    write_scene(tmp_path, "train", "aachen_000000_000000", ids)
    write_scene(tmp_path, "train", "aachen_000000_000001", np.array([[7, 26, 0], [29000, 29001, 11]]))
    dataset = CityscapesInstanceDataset(str(tmp_path), "train")
    assert len(dataset) == 2
    item = dataset[0]
    expected = {
        ("car", ((0, 0), (0, 1))),
        ("car", ((1, 0),)),
        ("person", ((1, 1), (2, 3), (2, 4))),
        ("bicycle", ((2, 0), (2, 1), (2, 2))),
    }
    found = {
        (THING_NAMES[label], tuple(map(tuple, np.argwhere(mask.numpy()).tolist())))
        for label, mask in zip(item["labels"].tolist(), item["masks"])
    }
    assert found == expected and len(item["labels"]) == 4
    assert len(dataset[1]["labels"]) == 0
    kept = CityscapesInstanceDataset(str(tmp_path), "train", skip_empty=True)
    assert kept.file_names == ["aachen/aachen_000000_000000_leftImg8bit.png"]


def test_validation_names_the_files(root, tmp_path):
    assert validate_dataset(root, "train", "instance", layout="cityscapes") == {"images": 5}
    broken = tmp_path / "cityscapes"
    shutil.copytree(root, broken)
    labels = broken / "gtFine" / "val" / "frankfurt"
    missing = labels / "frankfurt_000000_000000_gtFine_instanceIds.png"
    missing.unlink()
    with pytest.raises(DatasetError) as error:
        CityscapesInstanceDataset(str(broken), "val")
    assert error.value.problems == [f"{missing}: missing instance id map"]
    assert "*_gtFine_instanceIds.png, part of the gtFine release" in str(error.value)
    (broken / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000000_leftImg8bit.png").unlink()
    bad = labels / "frankfurt_000000_000002_gtFine_instanceIds.png"
    Image.fromarray(np.array([[7, 34], [40001, 26000]], dtype=np.uint16)).save(bad)
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(broken), "val", "instance", layout="cityscapes")
    sizes = f"{bad}: size (2, 2) differs from the image's (80, 80)"
    unknown = "unknown value {} (label ids are 0..33, objects label id * 1000 + number)"
    assert error.value.problems == [sizes, f"{bad}: {unknown.format(34)}", f"{bad}: {unknown.format(40001)}"]

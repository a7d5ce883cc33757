"""Mapillary Vistas: the label maps read by MapillaryVistasDataset and the panoptic files read by
CocoPanopticDataset, checked against each other on the synthetic scenes (which two code paths write)."""

import os
import shutil

import numpy as np
import pytest
import torch
from item_maps import semantic_map
from PIL import Image

from m2f.data import (
    MAPILLARY_CLASSES,
    CocoPanopticDataset,
    DatasetError,
    MapillaryVistasDataset,
    SemanticAugmentation,
    coco_paths,
    make_synthetic_mapillary,
    validate_dataset,
)
from m2f.data.mapillary import read_mapillary_labels


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_mapillary(
        str(tmp_path_factory.mktemp("mapillary")), num_train=4, num_val=3, image_size=80
    )


def test_paths_and_classes(root):
    assert coco_paths(root, "val", "mapillary") == {
        "panoptic_json": os.path.join(root, "validation", "panoptic", "panoptic_2018.json"),
        "panoptic_root": os.path.join(root, "validation", "panoptic"),
        "image_root": os.path.join(root, "validation", "images"),
    }
    with pytest.raises(ValueError, match="split must be 'train' or 'val' for Mapillary Vistas, got 'test'"):
        coco_paths(root, "test", "mapillary")
    with pytest.raises(ValueError, match="Mapillary Vistas has no instance annotations"):
        validate_dataset(root, "val", "instance", layout="mapillary")
    semantic = MapillaryVistasDataset(root, "val")
    assert len(MAPILLARY_CLASSES) == semantic.metadata.num_classes == 65
    assert semantic.metadata.contiguous_to_category_id == list(range(1, 66))
    assert semantic.metadata.class_names[:3] == ["Bird", "Ground Animal", "Curb"]
    assert len(semantic.metadata.thing_classes) == 37 and 19 in semantic.metadata.thing_classes  # Person
    assert semantic.file_names == [f"synthetic_val_00000{n}.jpg" for n in range(3)]


@pytest.mark.parametrize("transforms", [None, SemanticAugmentation(32, base=64)], ids=["original", "crop"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_items_agree_with_the_label_maps(root, split, transforms):
    panoptic = CocoPanopticDataset(root, split, transforms, seed=2, layout="mapillary")
    semantic = MapillaryVistasDataset(root, split, transforms, seed=2)
    assert len(panoptic) == len(semantic) > 0
    assert panoptic.metadata.contiguous_to_category_id == semantic.metadata.contiguous_to_category_id
    assert panoptic.metadata.thing_classes == semantic.metadata.thing_classes
    for index in range(len(panoptic)):
        item, expected = panoptic[index], semantic[index]
        assert item["file_name"] == expected["file_name"] == f"{item['image_id']}.jpg"
        assert torch.equal(item["image"], expected["image"])
        np.testing.assert_array_equal(semantic_map(item), expected["sem_seg"].numpy())
        if transforms is None:
            np.testing.assert_array_equal(panoptic.load_semantic_gt(index), semantic.load_semantic_gt(index))


def test_crops_come_from_short_sides_of_twice_their_size():
    """Mask2Former's Mapillary Vistas crops are 1024 from short sides of 0.5-2 x 2048: base 2 crops."""
    augmentation = SemanticAugmentation(1024, base=2048)
    assert (
        augmentation.short_sizes == [int(k * 0.1 * 2048) for k in range(5, 21)]
        and augmentation.max_size == 8192
    )
    assert SemanticAugmentation(1024).short_sizes[-1] == 2048
    with pytest.raises(ValueError, match="base must be"):
        SemanticAugmentation(1024, base=0)


def test_unlabeled_and_unknown_values_are_ignored(tmp_path):
    Image.fromarray(np.array([[0, 64, 65, 66, 255]], dtype=np.uint8)).save(tmp_path / "labels.png")
    assert read_mapillary_labels(str(tmp_path / "labels.png")).tolist() == [[0, 64, 255, 255, 255]]


def test_validation_names_the_files(root, tmp_path):
    assert validate_dataset(root, "train", "semantic", layout="mapillary") == {"images": 4}
    assert validate_dataset(root, "val", "panoptic", layout="mapillary")["images"] == 3
    broken = tmp_path / "mapillary"
    shutil.copytree(root, broken)
    labels = broken / "validation" / "labels"
    (labels / "synthetic_val_000000.png").unlink()
    with pytest.raises(DatasetError) as error:
        MapillaryVistasDataset(str(broken), "val")
    assert error.value.problems == [f"{labels / 'synthetic_val_000000.png'}: missing label map"]
    (broken / "validation" / "images" / "synthetic_val_000000.jpg").unlink()
    Image.fromarray(np.full((80, 80), 70, dtype=np.uint8)).save(labels / "synthetic_val_000001.png")
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(broken), "val", "semantic", layout="mapillary")
    assert error.value.problems == [
        f"{labels / 'synthetic_val_000001.png'}: unknown label 70 (labels are 0..64, 65 unlabeled)"
    ]
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(broken), "val", "panoptic", layout="mapillary")
    image = broken / "validation" / "images" / "synthetic_val_000000.jpg"
    assert error.value.problems == [f"{image}: missing image file (image id synthetic_val_000000)"]

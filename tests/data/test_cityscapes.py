"""Cityscapes: the train id maps of createTrainIdLabelImgs.py read by CityscapesDataset, the panoptic files of
createPanopticImgs.py read by CocoPanopticDataset, both in city folders; checked against each other on the
synthetic scenes, which two code paths write."""

import os
import shutil

import numpy as np
import pytest
import torch
from item_maps import semantic_map
from PIL import Image

from m2f.data import (
    CITYSCAPES_CLASSES,
    CityscapesDataset,
    CocoPanopticDataset,
    DatasetError,
    SemanticAugmentation,
    coco_paths,
    make_synthetic_cityscapes,
    validate_dataset,
)
from m2f.data.cityscapes import read_train_ids


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_cityscapes(
        str(tmp_path_factory.mktemp("cityscapes")), num_train=5, num_val=3, image_size=80
    )


def test_paths_and_classes(root):
    assert coco_paths(root, "val", "cityscapes") == {
        "panoptic_json": os.path.join(root, "gtFine", "cityscapes_panoptic_val.json"),
        "panoptic_root": os.path.join(root, "gtFine", "cityscapes_panoptic_val"),
        "image_root": os.path.join(root, "leftImg8bit", "val"),
    }
    with pytest.raises(ValueError, match="split must be 'train' or 'val' for the Cityscapes layout"):
        coco_paths(root, "test", "cityscapes")
    semantic = CityscapesDataset(root, "val")
    # train ids are the contiguous classes, label ids the category ids; the eight classes from person on are things
    assert semantic.metadata.contiguous_to_category_id == [c[0] for c in CITYSCAPES_CLASSES]
    assert semantic.metadata.class_names[:3] == ["road", "sidewalk", "building"]
    assert semantic.metadata.thing_classes == set(range(11, 19))
    assert [name.split("/")[0] for name in semantic.file_names] == ["frankfurt", "frankfurt", "lindau"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_items_agree_with_the_train_id_maps(root, split):
    panoptic = CocoPanopticDataset(root, split, layout="cityscapes")
    semantic = CityscapesDataset(root, split)
    assert len(panoptic) == len(semantic) > 0
    assert panoptic.metadata.contiguous_to_category_id == semantic.metadata.contiguous_to_category_id
    assert panoptic.metadata.thing_classes == semantic.metadata.thing_classes
    position = {name: index for index, name in enumerate(semantic.file_names)}
    for index in range(len(panoptic)):
        item = panoptic[index]
        expected = semantic[position[item["file_name"]]]
        assert item["file_name"] == f"{item['image_id'].split('_')[0]}/{item['image_id']}_leftImg8bit.png"
        assert torch.equal(item["image"], expected["image"])
        np.testing.assert_array_equal(semantic_map(item), expected["sem_seg"].numpy())
        np.testing.assert_array_equal(
            panoptic.load_semantic_gt(index), semantic.load_semantic_gt(position[item["file_name"]])
        )


def test_crops_of_half_the_width_as_mask2former_takes_them(root):
    """Mask2Former's Cityscapes crops are 512 x 1024 from the short side resized to 0.5-2 x 1024; here
    (24, 48) from 0.5-2 x 48, the same on the panoptic and the semantic items."""
    augmentation = SemanticAugmentation((24, 48))
    assert augmentation.short_sizes == [48 * k // 10 for k in range(5, 21)] and augmentation.max_size == 192
    panoptic = CocoPanopticDataset(root, "train", augmentation, seed=1, layout="cityscapes")
    semantic = CityscapesDataset(root, "train", augmentation, seed=1)
    for index in range(len(panoptic)):
        assert panoptic.records[index][1] == semantic.file_names[index]  # both in the JSON's (sorted) order
        item, expected = panoptic[index], semantic[index]
        assert item["image"].shape == (3, 24, 48) and item["masks"].shape[1:] == (24, 48)
        assert torch.equal(item["image"], expected["image"])
        np.testing.assert_array_equal(semantic_map(item), expected["sem_seg"].numpy())


def test_train_ids_beyond_the_classes_are_ignored(tmp_path):
    Image.fromarray(np.array([[0, 18, 19, 33, 255]], dtype=np.uint8)).save(tmp_path / "ids.png")
    assert read_train_ids(str(tmp_path / "ids.png")).tolist() == [[0, 18, 255, 255, 255]]


def test_validation_names_the_files(root, tmp_path):
    assert validate_dataset(root, "train", "semantic", layout="cityscapes") == {"images": 5}
    assert validate_dataset(root, "val", "panoptic", layout="cityscapes")["images"] == 3
    broken = tmp_path / "cityscapes"
    shutil.copytree(root, broken)
    labels = broken / "gtFine" / "val" / "frankfurt"
    (labels / "frankfurt_000000_000000_gtFine_labelTrainIds.png").unlink()
    Image.fromarray(np.full((80, 80), 40, dtype=np.uint8)).save(
        labels / "frankfurt_000000_000002_gtFine_labelTrainIds.png"
    )
    with pytest.raises(DatasetError) as error:
        CityscapesDataset(str(broken), "val")
    assert (
        f"{labels / 'frankfurt_000000_000000_gtFine_labelTrainIds.png'}: missing train id map"
        in error.value.problems
    )
    (broken / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000000_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(broken), "val", "semantic", layout="cityscapes")
    assert error.value.problems == [
        f"{labels / 'frankfurt_000000_000002_gtFine_labelTrainIds.png'}: unknown train id 40 (train ids are 0..18, "
        "255 ignored)"
    ]
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(broken), "val", "panoptic", layout="cityscapes")
    image = broken / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000000_leftImg8bit.png"
    assert error.value.problems == [f"{image}: missing image file (image id frankfurt_000000_000000)"]

"""ADE20K's panoptic and instance sets in the files Mask2Former's preparation scripts write: read through the
COCO-format datasets, checked against the semantic label PNGs of the same scenes, which another code path
writes and ADE20KDataset reads."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from item_maps import semantic_map
from PIL import Image

from m2f.data import (
    ADE20KDataset,
    CocoInstanceDataset,
    CocoPanopticDataset,
    DatasetError,
    SemanticAugmentation,
    coco_paths,
    make_synthetic_ade20k,
    validate_dataset,
)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return make_synthetic_ade20k(str(tmp_path_factory.mktemp("ade")), num_train=5, num_val=3, image_size=80)


def test_paths_follow_mask2formers_preparation_and_accept_the_parent_folder(ade_root):
    parent = os.path.dirname(ade_root)
    for root in (ade_root, parent):
        paths = coco_paths(root, "val", "ade20k")
        assert paths == {
            "panoptic_json": os.path.join(ade_root, "ade20k_panoptic_val.json"),
            "panoptic_root": os.path.join(ade_root, "ade20k_panoptic_val"),
            "instances_json": os.path.join(ade_root, "ade20k_instance_val.json"),
            "image_root": os.path.join(ade_root, "images", "validation"),
        }
    with pytest.raises(ValueError, match="split must be 'train' or 'val' for the ADE20K layout"):
        coco_paths(ade_root, "test", "ade20k")
    with pytest.raises(ValueError, match="layout must be one of"):
        coco_paths(ade_root, "val", "kitti")


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_items_agree_with_the_semantic_pngs(ade_root, split):
    panoptic = CocoPanopticDataset(ade_root, split, layout="ade20k")
    semantic = ADE20KDataset(ade_root, split)
    assert len(panoptic) == len(semantic) > 0
    # Mask2Former's ADE20K panoptic categories: id = class index, and the things are ADE20K's instance classes.
    assert panoptic.metadata.contiguous_to_category_id == list(range(6))
    assert panoptic.metadata.class_names == semantic.metadata.class_names
    assert panoptic.metadata.thing_classes == {0, 1, 2}
    for index in range(len(panoptic)):
        item, expected = panoptic[index], semantic[index]
        assert item["image_id"] == os.path.splitext(expected["file_name"])[0]  # a string id
        assert item["file_name"] == expected["file_name"]
        assert torch.equal(item["image"], expected["image"])
        np.testing.assert_array_equal(semantic_map(item), expected["sem_seg"].numpy())
        np.testing.assert_array_equal(panoptic.load_semantic_gt(index), semantic.load_semantic_gt(index))


def test_instances_are_the_panoptic_thing_segments(ade_root):
    panoptic = CocoPanopticDataset(ade_root, "train", layout="ade20k")
    instances = CocoInstanceDataset(ade_root, "train", layout="ade20k")
    assert instances.metadata.contiguous_to_category_id == [0, 1, 2]
    for index in range(len(panoptic)):
        item, instance_item = panoptic[index], instances[index]
        assert instance_item["image_id"] == item["image_id"]
        things = item["labels"] < 3
        panoptic_things = sorted(
            (label, mask.numpy().tobytes())
            for label, mask in zip(item["labels"][things].tolist(), item["masks"][things])
        )
        instance_things = sorted(
            (label, mask.numpy().tobytes())
            for label, mask in zip(instance_item["labels"].tolist(), instance_item["masks"])
        )
        assert panoptic_things == instance_things


@pytest.mark.parametrize("single_category_max_area", [1.0, 0.6])
def test_the_semantic_recipe_transforms_panoptic_items_as_semantic_ones(ade_root, single_category_max_area):
    """Mask2Former trains ADE20K's panoptic set with its semantic recipe: the same crop, flip and colour
    jitter from the same draws, and the single-category limit looks at the panoptic segments' classes."""
    augmentation = SemanticAugmentation(48, 0.5, 2.0, single_category_max_area=single_category_max_area)
    panoptic = CocoPanopticDataset(ade_root, "train", augmentation, seed=3, layout="ade20k")
    semantic = ADE20KDataset(ade_root, "train", augmentation, seed=3)
    without_color = copy.copy(augmentation)
    without_color.photometric = None
    jittered = 0
    for index in range(len(panoptic)):
        item, expected = panoptic[index], semantic[index]
        assert item["image"].shape == (3, 48, 48)
        assert torch.equal(item["image"], expected["image"])
        np.testing.assert_array_equal(semantic_map(item), expected["sem_seg"].numpy())
        plain = ADE20KDataset(ade_root, "train", without_color, seed=3)[index]
        jittered += not torch.equal(plain["image"], item["image"])
    assert jittered > 0  # the colour distortion reached the panoptic items


def test_instance_items_cannot_take_the_single_category_limit(ade_root):
    augmentation = SemanticAugmentation(48, single_category_max_area=0.5)
    dataset = CocoInstanceDataset(ade_root, "train", augmentation, layout="ade20k")
    with pytest.raises(
        ValueError, match=r"CocoInstanceDataset has no class map .*single_category_max_area 0\.5"
    ):
        dataset[0]


def test_validation_reads_the_ade20k_files_and_names_them(ade_root, tmp_path):
    assert validate_dataset(ade_root, "train", "panoptic", layout="ade20k")["images"] == 5
    assert validate_dataset(ade_root, "val", "instance", layout="ade20k")["images"] == 3
    broken = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade_root, broken)
    data = json.loads(open(os.path.join(ade_root, "ade20k_panoptic_val.json")).read())
    data["annotations"][1]["segments_info"][0]["category_id"] = 150
    (broken / "ade20k_panoptic_val.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        validate_dataset(str(tmp_path), "val", "panoptic", layout="ade20k")
    image_id = data["annotations"][1]["image_id"]
    assert f"{broken / 'ade20k_panoptic_val.json'}: image id {image_id}: segment id" in str(error.value)
    assert "has unknown category_id 150" in str(error.value)


def test_panoptic_pngs_are_read_from_the_ade20k_folder(ade_root):
    """The ids in an item's masks are the PNG's own: a segment's mask is where the PNG holds its id."""
    dataset = CocoPanopticDataset(ade_root, "val", layout="ade20k")
    item = dataset[2]
    png = np.asarray(Image.open(os.path.join(ade_root, "ade20k_panoptic_val", f"{item['image_id']}.png")))
    ids = png[..., 0].astype(np.int64) + 256 * png[..., 1] + 256**2 * png[..., 2]
    for segment_id, mask in zip(item["segment_ids"].tolist(), item["masks"]):
        np.testing.assert_array_equal(mask.numpy(), ids == segment_id)


def test_instance_training_leaves_out_the_images_without_an_instance(ade_root, tmp_path):
    """Mask2Former's ADE20K instance training filters empty images as its COCO training does; evaluation
    keeps them."""
    from m2f.engine.train import build_dataset

    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade_root, root)
    for split in ("train", "val"):
        path = root / f"ade20k_instance_{split}.json"
        data = json.loads(path.read_text())
        empty = data["images"][1]["id"]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty]
        path.write_text(json.dumps(data))
    train = build_dataset("ade20k-instance", str(tmp_path), "train")
    val = build_dataset("ade20k-instance", str(tmp_path), "val")
    assert [record[0] for record in train.records] == [f"ADE_train_{n:08d}" for n in (1, 3, 4, 5)]
    assert [record[0] for record in val.records] == [f"ADE_val_{n:08d}" for n in (1, 2, 3)]

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools.coco import COCO

from m2f.data import (
    LSJ,
    SYNTHETIC_CATEGORIES,
    ADE20KDataset,
    CocoInstanceDataset,
    CocoPanopticDataset,
    DatasetError,
    collate,
    make_synthetic_ade20k,
)
from m2f.data.common import read_image
from m2f.data.transforms import SemanticAugmentation


def _load_json(root, name):
    with open(os.path.join(root, "annotations", name)) as f:
        return json.load(f)


def test_panoptic_items_match_png_and_json(synthetic_root):
    dataset = CocoPanopticDataset(synthetic_root, "val")
    data = _load_json(synthetic_root, "panoptic_val2017.json")
    metadata = dataset.metadata
    assert metadata.num_classes == 6
    assert metadata.thing_classes == {0, 1, 2}
    assert metadata.contiguous_to_category_id == [1, 3, 5, 100, 101, 102]
    assert len(dataset) == len(data["annotations"])
    for index, annotation in enumerate(data["annotations"]):
        item = dataset[index]
        png = os.path.join(synthetic_root, "annotations", "panoptic_val2017", annotation["file_name"])
        ids = rgb2id(np.array(Image.open(png), dtype=np.uint32))
        image = np.array(Image.open(os.path.join(synthetic_root, "val2017", item["file_name"])))
        assert item["image_id"] == annotation["image_id"]
        assert item["image"].dtype == torch.uint8 and item["masks"].dtype == torch.bool
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), image)
        assert item["orig_size"] == ids.shape
        segments = {s["id"]: s for s in annotation["segments_info"]}
        assert sorted(item["segment_ids"].tolist()) == sorted(segments)
        for segment_id, label, mask in zip(
            item["segment_ids"].tolist(), item["labels"].tolist(), item["masks"]
        ):
            assert np.array_equal(mask.numpy(), ids == segment_id)
            assert metadata.contiguous_to_category_id[label] == segments[segment_id]["category_id"]


def test_instance_items_match_pycocotools(synthetic_root):
    dataset = CocoInstanceDataset(synthetic_root, "val")
    coco = COCO(os.path.join(synthetic_root, "annotations", "instances_val2017.json"))
    assert dataset.metadata.num_classes == 3 and dataset.metadata.thing_classes == {0, 1, 2}
    for index in range(len(dataset)):
        item = dataset[index]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[item["image_id"]]))
        assert len(item["masks"]) == len(annotations)
        for annotation, label, mask in zip(annotations, item["labels"].tolist(), item["masks"]):
            assert np.array_equal(mask.numpy(), coco.annToMask(annotation).astype(bool))
            assert dataset.metadata.contiguous_to_category_id[label] == annotation["category_id"]


def test_instance_and_panoptic_masks_agree_under_the_same_lsj(synthetic_root):
    panoptic = CocoPanopticDataset(synthetic_root, "train", LSJ(80, min_scale=0.5, max_scale=2.0), seed=5)
    instance = CocoInstanceDataset(synthetic_root, "train", LSJ(80, min_scale=0.5, max_scale=2.0), seed=5)
    compared = 0
    for index in range(len(panoptic)):
        a, b = panoptic[index], instance[index]
        assert a["image_id"] == b["image_id"] and torch.equal(a["image"], b["image"])
        things = [
            m
            for label, m in zip(a["labels"].tolist(), a["masks"])
            if label in panoptic.metadata.thing_classes
        ]
        for mask in b["masks"]:
            best = max(((mask & m).sum() / (mask | m).sum()).item() for m in things)
            if mask.sum() > 30:
                assert best > 0.85
                compared += 1
    assert compared > 3


def test_panoptic_training_items_keep_the_segments_a_crop_leaves_out(synthetic_root):
    """Mask2Former's panoptic mapper keeps every non-crowd segment as a target, with an empty mask when
    the crop removed it (they count in num_masks and in the matching); the instance dataset drops them."""
    data = _load_json(synthetic_root, "panoptic_train2017.json")
    segments = {
        a["image_id"]: [s["id"] for s in a["segments_info"] if not s.get("iscrowd")]
        for a in data["annotations"]
    }
    dataset = CocoPanopticDataset(synthetic_root, "train", LSJ(48, min_scale=1.5, max_scale=2.0), seed=5)
    empty = 0
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["segment_ids"].tolist() == segments[item["image_id"]]
        assert len(item["labels"]) == len(item["masks"]) == len(item["segment_ids"])
        empty += int((~item["masks"].flatten(1).any(1)).sum())
    assert empty > 0  # crops of 48 from images scaled 1.5-2x leave some segments out


def test_items_are_deterministic_per_seed_epoch_and_index(synthetic_root):
    dataset = CocoPanopticDataset(synthetic_root, "train", LSJ(64), seed=1)
    first = dataset[2]
    again = CocoPanopticDataset(synthetic_root, "train", LSJ(64), seed=1)[2]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["masks"], again["masks"])
    dataset.set_epoch(1)
    changed = [
        not torch.equal(
            dataset[i]["image"], CocoPanopticDataset(synthetic_root, "train", LSJ(64), seed=1)[i]["image"]
        )
        for i in range(len(dataset))
    ]
    assert any(changed)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_seed_must_be_a_non_negative_int(synthetic_root, seed):
    """A negative seed failed at the first item, in numpy's words; 1.5 was truncated to 1."""
    with pytest.raises(ValueError, match=f"seed must be a non-negative int, got {seed!r}"):
        CocoPanopticDataset(synthetic_root, "train", LSJ(64), seed=seed)
    dataset = CocoPanopticDataset(synthetic_root, "train", LSJ(64))
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        dataset.set_epoch(-1)


def test_dataloader_workers_give_the_same_batches(synthetic_root):
    dataset = CocoInstanceDataset(synthetic_root, "train", LSJ(64), seed=2)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=collate)
        batches.append(list(loader))
    for (images_a, targets_a, infos_a), (images_b, targets_b, infos_b) in zip(*batches):
        assert torch.equal(images_a, images_b) and infos_a == infos_b
        for ta, tb in zip(targets_a, targets_b):
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["labels"], tb["labels"])


def test_collate_pads_images_and_masks():
    items = []
    for h, w in ((30, 40), (50, 20)):
        items.append(
            {
                "image": torch.full((3, h, w), 9, dtype=torch.uint8),
                "labels": torch.tensor([1]),
                "masks": torch.ones(1, h, w, dtype=torch.bool),
                "image_id": h,
                "file_name": f"{h}.jpg",
                "orig_size": (h * 2, w * 2),
            }
        )
    images, targets, infos = collate(items, size_divisibility=32)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert (
        images[0, :, :30, :40].eq(9).all()
        and images[0, :, 30:].eq(0).all()
        and images[0, :, :, 40:].eq(0).all()
    )
    assert targets[1]["masks"].shape == (1, 64, 64)
    assert targets[1]["masks"].sum() == 50 * 20 and targets[1]["masks"][0, :50, :20].all()
    assert infos[1] == {"image_id": 50, "file_name": "50.jpg", "orig_size": (100, 40), "image_size": (50, 20)}
    with pytest.raises(ValueError, match="batch"):
        collate([])
    gray = collate(items, size_divisibility=32, pad_value=(1.0, 2.0, 3.0))[0]
    assert torch.equal(gray[0, :, :30, :40], images[0, :, :30, :40])
    for channel, value in enumerate((1.0, 2.0, 3.0)):
        assert gray[0, channel, 30:].eq(value).all() and gray[1, channel, :, 20:].eq(value).all()
    with pytest.raises(ValueError, match="pad_value"):
        collate(items, pad_value=(0.0,))


def test_collate_padded_with_the_pixel_mean_is_what_the_model_pads():
    """The model pads an image after normalization with 0 (as detectron2 does); a batch padded by collate with
    the pixel mean must give the same masks on the image."""
    import m2f

    torch.manual_seed(0)
    model = m2f.build_model("demo-tiny", backend="torch").eval()
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)
    item = {
        "image": image,
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 40, 52).bool(),
    }
    item.update(image_id=1, file_name="1.jpg", orig_size=(40, 52))
    batch = collate([item], size_divisibility=32, pad_value=model.config.pixel_mean)[0]
    with torch.no_grad():
        padded_by_model = model(image[None].float())["pred_masks"]
        padded_by_collate = model(batch)["pred_masks"]
    torch.testing.assert_close(padded_by_collate[..., :10, :13], padded_by_model, atol=1e-5, rtol=1e-5)


def test_ade20k_items_map_zero_to_ignore(tmp_path):
    root = make_synthetic_ade20k(str(tmp_path), num_train=2, num_val=3, image_size=64, seed=0)
    assert ADE20KDataset(str(tmp_path), "validation").image_root == ADE20KDataset(root, "val").image_root
    dataset = ADE20KDataset(root, "val")
    assert dataset.metadata.class_names == [category["name"] for category in SYNTHETIC_CATEGORIES]
    assert len(dataset) == 3
    for index in range(len(dataset)):
        item = dataset[index]
        raw = np.array(
            Image.open(os.path.join(root, "annotations", "validation", item["file_name"][:-4] + ".png"))
        )
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        assert np.array_equal(item["sem_seg"].numpy(), expected)
        assert np.array_equal(dataset.load_semantic_gt(index), expected)
        assert [v - 1 for v in np.unique(raw).tolist() if v] == item["labels"].tolist()
        for label, mask in zip(item["labels"].tolist(), item["masks"]):
            assert np.array_equal(mask.numpy(), expected == label)
    batch = collate([ADE20KDataset(root, "train", LSJ(48))[i] for i in range(2)])
    assert batch[1][0]["sem_seg"].shape == (64, 64) and batch[1][0]["sem_seg"][48:].eq(255).all()


def test_ade20k_training_recipe_builds_targets_after_the_crop(tmp_path):
    root = make_synthetic_ade20k(str(tmp_path), num_train=4, num_val=0, image_size=64, seed=1)
    augmentation = SemanticAugmentation(48, single_category_max_area=0.9)
    dataset = ADE20KDataset(root, "train", augmentation, seed=2)
    padded_items = 0
    for index in range(len(dataset)):
        item = dataset[index]
        sem_seg = item["sem_seg"].numpy()
        assert item["image"].shape == (3, 48, 48) and sem_seg.shape == (48, 48)
        assert item["orig_size"] == (64, 64)
        present = sorted(set(np.unique(sem_seg).tolist()) - {255})
        assert item["labels"].tolist() == present
        assert present and set(present) <= set(np.unique(dataset.load_semantic_gt(index)).tolist())
        assert item["masks"].shape == (len(present), 48, 48)
        for label, mask in zip(present, item["masks"]):
            assert np.array_equal(mask.numpy(), sem_seg == label)
        assert np.array_equal(item["masks"].any(0).numpy(), sem_seg != 255)
        padded_items += bool((sem_seg[-1] == 255).all() and (item["image"][:, -1] == 128).all())
        # the item is the augmentation applied with the item's own generator (seed, epoch, index)
        image = read_image(os.path.join(dataset.image_root, item["file_name"]))
        rng = np.random.default_rng([2, 0, index])
        expected_image, expected_labels = augmentation.apply(image, dataset.load_semantic_gt(index), rng)
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected_image)
        assert np.array_equal(sem_seg, expected_labels)
    assert padded_items > 0  # short sides below 48 were drawn and padded with ignore
    epoch_0 = [dataset[i] for i in range(len(dataset))]
    assert all(torch.equal(epoch_0[i]["image"], dataset[i]["image"]) for i in range(len(dataset)))
    dataset.set_epoch(1)
    assert not all(torch.equal(dataset[i]["sem_seg"], epoch_0[i]["sem_seg"]) for i in range(len(dataset)))
    batch = collate([dataset[i] for i in range(2)])
    assert batch[0].shape == (2, 3, 64, 64) and batch[1][0]["sem_seg"][48:].eq(255).all()


def test_ade20k_missing_annotation_names_the_file(tmp_path):
    root = make_synthetic_ade20k(str(tmp_path), num_train=0, num_val=2, image_size=64)
    missing = os.path.join(root, "annotations", "validation", "ADE_val_00000002.png")
    os.remove(missing)
    with pytest.raises(DatasetError, match="1 images lack a label PNG") as error:
        ADE20KDataset(root, "val")
    assert error.value.problems == [f"{missing}: missing label PNG"]
    with pytest.raises(ValueError, match="split"):
        ADE20KDataset(root, "test")


def test_sixteen_bit_grayscale_keeps_its_high_byte(tmp_path):
    """PIL's own conversion to RGB clips 16-bit values at 255; read_image keeps the high byte."""
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    image = read_image(str(tmp_path / "gray16.png"))
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    expected = (values >> 8).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(image[:, :, channel], expected)


def test_packed_records_read_back_as_the_list():
    """Records packed into one byte array (so forked loader workers do not copy them) read back equal."""
    from m2f.data.common import PackedRecords

    records = [
        (1, "a.jpg", (3, 4), [(7, 0), (9, 2)]),
        (2, "b.jpg", (5, 6), []),
        (3, "c.jpg", (1, 1), [[0.5] * 6]),
    ]
    packed = PackedRecords(iter(records))
    assert len(packed) == 3 and list(packed) == records
    assert packed[-1] == records[-1] and packed[1] == records[1]
    assert packed[1:] == records[1:] and packed[::-2] == records[::-2]
    with pytest.raises(IndexError):
        packed[3]
    with pytest.raises(IndexError):
        packed[-4]
    assert len(PackedRecords([])) == 0 and list(PackedRecords([])) == []


def test_index_map_leaves_ids_outside_the_segments_at_minus_one():
    """Void (id 0), crowd segments and any other id not among the targets map to -1, not to the nearest
    target id's position."""
    from m2f.data.common import index_map_from_ids

    ids = np.array([[0, 5, 7, 9], [7, 7, 5, 100]])
    expected = np.array([[-1, 1, 0, -1], [0, 0, 1, -1]])
    assert np.array_equal(index_map_from_ids(ids, np.array([7, 5])), expected)
    assert np.array_equal(index_map_from_ids(ids, np.array([], dtype=np.int64)), np.full((2, 4), -1))


def test_panoptic_void_and_crowd_pixels_are_in_no_mask(synthetic_root, tmp_path):
    """A void block painted into a PNG and a segment marked crowd: neither is a target nor in any mask."""
    import shutil

    from m2f.data.common import id_to_rgb, read_panoptic_png

    root = str(tmp_path / "coco")
    shutil.copytree(synthetic_root, root)
    json_path = os.path.join(root, "annotations", "panoptic_val2017.json")
    data = _load_json(root, "panoptic_val2017.json")
    annotation = data["annotations"][0]
    crowd_id = annotation["segments_info"][0]["id"]
    annotation["segments_info"][0]["iscrowd"] = 1
    with open(json_path, "w") as f:
        json.dump(data, f)
    png = os.path.join(root, "annotations", "panoptic_val2017", annotation["file_name"])
    ids = read_panoptic_png(png)
    ids[:20, :30] = 0  # void
    Image.fromarray(id_to_rgb(ids)).save(png)
    assert (ids == crowd_id).any()

    dataset = CocoPanopticDataset(root, "val")
    index = [dataset[i]["image_id"] for i in range(len(dataset))].index(annotation["image_id"])
    item = dataset[index]
    kept = [s["id"] for s in annotation["segments_info"] if not s.get("iscrowd")]
    assert sorted(item["segment_ids"].tolist()) == sorted(kept)
    for segment_id, mask in zip(item["segment_ids"].tolist(), item["masks"]):
        assert np.array_equal(mask.numpy(), ids == segment_id)
    covered = item["masks"].any(0).numpy()
    assert not covered[:20, :30].any() and not covered[ids == crowd_id].any()
    assert np.array_equal(covered, np.isin(ids, kept))


def test_panoptic_semantic_ground_truth_is_each_segments_class(synthetic_root, tmp_path):
    """As Mask2Former's semantic annotations from the panoptic ones: every segment's pixels carry its
    category's class (ids in sorted order), crowd segments too; void pixels 255."""
    import shutil

    from m2f.data.common import id_to_rgb, read_panoptic_png

    root = str(tmp_path / "coco")
    shutil.copytree(synthetic_root, root)
    data = _load_json(root, "panoptic_val2017.json")
    data["annotations"][0]["segments_info"][0]["iscrowd"] = 1
    with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w") as f:
        json.dump(data, f)
    png = os.path.join(root, "annotations", "panoptic_val2017", data["annotations"][0]["file_name"])
    ids = read_panoptic_png(png)
    ids[:20, :30] = 0  # void
    Image.fromarray(id_to_rgb(ids)).save(png)

    dataset = CocoPanopticDataset(root, "val", transforms=LSJ(32, 0.5, 0.5))  # the ground truth ignores them
    class_of_category = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    images = {image["id"]: image for image in data["images"]}
    for index, annotation in enumerate(data["annotations"]):
        path = os.path.join(root, "annotations", "panoptic_val2017", annotation["file_name"])
        ids = rgb2id(np.array(Image.open(path), dtype=np.uint32))
        expected = np.full(ids.shape, 255)
        for segment in annotation["segments_info"]:
            expected[ids == segment["id"]] = class_of_category[segment["category_id"]]
        image = images[annotation["image_id"]]
        gt = dataset.load_semantic_gt(index)
        assert gt.dtype == np.int64 and gt.shape == (image["height"], image["width"])
        assert np.array_equal(gt, expected)
    first = dataset.load_semantic_gt(0)
    assert (first[:20, :30] == 255).all() and (first != 255).sum() > 0.5 * first.size


def test_panoptic_padding_is_in_no_mask(synthetic_root):
    """LSJ pads images smaller than its size at the bottom and right; the padding belongs to no segment."""
    dataset = CocoPanopticDataset(synthetic_root, "train", LSJ(128, min_scale=0.3, max_scale=0.6), seed=3)
    for index in range(len(dataset)):
        item = dataset[index]
        geometry = dataset.geometry(index, *item["orig_size"])
        valid_h, valid_w = geometry.valid_size
        assert valid_h < 128 and valid_w < 128
        masks = item["masks"]
        assert masks.shape[-2:] == (128, 128)
        assert not masks[:, valid_h:].any() and not masks[:, :, valid_w:].any()
        assert masks[:, :valid_h, :valid_w].any(0).float().mean() > 0.9  # the image itself is covered


def test_ade20k_keeps_the_last_class_and_ignores_values_beyond(tmp_path):
    """PNG value v in 1..150 is class v - 1 (150 -> 149, "flag"); 0 and values above 150 are ignore."""
    from m2f.data.ade20k import ADE20K_CLASS_NAMES, read_ade20k_labels

    raw = np.array([[0, 1, 2, 149], [150, 151, 255, 75]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "labels.png")
    expected = np.array([[255, 0, 1, 148], [149, 255, 255, 74]])
    labels = read_ade20k_labels(str(tmp_path / "labels.png"))
    assert np.array_equal(labels, expected)
    assert ADE20K_CLASS_NAMES[149] == "flag"


def test_instance_training_leaves_out_images_without_an_instance(synthetic_root, tmp_path):
    """One image with crowd annotations alone and one with none: both in the dataset, neither in training
    (Mask2Former's training set), both in evaluation."""
    import shutil

    from m2f.engine.train import build_dataset

    root = str(tmp_path / "coco")
    shutil.copytree(synthetic_root, root)
    json_path = os.path.join(root, "annotations", "instances_train2017.json")
    data = _load_json(root, "instances_train2017.json")
    all_ids = sorted(image["id"] for image in data["images"])
    crowd_only, unannotated = all_ids[0], all_ids[-1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != unannotated]
    for annotation in data["annotations"]:
        if annotation["image_id"] == crowd_only:
            annotation["iscrowd"] = 1
    with open(json_path, "w") as f:
        json.dump(data, f)
    with_instances = sorted({a["image_id"] for a in data["annotations"] if not a["iscrowd"]})
    assert with_instances == [i for i in all_ids if i not in (crowd_only, unannotated)]

    def image_ids(dataset):
        return [dataset.records[i][0] for i in range(len(dataset))]

    assert image_ids(CocoInstanceDataset(root, "train")) == all_ids
    assert image_ids(CocoInstanceDataset(root, "train", skip_empty=True)) == with_instances
    assert image_ids(build_dataset("coco-instance", root, "train", LSJ(64))) == with_instances
    shutil.copy(json_path, os.path.join(root, "annotations", "instances_val2017.json"))
    shutil.rmtree(os.path.join(root, "val2017"))
    shutil.copytree(os.path.join(root, "train2017"), os.path.join(root, "val2017"))
    assert image_ids(build_dataset("coco-instance", root, "val")) == all_ids
    assert image_ids(build_dataset("coco-panoptic", root, "train")) == all_ids


def test_ade20k_layout_with_its_own_classes(tmp_path):
    """classes.txt at the root (found from its parent too) names the classes: line v is PNG value v, 0 stays
    ignored and values beyond the list are ignored as well."""
    from m2f.data.ade20k import read_ade20k_labels

    root = make_synthetic_ade20k(str(tmp_path), num_train=0, num_val=2, image_size=64, seed=0)
    names = [category["name"] for category in SYNTHETIC_CATEGORIES]
    with open(os.path.join(root, "classes.txt"), "w") as file:
        file.write("\n".join(f"  {name} " for name in names) + "\n\n")
    for dataset in (ADE20KDataset(root, "val"), ADE20KDataset(str(tmp_path), "val")):
        assert dataset.metadata.class_names == names and dataset.metadata.num_classes == len(names)
        assert dataset.metadata.contiguous_to_category_id == list(range(1, len(names) + 1))
        assert dataset.metadata.thing_classes == set()
    item = ADE20KDataset(root, "val")[0]
    assert item["labels"].max() < len(names)
    Image.fromarray(np.array([[0, 1, 6, 7, 200]], dtype=np.uint8)).save(tmp_path / "labels.png")
    labels = read_ade20k_labels(str(tmp_path / "labels.png"), num_classes=len(names))
    assert labels.tolist() == [[255, 0, 5, 255, 255]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"must name 1 to 255 classes, one per line, names 0"),
        ("\n".join(f"class {i}" for i in range(256)), r"must name 1 to 255 classes, one per line, names 256"),
        ("sky\n\nroad\n", r"line 2 is empty \(line v names PNG value v\)"),
        ("sky\nroad\n sky\n", r"line 3 repeats the class 'sky' of line 1"),
    ],
)
def test_ade20k_class_list_problems_name_the_file_and_line(tmp_path, text, message):
    root = make_synthetic_ade20k(str(tmp_path), num_train=0, num_val=1, image_size=32, seed=0)
    (Path(root) / "classes.txt").write_text(text)
    with pytest.raises(DatasetError, match=f"classes.txt: {message}"):
        ADE20KDataset(root, "val")

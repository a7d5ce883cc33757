"""Cityscapes (fine annotations): the images leftImg8bit/{split}/{city}/*_leftImg8bit.png and, in
gtFine/{split}/{city}/, the *_gtFine_labelTrainIds.png maps that cityscapesscripts' createTrainIdLabelImgs.py
writes (semantic: train ids 0-18 are the 19 evaluated classes, 255 ignored) and the *_gtFine_instanceIds.png
maps of the release (instance: the 8 thing classes). The panoptic set (createPanopticImgs.py's
gtFine/cityscapes_panoptic_{split}.json and PNG folder) is read by CocoPanopticDataset (see coco_paths)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from m2f.data.ade20k import SemanticDataset
from m2f.data.common import (
    IGNORE_LABEL,
    DatasetError,
    DatasetMetadata,
    SegmentationDataset,
    check_annotations_exist,
    check_image_size,
    image_to_tensor,
    masks_from_index_map,
    read_image,
    read_label_png,
)

# (label id, name, isthing) of the 19 evaluated classes, in train id order (which is label id order).
CITYSCAPES_CLASSES = (
    (7, "road", 0), (8, "sidewalk", 0), (11, "building", 0), (12, "wall", 0), (13, "fence", 0),
    (17, "pole", 0), (19, "traffic light", 0), (20, "traffic sign", 0), (21, "vegetation", 0),
    (22, "terrain", 0), (23, "sky", 0), (24, "person", 1), (25, "rider", 1), (26, "car", 1), (27, "truck", 1),
    (28, "bus", 1), (31, "train", 1), (32, "motorcycle", 1), (33, "bicycle", 1),
)  # fmt: skip
CITYSCAPES_SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
# An instance id map holds label id * INSTANCE_ID_BASE + instance number for each single object of a thing
# class, the bare label id elsewhere (stuff, void, and groups of objects too close to tell apart).
INSTANCE_ID_BASE = 1000


def cityscapes_categories() -> list[dict]:
    """The 19 classes as COCO categories: id = Cityscapes label id, contiguous class = train id."""
    return [{"id": i, "name": name, "isthing": isthing} for i, name, isthing in CITYSCAPES_CLASSES]


def cityscapes_thing_categories() -> list[dict]:
    """The 8 thing classes (person ... bicycle) as COCO categories: the classes of the instance task."""
    return [category for category in cityscapes_categories() if category["isthing"]]


def cityscapes_paths(root: str, split: str) -> tuple[str, str]:
    """(image folder, label folder) of a split, each holding one folder per city."""
    if split not in CITYSCAPES_SPLITS:
        raise ValueError(f"split must be one of {CITYSCAPES_SPLITS}, got {split!r}")
    return os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)


def city_image_path(file_name: str) -> str:
    """city/file_name: Cityscapes keeps each city's images in a folder named by the file name's first part."""
    return os.path.join(file_name.split("_")[0], file_name)


def list_city_images(image_root: str) -> list[str]:
    """The sorted city/<stem>_leftImg8bit.png names under image_root; DatasetError when it is missing."""
    if not os.path.isdir(image_root):
        raise DatasetError(f"{image_root}: image folder not found")
    return sorted(
        os.path.join(city, name)
        for city in os.listdir(image_root)
        if os.path.isdir(os.path.join(image_root, city))
        for name in os.listdir(os.path.join(image_root, city))
        if name.endswith(IMAGE_SUFFIX)
    )


def read_train_ids(path: str) -> np.ndarray:
    """(H, W) int64 train ids, 255 (ignore) for every value beyond the 19 classes."""
    raw = read_label_png(path)
    return np.where(raw < len(CITYSCAPES_CLASSES), raw, IGNORE_LABEL)


class CityscapesDataset(SemanticDataset):
    """Cityscapes semantic segmentation; items and transforms as SemanticDataset's (file_name
    city/<stem>_leftImg8bit.png), classes the 19 train ids, category ids Cityscapes' label ids."""

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0):
        super().__init__(transforms, seed)
        self.image_root, self.annotation_root = cityscapes_paths(root, split)
        self.file_names = list_city_images(self.image_root)
        self.metadata = DatasetMetadata(cityscapes_categories(), image_root=self.image_root)
        check_annotations_exist(
            [self.annotation_path(index) for index in range(len(self))],
            "train id map",
            f"*{LABEL_SUFFIX}, which cityscapesscripts' createTrainIdLabelImgs.py writes",
        )

    def annotation_path(self, index: int) -> str:
        return os.path.join(
            self.annotation_root, self.file_names[index].removesuffix(IMAGE_SUFFIX) + LABEL_SUFFIX
        )

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at its original size: (H, W) int64 train ids, 255 = ignore."""
        return read_train_ids(self.annotation_path(index))


def label_ids(instance_ids: np.ndarray) -> np.ndarray:
    """The label id of each value of an instance id map (an object's: its id // INSTANCE_ID_BASE)."""
    return np.where(instance_ids >= INSTANCE_ID_BASE, instance_ids // INSTANCE_ID_BASE, instance_ids)


def instance_segments(instance_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The single objects of the 8 thing classes in an instance id map: (instance ids (K,) sorted, their
    classes (K,) int64 in cityscapes_thing_categories() order). Groups, stuff and void are left out."""
    thing_label_ids = np.array([c["id"] for c in cityscapes_thing_categories()])
    values = np.unique(instance_ids[instance_ids >= INSTANCE_ID_BASE])  # a bare label id is no object
    value_label_ids = label_ids(values)
    is_thing = np.isin(value_label_ids, thing_label_ids)
    return values[is_thing], np.searchsorted(thing_label_ids, value_label_ids[is_thing])


class CityscapesInstanceDataset(SegmentationDataset):
    """Cityscapes instance segmentation from the *_gtFine_instanceIds.png maps: one target per single
    object of the 8 thing classes; groups are no target (as COCO's crowd regions). Items as
    CocoInstanceDataset's (image, labels (T,) in cityscapes_thing_categories() order, masks (T, H, W) bool,
    file_name city/<stem>_leftImg8bit.png, orig_size), image_id the stem (e.g. "frankfurt_000000_000294").
    Targets are cut from the id map after the transform (nearest); those the crop empties are dropped.

    skip_empty leaves out the images without a single object, as Mask2Former's training set does; it reads
    every id map once here, on up to 8 threads (30 ms per 2048 x 1024 map and thread)."""

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0, skip_empty: bool = False):
        super().__init__(transforms, seed)
        self.image_root, self.annotation_root = cityscapes_paths(root, split)
        self.file_names = list_city_images(self.image_root)
        self.metadata = DatasetMetadata(cityscapes_thing_categories(), image_root=self.image_root)
        check_annotations_exist(
            [self.annotation_path(index) for index in range(len(self))],
            "instance id map",
            f"*{INSTANCE_SUFFIX}, part of the gtFine release",
        )
        if skip_empty:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
                has_objects = list(pool.map(self._has_objects, range(len(self))))
            self.file_names = [name for name, keep in zip(self.file_names, has_objects) if keep]

    def __len__(self) -> int:
        return len(self.file_names)

    def image_id(self, index: int) -> str:
        return os.path.basename(self.file_names[index]).removesuffix(IMAGE_SUFFIX)

    def _has_objects(self, index: int) -> bool:
        return len(instance_segments(read_label_png(self.annotation_path(index)))[0]) > 0

    def annotation_path(self, index: int) -> str:
        return os.path.join(
            self.annotation_root, self.file_names[index].removesuffix(IMAGE_SUFFIX) + INSTANCE_SUFFIX
        )

    def annotation_paths(self) -> dict[str, str]:
        """{image_id: its instance id map}, what the evaluation compares with."""
        return {self.image_id(index): self.annotation_path(index) for index in range(len(self))}

    def source_files(self) -> list[str]:
        """Every file the items and the evaluation read: the images and their instance id maps."""
        images = [os.path.join(self.image_root, name) for name in self.file_names]
        return images + [self.annotation_path(index) for index in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        image_path = os.path.join(self.image_root, self.file_names[index])
        image = read_image(image_path)
        instance_ids = read_label_png(self.annotation_path(index))
        check_image_size(image, instance_ids.shape, image_path)
        orig_size = tuple(image.shape[:2])
        geometry = self.geometry(index, *orig_size)
        instance_ids = geometry.apply_segmentation(instance_ids, fill=0)
        values, labels = instance_segments(instance_ids)
        index_map = np.searchsorted(values, instance_ids).astype(np.int32)
        index_map[~np.isin(instance_ids, values)] = -1
        return {
            "image": image_to_tensor(geometry.apply_image(image)),
            "labels": torch.from_numpy(labels),
            "masks": masks_from_index_map(index_map, len(values)),
            "image_id": self.image_id(index),
            "file_name": self.file_names[index],
            "orig_size": orig_size,
        }

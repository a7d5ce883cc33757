"""Cityscapes (fine annotations) for semantic segmentation: leftImg8bit/{split}/{city}/*_leftImg8bit.png and the
gtFine/{split}/{city}/*_gtFine_labelTrainIds.png maps that cityscapesscripts' createTrainIdLabelImgs.py writes
(train ids 0-18 are the 19 evaluated classes, 255 ignored). The panoptic set (createPanopticImgs.py's
gtFine/cityscapes_panoptic_{split}.json and PNG folder) is read by CocoPanopticDataset (see coco_paths)."""

from __future__ import annotations

import os

import numpy as np

from m2f.data.ade20k import SemanticDataset
from m2f.data.common import IGNORE_LABEL, DatasetError, DatasetMetadata, naming_unreadable

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


def cityscapes_categories() -> list[dict]:
    """The 19 classes as COCO categories: id = Cityscapes label id, contiguous class = train id."""
    return [{"id": i, "name": name, "isthing": isthing} for i, name, isthing in CITYSCAPES_CLASSES]


def cityscapes_paths(root: str, split: str) -> tuple[str, str]:
    """(image folder, label folder) of a split, each holding one folder per city."""
    if split not in CITYSCAPES_SPLITS:
        raise ValueError(f"split must be one of {CITYSCAPES_SPLITS}, got {split!r}")
    return os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)


def city_image_path(file_name: str) -> str:
    """city/file_name: Cityscapes keeps each city's images in a folder named by the file name's first part."""
    return os.path.join(file_name.split("_")[0], file_name)


def read_train_ids(path: str) -> np.ndarray:
    """(H, W) int64 train ids, 255 (ignore) for every value beyond the 19 classes."""
    from PIL import Image

    with naming_unreadable(path), Image.open(path) as png:
        raw = np.asarray(png, dtype=np.int64)
    if raw.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel train id PNG, got shape {raw.shape}")
    return np.where(raw < len(CITYSCAPES_CLASSES), raw, IGNORE_LABEL)


class CityscapesDataset(SemanticDataset):
    """Cityscapes semantic segmentation; items and transforms as SemanticDataset's (file_name
    city/<stem>_leftImg8bit.png), classes the 19 train ids, category ids Cityscapes' label ids."""

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0):
        super().__init__(transforms, seed)
        self.image_root, self.annotation_root = cityscapes_paths(root, split)
        if not os.path.isdir(self.image_root):
            raise DatasetError(f"{self.image_root}: image folder not found")
        self.metadata = DatasetMetadata(cityscapes_categories(), image_root=self.image_root)
        self.file_names = sorted(
            os.path.join(city, name)
            for city in os.listdir(self.image_root)
            if os.path.isdir(os.path.join(self.image_root, city))
            for name in os.listdir(os.path.join(self.image_root, city))
            if name.endswith(IMAGE_SUFFIX)
        )
        missing = [path for path in map(self.annotation_path, range(len(self))) if not os.path.isfile(path)]
        if missing:
            raise DatasetError(
                f"{len(missing)} images lack a {LABEL_SUFFIX} map (cityscapesscripts' createTrainIdLabelImgs.py "
                f"writes them), first: {missing[0]}",
                [f"{path}: missing train id map" for path in missing],
            )

    def annotation_path(self, index: int) -> str:
        return os.path.join(
            self.annotation_root, self.file_names[index].removesuffix(IMAGE_SUFFIX) + LABEL_SUFFIX
        )

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at its original size: (H, W) int64 train ids, 255 = ignore."""
        return read_train_ids(self.annotation_path(index))

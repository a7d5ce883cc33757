"""Mapillary Vistas v1.2 (65 classes): {training,validation}/images/*.jpg with the semantic label maps
{split}/labels/*.png (value v < 65 is class v, 65 "unlabeled" is ignored) and the COCO-format panoptic files
{split}/panoptic/panoptic_2018.json and PNGs beside it (category id = class + 1), which CocoPanopticDataset
reads (see coco_paths)."""

from __future__ import annotations

import os

import numpy as np

from m2f.data.ade20k import SemanticDataset
from m2f.data.common import (
    IGNORE_LABEL,
    DatasetError,
    DatasetMetadata,
    check_annotations_exist,
    read_label_png,
)

# (category id, name, isthing) of the 65 classes; class = id - 1 = the label maps' value.
MAPILLARY_CLASSES = (
    (1, "Bird", 1), (2, "Ground Animal", 1), (3, "Curb", 0), (4, "Fence", 0), (5, "Guard Rail", 0),
    (6, "Barrier", 0), (7, "Wall", 0), (8, "Bike Lane", 0), (9, "Crosswalk - Plain", 1), (10, "Curb Cut", 0),
    (11, "Parking", 0), (12, "Pedestrian Area", 0), (13, "Rail Track", 0), (14, "Road", 0),
    (15, "Service Lane", 0), (16, "Sidewalk", 0), (17, "Bridge", 0), (18, "Building", 0), (19, "Tunnel", 0),
    (20, "Person", 1), (21, "Bicyclist", 1), (22, "Motorcyclist", 1), (23, "Other Rider", 1),
    (24, "Lane Marking - Crosswalk", 1), (25, "Lane Marking - General", 0), (26, "Mountain", 0),
    (27, "Sand", 0), (28, "Sky", 0), (29, "Snow", 0), (30, "Terrain", 0), (31, "Vegetation", 0),
    (32, "Water", 0), (33, "Banner", 1), (34, "Bench", 1), (35, "Bike Rack", 1), (36, "Billboard", 1),
    (37, "Catch Basin", 1), (38, "CCTV Camera", 1), (39, "Fire Hydrant", 1), (40, "Junction Box", 1),
    (41, "Mailbox", 1), (42, "Manhole", 1), (43, "Phone Booth", 1), (44, "Pothole", 0),
    (45, "Street Light", 1), (46, "Pole", 1), (47, "Traffic Sign Frame", 1), (48, "Utility Pole", 1),
    (49, "Traffic Light", 1), (50, "Traffic Sign (Back)", 1), (51, "Traffic Sign (Front)", 1),
    (52, "Trash Can", 1), (53, "Bicycle", 1), (54, "Boat", 1), (55, "Bus", 1), (56, "Car", 1),
    (57, "Caravan", 1), (58, "Motorcycle", 1), (59, "On Rails", 0), (60, "Other Vehicle", 1),
    (61, "Trailer", 1), (62, "Truck", 1), (63, "Wheeled Slow", 1), (64, "Car Mount", 0),
    (65, "Ego Vehicle", 0),
)  # fmt: skip
UNLABELED = len(MAPILLARY_CLASSES)  # the label maps' value for unlabeled pixels
MAPILLARY_SPLITS = {"train": "training", "val": "validation"}


def mapillary_categories() -> list[dict]:
    """The 65 classes as COCO categories (id = class + 1, name, isthing)."""
    return [{"id": i, "name": name, "isthing": isthing} for i, name, isthing in MAPILLARY_CLASSES]


def mapillary_split_root(root: str, split: str) -> str:
    """root/training or root/validation for split "train" or "val"."""
    if split not in MAPILLARY_SPLITS:
        raise ValueError(f"split must be 'train' or 'val' for Mapillary Vistas, got {split!r}")
    return os.path.join(root, MAPILLARY_SPLITS[split])


def read_mapillary_labels(path: str) -> np.ndarray:
    """(H, W) int64 classes 0-64, 255 (ignore) for unlabeled and any other value."""
    raw = read_label_png(path)
    return np.where(raw < UNLABELED, raw, IGNORE_LABEL)


class MapillaryVistasDataset(SemanticDataset):
    """Mapillary Vistas semantic segmentation; items and transforms as SemanticDataset's (file_name
    <key>.jpg), classes the 65 label values, category ids class + 1 (the panoptic files')."""

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0):
        super().__init__(transforms, seed)
        split_root = mapillary_split_root(root, split)
        self.image_root = os.path.join(split_root, "images")
        self.annotation_root = os.path.join(split_root, "labels")
        if not os.path.isdir(self.image_root):
            raise DatasetError(f"{self.image_root}: image folder not found")
        self.metadata = DatasetMetadata(mapillary_categories(), image_root=self.image_root)
        self.file_names = sorted(f for f in os.listdir(self.image_root) if f.endswith(".jpg"))
        check_annotations_exist(
            [self.annotation_path(index) for index in range(len(self))], "label map", self.annotation_root
        )

    def annotation_path(self, index: int) -> str:
        return os.path.join(self.annotation_root, self.file_names[index].removesuffix(".jpg") + ".png")

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at its original size: (H, W) int64 classes, 255 = ignore."""
        return read_mapillary_labels(self.annotation_path(index))

"""ADE20K scene parsing (ADEChallengeData2016): images/{training,validation}/*.jpg and
annotations/{training,validation}/*.png with 150 classes; PNG value 0 is "other" and becomes ignore (255),
value v in 1..150 becomes class v - 1.

Other semantic datasets in this layout name their own classes in a `classes.txt` at the root, one name per
line: the name on line v is PNG value v (class v - 1), 0 is still ignored, and there are at most 255."""

from __future__ import annotations

import os

import numpy as np
import torch

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
from m2f.data.transforms import SemanticAugmentation

ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
CLASSES_FILE = "classes.txt"
# Classes are 0..N-1 beside the ignore label 255.
MAX_CLASSES = IGNORE_LABEL


def ade20k_metadata(class_names=ADE20K_CLASS_NAMES, image_root: str | None = None) -> DatasetMetadata:
    """Category id = the PNG value (1..N), contiguous class = id - 1; all classes are stuff."""
    categories = [{"id": i + 1, "name": name, "isthing": 0} for i, name in enumerate(class_names)]
    return DatasetMetadata(categories, image_root=image_root)


def ade20k_root(root: str) -> str:
    """The dataset folder: `root`, or its ADEChallengeData2016 when it has one."""
    nested = os.path.join(root, "ADEChallengeData2016")
    return nested if os.path.isdir(nested) else root


def ade20k_paths(root: str, split: str) -> tuple[str, str]:
    """(image folder, annotation folder); `root` may be ADEChallengeData2016 or its parent."""
    if split not in ADE20K_SPLITS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
    root, folder = ade20k_root(root), ADE20K_SPLITS[split]
    return os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)


def ade20k_class_names(root: str) -> tuple[str, ...]:
    """The names in the dataset's classes.txt (line v: PNG value v), else ADE20K's 150. DatasetError naming the
    file and line for an empty or repeated name, and for more than MAX_CLASSES names."""
    path = os.path.join(ade20k_root(root), CLASSES_FILE)
    if not os.path.isfile(path):
        return ADE20K_CLASS_NAMES
    try:
        with open(path, encoding="utf-8") as file:
            names = [line.strip() for line in file.read().rstrip().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable ({error})") from error
    if not 1 <= len(names) <= MAX_CLASSES:
        raise DatasetError(f"{path}: must name 1 to {MAX_CLASSES} classes, one per line, names {len(names)}")
    first_line = {}
    for line, name in enumerate(names, start=1):
        if not name:
            raise DatasetError(f"{path}: line {line} is empty (line v names PNG value v)")
        if name in first_line:
            raise DatasetError(f"{path}: line {line} repeats the class {name!r} of line {first_line[name]}")
        first_line[name] = line
    return tuple(names)


def read_ade20k_labels(path: str, num_classes: int = len(ADE20K_CLASS_NAMES)) -> np.ndarray:
    """(H, W) int64 contiguous classes, 255 for ignore."""
    raw = read_label_png(path)
    return np.where((raw == 0) | (raw > num_classes), IGNORE_LABEL, raw - 1)


class SemanticDataset(SegmentationDataset):
    """Base of the semantic segmentation datasets: images image_root/file_names[i], one label map each
    (annotation_path, load_semantic_gt).

    Items: image (3, H, W) uint8, labels (T,) int64 (the classes present), masks (T, H, W) bool (one per
    class), sem_seg (H, W) int64 with 255 = ignore, image_id (position in the sorted file list), file_name,
    orig_size (H, W).

    transforms: None, a geometric transform (LSJ, ResizeShortestEdge), or SemanticAugmentation (the training
    recipe: its crop looks at the labels and it distorts colours). Labels and masks are built from the
    transformed label map, so they only name classes left in the crop; ignore pixels are in no mask.
    """

    image_root: str
    file_names: list[str]

    def annotation_path(self, index: int) -> str:
        raise NotImplementedError

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at its original size: (H, W) int64 classes, 255 = ignore."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.file_names)

    def source_files(self) -> list[str]:
        """Every file the items and the evaluation read: the images and their label PNGs."""
        images = [os.path.join(self.image_root, name) for name in self.file_names]
        return images + [self.annotation_path(index) for index in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        image_path = os.path.join(self.image_root, self.file_names[index])
        image = read_image(image_path)
        labels_map = self.load_semantic_gt(index)
        check_image_size(image, labels_map.shape, image_path)
        orig_size = tuple(image.shape[:2])
        if isinstance(self.transforms, SemanticAugmentation):
            image, labels_map = self.transforms.apply(image, labels_map, self.item_rng(index))
        else:
            geometry = self.geometry(index, *orig_size)
            image = geometry.apply_image(image)
            labels_map = geometry.apply_segmentation(labels_map, fill=IGNORE_LABEL)
        labels_map = labels_map.astype(np.int64)

        classes = np.unique(labels_map)
        classes = classes[classes != IGNORE_LABEL]
        index_map = np.searchsorted(classes, labels_map).astype(np.int32)
        index_map[labels_map == IGNORE_LABEL] = -1
        masks = masks_from_index_map(index_map, len(classes))
        return {
            "image": image_to_tensor(image),
            "labels": torch.from_numpy(classes),
            "masks": masks,
            "sem_seg": torch.from_numpy(labels_map),
            "image_id": index,
            "file_name": self.file_names[index],
            "orig_size": orig_size,
        }


class ADE20KDataset(SemanticDataset):
    """ADE20K scene parsing, or another dataset in its layout whose classes.txt names its classes (see the
    module docstring); items and transforms as SemanticDataset's."""

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0):
        super().__init__(transforms, seed)
        self.image_root, self.annotation_root = ade20k_paths(root, split)
        if not os.path.isdir(self.image_root):
            raise DatasetError(f"{self.image_root}: image folder not found")
        self.metadata = ade20k_metadata(ade20k_class_names(root), image_root=self.image_root)
        self.file_names = sorted(f for f in os.listdir(self.image_root) if f.lower().endswith(".jpg"))
        check_annotations_exist(
            [self.annotation_path(index) for index in range(len(self))], "label PNG", self.annotation_root
        )

    def annotation_path(self, index: int) -> str:
        return os.path.join(self.annotation_root, os.path.splitext(self.file_names[index])[0] + ".png")

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Ground truth of item `index` at its original size: (H, W) int64, 255 = ignore."""
        return read_ade20k_labels(self.annotation_path(index), self.metadata.num_classes)

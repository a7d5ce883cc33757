"""Datasets (COCO panoptic and instance, in COCO's files or ADE20K's; ADE20K semantic), the synthetic dataset,
augmentations and validation."""

from m2f.data.ade20k import ADE20K_CLASS_NAMES, ADE20KDataset, ade20k_metadata
from m2f.data.coco_instance import CocoInstanceDataset, decode_segmentation
from m2f.data.coco_panoptic import CocoPanopticDataset, coco_paths
from m2f.data.common import (
    IGNORE_LABEL,
    DatasetError,
    DatasetMetadata,
    collate,
    id_to_rgb,
    read_panoptic_png,
    rgb_to_id,
)
from m2f.data.synthetic import SYNTHETIC_CATEGORIES, make_synthetic, make_synthetic_ade20k
from m2f.data.transforms import (
    LSJ,
    Geometry,
    PhotometricDistortion,
    ResizeShortestEdge,
    SemanticAugmentation,
    category_limited_crop,
)
from m2f.data.validate import validate_dataset

__all__ = [
    "ADE20K_CLASS_NAMES",
    "IGNORE_LABEL",
    "LSJ",
    "SYNTHETIC_CATEGORIES",
    "ADE20KDataset",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "DatasetError",
    "DatasetMetadata",
    "Geometry",
    "PhotometricDistortion",
    "ResizeShortestEdge",
    "SemanticAugmentation",
    "ade20k_metadata",
    "category_limited_crop",
    "coco_paths",
    "collate",
    "decode_segmentation",
    "id_to_rgb",
    "make_synthetic",
    "make_synthetic_ade20k",
    "read_panoptic_png",
    "rgb_to_id",
    "validate_dataset",
]

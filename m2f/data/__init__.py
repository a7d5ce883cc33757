"""Datasets (COCO-format panoptic and instance sets: COCO's, ADE20K's, Cityscapes' and Mapillary Vistas'
panoptic; ADE20K, Cityscapes and Mapillary Vistas semantic; Cityscapes instance), the synthetic dataset in
each layout, augmentations and validation."""

from m2f.data.ade20k import ADE20K_CLASS_NAMES, ADE20KDataset, SemanticDataset, ade20k_metadata
from m2f.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesDataset,
    CityscapesInstanceDataset,
    cityscapes_categories,
    cityscapes_thing_categories,
)
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
from m2f.data.mapillary import MAPILLARY_CLASSES, MapillaryVistasDataset, mapillary_categories
from m2f.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    make_synthetic,
    make_synthetic_ade20k,
    make_synthetic_cityscapes,
    make_synthetic_mapillary,
)
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
    "CITYSCAPES_CLASSES",
    "IGNORE_LABEL",
    "LSJ",
    "MAPILLARY_CLASSES",
    "SYNTHETIC_CATEGORIES",
    "ADE20KDataset",
    "CityscapesDataset",
    "CityscapesInstanceDataset",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "DatasetError",
    "DatasetMetadata",
    "Geometry",
    "MapillaryVistasDataset",
    "PhotometricDistortion",
    "ResizeShortestEdge",
    "SemanticAugmentation",
    "SemanticDataset",
    "ade20k_metadata",
    "category_limited_crop",
    "cityscapes_categories",
    "cityscapes_thing_categories",
    "coco_paths",
    "collate",
    "decode_segmentation",
    "id_to_rgb",
    "make_synthetic",
    "make_synthetic_ade20k",
    "make_synthetic_cityscapes",
    "make_synthetic_mapillary",
    "mapillary_categories",
    "read_panoptic_png",
    "rgb_to_id",
    "validate_dataset",
]

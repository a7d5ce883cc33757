"""COCO instance segmentation: annotations/instances_{split}2017.json (polygons or RLE), images in
{split}2017/."""

from __future__ import annotations

import os

import numpy as np
import torch
from pycocotools import mask as mask_utils

from m2f.data.coco_panoptic import coco_paths
from m2f.data.common import (
    DatasetError,
    DatasetMetadata,
    PackedRecords,
    SegmentationDataset,
    check_image_size,
    image_to_tensor,
    read_image,
    read_json,
)


def _compressed_runs(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString format: each run in 5-bit
    groups, offset by 48, the 6th bit set while more groups follow; runs after the second are stored as the
    difference to the run two back)."""
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError("the string ends inside a run")
            group = counts[position] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position, shift = position + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def rle_problem(segmentation: dict, height: int, width: int) -> str | None:
    """Why a COCO RLE segmentation is not a (height, width) mask, or None. pycocotools decodes an RLE whose
    runs cover fewer pixels than its size without complaint, leaving the rest of the mask uninitialized."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return f"RLE size {size} differs from the image's [{height}, {width}]"
    try:
        if isinstance(counts, list):
            if not all(isinstance(run, int) and run >= 0 for run in counts):
                raise ValueError("runs must be non-negative ints")
            runs = counts
        elif isinstance(counts, (str, bytes)):
            runs = _compressed_runs(counts.encode("ascii") if isinstance(counts, str) else counts)
        else:
            raise ValueError("counts must be a list of runs or a compressed string")
    except (ValueError, UnicodeEncodeError) as error:
        return f"malformed RLE counts ({error})"
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        return f"RLE runs cover {sum(runs)} pixels, not {height} * {width}"
    return None


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygon list, uncompressed or compressed RLE) -> (height, width) uint8 mask."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    return mask_utils.decode(rle)


class CocoInstanceDataset(SegmentationDataset):
    """Items: image (3, H, W) uint8, labels (T,) int64 contiguous over the JSON's categories, masks (T, H, W)
    bool, image_id, file_name, orig_size (H, W). Crowd annotations are not targets.

    Polygons are transformed as coordinates and rasterized at the training resolution; RLE masks are decoded
    at the original size and resized with nearest neighbour. Instances empty after the crop are dropped.

    skip_empty leaves out the images without a non-crowd annotation, as Mask2Former's training set does
    (detectron2's FILTER_EMPTY_ANNOTATIONS: about 1,000 of train2017's 118,287 images).
    """

    def __init__(
        self,
        root: str,
        split: str,
        transforms=None,
        *,
        seed: int = 0,
        skip_empty: bool = False,
        layout: str = "coco",
    ):
        super().__init__(transforms, seed)
        paths = coco_paths(root, split, layout)
        data = read_json(paths["instances_json"])
        self.metadata = DatasetMetadata(
            data["categories"],
            panoptic_json=paths["panoptic_json"] if os.path.isfile(paths["panoptic_json"]) else None,
            panoptic_root=paths["panoptic_root"] if os.path.isdir(paths["panoptic_root"]) else None,
            instances_json=paths["instances_json"],
            image_root=paths["image_root"],
        )
        annotations_by_image: dict[int, list] = {}
        images_by_id = {image["id"]: image for image in data["images"]}
        for annotation in data["annotations"]:
            if annotation.get("iscrowd", 0):
                continue
            label = self.metadata.category_id_to_contiguous.get(annotation["category_id"])
            if label is None:
                raise DatasetError(
                    f"{paths['instances_json']}: annotation id {annotation.get('id')} has unknown "
                    f"category_id {annotation['category_id']}"
                )
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list) and not all(isinstance(p, list) for p in segmentation):
                raise DatasetError(
                    f"{paths['instances_json']}: annotation id {annotation.get('id')}: segmentation must be "
                    "a list of polygons [[x1, y1, x2, y2, ...], ...]"
                )
            if isinstance(segmentation, dict):
                image = images_by_id.get(annotation["image_id"])
                problem = image and rle_problem(segmentation, image["height"], image["width"])
                if problem:
                    raise DatasetError(
                        f"{paths['instances_json']}: annotation id {annotation.get('id')}: {problem}"
                    )
            annotations_by_image.setdefault(annotation["image_id"], []).append((label, segmentation))
        self.records = PackedRecords(
            (
                image["id"],
                image["file_name"],
                (image["height"], image["width"]),
                annotations_by_image.get(image["id"], []),
            )
            for image in sorted(data["images"], key=lambda image: image["id"])
            if not skip_empty or image["id"] in annotations_by_image
        )

    def __len__(self) -> int:
        return len(self.records)

    def source_files(self) -> list[str]:
        """Every file the items and the evaluation read: the annotation JSON and the images."""
        image_root = self.metadata.image_root
        return [self.metadata.instances_json] + [
            os.path.join(image_root, record[1]) for record in self.records
        ]

    def __getitem__(self, index: int) -> dict:
        image_id, file_name, size, annotations = self.records[index]
        image_path = os.path.join(self.metadata.image_root, file_name)
        image = read_image(image_path)
        check_image_size(image, size, image_path)
        geometry = self.geometry(index, *size)
        out_h, out_w = geometry.output_size

        masks = np.zeros((len(annotations), out_h, out_w), dtype=bool)
        for i, (_, segmentation) in enumerate(annotations):
            if isinstance(segmentation, list):
                polygons = geometry.apply_polygons([p for p in segmentation if len(p) >= 6])
                masks[i] = decode_segmentation(polygons, out_h, out_w) > 0
            else:
                mask = decode_segmentation(segmentation, *size)
                masks[i] = geometry.apply_segmentation(mask, fill=0) > 0
        masks = torch.from_numpy(masks)
        keep = masks.flatten(1).any(1)
        labels = torch.tensor([label for label, _ in annotations], dtype=torch.int64)
        return {
            "image": image_to_tensor(geometry.apply_image(image)),
            "labels": labels[keep],
            "masks": masks[keep],
            "image_id": image_id,
            "file_name": file_name,
            "orig_size": size,
        }

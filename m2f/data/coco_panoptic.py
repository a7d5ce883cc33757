"""COCO-format panoptic segmentation: COCO's layout (annotations/panoptic_{split}2017.json + PNG folder, images
in {split}2017/) or ADE20K's panoptic files (see coco_paths)."""

from __future__ import annotations

import os

import numpy as np
import torch

from m2f.data.ade20k import ade20k_paths, ade20k_root
from m2f.data.cityscapes import city_image_path
from m2f.data.common import (
    DatasetError,
    DatasetMetadata,
    PackedRecords,
    SegmentationDataset,
    check_image_size,
    image_to_tensor,
    index_map_from_ids,
    masks_from_index_map,
    read_image,
    read_json,
    read_panoptic_png,
)
from m2f.data.mapillary import mapillary_split_root

LAYOUTS = ("coco", "ade20k", "cityscapes", "mapillary")


def coco_paths(root: str, split: str, layout: str = "coco") -> dict[str, str]:
    """Files of a COCO-format panoptic and instance dataset under `root` for split "train" or "val".

    layout "coco": annotations/{panoptic,instances}_{split}2017.json, the PNGs in
    annotations/panoptic_{split}2017/, the images in {split}2017/ (any split name is used as {split}2017).
    layout "ade20k": ADE20K's panoptic and instance annotations as Mask2Former's preparation scripts write
    them into ADEChallengeData2016 (`root` may be its parent): ade20k_panoptic_{split}.json, the PNGs in
    ade20k_panoptic_{split}/, ade20k_instance_{split}.json, the images in images/{training,validation}/.
    layout "cityscapes": the panoptic annotations of cityscapesscripts' createPanopticImgs.py,
    gtFine/cityscapes_panoptic_{split}.json and the PNGs in gtFine/cityscapes_panoptic_{split}/, the images in
    leftImg8bit/{split}/<city>/ (image_file_name); no instance file ("instances_json" is left out).
    layout "mapillary": Mapillary Vistas' {training,validation}/panoptic/panoptic_2018.json with the PNGs
    beside it, the images in {training,validation}/images/; no instance file.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train' or 'val', got {split!r}")
    if layout == "cityscapes":
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' for the Cityscapes layout, got {split!r}")
        return {
            "panoptic_json": os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}.json"),
            "panoptic_root": os.path.join(root, "gtFine", f"cityscapes_panoptic_{split}"),
            "image_root": os.path.join(root, "leftImg8bit", split),
        }
    if layout == "mapillary":
        split_root = mapillary_split_root(root, split)
        return {
            "panoptic_json": os.path.join(split_root, "panoptic", "panoptic_2018.json"),
            "panoptic_root": os.path.join(split_root, "panoptic"),
            "image_root": os.path.join(split_root, "images"),
        }
    if layout == "ade20k":
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' for the ADE20K layout, got {split!r}")
        root = ade20k_root(root)
        return {
            "panoptic_json": os.path.join(root, f"ade20k_panoptic_{split}.json"),
            "panoptic_root": os.path.join(root, f"ade20k_panoptic_{split}"),
            "instances_json": os.path.join(root, f"ade20k_instance_{split}.json"),
            "image_root": ade20k_paths(root, split)[0],
        }
    if layout != "coco":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    annotations = os.path.join(root, "annotations")
    return {
        "panoptic_json": os.path.join(annotations, f"panoptic_{split}2017.json"),
        "panoptic_root": os.path.join(annotations, f"panoptic_{split}2017"),
        "instances_json": os.path.join(annotations, f"instances_{split}2017.json"),
        "image_root": os.path.join(root, f"{split}2017"),
    }


def image_file_name(file_name: str, layout: str) -> str:
    """The path under the image folder of an image the JSON names: file_name, or for Cityscapes
    <city>/file_name, the city being the file name's first part."""
    return city_image_path(file_name) if layout == "cityscapes" else file_name


class CocoPanopticDataset(SegmentationDataset):
    """Items: image (3, H, W) uint8, labels (T,) int64 contiguous, masks (T, H, W) bool, segment_ids (T,)
    int64 (the PNG ids), image_id, file_name, orig_size (H, W). Crowd segments and void are not targets. A
    segment the crop leaves out stays a target with an empty mask, as in Mask2Former's panoptic training
    mapper (COCOPanopticNewBaselineDatasetMapper; its instance mapper and CocoInstanceDataset drop them).

    Masks are decoded from the PNG's id-map after the geometric transform, at the training resolution.
    layout: "coco", "ade20k", "cityscapes" or "mapillary", where the files are (see coco_paths).
    """

    def __init__(self, root: str, split: str, transforms=None, *, seed: int = 0, layout: str = "coco"):
        super().__init__(transforms, seed)
        paths = coco_paths(root, split, layout)
        data = read_json(paths["panoptic_json"])
        instances_json = paths.get("instances_json")
        instances_json = instances_json if instances_json and os.path.isfile(instances_json) else None
        self.metadata = DatasetMetadata(
            data["categories"],
            panoptic_json=paths["panoptic_json"],
            panoptic_root=paths["panoptic_root"],
            instances_json=instances_json,
            image_root=paths["image_root"],
        )
        images = {image["id"]: image for image in data["images"]}
        records = []
        for annotation in data["annotations"]:
            image_id = annotation["image_id"]
            if image_id not in images:
                raise DatasetError(f"{paths['panoptic_json']}: annotation for unknown image id {image_id}")
            image = images[image_id]
            segments, crowd_segments = [], []
            for segment in annotation["segments_info"]:
                label = self.metadata.category_id_to_contiguous.get(segment["category_id"])
                if label is None:
                    raise DatasetError(
                        f"{paths['panoptic_json']}: image id {image_id} segment id {segment['id']} has "
                        f"unknown category_id {segment['category_id']}"
                    )
                (crowd_segments if segment.get("iscrowd", 0) else segments).append((segment["id"], label))
            records.append(
                (
                    image_id,
                    image_file_name(image["file_name"], layout),
                    (image["height"], image["width"]),
                    annotation["file_name"],
                    segments,
                    crowd_segments,
                )
            )
        self.records = PackedRecords(records)

    def __len__(self) -> int:
        return len(self.records)

    def source_files(self) -> list[str]:
        """Every file the items and the evaluation read: the annotation JSONs, the images and the PNGs."""
        files = [self.metadata.panoptic_json] + (
            [self.metadata.instances_json] if self.metadata.instances_json else []
        )
        for _, file_name, _, png_name, _, _ in self.records:
            files += [
                os.path.join(self.metadata.image_root, file_name),
                os.path.join(self.metadata.panoptic_root, png_name),
            ]
        return files

    def load_semantic_gt(self, index: int) -> np.ndarray:
        """Semantic ground truth of item `index` at its original size, as Mask2Former derives it from the
        panoptic annotation for the mIoU of panoptic models: (H, W) int64, each segment's class (crowd
        segments too), void ignore_label."""
        _, _, size, png_name, segments, crowd_segments = self.records[index]
        png_path = os.path.join(self.metadata.panoptic_root, png_name)
        ids = read_panoptic_png(png_path)
        check_image_size(ids, size, png_path)
        every_segment = segments + crowd_segments
        segment_ids = np.array([s[0] for s in every_segment], dtype=np.int64)
        labels = np.array([s[1] for s in every_segment] + [self.metadata.ignore_label], dtype=np.int64)
        return labels[index_map_from_ids(ids, segment_ids)]  # -1 (void) picks the last entry

    def __getitem__(self, index: int) -> dict:
        image_id, file_name, size, png_name, segments, _ = self.records[index]
        image_path = os.path.join(self.metadata.image_root, file_name)
        png_path = os.path.join(self.metadata.panoptic_root, png_name)
        image = read_image(image_path)
        check_image_size(image, size, image_path)
        ids = read_panoptic_png(png_path)
        check_image_size(ids, size, png_path)

        segment_ids = np.array([s[0] for s in segments], dtype=np.int64)
        labels = np.array([s[1] for s in segments], dtype=np.int64)
        index_map = index_map_from_ids(ids, segment_ids)

        def class_map() -> np.ndarray:
            return np.append(labels, self.metadata.ignore_label)[index_map]  # -1 (no target) picks the last

        geometry = self.geometry(index, *size, sem_seg=class_map)
        index_map = geometry.apply_segmentation(index_map, fill=-1)
        return {
            "image": image_to_tensor(geometry.apply_image(image)),
            "labels": torch.from_numpy(labels),
            "masks": masks_from_index_map(index_map, len(segments)),
            "segment_ids": torch.from_numpy(segment_ids),
            "image_id": image_id,
            "file_name": file_name,
            "orig_size": size,
        }

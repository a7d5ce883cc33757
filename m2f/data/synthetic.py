"""A small synthetic dataset in the COCO panoptic + instance layout (and the ADE20K, Cityscapes and Mapillary
Vistas layouts), so the same loaders, training and evaluation run on a laptop in minutes.

Each image has 2-3 textured stuff regions separated by wavy boundaries and 1-4 things; every thing class is a
distinct shape and colour (red circles, green rectangles, blue triangles), so a tiny model can learn them.
Shapes are polygons rasterized with pycocotools, so a fully visible thing's polygon annotation reproduces its
PNG segment exactly; occluded things are stored as compressed RLE of their visible part.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from m2f.checks import check_int
from m2f.data.ade20k import CLASSES_FILE, ade20k_paths
from m2f.data.cityscapes import (
    IMAGE_SUFFIX,
    INSTANCE_ID_BASE,
    INSTANCE_SUFFIX,
    LABEL_SUFFIX,
    city_image_path,
    cityscapes_categories,
    cityscapes_paths,
)
from m2f.data.coco_panoptic import coco_paths, image_file_name
from m2f.data.common import id_to_rgb
from m2f.data.mapillary import UNLABELED, mapillary_categories, mapillary_split_root
from m2f.files import write_bytes_atomic, write_json_atomic

THING_CATEGORIES = (
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 40, 40], "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "isthing": 1, "color": [40, 200, 60], "supercategory": "shape"},
    {"id": 5, "name": "triangle", "isthing": 1, "color": [40, 80, 230], "supercategory": "shape"},
)
STUFF_CATEGORIES = (
    {"id": 100, "name": "stripes", "isthing": 0, "color": [150, 190, 230], "supercategory": "texture"},
    {"id": 101, "name": "noise", "isthing": 0, "color": [170, 160, 90], "supercategory": "texture"},
    {"id": 102, "name": "checker", "isthing": 0, "color": [120, 120, 120], "supercategory": "texture"},
)
SYNTHETIC_CATEGORIES = THING_CATEGORIES + STUFF_CATEGORIES
MIN_THING_AREA = 12
# The Cityscapes classes the synthetic ones stand for in that layout (label ids; train ids 11, 13, 18, 0, 8, 2).
CITYSCAPES_LABEL_IDS = {1: 24, 3: 26, 5: 33, 100: 7, 101: 21, 102: 11}
# The Mapillary Vistas classes they stand for (category ids: Person, Car, Bicycle, Road, Vegetation, Building).
MAPILLARY_IDS = {1: 20, 3: 56, 5: 53, 100: 14, 101: 31, 102: 18}
SYNTHETIC_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}


def _thing_polygon(rng: np.random.Generator, category_id: int, size: int) -> list[float]:
    radius = rng.uniform(size / 10, size / 4.5)
    cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
    if category_id == 1:
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    elif category_id == 3:
        half_w, half_h = radius * rng.uniform(0.6, 1.0, size=2)
        xs = np.array([cx - half_w, cx + half_w, cx + half_w, cx - half_w])
        ys = np.array([cy - half_h, cy - half_h, cy + half_h, cy + half_h])
    else:
        xs = np.array([cx, cx + radius, cx - radius])
        ys = np.array([cy - radius, cy + radius * 0.8, cy + radius * 0.8])
    return np.round(np.stack([xs, ys], axis=1), 2).reshape(-1).tolist()


def _stuff_texture(category_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float texture of a stuff class."""
    base = np.array(next(c["color"] for c in STUFF_CATEGORIES if c["id"] == category_id), dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    if category_id == 100:
        pattern = np.where((yy // 4) % 2 == 0, 25.0, -25.0)
    elif category_id == 101:
        pattern = rng.normal(0, 30, size=(size, size))
    else:
        pattern = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 35.0, -35.0)
    return base + pattern[..., None]


def draw_scene(rng: np.random.Generator, size: int):
    """One synthetic image.

    Returns image (size, size, 3) uint8 and segments: list of dicts with mask (size, size) bool (visible
    part), category_id, isthing, polygon (the full polygon when the thing is fully visible, else None).
    Pixels in no segment are void.
    """
    yy, xx = np.mgrid[0:size, 0:size]
    num_stuff = int(rng.integers(2, 4))
    stuff_ids = rng.permutation([c["id"] for c in STUFF_CATEGORIES])[:num_stuff]
    bases = np.sort(rng.uniform(0.2, 0.8, size=num_stuff - 1)) * size
    region = np.zeros((size, size), dtype=np.int64)
    for base in bases:
        boundary = base + size * 0.06 * np.sin(xx * rng.uniform(0.03, 0.12) + rng.uniform(0, 2 * np.pi))
        region += yy >= boundary
    image = np.zeros((size, size, 3), dtype=np.float64)
    segments = []
    for k, category_id in enumerate(stuff_ids):
        mask = region == k
        image[mask] = _stuff_texture(int(category_id), size, rng)[mask]
        segments.append({"mask": mask, "category_id": int(category_id), "isthing": 0, "polygon": None})

    owner = np.full((size, size), -1, dtype=np.int64)
    things = []
    for i in range(int(rng.integers(1, 5))):
        category_id = int(rng.choice([c["id"] for c in THING_CATEGORIES]))
        polygon = _thing_polygon(rng, category_id, size)
        full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))).astype(bool)
        owner[full] = i
        color = next(c["color"] for c in THING_CATEGORIES if c["id"] == category_id)
        image[full] = np.asarray(color, dtype=np.float64) + rng.normal(0, 8, size=(int(full.sum()), 3))
        things.append((category_id, polygon, full))
    for i, (category_id, polygon, full) in enumerate(things):
        visible = owner == i
        if visible.sum() < MIN_THING_AREA:
            continue
        fully_visible = bool((visible == full).all())
        segments.append(
            {
                "mask": visible,
                "category_id": category_id,
                "isthing": 1,
                "polygon": polygon if fully_visible else None,
            }
        )
    for segment in segments[:num_stuff]:
        segment["mask"] &= owner < 0
    segments = [s for s in segments if s["mask"].any()]
    return np.clip(image, 0, 255).round().astype(np.uint8), segments


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))]


def _layout_categories(layout: str) -> tuple[dict[int, int], list[dict]]:
    """({synthetic category id: the layout's}, the layout's category list)."""
    if layout == "cityscapes":  # createPanopticImgs.py lists the 19 classes
        return CITYSCAPES_LABEL_IDS, cityscapes_categories()
    if layout == "mapillary":  # as Mapillary Vistas' panoptic_2018.json, all 65 classes
        return MAPILLARY_IDS, mapillary_categories()
    ids = {c["id"]: c["id"] if layout == "coco" else i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    return ids, [{**c, "id": ids[c["id"]]} for c in SYNTHETIC_CATEGORIES]


def _image_names(layout: str, split: str, n: int, first_id: int) -> tuple[int | str, str, str]:
    """(image id, image file name, panoptic PNG name) of image n of a split."""
    if layout == "coco":
        image_id = first_id + n
        return image_id, f"{image_id:012d}.jpg", f"{image_id:012d}.png"
    if layout in ("ade20k", "mapillary"):
        stem = _ade20k_stem(split, n) if layout == "ade20k" else _mapillary_stem(split, n)
        return stem, stem + ".jpg", stem + ".png"
    stem = _cityscapes_stem(split, n)
    return stem, stem + IMAGE_SUFFIX, stem + "_gtFine_panopticLabels.png"


def _write_split(
    out_dir: str,
    split: str,
    num_images: int,
    size: int,
    seed: int,
    first_id: int = 1,
    layout: str = "coco",
    write_label_maps=None,
) -> None:
    """The images and the panoptic and instance files of one split in `layout` (m2f.data.coco_paths). COCO:
    integer image ids from first_id, the categories' own ids; ADE20K (as Mask2Former's preparation scripts
    write them): the file stem as image id, a category's position in SYNTHETIC_CATEGORIES as its id;
    Cityscapes (as createPanopticImgs.py writes them): the stem as image id, the 19 classes with their label
    ids (CITYSCAPES_LABEL_IDS), PNG images, no instance file. write_label_maps(split, n, segments), if given,
    writes the label maps of image n from its draw_scene segments."""
    paths = coco_paths(out_dir, split, layout)
    category_ids, categories = _layout_categories(layout)
    images, panoptic_annotations, instance_annotations = [], [], []
    split_key = 0 if split == "train" else 1
    for n in range(num_images):
        rng = np.random.default_rng([seed, split_key, n])
        image, segments = draw_scene(rng, size)
        if write_label_maps is not None:
            write_label_maps(split, n, segments)
        image_id, file_name, png_name = _image_names(layout, split, n, first_id)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})

        segment_ids = rng.choice(256**3 - 1, size=len(segments), replace=False) + 1
        ids = np.zeros((size, size), dtype=np.int64)
        segments_info = []
        for segment_id, segment in zip(segment_ids.tolist(), segments):
            ids[segment["mask"]] = segment_id
            area = int(segment["mask"].sum())
            bbox = _bbox(segment["mask"])
            category_id = category_ids[segment["category_id"]]
            segments_info.append(
                {"id": segment_id, "category_id": category_id, "area": area, "bbox": bbox, "iscrowd": 0}
            )
            if segment["isthing"]:
                if segment["polygon"] is not None:
                    segmentation = [segment["polygon"]]
                else:
                    rle = mask_utils.encode(np.asfortranarray(segment["mask"].astype(np.uint8)))
                    segmentation = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
                instance_annotations.append(
                    {
                        "id": len(instance_annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "segmentation": segmentation,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
        panoptic_annotations.append(
            {"image_id": image_id, "file_name": png_name, "segments_info": segments_info}
        )
        image_bytes = (
            _encode(Image.fromarray(image), "PNG")
            if file_name.endswith(".png")
            else _encode(Image.fromarray(image), "JPEG", quality=95)
        )
        write_bytes_atomic(os.path.join(paths["image_root"], image_file_name(file_name, layout)), image_bytes)
        write_bytes_atomic(
            os.path.join(paths["panoptic_root"], png_name), _encode(Image.fromarray(id_to_rgb(ids)), "PNG")
        )

    # createPanopticImgs.py lists the images by path (city, then name); the other layouts are in that order.
    images.sort(key=lambda image: image_file_name(image["file_name"], layout))
    panoptic_annotations.sort(key=lambda annotation: image_file_name(annotation["file_name"], layout))
    write_json_atomic(
        paths["panoptic_json"],
        {"images": images, "annotations": panoptic_annotations, "categories": categories},
    )
    if "instances_json" in paths:
        things = [c for c in categories if c["isthing"]]
        write_json_atomic(
            paths["instances_json"],
            {"images": images, "annotations": instance_annotations, "categories": things},
        )


def _ade20k_stem(split: str, n: int) -> str:
    return f"ADE_{split}_{n + 1:08d}"


def _mapillary_stem(split: str, n: int) -> str:
    return f"synthetic_{split}_{n:06d}"


def _cityscapes_stem(split: str, n: int) -> str:
    return f"{SYNTHETIC_CITIES[split][n % 2]}_000000_{n:06d}"


def _check_arguments(num_train: int, num_val: int, image_size: int, seed: int) -> None:
    check_int("num_train", num_train, 0)
    check_int("num_val", num_val, 0)
    check_int("image_size", image_size, 32)
    check_int("seed", seed, 0)


def make_synthetic(
    out_dir: str, num_train: int = 64, num_val: int = 16, image_size: int = 128, seed: int = 0
) -> str:
    """Write the COCO layout under out_dir: annotations/{instances,panoptic}_{train,val}2017.json,
    annotations/panoptic_{train,val}2017/*.png and {train,val}2017/*.jpg. Same seed, same files.

    Categories: things circle (1), rectangle (3), triangle (5); stuff stripes (100), noise (101),
    checker (102).
    Returns out_dir.
    """
    _check_arguments(num_train, num_val, image_size, seed)
    _write_split(out_dir, "train", num_train, image_size, seed, first_id=1)
    _write_split(out_dir, "val", num_val, image_size, seed, first_id=100001)
    return out_dir


def make_synthetic_ade20k(
    out_dir: str, num_train: int = 64, num_val: int = 16, image_size: int = 128, seed: int = 0
) -> str:
    """Write the same scenes in the ADE20K layout under out_dir/ADEChallengeData2016, for the three tasks:
    semantic label PNGs (value = 1 + index of the category in SYNTHETIC_CATEGORIES, so classes 0..5 of
    ADE20KDataset; 0 for void) with classes.txt naming those six classes, and the panoptic and instance
    files of Mask2Former's ADE20K preparation (category id = that index; see m2f.data.coco_paths).
    Returns the ADEChallengeData2016 folder.

    The layout is whatever files the folders hold, so ValueError when they already hold ADE-named files
    beyond the ones this call writes (from a larger earlier run, or a real ADE20K): they would join the set.
    """
    _check_arguments(num_train, num_val, image_size, seed)
    root = os.path.join(out_dir, "ADEChallengeData2016")
    splits = (("train", num_train), ("val", num_val))
    for split, count in splits:
        written = {_ade20k_stem(split, n) for n in range(count)}
        prefix = f"ADE_{split}_"
        for path in (*ade20k_paths(root, split), coco_paths(root, split, "ade20k")["panoptic_root"]):
            names = os.listdir(path) if os.path.isdir(path) else []
            extra = sorted(
                name for name in names if name.startswith(prefix) and os.path.splitext(name)[0] not in written
            )
            if extra:
                raise ValueError(
                    f"{path} holds {len(extra)} ADE20K files besides the {count} this call writes (e.g. "
                    f"{extra[0]}), which would join the dataset; write into an empty folder"
                )
    names = "".join(f"{category['name']}\n" for category in SYNTHETIC_CATEGORIES)
    write_bytes_atomic(os.path.join(root, CLASSES_FILE), names.encode())
    value_of = {c["id"]: i + 1 for i, c in enumerate(SYNTHETIC_CATEGORIES)}

    def write_label_map(split: str, n: int, segments: list[dict]) -> None:
        labels = np.zeros((image_size, image_size), dtype=np.uint8)
        for segment in segments:
            labels[segment["mask"]] = value_of[segment["category_id"]]
        write_bytes_atomic(
            os.path.join(ade20k_paths(root, split)[1], _ade20k_stem(split, n) + ".png"),
            _encode(Image.fromarray(labels), "PNG"),
        )

    for split, count in splits:
        _write_split(root, split, count, image_size, seed, layout="ade20k", write_label_maps=write_label_map)
    return root


def make_synthetic_cityscapes(
    out_dir: str, num_train: int = 64, num_val: int = 16, image_size: int = 128, seed: int = 0
) -> str:
    """Write the same scenes in the Cityscapes layout under out_dir for the three tasks: the images in
    leftImg8bit/{train,val}/<city>/; in gtFine/{split}/<city>/, train id maps *_gtFine_labelTrainIds.png and
    instance id maps *_gtFine_instanceIds.png (16-bit; label id * 1000 + the object's number within its class
    for things, the label id for stuff, 0 for void); the panoptic files of createPanopticImgs.py
    (gtFine/cityscapes_panoptic_{split}.json and PNG folder, the 19 classes with label ids as category ids);
    two cities per split. The synthetic classes stand for six of the Cityscapes classes
    (CITYSCAPES_LABEL_IDS). Same seed, same files. Returns out_dir."""
    _check_arguments(num_train, num_val, image_size, seed)
    train_id = {c["id"]: i for i, c in enumerate(cityscapes_categories())}

    def write_label_maps(split: str, n: int, segments: list[dict]) -> None:
        labels = np.full((image_size, image_size), 255, dtype=np.uint8)
        instance_ids = np.zeros((image_size, image_size), dtype=np.uint16)
        objects_of_class: dict[int, int] = {}
        for segment in segments:
            label_id = CITYSCAPES_LABEL_IDS[segment["category_id"]]
            labels[segment["mask"]] = train_id[label_id]
            if segment["isthing"]:
                number = objects_of_class[label_id] = objects_of_class.get(label_id, -1) + 1
                instance_ids[segment["mask"]] = label_id * INSTANCE_ID_BASE + number
            else:
                instance_ids[segment["mask"]] = label_id
        label_root = cityscapes_paths(out_dir, split)[1]
        stem = os.path.join(label_root, city_image_path(_cityscapes_stem(split, n)))
        write_bytes_atomic(stem + LABEL_SUFFIX, _encode(Image.fromarray(labels), "PNG"))
        write_bytes_atomic(stem + INSTANCE_SUFFIX, _encode(Image.fromarray(instance_ids), "PNG"))

    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(
            out_dir, split, count, image_size, seed, layout="cityscapes", write_label_maps=write_label_maps
        )
    return out_dir


def make_synthetic_mapillary(
    out_dir: str, num_train: int = 64, num_val: int = 16, image_size: int = 128, seed: int = 0
) -> str:
    """Write the same scenes in Mapillary Vistas' layout under out_dir for the semantic and panoptic tasks:
    {training,validation}/images/*.jpg, the label maps {split}/labels/*.png (category id - 1, 65 for void)
    and {split}/panoptic/panoptic_2018.json with its PNGs (all 65 categories). The synthetic classes stand for
    six of them (MAPILLARY_IDS). Same seed, same files. Returns out_dir."""
    _check_arguments(num_train, num_val, image_size, seed)

    def write_label_map(split: str, n: int, segments: list[dict]) -> None:
        labels = np.full((image_size, image_size), UNLABELED, dtype=np.uint8)
        for segment in segments:
            labels[segment["mask"]] = MAPILLARY_IDS[segment["category_id"]] - 1
        path = os.path.join(
            mapillary_split_root(out_dir, split), "labels", _mapillary_stem(split, n) + ".png"
        )
        write_bytes_atomic(path, _encode(Image.fromarray(labels), "PNG"))

    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(
            out_dir, split, count, image_size, seed, layout="mapillary", write_label_maps=write_label_map
        )
    return out_dir

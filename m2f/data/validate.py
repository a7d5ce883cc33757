"""Up-front dataset checks: every problem is named with its file and id before training or evaluation."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from m2f.data.ade20k import ade20k_class_names, ade20k_paths
from m2f.data.cityscapes import (
    CITYSCAPES_CLASSES,
    INSTANCE_ID_BASE,
    CityscapesDataset,
    CityscapesInstanceDataset,
    label_ids,
)
from m2f.data.coco_instance import rle_problem
from m2f.data.coco_panoptic import coco_paths, image_file_name
from m2f.data.common import (
    IGNORE_LABEL,
    DatasetError,
    naming_unreadable,
    oriented_size,
    pool_context,
    read_json,
    read_label_png,
    read_panoptic_png,
)
from m2f.data.mapillary import UNLABELED, MapillaryVistasDataset

TASKS = ("panoptic", "instance", "semantic")
MAX_CITYSCAPES_LABEL_ID = 33  # bicycle; the labels of cityscapesscripts (0 is unlabeled)
PNGS_PER_WORKER = 64


def _list_files(folder: str) -> set[str]:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def _check_categories(json_path: str, categories: list[dict], problems: list[str]) -> set[int]:
    counts = Counter(c["id"] for c in categories)
    for category_id, count in counts.items():
        if count > 1:
            problems.append(f"{json_path}: category id {category_id} appears {count} times")
    return set(counts)


def _check_images(
    json_path: str, image_root: str, images: list[dict], problems: list[str], layout: str = "coco"
) -> dict[int, dict]:
    present = _list_files(image_root)
    by_id: dict[int, dict] = {}
    for image in images:
        if image["id"] in by_id:
            problems.append(f"{json_path}: image id {image['id']} appears more than once")
        by_id[image["id"]] = image
        file_name = image_file_name(image["file_name"], layout)
        if file_name not in present and not os.path.isfile(os.path.join(image_root, file_name)):
            problems.append(
                f"{os.path.join(image_root, file_name)}: missing image file (image id {image['id']})"
            )
    return by_id


def check_panoptic_png(
    png_path: str, image_id: int, height: int, width: int, segment_ids: list[int]
) -> list[str]:
    """Problems of one panoptic PNG against its JSON segments (missing file, size, ids in one but not the
    other)."""
    if not os.path.isfile(png_path):
        return [f"{png_path}: missing panoptic PNG (image id {image_id})"]
    try:
        ids = read_panoptic_png(png_path)
    except DatasetError as error:
        return [f"{error} (image id {image_id})"]
    problems = []
    if ids.shape != (height, width):
        problems.append(
            f"{png_path}: image id {image_id}: PNG size {ids.shape} differs from {(height, width)}"
        )
    present = set(np.unique(ids).tolist()) - {0}
    for segment_id in sorted(set(segment_ids) - present):
        problems.append(f"{png_path}: image id {image_id}: segment id {segment_id} in JSON but not in PNG")
    for segment_id in sorted(present - set(segment_ids)):
        problems.append(f"{png_path}: image id {image_id}: segment id {segment_id} in PNG but not in JSON")
    return problems


def _check_panoptic_png_job(job) -> list[str]:
    return check_panoptic_png(*job)


def _validate_panoptic(
    paths: dict[str, str], layout: str, check_files: bool, num_workers: int, problems: list[str]
) -> dict:
    json_path = paths["panoptic_json"]
    data = read_json(json_path)
    category_ids = _check_categories(json_path, data["categories"], problems)
    images = _check_images(json_path, paths["image_root"], data["images"], problems, layout)
    annotated = set()
    png_jobs = []
    num_segments = 0
    for annotation in data["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in images:
            problems.append(
                f"{json_path}: annotation {annotation['file_name']} has unknown image id {image_id}"
            )
            continue
        if image_id in annotated:
            problems.append(f"{json_path}: image id {image_id} has more than one annotation")
        annotated.add(image_id)
        segment_ids = []
        for segment in annotation["segments_info"]:
            num_segments += 1
            where = f"{json_path}: image id {image_id}: segment id {segment['id']}"
            if segment["id"] in segment_ids:
                problems.append(f"{where} appears more than once")
            segment_ids.append(segment["id"])
            if segment["id"] == 0:
                problems.append(f"{where} is the void id")
            if segment["category_id"] not in category_ids:
                problems.append(f"{where} has unknown category_id {segment['category_id']}")
            if segment.get("area", 1) <= 0:
                problems.append(f"{where} is an empty segment (area {segment.get('area')})")
        png_path = os.path.join(paths["panoptic_root"], annotation["file_name"])
        image = images[image_id]
        png_jobs.append((png_path, image_id, image["height"], image["width"], segment_ids))
    for image_id in sorted(set(images) - annotated):
        problems.append(
            f"{json_path}: image id {image_id} ({images[image_id]['file_name']}) has no annotation"
        )
    if check_files:
        workers = min(num_workers, len(png_jobs) // PNGS_PER_WORKER)  # a process only pays off from there
        if workers > 1:
            with pool_context().Pool(workers) as pool:
                results = pool.map(
                    _check_panoptic_png_job, png_jobs, chunksize=max(1, len(png_jobs) // (8 * workers))
                )
        else:
            results = [_check_panoptic_png_job(job) for job in png_jobs]
        for result in results:
            problems.extend(result)
    return {"images": len(images), "annotations": len(png_jobs), "segments": num_segments}


def _is_empty_segmentation(segmentation, height: int, width: int) -> bool:
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return True
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return int(mask_utils.area(rle)) == 0


def _validate_instance(paths: dict[str, str], check_files: bool, problems: list[str]) -> dict:
    json_path = paths["instances_json"]
    data = read_json(json_path)
    category_ids = _check_categories(json_path, data["categories"], problems)
    images = _check_images(json_path, paths["image_root"], data["images"], problems)
    seen_ids = set()
    for annotation in data["annotations"]:
        where = f"{json_path}: image id {annotation.get('image_id')}: annotation id {annotation.get('id')}"
        if annotation.get("id") in seen_ids:
            problems.append(f"{where} appears more than once")
        seen_ids.add(annotation.get("id"))
        image = images.get(annotation.get("image_id"))
        if image is None:
            problems.append(f"{where} has an unknown image id")
            continue
        if annotation.get("category_id") not in category_ids:
            problems.append(f"{where} has unknown category_id {annotation.get('category_id')}")
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            problem = rle_problem(segmentation, image["height"], image["width"])
            if problem:
                problems.append(f"{where}: {problem}")
                continue
        if isinstance(segmentation, list) and not all(isinstance(p, list) for p in segmentation):
            problems.append(f"{where}: segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...]")
            continue
        if isinstance(segmentation, list) and any(len(p) % 2 for p in segmentation):
            problems.append(f"{where}: polygon with an odd number of coordinates")
            continue
        if segmentation is None:
            problems.append(f"{where} has no segmentation")
        elif check_files and _is_empty_segmentation(segmentation, image["height"], image["width"]):
            problems.append(f"{where} is an empty segment")
    return {"images": len(images), "annotations": len(data["annotations"])}


def _read_oriented_size(path: str) -> tuple[int, int]:
    with naming_unreadable(path), Image.open(path) as image:
        return oriented_size(image)


def _read_or_report(read, path: str, problems: list[str]):
    """read(path), or None with the DatasetError's message appended to problems."""
    try:
        return read(path)
    except DatasetError as error:
        problems.append(str(error))
    return None


def _validate_semantic(root: str, split: str, check_files: bool, problems: list[str]) -> dict:
    image_root, annotation_root = ade20k_paths(root, split)
    num_classes = len(ade20k_class_names(root))
    for folder in (image_root, annotation_root):
        if not os.path.isdir(folder):
            problems.append(f"{folder}: folder not found")
    images = {os.path.splitext(f)[0]: f for f in _list_files(image_root) if f.lower().endswith(".jpg")}
    labels = {os.path.splitext(f)[0] for f in _list_files(annotation_root) if f.endswith(".png")}
    for stem in sorted(images.keys() - labels):
        problems.append(f"{os.path.join(annotation_root, stem + '.png')}: missing annotation PNG")
    for stem in sorted(labels - images.keys()):
        problems.append(f"{os.path.join(image_root, stem + '.jpg')}: missing image for this annotation")
    if check_files:
        for stem in sorted(images.keys() & labels):
            png_path = os.path.join(annotation_root, stem + ".png")
            image_path = os.path.join(image_root, images[stem])
            labels_array = _read_or_report(read_label_png, png_path, problems)
            image_size = _read_or_report(_read_oriented_size, image_path, problems)
            if labels_array is None or image_size is None:
                continue
            label_size = labels_array.shape[::-1]
            if label_size != image_size:
                problems.append(f"{png_path}: size {label_size} differs from the image's {image_size}")
            values = np.unique(labels_array)
            for value in values[values > num_classes].tolist():
                problems.append(f"{png_path}: unknown category {value} (labels are 0..{num_classes})")
    return {"images": len(images)}


def _validate_label_maps(build_dataset, unknown_values, check_files: bool, problems: list[str]) -> dict:
    """A dataset of one label map per image (build_dataset() -> it, with file_names, image_root and
    annotation_path): every image has its map, of its size, without a value unknown_values(values) (the
    problem of each unknown value) reports."""
    try:
        dataset = build_dataset()
    except DatasetError as error:
        problems.extend(error.problems or [str(error)])
        return {"images": 0}
    if check_files:
        for index, file_name in enumerate(dataset.file_names):
            png_path = dataset.annotation_path(index)
            image_path = os.path.join(dataset.image_root, file_name)
            raw = _read_or_report(read_label_png, png_path, problems)
            image_size = _read_or_report(_read_oriented_size, image_path, problems)
            if raw is None or image_size is None:
                continue
            if raw.shape[::-1] != image_size:
                problems.append(f"{png_path}: size {raw.shape[::-1]} differs from the image's {image_size}")
            problems.extend(f"{png_path}: {problem}" for problem in unknown_values(np.unique(raw)))
    return {"images": len(dataset)}


def _unknown_train_ids(values: np.ndarray) -> list[str]:
    unknown = values[(values >= len(CITYSCAPES_CLASSES)) & (values != IGNORE_LABEL)]
    return [f"unknown train id {value} (train ids are 0..18, 255 ignored)" for value in unknown.tolist()]


def _unknown_instance_ids(values: np.ndarray) -> list[str]:
    labels = label_ids(values)
    unknown = values[(labels < 0) | (labels > MAX_CITYSCAPES_LABEL_ID)]
    return [
        f"unknown value {value} (label ids are 0..{MAX_CITYSCAPES_LABEL_ID}, objects label id * "
        f"{INSTANCE_ID_BASE} + number)"
        for value in unknown.tolist()
    ]


def _unknown_mapillary_labels(values: np.ndarray) -> list[str]:
    unknown = values[values > UNLABELED]
    return [
        f"unknown label {value} (labels are 0..{UNLABELED - 1}, {UNLABELED} unlabeled)"
        for value in unknown.tolist()
    ]


def validate_dataset(
    root: str,
    split: str,
    task: str,
    *,
    check_files: bool = True,
    num_workers: int = 0,
    max_listed: int = 50,
    layout: str = "coco",
) -> dict:
    """Check a dataset before use. task: "panoptic" | "instance" (COCO format, in the files `layout` names:
    "coco", "ade20k", or "cityscapes" and "mapillary" for panoptic, see m2f.data.coco_paths; Cityscapes'
    instance id maps for instance with layout "cityscapes") or "semantic" (ADE20K's layout, or the label maps
    of Cityscapes (train ids) or Mapillary Vistas with their layout).

    Checks category ids, image files, panoptic PNGs (missing, size, segment ids in the JSON but not in the PNG
    and the reverse), empty segments and duplicates. check_files=False skips what reads or rasterizes every
    segment (the PNGs, semantic maps and instance polygons), which on a training set takes minutes. Returns counts; raises
    DatasetError listing every problem (the first max_listed in the message, all in `.problems`).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "instance" and layout == "mapillary":
        raise ValueError("Mapillary Vistas has no instance annotations here (semantic and panoptic only)")
    label_maps = task == "semantic" or (task == "instance" and layout == "cityscapes")
    paths = {} if label_maps else coco_paths(root, split, layout)
    problems: list[str] = []
    try:
        if task == "panoptic":
            summary = _validate_panoptic(paths, layout, check_files, num_workers, problems)
        elif layout == "cityscapes" and task == "semantic":
            summary = _validate_label_maps(
                lambda: CityscapesDataset(root, split), _unknown_train_ids, check_files, problems
            )
        elif layout == "cityscapes":
            summary = _validate_label_maps(
                lambda: CityscapesInstanceDataset(root, split), _unknown_instance_ids, check_files, problems
            )
        elif layout == "mapillary" and task == "semantic":
            summary = _validate_label_maps(
                lambda: MapillaryVistasDataset(root, split), _unknown_mapillary_labels, check_files, problems
            )
        elif task == "instance":
            summary = _validate_instance(paths, check_files, problems)
        else:
            summary = _validate_semantic(root, split, check_files, problems)
    except (KeyError, TypeError, AttributeError) as error:  # a JSON without the COCO format's keys and types
        if not paths:  # no JSON was read: not the data's fault
            raise
        json_path = paths["panoptic_json" if task == "panoptic" else "instances_json"]
        what = (
            f"a record lacks the key {error}"
            if isinstance(error, KeyError)
            else f"{type(error).__name__}: {error}"
        )
        problems.append(f"{json_path}: not a COCO {task} annotation file ({what})")
    if problems:
        listed = "\n".join(problems[:max_listed])
        more = f"\n... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise DatasetError(
            f"{len(problems)} problem(s) in the {task} {split} dataset at {root}:\n{listed}{more}", problems
        )
    return summary

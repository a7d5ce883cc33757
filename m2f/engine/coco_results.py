"""COCO results files from `m2f predict`'s per-image files (`m2f predict --coco-results IMAGES_JSON`), the
files COCO's evaluation tools and its test-server read:

  panoptic  panoptic_results.json: {"annotations": [{"image_id", "file_name": "<stem>.panoptic_ids.png",
            "segments_info": [{"id", "category_id", "isthing", "score"}]}]}, the PNGs in the same folder
            (panopticapi's pq_compute(gt_json, pred_json, gt_folder, pred_folder=that folder))
  instance  instances_results.json: [{"image_id", "category_id", "segmentation" (RLE, counts as str),
            "score"}], every instance the model keeps (top 100), no score threshold; no "bbox", so that
            mask AP's size ranges use the mask's area

Image ids come from the "images" of a COCO JSON (an annotation file, or image info such as
image_info_test-dev2017.json), matched by file name; category ids are the dataset's, which the checkpoint
must store. The files are assembled from the per-image files on disk, so a run resumed with --skip-existing
gives the same results as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2f.files import write_json_atomic

RESULTS_FILES = {"panoptic": "panoptic_results.json", "instance": "instances_results.json"}


def read_image_ids(path: str | os.PathLike) -> dict[str, int | str]:
    """{file name (without folders): image id} from a COCO JSON's "images" (ids are ints, or strings in
    ADE20K's panoptic and instance files); ValueError naming the file for a malformed list or a name listed
    twice."""
    from m2f.data.common import read_json

    content = read_json(str(path))
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list) or not all(
        isinstance(image, dict)
        and isinstance(image.get("id"), (int, str))
        and not isinstance(image.get("id"), bool)
        and isinstance(image.get("file_name"), str)
        for image in images
    ):
        raise ValueError(f'{path}: "images" must be a list of {{"id": int or str, "file_name": str, ...}}')
    ids: dict[str, int | str] = {}
    for image in images:
        name = Path(image["file_name"]).name
        if name in ids:
            raise ValueError(f"{path}: the file name {name!r} is listed twice")
        ids[name] = image["id"]
    return ids


def listed_images(
    images: Sequence[str | os.PathLike], image_ids: Mapping[str, int | str], path: str | os.PathLike
) -> list[str | os.PathLike]:
    """The images whose file name image_ids lists; ValueError when a listed image is not among them (a
    results file covers every image of its set)."""
    found = [image for image in images if Path(image).name in image_ids]
    missing = sorted(set(image_ids) - {Path(image).name for image in found})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} images that {path} lists are not among the inputs: {shown}")
    return found


def results_paths(tasks: Sequence[str], out_dir: Path) -> list[Path]:
    """The results files write_coco_results writes for `tasks` (its panoptic and instance ones)."""
    return [out_dir / RESULTS_FILES[task] for task in tasks if task in RESULTS_FILES]


def write_coco_results(
    tasks: Sequence[str], out_dir: Path, stem_ids: Mapping[str, int | str], category_ids: Sequence[int]
) -> None:
    """Writes the results file of each panoptic or instance task in `tasks` from the per-image files in
    out_dir; stem_ids maps each image's file stem to its image id, category_ids each class index to the
    dataset's id."""
    if "panoptic" in tasks:
        path = out_dir / RESULTS_FILES["panoptic"]
        write_json_atomic(
            path, {"annotations": [_panoptic_annotation(out_dir, s, i) for s, i in stem_ids.items()]}
        )
    if "instance" in tasks:
        path = out_dir / RESULTS_FILES["instance"]
        results = [
            r for stem, id_ in stem_ids.items() for r in _instance_results(out_dir, stem, id_, category_ids)
        ]
        write_json_atomic(path, results)


def _panoptic_annotation(out_dir: Path, stem: str, image_id: int | str) -> dict:
    from m2f.data.common import read_json

    segments = read_json(str(out_dir / f"{stem}.panoptic.json"))["segments_info"]
    return {
        "image_id": image_id,
        "file_name": f"{stem}.panoptic_ids.png",
        "segments_info": [
            {key: segment[key] for key in ("id", "category_id", "isthing", "score")} for segment in segments
        ],
    }


def _instance_results(
    out_dir: Path, stem: str, image_id: int | str, category_ids: Sequence[int]
) -> list[dict]:
    from m2f.evaluation.instance import masks_to_rles

    with np.load(out_dir / f"{stem}.instances.npz") as arrays:
        masks, scores, labels = arrays["masks"], arrays["scores"], arrays["labels"]
    if not len(masks):
        return []
    return [
        {"image_id": image_id, "category_id": category_ids[label], "segmentation": rle, "score": score}
        for rle, score, label in zip(masks_to_rles(masks), scores.tolist(), labels.tolist())
    ]

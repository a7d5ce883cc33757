"""Cityscapes instance segmentation AP, computed by cityscapesscripts' own evaluation
(evalInstanceLevelSemanticLabeling), which the benchmark and Mask2Former's tables use: AP averaged over the
IoU thresholds 0.50:0.05:0.95 and AP50, for each of the 8 thing classes and their mean; ground-truth objects
under 100 pixels and groups of objects are ignored, and an unmatched prediction that lies mostly on void or
ignored pixels is no false positive. It needs the `cityscapesscripts` package (the "cityscapes" extra)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tempfile
from collections.abc import Iterable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from m2f.data.common import DatasetMetadata, naming_unreadable
from m2f.evaluation.arrays import check_new_images
from m2f.evaluation.instance import check_instances, check_results_state, masks_to_rles
from m2f.files import write_bytes_atomic


def _load_cityscapes_evaluation():
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling
    except ImportError as error:
        raise ImportError(
            "Cityscapes instance AP is computed by cityscapesscripts: pip install cityscapesscripts (or the "
            "package's [cityscapes] extra)"
        ) from error
    return evalInstanceLevelSemanticLabeling


def write_instance_files(folder: str, name: str, instances: Iterable[tuple[np.ndarray, int, float]]) -> str:
    """One image's instances (mask (H, W) bool, label id, score) as cityscapesscripts' evaluation and the
    benchmark's server read them: folder/<name>.txt with a line "masks/<name>_<k>.png <label id> <score>" per
    instance, each mask a 1-bit PNG (a few hundred bytes, and quick to write at 2048 x 1024). Returns the text
    file's path."""
    lines = []
    for number, (mask, label_id, score) in enumerate(instances):
        mask_name = f"masks/{name}_{number}.png"
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(mask, dtype=bool)).save(buffer, format="PNG")
        write_bytes_atomic(os.path.join(folder, mask_name), buffer.getvalue())
        lines.append(f"{mask_name} {int(label_id)} {float(score)!r}\n")
    path = os.path.join(folder, f"{name}.txt")
    write_bytes_atomic(path, "".join(lines).encode())
    return path


class CityscapesInstanceEvaluator:
    """Accumulates predicted instances and computes Cityscapes' AP against the instance id maps.

    annotation_paths: {image_id: its *_gtFine_instanceIds.png}. update(image_id, instances) as
    InstanceEvaluator's: masks (K, H, W) bool at the original size, scores (K,), labels (K,) contiguous
    classes of `metadata` (written as their category ids, Cityscapes' label ids).
    compute() -> {"task": "instance", "benchmark": "cityscapes", "segm": {"AP", "AP50", "per_class": {name:
    AP}}, "num_images"}, in percent; a class with neither ground truth nor prediction has no AP (left out of
    the mean and of per_class, as cityscapesscripts does).
    """

    def __init__(self, metadata: DatasetMetadata, annotation_paths: dict[str, str]):
        self.metadata = metadata
        self.annotation_paths = dict(annotation_paths)
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list = []
        self._seen: set = set()

    def update(self, image_id, instances: dict) -> None:
        if image_id not in self.annotation_paths:
            raise ValueError(f"image_id {image_id} is not in the ground truth")
        check_new_images(self._seen, [image_id])
        path = self.annotation_paths[image_id]
        with naming_unreadable(path), Image.open(path) as png:  # the size, without decoding the pixels
            size = png.height, png.width
        masks, scores, labels = check_instances(image_id, instances, size, self.metadata.num_classes)
        self.image_ids.append(image_id)
        self._seen.add(image_id)
        if not len(masks):
            return
        for rle, score, label in zip(masks_to_rles(masks), scores.tolist(), labels.tolist()):
            category_id = self.metadata.contiguous_to_category_id[label]
            self.results.append(
                {"image_id": image_id, "category_id": category_id, "score": score, "segmentation": rle}
            )

    def get_state(self) -> dict:
        """The results so far (JSON-able), to gather across processes or store, and pass to merge_state."""
        return {"segm": self.results, "image_ids": self.image_ids}

    def merge_state(self, state: dict) -> None:
        check_results_state(state, {"segm": "segmentation"})
        check_new_images(self._seen, state["image_ids"])
        self.results.extend(state["segm"])
        self.image_ids.extend(state["image_ids"])
        self._seen.update(state["image_ids"])

    def compute(self) -> dict:
        evaluation = _load_cityscapes_evaluation()
        image_ids = sorted(set(self.image_ids))
        with tempfile.TemporaryDirectory() as folder:
            folder = os.path.realpath(folder)
            by_image: dict = {image_id: [] for image_id in image_ids}
            for result in self.results:
                by_image[result["image_id"]].append(result)
            prediction_files = [
                write_instance_files(
                    folder,
                    f"image{number:07d}",
                    (
                        (mask_utils.decode(r["segmentation"]).astype(bool), r["category_id"], r["score"])
                        for r in by_image[image_id]
                    ),
                )
                for number, image_id in enumerate(image_ids)
            ]
            args = copy.deepcopy(evaluation.args)
            args.predictionPath = folder
            args.gtInstancesFile = os.path.join(folder, "gtInstances.json")
            args.JSONOutput, args.quiet, args.colorized = False, True, False
            ground_truth = [os.path.abspath(self.annotation_paths[image_id]) for image_id in image_ids]
            working_folder = os.getcwd()
            os.chdir(folder)  # it also writes a matches.json into the working folder
            try:
                with contextlib.redirect_stdout(io.StringIO()) as printed:
                    averages = evaluation.evaluateImgLists(prediction_files, ground_truth, args)["averages"]
            except SystemExit:  # how the script reports an error, after printing it
                raise RuntimeError(
                    f"cityscapesscripts' evaluation failed: {printed.getvalue().strip()}"
                ) from None
            finally:
                os.chdir(working_folder)
        per_class = {
            name: 100 * float(values["ap"])
            for name, values in averages["classes"].items()
            if not math.isnan(values["ap"])
        }
        return {
            "task": "instance",
            "benchmark": "cityscapes",
            "segm": {
                "AP": 100 * float(averages["allAp"]),
                "AP50": 100 * float(averages["allAp50%"]),
                "per_class": per_class,
            },
            "num_images": len(image_ids),
        }

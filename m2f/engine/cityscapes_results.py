"""Cityscapes instance results from `m2f predict`'s per-image files (`m2f predict --cityscapes-results`): in
OUT/cityscapes_instance_results/, <stem>.txt per image with a line "masks/<stem>_<k>.png <label id> <score>"
per instance and the mask PNGs in masks/, the files cityscapesscripts' evalInstanceLevelSemanticLabeling and
the benchmark's server read (the server takes the folder zipped). Every instance the model keeps is listed
(top 100), no score threshold; label ids are the dataset's category ids, which the checkpoint must store.
The files are assembled from the per-image .instances.npz on disk, so a run resumed with --skip-existing
gives the same results as an uninterrupted one."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from m2f.files import write_bytes_atomic

RESULTS_FOLDER = "cityscapes_instance_results"


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


def write_cityscapes_results(out_dir: Path, stems: Sequence[str], category_ids: Sequence[int]) -> Path:
    """Writes the results folder from out_dir/<stem>.instances.npz of each stem (its earlier content
    removed first); category_ids maps each class index to the dataset's label id. Returns the folder."""
    folder = out_dir / RESULTS_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    for stem in stems:
        with np.load(out_dir / f"{stem}.instances.npz") as arrays:
            masks, scores, labels = arrays["masks"], arrays["scores"], arrays["labels"]
        label_ids = [category_ids[label] for label in labels.tolist()]
        write_instance_files(str(folder), stem, zip(masks, label_ids, scores.tolist()))
    return folder

"""`m2f predict IMAGES... --checkpoint F --out DIR`: runs a checkpoint on image files (a folder: its images,
expand_image_paths) and writes, per image, an overlay PNG with a legend (not with --no-overlay) and the raw
predictions:

  panoptic  <stem>.panoptic.png (overlay), <stem>.panoptic_ids.png (COCO panoptic PNG, id = R + 256 G +
            256^2 B), <stem>.panoptic.json (segments_info as in COCO panoptic: id, category_id (the dataset's
            category id when the checkpoint stores its categories, as trained checkpoints do; else the class
            index), isthing, plus class_index (the model's contiguous class) and name)
  instance  <stem>.instances.png (overlay), <stem>.instances.npz (masks (K, H, W) bool, scores, labels, boxes
            xyxy in pixels)
  semantic  <stem>.semantic.png (overlay), <stem>.semantic_labels.png (class index per pixel, 8 or 16 bit);
            with --category-ids <stem>.semantic_category_ids.png in its place (the dataset's category id of
            the class per pixel: ADE20K's class index + 1, the form its test server reads)

The model, its classes and the task come from the checkpoint's metadata (or --config for checkpoints that
store none). With --tta the semantic task runs Mask2Former's multi-scale and flip test (predict_semantic_tta).
Every file is written atomically; with --skip-existing an image whose files are all there is not
predicted again, so an interrupted run over many images continues where it stopped. Under torchrun the
ranks share the images. With --coco-results IMAGES_JSON the COCO results files of the panoptic and instance
tasks are written as well (coco_results.py), with --cityscapes-results the instance task's files for
Cityscapes' benchmark (cityscapes_results.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m2f import visualize
from m2f.config import ModelConfig
from m2f.engine import checkpoint as ckpt
from m2f.engine import cityscapes_results as cityscapes_files
from m2f.engine import coco_results as results_files
from m2f.engine import distributed as dist_utils
from m2f.engine.evaluate import (
    check_amp,
    inference_transform,
    load_inference_model,
    postprocess,
    predict_masks,
    predict_semantic_tta,
)
from m2f.files import (
    check_output_path,
    remove_stale_temporaries,
    save_image_atomic,
    save_npz_atomic,
    write_json_atomic,
)

# The files save_prediction writes per task, overlay first.
PREDICTION_SUFFIXES = {
    "panoptic": (".panoptic.png", ".panoptic_ids.png", ".panoptic.json"),
    "instance": (".instances.png", ".instances.npz"),
    "semantic": (".semantic.png", ".semantic_labels.png"),
}
# The semantic task's label file when it holds the dataset's category ids instead of class indices.
CATEGORY_ID_LABELS_SUFFIX = ".semantic_category_ids.png"
TASKS = tuple(PREDICTION_SUFFIXES)
# The files a folder given as input contributes (its prediction files left out).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_PREDICTION_FILE_SUFFIXES = (
    *(suffix for suffixes in PREDICTION_SUFFIXES.values() for suffix in suffixes),
    CATEGORY_ID_LABELS_SUFFIX,
)


def expand_image_paths(paths: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """Each folder in paths replaced by the image files directly in it (IMAGE_SUFFIXES, any case, sorted by
    name), except the files this command writes; other paths kept as given. ValueError naming a folder
    without images."""
    expanded = []
    for path in paths:
        if not Path(path).is_dir():
            expanded.append(path)
            continue
        files = sorted(
            child
            for child in Path(path).iterdir()
            if child.is_file()
            and child.suffix.lower() in IMAGE_SUFFIXES
            and not child.name.lower().endswith(_PREDICTION_FILE_SUFFIXES)
        )
        if not files:
            raise ValueError(f"folder {path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        expanded += files
    return expanded


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the EXIF orientation applied; ValueError naming the file if unreadable."""
    from m2f.data.common import DatasetError
    from m2f.data.common import read_image as read_rgb

    try:
        return read_rgb(str(path))
    except DatasetError as error:  # its message names the file; PIL's, its cause, says what is wrong
        raise ValueError(f"cannot read image {path}: {error.__cause__ or error}") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


@dataclasses.dataclass
class ClassInfo:
    """The classes of a checkpoint: names, thing class indices and, when stored, the dataset's category id of
    each class."""

    names: list[str]
    things: set[int]
    category_ids: list[int] | None


def class_info(metadata: dict[str, str], num_classes: int, checkpoint: str | os.PathLike) -> ClassInfo:
    """The classes the checkpoint's metadata names (its own count, whatever num_classes says); generic names
    for num_classes classes, all things, when it names none. CheckpointError for malformed metadata."""
    names, things, categories = ckpt.stored_classes(metadata, checkpoint)
    if names is None:
        names = [f"class {i}" for i in range(num_classes)]
    things = set(things) if things is not None else set(range(len(names)))
    category_ids = [c["id"] for c in categories] if categories and len(categories) == len(names) else None
    return ClassInfo(names, things, category_ids)


def checkpoint_classes(
    config, metadata: dict[str, str], shapes: dict, checkpoint: str | os.PathLike
) -> ClassInfo:
    """class_info for the checkpoint's class head (the config's class count where it has none)."""
    num_classes = ckpt.class_head_classes(shapes)
    return class_info(metadata, config.num_classes if num_classes is None else num_classes, checkpoint)


def check_stored_category_ids(
    option: str, classes: ClassInfo, checkpoint: str | os.PathLike, classes_hint: str
) -> None:
    """ValueError naming `option` when the checkpoint stores no dataset category ids; classes_hint: the
    `m2f convert --classes` values that store them."""
    if classes.category_ids is None:
        raise ValueError(
            f"{option}: {checkpoint} stores no dataset category ids (a trained checkpoint does; convert with "
            f"--classes {classes_hint})"
        )


def prediction_paths(task: str, stem: Path, overlay: bool = True, category_ids: bool = False) -> list[Path]:
    """The files save_prediction writes for `task` (overlay first, unless overlay is False; category_ids: the
    semantic labels as category ids)."""
    suffixes = PREDICTION_SUFFIXES[task]
    if task == "semantic" and category_ids:
        suffixes = (suffixes[0], CATEGORY_ID_LABELS_SUFFIX)
    return [Path(f"{stem}{suffix}") for suffix in (suffixes if overlay else suffixes[1:])]


def save_prediction(
    task: str,
    prediction,
    image: np.ndarray,
    stem: Path,
    classes: ClassInfo,
    score_threshold: float,
    *,
    overlay: bool = True,
    category_ids: bool = False,
) -> list[Path]:
    """Writes the raw files of one prediction and, with overlay, its overlay picture; returns their paths.
    category_ids: the semantic label file holds each pixel's category id (classes.category_ids must be set)."""
    from m2f.data import id_to_rgb

    class_names = classes.names
    overlay_path, *raw_paths = prediction_paths(task, stem, category_ids=category_ids)
    if task == "panoptic":
        panoptic_seg, segments_info = prediction
        panoptic_seg = panoptic_seg.cpu().numpy()
        segments = [{k: (v.item() if hasattr(v, "item") else v) for k, v in s.items()} for s in segments_info]
        if overlay:
            save_image_atomic(
                visualize.draw_panoptic(image, panoptic_seg, segments, class_names), overlay_path
            )
        save_image_atomic(Image.fromarray(id_to_rgb(panoptic_seg)), raw_paths[0])
        ids = classes.category_ids or range(len(class_names))
        file_segments = []
        for segment in segments:
            index = segment["category_id"]
            file_segments.append(
                {**segment, "category_id": ids[index], "class_index": index, "name": class_names[index]}
            )
        write_json_atomic(raw_paths[1], {"segments_info": file_segments}, indent=2)
    elif task == "instance":
        arrays = {k: v.cpu().numpy() for k, v in prediction.items()}
        if overlay:
            picture = visualize.draw_instances(
                image,
                arrays["masks"],
                arrays["labels"].tolist(),
                arrays["scores"].tolist(),
                class_names,
                score_threshold,
            )
            save_image_atomic(picture, overlay_path)
        save_npz_atomic(raw_paths[0], **arrays)
    else:
        labels = prediction.cpu().numpy()
        if overlay:
            save_image_atomic(
                visualize.draw_semantic(image, labels, class_names, ignore_index=None), overlay_path
            )
        largest = len(class_names)  # above every class index; one bit depth for all images of a checkpoint
        if category_ids:
            labels, largest = np.asarray(classes.category_ids)[labels], max(classes.category_ids)
        save_image_atomic(
            Image.fromarray(labels.astype(np.uint8 if largest < 256 else np.uint16)), raw_paths[0]
        )
    return [overlay_path, *raw_paths] if overlay else raw_paths


def checked_tasks(tasks: Sequence[str] | None, default: str, tta: bool = False) -> list[str]:
    """tasks (default [default]) each once, in the order given; TypeError for a string, ValueError for an
    unknown task or tta with a task other than semantic."""
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    tasks = list(dict.fromkeys(tasks or [default]))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {TASKS}, got {unknown}")
    if tta and tasks != ["semantic"]:
        raise ValueError(
            f"tta: the multi-scale and flip test is for the semantic task alone, got tasks {tasks}"
        )
    return tasks


def rgb_array(image) -> np.ndarray:
    """image (a path, a PIL image, an (H, W, 3) uint8 RGB array or a (3, H, W) uint8 tensor) as an (H, W, 3)
    uint8 RGB array; ValueError saying what was given otherwise."""
    if isinstance(image, str | os.PathLike):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if (
        isinstance(image, torch.Tensor)
        and image.dtype == torch.uint8
        and image.dim() == 3
        and image.shape[0] == 3
    ):
        return image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    described = (
        f"a {tuple(image.shape)} {image.dtype} {type(image).__name__}"
        if isinstance(image, torch.Tensor | np.ndarray)
        else f"a {type(image).__name__}"
    )
    raise ValueError(
        "image must be a path, a PIL image, an (H, W, 3) uint8 RGB array or a (3, H, W) uint8 tensor, got "
        + described
    )


class Predictor:
    """A checkpoint's model, ready to segment single images: `Predictor("model.safetensors")(image)`.

    checkpoint: an m2f .safetensors checkpoint; config: a config name, JSON file or ModelConfig (default: the
    one the checkpoint stores); device: default cuda when available, else cpu; amp: None, "bf16" or "fp16".
    Attributes: config, classes (ClassInfo: names, thing class indices, the dataset's category ids when
    stored), model (in eval mode, its frozen norms folded into the convs: for inference only), device.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        config: str | os.PathLike | ModelConfig | None = None,
        device: str | torch.device | None = None,
        amp: str | None = None,
    ):
        metadata, shapes = ckpt.read_header(checkpoint)
        config = ckpt.load_config_for_checkpoint(config, metadata, checkpoint)
        self.classes = checkpoint_classes(config, metadata, shapes, checkpoint)
        self.config = dataclasses.replace(config, num_classes=len(self.classes.names))
        check_amp(amp)  # before the model is built
        self.amp = amp
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_inference_model(self.config, checkpoint, metadata, self.device)
        self._transform = inference_transform(self.config)

    def __call__(self, image, tasks: Sequence[str] | None = None, *, tta: bool = False) -> dict:
        """Predictions for one image (see rgb_array for the forms it takes) at its own size: {task: ...} for
        each of tasks (default: the config's), "panoptic": (segment id map (H, W), segments_info: id,
        category_id (the class index), isthing), "instance": {masks (K, H, W) bool, scores, labels, boxes
        xyxy}, "semantic": the (H, W) class map. tta: the semantic task by Mask2Former's multi-scale and flip
        test. Class indices name self.classes.names."""
        return self.predict_array(rgb_array(image), checked_tasks(tasks, self.config.task, tta), tta=tta)

    def predict_array(self, image: np.ndarray, tasks: list[str], *, tta: bool = False) -> dict:
        """__call__ for an (H, W, 3) uint8 RGB array and checked tasks."""
        if tta:
            pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            scores = predict_semantic_tta(self.model, pixels, self.config, device=self.device, amp=self.amp)
            return {"semantic": scores.argmax(0)}
        resized = self._transform.get_geometry(*image.shape[:2]).apply_image(image)
        pixels = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        mask_cls, masks = predict_masks(self.model, pixels, device=self.device, amp=self.amp)
        return postprocess(tasks, mask_cls, masks, image.shape[:2], self.config, self.classes.things)


def run_prediction(
    images: Iterable[str | os.PathLike],
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config_name: str | ModelConfig | None = None,
    tasks: Sequence[str] | None = None,
    device: str | None = None,
    amp: str | None = None,
    score_threshold: float = 0.5,
    skip_existing: bool = False,
    tta: bool = False,
    coco_results: str | os.PathLike | None = None,
    cityscapes_results: bool = False,
    overlay: bool = True,
    category_ids: bool = False,
) -> list[Path]:
    """Predicts every image (a folder among images: the image files in it) and writes the files described in
    the module docstring; returns their paths. Under torchrun each rank predicts every world_size-th image
    and rank 0 writes the results files.

    tasks defaults to the checkpoint config's task. skip_existing: an image whose files for every task
    exist already is not predicted (its paths are still returned). tta: the semantic task (the only one
    allowed then) by Mask2Former's multi-scale and flip test. coco_results: a COCO JSON whose "images" name
    the images to predict among the inputs (all must be there) and their ids; the COCO results file of each
    panoptic and instance task is written too (m2f.engine.coco_results). cityscapes_results: the instance
    task's files for Cityscapes' benchmark too, in out_dir/cityscapes_instance_results/
    (m2f.engine.cityscapes_results; the folder is among the returned paths). overlay=False: the raw files only.
    category_ids: the semantic task's labels as the dataset's category ids (the checkpoint must store them)."""

    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"images must be a sequence of image paths, got the single path {str(images)!r}")
    images = expand_image_paths(list(images))  # an iterator (e.g. Path.glob) is read once
    if not images:
        raise ValueError("images must name at least one image file or folder")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise ValueError(f"image files not found: {', '.join(missing)}")
    if coco_results is not None:
        image_ids = results_files.read_image_ids(coco_results)
        images = results_files.listed_images(images, image_ids, coco_results)
    check_output_path(out_dir, "out", folder=True)
    images = list({Path(path).resolve(): path for path in images}.values())  # a file given twice runs once
    files_by_stem: dict[str, set[Path]] = {}
    for path in images:
        files_by_stem.setdefault(Path(path).stem, set()).add(Path(path).resolve())
    clashes = [sorted(map(str, files)) for files in files_by_stem.values() if len(files) > 1]
    if clashes:
        raise ValueError(
            "images with the same name (less its suffix) would write the same output files: "
            + "; ".join(" and ".join(files) for files in clashes)
            + " (predict them into separate --out folders)"
        )
    device = dist_utils.init_distributed(device)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    metadata, shapes = ckpt.read_header(checkpoint)
    config = ckpt.load_config_for_checkpoint(config_name, metadata, checkpoint)
    classes = checkpoint_classes(config, metadata, shapes, checkpoint)
    tasks = checked_tasks(tasks, config.task, tta)
    if coco_results is not None:
        if not set(tasks) & set(results_files.RESULTS_FILES):
            raise ValueError(
                f"coco_results: COCO results files are for the panoptic and instance tasks, got {tasks}"
            )
        check_stored_category_ids("coco_results", classes, checkpoint, "<COCO annotation JSON>")
    if cityscapes_results:
        if "instance" not in tasks:
            raise ValueError(
                f"cityscapes_results: the Cityscapes results are the instance task's, got tasks {tasks}"
            )
        check_stored_category_ids("cityscapes_results", classes, checkpoint, "cityscapes-instance")
    if category_ids:
        if "semantic" not in tasks:
            raise ValueError(
                f"category_ids: the category id labels are the semantic task's, got tasks {tasks}"
            )
        check_stored_category_ids("category_ids", classes, checkpoint, "ade20k or a COCO annotation JSON")
    out_dir = Path(out_dir)
    outputs = {
        path: [
            p
            for task in tasks
            for p in prediction_paths(task, out_dir / Path(path).stem, overlay, category_ids)
        ]
        for path in images
    }
    inputs = {Path(path).resolve() for path in images}
    overwritten = [str(p) for paths in outputs.values() for p in paths if p.resolve() in inputs]
    if overwritten:
        raise ValueError(f"the outputs would overwrite input images: {', '.join(overwritten)}")
    predictor = Predictor(checkpoint, config=config, device=device, amp=amp)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_paths = results_files.results_paths(tasks, out_dir) if coco_results is not None else []
    if cityscapes_results:
        results_paths.append(out_dir / cityscapes_files.RESULTS_FOLDER)
    if rank == 0:  # what a killed earlier prediction of these images left half-written
        written_names = [p.name for paths in outputs.values() for p in paths] + [
            p.name for p in results_paths
        ]
        remove_stale_temporaries(out_dir, tuple(written_names))
    dist_utils.barrier()  # before any rank writes a temporary file
    problem = None
    try:
        for path in images[rank::world_size]:
            existing = outputs[path]
            if skip_existing and all(p.exists() for p in existing):
                continue
            image = read_image(path)
            for task, prediction in predictor.predict_array(image, tasks, tta=tta).items():
                stem = out_dir / Path(path).stem
                save_prediction(
                    task,
                    prediction,
                    image,
                    stem,
                    classes,
                    score_threshold,
                    overlay=overlay,
                    category_ids=category_ids,
                )
    except (ValueError, OSError) as error:  # e.g. an unreadable image
        problem = error
    # Every rank stops when one fails, instead of the others waiting for it in a collective.
    problems = [p for p in dist_utils.all_gather_object(problem) if p is not None]
    if problems:
        raise problems[0]
    if coco_results is not None and rank == 0:
        stem_ids = {Path(path).stem: image_ids[Path(path).name] for path in images}
        results_files.write_coco_results(tasks, out_dir, stem_ids, classes.category_ids)
    if cityscapes_results and rank == 0:
        stems = [Path(path).stem for path in images]
        cityscapes_files.write_cityscapes_results(out_dir, stems, classes.category_ids)
    dist_utils.barrier()
    return [p for path in images for p in outputs[path]] + results_paths

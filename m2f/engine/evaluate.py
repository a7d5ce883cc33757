"""Inference over a dataset with the evaluator that fits it: PQ (COCO panoptic), mask/box AP (COCO instance),
mIoU (ADE20K). Under torchrun each rank predicts a shard and rank 0 merges the evaluator states.

`m2f eval --config NAME --checkpoint F --data-root DIR` validates the dataset first, prints the result table
and writes the results as JSON. On the way it stores the evaluator state of every PART_SIZE images in a part
file (<results>.parts/part-NNNNNN.json, written atomically); `--resume` reuses the parts an interrupted run
finished, so only the missing ones are predicted. The folder is removed once the results are written.
`--tta` evaluates semantic segmentation with Mask2Former's multi-scale and flip test (predict_semantic_tta).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m2f.config import ModelConfig
from m2f.engine import checkpoint as ckpt
from m2f.engine import distributed as dist_utils
from m2f.engine.train import (
    AMP_DTYPES,
    DATASET_TASKS,
    build_dataset,
    check_dataset_kind,
    default_dataset_kind,
    validate_split,
)
from m2f.files import check_output_path, write_json_atomic
from m2f.models.postprocess import ImageMasks

PART_SIZE = 100  # images per part file of `m2f eval`
# Mask2Former's multi-scale test of semantic segmentation (TEST.AUG of its ADE20K configs: short sides 256 to
# 896 for a test size of 512, long sides at most 3584): the test size times each of these, each image also
# flipped, the long side at most the test's largest times the largest scale.
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def inference_transform(config):
    """detectron2's test-time resize: short side test_short_edge, long side at most test_max_size."""
    from m2f.data import ResizeShortestEdge

    return ResizeShortestEdge(config.inference.test_short_edge, config.inference.test_max_size)


def check_amp(amp: str | None) -> None:
    """ValueError unless amp is None or one of AMP_DTYPES' names."""
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be None or one of {sorted(AMP_DTYPES)}, got {amp!r}")


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    image: torch.Tensor,
    *,
    device: torch.device,
    amp: str | None = None,
) -> tuple[torch.Tensor, ImageMasks]:
    """One image (3, h, w) uint8 (already resized for inference) -> (class logits (Q, C+1) float32, the mask
    logits as ImageMasks: `masks.at((h, w))` gives them (Q, h, w) at the image's size, postprocess at the
    original size and for the queries each task needs).

    As detectron2's Mask2Former: the image is padded to the model's size divisibility (with the pixel mean,
    0 after normalization), and the masks, at 1/4 of the padded size, are upsampled to it and then cropped.
    """
    from m2f.models.padding import padded_size

    check_amp(amp)
    if model.training:
        raise ValueError(
            "predict_masks needs the model in eval mode (model.eval()): in training mode its batch norms "
            "would update their statistics and drop path would drop layers"
        )
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.uint8
        or image.dim() != 3
        or image.shape[0] != 3
    ):
        described = (
            f"a {tuple(image.shape)} {image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image)
        )
        raise ValueError(f"image must be a (3, h, w) uint8 tensor (RGB, 0..255), got {described}")
    height, width = image.shape[-2:]
    divisibility = model.size_divisibility
    padded_shape = (padded_size(height, divisibility), padded_size(width, divisibility))
    padded = model.pixel_mean.to(device).expand(1, 3, *padded_shape).clone()
    padded[..., :height, :width] = image.to(device)
    amp_dtype = AMP_DTYPES.get(amp)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(padded)
    masks = ImageMasks(outputs["pred_masks"][0].float(), padded_shape, (height, width))
    return outputs["pred_logits"][0].float(), masks


@torch.no_grad()
def predict_semantic_tta(
    model: nn.Module,
    image: torch.Tensor,
    config,
    *,
    device: torch.device,
    amp: str | None = None,
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
) -> torch.Tensor:
    """One image (3, H, W) uint8 at its original size -> (C, H, W) float32 class scores, the mean over the
    scaled copies (short side config.inference.test_short_edge x scale, long side at most test_max_size x
    max(scales)) and, with flip, their mirror images, of each copy's semantic_inference resized to (H, W)
    and mirrored back: Mask2Former's SemanticSegmentorWithTTA. argmax(0) gives the class map."""
    from m2f.data import ResizeShortestEdge
    from m2f.models.postprocess import semantic_inference

    if not scales or not all(isinstance(s, (int, float)) and 0 < s < float("inf") for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    height, width = image.shape[-2:]
    pixels = image.permute(1, 2, 0).numpy()
    inference = config.inference
    max_size = round(inference.test_max_size * max(scales))
    total = None
    for scale in scales:
        resize = ResizeShortestEdge(max(1, round(inference.test_short_edge * scale)), max_size)
        resized = resize.get_geometry(height, width).apply_image(pixels)
        resized = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        for flipped in (False, True) if flip else (False,):
            mask_cls, masks = predict_masks(
                model, resized.flip(-1) if flipped else resized, device=device, amp=amp
            )
            scores = _resize(semantic_inference(mask_cls, masks.at(masks.image_size)), (height, width))
            scores = scores.flip(-1) if flipped else scores
            total = scores if total is None else total + scores
    return total / (len(scales) * (2 if flip else 1))


def postprocess(
    tasks: Sequence[str],
    mask_cls: torch.Tensor,
    masks: ImageMasks,
    output_size: tuple[int, int],
    config,
    thing_classes: set[int],
) -> dict[str, Any]:
    """Applies Mask2Former's inference for each of `tasks` ("panoptic", "instance", "semantic") to
    predict_masks' results, at output_size (the original image size). In Mask2Former's order: the mask logits
    are resized to output_size first, except for a semantic model's semantic output, whose class scores are
    computed at the network input's size and resized. Only the queries a task reads are resized (panoptic:
    the confident ones, instance: those of the top (query, class) pairs), all of them once when a semantic
    output needs them; the results are those of resizing every query.

    Returns {task: prediction}: (panoptic_seg, segments_info) for panoptic, the instance dict (masks, scores,
    labels, boxes) for instance, and the (H, W) int64 class map for semantic."""
    from m2f.models import postprocess as post

    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    for task in tasks:
        if task not in ("panoptic", "instance", "semantic"):
            raise ValueError(f"task must be 'panoptic', 'instance' or 'semantic', got {task!r}")
    inference = config.inference
    semantic_of_logits = "semantic" in tasks and config.task != "semantic"
    all_resized = masks.at(output_size) if semantic_of_logits else None

    def resized(queries: torch.Tensor) -> torch.Tensor:
        return all_resized[queries] if all_resized is not None else masks.at(output_size, queries)

    predictions: dict[str, Any] = {}
    for task in tasks:
        if task == "semantic":
            if semantic_of_logits:
                predictions[task] = post.semantic_inference(mask_cls, all_resized).argmax(0)
            else:
                scores = post.semantic_inference(mask_cls, masks.at(masks.image_size))
                predictions[task] = _resize(scores, output_size).argmax(0)
        elif task == "panoptic":
            keep = post.confident_queries(mask_cls, inference.object_mask_threshold)
            predictions[task] = post.panoptic_inference(
                mask_cls[keep],
                resized(keep),
                thing_classes,
                object_mask_threshold=inference.object_mask_threshold,
                overlap_threshold=inference.overlap_threshold,
            )
        else:
            # Only a panoptic model's instances are restricted to thing classes (Mask2Former's rule): a
            # semantic model's classes may all be stuff.
            class_scores, labels, query_index = post.top_instance_queries(
                mask_cls,
                mask_cls.shape[-1] - 1,
                top_k=inference.top_k,
                thing_classes=thing_classes if config.task == "panoptic" else None,
            )
            queries, position = query_index.unique(return_inverse=True)
            predictions[task] = post.instances_from_logits(class_scores, labels, resized(queries)[position])
    return predictions


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, *size), bilinear, align_corners=False."""
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def make_evaluator(task: str, dataset):
    from m2f.data import CityscapesInstanceDataset
    from m2f.evaluation import (
        CityscapesInstanceEvaluator,
        InstanceEvaluator,
        PanopticEvaluator,
        SemanticEvaluator,
    )

    metadata = dataset.metadata
    if task == "panoptic":
        return PanopticEvaluator(metadata)
    if task == "instance" and isinstance(dataset, CityscapesInstanceDataset):
        return CityscapesInstanceEvaluator(metadata, dataset.annotation_paths())
    if task == "instance":
        return InstanceEvaluator(metadata)
    return SemanticEvaluator(metadata.num_classes, metadata.ignore_label, list(metadata.class_names))


def summarize(results: dict) -> dict[str, float]:
    """The headline numbers of an evaluator result: top-level numbers, nested groups as "group/name"
    (per-class values left out)."""
    summary = {}
    for key, value in results.items():
        if isinstance(value, bool) or key in ("per_class", "num_images"):
            continue
        if isinstance(value, int | float):
            summary[key] = float(value)
        elif isinstance(value, dict):
            summary.update({f"{key}/{k}": float(v) for k, v in summarize(value).items()})
    return summary


def _single_item(items: list):
    return items[0]


def evaluate_model(
    model: nn.Module,
    dataset,
    config,
    *,
    task: str | None = None,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    parts_dir: str | os.PathLike | None = None,
    run_key: dict | None = None,
    model_categories: list[dict] | None = None,
    tta: bool = False,
) -> dict:
    """Runs `model` over `dataset` (built with inference_transform; without transforms for tta) and evaluates
    it. tta: semantic segmentation by predict_semantic_tta of each original image.

    task defaults to the dataset's kind (panoptic for COCO panoptic, instance for COCO instance, semantic for
    ADE20K); "semantic" on COCO panoptic scores against its load_semantic_gt. model_categories: the COCO
    categories (id, name, isthing) of the model's classes when they are not the dataset's, as for a panoptic
    model evaluated on COCO instances (task "instance" only): its instances are mapped to the dataset's
    classes by category (same id and name), those of other categories (stuff) dropped; ValueError when no
    category is shared. With parts_dir, the images go in parts of PART_SIZE; each finished part's evaluator
    state is written to parts_dir/part-NNNNNN.json with run_key (what must match for a part to be reused:
    checkpoint, dataset, ...), and a part whose file is already there is read instead of predicted
    (ValueError naming the file when it belongs to another run or its state does not fit the evaluator). Returns {"results":
    the evaluator's dict, "summary": summarize(results)} on every rank.
    """
    from tqdm import tqdm

    from m2f.data import CityscapesInstanceDataset, CocoInstanceDataset, SemanticDataset

    device = torch.device(device)
    if task is None:
        task = (
            "semantic"
            if isinstance(dataset, SemanticDataset)
            else "instance"
            if isinstance(dataset, CocoInstanceDataset | CityscapesInstanceDataset)
            else "panoptic"
        )
    if tta and task != "semantic":
        raise ValueError(f"tta: the multi-scale and flip test is for semantic segmentation, not {task}")
    evaluator = make_evaluator(task, dataset)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count == 0:  # every metric would read 0, as for a model that finds nothing
        raise ValueError(
            f"nothing to evaluate: the dataset has {len(dataset)} images, max_images {max_images}"
        )
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    if parts_dir is None:
        my_parts = {0: list(range(rank, count, world_size))}
    else:
        run_key = json.loads(json.dumps(run_key))  # as it reads back from a part file (tuples become lists)
        parts = [list(range(start, min(start + PART_SIZE, count))) for start in range(0, count, PART_SIZE)]
        my_parts = {number: indices for number, indices in enumerate(parts) if number % world_size == rank}
    states, todo, problem = [], [], None
    try:
        for number, indices in my_parts.items():
            stored = _read_part(parts_dir, number, indices, run_key) if parts_dir is not None else None
            if stored is None:
                todo.append((number, indices))
            else:
                _check_part_state(evaluator, stored, _part_path(parts_dir, number))
                states.append(stored)
    except ValueError as error:
        problem = error
    # Every rank stops when one finds a bad part, instead of the others waiting for it in a collective.
    problems = [p for p in dist_utils.all_gather_object(problem) if p is not None]
    if problems:
        raise problems[0]
    thing_classes = set(dataset.metadata.thing_classes)
    to_dataset_label = None
    if model_categories is not None:
        if task != "instance":
            raise ValueError(f"model_categories maps instance predictions only, not {task} ones")
        thing_classes = {i for i, c in enumerate(model_categories) if c.get("isthing", 1) == 1}
        contiguous = dataset.metadata.category_id_to_contiguous
        names = {c["id"]: c["name"] for c in dataset.metadata.categories}
        labels = [contiguous[c["id"]] if names.get(c["id"]) == c["name"] else -1 for c in model_categories]
        if all(label < 0 for label in labels):
            raise ValueError("the model's classes share no category (id and name) with the dataset's")
        to_dataset_label = torch.tensor(labels)
    was_training = model.training
    model.eval()
    try:
        show = progress and dist_utils.is_main_process()
        todo_indices = [index for _, indices in todo for index in indices]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, todo_indices),
            batch_size=1,
            collate_fn=_single_item,
            num_workers=num_workers,
        )
        items = zip(tqdm(loader, desc=f"eval {task}", disable=not show, dynamic_ncols=True), todo_indices)
        for number, indices in todo:
            for item, index in itertools.islice(items, len(indices)):
                size = item["orig_size"]
                if tta:
                    if tuple(item["image"].shape[-2:]) != tuple(size):
                        raise ValueError(
                            f"tta: the dataset gives image {index} at {tuple(item['image'].shape[-2:])}, not at "
                            f"its original size {tuple(size)} (build it without transforms)"
                        )
                    scores = predict_semantic_tta(model, item["image"], config, device=device, amp=amp)
                    prediction = scores.argmax(0)
                else:
                    mask_cls, masks = predict_masks(model, item["image"], device=device, amp=amp)
                    prediction = postprocess([task], mask_cls, masks, size, config, thing_classes)[task]
                if task == "panoptic":
                    evaluator.update(item["image_id"], *prediction)
                elif task == "instance":
                    if to_dataset_label is not None:
                        prediction = _relabel_instances(prediction, to_dataset_label)
                    evaluator.update(item["image_id"], prediction)
                else:
                    evaluator.update(prediction, dataset.load_semantic_gt(index))
            states.append(evaluator.get_state())
            evaluator.reset()
            if parts_dir is not None:
                write_json_atomic(
                    _part_path(parts_dir, number), {"run": run_key, "indices": indices, "state": states[-1]}
                )
    finally:  # also when an evaluator refuses a prediction
        model.train(was_training)
    for state in states:
        evaluator.merge_state(state)
    states = dist_utils.all_gather_object(evaluator.get_state())
    results = None
    if dist_utils.is_main_process():
        evaluator.reset()
        for state in states:
            evaluator.merge_state(state)
        results = evaluator.compute()
    results = dist_utils.broadcast_object(results)
    return {"results": results, "summary": summarize(results)}


def _check_part_state(evaluator, state, path: Path) -> None:
    """ValueError naming the part file unless `state` merges into the (empty) evaluator, which is left empty."""
    try:
        evaluator.merge_state(state)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"{path}: not a readable evaluation part ({error!r}); delete {path.parent}"
        ) from error
    finally:
        evaluator.reset()


def _relabel_instances(instances: dict, to_dataset_label: torch.Tensor) -> dict:
    """instance_inference's dict with labels mapped by to_dataset_label (model class -> dataset class, -1
    for none); the instances of classes the dataset lacks are dropped."""
    labels = to_dataset_label.to(instances["labels"].device)[instances["labels"]]
    keep = labels >= 0
    relabelled = {key: value[keep] for key, value in instances.items()}
    relabelled["labels"] = labels[keep]
    return relabelled


def _part_path(parts_dir: str | os.PathLike, number: int) -> Path:
    return Path(parts_dir) / f"part-{number:06d}.json"


def _read_part(parts_dir, number: int, indices: list[int], run_key: dict | None) -> dict | None:
    """The evaluator state stored for part `number`, None when there is no file; ValueError naming the file
    when it belongs to another run."""
    path = _part_path(parts_dir, number)
    if not path.exists():
        return None
    try:
        part = json.loads(path.read_text())
        matches = part["run"] == run_key and part["indices"] == indices
        state = part["state"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable evaluation part ({error}); delete {path.parent}") from error
    if not matches:
        raise ValueError(
            f"{path} belongs to another evaluation (checkpoint, dataset or image count differ); delete "
            f"{path.parent} or run without --resume"
        )
    return state


def data_fingerprint(source_files: list[str], data_root: str | os.PathLike) -> str:
    """SHA-256 over (path under data_root, size, modification time) of every file the dataset reads
    (``source_files``), so that the parts of an evaluation are not reused for other data at the same path."""
    digest = hashlib.sha256()
    for path in sorted(source_files):
        try:
            stat = os.stat(path)
            signature = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # reading the item will say what is wrong with it
            signature = "unreadable"
        digest.update(f"{os.path.relpath(path, data_root)}\0{signature}\n".encode())
    return digest.hexdigest()


def build_checkpoint_model(config, checkpoint: str | os.PathLike) -> nn.Module:
    """build_model(config), an error naming the checkpoint when its config builds no model (an unknown timm
    name, a bad option)."""
    from m2f.models import build_model

    try:
        return build_model(config)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"{checkpoint}: config {config.name!r} builds no model ({error}); pass --config NAME"
        ) from error


def load_inference_model(
    config, checkpoint: str | os.PathLike, metadata: dict[str, str], device: str | torch.device = "cpu"
) -> nn.Module:
    """The checkpoint's model on device in eval mode, with the backbone's frozen norms folded into its convs
    (Backbone.fold_frozen_batchnorm): for inference, not for training or saving."""
    model = build_checkpoint_model(config, checkpoint).to(device)
    load_checkpoint_weights(model, checkpoint, metadata)
    model.backbone.fold_frozen_batchnorm()
    return model.eval()


def load_checkpoint_weights(
    model: nn.Module, checkpoint: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """ckpt.load_model_weights; when the weights do not fit a model of another config than the one the
    checkpoint stores (a --config given), the error starts by saying so."""
    try:
        ckpt.load_model_weights(model, checkpoint)
    except ckpt.CheckpointError as error:
        try:
            stored = json.loads(metadata["config"])["name"]
        except (KeyError, TypeError, ValueError):
            raise error from None
        if stored == model.config.name:
            raise
        raise ckpt.CheckpointError(
            f"{checkpoint} was saved with config {stored!r}, not {model.config.name!r} (leave --config out to "
            f"use the stored one): {error}"
        ) from None


# The tasks each dataset evaluates, its own first.
EVAL_TASKS = {
    "coco-panoptic": ("panoptic", "semantic"),
    "coco-instance": ("instance",),
    "ade20k": ("semantic",),
    "ade20k-panoptic": ("panoptic", "semantic"),
    "ade20k-instance": ("instance",),
    "cityscapes": ("semantic",),
    "cityscapes-panoptic": ("panoptic", "semantic"),
    "cityscapes-instance": ("instance",),
    "mapillary": ("semantic",),
    "mapillary-panoptic": ("panoptic", "semantic"),
}


def run_evaluation(
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    config_name: str | ModelConfig | None = None,
    dataset_kind: str | None = None,
    split: str = "val",
    output: str | os.PathLike | None = None,
    device: str | None = None,
    amp: str | None = None,
    max_images: int | None = None,
    num_workers: int = 2,
    validate: bool = True,
    progress: bool = True,
    resume: bool = False,
    tta: bool = False,
    task: str | None = None,
) -> dict:
    """`m2f eval`: validates the dataset, evaluates the checkpoint, prints the table (rank 0) and writes the
    results JSON (default: beside the checkpoint, <name>.eval-<dataset>-<split>.json; -<task> before .json for
    a task other than the dataset's, then -tta with tta). Returns the results. tta: semantic segmentation with
    Mask2Former's multi-scale and flip test. task: the dataset's (DATASET_TASKS) by default; "semantic" on
    coco-panoptic and ade20k-panoptic gives the mIoU Mask2Former reports for panoptic models (CocoPanopticDataset.load_semantic_gt).

    The evaluation goes in parts stored in <results JSON>.parts/ (module docstring); resume=True reuses the
    parts found there, else that folder is emptied first. It is removed after the results are written."""
    import dataclasses
    import shutil

    from m2f.evaluation import format_table, write_results

    device = dist_utils.init_distributed(device)
    if output:  # its kind now, before the data and the model; whether it is an input once those are known
        check_output_path(output, "output", inputs=[checkpoint])
    metadata, shapes = ckpt.read_header(checkpoint)
    head_classes = ckpt.class_head_classes(shapes)
    config = ckpt.load_config_for_checkpoint(config_name, metadata, checkpoint)
    dataset_kind = check_dataset_kind(dataset_kind or metadata.get("dataset") or default_dataset_kind(config))
    dataset_task = DATASET_TASKS[dataset_kind]
    task = task or dataset_task
    if task not in EVAL_TASKS[dataset_kind]:
        raise ValueError(
            f"task: {dataset_kind} evaluates {' or '.join(EVAL_TASKS[dataset_kind])}, not {task!r}"
        )
    if tta and task != "semantic":
        raise ValueError(
            f"tta: the multi-scale and flip test is for semantic segmentation (ade20k, or a panoptic set with task "
            f"semantic), not the {task} task of {dataset_kind}"
        )
    if validate:
        validate_split(data_root, split, dataset_kind)
    dataset = build_dataset(dataset_kind, data_root, split, None if tta else inference_transform(config))
    model_categories = ckpt.stored_classes(metadata, checkpoint)[2]
    if (
        model_categories is None
        or [c["id"] for c in model_categories] == dataset.metadata.contiguous_to_category_id
    ):
        model_categories = None
        num_classes = dataset.metadata.num_classes
        if head_classes is not None and head_classes != num_classes:
            raise ValueError(
                f"{checkpoint} has {head_classes} classes and stores no dataset categories to map "
                f"them to the {num_classes} classes of the {dataset_kind} dataset; evaluate it on its own "
                "dataset, or convert it again with --classes <that dataset's annotation JSON>"
            )
    elif task == "instance":  # e.g. a panoptic model's instance AP: its thing classes, by category id
        num_classes = len(model_categories)
    else:
        raise ValueError(
            f"{checkpoint} predicts other classes than the {dataset_kind} dataset has; only instance "
            "evaluation (--dataset coco-instance, ade20k-instance or cityscapes-instance) maps a model's "
            "classes to a dataset's"
        )
    config = dataclasses.replace(config, num_classes=num_classes)
    model = load_inference_model(config, checkpoint, metadata, device)
    checkpoint = Path(checkpoint)
    output = (
        Path(output)
        if output
        else checkpoint.with_name(
            f"{checkpoint.stem}.eval-{dataset_kind}-{split}{'' if task == dataset_task else '-' + task}"
            f"{'-tta' if tta else ''}.json"
        )
    )
    # Before the evaluation, not after it.
    source_files = dataset.source_files()
    check_output_path(output, "output", inputs=[checkpoint, *source_files])
    parts_dir = output.with_name(output.name + ".parts")
    if not resume and dist_utils.is_main_process():
        shutil.rmtree(parts_dir, ignore_errors=True)
    dist_utils.barrier()
    stat = checkpoint.stat()
    run_key = {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_size": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "data_root": str(Path(data_root).resolve()),
        "data_files": data_fingerprint(source_files, data_root),
        "dataset": dataset_kind,
        "split": split,
        "task": task,
        "config": config.to_dict(),
        "amp": amp,
        "tta": list(TTA_SCALES) if tta else None,
    }
    evaluation = evaluate_model(
        model,
        dataset,
        config,
        task=task,
        device=device,
        amp=amp,
        max_images=max_images,
        num_workers=num_workers,
        progress=progress,
        parts_dir=parts_dir,
        run_key=run_key,
        model_categories=model_categories,
        tta=tta,
    )
    results = evaluation["results"]
    if dist_utils.is_main_process():
        header = {"checkpoint": str(checkpoint), "dataset": dataset_kind}
        if tta:
            header["tta"] = {"scales": list(TTA_SCALES), "flip": True}
        write_results(str(output), {**header, **results})
        shutil.rmtree(parts_dir, ignore_errors=True)
        print(format_table(results))
        print(f"results written to {output}")
    return results

"""Checkpoint converters: Hugging Face transformers, detectron2 and mmdetection Mask2Former weights to m2f,
and m2f checkpoints back to those formats.

    state_dict = convert_checkpoint("model_final.pkl", "detectron2", "panoptic-r50")
    save(state_dict, "panoptic-r50.safetensors")

or, for a file that `m2f predict` / `m2f eval` read directly (config and class names in its metadata):

    convert_to_file("facebook-mask2former-swin-base-coco-panoptic/", "transformers", "panoptic-swin-b",
                    "panoptic-swin-b.safetensors", classes="annotations/panoptic_val2017.json")

Every format is mapped to detectron2's names first (m2f.convert.keymaps), then to m2f's. Nothing in a
checkpoint is executed: .pkl files go through a restricted unpickler, torch files through
torch.load(weights_only=True). Unknown, missing and mis-shaped keys raise ConversionError listing them.

The other way, an m2f checkpoint as a transformers model directory (`from_pretrained` loads it), a
detectron2 .pkl or an mmdet .pth:

    export_to_file("runs/r50/model_final.safetensors", "transformers", "r50-hf/")

Class names: transformers checkpoints give them in config.json ("id2label"), mmdet checkpoints in their meta;
detectron2 checkpoints have none. `classes` names them (and replaces the checkpoint's): a list of names,
"ade20k" or "cityscapes" (the built-in ADE20K and Cityscapes classes), a COCO annotation JSON (its
"categories": names and thing classes, as training stores them), a JSON list of names or a text file with one
name per line. Without any, predictions
use generic names ("class 0", ...). Files are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..config import ModelConfig, load_config
from ..engine.checkpoint import (
    CLASS_HEAD_KEYS,
    class_head_classes,
    load_config_for_checkpoint,
    read_header,
    read_weights,
    stored_classes,
)
from ..files import check_output_path, write_text_atomic
from .detectron2 import UnsafeCheckpointError, load_detectron2_state_dict, save_detectron2_pkl
from .keymaps import ConversionError, apply_rules, detect_backbone, detectron2_to_model_rules, reverse_rules
from .mmdet import detectron2_to_mmdet, load_mmdet_checkpoint, mmdet_to_detectron2, save_mmdet_checkpoint
from .transformers import (
    check_transformers_architecture,
    check_transformers_model,
    check_transformers_points,
    check_transformers_source,
    detectron2_to_transformers,
    load_transformers_state_dict,
    transformers_class_names,
    transformers_image_processor_config,
    transformers_model_config,
    transformers_to_detectron2,
    transformers_unused_tensors,
)

__all__ = [
    "FORMATS",
    "ConversionError",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "convert_to_file",
    "export_checkpoint",
    "export_to_file",
    "load_checkpoint_file",
    "read_checkpoint",
    "resolve_classes",
    "save",
]

StateDict = dict[str, torch.Tensor]
# (class names in class index order, thing class indices or None when unknown: predict then treats all
# classes as things)
ClassNames = tuple[list[str], list[int] | None]
_Map = Callable[[Mapping[str, torch.Tensor]], tuple[StateDict, list[str]]]

FORMATS = ("transformers", "detectron2", "mmdet")
CLASS_HEAD_KEY = CLASS_HEAD_KEYS[0]  # (classes + 1, hidden)

_LOADERS: dict[str, Callable[[Path], tuple[StateDict, ClassNames | None]]] = {
    "transformers": lambda path: (
        load_transformers_state_dict(path),
        _names_only(transformers_class_names(path)),
    ),
    "detectron2": lambda path: (load_detectron2_state_dict(path), None),
    "mmdet": load_mmdet_checkpoint,
}
_TO_DETECTRON2: dict[str, _Map] = {
    "transformers": transformers_to_detectron2,
    "detectron2": lambda sd: (dict(sd), []),
    "mmdet": mmdet_to_detectron2,
}
_FROM_DETECTRON2: dict[str, _Map] = {
    "transformers": detectron2_to_transformers,
    "detectron2": lambda sd: (dict(sd), []),
    "mmdet": detectron2_to_mmdet,
}
_LISTED = 20


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def _names_only(names: list[str] | None) -> ClassNames | None:
    return None if names is None else (names, None)


def read_checkpoint(path: str | Path, fmt: str) -> tuple[StateDict, ClassNames | None]:
    """(the tensors of a checkpoint file or directory of format `fmt`, untouched (foreign names); the class
    names it carries, or None)."""
    _check_format(fmt)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    return _LOADERS[fmt](path)


def load_checkpoint_file(path: str | Path, fmt: str) -> StateDict:
    """The tensors of a checkpoint file of format `fmt`, untouched (foreign names)."""
    return read_checkpoint(path, fmt)[0]


def _listing(label: str, keys: list[str]) -> str:
    more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"{len(keys)} {label}: {keys[:_LISTED]}{more}"


def _config_backbone(config) -> str:
    name = config.backbone.timm_name
    if "swin" in name:
        return "swin"
    if "resnet" in name:
        return "resnet"
    raise ConversionError(f"no checkpoint key map for backbone {name!r} (only ResNet and Swin)")


def _expected_state(config, num_classes: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Key -> (shape, dtype) of m2f's model for the config, built on the meta device (nothing allocated)."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(config, num_classes=num_classes)
    return {key: (t.shape, t.dtype) for key, t in model.state_dict().items()}


def convert_checkpoint(
    src: str | Path | Mapping[str, torch.Tensor], fmt: str, config_name: str | ModelConfig
) -> StateDict:
    """A foreign Mask2Former checkpoint as a state dict for `m2f.build_model(config_name, num_classes=C)`.

    src: a file path (format-specific loader, see the format modules) or an already-loaded state dict in
    the format's own names. config_name: one of m2f.config.CONFIG_NAMES, a config JSON file or a
    ModelConfig. C is read from the class head (its rows minus the no-object row). BatchNorm
    `num_batches_tracked` counters are dropped or zero-filled as the model needs. Raises ConversionError
    listing unknown keys (no rule for them), missing keys and shape mismatches.
    """
    _check_format(fmt)
    config = load_config(config_name)
    if isinstance(src, Mapping):
        state = dict(src)
    elif isinstance(src, str | Path):
        _check_architecture(src, fmt, config)
        state = load_checkpoint_file(src, fmt)
    else:
        raise TypeError(f"src must be a path or a state dict, got {type(src).__name__}")
    if fmt == "transformers":
        check_transformers_source(list(state))
        check_transformers_points(config)
    hub, unknown = _TO_DETECTRON2[fmt](state)
    if unknown:
        raise ConversionError(f"{fmt} checkpoint: {_listing('unknown keys', unknown)}")

    backbone = detect_backbone(hub)
    if backbone != _config_backbone(config):
        raise ConversionError(
            f"the checkpoint has a {backbone} backbone but config {config.name!r} uses "
            f"{config.backbone.timm_name!r}"
        )
    ours, unknown = apply_rules(hub, detectron2_to_model_rules(backbone))
    if unknown:
        raise ConversionError(f"{fmt} checkpoint: {_listing('unknown keys', unknown)}")
    if CLASS_HEAD_KEY not in ours:
        raise ConversionError(f"{fmt} checkpoint: no class head ({CLASS_HEAD_KEY} after renaming)")
    expected = _expected_state(config, ours[CLASS_HEAD_KEY].shape[0] - 1)
    return _match_expected(ours, expected, fmt)


def _check_architecture(src: str | Path, fmt: str, config: ModelConfig) -> None:
    """What the weights' shapes do not show, from the files beside them: the settings of a transformers
    config.json (check_transformers_architecture)."""
    if fmt == "transformers":
        check_transformers_architecture(src, config)


def _match_expected(
    ours: StateDict, expected: dict[str, tuple[torch.Size, torch.dtype]], fmt: str
) -> StateDict:
    counters = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in ours and k not in counters)
    unexpected = sorted(k for k in ours if k not in expected and not k.endswith("num_batches_tracked"))
    mismatched = sorted(
        f"{k} {tuple(ours[k].shape)} vs {tuple(expected[k][0])}"
        for k in expected
        if k in ours and ours[k].shape != expected[k][0]
    )
    problems = [
        _listing(label, keys)
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ConversionError(f"{fmt} checkpoint does not fit the model: " + "; ".join(problems))
    out = {}
    for key, (_, dtype) in expected.items():
        if key in ours:
            out[key] = ours[key].contiguous()
        else:  # a BatchNorm counter the source does not store (detectron2's FrozenBN)
            out[key] = torch.zeros((), dtype=dtype)
    return out


def export_checkpoint(
    state_dict: Mapping[str, torch.Tensor], fmt: str, config_name: str | ModelConfig
) -> StateDict:
    """The inverse of convert_checkpoint: an m2f state dict in `fmt`'s names (transformers: current names;
    mmdet: 3.x names). BatchNorm counters are kept where the format has a place for them."""
    _check_format(fmt)
    config = load_config(config_name)
    if fmt == "transformers":
        check_transformers_model(config)
    backbone = _config_backbone(config)
    hub, unknown = apply_rules(state_dict, reverse_rules(detectron2_to_model_rules(backbone)))
    if unknown:
        raise ConversionError(f"m2f state dict: {_listing('keys without a detectron2 name', unknown)}")
    out, unknown = _FROM_DETECTRON2[fmt](hub)
    if unknown:
        raise ConversionError(f"m2f state dict: {_listing(f'keys without a {fmt} name', unknown)}")
    return out


def save(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Writes `state_dict` to a .safetensors file atomically (temporary file, fsync, rename; the parent
    folder is created); tensors made contiguous, shared storage copied."""
    from safetensors.torch import save as to_bytes

    from ..files import write_bytes_atomic

    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in state_dict.items()}
    write_bytes_atomic(path, to_bytes(tensors, metadata=metadata))


_COCO_NAMES_HINT = (
    "COCO class names come from its annotation file: pass e.g. annotations/panoptic_val2017.json"
)


def _names_from_file(path: Path) -> tuple[ClassNames, list[dict] | None]:
    """(class names and things, the COCO categories sorted by id when the file is a COCO annotation JSON)."""
    text = path.read_text()
    if path.suffix != ".json":
        return ([line.strip() for line in text.splitlines() if line.strip()], None), None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"classes file {path}: invalid JSON ({error})") from error
    if isinstance(content, dict) and "categories" in content:
        from ..data.common import DatasetMetadata

        categories = content["categories"]
        if not isinstance(categories, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
            for c in categories
        ):
            raise ValueError(
                f'classes file {path}: "categories" must be a list of {{"id", "name", ...}} dicts'
            )
        dataset = DatasetMetadata(categories)
        return (list(dataset.class_names), sorted(dataset.thing_classes)), dataset.categories
    if isinstance(content, list) and all(isinstance(name, str) for name in content):
        return (list(content), None), None
    raise ValueError(
        f'classes file {path}: expected a COCO annotation file ("categories") or a list of names'
    )


def resolve_classes(classes: str | Path | Sequence[str]) -> ClassNames:
    """(class names, thing class indices or None) for the `classes` argument of convert_to_file: a list of
    names, "ade20k", "cityscapes", "cityscapes-instance" (its 8 thing classes), "mapillary" (Mapillary
    Vistas' 65), a COCO annotation JSON (names and isthing of its "categories", sorted by id), a JSON list of
    names, or a text file with one name per line."""
    return _resolve_classes(classes)[0]


def _resolve_classes(classes: str | Path | Sequence[str]) -> tuple[ClassNames, list[dict] | None]:
    """resolve_classes, and the dataset's categories (id, name, isthing per class) when `classes` gives them."""
    categories = None
    if isinstance(classes, str | Path):
        if str(classes) in ("ade20k", "cityscapes", "cityscapes-instance", "mapillary"):
            from ..data import (
                DatasetMetadata,
                ade20k_metadata,
                cityscapes_categories,
                cityscapes_thing_categories,
                mapillary_categories,
            )

            dataset = {
                "ade20k": ade20k_metadata,
                "cityscapes": lambda: DatasetMetadata(cityscapes_categories()),
                "cityscapes-instance": lambda: DatasetMetadata(cityscapes_thing_categories()),
                "mapillary": lambda: DatasetMetadata(mapillary_categories()),
            }[str(classes)]()
            return (list(dataset.class_names), sorted(dataset.thing_classes)), dataset.categories
        if str(classes) in ("coco-panoptic", "coco-instance"):
            raise ValueError(f"classes={str(classes)!r}: {_COCO_NAMES_HINT}")
        if str(classes) in ("ade20k-panoptic", "ade20k-instance"):
            raise ValueError(
                f"classes={str(classes)!r}: ADE20K's panoptic and instance classes (ids 0-149, things marked) come "
                "from their annotation files: pass e.g. ADEChallengeData2016/ade20k_panoptic_val.json ('ade20k' "
                "is the scene-parsing list)"
            )
        path = Path(classes)
        if not path.is_file():
            raise ValueError(
                f"classes must be a list of names, 'ade20k', 'cityscapes', 'cityscapes-instance', 'mapillary' or a file of names, got {str(classes)!r} "
                "(no such file)"
            )
        (names, things), categories = _names_from_file(path)
    elif isinstance(classes, Sequence) and all(isinstance(name, str) for name in classes):
        names, things = list(classes), None
    else:
        raise TypeError(
            f"classes must be a list of names, 'ade20k', 'cityscapes', 'cityscapes-instance', 'mapillary' or a file path, got {type(classes).__name__}"
        )
    if not names or not all(names):
        raise ValueError(f"classes must give one non-empty name per class, got {names[:10]!r}")
    return (names, things), categories


def convert_to_file(
    src: str | Path,
    fmt: str,
    config_name: str | ModelConfig,
    out: str | Path,
    *,
    classes: str | Path | Sequence[str] | None = None,
) -> tuple[StateDict, dict[str, str]]:
    """Converts the checkpoint at `src` (see convert_checkpoint) and writes it atomically to the .safetensors
    file `out` with the metadata `m2f predict` and `m2f eval` read: "config" (the config with the
    checkpoint's class count), "converted_from" ("fmt:file name") and, when known, "class_names" and
    "thing_classes" (JSON lists) and "categories" (the dataset's categories, when `classes` is a COCO
    annotation JSON, "ade20k" or "cityscapes": predict writes their ids, eval maps classes by them). Class names come from `classes` (see resolve_classes) if given, else from
    the checkpoint. Returns (state dict, metadata).

    Raises ValueError when `classes` does not give one name per class of the checkpoint, ConversionError
    when the checkpoint's own names do not."""
    _check_format(fmt)
    # bad `classes` and `out` fail before any loading
    given, categories = (None, None) if classes is None else _resolve_classes(classes)
    class_files = [classes] if isinstance(classes, str | Path) and Path(classes).is_file() else []
    check_output_path(out, "out", inputs=[src, *class_files])
    config = load_config(config_name)  # a JSON file is read once
    _check_architecture(src, fmt, config)
    state, found = read_checkpoint(src, fmt)
    state_dict = convert_checkpoint(state, fmt, config)
    num_classes = state_dict[CLASS_HEAD_KEY].shape[0] - 1
    if given is not None:
        found = given
        if len(found[0]) != num_classes:
            raise ValueError(
                f"classes gives {len(found[0])} names but the checkpoint has {num_classes} classes"
            )
    elif found is not None and len(found[0]) != num_classes:
        raise ConversionError(
            f"{src}: its {len(found[0])} class names do not match the {num_classes} classes of its class head; "
            "pass the right names as `classes`"
        )
    config = dataclasses.replace(config, num_classes=num_classes)
    metadata = {"config": json.dumps(config.to_dict()), "converted_from": f"{fmt}:{Path(src).name}"}
    if found is not None:
        names, things = found
        metadata["class_names"] = json.dumps(names)
        if things is not None:
            metadata["thing_classes"] = json.dumps(sorted(things))
    if categories is not None:
        metadata["categories"] = json.dumps(categories)
    save(state_dict, out, metadata=metadata)
    return state_dict, metadata


# What export_to_file writes: a model directory for transformers, a file of this suffix for the others.
TRANSFORMERS_FILES = ("model.safetensors", "preprocessor_config.json", "config.json")
EXPORT_SUFFIXES = {"detectron2": ".pkl", "mmdet": ".pth"}


def export_to_file(
    checkpoint: str | Path, fmt: str, out: str | Path, *, config_name: str | ModelConfig | None = None
) -> tuple[StateDict, list[Path]]:
    """Writes the m2f checkpoint `checkpoint` (a .safetensors file from training or convert_to_file) in
    format `fmt`; the inverse of convert_to_file. Returns (the exported state dict, the files written).

    transformers: `out` is a model directory that transformers' `from_pretrained` loads, holding
    model.safetensors, preprocessor_config.json (the config's test resize and normalization for
    `Mask2FormerImageProcessor`) and config.json (the architecture, read from the weights; the class names
    in id2label), written last, so that a directory with a config.json is complete. detectron2: `out` is a
    model-zoo .pkl (no class names: detectron2 keeps them in its dataset catalog). mmdet: `out` is a .pth
    with the state dict and meta["dataset_meta"] ("classes", "thing_classes").
    The config is the one stored in the checkpoint, or `config_name` when given, with the checkpoint's class
    count. Every file is written atomically. Raises ConversionError when the weights do not fit the config
    or the model has no form in `fmt` (check_transformers_model), ValueError for a bad `out`."""
    _check_format(fmt)
    if fmt == "transformers":
        check_output_path(out, "out", folder=True)
    else:
        check_output_path(out, "out", inputs=[checkpoint])
        if Path(out).suffix != EXPORT_SUFFIXES[fmt]:
            raise ValueError(f"out must be a {EXPORT_SUFFIXES[fmt]} file for {fmt}, got {str(out)!r}")
    metadata, shapes = read_header(checkpoint)
    config = load_config_for_checkpoint(config_name, metadata, checkpoint)
    num_classes = class_head_classes(shapes)
    if num_classes is None:
        raise ConversionError(f"{checkpoint}: no class head ({CLASS_HEAD_KEY})")
    config = dataclasses.replace(config, num_classes=num_classes)
    names, things, _ = stored_classes(metadata, checkpoint)
    state, _ = read_weights(checkpoint)
    _match_expected(state, _expected_state(config, num_classes), f"{checkpoint}: m2f")
    exported = export_checkpoint(state, fmt, config)
    out = Path(out)
    if fmt == "transformers":
        model_config = transformers_model_config(config, exported, names)
        written = [out / name for name in TRANSFORMERS_FILES]
        complete = {**exported, **transformers_unused_tensors(config, exported)}
        written[-1].unlink(missing_ok=True)  # a folder being rewritten is incomplete until the new one is in
        save(complete, written[0], metadata={"format": "pt"})
        write_text_atomic(
            written[1], json.dumps(transformers_image_processor_config(config), indent=2) + "\n"
        )
        write_text_atomic(written[2], json.dumps(model_config, indent=2) + "\n")
        return exported, written
    if fmt == "detectron2":
        save_detectron2_pkl(exported, out)
    else:
        save_mmdet_checkpoint(exported, out, names, things)
    return exported, [out]

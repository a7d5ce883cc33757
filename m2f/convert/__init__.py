"""Checkpoint converters: Hugging Face transformers, detectron2 and mmdetection Mask2Former weights to m2f.

    state_dict = convert_checkpoint("model_final.pkl", "detectron2", "panoptic-r50")
    save(state_dict, "panoptic-r50.safetensors")

Every format is mapped to detectron2's names first (m2f.convert.keymaps), then to m2f's. Nothing in a
checkpoint is executed: .pkl files go through a restricted unpickler, torch files through
torch.load(weights_only=True). Unknown, missing and mis-shaped keys raise ConversionError listing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from .detectron2 import UnsafeCheckpointError, load_detectron2_state_dict
from .keymaps import ConversionError, apply_rules, detect_backbone, detectron2_to_model_rules, reverse_rules
from .mmdet import detectron2_to_mmdet, load_mmdet_state_dict, mmdet_to_detectron2
from .transformers import (
    check_transformers_source,
    detectron2_to_transformers,
    load_transformers_state_dict,
    transformers_to_detectron2,
)

__all__ = [
    "FORMATS",
    "ConversionError",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "export_checkpoint",
    "load_checkpoint_file",
    "save",
]

StateDict = dict[str, torch.Tensor]
_Map = Callable[[Mapping[str, torch.Tensor]], tuple[StateDict, list[str]]]

FORMATS = ("transformers", "detectron2", "mmdet")

_LOADERS = {
    "transformers": load_transformers_state_dict,
    "detectron2": load_detectron2_state_dict,
    "mmdet": load_mmdet_state_dict,
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


def load_checkpoint_file(path: str | Path, fmt: str) -> StateDict:
    """The tensors of a checkpoint file of format `fmt`, untouched (foreign names)."""
    _check_format(fmt)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    return _LOADERS[fmt](path)


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


def _resolve_config(config_name: str | ModelConfig) -> ModelConfig:
    from ..config import get_config

    if isinstance(config_name, ModelConfig):
        return config_name
    return get_config(config_name)


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
    the format's own names. config_name: one of m2f.config.CONFIG_NAMES or a ModelConfig. C is read from
    the class head (its rows minus the no-object row). BatchNorm `num_batches_tracked` counters are dropped
    or zero-filled as the model needs. Raises ConversionError listing unknown keys (no rule for them),
    missing keys and shape mismatches.
    """
    _check_format(fmt)
    if isinstance(src, Mapping):
        state = dict(src)
    elif isinstance(src, str | Path):
        state = load_checkpoint_file(src, fmt)
    else:
        raise TypeError(f"src must be a path or a state dict, got {type(src).__name__}")
    if fmt == "transformers":
        check_transformers_source(list(state))
    hub, unknown = _TO_DETECTRON2[fmt](state)
    if unknown:
        raise ConversionError(f"{fmt} checkpoint: {_listing('unknown keys', unknown)}")

    config = _resolve_config(config_name)
    backbone = detect_backbone(hub)
    if backbone != _config_backbone(config):
        raise ConversionError(
            f"the checkpoint has a {backbone} backbone but config {config.name!r} uses "
            f"{config.backbone.timm_name!r}"
        )
    ours, unknown = apply_rules(hub, detectron2_to_model_rules(backbone))
    if unknown:
        raise ConversionError(f"{fmt} checkpoint: {_listing('unknown keys', unknown)}")
    class_key = "transformer_decoder.class_embed.weight"
    if class_key not in ours:
        raise ConversionError(f"{fmt} checkpoint: no class head ({class_key} after renaming)")
    expected = _expected_state(config, ours[class_key].shape[0] - 1)
    return _match_expected(ours, expected, fmt)


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
    backbone = _config_backbone(_resolve_config(config_name))
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
    """Writes `state_dict` to a .safetensors file (tensors made contiguous, shared storage copied)."""
    from safetensors.torch import save_file

    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)

"""mmdetection Mask2Former checkpoints (.pth, read with `torch.load(weights_only=True)`).

Head names of mmdet 3.x (`panoptic_head.transformer_decoder.layers.0.cross_attn.attn...`) and 2.x
(`...layers.0.attentions.0.attn...`); the mmsegmentation variant (`decode_head.`) uses the same names.
Backbones: mmdet ResNet (torchvision names) and mmdet Swin (`backbone.stages.0.blocks.0.attn.w_msa...`), whose
patch-merging weights are stored in nn.Unfold channel order and are reordered here.
Class names come from the checkpoint's meta: `meta["dataset_meta"]["classes"]` (mmdet 3.x; the thing classes
from its "thing_classes" where present, as for panoptic models) or `meta["CLASSES"]` (mmdet 2.x).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..files import write_bytes_atomic
from .keymaps import (
    DETECTRON2_TO_TIMM_RESNET,
    ConversionError,
    Rename,
    Rule,
    apply_rules,
    prefixed,
    reverse_rules,
    swin_official_to_unfold,
    swin_unfold_to_official,
)
from .reading import read_checkpoint_file

D2_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
D2_PREDICTOR = "sem_seg_head.predictor."

# mmdet's ResNet uses torchvision's names, which are timm's: the detectron2 map read backwards.
_RESNET = prefixed("backbone.", "", reverse_rules(DETECTRON2_TO_TIMM_RESNET))

_BLOCK = "backbone.stages.{s}.blocks.{b}."
_D2_BLOCK = "backbone.layers.{s}.blocks.{b}."
_SWIN: list[Rule] = [
    Rename("backbone.patch_embed.projection.{p:w}", "backbone.patch_embed.proj.{p}"),
    Rename("backbone.patch_embed.norm.{p:w}", "backbone.patch_embed.norm.{p}"),
    Rename(_BLOCK + "attn.w_msa.{rest:*}", _D2_BLOCK + "attn.{rest}"),
    Rename(_BLOCK + "norm{i}.{p:w}", _D2_BLOCK + "norm{i}.{p}"),
    Rename(_BLOCK + "ffn.layers.0.0.{p:w}", _D2_BLOCK + "mlp.fc1.{p}"),
    Rename(_BLOCK + "ffn.layers.1.{p:w}", _D2_BLOCK + "mlp.fc2.{p}"),
    Rename(
        "backbone.stages.{s}.downsample.reduction.weight",
        "backbone.layers.{s}.downsample.reduction.weight",
        swin_unfold_to_official,
        swin_official_to_unfold,
    ),
    Rename(
        "backbone.stages.{s}.downsample.norm.{p:w}",
        "backbone.layers.{s}.downsample.norm.{p}",
        swin_unfold_to_official,
        swin_official_to_unfold,
    ),
    Rename("backbone.norm{s}.{p:w}", "backbone.norm{s}.{p}"),
]

_ENC = "pixel_decoder.encoder.layers.{i}."
_D2_ENC = "transformer.encoder.layers.{i}."
_PIXEL_DECODER: list[Rule] = [
    Rename("pixel_decoder.input_convs.{i}.conv.{p:w}", "input_proj.{i}.0.{p}"),
    Rename("pixel_decoder.input_convs.{i}.gn.{p:w}", "input_proj.{i}.1.{p}"),
    Rename("pixel_decoder.level_encoding.weight", "transformer.level_embed"),
    Rename(_ENC + "self_attn.{rest:*}", _D2_ENC + "self_attn.{rest}"),
    Rename(_ENC + "ffn.layers.0.0.{p:w}", _D2_ENC + "linear1.{p}"),
    Rename(_ENC + "ffn.layers.1.{p:w}", _D2_ENC + "linear2.{p}"),
    Rename(_ENC + "norms.0.{p:w}", _D2_ENC + "norm1.{p}"),
    Rename(_ENC + "norms.1.{p:w}", _D2_ENC + "norm2.{p}"),
    # Mask2Former has one FPN level below the encoder's (stride 4 under 8): mmdet's lateral/output conv 0.
    Rename("pixel_decoder.lateral_convs.0.conv.weight", "adapter_1.weight"),
    Rename("pixel_decoder.lateral_convs.0.gn.{p:w}", "adapter_1.norm.{p}"),
    Rename("pixel_decoder.output_convs.0.conv.weight", "layer_1.weight"),
    Rename("pixel_decoder.output_convs.0.gn.{p:w}", "layer_1.norm.{p}"),
    Rename("pixel_decoder.mask_feature.{p:w}", "mask_features.{p}"),
]
_PIXEL_DECODER_V2: list[Rule] = [
    Rename(_ENC + "attentions.0.{rest:*}", _D2_ENC + "self_attn.{rest}"),
    Rename(_ENC + "ffns.0.layers.0.0.{p:w}", _D2_ENC + "linear1.{p}"),
    Rename(_ENC + "ffns.0.layers.1.{p:w}", _D2_ENC + "linear2.{p}"),
]

_DEC = "transformer_decoder.layers.{i}."
_TRANSFORMER: list[Rule] = [
    Rename(_DEC + "cross_attn.attn.{rest:*}", "transformer_cross_attention_layers.{i}.multihead_attn.{rest}"),
    Rename(_DEC + "self_attn.attn.{rest:*}", "transformer_self_attention_layers.{i}.self_attn.{rest}"),
    Rename(_DEC + "norms.0.{p:w}", "transformer_cross_attention_layers.{i}.norm.{p}"),
    Rename(_DEC + "norms.1.{p:w}", "transformer_self_attention_layers.{i}.norm.{p}"),
    Rename(_DEC + "norms.2.{p:w}", "transformer_ffn_layers.{i}.norm.{p}"),
    Rename(_DEC + "ffn.layers.0.0.{p:w}", "transformer_ffn_layers.{i}.linear1.{p}"),
    Rename(_DEC + "ffn.layers.1.{p:w}", "transformer_ffn_layers.{i}.linear2.{p}"),
    Rename("transformer_decoder.post_norm.{p:w}", "decoder_norm.{p}"),
    Rename("query_embed.weight", "query_embed.weight"),
    Rename("query_feat.weight", "query_feat.weight"),
    Rename("level_embed.weight", "level_embed.weight"),
    Rename("decoder_input_projs.{i}.{p:w}", "input_proj.{i}.{p}"),
    Rename("cls_embed.{p:w}", "class_embed.{p}"),
    Rename("mask_embed.0.{p:w}", "mask_embed.layers.0.{p}"),
    Rename("mask_embed.2.{p:w}", "mask_embed.layers.1.{p}"),
    Rename("mask_embed.4.{p:w}", "mask_embed.layers.2.{p}"),
]
# mmdet 2.x: operation_order (cross_attn, norm, self_attn, norm, ffn, norm)
_TRANSFORMER_V2: list[Rule] = [
    Rename(
        _DEC + "attentions.0.attn.{rest:*}", "transformer_cross_attention_layers.{i}.multihead_attn.{rest}"
    ),
    Rename(_DEC + "attentions.1.attn.{rest:*}", "transformer_self_attention_layers.{i}.self_attn.{rest}"),
    Rename(_DEC + "ffns.0.layers.0.0.{p:w}", "transformer_ffn_layers.{i}.linear1.{p}"),
    Rename(_DEC + "ffns.0.layers.1.{p:w}", "transformer_ffn_layers.{i}.linear2.{p}"),
]

MMDET_TO_DETECTRON2: list[Rule] = [
    *_RESNET,
    *_SWIN,
    *prefixed("panoptic_head.", D2_PIXEL_DECODER, _PIXEL_DECODER),
    *prefixed("panoptic_head.", D2_PREDICTOR, _TRANSFORMER),
]
_LEGACY: list[Rule] = [
    *prefixed("panoptic_head.", D2_PIXEL_DECODER, _PIXEL_DECODER_V2),
    *prefixed("panoptic_head.", D2_PREDICTOR, _TRANSFORMER_V2),
]


def load_mmdet_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], tuple[list[str], list[int] | None] | None]:
    """(the `state_dict` of an mmdet checkpoint, or the file itself when it is a flat state dict;
    mmdet_class_names of its `meta`)."""
    checkpoint = read_checkpoint_file(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: no 'state_dict' of tensors found")
    meta = checkpoint.get("meta")
    try:
        classes = mmdet_class_names(meta if isinstance(meta, Mapping) else {})
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None
    return dict(state), classes


def load_mmdet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of an mmdet checkpoint (or the file itself when it is a flat state dict)."""
    return load_mmdet_checkpoint(path)[0]


def _names(value, field: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(name, str) for name in value):
        raise ConversionError(f"{field} must be a list of class names, got {value!r:.80}")
    return list(value)


def mmdet_class_names(meta: Mapping) -> tuple[list[str], list[int] | None] | None:
    """(class names, thing class indices or None when the meta does not say) from an mmdet checkpoint's
    `meta`: 3.x `dataset_meta` ("classes", "thing_classes"), else 2.x "CLASSES"; None when it has neither."""
    dataset_meta = meta.get("dataset_meta")
    if isinstance(dataset_meta, Mapping) and dataset_meta.get("classes") is not None:
        names = _names(dataset_meta["classes"], 'meta["dataset_meta"]["classes"]')
        if dataset_meta.get("thing_classes") is None:
            return names, None
        things = set(_names(dataset_meta["thing_classes"], 'meta["dataset_meta"]["thing_classes"]'))
        unknown = sorted(things - set(names))
        if unknown:
            raise ConversionError(
                f'meta["dataset_meta"]["thing_classes"] {unknown} are not among its classes'
            )
        return names, [i for i, name in enumerate(names) if name in things]
    if meta.get("CLASSES") is not None:
        return _names(meta["CLASSES"], 'meta["CLASSES"]'), None
    return None


def mmdet_to_detectron2(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(detectron2-named tensors, unmatched source keys); accepts the `decode_head.` prefix of mmseg."""
    renamed = {
        ("panoptic_head." + k[len("decode_head.") :] if k.startswith("decode_head.") else k): v
        for k, v in state_dict.items()
    }
    return apply_rules(renamed, MMDET_TO_DETECTRON2 + _LEGACY)


def detectron2_to_mmdet(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The inverse map, in mmdet 3.x names."""
    return apply_rules(state_dict, reverse_rules(MMDET_TO_DETECTRON2))


def save_mmdet_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    thing_classes: Sequence[int] | None = None,
) -> None:
    """Writes an mmdet 3.x checkpoint ({"state_dict", "meta"}) atomically; the class names and, when known,
    the thing classes go to meta["dataset_meta"] ("classes", "thing_classes", "stuff_classes")."""
    meta: dict = {}
    if class_names is not None:
        dataset_meta: dict = {"classes": list(class_names)}
        if thing_classes is not None:
            things = set(thing_classes)
            dataset_meta["thing_classes"] = [name for i, name in enumerate(class_names) if i in things]
            dataset_meta["stuff_classes"] = [name for i, name in enumerate(class_names) if i not in things]
        meta["dataset_meta"] = dataset_meta
    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in state_dict.items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": tensors, "meta": meta}, buffer)
    write_bytes_atomic(path, buffer.getvalue())

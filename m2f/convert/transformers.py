"""Hugging Face transformers Mask2Former checkpoints (`Mask2FormerForUniversalSegmentation`).

Reads model.safetensors or pytorch_model.bin (`torch.load(weights_only=True)`), a sharded checkpoint through
its index (model.safetensors.index.json or pytorch_model.bin.index.json, whose "weight_map" names the shard
file of every key), or a model directory holding one of these (looked for in that order). A shard missing
from the directory, a key the index lists but its shard lacks, a key in no index entry and a key stored in
two shards each raise an error naming the index file.
Class names come from the "id2label" of the config.json in the model directory (or beside the weights file);
transformers' placeholder names (LABEL_0, LABEL_1, ...) count as none.
Backbones: HF `ResNetBackbone` (`use_timm_backbone=False`) and `SwinBackbone`, in both the current key names
(`attention.q_proj`) and the older ones found in the published checkpoints (`attention.self.query`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data.common import IGNORE_LABEL
from .keymaps import BN_PARAM, ConversionError, Drop, Fuse, Rename, Rule, apply_rules, prefixed, reverse_rules
from .reading import read_checkpoint_file

HF_ENCODER = "model.pixel_level_module.encoder."
HF_PIXEL_DECODER = "model.pixel_level_module.decoder."
HF_TRANSFORMER = "model.transformer_module."
D2_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
D2_PREDICTOR = "sem_seg_head.predictor."

_RESNET: list[Rule] = [
    Rename("embedder.embedder.convolution.weight", "backbone.stem.conv1.weight"),
    Rename(f"embedder.embedder.normalization.{BN_PARAM}", f"backbone.stem.conv1.norm.{BN_PARAM}"),
    Rename(
        "encoder.stages.{s}.layers.{b}.shortcut.convolution.weight", "backbone.res{s+2}.{b}.shortcut.weight"
    ),
    Rename(
        f"encoder.stages.{{s}}.layers.{{b}}.shortcut.normalization.{BN_PARAM}",
        f"backbone.res{{s+2}}.{{b}}.shortcut.norm.{BN_PARAM}",
    ),
    Rename(
        "encoder.stages.{s}.layers.{b}.layer.{c}.convolution.weight", "backbone.res{s+2}.{b}.conv{c+1}.weight"
    ),
    Rename(
        f"encoder.stages.{{s}}.layers.{{b}}.layer.{{c}}.normalization.{BN_PARAM}",
        f"backbone.res{{s+2}}.{{b}}.conv{{c+1}}.norm.{BN_PARAM}",
    ),
]

_BLOCK = "swin.encoder.layers.{s}.blocks.{b}."
_D2_BLOCK = "backbone.layers.{s}.blocks.{b}."
_SWIN: list[Rule] = [
    Rename("swin.embeddings.patch_embeddings.projection.{p:w}", "backbone.patch_embed.proj.{p}"),
    Rename("swin.embeddings.norm.{p:w}", "backbone.patch_embed.norm.{p}"),
    Fuse(
        tuple(_BLOCK + f"attention.{name}.{{p:w}}" for name in ("q_proj", "k_proj", "v_proj")),
        _D2_BLOCK + "attn.qkv.{p}",
    ),
    Rename(_BLOCK + "attention.o_proj.{p:w}", _D2_BLOCK + "attn.proj.{p}"),
    Rename(
        _BLOCK + "attention.relative_position_bias.relative_position_bias_table",
        _D2_BLOCK + "attn.relative_position_bias_table",
    ),
    Drop(_BLOCK + "attention.relative_position_index"),
    Rename(_BLOCK + "layernorm_before.{p:w}", _D2_BLOCK + "norm1.{p}"),
    Rename(_BLOCK + "layernorm_after.{p:w}", _D2_BLOCK + "norm2.{p}"),
    Rename(_BLOCK + "mlp.fc{i}.{p:w}", _D2_BLOCK + "mlp.fc{i}.{p}"),
    Rename("swin.encoder.layers.{s}.downsample.{rest:*}", "backbone.layers.{s}.downsample.{rest}"),
    Rename("hidden_states_norms.stage{s+1}.{p:w}", "backbone.norm{s}.{p}"),
    # the final norm of the classification model: the backbone's outputs use hidden_states_norms instead
    Drop("swin.layernorm.{p:w}"),
]

_PIXEL_DECODER: list[Rule] = [
    Rename("input_projections.{i}.{j}.{p:w}", "input_proj.{i}.{j}.{p}"),
    Rename("level_embed", "transformer.level_embed"),
    Rename("encoder.layers.{i}.self_attn.{rest:*}", "transformer.encoder.layers.{i}.self_attn.{rest}"),
    Rename("encoder.layers.{i}.self_attn_layer_norm.{p:w}", "transformer.encoder.layers.{i}.norm1.{p}"),
    Rename("encoder.layers.{i}.fc{j}.{p:w}", "transformer.encoder.layers.{i}.linear{j}.{p}"),
    Rename("encoder.layers.{i}.final_layer_norm.{p:w}", "transformer.encoder.layers.{i}.norm2.{p}"),
    Rename("mask_projection.{p:w}", "mask_features.{p}"),
    Rename("adapter_{i}.0.weight", "adapter_{i}.weight"),
    Rename("adapter_{i}.1.{p:w}", "adapter_{i}.norm.{p}"),
    Rename("layer_{i}.0.weight", "layer_{i}.weight"),
    Rename("layer_{i}.1.{p:w}", "layer_{i}.norm.{p}"),
]

_LAYER = "decoder.layers.{i}."
_TRANSFORMER: list[Rule] = [
    Rename("queries_embedder.weight", "query_embed.weight"),
    Rename("queries_features.weight", "query_feat.weight"),
    Rename("level_embed.weight", "level_embed.weight"),
    Rename("input_projections.{i}.{p:w}", "input_proj.{i}.{p}"),
    Fuse(
        tuple(_LAYER + f"self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj")),
        "transformer_self_attention_layers.{i}.self_attn.in_proj_weight",
    ),
    Fuse(
        tuple(_LAYER + f"self_attn.{name}.bias" for name in ("q_proj", "k_proj", "v_proj")),
        "transformer_self_attention_layers.{i}.self_attn.in_proj_bias",
    ),
    Rename(
        _LAYER + "self_attn.out_proj.{p:w}", "transformer_self_attention_layers.{i}.self_attn.out_proj.{p}"
    ),
    Rename(_LAYER + "self_attn_layer_norm.{p:w}", "transformer_self_attention_layers.{i}.norm.{p}"),
    Rename(_LAYER + "cross_attn.{rest:*}", "transformer_cross_attention_layers.{i}.multihead_attn.{rest}"),
    Rename(_LAYER + "cross_attn_layer_norm.{p:w}", "transformer_cross_attention_layers.{i}.norm.{p}"),
    Rename(_LAYER + "fc{j}.{p:w}", "transformer_ffn_layers.{i}.linear{j}.{p}"),
    Rename(_LAYER + "final_layer_norm.{p:w}", "transformer_ffn_layers.{i}.norm.{p}"),
    Rename("decoder.layernorm.{p:w}", "decoder_norm.{p}"),
    Rename("decoder.mask_predictor.mask_embedder.{j}.0.{p:w}", "mask_embed.layers.{j}.{p}"),
]

HF_TO_DETECTRON2: list[Rule] = [
    *prefixed(HF_ENCODER, "", _RESNET),
    *prefixed(HF_ENCODER, "", _SWIN),
    *prefixed(HF_PIXEL_DECODER, D2_PIXEL_DECODER, _PIXEL_DECODER),
    *prefixed(HF_TRANSFORMER, D2_PREDICTOR, _TRANSFORMER),
    Rename("class_predictor.{p:w}", D2_PREDICTOR + "class_embed.{p}"),
    Drop("criterion.empty_weight"),
]

# Older transformers releases (and the published facebook/mask2former-* checkpoints) name the Swin backbone
# like the BERT family; these substitutions bring them to the current names before the rules run.
_LEGACY_SWIN_NAMES = [
    (re.compile(r"(pixel_level_module\.encoder\.)(embeddings\.|encoder\.layers\.)"), r"\1swin.\2"),
    (re.compile(r"\.attention\.self\.(query|key|value)\."), lambda m: f".attention.{m.group(1)[0]}_proj."),
    (
        re.compile(r"\.attention\.self\.relative_position_bias_table$"),
        ".attention.relative_position_bias.relative_position_bias_table",
    ),
    (re.compile(r"\.attention\.self\.relative_position_index$"), ".attention.relative_position_index"),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"(\.blocks\.\d+)\.intermediate\.dense\."), r"\1.mlp.fc1."),
    (re.compile(r"(\.blocks\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]


def normalize_hf_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current transformers key names: adds the `model.` prefix of a bare `Mask2FormerModel` and renames the
    legacy Swin keys."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(("pixel_level_module.", "transformer_module.")):
            key = "model." + key
        for pattern, replacement in _LEGACY_SWIN_NAMES:
            key = pattern.sub(replacement, key)
        out[key] = tensor
    return out


SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# what a model directory is searched for, in this order (transformers' own preference)
DIRECTORY_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)
_LISTED = 10


def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"{len(keys)} keys {keys[:_LISTED]}{more}"


def load_transformers_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a transformers checkpoint: a .safetensors or .bin file, a shard index (*.index.json) or a
    model directory holding one of DIRECTORY_FILES."""
    path = Path(path)
    if path.is_dir():
        for name in DIRECTORY_FILES:
            if (path / name).is_file():
                return load_transformers_state_dict(path / name)
        raise FileNotFoundError(f"{path} holds none of {', '.join(DIRECTORY_FILES)}")
    if path.name.endswith(".index.json"):
        return load_sharded_state_dict(path)
    return _load_weights_file(path)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a flat state dict of tensors")
    return dict(state)


def read_weight_map(index_path: str | Path) -> dict[str, str]:
    """The "weight_map" (key -> shard file name) of a shard index; ConversionError naming the file when it
    is not JSON, has no weight_map, or names a shard outside the index's directory."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{index_path}: not a JSON shard index ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ConversionError(f'{index_path}: no "weight_map" of key -> shard file name')
    outside = sorted({v for v in weight_map.values() if v in ("", ".", "..") or Path(v).name != v})
    if outside:
        raise ConversionError(f"{index_path}: shard names must be file names in its directory, got {outside}")
    return weight_map


def load_sharded_state_dict(index_path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of every shard named by a model.safetensors.index.json / pytorch_model.bin.index.json.

    Raises FileNotFoundError naming the index and the missing shard files, and ConversionError for keys the
    index lists but their shard lacks, keys in no index entry, and keys stored in more than one shard."""
    index_path = Path(index_path)
    weight_map = read_weight_map(index_path)
    listed_by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        listed_by_shard.setdefault(shard, set()).add(key)
    missing_files = [shard for shard in listed_by_shard if not (index_path.parent / shard).is_file()]
    if missing_files:
        raise FileNotFoundError(
            f"{index_path}: shard files not found in {index_path.parent}: {', '.join(missing_files)}"
        )
    state: dict[str, torch.Tensor] = {}
    shard_of: dict[str, str] = {}
    duplicated, unlisted = [], []
    for shard, listed in listed_by_shard.items():
        tensors = _load_weights_file(index_path.parent / shard)
        absent = sorted(listed - tensors.keys())
        if absent:
            raise ConversionError(f"{index_path}: {_listing(absent)} are listed for {shard} but not in it")
        for key, tensor in tensors.items():
            if key in shard_of:
                duplicated.append(f"{key} ({shard_of[key]}, {shard})")
            elif key not in weight_map:
                unlisted.append(f"{key} ({shard})")
            shard_of[key] = shard
            state[key] = tensor
    if duplicated:
        raise ConversionError(f"{index_path}: {_listing(sorted(duplicated))} are stored in two shards")
    if unlisted:
        raise ConversionError(
            f"{index_path}: {_listing(sorted(unlisted))} are in shards but not in the index"
        )
    return state


def _read_model_config(path: str | Path) -> tuple[Path, dict] | None:
    """(path, contents) of the config.json in the model directory `path` or beside the weights file `path`;
    None when there is none."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{config_path}: not a JSON model config ({error})") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON model config (not an object)")
    return config_path, config


# Settings of transformers' config.json that change the computation but no weight shape: the values m2f's
# modules compute with (ResNet: timm's, stride in the 3x3 conv from res3 on; Swin: GELU, LayerNorm eps 1e-5).
# transformers' pixel decoder encoder takes num_attention_heads heads and always 4 points.
_FIXED_SETTINGS = {"activation_function": "relu"}
_FIXED_BACKBONE_SETTINGS = {
    "resnet": {"hidden_act": "relu", "downsample_in_bottleneck": False, "downsample_in_first_stage": False},
    "swin": {"hidden_act": "gelu", "layer_norm_eps": 1e-5},
}
TRANSFORMERS_ENCODER_POINTS = 4


def check_transformers_points(config: ModelConfig) -> None:
    """ConversionError unless the m2f config samples transformers' 4 points per head and level in its pixel
    decoder: heads x points is all the weights show."""
    if config.pixel_decoder.encoder_points != TRANSFORMERS_ENCODER_POINTS:
        raise ConversionError(
            f"transformers' pixel decoder samples {TRANSFORMERS_ENCODER_POINTS} points per head and level; "
            f"the m2f config has pixel_decoder.encoder_points={config.pixel_decoder.encoder_points}"
        )


def check_transformers_architecture(path: str | Path, config: ModelConfig) -> None:
    """ConversionError when the config.json beside a transformers checkpoint sets something that the weights'
    shapes do not show and that the m2f config computes differently: the head counts of the decoder and of
    the pixel decoder's encoder (transformers: one `num_attention_heads` for both), the decoder's norm
    placement and activation, the backbone's activation, stride placement and LayerNorm eps. Fields the
    config.json leaves out are not compared."""
    found = _read_model_config(path)
    if found is None:
        return
    config_path, settings = found
    ours = {
        "num_attention_heads": config.decoder.num_heads,
        "pre_norm": config.decoder.pre_norm,
        **_FIXED_SETTINGS,
    }
    differences = [
        f"{key} {settings[key]!r} (m2f: {value!r})"
        for key, value in ours.items()
        if settings.get(key, value) != value
    ]
    heads = settings.get("num_attention_heads", config.pixel_decoder.encoder_heads)
    if heads != config.pixel_decoder.encoder_heads:
        differences.append(
            f"num_attention_heads {heads!r} (m2f: pixel_decoder.encoder_heads {config.pixel_decoder.encoder_heads})"
        )
    backbone = settings.get("backbone_config") or {}
    for key, value in _FIXED_BACKBONE_SETTINGS.get(backbone.get("model_type"), {}).items():
        if backbone.get(key, value) != value:
            differences.append(f"backbone_config.{key} {backbone[key]!r} (m2f: {value!r})")
    if differences:
        raise ConversionError(
            f"{config_path}: the checkpoint's model differs from the m2f config {config.name!r}: "
            f"{', '.join(differences)}; its weights would load but compute something else"
        )


def transformers_class_names(path: str | Path) -> list[str] | None:
    """Class names from the "id2label" of config.json in the model directory `path` (or beside the weights
    file `path`), index order; None when there is no config.json, no id2label or only placeholder names.
    ConversionError naming the file when id2label is not {"0": name, ..., "C-1": name}."""
    found = _read_model_config(path)
    if found is None:
        return None
    config_path, config = found
    id2label = config.get("id2label")
    if not id2label:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise ConversionError(f"{config_path}: id2label must map class indices to names")
    indices = sorted(id2label, key=lambda k: int(k) if k.isdigit() else -1)
    if indices != [str(i) for i in range(len(id2label))]:
        raise ConversionError(
            f"{config_path}: id2label keys must be 0..{len(id2label) - 1}, got {indices[:10]}"
        )
    names = [id2label[k] for k in indices]
    if names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def transformers_to_detectron2(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(detectron2-named tensors, unmatched source keys)."""
    return apply_rules(normalize_hf_keys(state_dict), HF_TO_DETECTRON2)


def detectron2_to_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The inverse map, in current transformers names (Swin's unused final norm is not produced)."""
    return apply_rules(state_dict, reverse_rules(HF_TO_DETECTRON2))


def check_transformers_source(keys: list[str]) -> None:
    """ConversionError when the keys do not look like a transformers Mask2Former checkpoint."""
    if not any(k.startswith("model.pixel_level_module.") for k in keys):
        raise ConversionError(
            "not a transformers Mask2Former checkpoint: no 'model.pixel_level_module.*' keys "
            f"(first keys: {keys[:5]})"
        )


# ---------------------------------------------------------------------------------------------------------
# The config files of a transformers model directory, for weights exported from m2f.

_STAGES = ["stage1", "stage2", "stage3", "stage4"]
_RESNET_STEM = re.compile(r"\.embedder\.embedder\.convolution\.weight$")
_RESNET_CONV = re.compile(r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight$")
_SWIN_PATCHES = re.compile(r"\.embeddings\.patch_embeddings\.projection\.weight$")
_SWIN_BLOCK = re.compile(r"\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(attention\.[\w.]+|mlp\.fc1\.weight)$")
# timm's Swin default, which m2f's Swin keeps
SWIN_DROP_PATH_RATE = 0.1


def _backbone_tensors(state: Mapping[str, torch.Tensor], pattern: re.Pattern) -> dict[tuple, torch.Tensor]:
    """{match groups: tensor} of the backbone keys (HF_ENCODER ...) that `pattern` matches."""
    found = {}
    for key, tensor in state.items():
        match = pattern.search(key) if key.startswith(HF_ENCODER) else None
        if match:
            found[tuple(int(g) if g.isdigit() else g for g in match.groups())] = tensor
    return found


def _has_swin_backbone(state: Mapping[str, torch.Tensor]) -> bool:
    return any(_SWIN_PATCHES.search(key) for key in state)


def _stage_depths(indices: list[tuple[int, int]]) -> list[int]:
    stages = sorted({stage for stage, _ in indices})
    if stages != list(range(len(_STAGES))):
        raise ConversionError(f"the backbone has stages {stages}; transformers' Mask2Former takes 4")
    return [1 + max(block for stage, block in indices if stage == s) for s in stages]


def _resnet_backbone_config(state: Mapping[str, torch.Tensor]) -> dict:
    convs = _backbone_tensors(state, _RESNET_CONV)
    depths = _stage_depths([(stage, block) for stage, block, _ in convs])
    convs_per_block = 1 + max(conv for _, _, conv in convs)
    if convs_per_block not in (2, 3):
        raise ConversionError(f"ResNet blocks of {convs_per_block} convolutions have no transformers form")
    last = convs_per_block - 1
    hidden_sizes = [convs[(stage, 0, last)].shape[0] for stage in range(len(depths))]
    if convs_per_block == 3 and any(convs[(s, 0, 0)].shape[0] * 4 != hidden_sizes[s] for s in range(4)):
        raise ConversionError(
            "transformers' ResNet bottlenecks are 4 times narrower than their output; this backbone's are not"
        )
    stem = next(iter(_backbone_tensors(state, _RESNET_STEM).values()))
    return {
        "model_type": "resnet",
        "num_channels": stem.shape[1],
        "embedding_size": stem.shape[0],
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "layer_type": "bottleneck" if convs_per_block == 3 else "basic",
        **_FIXED_BACKBONE_SETTINGS["resnet"],
        "out_features": _STAGES,
    }


def _swin_backbone_config(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    patches = next(iter(_backbone_tensors(state, _SWIN_PATCHES).values()))
    blocks = _backbone_tensors(state, _SWIN_BLOCK)
    depths = _stage_depths([(stage, block) for stage, block, _ in blocks])
    table = "attention.relative_position_bias.relative_position_bias_table"
    tables = [blocks[(stage, 0, table)] for stage in range(len(depths))]
    window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
    kwargs = config.backbone.timm_kwargs
    return {
        "model_type": "swin",
        "image_size": kwargs.get("img_size", 224),
        "patch_size": patches.shape[-1],
        "num_channels": patches.shape[1],
        "embed_dim": patches.shape[0],
        "depths": depths,
        "num_heads": [t.shape[1] for t in tables],
        "window_size": window,
        "mlp_ratio": blocks[(0, 0, "mlp.fc1.weight")].shape[0] / patches.shape[0],
        "qkv_bias": (0, 0, "attention.q_proj.bias") in blocks,
        "drop_path_rate": kwargs.get("drop_path_rate", SWIN_DROP_PATH_RATE),
        **_FIXED_BACKBONE_SETTINGS["swin"],
        "use_absolute_embeddings": False,
        "out_features": _STAGES,
    }


def check_transformers_model(config: ModelConfig) -> None:
    """ConversionError unless transformers' Mask2Former computes what the m2f config does: one head count for
    the pixel decoder's encoder and the decoder, 4 sampling points, a mask threshold of 0.5 and a deformable
    encoder on the three coarsest backbone levels."""
    check_transformers_points(config)
    pixel_decoder, decoder = config.pixel_decoder, config.decoder
    differences = []
    if pixel_decoder.encoder_heads != decoder.num_heads:
        differences.append(
            f"pixel_decoder.encoder_heads={pixel_decoder.encoder_heads} and decoder.num_heads="
            f"{decoder.num_heads} differ (transformers has one num_attention_heads for both)"
        )
    if decoder.mask_threshold != 0.5:
        differences.append(f"decoder.mask_threshold={decoder.mask_threshold} (transformers: 0.5)")
    if tuple(pixel_decoder.transformer_strides) != tuple(config.backbone.out_strides[-3:]):
        differences.append(
            f"pixel_decoder.transformer_strides={pixel_decoder.transformer_strides} are not the three coarsest "
            f"of backbone.out_strides={config.backbone.out_strides} (transformers' encoder takes those)"
        )
    if differences:
        raise ConversionError(f"config {config.name!r} has no transformers form: {'; '.join(differences)}")


def transformers_model_config(
    config: ModelConfig, state: Mapping[str, torch.Tensor], class_names: Sequence[str] | None = None
) -> dict:
    """The config.json of `Mask2FormerForUniversalSegmentation` for `state`, the transformers-named weights
    of an m2f model of `config` (export_checkpoint). Backbone sizes are read from the weights; class names
    go to id2label (transformers' placeholders LABEL_i without them). ConversionError when the model has
    no transformers form (check_transformers_model)."""
    check_transformers_model(config)
    num_classes = state["class_predictor.weight"].shape[0] - 1
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConversionError(f"{len(names)} class names for a class head of {num_classes} classes")
    pixel_decoder, decoder, loss = config.pixel_decoder, config.decoder, config.loss
    return {
        "model_type": "mask2former",
        "architectures": ["Mask2FormerForUniversalSegmentation"],
        "dtype": str(state["class_predictor.weight"].dtype).removeprefix("torch."),
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "backbone_config": (
            _swin_backbone_config(state, config)
            if _has_swin_backbone(state)
            else _resnet_backbone_config(state)
        ),
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        "feature_size": pixel_decoder.conv_dim,
        "mask_feature_size": pixel_decoder.mask_dim,
        "hidden_dim": decoder.hidden_dim,
        "encoder_feedforward_dim": pixel_decoder.encoder_ffn_dim,
        "encoder_layers": pixel_decoder.encoder_layers,
        "decoder_layers": decoder.num_layers + 1,  # transformers counts the prediction before the first layer
        "num_attention_heads": decoder.num_heads,
        "dim_feedforward": decoder.ffn_dim,
        "pre_norm": decoder.pre_norm,
        "enforce_input_projection": decoder.enforce_input_proj,
        "common_stride": pixel_decoder.common_stride,
        "feature_strides": list(config.backbone.out_strides),
        "num_queries": decoder.num_queries,
        "dropout": 0.0,
        **_FIXED_SETTINGS,
        "ignore_value": IGNORE_LABEL,
        "no_object_weight": loss.no_object_weight,
        "class_weight": loss.class_weight,
        "mask_weight": loss.mask_weight,
        "dice_weight": loss.dice_weight,
        "train_num_points": loss.num_points,
        "oversample_ratio": loss.oversample_ratio,
        "importance_sample_ratio": loss.importance_sample_ratio,
        "use_auxiliary_loss": loss.deep_supervision,
    }


def transformers_unused_tensors(
    config: ModelConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors transformers' model keeps and m2f's has no counterpart for, at the values transformers
    starts them with (so that `from_pretrained` reports no missing key): BatchNorm counters (m2f's ResNet
    has frozen BatchNorm), the loss's class weights and Swin's final norm (unused by the backbone)."""
    extra = {
        key.removesuffix("running_mean") + "num_batches_tracked": torch.zeros((), dtype=torch.int64)
        for key in state
        if key.endswith(".normalization.running_mean")
    }
    class_weight = torch.ones(state["class_predictor.weight"].shape[0])
    class_weight[-1] = config.loss.no_object_weight
    extra["criterion.empty_weight"] = class_weight
    last_norm = HF_ENCODER + "hidden_states_norms.stage4.weight"
    if _has_swin_backbone(state) and last_norm in state:
        channels = state[last_norm].shape[0]
        extra[HF_ENCODER + "swin.layernorm.weight"] = torch.ones(channels)
        extra[HF_ENCODER + "swin.layernorm.bias"] = torch.zeros(channels)
    return {key: tensor for key, tensor in extra.items() if key not in state}


def transformers_image_processor_config(config: ModelConfig) -> dict:
    """The preprocessor_config.json of `Mask2FormerImageProcessor` for an m2f config: its test resize,
    padding multiple and normalization (m2f's 0..255 mean and std as fractions of 255)."""
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": {
            "shortest_edge": config.inference.test_short_edge,
            "longest_edge": config.inference.test_max_size,
        },
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [value / 255 for value in config.pixel_mean],
        "image_std": [value / 255 for value in config.pixel_std],
        "size_divisor": config.size_divisibility,
        "ignore_index": IGNORE_LABEL,
        "do_reduce_labels": False,
    }

"""detectron2 checkpoints: restricted unpickler, real key names, round trip, error listings."""

import os
import pickle

import numpy as np
import pytest
import torch
from convert_fixtures import small_config

from m2f.convert import ConversionError, UnsafeCheckpointError, convert_checkpoint, export_checkpoint
from m2f.convert.detectron2 import load_detectron2_state_dict, restricted_load, save_detectron2_pkl
from m2f.convert.keymaps import apply_rules, detectron2_to_model_rules

# Real names from Mask2Former's detectron2 model-zoo checkpoints -> m2f names.
RESNET_KEYS = {
    "backbone.stem.conv1.weight": "backbone.body.conv1.weight",
    "backbone.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
    "backbone.res2.0.shortcut.weight": "backbone.body.layer1.0.downsample.0.weight",
    "backbone.res2.0.shortcut.norm.bias": "backbone.body.layer1.0.downsample.1.bias",
    "backbone.res3.3.conv2.weight": "backbone.body.layer2.3.conv2.weight",
    "backbone.res5.2.conv3.norm.running_mean": "backbone.body.layer4.2.bn3.running_mean",
    "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.lateral_convs.0.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight": "pixel_decoder.lateral_convs.0.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias": "pixel_decoder.output_convs.0.norm.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight": "pixel_decoder.mask_features.weight",
    "sem_seg_head.pixel_decoder.input_proj.2.1.weight": "pixel_decoder.input_proj.2.1.weight",
    "sem_seg_head.pixel_decoder.transformer.level_embed": "pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.bias": (
        "pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.bias"
    ),
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear2.weight": (
        "pixel_decoder.transformer.encoder.layers.0.linear2.weight"
    ),
    "sem_seg_head.predictor.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight": (
        "transformer_decoder.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight"
    ),
    "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.bias": (
        "transformer_decoder.transformer_self_attention_layers.0.norm.bias"
    ),
    "sem_seg_head.predictor.transformer_ffn_layers.4.linear1.bias": (
        "transformer_decoder.transformer_ffn_layers.4.linear1.bias"
    ),
    "sem_seg_head.predictor.query_feat.weight": "transformer_decoder.query_feat.weight",
    "sem_seg_head.predictor.class_embed.weight": "transformer_decoder.class_embed.weight",
    "sem_seg_head.predictor.mask_embed.layers.2.bias": "transformer_decoder.mask_embed.layers.2.bias",
    "sem_seg_head.predictor.decoder_norm.weight": "transformer_decoder.decoder_norm.weight",
}
SWIN_KEYS = {
    "backbone.patch_embed.proj.weight": "backbone.body.patch_embed.proj.weight",
    "backbone.patch_embed.norm.bias": "backbone.body.patch_embed.norm.bias",
    "backbone.layers.2.blocks.5.attn.relative_position_bias_table": (
        "backbone.body.layers.2.blocks.5.attn.relative_position_bias_table"
    ),
    "backbone.layers.0.blocks.1.attn.qkv.weight": "backbone.body.layers.0.blocks.1.attn.qkv.weight",
    "backbone.layers.3.blocks.0.mlp.fc2.bias": "backbone.body.layers.3.blocks.0.mlp.fc2.bias",
    "backbone.layers.0.downsample.reduction.weight": "backbone.body.layers.1.downsample.reduction.weight",
    "backbone.layers.2.downsample.norm.weight": "backbone.body.layers.3.downsample.norm.weight",
    "backbone.norm3.weight": "backbone.norms.3.weight",
}


@pytest.mark.parametrize(("backbone", "names"), [("resnet", RESNET_KEYS), ("swin", SWIN_KEYS)])
def test_real_key_names(backbone, names):
    state = {key: torch.zeros(1) for key in names}
    state["criterion.empty_weight"] = torch.zeros(1)
    if backbone == "swin":
        state["backbone.layers.1.blocks.0.attn.relative_position_index"] = torch.zeros(1)
    out, unmatched = apply_rules(state, detectron2_to_model_rules(backbone))
    assert unmatched == []
    assert sorted(out) == sorted(names.values())
    for source, target in names.items():
        assert out[target] is state[source]


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps({"model": {"w": Payload()}})
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*system"):
        restricted_load(data)
    assert not marker.exists()
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pkl: refusing to load"):
        convert_checkpoint(path, "detectron2", small_config("resnet"))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_damaged_checkpoint_is_named(tmp_path, suffix):
    """A truncated pickle or a file torch cannot read gives a ConversionError naming the file."""
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(3)}})[:20])
    with pytest.raises(ConversionError, match=f"damaged\\{suffix}"):
        convert_checkpoint(path, "detectron2", small_config("resnet"))


def test_restricted_unpickler_refuses_other_globals():
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        restricted_load(pickle.dumps(eval))
    with pytest.raises(UnsafeCheckpointError, match=r"collections\.Counter"):
        restricted_load(pickle.dumps({"model": __import__("collections").Counter()}))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy(protocol, tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=protocol))
    state = load_detectron2_state_dict(path)
    assert state.keys() == arrays.keys()
    for key, array in arrays.items():
        assert torch.equal(state[key], torch.from_numpy(array))


def test_round_trip_pkl_and_pth(small_model_state, tmp_path):
    config, state = small_model_state
    exported = export_checkpoint(state, "detectron2", config)
    assert all(k.startswith(("backbone.", "sem_seg_head.")) for k in exported)
    pkl = tmp_path / "model_final.pkl"
    save_detectron2_pkl(exported, pkl)
    pth = tmp_path / "model_final.pth"
    torch.save({"model": exported, "iteration": 10}, pth)
    for path in (pkl, pth):
        converted = convert_checkpoint(path, "detectron2", config)
        assert converted.keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(converted[key], tensor), key


def test_frozen_batchnorm_checkpoint_into_counting_batchnorm():
    """detectron2's FrozenBN stores no num_batches_tracked; a model with BatchNorm2d gets zeros."""
    from dataclasses import replace

    from convert_fixtures import random_state

    config = small_config("resnet")
    counting = replace(config, backbone=replace(config.backbone, frozen_batchnorm=False))
    exported = export_checkpoint(random_state(config), "detectron2", config)
    converted = convert_checkpoint(exported, "detectron2", counting)
    counters = [k for k in converted if k.endswith("num_batches_tracked")]
    assert counters and all(converted[k].item() == 0 for k in counters)


def test_errors_list_the_keys():
    config = small_config("resnet")
    from convert_fixtures import random_state

    exported = export_checkpoint(random_state(config), "detectron2", config)

    unknown = dict(exported, **{"backbone.fancy.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"1 unknown keys: \['backbone.fancy.weight'\]"):
        convert_checkpoint(unknown, "detectron2", config)

    missing = dict(exported)
    del missing["sem_seg_head.predictor.decoder_norm.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: \['transformer_decoder.decoder_norm.bias'\]"):
        convert_checkpoint(missing, "detectron2", config)

    extra = dict(exported, **{"sem_seg_head.predictor.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"unexpected keys: \['transformer_decoder.extra.weight'\]"):
        convert_checkpoint(extra, "detectron2", config)

    wrong = dict(exported, **{"sem_seg_head.predictor.decoder_norm.bias": torch.zeros(7)})
    with pytest.raises(ConversionError, match=r"transformer_decoder.decoder_norm.bias \(7,\) vs \(64,\)"):
        convert_checkpoint(wrong, "detectron2", config)

    with pytest.raises(ConversionError, match="swin backbone but config"):
        convert_checkpoint({"backbone.patch_embed.proj.weight": torch.zeros(1)}, "detectron2", config)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        convert_checkpoint({}, "caffe", "panoptic-r50")
    with pytest.raises(FileNotFoundError, match=r"nothing\.pkl"):
        convert_checkpoint(tmp_path / "nothing.pkl", "detectron2", "panoptic-r50")
    with pytest.raises(TypeError, match="src"):
        convert_checkpoint(3, "detectron2", "panoptic-r50")


def test_other_formats_given_as_detectron2_are_named(tmp_path):
    """An mmdet checkpoint or a transformers model directory passed as detectron2 says what it looks like."""
    from convert_fixtures import random_state

    config = small_config("resnet")
    mmdet = tmp_path / "mmdet.pth"
    torch.save({"state_dict": export_checkpoint(random_state(config), "mmdet", config), "meta": {}}, mmdet)
    with pytest.raises(ConversionError, match=r"mmdet\.pth: not a detectron2 checkpoint.*--format mmdet"):
        convert_checkpoint(mmdet, "detectron2", config)
    (tmp_path / "hf").mkdir()
    for fmt in ("detectron2", "mmdet"):
        with pytest.raises(ConversionError, match=r"hf: a directory.*--format transformers"):
            convert_checkpoint(tmp_path / "hf", fmt, config)

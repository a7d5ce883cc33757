"""mmdetection checkpoints: real key names (3.x and 2.x), round trip through a .pth file, safe loading."""

import pytest
import torch
from convert_fixtures import small_config

from m2f.convert import ConversionError, convert_checkpoint, export_checkpoint
from m2f.convert.keymaps import apply_rules, detectron2_to_model_rules, swin_unfold_to_official
from m2f.convert.mmdet import mmdet_to_detectron2

# Real names from mmdetection's Mask2Former checkpoints -> m2f names.
MMDET_KEYS = {
    "backbone.conv1.weight": "backbone.body.conv1.weight",
    "backbone.bn1.running_mean": "backbone.body.bn1.running_mean",
    "backbone.layer1.0.downsample.0.weight": "backbone.body.layer1.0.downsample.0.weight",
    "backbone.layer3.5.bn2.bias": "backbone.body.layer3.5.bn2.bias",
    "panoptic_head.pixel_decoder.input_convs.0.conv.weight": "pixel_decoder.input_proj.0.0.weight",
    "panoptic_head.pixel_decoder.input_convs.2.gn.bias": "pixel_decoder.input_proj.2.1.bias",
    "panoptic_head.pixel_decoder.level_encoding.weight": "pixel_decoder.transformer.level_embed",
    "panoptic_head.pixel_decoder.encoder.layers.3.self_attn.value_proj.weight": (
        "pixel_decoder.transformer.encoder.layers.3.self_attn.value_proj.weight"
    ),
    "panoptic_head.pixel_decoder.encoder.layers.3.ffn.layers.0.0.bias": (
        "pixel_decoder.transformer.encoder.layers.3.linear1.bias"
    ),
    "panoptic_head.pixel_decoder.encoder.layers.3.norms.1.weight": (
        "pixel_decoder.transformer.encoder.layers.3.norm2.weight"
    ),
    "panoptic_head.pixel_decoder.lateral_convs.0.conv.weight": "pixel_decoder.lateral_convs.0.weight",
    "panoptic_head.pixel_decoder.output_convs.0.gn.weight": "pixel_decoder.output_convs.0.norm.weight",
    "panoptic_head.pixel_decoder.mask_feature.bias": "pixel_decoder.mask_features.bias",
    "panoptic_head.transformer_decoder.layers.3.cross_attn.attn.out_proj.bias": (
        "transformer_decoder.transformer_cross_attention_layers.3.multihead_attn.out_proj.bias"
    ),
    "panoptic_head.transformer_decoder.layers.1.self_attn.attn.in_proj_weight": (
        "transformer_decoder.transformer_self_attention_layers.1.self_attn.in_proj_weight"
    ),
    "panoptic_head.transformer_decoder.layers.1.norms.0.weight": (
        "transformer_decoder.transformer_cross_attention_layers.1.norm.weight"
    ),
    "panoptic_head.transformer_decoder.layers.1.norms.2.bias": (
        "transformer_decoder.transformer_ffn_layers.1.norm.bias"
    ),
    "panoptic_head.transformer_decoder.layers.8.ffn.layers.1.weight": (
        "transformer_decoder.transformer_ffn_layers.8.linear2.weight"
    ),
    "panoptic_head.transformer_decoder.post_norm.weight": "transformer_decoder.decoder_norm.weight",
    "panoptic_head.query_embed.weight": "transformer_decoder.query_embed.weight",
    "panoptic_head.level_embed.weight": "transformer_decoder.level_embed.weight",
    "panoptic_head.cls_embed.bias": "transformer_decoder.class_embed.bias",
    "panoptic_head.mask_embed.2.weight": "transformer_decoder.mask_embed.layers.1.weight",
    "panoptic_head.mask_embed.4.bias": "transformer_decoder.mask_embed.layers.2.bias",
    # mmdet 2.x names
    "panoptic_head.transformer_decoder.layers.0.attentions.1.attn.in_proj_bias": (
        "transformer_decoder.transformer_self_attention_layers.0.self_attn.in_proj_bias"
    ),
    "panoptic_head.transformer_decoder.layers.0.attentions.0.attn.in_proj_bias": (
        "transformer_decoder.transformer_cross_attention_layers.0.multihead_attn.in_proj_bias"
    ),
    "panoptic_head.pixel_decoder.encoder.layers.0.attentions.0.sampling_offsets.weight": (
        "pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    ),
    "panoptic_head.pixel_decoder.encoder.layers.0.ffns.0.layers.1.bias": (
        "pixel_decoder.transformer.encoder.layers.0.linear2.bias"
    ),
}
MMDET_SWIN_KEYS = {
    "backbone.patch_embed.projection.weight": "backbone.body.patch_embed.proj.weight",
    "backbone.stages.1.blocks.0.attn.w_msa.qkv.weight": "backbone.body.layers.1.blocks.0.attn.qkv.weight",
    "backbone.stages.1.blocks.0.attn.w_msa.relative_position_bias_table": (
        "backbone.body.layers.1.blocks.0.attn.relative_position_bias_table"
    ),
    "backbone.stages.2.blocks.1.ffn.layers.0.0.bias": "backbone.body.layers.2.blocks.1.mlp.fc1.bias",
    "backbone.stages.2.blocks.1.norm2.weight": "backbone.body.layers.2.blocks.1.norm2.weight",
    "backbone.stages.0.downsample.norm.bias": "backbone.body.layers.1.downsample.norm.bias",
    "backbone.norm2.weight": "backbone.norms.2.weight",
    "decode_head.cls_embed.weight": "transformer_decoder.class_embed.weight",  # mmsegmentation prefix
}


@pytest.mark.parametrize(("backbone", "names"), [("resnet", MMDET_KEYS), ("swin", MMDET_SWIN_KEYS)])
def test_real_key_names(backbone, names):
    state = {key: torch.arange(8.0) for key in names}
    state["backbone.stages.1.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(1)
    hub, unmatched = mmdet_to_detectron2(state if backbone == "swin" else dict(list(state.items())[:-1]))
    assert unmatched == []
    out, unmatched = apply_rules(hub, detectron2_to_model_rules(backbone))
    assert unmatched == []
    assert sorted(out) == sorted(names.values())
    for source, target in names.items():
        expected = state[source]
        if (
            source.startswith("backbone.stages.") and ".downsample." in source
        ):  # mmdet stores patch merging in nn.Unfold channel order
            expected = swin_unfold_to_official(expected)
        assert torch.equal(out[target], expected), source


def test_round_trip_through_pth(small_model_state, tmp_path):
    config, state = small_model_state
    exported = export_checkpoint(state, "mmdet", config)
    assert all(k.startswith(("backbone.", "panoptic_head.")) for k in exported)
    path = tmp_path / "mask2former.pth"
    torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": exported}, path)
    converted = convert_checkpoint(path, "mmdet", config)
    assert converted.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


class _Custom:
    pass


def test_unsafe_pth_is_refused(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": {}, "meta": _Custom()}, path)
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_checkpoint(path, "mmdet", small_config("resnet"))


def test_unknown_keys_listed():
    with pytest.raises(ConversionError, match=r"unknown keys: \['panoptic_head.something.weight'\]"):
        convert_checkpoint(
            {"panoptic_head.something.weight": torch.zeros(1)}, "mmdet", small_config("resnet")
        )

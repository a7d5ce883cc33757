"""Hugging Face transformers checkpoints: legacy names, file loading, round trip, save()."""

import pytest
import torch
from convert_fixtures import small_config

from m2f.convert import ConversionError, convert_checkpoint, export_checkpoint, save
from m2f.convert.transformers import normalize_hf_keys

LEGACY_NAMES = {
    "model.pixel_level_module.encoder.embeddings.patch_embeddings.projection.weight": (
        "model.pixel_level_module.encoder.swin.embeddings.patch_embeddings.projection.weight"
    ),
    "model.pixel_level_module.encoder.encoder.layers.0.blocks.1.attention.self.query.weight": (
        "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.1.attention.q_proj.weight"
    ),
    "model.pixel_level_module.encoder.encoder.layers.0.blocks.1.attention.self.value.bias": (
        "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.1.attention.v_proj.bias"
    ),
    "model.pixel_level_module.encoder.encoder.layers.2.blocks.0.attention.self.relative_position_bias_table": (
        "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.0.attention.relative_position_bias"
        ".relative_position_bias_table"
    ),
    "model.pixel_level_module.encoder.encoder.layers.0.blocks.1.attention.output.dense.weight": (
        "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.1.attention.o_proj.weight"
    ),
    "model.pixel_level_module.encoder.encoder.layers.3.blocks.1.intermediate.dense.bias": (
        "model.pixel_level_module.encoder.swin.encoder.layers.3.blocks.1.mlp.fc1.bias"
    ),
    "model.pixel_level_module.encoder.encoder.layers.3.blocks.1.output.dense.weight": (
        "model.pixel_level_module.encoder.swin.encoder.layers.3.blocks.1.mlp.fc2.weight"
    ),
    # unchanged: ResNet backbone, pixel decoder, transformer decoder
    "model.pixel_level_module.encoder.encoder.stages.0.layers.0.shortcut.convolution.weight": (
        "model.pixel_level_module.encoder.encoder.stages.0.layers.0.shortcut.convolution.weight"
    ),
    "model.transformer_module.decoder.layers.0.self_attn.out_proj.weight": (
        "model.transformer_module.decoder.layers.0.self_attn.out_proj.weight"
    ),
    # a bare Mask2FormerModel gets the prefix
    "transformer_module.queries_features.weight": "model.transformer_module.queries_features.weight",
}


def test_legacy_and_bare_names_are_normalized():
    state = {key: torch.zeros(1) for key in LEGACY_NAMES}
    assert list(normalize_hf_keys(state)) == list(LEGACY_NAMES.values())


def test_round_trip_with_legacy_names(small_model_state):
    config, state = small_model_state
    exported = export_checkpoint(state, "transformers", config)
    assert all(k.startswith(("model.", "class_predictor.")) for k in exported)
    if config.backbone.output_norm:  # write the Swin part in legacy names (inverse of LEGACY_NAMES)
        legacy = {}
        for key, tensor in exported.items():
            key = key.replace("encoder.swin.", "encoder.")
            key = key.replace("attention.q_proj", "attention.self.query").replace(
                "attention.o_proj", "attention.output.dense"
            )
            key = key.replace("attention.k_proj", "attention.self.key").replace(
                "attention.v_proj", "attention.self.value"
            )
            key = key.replace(
                "relative_position_bias.relative_position_bias_table", "self.relative_position_bias_table"
            )
            key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
            legacy[key] = tensor
        exported = legacy
    converted = convert_checkpoint(exported, "transformers", config)
    assert converted.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_files_and_save(tmp_path):
    from convert_fixtures import random_state

    config = small_config("resnet")
    state = random_state(config)
    exported = export_checkpoint(state, "transformers", config)
    save(exported, tmp_path / "model.safetensors")
    torch.save(exported, tmp_path / "pytorch_model.bin")
    for src in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin", tmp_path):
        converted = convert_checkpoint(src, "transformers", config)
        assert all(torch.equal(converted[k], v) for k, v in state.items()), src

    from safetensors import safe_open

    save(state, tmp_path / "ours.safetensors", metadata={"config": "small"})
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as file:
        assert file.metadata() == {"config": "small"}
        assert set(file.keys()) == set(state)
        assert torch.equal(
            file.get_tensor("transformer_decoder.query_feat.weight"),
            state["transformer_decoder.query_feat.weight"],
        )


def test_not_a_transformers_checkpoint():
    with pytest.raises(ConversionError, match="not a transformers Mask2Former checkpoint"):
        convert_checkpoint({"backbone.conv1.weight": torch.zeros(1)}, "transformers", small_config("resnet"))


def test_incomplete_attention_is_reported():
    config = small_config("resnet")
    from convert_fixtures import random_state

    exported = export_checkpoint(random_state(config), "transformers", config)
    del exported["model.transformer_module.decoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        convert_checkpoint(exported, "transformers", config)


# Real names of transformers' Mask2FormerForUniversalSegmentation (Swin backbone) -> m2f names.
HF_SWIN_KEYS = {
    "model.pixel_level_module.encoder.hidden_states_norms.stage1.weight": "backbone.norms.0.weight",
    "model.pixel_level_module.encoder.hidden_states_norms.stage4.bias": "backbone.norms.3.bias",
    # transformers keeps patch merging at the end of stage s, timm at the start of stage s + 1
    "model.pixel_level_module.encoder.swin.encoder.layers.0.downsample.norm.weight": (
        "backbone.body.layers.1.downsample.norm.weight"
    ),
    "model.pixel_level_module.decoder.adapter_1.0.weight": "pixel_decoder.lateral_convs.0.weight",
    "model.pixel_level_module.decoder.layer_1.1.bias": "pixel_decoder.output_convs.0.norm.bias",
    "model.transformer_module.queries_embedder.weight": "transformer_decoder.query_embed.weight",
    "model.transformer_module.queries_features.weight": "transformer_decoder.query_feat.weight",
    "model.transformer_module.decoder.layers.2.self_attn_layer_norm.weight": (
        "transformer_decoder.transformer_self_attention_layers.2.norm.weight"
    ),
    "model.transformer_module.decoder.layers.2.cross_attn_layer_norm.bias": (
        "transformer_decoder.transformer_cross_attention_layers.2.norm.bias"
    ),
    "model.transformer_module.decoder.layers.1.cross_attn.in_proj_weight": (
        "transformer_decoder.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight"
    ),
    "model.transformer_module.decoder.layernorm.weight": "transformer_decoder.decoder_norm.weight",
    "model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight": (
        "transformer_decoder.mask_embed.layers.2.weight"
    ),
    "class_predictor.bias": "transformer_decoder.class_embed.bias",
}


def test_real_key_names():
    """Each real transformers key lands on the m2f parameter of the same role, tensor unchanged; the
    separate q/k/v projections of the self-attention become in_proj rows [q; k; v]."""
    from m2f.convert.keymaps import apply_rules, detectron2_to_model_rules
    from m2f.convert.transformers import transformers_to_detectron2

    state = {key: torch.full((4,), float(i)) for i, key in enumerate(HF_SWIN_KEYS)}
    layer = "model.transformer_module.decoder.layers.1.self_attn."
    for offset, name in enumerate(("q_proj", "k_proj", "v_proj")):
        state[layer + name + ".weight"] = torch.full((2, 3), 100.0 + offset)
    hub, unmatched = transformers_to_detectron2(state)
    assert unmatched == []
    out, unmatched = apply_rules(hub, detectron2_to_model_rules("swin"))
    assert unmatched == []
    in_proj = "transformer_decoder.transformer_self_attention_layers.1.self_attn.in_proj_weight"
    assert sorted(out) == sorted([*HF_SWIN_KEYS.values(), in_proj])
    for source, target in HF_SWIN_KEYS.items():
        assert torch.equal(out[target], state[source]), source
    expected = torch.cat([torch.full((2, 3), 100.0), torch.full((2, 3), 101.0), torch.full((2, 3), 102.0)])
    assert torch.equal(out[in_proj], expected)

"""m2f's Swin backbone against Hugging Face transformers' SwinBackbone / SwinModel and timm's parameter names.

transformers' SwinBackbone computes the official Swin detection backbone (pad each stage to a multiple of the
window, then shift, mask built on the padded map) at any size; the weights are copied to ours by name here.
Sizes are chosen so that the stages are not multiples of the window and the last one is smaller than it.
"""

import math
import re

import pytest
import safetensors.torch
import timm
import torch

from m2f.config import BackboneConfig
from m2f.models.backbone import Backbone
from m2f.models.padding import padded_size
from m2f.models.swin import SWIN_ARCHITECTURES, build_swin, shifted_window_mask

transformers = pytest.importorskip("transformers")

STAGES = ["stage1", "stage2", "stage3", "stage4"]
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small float64 models run much faster on one thread than on several of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_backbone(window: int) -> torch.nn.Module:
    """A small HF SwinBackbone in float64 with every parameter random (so that any mix-up shows)."""
    config = transformers.SwinConfig(
        embed_dim=SMALL["embed_dim"], depths=list(SMALL["depths"]), num_heads=list(SMALL["num_heads"]),
        window_size=window, out_features=STAGES, drop_path_rate=0.0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwinBackbone(config).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.3)
    return model


def hf_to_timm_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SwinBackbone tensors under timm's Swin names (`body.`) and the output norms (`norms.{i}`)."""
    out = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("swin.")
        if key.startswith("layernorm.") or key.endswith("relative_position_index"):
            continue
        stage_norm = re.fullmatch(r"hidden_states_norms\.stage(\d)\.(\w+)", key)
        if stage_norm:
            out[f"norms.{int(stage_norm[1]) - 1}.{stage_norm[2]}"] = tensor
            continue
        merging = re.fullmatch(r"encoder\.layers\.(\d)\.downsample\.(.+)", key)
        if merging:  # HF merges at the end of stage s, timm at the start of stage s + 1
            out[f"body.layers.{int(merging[1]) + 1}.downsample.{merging[2]}"] = tensor
            continue
        for hf_name, timm_name in [
            ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
            ("embeddings.norm.", "patch_embed.norm."),
            ("encoder.layers.", "layers."),
            ("attention.o_proj.", "attn.proj."),
            ("attention.relative_position_bias.", "attn."),
            ("layernorm_before.", "norm1."),
            ("layernorm_after.", "norm2."),
        ]:
            key = key.replace(hf_name, timm_name)
        out["body." + key] = tensor
    for key in [k for k in out if ".attention.q_proj." in k]:
        parts = [out.pop(key.replace("q_proj", name)) for name in ("q_proj", "k_proj", "v_proj")]
        out[key.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
    return out


def our_backbone(window: int, hf: torch.nn.Module) -> Backbone:
    config = BackboneConfig(
        timm_name="swin_tiny_patch4_window7_224",
        timm_kwargs=dict(SMALL, window_size=window, img_size=224, strict_img_size=False),
        output_norm=True,
    )
    ours = Backbone(config).double().eval()
    ours.load_state_dict(hf_to_timm_names(hf.state_dict()))
    return ours


# (window, (H, W)): stage sizes (ceil(H/4), ...) for 100x147: 25x37, 13x19, 7x10, 4x5 (the last smaller than
# the window); 61x45: 16x12, 8x6, 4x3, 2x2; 98x141 with window 3 (shift 1): 25x36, 13x18, 7x9, 4x5.
CASES = [(7, (100, 147)), (7, (61, 45)), (3, (98, 141)), (12, (45, 200))]


@pytest.mark.parametrize(("window", "size"), CASES)
def test_stage_outputs_match_transformers(window, size):
    hf = hf_backbone(window)
    ours = our_backbone(window, hf)
    images = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_normed = hf(images).feature_maps
        # the stage outputs before the output norms: SwinModel as SwinBackbone runs it
        expected_raw = hf.swin(
            images,
            output_hidden_states=True,
            always_partition=True,
            output_hidden_states_before_downsampling=True,
        ).reshaped_hidden_states[1:]
        actual_raw = ours.body(images)
        actual_normed = ours(images)
    assert list(actual_normed) == ["res2", "res3", "res4", "res5"]
    for stage, (raw, expected) in enumerate(zip(actual_raw, expected_raw)):
        stride = 4 * 2**stage
        assert raw.shape == (2, 16 * 2**stage, -(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(raw, expected, rtol=1e-10, atol=1e-10)
    for actual, expected in zip(actual_normed.values(), expected_normed):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_gradients_match_transformers():
    hf = hf_backbone(7)
    ours = our_backbone(7, hf)
    hf.train()
    ours.train()  # no dropout or stochastic depth in either: training mode computes the same
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(1, 3, 70, 53, dtype=torch.float64, generator=generator)
    weights = [torch.randn(f.shape, dtype=torch.float64, generator=generator) for f in ours(images).values()]
    sum((f * w).sum() for f, w in zip(ours(images).values(), weights)).backward()
    sum((f * w).sum() for f, w in zip(hf(images).feature_maps, weights)).backward()
    hf_grads = hf_to_timm_names({k: p.grad for k, p in hf.named_parameters()})
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_shifted_window_mask_by_hand():
    # 4 x 4 map, window 2, shift 1: regions along an axis are [0, 2), [2, 3), [3, 4)
    mask = shifted_window_mask(4, 4, 2, 1, torch.float64, torch.device("cpu"))
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()  # top-left window lies in region (0, 0)
    # top-right window: columns 2 (region 1) and 3 (region 2), tokens (0,2) (0,3) (1,2) (1,3)
    col_region = torch.tensor([1, 2, 1, 2])
    expected = torch.where(col_region[:, None] == col_region[None, :], 0.0, -100.0).double()
    torch.testing.assert_close(mask[1], expected)
    # bottom-right window: four different regions, only the diagonal is unmasked
    torch.testing.assert_close(mask[3], torch.where(torch.eye(4, dtype=torch.bool), 0.0, -100.0).double())


@pytest.mark.parametrize("name", sorted(SWIN_ARCHITECTURES))
def test_parameter_names_and_shapes_equal_timm(name):
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
        ours = build_swin(name, {})
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith(("norm.", "head."))}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_backbone_loads_timm_and_original_checkpoints(tmp_path, layout):
    kwargs = dict(SMALL, window_size=7)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs)
    state = reference.state_dict()
    if layout == "original":  # Microsoft's layout: merging at the end of stage s, buffers saved, bare head
        state = {
            re.sub(r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
            for k, v in state.items()
        }
        state["head.weight"], state["head.bias"] = state.pop("head.fc.weight"), state.pop("head.fc.bias")
        state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
        state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "swin.safetensors"
    safetensors.torch.save_file(state, str(path))
    config = BackboneConfig(timm_name="swin_tiny_patch4_window7_224", timm_kwargs=kwargs, output_norm=True)
    backbone = Backbone(config)
    backbone.load_weights(path)
    loaded = backbone.body.state_dict()
    assert len(loaded) == len(reference.state_dict()) - 4  # all but the final norm and the classifier
    for key, value in loaded.items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_pruned_stages_and_bad_arguments():
    config = BackboneConfig(
        timm_name="swin_tiny_patch4_window7_224", timm_kwargs=SMALL, out_strides=(8, 16), output_norm=True
    )
    backbone = Backbone(config).eval()
    assert len(backbone.body.layers) == 3 and backbone.out_channels == [32, 64]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 50, 70))
    assert [f.shape for f in features.values()] == [(1, 32, 7, 9), (1, 64, 4, 5)]
    with pytest.raises(ValueError, match="always_partition"):
        build_swin("swin_tiny_patch4_window7_224", {"always_partition": True})
    with pytest.raises(ValueError, match="swin_huge"):
        build_swin("swin_huge", {})
    with pytest.raises(ValueError, match="window_size"):
        build_swin("swin_tiny_patch4_window7_224", {"window_size": (7, 7)})


def test_backbone_rejects_other_window_sizes(tmp_path):
    # timm built for 64 x 64 images fits the windows of the last stages to them (tables of 7^2 and 3^2 rows);
    # the official window (7: 13^2 rows) must not silently take them
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, **SMALL)
    path = tmp_path / "swin64.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))
    backbone = Backbone(BackboneConfig(timm_name="swin_tiny_patch4_window7_224", timm_kwargs=SMALL))
    with pytest.raises(
        ValueError, match=r"swin64\.safetensors.*layers\.2\.blocks\.0\.attn\.relative_position_bias_table"
    ):
        backbone.load_weights(path)


def test_grad_checkpointing_recomputes_every_block_of_every_stage(monkeypatch):
    """set_grad_checkpointing runs each block of each stage (depths 1, 2, 3, 2) under activation
    checkpointing when gradients are recorded, and no block without gradients or once switched off."""
    from m2f.models import swin

    config = BackboneConfig(
        timm_name="swin_tiny_patch4_window7_224",
        timm_kwargs=dict(SMALL, depths=(1, 2, 3, 2)),
        output_norm=True,
    )
    backbone = Backbone(config)
    every_block = [block for stage in backbone.body.layers for block in stage.blocks]
    assert len(every_block) == 8
    checkpointed = []
    real_checkpoint = swin.checkpoint
    monkeypatch.setattr(
        swin,
        "checkpoint",
        lambda block, *a, **k: checkpointed.append(block) or real_checkpoint(block, *a, **k),
    )
    images = torch.randn(1, 3, 40, 56)
    backbone.set_grad_checkpointing(True)
    sum(feature.sum() for feature in backbone(images).values()).backward()
    assert len(checkpointed) == len(every_block)
    assert all(a is b for a, b in zip(checkpointed, every_block))
    checkpointed.clear()
    with torch.no_grad():
        backbone(images)
    backbone.set_grad_checkpointing(False)
    backbone(images)
    assert checkpointed == []


def test_padded_size_is_the_next_multiple():
    for multiple in (1, 2, 4, 7, 12, 32):
        for size in range(0, 100):
            assert padded_size(size, multiple) == math.ceil(size / multiple) * multiple

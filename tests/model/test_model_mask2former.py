"""Mask2Former: configs, output shapes, parameter counts, backbone weights, training step."""

import dataclasses

import pytest
import safetensors.torch
import timm
import torch

import m2f
from m2f.config import ModelConfig
from m2f.losses import build_criterion

# Parameter counts of the paper's Table (millions).
PAPER_PARAMS = {
    "panoptic-r50": 44,
    "panoptic-r101": 63,
    "panoptic-swin-t": 47,
    "panoptic-swin-s": 69,
    "panoptic-swin-b": 107,
    "panoptic-swin-l-in21k": 216,
    "instance-r50": 44,
    "semantic-ade20k-swin-l": 216,
    # ADE20K's tables
    "semantic-ade20k-r101": 63,
    "semantic-ade20k-swin-t": 47,
    "semantic-ade20k-swin-b": 107,
    "panoptic-ade20k-swin-l": 216,
}


def tiny_config(num_classes=2, **loss):
    config = m2f.get_config("demo-tiny")
    return dataclasses.replace(
        config, num_classes=num_classes, loss=dataclasses.replace(config.loss, num_points=256, **loss)
    )


def test_config_names_and_bad_name():
    assert set(m2f.CONFIG_NAMES) == {
        "panoptic-r50",
        "panoptic-r101",
        "panoptic-swin-t",
        "panoptic-swin-s",
        "panoptic-swin-b",
        "panoptic-swin-b-in21k",
        "panoptic-swin-l-in21k",
        "instance-r50",
        "instance-r101",
        "instance-swin-t",
        "instance-swin-s",
        "instance-swin-b",
        "instance-swin-b-in21k",
        "instance-swin-l-in21k",
        "semantic-ade20k-r50",
        "semantic-ade20k-r101",
        "semantic-ade20k-swin-t",
        "semantic-ade20k-swin-s",
        "semantic-ade20k-swin-b",
        "semantic-ade20k-swin-b-in21k",
        "semantic-ade20k-swin-l",
        "panoptic-ade20k-r50",
        "panoptic-ade20k-swin-l",
        "instance-ade20k-r50",
        "semantic-cityscapes-r50",
        "semantic-cityscapes-r101",
        "semantic-cityscapes-swin-s",
        "semantic-cityscapes-swin-l",
        "panoptic-cityscapes-r50",
        "panoptic-cityscapes-swin-t",
        "panoptic-cityscapes-swin-b-in21k",
        "instance-cityscapes-r50",
        "instance-cityscapes-swin-l-in21k",
        "semantic-mapillary-r50",
        "semantic-mapillary-swin-l-in21k",
        "panoptic-mapillary-r50",
        "panoptic-mapillary-swin-l-in21k",
        "demo-tiny",
    }
    with pytest.raises(ValueError, match="panoptic-r50") as error:
        m2f.build_model("panoptic-r5O")
    assert "demo-tiny" in str(error.value) and "panoptic-r5O" in str(error.value)
    with pytest.raises(TypeError, match="name_or_config"):
        m2f.build_model(42)


def test_config_values_and_round_trip():
    swin_l = m2f.get_config("panoptic-swin-l-in21k")
    assert swin_l.num_queries == 200 and swin_l.num_classes == 133
    assert m2f.get_config("instance-r101").num_classes == 80
    ade = m2f.get_config("semantic-ade20k-r50")
    assert ade.num_classes == 150 and ade.task == "semantic"
    r50 = m2f.get_config("panoptic-r50")
    assert r50.solver.lr_steps == (int(0.9 * 368750), int(0.95 * 368750))
    assert (r50.decoder.num_layers, r50.pixel_decoder.encoder_layers, r50.decoder.ffn_dim) == (9, 6, 2048)
    for name in m2f.CONFIG_NAMES:
        config = m2f.get_config(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="task"):
        dataclasses.replace(r50, task="detection")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"num_querys": 3})


# From Mask2Former's published configs: (task, classes, queries, Swin embed dim and window or ResNet depth,
# crop size, iterations, schedule).
PUBLISHED = {
    "instance-swin-b": ("instance", 80, 100, "swin_base_patch4_window12_384", 1024, 368750, "step"),
    "instance-swin-b-in21k": ("instance", 80, 100, "swin_base_patch4_window12_384", 1024, 368750, "step"),
    "instance-swin-l-in21k": ("instance", 80, 200, "swin_large_patch4_window12_384", 1024, 737500, "step"),
    "semantic-ade20k-r101": ("semantic", 150, 100, "resnet101", 512, 160000, "poly"),
    "semantic-ade20k-swin-t": ("semantic", 150, 100, "swin_tiny_patch4_window7_224", 512, 160000, "poly"),
    "semantic-ade20k-swin-s": ("semantic", 150, 100, "swin_small_patch4_window7_224", 512, 160000, "poly"),
    "semantic-ade20k-swin-b": ("semantic", 150, 100, "swin_base_patch4_window12_384", 640, 160000, "poly"),
    "semantic-ade20k-swin-b-in21k": (
        "semantic",
        150,
        100,
        "swin_base_patch4_window12_384",
        640,
        160000,
        "poly",
    ),
    "panoptic-ade20k-r50": ("panoptic", 150, 100, "resnet50", 640, 160000, "poly"),
    "panoptic-ade20k-swin-l": ("panoptic", 150, 200, "swin_large_patch4_window12_384", 640, 160000, "poly"),
    "instance-ade20k-r50": ("instance", 100, 100, "resnet50", 640, 160000, "poly"),
    "semantic-cityscapes-r50": ("semantic", 19, 100, "resnet50", 1024, 90000, "poly"),
    "semantic-cityscapes-r101": ("semantic", 19, 100, "resnet101", 1024, 90000, "poly"),
    "semantic-cityscapes-swin-s": ("semantic", 19, 100, "swin_small_patch4_window7_224", 1024, 90000, "poly"),
    "semantic-cityscapes-swin-l": (
        "semantic",
        19,
        100,
        "swin_large_patch4_window12_384",
        1024,
        90000,
        "poly",
    ),
    "panoptic-cityscapes-r50": ("panoptic", 19, 100, "resnet50", 1024, 90000, "poly"),
    "panoptic-cityscapes-swin-t": ("panoptic", 19, 100, "swin_tiny_patch4_window7_224", 1024, 90000, "poly"),
    "panoptic-cityscapes-swin-b-in21k": (
        "panoptic",
        19,
        100,
        "swin_base_patch4_window12_384",
        1024,
        90000,
        "poly",
    ),
    "instance-cityscapes-r50": ("instance", 8, 100, "resnet50", 1024, 90000, "poly"),
    "instance-cityscapes-swin-l-in21k": (
        "instance",
        8,
        200,
        "swin_large_patch4_window12_384",
        1024,
        90000,
        "poly",
    ),
    "semantic-mapillary-r50": ("semantic", 65, 100, "resnet50", 1024, 300000, "poly"),
    "semantic-mapillary-swin-l-in21k": (
        "semantic",
        65,
        100,
        "swin_large_patch4_window12_384",
        1024,
        300000,
        "poly",
    ),
    "panoptic-mapillary-r50": ("panoptic", 65, 100, "resnet50", 1024, 300000, "poly"),
    "panoptic-mapillary-swin-l-in21k": (
        "panoptic",
        65,
        200,
        "swin_large_patch4_window12_384",
        1024,
        300000,
        "poly",
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_follow_mask2formers_published_ones(name):
    from m2f.engine.train import default_dataset_kind

    config = m2f.get_config(name)
    task, classes, queries, backbone, crop, iterations, schedule = PUBLISHED[name]
    assert (config.task, config.num_classes, config.num_queries) == (task, classes, queries)
    assert config.backbone.timm_name == backbone
    # FrozenBN but for the R-101 ADE20K config and Cityscapes, which set SyncBN
    trained_batchnorm = name == "semantic-ade20k-r101" or config.dataset == "cityscapes"
    assert config.backbone.frozen_batchnorm == (backbone.startswith("resnet") and not trained_batchnorm)
    solver = config.solver
    assert (solver.image_size, solver.max_iter, solver.lr_schedule) == (crop, iterations, schedule)
    assert solver.resize_base == (2.0 if config.dataset == "mapillary" else 1.0)
    if config.dataset == "ade20k":  # tested at the crop size, the long side at most 4 crops; no warmup
        assert (config.inference.test_short_edge, config.inference.test_max_size) == (crop, 4 * crop)
        assert (solver.min_scale, solver.max_scale, solver.warmup_iters, solver.lr_steps) == (0.5, 2.0, 0, ())
        assert solver.crop_size == (crop, crop)
        assert default_dataset_kind(config) == ("ade20k" if task == "semantic" else f"ade20k-{task}")
    elif config.dataset == "cityscapes":  # 512 x 1024 crops, tested at 1024 x 2048
        assert (config.inference.test_short_edge, config.inference.test_max_size) == (1024, 2048)
        assert (solver.min_scale, solver.max_scale, solver.warmup_iters, solver.lr_steps) == (0.5, 2.0, 0, ())
        assert solver.crop_size == (512, 1024)
        assert default_dataset_kind(config) == ("cityscapes" if task == "semantic" else f"cityscapes-{task}")
    elif config.dataset == "mapillary":  # 1024 crops from short sides of 1024-4096, tested at 2048
        assert (config.inference.test_short_edge, config.inference.test_max_size) == (2048, 2048)
        assert (solver.min_scale, solver.max_scale, solver.warmup_iters, solver.lr_steps) == (0.5, 2.0, 0, ())
        assert solver.crop_size == (1024, 1024) and solver.resize_base == 2.0
        assert config.inference.object_mask_threshold == 0.0
        assert default_dataset_kind(config) == ("mapillary" if task == "semantic" else f"mapillary-{task}")
    else:
        assert (solver.min_scale, solver.max_scale) == (0.1, 2.0)
        assert default_dataset_kind(config) == f"coco-{task}"


def test_stored_configs_with_retired_fields_still_load():
    """panoptic_on / instance_on / semantic_on were never read (the task decides); old checkpoints have them."""
    data = m2f.get_config("demo-tiny").to_dict()
    data["inference"].update(panoptic_on=True, instance_on=False, semantic_on=True)
    assert ModelConfig.from_dict(data) == m2f.get_config("demo-tiny")
    assert ModelConfig.from_dict({"pixel_mean": [1, 2, 3]}).pixel_mean == (1.0, 2.0, 3.0)


def test_config_round_trips_through_json_and_names_bad_fields():
    """Checkpoints store the config as JSON: tuples come back as tuples, nested ones in timm_kwargs too, and a
    value of the wrong type is named rather than failing later in the model."""
    import json

    swin = m2f.get_config("panoptic-swin-t")
    backbone = dataclasses.replace(swin.backbone, timm_kwargs={"img_size": (64, 96), "depths": (2, 2, 2, 2)})
    config = dataclasses.replace(swin, backbone=backbone)
    for name in [*m2f.CONFIG_NAMES, config]:
        config = m2f.get_config(name) if isinstance(name, str) else name
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig.from_dict({"loss": {"mask_weight": 5}}).loss.mask_weight == 5.0
    for data, field in (
        ({"num_classes": "5"}, "config.num_classes must be of type int"),
        ({"num_classes": 5.0}, "config.num_classes must be of type int"),
        ({"decoder": 5}, "config.decoder must be a dict of DecoderConfig fields"),
        ({"decoder": {"pre_norm": 1}}, "config.decoder.pre_norm must be of type bool"),
        ({"pixel_mean": 0.5}, "config.pixel_mean must be of type tuple"),
        ({"pixel_mean": [1.0, 2.0]}, r"config.pixel_mean must be of type tuple\[float, float, float\]"),
        (
            {"backbone": {"out_strides": [4, "x"]}},
            r"config.backbone.out_strides must be of type tuple\[int, ...\]",
        ),
        ({"solver": {"lr_steps": [1.5]}}, r"config.solver.lr_steps must be of type tuple\[int, ...\]"),
        ({"solver": {"optimizer": "sgd"}}, "solver.optimizer must be 'adamw' \\(the only one implemented\\)"),
        ({"backbone": {"timm_kwargs": []}}, "config.backbone.timm_kwargs must be of type dict"),
        ([], "config must be a dict"),
        ({"decoder": {"num_queries": 0}}, r"decoder.num_queries must be >= 1, got 0"),
        ({"decoder": {"num_layers": -1}}, r"decoder.num_layers must be >= 0, got -1"),
        ({"inference": {"object_mask_threshold": 80.0}}, r"inference.object_mask_threshold must be in \[0.0"),
        ({"inference": {"overlap_threshold": -0.1}}, r"inference.overlap_threshold must be in \[0.0, 1.0\]"),
        ({"inference": {"top_k": 0}}, r"inference.top_k must be >= 1, got 0"),
        ({"inference": {"test_max_size": 0}}, r"inference.test_max_size must be >= 1, got 0"),
        # Failed deep in the network (a stack of unequal tensors, a conv's channels) or gave NaN outputs.
        ({"decoder": {"hidden_dim": 66, "num_heads": 3}}, r"decoder.hidden_dim must be a multiple of 4"),
        ({"pixel_std": [0.0, 1.0, 1.0]}, r"pixel_std positive ones"),
        ({"backbone": {"out_strides": [32, 16, 8, 4]}}, r"backbone.out_strides must increase"),
        ({"num_classes": 2.5}, r"config.num_classes must be of type int"),
        # Accepted, then NaN costs in the matcher, or silently wrong losses and inputs.
        ({"loss": {"class_weight": float("nan")}}, r"loss.class_weight must be >= 0.0, got nan"),
        ({"loss": {"no_object_weight": -1.0}}, r"loss.no_object_weight must be >= 0.0, got -1.0"),
        ({"loss": {"importance_sample_ratio": 1.5}}, r"loss.importance_sample_ratio must be in \[0.0, 1.0\]"),
        ({"loss": {"oversample_ratio": 0.5}}, r"loss.oversample_ratio must be >= 1.0"),
        ({"pixel_mean": [float("nan"), 1.0, 1.0]}, r"pixel_mean and pixel_std must hold 3 finite values"),
        ({"pixel_std": [float("inf"), 1.0, 1.0]}, r"pixel_mean and pixel_std must hold 3 finite values"),
        ({"decoder": {"mask_threshold": 2.0}}, r"decoder.mask_threshold must be in \[0.0, 1.0\]"),
    ):
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_dict(data)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):
        model = m2f.build_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(PAPER_PARAMS[name], rel=0.02)


def test_big_config_structure_on_meta():
    with torch.device("meta"):
        model = m2f.build_model("panoptic-swin-l-in21k")
    decoder = model.transformer_decoder
    assert decoder.query_feat.weight.shape == (200, 256)
    assert decoder.class_embed.weight.shape == (134, 256)
    assert len(decoder.transformer_cross_attention_layers) == 9
    assert len(model.pixel_decoder.transformer.encoder.layers) == 6
    assert model.backbone.out_channels == [192, 384, 768, 1536]
    assert [p[0].in_channels for p in model.pixel_decoder.input_proj] == [1536, 768, 384]
    encoder_attn = model.pixel_decoder.transformer.encoder.layers[0].self_attn
    assert (encoder_attn.n_levels, encoder_attn.n_heads, encoder_attn.n_points) == (3, 8, 4)
    assert model.pixel_decoder.transformer.encoder.layers[0].linear1.out_features == 1024


@pytest.mark.parametrize("name", ["panoptic-r50", "panoptic-swin-t"])
def test_big_config_output_shapes(name):
    model = m2f.build_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96) * 255)
    assert out["pred_logits"].shape == (1, 100, 4)
    assert out["pred_masks"].shape == (1, 100, 16, 24)
    assert "aux_outputs" not in out


def test_demo_tiny_shapes_and_deep_supervision():
    config = tiny_config()
    model = m2f.build_model(config)
    images = torch.rand(2, 3, 64, 64) * 255
    out = model.train()(images)
    queries = config.num_queries
    assert out["pred_logits"].shape == (2, queries, 3)
    assert out["pred_masks"].shape == (2, queries, 16, 16)
    assert len(out["aux_outputs"]) == config.decoder.num_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, queries, 3)
        assert aux["pred_masks"].shape == (2, queries, 16, 16)
    with torch.no_grad():
        out_eval = model.eval()(images)
    assert set(out_eval) == {"pred_logits", "pred_masks"}
    assert out_eval["pred_masks"].shape == (2, queries, 16, 16)
    with torch.no_grad():
        odd = model(torch.rand(1, 3, 70, 90) * 255)
    assert odd["pred_masks"].shape == (1, queries, 18, 23)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(3, 64, 64))


def test_every_parameter_gets_a_gradient_from_every_loss_term():
    config = tiny_config()
    model = m2f.build_model(config).train()
    criterion = build_criterion(config)
    images, targets = fixed_batch()
    losses = criterion(model(images), targets)
    assert set(losses) == {
        f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ["", *(f"_{i}" for i in range(6))]
    }
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def fixed_batch():
    """Two 64x64 images: class 0 is a bright square, class 1 a dark background."""
    images = torch.zeros(2, 3, 64, 64)
    targets = []
    for b, (y, x) in enumerate([(8, 12), (30, 26)]):
        square = torch.zeros(64, 64, dtype=torch.bool)
        square[y : y + 24, x : x + 24] = True
        images[b, :, square] = 230.0
        images[b, :, ~square] = 20.0
        targets.append({"labels": torch.tensor([0, 1]), "masks": torch.stack([square, ~square])})
    return images, targets


def total_loss(model, criterion, images, targets, seed):
    torch.manual_seed(seed)  # same matcher and loss points for every evaluation
    return sum(criterion(model(images), targets).values())


def test_optimizer_steps_lower_the_loss():
    torch.manual_seed(0)
    config = tiny_config()
    model = m2f.build_model(config).train()
    criterion = build_criterion(config)
    images, targets = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    initial = total_loss(model, criterion, images, targets, seed=1)
    optimizer.zero_grad()
    initial.backward()
    optimizer.step()
    with torch.no_grad():
        after_one = total_loss(model, criterion, images, targets, seed=1)
    assert after_one < initial

    for step in range(15):
        loss = total_loss(model, criterion, images, targets, seed=100 + step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = total_loss(model, criterion, images, targets, seed=1)
    assert final < 0.6 * initial


def timm_checkpoint(tmp_path, suffix):
    reference = timm.create_model("test_resnet", pretrained=False)
    state = reference.state_dict()
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_from_local_file(tmp_path, suffix):
    path, state = timm_checkpoint(tmp_path, suffix)
    model = m2f.build_model("demo-tiny", backbone_weights=path)
    loaded = model.backbone.body.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert "fc.weight" in state and "fc.weight" not in loaded


def test_backbone_weights_errors(tmp_path):
    missing_path = tmp_path / "nowhere" / "r50.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nowhere/r50\.safetensors"):
        m2f.build_model("demo-tiny", backbone_weights=missing_path)
    pickled = tmp_path / "R-50.pkl"
    pickled.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"(?s)R-50\.pkl.*timm or torchvision state dict"):
        m2f.build_model("demo-tiny", backbone_weights=pickled)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"damaged\.safetensors"):
        m2f.build_model("demo-tiny", backbone_weights=damaged)
    _, state = timm_checkpoint(tmp_path, ".safetensors")
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(bad))
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight") as error:
        m2f.build_model("demo-tiny", backbone_weights=bad)
    assert "extra.weight" in str(error.value) and "bad.safetensors" in str(error.value)


def test_frozen_batchnorm_and_swin_output_norms():
    with torch.device("meta"):
        r50 = m2f.build_model("panoptic-r50")
        swin = m2f.build_model("panoptic-swin-b")
    assert not any("bn" in n for n, _ in r50.backbone.named_parameters())
    assert any(k.endswith("bn1.running_mean") for k in r50.backbone.state_dict())
    assert r50.backbone.norms is None
    assert [n.normalized_shape[0] for n in swin.backbone.norms] == [128, 256, 512, 1024]


def test_frozen_batchnorm_backbone_without_weights_trains_every_block():
    """Before weights are loaded a frozen norm is the identity (scale 1, as detectron2's FrozenBatchNorm2d
    starts), not timm's zero-initialized last norm of each block, which frozen would cut every residual
    branch off from its output and its gradient."""
    from m2f.config import BackboneConfig
    from m2f.models.backbone import Backbone

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(timm_name="resnet26", frozen_batchnorm=True))
    scales = [m.weight for m in backbone.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert len(scales) > 20 and all(bool((s == 1).all()) for s in scales)
    features = backbone(torch.randn(1, 3, 64, 64))
    sum(f.square().mean() for f in features.values()).backward()
    convs = [(n, p) for n, p in backbone.named_parameters() if "conv" in n]
    assert convs and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in convs)


def test_cpu_backbone_runs_channels_last_with_the_results_of_nchw():
    """On the CPU the ResNet body gets the image channels-last (oneDNN's fastest layout): its features come out
    channels-last, with the values the body gives an NCHW image, and so do their gradients."""
    from m2f.config import BackboneConfig
    from m2f.models.backbone import Backbone

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(timm_name="resnet26", frozen_batchnorm=True)).eval()
    image = torch.randn(1, 3, 64, 96, requires_grad=True)
    features = backbone(image)
    expected = backbone.body.forward_intermediates(image, indices=backbone.indices, intermediates_only=True)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())
    assert not any(e.is_contiguous(memory_format=torch.channels_last) for e in expected)
    for name, reference in zip(features, expected):
        torch.testing.assert_close(features[name], reference, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(sum(f.sum() for f in features.values()), image)
    (expected_grad,) = torch.autograd.grad(sum(e.sum() for e in expected), image)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def frozen_backbone(timm_name: str, dtype=torch.float32):
    """A ResNet backbone with frozen norms whose statistics and affine values are random, not the identity."""
    from m2f.config import BackboneConfig
    from m2f.models.backbone import Backbone, FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(timm_name=timm_name, frozen_batchnorm=True)).to(dtype).eval()
    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    for norm in norms:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return backbone, norms


def test_frozen_batchnorm_computes_batchnorm_in_the_inputs_dtype():
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, and its input gradient, against that formula in
    float64; a bfloat16 map stays bfloat16 (torchvision's FrozenBatchNorm2d returns float32), so a frozen ResNet
    under autocast gives bfloat16 features."""
    backbone, norms = frozen_backbone("resnet26")
    norm = norms[1]
    channels = norm.weight.numel()
    x = torch.randn(2, channels, 5, 7, dtype=torch.float64, requires_grad=True)
    mean, var, weight, bias = (
        t.double()[None, :, None, None] for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias)
    )
    expected = (x.detach() - mean) / torch.sqrt(var + norm.eps) * weight + bias
    out = norm.double()(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (weight / torch.sqrt(var + norm.eps)).expand_as(x), rtol=1e-12, atol=0)
    norm.float()
    low = norm(x.detach().to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), expected, rtol=2e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = backbone(torch.randn(1, 3, 64, 64))
    assert {f.dtype for f in features.values()} == {torch.bfloat16}


@pytest.mark.parametrize("timm_name", ["resnet26", "resnet26d"])
def test_folding_frozen_norms_into_the_convs_keeps_the_features(timm_name):
    """Every frozen norm after a conv is folded into it (the deep stem of resnet26d ends in a norm after a
    Sequential, which stays) and the features are the unfolded ones up to float64 rounding."""
    from m2f.models.backbone import FrozenBatchNorm2d

    backbone, norms = frozen_backbone(timm_name, torch.float64)
    image = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(image)
        kept = 1 if timm_name == "resnet26d" else 0
        assert backbone.fold_frozen_batchnorm() == len(norms) - kept
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == kept
        features = backbone(image)
    for name in expected:
        torch.testing.assert_close(features[name], expected[name], rtol=1e-10, atol=1e-10)


def test_folding_leaves_backbones_without_frozen_norms_as_they_are():
    from m2f.config import BackboneConfig
    from m2f.models.backbone import Backbone

    trained_norms = Backbone(BackboneConfig(timm_name="resnet18"))
    state = {k: v.clone() for k, v in trained_norms.state_dict().items()}
    assert trained_norms.fold_frozen_batchnorm() == 0
    assert trained_norms.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in trained_norms.state_dict().items())
    with torch.device("meta"):
        swin = m2f.build_model("panoptic-swin-t").backbone
    assert swin.fold_frozen_batchnorm() == 0


def test_export_with_a_dynamic_batch():
    """torch.export with a dynamic batch size: the argument checks of the ops add no guard that ties the
    batch to other sizes, and the exported program matches eager at another batch size."""
    torch.manual_seed(0)
    model = m2f.build_model("demo-tiny").eval()
    batch = torch.export.Dim("batch", min=2, max=16)
    exported = torch.export.export(model, (torch.rand(2, 3, 64, 96) * 255,), dynamic_shapes=({0: batch},))
    images = torch.rand(5, 3, 64, 96) * 255
    with torch.no_grad():
        expected = model(images)
    got = exported.module()(images)
    torch.testing.assert_close(got["pred_masks"], expected["pred_masks"])
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])


def test_dropout_is_refused():
    """The layers have no dropout (Mask2Former trains without it): a config asking for some is refused."""
    with pytest.raises(ValueError, match="dropout is not supported"):
        ModelConfig(decoder=dataclasses.replace(ModelConfig().decoder, dropout=0.1))
    with pytest.raises(ValueError, match="encoder_dropout"):
        ModelConfig(pixel_decoder=dataclasses.replace(ModelConfig().pixel_decoder, encoder_dropout=0.1))


@pytest.mark.parametrize(
    "common_stride, out_strides, divisibility",
    [(8, (4, 8, 16, 32), 32), (2, (2, 4, 8, 16, 32), 32), (4, (4, 8, 16, 32), 6), (4, (4, 8, 16, 32), 10)],
)
def test_padded_input_masks_are_cropped_at_the_mask_stride(common_stride, out_strides, divisibility):
    """An image whose size is not a multiple of size_divisibility gives the masks of the image padded by hand,
    cropped to ceil(size / common_stride), also where the stride does not divide the padded size."""
    base = tiny_config()
    config = dataclasses.replace(
        base,
        pixel_decoder=dataclasses.replace(base.pixel_decoder, common_stride=common_stride),
        backbone=dataclasses.replace(base.backbone, out_strides=out_strides),
        size_divisibility=divisibility,
    )
    torch.manual_seed(0)
    model = m2f.build_model(config, backend="torch").eval()
    height, width = 65, 97
    image = torch.rand(1, 3, height, width) * 255
    padded_size = (-(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility)
    padded = model.pixel_mean.expand(1, 3, *padded_size).clone()  # zero after normalization
    padded[..., :height, :width] = image
    with torch.no_grad():
        masks = model(image)["pred_masks"]
        expected = model(padded)["pred_masks"]
    crop_h, crop_w = -(-height // common_stride), -(-width // common_stride)
    assert masks.shape[-2:] == (crop_h, crop_w)
    torch.testing.assert_close(masks, expected[..., :crop_h, :crop_w], rtol=0, atol=1e-5)


def test_common_stride_must_halve_the_finest_transformer_stride():
    """3 cropped the masks (really at stride 4) as if at stride 3, 16 cut most of the image away."""
    for stride in (3, 16, 0):
        config = dataclasses.replace(
            m2f.get_config("demo-tiny"),
            pixel_decoder=dataclasses.replace(
                m2f.get_config("demo-tiny").pixel_decoder, common_stride=stride
            ),
        )
        with pytest.raises(ValueError, match=f"pixel_decoder.common_stride must be .* got {stride}"):
            m2f.build_model(config)


def test_empty_batches_and_bad_images():
    model = m2f.build_model("demo-tiny").eval()
    with torch.no_grad():
        outputs = model(torch.zeros(0, 3, 64, 64))  # "cannot reshape tensor of 0 elements" before
        assert outputs["pred_logits"].shape[0] == 0 and outputs["pred_masks"].shape[:1] == (0,)
        float64 = model(torch.full((1, 3, 40, 40), 128.0, dtype=torch.float64))["pred_masks"]
        expected = model(torch.full((1, 3, 40, 40), 128, dtype=torch.uint8))["pred_masks"]
    torch.testing.assert_close(float64, expected)  # "expected scalar type Double but found Float" before
    with pytest.raises(TypeError, match="images must be a \\(B, 3, H, W\\) tensor, got list"):
        model([torch.zeros(3, 32, 32)])
    with pytest.raises(
        TypeError, match=r"images must hold integer or floating pixel values, got torch\.bool"
    ):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="H, W >= 1"):
        model(torch.zeros(1, 3, 0, 32))


def test_size_divisibility_below_one_is_refused():
    with pytest.raises(ValueError, match=r"size_divisibility must be >= 1 \(1: no padding\), got 0"):
        ModelConfig(size_divisibility=0)


def checkpointable_config(backbone: str) -> ModelConfig:
    """tiny_config with a frozen-BatchNorm ResNet, or a 16-channel Swin with stochastic depth."""
    from m2f.config import BackboneConfig

    config = tiny_config()
    if backbone == "resnet":
        return dataclasses.replace(
            config, backbone=dataclasses.replace(config.backbone, frozen_batchnorm=True)
        )
    swin = BackboneConfig(
        timm_name="swin_tiny_patch4_window7_224",
        timm_kwargs={
            "embed_dim": 16,
            "depths": (2, 2, 2, 2),
            "num_heads": (1, 1, 2, 2),
            "drop_path_rate": 0.3,
        },
        output_norm=True,
    )
    return dataclasses.replace(config, backbone=swin)


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_grad_checkpointing_gives_the_same_gradients_from_fewer_saved_activations(backbone):
    """The loss and every gradient as without recomputation (Swin's stochastic depth draws the same paths
    again), while the forward pass keeps far fewer bytes for the backward pass (counted by a saved-tensor
    hook: the checkpointed parts keep only their inputs)."""
    config = checkpointable_config(backbone)
    images, targets = fixed_batch()
    results = {}
    for enable in (False, True):
        torch.manual_seed(0)
        model = m2f.build_model(config).train()
        model.set_grad_checkpointing(enable)
        saved_bytes = []

        def count(tensor, saved_bytes=saved_bytes):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss = total_loss(model, build_criterion(config), images, targets, seed=1)
        loss.backward()
        gradients = {n: p.grad for n, p in model.named_parameters()}
        results[enable] = loss.detach(), gradients, sum(saved_bytes)
    (loss, gradients, saved), (checkpointed_loss, checkpointed_gradients, checkpointed_saved) = (
        results.values()
    )
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert None not in gradients.values()
    torch.testing.assert_close(checkpointed_gradients, gradients)
    assert checkpointed_saved < 0.8 * saved


def test_grad_checkpointing_refuses_batchnorm_that_updates_its_statistics():
    """Recomputing a BatchNorm layer in training mode would update its running statistics twice."""
    model = m2f.build_model(tiny_config())
    with pytest.raises(
        ValueError, match=r"'test_resnet' has BatchNorm layers that update running statistics"
    ):
        model.set_grad_checkpointing()
    model.set_grad_checkpointing(False)

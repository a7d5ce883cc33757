"""m2f's Mask2Former against Hugging Face transformers' (random init, converted weights, no downloads).

Same architecture on both sides: ResNet (timm resnet26 = HF ResNet bottleneck depths 2-2-2-2) and Swin (small,
window 2 so that every stage is a multiple of the window at 128 x 192: the two implementations pad shifted
windows differently otherwise); the ResNet model also with pre-norm decoder layers. Outputs compared in
float64; the training loss with the same matcher and loss points on both sides.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import m2f_kernels  # noqa: E402
from m2f import build_model  # noqa: E402
from m2f.config import BackboneConfig, DecoderConfig, LossConfig, ModelConfig, PixelDecoderConfig  # noqa: E402
from m2f.convert import convert_checkpoint, export_checkpoint  # noqa: E402
from m2f.losses import build_criterion  # noqa: E402

NUM_CLASSES = 5
STAGES = ["stage1", "stage2", "stage3", "stage4"]
SWIN_SIZE = (128, 192)


def _configs(backbone: str, pre_norm: bool) -> tuple[object, ModelConfig]:
    head = dict(
        num_labels=NUM_CLASSES, num_queries=8, decoder_layers=4, encoder_layers=2, feature_size=64,
        mask_feature_size=64, hidden_dim=64, dim_feedforward=128, encoder_feedforward_dim=128,
        num_attention_heads=4, train_num_points=96, pre_norm=pre_norm,
    )  # fmt: skip
    if backbone == "resnet":
        hf_backbone = transformers.ResNetConfig(
            embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[2, 2, 2, 2],
            layer_type="bottleneck", out_features=STAGES,
        )  # fmt: skip
        hf = transformers.Mask2FormerConfig(backbone_config=hf_backbone, use_timm_backbone=False, **head)
        ours_backbone = BackboneConfig(timm_name="resnet26", frozen_batchnorm=True)
    else:
        hf_backbone = transformers.SwinConfig(
            embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=2, out_features=STAGES,
            drop_path_rate=0.0,
        )  # fmt: skip
        hf = transformers.Mask2FormerConfig(backbone_config=hf_backbone, **head)
        kwargs = dict(
            embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=2, img_size=SWIN_SIZE,
            strict_img_size=False, drop_path_rate=0.0,
        )  # fmt: skip
        ours_backbone = BackboneConfig(
            timm_name="swin_tiny_patch4_window7_224", timm_kwargs=kwargs, output_norm=True
        )
    ours = ModelConfig(
        num_classes=NUM_CLASSES,
        backbone=ours_backbone,
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64, mask_dim=64, encoder_layers=2, encoder_heads=4, encoder_points=4, encoder_ffn_dim=128
        ),
        decoder=DecoderConfig(
            hidden_dim=64, num_queries=8, num_heads=4, ffn_dim=128, num_layers=3, pre_norm=pre_norm
        ),
        loss=LossConfig(num_points=96),
    )
    return hf, ours


def _models(backbone: str, pre_norm: bool = False):
    hf_config, config = _configs(backbone, pre_norm)
    torch.manual_seed(0)
    hf = transformers.Mask2FormerForUniversalSegmentation(hf_config)
    with torch.no_grad():  # non-trivial BatchNorm statistics and deformable offsets
        for module in hf.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for name, param in hf.named_parameters():
            if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
                param.normal_(0.0, 0.2)
    state = convert_checkpoint(hf.state_dict(), "transformers", config)
    ours = build_model(config, backend="torch")
    ours.load_state_dict(state)
    return hf.double().eval(), ours.double().eval(), config


@pytest.fixture(scope="module", params=["resnet", "swin", "resnet-pre-norm"])
def models(request):
    backbone = request.param.removesuffix("-pre-norm")
    return backbone, *_models(backbone, pre_norm=request.param.endswith("-pre-norm"))


def _normalize(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    mean = torch.tensor(config.pixel_mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.pixel_std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _sizes(backbone: str) -> list[tuple[int, int]]:
    return [(64, 96), (96, 64)] if backbone == "resnet" else [SWIN_SIZE]


def test_inference_outputs_match(models):
    backbone, hf, ours, config = models
    for height, width in _sizes(backbone):
        images = torch.rand(2, 3, height, width, dtype=torch.float64) * 255
        with torch.no_grad():
            expected = hf(pixel_values=_normalize(images, config))
            actual = ours(images)
        assert actual["pred_masks"].shape == (2, 8, height // 4, width // 4)
        torch.testing.assert_close(actual["pred_logits"], expected.class_queries_logits, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(actual["pred_masks"], expected.masks_queries_logits, rtol=1e-7, atol=1e-7)


def test_weights_round_trip_to_transformers(models):
    _, hf, ours, config = models
    exported = export_checkpoint(ours.state_dict(), "transformers", config)
    reference = hf.state_dict()
    # not produced: the loss's class weights, the Swin classifier's final norm (unused by the backbone) and
    # BatchNorm counters (m2f's ResNet has frozen BatchNorm)
    skipped = {
        k
        for k in reference
        if k == "criterion.empty_weight" or ".swin.layernorm." in k or k.endswith("num_batches_tracked")
    }
    assert exported.keys() == reference.keys() - skipped
    for key, tensor in exported.items():
        assert torch.equal(tensor, reference[key]), key


def test_training_loss_matches(models, monkeypatch):
    backbone, hf, ours, config = models
    height, width = _sizes(backbone)[0]
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, height, width, dtype=torch.float64, generator=generator) * 255
    labels = [torch.tensor([1, 3, 0]), torch.tensor([4, 2])]
    masks = [torch.rand(len(lab), height, width, generator=generator) > 0.6 for lab in labels]

    # the same points on both sides: matcher points (torch.rand) and loss points (uncertainty sampling)
    num_points = config.loss.num_points
    matcher_points = torch.rand(num_points, 2, generator=generator, dtype=torch.float64)
    loss_points = torch.rand(16, num_points, 2, generator=generator, dtype=torch.float64)

    def fixed_rand(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
        return matcher_points.reshape(shape).to(
            kwargs.get("dtype") or torch.float64
        )  # the models run in float64

    monkeypatch.setattr(torch, "rand", fixed_rand)
    monkeypatch.setattr(
        hf.criterion, "sample_points_using_uncertainty", lambda logits, *args: loss_points[: logits.shape[0]]
    )
    monkeypatch.setattr(
        m2f_kernels,
        "sample_uncertain_points",
        lambda logits, *a, **k: loss_points[: logits.shape[0]].to(logits),
    )

    hf.train()
    for module in hf.modules():  # m2f's ResNet has frozen BatchNorm: running statistics on both sides
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    ours.train()
    hf_out = hf(
        pixel_values=_normalize(images, config),
        mask_labels=[m.double() for m in masks],
        class_labels=labels,
    )
    criterion = build_criterion(config, backend="torch")
    ours_losses = criterion(ours(images), [{"labels": lab, "masks": m} for lab, m in zip(labels, masks)])
    hf.eval()
    ours.eval()

    names = {"loss_cross_entropy": "loss_ce", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    hf_losses = hf.get_loss_dict(
        hf_out.masks_queries_logits, hf_out.class_queries_logits, [m.double() for m in masks], labels, None
    )
    for hf_key, value in hf_losses.items():
        torch.testing.assert_close(ours_losses[names[hf_key]].double(), value, rtol=1e-5, atol=1e-6)
    total = sum(ours_losses.values())
    torch.testing.assert_close(total.double(), hf_out.loss, rtol=1e-5, atol=1e-6)
    assert len(ours_losses) == 3 * (config.decoder.num_layers + 1)

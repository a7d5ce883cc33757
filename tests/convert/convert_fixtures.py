"""Small m2f configs (ResNet and Swin) and random weights for the converter tests."""

import torch

from m2f.config import BackboneConfig, DecoderConfig, ModelConfig, PixelDecoderConfig


def small_config(backbone: str) -> ModelConfig:
    if backbone == "resnet":
        body = BackboneConfig(timm_name="resnet26", frozen_batchnorm=True)
    else:
        kwargs = dict(
            embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=2, img_size=(128, 192),
            strict_img_size=False, drop_path_rate=0.0,
        )  # fmt: skip
        body = BackboneConfig(timm_name="swin_tiny_patch4_window7_224", timm_kwargs=kwargs, output_norm=True)
    return ModelConfig(
        name=f"small-{backbone}",
        num_classes=5,
        backbone=body,
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64, mask_dim=64, encoder_layers=2, encoder_heads=4, encoder_points=4, encoder_ffn_dim=128
        ),
        decoder=DecoderConfig(hidden_dim=64, num_queries=8, num_heads=4, ffn_dim=128, num_layers=3),
    )


def random_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict with every float entry randomized (so a mix-up of two keys shows)."""
    from m2f import build_model

    state = build_model(config, backend="torch").state_dict()
    generator = torch.Generator().manual_seed(1)
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }

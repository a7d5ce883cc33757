"""The Mask2Former model: backbone -> pixel decoder -> masked-attention transformer decoder.

Module tree: `backbone` (m2f.models.backbone.Backbone: timm names under `backbone.body.`, optional
`backbone.norms.{i}`), `pixel_decoder` (m2f.models.pixel_decoder.MSDeformAttnPixelDecoder),
`transformer_decoder` (m2f.models.transformer_decoder.MultiScaleMaskedTransformerDecoder). pixel_mean and
pixel_std are non-persistent buffers (not in the state dict). The submodule docstrings list every name.

Names in the original checkpoints (same tensor shapes and layouts unless noted):
  detectron2 Mask2Former   sem_seg_head.pixel_decoder.X      -> pixel_decoder.X, except
                           ...pixel_decoder.adapter_1 / layer_1 -> pixel_decoder.lateral_convs.0 / output_convs.0
                           sem_seg_head.predictor.X          -> transformer_decoder.X
                           backbone.normK (Swin)             -> backbone.norms.K
  Hugging Face             model.pixel_level_module.decoder: input_projections -> pixel_decoder.input_proj,
                           level_embed -> pixel_decoder.transformer.level_embed, encoder.layers.{j}.self_attn ->
                           same, self_attn_layer_norm / fc1 / fc2 / final_layer_norm -> norm1 / linear1 / linear2
                           / norm2, mask_projection -> mask_features, adapter_1.0 / adapter_1.1 ->
                           lateral_convs.0 / lateral_convs.0.norm, layer_1.0 / layer_1.1 -> output_convs.0 /
                           output_convs.0.norm;
                           model.transformer_module: queries_features -> query_feat, queries_embedder ->
                           query_embed, level_embed -> level_embed, decoder.layers.{i}.cross_attn (+ _layer_norm)
                           -> transformer_cross_attention_layers.{i}.multihead_attn (+ .norm),
                           decoder.layers.{i}.self_attn.{q,k,v}_proj -> transformer_self_attention_layers.{i}
                           .self_attn.in_proj_weight / in_proj_bias (concatenated q, k, v), out_proj -> out_proj,
                           self_attn_layer_norm -> .norm, fc1 / fc2 / final_layer_norm ->
                           transformer_ffn_layers.{i}.linear1 / linear2 / norm, decoder.layernorm -> decoder_norm,
                           decoder.mask_predictor.mask_embedder.{k}.0 -> mask_embed.layers.{k};
                           class_predictor -> transformer_decoder.class_embed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..config import ModelConfig, load_config
from .backbone import Backbone
from .padding import padded_size
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder


class Mask2Former(nn.Module):
    """forward(images (B, 3, H, W) float RGB 0..255) -> dict:
    pred_logits (B, Q, C+1) class logits (last = no object), pred_masks (B, Q, ceil(H/4), ceil(W/4)) mask
    logits, and in training mode aux_outputs (one dict of the same two keys per decoder layer, from the query
    state before it). Images whose size is not a multiple of config.size_divisibility are zero-padded after
    normalization (as detectron2 pads) and the masks cropped back to ceil(H/4) x ceil(W/4).
    """

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.size_divisibility = config.size_divisibility
        self.backbone = Backbone(config.backbone)
        channels = dict(zip(self.backbone.out_features, self.backbone.out_channels))
        strides = dict(zip(self.backbone.out_features, self.backbone.out_strides))
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            config.pixel_decoder, channels, strides, backend=backend
        )
        self.transformer_decoder = MultiScaleMaskedTransformerDecoder(
            config.decoder,
            in_channels=config.pixel_decoder.conv_dim,
            mask_dim=config.pixel_decoder.mask_dim,
            num_classes=config.num_classes,
            num_levels=len(config.pixel_decoder.transformer_strides),
            backend=backend,
        )
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of the backbone's blocks and the pixel decoder's encoder layers in the
        backward pass instead of keeping them from the forward pass: the same gradients for less memory
        and about one more forward pass of those parts. ValueError for a backbone whose BatchNorm layers update
        running statistics (Backbone.set_grad_checkpointing)."""
        self.backbone.set_grad_checkpointing(enable)
        self.pixel_decoder.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) RGB, 0-255 (uint8, integer or floating) -> {"pred_logits" (B, Q, C + 1),
        "pred_masks" (B, Q, ceil(H / 4), ceil(W / 4)) logits, and in training "aux_outputs"}."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a (B, 3, H, W) tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or 0 in images.shape[2:]:
            raise ValueError(f"images must be (B, 3, H, W) with H, W >= 1, got {tuple(images.shape)}")
        if images.dtype == torch.bool or images.dtype.is_complex:
            raise TypeError(f"images must hold integer or floating pixel values, got {images.dtype}")
        if images.is_floating_point() and images.dtype != self.pixel_mean.dtype:
            images = images.to(self.pixel_mean.dtype)  # the model's dtype (autocast casts after normalizing)
        height, width = images.shape[-2:]
        x = (images - self.pixel_mean) / self.pixel_std
        # Padded and cropped whatever the size (by 0 where it divides), in non-negative integer arithmetic: a
        # graph exported with a dynamic image size (torch.export, ONNX) is then right at every size, not only
        # at the sizes that take the example's branch (ONNX divides negative integers towards zero).
        div = self.size_divisibility
        x = F.pad(x, (0, padded_size(width, div) - width, 0, padded_size(height, div) - height))
        features = self.backbone(x)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        outputs = self.transformer_decoder(multi_scale_features, mask_features, aux_outputs=self.training)
        stride = self.config.pixel_decoder.common_stride  # the masks' part that covers the image
        mask_h, mask_w = (height + stride - 1) // stride, (width + stride - 1) // stride
        outputs["pred_masks"] = outputs["pred_masks"][..., :mask_h, :mask_w]
        for aux in outputs.get("aux_outputs", []):
            aux["pred_masks"] = aux["pred_masks"][..., :mask_h, :mask_w]
        return outputs


def build_model(
    name_or_config: str | ModelConfig,
    *,
    num_classes: int | None = None,
    backbone_weights: str | Path | None = None,
    backend: str = "auto",
) -> Mask2Former:
    """Builds a Mask2Former from a config name (see m2f.config.CONFIG_NAMES), a config JSON file or a
    ModelConfig (m2f.config.load_config).

    num_classes overrides the config's; backbone_weights is a local timm-format state dict (.safetensors or a
    torch file, loaded with weights_only=True); nothing is downloaded. Build under `with torch.device("meta")`
    to count parameters without allocating them. backend goes to every m2f_kernels op.
    """
    if not isinstance(name_or_config, str | os.PathLike | ModelConfig):
        raise TypeError(
            f"name_or_config must be a config name, a JSON file or a ModelConfig, got "
            f"{type(name_or_config).__name__}"
        )
    config = load_config(name_or_config)
    if num_classes is not None:
        from dataclasses import replace

        config = replace(config, num_classes=check_int("num_classes", num_classes, 1))
    model = Mask2Former(config, backend=backend)
    if backbone_weights is not None:
        model.backbone.load_weights(backbone_weights)
    return model

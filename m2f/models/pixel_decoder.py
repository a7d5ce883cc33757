"""Mask2Former's MSDeformAttn pixel decoder: deformable encoder on the coarse levels + FPN to 1/4.

Module tree (names kept from Mask2Former's `sem_seg_head.pixel_decoder`):

    input_proj.{i}                      Sequential(Conv2d(C_in, conv_dim, 1), GroupNorm(32, conv_dim)),
                                        i = 0 for the coarsest transformer level (res5), then res4, res3
    transformer.level_embed             (num_levels, conv_dim), same level order as input_proj
    transformer.encoder.layers.{j}      MSDeformAttnEncoderLayer: self_attn (m2f_kernels.nn.MSDeformAttn),
                                        norm1, linear1, linear2, norm2 (post-norm, ReLU FFN)
    pe_layer                            PositionEmbeddingSine(conv_dim / 2), no parameters
    lateral_convs.{k}, output_convs.{k} Conv2dNorm (`.weight`, `.norm.weight`, `.norm.bias`; no conv bias);
                                        k = 0 for the level just finer than the transformer levels (res2);
                                        detectron2 names these adapter_{k+1} and layer_{k+1}
    mask_features                       Conv2d(conv_dim, mask_dim, 1)

Under autocast the decoder runs in the autocast dtype, its deformable sampling in float32. Mask2Former runs
its whole pixel decoder in float32 with autocast off, because its deformable-attention op has no
half-precision path; ours has one, so only the sampling stays in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from m2f_kernels.nn import MSDeformAttn

from ..config import PixelDecoderConfig
from .backbone import feature_name
from .position_encoding import PositionEmbeddingSine


class Conv2dNorm(nn.Conv2d):
    """Conv2d (no bias) -> GroupNorm(32) -> optional ReLU; detectron2's Conv2d(norm=..., activation=...)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # detectron2's c2_xavier_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class MSDeformAttnEncoderLayer(nn.Module):
    """src (N, S, C) -> (N, S, C): deformable self-attention, then FFN; each residual + LayerNorm."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int, backend: str):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        src = self.norm1(
            src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        )
        # On (N*S, C) rows the hidden layer is a tensor of its own, not a view: an in-place ReLU on a view
        # would make the backward pass copy the whole hidden layer twice (CopySlices).
        hidden = F.relu(self.linear1(src.flatten(0, 1)), inplace=True)
        return self.norm2(src + self.linear2(hidden).view_as(src))


class MSDeformAttnEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.grad_checkpointing = False

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        for layer in self.layers:
            inputs = (src, pos, reference_points, spatial_shapes, level_start_index)
            if self.grad_checkpointing and torch.is_grad_enabled():
                src = checkpoint(layer, *inputs, use_reentrant=False)
            else:
                src = layer(*inputs)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the positions, encodes, splits the levels back."""

    def __init__(self, config: PixelDecoderConfig, num_levels: int, backend: str):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, config.conv_dim))
        self.encoder = MSDeformAttnEncoder(
            config.encoder_layers,
            d_model=config.conv_dim,
            ffn_dim=config.encoder_ffn_dim,
            n_levels=num_levels,
            n_heads=config.encoder_heads,
            n_points=config.encoder_points,
            backend=backend,
        )
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.encoder.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, sources: list[torch.Tensor], positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """sources, positions: per level (N, C, H_l, W_l) -> encoded maps, same shapes."""
        shapes = [tuple(src.shape[-2:]) for src in sources]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], dim=1)
        pos_flat = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, pos in enumerate(positions)],
            dim=1,
        )
        device = src_flat.device
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0, *sizes[:-1]], dtype=torch.long, device=device).cumsum(0)
        reference_points = encoder_reference_points(shapes, src_flat.shape[0], device, src_flat.dtype)
        memory = self.encoder(src_flat, pos_flat, reference_points, spatial_shapes, level_start_index)
        maps = memory.split(sizes, dim=1)
        return [m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w) for m, (h, w) in zip(maps, shapes)]


def encoder_reference_points(
    shapes: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(N, S, L, 2): each pixel's center, normalized (x, y) = ((j + 0.5) / W, (i + 0.5) / H), per level."""
    points = []
    for height, width in shapes:
        y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    points = torch.cat(points, 0).to(dtype)
    return points[None, :, None, :].expand(batch, -1, len(shapes), -1)


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class MSDeformAttnPixelDecoder(nn.Module):
    """forward(features {"res2": ..., "res5": ...}) -> (mask_features (N, mask_dim, H/4, W/4),
    multi_scale_features [res5, res4, res3 encoded maps, each (N, conv_dim, H_l, W_l)])."""

    def __init__(
        self,
        config: PixelDecoderConfig,
        in_channels: dict[str, int],
        in_strides: dict[str, int],
        backend: str = "auto",
    ):
        super().__init__()
        if config.conv_dim % 32 != 0:
            raise ValueError(
                f"conv_dim must be a multiple of 32 (GroupNorm with 32 groups), got {config.conv_dim}"
            )
        if not config.transformer_strides:
            raise ValueError("transformer_strides must name at least one backbone stride, got none")
        missing = [s for s in config.transformer_strides if feature_name(s) not in in_channels]
        if missing:
            raise ValueError(
                f"transformer_strides {missing} not among the backbone strides {list(in_strides.values())}"
            )
        # Coarsest first, as in Mask2Former.
        self.transformer_features = [
            feature_name(s) for s in sorted(config.transformer_strides, reverse=True)
        ]
        if len(set(config.transformer_strides)) != len(config.transformer_strides):
            raise ValueError(
                f"transformer_strides must differ from one another, got {config.transformer_strides}"
            )
        finest_transformer_stride = min(config.transformer_strides)
        # The mask features come at common_stride only when it is the finest transformer stride halved a whole
        # number of times; otherwise the model would crop its masks at the wrong stride.
        common_stride = config.common_stride
        if not (
            common_stride >= 1
            and finest_transformer_stride % common_stride == 0
            and _power_of_two(finest_transformer_stride // common_stride)
        ):
            raise ValueError(
                f"pixel_decoder.common_stride must be the finest transformer stride ({finest_transformer_stride}) "
                f"divided by a power of two, got {common_stride}"
            )
        num_fpn_levels = int(math.log2(finest_transformer_stride // common_stride))
        fpn_strides = sorted((s for s in in_strides.values() if s < finest_transformer_stride), reverse=True)
        if len(fpn_strides) < num_fpn_levels:
            raise ValueError(
                f"common_stride {config.common_stride} needs backbone features down to that stride"
            )
        # Coarse-to-fine: the first FPN level is the one just finer than the transformer levels.
        self.fpn_features = [feature_name(s) for s in fpn_strides[:num_fpn_levels]]

        conv_dim = config.conv_dim
        self.input_proj = nn.ModuleList()
        for name in self.transformer_features:
            proj = nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, 1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
            self.input_proj.append(proj)
        self.transformer = MSDeformAttnTransformerEncoderOnly(config, len(self.transformer_features), backend)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.lateral_convs = nn.ModuleList(
            Conv2dNorm(in_channels[name], conv_dim, 1, relu=False) for name in self.fpn_features
        )
        self.output_convs = nn.ModuleList(
            Conv2dNorm(conv_dim, conv_dim, 3, relu=True) for _ in self.fpn_features
        )
        self.mask_features = nn.Conv2d(conv_dim, config.mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.constant_(self.mask_features.bias, 0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder layer's activations in the backward pass instead of keeping them."""
        self.transformer.encoder.grad_checkpointing = enable

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sources = [proj(features[name]) for proj, name in zip(self.input_proj, self.transformer_features)]
        positions = [self.pe_layer(src) for src in sources]
        outputs = self.transformer(sources, positions)
        for lateral_conv, output_conv, name in zip(self.lateral_convs, self.output_convs, self.fpn_features):
            lateral = lateral_conv(features[name])
            # The encoder's maps are channels-last views of its (N, S, C) output, which PyTorch's CPU bilinear
            # upsampling reads about 5x slower than a contiguous copy.
            coarser = F.interpolate(
                outputs[-1].contiguous(), size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outputs.append(output_conv(lateral + coarser))
        return self.mask_features(outputs[-1]), outputs[: len(self.transformer_features)]

"""Sine position encoding of a feature map (DETR / Mask2Former, normalized, no padding mask)."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """pos (B, 2 * num_pos_feats, H, W): [sin/cos of y, sin/cos of x], interleaved per frequency.

    The row (column) index i in 1..H is normalized to i / H * scale, then divided by
    temperature ** (2 * (k // 2) / num_pos_feats) for channel k; even channels take sin, odd take cos.
    No parameters; the encoding depends only on the map's size, dtype and device.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        eps = 1e-6
        y_embed = torch.arange(1, height + 1, device=x.device, dtype=torch.float32)
        x_embed = torch.arange(1, width + 1, device=x.device, dtype=torch.float32)
        y_embed = y_embed / (height + eps) * self.scale
        x_embed = x_embed / (width + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = _interleave_sin_cos(y_embed[:, None] / dim_t)  # (H, F)
        pos_x = _interleave_sin_cos(x_embed[:, None] / dim_t)  # (W, F)
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=-1
        )
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(x.dtype)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(n, F) -> (n, F): sin of even columns, cos of odd columns, in the order sin0, cos1, sin2, ..."""
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

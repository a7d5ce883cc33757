"""Bilinear point sampling (detectron2's point_sample), DESIGN.md 2.3."""

import torch

from .bilinear import bilinear_sample


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Samples input (N, C, H, W) at coords (N, P, 2), normalized (x, y) in [0, 1] -> (N, C, P).

    Same as ``grid_sample(input, 2 * coords - 1, align_corners=False)`` with zero padding. Computed in float32
    (float64 when either input is float64), as the kernels compute, returned in input's dtype: a pixel
    coordinate rounded to 16 bits would move by up to 2 pixels in a 1024-pixel row.
    """
    height, width = input.shape[-2:]
    coords = coords.to(torch.promote_types(torch.promote_types(coords.dtype, input.dtype), torch.float32))
    x = coords[..., 0] * width - 0.5
    y = coords[..., 1] * height - 0.5
    return bilinear_sample(input.permute(0, 2, 3, 1), x, y).transpose(1, 2).to(input.dtype)

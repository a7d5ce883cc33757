"""Bilinear sampling with zero padding, the convention every backend follows.

Pixel coordinates: pixel (i, j) has its centre at x = j, y = i, so a normalized location u in [0, 1] maps to
x = u * W - 0.5 (align_corners=False). A sample contributes, in value and gradient, only when
-1 < x < W and -1 < y < H (NaN never does); corners outside the image read zero. The cell is taken at
x0 = floor(x), so gradients at integer coordinates are the one-sided derivatives of that cell.
"""

import torch


def inside_image(x: torch.Tensor, y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Whether the samples at pixel coordinates x, y contribute: -1 < x < W and -1 < y < H (NaN: False)."""
    return (x > -1) & (x < width) & (y > -1) & (y < height)


def bilinear_sample(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Samples ``image`` (B, H, W, C) at pixel coordinates ``x``, ``y`` (B, *) -> (B, *, C)."""
    batch, height, width, channels = image.shape
    if height == 0 or width == 0:
        return image.new_zeros(*x.shape, channels)  # every sample lies outside an empty image
    inside = inside_image(x, y, height, width)
    x = torch.where(inside, x, torch.zeros_like(x))
    y = torch.where(inside, y, torch.zeros_like(y))
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    frac_x = x - x0
    frac_y = y - y0
    corners = (
        (x0, y0, (1 - frac_x) * (1 - frac_y)),
        (x0 + 1, y0, frac_x * (1 - frac_y)),
        (x0, y0 + 1, (1 - frac_x) * frac_y),
        (x0 + 1, y0 + 1, frac_x * frac_y),
    )
    flat = image.reshape(batch, height * width, channels)
    out = image.new_zeros(*x.shape, channels)
    for corner_x, corner_y, weight in corners:
        valid = inside & (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
        # Integer arithmetic: float16 holds integers exactly only up to 2048, y * W + x would round.
        index = corner_y.clamp(0, height - 1).long() * width + corner_x.clamp(0, width - 1).long()
        gathered = torch.gather(flat, 1, index.reshape(batch, -1, 1).expand(-1, -1, channels))
        # Zeroed itself, not through a zero weight: 0 * NaN or 0 * inf of a clamped read would be NaN.
        gathered = torch.where(valid.unsqueeze(-1), gathered.reshape(*x.shape, channels), 0)
        out = out + gathered * weight.unsqueeze(-1)
    return out

"""Multi-scale deformable attention (Deformable-DETR), DESIGN.md 2.1."""

import torch

from .bilinear import bilinear_sample, inside_image


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples over levels and points.

    value (N, S, M, D) with S = sum_l H_l * W_l; spatial_shapes (L, 2) int64 rows (H_l, W_l);
    level_start_index (L,) int64; sampling_locations (N, Q, M, L, P, 2) normalized (x, y);
    attention_weights (N, Q, M, L, P). Returns (N, Q, M * D) in value's dtype, computed (pixel coordinates
    and sums) in float32 or wider, as the kernels compute. A sample outside the image (bilinear.py) adds
    nothing, whatever its weight, as in Deformable-DETR's kernel.
    """
    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = sampling_locations.shape
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    sampling_locations = sampling_locations.to(torch.promote_types(sampling_locations.dtype, torch.float32))
    out = value.new_zeros(batch * heads, queries, channels, dtype=compute_dtype)
    starts = level_start_index.tolist()
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        level_value = value[:, starts[level] : starts[level] + height * width]
        level_value = level_value.reshape(batch, height, width, heads, channels).permute(0, 3, 1, 2, 4)
        locations = (
            sampling_locations[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        )
        x = locations[..., 0] * width - 0.5
        y = locations[..., 1] * height - 0.5
        samples = bilinear_sample(level_value.reshape(batch * heads, height, width, channels), x, y)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points)
        # A sample outside the image reads nothing, not even its weight (a NaN there is dropped).
        weights = torch.where(inside_image(x, y, height, width), weights, torch.zeros_like(weights))
        out = out + (samples * weights.unsqueeze(-1)).sum(dim=2)
    out = (
        out.reshape(batch, heads, queries, channels).transpose(1, 2).reshape(batch, queries, heads * channels)
    )
    return out.to(value.dtype)

"""Multi-scale deformable attention from raw offsets and logits, DESIGN.md 2.1 (fused variant)."""

import torch

from .ms_deform_attn import ms_deform_attn


def sampling_locations_and_weights(
    spatial_shapes: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """location = reference + offset / (W_l, H_l); weights = softmax of the logits over the L * P samples.

    reference_points (N, Q, L, 2) normalized (x, y); sampling_offsets (N, Q, M, L, P, 2) in pixels of level l;
    attention_logits (N, Q, M, L * P). Returns locations (N, Q, M, L, P, 2) in float32 or wider, as the
    kernels form them (a bfloat16 location is up to half a pixel off on a 128-pixel level), and weights
    (N, Q, M, L, P) in the logits' dtype.
    """
    levels, points = sampling_offsets.shape[3], sampling_offsets.shape[4]
    location_dtype = torch.promote_types(sampling_offsets.dtype, torch.float32)
    # (L, 2) as (W, H); a zero-size level reads nothing, and 1 keeps its offsets' gradient finite (0, not NaN).
    normalizer = spatial_shapes.flip(-1).clamp(min=1).to(location_dtype)
    locations = (
        reference_points.to(location_dtype)[:, :, None, :, None, :]
        + sampling_offsets.to(location_dtype) / normalizer[None, None, None, :, None]
    )
    weights_dtype = torch.promote_types(attention_logits.dtype, torch.float32)
    weights = attention_logits.to(weights_dtype).softmax(dim=-1).to(attention_logits.dtype)
    return locations, weights.unflatten(-1, (levels, points))


def ms_deform_attn_fused(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """ms_deform_attn with locations and softmaxed weights derived from offsets and logits. -> (N, Q, M * D)."""
    locations, weights = sampling_locations_and_weights(
        spatial_shapes, reference_points, sampling_offsets, attention_logits
    )
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)

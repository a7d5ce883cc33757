"""Importance sampling of mask points by uncertainty (Mask2Former / PointRend training), DESIGN.md 2.3."""

from __future__ import annotations

import math

import torch

from .._backend import BACKENDS
from ._common import INT32_MAX, accumulate_dtype, autocast_off, real_number, whole_number
from .point_sample import point_sample

# Oversampled candidates alive at once (coordinates and logits of about this many points per chunk): on CPU
# about 12 MB, on a GPU about 50 MB, which holds a whole training batch (100 masks x 37,632 candidates)
# so the sampler runs as one chunk there.
_CANDIDATES_PER_CHUNK = 1 << 20
_GPU_CANDIDATES_PER_CHUNK = 1 << 22


@torch.no_grad()
def sample_uncertain_points(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Point coordinates for the mask losses, biased towards uncertain logits.

    mask_logits (N, H, W) -> coords (N, num_points, 2), normalized (x, y) in [0, 1], float32 (float64 for
    float64 logits). Per mask, ``int(num_points * oversample_ratio)`` uniform candidates are drawn; the
    ``int(importance_ratio * num_points)`` with the highest uncertainty -|logit| come first (on CPU not
    ordered by uncertainty), followed by uniform random points for the rest (Mask2Former's
    ``get_uncertain_point_coords_with_randomness``).
    Masks are processed in chunks of a bounded number of candidates (about 1M on CPU, 4M on a GPU), so the
    memory the oversampled candidates take stays bounded for any number of masks. generator: the source of the
    random draws (default: the global one); backend: the backend of the point_sample calls that read the logits.
    Not a custom op itself: torch.rand and topk around point_sample.
    """
    if not isinstance(mask_logits, torch.Tensor):
        raise TypeError(f"mask_logits must be a tensor, got {type(mask_logits).__name__}")
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must have shape (N, H, W), got {tuple(mask_logits.shape)}")
    if not mask_logits.is_floating_point():
        raise TypeError(f"mask_logits must be a floating-point tensor, got {mask_logits.dtype}")
    num_points = whole_number("num_points", num_points, 0)
    oversample_ratio = real_number("oversample_ratio", oversample_ratio)
    importance_ratio = real_number("importance_ratio", importance_ratio)
    if not 1 <= oversample_ratio < math.inf:
        raise ValueError(f"oversample_ratio must be finite and >= 1, got {oversample_ratio!r}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio must be in [0, 1], got {importance_ratio!r}")
    if num_points * oversample_ratio > INT32_MAX:
        raise ValueError(
            f"num_points * oversample_ratio must be at most {INT32_MAX} candidates per mask, got "
            f"{num_points} * {oversample_ratio}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    num_random = num_points - num_uncertain
    coords_dtype = accumulate_dtype(mask_logits.dtype)
    device = mask_logits.device
    coords = torch.empty(num_masks, num_points, 2, dtype=coords_dtype, device=device)
    if num_masks == 0 or num_points == 0:
        return coords

    chunk_candidates = _CANDIDATES_PER_CHUNK if device.type == "cpu" else _GPU_CANDIDATES_PER_CHUNK
    masks_per_chunk = max(1, chunk_candidates // max(num_candidates, 1))
    if torch.compiler.is_compiling():  # one chunk: a loop over a symbolic mask count cannot be traced
        chunks = [(0, num_masks)]
    else:
        chunks = [
            (start, min(start + masks_per_chunk, num_masks)) for start in range(0, num_masks, masks_per_chunk)
        ]
    # torch.rand(..., generator=None) does not take symbolic sizes under torch.compile; without it, it does.
    random = {} if generator is None else {"generator": generator}
    for start, end in chunks:
        if num_uncertain > 0:
            candidates = torch.rand(
                end - start, num_candidates, 2, dtype=coords_dtype, device=device, **random
            )
            # Ranked in float32 (float64 for float64 logits) whatever the logits' dtype or autocast, as
            # Mask2Former's grid_sample runs: 16-bit sampled values would reorder near-ties.
            with autocast_off(device), torch.no_grad():
                chunk = mask_logits[start:end].unsqueeze(1).to(coords_dtype)
                logits = point_sample(chunk, candidates, backend=backend)
            uncertainty = logits.squeeze(1).abs_().neg_()  # -|logit|, in place: no (masks, candidates) copies
            # The chosen set is what matters (the losses sum over points). On CPU the unsorted selection
            # is about 2x faster and its order is fixed by the input; on a GPU the sorted one keeps the
            # order reproducible.
            top = uncertainty.topk(num_uncertain, dim=1, sorted=device.type != "cpu").indices
            coords[start:end, :num_uncertain] = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
            del candidates, logits, uncertainty, top
        if num_random > 0:
            coords[start:end, num_uncertain:] = torch.rand(
                end - start, num_random, 2, dtype=coords_dtype, device=device, **random
            )
    return coords

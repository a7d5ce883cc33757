"""Masked cross-attention (Mask2Former's transformer decoder), DESIGN.md 2.2."""

import math

import torch


def threshold_to_logit(threshold: float) -> float:
    """logit(threshold) rounded to float32, the value every backend compares mask logits against."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if threshold == 0.0:
        return -math.inf
    if threshold == 1.0:
        return math.inf
    mantissa, exponent = math.frexp(math.log(threshold / (1.0 - threshold)))
    return math.ldexp(round(mantissa * 2**24) / 2**24, exponent)  # float32 rounding, traceable by dynamo


def logits_visible(mask_logits: torch.Tensor, threshold_logit: float) -> torch.Tensor:
    """Which keys the mask logits let through: logit >= threshold_logit, compared in float32 or wider (NaN is
    blocked). Same shape as mask_logits."""
    return mask_logits.to(torch.promote_types(mask_logits.dtype, torch.float32)) >= threshold_logit


def blocked_keys(
    mask_logits: torch.Tensor | None, attn_mask: torch.Tensor | None, threshold_logit: float
) -> torch.Tensor | None:
    """The (B, Hm, Q, K) bool mask of blocked keys (True = blocked) after the fully-blocked-row rule.

    mask_logits (B, Q, K): key j is visible to query i iff logit >= threshold_logit, compared in float32 or
    wider (NaN is blocked);
    attn_mask (B, Hm, Q, K) bool, True = blocked. A row that blocks every key blocks none.
    """
    if mask_logits is not None:
        blocked = ~logits_visible(mask_logits, threshold_logit).unsqueeze(1)
    elif attn_mask is not None:
        blocked = attn_mask
    else:
        return None
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_logits: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    threshold: float = 0.5,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v.

    q (B, H, Q, d), k and v (B, H, K, d); mask_logits (B, Q, K) shared by the heads, or attn_mask
    (B, Q, K) / (B * H, Q, K) (or (B, 1 or H, Q, K)) bool with True = blocked. Returns the output
    (B, H, Q, d) and the attention probabilities (B, H, Q, K), computed in float32 (float64 for float64
    inputs).
    """
    batch, head_dim = q.shape[0], q.shape[-1]
    if scale is None:
        scale = head_dim**-0.5 if head_dim else 1.0  # no head dim: an empty output whatever the scale
    if attn_mask is not None and attn_mask.dim() == 3:  # (B * Hm, Q, K) -> (B, Hm, Q, K), Hm in {1, H}
        mask_heads = attn_mask.shape[0] // batch if batch else 1
        attn_mask = attn_mask.reshape(batch, mask_heads, *attn_mask.shape[-2:])
    blocked = blocked_keys(mask_logits, attn_mask, threshold_to_logit(threshold))
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, -math.inf)
    probs = scores.softmax(dim=-1)
    return (probs @ v.to(compute_dtype)).to(q.dtype), probs

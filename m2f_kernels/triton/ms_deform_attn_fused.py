"""Fused multi-scale deformable attention, Triton (DESIGN.md 2.1): location = reference + offset / (W_l, H_l)
and weight = softmax over the L * P logits are computed inside the sampling kernels of ms_deform_attn.py, so the
(N, Q, M, L, P, 2) locations and the weights are never stored."""

import triton
import triton.language as tl

from .ms_deform_attn import sampling_backward, sampling_forward


@triton.jit
def _softmax_backward_kernel(
    logits_ptr, grad_ptr, num_heads, LP: tl.constexpr, LP_PAD: tl.constexpr, BLOCK_H: tl.constexpr
):
    """In place: d logit_j = w_j * (d w_j - sum_i w_i d w_i) for each head's L * P logits (float32 grads)."""
    head = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, LP_PAD)
    mask = (head < num_heads)[:, None] & (cols[None, :] < LP)
    offsets = head[:, None] * LP + cols[None, :]
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    logits = tl.load(logits_ptr + offsets, mask=mask, other=-float("inf")).to(grad.dtype)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    exps = tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0)
    row_sum = tl.sum(exps, axis=1)
    weights = exps / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    dot = tl.sum(weights * grad, axis=1)
    tl.store(grad_ptr + offsets, weights * (grad - dot[:, None]), mask=mask)


def ms_deform_attn_fused_forward(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits
):
    """value (N, S, M, D); reference_points (N, Q, L, 2) normalized (x, y); sampling_offsets
    (N, Q, M, L, P, 2) in pixels of level l; attention_logits (N, Q, M, L * P) -> (N, Q, M * D)."""
    return sampling_forward(
        value,
        spatial_shapes,
        level_start_index,
        reference_points,
        sampling_offsets,
        attention_logits,
        fused=True,
    )


def ms_deform_attn_fused_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    sampling_offsets,
    attention_logits,
    deterministic,
):
    """-> (grad_value, grad_reference_points, grad_sampling_offsets, grad_attention_logits), value's dtype."""
    levels, points = sampling_offsets.shape[3], sampling_offsets.shape[4]
    grad_value, grad_weights, grad_pixels = sampling_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        reference_points,
        sampling_offsets,
        attention_logits,
        fused=True,
        deterministic=deterministic,
    )
    # The pixel coordinate is (reference + offset / W) * W - 0.5: d offset = d pixel, d reference = d pixel * W.
    grad_logits = grad_weights.reshape(attention_logits.shape)
    num_heads = grad_logits.numel() // max(1, levels * points)
    if num_heads > 0:
        block_h = 16
        _softmax_backward_kernel[(triton.cdiv(num_heads, block_h),)](
            attention_logits,
            grad_logits,
            num_heads,
            LP=levels * points,
            LP_PAD=triton.next_power_of_2(levels * points),
            BLOCK_H=block_h,
        )
    scale = spatial_shapes.flip(-1).to(grad_pixels.dtype)  # (L, 2) as (W, H)
    grad_reference = (grad_pixels * scale[:, None, :]).sum(dim=(2, 4))
    dtype = value.dtype
    return grad_value, grad_reference.to(dtype), grad_pixels.to(dtype), grad_logits.to(dtype)

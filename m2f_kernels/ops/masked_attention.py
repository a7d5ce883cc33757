"""Masked cross-attention with the mask built from mask logits in-kernel (DESIGN.md 2.2)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import BACKENDS, OpKernels
from ..reference.masked_attention import blocked_keys, logits_visible, threshold_to_logit
from ._common import (
    accumulate_dtype,
    autocast_off,
    call_op,
    cast_for_autocast,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    real_number,
    reference_vjp,
)


def _attention_with_lse(q, k, v, mask_logits, attn_mask, threshold_logit, scale):
    """softmax(q k^T * scale, masked) v and the row log-sum-exp (B, H, Q) float32; kernel-layout masks."""
    blocked = blocked_keys(mask_logits, attn_mask, threshold_logit)
    compute_dtype = accumulate_dtype(q.dtype)
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, -math.inf)
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ v.to(compute_dtype)
    return out.to(q.dtype), lse.float()


def _torch_forward(q, k, v, mask_logits, attn_mask, threshold_logit, scale):
    return _attention_with_lse(q, k, v, mask_logits, attn_mask, threshold_logit, scale)


def _torch_backward(
    grad_out, q, k, v, out, lse, mask_logits, attn_mask, threshold_logit, scale, deterministic
):
    inputs = (q, k, v, mask_logits, attn_mask, threshold_logit, scale)
    return reference_vjp(_attention_with_lse, inputs, (0, 1, 2), (grad_out, None))


KERNELS = OpKernels("masked_attention", {"forward": _torch_forward, "backward": _torch_backward})


@torch.library.custom_op("m2f_kernels::masked_attention", mutates_args=())
def _masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_logits: Tensor | None,
    attn_mask: Tensor | None,
    threshold_logit: float,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    batch, heads, queries, _ = q.shape
    if q.numel() == 0 or k.shape[2] == 0:
        return q.new_zeros(batch, heads, queries, v.shape[-1]), q.new_zeros(
            batch, heads, queries, dtype=torch.float32
        )
    forward = KERNELS.get(backend, q.device, "forward")
    return forward(q, k, v, mask_logits, attn_mask, threshold_logit, scale)


@_masked_attention.register_fake
def _(q, k, v, mask_logits, attn_mask, threshold_logit, scale, backend):
    batch, heads, queries, _ = q.shape
    return q.new_empty(batch, heads, queries, v.shape[-1]), q.new_empty(
        batch, heads, queries, dtype=torch.float32
    )


@torch.library.custom_op("m2f_kernels::masked_attention_backward", mutates_args=())
def _masked_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask_logits: Tensor | None,
    attn_mask: Tensor | None,
    threshold_logit: float,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    backward = KERNELS.get(backend, q.device, "backward")
    return backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        mask_logits,
        attn_mask,
        threshold_logit,
        scale,
        deterministic,
    )


@_masked_attention_backward.register_fake
def _(grad_out, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_logits, attn_mask, threshold_logit, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask_logits, attn_mask)
    ctx.threshold_logit = threshold_logit
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask_logits, attn_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = call_op(
        _masked_attention_backward,
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        mask_logits,
        attn_mask,
        ctx.threshold_logit,
        ctx.scale,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None


_masked_attention.register_autograd(_backward, setup_context=_setup_context)


# Work B * Q * K from which "auto" runs the Triton kernel on a GPU rather than the CUDA one, which has no
# tensor cores and is the slower of the two from there on (benchmarks/results/nvidia-h200-*.json).
TRITON_FROM_WORK = 3_000_000


def _auto_backend(q: Tensor, k: Tensor, backend: str) -> str:
    """What "auto" runs on a GPU: the PyTorch backend for inputs the GPU kernels do not take (float64, head
    dims other than 16, 32 and 64), Triton from TRITON_FROM_WORK on, else the default order (CUDA first).
    M2F_KERNELS_BACKEND, when set, replaces the work rule, not the first one."""
    if backend != "auto" or q.device.type != "cuda":
        return backend
    if q.dtype == torch.float64 or q.shape[-1] not in (16, 32, 64):
        return "torch"
    work = q.shape[0] * q.shape[2] * k.shape[2]
    if (
        os.environ.get("M2F_KERNELS_BACKEND", "auto") == "auto"
        and work >= TRITON_FROM_WORK
        and KERNELS.available("triton", "cuda", "forward")
    ):
        return "triton"
    return backend


def _check_mask_inputs(q: Tensor, k: Tensor, mask_logits: Tensor | None, attn_mask: Tensor | None):
    """Validates the masks and returns attn_mask in the kernel layout (B, Hm, Q, K), Hm in {1, H}."""
    batch, heads, queries, _ = q.shape
    keys = k.shape[2]
    if mask_logits is not None and attn_mask is not None:
        raise ValueError("pass either mask_logits or attn_mask, not both")
    if mask_logits is not None:
        check_tensor("mask_logits", mask_logits, ndim=3, floating=True)
        check_shape("mask_logits", mask_logits, (batch, queries, keys), "B, Q, K")
    if attn_mask is None:
        return None
    check_tensor("attn_mask", attn_mask, ndim=3)
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool tensor (True = blocked), got {attn_mask.dtype}")
    if attn_mask.shape[0] not in (batch, batch * heads) or tuple(attn_mask.shape[1:]) != (queries, keys):
        raise ValueError(
            f"attn_mask must have shape ({batch}, {queries}, {keys}) or ({batch * heads}, {queries}, {keys}) "
            f"(B or B*H, Q, K), got {tuple(attn_mask.shape)}"
        )
    mask_heads = attn_mask.shape[0] // batch if batch else 1
    return attn_mask.reshape(batch, mask_heads, queries, keys).contiguous()


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask_logits: Tensor | None = None,
    attn_mask: Tensor | None = None,
    threshold: float = 0.5,
    scale: float | None = None,
    *,
    return_attn_probs: bool = False,
    backend: str = "auto",
):
    """Attention of queries to keys where each query sees only the keys its mask lets through.

    q (B, H, Q, d), k and v (B, H, K, d). Either mask_logits (B, Q, K), shared by the heads, where key j is
    visible to query i iff sigmoid(logit) >= threshold (compared as logit >= logit(threshold) in float32;
    NaN is blocked), or attn_mask (B, Q, K) / (B * H, Q, K) bool with True = blocked. A query whose row
    blocks every key attends to all keys (Mask2Former's rule). scale defaults to d ** -0.5.
    Returns (B, H, Q, d), and with return_attn_probs=True also the probabilities (B, H, Q, K) float32,
    computed separately by a dense product (for debugging, never on the fast path). Gradients flow to q, k
    and v, from the output and from the probabilities. Without a
    mask this is dense attention (torch's scaled_dot_product_attention).
    """
    if backend not in BACKENDS:  # checked here too: the dense path never looks a backend up
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    batch, heads, _, head_dim = q.shape
    keys = k.shape[2]
    check_shape("k", k, (batch, heads, keys, head_dim), "B, H, K, d like q")
    check_shape("v", v, (batch, heads, keys, head_dim), "B, H, K, d like k")
    attn_mask = _check_mask_inputs(q, k, mask_logits, attn_mask)
    check_same_device("q", q, k=k, v=v, mask_logits=mask_logits, attn_mask=attn_mask)
    threshold_logit = threshold_to_logit(real_number("threshold", threshold))
    if scale is None:
        # Left symbolic under torch.compile / torch.export with a dynamic head dim; no head dim: an empty
        # output whatever the scale.
        scale = head_dim**-0.5 if head_dim else 1.0
    else:
        scale = real_number("scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    q, k, v = cast_for_autocast(q.device, q, k, v)
    check_same_dtype("q", q, k=k, v=v)
    if mask_logits is not None and mask_logits.dtype != q.dtype:
        # The kernels read logits in q's dtype. Rather than a (B, Q, K) copy in it, whose rounding could move a
        # logit across the threshold, one bool byte per logit: the mask decided in the logits' own precision.
        attn_mask = logits_visible(mask_logits, threshold_logit).logical_not_().unsqueeze(1)
        mask_logits = None
    if mask_logits is None and attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out, _ = call_op(
            _masked_attention,
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            None if mask_logits is None else mask_logits.contiguous(),
            attn_mask,
            threshold_logit,
            scale,
            _auto_backend(q, k, backend),
        )
    if not return_attn_probs:
        return out
    blocked = blocked_keys(mask_logits, attn_mask, threshold_logit)
    # In float32 under autocast too, which would otherwise run the product in half precision.
    with autocast_off(q.device):
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, -math.inf)
    return out, scores.softmax(dim=-1)

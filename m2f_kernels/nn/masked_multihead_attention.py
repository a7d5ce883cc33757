"""Drop-in for nn.MultiheadAttention in Mask2Former's masked cross-attention, on m2f_kernels.masked_attention.

State-dict keys are nn.MultiheadAttention's (with kdim == vdim == embed_dim):

    in_proj_weight   (3E, E), rows [q; k; v]
    in_proj_bias     (3E,)               (None with bias=False)
    out_proj.weight  (E, E), out_proj.bias (E,)

These are the names of Mask2Former's / detectron2's `transformer_cross_attention_layers.{i}.multihead_attn`,
mmdetection's `...layers.{i}.cross_attn.attn` and Hugging Face transformers'
`Mask2FormerMaskedAttentionDecoderLayer.cross_attn`, so their weights load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import m2f_kernels

from .._backend import BACKENDS
from ..ops._common import check_shape, check_tensor, real_number
from ..reference.masked_attention import logits_visible, threshold_to_logit


class MaskedMultiheadAttention(nn.Module):
    """Multi-head attention where each query sees only the keys its mask lets through.

    forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False, *, mask_logits=None) -> (output, weights or None).

    Layouts are nn.MultiheadAttention's: query (Q, B, E), key and value (K, B, E); (B, Q, E) and (B, K, E)
    with batch_first=True; (Q, E) and (K, E) unbatched. The mask is one of
      - mask_logits (B, Q, K) ((Q, K) unbatched), shared by the heads: key j is visible to query i iff
        sigmoid(mask_logits[b, i, j]) >= mask_threshold; the comparison runs inside the kernel;
      - attn_mask bool (Q, K) or (B * num_heads, Q, K), True = blocked, as nn.MultiheadAttention takes it
        (additive float masks are not taken).
    key_padding_mask (B, K) ((K,) unbatched) bool, True = padding, blocks those keys for every query; the rule
    below then applies to the unpadded keys (a query that sees none of them attends to all of them; in a
    batch element whose keys are all padding, every query attends to all of them, where
    nn.MultiheadAttention gives NaN).
    Output: like query. Two departures from nn.MultiheadAttention: a query whose keys are all blocked
    attends to every key (Mask2Former's rule), where nn.MultiheadAttention gives no attention (zeros)
    or NaN, and need_weights defaults to False.
    With need_weights=True the weights (B, Q, K) float32, averaged over the heads ((B, H, Q, K) with
    average_attn_weights=False), are computed separately by a dense product (for debugging); gradients flow
    through them as through nn.MultiheadAttention's.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        batch_first: bool = False,
        mask_threshold: float = 0.5,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        if dropout != 0.0:
            raise ValueError(
                f"attention dropout is not supported (Mask2Former uses 0.0), got dropout={dropout}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        threshold_to_logit(real_number("mask_threshold", mask_threshold))  # raises unless in [0, 1]
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.mask_threshold = mask_threshold
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialization: Xavier-uniform input projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"mask_threshold={self.mask_threshold}, backend={self.backend!r}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        mask_logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal:
            raise ValueError("is_causal is not supported; pass the mask as attn_mask or mask_logits")
        return masked_multihead_attention(
            query,
            key,
            value,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            mask_logits=mask_logits,
            batch_first=self.batch_first,
            mask_threshold=self.mask_threshold,
            backend=self.backend,
        )


def masked_multihead_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    *,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = False,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    mask_logits: Tensor | None = None,
    batch_first: bool = False,
    mask_threshold: float = 0.5,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """MaskedMultiheadAttention.forward with the weights passed in (in_proj_weight (3E, E), in_proj_bias
    (3E,) or None, out_proj_weight (E, E), out_proj_bias (E,) or None); shapes and rules as documented there."""
    embed_dim = in_proj_weight.shape[1]
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() not in (2, 3) or tensor.shape[-1] != embed_dim:
            raise ValueError(
                f"{name} must have shape (L, B, {embed_dim}), (B, L, {embed_dim}) with batch_first or "
                f"(L, {embed_dim}) unbatched, got {tuple(tensor.shape)}"
            )
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"query, key and value must all be batched or all unbatched, got {query.dim()}-d, "
            f"{key.dim()}-d and {value.dim()}-d"
        )
    if attn_mask is not None and mask_logits is not None:
        raise ValueError("pass either attn_mask or mask_logits, not both")
    batched = query.dim() == 3
    _check_lengths_and_masks(query, key, value, mask_logits, key_padding_mask, batched, batch_first)
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        mask_logits = None if mask_logits is None else mask_logits.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    attn_mask = _batched_attn_mask(attn_mask, batch, num_heads, queries, keys)
    if key_padding_mask is not None:
        attn_mask, mask_logits = _block_padding(
            key_padding_mask, attn_mask, mask_logits, mask_threshold, batch, queries, keys
        )

    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
    q = _split_heads(F.linear(query, w_q, b_q), num_heads)
    k = _split_heads(F.linear(key, w_k, b_k), num_heads)
    v = _split_heads(F.linear(value, w_v, b_v), num_heads)
    result = m2f_kernels.masked_attention(
        q,
        k,
        v,
        mask_logits=mask_logits,
        attn_mask=attn_mask,
        threshold=mask_threshold,
        return_attn_probs=need_weights,
        backend=backend,
    )
    out, weights = result if need_weights else (result, None)
    out = F.linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias)  # (B, Q, E)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if batch_first else out.transpose(0, 1)), weights


def _check_lengths_and_masks(
    query, key, value, mask_logits, key_padding_mask, batched: bool, batch_first: bool
):
    """Raises naming the argument unless key and value have query's batch and one length, and mask_logits
    and key_padding_mask fit them, in the shapes the caller passed (before any transpose or unsqueeze)."""
    length_axis = 1 if batched and batch_first else 0
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must have the same batch and length, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    batch = query.shape[1 - length_axis] if batched else None
    if batched and key.shape[1 - length_axis] != batch:
        layout = "(B, K, E) with batch_first" if batch_first else "(K, B, E)"
        raise ValueError(f"key must have query's batch size {batch} in {layout}, got {tuple(key.shape)}")
    queries, keys = query.shape[length_axis], key.shape[length_axis]
    if mask_logits is not None:
        check_tensor("mask_logits", mask_logits, ndim=3 if batched else 2, floating=True)
        expected = (batch, queries, keys) if batched else (queries, keys)
        check_shape("mask_logits", mask_logits, expected, "B, Q, K" if batched else "Q, K unbatched")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2 if batched else 1)
        expected = (batch, keys) if batched else (keys,)
        check_shape("key_padding_mask", key_padding_mask, expected, "B, K" if batched else "K unbatched")


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, H, L, d)


def _batched_attn_mask(attn_mask: Tensor | None, batch: int, num_heads: int, queries: int, keys: int):
    """attn_mask as masked_attention takes it: (B, Q, K) or (B * H, Q, K) bool."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
        kind = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise TypeError(f"attn_mask must be a bool tensor (True = blocked), got {kind}")
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (queries, keys):
            raise ValueError(
                f"a 2-d attn_mask must have shape ({queries}, {keys}) (Q, K), got {tuple(attn_mask.shape)}"
            )
        return attn_mask.expand(batch, queries, keys)
    if attn_mask.dim() != 3 or tuple(attn_mask.shape) != (batch * num_heads, queries, keys):
        raise ValueError(
            f"attn_mask must have shape ({queries}, {keys}) or ({batch * num_heads}, {queries}, {keys}) "
            f"(B * num_heads, Q, K), got {tuple(attn_mask.shape)}"
        )
    return attn_mask


def _block_padding(
    key_padding_mask, attn_mask, mask_logits, mask_threshold: float, batch: int, queries: int, keys: int
):
    """Blocks the padded keys for every query, with Mask2Former's rule applied to the unpadded keys: a query
    that sees none of them sees all of them. Returns (attn_mask, mask_logits)."""
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        kind = (
            key_padding_mask.dtype
            if isinstance(key_padding_mask, Tensor)
            else type(key_padding_mask).__name__
        )
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {kind}")
    if tuple(key_padding_mask.shape) != (batch, keys):
        raise ValueError(
            f"key_padding_mask must have shape ({batch}, {keys}) (B, K), got {tuple(key_padding_mask.shape)}"
        )
    padding = key_padding_mask[:, None, :]  # (B, 1, K)
    if mask_logits is not None:
        check_tensor("mask_logits", mask_logits, ndim=3, floating=True)
        check_shape("mask_logits", mask_logits, (batch, queries, keys), "B, Q, K")
        visible = logits_visible(mask_logits, threshold_to_logit(float(mask_threshold)))
        sees_nothing = ~(visible & ~padding).any(dim=-1, keepdim=True)
        # masked_attention always blocks a NaN logit and shows an infinite one, whatever the threshold.
        return None, mask_logits.masked_fill(sees_nothing, math.inf).masked_fill(padding, math.nan)
    if attn_mask is None:
        return padding.expand(batch, queries, keys), None
    mask_heads = attn_mask.shape[0] // batch if batch else 1
    blocked = attn_mask.reshape(batch, mask_heads, queries, keys) | padding[:, None]  # (B, 1 or H, Q, K)
    sees_nothing = blocked.all(dim=-1, keepdim=True)
    # Logical ops rather than torch.where: ONNX Runtime has no Where for bool tensors.
    blocked = (blocked & ~sees_nothing) | (padding[:, None] & sees_nothing)
    return blocked.flatten(0, 1), None

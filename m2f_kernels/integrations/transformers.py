"""Run Hugging Face transformers' deformable and masked attention on m2f_kernels ops.

Patching is per instance: the `forward` of each matching module of the given model is replaced (an instance
attribute), the class and other models are untouched, and `unpatch_transformers` restores the previous
forward. This module never imports transformers; modules are recognized by class name and signature:

- `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` and
  `OneFormerPixelDecoderEncoderMultiscaleDeformableAttention`: the whole attention forward (projections,
  softmax, sampling locations) is re-implemented with the same inputs and outputs, the sampling done by
  `m2f_kernels.ms_deform_attn` instead of transformers' grid_sample loop.
- `MultiScaleDeformableAttention` (the kernel holder used by Deformable-DETR, Grounding DINO, RT-DETR,
  OmDet-Turbo and others): its forward(value, value_spatial_shapes, value_spatial_shapes_list,
  level_start_index, sampling_locations, attention_weights, im2col_step) becomes a call of the op.
- The `cross_attn` (an nn.MultiheadAttention with a (B * H, Q, K) bool mask) of each
  `Mask2FormerMaskedAttentionDecoderLayer`: runs `m2f_kernels.nn.masked_multihead_attention`. transformers
  asks it for attention weights on every call and keeps them only with `output_attentions=True`; a forward
  pre-hook on the layer tells the patched forward which, and when weights are kept (or while training with
  attention dropout, or with a float mask) nn.MultiheadAttention's own forward runs.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

PIXEL_DECODER_ATTENTION_CLASSES = (
    "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
    "OneFormerPixelDecoderEncoderMultiscaleDeformableAttention",
)
KERNEL_CLASS = "MultiScaleDeformableAttention"
KERNEL_PARAMETERS = (
    "value",
    "value_spatial_shapes",
    "value_spatial_shapes_list",
    "level_start_index",
    "sampling_locations",
    "attention_weights",
    "im2col_step",
)
MASKED_DECODER_LAYER_CLASS = "Mask2FormerMaskedAttentionDecoderLayer"
_SAVED = "_m2f_kernels_saved_forward"
_HOOKS = "_m2f_kernels_layer_hooks"
_NO_INSTANCE_FORWARD = object()
# ids of the cross-attention modules whose running layer call discards their attention weights (per thread)
_weights_discarded = threading.local()


def _kernel_forward(
    self: nn.Module,
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    value_spatial_shapes_list: list[tuple[int, int]],
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int,
) -> torch.Tensor:
    """value (N, S, M, D), sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P)
    -> (N, Q, M*D)."""
    import m2f_kernels

    if isinstance(value_spatial_shapes, torch.Tensor):
        shapes = value_spatial_shapes.to(device=value.device, dtype=torch.long)
    else:
        shapes = torch.as_tensor(value_spatial_shapes_list, dtype=torch.long, device=value.device)
    return m2f_kernels.ms_deform_attn(
        value,
        shapes.view(-1, 2),
        level_start_index.to(torch.long),
        sampling_locations,
        attention_weights,
        backend=self._m2f_kernels_backend,
    )


def _pixel_decoder_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    position_embeddings: torch.Tensor | None = None,
    reference_points: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    spatial_shapes_list: list[tuple[int, int]] | None = None,
    level_start_index: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformers forward of Mask2Former's / OneFormer's pixel-decoder attention on m2f_kernels.

    hidden_states (N, Q, C) queries, encoder_hidden_states (N, S, C) values, attention_mask (N, S) True where
    the value is padding, reference_points (N, Q, L, 2 or 4) -> (output (N, Q, C), attention weights
    (N, Q, M, L, P)).
    """
    import m2f_kernels

    if position_embeddings is not None:
        hidden_states = hidden_states + position_embeddings
    batch, num_queries, _ = hidden_states.shape
    _, num_values, _ = encoder_hidden_states.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points

    if spatial_shapes is None:
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=hidden_states.device)
    spatial_shapes = spatial_shapes.to(device=hidden_states.device, dtype=torch.long).view(-1, 2)
    if int(spatial_shapes.prod(1).sum()) != num_values:
        raise ValueError("spatial shapes do not add up to the sequence length of encoder_hidden_states")
    if level_start_index is None:
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))

    value = self.value_proj(encoder_hidden_states)
    if attention_mask is not None:
        value = value.masked_fill(attention_mask[..., None], 0.0)
    value = value.view(batch, num_values, heads, self.d_model // heads)
    offsets = self.sampling_offsets(hidden_states).view(batch, num_queries, heads, levels, points, 2)
    weights = F.softmax(
        self.attention_weights(hidden_states).view(batch, num_queries, heads, levels * points), -1
    )
    weights = weights.view(batch, num_queries, heads, levels, points)

    if reference_points.shape[-1] == 2:
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (W, H) per level
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
    elif reference_points.shape[-1] == 4:
        boxes = reference_points[:, :, None, :, None, :]
        locations = boxes[..., :2] + offsets / points * boxes[..., 2:] * 0.5
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")

    output = m2f_kernels.ms_deform_attn(
        value,
        spatial_shapes,
        level_start_index.to(torch.long),
        locations,
        weights,
        backend=self._m2f_kernels_backend,
    )
    return self.output_proj(output), weights


def _discarded_ids() -> set[int]:
    if not hasattr(_weights_discarded, "ids"):
        _weights_discarded.ids = set()
    return _weights_discarded.ids


def _cross_attention_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention.forward on m2f_kernels.nn.masked_multihead_attention, where the result is the
    same: the caller discards the weights, no attention dropout is active and any mask is bool."""
    from m2f_kernels.nn import masked_multihead_attention

    weights_used = need_weights and id(self) not in _discarded_ids()
    float_mask = any(m is not None and m.dtype != torch.bool for m in (attn_mask, key_padding_mask))
    if weights_used or is_causal or float_mask or (self.training and self.dropout > 0):
        saved = self.__dict__[_SAVED]
        forward = type(self).forward.__get__(self) if saved is _NO_INSTANCE_FORWARD else saved
        return forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    out, _ = masked_multihead_attention(
        query,
        key,
        value,
        self.num_heads,
        self.in_proj_weight,
        self.in_proj_bias,
        self.out_proj.weight,
        self.out_proj.bias,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        batch_first=self.batch_first,
        backend=self._m2f_kernels_backend,
    )
    return out, None


@functools.cache
def _layer_signature(layer_class: type) -> inspect.Signature:
    return inspect.signature(layer_class.forward)


def _mark_discarded(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        arguments = _layer_signature(type(layer)).bind(layer, *args, **kwargs).arguments
    except TypeError:  # a call this signature does not describe: leave the weights to nn.MultiheadAttention
        return
    if not arguments.get("output_attentions"):
        _discarded_ids().add(id(layer.cross_attn))


def _unmark_discarded(layer: nn.Module, args: tuple, kwargs: dict, output) -> None:
    _discarded_ids().discard(id(layer.cross_attn))


def _patchable_cross_attention(layer: nn.Module) -> nn.Module | None:
    """The cross_attn of a transformers Mask2Former decoder layer when it is a plain nn.MultiheadAttention
    (one embedding size, no extra key/value bias) and the layer's forward takes output_attentions."""
    if type(layer).__name__ != MASKED_DECODER_LAYER_CLASS:
        return None
    attention = getattr(layer, "cross_attn", None)
    if (
        not isinstance(attention, nn.MultiheadAttention)
        or not attention._qkv_same_embed_dim
        or attention.bias_k is not None
        or attention.add_zero_attn
        or "output_attentions" not in _layer_signature(type(layer)).parameters
    ):
        return None
    return attention


def _parameters_match(module: nn.Module) -> bool:
    names = tuple(inspect.signature(type(module).forward).parameters)[1:]
    return names == KERNEL_PARAMETERS


def _replacement(module: nn.Module):
    name = type(module).__name__
    if name in PIXEL_DECODER_ATTENTION_CLASSES:
        return _pixel_decoder_attention_forward
    if name == KERNEL_CLASS and _parameters_match(module):
        return _kernel_forward
    return None


def patch_transformers(model: nn.Module, *, backend: str = "auto") -> int:
    """Makes the deformable-attention modules of a transformers model use m2f_kernels.ms_deform_attn and
    Mask2Former's masked cross-attention use m2f_kernels.masked_attention.

    Returns the number of attention modules patched (0 when the model has none). Patching twice only
    updates the backend. Outputs are those of the original implementation up to floating-point rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    count = 0
    for module in list(model.modules()):
        attention = _patchable_cross_attention(module)
        if attention is not None:
            if _SAVED not in attention.__dict__:
                attention.__dict__[_HOOKS] = (
                    module.register_forward_pre_hook(_mark_discarded, with_kwargs=True),
                    module.register_forward_hook(_unmark_discarded, with_kwargs=True, always_call=True),
                )
            _patch(attention, _cross_attention_forward, backend)
            count += 1
            continue
        forward = _replacement(module)
        if forward is not None:
            _patch(module, forward, backend)
            count += 1
    return count


def _patch(module: nn.Module, forward, backend: str) -> None:
    if _SAVED not in module.__dict__:
        module.__dict__[_SAVED] = module.__dict__.get("forward", _NO_INSTANCE_FORWARD)
    module._m2f_kernels_backend = backend
    module.forward = types.MethodType(forward, module)


def unpatch_transformers(model: nn.Module) -> int:
    """Restores the forwards replaced by patch_transformers; returns how many modules were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if _SAVED not in module.__dict__:
            continue
        saved = module.__dict__.pop(_SAVED)
        for hook in module.__dict__.pop(_HOOKS, ()):
            hook.remove()
        del module.__dict__["forward"]
        del module._m2f_kernels_backend
        if saved is not _NO_INSTANCE_FORWARD:
            module.forward = saved
        count += 1
    return count


def is_patched(module: nn.Module) -> bool:
    """Whether patch_transformers replaced this module's forward."""
    return _SAVED in module.__dict__

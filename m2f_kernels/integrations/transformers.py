"""Run Hugging Face transformers' deformable and masked attention on m2f_kernels ops.

Patching is per instance: each matching module of the given model gets a subclass of its class, named like
it, that replaces one method; other instances are untouched, copies (copy.deepcopy, nn.DataParallel
replicas) stay patched, and `unpatch_transformers` gives the module its class back. The state dict does not
change; unpatch before pickling a whole module. This module never imports transformers; modules are
recognized by class name and signature:

- `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` and
  `OneFormerPixelDecoderEncoderMultiscaleDeformableAttention`: the whole attention forward (projections,
  softmax, sampling locations) is re-implemented with the same inputs and outputs, the sampling done by
  `m2f_kernels.ms_deform_attn` instead of transformers' grid_sample loop.
- `MultiScaleDeformableAttention` (the kernel holder used by Deformable-DETR, Grounding DINO, RT-DETR,
  OmDet-Turbo and others): its forward(value, value_spatial_shapes, value_spatial_shapes_list,
  level_start_index, sampling_locations, attention_weights, im2col_step) becomes a call of the op.
- The `cross_attn` (an nn.MultiheadAttention with a (B * H, Q, K) bool mask) of each
  `Mask2FormerMaskedAttentionDecoderLayer`: runs `m2f_kernels.nn.masked_multihead_attention`. transformers
  asks it for attention weights on every call and keeps them only with `output_attentions=True`; the
  layer's patched forward tells the patched cross_attn, per thread, when its call discards them. Otherwise
  (weights kept, attention dropout while training, a float mask, a call from anywhere else)
  nn.MultiheadAttention's own forward runs.
- `Mask2FormerLoss.loss_masks`: the sigmoid-CE and dice losses on the uncertainty-sampled points become one
  `m2f_kernels.point_mask_loss` call, which samples the logits and the targets itself; the points are drawn
  by transformers' own sampler, so the same seed gives the same points.
- `Mask2FormerHungarianMatcher.forward`: the masks are sampled with `m2f_kernels.point_sample` and the mask
  costs come from `m2f_kernels.pairwise_mask_cost`, at the same random points (same seed, same points).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable

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
LOSS_CLASS = "Mask2FormerLoss"
LOSS_ATTRIBUTES = (
    "num_points",
    "oversample_ratio",
    "importance_sample_ratio",
    "sample_points_using_uncertainty",
    "calculate_uncertainty",
    "_get_predictions_permutation_indices",
    "_get_targets_permutation_indices",
    "_pad_images_to_max_in_batch",
)
MATCHER_CLASS = "Mask2FormerHungarianMatcher"
MATCHER_ATTRIBUTES = ("num_points", "cost_class", "cost_mask", "cost_dice")
_ORIGINAL_CLASS = "_m2f_kernels_original_class"  # set on the patched subclasses
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

    if isinstance(value_spatial_shapes, torch.Tensor):
        shapes = value_spatial_shapes.to(device=value.device, dtype=torch.long)
    else:
        shapes = torch.as_tensor(value_spatial_shapes_list, dtype=torch.long, device=value.device)
    return _deform_attn(
        value,
        shapes.view(-1, 2),
        level_start_index.to(torch.long),
        sampling_locations,
        attention_weights,
        self._m2f_kernels_backend,
    )


def _deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend):
    """m2f_kernels.ms_deform_attn, in float32 with autocast off under autocast, as transformers samples (its
    grid_sample runs in float32)."""
    import m2f_kernels
    from m2f_kernels.nn.ms_deform_attn import sample_in_float32_under_autocast

    return sample_in_float32_under_autocast(
        functools.partial(m2f_kernels.ms_deform_attn, backend=backend),
        value,
        spatial_shapes,
        level_start_index,
        locations,
        weights,
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

    if position_embeddings is not None:
        hidden_states = hidden_states + position_embeddings
    batch, num_queries, _ = hidden_states.shape
    _, num_values, _ = encoder_hidden_states.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points

    if spatial_shapes is None:
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=hidden_states.device)
    spatial_shapes = spatial_shapes.to(device=hidden_states.device, dtype=torch.long).view(-1, 2)
    # From the Python list when given (as transformers passes it): reading the tensor would stop
    # torch.compile(fullgraph=True) and torch.export on a data-dependent value.
    if spatial_shapes_list is not None:
        sizes = [int(height) * int(width) for height, width in spatial_shapes_list]
    else:
        sizes = spatial_shapes.prod(1).tolist()
    if sum(sizes) != num_values:
        raise ValueError("spatial shapes do not add up to the sequence length of encoder_hidden_states")
    if level_start_index is None:
        starts = [sum(sizes[:level]) for level in range(len(sizes))]
        level_start_index = torch.tensor(starts, dtype=torch.long, device=hidden_states.device)

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

    output = _deform_attn(
        value, spatial_shapes, level_start_index.to(torch.long), locations, weights, self._m2f_kernels_backend
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
    same: called by its patched decoder layer in a call that discards the weights (transformers' masks have
    no fully blocked row then), no attention dropout active, any mask bool."""
    from m2f_kernels.nn import masked_multihead_attention

    discarded = id(self) in _discarded_ids()
    float_mask = any(m is not None and m.dtype != torch.bool for m in (attn_mask, key_padding_mask))
    if not discarded or is_causal or float_mask or (self.training and self.dropout > 0):
        return _original(self).forward(
            self,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
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


def _decoder_layer_forward(self: nn.Module, *args, **kwargs):
    """The decoder layer's own forward; while it runs without output_attentions, its cross_attn knows that
    the attention weights are discarded."""
    forward = _original(self).forward
    try:
        arguments = _layer_signature(_original(self)).bind(self, *args, **kwargs).arguments
    except TypeError:  # a call this signature does not describe: leave the weights to nn.MultiheadAttention
        return forward(self, *args, **kwargs)
    if arguments.get("output_attentions"):
        return forward(self, *args, **kwargs)
    ids = _discarded_ids()
    ids.add(id(self.cross_attn))
    try:
        return forward(self, *args, **kwargs)
    finally:
        ids.discard(id(self.cross_attn))


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
        or "output_attentions" not in _layer_signature(_unpatched_class(layer)).parameters
    ):
        return None
    return attention


def _loss_masks(
    self: nn.Module,
    masks_queries_logits: torch.Tensor,
    mask_labels: list[torch.Tensor],
    indices: list[tuple[torch.Tensor, torch.Tensor]],
    num_masks,
) -> dict[str, torch.Tensor]:
    """Mask2FormerLoss.loss_masks on m2f_kernels.point_mask_loss: masks_queries_logits (B, Q, H, W), mask_labels
    B tensors (T_b, Ht, Wt), indices the matcher's (query, target) pairs -> {"loss_mask", "loss_dice"}."""
    import m2f_kernels

    pred_masks = masks_queries_logits[self._get_predictions_permutation_indices(indices)]  # (N, H, W)
    target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
    target_masks = target_masks[self._get_targets_permutation_indices(indices)]  # (N, Ht, Wt)
    with torch.no_grad():
        coords = self.sample_points_using_uncertainty(
            pred_masks[:, None],
            self.calculate_uncertainty,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
        )
    ce, dice = m2f_kernels.point_mask_loss(
        pred_masks, target_masks, coords, num_masks, backend=self._m2f_kernels_backend
    )
    return {"loss_mask": ce, "loss_dice": dice}


@torch.no_grad()
def _matcher_forward(
    self: nn.Module,
    masks_queries_logits: torch.Tensor,
    class_queries_logits: torch.Tensor,
    mask_labels: list[torch.Tensor],
    class_labels: list[torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mask2FormerHungarianMatcher.forward with the mask costs from m2f_kernels.point_sample and
    pairwise_mask_cost: masks_queries_logits (B, Q, H, W), class_queries_logits (B, Q, C + 1), mask_labels B
    tensors (T_b, Ht, Wt), class_labels B tensors (T_b,) -> B pairs of int64 (query, target) indices."""
    from scipy.optimize import linear_sum_assignment

    import m2f_kernels

    backend = self._m2f_kernels_backend
    indices = []
    for pred_mask, class_logits, target_mask, labels in zip(
        masks_queries_logits, class_queries_logits, mask_labels, class_labels
    ):
        cost_class = -class_logits.softmax(-1)[:, labels]
        coords = torch.rand(1, self.num_points, 2, device=pred_mask.device)  # the points transformers draws
        target_mask = target_mask.to(pred_mask)
        pred_points = m2f_kernels.point_sample(pred_mask[None], coords, backend=backend)[0]
        target_points = m2f_kernels.point_sample(target_mask[None], coords, backend=backend)[0]
        cost_mask, cost_dice = m2f_kernels.pairwise_mask_cost(pred_points, target_points, backend=backend)
        cost_matrix = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
        max_value = torch.finfo(cost_matrix.dtype).max
        cost_matrix = torch.nan_to_num(cost_matrix, nan=max_value, posinf=max_value, neginf=max_value)
        rows, columns = linear_sum_assignment(cost_matrix.cpu())
        indices.append(
            (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64))
        )
    return indices


def _parameters_match(module: nn.Module) -> bool:
    names = tuple(inspect.signature(_unpatched_class(module).forward).parameters)[1:]
    return names == KERNEL_PARAMETERS


def _replacement(module: nn.Module) -> tuple[str, Callable] | None:
    """(name of the method to replace, its replacement) for a module patch_transformers takes, else None."""
    name = type(module).__name__
    if name in PIXEL_DECODER_ATTENTION_CLASSES:
        return "forward", _pixel_decoder_attention_forward
    if name == KERNEL_CLASS and _parameters_match(module):
        return "forward", _kernel_forward
    if name == LOSS_CLASS and all(hasattr(module, a) for a in LOSS_ATTRIBUTES):
        return "loss_masks", _loss_masks
    if name == MATCHER_CLASS and all(hasattr(module, a) for a in MATCHER_ATTRIBUTES):
        return "forward", _matcher_forward
    return None


def patch_transformers(model: nn.Module, *, backend: str = "auto") -> int:
    """Makes the deformable attention of a transformers model run m2f_kernels.ms_deform_attn, and
    Mask2Former's masked cross-attention, mask losses and matcher costs the m2f_kernels ops (module docstring).

    Returns the number of modules patched (0 when the model has none). Patching twice only
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
            _patch(module, "forward", _decoder_layer_forward, backend)
            _patch(attention, "forward", _cross_attention_forward, backend)
            count += 2
            continue
        replacement = _replacement(module)
        if replacement is not None:
            _patch(module, *replacement, backend)
            count += 1
    return count


@functools.cache
def _patched_class(original: type, method: str, function: Callable) -> type:
    """A subclass of `original`, named like it, whose `method` is `function`."""
    namespace = {
        method: function,
        _ORIGINAL_CLASS: original,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
    }
    return type(original.__name__, (original,), namespace)


def _original(module: nn.Module) -> type:
    return getattr(type(module), _ORIGINAL_CLASS)


def _unpatched_class(module: nn.Module) -> type:
    """The module's class as transformers made it, whether or not it is patched."""
    return _original(module) if is_patched(module) else type(module)


def _patch(module: nn.Module, method: str, function: Callable, backend: str) -> None:
    if not is_patched(module):
        module.__class__ = _patched_class(type(module), method, function)
    module._m2f_kernels_backend = backend


def unpatch_transformers(model: nn.Module) -> int:
    """Gives the modules patch_transformers patched their class back; returns how many there were."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if not is_patched(module):
            continue
        module.__class__ = _original(module)
        module.__dict__.pop("_m2f_kernels_backend", None)
        count += 1
    return count


def is_patched(module: nn.Module) -> bool:
    """Whether patch_transformers patched this module."""
    return _ORIGINAL_CLASS in type(module).__dict__

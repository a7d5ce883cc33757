"""Drop-in multi-scale deformable attention module (Deformable-DETR's `MSDeformAttn`) on m2f_kernels ops.

State-dict keys (all four are nn.Linear, `.weight` (out, in) and `.bias` (out,)):

    sampling_offsets   d_model -> n_heads * n_levels * n_points * 2   output ordered (head, level, point, xy)
    attention_weights  d_model -> n_heads * n_levels * n_points       output ordered (head, level, point)
    value_proj         d_model -> d_model                             output ordered (head, channel)
    output_proj        d_model -> d_model

These are the names, shapes and layouts of
  - the official Deformable-DETR `models/ops/modules/ms_deform_attn.py::MSDeformAttn` (also vendored by
    Mask2Former / detectron2 as `pixel_decoder.transformer.encoder.layers.{i}.self_attn`),
  - mmcv's `mmcv.ops.MultiScaleDeformableAttention` (e.g. mmdet's `...encoder.layers.{i}.attentions.0`;
    mmcv's module also holds a dropout and adds the residual itself: callers do that around this module),
  - Hugging Face transformers' `DeformableDetrMultiscaleDeformableAttention` and
    `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`,
so a checkpoint of any of them loads with `load_state_dict` after stripping the parent prefix, no renaming.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

import m2f_kernels
from m2f_kernels.ops._common import autocast_dtype, check_same_device, check_shape, check_tensor, whole_number


def sample_in_float32_under_autocast(sample: Callable, *args):
    """``sample(*args)``; under autocast, with autocast off and the floating-point tensors in float32 (or the
    widest of their dtypes), as Mask2Former's pixel decoder and transformers' grid_sample sample: locations
    rounded to 16 bits would move samples by up to 0.3 pixel of a 168-pixel level."""

    def is_float(arg) -> bool:
        return isinstance(arg, torch.Tensor) and arg.is_floating_point()

    floats = [arg for arg in args if is_float(arg)]
    device = floats[0].device
    if autocast_dtype(device) is None:
        return sample(*args)
    wide = functools.reduce(torch.promote_types, (arg.dtype for arg in floats), torch.float32)
    with torch.autocast(device.type, enabled=False):
        return sample(*(arg.to(wide) if is_float(arg) else arg for arg in args))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    forward(query (N, Lq, C), reference_points (N, Lq, L, 2) normalized (x, y) or (N, Lq, L, 4) boxes
    (cx, cy, w, h), input_flatten (N, S, C), input_spatial_shapes (L, 2) int64 (H, W),
    input_level_start_index (L,) int64, input_padding_mask (N, S) bool, True = padding) -> (N, Lq, C).

    With 2-d reference points a sample sits at reference + offset / (W_l, H_l) (offsets in pixels of the
    level); with boxes at reference[:2] + offset / n_points * reference[2:] / 2. Attention weights are a
    softmax over the n_levels * n_points samples of each head. `im2col_step` is accepted for compatibility
    and ignored (no batch-size rule). `backend` goes to the m2f_kernels ops.

    Under autocast the projections run in the autocast dtype and the sampling in float32 (Mask2Former turns
    autocast off for its whole pixel decoder, as its op has no half-precision path; transformers samples in
    float32): reference points rounded to bfloat16 would move samples by up to 0.3 pixel of a 168-pixel
    level. Without autocast everything runs in the inputs' dtype.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        *,
        im2col_step: int = 64,
        backend: str = "auto",
    ):
        super().__init__()
        d_model = whole_number("d_model", d_model, 1)
        n_levels = whole_number("n_levels", n_levels, 1)
        n_heads = whole_number("n_heads", n_heads, 1)
        n_points = whole_number("n_points", n_points, 1)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.im2col_step = im2col_step
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable-DETR's init: zero offset weights, biases pointing each head in its own direction at
        distances 1..n_points, uniform attention, Xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask)
        batch, num_queries, _ = query.shape
        num_values = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        logits = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )

        output = sample_in_float32_under_autocast(
            self._sample,
            value,
            input_spatial_shapes,
            input_level_start_index,
            reference_points,
            offsets,
            logits,
        )
        return self.output_proj(output)

    def _check_inputs(self, query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask):
        """Raises TypeError/ValueError naming the argument unless the shapes fit together (the level table's
        values and dtypes are checked by the ops)."""
        channels = f"{self.d_model} channels"
        check_tensor("query", query, ndim=3, floating=True)
        batch, num_queries, _ = query.shape
        check_shape("query", query, (None, None, self.d_model), f"N, Lq, {channels}")
        check_tensor("input_flatten", input_flatten, ndim=3, floating=True)
        check_shape("input_flatten", input_flatten, (batch, None, self.d_model), f"N={batch}, S, {channels}")
        check_tensor("input_spatial_shapes", input_spatial_shapes, ndim=2)
        check_shape(
            "input_spatial_shapes", input_spatial_shapes, (self.n_levels, 2), "n_levels rows of (H, W)"
        )
        check_tensor("reference_points", reference_points, ndim=4, floating=True)
        leading, coordinates = reference_points.shape[:3], reference_points.shape[3]
        if leading != (batch, num_queries, self.n_levels) or coordinates not in (2, 4):
            raise ValueError(
                f"reference_points must be (N={batch}, Lq={num_queries}, {self.n_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if input_padding_mask is not None:
            check_tensor("input_padding_mask", input_padding_mask, ndim=2)
            if input_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"input_padding_mask must be bool (True = padding), got {input_padding_mask.dtype}"
                )
            check_shape("input_padding_mask", input_padding_mask, (batch, input_flatten.shape[1]), "N, S")
        check_same_device(
            "query",
            query,
            reference_points=reference_points,
            input_flatten=input_flatten,
            input_padding_mask=input_padding_mask,
        )

    def _sample(self, value, spatial_shapes, level_start_index, reference_points, offsets, logits):
        """The deformable sampling (reference points cast to the others' dtype) -> (N, Lq, C)."""
        reference_points = reference_points.to(offsets.dtype)
        if reference_points.shape[-1] == 2:
            return m2f_kernels.ms_deform_attn_fused(
                value,
                spatial_shapes,
                level_start_index,
                reference_points,
                offsets,
                logits,
                backend=self.backend,
            )
        batch, num_queries = offsets.shape[:2]
        boxes = reference_points[:, :, None, :, None, :]
        locations = boxes[..., :2] + offsets / self.n_points * boxes[..., 2:] * 0.5
        weights = logits.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        return m2f_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, backend=self.backend
        )

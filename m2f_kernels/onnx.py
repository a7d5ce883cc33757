"""ONNX export of models that call the m2f_kernels ops, using standard ONNX operators only.

``export(model, args, path)`` runs ``torch.onnx.export(dynamo=True)`` with ``translation_table()``, which
writes each inference op (ms_deform_attn, ms_deform_attn_fused, masked_attention, point_sample) as a subgraph
of standard ONNX operators (opset 18 ops; the file gets the exporter's opset), so it runs in plain onnxruntime
without custom operators. The subgraphs follow m2f_kernels/reference:

- bilinear sampling is ``GridSample`` (bilinear, zero padding, align_corners=0); a coordinate outside
  [-1, 2] in normalized units (NaN included) lies outside the image and is moved to one that samples zero;
- the spatial_shapes / level_start_index tables are read at run time (Gather/Slice), so they may be graph
  inputs as well as constants; the number of levels L is taken from the static shapes;
- masked attention is MatMul and a max-subtracted softmax, with Where for the mask and Mask2Former's rule
  that a query that blocks every key attends to all keys; its second output is the row log-sum-exp.

Half-precision inputs are computed in float32 and cast back, like the kernels' float32 accumulation.
Needs the ``onnx`` and ``onnxscript`` packages (and ``onnxruntime`` to run the result).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

try:
    import onnx_ir as ir
    from onnxscript import opset18 as op
except ImportError as error:
    raise ImportError(
        "m2f_kernels.onnx needs the onnx and onnxscript packages: pip install onnx onnxscript onnxruntime"
    ) from error

_FLOAT32 = ir.DataType.FLOAT
_FLOAT64 = ir.DataType.DOUBLE
_INT64 = ir.DataType.INT64


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _compute_dtype(dtype) -> ir.DataType:
    """float64 stays float64; float16 and bfloat16 are computed in float32."""
    return _FLOAT64 if dtype == _FLOAT64 else _FLOAT32


def _to_compute(tensor):
    return tensor if tensor.dtype == _compute_dtype(tensor.dtype) else op.Cast(tensor, to=_FLOAT32)


def _static_dim(tensor, axis: int, name: str) -> int:
    dim = tensor.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(f"ONNX export needs a static size for {name} (dimension {axis}), got {dim}")
    return dim


def _grid_coordinates(locations):
    """Normalized locations in [0, 1] -> GridSample's [-1, 1]; outside [-1, 2] (NaN too) -> -3, sampling zero.

    Every location outside [-1, 2] is outside the image (pixel coordinate <= -1 or >= the size), so moving it
    far outside keeps the reference's value and keeps NaN and infinities away from GridSample's indexing.
    """
    lowest = op.CastLike(op.Constant(value_float=-1.0), locations)
    highest = op.CastLike(op.Constant(value_float=2.0), locations)
    inside = op.And(op.GreaterOrEqual(locations, lowest), op.LessOrEqual(locations, highest))
    two = op.CastLike(op.Constant(value_float=2.0), locations)
    one = op.CastLike(op.Constant(value_float=1.0), locations)
    far_outside = op.CastLike(op.Constant(value_float=-3.0), locations)
    return op.Where(inside, op.Sub(op.Mul(locations, two), one), far_outside)


def _merge_first_two(tensor):
    """(A, B, *rest) -> (A * B, *rest)."""
    return op.Reshape(tensor, op.Concat(_ints(-1), op.Shape(tensor, start=2), axis=0))


def _bilinear(image, grid):
    """image (B, C, H, W), grid (B, Q, P, 2) in [-1, 1] -> (B, C, Q, P), zero padding, align_corners=False."""
    return op.GridSample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=0)


def _deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, levels):
    """ms_deform_attn on ONNX values in the compute dtype; returns (N, Q, M * D) in that dtype."""
    channels = op.Shape(value, start=3, end=4)
    # (N, Q, M, L, P, 2) -> (N * M, Q, L, P, 2); (N, Q, M, L, P) -> (N * M, Q, L, P)
    grid = _grid_coordinates(sampling_locations)
    grid = _merge_first_two(op.Transpose(grid, perm=[0, 2, 1, 3, 4, 5]))
    weights = _merge_first_two(op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]))
    out = None
    for level in range(levels):
        level_index = op.Constant(value_ints=[level])
        height_width = op.Gather(spatial_shapes, op.Constant(value_int=level), axis=0)  # (2,) = (H, W)
        start = op.Gather(level_start_index, level_index, axis=0)
        end = op.Add(start, op.ReduceProd(height_width, keepdims=1))
        # (N, H*W, M, D) -> (N, M, D, H*W) -> (N * M, D, H, W)
        level_value = op.Transpose(op.Slice(value, start, end, _ints(1)), perm=[0, 2, 3, 1])
        # An empty level (H or W = 0) needs allowzero (else a 0 copies the input's size) and so N * M
        # spelled out (a -1 may not stand beside a 0 then).
        batch_heads = op.Mul(op.Shape(value, start=0, end=1), op.Shape(value, start=2, end=3))
        level_shape = op.Concat(batch_heads, channels, height_width, axis=0)
        level_value = op.Reshape(level_value, level_shape, allowzero=1)
        # GridSample takes no empty image: an empty side becomes one row/column of zeros, which samples 0 as
        # the reference's empty level does.
        empty_sides = op.Cast(op.Equal(height_width, op.Constant(value_int=0)), to=_INT64)
        level_value = op.Pad(level_value, op.Concat(_ints(0, 0, 0, 0, 0, 0), empty_sides, axis=0))
        level_grid = op.Squeeze(op.Gather(grid, level_index, axis=2), _ints(2))  # (N * M, Q, P, 2)
        level_weights = op.Gather(weights, level_index, axis=2)  # (N * M, Q, 1, P)
        samples = _bilinear(level_value, level_grid)  # (N * M, D, Q, P)
        weighted = op.ReduceSum(op.Mul(samples, op.Transpose(level_weights, perm=[0, 2, 1, 3])), _ints(3))
        out = weighted if out is None else op.Add(out, weighted)  # (N * M, D, Q, 1)
    # (N * M, D, Q, 1) -> (N, M, D, Q) -> (N, Q, M, D) -> (N, Q, M * D)
    heads = op.Shape(value, start=2, end=3)
    out = op.Reshape(out, op.Concat(_ints(-1), heads, channels, op.Shape(out, start=2, end=3), axis=0))
    return op.Reshape(op.Transpose(out, perm=[0, 3, 1, 2]), _ints(0, 0, -1))


def _ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend: str = "auto"
):
    """m2f_kernels::ms_deform_attn -> (N, Q, M * D); ``backend`` has no meaning in the exported graph."""
    out = _deform_attn(
        _to_compute(value),
        spatial_shapes,
        level_start_index,
        _to_compute(sampling_locations),
        _to_compute(attention_weights),
        _static_dim(sampling_locations, 3, "the levels of sampling_locations"),
    )
    return op.CastLike(out, value)


def _ms_deform_attn_fused(
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    sampling_offsets,
    attention_logits,
    backend: str = "auto",
):
    """m2f_kernels::ms_deform_attn_fused: location = reference + offset / (W_l, H_l), softmax over L * P."""
    offsets = _to_compute(sampling_offsets)
    size_xy = op.CastLike(op.Gather(spatial_shapes, _ints(1, 0), axis=1), offsets)  # (L, 2) as (W, H)
    locations = op.Add(
        op.Unsqueeze(_to_compute(reference_points), _ints(2, 4)),  # (N, Q, 1, L, 1, 2)
        op.Div(offsets, op.Unsqueeze(size_xy, _ints(1))),  # offsets / (L, 1, 2)
    )
    weights = op.Softmax(_to_compute(attention_logits), axis=-1)  # (N, Q, M, L * P)
    weights = op.Reshape(weights, op.Shape(sampling_offsets, start=0, end=5))  # (N, Q, M, L, P)
    levels = _static_dim(sampling_offsets, 3, "the levels of sampling_offsets")
    out = _deform_attn(_to_compute(value), spatial_shapes, level_start_index, locations, weights, levels)
    return op.CastLike(out, value)


def _point_sample(input, coords, backend: str = "auto"):
    """m2f_kernels::point_sample: input (N, C, H, W), coords (N, P, 2) -> (N, C, P)."""
    image = _to_compute(input)
    # Coords in the input's compute dtype, as the kernels read them (GridSample also takes only one dtype).
    grid = op.Unsqueeze(_grid_coordinates(op.CastLike(coords, image)), _ints(2))  # (N, P, 1, 2)
    samples = op.Squeeze(_bilinear(image, grid), _ints(3))
    return op.CastLike(samples, input)


def _masked_attention(
    q, k, v, mask_logits, attn_mask, threshold_logit: float, scale: float, backend: str = "auto"
):
    """m2f_kernels::masked_attention -> (out (B, H, Q, d), lse (B, H, Q) float32).

    mask_logits (B, Q, K): key visible iff logit >= threshold_logit (NaN blocked); attn_mask (B, Hm, Q, K)
    bool, True = blocked. A row that blocks every key blocks none.
    """
    scores = op.MatMul(_to_compute(q), op.Transpose(_to_compute(k), perm=[0, 1, 3, 2]))
    # A double constant: float64 scores keep the scale's every bit (value_float would round it).
    scores = op.Mul(scores, op.CastLike(op.Constant(value=ir.tensor(scale, dtype=_FLOAT64)), scores))
    if mask_logits is not None:
        logits = _to_compute(mask_logits)
        threshold = op.CastLike(op.Constant(value_float=threshold_logit), logits)
        blocked = op.Unsqueeze(op.Not(op.GreaterOrEqual(logits, threshold)), _ints(1))  # (B, 1, Q, K)
    else:
        blocked = attn_mask
    if blocked is not None:
        visible_keys = op.ReduceSum(op.Cast(op.Not(blocked), to=_INT64), _ints(-1), keepdims=1)
        blocked = op.And(blocked, op.Greater(visible_keys, op.Constant(value_int=0)))
        minus_infinity = op.CastLike(op.Constant(value_float=-math.inf), scores)
        scores = op.Where(blocked, minus_infinity, scores)
    row_max = op.ReduceMax(scores, _ints(-1), keepdims=1)
    exponentials = op.Exp(op.Sub(scores, row_max))
    row_sum = op.ReduceSum(exponentials, _ints(-1), keepdims=1)
    out = op.MatMul(op.Div(exponentials, row_sum), _to_compute(v))
    lse = op.Squeeze(op.Add(row_max, op.Log(row_sum)), _ints(-1))
    return op.CastLike(out, q), op.Cast(lse, to=_FLOAT32)


def translation_table() -> dict[Callable, Callable]:
    """{torch op overload: ONNX builder} for torch.onnx.export(custom_translation_table=...)."""
    ops = torch.ops.m2f_kernels
    return {
        ops.ms_deform_attn.default: _ms_deform_attn,
        ops.ms_deform_attn_fused.default: _ms_deform_attn_fused,
        ops.masked_attention.default: _masked_attention,
        ops.point_sample.default: _point_sample,
    }


def export(model, args: tuple, path: str | os.PathLike | None = None, **kwargs):
    """torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=translation_table(), ...).

    Entries of a ``custom_translation_table`` keyword are added to (and override) ours; every other keyword
    goes to torch.onnx.export. Returns its ONNXProgram. Call ``model.eval()`` first for inference graphs.
    """
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("m2f_kernels.onnx.export uses the dynamo exporter; dynamo=False is not supported")
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=table, **kwargs)

"""`m2f export --checkpoint F --out model.onnx`: a checkpoint's model as an ONNX file for onnxruntime.

The graph takes images (batch, 3, height, width) float32 RGB 0-255 (the model normalizes them) and returns
pred_logits (batch, Q, C + 1) and pred_masks (batch, Q, ceil(height / 4), ceil(width / 4)) logits, as the
PyTorch model in eval mode does; the postprocessing (panoptic merge, instances, semantic) stays in Python.
The graph takes one image of the example's size, or with dynamic_size any batch and any height and width from
MIN_SIDE on. A dynamic graph is traced from a batch of two images of the example's size (from a single image
the tracer would fix the batch at 1); for a Swin backbone the example must give each stage at least two
windows along each side, so that the trace does not take the one-window case for the rule.

Before the file is written (atomically), onnxruntime runs it on random images at the example size and, for a
dynamic graph, on two images of a larger size that pads differently and at the smallest size; its outputs must
match PyTorch's within TOLERANCE. The masked cross-attention makes the outputs jump where a mask logit lies
within float rounding of its threshold, and one such key, visible to PyTorch and blocked in onnxruntime or
the other way round, moves the outputs by up to about 1e-3 (random Swin-T weights). So when the graph misses
TOLERANCE by less than MASK_THRESHOLD_TOLERANCE, the model is exported a second time with every key visible
(mask threshold 0): the graph is accepted when that one matches within TOLERANCE, since the two differ only in
the threshold's value, which the ONNX tests of masked_attention check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch

from m2f.config import ModelConfig
from m2f.engine import checkpoint as ckpt
from m2f.engine.evaluate import load_inference_model
from m2f.files import check_output_path, write_bytes_atomic

MIN_SIDE = 64
# Largest |onnxruntime - PyTorch| accepted, relative to the largest |PyTorch output| (float32 on CPU; the
# differences come from the order of the sums).
TOLERANCE = 1e-4
# Largest difference accepted from mask logits within rounding of the threshold (module docstring).
MASK_THRESHOLD_TOLERANCE = 1e-2
OUTPUTS = ("pred_logits", "pred_masks")


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config_name: str | ModelConfig | None = None,
    height: int = 512,
    width: int = 512,
    dynamic_size: bool = False,
) -> dict:
    """Exports the checkpoint's model (see the module docstring) from an example of height x width images;
    returns {"path", "shapes" checked (batch, height, width), "max_difference" per output relative to its
    largest magnitude, "max_difference_every_key_visible" (None unless that check ran)}.
    Raises ValueError when onnxruntime's outputs differ from PyTorch's by more than the module allows."""
    import onnxruntime  # noqa: F401  (an ImportError before the long export, not after)

    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side < MIN_SIDE:
            raise ValueError(f"{name} must be an integer of at least {MIN_SIDE} pixels, got {side!r}")
    out = check_output_path(out, "out", inputs=[checkpoint])
    metadata, shapes = ckpt.read_header(checkpoint)
    config = ckpt.load_config_for_checkpoint(config_name, metadata, checkpoint)
    num_classes = ckpt.class_head_classes(shapes)
    if num_classes is not None:
        config = dataclasses.replace(config, num_classes=num_classes)
    model = load_inference_model(config, checkpoint, metadata)
    if dynamic_size:
        smallest = smallest_dynamic_example(model.backbone)
        if min(height, width) < smallest:
            raise ValueError(
                f"a dynamic-size graph of {config.name!r} is traced from an example of at least {smallest} x "
                f"{smallest} pixels (two windows along each side of its last Swin stage), got {height} x {width}"
            )

    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2 if dynamic_size else 1, 3, height, width, generator=generator) * 255
    options = {"input_names": ["images"], "output_names": list(OUTPUTS)}
    checked = [(1, height, width)]
    if dynamic_size:
        options["dynamic_shapes"] = {
            "images": {
                0: torch.export.Dim("batch", min=1),
                2: torch.export.Dim("height", min=MIN_SIDE),
                3: torch.export.Dim("width", min=MIN_SIDE),
            }
        }
        # a batch at a size that pads differently from the example's at every stride, and the smallest size
        checked += [(2, height + 13, width + 37), (1, MIN_SIDE, MIN_SIDE + 7)]
    data = _export(model, example, options, dynamic_size)
    worst = _compare(model, data, checked)
    every_key_visible = None
    if any(difference > TOLERANCE for difference, _ in worst.values()):  # see the module docstring
        with _every_key_visible(model):
            every_key_visible = _compare(model, _export(model, example, options, dynamic_size), checked)
        _check_differences(every_key_visible, checked, TOLERANCE, "with every masked-attention key visible, ")
        _check_differences(worst, checked, MASK_THRESHOLD_TOLERANCE, "")
    write_bytes_atomic(out, data)
    return {
        "path": str(out),
        "shapes": checked,
        "max_difference": _largest(worst),
        "max_difference_every_key_visible": every_key_visible and _largest(every_key_visible),
    }


def _largest(worst: dict) -> dict[str, float]:
    """{output name: largest relative difference} of a _compare result."""
    return {name: difference for name, (difference, _) in worst.items()}


def smallest_dynamic_example(backbone) -> int:
    """The smallest example side from which a dynamic-size graph of the backbone is traced: MIN_SIDE, or for
    Swin one pixel more than its last stage's stride times its window (two windows along each side)."""
    if not backbone.is_swin:
        return MIN_SIDE
    stride = backbone.body.feature_info[-1]["reduction"]
    return max(MIN_SIDE, stride * backbone.body.layers[-1].window_size + 1)


def _export(model, example: torch.Tensor, options: dict, dynamic_size: bool) -> bytes:
    """The serialized ONNX graph of the model traced on the example images."""
    from m2f_kernels import onnx as m2f_onnx

    program = m2f_onnx.export(model, (example,), None, **options)
    if dynamic_size:
        _check_dynamic_input(program.model_proto)
    return program.model_proto.SerializeToString()


def _check_dynamic_input(model_proto) -> None:
    """ValueError when the exporter fixed the batch, height or width of the graph's images input (it falls
    back to a fixed-size trace where it cannot keep them symbolic)."""
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    fixed = [name for name, dim in zip(("batch", "", "height", "width"), dims) if name and dim.dim_value]
    if fixed:
        raise ValueError(
            f"the exporter fixed the {', '.join(fixed)} of the images "
            f"({[d.dim_value or d.dim_param for d in dims]}); export a fixed size instead"
        )


@contextlib.contextmanager
def _every_key_visible(model):
    """Within the block every masked cross-attention of the model has mask threshold 0 (no key blocked)."""
    from m2f_kernels.nn import MaskedMultiheadAttention

    layers = [module for module in model.modules() if isinstance(module, MaskedMultiheadAttention)]
    thresholds = [layer.mask_threshold for layer in layers]
    try:
        for layer in layers:
            layer.mask_threshold = 0.0
        yield
    finally:
        for layer, threshold in zip(layers, thresholds):
            layer.mask_threshold = threshold


def _compare(model, data: bytes, shapes) -> dict[str, tuple[float, int]]:
    """Runs the serialized graph in onnxruntime on random images (seed 0) of each (batch, height, width) of
    shapes; returns per output the largest |onnxruntime - PyTorch| relative to the largest |PyTorch output| and
    the index of the shape where it occurs. ValueError where the graph fails to run, gives an output of another
    shape or a difference that is not finite."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = dict.fromkeys(OUTPUTS, (0.0, 0))
    for index, (batch, height, width) in enumerate(shapes):
        images = torch.rand(batch, 3, height, width, generator=generator) * 255
        with torch.no_grad():
            expected = model(images)
        try:
            got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"images": images.numpy()})))
        except Exception as error:  # onnxruntime's own exception types
            raise ValueError(
                f"onnxruntime could not run the exported graph on {_describe(shapes, index)}: {error}"
            ) from error
        for name in OUTPUTS:
            reference = expected[name]
            if tuple(got[name].shape) != tuple(reference.shape):
                raise ValueError(
                    f"the exported graph gives {name} of shape {tuple(got[name].shape)} for "
                    f"{_describe(shapes, index)}, PyTorch {tuple(reference.shape)}"
                )
            scale = max(reference.abs().max().item(), 1.0)
            difference = (torch.from_numpy(got[name]) - reference).abs().max().item() / scale
            if not math.isfinite(difference):
                raise ValueError(
                    f"the exported graph's {name} differs from PyTorch's by {difference} for "
                    f"{_describe(shapes, index)}"
                )
            if difference > worst[name][0]:
                worst[name] = (difference, index)
    return worst


def _check_differences(worst: dict, shapes, tolerance: float, context: str) -> None:
    """ValueError naming the output and images where a difference from _compare passes the tolerance."""
    for name, (difference, index) in worst.items():
        if difference > tolerance:
            raise ValueError(
                f"{context}the exported graph's {name} differs from PyTorch's by {difference:.2e} (relative) "
                f"for {_describe(shapes, index, f', more than {tolerance:.0e}')}"
            )


def _describe(shapes, index: int, detail: str = "") -> str:
    """'B x 3 x H x W images' of shapes[index] and the detail, with advice where the shape is not the
    example's (the first): only a dynamic graph is checked there, and a fixed one may do better."""
    batch, height, width = shapes[index]
    advice = "; export a fixed size instead" if index else ""
    return f"{batch} x 3 x {height} x {width} images{detail}{advice}"

"""`m2f export --checkpoint F --out model.onnx`: a checkpoint's model as an ONNX file for onnxruntime.

The graph takes images (batch, 3, height, width) float32 RGB 0-255 (the model normalizes them) and returns
pred_logits (batch, Q, C + 1) and pred_masks (batch, Q, ceil(height / 4), ceil(width / 4)) logits, as the
PyTorch model in eval mode does; the postprocessing (panoptic merge, instances, semantic) stays in Python.
The graph takes one image of the example's size, or with dynamic_size any batch and any height and width from
MIN_SIDE on (ResNet backbones: the trace of Swin's window padding at a symbolic size does not finish). Before
the file is written (atomically), onnxruntime runs it on random images at the example size and, for a dynamic
graph, at a second size that pads differently, and its outputs must match PyTorch's.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from m2f.engine import checkpoint as ckpt
from m2f.engine.evaluate import build_checkpoint_model, load_checkpoint_weights, load_config_for_checkpoint
from m2f.files import check_output_path, write_bytes_atomic

MIN_SIDE = 32
# Largest |onnxruntime - PyTorch| accepted, relative to the largest |PyTorch output| (float32 on CPU; the
# differences come from the order of the sums).
TOLERANCE = 1e-4


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config_name: str | None = None,
    height: int = 512,
    width: int = 512,
    dynamic_size: bool = False,
) -> dict:
    """Exports the checkpoint's model (see the module docstring) with a (1, 3, height, width) example image;
    returns {"path", "sizes" checked, "max_difference" per output relative to its largest magnitude}.
    Raises ValueError when onnxruntime's outputs differ from PyTorch's by more than TOLERANCE."""
    import onnxruntime  # noqa: F401  (an ImportError before the long export, not after)

    from m2f_kernels import onnx as m2f_onnx

    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side < MIN_SIDE:
            raise ValueError(f"{name} must be an integer of at least {MIN_SIDE} pixels, got {side!r}")
    out = check_output_path(out, "out", inputs=[checkpoint])
    metadata, shapes = ckpt.read_header(checkpoint)
    config = load_config_for_checkpoint(config_name, metadata, checkpoint)
    num_classes = ckpt.class_head_classes(shapes)
    if num_classes is not None:
        config = dataclasses.replace(config, num_classes=num_classes)
    model = build_checkpoint_model(config, checkpoint)
    if dynamic_size and model.backbone.is_swin:
        raise ValueError(
            f"a dynamic image size is not supported for the Swin backbone of {config.name!r} (tracing its window "
            "padding at a symbolic size does not finish); export a fixed size"
        )
    load_checkpoint_weights(model, checkpoint, metadata)
    model.eval()

    generator = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, height, width, generator=generator) * 255
    options = {"input_names": ["images"], "output_names": ["pred_logits", "pred_masks"]}
    sizes = [(height, width)]
    if dynamic_size:
        options["dynamic_shapes"] = {
            "images": {
                0: torch.export.Dim("batch", min=1),
                2: torch.export.Dim("height", min=MIN_SIDE),
                3: torch.export.Dim("width", min=MIN_SIDE),
            }
        }
        # a size that pads differently from the example's at every stride
        sizes.append((height + 13, width + 37))
    program = m2f_onnx.export(model, (example,), None, **options)
    data = program.model_proto.SerializeToString()
    differences = _check_against_pytorch(model, data, sizes, generator)
    write_bytes_atomic(out, data)
    return {"path": str(out), "sizes": sizes, "max_difference": differences}


def _check_against_pytorch(model, data: bytes, sizes, generator) -> dict[str, float]:
    """Runs the serialized graph in onnxruntime on a random image of each size; ValueError naming the size and
    output where it differs from the model's by more than TOLERANCE (relative to the output's magnitude)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = {"pred_logits": 0.0, "pred_masks": 0.0}
    for index, (height, width) in enumerate(sizes):
        # beyond the example's size only a dynamic graph is checked, and a fixed one may do better
        advice = "; export a fixed size instead" if index else ""
        images = torch.rand(1, 3, height, width, generator=generator) * 255
        with torch.no_grad():
            expected = model(images)
        got = dict(zip(worst, session.run(list(worst), {"images": images.numpy()})))
        for name in worst:
            reference = expected[name]
            if tuple(got[name].shape) != tuple(reference.shape):
                raise ValueError(
                    f"the exported graph gives {name} of shape {tuple(got[name].shape)} for a {height} x {width} "
                    f"image, PyTorch {tuple(reference.shape)}{advice}"
                )
            scale = max(reference.abs().max().item(), 1.0)
            difference = (torch.from_numpy(got[name]) - reference).abs().max().item() / scale
            if not difference <= TOLERANCE:
                raise ValueError(
                    f"the exported graph's {name} differs from PyTorch's by {difference:.2e} (relative) for a "
                    f"{height} x {width} image, more than {TOLERANCE:.0e}{advice}"
                )
            worst[name] = max(worst[name], difference)
    return worst

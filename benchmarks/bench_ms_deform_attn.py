"""Multi-scale deformable attention (DESIGN.md 2.1, 5): our kernels against the baselines, in the same run.

Shapes (M=8 heads, D=32 channels, Q = S unless given):
  m2f-1024  Mask2Former pixel-decoder encoder at 1024 x 1024: N=2, L=3, P=4, levels 128^2, 64^2, 32^2 (S=21,504)
  m2f-512   the same at 512 x 512: levels 64^2, 32^2, 16^2 (S=5,376)
  ddetr-1024  Deformable-DETR encoder, L=4: levels 128^2, 64^2, 32^2, 16^2
  dcnv4-15200 the DCNv4 paper's shape: N=1, Q=15,200, L=4, P=8, levels 100x152, 50x76, 25x38, 13x19
GPU: every shape in float32 and float16. CPU (no GPU): m2f-512 in float32 only.

Plain op group (locations and weights given): ours (cuda, triton | cpu), the reference (PyTorch eager), the
reference under torch.compile (GPU) and a grid_sample implementation (the usual PyTorch fallback of
Deformable-DETR ports). Fused group (offsets and logits given): our fused kernels, the composition "locations
+ softmax in PyTorch, then our plain kernel", the reference composition, and FlashDeformAttn from the `DCNv4`
package when importable on a GPU (it takes locations and logits and applies the softmax in its kernel).

    pytest benchmarks/bench_ms_deform_attn.py -s
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels
from benchmarks.harness import compulsory_bytes
from m2f_kernels import available_backends, reference

SHAPES = {
    "m2f-1024": {"batch": 2, "levels": [(128, 128), (64, 64), (32, 32)], "points": 4, "queries": None},
    "m2f-512": {"batch": 2, "levels": [(64, 64), (32, 32), (16, 16)], "points": 4, "queries": None},
    "ddetr-1024": {
        "batch": 2,
        "levels": [(128, 128), (64, 64), (32, 32), (16, 16)],
        "points": 4,
        "queries": None,
    },
    "dcnv4-15200": {
        "batch": 1,
        "levels": [(100, 152), (50, 76), (25, 38), (13, 19)],
        "points": 8,
        "queries": 15200,
    },
}
HEADS, CHANNELS = 8, 32
GPU_CASES = [(shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.float16)]
CPU_CASES = [("m2f-512", torch.float32)]
MODES = ("forward", "backward", "full")
ON_GPU = torch.cuda.is_available()
CASES = GPU_CASES if ON_GPU else CPU_CASES


def _kernel_backends() -> list[str]:
    wanted = ("cuda", "triton") if ON_GPU else ("cpu",)
    return [name for name in wanted if name in available_backends()]


def _repeats(device: torch.device) -> dict:
    return {"warmup": 5, "repeats": 20} if device.type == "cuda" else {"warmup": 1, "repeats": 3}


@functools.cache
def _inputs(shape_name: str, dtype: torch.dtype, device_type: str):
    """value, spatial_shapes, level_start_index, locations, weights, reference_points, offsets, logits."""
    shape = SHAPES[shape_name]
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shape["levels"], dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cumsum(sizes, 0) - sizes
    num_values = int(sizes.sum())
    queries = shape["queries"] or num_values
    batch, levels, points = shape["batch"], len(shape["levels"]), shape["points"]
    value = torch.randn(batch, num_values, HEADS, CHANNELS, generator=generator)
    reference_points = torch.rand(batch, queries, levels, 2, generator=generator)
    offsets = torch.randn(batch, queries, HEADS, levels, points, 2, generator=generator) * 2
    logits = torch.randn(batch, queries, HEADS, levels * points, generator=generator)
    locations = reference_points[:, :, None, :, None, :] + offsets / spatial_shapes.flip(-1)[:, None, :]
    weights = logits.softmax(-1).unflatten(-1, (levels, points))
    tensors = (
        value,
        spatial_shapes,
        level_start_index,
        locations,
        weights,
        reference_points,
        offsets,
        logits,
    )
    return tuple(t.to(device_type, dtype) if t.is_floating_point() else t.to(device_type) for t in tensors)


def grid_sample_ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The grid_sample formulation (one bilinear grid_sample per level, then the weighted sum)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (height, width) in enumerate(sizes):
        level_value = (
            value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width)
        )
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N * M, Q, P, 2)
        samples.append(
            F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


@functools.cache
def _compiled_reference():
    return torch.compile(reference.ms_deform_attn)


def _plain_contenders() -> dict:
    contenders = {
        f"ours-{backend}": functools.partial(m2f_kernels.ms_deform_attn, backend=backend)
        for backend in _kernel_backends()
    }
    contenders["reference"] = reference.ms_deform_attn
    contenders["grid_sample"] = grid_sample_ms_deform_attn
    if ON_GPU:
        contenders["reference-compiled"] = lambda *args: _compiled_reference()(*args)
    return contenders


def _composed(backend):
    def run(value, spatial_shapes, level_start_index, reference_points, offsets, logits):
        levels, points = offsets.shape[3], offsets.shape[4]
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / spatial_shapes.flip(-1).to(offsets)[:, None, :]
        )
        weights = logits.softmax(-1).unflatten(-1, (levels, points))
        return m2f_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, backend=backend
        )

    return run


def _dcnv4_flash_deform_attn():
    """DCNv4's FlashDeformAttn as a fused contender (PyPI `dcnv4`, or the original `DCNv4` build), or None when
    neither is importable."""
    try:
        from dcnv4.ops.autograd import FlashDeformAttnFunction
    except Exception:  # not installed, or installed without its compiled extension
        try:
            from DCNv4.functions import FlashDeformAttnFunction
        except Exception:
            return None

    def run(value, spatial_shapes, level_start_index, reference_points, offsets, logits):
        batch, queries, heads, levels, points, _ = offsets.shape
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / spatial_shapes.flip(-1).to(offsets)[:, None, :]
        )
        sampling_loc_attn = torch.cat(
            [locations.reshape(batch, queries, heads, levels * points * 2), logits], dim=-1
        )
        return FlashDeformAttnFunction.apply(
            value, spatial_shapes, level_start_index, sampling_loc_attn, 64, points
        )

    return run


def _fused_contenders() -> dict:
    contenders = {}
    for backend in _kernel_backends():
        contenders[f"ours-{backend}-fused"] = functools.partial(
            m2f_kernels.ms_deform_attn_fused, backend=backend
        )
        contenders[f"composed-{backend}"] = _composed(backend)
    contenders["reference"] = reference.ms_deform_attn_fused
    if ON_GPU and (dcnv4 := _dcnv4_flash_deform_attn()) is not None:
        contenders["dcnv4"] = dcnv4
    return contenders


def _run(bench, device, group, name, function, tensors, differentiable, mode, params):
    inputs = [
        t.detach().requires_grad_(mode != "forward") if i in differentiable else t
        for i, t in enumerate(tensors)
    ]
    grad_inputs = [inputs[i] for i in differentiable] if mode != "forward" else []
    batch, queries = tensors[-1].shape[:2]
    moved = compulsory_bytes(tensors, batch * queries * HEADS * CHANNELS * tensors[0].element_size())

    def call():
        with torch.set_grad_enabled(mode != "forward"):
            return function(*inputs)

    try:
        bench.run(
            group,
            name,
            call,
            mode=mode,
            grad_inputs=grad_inputs,
            device=device,
            params=params,
            bytes_moved=moved if mode == "forward" else None,
            **_repeats(device),
        )
    except torch.OutOfMemoryError:
        pytest.skip(f"{name} ran out of GPU memory")
    except RuntimeError as error:
        if name != "dcnv4":
            raise
        pytest.skip(f"dcnv4 cannot run this case: {error}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(_plain_contenders()))
@pytest.mark.parametrize("shape_name, dtype", CASES, ids=lambda case: str(case).replace("torch.", ""))
def test_ms_deform_attn(bench, device, shape_name, dtype, name, mode):
    value, spatial_shapes, level_start_index, locations, weights, *_ = _inputs(shape_name, dtype, device.type)
    tensors = (value, spatial_shapes, level_start_index, locations, weights)
    params = {"shape": shape_name, "dtype": str(dtype), **SHAPES[shape_name]}
    group = f"ms_deform_attn/{shape_name}/{str(dtype).replace('torch.', '')}"
    _run(bench, device, group, name, _plain_contenders()[name], tensors, (0, 3, 4), mode, params)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(_fused_contenders()))
@pytest.mark.parametrize("shape_name, dtype", CASES, ids=lambda case: str(case).replace("torch.", ""))
def test_ms_deform_attn_fused(bench, device, shape_name, dtype, name, mode):
    value, spatial_shapes, level_start_index, *_, reference_points, offsets, logits = _inputs(
        shape_name, dtype, device.type
    )
    tensors = (value, spatial_shapes, level_start_index, reference_points, offsets, logits)
    params = {"shape": shape_name, "dtype": str(dtype), **SHAPES[shape_name]}
    group = f"ms_deform_attn_fused/{shape_name}/{str(dtype).replace('torch.', '')}"
    _run(bench, device, group, name, _fused_contenders()[name], tensors, (0, 3, 4, 5), mode, params)

"""ms_deform_attn_fused: every fused kernel against the float64 composition location = reference + offset /
(W, H), weights = softmax(logits), then the ms_deform_attn reference; forward and the gradients of value,
reference points, offsets and logits (DESIGN.md 2.1)."""

import itertools

import pytest
import torch
from kernel_backends import cpu_kernel_backends
from test_ms_deform_attn_backends import (
    HEADS_CHANNELS,
    LEVELS,
    LOW_PRECISION,
    QUERIES,
    assert_matches_reference,
    forward_backward,
    level_tables,
)

import m2f_kernels
from m2f_kernels import reference


def composed_reference(value, spatial_shapes, level_start_index, reference_points, offsets, logits):
    """The fused op written as its definition, in the inputs' dtype."""
    levels, points = offsets.shape[3], offsets.shape[4]
    size = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
    locations = reference_points[:, :, None, :, None, :] + offsets / size[:, None, :]
    weights = logits.softmax(dim=-1).unflatten(-1, (levels, points))
    return reference.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def make_fused_inputs(batch, queries, heads, channels, levels, points, dtype, device="cpu"):
    """Reference points in [0, 1], offsets of a few pixels, with exact pixel centres (power-of-two levels),
    locations outside the image and NaN offsets in the first samples."""
    spatial_shapes, level_start_index = level_tables(levels)
    num_values = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, num_values, heads, channels, dtype=torch.float64)
    reference_points = torch.rand(batch, queries, len(levels), 2, dtype=torch.float64)
    offsets = torch.randn(batch, queries, heads, len(levels), points, 2, dtype=torch.float64) * 2
    logits = torch.randn(batch, queries, heads, len(levels) * points, dtype=torch.float64) * 2
    if queries >= 3:
        for level, (height, width) in enumerate(levels):
            if width & (width - 1) == 0 and height & (height - 1) == 0:
                reference_points[:, 0, level] = torch.tensor([0.5 / width, 1.5 / height], dtype=torch.float64)
                offsets[:, 0, :, level] = offsets[:, 0, :, level].round()
        offsets[:, 1, 0, 0, 0] = torch.tensor([float("nan"), 0.0])
        offsets[:, 2, :, :, :, 0] = 1e4  # far outside the image
    tensors = (value, spatial_shapes, level_start_index, reference_points, offsets, logits)
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors]


def check_fused_against_reference(backend, batch, heads, channels, levels, points, dtype, device="cpu"):
    inputs = make_fused_inputs(batch, QUERIES, heads, channels, levels, points, dtype, device)
    grad_output = torch.randn(batch, QUERIES, heads * channels, dtype=dtype, device=device)
    ours = forward_backward(
        lambda *t: m2f_kernels.ms_deform_attn_fused(*t, backend=backend), inputs, grad_output
    )
    exact = forward_backward(composed_reference, inputs, grad_output, torch.float64)
    lowp = (
        forward_backward(reference.ms_deform_attn_fused, inputs, grad_output)
        if dtype in LOW_PRECISION
        else exact
    )
    assert_matches_reference(ours, exact, lowp, dtype)


FULL_GRID = list(itertools.product([1, 3], sorted(LEVELS), [1, 4, 8], HEADS_CHANNELS))
SMALL_GRID = [(1, 1, 4, (8, 32)), (3, 3, 1, (4, 16)), (1, 4, 8, (1, 64))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", FULL_GRID)
def test_cpu_fused_kernel_matches_reference(batch, num_levels, points, heads_channels, dtype):
    if "cpu" not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip("the C++ CPU kernel is not built")
    heads, channels = heads_channels
    check_fused_against_reference("cpu", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", SMALL_GRID)
def test_cpu_kernel_lower_instruction_sets_match_reference(
    monkeypatch, isa, batch, num_levels, points, heads_channels, dtype
):
    """The loops compiled for x86-64-v3 (AVX2) and baseline x86-64 (see M2F_KERNELS_CPU_ISA)."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip("the C++ CPU kernel is not built")
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    heads, channels = heads_channels
    check_fused_against_reference("cpu", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", SMALL_GRID)
def test_triton_fused_interpreter_matches_reference(batch, num_levels, points, heads_channels, dtype):
    if "triton" not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip("Triton runs on CPU only with TRITON_INTERPRET=1")
    heads, channels = heads_channels
    check_fused_against_reference("triton", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_forms_16_bit_locations_in_float32(dtype):
    """On a 128-pixel level a 16-bit location (reference + offset / W) is a few tenths of a pixel off; the
    torch backend, like the kernels, forms it in float32, so each result stays within 8 ulp of its scale."""
    generator = torch.Generator().manual_seed(3)
    spatial_shapes, level_start_index = torch.tensor([[128, 128], [16, 24]]), torch.tensor([0, 128 * 128])
    shapes = [(2, 128 * 128 + 16 * 24, 2, 8), (2, 50, 2, 2), (2, 50, 2, 2, 4, 2), (2, 50, 2, 8)]
    value, reference_points, offsets, logits = (
        torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes
    )
    reference_points = (reference_points.abs() / 3).clamp(max=1)
    inputs = [
        t.to(dtype) if t.is_floating_point() else t
        for t in (value, spatial_shapes, level_start_index, reference_points, offsets * 3, logits)
    ]
    grad_output = torch.randn(2, 50, 16, generator=generator).to(dtype)
    ours = forward_backward(
        lambda *t: m2f_kernels.ms_deform_attn_fused(*t, backend="torch"), inputs, grad_output
    )
    exact = forward_backward(composed_reference, inputs, grad_output, torch.float64)
    names = ["output", "value gradient", "reference gradient", "offsets gradient", "logits gradient"]
    for name, result, expected in zip(names, ours, exact):
        error = (result.double() - expected).abs().max().item()
        bound = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", FULL_GRID)
def test_cuda_fused_backends_match_reference(
    backend, deterministic, batch, num_levels, points, heads_channels, dtype
):
    heads, channels = heads_channels
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_fused_against_reference(
            backend, batch, heads, channels, LEVELS[num_levels], points, dtype, "cuda"
        )
    finally:
        torch.use_deterministic_algorithms(False)


def deterministic_fused_gradients(backend, device):
    levels = [(4, 4), (2, 2)]
    inputs = make_fused_inputs(2, 24, 2, 8, levels, 4, torch.float32, device)
    inputs[4] = inputs[4] * 0.2  # many samples on the same pixels
    grad_output = torch.randn(2, 24, 16, device=device)
    runs = [
        forward_backward(
            lambda *t: m2f_kernels.ms_deform_attn_fused(*t, backend=backend), inputs, grad_output
        )
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_deterministic_mode_is_bitwise_reproducible(backend, deterministic_algorithms):
    if backend not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip(f"{backend} does not run the fused op on CPU here")
    deterministic_fused_gradients(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_fused_deterministic_mode_is_bitwise_reproducible(backend, deterministic_algorithms):
    deterministic_fused_gradients(backend, "cuda")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_empty_queries(backend):
    if backend not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip(f"{backend} does not run the fused op on CPU here")
    inputs = make_fused_inputs(2, 0, 2, 8, LEVELS[3], 4, torch.float32)
    value = inputs[0].requires_grad_()
    out = m2f_kernels.ms_deform_attn_fused(*inputs, backend=backend)
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


def test_cpu_fused_kernel_gradcheck():
    if "cpu" not in cpu_kernel_backends("ms_deform_attn_fused"):
        pytest.skip("the C++ CPU kernel is not built")
    levels = [(3, 4), (2, 3)]
    value, spatial_shapes, level_start_index, _, _, logits = make_fused_inputs(
        2, 3, 2, 4, levels, 2, torch.float64
    )
    # Locations inside the image: reference in [0.3, 0.7], offsets below 0.2 of the level size.
    reference_points = torch.rand(2, 3, 2, 2, dtype=torch.float64) * 0.4 + 0.3
    offsets = (torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64) - 0.5) * 0.4
    tensors = [t.requires_grad_() for t in (value, reference_points, offsets, logits)]

    def function(value, reference_points, offsets, logits):
        return m2f_kernels.ms_deform_attn_fused(
            value, spatial_shapes, level_start_index, reference_points, offsets, logits, backend="cpu"
        )

    assert torch.autograd.gradcheck(function, tensors)

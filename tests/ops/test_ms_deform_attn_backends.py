"""ms_deform_attn: every backend against the float64 reference, forward and all gradients (DESIGN.md 2.1, 3).

Inputs include samples on the image borders, exactly on pixel centres (levels whose sizes are powers of two, so
the coordinates are exact in every dtype), outside [0, 1] and NaN (zero contribution, zero gradient).
"""

import itertools
import math

import pytest
import torch
from kernel_backends import cpu_kernel_backends

import m2f_kernels
from m2f_kernels import reference

# Level sets (H, W): non-square levels, power-of-two levels (exact pixel centres) and odd sizes.
LEVELS = {
    1: [(4, 8)],
    3: [(8, 4), (5, 7), (2, 2)],
    4: [(8, 8), (3, 5), (4, 2), (1, 1)],
}
HEADS_CHANNELS = [(8, 32), (4, 16), (1, 64)]
QUERIES = 5  # != S for every level set
FLOAT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def level_tables(levels, device="cpu"):
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cumsum(sizes, 0) - sizes


def special_locations(height: int, width: int) -> list[tuple[float, float]]:
    """Border, outside, NaN and (for power-of-two sizes) exact pixel-centre and x = -1 locations."""
    points = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.5), (-0.3, 0.5), (0.5, 1.25), (float("nan"), 0.5)]
    if width and height and width & (width - 1) == 0 and height & (height - 1) == 0:
        points += [(0.5 / width, 0.5 / height), ((width - 0.5) / width, 1.5 / height), (-0.5 / width, 0.5)]
    return points


def make_locations(batch, queries, heads, levels, points, dtype, device="cpu"):
    """(N, Q, M, L, P, 2): uniform in [-0.2, 1.2]^2 with the special locations of each level written first."""
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, dtype=torch.float64) * 1.4 - 0.2
    for level, (height, width) in enumerate(levels):
        per_level = locations[:, :, :, level].reshape(batch, -1, 2)
        special = torch.tensor(special_locations(height, width), dtype=torch.float64)
        count = min(len(special), per_level.shape[1])
        per_level[:, :count] = special[:count]
        locations[:, :, :, level] = per_level.reshape(batch, queries, heads, points, 2)
    return locations.to(device=device, dtype=dtype)


def make_inputs(batch, queries, heads, channels, levels, points, dtype, device="cpu"):
    spatial_shapes, level_start_index = level_tables(levels, device)
    num_values = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, num_values, heads, channels, dtype=dtype, device=device)
    locations = make_locations(batch, queries, heads, levels, points, dtype, device)
    weights = torch.rand(batch, queries, heads, len(levels), points, dtype=dtype, device=device)
    return value, spatial_shapes, level_start_index, locations, weights


def forward_backward(function, tensors, grad_output, dtype=None):
    """function(*tensors) and its gradients w.r.t. every floating tensor, optionally computed in ``dtype``."""
    leaves = [
        t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t for t in tensors
    ]
    out = function(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_output.to(out.dtype))
    return (out, *grads)


def assert_matches_reference(actual, expected64, torch_low_precision, dtype):
    """Each result of a backend against the float64 reference on the same inputs.

    float32/float64: max error <= tol * (1 + max |expected|). float16/bfloat16: max error <= 2 * (the error of
    the reference run in that dtype) + one ulp of the largest value (flash-attention's rule).
    """
    names = ["output", *[f"gradient {i}" for i in range(len(expected64) - 1)]]
    for name, ours, exact, lowp in zip(names, actual, expected64, torch_low_precision):
        assert ours.dtype == dtype, name
        assert ours.shape == exact.shape, name
        assert torch.isfinite(ours).all(), f"{name} has non-finite entries"
        error = (ours.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        if dtype in FLOAT_TOL:
            bound = FLOAT_TOL[dtype] * (1 + scale)
        else:
            bound = 2 * (lowp.double() - exact).abs().max().item() + torch.finfo(dtype).eps * scale
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def check_against_reference(backend, batch, heads, channels, levels, points, dtype, device="cpu"):
    inputs = make_inputs(batch, QUERIES, heads, channels, levels, points, dtype, device)
    grad_output = torch.randn(batch, QUERIES, heads * channels, dtype=dtype, device=device)
    ours = forward_backward(lambda *t: m2f_kernels.ms_deform_attn(*t, backend=backend), inputs, grad_output)
    exact = forward_backward(reference.ms_deform_attn, inputs, grad_output, torch.float64)
    lowp = (
        forward_backward(reference.ms_deform_attn, inputs, grad_output) if dtype in LOW_PRECISION else exact
    )
    assert_matches_reference(ours, exact, lowp, dtype)


FULL_GRID = list(itertools.product([1, 3], sorted(LEVELS), [1, 4, 8], HEADS_CHANNELS))
# The Triton interpreter is slow: every level count, point count and head shape once, both batch sizes.
SMALL_GRID = [(1, 1, 4, (8, 32)), (3, 3, 1, (4, 16)), (1, 4, 8, (1, 64)), (3, 3, 4, (1, 64))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", FULL_GRID)
def test_cpu_kernel_matches_reference(batch, num_levels, points, heads_channels, dtype):
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    heads, channels = heads_channels
    check_against_reference("cpu", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 5, 13])
def test_cpu_kernel_takes_any_channel_count(channels, dtype):
    """Channel counts that are not a multiple of the backward's 8 lanes: the channels past the last whole
    group of lanes are summed and scattered one at a time."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    check_against_reference("cpu", 2, 3, channels, LEVELS[3], 4, dtype)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", SMALL_GRID)
def test_cpu_kernel_lower_instruction_sets_match_reference(
    monkeypatch, isa, batch, num_levels, points, heads_channels, dtype
):
    """The loops compiled for x86-64-v3 (AVX2) and baseline x86-64 (see M2F_KERNELS_CPU_ISA)."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    heads, channels = heads_channels
    check_against_reference("cpu", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", SMALL_GRID)
def test_triton_interpreter_matches_reference(batch, num_levels, points, heads_channels, dtype):
    if "triton" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("Triton runs on CPU only with TRITON_INTERPRET=1")
    heads, channels = heads_channels
    check_against_reference("triton", batch, heads, channels, LEVELS[num_levels], points, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, num_levels, points, heads_channels", FULL_GRID)
def test_cuda_backends_match_reference(backend, batch, num_levels, points, heads_channels, dtype):
    heads, channels = heads_channels
    check_against_reference(backend, batch, heads, channels, LEVELS[num_levels], points, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# Odd channel counts and offsets exercise every vector width, idle lanes and the multi-chunk loop.
@pytest.mark.parametrize("heads, channels", [(2, 5), (3, 6), (2, 24), (1, 96), (2, 264)])
def test_cuda_channel_layouts(backend, deterministic, dtype, heads, channels):
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference(backend, 2, heads, channels, LEVELS[3], 4, dtype, "cuda")
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_kernel_with_misaligned_value(dtype):
    """A contiguous value whose data pointer is not 16-byte aligned (the kernel falls back to narrow loads)."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, 7, 4, 32, LEVELS[3], 4, dtype
    )
    storage = torch.empty(value.numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(value.shape)
    shifted.copy_(value)
    args = [t.cuda() for t in (spatial_shapes, level_start_index, locations, weights)]
    out = torch.ops.m2f_kernels._ms_deform_attn_forward(shifted, *args)
    expected = reference.ms_deform_attn(
        value.double(), spatial_shapes, level_start_index, *[t.double() for t in (locations, weights)]
    )
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernel must run on the tensors' device."""
    with torch.cuda.device(0):
        check_against_reference(backend, 2, 4, 16, LEVELS[3], 4, torch.float32, "cuda:1")


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_offsets_beyond_int32(backend):
    """value with more than 2^31 elements: samples on the last level read and write past the int32 range.

    Level 0 (8192 x 4100, D = 64) is never sampled (its locations are NaN), so the result equals the
    reference on level 1 alone.
    """
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    levels = [(8192, 4100), (8, 8)]
    spatial_shapes, level_start_index = level_tables(levels, "cuda")
    start = int(level_start_index[1])
    value = torch.zeros(1, start + 64, 1, 64, dtype=torch.float16, device="cuda")
    assert value.numel() > 2**31
    small_value = torch.randn(1, 64, 1, 64, dtype=torch.float16, device="cuda")
    value[:, start:] = small_value
    locations = make_locations(1, 6, 1, [(8, 8)], 4, torch.float16, "cuda").repeat(1, 1, 1, 2, 1, 1)
    locations[:, :, :, 0] = float("nan")
    weights = torch.rand(1, 6, 1, 2, 4, dtype=torch.float16, device="cuda")
    grad_output = torch.randn(1, 6, 64, dtype=torch.float16, device="cuda")
    value.requires_grad_()
    out = m2f_kernels.ms_deform_attn(
        value, spatial_shapes, level_start_index, locations, weights, backend=backend
    )
    (grad_value,) = torch.autograd.grad(out, value, grad_output)
    small_tables = level_tables([(8, 8)], "cuda")
    small = forward_backward(
        reference.ms_deform_attn,
        (small_value, *small_tables, locations[:, :, :, 1:], weights[:, :, :, 1:]),
        grad_output,
        torch.float64,
    )
    torch.testing.assert_close(out.double(), small[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad_value[:, start:].double(), small[1], atol=1e-2, rtol=1e-2)
    assert grad_value[:, :start].abs().max().item() == 0


def deterministic_gradients(backend, device):
    """Two backward passes (run under the deterministic_algorithms fixture) on inputs where many samples share
    the same value rows (so atomic accumulation order would matter)."""
    levels = [(4, 4), (2, 2)]
    value, spatial_shapes, level_start_index, _, weights = make_inputs(2, 24, 2, 8, levels, 4, torch.float32)
    locations = torch.rand(2, 24, 2, 2, 4, 2, dtype=torch.float32) * 0.3 + 0.35  # crowded in the centre
    inputs = [t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights)]
    grad_output = torch.randn(2, 24, 16, device=device)
    runs = [
        forward_backward(lambda *t: m2f_kernels.ms_deform_attn(*t, backend=backend), inputs, grad_output)
        for _ in range(2)
    ]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_mode_is_bitwise_reproducible(backend, deterministic_algorithms):
    if backend not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip(f"{backend} does not run on CPU here")
    deterministic_gradients(backend, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 4, 5, 9])
def test_cpu_gradients_do_not_depend_on_where_the_buffers_lie(dtype, channels):
    """On AVX-512 the float64 gradients at 4 or 5 channels changed in the last bits from call to call: GCC
    chose between a vector and a scalar version of the channel tail (one fused the multiply-add, the other
    not) by where the gradient buffers lay. value is given at several storage offsets."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, 33, 1, channels, [(1, 7), (6, 1)], 4, dtype
    )
    grad_output = torch.randn(2, 33, channels, dtype=dtype)
    runs = []
    for offset in range(8):
        storage = torch.zeros(value.numel() + 8, dtype=dtype)
        shifted = storage[offset : offset + value.numel()].view(value.shape).copy_(value)
        inputs = [shifted, spatial_shapes, level_start_index, locations, weights]
        runs.append(
            forward_backward(lambda *t: m2f_kernels.ms_deform_attn(*t, backend="cpu"), inputs, grad_output)
        )
    for run in runs[1:]:
        for first, other in zip(runs[0], run):
            assert torch.equal(first, other)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_deterministic_mode_is_bitwise_reproducible(backend, deterministic_algorithms):
    deterministic_gradients(backend, "cuda")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_empty_queries(backend):
    """Q = 0 through the public API: empty output and zero gradients."""
    if backend not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip(f"{backend} does not run on CPU here")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, 0, 2, 8, LEVELS[3], 4, torch.float32
    )
    value.requires_grad_()
    out = m2f_kernels.ms_deform_attn(
        value, spatial_shapes, level_start_index, locations, weights, backend=backend
    )
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy divides by an empty width
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("fused", [False, True], ids=["ms_deform_attn", "fused"])
def test_empty_level_contributes_nothing(backend, fused):
    """A level of height or width 0 has no pixel to sample: the result and the gradients equal those of the
    same call without that level (its samples and weights dropped)."""
    if backend != "torch" and backend not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip(f"{backend} does not run on CPU here")
    levels = [(3, 4), (0, 5), (2, 3), (4, 0)]
    kept = [0, 2]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, QUERIES, 2, 4, levels, 3, torch.float64
    )
    if fused:
        references = torch.rand(2, QUERIES, len(levels), 2, dtype=torch.float64)
        offsets = torch.randn(*locations.shape, dtype=torch.float64)
        logits = torch.randn(2, QUERIES, 2, len(levels) * 3, dtype=torch.float64)
        logits[:, :, :, 3:6] = -torch.inf  # the fused softmax runs over every level: empty ones get no weight
        logits[:, :, :, 9:12] = -torch.inf
        call = m2f_kernels.ms_deform_attn_fused
        full = (value, spatial_shapes, level_start_index, references, offsets, logits)
        kept_logits = logits.reshape(2, QUERIES, 2, len(levels), 3)[:, :, :, kept].reshape(2, QUERIES, 2, -1)
        without = (references[:, :, kept], offsets[:, :, :, kept], kept_logits)
    else:
        call = m2f_kernels.ms_deform_attn
        full = (value, spatial_shapes, level_start_index, locations, weights)
        without = (locations[:, :, :, kept], weights[:, :, :, kept])
    kept_shapes, kept_starts = level_tables([levels[i] for i in kept])
    grad_output = torch.randn(2, QUERIES, 8, dtype=torch.float64)
    ours = forward_backward(lambda *t: call(*t, backend=backend), full, grad_output)
    expected = forward_backward(
        lambda *t: call(*t, backend="torch"), (value, kept_shapes, kept_starts, *without), grad_output
    )
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])  # the value gradient
    if not fused:  # location and weight gradients: those of the kept levels, zero for the empty ones
        for grad, kept_grad in zip(ours[2:], expected[2:]):
            torch.testing.assert_close(grad[:, :, :, kept], kept_grad)
            assert not grad[:, :, :, [1, 3]].any()


def test_cpu_kernel_gradcheck():
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    levels = [(3, 4), (2, 3)]
    value, spatial_shapes, level_start_index, _, weights = make_inputs(2, 3, 2, 4, levels, 2, torch.float64)
    # Inside the image and away from the cell edges, where the bilinear map is smooth.
    locations = (torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()

    def function(value, locations, weights):
        return m2f_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, backend="cpu"
        )

    assert torch.autograd.gradcheck(function, (value, locations, weights))


def test_hand_computed_sample():
    """One sample between four pixels of a 2 x 2 image: a weighted bilinear mix computed by hand."""
    backends = cpu_kernel_backends("ms_deform_attn")
    if not backends:
        pytest.skip("no kernel backend runs on CPU here")
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    value = image.reshape(1, 4, 1, 1)
    spatial_shapes, level_start_index = level_tables([(2, 2)])
    # x = 0.625 * 2 - 0.5 = 0.75, y = 0.375 * 2 - 0.5 = 0.25
    locations = torch.tensor([0.625, 0.375]).reshape(1, 1, 1, 1, 1, 2)
    weights = torch.tensor([0.5]).reshape(1, 1, 1, 1, 1)
    # The image is 1 + x + 2y, so its bilinear interpolation is exact: 1 + 0.75 + 0.5 = 2.25.
    expected = 0.5 * 2.25
    for backend in backends:
        out = m2f_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, backend=backend
        )
        torch.testing.assert_close(out.reshape(()), torch.tensor(expected))


def test_cpu_kernel_rejects_inconsistent_shapes():
    """The C++ entry points check shapes themselves (for C++ callers that skip the Python checks)."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        1, 3, 2, 4, LEVELS[3], 2, torch.float32
    )
    forward = torch.ops.m2f_kernels._ms_deform_attn_forward
    with pytest.raises(RuntimeError, match="one entry per level"):
        forward(
            value,
            spatial_shapes,
            level_start_index,
            locations[:, :, :, :2].contiguous(),
            weights[:, :, :, :2].contiguous(),
        )
    with pytest.raises(RuntimeError, match="head count"):
        forward(value[:, :, :1].contiguous(), spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.m2f_kernels._ms_deform_attn_backward(
            torch.zeros(1, 3, 4), value, spatial_shapes, level_start_index, locations, weights, False
        )


def test_cpu_kernels_without_samples_per_head():
    """P = 0 at the C++ entry points (which C++ callers reach without the Python checks): zero outputs."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU kernel is not built")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, 3, 2, 4, LEVELS[3], 0, torch.float32
    )
    out = torch.ops.m2f_kernels._ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, locations, weights
    )
    assert torch.equal(out, torch.zeros(2, 3, 8))
    grads = torch.ops.m2f_kernels._ms_deform_attn_backward(
        torch.ones(2, 3, 8), value, spatial_shapes, level_start_index, locations, weights, False
    )
    assert torch.equal(grads[0], torch.zeros_like(value))
    reference_points = torch.rand(2, 3, 3, 2)
    offsets = torch.zeros(2, 3, 2, 3, 0, 2)
    logits = torch.zeros(2, 3, 2, 0)
    fused = torch.ops.m2f_kernels._ms_deform_attn_fused_forward(
        value, spatial_shapes, level_start_index, reference_points, offsets, logits
    )
    assert torch.equal(fused, torch.zeros(2, 3, 8))


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_several_query_blocks_per_batch_and_head(deterministic):
    """37 queries (three blocks of 16), two images and three heads: every program of the kernels' 1-D grid
    must find its (image, head, query block), forward and both backward paths."""
    if "triton" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("Triton runs on CPU only with TRITON_INTERPRET=1")
    from m2f_kernels.triton import ms_deform_attn as triton_kernels

    batch, queries, heads, channels = 2, 37, 3, 8
    inputs = make_inputs(batch, queries, heads, channels, LEVELS[3], 2, torch.float32)
    grad_output = torch.randn(batch, queries, heads * channels)
    out = triton_kernels.ms_deform_attn_forward(*inputs)
    grad_value, grad_locations, grad_weights = triton_kernels.ms_deform_attn_backward(
        grad_output, *inputs, deterministic
    )
    exact = forward_backward(reference.ms_deform_attn, inputs, grad_output, torch.float64)
    ours = (out, grad_value, grad_locations, grad_weights)
    assert_matches_reference(ours, exact, exact, torch.float32)


@pytest.mark.parametrize("fused", [False, True], ids=["ms_deform_attn", "fused"])
@pytest.mark.parametrize(
    ("shapes", "starts", "message"),
    [
        ([[4, 4]], [0], "reaches past value's 4 rows"),
        ([[2000, 2000]], [0], "reaches past value's 4 rows"),
        ([[1, 2], [1, 2]], [0, 3], "level 1"),
        ([[1, 2], [1, 2]], [-1, 2], "level 0"),
        ([[-2, -2]], [0], "non-negative"),
    ],
)
def test_cpu_kernel_refuses_a_level_table_outside_value(fused, shapes, starts, message):
    """The C++ kernel checks the level table itself (a direct call of the kernel op has no Python checks): a
    level that reaches past value's S rows is an error, not a read outside the tensor."""
    if "cpu" not in cpu_kernel_backends("ms_deform_attn"):
        pytest.skip("the C++ CPU library is not built")
    value = torch.ones(1, 4, 1, 2)
    spatial_shapes, level_start_index = torch.tensor(shapes), torch.tensor(starts)
    levels = len(shapes)
    if fused:
        args = (torch.rand(1, 3, levels, 2), torch.zeros(1, 3, 1, levels, 1, 2), torch.zeros(1, 3, 1, levels))
        kernel = torch.ops.m2f_kernels._ms_deform_attn_fused_forward
    else:
        args = (torch.rand(1, 3, 1, levels, 1, 2), torch.ones(1, 3, 1, levels, 1))
        kernel = torch.ops.m2f_kernels._ms_deform_attn_forward
    with pytest.raises(RuntimeError, match=message):
        kernel(value, spatial_shapes, level_start_index, *args)


def check_sample_outside(backend, device):
    """A NaN pixel leaked into the reference's samples outside the image, and the reference and Triton read
    the NaN weight of a sample outside where the C++ and CUDA kernels (and Deformable-DETR's) skip it."""
    spatial_shapes, level_start_index = level_tables([(2, 2)], device)
    value = torch.arange(1.0, 5.0, device=device).reshape(1, 4, 1, 1)
    value[0, 0] = math.nan
    # Query 0: one sample on the centre of pixel (1, 1), one outside (NaN weight); query 1: one outside only.
    locations = torch.tensor([[[0.75, 0.75], [1.7, 0.5]], [[-0.9, 0.5], [1.5, 1.5]]], device=device)
    locations = locations.reshape(1, 2, 1, 1, 2, 2).requires_grad_()
    weights = (
        torch.tensor([[0.5, math.nan], [1.0, 1.0]], device=device).reshape(1, 2, 1, 1, 2).requires_grad_()
    )
    out = m2f_kernels.ms_deform_attn(
        value, spatial_shapes, level_start_index, locations, weights, backend=backend
    )
    # 0.75 is the centre of pixel (1, 1), value 4.
    torch.testing.assert_close(out.detach().cpu(), torch.tensor([[[0.5 * 4.0], [0.0]]]))
    out.sum().backward()
    assert locations.grad.isfinite().all() and weights.grad.isfinite().all()
    assert weights.grad.flatten().tolist() == [4.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends("ms_deform_attn")])
def test_a_sample_outside_reads_neither_pixels_nor_its_weight(backend):
    check_sample_outside(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_a_sample_outside_reads_neither_pixels_nor_its_weight(backend):
    check_sample_outside(backend, "cuda")

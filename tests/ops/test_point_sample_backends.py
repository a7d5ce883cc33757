"""point_sample: every backend against the float64 reference, values and gradients (DESIGN.md 2.3)."""

import pytest
import torch
from kernel_backends import cpu_kernel_backends

import m2f_kernels
from m2f_kernels import reference
from m2f_kernels.ops.point_sample import KERNELS

CPU_KERNEL_BACKENDS = cpu_kernel_backends("point_sample")
CUDA_BACKENDS = ["cuda", "triton"]

# (dtype, atol, rtol) of a backend against the float64 reference evaluated on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
SHAPES = [(2, 3, 7, 5), (1, 1, 1, 1), (3, 2, 4, 9)]


def make_coords(batch, num_points, dtype, device="cpu"):
    """Uniform points in [-0.2, 1.2]^2 (some outside), with the borders 0 and 1 and the centre when P allows."""
    coords = torch.rand(batch, num_points, 2, dtype=torch.float64) * 1.4 - 0.2
    special = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.3], [-0.5, 0.5]])
    count = min(num_points, len(special))
    coords[:, :count] = special[:count].to(torch.float64)
    return coords.to(device=device, dtype=dtype)


def reference_forward_backward(image, coords, grad_output):
    image64 = image.detach().double().requires_grad_()
    coords64 = coords.detach().double().requires_grad_()
    out = reference.point_sample(image64, coords64)
    grad_image, grad_coords = torch.autograd.grad(out, (image64, coords64), grad_output.double())
    return out, grad_image, grad_coords


def summed_magnitude(image, coords, grad_output):
    """Per pixel, the sum of |contribution| that its image gradient adds up (float64): the scale of the
    rounding error of any summation order, which grows with the number of points landing on the pixel."""
    _, magnitude, _ = reference_forward_backward(image, coords, grad_output.abs())
    return magnitude


def touching_magnitude(image, coords, grad_output):
    """Per pixel, the sum of |grad_output| over the points whose four corners include it (float64): a
    position that moves by d pixels moves each corner's weight, so its share of that sum, by up to 2 d."""
    batch, channels, height, width = image.shape
    padded = torch.zeros(
        batch, channels, (height + 4) * (width + 4), dtype=torch.float64, device=image.device
    )
    for index in corner_indices(image, coords):
        padded.scatter_add_(2, index, grad_output.double().abs())
    return padded.view(batch, channels, height + 4, width + 4)[..., 2:-2, 2:-2]


def assert_close_to_sum(actual, expected, magnitude, atol, rtol, moved=0.0):
    """|actual - expected| <= atol + rtol * magnitude + moved elementwise (magnitude >= |expected| by the
    triangle inequality, so this is assert_close's bound with the sum's scale in place of its value; moved:
    what the rounding of the positions may add)."""
    bound = atol + rtol * magnitude + moved
    error = (actual.double() - expected).abs()
    assert (error <= bound).all(), (
        f"max error {error.max().item():.3g}, worst error/bound {(error / bound).max():.3g}"
    )


def corner_indices(image, coords):
    """The four pixels around each point, (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1), as indices
    (B, C, P) into the image padded by 2 on each side and flattened."""
    channels, height, width = image.shape[1:]
    pixel = coords.double() * torch.tensor([width, height], dtype=torch.float64, device=coords.device) - 0.5
    x0 = pixel[..., 0].floor().clamp(-2, width).long() + 2
    y0 = pixel[..., 1].floor().clamp(-2, height).long() + 2
    return [
        ((y0 + dy) * (width + 4) + x0 + dx)[:, None, :].expand(-1, channels, -1)
        for dy in (0, 1)
        for dx in (0, 1)
    ]


def corners(image, coords):
    """The four pixels around each point, v00, v01, v10, v11 (v_yx, zeros outside the image), each
    (B, C, P) float64."""
    padded = torch.nn.functional.pad(image.double(), (2, 2, 2, 2)).flatten(2)
    return tuple(padded.gather(2, index) for index in corner_indices(image, coords))


def position_error(image, coords):
    """Pixels by which a kernel's position x * W - 0.5 may differ from the float64 reference's: a few units
    in the last place of float32 (of float64 for float64 coords), whatever the image's dtype."""
    precision = torch.float64 if coords.dtype == torch.float64 else torch.float32
    return 4 * torch.finfo(precision).eps * 1.5 * max(image.shape[-2:])


def assert_within(name, actual, expected, bound):
    error = (actual.double() - expected).abs()
    assert (error <= bound).all(), (
        f"{name}: max error {error.max():.3g}, worst error/bound {(error / bound).max():.3g}"
    )


def check_backend(backend, dtype, shape, num_points, device, coords_dtype=None):
    """coords_dtype: float32 coords for a float16 / bfloat16 image (default: the image's dtype).

    Besides the dtype's tolerance, the output may move by the position's rounding (position_error) times
    the slope between the corners, the image gradient by twice that rounding times the gradients of the
    points around each pixel (touching_magnitude), and the coords gradient by that rounding times the rate at
    which one coordinate's gradient changes with the other (H or W times v00 - v01 - v10 + v11 per
    channel)."""
    batch, channels, height, width = shape
    image = torch.randn(shape, dtype=dtype, device=device)
    coords = make_coords(batch, num_points, coords_dtype or dtype, device)
    grad_output = torch.randn(batch, channels, num_points, dtype=dtype, device=device)
    out = KERNELS.get(backend, image.device, "forward")(image, coords)
    grad_image, grad_coords = KERNELS.get(backend, image.device, "backward")(
        grad_output, image, coords, False
    )
    ref_out, ref_grad_image, ref_grad_coords = reference_forward_backward(image, coords, grad_output)
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype and grad_image.dtype == dtype and grad_coords.dtype == coords.dtype
    v00, v01, v10, v11 = corners(image, coords)
    delta = position_error(image, coords)
    slope = (v01 - v00).abs() + (v11 - v10).abs() + (v10 - v00).abs() + (v11 - v01).abs()
    assert_within("output", out, ref_out, atol + rtol * ref_out.abs() + delta * slope)
    magnitude = summed_magnitude(image, coords, grad_output)
    moved = 2 * delta * touching_magnitude(image, coords, grad_output)
    assert_close_to_sum(grad_image, ref_grad_image, magnitude, atol, rtol, moved)
    # d/dcoord scales with the image size; its low-precision error with the corner values' rounding too.
    scale = max(height, width)
    mixed = (grad_output.double().abs() * (v00 - v01 - v10 + v11).abs()).sum(1)  # (B, P)
    size = torch.tensor([width, height], dtype=torch.float64, device=device)
    bound = atol * scale + rtol * scale * ref_grad_coords.abs() + delta * mixed[..., None] * size
    assert_within("grad_coords", grad_coords, ref_grad_coords, bound)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_points", [1, 100])
def test_cpu_backends_match_reference(backend, dtype, shape, num_points):
    check_backend(backend, dtype, shape, num_points, "cpu")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_half_images_with_float32_coords_match_reference(backend, dtype, shape):
    check_backend(backend, dtype, shape, 100, "cpu", coords_dtype=torch.float32)


def step_edge_samples(dtype, device="cpu"):
    """A 1024-pixel row of ones up to pixel 700 and zeros after it, and 25 points within 3 pixels of the edge
    (float64 coords) with the float64 reference samples."""
    image = torch.zeros(1, 1, 1, 1024, dtype=dtype, device=device)
    image[..., :700] = 1
    x = (700 + torch.linspace(-3, 3, 25, dtype=torch.float64)) / 1024
    coords = torch.stack([x, torch.full_like(x, 0.5)], dim=-1)[None].to(device)
    return image, coords, reference.point_sample(image.double(), coords)


@pytest.mark.parametrize("backend", ["auto", *CPU_KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_coords_keep_the_points_of_a_half_image_in_place(backend, dtype):
    """At the edge the samples are exact up to the output's rounding with float32 coords; the same points
    rounded to the image's dtype move by up to 2 pixels (bfloat16) and sample the wrong side."""
    image, coords, expected = step_edge_samples(dtype)
    got = m2f_kernels.point_sample(image, coords.float(), backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=4e-3, rtol=0)
    rounded = m2f_kernels.point_sample(image, coords.to(dtype), backend=backend)
    assert (rounded.double() - expected).abs().max() > 0.1


def test_autocast_casts_the_image_and_keeps_float32_coords():
    image, coords, expected = step_edge_samples(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m2f_kernels.point_sample(image, coords.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, atol=4e-3, rtol=0)


def test_autocast_to_another_half_dtype_takes_coords_of_the_inputs_dtype():
    """float16 image and coords under bfloat16 autocast: the image is cast, the coords become float32."""
    image, coords, _ = step_edge_samples(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m2f_kernels.point_sample(image, coords.half())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.double(), reference.point_sample(image.double(), coords.half().double()), atol=4e-3, rtol=0
    )


def test_coords_of_another_dtype_are_refused():
    with pytest.raises(TypeError, match=r"coords must be float32 or have input's dtype \(torch.float16\)"):
        m2f_kernels.point_sample(
            torch.zeros(1, 1, 2, 2, dtype=torch.float16), torch.zeros(1, 3, 2, dtype=torch.bfloat16)
        )
    with pytest.raises(TypeError, match="coords must be float32"):
        m2f_kernels.point_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 2, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_float32_coords_keep_the_points_of_a_half_image_in_place(backend, dtype):
    image, coords, expected = step_edge_samples(dtype, "cuda")
    got = m2f_kernels.point_sample(image, coords.float(), backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=4e-3, rtol=0)
    check_backend(backend, dtype, (4, 8, 64, 48), 12544, "cuda", coords_dtype=torch.float32)


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_points", [100, 1000])
def test_cpu_kernel_lower_instruction_sets_match_reference(monkeypatch, isa, dtype, num_points):
    """The forward loop compiled for x86-64-v3 (AVX2) and baseline x86-64 (see M2F_KERNELS_CPU_ISA)."""
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    check_backend("cpu", dtype, (3, 2, 40, 33), num_points, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SHAPES, (4, 8, 64, 48)])
@pytest.mark.parametrize("num_points", [1, 100, 12544])
def test_cuda_backends_match_reference(backend, dtype, shape, num_points):
    check_backend(backend, dtype, shape, num_points, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_float64_and_nan_or_far_points(backend):
    """float64 GPU inputs, which auto sends to the CUDA kernels; NaN and far points sample zero."""
    check_backend(backend, torch.float64, (2, 3, 7, 5), 100, "cuda")
    image = torch.randn(1, 2, 5, 6, dtype=torch.float64, device="cuda")
    coords = torch.tensor(
        [[[float("nan"), 0.5], [0.5, float("nan")], [3.0, 0.5], [0.5, -2.0]]], device="cuda"
    )
    out = KERNELS.get(backend, image.device, "forward")(image, coords.double())
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_nan_and_far_points_sample_zero_with_zero_gradient(backend):
    image = torch.randn(1, 2, 5, 6, dtype=torch.float32)
    coords = torch.tensor([[[float("nan"), 0.5], [0.5, float("nan")], [3.0, 0.5], [0.5, -2.0]]])
    out = KERNELS.get(backend, image.device, "forward")(image, coords)
    grad_image, grad_coords = KERNELS.get(backend, image.device, "backward")(
        torch.ones_like(out), image, coords, False
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grad_image, torch.zeros_like(grad_image))
    assert torch.equal(grad_coords, torch.zeros_like(grad_coords))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_public_op_gradients_match_reference(backend):
    image = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    coords = make_coords(2, 40, torch.float64).requires_grad_()
    out = m2f_kernels.point_sample(image, coords, backend=backend)
    grad_output = torch.randn_like(out)
    grads = torch.autograd.grad(out, (image, coords), grad_output)
    ref_out, *ref_grads = reference_forward_backward(image, coords, grad_output)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
def test_cpu_kernel_gradcheck_float64():
    image = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    # Points away from cell edges, where the bilinear map is smooth.
    coords = ((torch.randint(0, 4, (2, 9, 2)) + 0.2 + 0.6 * torch.rand(2, 9, 2)) / 4).double()
    coords.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, c: m2f_kernels.point_sample(i, c, backend="cpu"), (image, coords), atol=1e-8
    )


def deterministic_backward_twice(backend, device):
    image = torch.randn(2, 3, 9, 7, dtype=torch.float32, device=device)
    # Many points in few cells, so that the scatter has collisions.
    coords = torch.rand(2, 3000, 2, device=device) * 0.3 + 0.3
    grad_output = torch.randn(2, 3, 3000, device=device)
    backward = KERNELS.get(backend, image.device, "backward")
    first = backward(grad_output, image, coords, True)
    second = backward(grad_output, image, coords, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = reference_forward_backward(image, coords, grad_output)
    torch.testing.assert_close(first[0].double(), ref[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(backend, deterministic_algorithms):
    deterministic_backward_twice(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible_cuda(backend, deterministic_algorithms):
    deterministic_backward_twice(backend, "cuda")


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
def test_cpu_kernel_accepts_float32_coords_for_low_precision_input():
    image = torch.randn(2, 1, 300, 200, dtype=torch.bfloat16)
    coords = torch.rand(2, 50, 2)
    out = KERNELS.get("cpu", image.device, "forward")(image, coords)
    ref = reference.point_sample(image.double(), coords.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_cpu_kernel_samples_zeros_from_an_empty_plane(size):
    """The C++ entry point, which C++ callers reach without the Python op's handling of empty maps: the
    vectorized path (a point count of several lanes) read outside the empty plane and crashed."""
    image = torch.empty(2, 3, *size)
    out = torch.ops.m2f_kernels._point_sample_forward(image, torch.rand(2, 40, 2))
    assert torch.equal(out, torch.zeros(2, 3, 40))


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_deterministic_backward_without_the_global_flag():
    assert not torch.are_deterministic_algorithms_enabled()
    deterministic_backward_twice("triton", "cpu")


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_add_pairs_in_order_is_the_sequential_sum_in_pair_order():
    from m2f_kernels.triton.point_sample import add_pairs_in_order

    planes, plane_size, pairs = 3, 5, 400
    index = torch.randint(-1, plane_size, (planes, pairs))
    index[1] = -1  # a plane with nothing to add
    index[2, :300] = 4  # one position with many duplicates
    values = torch.randn(planes, pairs) * torch.logspace(-4, 4, pairs)  # order-sensitive magnitudes
    grad_planes = torch.randn(planes, plane_size)
    expected = grad_planes.clone()
    sums = torch.zeros(planes, plane_size)
    for plane in range(planes):
        for pair in range(pairs):
            position = index[plane, pair].item()
            if position >= 0:
                sums[plane, position] += values[plane, pair]
    expected += sums
    add_pairs_in_order(grad_planes, index, values)
    assert torch.equal(grad_planes, expected)


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_several_point_blocks_per_image(deterministic):
    """600 points (three blocks of 256) in each of three images: every program of the kernels' 1-D grid must
    find its (image, point block)."""
    image = torch.randn(3, 2, 6, 7)
    coords = make_coords(3, 600, torch.float32)
    grad_output = torch.randn(3, 2, 600)
    out = KERNELS.get("triton", image.device, "forward")(image, coords)
    grad_image, grad_coords = KERNELS.get("triton", image.device, "backward")(
        grad_output, image, coords, deterministic
    )
    ref_out, ref_grad_image, ref_grad_coords = reference_forward_backward(image, coords, grad_output)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_image.double(), ref_grad_image, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_coords.double(), ref_grad_coords, atol=7 * atol, rtol=7 * rtol)

"""point_mask_loss: every backend against the float64 reference, per-mask values and gradients (DESIGN.md 2.3)."""

import pytest
import torch
from kernel_backends import cpu_kernel_backends

import m2f_kernels
from m2f_kernels import reference
from m2f_kernels.ops.point_mask_loss import KERNELS

CPU_KERNEL_BACKENDS = cpu_kernel_backends("point_mask_loss")
CUDA_BACKENDS = ["cuda", "triton"]

# (atol, rtol) for the per-mask losses and for the logit gradients, against the float64 reference on the same
# (rounded) inputs. Low-precision inputs are sampled in float32, so only the input rounding differs.
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 1e-4),
}
# (logits H, W), (targets Ht, Wt)
MASK_SIZES = [((7, 5), (13, 17)), ((1, 1), (1, 1)), ((4, 9), (4, 9)), ((6, 6), (1, 3))]


def make_inputs(num_masks, logit_size, target_size, num_points, dtype, target_kind, device="cpu", grid=None):
    """grid: coords rounded to multiples of 1 / grid (a power of two), whose positions x * W - 0.5 are then
    exact in float32 for planes of up to 2^24 / (1.3 grid) pixels a side."""
    logits = (torch.randn(num_masks, *logit_size, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    binary = torch.rand(num_masks, *target_size) > 0.5
    targets = {
        "uint8": binary.to(torch.uint8),
        "bool": binary,
        "float": torch.rand(num_masks, *target_size, dtype=torch.float64).to(dtype),
        "float32": torch.rand(num_masks, *target_size, dtype=torch.float64).float(),
    }[target_kind].to(device)
    coords = torch.rand(num_masks, num_points, 2, dtype=torch.float64) * 1.3 - 0.15
    special = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [-0.5, 0.5]], dtype=torch.float64)
    count = min(num_points, len(special))
    coords[:, :count] = special[:count]
    if grid is not None:
        coords = (coords * grid).round() / grid
    return logits, targets, coords.to(device=device, dtype=dtype)


def reference_per_mask(logits, targets, coords, grad_ce, grad_dice):
    logits64 = logits.detach().double().requires_grad_()
    targets64 = targets.double() if targets.dtype.is_floating_point else targets
    ce, dice, sums = reference.point_mask_loss_per_mask(logits64, targets64, coords.double())
    (grad,) = torch.autograd.grad((ce * grad_ce.double()).sum() + (dice * grad_dice.double()).sum(), logits64)
    return ce, dice, sums, grad


def kernel_target(targets):
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def check_backend(
    backend, dtype, logit_size, target_size, num_points, target_kind, device, deterministic=False, grid=None
):
    """The tolerances leave out the rounding of the sampling positions, which grows with the planes: below
    them on the small planes here, and removed by `grid` (see make_inputs) on large ones."""
    num_masks = 3
    logits, targets, coords = make_inputs(
        num_masks, logit_size, target_size, num_points, dtype, target_kind, device, grid
    )
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_ce = torch.randn(num_masks, dtype=acc_dtype, device=device)
    grad_dice = torch.randn(num_masks, dtype=acc_dtype, device=device)
    ce, dice, sums = KERNELS.get(backend, logits.device, "forward")(logits, kernel_target(targets), coords)
    grad = KERNELS.get(backend, logits.device, "backward")(
        grad_ce, grad_dice, logits, kernel_target(targets), coords, sums, deterministic
    )
    ref_ce, ref_dice, ref_sums, ref_grad = reference_per_mask(logits, targets, coords, grad_ce, grad_dice)
    atol, rtol = TOLERANCES[dtype]
    assert ce.dtype == acc_dtype and dice.dtype == acc_dtype and sums.dtype == acc_dtype
    assert ce.shape == (num_masks,) and sums.shape == (num_masks, 3) and grad.dtype == dtype
    torch.testing.assert_close(ce.double(), ref_ce, atol=atol, rtol=rtol)
    torch.testing.assert_close(dice.double(), ref_dice, atol=atol, rtol=rtol)
    torch.testing.assert_close(sums.double(), ref_sums, atol=atol * num_points, rtol=rtol)
    grad_atol = (
        atol
        if dtype in (torch.float64, torch.float32)
        else {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    )
    torch.testing.assert_close(
        grad.double(), ref_grad, atol=grad_atol * ref_grad.abs().max().item(), rtol=rtol
    )


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("logit_size", "target_size"), MASK_SIZES)
@pytest.mark.parametrize("num_points", [1, 100])
def test_cpu_backends_match_reference(backend, dtype, logit_size, target_size, num_points):
    check_backend(backend, dtype, logit_size, target_size, num_points, "uint8", "cpu")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("target_kind", ["bool", "float"])
def test_cpu_backends_target_dtypes(backend, target_kind):
    check_backend(backend, torch.float32, (7, 5), (13, 17), 100, target_kind, "cpu")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backends_read_float32_soft_targets_beside_low_precision_logits(backend, dtype):
    check_backend(backend, dtype, (7, 5), (13, 17), 100, "float32", "cpu")


def check_no_points(backend, device):
    """P = 0 with the backend called directly: ce is 0 (the mean over no points, as the public op defines
    it), dice 1 - 1 / 1 = 0, the sums and the logit gradient 0; never NaN."""
    logits, targets, coords = make_inputs(3, (7, 5), (13, 17), 1, torch.float32, "uint8", device)
    coords = coords[:, :0]
    ce, dice, sums = KERNELS.get(backend, logits.device, "forward")(logits, targets, coords)
    ones = torch.ones(3, device=device)
    grad = KERNELS.get(backend, logits.device, "backward")(ones, ones, logits, targets, coords, sums, False)
    assert ce.shape == dice.shape == (3,) and sums.shape == (3, 3) and grad.shape == logits.shape
    for tensor in (ce, dice, sums, grad):
        assert torch.equal(tensor, torch.zeros_like(tensor))


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNEL_BACKENDS])
def test_cpu_backends_without_points(backend):
    check_no_points(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backends_without_points(backend):
    check_no_points(backend, "cuda")


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_mask2former_point_count(dtype):
    check_backend("cpu", dtype, (32, 24), (128, 96), 12544, "uint8", "cpu")


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_points", [1, 100, 12544])
def test_cpu_kernel_lower_instruction_sets_match_reference(monkeypatch, isa, dtype, num_points):
    """The loops compiled for x86-64-v3 (AVX2) and baseline x86-64, which have their own vector widths;
    M2F_KERNELS_CPU_ISA lowers the level the CPU would get (other CPUs always run the baseline)."""
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    check_backend("cpu", dtype, (32, 24), (128, 96), num_points, "uint8", "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("logit_size", "target_size"), [*MASK_SIZES, ((64, 48), (256, 192))])
@pytest.mark.parametrize("num_points", [1, 100, 12544])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backends_match_reference(backend, dtype, logit_size, target_size, num_points, deterministic):
    check_backend(backend, dtype, logit_size, target_size, num_points, "uint8", "cuda", deterministic)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backends_read_float32_soft_targets_beside_low_precision_logits(backend, dtype, deterministic):
    check_backend(backend, dtype, (64, 48), (256, 192), 12544, "float32", "cuda", deterministic)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_float64_and_no_masks(backend, deterministic):
    """float64 GPU inputs, which auto sends to the CUDA kernels, and an empty batch of masks."""
    check_backend(backend, torch.float64, (7, 5), (13, 17), 100, "bool", "cuda", deterministic)
    logits = torch.zeros(0, 5, 5, device="cuda", requires_grad=True)
    targets = torch.zeros(0, 8, 8, dtype=torch.uint8, device="cuda")
    ce, dice = m2f_kernels.point_mask_loss(
        logits, targets, torch.zeros(0, 10, 2, device="cuda"), 1.0, backend=backend
    )
    assert ce.item() == 0 and dice.item() == 0


def public_loss_and_grad(backend, device, dtype=torch.float64):
    logits, targets, coords = make_inputs(4, (9, 7), (20, 15), 300, dtype, "bool", device)
    logits.requires_grad_()
    ce, dice = m2f_kernels.point_mask_loss(logits, targets, coords, 2.5, backend=backend)
    (grad,) = torch.autograd.grad(5 * ce + 5 * dice, logits)
    return logits, targets, coords, ce, dice, grad


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_public_op_matches_reference(backend):
    logits, targets, coords, ce, dice, grad = public_loss_and_grad(backend, "cpu")
    logits64 = logits.detach().requires_grad_()
    ref_ce, ref_dice = reference.point_mask_loss(logits64, targets, coords, 2.5)
    (ref_grad,) = torch.autograd.grad(5 * ref_ce + 5 * ref_dice, logits64)
    torch.testing.assert_close(ce, ref_ce, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dice, ref_dice, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
def test_public_op_keeps_soft_targets_wider_than_the_logits(backend, dtype, target_dtype):
    """Soft targets of float32/float64 beside half logits lose no precision (bfloat16 would round them by up
    to 2^-9): the loss equals the float64 one on the same (rounded) logits and the exact targets."""
    logits, _, coords = make_inputs(3, (9, 7), (20, 15), 300, dtype, "bool")
    targets = torch.rand(3, 20, 15, dtype=torch.float64).to(target_dtype)
    logits.requires_grad_()
    ce, dice = m2f_kernels.point_mask_loss(logits, targets, coords, 2.0, backend=backend)
    (grad,) = torch.autograd.grad(ce + dice, logits)
    logits64 = logits.detach().double().requires_grad_()
    ref_ce, ref_dice = reference.point_mask_loss(logits64, targets.double(), coords.double(), 2.0)
    (ref_grad,) = torch.autograd.grad(ref_ce + ref_dice, logits64)
    torch.testing.assert_close(ce.double(), ref_ce, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dice.double(), ref_dice, atol=2e-6, rtol=2e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_public_op_with_no_masks(backend):
    logits = torch.zeros(0, 5, 5, requires_grad=True)
    ce, dice = m2f_kernels.point_mask_loss(
        logits, torch.zeros(0, 8, 8, dtype=torch.uint8), torch.zeros(0, 10, 2), 1.0, backend=backend
    )
    assert ce.item() == 0 and dice.item() == 0
    (ce + dice).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
def test_cpu_kernel_gradcheck_float64():
    logits = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(3, 9, 7) > 0.5).to(torch.uint8)
    coords = torch.rand(3, 50, 2, dtype=torch.float64) * 1.2 - 0.1

    def losses(x):
        return m2f_kernels.point_mask_loss(x, targets, coords, 3.0, backend="cpu")

    assert torch.autograd.gradcheck(losses, (logits,))


def deterministic_backward_twice(backend, device):
    logits, targets, coords = make_inputs(3, (6, 5), (12, 10), 4000, torch.float32, "uint8", device)
    grad_ce = torch.randn(3, device=device)
    grad_dice = torch.randn(3, device=device)
    forward = KERNELS.get(backend, logits.device, "forward")
    backward = KERNELS.get(backend, logits.device, "backward")
    _, _, sums = forward(logits, targets, coords)
    first = backward(grad_ce, grad_dice, logits, targets, coords, sums, True)
    second = backward(grad_ce, grad_dice, logits, targets, coords, sums, True)
    assert torch.equal(first, second)
    ref_grad = reference_per_mask(logits, targets, coords, grad_ce, grad_dice)[3]
    torch.testing.assert_close(first.double(), ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(backend, deterministic_algorithms):
    deterministic_backward_twice(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible_cuda(backend, deterministic_algorithms):
    deterministic_backward_twice(backend, "cuda")


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
def test_cpu_kernel_accepts_float32_coords_for_low_precision_logits():
    logits, targets, _ = make_inputs(2, (40, 30), (400, 300), 200, torch.bfloat16, "uint8")
    coords = torch.rand(2, 200, 2)
    ce, dice, sums = KERNELS.get("cpu", logits.device, "forward")(logits, targets, coords)
    ref_ce, ref_dice, ref_sums = reference.point_mask_loss_per_mask(logits.double(), targets, coords.double())
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dice.double(), ref_dice, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums.double(), ref_sums, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("empty", ["logits", "targets"])
def test_cpu_kernel_samples_zeros_from_an_empty_plane(empty):
    """The C++ entry point, which C++ callers reach without the Python op's handling of empty maps: the
    vectorized path (a point count of several lanes) read outside the empty plane and crashed."""
    logits, targets = torch.randn(2, 6, 7), torch.rand(2, 9, 8)
    if empty == "logits":
        logits = logits[:, :0]
    else:
        targets = targets[:, :, :0]
    coords = torch.rand(2, 40, 2)
    ce, dice, sums = torch.ops.m2f_kernels._point_mask_loss_forward(
        logits.contiguous(), targets.contiguous(), coords
    )
    zeros = torch.zeros(2, 1, 1)  # an empty map samples as zeros
    expected = reference.point_mask_loss_per_mask(
        zeros if empty == "logits" else logits, zeros if empty == "targets" else targets, coords
    )
    torch.testing.assert_close((ce, dice, sums), expected)


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_deterministic_backward_without_the_global_flag():
    assert not torch.are_deterministic_algorithms_enabled()
    deterministic_backward_twice("triton", "cpu")


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_forward_with_the_pinned_config(deterministic_algorithms):
    check_backend("triton", torch.float32, (7, 5), (13, 17), 700, "uint8", "cpu", deterministic=True)


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_several_point_blocks_per_mask(deterministic):
    """1,100 points: three backward blocks of 512 per mask, so every program of the backward's 1-D grid must
    find its (mask, point block)."""
    check_backend(
        "triton", torch.float32, (7, 5), (13, 17), 1100, "uint8", "cpu", deterministic=deterministic
    )


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_forward_split_on_a_gpu(monkeypatch):
    """The GPU branch of the forward's split: ranges a multiple of the largest autotuned BLOCK, about four
    programs per SM, and never shorter than one BLOCK."""
    from m2f_kernels.triton import point_mask_loss as module

    unit = max(config.kwargs["BLOCK"] for config in module._point_mask_loss_forward_kernel.configs)
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module, "multiprocessor_count", lambda device: 132)
    device = torch.device("cuda")
    assert unit in (512, 2048)  # the largest BLOCK without and with autotuning: both give the values below
    # 100 masks want ceil(528 / 100) = 6 ranges each; 12,544 / 6 = 2,090 points, rounded down to 2,048.
    assert module._points_per_split(device, 100, 12544) == 2048
    # One mask wants 528 ranges; 10,000,000 / 528 = 18,939 points, rounded down to 18,432 = 9 * 2,048.
    assert module._points_per_split(device, 1, 10_000_000) == 18432
    for masks, points in [(100, 12544), (1, 12544), (1000, 12544), (8, 1), (2, 300000), (1, 10_000_000)]:
        per_split = module._points_per_split(device, masks, points)
        assert per_split % unit == 0 and per_split >= unit
        splits = -(-points // per_split)
        assert per_split == unit or masks * splits >= 4 * 132  # longer ranges only with the GPU filled

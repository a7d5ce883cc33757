"""pairwise_mask_cost: every backend against the float64 reference (Mask2Former's matcher costs)."""

import pytest
import torch
from kernel_backends import cpu_kernel_backends

import m2f_kernels
from m2f_kernels import reference
from m2f_kernels.ops.pairwise_mask_cost import KERNELS

CPU_KERNEL_BACKENDS = cpu_kernel_backends("pairwise_mask_cost", "_pairwise_mask_cost")
CUDA_BACKENDS = ["cuda", "triton"]
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
}


def make_inputs(num_queries, num_targets, num_points, dtype, device="cpu"):
    """Logits with large magnitudes (softplus stability) and fractional labels (bilinearly sampled masks)."""
    logits = torch.randn(num_queries, num_points, dtype=torch.float64) * 8
    if num_points > 2:
        logits[:, :2] = torch.tensor([60.0, -60.0], dtype=torch.float64)
    labels = torch.rand(num_targets, num_points, dtype=torch.float64)
    labels = torch.where(labels < 0.4, 0.0, torch.where(labels > 0.8, 1.0, labels))
    return logits.to(device=device, dtype=dtype), labels.to(device=device, dtype=dtype)


def check_backend(backend, dtype, num_queries, num_targets, num_points, device, label_dtype=None):
    logits, labels = make_inputs(num_queries, num_targets, num_points, dtype, device)
    if label_dtype is not None:  # labels of another dtype, drawn in float64 and rounded to it only
        labels = make_inputs(num_queries, num_targets, num_points, torch.float64, device)[1].to(label_dtype)
    ce, dice = KERNELS.get(backend, logits.device, "pairwise_mask_cost")(logits, labels)
    ref_ce, ref_dice = reference.pairwise_mask_cost(logits.double(), labels.double())
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ce.dtype == acc_dtype and dice.dtype == acc_dtype
    assert ce.shape == (num_queries, num_targets) and dice.shape == (num_queries, num_targets)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ce.double(), ref_ce, atol=atol, rtol=rtol)
    torch.testing.assert_close(dice.double(), ref_dice, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_queries", "num_targets"), [(1, 1), (1, 5), (37, 3), (5, 40)])
@pytest.mark.parametrize("num_points", [1, 100])
def test_cpu_backends_match_reference(backend, dtype, num_queries, num_targets, num_points):
    check_backend(backend, dtype, num_queries, num_targets, num_points, "cpu")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backends_read_float32_labels_beside_low_precision_logits(backend, dtype):
    check_backend(backend, dtype, 37, 3, 100, "cpu", label_dtype=torch.float32)


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
def test_cpu_kernel_mask2former_size():
    check_backend("cpu", torch.float32, 100, 50, 12544, "cpu")


@pytest.mark.skipif("cpu" not in CPU_KERNEL_BACKENDS, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_queries", "num_targets", "num_points"), [(37, 3, 100), (5, 9, 12544)])
def test_cpu_kernel_lower_instruction_sets_match_reference(
    monkeypatch, isa, dtype, num_queries, num_targets, num_points
):
    """The loops compiled for x86-64-v3 (AVX2) and baseline x86-64 (see M2F_KERNELS_CPU_ISA)."""
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    check_backend("cpu", dtype, num_queries, num_targets, num_points, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_queries", "num_targets"), [(1, 1), (1, 5), (37, 3), (100, 50), (33, 65)])
@pytest.mark.parametrize("num_points", [1, 100, 999, 12544])
def test_cuda_backends_match_reference(backend, dtype, num_queries, num_targets, num_points):
    check_backend(backend, dtype, num_queries, num_targets, num_points, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_read_float32_labels_beside_low_precision_logits(backend, dtype):
    check_backend(backend, dtype, 100, 50, 12544, "cuda", label_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_float64_and_no_targets(backend):
    """float64 GPU inputs, which auto sends to the CUDA kernel, and no targets (T = 0)."""
    check_backend(backend, torch.float64, 37, 3, 100, "cuda")
    ce, dice = m2f_kernels.pairwise_mask_cost(
        torch.randn(4, 10, device="cuda"), torch.zeros(0, 10, device="cuda"), backend=backend
    )
    assert ce.shape == dice.shape == (4, 0)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_public_op_matches_reference_and_handles_no_targets(backend):
    logits, labels = make_inputs(6, 4, 50, torch.float32)
    ce, dice = m2f_kernels.pairwise_mask_cost(logits, labels > 0.5, backend=backend)
    ref_ce, ref_dice = reference.pairwise_mask_cost(logits.double(), (labels > 0.5).double())
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dice.double(), ref_dice, atol=1e-5, rtol=1e-5)
    ce, dice = m2f_kernels.pairwise_mask_cost(logits, labels[:0], backend=backend)
    assert ce.shape == (6, 0) and dice.shape == (6, 0)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.float64])
def test_public_op_keeps_labels_wider_than_the_logits(backend, dtype, label_dtype):
    """float32/float64 soft labels beside half logits are not rounded to the logits' dtype (bfloat16 would
    change them by up to 2^-9): the costs equal the float64 ones on the same logits and the exact labels."""
    logits, labels = make_inputs(6, 4, 200, torch.float64)
    logits, labels = logits.to(dtype), labels.to(label_dtype)
    ce, dice = m2f_kernels.pairwise_mask_cost(logits, labels, backend=backend)
    ref_ce, ref_dice = reference.pairwise_mask_cost(logits.double(), labels.double())
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dice.double(), ref_dice, atol=1e-6, rtol=1e-6)


def test_costs_of_a_hand_computed_pair():
    # One point, logit 0 (p = 1/2), label 1: ce = log 2, dice = 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1) = 0.2.
    for backend in CPU_KERNEL_BACKENDS:
        ce, dice = KERNELS.get(backend, torch.device("cpu"), "pairwise_mask_cost")(
            torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
        )
        torch.testing.assert_close(ce, torch.tensor([[0.6931471805599453]], dtype=torch.float64))
        torch.testing.assert_close(dice, torch.tensor([[0.2]], dtype=torch.float64))


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_with_the_pinned_config_repeats_and_matches_reference(deterministic_algorithms):
    check_backend("triton", torch.float32, 37, 40, 100, "cpu")
    logits, labels = make_inputs(37, 40, 100, torch.float32)
    kernel = KERNELS.get("triton", logits.device, "pairwise_mask_cost")
    first, second = kernel(logits, labels), kernel(logits, labels)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNEL_BACKENDS])
def test_cpu_backends_refuse_no_points(backend):
    """P = 0 with the backend called directly: a ValueError like the public op's, not a NaN mean."""
    kernel = KERNELS.get(backend, torch.device("cpu"), "pairwise_mask_cost")
    with pytest.raises(ValueError, match="at least one point"):
        kernel(torch.randn(3, 0), torch.rand(2, 0))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backends_refuse_no_points(backend):
    kernel = KERNELS.get(backend, torch.device("cuda"), "pairwise_mask_cost")
    with pytest.raises(ValueError, match="at least one point"):
        kernel(torch.randn(3, 0, device="cuda"), torch.rand(2, 0, device="cuda"))


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
def test_triton_point_splits_on_a_gpu(monkeypatch):
    """The GPU branch of the split: about two programs per SM counting the fixed config's 32 x 32 tiles, at
    least 512 points per split, lengths a multiple of 64 (every config's BLOCK_P divides them), and the splits
    cover the points exactly."""
    from m2f_kernels.triton import pairwise_mask_cost as module

    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module, "multiprocessor_count", lambda device: 132)
    # 4 x 2 tiles want ceil(264 / 8) = 33 splits; 12,544 points allow ceil(12544 / 512) = 25.
    assert module._point_splits(100, 50, 12544, torch.device("cuda")) == (25, 512)
    for queries, targets, points in [(100, 50, 12544), (1, 1, 70000), (300, 200, 100), (7, 3, 1)]:
        num_splits, per_split = module._point_splits(queries, targets, points, torch.device("cuda"))
        assert per_split % 64 == 0 and all(tile["BLOCK_P"] <= 64 for tile in module.TILES)
        assert (num_splits - 1) * per_split < points <= num_splits * per_split
        assert num_splits == 1 or per_split >= 512


@pytest.mark.skipif("triton" not in CPU_KERNEL_BACKENDS, reason="Triton does not run on CPU here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_sums_more_splits_than_one_finalize_block(monkeypatch, dtype):
    """The finalize kernel adds the splits FINALIZE_BLOCK_SPLITS at a time. A GPU launch can have more splits
    than that (25 at Mask2Former's size), the interpreter's default at most 4: here it takes 40."""
    from m2f_kernels.triton import pairwise_mask_cost as module

    monkeypatch.setattr(module, "INTERPRETER_SPLITS", 40)
    num_points = 40 * module.SPLIT_ALIGNMENT - 10
    num_splits, _ = module._point_splits(5, 3, num_points, torch.device("cpu"))
    assert num_splits > 2 * module.FINALIZE_BLOCK_SPLITS
    check_backend("triton", dtype, 5, 3, num_points, "cpu")


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_confident_predictions_cost_zero_not_less(backend, dtype):
    """Logits of magnitude 14-20 that agree with binary labels: the CE cost is about 1e-7. The kernels sum
    softplus(x) once and subtract x . t, two sums of about 8 per point that cancel, so their rounding must
    not leave a negative cost (no BCE is negative) nor one far from the true one."""
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 12544, generator=generator) > 0.5).to(dtype)
    logits = (14 + 6 * torch.rand(40, 12544, generator=generator, dtype=dtype)) * (2 * labels - 1)
    ce, _ = KERNELS.get(backend, logits.device, "pairwise_mask_cost")(logits, labels)
    ref_ce, _ = reference.pairwise_mask_cost(logits.double(), labels.double())
    assert ce.min() >= 0
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", *CPU_KERNEL_BACKENDS])
def test_a_nan_logit_gives_its_row_nan_costs(backend):
    """The CE cost's clamp at 0 must not turn NaN into 0: a NaN logit makes its query's costs NaN, the
    other rows stay finite."""
    logits, labels = make_inputs(4, 3, 100, torch.float32)
    logits[2, 50] = float("nan")
    ce, dice = KERNELS.get(backend, logits.device, "pairwise_mask_cost")(logits, labels)
    for cost in (ce, dice):
        assert cost[2].isnan().all()
        assert cost[[0, 1, 3]].isfinite().all()

"""The CUDA library's kernel source run on the CPU (tests/cuda_emulation/cuda_emulation.h): each block's
threads are CPU threads that meet at __syncthreads, each warp's at its votes and shuffles, and atomicAdd is a
host atomic. The kernels run with the launch sequences of the CUDA ops (the kernel headers' launch_* functions)
and are checked by the backend tests' own checks against the float64 reference, so wrong indexing, a wrong
launch plan or a missing barrier fails without a GPU; the `cuda` tests run the same kernels on one.

Covered: pairwise_mask_cost (csrc/point_loss/pairwise_kernels.cuh), point_sample and point_mask_loss
(csrc/point_loss/kernels.cuh), masked_attention (csrc/masked_attention/kernels.cuh), ms_deform_attn and
ms_deform_attn_fused (csrc/ms_deform_attn/kernels.cuh).
"""

import ctypes
import functools
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import test_masked_attention_backends as attention_tests
import test_ms_deform_attn_backends as msda_tests
import test_ms_deform_attn_fused_backends as fused_tests
import test_pairwise_mask_cost_backends as pairwise_tests
import test_point_mask_loss_backends as loss_tests
import test_point_sample_backends as sample_tests
import torch
import torch.utils.cpp_extension

import m2f_kernels
from m2f_kernels import reference
from m2f_kernels.ops._common import accumulate_dtype

ROOT = Path(__file__).resolve().parents[2]
EMULATION_DIR = ROOT / "tests" / "cuda_emulation"
DTYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
}
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def fused_multiply_add_flags() -> list[str]:
    """Where the CPU has FMA instructions, let the compiler fuse products and sums into them, as nvcc does
    (at -O1 GCC fuses only with -fexpensive-optimizations)."""
    cpu_info = Path("/proc/cpuinfo")
    flags = cpu_info.read_text().split() if cpu_info.exists() else []
    return ["-mfma", "-fexpensive-optimizations"] if "fma" in flags else []


def build_library(source: str, out_dir: Path) -> ctypes.CDLL:
    """tests/cuda_emulation/<source> built with the host C++ compiler, loaded with ctypes."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    library = out_dir / Path(source).with_suffix(".so").name
    command = [
        compiler,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        *fused_multiply_add_flags(),
        f"-I{ROOT / 'csrc'}",
        f"-I{torch.utils.cpp_extension.include_paths()[0]}",
        f"-I{EMULATION_DIR}",
        str(EMULATION_DIR / source),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_emulation")
    sources = ("pairwise_mask_cost", "point_loss", "masked_attention", "ms_deform_attn")
    return {name: build_library(f"{name}.cpp", out_dir) for name in sources}


class EmulatedKernels:
    """Stands in for an op's OpKernels (in a backend test module or in the op's module): get() returns the
    emulated stage, whatever the backend."""

    def __init__(self, stages):
        self.stages = stages

    def get(self, backend, device, stage):
        return self.stages[stage]

    def resolve(self, backend, device, stage="forward"):
        return backend


def pointer(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def int64_array(*values):
    return (ctypes.c_int64 * len(values))(*values)


def entry(library, prefix, *dtypes):
    return getattr(library, prefix + "_".join(DTYPE_NAMES[dtype] for dtype in dtypes))


# pairwise_mask_cost


def emulated_pairwise_mask_cost(library, logits, labels, sm_count):
    """(ce, dice) of the CUDA kernels with the launch plan of a GPU with `sm_count` multiprocessors."""
    logits, labels = logits.contiguous(), labels.contiguous()
    (num_queries, num_points), num_targets = logits.shape, labels.shape[0]
    ce = torch.empty(num_queries, num_targets, dtype=accumulate_dtype(logits.dtype))
    dice = torch.empty_like(ce)
    kernel = entry(library, "pairwise_mask_cost_", logits.dtype, labels.dtype)
    sizes = (ctypes.c_int64(n) for n in (num_queries, num_targets, num_points, sm_count))
    kernel(*map(pointer, (logits, labels, ce, dice)), *sizes)
    return ce, dice


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("num_queries", "num_targets", "num_points"),
    [(1, 1, 1), (1, 5, 100), (37, 3, 999), (33, 65, 300), (100, 50, 2000), (40, 9, 5000)],
)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_pairwise_mask_cost_kernels(
    monkeypatch, libraries, dtype, num_queries, num_targets, num_points, sm_count
):
    """Partial query and target tiles (33 x 65 is two by three 32-pair tiles), points that end inside a chunk,
    one split per tile (sm_count 1) or up to 40 (a 132-SM GPU: 999 points in 8 splits, 2,000 in 16, 5,000 in
    40, which the finalize kernel adds with 2, 4 and 8 lanes per pair)."""
    kernel = functools.partial(
        emulated_pairwise_mask_cost, libraries["pairwise_mask_cost"], sm_count=sm_count
    )
    monkeypatch.setattr(pairwise_tests, "KERNELS", EmulatedKernels({"pairwise_mask_cost": kernel}))
    pairwise_tests.check_backend("emulated", dtype, num_queries, num_targets, num_points, "cpu")
    if dtype in (torch.float16, torch.bfloat16):
        label_dtype = torch.float32  # labels read in float32 beside 16-bit logits
        pairwise_tests.check_backend(
            "emulated", dtype, num_queries, num_targets, num_points, "cpu", label_dtype
        )


def test_pairwise_mask_cost_kernels_confident_predictions_and_nan(libraries):
    """Confident logits that agree with binary labels cost about 1e-7, never less than 0; a NaN logit makes
    its query's costs NaN and leaves the others finite."""
    library = libraries["pairwise_mask_cost"]
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 3000, generator=generator) > 0.5).float()
    logits = (14 + 6 * torch.rand(40, 3000, generator=generator)) * (2 * labels - 1)
    ce, _ = emulated_pairwise_mask_cost(library, logits, labels, 132)
    ref_ce, _ = reference.pairwise_mask_cost(logits.double(), labels.double())
    assert ce.min() >= 0
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-5)

    logits[7, 1234] = float("nan")
    ce, dice = emulated_pairwise_mask_cost(library, logits, labels, 132)
    for cost in (ce, dice):
        assert cost[7].isnan().all()
        assert cost[torch.arange(40) != 7].isfinite().all()


# point_sample and point_mask_loss


def emulated_point_sample(library, deterministic):
    """point_sample's forward and backward stages (kernel signatures) on the CUDA kernels; the backward takes
    the given deterministic mode."""

    def forward(image, coords):
        image, coords = image.contiguous(), coords.contiguous()
        (batch, channels, height, width), num_points = image.shape, coords.shape[1]
        output = image.new_empty(batch, channels, num_points)
        sizes = int64_array(batch, channels, height, width, num_points)
        entry(library, "point_sample_forward_", image.dtype, coords.dtype)(
            sizes, *map(pointer, (image, coords, output))
        )
        return output

    def backward(grad_output, image, coords, _deterministic):
        image, coords = image.contiguous(), coords.contiguous()
        (batch, channels, height, width), num_points = image.shape, coords.shape[1]
        acc_dtype = accumulate_dtype(image.dtype)
        grad_output = grad_output.to(acc_dtype).contiguous()
        grad_image = torch.zeros(image.shape, dtype=acc_dtype)
        grad_coords = torch.empty_like(coords)
        sizes = int64_array(batch, channels, height, width, num_points)
        entry(library, "point_sample_backward_", image.dtype, coords.dtype)(
            sizes,
            ctypes.c_int(deterministic),
            *map(pointer, (grad_output, image, coords, grad_image, grad_coords)),
        )
        return grad_image.to(image.dtype), grad_coords

    return EmulatedKernels({"forward": forward, "backward": backward})


def emulated_point_mask_loss(library):
    """point_mask_loss's forward and backward stages (kernel signatures) on the CUDA kernels."""

    def sizes(logits, targets, coords):
        return int64_array(*logits.shape, *targets.shape[1:], coords.shape[1])

    def forward(logits, targets, coords):
        logits, targets, coords = logits.contiguous(), targets.contiguous(), coords.contiguous()
        ce = torch.empty(logits.shape[0], dtype=accumulate_dtype(logits.dtype))
        dice, dice_sums = torch.empty_like(ce), ce.new_empty(logits.shape[0], 3)
        entry(library, "point_mask_loss_forward_", logits.dtype, targets.dtype, coords.dtype)(
            sizes(logits, targets, coords), *map(pointer, (logits, targets, coords, ce, dice, dice_sums))
        )
        return ce, dice, dice_sums

    def backward(grad_ce, grad_dice, logits, targets, coords, dice_sums, deterministic):
        logits, targets, coords = logits.contiguous(), targets.contiguous(), coords.contiguous()
        acc_dtype = accumulate_dtype(logits.dtype)
        grad_ce, grad_dice, dice_sums = (
            t.to(acc_dtype).contiguous() for t in (grad_ce, grad_dice, dice_sums)
        )
        grad = torch.zeros(logits.shape, dtype=acc_dtype)
        tensors = (grad_ce, grad_dice, logits, targets, coords, dice_sums, grad)
        entry(library, "point_mask_loss_backward_", logits.dtype, targets.dtype, coords.dtype)(
            sizes(logits, targets, coords), ctypes.c_int(deterministic), *map(pointer, tensors)
        )
        return grad.to(logits.dtype)

    return EmulatedKernels({"forward": forward, "backward": backward})


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", sample_tests.SHAPES)
@pytest.mark.parametrize("num_points", [1, 100, 700])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_point_sample_kernels(monkeypatch, libraries, dtype, shape, num_points, deterministic):
    """Points inside, on the borders and outside; several blocks of the grid-stride kernels (700 points) and
    both scatters of the image gradient, with float32 coords beside 16-bit images too."""
    monkeypatch.setattr(
        sample_tests, "KERNELS", emulated_point_sample(libraries["point_loss"], deterministic)
    )
    sample_tests.check_backend("emulated", dtype, shape, num_points, "cpu")
    if dtype in (torch.float16, torch.bfloat16):
        sample_tests.check_backend("emulated", dtype, shape, num_points, "cpu", coords_dtype=torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(("logit_size", "target_size"), loss_tests.MASK_SIZES)
@pytest.mark.parametrize("num_points", [1, 100, 1500])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_point_mask_loss_kernels(
    monkeypatch, libraries, dtype, logit_size, target_size, num_points, deterministic
):
    """uint8 and soft targets (float32 beside 16-bit logits too), masks of odd and 1x1 sizes, one block of
    1,024 points per mask or two (1,500 points, summed in order), both scatters of the gradient."""
    monkeypatch.setattr(loss_tests, "KERNELS", emulated_point_mask_loss(libraries["point_loss"]))
    target_kinds = ["uint8", "float"] + (["float32"] if dtype in (torch.float16, torch.bfloat16) else [])
    for target_kind in target_kinds:
        loss_tests.check_backend(
            "emulated", dtype, logit_size, target_size, num_points, target_kind, "cpu", deterministic
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deterministic_scatter_covers_planes_taller_than_a_block(monkeypatch, libraries, dtype):
    """The deterministic scatter gives each thread one row of the image, 256 rows per block: a plane of 300
    rows needs a second block of rows (and its grid counts rows, not columns). The loss's points lie on a
    grid of 1/4096, whose positions are exact (its tolerance leaves out their rounding)."""
    library = libraries["point_loss"]
    monkeypatch.setattr(sample_tests, "KERNELS", emulated_point_sample(library, deterministic=True))
    sample_tests.check_backend("emulated", dtype, (1, 2, 300, 5), 700, "cpu")
    monkeypatch.setattr(loss_tests, "KERNELS", emulated_point_mask_loss(library))
    loss_tests.check_backend("emulated", dtype, (300, 5), (301, 7), 1500, "float", "cpu", True, grid=4096)


# masked_attention


def emulated_masked_attention(library, sm_count):
    """masked_attention's forward and backward stages (kernel signatures) on the CUDA op's launch sequences, with
    the key splits of a GPU with `sm_count` multiprocessors."""

    def sizes(q, k, attn_mask):
        mask_heads = 1 if attn_mask is None else attn_mask.shape[1]
        return int64_array(*q.shape[:3], k.shape[2], q.shape[3], mask_heads)

    def constants(threshold_logit, scale):
        return ctypes.c_float(threshold_logit), ctypes.c_float(scale)

    def forward(q, k, v, mask_logits, attn_mask, threshold_logit, scale):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
        entry(library, "masked_attention_forward_", q.dtype)(
            sizes(q, k, attn_mask),
            ctypes.c_int64(sm_count),
            *map(pointer, (q, k, v, mask_logits, attn_mask)),
            *constants(threshold_logit, scale),
            pointer(out),
            pointer(lse),
        )
        return out, lse

    def backward(grad_out, q, k, v, out, lse, mask_logits, attn_mask, threshold_logit, scale, deterministic):
        grads = [torch.empty_like(t) for t in (q, k, v)]
        entry(library, "masked_attention_backward_", q.dtype)(
            sizes(q, k, attn_mask),
            ctypes.c_int64(sm_count),
            *map(pointer, (grad_out, q, k, v, out, lse, mask_logits, attn_mask)),
            *constants(threshold_logit, scale),
            *map(pointer, grads),
        )
        return tuple(grads)

    return EmulatedKernels({"forward": forward, "backward": backward})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["logits", "bool", "bool_per_head"])
@pytest.mark.parametrize(
    "shape", [(1, 2, 1, 1, 16), (2, 2, 5, 7, 32), (1, 2, 70, 300, 32), (1, 1, 9, 130, 64)]
)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_masked_attention_kernels(monkeypatch, libraries, dtype, mask_kind, shape, sm_count):
    """Every row case of the mask (fully blocked, NaN, a single key at the threshold, random density), a partial
    query tile (70 queries in tiles of 64), keys that end inside a key tile, the dk/dv kernel's partial query
    stage, and one key split or up to three (a 132-SM GPU), for each head dim the kernels take."""
    kernels = emulated_masked_attention(libraries["masked_attention"], sm_count)
    monkeypatch.setattr(attention_tests, "KERNELS", kernels)
    attention_tests.check_backend("emulated", dtype, shape, mask_kind)


@pytest.mark.parametrize("sm_count", [1, 132])
def test_masked_attention_kernels_huge_scores(monkeypatch, libraries, sm_count):
    """With products and sums fused into FMAs where the host has them (as nvcc fuses them)."""
    kernels = emulated_masked_attention(libraries["masked_attention"], sm_count)
    monkeypatch.setattr(attention_tests, "KERNELS", kernels)
    attention_tests.check_huge_scores_keep_the_top_key("emulated")


# ms_deform_attn and ms_deform_attn_fused


def emulated_ms_deform_attn(library, fused):
    """The op's forward and backward stages (kernel signatures) on the CUDA kernels; the backward takes the
    deterministic mode the op passes (torch.are_deterministic_algorithms_enabled())."""
    prefix = "ms_deform_attn_fused_" if fused else "ms_deform_attn_"

    def sizes(value, spatial_shapes, weights):
        """N, S, M, D, L, P, Q; weights: the (N, Q, M, L, P) weights or the fused op's (N, Q, M, L * P) logits."""
        levels = spatial_shapes.shape[0]
        points = weights.shape[3] // levels if fused else weights.shape[4]
        return int64_array(*value.shape, levels, points, weights.shape[1])

    def forward(value, spatial_shapes, level_start_index, *samples):
        value, *samples = (t.contiguous() for t in (value, *samples))
        batch, _, heads, channels = value.shape
        output = value.new_empty(batch, samples[-1].shape[1], heads * channels)
        entry(library, prefix + "forward_", value.dtype)(
            sizes(value, spatial_shapes, samples[-1]),
            *map(pointer, (value, spatial_shapes, level_start_index, *samples, output)),
        )
        return output

    def backward(grad_output, value, spatial_shapes, level_start_index, *samples_and_flag):
        """(grad_value, then one gradient per sample input: locations and weights, or reference points,
        offsets and logits)."""
        *samples, deterministic = samples_and_flag
        grad_output, value, *samples = (t.contiguous() for t in (grad_output, value, *samples))
        acc_dtype = accumulate_dtype(value.dtype)
        grads = [torch.zeros(t.shape, dtype=acc_dtype) for t in (value, *samples)]
        entry(library, prefix + "backward_", value.dtype)(
            sizes(value, spatial_shapes, samples[-1]),
            ctypes.c_int(deterministic),
            *map(pointer, (grad_output, value, spatial_shapes, level_start_index, *samples, *grads)),
        )
        return tuple(grad.to(value.dtype) for grad in grads)

    return EmulatedKernels({"forward": forward, "backward": backward})


def use_emulated_ms_deform_attn(monkeypatch, library, fused):
    """Makes the public op (ms_deform_attn or ms_deform_attn_fused) run the emulated CUDA kernels."""
    module = importlib.import_module(
        "m2f_kernels.ops." + ("ms_deform_attn_fused" if fused else "ms_deform_attn")
    )
    monkeypatch.setattr(module, "KERNELS", emulated_ms_deform_attn(library, fused))


# (batch, levels, points, (heads, channels)): every level set and point count, and channel counts for every
# vector width (5: 1, 6: 2, 24 and 96: 4), idle group lanes (5, 6) and several chunks per lane (264).
MSDA_CASES = [
    (1, 1, 4, (8, 32)),
    (3, 3, 1, (4, 16)),
    (1, 4, 8, (1, 64)),
    (3, 4, 4, (2, 5)),
    (2, 3, 4, (3, 6)),
    (2, 1, 8, (2, 24)),
    (1, 3, 4, (1, 96)),
    (2, 3, 4, (2, 264)),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("batch", "num_levels", "points", "heads_channels"),
    MSDA_CASES,
    ids=[f"n{n}-l{levels}-p{points}-m{m}-d{d}" for n, levels, points, (m, d) in MSDA_CASES],
)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("fused", [False, True], ids=["ms_deform_attn", "fused"])
def test_ms_deform_attn_kernels(
    monkeypatch, libraries, dtype, batch, num_levels, points, heads_channels, deterministic, fused
):
    """Samples on borders, on pixel centres, outside and NaN (the backend tests' inputs), both ways of summing
    grad_value, and the fused op's softmax and reference-point gradients."""
    use_emulated_ms_deform_attn(monkeypatch, libraries["ms_deform_attn"], fused)
    heads, channels = heads_channels
    check = fused_tests.check_fused_against_reference if fused else msda_tests.check_against_reference
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check("emulated", batch, heads, channels, msda_tests.LEVELS[num_levels], points, dtype)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ms_deform_attn_kernels_with_misaligned_value(monkeypatch, libraries, dtype):
    """value whose data is not 16-byte aligned: the kernels take narrower loads, with the same results."""
    use_emulated_ms_deform_attn(monkeypatch, libraries["ms_deform_attn"], fused=False)
    inputs = msda_tests.make_inputs(2, 7, 4, 32, msda_tests.LEVELS[3], 4, dtype)
    storage = torch.empty(inputs[0].numel() + 1, dtype=dtype)
    shifted = storage[1:].view(inputs[0].shape).copy_(inputs[0])
    assert shifted.data_ptr() % 16 != 0
    grad_output = torch.randn(2, 7, 4 * 32, dtype=dtype)

    def run(value):
        return msda_tests.forward_backward(
            lambda *t: m2f_kernels.ms_deform_attn(*t, backend="emulated"), [value, *inputs[1:]], grad_output
        )

    exact = msda_tests.forward_backward(reference.ms_deform_attn, inputs, grad_output, torch.float64)
    lowp = msda_tests.forward_backward(reference.ms_deform_attn, inputs, grad_output)
    msda_tests.assert_matches_reference(run(shifted), exact, lowp if dtype == torch.float16 else exact, dtype)


@pytest.mark.parametrize("fused", [False, True], ids=["ms_deform_attn", "fused"])
def test_ms_deform_attn_kernels_deterministic_mode_is_bitwise_reproducible(
    monkeypatch, libraries, deterministic_algorithms, fused
):
    """Many samples on the same value rows, whose atomic sums would depend on the threads' order."""
    use_emulated_ms_deform_attn(monkeypatch, libraries["ms_deform_attn"], fused)
    if fused:
        fused_tests.deterministic_fused_gradients("emulated", "cpu")
    else:
        msda_tests.deterministic_gradients("emulated", "cpu")

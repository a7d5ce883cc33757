"""Every Triton kernel compiles for sm_80 and sm_90 with the arguments the ops pass (DESIGN.md 3 and 4).

The CPU tests run the Triton kernels in the interpreter, which does not see what only the GPU compiler checks
(tl.dot shapes and dtypes, layout conversions, shared memory, fp8 support per architecture). Here the ops run on
tiny inputs in the interpreter while every kernel launch is recorded (argument types, constexprs, launch
options); each distinct launch is then compiled to cubin for sm_80 and sm_90 in a process without the
interpreter, which needs Triton's NVIDIA backend and ptxas but no GPU. On sm_90 every config of the kernel's
autotuner is compiled too, to LLVM IR (where its shared memory is known): float32 launches by default, the
bfloat16 and float64 ones in the slow test.

Shared memory: the recorded config (the one pinned launches use) must fit on both architectures. An autotuner
config that does not fit is skipped by Triton's autotuner at run time (it catches OutOfResources), so it is
only listed, but at least one config of each launch must fit.
"""

import contextlib
import functools
import importlib
import os
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from triton_compile_support import (  # noqa: E402
    SHARED_MEMORY_LIMITS,
    compile_in_subprocess,
    describe,
    recorded_launches,
    spec_key,
)

import m2f_kernels  # noqa: E402
from m2f_kernels.triton import masked_attention as triton_masked_attention  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="records the launches in Triton's interpreter (TRITON_INTERPRET=1, set without a GPU); "
    "on a GPU the cuda tests compile the kernels",
)

KERNEL_MODULES = [
    f"m2f_kernels.triton.{name}"
    for name in (
        "ms_deform_attn",
        "ms_deform_attn_fused",
        "masked_attention",
        "point_sample",
        "point_mask_loss",
        "pairwise_mask_cost",
    )
]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # no float64 masked attention in Triton
MASK2FORMER_HEAD_DIM = 32
OTHER_HEAD_DIMS = (16, 64)  # the other head dims the GPU backends take (ops/masked_attention.py)
ARCHS = [80, 90]
SWEEP_ARCH = 90


# ---- the launches: the ops forward and backward on tiny inputs with the real head, level and point counts ----


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def backward_both_ways(loss: torch.Tensor) -> None:
    """The backward with deterministic algorithms off, then on (the ops choose their kernels by it)."""
    with deterministic_algorithms(False):
        loss.backward(retain_graph=True)
    with deterministic_algorithms(True):
        loss.backward()


def run_point_ops(dtype):
    """Forward too in both modes: point_mask_loss and pairwise_mask_cost pin their config when deterministic."""
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            input = torch.randn(2, 3, 5, 6, dtype=dtype, requires_grad=True)
            coords = torch.rand(2, 7, 2, dtype=dtype, requires_grad=True)
            backward_both_ways(m2f_kernels.point_sample(input, coords, backend="triton").sum())
            logits = torch.randn(2, 5, 6, dtype=dtype, requires_grad=True)
            for targets in (torch.rand(2, 10, 12) > 0.5, torch.rand(2, 10, 12, dtype=dtype)):
                ce, dice = m2f_kernels.point_mask_loss(
                    logits, targets, torch.rand(2, 7, 2), 2.0, backend="triton"
                )
                backward_both_ways(ce + dice)
            predictions, targets = torch.randn(3, 7, dtype=dtype), torch.rand(4, 7) > 0.5
            m2f_kernels.pairwise_mask_cost(predictions, targets, backend="triton")


def run_deformable_attention(dtype):
    """Mask2Former's pixel decoder: 8 heads of 32 channels, 3 levels, 4 points (levels of a few pixels)."""
    batch, queries, heads, channels, points = 1, 3, 8, 32, 4
    spatial_shapes = torch.tensor([[2, 2], [1, 2], [1, 1]])
    level_start_index = torch.cat([torch.zeros(1, dtype=torch.int64), spatial_shapes.prod(1).cumsum(0)[:-1]])
    levels, num_values = len(spatial_shapes), int(spatial_shapes.prod(1).sum())

    def leaf(tensor):
        return tensor.to(dtype).requires_grad_()

    value = leaf(torch.randn(batch, num_values, heads, channels))
    locations = leaf(torch.rand(batch, queries, heads, levels, points, 2))
    weights = leaf(torch.rand(batch, queries, heads, levels, points))
    tables = (spatial_shapes, level_start_index)
    backward_both_ways(m2f_kernels.ms_deform_attn(value, *tables, locations, weights, backend="triton").sum())
    reference_points = leaf(torch.rand(batch, queries, levels, 2))
    offsets = leaf(torch.randn(batch, queries, heads, levels, points, 2))
    logits = leaf(torch.randn(batch, queries, heads, levels * points))
    output = m2f_kernels.ms_deform_attn_fused(
        value, *tables, reference_points, offsets, logits, backend="triton"
    )
    backward_both_ways(output.sum())


def run_masked_attention(dtype, head_dim):
    """Both mask kinds through the op, then with the keys split in two as on a GPU (the CPU op uses one split)."""
    batch, heads, queries, keys = 1, 2, 5, 70  # 70 keys: two key blocks, so two splits
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, dtype=dtype, requires_grad=True) for n in (queries, keys, keys)
    )
    scale = head_dim**-0.5
    for mask_logits, attn_mask in (
        (torch.randn(batch, queries, keys), None),
        (None, torch.rand(1, 5, 70) > 0.5),
    ):
        masks = {"mask_logits": mask_logits, "attn_mask": attn_mask}
        backward_both_ways(m2f_kernels.masked_attention(q, k, v, **masks, backend="triton").sum())
        kernel_masks = (
            None if mask_logits is None else mask_logits.to(dtype),
            None if attn_mask is None else attn_mask[:, None],
        )
        with torch.no_grad():
            out, lse = triton_masked_attention.masked_attention_forward(
                q, k, v, *kernel_masks, 0.0, scale, num_splits=2
            )
            triton_masked_attention.masked_attention_backward(
                torch.ones_like(out), q, k, v, out, lse, *kernel_masks, 0.0, scale, False, num_splits=2
            )


def record(cases) -> list[dict]:
    """The distinct launch specs of running every case."""
    with recorded_launches() as specs:
        for case in cases:
            case()
    return sorted(specs.values(), key=spec_key)


def is_float32(spec: dict) -> bool:
    """No 16-bit or float64 tensor among the arguments."""
    return not any(t in ("*fp16", "*bf16", "*fp64") for t in spec["signature"].values())


def is_float16(spec: dict) -> bool:
    return "*fp16" in spec["signature"].values()


DEFAULT_CASES = [
    *(functools.partial(run_point_ops, dtype) for dtype in FLOAT_DTYPES),
    *(functools.partial(run_deformable_attention, dtype) for dtype in FLOAT_DTYPES),
    *(functools.partial(run_masked_attention, dtype, MASK2FORMER_HEAD_DIM) for dtype in ATTENTION_DTYPES),
]
OTHER_HEAD_DIM_CASES = [
    functools.partial(run_masked_attention, dtype, head_dim)
    for dtype in ATTENTION_DTYPES
    for head_dim in OTHER_HEAD_DIMS
]


# ---- verdicts on the compile results ----


def compile_tasks(tasks: list[dict]) -> list[dict]:
    response = compile_in_subprocess(tasks)
    if "unavailable" in response:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {response['unavailable']}")
    return response["results"]


def failures(tasks: list[dict], results: list[dict]) -> list[str]:
    """Compile errors, recorded configs that do not fit, and launches none of whose autotuner configs fits."""
    found = []
    sweeps = defaultdict(list)
    for result in results:
        where = f"sm_{result['arch']} {result['config']}\n    {describe(tasks[result['task']]['spec'])}"
        limit = SHARED_MEMORY_LIMITS[result["arch"]]
        if not result["ok"]:
            found.append(f"does not compile for {where}\n    {result['error']}")
        elif result["config"] == "recorded" and result["shared"] > limit:
            found.append(f"needs {result['shared']} bytes of shared memory (limit {limit}) for {where}")
        if result["config"] != "recorded":
            sweeps[result["task"], result["arch"]].append(result)
    for (task, arch), sweep in sweeps.items():
        if not any(r["ok"] and r["shared"] <= SHARED_MEMORY_LIMITS[arch] for r in sweep):
            found.append(f"no autotuner config fits sm_{arch}: {describe(tasks[task]['spec'])}")
    return found


def assert_no_failures(tasks: list[dict], results: list[dict]) -> None:
    found = failures(tasks, results)
    assert not found, f"{len(found)} of {len(results)} compiles failed:\n" + "\n".join(found)


def report_oversized_autotuner_configs(tasks: list[dict], results: list[dict]) -> None:
    """Lists (in the test's captured output) the autotuner configs Triton will skip for lack of shared memory."""
    for result in results:
        if (
            result["config"] != "recorded"
            and result["ok"]
            and result["shared"] > SHARED_MEMORY_LIMITS[result["arch"]]
        ):
            spec = tasks[result["task"]]["spec"]
            print(
                f"skipped by the autotuner on sm_{result['arch']} ({result['shared']} bytes): {result['config']}"
            )
            print(f"    {describe(spec)}")


@pytest.fixture(scope="module")
def default_specs():
    return record(DEFAULT_CASES)


@pytest.fixture(scope="module")
def default_compiles(default_specs):
    """Every spec for sm_80 and sm_90, and the float32 ones with every autotuner config for sm_90."""
    tasks = [
        {"spec": spec, "archs": ARCHS, "sweep_archs": [SWEEP_ARCH] if is_float32(spec) else []}
        for spec in default_specs
    ]
    return tasks, compile_tasks(tasks)


def kernels_of(module_name: str) -> set[str]:
    """The names of the kernels (objects named *_kernel) defined in a kernel module."""
    module = importlib.import_module(module_name)
    names = set()
    for name, value in vars(module).items():
        while hasattr(value, "fn") and not hasattr(value, "rewrite"):  # autotuner -> interpreted function
            value = value.fn
        if (
            name.endswith("_kernel")
            and getattr(getattr(value, "fn", None), "__module__", None) == module_name
        ):
            names.add(name)
    return names


def test_the_ops_launch_every_kernel(default_specs):
    defined = {(module, name) for module in KERNEL_MODULES for name in kernels_of(module)}
    launched = {(spec["module"], spec["kernel"]) for spec in default_specs}
    assert defined - launched == set(), "kernels no recorded launch covers"


SAMPLING_KERNELS = {
    ("m2f_kernels.triton.ms_deform_attn", "_forward_kernel"),
    ("m2f_kernels.triton.ms_deform_attn", "_backward_kernel"),
    ("m2f_kernels.triton.ms_deform_attn", "_contribution_kernel"),
    ("m2f_kernels.triton.point_sample", "_point_sample_forward_kernel"),
    ("m2f_kernels.triton.point_sample", "_point_sample_backward_kernel"),
    ("m2f_kernels.triton.point_mask_loss", "_point_mask_loss_forward_kernel"),
    ("m2f_kernels.triton.point_mask_loss", "_point_mask_loss_backward_kernel"),
}


def test_sampling_kernels_launch_without_fp_fusion(default_specs):
    """The kernels that compute a sample's cell from x = u * W - 0.5 launch with enable_fp_fusion=False: a
    fused multiply-add would move a location on a pixel boundary into the neighbouring cell on the GPU."""
    launches = [spec for spec in default_specs if (spec["module"], spec["kernel"]) in SAMPLING_KERNELS]
    assert {(spec["module"], spec["kernel"]) for spec in launches} == SAMPLING_KERNELS
    for spec in launches:
        assert spec["options"].get("enable_fp_fusion") is False, describe(spec)


def test_every_launch_compiles_and_fits_for_sm80_and_sm90(default_compiles):
    tasks, results = default_compiles
    recorded = [result for result in results if result["config"] == "recorded"]
    assert len(recorded) == len(ARCHS) * len(tasks)
    assert_no_failures(tasks, recorded)


def test_every_autotuner_config_of_the_float32_launches_compiles_for_sm90(default_compiles):
    tasks, results = default_compiles
    swept = [result for result in results if result["config"] != "recorded"]
    assert swept, "no autotuned float32 launch"
    assert_no_failures(tasks, swept)
    report_oversized_autotuner_configs(tasks, swept)


@pytest.mark.slow
def test_other_head_dims_and_every_autotuner_config_of_all_launches(default_specs):
    """Masked attention with head dims 16 and 64 on both architectures, and the autotuner configs of every
    launch not swept by default (bfloat16 and float64) on sm_90. float16 launches compile at their recorded
    config only: their configs are bfloat16's, with the same element size (shared memory) and the same 16-bit
    loads and tensor-core shapes, and sweeping both took a third of this test's time."""
    default_keys = {spec_key(spec) for spec in default_specs}
    extra = [spec for spec in record(OTHER_HEAD_DIM_CASES) if spec_key(spec) not in default_keys]
    tasks = [
        {"spec": spec, "archs": ARCHS, "sweep_archs": [] if is_float16(spec) else [SWEEP_ARCH]}
        for spec in extra
    ]
    tasks += [
        {"spec": spec, "archs": [], "sweep_archs": [SWEEP_ARCH]}
        for spec in default_specs
        if not is_float32(spec) and not is_float16(spec)
    ]
    assert extra and tasks
    results = compile_tasks(tasks)
    assert_no_failures(tasks, results)
    report_oversized_autotuner_configs(tasks, results)


# ---- the check itself: kernels the interpreter runs but the GPU compiler rejects ----
# (module-level, so that the compile process imports them by this module's name)


@triton.jit
def _fp8_round_trip_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """float8e4nv exists from sm_89 on: compiles for sm_90, not for sm_80."""
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.float8e4nv).to(tl.float32))


@triton.jit
def _wide_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr):
    """A (M, K) @ (K, M) product with both operands in shared memory: 2 * M * K * 4 bytes for float32."""
    a = tl.load(a_ptr + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(b_ptr + tl.arange(0, K)[:, None] * M + tl.arange(0, M)[None, :])
    tl.store(c_ptr + tl.arange(0, M)[:, None] * M + tl.arange(0, M)[None, :], tl.dot(a, b))


def test_the_check_reports_a_kernel_the_gpu_compiler_rejects_and_one_that_does_not_fit():
    x = torch.randn(128)
    a, b = torch.randn(32, 1024), torch.randn(1024, 32)
    with recorded_launches() as recorded:
        _fp8_round_trip_kernel[(1,)](x, torch.empty_like(x), BLOCK=128)
        _wide_dot_kernel[(1,)](a, b, torch.empty(32, 32), M=32, K=1024)
    specs = sorted(recorded.values(), key=lambda spec: spec["kernel"])
    assert [spec["kernel"] for spec in specs] == ["_fp8_round_trip_kernel", "_wide_dot_kernel"]
    tasks = [{"spec": spec, "archs": ARCHS, "sweep_archs": []} for spec in specs]
    results = compile_tasks(tasks)

    found = failures(tasks, results)
    assert len(found) == 3, "\n".join(found)
    assert found[0].startswith("does not compile for sm_80 recorded") and "_fp8_round_trip_kernel" in found[0]
    assert "fp8e4nv not supported" in found[0]
    needed = 2 * 32 * 1024 * 4
    for arch, line in zip(ARCHS, found[1:], strict=True):
        assert line.startswith(f"needs {needed} bytes of shared memory (limit {SHARED_MEMORY_LIMITS[arch]})")
        assert f"for sm_{arch} recorded" in line and "_wide_dot_kernel" in line


# _wide_dot_kernel with M from an autotuner.
_autotuned_wide_dot_kernel = triton.autotune(
    configs=[triton.Config({"M": 16}), triton.Config({"M": 64})], key=[]
)(_wide_dot_kernel)


def test_autotuner_configs_stop_after_the_llvm_ir_with_the_shared_memory_of_a_whole_compile():
    a, b = torch.randn(16, 1024), torch.randn(1024, 16)
    with recorded_launches() as recorded:
        _wide_dot_kernel[(1,)](a, b, torch.empty(16, 16), M=16, K=1024)
    (whole,) = recorded.values()
    tasks = [
        {"spec": whole, "archs": [SWEEP_ARCH], "sweep_archs": []},
        {"spec": {**whole, "kernel": "_autotuned_wide_dot_kernel"}, "archs": [], "sweep_archs": [SWEEP_ARCH]},
    ]
    results = compile_tasks(tasks)

    assert [(r["task"], r["last_stage"], r["ok"]) for r in results] == [(0, "cubin", True)] + [
        (1, "llir", True)
    ] * 2
    assert results[1]["shared"] == results[0]["shared"] == 2 * 16 * 1024 * 4
    assert results[2]["shared"] == 2 * 64 * 1024 * 4 > SHARED_MEMORY_LIMITS[SWEEP_ARCH]
    assert failures(tasks, results) == []  # the M=16 config fits

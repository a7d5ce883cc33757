"""The CUDA library's kernel source run on the CPU (tests/cuda_emulation/cuda_emulation.h): each block's
threads are CPU threads that meet at __syncthreads. It checks the kernels' indexing, staging and launch plan
against the float64 reference where there is no GPU; the `cuda` tests run the same kernels on one.

Only kernels that use thread and block indices, shared memory and __syncthreads can run this way:
pairwise_mask_cost's (csrc/point_loss/pairwise_kernels.cuh).
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from test_pairwise_mask_cost_backends import TOLERANCES, make_inputs

from m2f_kernels import reference

ROOT = Path(__file__).resolve().parents[2]
EMULATION_DIR = ROOT / "tests" / "cuda_emulation"
DTYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
}
# (logits, labels) dtypes the CUDA op takes: labels in the logits' dtype or in float32 beside 16-bit logits.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


@pytest.fixture(scope="module")
def pairwise_library(tmp_path_factory):
    """tests/cuda_emulation/pairwise_mask_cost.cpp built with the host C++ compiler, loaded with ctypes."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    library = tmp_path_factory.mktemp("cuda_emulation") / "pairwise_mask_cost.so"
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
        f"-I{ROOT / 'csrc'}",
        f"-I{torch.utils.cpp_extension.include_paths()[0]}",
        f"-I{EMULATION_DIR}",
        str(EMULATION_DIR / "pairwise_mask_cost.cpp"),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def emulated_pairwise_mask_cost(library, logits, labels, sm_count):
    """(ce, dice) of the CUDA kernels with the launch plan of a GPU with `sm_count` multiprocessors."""
    num_queries, num_points = logits.shape
    num_targets = labels.shape[0]
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = torch.empty(num_queries, num_targets, dtype=acc_dtype)
    dice = torch.empty(num_queries, num_targets, dtype=acc_dtype)
    kernel = getattr(library, f"pairwise_mask_cost_{DTYPE_NAMES[logits.dtype]}_{DTYPE_NAMES[labels.dtype]}")
    kernel.restype = None
    pointers = (ctypes.c_void_p(t.data_ptr()) for t in (logits.contiguous(), labels.contiguous(), ce, dice))
    sizes = (ctypes.c_int64(n) for n in (num_queries, num_targets, num_points, sm_count))
    kernel(*pointers, *sizes)
    return ce, dice


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda pair: "-".join(DTYPE_NAMES[d] for d in pair))
@pytest.mark.parametrize(
    ("num_queries", "num_targets", "num_points"),
    [(1, 1, 1), (1, 5, 100), (37, 3, 999), (33, 65, 300), (100, 50, 2000)],
)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_pairwise_kernels_match_reference(
    pairwise_library, dtypes, num_queries, num_targets, num_points, sm_count
):
    """Partial query and target tiles (33 x 65 is two by three 32-pair tiles), points that end inside a chunk,
    one split per tile (sm_count 1) or up to 16 (a 132-SM GPU, 2,000 points in splits of 128)."""
    dtype, label_dtype = dtypes
    logits, labels = make_inputs(num_queries, num_targets, num_points, dtype)
    labels = make_inputs(num_queries, num_targets, num_points, torch.float64)[1].to(label_dtype)
    ce, dice = emulated_pairwise_mask_cost(pairwise_library, logits, labels, sm_count)
    ref_ce, ref_dice = reference.pairwise_mask_cost(logits.double(), labels.double())
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ce.double(), ref_ce, atol=atol, rtol=rtol)
    torch.testing.assert_close(dice.double(), ref_dice, atol=atol, rtol=rtol)


def test_pairwise_kernels_confident_predictions_and_nan(pairwise_library):
    """Confident logits that agree with binary labels cost about 1e-7, never less than 0; a NaN logit makes
    its query's costs NaN and leaves the others finite."""
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 3000, generator=generator) > 0.5).float()
    logits = (14 + 6 * torch.rand(40, 3000, generator=generator)) * (2 * labels - 1)
    ce, _ = emulated_pairwise_mask_cost(pairwise_library, logits, labels, 132)
    ref_ce, _ = reference.pairwise_mask_cost(logits.double(), labels.double())
    assert ce.min() >= 0
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-5, rtol=1e-5)

    logits[7, 1234] = float("nan")
    ce, dice = emulated_pairwise_mask_cost(pairwise_library, logits, labels, 132)
    for cost in (ce, dice):
        assert cost[7].isnan().all()
        assert cost[torch.arange(40) != 7].isfinite().all()

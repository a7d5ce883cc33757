"""The CUDA library's kernel source run on the CPU (tests/cuda_emulation/cuda_emulation.h): each block's
threads are CPU threads that meet at __syncthreads (and each warp's at its votes). It checks the kernels'
indexing, staging, synchronization and launch plans against the float64 reference where there is no GPU; the
`cuda` tests run the same kernels on one.

Only kernels that use thread and block indices, shared memory, __syncthreads and __any_sync can run this way:
pairwise_mask_cost's (csrc/point_loss/pairwise_kernels.cuh) and masked_attention's
(csrc/masked_attention/kernels.cuh, with the forward and backward launch sequences of the CUDA op).
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import test_masked_attention_backends as attention_tests
import torch
import torch.utils.cpp_extension
from test_pairwise_mask_cost_backends import TOLERANCES, make_inputs

from m2f_kernels import reference
from m2f_kernels.reference.masked_attention import threshold_to_logit

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
def pairwise_library(tmp_path_factory):
    return build_library("pairwise_mask_cost.cpp", tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture(scope="module")
def attention_library(tmp_path_factory):
    return build_library("masked_attention.cpp", tmp_path_factory.mktemp("cuda_emulation"))


def pointer(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def emulated_pairwise_mask_cost(library, logits, labels, sm_count):
    """(ce, dice) of the CUDA kernels with the launch plan of a GPU with `sm_count` multiprocessors."""
    num_queries, num_points = logits.shape
    num_targets = labels.shape[0]
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = torch.empty(num_queries, num_targets, dtype=acc_dtype)
    dice = torch.empty(num_queries, num_targets, dtype=acc_dtype)
    kernel = getattr(library, f"pairwise_mask_cost_{DTYPE_NAMES[logits.dtype]}_{DTYPE_NAMES[labels.dtype]}")
    kernel.restype = None
    pointers = (pointer(t) for t in (logits.contiguous(), labels.contiguous(), ce, dice))
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


def emulated_masked_attention(
    library, q, k, v, grad_out, mask_logits, attn_mask, threshold_logit, scale, sm_count
):
    """out, lse and the q, k, v gradients of the CUDA op's forward and backward launch sequences."""
    batch, heads, queries, head_dim = q.shape
    mask_heads = 1 if attn_mask is None else attn_mask.shape[1]
    sizes = (ctypes.c_int64 * 6)(batch, heads, queries, k.shape[2], head_dim, mask_heads)
    name = DTYPE_NAMES[q.dtype]
    masks = (pointer(mask_logits), pointer(attn_mask))
    out, lse = torch.empty_like(q), torch.empty(batch, heads, queries)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    constants = (ctypes.c_float(threshold_logit), ctypes.c_float(scale))
    forward = getattr(library, f"masked_attention_forward_{name}")
    forward(
        sizes,
        ctypes.c_int64(sm_count),
        *map(pointer, (q, k, v)),
        *masks,
        *constants,
        pointer(out),
        pointer(lse),
    )
    backward = getattr(library, f"masked_attention_backward_{name}")
    tensors = (grad_out, q, k, v, out, lse)
    backward(
        sizes, ctypes.c_int64(sm_count), *map(pointer, tensors), *masks, *constants, *map(pointer, grads)
    )
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["logits", "bool", "bool_per_head"])
@pytest.mark.parametrize(
    "shape", [(1, 2, 1, 1, 16), (2, 2, 5, 7, 32), (1, 2, 70, 300, 32), (1, 1, 9, 130, 64)]
)
@pytest.mark.parametrize("sm_count", [1, 132])
def test_masked_attention_kernels_match_reference(attention_library, dtype, mask_kind, shape, sm_count):
    """Every row case of the mask (fully blocked, NaN, a single key at the threshold, random density), a partial
    query tile (70 queries in tiles of 64), keys that end inside a key tile, the dk/dv kernel's partial query
    stage, and one key split or up to three (a 132-SM GPU), for each head dim the kernels take."""
    batch, heads, queries, keys, head_dim = shape
    q, k, v, grad_out = attention_tests.make_inputs(batch, heads, queries, keys, head_dim, dtype)
    threshold = attention_tests.mask_threshold(dtype)
    threshold_logit = threshold_to_logit(threshold)
    logits = attention_tests.make_mask_logits(batch, queries, keys, threshold_logit, dtype)
    mask_logits, attn_mask = logits, None
    if mask_kind == "bool":
        mask_logits, attn_mask = None, ~(logits.double() >= threshold_logit).unsqueeze(1)
    elif mask_kind == "bool_per_head":
        attn_mask = torch.rand(batch, heads, queries, keys) < torch.rand(batch, heads, queries, 1)
        attn_mask[:, 0, 0] = True  # a fully blocked row in one head only
        mask_logits = None
    scale = head_dim**-0.5

    out, lse, grads = emulated_masked_attention(
        attention_library, q, k, v, grad_out, mask_logits, attn_mask, threshold_logit, scale, sm_count
    )
    ref_out, ref_lse, ref_grads = attention_tests.reference_results(
        q, k, v, grad_out, mask_logits, attn_mask, threshold, scale
    )
    atol, rtol = attention_tests.TOLERANCES[dtype]
    lse_tolerance = attention_tests.LSE_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=lse_tolerance, rtol=lse_tolerance)
    for name, grad, ref_grad in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        torch.testing.assert_close(
            grad.double(), ref_grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )

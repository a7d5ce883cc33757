"""The built library: every kernel op is registered for CPU, and for CUDA when the build had nvcc."""

import os
import shutil
import subprocess
import sys

import pytest

from m2f_kernels import _backend

KERNEL_OPS = [
    "_ms_deform_attn_forward",
    "_ms_deform_attn_backward",
    "_masked_attention_forward",
    "_masked_attention_backward",
    "_point_sample_forward",
    "_point_sample_backward",
    "_point_mask_loss_forward",
    "_point_mask_loss_backward",
    "_pairwise_mask_cost",
]
CUDA_ONLY_OPS = ["_ms_deform_attn_fused_forward", "_ms_deform_attn_fused_backward"]


def cuda_build_expected() -> bool:
    """setup.py builds the CUDA kernels whenever nvcc is there, unless told to skip them."""
    prebuilt = (_backend.library_path() or "").endswith(".so")
    nvcc_found = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    return prebuilt and nvcc_found and os.environ.get("M2F_KERNELS_SKIP_CUDA", "0") != "1"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cpu_kernels_are_registered(op):
    assert _backend.load_library(), _backend._library.get("error")
    assert _backend.has_kernel(op, "cpu")


@pytest.mark.skipif(not cuda_build_expected(), reason="built without nvcc")
@pytest.mark.parametrize("op", KERNEL_OPS + CUDA_ONLY_OPS)
def test_cuda_kernels_are_registered(op):
    assert _backend.has_kernel(op, "cuda"), f"{op} has no CUDA kernel: was the library built with nvcc?"


def test_import_never_compiles(tmp_path):
    """Importing the package with an empty build directory and JIT forced must not start a build."""
    env = dict(os.environ, M2F_KERNELS_JIT="1", M2F_KERNELS_BUILD_DIR=str(tmp_path / "jit"))
    code = "import m2f_kernels, m2f_kernels.reference; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"
    assert not (tmp_path / "jit").exists()


def test_missing_library_warns_once_and_falls_back(tmp_path):
    code = (
        "import warnings, torch, m2f_kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    v = torch.randn(1, 4, 1, 2); s = torch.tensor([[2, 2]]); i = torch.tensor([0])\n"
        "    loc = torch.rand(1, 3, 1, 1, 2, 2); w = torch.rand(1, 3, 1, 1, 2)\n"
        "    for _ in range(3): m2f_kernels.ms_deform_attn(v, s, i, loc, w)\n"
        "print(m2f_kernels.available_backends())\n"
        "print(sum('not available' in str(w.message) for w in caught))\n"
        "print(next(str(w.message) for w in caught if 'not available' in str(w.message)))\n"
    )
    env = dict(os.environ, M2F_KERNELS_JIT="1", M2F_KERNELS_NO_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    backends, warnings_count, message = result.stdout.strip().splitlines()
    assert "'cpu'" not in backends and backends.endswith("'torch']")
    assert warnings_count == "1"
    assert "M2F_KERNELS_JIT=1 skips the prebuilt library; M2F_KERNELS_NO_JIT=1 forbids building it" in message
    assert "pip install" not in message  # the library is there; the switches keep it out


def test_switches_other_than_0_or_1_are_refused():
    code = "import torch, m2f_kernels; m2f_kernels.available_backends()"
    env = dict(os.environ, M2F_KERNELS_NO_JIT="yes")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "M2F_KERNELS_NO_JIT must be 0 or 1, got 'yes'" in result.stderr
    from m2f_kernels.triton import _common

    os.environ["M2F_KERNELS_TRITON_AUTOTUNE"] = "off"
    try:
        with pytest.raises(ValueError, match="M2F_KERNELS_TRITON_AUTOTUNE must be 0 or 1, got 'off'"):
            _common.autotuning()
    finally:
        del os.environ["M2F_KERNELS_TRITON_AUTOTUNE"]

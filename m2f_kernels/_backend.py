"""Finds the compiled kernel library and says which backends can run an op.

Order: the prebuilt library (``m2f_kernels/_C.so`` from ``pip install``) -> a ninja JIT build of csrc/ (source
checkouts only) -> unavailable, with one warning. Importing the package never compiles anything: the library is
looked for the first time an op needs it.

Environment variables:
  M2F_KERNELS_BACKEND     default backend for ``backend="auto"`` (auto, cuda, triton, cpu, torch)
  M2F_KERNELS_JIT=1       ignore the prebuilt library and JIT-build csrc/ (for kernel development)
  M2F_KERNELS_NO_JIT=1    never JIT-build
  M2F_KERNELS_BUILD_DIR   where the JIT build goes (default ~/.cache/m2f_kernels/jit-torch<torch version>)
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ._build_flags import CXX_FLAGS, LINK_FLAGS, NVCC_FLAGS, cuda_library_includes

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent
_lock = threading.Lock()
_library: dict[str, str | None] = {}


def _source_list(kind: str) -> list[str]:
    listing = _SOURCE_ROOT / "csrc" / "sources.txt"
    entries = [line.split() for line in listing.read_text().splitlines() if line.strip() and line[0] != "#"]
    return [str(_SOURCE_ROOT / path) for source_kind, path in entries if source_kind == kind]


def _load_prebuilt() -> str | None:
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so")) + sorted(_PACKAGE_DIR.glob("_C*.pyd"))
    if not candidates:
        return None
    torch.ops.load_library(str(candidates[0]))
    return str(candidates[0])


def _unique_named_sources(sources: list[str], build_dir: Path) -> list[str]:
    """One-line wrappers named after the op directory: ninja needs unique object names (cpu.cpp, cuda.cu...)."""
    wrapper_dir = build_dir / "sources"
    wrapper_dir.mkdir(exist_ok=True)
    wrappers = []
    for source in map(Path, sources):
        wrapper = wrapper_dir / f"{source.parent.name}_{source.name}"
        text = f'#include "{source}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper))
    return wrappers


def _jit_build() -> str:
    from torch.utils import cpp_extension

    if not (_SOURCE_ROOT / "csrc" / "sources.txt").exists():
        raise RuntimeError("no csrc/ sources next to the package (installed without the library)")
    default_dir = Path.home() / ".cache" / "m2f_kernels" / f"jit-torch{torch.__version__}"
    build_dir = Path(os.environ.get("M2F_KERNELS_BUILD_DIR", default_dir))
    build_dir.mkdir(parents=True, exist_ok=True)
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = _unique_named_sources(
        _source_list("cpu") + (_source_list("cuda") if with_cuda else []), build_dir
    )
    logging.getLogger(__name__).warning(
        "m2f_kernels: building the kernel library with ninja in %s", build_dir
    )
    cpp_extension.load(
        name="m2f_kernels_C",
        sources=sources,
        extra_include_paths=[str(_SOURCE_ROOT / "csrc"), *(cuda_library_includes() if with_cuda else [])],
        extra_cflags=CXX_FLAGS + (["-DM2F_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_ldflags=list(LINK_FLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return str(build_dir)


def switch(name: str, default: bool = False) -> bool:
    """An on/off environment variable: "1" on, "0" off, unset `default`; anything else is refused, not ignored."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def load_library() -> bool:
    """Loads the compiled library once; returns whether it is available."""
    with _lock:
        if "path" in _library:
            return _library["path"] is not None
        jit, no_jit = switch("M2F_KERNELS_JIT"), switch("M2F_KERNELS_NO_JIT")
        errors = ["M2F_KERNELS_JIT=1 skips the prebuilt library"] if jit else []
        path = None
        if not jit:
            try:
                path = _load_prebuilt()
            except OSError as error:
                errors.append(f"prebuilt library failed to load: {error}")
        if path is None and no_jit:
            errors.append("M2F_KERNELS_NO_JIT=1 forbids building it")
        elif path is None:
            try:
                path = _jit_build()
            except Exception as error:
                errors.append(f"JIT build failed: {error}")
        _library["path"] = path
        _library["error"] = None if path else "; ".join(errors) or "not built"
        if path is None:
            warnings.warn(
                "m2f_kernels: the compiled kernel library is not available "
                f"({_library['error']}); using the Triton and PyTorch backends instead"
                + ("" if jit or no_jit else ". Build it with `pip install --no-build-isolation -e .`."),
                stacklevel=3,
            )
        return path is not None


def library_path() -> str | None:
    """Where the loaded library came from (file or JIT build dir), None if unavailable."""
    load_library()
    return _library["path"]


def cpu_isa() -> str | None:
    """The x86-64 level the C++ CPU kernels run at: "avx512", "avx2" or "baseline" (the environment variable
    M2F_KERNELS_CPU_ISA=avx2|baseline lowers it; other CPUs always run the baseline build). None without
    the compiled library."""
    if not load_library() or not hasattr(torch.ops.m2f_kernels, "_cpu_isa"):
        return None
    return torch.ops.m2f_kernels._cpu_isa()


def has_kernel(kernel_name: str, device_type: str) -> bool:
    """Whether the C++ library registers ``m2f_kernels::<kernel_name>`` for "cpu" or "cuda"."""
    if not load_library():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    qualname = f"m2f_kernels::{kernel_name}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


@functools.cache
def triton_module(op: str):
    """The op's Triton module, or None if Triton (or the module) is missing."""
    try:
        return importlib.import_module(f"m2f_kernels.triton.{op}")
    except ImportError:
        return None


def triton_runs_on(device_type: str) -> bool:
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends that can run here: "cuda", "triton", "cpu" (compiled library) and "torch" (always)."""
    names = []
    if torch.cuda.is_available() and has_kernel("_ms_deform_attn_forward", "cuda"):
        names.append("cuda")
    if triton_module("ms_deform_attn") is not None and triton_runs_on(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):
        names.append("triton")
    if has_kernel("_ms_deform_attn_forward", "cpu"):
        names.append("cpu")
    names.append("torch")
    return names


def _without_autocast(kernel: Callable, device_type: str) -> Callable:
    """``kernel`` run with autocast off, like the compiled kernels: the ops apply autocast to their inputs
    themselves, and a PyTorch implementation must not then run its matrix products in 16 bits."""
    if not torch.amp.is_autocast_available(device_type):
        return kernel

    @functools.wraps(kernel)
    def run(*args):
        with torch.autocast(device_type, enabled=False):
            return kernel(*args)

    return run


_INTERPRETER_LOCK = threading.RLock()


def _one_call_at_a_time(kernel: Callable) -> Callable:
    """``kernel`` run under a process-wide lock: Triton's interpreter keeps the launch being run in globals,
    so launches from two threads at once fail or read each other's grid."""

    @functools.wraps(kernel)
    def run(*args):
        with _INTERPRETER_LOCK:
            return kernel(*args)

    return run


class OpKernels:
    """Backend lookup for one op: C++ library, Triton module or the PyTorch ("torch") implementation.

    ``torch_kernels`` maps each stage ("forward", "backward", or the op name for single-stage ops) to the
    PyTorch implementation with the same signature as the compiled kernel.
    """

    def __init__(self, op: str, torch_kernels: dict[str, Callable]):
        self.op = op
        self.torch_kernels = torch_kernels
        self._resolved: dict[tuple, Callable] = {}

    def _kernel_name(self, stage: str) -> str:
        return self.op if stage == self.op else f"{self.op}_{stage}"

    def _triton_kernel(self, stage: str) -> Callable | None:
        module = triton_module(self.op)
        return getattr(module, self._kernel_name(stage), None) if module is not None else None

    def _check_triton_interpreter(self, interpreted: bool) -> None:
        """Raises unless the Triton kernels were defined with TRITON_INTERPRET as it is now."""
        from .triton._common import IMPORTED_INTERPRETED

        if interpreted != IMPORTED_INTERPRETED:
            raise RuntimeError(
                f"m2f_kernels.{self.op}: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now, but the "
                f"Triton kernels were imported {'with' if IMPORTED_INTERPRETED else 'without'} "
                "TRITON_INTERPRET=1 and Triton fixes that choice when a kernel is defined: set TRITON_INTERPRET "
                "before the first call of an op in this process"
            )

    def available(self, backend: str, device_type: str, stage: str = "forward") -> bool:
        """Whether ``backend`` (not "auto") can run ``stage`` on ``device_type`` tensors here."""
        if backend == "torch":
            return True
        if backend == "triton":
            return triton_runs_on(device_type) and self._triton_kernel(stage) is not None
        return backend == device_type and has_kernel("_" + self._kernel_name(stage), device_type)

    def resolve(self, backend: str, device: torch.device, stage: str = "forward") -> str:
        """Turns "auto" (or the M2F_KERNELS_BACKEND default) into a concrete backend that can run."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = os.environ.get("M2F_KERNELS_BACKEND", "auto")
            if backend not in BACKENDS:
                raise ValueError(f"M2F_KERNELS_BACKEND must be one of {BACKENDS}, got {backend!r}")
        device_type = device.type
        if backend == "auto":
            order = ("cuda", "triton", "torch") if device_type == "cuda" else ("cpu", "torch")
            return next(name for name in order if self.available(name, device_type, stage))
        if not self.available(backend, device_type, stage):
            raise RuntimeError(
                f"m2f_kernels.{self.op}: backend {backend!r} cannot run {stage} on {device_type} tensors here "
                f"(available backends: {available_backends()}; Triton on CPU needs TRITON_INTERPRET=1)"
            )
        return backend

    def get(self, backend: str, device: torch.device, stage: str = "forward") -> Callable:
        """The callable for ``stage`` on the resolved backend.

        Remembered per (backend, device type, stage) and the environment variables that steer the choice,
        so that an op call does not look the backend up again (tens of microseconds of host time).
        """
        key = (
            backend,
            device.type,
            stage,
            os.environ.get("M2F_KERNELS_BACKEND"),
            os.environ.get("TRITON_INTERPRET"),
        )
        kernel = self._resolved.get(key)
        if kernel is None:
            kernel = self._resolved[key] = self._lookup(backend, device, stage)
        return kernel

    def _lookup(self, backend: str, device: torch.device, stage: str) -> Callable:
        backend = self.resolve(backend, device, stage)
        if backend == "torch":
            return _without_autocast(self.torch_kernels[stage], device.type)
        if backend == "triton":
            interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
            self._check_triton_interpreter(interpreted)
            kernel = self._triton_kernel(stage)
            return _one_call_at_a_time(kernel) if interpreted else kernel
        return getattr(torch.ops.m2f_kernels, "_" + self._kernel_name(stage))

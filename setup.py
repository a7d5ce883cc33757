"""Builds the m2f_kernels C++ library (CPU always, CUDA when nvcc is available).

Switches (environment variables):
  FORCE_CUDA=1              build the CUDA sources even if no nvcc/CUDA_HOME is detected
  M2F_KERNELS_SKIP_CUDA=1   never build the CUDA sources
  TORCH_CUDA_ARCH_LIST      target architectures, e.g. "8.0;9.0"
  MAX_JOBS                  parallel compile jobs (ninja)
  M2F_KERNELS_NO_EXTENSION=1  install the Python packages only (the Makefile then builds the library in
                            place with `setup.py build_ext --inplace`, incrementally)
"""

import os
import runpy
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
FLAGS = runpy.run_path(str(ROOT / "m2f_kernels" / "_build_flags.py"))  # without importing the package


def read_sources(kind: str) -> list[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    return [path for source_kind, path in entries if source_kind == kind]


def switch(name: str) -> bool:
    """An on/off environment variable: "1" on, "0" or unset off; anything else is refused, not ignored."""
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise SystemExit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def want_cuda() -> bool:
    if switch("M2F_KERNELS_SKIP_CUDA"):
        return False
    if switch("FORCE_CUDA"):
        return True
    return cpp_extension.CUDA_HOME is not None and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()


def extension():
    cxx_flags = FLAGS["CXX_FLAGS"]
    include_dirs = [str(ROOT / "csrc")]
    if want_cuda():
        return cpp_extension.CUDAExtension(
            "m2f_kernels._C",
            sources=read_sources("cpu") + read_sources("cuda"),
            include_dirs=include_dirs + FLAGS["cuda_library_includes"](),
            define_macros=[("M2F_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": FLAGS["NVCC_FLAGS"]},
            extra_link_args=FLAGS["LINK_FLAGS"],
        )
    return cpp_extension.CppExtension(
        "m2f_kernels._C",
        sources=read_sources("cpu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=FLAGS["LINK_FLAGS"],
    )


setup(
    ext_modules=[] if switch("M2F_KERNELS_NO_EXTENSION") else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)},
)

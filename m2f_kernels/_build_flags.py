"""Compiler flags of the kernel library, shared by setup.py and the JIT build (_backend.py). Standard library
only: setup.py reads this file without importing the package."""

from pathlib import Path

# -Wno-psabi: the vectorized CPU loops pass vector types only between inline helpers compiled for the same
# x86-64 level, so the compiler's notes that their calling convention differs between levels do not apply.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
NVCC_FLAGS = [
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
LINK_FLAGS = ["-fopenmp"]


def cuda_library_includes() -> list[str]:
    """Headers of the pip CUDA libraries (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(path) for base in nvidia.__path__ for path in Path(base).glob("cu*/include")]

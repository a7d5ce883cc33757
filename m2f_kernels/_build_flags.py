"""Compiler flags of the kernel library, shared by setup.py and the JIT build (_backend.py). Plain constants:
setup.py reads this file without importing the package."""

CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
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

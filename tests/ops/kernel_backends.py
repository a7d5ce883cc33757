"""The kernel backends that run an op on CPU tensors here; the backend tests parametrize over them."""

from m2f_kernels import _backend


def cpu_kernel_backends(op_name: str, kernel_name: str | None = None) -> list[str]:
    """["cpu"] when the C++ kernel `kernel_name` (default `_<op_name>_forward`) is built, plus "triton" when
    the op's Triton kernels run on CPU (under TRITON_INTERPRET=1)."""
    names = []
    if _backend.has_kernel(kernel_name or f"_{op_name}_forward", "cpu"):
        names.append("cpu")
    if _backend.triton_module(op_name) is not None and _backend.triton_runs_on("cpu"):
        names.append("triton")
    return names

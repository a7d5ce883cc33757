"""Argument checks, autocast handling, the eager call path and the autograd helper shared by the op modules."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import numbers
import os
from collections.abc import Callable, Sequence

import torch
from torch._library.custom_ops import CustomOpDef
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import statically_known_true

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MAX = 2**31 - 1


def check_tensor(name: str, tensor, *, ndim: int | None = None, floating: bool = False) -> None:
    """Raises TypeError/ValueError naming ``name`` unless it is a tensor of the given rank and kind."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if floating and tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    # Size by size (max() would compare the sizes with one another), and only where known without a guard:
    # torch.export refuses a dynamic size that a guard bounds below its own range.
    if any(statically_known_true(size > INT32_MAX) for size in tensor.shape):
        raise ValueError(f"{name} has a dimension beyond int32 range: shape {tuple(tensor.shape)}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None], meaning: str) -> None:
    """Raises ValueError unless ``tensor.shape`` matches ``expected`` (None matches any size)."""
    actual = tuple(tensor.shape)
    if len(actual) != len(expected) or any(e is not None and a != e for a, e in zip(actual, expected)):
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape ({shown}) ({meaning}), got {actual}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {reference_name} is on {reference.device}; "
                "all inputs must be on one device"
            )


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but {reference_name} has {reference.dtype}; "
                "floating inputs must share one dtype (or run under torch.autocast)"
            )


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` when autocast is on there, else None (also for devices without
    autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` while it is on there; else it does nothing."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def cast_for_autocast(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under autocast, casts floating tensors to the autocast dtype so the op runs natively in it."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        for t in tensors
    )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate and return losses in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_target_dtype(targets: torch.Tensor, logits: torch.Tensor) -> torch.dtype:
    """The dtype floating ``targets`` are passed to the kernels in: the logits' dtype when they have it, else
    the accumulation dtype, so that float32 soft targets are never narrowed to float16/bfloat16 logits."""
    return logits.dtype if targets.dtype == logits.dtype else accumulate_dtype(logits.dtype)


def real_number(name: str, value) -> float:
    """``value`` as a float; TypeError naming ``name`` unless it is a real number (a bool, a string or None
    is not one)."""
    if value is None or isinstance(value, bool | str | bytes):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def whole_number(name: str, value, minimum: int) -> int:
    """``value`` as an int (Python and numpy ints, not bool) of at least ``minimum``; else ValueError naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def binary_mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool or uint8 mask as uint8 0/1, any nonzero value read as 1: a bool mask viewed in place, a uint8
    one clamped at 1 (unsigned, so every nonzero byte becomes 1; a copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask.clamp(max=1)


def check_unit_interval(name: str, tensor: torch.Tensor) -> None:
    """ValueError naming ``name`` unless the values of a CPU tensor lie in [0, 1], up to 16 ulps of rounding
    (bilinear samples of a 0/1 mask may reach 1 + 1 ulp); NaN passes, and the other values are still
    checked. Checked by the graph in compiled calls. Values on an accelerator are not read: that would wait
    for the device."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    slack = 16 * torch.finfo(tensor.dtype).eps
    if torch.compiler.is_compiling():
        inside = ((tensor >= -slack) & (tensor <= 1 + slack)) | tensor.isnan()
        torch._assert_async(inside.all(), f"{name} must hold values in [0, 1]")
        return
    low, high = torch.aminmax(tensor)
    if low.isnan():  # one NaN makes both NaN: the range of the other values, in a second pass
        values = tensor[~tensor.isnan()]
        if values.numel() == 0:
            return
        low, high = torch.aminmax(values)
    if low < -slack or high > 1 + slack:
        raise ValueError(
            f"{name} must hold values in [0, 1], got values from {low.item():g} to {high.item():g}"
        )


def check_index(name: str, tensor) -> torch.Tensor:
    """Integer index tensors are accepted in any integer dtype; returned as contiguous int64."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    return tensor.to(torch.int64).contiguous()


_reference_thread: concurrent.futures.ThreadPoolExecutor | None = None


def _forget_reference_thread() -> None:
    """In a forked child: the parent's worker thread does not exist there, so its executor would never run."""
    global _reference_thread
    _reference_thread = None


os.register_at_fork(after_in_child=_forget_reference_thread)


def _graphs_build_here() -> bool:
    """Whether autograd records on this thread: not inside a custom op's kernel called by the dispatcher,
    which excludes the autograd keys for its thread."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1.0).requires_grad


def reference_vjp(
    function: Callable, inputs: Sequence, wrt: Sequence[int], grad_outputs: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``function(*inputs)`` w.r.t. ``inputs[i] for i in wrt``, by autograd.

    In plain eager mode the graph is built and differentiated on the calling thread (a reentrant backward).
    Op kernels called by the dispatcher run with the autograd keys excluded for their thread; there the graph
    is built in a worker thread (on the caller's CUDA stream). Unused inputs get zeros.
    """
    stream = None
    devices = {t.device for t in inputs if isinstance(t, torch.Tensor)}
    cuda_devices = [d for d in devices if d.type == "cuda"]
    if cuda_devices:
        stream = torch.cuda.current_stream(cuda_devices[0])

    def run():
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context, torch.enable_grad():
            leaves = [x.detach().requires_grad_() if i in wrt else x for i, x in enumerate(inputs)]
            outputs = function(*leaves)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                [leaves[i] for i in wrt],
                [g.to(o.dtype) for o, g in pairs],
                allow_unused=True,
            )
        return tuple(torch.zeros_like(inputs[i]) if g is None else g.contiguous() for i, g in zip(wrt, grads))

    if _graphs_build_here():
        return run()
    global _reference_thread
    if _reference_thread is None:
        _reference_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="m2f_kernels_vjp")
    return _reference_thread.submit(run).result()


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def plain_eager(args: Sequence) -> bool:
    """Whether an op call with ``args`` is seen by eager autograd alone: nothing compiles, exports, traces or
    profiles it, no dispatch or function mode and no functorch transform is active, and every tensor is a
    plain one with storage: not meta, not a batched gradient (``is_grads_batched``, old vmap)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.autograd._profiler_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(
        type(arg) in _PLAIN_TENSOR_TYPES and not arg.is_meta and not _is_legacy_batched(arg)
        for arg in args
        if isinstance(arg, torch.Tensor)
    )


def _has_jvp_wrapper(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is wrapped, at any depth, as a dual tensor of a torch.func.jvp level."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or []
    jvp_levels = {i.level() for i in stack if i.key() == functorch.TransformType.Jvp}
    while (level := functorch.maybe_get_level(tensor)) != -1:
        if level in jvp_levels and functorch.is_gradtrackingtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def check_no_forward_ad(name: str, args: Sequence) -> None:
    """NotImplementedError when an argument carries a forward-mode tangent (torch.autograd.forward_ad dual
    tensors, torch.func.jvp / jacfwd): the ops have no forward-mode formula, and the dispatcher would drop
    the tangent silently. Call inside a forward-AD level only (forward_ad._current_level >= 0)."""
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    try:
        dual = any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    except RuntimeError:  # under vmap inside jvp tangents cannot be read: a jvp-level wrapper counts as one
        dual = any(_has_jvp_wrapper(t) for t in tensors)
    if dual:
        raise NotImplementedError(
            f"{name}: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not supported; "
            "differentiate with backward() or torch.autograd.grad"
        )


def check_no_functorch_grad(name: str) -> None:
    """NotImplementedError inside torch.func.grad / vjp / jacrev / hessian, whose error about the custom ops'
    generated autograd.Function would name nothing the caller wrote."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(i.key() == torch._C._functorch.TransformType.Grad for i in stack):
        raise NotImplementedError(
            f"{name}: torch.func.grad / vjp / jacrev / hessian are not supported; differentiate with "
            "backward() or torch.autograd.grad"
        )


@functools.cache
def _eager_autograd(op: CustomOpDef) -> type[torch.autograd.Function]:
    """An autograd.Function running ``op``'s own implementation, setup_context and backward."""

    def forward(ctx, *args):
        output = op._init_fn(*args)
        op._setup_context_fn(ctx, args, output)
        return output

    return type(
        f"{op._name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(op._backward_fn)},
    )


def call_op(op: CustomOpDef, *args):
    """``op(*args)`` for a ``torch.library.custom_op``, with its registered autograd.

    In plain eager mode (``plain_eager``) the op's Python implementation runs without the dispatcher: the same
    kernels and the same backward, without the custom-op machinery's Python hops (benchmarks/
    bench_call_overhead.py). Everything else (torch.compile, torch.export, tracing, the profiler, modes,
    subclasses) goes through the registered op, so those see it as one op. Reads the op's implementation,
    setup_context and backward from CustomOpDef's private attributes (torch 2.14).
    """
    if forward_ad._current_level >= 0:  # inside torch.func.jvp too
        check_no_forward_ad(op._name, args)
    if not torch.compiler.is_compiling():  # the interpreter stack is not traceable
        check_no_functorch_grad(op._name)
    if not plain_eager(args):
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args):
        if op._backward_fn is None:
            return op(*args)  # no autograd formula: the op's own handling of inputs that need grad
        return _eager_autograd(op).apply(*args)
    return op._init_fn(*args)

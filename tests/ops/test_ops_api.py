"""The public ops: torch.library registration (opcheck), dispatch, autograd, empty inputs and bad input."""

import math
import os
import types

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.testing._internal.two_tensor import TwoTensor
from torch.utils._python_dispatch import TorchDispatchMode

import m2f_kernels
from m2f_kernels import _backend, reference
from m2f_kernels.ops import (
    masked_attention,
    ms_deform_attn,
    ms_deform_attn_fused,
    pairwise_mask_cost,
    point_mask_loss,
    point_sample,
)
from m2f_kernels.ops._common import call_op, plain_eager
from m2f_kernels.reference.masked_attention import threshold_to_logit

CPU_BACKENDS = [name for name in ("torch", "cpu") if name in m2f_kernels.available_backends()]


def msda_inputs(dtype=torch.float64, queries=3, requires_grad=False):
    shapes = torch.tensor([[3, 4], [2, 3]])
    starts = torch.tensor([0, 12])
    value = torch.randn(2, 18, 2, 3, dtype=dtype)
    locations = torch.rand(2, queries, 2, 2, 2, 2, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(2, queries, 2, 2, 2, dtype=dtype)
    for t in (value, locations, weights):
        t.requires_grad_(requires_grad)
    return value, shapes, starts, locations, weights


def fused_inputs(dtype=torch.float64, requires_grad=False):
    value, shapes, starts, _, _ = msda_inputs(dtype)
    ref = torch.rand(2, 3, 2, 2, dtype=dtype)
    offsets = torch.randn(2, 3, 2, 2, 2, 2, dtype=dtype)
    logits = torch.randn(2, 3, 2, 4, dtype=dtype)
    for t in (value, ref, offsets, logits):
        t.requires_grad_(requires_grad)
    return value, shapes, starts, ref, offsets, logits


def attention_inputs(dtype=torch.float64, requires_grad=False):
    q = torch.randn(2, 2, 3, 4, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 5, 4, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 5, 4, dtype=dtype, requires_grad=requires_grad)
    logits = torch.randn(2, 3, 5, dtype=dtype)
    logits[0, 0] = -3.0
    return q, k, v, logits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_every_op(backend):
    value, shapes, starts, locations, weights = msda_inputs(requires_grad=True)
    torch.library.opcheck(
        torch.ops.m2f_kernels.ms_deform_attn, (value, shapes, starts, locations, weights, backend)
    )
    value, shapes, starts, ref, offsets, logits = fused_inputs(requires_grad=True)
    torch.library.opcheck(
        torch.ops.m2f_kernels.ms_deform_attn_fused, (value, shapes, starts, ref, offsets, logits, backend)
    )
    q, k, v, mask_logits = attention_inputs(requires_grad=True)
    torch.library.opcheck(
        torch.ops.m2f_kernels.masked_attention, (q, k, v, mask_logits, None, 0.0, 0.5, backend)
    )
    image = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(2, 7, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.m2f_kernels.point_sample, (image, coords, backend))
    mask = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(2, 8, 10) > 0.5).to(torch.uint8)
    torch.library.opcheck(torch.ops.m2f_kernels.point_mask_loss, (mask, targets, coords.detach(), backend))
    pred = torch.randn(4, 9, dtype=torch.float64)
    labels = torch.rand(3, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.m2f_kernels.pairwise_mask_cost, (pred, labels, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_float32_targets_beside_bfloat16_logits(backend):
    mask = torch.randn(2, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.rand(2, 8, 10)
    coords = torch.rand(2, 7, 2)
    torch.library.opcheck(torch.ops.m2f_kernels.point_mask_loss, (mask, targets, coords, backend))
    pred = torch.randn(4, 9, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.m2f_kernels.pairwise_mask_cost, (pred, torch.rand(3, 9), backend))


def op_calls(backend):
    """(custom op, arguments, indices of the differentiable inputs) for every op, float64."""
    value, shapes, starts, locations, weights = msda_inputs(requires_grad=True)
    fused = fused_inputs(requires_grad=True)
    q, k, v, mask_logits = attention_inputs(requires_grad=True)
    image = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(2, 7, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(2, 8, 10) > 0.5).to(torch.uint8)
    pred, labels = torch.randn(4, 9, dtype=torch.float64), torch.rand(3, 9, dtype=torch.float64)
    return [
        (ms_deform_attn._ms_deform_attn, (value, shapes, starts, locations, weights, backend), (0, 3, 4)),
        (ms_deform_attn_fused._ms_deform_attn_fused, (*fused, backend), (0, 3, 4, 5)),
        (masked_attention._masked_attention, (q, k, v, mask_logits, None, 0.0, 0.5, backend), (0, 1, 2)),
        (point_sample._point_sample, (image, coords, backend), (0, 1)),
        (point_mask_loss._point_mask_loss, (mask, targets, coords.detach(), backend), (0,)),
        (pairwise_mask_cost._pairwise_mask_cost, (pred, labels, backend), ()),
    ]


def _outputs_and_grads(call, args, wrt):
    outputs = call(*args)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    if not wrt:
        return list(outputs)
    loss = sum((output * torch.linspace(-1, 2, output.numel()).view_as(output)).sum() for output in outputs)
    return [*outputs, *torch.autograd.grad(loss, [args[i] for i in wrt])]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_fast_path_matches_the_dispatcher(backend):
    for op, args, wrt in op_calls(backend):
        fast = _outputs_and_grads(lambda *a, op=op: call_op(op, *a), args, wrt)
        dispatched = _outputs_and_grads(op, args, wrt)
        assert len(fast) == len(dispatched)
        for got, want in zip(fast, dispatched):
            assert torch.equal(got, want), op


def test_double_backward_raises_on_the_fast_path():
    """The backward ops have no autograd formula: a second derivative must fail loudly, not come out as
    zero, whichever path ran the first backward."""
    q, k, v, logits = attention_inputs(requires_grad=True)
    out = m2f_kernels.masked_attention(q, k, v, logits, backend=CPU_BACKENDS[-1])
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad_q.sum(), q)


def _record_custom_op_calls(monkeypatch):
    calls = []
    original = CustomOpDef.__call__

    def recording(self, *args, **kwargs):
        calls.append(self._qualname)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CustomOpDef, "__call__", recording)
    return calls


def _attention_step():
    q, k, v, logits = attention_inputs(requires_grad=True)
    m2f_kernels.masked_attention(q, k, v, logits).sum().backward()
    image = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    m2f_kernels.point_sample(image, torch.rand(1, 3, 2, dtype=torch.float64)).sum().backward()


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    calls = _record_custom_op_calls(monkeypatch)
    _attention_step()
    assert calls == []


class _CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _IdleFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_modes_and_the_profiler_see_the_custom_ops(monkeypatch):
    calls = _record_custom_op_calls(monkeypatch)
    with _CountingMode() as mode:
        _attention_step()
    expected = [
        "m2f_kernels::masked_attention",
        "m2f_kernels::masked_attention_backward",
        "m2f_kernels::point_sample",
        "m2f_kernels::point_sample_backward",
    ]
    assert calls == expected
    assert {"m2f_kernels.masked_attention", "m2f_kernels.point_sample_backward"} <= set(mode.ops)
    calls.clear()
    with _IdleFunctionMode():
        _attention_step()
    assert set(expected[::2]) <= set(calls)  # the engine runs the backward outside function modes
    calls.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _attention_step()
    assert calls == expected
    assert "m2f_kernels::masked_attention" in {event.key for event in profile.key_averages()}


def test_plain_eager_is_false_for_transforms_fakes_and_subclasses():
    x = torch.randn(3)
    assert plain_eager((x, torch.nn.Parameter(x), 1.0, None))
    assert torch.func.vmap(lambda t: torch.tensor(plain_eager((t,))))(x).tolist() == [False] * 3
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(x)
        assert not plain_eager((fake,))
    assert not plain_eager((fake,))
    assert not plain_eager((TwoTensor(x, x),))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_public_ops_match_reference_with_gradients(backend):
    inputs = msda_inputs(requires_grad=True)
    out = m2f_kernels.ms_deform_attn(*inputs, backend=backend)
    expected = reference.ms_deform_attn(*inputs)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[0], inputs[3], inputs[4]], grad)
    expected_grads = torch.autograd.grad(expected, [inputs[0], inputs[3], inputs[4]], grad)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)

    inputs = fused_inputs(requires_grad=True)
    out = m2f_kernels.ms_deform_attn_fused(*inputs, backend=backend)
    expected = reference.ms_deform_attn_fused(*inputs)
    torch.testing.assert_close(out, expected)
    wrt = [inputs[0], inputs[3], inputs[4], inputs[5]]
    for got, want in zip(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
        torch.testing.assert_close(got, want)

    q, k, v, logits = attention_inputs(requires_grad=True)
    out = m2f_kernels.masked_attention(q, k, v, logits, backend=backend)
    expected, _ = reference.masked_attention(q, k, v, logits)
    torch.testing.assert_close(out, expected)
    for got, want in zip(
        torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ CPU kernels not built")
def test_cpu_isa_environment_variable_lowers_the_level(monkeypatch):
    monkeypatch.delenv("M2F_KERNELS_CPU_ISA", raising=False)
    native = m2f_kernels.cpu_isa()
    assert native in ("avx512", "avx2", "baseline")
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", "baseline")
    assert m2f_kernels.cpu_isa() == "baseline"
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", "avx2")
    assert m2f_kernels.cpu_isa() == ("baseline" if native == "baseline" else "avx2")
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", "avx512")  # never raises the level
    assert m2f_kernels.cpu_isa() == native
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", "AVX2")
    with pytest.raises(
        RuntimeError, match="M2F_KERNELS_CPU_ISA must be avx512, avx2 or baseline, got 'AVX2'"
    ):
        m2f_kernels.ms_deform_attn(*msda_inputs(torch.float32), backend="cpu")


def test_empty_inputs_give_empty_or_zero_results():
    value, shapes, starts, locations, weights = msda_inputs(queries=0, requires_grad=True)
    out = m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.shape == (2, 0, 6)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))
    ce, dice = m2f_kernels.pairwise_mask_cost(torch.randn(4, 5), torch.zeros(0, 5))
    assert ce.shape == dice.shape == (4, 0)
    mask = torch.randn(0, 4, 4, requires_grad=True)
    ce, dice = m2f_kernels.point_mask_loss(mask, torch.zeros(0, 8, 8), torch.rand(0, 10, 2), 1.0)
    assert ce.item() == 0.0 and dice.item() == 0.0
    ce.backward()
    assert mask.grad is not None and mask.grad.shape == mask.shape


@pytest.mark.parametrize(
    "shape", [(0, 3, 5, 16), (2, 0, 5, 16), (2, 3, 0, 16), (2, 3, 5, 0)], ids=["B0", "Q0", "K0", "d0"]
)
@pytest.mark.parametrize("mask_kind", ["logits", "bool", "bool_per_head", "none"])
def test_masked_attention_of_empty_inputs(shape, mask_kind):
    """No batch, no query, no key or no head dim, with each kind of mask: the output is empty or zero, and so
    are the gradients."""
    batch, queries, keys, head_dim = shape
    q = torch.randn(batch, 2, queries, head_dim, requires_grad=True)
    k = torch.randn(batch, 2, keys, head_dim, requires_grad=True)
    v = torch.randn(batch, 2, keys, head_dim, requires_grad=True)
    masks = {
        "logits": {"mask_logits": torch.randn(batch, queries, keys)},
        "bool": {"attn_mask": torch.zeros(batch, queries, keys, dtype=torch.bool)},
        "bool_per_head": {"attn_mask": torch.zeros(batch * 2, queries, keys, dtype=torch.bool)},
        "none": {},
    }
    out = m2f_kernels.masked_attention(q, k, v, **masks[mask_kind])
    assert out.shape == (batch, 2, queries, head_dim) and not out.any()
    out.sum().backward()
    assert not q.grad.any() and not k.grad.any() and not v.grad.any()


def test_nan_locations_contribute_nothing():
    value, shapes, starts, locations, weights = msda_inputs()
    locations[:, 1] = float("nan")
    out = m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


def test_non_contiguous_inputs_are_accepted():
    value, shapes, starts, locations, weights = msda_inputs()
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_t.is_contiguous()
    out = m2f_kernels.ms_deform_attn(value_t, shapes, starts, locations, weights)
    torch.testing.assert_close(out, reference.ms_deform_attn(value, shapes, starts, locations, weights))


def test_autocast_runs_in_the_autocast_dtype():
    value, shapes, starts, locations, weights = msda_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.dtype == torch.bfloat16


def test_compile_fullgraph():
    inputs = msda_inputs(dtype=torch.float32, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(value, shapes, starts, locations, weights):
        return m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights).relu().sum()

    layer(*inputs).backward()
    grad = inputs[0].grad.clone()
    inputs[0].grad = None
    m2f_kernels.ms_deform_attn(*inputs).relu().sum().backward()
    torch.testing.assert_close(grad, inputs[0].grad)


def test_backend_selection():
    value, shapes, starts, locations, weights = msda_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights, backend="gpu")
    with pytest.raises(RuntimeError, match="cannot run"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights, backend="cuda")
    auto = m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(auto, reference.ms_deform_attn(value, shapes, starts, locations, weights))


def test_environment_variable_sets_the_default_backend(monkeypatch):
    monkeypatch.setenv("M2F_KERNELS_BACKEND", "torch")
    assert _backend.OpKernels("ms_deform_attn", {}).resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("M2F_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="M2F_KERNELS_BACKEND"):
        _backend.OpKernels("ms_deform_attn", {}).resolve("auto", torch.device("cpu"))


def test_available_backends_lists_the_compiled_library():
    backends = m2f_kernels.available_backends()
    assert backends[-1] == "torch"
    assert ("cpu" in backends) == _backend.has_kernel("_ms_deform_attn_forward", "cpu")


INTERPRETER_SET_LATE_SCRIPT = """
import os, torch, m2f_kernels
q, mask_logits = torch.randn(1, 2, 3, 16), torch.randn(1, 3, 5)
k = torch.randn(1, 2, 5, 16)
try:
    m2f_kernels.masked_attention(q, k, k, mask_logits, backend="triton")
except RuntimeError as error:
    print("without:", error)
os.environ["TRITON_INTERPRET"] = "1"
try:
    m2f_kernels.masked_attention(q, k, k, mask_logits, backend="triton")
except RuntimeError as error:
    print("late:", error)
"""


def test_triton_interpreter_switched_on_after_the_kernels_were_defined_is_named():
    """triton.jit decides at definition whether a kernel is interpreted; switching TRITON_INTERPRET on later
    used to fail inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SET_LATE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr[-2000:]
    assert lines[0].startswith("without:") and "TRITON_INTERPRET=1" in lines[0]
    assert lines[1].startswith("late:") and "imported without TRITON_INTERPRET=1" in lines[1]


# Bad input: a clear error naming the argument.


def test_msda_bad_inputs():
    value, shapes, starts, locations, weights = msda_inputs()
    with pytest.raises(ValueError, match="value must have 4 dimensions"):
        m2f_kernels.ms_deform_attn(value[0], shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="sampling_locations must have shape"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations[:, :, :1], weights)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(TypeError, match="attention_weights has dtype"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights.float())
    with pytest.raises(TypeError, match="value must be float16"):
        m2f_kernels.ms_deform_attn(value.long(), shapes, starts, locations, weights)
    with pytest.raises(TypeError, match="spatial_shapes must be an integer tensor"):
        m2f_kernels.ms_deform_attn(value, shapes.float(), starts, locations, weights)
    with pytest.raises(ValueError, match="cover 17 positions but value has S=18"):
        m2f_kernels.ms_deform_attn(value, torch.tensor([[3, 4], [1, 5]]), starts, locations, weights)
    with pytest.raises(ValueError, match="level_start_index must be the running sum"):
        m2f_kernels.ms_deform_attn(value, shapes, torch.tensor([0, 11]), locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes must be non-negative"):
        m2f_kernels.ms_deform_attn(value, torch.tensor([[-3, -4], [2, 3]]), starts, locations, weights)
    with pytest.raises(TypeError, match=r"sampling_locations must be a torch\.Tensor"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, locations.tolist(), weights)
    meta_locations = locations.to("meta")
    with pytest.raises(ValueError, match="sampling_locations is on meta"):
        m2f_kernels.ms_deform_attn(value, shapes, starts, meta_locations, weights)


@pytest.mark.parametrize("fused", [False, True], ids=["ms_deform_attn", "fused"])
@pytest.mark.parametrize(
    "backend", [b for b in ("torch", "cpu", "triton") if b in m2f_kernels.available_backends()]
)
def test_msda_level_table_is_checked_in_compiled_calls(backend, fused):
    """Compiling traces the ops with tables that hold no values; the ops check the real ones when they run,
    so a wrong table is the eager call's error on every backend, not a read past value."""
    if fused:
        value, shapes, _, *args = fused_inputs()
        op = m2f_kernels.ms_deform_attn_fused
    else:
        value, shapes, _, *args = msda_inputs()
        op = m2f_kernels.ms_deform_attn
    compiled = torch.compile(
        lambda starts: op(value, shapes, starts, *args, backend=backend), backend="aot_eager", fullgraph=True
    )
    assert compiled(torch.tensor([0, 12])).shape == (2, args[0].shape[1], 6)
    with pytest.raises(
        ValueError, match=r"level_start_index must be the running sum of H\*W, \[0, 12\], got \[0, 30\]"
    ):
        compiled(torch.tensor([0, 30]))


@pytest.mark.parametrize("fused", [False, True])
def test_msda_cpu_level_table_is_checked_before_it_moves_to_value_device(fused):
    """value on the meta device stands in for a GPU: the op body sees the table on value's device and trusts
    it there, so a table given on the CPU is checked before it moves."""
    value, shapes, _, *args = fused_inputs() if fused else msda_inputs()
    op = m2f_kernels.ms_deform_attn_fused if fused else m2f_kernels.ms_deform_attn
    value, *args = (t.to("meta") for t in (value, *args))
    assert op(value, shapes, torch.tensor([0, 12]), *args).shape == (2, args[0].shape[1], 6)
    with pytest.raises(ValueError, match=r"level_start_index must be the running sum of H\*W"):
        op(value, shapes, torch.tensor([0, 30]), *args)


def test_point_mask_loss_num_masks_is_checked_in_compiled_calls():
    """A CPU tensor num_masks has no value while tracing; the compiled graph checks it when it runs."""
    logits, targets, coords = torch.randn(2, 4, 4), torch.rand(2, 8, 8), torch.rand(2, 5, 2)
    compiled = torch.compile(
        lambda num_masks: m2f_kernels.point_mask_loss(logits, targets, coords, num_masks), backend="aot_eager"
    )
    torch.testing.assert_close(
        compiled(torch.tensor(2.0)), m2f_kernels.point_mask_loss(logits, targets, coords, 2)
    )
    for num_masks in (torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(math.inf)):
        with pytest.raises(RuntimeError, match="num_masks must be positive and finite"):
            compiled(num_masks)


@pytest.mark.parametrize(
    "backend", [*CPU_BACKENDS, *(["triton"] if "triton" in m2f_kernels.available_backends() else [])]
)
def test_uint8_masks_read_any_nonzero_value_as_one(backend):
    """A 0/255 uint8 mask gives the costs and losses of the bool mask (255 was read as 255: negative
    cross-entropies, or 0 where the kernels clamp)."""
    generator = torch.Generator().manual_seed(0)
    binary = torch.rand(3, 7, 9, generator=generator) > 0.5
    as_255 = binary.to(torch.uint8) * 255
    point_labels = binary.flatten(1)[:, :20]
    logits = torch.randn(4, 20, generator=generator)
    expected = m2f_kernels.pairwise_mask_cost(logits, point_labels, backend="torch")
    for labels in (point_labels.to(torch.uint8) * 255, point_labels.to(torch.uint8) * 7):
        torch.testing.assert_close(m2f_kernels.pairwise_mask_cost(logits, labels, backend=backend), expected)
    mask_logits, coords = torch.randn(3, 5, 6, generator=generator), torch.rand(3, 11, 2, generator=generator)
    expected = m2f_kernels.point_mask_loss(mask_logits, binary.float(), coords, 3, backend="torch")
    got = m2f_kernels.point_mask_loss(mask_logits, as_255, coords, 3, backend=backend)
    torch.testing.assert_close(got, expected)
    assert torch.equal(as_255, binary.to(torch.uint8) * 255)  # the caller's mask is left as it was


def test_float_labels_outside_the_unit_interval_are_refused():
    logits, mask_logits, coords = torch.randn(4, 5), torch.randn(2, 4, 4), torch.rand(2, 5, 2)
    for bad in (100.0, -1.0):
        labels = torch.rand(3, 5)
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=r"target_point_labels must hold values in \[0, 1\], got values"):
            m2f_kernels.pairwise_mask_cost(logits, labels)
        targets = torch.rand(2, 8, 8, dtype=torch.float64)
        targets[0, 3, 3] = bad
        with pytest.raises(ValueError, match=r"target_masks must hold values in \[0, 1\], got values"):
            m2f_kernels.point_mask_loss(mask_logits, targets, coords, 2)
    # Rounding of a sampled 0/1 mask (1 + 1 ulp) and NaN pass; so do targets on the meta device.
    labels = torch.ones(3, 5)
    labels[0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    labels[0, 1] = math.nan
    m2f_kernels.pairwise_mask_cost(logits, labels)
    m2f_kernels.point_mask_loss(
        mask_logits.to("meta"), torch.full((2, 8, 8), 5.0, device="meta"), coords.to("meta"), 2
    )
    compiled = torch.compile(
        lambda labels: m2f_kernels.pairwise_mask_cost(logits, labels), backend="aot_eager"
    )
    with pytest.raises(RuntimeError, match=r"target_point_labels must hold values in \[0, 1\]"):
        compiled(torch.full((3, 5), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_targets_one_ulp_above_one_pass_and_a_larger_excess_is_refused(dtype):
    """Bilinear samples of a 0/1 mask may reach 1 + 1 ulp: such labels and targets are read, while 1 + 1e-3
    is refused."""
    logits, mask_logits, coords = torch.randn(4, 5), torch.randn(2, 4, 4), torch.rand(2, 5, 2)
    above_one = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype))
    labels, targets = torch.ones(3, 5, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)
    labels[0, 0], targets[1, 2, 3] = above_one, above_one
    m2f_kernels.pairwise_mask_cost(logits, labels)
    m2f_kernels.point_mask_loss(mask_logits, targets, coords, 2)
    labels[0, 0], targets[1, 2, 3] = 1 + 1e-3, 1 + 1e-3
    with pytest.raises(ValueError, match=r"target_point_labels must hold values in \[0, 1\]"):
        m2f_kernels.pairwise_mask_cost(logits, labels)
    with pytest.raises(ValueError, match=r"target_masks must hold values in \[0, 1\]"):
        m2f_kernels.point_mask_loss(mask_logits, targets, coords, 2)


def test_a_nan_does_not_hide_values_outside_the_unit_interval():
    """NaN passes the check, in eager and compiled calls, and the values beside it are still checked (a NaN
    made the whole range NaN, which compared as inside)."""
    logits, mask_logits, coords = torch.randn(4, 5), torch.randn(2, 4, 4), torch.rand(2, 5, 2)
    labels, targets = torch.rand(3, 5), torch.rand(2, 8, 8)
    labels[0, 1], targets[1, 1, 1] = math.nan, math.nan
    m2f_kernels.pairwise_mask_cost(logits, labels)
    m2f_kernels.point_mask_loss(mask_logits, targets, coords, 2)
    compiled = torch.compile(
        lambda labels: m2f_kernels.pairwise_mask_cost(logits, labels), backend="aot_eager"
    )
    compiled(labels)
    compiled(torch.full((3, 5), math.nan))
    labels[2, 4], targets[0, 0, 0] = 100.0, 255.0
    with pytest.raises(
        ValueError, match=r"target_point_labels must hold values in \[0, 1\], got values from"
    ):
        m2f_kernels.pairwise_mask_cost(logits, labels)
    with pytest.raises(
        ValueError, match=r"target_masks must hold values in \[0, 1\], got values from .* to 255"
    ):
        m2f_kernels.point_mask_loss(mask_logits, targets, coords, 2)
    with pytest.raises(RuntimeError, match=r"target_point_labels must hold values in \[0, 1\]"):
        compiled(labels)


def test_point_mask_loss_takes_any_size_of_python_number():
    """A Python int beyond int64 divides as the float it is (it raised an OverflowError naming nothing)."""
    logits, targets, coords = torch.randn(2, 4, 4), torch.rand(2, 8, 8), torch.rand(2, 5, 2)
    ce, dice = m2f_kernels.point_mask_loss(logits, targets, coords, 1)
    huge_ce, huge_dice = m2f_kernels.point_mask_loss(logits, targets, coords, 2**70)
    torch.testing.assert_close((huge_ce, huge_dice), (ce / 2.0**70, dice / 2.0**70))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_attention_without_a_mask_is_dense_attention(backend):
    q, k, v, _ = attention_inputs(requires_grad=True)
    out, probs = m2f_kernels.masked_attention(q, k, v, return_attn_probs=True, backend=backend)
    expected, expected_probs = reference.masked_attention(q, k, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(probs, expected_probs.float())
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


def logits_around_the_threshold(dtype, threshold_logit, queries, keys):
    """(1, Q, K) logits of ``dtype`` within a few rounding steps of threshold_logit on both sides, and the
    special values: NaN, +-inf and values beyond the float16 range."""
    generator = torch.Generator().manual_seed(3)
    centre = torch.tensor(0.0 if math.isinf(threshold_logit) else threshold_logit, dtype=torch.float64)
    logits = centre + torch.randn(1, queries, keys, generator=generator, dtype=torch.float64) * 1e-3
    logits = logits.to(dtype)
    logits[0, 0, :6] = torch.tensor([math.nan, math.inf, -math.inf, 1e5, -1e5, threshold_logit], dtype=dtype)
    return logits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "logits_dtype, dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("threshold", [0.3, 0.4, 0.5, 0.0, 1.0])
def test_mask_logits_keep_their_precision(backend, logits_dtype, dtype, threshold):
    """Mask logits of another dtype than q give the mask their own values give (compared in float32 or wider),
    as the bool mask built from them does, also where rounding them to q's dtype would cross the threshold."""
    queries, keys = 5, 40
    logits = logits_around_the_threshold(logits_dtype, threshold_to_logit(threshold), queries, keys)
    blocked = ~(logits.double() >= threshold_to_logit(threshold))
    q, k, v = (torch.randn(1, 2, n, 16).to(dtype) for n in (queries, keys, keys))
    out = m2f_kernels.masked_attention(q, k, v, logits, threshold=threshold, backend=backend)
    expected = m2f_kernels.masked_attention(q, k, v, attn_mask=blocked, backend=backend)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
def test_autocast_keeps_the_mask_logits_precision(autocast_dtype):
    """Under autocast, q, k and v run in the autocast dtype and the float32 logits are compared as they are."""
    threshold = 0.4
    logits = logits_around_the_threshold(torch.float32, threshold_to_logit(threshold), 5, 40)
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = m2f_kernels.masked_attention(q, k, v, logits, threshold=threshold)
        expected = m2f_kernels.masked_attention(q, k, v, attn_mask=~(logits >= threshold_to_logit(threshold)))
    assert out.dtype == autocast_dtype
    assert torch.equal(out, expected)


def test_masked_attention_bad_inputs():
    q, k, v, logits = attention_inputs()
    for mask in (logits, None):  # without a mask too, where the dense path needs no backend
        with pytest.raises(ValueError, match="backend must be one of"):
            m2f_kernels.masked_attention(q, k, v, mask, backend="cdua")
    with pytest.raises(ValueError, match="v must have shape"):
        m2f_kernels.masked_attention(q, k, v[..., :2], logits)
    with pytest.raises(ValueError, match="k must have shape"):
        m2f_kernels.masked_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="mask_logits must have shape"):
        m2f_kernels.masked_attention(q, k, v, logits[:, :2])
    with pytest.raises(ValueError, match="either mask_logits or attn_mask"):
        m2f_kernels.masked_attention(q, k, v, logits, attn_mask=logits > 0)
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        m2f_kernels.masked_attention(q, k, v, attn_mask=logits)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m2f_kernels.masked_attention(q, k, v, attn_mask=torch.zeros(3, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold must be in"):
        m2f_kernels.masked_attention(q, k, v, logits, threshold=2.0)
    for threshold in (None, "0.5", True):
        with pytest.raises(TypeError, match="threshold must be a real number"):
            m2f_kernels.masked_attention(q, k, v, logits, threshold=threshold)
    for scale in ("a", False):
        with pytest.raises(TypeError, match="scale must be a real number"):
            m2f_kernels.masked_attention(q, k, v, logits, scale=scale)
    for scale in (math.nan, math.inf):  # every output would be NaN
        with pytest.raises(ValueError, match="scale must be finite"):
            m2f_kernels.masked_attention(q, k, v, logits, scale=scale)
    with pytest.raises(TypeError, match="v has dtype"):
        m2f_kernels.masked_attention(q, k, v.float())
    with pytest.raises(TypeError, match=r"mask_logits must be a torch\.Tensor"):
        m2f_kernels.masked_attention(q, k, v, logits.numpy())
    with pytest.raises(TypeError, match=r"attn_mask must be a torch\.Tensor"):
        m2f_kernels.masked_attention(q, k, v, attn_mask=(logits > 0).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("empty", ["logits", "targets"])
def test_point_loss_of_an_empty_map_samples_zeros(backend, empty):
    """An empty logit or target map samples as zeros (zero padding): the losses and the logit gradient equal
    those of an all-zero map of any size; for empty logits, ce is log 2 at every point."""
    coords = torch.rand(3, 11, 2, dtype=torch.float64)
    logits = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(3, 9, 7) > 0.5
    zero_logits = torch.zeros(3, 5, 6, dtype=torch.float64, requires_grad=True)
    if empty == "logits":
        empty_logits = torch.zeros(3, 0, 6, dtype=torch.float64, requires_grad=True)
        ce, dice = m2f_kernels.point_mask_loss(empty_logits, targets, coords, 2.0, backend=backend)
        expected = m2f_kernels.point_mask_loss(zero_logits, targets, coords, 2.0, backend=backend)
        torch.testing.assert_close(ce.double(), torch.tensor(3 * math.log(2) / 2, dtype=torch.float64))
        (ce + dice).backward()
        assert empty_logits.grad.shape == empty_logits.shape
    else:
        ce, dice = m2f_kernels.point_mask_loss(logits, targets[:, :, :0], coords, 2.0, backend=backend)
        (grad,) = torch.autograd.grad(ce + 2 * dice, logits)
        expected = m2f_kernels.point_mask_loss(
            logits, torch.zeros_like(targets), coords, 2.0, backend=backend
        )
        torch.testing.assert_close(grad, torch.autograd.grad(expected[0] + 2 * expected[1], logits)[0])
    torch.testing.assert_close((ce, dice), expected)
    assert ce > 0 and dice > 0


def test_point_loss_bad_inputs():
    mask = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="target_masks must have shape"):
        m2f_kernels.point_mask_loss(mask, torch.zeros(3, 8, 8), torch.rand(2, 5, 2), 1.0)
    with pytest.raises(ValueError, match="coords must have shape"):
        m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 3), 1.0)
    with pytest.raises(ValueError, match="num_masks must be positive"):
        m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 2), 0.0)
    with pytest.raises(TypeError, match="target_masks must be bool, uint8 or floating"):
        m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8, dtype=torch.int32), torch.rand(2, 5, 2), 1.0)
    with pytest.raises(ValueError, match="coords must have shape"):
        m2f_kernels.point_sample(torch.randn(2, 1, 4, 4), torch.rand(3, 5, 2))
    with pytest.raises(ValueError, match="same number of points"):
        m2f_kernels.pairwise_mask_cost(torch.randn(4, 5), torch.rand(3, 6))
    with pytest.raises(TypeError, match="target_point_labels must be floating, bool or uint8"):
        m2f_kernels.pairwise_mask_cost(torch.randn(4, 5), torch.ones(3, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="oversample_ratio must be finite"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, oversample_ratio=math.inf)
    # Unnamed comparison errors and an overflow in torch.rand before; an infinite num_masks gave (0, 0).
    for num_masks in ("3", None):
        with pytest.raises(TypeError, match="num_masks must be a real number"):
            m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 2), num_masks)
    with pytest.raises(ValueError, match="num_masks must be positive and finite"):
        m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 2), math.inf)
    # A tensor num_masks went unchecked: 0 gave infinite losses, -2 negative ones, two values a (2,) "scalar".
    for num_masks in (torch.tensor(0.0), torch.tensor([math.nan]), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="num_masks must be positive and finite"):
            m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 2), num_masks)
    for num_masks in (torch.tensor([2.0, 4.0]), torch.tensor(True)):
        with pytest.raises(ValueError, match="num_masks must be a number or a one-element real tensor"):
            m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), torch.rand(2, 5, 2), num_masks)
    coords = torch.rand(2, 5, 2)
    as_number = m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), coords, 2.0)
    as_tensor = m2f_kernels.point_mask_loss(mask, torch.zeros(2, 8, 8), coords, torch.tensor([2]))
    assert as_tensor[0].shape == () and as_tensor[1].shape == ()
    torch.testing.assert_close(as_tensor, as_number)
    with pytest.raises(TypeError, match="oversample_ratio must be a real number"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, oversample_ratio=None)
    with pytest.raises(TypeError, match="importance_ratio must be a real number"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, importance_ratio="0.5")
    with pytest.raises(ValueError, match=r"num_points \* oversample_ratio must be at most"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, oversample_ratio=1e300)


def test_export_with_dynamic_sizes_of_the_default_range():
    """The int32 size check added a guard size <= 2**31 - 1, so torch.export refused a plain Dim."""

    class Sample(torch.nn.Module):
        def forward(self, input, coords):
            return m2f_kernels.point_sample(input, coords)

    points = torch.export.Dim("points")
    exported = torch.export.export(
        Sample(), (torch.randn(2, 3, 4, 4), torch.rand(2, 6, 2)), dynamic_shapes=(None, {1: points})
    )
    input, coords = torch.randn(2, 3, 4, 4), torch.rand(2, 11, 2)
    torch.testing.assert_close(exported.module()(input, coords), reference.point_sample(input, coords))


def test_export_keeps_the_custom_ops():
    class Layer(torch.nn.Module):
        def forward(self, value, shapes, starts, locations, weights, q, k, v, logits):
            deformed = m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights)
            attended = m2f_kernels.masked_attention(q, k, v, logits)
            return deformed.sum() + attended.sum()

    args = (*msda_inputs(dtype=torch.float32), *attention_inputs(dtype=torch.float32))
    exported = torch.export.export(Layer(), args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "m2f_kernels.ms_deform_attn.default" in targets
    assert "m2f_kernels.masked_attention.default" in targets
    torch.testing.assert_close(exported.module()(*args), Layer()(*args))


def test_compile_fullgraph_masked_attention_and_losses():
    q, k, v, logits = attention_inputs(dtype=torch.float32, requires_grad=True)
    mask = torch.randn(2, 4, 5, requires_grad=True)
    targets = torch.rand(2, 8, 10) > 0.5
    coords = torch.rand(2, 7, 2)

    def step(q, k, v, logits, mask):
        attended = m2f_kernels.masked_attention(q, k, v, logits, threshold=0.3)
        ce, dice = m2f_kernels.point_mask_loss(mask, targets, coords, 2.0)
        return attended.square().sum() + ce + dice

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(q, k, v, logits, mask), (q, k, v, mask))
    expected = torch.autograd.grad(step(q, k, v, logits, mask), (q, k, v, mask))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_compile_masked_attention_with_a_dynamic_head_dim():
    """The default scale d ** -0.5 went through math.isfinite: a graph break under dynamic=True, and a
    failure once a second head dim made torch.compile mark d dynamic."""
    compiled = torch.compile(
        lambda q, k, v, logits: m2f_kernels.masked_attention(q, k, v, logits), fullgraph=True, backend="eager"
    )
    for head_dim in (4, 8):
        generator = torch.Generator().manual_seed(head_dim)
        q, k, v = (torch.randn(2, 2, n, head_dim, generator=generator) for n in (3, 5, 5))
        logits = torch.randn(2, 3, 5, generator=generator)
        expected = reference.masked_attention(q.double(), k.double(), v.double(), logits.double())[0]
        torch.testing.assert_close(compiled(q, k, v, logits).double(), expected, atol=1e-5, rtol=1e-5)


def _point_sample_backward_through_the_dispatcher() -> torch.Tensor:
    """The image gradient of a torch-backend point_sample of ones, its backward called as a registered op (as
    compiled graphs call it), where kernels run with autograd excluded and reference_vjp uses its worker
    thread."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 5, 6, dtype=torch.float64, generator=generator)
    coords = torch.rand(1, 7, 2, dtype=torch.float64, generator=generator)
    grad_output = torch.ones(1, 2, 7, dtype=torch.float64)
    return torch.ops.m2f_kernels.point_sample_backward(grad_output, image, coords, "torch", False)[0]


def test_torch_backend_backward_thread(monkeypatch):
    """In plain eager mode the PyTorch backward builds its graph on the calling thread (a reentrant backward,
    safe on the autograd engine's device threads); through the dispatcher, in a worker thread. Same result."""
    import threading

    threads = []
    traced = reference.point_sample
    monkeypatch.setattr(
        reference, "point_sample", lambda *args: threads.append(threading.current_thread()) or traced(*args)
    )
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    coords = torch.rand(1, 7, 2, dtype=torch.float64, generator=generator)
    m2f_kernels.point_sample(image, coords, backend="torch").sum().backward()
    assert threads and all(thread is threading.current_thread() for thread in threads)
    threads.clear()
    dispatched = _point_sample_backward_through_the_dispatcher()
    assert any(thread is not threading.current_thread() for thread in threads)
    torch.testing.assert_close(dispatched, image.grad, rtol=0, atol=0)


FORKED_CHILD_SCRIPT = """
import multiprocessing, torch, m2f_kernels

def backward():  # through the dispatcher, where reference_vjp uses its worker thread
    image, coords = torch.rand(1, 2, 5, 6, dtype=torch.float64), torch.rand(1, 7, 2, dtype=torch.float64)
    grad_output = torch.ones(1, 2, 7, dtype=torch.float64)
    return torch.ops.m2f_kernels.point_sample_backward(grad_output, image, coords, "torch", False)[0]

backward()  # the parent's worker thread now exists
context = multiprocessing.get_context("fork")
results = context.Queue()
child = context.Process(target=lambda: results.put(bool(torch.isfinite(backward()).all())))
child.start()
child.join(timeout=120)
if child.is_alive():
    child.kill()
print(child.exitcode, child.exitcode == 0 and results.get(timeout=5))
"""


def test_torch_backend_backward_in_a_forked_child():
    """A child forked after the parent's worker thread started (a DataLoader worker, say) must not wait on that
    thread, which does not exist in the child. In a fresh interpreter: autograd refuses to run in a child
    forked after the parent used some features (torch.func, opcheck), whatever this package does."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["0", "True"], result.stderr[-2000:]


ALL_CPU_BACKENDS = CPU_BACKENDS + (["triton"] if _backend.triton_runs_on("cpu") else [])


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_functorch_reverse_mode_is_refused_by_name(backend):
    """torch.func.grad and its kin failed inside torch's generated autograd.Function of the custom ops, with
    an error about setup_context that names nothing the caller wrote."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    coords = torch.rand(1, 4, 2, dtype=torch.float64)
    message = r"point_sample: torch.func.grad / vjp / jacrev / hessian are not supported"
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(NotImplementedError, match=message):
            transform(lambda a: m2f_kernels.point_sample(a, coords, backend=backend).sum())(x)
    with pytest.raises(NotImplementedError, match=message):
        torch.func.vjp(lambda a: m2f_kernels.point_sample(a, coords, backend=backend), x)
    # backward() and torch.autograd.grad, what the message points to, give the gradient.
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(m2f_kernels.point_sample(leaf, coords, backend=backend).sum(), leaf)
    torch.testing.assert_close(grad, torch.func.grad(lambda a: reference.point_sample(a, coords).sum())(x))


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_forward_mode_ad_is_refused(backend):
    """The ops have no forward-mode formula; a tangent reaching one is an error, not a zero or a lost tangent.
    An op outside the differentiated path still runs under torch.func.jvp."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    coords = torch.rand(1, 4, 2, dtype=torch.float64)
    tangent = torch.randn_like(x)
    with pytest.raises(NotImplementedError, match="point_sample: forward-mode AD"):
        torch.func.jvp(lambda a: m2f_kernels.point_sample(a, coords, backend=backend), (x,), (tangent,))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(lambda a: m2f_kernels.point_sample(a, coords, backend=backend))(x)
    from torch.autograd import forward_ad

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        m2f_kernels.point_sample(forward_ad.make_dual(x, tangent), coords, backend=backend)
    q, k, v, logits = attention_inputs()
    with pytest.raises(NotImplementedError, match="masked_attention: forward-mode AD"):
        torch.func.jvp(lambda a: m2f_kernels.masked_attention(a, k, v, logits, backend=backend), (q,), (q,))

    with pytest.raises(NotImplementedError, match="forward-mode AD"):  # under vmap inside jvp
        batched = x.expand(3, *x.shape)
        sample = torch.func.vmap(lambda a: m2f_kernels.point_sample(a, coords, backend=backend))
        torch.func.jvp(sample, (batched,), (batched,))

    def sampled_times(scale):  # the tangent flows through `scale` only
        return m2f_kernels.point_sample(x, coords, backend=backend) * scale

    _, got = torch.func.jvp(sampled_times, (torch.tensor(2.0, dtype=torch.float64),), (torch.tensor(1.0),))
    torch.testing.assert_close(got, reference.point_sample(x, coords))

    def detached_times_sum(a):  # the op's input is the primal's value without its tangent
        return m2f_kernels.point_sample(a.detach(), coords, backend=backend) * a.sum()

    _, got = torch.func.jvp(detached_times_sum, (x,), (tangent,))
    torch.testing.assert_close(got, reference.point_sample(x, coords) * tangent.sum())


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_batched_gradients_match_the_reference_jacobian(backend):
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) send batched gradients into the
    backward; the kernels see them through the dispatcher's batching rule."""
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(1, 3, 2, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(lambda a: reference.point_sample(a, coords), x)
    out = m2f_kernels.point_sample(x, coords, backend=backend)
    basis = torch.eye(out.numel(), dtype=out.dtype).view(-1, *out.shape)
    (batched,) = torch.autograd.grad(out, x, basis, is_grads_batched=True)
    torch.testing.assert_close(batched.view(expected.shape), expected)
    vectorized = torch.autograd.functional.jacobian(
        lambda a: m2f_kernels.point_sample(a, coords, backend=backend), x, vectorize=True
    )
    torch.testing.assert_close(vectorized, expected)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, deferred initialization) run through the ops' fake kernels."""
    from m2f_kernels.nn import MSDeformAttn

    value, shapes, starts, locations, weights = (
        t.to("meta") if t.is_floating_point() else t for t in msda_inputs(torch.float32)
    )
    assert m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights).shape == (2, 3, 6)
    q, k, v, logits = (t.to("meta") for t in attention_inputs(torch.float32))
    assert m2f_kernels.masked_attention(q, k, v, logits).shape == q.shape
    ce, dice = m2f_kernels.point_mask_loss(
        torch.randn(2, 4, 4, device="meta"),
        torch.rand(2, 8, 8, device="meta"),
        torch.rand(2, 5, 2, device="meta"),
        2.0,
    )
    assert ce.shape == dice.shape == () and ce.is_meta
    coords = m2f_kernels.sample_uncertain_points(torch.randn(4, 9, 11, device="meta"), 20)
    assert coords.shape == (4, 20, 2) and coords.is_meta
    with torch.device("meta"):
        module = MSDeformAttn(8, n_levels=2, n_heads=2, n_points=2)
        out = module(
            torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2), torch.randn(1, 18, 8), shapes.to("meta"), starts
        )
    assert out.shape == (1, 3, 8) and out.is_meta


@pytest.mark.skipif(
    not _backend.triton_runs_on("cpu"), reason="Triton runs on CPU only with TRITON_INTERPRET=1"
)
def test_triton_interpreter_calls_from_threads_match_serial_calls():
    """Triton's interpreter keeps the running launch in globals; calls from several threads take turns."""
    import concurrent.futures

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 3, 17, 19, generator=generator)
        coords = torch.rand(2, 300, 2, generator=generator)
        return m2f_kernels.point_sample(x, coords, backend="triton"), reference.point_sample(x, coords)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(sample, list(range(6)) * 3))
    for got, expected in results:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_wider_than_q_become_a_bool_mask_not_a_narrowed_copy(backend):
    """float32 mask logits with bfloat16 q (the decoder under autocast, where the mask is upsampled in float32):
    the mask is decided in float32 and passed as one bool per logit; no (B, Q, K) floating tensor is made."""
    q, k, v, logits = attention_inputs(torch.float32)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    logits[1, 0, :3] = torch.tensor([1e-9, -1e-9, -0.0])  # bfloat16 would round these across the threshold 0
    float_shapes = []

    class FloatOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    float_shapes.append(tuple(t.shape))
            return out

    with FloatOutputs():
        out = m2f_kernels.masked_attention(q, k, v, logits, backend=backend)
    assert float_shapes and tuple(logits.shape) not in float_shapes
    expected = m2f_kernels.masked_attention(q, k, v, attn_mask=logits < 0, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    reference_out, _ = reference.masked_attention(q.float(), k.float(), v.float(), logits)
    torch.testing.assert_close(out.float(), reference_out, rtol=2e-2, atol=2e-2)


def test_triton_launch_plans_ask_the_driver_for_the_multiprocessor_count_once_per_device(monkeypatch):
    triton_common = pytest.importorskip("m2f_kernels.triton._common")
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    triton_common._multiprocessor_count.cache_clear()
    try:
        counts = [triton_common.multiprocessor_count(torch.device("cuda", i)) for i in (0, 1, 0, 1)]
    finally:
        triton_common._multiprocessor_count.cache_clear()
    assert counts == [100, 101, 100, 101]
    assert asked == [0, 1]

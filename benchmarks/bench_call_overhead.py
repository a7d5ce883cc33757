"""Host time of one op call: the public function against its torch.library custom op, on inputs so small
that the kernels take almost no time.

Rows: ``public``, the public function (argument checks included); ``ops_fast_path``, the op's own call in
plain eager mode (``m2f_kernels.ops._common.call_op``: its Python implementation and autograd without the
dispatcher); ``custom_op``, the same op through the torch.library dispatcher (what torch.compile and
torch.export see); on GPU ``public_triton``, the public function on the Triton backend (``auto`` runs the
CUDA library); for masked attention also the native ``scaled_dot_product_attention`` for scale. Each
timed call runs the op CALLS times, so the tables are in ms per CALLS calls.

``test_host_profile`` breaks the host time of a public call (forward + backward) down by Python function
(cProfile, PROFILE_CALLS calls): the results JSON's ``host_profiles`` list the PROFILE_ROWS functions with
the most time of their own, per call in microseconds (the profiler's own cost inflates small functions).

    pytest benchmarks/bench_call_overhead.py -s
"""

from __future__ import annotations

import cProfile
import os
import pstats

import pytest
import torch

import m2f_kernels
from m2f_kernels.ops import masked_attention, ms_deform_attn, point_mask_loss, point_sample
from m2f_kernels.ops._common import call_op

CALLS = 100
PROFILE_CALLS = 20
PROFILE_ROWS = 25


def _attention_inputs(device):
    q, k, v = (torch.randn(1, 1, 4, 32, device=device, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(1, 4, 4, device=device)


def _loss_inputs(device):
    logits = torch.randn(2, 8, 8, device=device, requires_grad=True)
    images = torch.randn(2, 1, 8, 8, device=device, requires_grad=True)
    targets = torch.rand(2, 16, 16, device=device) > 0.5
    return logits, images, targets, torch.rand(2, 16, 2, device=device)


def _msda_inputs(device):
    value = torch.randn(1, 20, 2, 4, device=device, requires_grad=True)
    shapes = torch.tensor([[4, 4], [2, 2]], device=device)
    starts = torch.tensor([0, 16], device=device)
    locations = torch.rand(1, 4, 2, 2, 2, 2, device=device, requires_grad=True)
    weights = torch.rand(1, 4, 2, 2, 2, device=device, requires_grad=True)
    return value, shapes, starts, locations, weights


def _calls(device):
    """{op: (grad inputs, public function call taking a backend, custom op, its arguments)}."""
    q, k, v, mask_logits = _attention_inputs(device)
    logits, images, targets, coords = _loss_inputs(device)
    msda = _msda_inputs(device)
    return {
        "masked_attention": (
            [q, k, v],
            lambda backend: m2f_kernels.masked_attention(q, k, v, mask_logits, backend=backend),
            masked_attention._masked_attention,
            (q, k, v, mask_logits, None, 0.0, 32**-0.5, "auto"),
        ),
        "point_mask_loss": (
            [logits],
            lambda backend: m2f_kernels.point_mask_loss(logits, targets, coords, 2.0, backend=backend),
            point_mask_loss._point_mask_loss,
            (logits, targets.view(torch.uint8), coords, "auto"),
        ),
        "point_sample": (
            [images],
            lambda backend: m2f_kernels.point_sample(images, coords, backend=backend),
            point_sample._point_sample,
            (images, coords, "auto"),
        ),
        "ms_deform_attn": (
            [msda[0], msda[3], msda[4]],
            lambda backend: m2f_kernels.ms_deform_attn(*msda, backend=backend),
            ms_deform_attn._ms_deform_attn,
            (*msda, "auto"),
        ),
    }


def _first(outputs):
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


@pytest.mark.parametrize("op", ["masked_attention", "point_mask_loss", "point_sample", "ms_deform_attn"])
@pytest.mark.parametrize("mode", ["forward", "full"])
def test_call_overhead(bench, device, op, mode):
    grad_inputs, public, custom_op, args = _calls(device)[op]
    if mode == "forward":
        for tensor in grad_inputs:
            tensor.requires_grad_(False)
    contenders = {
        "public": lambda: _first(public("auto")),
        "ops_fast_path": lambda: _first(call_op(custom_op, *args)),
        "custom_op": lambda: _first(custom_op(*args)),
    }
    if device.type == "cuda" and "triton" in m2f_kernels.available_backends():
        contenders["public_triton"] = lambda: _first(public("triton"))
    if op == "masked_attention":
        q, k, v = grad_inputs
        contenders["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    times = {}
    for name, call in contenders.items():
        times[name] = bench.run(
            f"call_overhead {op}",
            name,
            lambda call=call: [call() for _ in range(CALLS)],
            mode=mode,
            grad_inputs=grad_inputs if mode == "full" else (),
            device=device,
            params={"calls": CALLS},
        ).median_ms
    print(
        f"{op} {mode}: public {1000 * times['public'] / CALLS:.1f} us per call; the op without the "
        f"dispatcher {times['custom_op'] / times['ops_fast_path']:.2f}x faster than through it"
    )


def _profile_rows(call, grad_inputs, device) -> tuple[float, list[dict]]:
    """(host microseconds per call, the PROFILE_ROWS functions with the most own time) of call() + backward."""

    def forward_backward():
        output = _first(call())
        if grad_inputs:
            output.float().sum().backward()

    for _ in range(3):
        forward_backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(PROFILE_CALLS):
        forward_backward()
    profiler.disable()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    per_call_us = 1e6 / PROFILE_CALLS
    rows = [
        {
            "function": f"{os.path.basename(file)}:{line}({function})",
            "calls": primitive_calls / PROFILE_CALLS,
            "own_us": own_s * per_call_us,
            "cumulative_us": cumulative_s * per_call_us,
        }
        for (file, line, function), (primitive_calls, _, own_s, cumulative_s, _) in stats.items()
    ]
    rows.sort(key=lambda row: row["own_us"], reverse=True)
    total_us = sum(row["own_us"] for row in rows)
    return total_us, rows[:PROFILE_ROWS]


@pytest.mark.parametrize("op", ["masked_attention", "point_mask_loss"])
def test_host_profile(bench, device, op):
    grad_inputs, public, _, _ = _calls(device)[op]
    backends = ["auto"]
    if device.type == "cuda" and "triton" in m2f_kernels.available_backends():
        backends.append("triton")
    for backend in backends:
        total_us, rows = _profile_rows(lambda backend=backend: public(backend), grad_inputs, device)
        bench.add_host_profile(
            f"host_profile {op}", backend, rows, {"calls": PROFILE_CALLS, "total_us": total_us}
        )
        assert rows and all(row["own_us"] >= 0 for row in rows)
        print(f"{op} {backend}: {total_us:.0f} us of host time per forward + backward (profiled)")
        for row in rows[:10]:
            print(
                f"  {row['own_us']:8.1f} us own {row['cumulative_us']:8.1f} us cumulative  {row['function']}"
            )

"""The C++ CPU kernels as built for each x86-64 level (README, "Building"), on the same inputs in the same run:
how much longer an AVX2-only or a baseline x86-64 CPU of this clock would take than the level this CPU runs.
Each op at its CPU benchmark shape, forward + backward (the pairwise cost: forward).

    pytest benchmarks/bench_cpu_levels.py -s
"""

from __future__ import annotations

import pytest
import torch

import m2f_kernels
from benchmarks import bench_masked_attention, bench_ms_deform_attn, bench_point_loss

LEVELS = ("avx512", "avx2", "baseline")


def _masked_attention():
    q, k, v, mask_logits = bench_masked_attention._inputs(2, 100, 4096, 1.0, torch.device("cpu"))
    call = lambda: m2f_kernels.masked_attention(q, k, v, mask_logits=mask_logits, backend="cpu")
    return call, [q, k, v], "full"


def _point_mask_loss():
    logits, targets, coords = bench_point_loss._loss_inputs(torch.device("cpu"))
    num_masks = float(logits.shape[0])
    call = lambda: sum(m2f_kernels.point_mask_loss(logits, targets, coords, num_masks, backend="cpu"))
    return call, [logits], "full"


def _pairwise_mask_cost():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(100, bench_point_loss.NUM_POINTS, generator=generator) * 4
    labels = (torch.rand(20, bench_point_loss.NUM_POINTS, generator=generator) > 0.5).float()
    return lambda: m2f_kernels.pairwise_mask_cost(logits, labels, backend="cpu"), [], "forward"


def _ms_deform_attn():
    value, shapes, starts, locations, weights, *_ = bench_ms_deform_attn._inputs(
        "m2f-512", torch.float32, "cpu"
    )
    for tensor in (value, locations, weights):
        tensor.requires_grad_()
    call = lambda: m2f_kernels.ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
    return call, [value, locations, weights], "full"


CASES = {
    "masked_attention": _masked_attention,
    "point_mask_loss": _point_mask_loss,
    "pairwise_mask_cost": _pairwise_mask_cost,
    "ms_deform_attn": _ms_deform_attn,
}


@pytest.mark.skipif(m2f_kernels.cpu_isa() is None, reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("op", sorted(CASES))
def test_cpu_levels(bench, monkeypatch, op):
    native = m2f_kernels.cpu_isa()
    levels = LEVELS[LEVELS.index(native) :]
    call, grad_inputs, mode = CASES[op]()
    results = {}
    for level in levels:
        monkeypatch.setenv("M2F_KERNELS_CPU_ISA", level)
        assert m2f_kernels.cpu_isa() == level
        results[level] = bench.run(
            f"cpu_levels {op}",
            f"{op}_cpu_{level}",
            call,
            mode=mode,
            grad_inputs=grad_inputs,
            device="cpu",
            warmup=1,
            repeats=5,
            params={"level": level},
        )
    for level in levels[1:]:
        ratio = results[level].median_ms / results[native].median_ms
        print(f"{op}: the {level} build takes {ratio:.2f}x the time of the {native} build")

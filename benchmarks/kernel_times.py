"""Time per kernel of each fused op at its benchmark shape (torch.profiler): what bounds an op, one row per kernel.

    python -m benchmarks.kernel_times [--ops pairwise_mask_cost ...] [--backends cuda triton] [--calls 5]

On a GPU each row is a kernel with its launches (``count``) and device time per call (forward + backward where the op has a
gradient); on the CPU each row is an operator with its calls and own host time per call. The shapes are the benchmarks'
(bench_point_loss.py, and bench_masked_attention.py's B=2, Q=100, K=4096 and B=8, Q=200, K=1024 at 50 %
density, the latter in bfloat16 too and with deterministic algorithms on). ``--out`` also writes the rows as
JSON. benchmarks/gpu_check.sh runs it as its ``kernels`` step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import m2f_kernels
from benchmarks import bench_masked_attention, bench_point_loss
from m2f.files import write_json_atomic

# (batch, queries, keys, mask density): bench_masked_attention.py's B=2, Q=100, K=4096, and its B=8, Q=200,
# K=1024, the shape where the kernels gain the least over SDPA.
ATTENTION_SHAPE = (2, 100, 4096, 0.5)
SMALL_KEYS_ATTENTION_SHAPE = (8, 200, 1024, 0.5)


def _pairwise_mask_cost(device, backend):
    shape = bench_point_loss._shape(device)
    generator = torch.Generator().manual_seed(0)
    points = bench_point_loss.NUM_POINTS
    logits = (torch.randn(shape["queries"], points, generator=generator) * 4).to(device)
    labels = (torch.rand(shape["targets_per_image"], points, generator=generator) > 0.5).float().to(device)
    return lambda: m2f_kernels.pairwise_mask_cost(logits, labels, backend=backend)


def _point_mask_loss(device, backend):
    logits, targets, coords = bench_point_loss._loss_inputs(device)

    def call():
        logits.grad = None  # no accumulation kernel in the profile
        ce, dice = m2f_kernels.point_mask_loss(logits, targets, coords, logits.shape[0], backend=backend)
        (ce + dice).backward()

    return call


def _masked_attention(device, backend, shape=ATTENTION_SHAPE, dtype=torch.float32, deterministic=False):
    q, k, v, mask_logits = bench_masked_attention._inputs(*shape, device, dtype)

    def call():
        q.grad = k.grad = v.grad = None  # no accumulation kernels in the profile
        with bench_masked_attention.deterministic_algorithms() if deterministic else contextlib.nullcontext():
            out = m2f_kernels.masked_attention(q, k, v, mask_logits=mask_logits, backend=backend)
            out.backward(torch.ones_like(out))

    return call


OPS = {
    "pairwise_mask_cost": _pairwise_mask_cost,
    "point_mask_loss": _point_mask_loss,
    "masked_attention": _masked_attention,
    "masked_attention_k1024": functools.partial(_masked_attention, shape=SMALL_KEYS_ATTENTION_SHAPE),
    "masked_attention_k1024_bf16": functools.partial(
        _masked_attention, shape=SMALL_KEYS_ATTENTION_SHAPE, dtype=torch.bfloat16
    ),
    "masked_attention_k1024_deterministic": functools.partial(
        _masked_attention, shape=SMALL_KEYS_ATTENTION_SHAPE, deterministic=True
    ),
}


def kernel_rows(call, device: torch.device, calls: int) -> list[dict]:
    """Rows {name, count, time_us} per call of call(), slowest first: kernels on a GPU, operators on a CPU."""
    for _ in range(2):
        call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for event in profiler.key_averages():
        if device.type == "cuda":
            is_kernel = event.device_type == torch.autograd.DeviceType.CUDA
            time_us = event.self_device_time_total
        else:
            is_kernel = event.device_type == torch.autograd.DeviceType.CPU
            time_us = event.self_cpu_time_total
        if is_kernel and time_us > 0:
            rows.append({"name": event.key, "count": event.count / calls, "time_us": time_us / calls})
    return sorted(rows, key=lambda row: row["time_us"], reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument(
        "--backends", nargs="+", default=None, help="default: cuda and triton on a GPU, else cpu"
    )
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per op (default 5)")
    parser.add_argument("--rows", type=int, default=12, help="rows printed per op (default 12)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rows < 1:
        parser.error("--calls and --rows must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = args.backends or (["cuda", "triton"] if device.type == "cuda" else ["cpu"])
    backends = [name for name in wanted if name in m2f_kernels.available_backends()]
    if not backends:
        print(f"none of the backends {wanted} is available here")
        return 2
    results = []
    for op in args.ops:
        for backend in backends:
            rows = kernel_rows(OPS[op](device, backend), device, args.calls)
            total = sum(row["time_us"] for row in rows)
            results.append(
                {"op": op, "backend": backend, "device": device.type, "total_us": total, "rows": rows}
            )
            print(f"== {op} {backend} ({device.type}): {total:.1f} us per call")
            for row in rows[: args.rows]:
                print(f"  {row['time_us']:10.1f} us {row['count']:5.1f}x  {row['name'][:110]}")
            if args.out is not None:  # after every op, so that a run cut off by a time limit keeps them
                write_json_atomic(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

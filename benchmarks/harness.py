"""Benchmark harness shared by every op and model benchmark.

``measure`` times one callable in one mode (forward, backward or full = forward + backward), with warm-up,
CUDA events on GPU and the wall clock on CPU, and the peak memory on GPU. On GPU it also measures the GPU
time: the same call queued behind a GPU sleep, so that the kernels run back to back and the time excludes
the host's launch overhead (what the call costs inside a training step, where the host runs ahead).
``Recorder`` (the ``bench`` fixture of benchmarks/conftest.py) keeps the measurements of a run, reports each one as a ratio to its
baseline measured in the same run, and writes them as JSON with the device, commit and versions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from m2f.files import write_bytes_atomic

MODES = ("forward", "backward", "full")


@dataclasses.dataclass
class Measurement:
    """One timed configuration: median and min milliseconds over ``repeats`` runs, peak bytes on GPU, and on
    GPU the median GPU time (launch overhead excluded)."""

    group: str
    name: str
    mode: str
    median_ms: float
    min_ms: float
    times_ms: list[float]
    peak_memory_bytes: int | None
    params: dict
    bytes_moved: int | None = None
    gpu_median_ms: float | None = None
    gpu_times_ms: list[float] | None = None

    def bandwidth_gbs(self) -> float | None:
        """bytes_moved over the median GPU time where there is one (the host's launch time left out), else
        over the median time; in GB/s (1e9 bytes per second)."""
        if not self.bytes_moved:
            return None
        return self.bytes_moved / (self.gpu_median_ms or self.median_ms) / 1e6


def compulsory_bytes(inputs: Sequence[torch.Tensor], output_bytes: int) -> int:
    """Compulsory traffic of one call, for Measurement.bytes_moved: every input read once and
    ``output_bytes`` written once."""
    return sum(t.numel() * t.element_size() for t in inputs) + output_bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _outputs_and_grads(outputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    tensors = (
        [outputs]
        if isinstance(outputs, torch.Tensor)
        else [t for t in outputs if isinstance(t, torch.Tensor)]
    )
    tensors = [t for t in tensors if t.requires_grad]
    return tensors, [torch.ones_like(t) for t in tensors]


def measure(
    fn: Callable[[], object],
    *,
    mode: str = "full",
    grad_inputs: Sequence[torch.Tensor] = (),
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> tuple[float, float, list[float], int | None, list[float] | None]:
    """Times ``fn`` in ``mode``; returns (median_ms, min_ms, all times, peak memory bytes on GPU or None,
    GPU times or None).

    The peak memory is the most allocated during the timed runs beyond what was allocated before them (the
    inputs): activations, outputs and, for backward and full, the gradients of ``grad_inputs``; the backward
    mode's peak includes its forward's.

    forward: fn() with autograd recording when ``grad_inputs`` require grad; backward: the backward of a
    forward run outside the timed region; full: both. The GPU times queue each call behind a GPU sleep
    longer than the call's wall time, so the host has launched everything before the first kernel starts;
    a call that waits for the GPU (e.g. .item()) is timed with the host work that follows the wait.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)

    def clear_grads():
        for tensor in grad_inputs:
            tensor.grad = None

    def run_once(sleep_cycles: int = 0) -> float:
        clear_grads()
        if mode == "backward":
            outputs, grads = _outputs_and_grads(fn())
            _synchronize(device)
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            start = _Timer(device)
            torch.autograd.backward(outputs, grads)
            return start.stop()
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        start = _Timer(device)
        result = fn()
        if mode == "full":
            outputs, grads = _outputs_and_grads(result)
            torch.autograd.backward(outputs, grads)
        return start.stop()

    for _ in range(warmup):
        run_once()
    clear_grads()  # the last warm-up's gradients would otherwise count as input and hide the new ones
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_memory = torch.cuda.memory_allocated(device)
    times = [run_once() for _ in range(repeats)]
    peak = None
    gpu_times = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_memory
        sleep_ms = min(1.5 * max(times) + 1.0, 500.0)
        cycles = int(sleep_ms * _sleep_cycles_per_ms())
        gpu_times = [run_once(cycles) for _ in range(repeats)]
    clear_grads()
    return statistics.median(times), min(times), times, peak, gpu_times


@functools.cache
def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles of torch.cuda._sleep per millisecond, measured once."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self.end_event.record()
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event)
        return (time.perf_counter() - self.start) * 1e3


def device_peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in GB/s, from the device's memory clock and bus width where torch exposes them."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _tree_differs_from(commit: str) -> bool | None:
    """Whether tracked files differ from `commit`; None without git or when git does not know the commit."""
    try:
        result = subprocess.run(
            ["git", "diff", "--quiet", commit, "--"], capture_output=True, cwd=Path(__file__).parent
        )
    except OSError:
        return None
    return {0: False, 1: True}.get(result.returncode)


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device, commit and versions recorded with every result file.

    The commit is M2F_BENCH_COMMIT where set (a copy of the tree, whose own HEAD may be another commit), else
    git's HEAD; uncommitted_changes says whether tracked files differed from that commit (None where git does
    not know it).
    """
    commit = os.environ.get("M2F_BENCH_COMMIT") or _git("rev-parse", "HEAD")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "device_type": "cuda" if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "commit": commit,
        "uncommitted_changes": None if commit is None else _tree_differs_from(commit),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak_bandwidth_gbs": device_peak_bandwidth_gbs(torch.device("cuda")) if cuda else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def autotune_choices() -> list[dict]:
    """The configs Triton's autotuner chose in this process, one row per autotuned kernel of m2f_kernels.triton
    and autotune key (the kernel's shape-class arguments, then the dtypes of its tensors): kernel name, key and
    config (block sizes, num_warps, num_stages). Empty where no Triton kernel module was imported."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return []
    rows = []
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("m2f_kernels.triton.") or module is None:
            continue
        for name, value in vars(module).items():
            if not isinstance(value, Autotuner):
                continue
            for key, config in value.cache.items():
                settings = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                rows.append(
                    {
                        "kernel": f"{module_name.rsplit('.', 1)[1]}.{name}",
                        "key": [str(part) for part in key],
                        "config": {**config.kwargs, **settings},
                    }
                )
    return rows


class Recorder:
    """Collects the measurements of one benchmark run; ratios are against a baseline of the same group."""

    def __init__(self):
        self.measurements: list[Measurement] = []
        self.host_profiles: list[dict] = []
        self.autotune: list[dict] = []  # a loaded results file's autotune_choices(); written again with it

    def add_host_profile(self, group: str, name: str, rows: list[dict], params: dict | None = None) -> None:
        """Records a host-time breakdown (rows of Python functions, see bench_call_overhead.py)."""
        self.host_profiles.append({"group": group, "name": name, "params": params or {}, "rows": rows})

    def run(
        self,
        group: str,
        name: str,
        fn: Callable[[], object],
        *,
        mode: str = "full",
        grad_inputs: Sequence[torch.Tensor] = (),
        device: torch.device | str = "cpu",
        warmup: int = 3,
        repeats: int = 10,
        params: dict | None = None,
        bytes_moved: int | None = None,
    ) -> Measurement:
        """Measures ``fn`` and records it under (group, name, mode)."""
        median_ms, min_ms, times, peak, gpu_times = measure(
            fn, mode=mode, grad_inputs=grad_inputs, device=device, warmup=warmup, repeats=repeats
        )
        measurement = Measurement(
            group,
            name,
            mode,
            median_ms,
            min_ms,
            times,
            peak,
            params or {},
            bytes_moved,
            statistics.median(gpu_times) if gpu_times else None,
            gpu_times,
        )
        self.measurements.append(measurement)
        return measurement

    def ratio(self, group: str, name: str, baseline: str, mode: str, gpu: bool = False) -> float | None:
        """Speed-up of ``name`` over ``baseline``: baseline time / our time, same group and mode; with
        ``gpu``, of the GPU times (None where either has none)."""
        by_name = {m.name: m for m in self.measurements if m.group == group and m.mode == mode}
        if name not in by_name or baseline not in by_name:
            return None
        if gpu:
            ours, theirs = by_name[name].gpu_median_ms, by_name[baseline].gpu_median_ms
            return theirs / ours if ours and theirs else None
        return by_name[baseline].median_ms / by_name[name].median_ms

    def table(self) -> str:
        """Markdown table of every measurement with its ratio to each other entry of its group and mode."""
        lines = [
            "| group | mode | name | median ms | GPU ms | peak MiB | GB/s | speed-up vs (GPU time) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in self.measurements:
            peers = [
                o for o in self.measurements if o.group == m.group and o.mode == m.mode and o.name != m.name
            ]
            ratios = ", ".join(
                f"{o.name} {o.median_ms / m.median_ms:.2f}x"
                + (
                    f" ({o.gpu_median_ms / m.gpu_median_ms:.2f}x)"
                    if o.gpu_median_ms and m.gpu_median_ms
                    else ""
                )
                for o in peers
            )
            gpu_ms = f"{m.gpu_median_ms:.3f}" if m.gpu_median_ms else "-"
            memory = f"{m.peak_memory_bytes / 2**20:.1f}" if m.peak_memory_bytes is not None else "-"
            bandwidth = f"{m.bandwidth_gbs():.0f}" if m.bytes_moved else "-"
            lines.append(
                f"| {m.group} | {m.mode} | {m.name} | {m.median_ms:.3f} | {gpu_ms} | {memory} | {bandwidth} "
                f"| {ratios} |"
            )
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> Path:
        """Writes the results JSON atomically (temp file + rename), with the Triton autotuner's choices so far."""
        path = Path(path)
        payload = {
            "environment": environment(),
            "results": [dataclasses.asdict(m) for m in self.measurements],
            "host_profiles": self.host_profiles,
            "autotune": [*self.autotune, *autotune_choices()],
        }
        write_bytes_atomic(path, json.dumps(payload, indent=1).encode())
        return path

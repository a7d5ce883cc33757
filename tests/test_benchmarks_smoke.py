"""The benchmark suites import and collect, and a short one runs end to end into a results JSON: the GPU
runs that use them are rare, so a broken benchmark module has to fail here first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_every_benchmark_module_collects():
    result = _pytest("--collect-only", "-q", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
    collected_files = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    expected = {f"benchmarks/{path.name}" for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert expected and collected_files == expected


def _call_overhead_results(tmp_path, selection: str) -> dict:
    """The results JSON of `pytest benchmarks/bench_call_overhead.py -k selection`."""
    results = tmp_path / "results.json"
    result = _pytest(
        "-q", "benchmarks/bench_call_overhead.py", "-k", selection, env={"M2F_BENCH_OUT": str(results)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(results.read_text())


def test_call_overhead_benchmark_records_every_row(tmp_path):
    rows = _call_overhead_results(tmp_path, "masked_attention and forward")["results"]
    names = {(row["group"], row["name"], row["mode"]) for row in rows}
    group = "call_overhead masked_attention"
    assert names == {(group, name, "forward") for name in ("public", "ops_fast_path", "custom_op", "sdpa")}
    assert all(row["median_ms"] > 0 and len(row["times_ms"]) == 10 for row in rows)


def test_host_profile_benchmark_records_the_functions_of_a_call(tmp_path):
    payload = _call_overhead_results(tmp_path, "host_profile and masked_attention")
    assert payload["results"] == []
    [profile] = payload["host_profiles"]
    assert (profile["group"], profile["name"]) == ("host_profile masked_attention", "auto")
    functions = [row["function"] for row in profile["rows"]]
    assert any("masked_attention.py" in function for function in functions), functions
    assert profile["params"]["total_us"] >= max(row["own_us"] for row in profile["rows"]) > 0


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["backward", "full"])
def test_peak_memory_counts_the_input_gradients(mode):
    """The gradient of a 64 MiB input is allocated in every timed backward: the peak includes it."""
    from benchmarks.harness import measure

    x = torch.randn(16 * 2**20, device="cuda", requires_grad=True)
    _, _, _, peak, _ = measure(lambda: x * 2, mode=mode, grad_inputs=[x], device="cuda", warmup=1, repeats=2)
    assert peak >= x.numel() * x.element_size()

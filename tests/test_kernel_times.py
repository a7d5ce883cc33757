"""benchmarks/kernel_times.py, the per-kernel profile that gpu_check.sh runs on GPU machines, checked on the CPU."""

import json

import pytest
import torch

from benchmarks import kernel_times
from m2f_kernels import _backend


def test_lists_the_op_with_its_time_per_call(tmp_path, capsys):
    if not _backend.has_kernel("_pairwise_mask_cost", "cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    out = tmp_path / "kernels.json"
    assert kernel_times.main(["--ops", "pairwise_mask_cost", "--calls", "2", "--out", str(out)]) == 0
    [result] = json.loads(out.read_text())
    assert (result["op"], result["backend"], result["device"]) == ("pairwise_mask_cost", "cpu", "cpu")
    rows = {row["name"]: row for row in result["rows"]}
    kernel = rows["m2f_kernels::_pairwise_mask_cost"]
    assert kernel["count"] == 1 and kernel["time_us"] > 0
    times = [row["time_us"] for row in result["rows"]]
    assert times == sorted(times, reverse=True)
    assert result["total_us"] == pytest.approx(sum(times))
    assert "== pairwise_mask_cost cpu (cpu)" in capsys.readouterr().out


def test_refuses_a_backend_that_is_missing_and_a_zero_count(capsys):
    assert kernel_times.main(["--ops", "pairwise_mask_cost", "--backends", "no-such-backend"]) == 2
    assert "none of the backends" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        kernel_times.main(["--calls", "0"])


def test_a_run_cut_off_keeps_the_ops_it_finished(tmp_path, monkeypatch):
    """gpu_check.sh gives this step a time limit; the JSON was written only at the end, so a run cut off by it
    lost every op it had measured."""
    if not _backend.has_kernel("_pairwise_mask_cost", "cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    measure = kernel_times.kernel_rows
    calls = {"n": 0}

    def cut_off_at_the_second_op(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what the time limit's signal amounts to
        return measure(*args)

    monkeypatch.setattr(kernel_times, "kernel_rows", cut_off_at_the_second_op)
    out = tmp_path / "kernels.json"
    with pytest.raises(KeyboardInterrupt):
        kernel_times.main(
            ["--ops", "pairwise_mask_cost", "point_mask_loss", "--calls", "1", "--out", str(out)]
        )
    assert [result["op"] for result in json.loads(out.read_text())] == ["pairwise_mask_cost"]


def test_masked_attention_is_profiled_at_both_benchmark_shapes(monkeypatch, capsys):
    """B=2, Q=100, K=4096 and B=8, Q=200, K=1024 (where the GPU kernels gain the least over SDPA), 50 %
    dense, as bench_masked_attention.py runs them; the latter in bfloat16 too."""
    from benchmarks import bench_masked_attention

    shapes = []
    make_inputs = bench_masked_attention._inputs

    def small_inputs(batch, queries, keys, density, device, dtype):
        shapes.append((batch, queries, keys, density, dtype))
        return make_inputs(1, 2, 8, density, device, dtype)

    monkeypatch.setattr(bench_masked_attention, "_inputs", small_inputs)
    ops = ["masked_attention", "masked_attention_k1024", "masked_attention_k1024_bf16"]
    assert kernel_times.main(["--ops", *ops, "--backends", "torch", "--calls", "1"]) == 0
    assert shapes == [
        (2, 100, 4096, 0.5, torch.float32),
        (8, 200, 1024, 0.5, torch.float32),
        (8, 200, 1024, 0.5, torch.bfloat16),
    ]
    output = capsys.readouterr().out
    assert "== masked_attention_k1024 torch (cpu)" in output
    assert "== masked_attention_k1024_bf16 torch (cpu)" in output

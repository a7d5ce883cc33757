"""benchmarks/kernel_times.py, the per-kernel profile that gpu_check.sh runs on GPU machines, checked on the CPU."""

import json

import pytest

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

"""benchmarks/report.py on results files written by the real Recorder: tables, ratios, baseline comparison,
format errors and charts."""

import json

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Measurement, Recorder
from benchmarks.report import load_results, main

TINY_GROUP = "tiny/op"
GPU_GROUP = "masked_attention density50%"
PEAK_BANDWIDTH_GBS = 2000.0


def _gpu_like_measurements() -> list[Measurement]:
    """Hand-made measurements with peak memory and bytes moved, as a GPU run records them."""
    return [
        Measurement(
            GPU_GROUP, "ours", "forward", 2.0, 1.5, [2.0, 1.5, 2.5], 3 * 2**20, {}, 750_000_000, 0.5, [0.5]
        ),
        Measurement(
            GPU_GROUP, "sdpa_bool_mask", "forward", 5.0, 4.0, [5.0, 4.0, 6.0], 5 * 2**20, {}, None, 2.0, [2.0]
        ),
        Measurement(GPU_GROUP, "ours", "full", 6.0, 5.5, [6.0, 5.5, 7.0], 8 * 2**20, {}, 1_200_000_000),
        Measurement(GPU_GROUP, "sdpa_bool_mask", "full", 9.0, 8.0, [9.0, 8.0, 9.5], 9 * 2**20, {}, None),
    ]


def _write_results(path, measurements, peak_bandwidth_gbs=None):
    recorder = Recorder()
    recorder.measurements.extend(measurements)
    recorder.write(path)
    if peak_bandwidth_gbs is not None:
        payload = json.loads(path.read_text())
        payload["environment"]["peak_bandwidth_gbs"] = peak_bandwidth_gbs
        path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def results_path(tmp_path):
    """A results file with a CPU group timed by Recorder.run and a GPU-like group of fixed numbers."""
    recorder = Recorder()
    x = torch.randn(256, requires_grad=True)
    for mode in ("forward", "full"):
        options = {"mode": mode, "grad_inputs": [x], "warmup": 1, "repeats": 3}
        recorder.run(TINY_GROUP, "ours", lambda: (x * 2).sum(), **options)
        recorder.run(TINY_GROUP, "reference", lambda: (x.exp() * x.sin()).sum(), **options)
    return _write_results(
        tmp_path / "new.json", recorder.measurements + _gpu_like_measurements(), PEAK_BANDWIDTH_GBS
    )


def _tables(report: str) -> dict[str, list[dict[str, str]]]:
    """The table under every '### group' heading, as one {column: cell} dict per row."""
    tables = {}
    group = None
    for line in report.splitlines():
        if line.startswith("### "):
            group, header = line[4:], None
            tables[group] = []
        elif group is not None and line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            if header is None:
                header = cells
            else:
                tables[group].append(dict(zip(header, cells, strict=True)))
    return tables


def _row(rows, name, mode):
    matches = [row for row in rows if row["name"] == name and row["mode"] == mode]
    assert len(matches) == 1, (name, mode, rows)
    return matches[0]


def _results_by_key(path) -> dict[tuple[str, str, str], dict]:
    return {(r["group"], r["name"], r["mode"]): r for r in json.loads(path.read_text())["results"]}


def test_tables_and_ratios(results_path, tmp_path):
    report = main([str(results_path), "--out", str(tmp_path / "out")])
    text = report.read_text()
    environment = json.loads(results_path.read_text())["environment"]
    assert environment["commit"] is None or environment["commit"][:12] in text
    assert environment["torch"] in text

    tables = _tables(text)
    assert list(tables) == [TINY_GROUP, GPU_GROUP]
    results = _results_by_key(results_path)
    for (group, name, mode), result in results.items():
        row = _row(tables[group], name, mode)
        assert float(row["median ms"]) == pytest.approx(result["median_ms"], rel=5e-3, abs=5e-4)
        assert float(row["min ms"]) == pytest.approx(result["min_ms"], rel=5e-3, abs=5e-4)
        for (other_group, other_name, other_mode), other in results.items():
            if other_group != group or other_mode != mode:
                continue
            cell = row[f"speed-up vs {other_name}"]
            if other_name == name:
                assert cell == "-"
            else:
                expected = other["median_ms"] / result["median_ms"]
                assert float(cell.removesuffix("x")) == pytest.approx(expected, abs=0.006)
    assert len(tables[TINY_GROUP]) == 4

    assert "peak MiB" not in tables[TINY_GROUP][0] and "GB/s" not in tables[TINY_GROUP][0]
    assert "GPU ms" not in tables[TINY_GROUP][0]
    ours_forward = _row(tables[GPU_GROUP], "ours", "forward")
    # 7.5e8 bytes in 0.5 ms of GPU time (2 ms with the host's) = 1500 GB/s, 75% of 2000 GB/s.
    assert ours_forward["peak MiB"] == "3.0"
    assert ours_forward["GB/s"] == "1500"
    assert ours_forward["% of peak"] == "75.0%"
    assert ours_forward["speed-up vs sdpa_bool_mask"] == "2.50x"
    assert ours_forward["GPU ms"] == "0.5" and ours_forward["GPU speed-up vs sdpa_bool_mask"] == "4.00x"
    ours_full = _row(tables[GPU_GROUP], "ours", "full")
    assert ours_full["GPU ms"] == "-"  # no GPU time recorded for this row
    assert ours_full["GB/s"] == "200"  # 1.2e9 bytes over its 6 ms median time
    sdpa_full = _row(tables[GPU_GROUP], "sdpa_bool_mask", "full")
    assert sdpa_full["peak MiB"] == "9.0" and sdpa_full["GB/s"] == "-"
    assert sdpa_full["speed-up vs ours"] == "0.67x"
    assert "time new/old" not in sdpa_full


def test_baseline_comparison(results_path, tmp_path):
    old = _gpu_like_measurements()
    old[0].median_ms = 1.0  # ours forward was twice as fast: a regression
    old[2].median_ms = 8.0  # ours full was slower: an improvement
    old_path = _write_results(tmp_path / "old.json", old[:3])
    report = main([str(results_path), "--out", str(tmp_path / "out"), "--baseline", str(old_path)])
    text = report.read_text()
    tables = _tables(text)

    new_results = _results_by_key(results_path)
    old_results = _results_by_key(old_path)
    for (group, name, mode), result in new_results.items():
        cell = _row(tables[group], name, mode)["time new/old"]
        if (group, name, mode) in old_results:
            expected = result["median_ms"] / old_results[(group, name, mode)]["median_ms"]
            assert float(cell) == pytest.approx(expected, abs=0.006)
        else:
            assert cell == "-"
    assert _row(tables[GPU_GROUP], "ours", "forward")["time new/old"] == "2.00"
    assert _row(tables[GPU_GROUP], "ours", "full")["time new/old"] == "0.75"

    regressions = [line for line in text.split("## Regressions")[1].splitlines() if line.startswith("- ")]
    assert regressions == [f"- {results_path}: {GPU_GROUP} / ours / forward: 1.000 -> 2.000 ms (2.00x)"]


def test_one_chart_per_group_and_no_temp_files(results_path, tmp_path):
    second = _write_results(tmp_path / "second.json", _gpu_like_measurements())
    out = tmp_path / "out"
    report = main([str(results_path), str(second), "--out", str(out)])
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert pngs == [
        "new-masked-attention-density50.png",
        "new-tiny-op.png",
        "second-masked-attention-density50.png",
    ]
    for name in pngs:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({name})" in report.read_text()
    assert sorted(path.name for path in out.iterdir()) == sorted([*pngs, "report.md"])


@pytest.mark.parametrize(
    ("break_file", "message"),
    [
        (lambda payload: payload["results"][1].pop("median_ms"), r"results\[1\] is missing key 'median_ms'"),
        (lambda payload: payload.pop("environment"), "missing key 'environment'"),
        (lambda payload: payload["environment"].pop("commit"), "environment is missing key 'commit'"),
        (lambda payload: payload["results"][0].update(mode="sideways"), r"results\[0\]: mode must be one of"),
        (lambda payload: payload["results"][0].update(median_ms=0), r"results\[0\]: 'median_ms' must be"),
        (lambda payload: payload.update(host_profiles=[{"group": "g"}]), "'host_profiles' must be a list"),
        # These went through to the tables and failed there with a bare KeyError, TypeError or ValueError.
        (
            lambda payload: payload.update(
                host_profiles=[{"group": "g", "name": "n", "rows": [{"function": "f"}]}]
            ),
            r"host_profiles\[0\]\.rows\[0\] must be an object with a string 'function' and numbers",
        ),
        (
            lambda payload: payload["environment"].update(peak_bandwidth_gbs="4.8 TB/s"),
            "environment: 'peak_bandwidth_gbs' must be a number or null",
        ),
        (
            lambda payload: payload["results"][0].update(peak_memory_bytes="1 MB"),
            r"results\[0\]: 'peak_memory_bytes' must be a number or null",
        ),
        (
            lambda payload: payload["results"][0].update(gpu_median_ms="0.1"),
            r"results\[0\]: 'gpu_median_ms' must be a number or null",
        ),
        (
            lambda payload: payload.update(autotune=[{"kernel": "k", "key": "128", "config": {}}]),
            "'autotune' must be a list of objects with 'kernel', a 'key' list and a 'config'",
        ),
    ],
)
def test_malformed_file_is_named(results_path, break_file, message):
    payload = json.loads(results_path.read_text())
    break_file(payload)
    results_path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as error:
        load_results(results_path)
    assert str(results_path) in str(error.value)


def test_host_profiles_are_listed_by_own_time(tmp_path):
    recorder = Recorder()
    rows = [
        {"function": f"ops.py:{line}(f{line})", "calls": 1.0, "own_us": own, "cumulative_us": 2 * own}
        for line, own in ((10, 5.0), (20, 3.5))
    ]
    recorder.add_host_profile("host_profile masked_attention", "triton", rows, {"calls": 20, "total_us": 8.5})
    path = recorder.write(tmp_path / "profile.json")
    report = main([str(path), "--out", str(tmp_path / "out")]).read_text()
    table = _tables(report)["host_profile masked_attention: triton (host time per call, profiled)"]
    assert table == [
        {"own us": "5.0", "cumulative us": "10.0", "function": "ops.py:10(f10)"},
        {"own us": "3.5", "cumulative us": "7.0", "function": "ops.py:20(f20)"},
    ]


def test_the_triton_autotuner_choices_are_recorded_and_listed(tmp_path, monkeypatch):
    """What an autotuned kernel of m2f_kernels.triton keeps per key (the shape classes, then the tensors'
    dtypes) goes into the results JSON with its config, and the report lists it."""
    triton = pytest.importorskip("triton")
    from m2f_kernels.triton import pairwise_mask_cost as module

    key = (128, 64, 16384, "torch.float32", "torch.float32")
    config = triton.Config({"BLOCK_Q": 64, "BLOCK_T": 16, "BLOCK_P": 64}, num_warps=8, num_stages=2)
    monkeypatch.setattr(module._pairwise_partial_kernel, "cache", {key: config})
    path = Recorder().write(tmp_path / "autotune.json")
    rows = json.loads(path.read_text())["autotune"]
    assert {
        "kernel": "pairwise_mask_cost._pairwise_partial_kernel",
        "key": ["128", "64", "16384", "torch.float32", "torch.float32"],
        "config": {"BLOCK_Q": 64, "BLOCK_T": 16, "BLOCK_P": 64, "num_warps": 8, "num_stages": 2},
    } in rows
    monkeypatch.setattr(harness, "autotune_choices", list)  # a process that has tuned nothing
    rewritten = load_results(path).recorder.write(tmp_path / "rewritten.json")
    assert json.loads(rewritten.read_text())["autotune"] == rows  # a loaded file keeps its rows
    table = _tables(main([str(path), "--out", str(tmp_path / "out")]).read_text())["Triton autotuner choices"]
    assert {
        "kernel": "pairwise_mask_cost._pairwise_partial_kernel",
        "key (shape classes, dtypes)": "128, 64, 16384, torch.float32, torch.float32",
        "config": "BLOCK_Q=64, BLOCK_T=16, BLOCK_P=64, num_warps=8, num_stages=2",
    } in table


def test_command_line_error_names_file(results_path, tmp_path, capsys):
    results_path.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main([str(results_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"{results_path}: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_baseline_of_another_device_is_not_compared(results_path, tmp_path):
    old_path = _write_results(tmp_path / "old.json", _gpu_like_measurements())
    payload = json.loads(old_path.read_text())
    payload["environment"]["device"] = "Another Device"
    old_path.write_text(json.dumps(payload))
    text = main([str(results_path), "--out", str(tmp_path / "out"), "--baseline", str(old_path)]).read_text()
    assert (
        "Not compared with the baseline: this file ran on" in text
        and "the baseline on Another Device" in text
    )
    assert all("time new/old" not in table[0] for table in _tables(text).values() if table)
    assert text.split("## Regressions")[1].split("\n", 3)[2] == "None."


def test_uncommitted_changes_are_against_the_named_commit(monkeypatch):
    """M2F_BENCH_COMMIT names the measured commit of a copied tree: changes are counted against it."""
    import subprocess

    from benchmarks.harness import environment

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    first = git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]  # its tree differs from today's
    monkeypatch.setenv("M2F_BENCH_COMMIT", first)
    assert environment()["commit"] == first and environment()["uncommitted_changes"] is True
    monkeypatch.setenv("M2F_BENCH_COMMIT", "0" * 40)  # a commit git does not know
    assert environment()["uncommitted_changes"] is None
    monkeypatch.delenv("M2F_BENCH_COMMIT")
    head_differs = bool(git("status", "--porcelain", "--untracked-files=no"))
    assert environment()["uncommitted_changes"] is head_differs

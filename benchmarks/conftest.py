"""`pytest benchmarks/`: every benchmark records into one Recorder; the run ends with a markdown table and a
results JSON (default .benchmarks/results-<device>.json; set M2F_BENCH_OUT to choose, e.g.
benchmarks/results/<name>.json for results to commit). The JSON is rewritten (atomically) after every test, so
an interrupted run keeps what it measured."""

import os
import re

import pytest
import torch

from benchmarks.harness import Recorder, environment

_recorder = Recorder()


@pytest.fixture(scope="session")
def bench() -> Recorder:
    return _recorder


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _results_path() -> str:
    device_name = re.sub(r"[^A-Za-z0-9]+", "-", environment()["device"]).strip("-").lower() or "cpu"
    return os.environ.get("M2F_BENCH_OUT", f".benchmarks/results-{device_name}.json")


def pytest_runtest_logfinish(nodeid, location):
    if _recorder.measurements or _recorder.host_profiles:
        _recorder.write(_results_path())


def pytest_terminal_summary(terminalreporter):
    if not (_recorder.measurements or _recorder.host_profiles):
        return
    terminalreporter.write_line("")
    terminalreporter.write_line(_recorder.table())
    terminalreporter.write_line(f"results written to {_recorder.write(_results_path())}")

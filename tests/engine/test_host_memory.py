"""m2f.engine.host_memory: glibc's malloc keeping freed memory for reuse, and the CLI commands that ask for it."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from m2f.cli import main
from m2f.engine import host_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Thirty times: two 64 MB tensors computed and freed (y = 2x, z = y + x). Prints whether the settings were
# applied and the page faults of the last twenty times (glibc's heap may take a few rounds to settle:
# tensors are allocated 64-byte aligned, so a freed block is a little short for the next one until
# neighbouring blocks merge).
FAULTS_SCRIPT = """
import json, resource, sys
import torch
from m2f.engine.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
x = torch.ones(16 * 2**20)
def step():
    y = x * 2
    z = y + x
    return float(z[0])
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[10:])}))
"""
PAGES_PER_TENSOR = 64 * 2**20 // 4096


def _run_faults_script(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in host_memory.MALLOC_ENVIRONMENT}
    environment.pop("GLIBC_TUNABLES", None)
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@glibc
def test_freed_tensors_are_reused_without_page_faults():
    kept = _run_faults_script("keep")
    assert kept["applied"] is True
    # Forty tensors served from the heap without a new page: fewer faults than one tensor has pages.
    assert kept["faults"] < PAGES_PER_TENSOR
    if not _transparent_huge_pages_always():
        # glibc's default: every tensor mapped afresh and page-faulted in 4 KiB pages.
        assert _run_faults_script("default")["faults"] >= 40 * PAGES_PER_TENSOR * 0.9


@glibc
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_MAX_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},
    ],
)
def test_malloc_options_from_the_environment_are_left_alone(env):
    result = _run_faults_script("keep", **env)
    assert result["applied"] is False
    assert result["faults"] >= PAGES_PER_TENSOR


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_host_memory() is False


COMMAND_ARGS = {
    "train": ["train", "--config", "demo-tiny", "--data-root", "data"],
    "eval": ["eval", "--checkpoint", "model.safetensors", "--data-root", "data"],
    "predict": ["predict", "image.png", "--checkpoint", "model.safetensors", "--out", "out"],
    "demo": ["demo"],
    "config": ["config", "demo-tiny"],
    "convert": ["convert", "model.pkl", "--format", "detectron2", "--out", "model.safetensors"],
    "export": ["export", "--checkpoint", "model.safetensors", "--out", "model.onnx"],
    "make-synthetic": ["make-synthetic", "--out", "data"],
}


@pytest.mark.parametrize("command", COMMAND_ARGS)
def test_the_commands_that_run_the_model_keep_freed_memory(monkeypatch, command):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_host_memory", lambda: calls.append(command))
    function = f"cmd_{command.replace('-', '_')}"
    monkeypatch.setattr(f"m2f.cli.{function}", lambda args: 0)
    assert main(COMMAND_ARGS[command]) == 0
    assert calls == ([command] if command in ("train", "eval", "predict", "demo") else [])

"""The source distribution carries everything a build from it reads; the test tools are pinned."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("csrc", "CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "README.md")


def source_files(paths) -> list[str]:
    """The files of the working tree under ``paths`` that git tracks or would track."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in result.stdout.split("\0") if name]


def build_from_a_copy(folder: Path, kind: str, env: dict[str, str]) -> Path:
    """The archive `python -m build <kind>` ("--sdist" or "--wheel") makes from a copy of the source tree in
    folder (the repository stays untouched)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    source = folder / "checkout"
    for name in source_files(["."]):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = folder / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", kind, "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    (archive,) = out.glob("*.tar.gz" if kind == "--sdist" else "*.whl")
    return archive


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    """Paths inside the sdist."""
    archive = build_from_a_copy(tmp_path_factory.mktemp("sdist"), "--sdist", {"M2F_KERNELS_SKIP_CUDA": "1"})
    with tarfile.open(archive) as tar:
        return {member.name.split("/", 1)[1] for member in tar.getmembers() if "/" in member.name}


def test_sdist_has_every_build_input(sdist_names):
    expected = set(source_files(BUILD_INPUTS))
    assert "csrc/sources.txt" in expected and any(name.endswith(".cu") for name in expected)
    assert sorted(expected - sdist_names) == []


def test_sdist_has_every_listed_source(sdist_names):
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    listed = {line.split()[1] for line in lines if line.strip() and not line.startswith("#")}
    assert sorted(listed - sdist_names) == []


def test_sdist_leaves_the_tests_and_benchmarks_out(sdist_names):
    """They import each other and need a checkout; half of them in the sdist would not run."""
    assert not [name for name in sdist_names if name.startswith(("tests/", "benchmarks/"))]


def test_build_inplace_does_not_read_pyproject(tmp_path):
    """benchmarks/build_inplace.py (gpu_check.sh's fallback for setuptools older than 77) runs setup.py's build
    where a pyproject.toml that setuptools refuses stops `setup.py build_ext`."""
    for name in (
        "setup.py",
        "m2f_kernels/_build_flags.py",
        "csrc/sources.txt",
        "benchmarks/build_inplace.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\nlicense = 3\n')
    env = {**os.environ, "M2F_KERNELS_NO_EXTENSION": "1"}  # setup.py without the compile

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    refused = run("setup.py", "build_ext", "--inplace")
    assert refused.returncode != 0 and "project.license" in refused.stderr
    built = run("benchmarks/build_inplace.py")
    assert built.returncode == 0, built.stderr


def test_wheel_marks_both_packages_as_typed(tmp_path):
    """py.typed (PEP 561), so that type checkers read the annotations of an installed m2f and m2f_kernels."""
    # The Python packages only, no compile.
    wheel = build_from_a_copy(tmp_path, "--wheel", {"M2F_KERNELS_NO_EXTENSION": "1"})
    with zipfile.ZipFile(wheel) as archive:
        assert {"m2f/py.typed", "m2f_kernels/py.typed"} <= set(archive.namelist())


def test_the_test_tools_are_pinned_and_the_runtime_dependencies_are_not():
    """A new release of a linter or of a library the tests compare against cannot change what `make test`
    says about an unchanged checkout; the package's own dependencies stay unpinned."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    unpinned = [
        r for r in project["optional-dependencies"]["test"] if not re.fullmatch(r"[\w.-]+==[\w.]+", r)
    ]
    assert unpinned == []
    exact = [r for r in project["dependencies"] if "==" in r]
    assert exact == ["torch==2.14.1", "torchvision==0.29.1"]

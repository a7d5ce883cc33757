"""Builds the kernel library in place, as `python setup.py build_ext --inplace` does, without reading
pyproject.toml: for a Python whose setuptools cannot read the project's metadata (its license fields need
setuptools >= 77). gpu_check.sh falls back to it when setup.py fails.

    python benchmarks/build_inplace.py        (from the repository root; setup.py's switches apply)
"""

import runpy
from pathlib import Path

import setuptools
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    arguments = {}
    setuptools.setup = lambda **given: arguments.update(given)  # setup.py's extension and build command
    runpy.run_path(str(ROOT / "setup.py"))
    distribution = Distribution({"name": "m2f-kernels", **arguments})  # no parse_config_files: no pyproject
    distribution.script_name = "setup.py"
    distribution.script_args = ["build_ext", "--inplace"]
    distribution.parse_command_line()
    distribution.run_commands()


if __name__ == "__main__":
    main()

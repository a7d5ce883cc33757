"""Compiles Triton kernels for NVIDIA GPUs on a machine without one.

`recorded_launches()` records, under TRITON_INTERPRET=1, the launch specs (argument types, constexpr values,
launch options) of every kernel an op runs. `compile_in_subprocess()` compiles specs for given architectures in
a separate Python process without the interpreter (the interpreter's kernel objects cannot be compiled); run as
a script, this module is that process: it reads jobs from a JSON file and writes results to another.

A spec at its recorded config (the one pinned launches run) is compiled to cubin. The autotuner's other configs
stop after the LLVM IR, where the shared memory a config needs is known and the layout and tensor-core lowering
has passed; PTX and ptxas, which took 40 % of the time of a compile, run only for the recorded configs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
REPO_ROOT = Path(__file__).resolve().parents[2]

# Constexprs that select the interpreter's code path, with the value a GPU launch passes.
GPU_CONSTEXPRS = {"INTERPRETED": False}


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def describe(spec: dict) -> str:
    """One line: module.kernel(arguments with their types or constexpr values) options."""
    arguments = []
    for name, type_name in spec["signature"].items():
        if type_name == "constexpr":
            value = spec["constexprs"][name]
            arguments.append(f"{name}={value['dtype'] if isinstance(value, dict) else value}")
        else:
            aligned = "(aligned)" if name in spec["aligned"] else ""
            arguments.append(f"{name}:{type_name}{aligned}")
    return f"{spec['module']}.{spec['kernel']}({', '.join(arguments)}) {spec['options']}"


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    import triton.language as tl

    annotation = parameter.annotation
    return annotation is tl.constexpr or (isinstance(annotation, str) and "constexpr" in annotation)


def _encode_constexpr(name: str, value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"constexpr {name}={value!r}: no JSON form for {type(value).__name__}")


def launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """The compile spec of one launch of the Python kernel function `fn`.

    Tensors: Triton's pointer type ("*fp32", "*u1" for bool...) and whether the address is 16-byte aligned
    (Triton specializes on it). Ints: "i32" or "i64" by value, not specialized on the value (the tiny test
    shapes would make 1 a constexpr). Constexprs and None: by value. Other keywords: the launch options.
    """
    from triton.runtime.jit import mangle_type

    parameters = inspect.signature(fn).parameters
    options = {name: value for name, value in kwargs.items() if name not in parameters and value is not None}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in parameters})
    bound.apply_defaults()
    signature, constexprs, aligned = {}, {}, []
    for name, value in bound.arguments.items():
        if _is_constexpr(parameters[name]) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = _encode_constexpr(name, GPU_CONSTEXPRS.get(name, value))
        else:
            signature[name] = mangle_type(value, False)
            if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
                aligned.append(name)
    return {
        "module": fn.__module__,
        "kernel": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "aligned": aligned,
        "options": options,
    }


@contextlib.contextmanager
def recorded_launches():
    """Yields a dict spec_key -> spec that fills with the distinct launch specs of the interpreted kernels."""
    from triton.runtime import interpreter

    specs: dict[str, dict] = {}
    original_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self.fn, args, kwargs)
        specs.setdefault(spec_key(spec), spec)
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        yield specs
    finally:
        interpreter.InterpretedFunction.run = original_run


def compile_in_subprocess(tasks: list[dict], workers: int = 2) -> dict:
    """Compiles launch specs for NVIDIA GPUs in a process without the interpreter.

    tasks: {"spec": spec, "archs": [80, ...], "sweep_archs": [90, ...]}: the spec with its recorded config for
    each arch of archs, and with every config of the kernel's autotuner for each arch of sweep_archs.
    Returns {"unavailable": reason} when Triton's NVIDIA backend or ptxas is missing, else {"results": [...]}:
    one dict per compile with task (index into tasks), arch, config ("recorded" or "autotune <i>: <config>"),
    ok, shared (bytes of shared memory), error, last_stage ("cubin", or "llir" for the autotuner's configs; None
    after an error) and seconds.
    """
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        (folder / "request.json").write_text(json.dumps({"tasks": tasks, "workers": workers}))
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        environment["CUDA_VISIBLE_DEVICES"] = ""
        environment["TRITON_CACHE_DIR"] = str(folder / "cache")  # every compile runs, nothing is left behind
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        completed = subprocess.run(
            [sys.executable, __file__, str(folder / "request.json"), str(folder / "response.json")],
            env=environment,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"the compile process failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
            )
        return json.loads((folder / "response.json").read_text())


# ---- the compile process (no TRITON_INTERPRET) ----


def _unavailable_reason() -> str | None:
    import triton

    if "nvidia" not in triton.backends.backends:
        return "Triton has no NVIDIA backend"
    try:
        triton.knobs.nvidia.ptxas.path  # noqa: B018 (looks ptxas up, raises when missing)
    except RuntimeError as error:
        return f"ptxas is not available: {error}"
    return None


def _kernel(module: str, name: str):
    """The JITFunction and its autotuner's configs (empty when not autotuned)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(module), name)
    configs = []
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Autotuner):
            configs = kernel.configs
        kernel = kernel.fn
    return kernel, configs


def _jobs(tasks: list[dict]) -> list[dict]:
    """One job per (task, arch, config): the constexprs and options that config sets on top of the spec."""
    jobs = []
    for index, task in enumerate(tasks):
        spec = task["spec"]
        for arch in task["archs"]:
            jobs.append(
                {
                    "task": index,
                    "arch": arch,
                    "config": "recorded",
                    "constexprs": {},
                    "options": spec["options"],
                }
            )
        _, configs = _kernel(spec["module"], spec["kernel"])
        for arch in task["sweep_archs"]:
            for number, config in enumerate(configs):
                options = {k: v for k, v in config.all_kwargs().items() if k not in config.kwargs}
                jobs.append(
                    {
                        "task": index,
                        "arch": arch,
                        "config": f"autotune {number}: {config.kwargs} {options}",
                        "constexprs": dict(config.kwargs),
                        "options": options,
                    }
                )
    return jobs


def _compile_key(spec: dict, job: dict) -> str:
    """Equal for jobs that compile the same thing (a recorded config is often one of the autotuner's)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options = make_backend(GPUTarget("cuda", job["arch"], 32)).parse_options(job["options"])
    constexprs = {**spec["constexprs"], **job["constexprs"]}
    return spec_key({**spec, "constexprs": constexprs, "options": options.hash(), "arch": job["arch"]})


class _LLVMIRDone(Exception):
    """Ends a compile after its LLVM IR, with the shared memory (bytes) the IR needs."""

    def __init__(self, shared: int):
        super().__init__(shared)
        self.shared = shared


def _stop_after_llvm_ir(*args):
    """Triton's pipeline hook: called without arguments, the part it adds to the compile's cache key; with the
    backend's stages, makes the LLVM IR stage the last one."""
    if not args:
        return "stop-after-llir", "stop-after-llir"
    _, stages, *_ = args
    make_llvm_ir = stages["llir"]

    def llvm_ir_then_stop(source, metadata):
        make_llvm_ir(source, metadata)
        raise _LLVMIRDone(metadata["shared"])

    stages["llir"] = llvm_ir_then_stop


def _compile(spec: dict, job: dict) -> dict:
    """{"ok", "shared", "error", "last_stage", "seconds"} of compiling `spec` with the job's arch, constexprs and
    options: to cubin at the recorded config, to LLVM IR at the autotuner's configs."""
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _ = _kernel(spec["module"], spec["kernel"])
    constexprs = {
        k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in spec["constexprs"].items()
    }
    constexprs.update(job["constexprs"])
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec["aligned"]}
    source = ASTSource(kernel, spec["signature"], constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    result = {"shared": None, "error": None, "last_stage": None}
    knobs.runtime.add_stages_inspection_hook = None if job["config"] == "recorded" else _stop_after_llvm_ir
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        result["shared"] = compiled.metadata.shared
        result["last_stage"] = "cubin"
    except _LLVMIRDone as done:
        result["shared"] = done.shared
        result["last_stage"] = "llir"
    except Exception as error:  # every compile error is a result, with its message
        message = str(error) or traceback.format_exc(limit=3)
        result["error"] = f"{type(error).__name__}: {message}"[-3000:]
    result["ok"] = result["error"] is None
    result["seconds"] = time.perf_counter() - start
    return result


def _compile_unpacked(spec_and_job: tuple[dict, dict]) -> dict:
    return _compile(*spec_and_job)


def main(request_path: str, response_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    reason = _unavailable_reason()
    if reason is not None:
        Path(response_path).write_text(json.dumps({"unavailable": reason}))
        return
    tasks = request["tasks"]
    jobs = _jobs(tasks)
    keys = [_compile_key(tasks[job["task"]]["spec"], job) for job in jobs]
    # Recorded configs first: an autotuner config equal to one reuses its cubin compile, never the other way.
    unique: dict[str, tuple[dict, dict]] = {}
    for job, key in sorted(zip(jobs, keys, strict=True), key=lambda pair: pair[0]["config"] != "recorded"):
        unique.setdefault(key, (tasks[job["task"]]["spec"], job))
    with concurrent.futures.ProcessPoolExecutor(max(1, request["workers"])) as pool:
        compiled = dict(zip(unique, pool.map(_compile_unpacked, unique.values()), strict=True))
    results = [{**job, **compiled[key]} for job, key in zip(jobs, keys, strict=True)]
    Path(response_path).write_text(json.dumps({"results": results}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

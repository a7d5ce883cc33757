"""Markdown report and bar charts from results JSON files written by ``Recorder.write``.

``python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR] [--baseline OLD.json]`` writes
DIR/report.md (the device, commit and versions of every file, then one table per group: median and min ms,
speed-up over every other entry of the group in the same mode as ``Recorder.ratio`` computes it, the same for
the GPU times (launch overhead excluded) where the run has them, peak memory,
achieved bandwidth and its fraction of the device peak) and one PNG bar chart per group. With ``--baseline``
every row also gets its time relative to the same (group, name, mode) in OLD.json, and rows slower than
``--threshold`` are listed as regressions. Host-time profiles and the configs Triton's autotuner chose (per
kernel and shape class) are listed where the run recorded them.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import MODES, Measurement, Recorder
from m2f.files import write_bytes_atomic

ENVIRONMENT_KEYS = ("device", "commit", "torch", "triton", "cuda", "peak_bandwidth_gbs")
RESULT_KEYS = tuple(field.name for field in dataclasses.fields(Measurement))
REQUIRED_RESULT_KEYS = tuple(
    field.name
    for field in dataclasses.fields(Measurement)
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
)
DEFAULT_THRESHOLD = 1.10
HOST_PROFILE_ROWS = 10  # functions listed per host profile


@dataclasses.dataclass
class ResultsFile:
    """One loaded results file: its path, its environment and a Recorder holding its measurements."""

    path: Path
    environment: dict
    recorder: Recorder

    def groups(self) -> dict[str, list[Measurement]]:
        """Measurements by group, groups in recording order, rows ordered by mode then recording order."""
        groups: dict[str, list[Measurement]] = {}
        for m in self.recorder.measurements:
            groups.setdefault(m.group, []).append(m)
        for rows in groups.values():
            rows.sort(key=lambda m: MODES.index(m.mode))
        return groups


def load_results(path: str | os.PathLike) -> ResultsFile:
    """Reads and checks one results JSON; a ValueError names the file and what is wrong."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object with 'environment' and 'results'")
    for key, kind in (("environment", dict), ("results", list)):
        if key not in payload:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(payload[key], kind):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}")
    environment = payload["environment"]
    for key in ENVIRONMENT_KEYS:
        if key not in environment:
            raise ValueError(f"{path}: environment is missing key {key!r}")
    _check_number_or_null(f"{path}: environment", environment, "peak_bandwidth_gbs")
    recorder = Recorder()
    for index, row in enumerate(payload["results"]):
        where = f"{path}: results[{index}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} must be an object")
        for key in REQUIRED_RESULT_KEYS:
            if key not in row:
                raise ValueError(f"{where} is missing key {key!r}")
        if row["mode"] not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {row['mode']!r}")
        for key in ("median_ms", "min_ms"):
            if not _is_number(row[key]) or row[key] <= 0:
                raise ValueError(f"{where}: {key!r} must be a positive number, got {row[key]!r}")
        for key in ("peak_memory_bytes", "bytes_moved", "gpu_median_ms"):
            _check_number_or_null(where, row, key)
        recorder.measurements.append(Measurement(**{k: v for k, v in row.items() if k in RESULT_KEYS}))
    profiles = payload.get("host_profiles", [])
    if not isinstance(profiles, list) or not all(
        isinstance(p, dict) and {"group", "name", "rows"} <= p.keys() and isinstance(p["rows"], list)
        for p in profiles
    ):
        raise ValueError(f"{path}: 'host_profiles' must be a list of objects with 'group', 'name' and 'rows'")
    for index, profile in enumerate(profiles):
        for row_index, row in enumerate(profile["rows"]):
            if not (
                isinstance(row, dict)
                and isinstance(row.get("function"), str)
                and all(_is_number(row.get(key)) for key in ("own_us", "cumulative_us"))
            ):
                raise ValueError(
                    f"{path}: host_profiles[{index}].rows[{row_index}] must be an object with a string "
                    f"'function' and numbers 'own_us' and 'cumulative_us', got {row!r}"
                )
    recorder.host_profiles = profiles
    autotune = payload.get("autotune", [])
    if not isinstance(autotune, list) or not all(
        isinstance(row, dict)
        and isinstance(row.get("kernel"), str)
        and isinstance(row.get("key"), list)
        and isinstance(row.get("config"), dict)
        for row in autotune
    ):
        raise ValueError(
            f"{path}: 'autotune' must be a list of objects with 'kernel', a 'key' list and a 'config'"
        )
    recorder.autotune = autotune
    return ResultsFile(path, environment, recorder)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number_or_null(where: str, mapping: dict, key: str) -> None:
    value = mapping.get(key)
    if value is not None and not _is_number(value):
        raise ValueError(f"{where}: {key!r} must be a number or null, got {value!r}")


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _format(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_ms(value: float) -> str:
    """Three decimals from 1 ms up, three significant digits below (CPU timings of tiny ops)."""
    return f"{value:.3f}" if value >= 1 else f"{value:.3g}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def environment_table(files: Sequence[ResultsFile], baseline: ResultsFile | None) -> list[str]:
    """One row per results file (and the baseline file): device, commit and versions."""
    header = ["file", "device", "commit", "torch", "triton", "CUDA", "peak GB/s"]
    labelled = [(str(f.path), f) for f in files]
    if baseline is not None:
        labelled.append((f"{baseline.path} (baseline)", baseline))
    rows = []
    for label, f in labelled:
        env = f.environment
        commit = env["commit"][:12] if env["commit"] else None
        versions = [
            _cell(value) for value in (env["device"], commit, env["torch"], env["triton"], env["cuda"])
        ]
        rows.append([_cell(label), *versions, _format(env["peak_bandwidth_gbs"], ".0f")])
    return _markdown_table(header, rows)


def group_table(
    results: ResultsFile, group: str, rows: list[Measurement], old_times: dict | None
) -> list[str]:
    """Markdown table of one group; optional columns appear only where some row has a value."""
    names = list(dict.fromkeys(m.name for m in results.recorder.measurements if m.group == group))
    peak_gbs = results.environment["peak_bandwidth_gbs"]
    has_memory = any(m.peak_memory_bytes is not None for m in rows)
    has_bandwidth = any(m.bytes_moved for m in rows)
    has_gpu_time = any(m.gpu_median_ms for m in rows)
    header = ["name", "mode", "median ms", "min ms"] + [f"speed-up vs {_cell(name)}" for name in names]
    if has_gpu_time:
        header += ["GPU ms"] + [f"GPU speed-up vs {_cell(name)}" for name in names]
    if has_memory:
        header.append("peak MiB")
    if has_bandwidth:
        header.append("GB/s")
        if peak_gbs:
            header.append("% of peak")
    if old_times is not None:
        header.append("time new/old")
    table_rows = []
    for m in rows:
        row = [_cell(m.name), m.mode, format_ms(m.median_ms), format_ms(m.min_ms)]
        for name in names:
            ratio = None if name == m.name else results.recorder.ratio(group, m.name, name, m.mode)
            row.append(_format(ratio, ".2f", "x"))
        if has_gpu_time:
            row.append(_format(m.gpu_median_ms, ".3g"))
            for name in names:
                ratio = (
                    None if name == m.name else results.recorder.ratio(group, m.name, name, m.mode, gpu=True)
                )
                row.append(_format(ratio, ".2f", "x"))
        if has_memory:
            memory = m.peak_memory_bytes / 2**20 if m.peak_memory_bytes is not None else None
            row.append(_format(memory, ".1f"))
        bandwidth = m.bandwidth_gbs()
        if has_bandwidth:
            row.append(_format(bandwidth, ".0f"))
            if peak_gbs:
                row.append(_format(100 * bandwidth / peak_gbs if bandwidth else None, ".1f", "%"))
        if old_times is not None:
            old = old_times.get((m.group, m.name, m.mode))
            row.append(_format(m.median_ms / old if old else None, ".2f"))
        table_rows.append(row)
    return _markdown_table(header, table_rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "group"


def bar_chart_png(group: str, rows: list[Measurement], title_suffix: str) -> bytes:
    """PNG of the median ms of every name, one bar per mode, min..median as the error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(m.name for m in rows))
    modes = [mode for mode in MODES if any(m.mode == mode for m in rows)]
    width = 0.8 / len(modes)
    figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for offset, mode in enumerate(modes):
        by_name = {m.name: m for m in rows if m.mode == mode}
        positions = [
            i + (offset - (len(modes) - 1) / 2) * width for i, name in enumerate(names) if name in by_name
        ]
        medians = [by_name[name].median_ms for name in names if name in by_name]
        spreads = [by_name[name].median_ms - by_name[name].min_ms for name in names if name in by_name]
        axes.bar(positions, medians, width, yerr=[spreads, [0] * len(spreads)], label=mode, capsize=3)
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("ms (bar: median, whisker down to min)")
    axes.set_title(f"{group}{title_suffix}", fontsize=9)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(
    files: Sequence[ResultsFile],
    out_dir: str | os.PathLike,
    baseline: ResultsFile | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Path:
    """Writes out_dir/report.md and one PNG per (file, group); returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old_times = None
    if baseline is not None:
        old_times = {(m.group, m.name, m.mode): m.median_ms for m in baseline.recorder.measurements}
    lines = ["# Benchmark report", "", *environment_table(files, baseline), ""]
    lines.append(
        "Times in ms over the repeats of one run; `speed-up vs X` is X's median time / this row's, same group "
        "and mode of the same run (> 1: this row is faster). `GPU ms` (GPU runs) is the time of the same call "
        "queued behind a GPU sleep, so the host's launch overhead is excluded; `GPU speed-up vs X` compares those."
    )
    if baseline is not None:
        lines.append(f"`time new/old` is this row's median time / the same entry's in {baseline.path}.")
    regressions = []
    png_names: set[str] = set()
    for results in files:
        lines += ["", f"## {results.path}"]
        file_old_times = old_times
        if baseline is not None and results.environment["device"] != baseline.environment["device"]:
            file_old_times = None  # times of another device say nothing about a regression
            lines += [
                "",
                f"Not compared with the baseline: this file ran on {results.environment['device']}, "
                f"the baseline on {baseline.environment['device']}.",
            ]
        title_suffix = f" ({results.environment['device']})" if len(files) > 1 else ""
        for group, rows in results.groups().items():
            lines += ["", f"### {group}", "", *group_table(results, group, rows, file_old_times)]
            stem = _slug(f"{results.path.stem}-{group}" if len(files) > 1 else group)
            png_name, counter = f"{stem}.png", 1
            while png_name in png_names:
                counter += 1
                png_name = f"{stem}-{counter}.png"
            png_names.add(png_name)
            write_bytes_atomic(out_dir / png_name, bar_chart_png(group, rows, title_suffix))
            lines += ["", f"![{group}]({png_name})"]
            if file_old_times is not None:
                for m in rows:
                    old = file_old_times.get((m.group, m.name, m.mode))
                    if old and m.median_ms / old > threshold:
                        regressions.append(
                            f"- {results.path}: {m.group} / {m.name} / {m.mode}: "
                            f"{format_ms(old)} -> {format_ms(m.median_ms)} ms ({m.median_ms / old:.2f}x)"
                        )
        for profile in results.recorder.host_profiles:
            lines += ["", f"### {profile['group']}: {profile['name']} (host time per call, profiled)", ""]
            rows = [
                [_format(row["own_us"], ".1f"), _format(row["cumulative_us"], ".1f"), _cell(row["function"])]
                for row in profile["rows"][:HOST_PROFILE_ROWS]
            ]
            lines += _markdown_table(["own us", "cumulative us", "function"], rows)
        if results.recorder.autotune:
            lines += ["", "### Triton autotuner choices", ""]
            rows = [
                [
                    _cell(row["kernel"]),
                    _cell(", ".join(str(part) for part in row["key"])),
                    _cell(", ".join(f"{name}={value}" for name, value in row["config"].items())),
                ]
                for row in results.recorder.autotune
            ]
            lines += _markdown_table(["kernel", "key (shape classes, dtypes)", "config"], rows)
    if baseline is not None:
        lines += ["", f"## Regressions (time new/old > {threshold:.2f})", ""]
        lines += regressions or ["None."]
    report = out_dir / "report.md"
    write_bytes_atomic(report, ("\n".join(lines) + "\n").encode())
    return report


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files written by the benchmarks")
    parser.add_argument("--out", type=Path, default=Path(".benchmarks/report"), help="output folder")
    parser.add_argument("--baseline", type=Path, help="older results JSON to compare every time against")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="time new/old above which an entry is listed as a regression (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.threshold <= 0:
        parser.error(f"--threshold must be positive, got {args.threshold}")
    try:
        files = [load_results(path) for path in args.results]
        baseline = load_results(args.baseline) if args.baseline is not None else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    report = write_report(files, args.out, baseline, args.threshold)
    print(f"report written to {report}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()

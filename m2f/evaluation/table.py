"""Result tables in the style detectron2 prints for Mask2Former (markdown, values in percent), JSON output."""

from __future__ import annotations

import math

from m2f.files import write_json_atomic


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) + 2 for i in range(len(header))]
    lines = ["|" + "|".join(h.center(w) for h, w in zip(header, widths)) + "|"]
    lines.append("|" + "|".join(":" + "-" * (w - 2) + ":" for w in widths) + "|")
    lines += ["|" + "|".join(c.center(w) for c, w in zip(row, widths)) + "|" for row in rows]
    return "\n".join(lines)


def _number(value) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


def _panoptic_table(results: dict) -> str:
    rows = [
        [
            name,
            _number(results["PQ" + s]),
            _number(results["SQ" + s]),
            _number(results["RQ" + s]),
            str(results["N" + s]),
        ]
        for name, s in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
    ]
    return "Panoptic segmentation:\n" + _markdown(["", "PQ", "SQ", "RQ", "#categories"], rows)


def _ap_table(title: str, metrics: dict) -> str:
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return f"{title}:\n" + _markdown(names, [[_number(metrics[n]) for n in names]])


def _semantic_table(results: dict) -> str:
    names = ["mIoU", "fwIoU", "mACC", "pACC"]
    return "Semantic segmentation:\n" + _markdown(names, [[_number(results[n]) for n in names]])


def format_table(results: dict) -> str:
    """Tables for one evaluator's compute() result, or for a dict of such results (e.g. {"panoptic": ...,
    "instance": ...}): PQ/SQ/RQ rows for All/Things/Stuff; segm AP and box AP (from masks) with AP50, AP75,
    APs/m/l (Cityscapes: AP and AP50); mIoU, fwIoU, mACC, pACC."""
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    if "task" not in results:
        parts = [format_table(value) for value in results.values() if isinstance(value, dict)]
        if not parts:
            raise ValueError("results holds no evaluation result (dicts with a 'task' key)")
        return "\n\n".join(parts)
    task = results["task"]
    if task == "panoptic":
        return _panoptic_table(results)
    if task == "instance" and results.get("benchmark") == "cityscapes":
        names = ["AP", "AP50"]
        metrics = results["segm"]
        return "Instance segmentation, Cityscapes AP:\n" + _markdown(
            names, [[_number(metrics[n]) for n in names]]
        )
    if task == "instance":
        return "\n\n".join(
            [
                _ap_table("Instance segmentation, mask AP (segm)", results["segm"]),
                _ap_table("box AP (from masks)", results["bbox_from_masks"]),
            ]
        )
    if task == "semantic":
        return _semantic_table(results)
    raise ValueError(f"unknown task {task!r} in results")


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(path: str, results: dict) -> None:
    """Write results as JSON (NaN as null) through a temporary file and a rename."""
    write_json_atomic(path, _json_safe(results), indent=2)

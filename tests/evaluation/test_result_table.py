import json
import math
import os

import pytest

from m2f.evaluation import format_table, write_results

PANOPTIC = {"task": "panoptic", "PQ": 52.0, "SQ": 83.1, "RQ": 62.0, "N": 133, "PQ_th": 58.2, "SQ_th": 84.0,
            "RQ_th": 68.5, "N_th": 80, "PQ_st": 42.6, "SQ_st": 81.2, "RQ_st": 52.1, "N_st": 53}  # fmt: skip
AP = {"AP": 42.9, "AP50": 65.1, "AP75": 46.3, "APs": 22.4, "APm": 46.0, "APl": float("nan")}
INSTANCE = {"task": "instance", "segm": AP, "bbox_from_masks": dict(AP, AP=45.5)}
SEMANTIC = {"task": "semantic", "mIoU": 47.2, "fwIoU": 70.1, "mACC": 60.3, "pACC": 82.0}


def _row(table, first_cell):
    rows = [line for line in table.splitlines() if line.startswith("|")]
    (line,) = [line for line in rows if line.split("|")[1].strip() == first_cell]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_panoptic_rows():
    table = format_table(PANOPTIC)
    assert _row(table, "All") == ["All", "52.000", "83.100", "62.000", "133"]
    assert _row(table, "Things") == ["Things", "58.200", "84.000", "68.500", "80"]
    assert _row(table, "Stuff") == ["Stuff", "42.600", "81.200", "52.100", "53"]
    header = [c.strip() for c in table.splitlines()[1].strip("|").split("|")]
    assert header == ["", "PQ", "SQ", "RQ", "#categories"]


def test_instance_and_semantic_tables_and_combined():
    table = format_table({"panoptic": PANOPTIC, "instance": INSTANCE, "semantic": SEMANTIC})
    assert "Panoptic segmentation" in table and "mask AP (segm)" in table and "box AP (from masks)" in table
    assert _row(table, "42.900")[-1] == "nan" and _row(table, "45.500")[0] == "45.500"
    assert _row(table, "47.200") == ["47.200", "70.100", "60.300", "82.000"]
    with pytest.raises(ValueError, match="task"):
        format_table({"task": "depth"})
    with pytest.raises(TypeError):
        format_table([PANOPTIC])


def test_write_results_is_valid_json(tmp_path):
    path = str(tmp_path / "out" / "results.json")
    write_results(path, {"instance": INSTANCE})
    with open(path) as f:
        loaded = json.load(f)
    assert loaded["instance"]["segm"]["APl"] is None and math.isclose(loaded["instance"]["segm"]["AP"], 42.9)
    assert os.listdir(tmp_path / "out") == ["results.json"]

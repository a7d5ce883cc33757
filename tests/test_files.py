"""m2f.files: whole files or none, and every writer reads back what it wrote."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from m2f import files
from m2f.engine.predict import ClassInfo, save_prediction


def failing_replace(src, dst):
    raise OSError("disk full")


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    files.write_bytes_atomic(target, b"old")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        files.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_permissions_are_those_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    files.write_text_atomic(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o7777 == plain.stat().st_mode & 0o7777
    os.chmod(plain, 0o640)
    files.write_text_atomic(plain, "y")  # replacing a file keeps its permissions
    assert plain.stat().st_mode & 0o7777 == 0o640 and plain.read_text() == "y"


@pytest.mark.parametrize("character", ["n", "\N{GRINNING FACE}"])
def test_longest_file_name_is_written(tmp_path, character):
    name_bytes = os.pathconf(tmp_path, "PC_NAME_MAX") - len(".png")
    target = tmp_path / (character * (name_bytes // len(character.encode())) + ".png")
    files.write_bytes_atomic(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"data"


def test_writers_round_trip(tmp_path):
    files.write_text_atomic(tmp_path / "a" / "b.txt", "text\n")  # creates the folders
    assert (tmp_path / "a" / "b.txt").read_text() == "text\n"
    files.write_json_atomic(tmp_path / "c.json", {"x": [1, 2]}, indent=2)
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    pixels = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    files.save_image_atomic(Image.fromarray(pixels), tmp_path / "d.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), pixels)
    files.save_npz_atomic(tmp_path / "e.npz", masks=pixels > 100, scores=np.arange(3.0))
    with np.load(tmp_path / "e.npz") as arrays:
        assert np.array_equal(arrays["masks"], pixels > 100) and np.array_equal(
            arrays["scores"], np.arange(3.0)
        )
    with pytest.raises(ValueError, match="suffix"):
        files.save_image_atomic(Image.fromarray(pixels), tmp_path / "f.unknown")


def test_figure_is_written_in_its_suffix_format(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    files.save_figure_atomic(figure, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    files.save_figure_atomic(figure, tmp_path / "plot.svg")
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:500]


def test_interrupted_prediction_leaves_no_partial_file(tmp_path, monkeypatch):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    panoptic = torch.zeros(8, 8, dtype=torch.int64)
    panoptic[2:5, 2:5] = 1
    segments = [{"id": 1, "category_id": 0, "isthing": True, "score": 0.9}]
    classes = ClassInfo(["thing"], {0}, None)
    written = save_prediction("panoptic", (panoptic, segments), image, tmp_path / "img", classes, 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    for path in written:
        path.unlink()
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_prediction("panoptic", (panoptic, segments), image, tmp_path / "img", classes, 0.5)
    assert list(tmp_path.iterdir()) == []


def test_semantic_category_ids_above_255_read_back_in_16_bit(tmp_path):
    """A label file of category ids holds every id as written, in 16 bit when an id is beyond 8 bit (three
    classes, so the class indices alone would fit 8 bit)."""
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    labels = torch.tensor([[0, 1, 2, 1, 0, 2]] * 4)
    classes = ClassInfo(["a", "b", "c"], set(), [7, 300, 12])
    written = save_prediction(
        "semantic", labels, image, tmp_path / "img", classes, 0.5, overlay=False, category_ids=True
    )
    assert [p.name for p in written] == ["img.semantic_category_ids.png"]
    expected = np.array([[7, 300, 12, 300, 7, 12]] * 4)
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])), expected)


def test_output_paths_are_checked_before_writing(tmp_path):
    a_file, a_folder = tmp_path / "file", tmp_path / "folder"
    a_file.write_text("x")
    a_folder.mkdir()
    assert files.check_output_path(tmp_path / "new" / "out.json", "output") == tmp_path / "new" / "out.json"
    files.check_output_path(a_folder, "out", folder=True)
    with pytest.raises(ValueError, match=r"output .*folder is a folder; expected a file name"):
        files.check_output_path(a_folder, "output")
    with pytest.raises(ValueError, match=r"out .*file is a file; expected a folder"):
        files.check_output_path(a_file, "out", folder=True)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        files.check_output_path(a_file / "deeper" / "out.json", "output")
    spelled_otherwise = a_folder / ".." / "file"
    with pytest.raises(
        ValueError, match=r"output .*file would overwrite an input of this command \(.*file\)"
    ):
        files.check_output_path(spelled_otherwise, "output", inputs=[a_folder, str(a_file)])
    files.check_output_path(tmp_path / "other", "output", inputs=[a_file])


def test_stale_temporaries_of_the_named_targets_are_removed(tmp_path):
    """A process killed while writing (SIGKILL, power loss) leaves its temporary file behind."""
    stale = [tmp_path / ".model_0000004.state.pt.ab12_d34.tmp", tmp_path / ".metrics.csv.zzzzzzzz.tmp"]
    kept = [
        tmp_path / ".results.json.abcdefgh.tmp",  # another target
        tmp_path / ".model_0000004.tmp",  # not a temporary name of write_bytes_atomic
        tmp_path / "model_0000004.safetensors",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = files.remove_stale_temporaries(tmp_path, ("model_", "metrics.csv"))
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_terminate_signal_during_a_write_removes_the_temporary_file(tmp_path):
    """SIGTERM (schedulers, torchrun, kill) ended the process on the spot, leaving a checkpoint-sized
    temporary file; under the CLI it raises SystemExit(143), so the writer cleans up."""
    import subprocess
    import sys

    script = f"""
import os, signal
from m2f import files
from m2f.cli import _terminate_as_exit

def fsync_then_terminated(fd):
    os.kill(os.getpid(), signal.SIGTERM)

files.os.fsync = fsync_then_terminated
with _terminate_as_exit():
    files.write_bytes_atomic({str(tmp_path / "model_0000001.state.pt")!r}, b"x" * 1000)
print("not reached")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr
    assert "not reached" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_terminate_handler_is_restored_after_the_command():
    import subprocess
    import sys

    script = """
import signal
from m2f.cli import _terminate_as_exit

before = signal.getsignal(signal.SIGTERM)
with _terminate_as_exit():
    assert signal.getsignal(signal.SIGTERM) is not before
assert signal.getsignal(signal.SIGTERM) is before
print("restored")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "restored", result.stderr

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.cli import main
from m2f.data import rgb_to_id
from m2f.engine import checkpoint as ckpt


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    args = ["make-synthetic", "--out", str(root), "--num-train", "4", "--num-val", "2", "--image-size", "64"]
    assert main(args) == 0
    return root


def train_args(data_root, out, max_iters: int) -> list[str]:
    """`m2f train` of demo-tiny on the CPU: batches of 2 crops of 64 pixels, no loader workers, no progress bar."""
    args = ["train", "--config", "demo-tiny", "--data-root", str(data_root), "--out", str(out)]
    args += ["--max-iters", str(max_iters), "--batch-size", "2", "--image-size", "64", "--num-workers", "0"]
    return [*args, "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main([*train_args(synthetic_root, out, 2), "--log-period", "1"]) == 0
    return out


def test_make_synthetic_writes_the_coco_layout(synthetic_root):
    assert len(list((synthetic_root / "train2017").glob("*.jpg"))) == 4
    assert len(list((synthetic_root / "val2017").glob("*.jpg"))) == 2
    panoptic = json.loads((synthetic_root / "annotations" / "panoptic_val2017.json").read_text())
    assert len(panoptic["annotations"]) == 2


def test_train_writes_checkpoints_and_log(trained_run):
    assert (trained_run / "model_0000002.safetensors").is_file()
    assert (trained_run / "model_0000002.state.pt").is_file()
    assert (trained_run / "model_final.safetensors").is_file()
    with (trained_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["total_loss"])) for r in rows)


def test_train_resume_continues_from_the_last_checkpoint(synthetic_root, trained_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained_run, out)
    assert main([*train_args(synthetic_root, out, 3), "--resume", "--log-period", "1"]) == 0
    assert "at iteration 2" in capsys.readouterr().out
    with (out / "metrics.csv").open() as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_eval_prints_table_and_writes_json(synthetic_root, trained_run, tmp_path, capsys):
    output = tmp_path / "results.json"
    args = ["eval", "--config", "demo-tiny", "--checkpoint", str(trained_run / "model_final.safetensors")]
    args += [
        "--data-root",
        str(synthetic_root),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "PQ" in printed and "Things" in printed
    results = json.loads(output.read_text())
    assert results["task"] == "panoptic" and 0 <= results["PQ"] <= 100
    assert results["num_images"] == 2


def test_eval_of_a_panoptic_checkpoint_on_instances(synthetic_root, trained_run, tmp_path, capsys):
    """The panoptic checkpoint keeps its own classes (things and stuff) for `--dataset coco-instance`."""
    output = tmp_path / "results.json"
    args = eval_args(trained_run / "model_final.safetensors", synthetic_root, output)
    assert main([*args, "--dataset", "coco-instance"]) == 0
    results = json.loads(output.read_text())
    assert results["task"] == "instance" and 0 <= results["segm"]["AP"] <= 100
    assert "AP" in capsys.readouterr().out


def test_eval_of_a_panoptic_checkpoint_on_semantic_ground_truth(synthetic_root, trained_run, capsys):
    """--task semantic: the mIoU Mask2Former reports for panoptic models, in a results file of its own."""
    checkpoint = trained_run / "model_final.safetensors"
    args = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(synthetic_root), "--device", "cpu"]
    args += ["--num-workers", "0", "--no-progress"]
    assert main([*args, "--task", "semantic"]) == 0
    results = json.loads((trained_run / "model_final.eval-coco-panoptic-val-semantic.json").read_text())
    assert results["task"] == "semantic" and 0 <= results["mIoU"] <= 100
    assert "mIoU" in capsys.readouterr().out
    assert main([*args, "--task", "semantic", "--tta"]) == 0
    results = json.loads((trained_run / "model_final.eval-coco-panoptic-val-semantic-tta.json").read_text())
    assert results["task"] == "semantic" and results["tta"]["flip"]
    assert main([*args, "--task", "semantic", "--dataset", "coco-instance"]) == 2
    assert "task: coco-instance evaluates instance, not 'semantic'" in capsys.readouterr().err
    assert main([*args, "--task", "instance"]) == 2
    assert "task: coco-panoptic evaluates panoptic or semantic, not 'instance'" in capsys.readouterr().err


def eval_args(checkpoint, data_root, output) -> list[str]:
    args = ["eval", "--config", "demo-tiny", "--checkpoint", str(checkpoint), "--data-root", str(data_root)]
    return [*args, "--output", str(output), "--device", "cpu", "--num-workers", "0", "--no-progress"]


def count_predictions(monkeypatch, module) -> list:
    """Replaces module.predict_masks by a wrapper that appends to the returned list on every call."""
    calls = []
    real_predict = module.predict_masks

    def counting_predict(*a, **k):
        calls.append(1)
        return real_predict(*a, **k)

    monkeypatch.setattr(module, "predict_masks", counting_predict)
    return calls


def run_eval_stopped_at_the_second_image(monkeypatch, args):
    """Runs `m2f eval` with parts of one image and has it die while predicting the second image."""
    from m2f.engine import evaluate

    monkeypatch.setattr(evaluate, "PART_SIZE", 1)
    real_predict = evaluate.predict_masks
    calls = []

    def predict_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return real_predict(*a, **k)

    monkeypatch.setattr(evaluate, "predict_masks", predict_then_fail)
    with pytest.raises(RuntimeError, match="stopped"):
        main(args)
    monkeypatch.setattr(evaluate, "predict_masks", real_predict)


def test_eval_resumes_from_the_parts_an_interrupted_run_left(
    synthetic_root, trained_run, tmp_path, capsys, monkeypatch
):
    from m2f.engine import evaluate

    output, parts = tmp_path / "results.json", tmp_path / "results.json.parts"
    args = eval_args(trained_run / "model_final.safetensors", synthetic_root, output)
    monkeypatch.setattr(evaluate, "PART_SIZE", 1)
    assert main(args) == 0
    complete = json.loads(output.read_text())
    assert not parts.exists()  # removed once the results are written
    output.unlink()

    run_eval_stopped_at_the_second_image(monkeypatch, args)
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.json"] and not output.exists()

    predicted = count_predictions(monkeypatch, evaluate)
    assert main([*args, "--resume"]) == 0
    assert len(predicted) == 1  # one image predicted: the other came from its part file
    assert json.loads(output.read_text()) == complete
    assert not parts.exists()


def test_eval_resume_refuses_parts_of_another_run(synthetic_root, trained_run, tmp_path, capsys, monkeypatch):
    import os

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes((trained_run / "model_final.safetensors").read_bytes())
    output = tmp_path / "results.json"
    args = eval_args(checkpoint, synthetic_root, output)
    run_eval_stopped_at_the_second_image(monkeypatch, args)
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new checkpoint at that path
    assert main([*args, "--resume"]) == 2
    assert "part-000000.json belongs to another evaluation" in capsys.readouterr().err
    assert main(args) == 0  # without --resume the old parts are discarded
    assert json.loads(output.read_text())["num_images"] == 2


def test_eval_resume_refuses_parts_of_a_run_without_tta(
    synthetic_root, trained_run, tmp_path, capsys, monkeypatch
):
    """Parts of a plain semantic evaluation are not reused by a --tta one written to the same results file."""
    output = tmp_path / "results.json"
    args = [*eval_args(trained_run / "model_final.safetensors", synthetic_root, output), "--task", "semantic"]
    run_eval_stopped_at_the_second_image(monkeypatch, args)
    assert main([*args, "--tta", "--resume"]) == 2
    assert "part-000000.json belongs to another evaluation" in capsys.readouterr().err
    assert not output.exists()


def test_eval_resume_refuses_parts_of_other_data_at_the_same_path(
    synthetic_root, trained_run, tmp_path, capsys, monkeypatch
):
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    output = tmp_path / "results.json"
    args = eval_args(trained_run / "model_final.safetensors", data, output)
    run_eval_stopped_at_the_second_image(monkeypatch, args)
    annotation = data / "annotations" / "panoptic_val2017.json"
    stat = annotation.stat()
    os.utime(annotation, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a dataset written anew there
    assert main([*args, "--resume"]) == 2
    assert "part-000000.json belongs to another evaluation" in capsys.readouterr().err


def test_eval_resume_takes_the_data_root_in_any_spelling(synthetic_root, trained_run, tmp_path, monkeypatch):
    """The parts are tied to the files the dataset reads, under the data root however it is written; a file
    the dataset does not read (a stale link) plays no part."""
    import shutil

    from m2f.engine import evaluate

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "val2017" / "stale-link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    output = tmp_path / "results.json"
    run_eval_stopped_at_the_second_image(
        monkeypatch, eval_args(trained_run / "model_final.safetensors", data, output)
    )
    monkeypatch.chdir(tmp_path)
    args = eval_args(trained_run / "model_final.safetensors", "data", output)
    predicted = count_predictions(monkeypatch, evaluate)
    assert main([*args, "--resume"]) == 0
    assert len(predicted) == 1  # the first image came from its part


def test_predict_writes_overlays_and_raw_predictions(synthetic_root, trained_run, tmp_path):
    images = sorted((synthetic_root / "val2017").glob("*.jpg"))
    args = ["predict", *map(str, images), "--checkpoint", str(trained_run / "model_final.safetensors")]
    args += ["--out", str(tmp_path), "--device", "cpu", "--task", "panoptic", "--task", "semantic"]
    args += ["--task", "instance"]
    assert main(args) == 0
    panoptic_json = json.loads((synthetic_root / "annotations" / "panoptic_val2017.json").read_text())
    categories = sorted(panoptic_json["categories"], key=lambda category: category["id"])
    assert [c["id"] for c in categories] != list(range(len(categories)))  # ids differ from class indices
    for image in images:
        overlay = Image.open(tmp_path / f"{image.stem}.panoptic.png")
        assert overlay.width > 64 and overlay.height >= 64
        ids = rgb_to_id(np.asarray(Image.open(tmp_path / f"{image.stem}.panoptic_ids.png").convert("RGB")))
        assert ids.shape == (64, 64)
        segments = json.loads((tmp_path / f"{image.stem}.panoptic.json").read_text())["segments_info"]
        assert set(np.unique(ids).tolist()) <= {0} | {s["id"] for s in segments}
        for segment in segments:  # COCO panoptic: category_id is the dataset's id, not the class index
            category = categories[segment["class_index"]]
            assert (segment["category_id"], segment["name"]) == (category["id"], category["name"])
        labels = np.asarray(Image.open(tmp_path / f"{image.stem}.semantic_labels.png"))
        assert labels.shape == (64, 64) and labels.max() < 6
        instances = np.load(tmp_path / f"{image.stem}.instances.npz")
        assert instances["masks"].shape[1:] == (64, 64) and instances["masks"].dtype == bool
        assert len(instances["scores"]) == len(instances["labels"]) == len(instances["boxes"])


def test_predict_skip_existing_predicts_only_the_missing_images(
    synthetic_root, trained_run, tmp_path, monkeypatch
):
    from m2f.engine import predict

    images = sorted((synthetic_root / "val2017").glob("*.jpg"))
    args = ["predict", *map(str, images), "--checkpoint", str(trained_run / "model_final.safetensors")]
    args += ["--out", str(tmp_path), "--device", "cpu", "--task", "panoptic", "--skip-existing"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(first) == 3 * len(images)
    (tmp_path / f"{images[0].stem}.panoptic_ids.png").unlink()  # as if the run had stopped there
    predicted = count_predictions(monkeypatch, predict)
    assert main(args) == 0
    assert len(predicted) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert main([a for a in args if a != "--skip-existing"]) == 0
    assert len(predicted) == 1 + len(images)


def test_bad_input_is_one_clear_line(synthetic_root, tmp_path, capsys):
    args = ["train", "--config", "no-such-config", "--data-root", str(synthetic_root), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "unknown config name 'no-such-config'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*train_args(synthetic_root, tmp_path, 1), "--num-workers", "-1"])
    assert "argument --num-workers: must be a non-negative integer, got -1" in capsys.readouterr().err
    for seed in ("-1", str(2**32)):  # 2**64 failed at the first batch: "Overflow when unpacking long long"
        with pytest.raises(SystemExit):
            main([*train_args(synthetic_root, tmp_path, 1), "--seed", seed])
        assert (
            f"argument --seed: must be an integer from 0 to 2**32 - 1, got {seed}" in capsys.readouterr().err
        )
    with pytest.raises(SystemExit):  # eval took -1 and failed in the DataLoader after loading the model
        main(
            [
                "eval",
                "--checkpoint",
                "x.safetensors",
                "--data-root",
                str(synthetic_root),
                "--num-workers",
                "-1",
            ]
        )
    assert "argument --num-workers: must be a non-negative integer, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # was "invalid _positive_int value: 'abc'"
        main([*train_args(synthetic_root, tmp_path, 1), "--max-iters", "abc"])
    assert "argument --max-iters: must be a positive integer, got abc" in capsys.readouterr().err


def test_eval_of_corrupt_checkpoint_names_the_file(synthetic_root, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    args = ["eval", "--config", "demo-tiny", "--checkpoint", str(broken), "--data-root", str(synthetic_root)]
    assert main(args) == 2
    assert str(broken) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_config_other_than_the_stored_one_is_named(synthetic_root, trained_run, tmp_path, capsys, command):
    checkpoint = trained_run / "model_final.safetensors"
    if command == "eval":
        args = eval_args(checkpoint, synthetic_root, tmp_path / "results.json")
    else:
        image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
        args = ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
        args += ["--config", "demo-tiny", "--device", "cpu"]
    args[args.index("demo-tiny")] = "panoptic-r50"
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "was saved with config 'demo-tiny', not 'panoptic-r50' (leave --config out" in error
    assert "checkpoint does not match the model" in error  # the key listing follows


@pytest.mark.parametrize("stored", ["not json", '{"decoder": 5}', '{"num_classes": "5"}'])
def test_unreadable_stored_config_is_one_line_naming_the_checkpoint(
    synthetic_root, trained_run, tmp_path, capsys, stored
):
    import safetensors.torch

    weights = safetensors.torch.load_file(trained_run / "model_final.safetensors")
    with safetensors.safe_open(trained_run / "model_final.safetensors", "pt") as f:
        metadata = f.metadata()
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(weights, broken, metadata={**metadata, "config": stored})
    args = ["eval", "--checkpoint", str(broken), "--data-root", str(synthetic_root), "--device", "cpu"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"{broken}: its stored config is unreadable" in error and error.count("\n") == 1


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize(
    "field, value",
    [
        ("backbone.timm_name", "no_such_timm_model"),  # a 29-line traceback, exit 1
        ("backbone.timm_kwargs", {"no_such_option": 1}),  # the same
        ("pixel_decoder.transformer_strides", []),  # "min() arg is an empty sequence"
    ],
)
def test_stored_config_that_builds_no_model_is_one_line_naming_the_checkpoint(
    synthetic_root, trained_run, tmp_path, capsys, command, field, value
):
    import safetensors.torch

    weights = safetensors.torch.load_file(trained_run / "model_final.safetensors")
    with safetensors.safe_open(trained_run / "model_final.safetensors", "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    section, key = field.split(".")
    config[section][key] = value
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(weights, broken, metadata={**metadata, "config": json.dumps(config)})
    if command == "eval":
        args = ["eval", "--checkpoint", str(broken), "--data-root", str(synthetic_root), "--device", "cpu"]
    else:
        image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
        args = ["predict", str(image), "--checkpoint", str(broken), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"{broken}: config 'demo-tiny' builds no model" in error and error.count("\n") == 1


def test_eval_on_other_classes_without_stored_categories_says_what_to_do(
    synthetic_root, trained_run, tmp_path, capsys
):
    """A panoptic checkpoint without its categories (as converted without --classes) cannot be mapped to the
    instance dataset's classes: one line saying so, not a weight-shape mismatch."""
    import safetensors.torch

    weights = safetensors.torch.load_file(trained_run / "model_final.safetensors")
    with safetensors.safe_open(trained_run / "model_final.safetensors", "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "categories"}
    names_only = tmp_path / "names_only.safetensors"
    safetensors.torch.save_file(weights, names_only, metadata=metadata)
    args = ["eval", "--checkpoint", str(names_only), "--data-root", str(synthetic_root), "--device", "cpu"]
    assert main([*args, "--dataset", "coco-instance"]) == 2
    error = capsys.readouterr().err
    assert "stores no dataset categories" in error and "--classes" in error and error.count("\n") == 1


def test_train_validates_the_dataset_first(synthetic_root, tmp_path, capsys):
    """A missing training image is reported before any training, not when the loader first reads it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    panoptic = json.loads((data / "annotations" / "panoptic_train2017.json").read_text())
    missing = data / "train2017" / panoptic["images"][-1]["file_name"]
    missing.unlink()
    assert main(train_args(data, tmp_path / "run", 1)) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "missing image file" in error
    assert not (tmp_path / "run" / "model_final.safetensors").exists()


def test_eval_validates_the_dataset_first(synthetic_root, trained_run, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    json_path = data / "annotations" / "panoptic_val2017.json"
    panoptic = json.loads(json_path.read_text())
    panoptic["annotations"][0]["segments_info"][0]["category_id"] = 999
    json_path.write_text(json.dumps(panoptic))
    args = ["eval", "--checkpoint", str(trained_run / "model_final.safetensors"), "--data-root", str(data)]
    assert main([*args, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "panoptic_val2017.json" in error and "999" in error


def test_predict_missing_image_is_reported(trained_run, tmp_path, capsys):
    args = [
        "predict",
        str(tmp_path / "nope.jpg"),
        "--checkpoint",
        str(trained_run / "model_final.safetensors"),
    ]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "nope.jpg" in capsys.readouterr().err


def test_predict_refuses_images_whose_outputs_would_clash(trained_run, tmp_path, capsys):
    """a/x.png, b/x.png and a/x.jpg all write x_*.png: refused before predicting anything."""
    image = Image.new("RGB", (8, 8))
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "x.jpg"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    args = ["predict", *map(str, paths), "--checkpoint", str(trained_run / "model_final.safetensors")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert all(str(path) in error for path in paths)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_of_a_folder_predicts_the_images_in_it(trained_run, tmp_path, capsys):
    """A folder stands for its image files (any case of the suffix, not in subfolders, not the files predict
    writes there); a folder without images is refused."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    image = Image.new("RGB", (8, 8))
    for name in ("b.JPG", "a.png", "sub/c.jpg", "old.panoptic.png"):
        image.save(folder / name)
    (folder / "notes.txt").write_text("x")
    checkpoint = ["--checkpoint", str(trained_run / "model_final.safetensors"), "--device", "cpu"]
    assert main(["predict", str(folder), *checkpoint, "--out", str(tmp_path / "out")]) == 0
    assert "6 files" in capsys.readouterr().out  # 3 per image for a panoptic model
    assert sorted(p.name for p in (tmp_path / "out").glob("*.panoptic.json")) == [
        "a.panoptic.json",
        "b.panoptic.json",
    ]
    assert (
        main(["predict", str(folder / "sub"), str(tmp_path / "out"), *checkpoint, "--out", str(tmp_path)])
        == 2
    )
    assert f"folder {tmp_path / 'out'} holds no image file" in capsys.readouterr().err


def test_predict_never_overwrites_its_inputs_and_runs_an_image_once(trained_run, tmp_path, capsys):
    """--out in the input folder, where an input is named like an output of another input, is refused; an
    image given twice (under two spellings) is predicted once."""
    image = Image.new("RGB", (8, 8))
    image.save(tmp_path / "a.jpg")
    image.save(tmp_path / "a.panoptic.png")
    checkpoint = ["--checkpoint", str(trained_run / "model_final.safetensors"), "--device", "cpu"]
    before = (tmp_path / "a.panoptic.png").read_bytes()
    inputs = [str(tmp_path / "a.jpg"), str(tmp_path / "a.panoptic.png")]
    assert main(["predict", *inputs, *checkpoint, "--out", str(tmp_path)]) == 2
    assert "would overwrite input images" in capsys.readouterr().err
    assert (tmp_path / "a.panoptic.png").read_bytes() == before
    twice = [str(tmp_path / "a.jpg"), str(tmp_path / "." / "a.jpg")]
    assert main(["predict", *twice, *checkpoint, "--out", str(tmp_path / "out")]) == 0
    assert "3 files" in capsys.readouterr().out


def test_predict_with_a_config_name_takes_the_class_count_of_the_checkpoint(tmp_path):
    """--config names the architecture; the class head has the size of the checkpoint's classes (here 3,
    where demo-tiny has 6), as m2f eval does."""
    import dataclasses

    import safetensors.torch

    import m2f

    config = m2f.get_config("demo-tiny")
    model = m2f.build_model(dataclasses.replace(config, num_classes=3))
    checkpoint = tmp_path / "three.safetensors"
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    args = ["predict", str(tmp_path / "x.png"), "--checkpoint", str(checkpoint), "--config", "demo-tiny"]
    # With class names stored, and without (a plain state dict: the class head's size says).
    for metadata in ({"class_names": json.dumps(["a", "b", "c"])}, None):
        safetensors.torch.save_file(model.state_dict(), checkpoint, metadata=metadata)
        out = tmp_path / ("named" if metadata else "plain")
        assert main([*args, "--out", str(out), "--device", "cpu", "--task", "semantic"]) == 0
        assert np.asarray(Image.open(out / "x.semantic_labels.png")).max() < 3


@pytest.mark.parametrize("fmt", ["detectron2", "transformers", "mmdet"])
def test_convert_of_a_damaged_file_is_one_error_line(tmp_path, capsys, fmt):
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"not a checkpoint")
    args = ["convert", str(path), "--format", fmt, "--config", "demo-tiny", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("m2f convert: error: ") and str(path) in error and "Traceback" not in error


def test_convert_writes_safetensors_with_the_config_and_class_names(monkeypatch, tmp_path, capsys):
    import safetensors
    import torch

    import m2f.convert

    state = {"transformer_decoder.class_embed.weight": torch.randn(7, 8), "other": torch.arange(3.0)}
    loaded = []
    monkeypatch.setattr(
        m2f.convert, "read_checkpoint", lambda *args: loaded.append(args) or ({"raw": 1}, None)
    )
    monkeypatch.setattr(m2f.convert, "convert_checkpoint", lambda src, fmt, config: state)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class-{i}" for i in range(6)) + "\n")
    out = tmp_path / "converted.safetensors"
    args = [
        "convert",
        str(tmp_path / "model_final.pkl"),
        "--format",
        "detectron2",
        "--config",
        "panoptic-r50",
    ]
    assert main([*args, "--classes", str(names), "--out", str(out)]) == 0
    assert loaded == [(str(tmp_path / "model_final.pkl"), "detectron2")]
    # A list of names says nothing of things and stuff, which panoptic inference needs.
    assert "without it panoptic predictions treat every class as a thing" in capsys.readouterr().err
    with safetensors.safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["config"])["num_classes"] == 6
        assert f.metadata()["converted_from"] == "detectron2:model_final.pkl"
        assert json.loads(f.metadata()["class_names"]) == [f"class-{i}" for i in range(6)]
        for key, tensor in state.items():
            assert torch.equal(f.get_tensor(key), tensor)
    coco = tmp_path / "panoptic_val2017.json"
    categories = [{"id": i + 1, "name": f"class-{i}", "isthing": int(i < 3)} for i in range(6)]
    coco.write_text(json.dumps({"categories": categories}))
    assert main([*args, "--classes", str(coco), "--out", str(tmp_path / "with_things.safetensors")]) == 0
    assert "note:" not in capsys.readouterr().err


def demo_checkpoint(path, **changes):
    """demo-tiny with the config changes (a decoder dict changes the decoder's fields), random weights of
    seed 123, saved at path."""
    import dataclasses

    import torch

    import m2f

    config = m2f.get_config("demo-tiny")
    decoder = dataclasses.replace(config.decoder, **changes.pop("decoder", {}))
    config = dataclasses.replace(config, decoder=decoder, **changes)
    torch.manual_seed(123)
    ckpt.save_weights(path, m2f.build_model(config), {"config": json.dumps(config.to_dict())})
    return path


def test_train_fine_tunes_from_a_checkpoint_of_other_classes(synthetic_root, tmp_path, capsys):
    """--init-weights of a checkpoint with 9 classes on data with 6: every parameter but the class head starts
    from the checkpoint (one AdamW step of lr 3e-4 moves none by 1e-3; a fresh model is far from it), the
    class head from a random initialization of 6 + 1 rows."""
    import m2f

    init = demo_checkpoint(tmp_path / "init.safetensors", num_classes=9)
    out = tmp_path / "run"
    assert main([*train_args(synthetic_root, out, 1), "--init-weights", str(init)]) == 0
    assert (
        f"init_weights: {init} has a class head for 9 classes, the dataset 6; the class head starts from a "
        "random initialization"
    ) in capsys.readouterr().out
    start, _ = ckpt.read_weights(init)
    final, _ = ckpt.read_weights(out / "model_final.safetensors")
    assert final[ckpt.CLASS_HEAD_KEYS[0]].shape[0] == start[ckpt.CLASS_HEAD_KEYS[0]].shape[0] - 3 == 7
    fresh = m2f.build_model("demo-tiny")
    parameters = [name for name, _ in fresh.named_parameters() if name not in ckpt.CLASS_HEAD_KEYS]

    def largest_difference(state):
        return max((state[name].double() - start[name].double()).abs().max().item() for name in parameters)

    assert largest_difference(final) < 1e-3
    assert largest_difference(fresh.state_dict()) > 0.1


def test_train_init_weights_of_another_model_are_refused(synthetic_root, tmp_path, capsys):
    init = demo_checkpoint(tmp_path / "init.safetensors", decoder={"num_queries": 8})
    out = tmp_path / "run"
    assert main([*train_args(synthetic_root, out, 1), "--init-weights", str(init)]) == 2
    error = capsys.readouterr().err
    assert (
        f"{init}: checkpoint does not match the model; shape: transformer_decoder.query_embed.weight" in error
    )
    assert not out.exists() or not list(out.glob("model_*"))
    assert (
        main([*train_args(synthetic_root, out, 1), "--init-weights", str(tmp_path / "none.safetensors")]) == 2
    )
    assert "init_weights: checkpoint file not found" in capsys.readouterr().err
    both = ["--init-weights", str(init), "--backbone-weights", str(init)]
    assert main([*train_args(synthetic_root, out, 1), *both]) == 2
    assert "give init_weights or backbone_weights, not both" in capsys.readouterr().err


def test_export_writes_an_onnx_graph_that_matches_the_checkpoint_at_any_size(trained_run, tmp_path, capsys):
    """demo-tiny exported from a 64 x 80 example: the file runs in onnxruntime at another batch and size (one
    that pads to the stride of 32) with the checkpoint's PyTorch outputs; a graph that does not match the model
    is refused."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from m2f.engine.checkpoint import load_config_for_checkpoint
    from m2f.engine.evaluate import build_checkpoint_model, load_checkpoint_weights
    from m2f.engine.export import _check_differences, _compare

    checkpoint = trained_run / "model_final.safetensors"
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--height", "64", "--width", "80"]
    assert main([*args, "--dynamic-size"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"wrote {out}; onnxruntime against PyTorch on images 1 x 3 x 64 x 80, 2 x 3 x 77 x 117, " in printed
    )

    metadata, _ = ckpt.read_header(checkpoint)
    model = build_checkpoint_model(load_config_for_checkpoint(None, metadata, checkpoint), checkpoint)
    load_checkpoint_weights(model, checkpoint, metadata)
    model.eval()
    images = torch.rand(3, 3, 70, 90) * 255
    with torch.no_grad():
        expected = model(images)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pred_logits, pred_masks = session.run(["pred_logits", "pred_masks"], {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(pred_logits), expected["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(pred_masks), expected["pred_masks"], atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        model.transformer_decoder.class_embed.bias.add_(0.1)
    shapes = [(1, 64, 80), (1, 70, 90)]
    worst = _compare(model, out.read_bytes(), shapes)
    assert worst["pred_logits"][0] > 0.01 and worst["pred_masks"][0] < 1e-5
    with pytest.raises(
        ValueError, match=r"pred_logits differs from PyTorch's by .* for 1 x 3 x \d+ x \d+ images, more"
    ):
        _check_differences(worst, shapes, 1e-4, "")
    # at the example's own size no other export would do better, so the error gives no advice
    with pytest.raises(ValueError, match=r"for 1 x 3 x 64 x 80 images, more than 1e-04$"):
        _check_differences({"pred_logits": (0.5, 0)}, shapes, 1e-4, "")
    with pytest.raises(ValueError, match=r"for 1 x 3 x 70 x 90 images, more than 1e-04; export a fixed size"):
        _check_differences({"pred_logits": (0.5, 1)}, shapes, 1e-4, "")


def tiny_swin_checkpoint(folder):
    """A demo-tiny model with a Swin backbone of 16 channels (window 7), one encoder and two decoder layers,
    saved with random weights; returns the checkpoint's path and the model in eval mode."""
    import dataclasses

    import m2f
    from m2f.config import BackboneConfig

    config = m2f.get_config("demo-tiny")
    swin = BackboneConfig(
        timm_name="swin_tiny_patch4_window7_224",
        timm_kwargs={"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2)},
        output_norm=True,
    )
    config = dataclasses.replace(
        config,
        backbone=swin,
        pixel_decoder=dataclasses.replace(config.pixel_decoder, encoder_layers=1),
        decoder=dataclasses.replace(config.decoder, num_layers=2),
    )
    model = m2f.build_model(config).eval()
    checkpoint = folder / "swin.safetensors"
    ckpt.save_weights(checkpoint, model, {"config": json.dumps(config.to_dict())})
    return checkpoint, model


def test_export_of_one_size(tmp_path, capsys):
    """Without --dynamic-size the graph takes one image of the example's size."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    checkpoint, _ = tiny_swin_checkpoint(tmp_path)
    out = tmp_path / "swin.onnx"
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--height", "64", "--width", "72"]
    assert main(args) == 0
    assert "onnxruntime against PyTorch on images 1 x 3 x 64 x 72:" in capsys.readouterr().out
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 72]


def test_export_of_swin_with_a_dynamic_size(tmp_path, capsys):
    """A Swin backbone exports with dynamic batch, height and width from an example that gives its last stage
    two windows along each side (at least 7 x 32 + 1 = 225 pixels here; a smaller one is refused up front).
    The graph matches PyTorch at sizes where stages have one window, or need padding to the window, the
    patch merging and the stride of 32."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    checkpoint, model = tiny_swin_checkpoint(tmp_path)
    out = tmp_path / "swin.onnx"
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--dynamic-size"]
    assert main([*args, "--height", "224", "--width", "240"]) == 2
    assert "traced from an example of at least 225 x 225 pixels" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--height", "240", "--width", "232"]) == 0
    assert (
        "onnxruntime against PyTorch on images 1 x 3 x 240 x 232, 2 x 3 x 253 x 269, "
        in capsys.readouterr().out
    )

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, height, width in [(3, 70, 450), (1, 97, 64), (2, 300, 230)]:
        images = torch.rand(batch, 3, height, width) * 255
        with torch.no_grad():
            expected = model(images)
        pred_logits, pred_masks = session.run(["pred_logits", "pred_masks"], {"images": images.numpy()})
        assert pred_masks.shape == (batch, 16, -(-height // 4), -(-width // 4))
        torch.testing.assert_close(
            torch.from_numpy(pred_logits), expected["pred_logits"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(torch.from_numpy(pred_masks), expected["pred_masks"], atol=1e-5, rtol=1e-5)


def test_export_bad_input_is_one_clear_line(trained_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    checkpoint = str(trained_run / "model_final.safetensors")
    assert (
        main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "a.onnx"), "--height", "16"]) == 2
    )
    assert "height must be an integer of at least 64 pixels, got 16" in capsys.readouterr().err
    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path)]) == 2
    assert "is a folder; expected a file name" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", "x.onnx"]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


def test_bench_forwards_arguments_to_pytest(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert main(["bench", "-k", "deform", "--benchmark-only"]) == 0
    assert calls[0][:3] == [sys.executable, "-m", "pytest"]
    assert calls[0][3].endswith("benchmarks") and calls[0][4:] == ["-k", "deform", "--benchmark-only"]
    assert main(["bench", "--", "-k", "point"]) == 0  # pytest read a "--" before the folder as a file name
    assert calls[1][3].endswith("benchmarks") and calls[1][4:] == ["-k", "point"]
    # A file named ran every benchmark: the folder went first and pytest collected all of it.
    bench_file = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_point_loss.py")
    assert main(["bench", bench_file, "-k", "pairwise"]) == 0
    assert calls[2][3:] == [bench_file, "-k", "pairwise"]
    assert main(["bench", f"{bench_file}::test_pairwise_mask_cost"]) == 0
    assert calls[3][3:] == [f"{bench_file}::test_pairwise_mask_cost"]
    assert main(["bench", "-k", "no_such_file.py"]) == 0
    assert calls[4][3].endswith("benchmarks")
    # A file that is an option's value keeps the folder: pytest would otherwise fall back to the unit tests.
    assert main(["bench", "--ignore", bench_file]) == 0
    assert calls[5][3].endswith("benchmarks") and calls[5][4:] == ["--ignore", bench_file]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "m2f", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "eval", "predict", "convert", "bench", "make-synthetic", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("option", ["max_iters", "threads"])
def test_demo_refuses_zero_rather_than_taking_the_default(tmp_path, option):
    """run_demo(max_iters=0) ran the default 500 iterations and threads=0 used one thread."""
    from m2f.engine.demo import run_demo

    with pytest.raises(ValueError, match=f"{option} must be"):
        run_demo(tmp_path, **{option: 0})
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--max-iters", "2"]) == 0
    assert "PQ untrained" in capsys.readouterr().out
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert results["iterations"] == 2 and 0 <= results["PQ_trained"] <= 100
    assert (tmp_path / "loss_curve.png").is_file()
    assert len(list((tmp_path / "predictions").glob("*.panoptic.png"))) == 4


def test_training_on_instance_data_makes_an_instance_model(synthetic_root, tmp_path, capsys):
    """demo-tiny is a panoptic config; trained on COCO instances it is an instance model, so predict writes
    instances by default."""
    assert main([*train_args(synthetic_root, tmp_path / "run", 1), "--dataset", "coco-instance"]) == 0
    assert "its model is for instance" in capsys.readouterr().out
    checkpoint = tmp_path / "run" / "model_final.safetensors"
    _, metadata = ckpt.read_weights(checkpoint)
    assert json.loads(metadata["config"])["task"] == "instance"
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 24)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0].startswith("x.instances")


def test_output_paths_that_cannot_be_written_are_refused_first(
    synthetic_root, trained_run, tmp_path, capsys, monkeypatch
):
    """An --out that is a file or an --output that is a folder is a one-line error before any prediction, and
    for eval before the data is read (it came after the data and the model)."""
    from m2f.engine import evaluate, predict

    calls = [count_predictions(monkeypatch, evaluate), count_predictions(monkeypatch, predict)]

    def data_read(*args, **kwargs):
        raise AssertionError("the data was read before --output was checked")

    monkeypatch.setattr(evaluate, "validate_split", data_read)
    monkeypatch.setattr(evaluate, "build_dataset", data_read)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    checkpoint = str(trained_run / "model_final.safetensors")
    assert main(["predict", str(a_file), "--checkpoint", checkpoint, "--out", str(a_file)]) == 2
    assert main([*eval_args(checkpoint, synthetic_root, tmp_path)]) == 2
    assert main([*eval_args(checkpoint, synthetic_root, a_file / "results.json")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(
        line.startswith(("m2f predict: error: ", "m2f eval: error: ")) for line in errors
    )
    assert calls == [[], []]


def test_eval_and_convert_never_overwrite_their_inputs(
    synthetic_root, trained_run, tmp_path, capsys, monkeypatch
):
    """eval --output naming its checkpoint (however spelled) or an annotation file, convert --out naming its
    source or classes file: one error line before any work, the file untouched (they were replaced)."""
    from m2f.engine import evaluate

    calls = count_predictions(monkeypatch, evaluate)
    checkpoint = trained_run / "model_final.safetensors"
    annotations = synthetic_root / "annotations" / "panoptic_val2017.json"
    before = {path: path.read_bytes() for path in (checkpoint, annotations)}
    spelled_otherwise = trained_run / ".." / trained_run.name / "model_final.safetensors"
    assert main(eval_args(checkpoint, synthetic_root, spelled_otherwise)) == 2
    assert main(eval_args(checkpoint, synthetic_root, annotations)) == 2
    source, names = tmp_path / "model_final.pkl", tmp_path / "names.txt"
    source.write_bytes(b"weights")
    names.write_text("a\n")
    convert = ["convert", str(source), "--format", "detectron2", "--config", "demo-tiny"]
    assert main([*convert, "--out", str(source)]) == 2
    assert main([*convert, "--classes", str(names), "--out", str(names)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all("would overwrite an input of this command" in line for line in errors)
    assert calls == [] and all(path.read_bytes() == content for path, content in before.items())
    assert source.read_bytes() == b"weights" and names.read_text() == "a\n"


def test_run_prediction_refuses_a_task_given_as_a_string(trained_run, tmp_path):
    """tasks="panoptic" was read letter by letter ("got ['p', 'a', 'n', ...]")."""
    from m2f.engine.predict import run_prediction

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 24)).save(image)
    with pytest.raises(TypeError, match="tasks must be a sequence of task names, got the string 'panoptic'"):
        run_prediction([image], trained_run / "model_final.safetensors", tmp_path / "out", tasks="panoptic")


def test_run_prediction_takes_any_iterable_of_paths_and_refuses_a_single_path(trained_run, tmp_path):
    """A generator (Path.glob) was used up by the existence check, so nothing was predicted; a single path
    was read character by character ("image files not found: /, t, m, p, ...")."""
    from m2f.engine.predict import run_prediction

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (20, 24)).save(folder / f"{name}.png")
    checkpoint = trained_run / "model_final.safetensors"
    written = run_prediction(folder.glob("*.png"), checkpoint, tmp_path / "out", tasks=["semantic"])
    assert sorted(path.name for path in written) == [
        "a.semantic.png",
        "a.semantic_labels.png",
        "b.semantic.png",
        "b.semantic_labels.png",
    ]
    for single in (str(folder / "a.png"), folder / "a.png"):
        with pytest.raises(TypeError, match="images must be a sequence of image paths, got the single path"):
            run_prediction(single, checkpoint, tmp_path / "out", tasks=["semantic"])


def test_predict_removes_what_a_killed_prediction_of_its_images_left(trained_run, tmp_path):
    from m2f.engine.predict import run_prediction

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 24)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    ours = out / ".x.semantic_labels.png.k2j4l5m6.tmp"
    others = out / ".y.semantic_labels.png.k2j4l5m6.tmp"  # another image's, maybe being written now
    ours.write_bytes(b"half")
    others.write_bytes(b"half")
    run_prediction([image], trained_run / "model_final.safetensors", out, tasks=["semantic"])
    assert not ours.exists() and others.exists()
    assert sorted(path.name for path in out.iterdir()) == [
        others.name,
        "x.semantic.png",
        "x.semantic_labels.png",
    ]


def test_predict_removes_what_a_killed_run_left_of_its_coco_results_files(trained_run, tmp_path):
    """The temporary file of a results file that a killed --coco-results run was writing is removed too."""
    from m2f.engine.predict import run_prediction

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 24)).save(image)
    images_json = tmp_path / "images.json"
    images_json.write_text(json.dumps({"images": [{"id": 5, "file_name": "x.png"}]}))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".panoptic_results.json.k2j4l5m6.tmp"
    stale.write_bytes(b"half")
    checkpoint = trained_run / "model_final.safetensors"
    run_prediction([image], checkpoint, out, tasks=["panoptic"], coco_results=images_json, overlay=False)
    assert sorted(path.name for path in out.iterdir()) == [
        "panoptic_results.json",
        "x.panoptic.json",
        "x.panoptic_ids.png",
    ]
    assert [
        a["image_id"] for a in json.loads((out / "panoptic_results.json").read_text())["annotations"]
    ] == [5]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("class_names", "not json", "metadata 'class_names' is not JSON"),
        ("class_names", '"abc"', "metadata 'class_names' must be a JSON list of class names"),
        ("thing_classes", "3", "metadata 'thing_classes' must be a JSON list of class indices"),
        ("thing_classes", "[0, 99]", "metadata 'thing_classes' [0, 99] names classes beyond the"),
        ("categories", '[{"name": "a"}]', "metadata 'categories' must be a JSON list of categories"),
    ],
)
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_malformed_class_metadata_is_one_error_line_naming_file_and_key(
    synthetic_root, trained_run, tmp_path, capsys, key, value, message, command
):
    """A checkpoint whose class metadata is not what the converters write: a JSONDecodeError naming nothing,
    or a traceback (TypeError: 'int' object is not iterable, KeyError: 'id')."""
    import safetensors
    import safetensors.torch

    source = trained_run / "model_final.safetensors"
    with safetensors.safe_open(source, framework="pt") as file:
        metadata = file.metadata()
    metadata.setdefault("class_names", json.dumps([f"c{i}" for i in range(6)]))
    checkpoint = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(source), checkpoint, {**metadata, key: value})
    if command == "predict":
        image = tmp_path / "x.png"
        Image.new("RGB", (20, 24)).save(image)
        args = ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    else:
        args = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(synthetic_root), "--no-validate"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and f"{checkpoint}: {message}" in error


def test_semantic_training_at_another_crop_size_tests_at_it(tmp_path):
    """The semantic recipe tests at its crop size (ADE20K configs: short side = crop, long side <= 4 crops);
    --image-size changed the crop and left the test size of the config."""
    import safetensors

    from m2f.data import make_synthetic_ade20k

    root = make_synthetic_ade20k(str(tmp_path / "ade"), num_train=2, num_val=1, image_size=64, seed=0)
    out = tmp_path / "run"
    args = [*train_args(root, out, 1), "--dataset", "ade20k"]
    assert main([*args[: args.index("--image-size") + 1], "48", *args[args.index("--image-size") + 2 :]]) == 0
    with safetensors.safe_open(str(out / "model_final.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["task"] == "semantic" and config["solver"]["image_size"] == 48
    assert (config["inference"]["test_short_edge"], config["inference"]["test_max_size"]) == (48, 192)


def test_ade20k_panoptic_training_and_its_three_evaluations(tmp_path, capsys):
    """A model trained on ADE20K's panoptic files takes Mask2Former's ADE20K recipe (crops of --image-size,
    tested at that size) and is evaluated by PQ, by the mIoU of its semantic task and, on ADE20K's instance
    files, by mask AP, each in its own results file; the dataset kinds are the CLI's choices."""
    import safetensors

    from m2f.cli import DATASET_CHOICES
    from m2f.data import make_synthetic_ade20k
    from m2f.engine.train import DATASET_KINDS

    assert DATASET_CHOICES == DATASET_KINDS
    root = make_synthetic_ade20k(str(tmp_path / "ade"), num_train=2, num_val=2, image_size=64, seed=0)
    out = tmp_path / "run"
    args = [*train_args(root, out, 1), "--dataset", "ade20k-panoptic"]
    assert main([*args[: args.index("--image-size") + 1], "48", *args[args.index("--image-size") + 2 :]]) == 0
    checkpoint = out / "model_final.safetensors"
    with safetensors.safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    assert metadata["dataset"] == "ade20k-panoptic" and config["task"] == "panoptic"
    assert (config["inference"]["test_short_edge"], config["inference"]["test_max_size"]) == (48, 192)
    assert [c["id"] for c in json.loads(metadata["categories"])] == list(range(6))

    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--data-root",
        str(root),
        "--num-workers",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    assert main([*args, "--task", "semantic"]) == 0
    assert main([*args, "--dataset", "ade20k-instance"]) == 0
    panoptic = json.loads((out / "model_final.eval-ade20k-panoptic-val.json").read_text())
    semantic = json.loads((out / "model_final.eval-ade20k-panoptic-val-semantic.json").read_text())
    instance = json.loads((out / "model_final.eval-ade20k-instance-val.json").read_text())
    assert panoptic["num_images"] == instance["num_images"] == 2
    assert (panoptic["N"], panoptic["N_th"], len(semantic["per_class"])) == (6, 3, 6)
    assert 0 <= panoptic["PQ"] <= 100 and 0 <= semantic["mIoU"] <= 100 and 0 <= instance["segm"]["AP"] <= 100

    # COCO results files with ADE20K's string image ids, read by panopticapi as eval scores them
    from panopticapi.evaluation import pq_compute

    predictions = tmp_path / "predictions"
    predict = ["predict", str(Path(root) / "images" / "validation"), "--checkpoint", str(checkpoint)]
    predict += ["--out", str(predictions), "--device", "cpu", "--task", "panoptic", "--task", "instance"]
    assert (
        main([*predict, "--no-overlay", "--coco-results", str(Path(root) / "ade20k_panoptic_val.json")]) == 0
    )
    results = json.loads((predictions / "panoptic_results.json").read_text())
    assert sorted(a["image_id"] for a in results["annotations"]) == ["ADE_val_00000001", "ADE_val_00000002"]
    pq = pq_compute(
        str(Path(root) / "ade20k_panoptic_val.json"),
        str(predictions / "panoptic_results.json"),
        str(Path(root) / "ade20k_panoptic_val"),
        str(predictions),
    )
    assert pq["All"]["pq"] * 100 == pytest.approx(panoptic["PQ"], abs=1e-9)
    capsys.readouterr()

    limited = [*train_args(root, tmp_path / "instance", 1), "--dataset", "ade20k-instance"]
    assert main([*limited, "--set", "solver.single_category_max_area=0.5"]) == 2
    assert "the crop's single-category limit needs a class map" in capsys.readouterr().err


@pytest.fixture
def built_datasets(monkeypatch) -> list:
    """(kind, split, transforms) of each dataset the engine builds, in order."""
    from m2f.engine import train

    built = []
    build_dataset = train.build_dataset

    def recording_build_dataset(kind, data_root, split, transforms=None, seed=0):
        built.append((kind, split, transforms))
        return build_dataset(kind, data_root, split, transforms, seed)

    monkeypatch.setattr(train, "build_dataset", recording_build_dataset)
    return built


def test_cityscapes_training_crops_half_as_high_as_wide_and_evaluates(tmp_path, built_datasets, capsys):
    """`make-synthetic --cityscapes` writes the three Cityscapes sets; training on each takes Mask2Former's
    recipe with crops of solver.crop_aspect (here 32 x 64 from --image-size 64), evaluation scores mIoU, PQ
    and cityscapesscripts' AP on the classes the scenes hold (six of the 19, three of the 8 things). Large-scale
    jitter (COCO) refuses a crop aspect before reading the data."""
    root = tmp_path / "cityscapes"
    make = ["make-synthetic", "--cityscapes", "--out", str(root), "--num-train", "2", "--num-val", "2"]
    assert main([*make, "--image-size", "64"]) == 0
    for kind in ("cityscapes", "cityscapes-panoptic", "cityscapes-instance"):
        out = tmp_path / kind
        args = [*train_args(root, out, 1), "--dataset", kind, "--set", "solver.crop_aspect=0.5"]
        assert main(args) == 0
        assert built_datasets[-1][0] == kind and built_datasets[-1][2].crop_size == (32, 64)
        evaluate = ["eval", "--checkpoint", str(out / "model_final.safetensors"), "--data-root", str(root)]
        assert main([*evaluate, "--num-workers", "0", "--no-progress"]) == 0
        results = json.loads((out / f"model_final.eval-{kind}-val.json").read_text())
        assert results["dataset"] == kind
        if kind == "cityscapes":
            assert set(results["per_class"]) == {"road", "building", "vegetation", "person", "car", "bicycle"}
            assert 0 <= results["mIoU"] <= 100
        elif kind == "cityscapes-panoptic":
            assert (results["N"], results["N_th"]) == (6, 3) and results["num_images"] == 2
        else:
            assert results["benchmark"] == "cityscapes" and results["num_images"] == 2
            assert set(results["segm"]["per_class"]) <= {"person", "car", "bicycle"}
            assert 0 <= results["segm"]["AP50"] <= 100
            cities = sorted((root / "leftImg8bit" / "val").iterdir())
            predict = ["predict", *map(str, cities), "--checkpoint", str(out / "model_final.safetensors")]
            assert (
                main([*predict, "--out", str(out / "predictions"), "--no-overlay", "--cityscapes-results"])
                == 0
            )
            folder = out / "predictions" / "cityscapes_instance_results"
            stems = sorted(path.stem for city in cities for path in city.iterdir())
            assert sorted(path.stem for path in folder.glob("*.txt")) == stems
            semantic = [
                *predict,
                "--out",
                str(out / "semantic"),
                "--task",
                "semantic",
                "--cityscapes-results",
            ]
            assert main(semantic) == 2
    captured = capsys.readouterr()
    assert "Instance segmentation, Cityscapes AP" in captured.out
    assert "cityscapes_results: the Cityscapes results are the instance task's" in captured.err

    built_datasets.clear()
    square_only = [*train_args(tmp_path / "coco", tmp_path / "lsj", 1), "--set", "solver.crop_aspect=0.5"]
    assert main(square_only) == 2
    assert "coco-panoptic trains with large-scale jitter, whose crops are square" in capsys.readouterr().err
    assert built_datasets == []


def test_mapillary_training_resizes_from_twice_the_crop_and_evaluates(tmp_path, built_datasets, capsys):
    """`make-synthetic --mapillary` writes both Mapillary Vistas sets; training takes Mask2Former's recipe
    with short sides of solver.resize_base x the crop (here 0.5-2 x 128 for 64-pixel crops) and the test size
    that follows, evaluation scores mIoU and PQ on the six classes the scenes hold. Large-scale jitter (COCO)
    refuses resize_base before reading the data."""
    import safetensors

    root = tmp_path / "mapillary"
    make = ["make-synthetic", "--mapillary", "--out", str(root), "--num-train", "2", "--num-val", "2"]
    assert main([*make, "--image-size", "64"]) == 0
    for kind in ("mapillary", "mapillary-panoptic"):
        out = tmp_path / kind
        recipe = [
            "--set",
            "solver.resize_base=2",
            "--set",
            "solver.min_scale=0.5",
            "--set",
            "solver.max_scale=2",
        ]
        assert main([*train_args(root, out, 1), "--dataset", kind, *recipe]) == 0
        augmentation = built_datasets[-1][2]
        assert built_datasets[-1][0] == kind and augmentation.crop_size == (64, 64)
        assert augmentation.short_sizes == [128 * k // 10 for k in range(5, 21)]
        with safetensors.safe_open(str(out / "model_final.safetensors"), "pt") as f:
            inference = json.loads(f.metadata()["config"])["inference"]
        assert (inference["test_short_edge"], inference["test_max_size"]) == (128, 256)
        evaluate = ["eval", "--checkpoint", str(out / "model_final.safetensors"), "--data-root", str(root)]
        assert main([*evaluate, "--num-workers", "0", "--no-progress"]) == 0
        results = json.loads((out / f"model_final.eval-{kind}-val.json").read_text())
        assert results["dataset"] == kind and results["num_images"] == 2
        if kind == "mapillary":
            assert set(results["per_class"]) == {"Road", "Building", "Vegetation", "Person", "Car", "Bicycle"}
        else:
            assert (results["N"], results["N_th"]) == (6, 3)
    capsys.readouterr()

    built_datasets.clear()
    lsj = [*train_args(tmp_path / "coco", tmp_path / "lsj", 1), "--set", "solver.resize_base=2"]
    assert main(lsj) == 2
    assert (
        "coco-panoptic trains with large-scale jitter, which scales the crop size" in capsys.readouterr().err
    )
    assert built_datasets == []


def test_eval_and_predict_tta_of_a_semantic_model(tmp_path, trained_run, synthetic_root, capsys):
    """`m2f eval --tta` writes its own results file, which says how it tested, `m2f predict --tta` the class
    map of predict_semantic_tta; other tasks are refused."""
    from m2f.data import make_synthetic_ade20k

    root = make_synthetic_ade20k(str(tmp_path / "ade"), num_train=2, num_val=2, image_size=48, seed=0)
    out = tmp_path / "run"
    assert main([*train_args(root, out, 1), "--dataset", "ade20k"]) == 0
    checkpoint = out / "model_final.safetensors"
    args = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(root), "--num-workers", "0"]
    assert main([*args, "--no-progress", "--tta"]) == 0
    results = json.loads((out / "model_final.eval-ade20k-val-tta.json").read_text())
    assert results["tta"] == {"scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True}
    assert 0 <= results["mIoU"] <= 100
    assert not (out / "model_final.eval-ade20k-val.json").exists()
    capsys.readouterr()

    panoptic = ["eval", "--checkpoint", str(trained_run / "model_final.safetensors")]
    assert main([*panoptic, "--data-root", str(synthetic_root), "--no-progress", "--tta"]) == 2
    assert (
        "tta: the multi-scale and flip test is for semantic segmentation (ade20k, or a panoptic set with task "
        "semantic)" in capsys.readouterr().err
    )

    # m2f predict --tta writes the class map of predict_semantic_tta, which differs from the plain prediction's
    # for random weights whose class and mask logits are scaled up (else the map is one class)
    import torch

    from m2f.engine.checkpoint import load_config_for_checkpoint
    from m2f.engine.evaluate import build_checkpoint_model, predict_semantic_tta

    metadata, _ = ckpt.read_header(checkpoint)
    torch.manual_seed(1)
    model = build_checkpoint_model(load_config_for_checkpoint(None, metadata, checkpoint), checkpoint).eval()
    with torch.no_grad():
        model.transformer_decoder.class_embed.weight.mul_(30)
        model.transformer_decoder.mask_embed.layers[-1].weight.mul_(30)
    random_weights = tmp_path / "random.safetensors"
    ckpt.save_weights(random_weights, model, metadata)
    image = next((Path(root) / "images" / "validation").glob("*.jpg"))
    predict = ["predict", str(image), "--checkpoint", str(random_weights), "--out", str(tmp_path / "tta")]
    assert main([*predict, "--tta"]) == 0
    labels = np.array(Image.open(tmp_path / "tta" / f"{image.stem}.semantic_labels.png"))
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB")).transpose(2, 0, 1).copy())
    expected = predict_semantic_tta(model, pixels, model.config, device=torch.device("cpu")).argmax(0)
    assert np.array_equal(labels, expected.numpy())
    assert main([*predict[:-1], str(tmp_path / "plain")]) == 0
    plain = np.array(Image.open(tmp_path / "plain" / f"{image.stem}.semantic_labels.png"))
    assert (plain != labels).any()
    assert main([*predict, "--tta", "--task", "panoptic"]) == 2
    assert "tta: the multi-scale and flip test is for the semantic task alone" in capsys.readouterr().err


def test_train_out_that_is_a_file_is_refused(synthetic_root, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(train_args(synthetic_root, a_file, 1)) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


def test_predict_writes_each_task_once_and_checks_the_score_threshold(trained_run, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 24)).save(image)
    args = ["predict", str(image), "--checkpoint", str(trained_run / "model_final.safetensors")]
    args += ["--out", str(tmp_path / "out"), "--task", "semantic", "--task", "semantic"]
    assert main(args) == 0
    assert "2 files" in capsys.readouterr().out  # the overlay and the label map, once
    assert main([*args, "--score-threshold", "nan"]) == 2
    assert "score_threshold must be in [0, 1]" in capsys.readouterr().err


def test_predict_coco_results_score_as_m2f_eval_does(synthetic_root, tmp_path, capsys):
    """The results files of `m2f predict --coco-results` give, in panopticapi's pq_compute and pycocotools'
    COCOeval, the PQ and mask AP `m2f eval` computes; only the listed images are predicted, and a run resumed
    with --skip-existing writes the same files."""
    from panopticapi.evaluation import pq_compute
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    run = tmp_path / "run"  # trained long enough that PQ and AP are above 0 on its training images
    assert main(train_args(synthetic_root, run, 80)) == 0
    checkpoint = run / "model_final.safetensors"
    evaluated = {}
    for dataset in ("coco-panoptic", "coco-instance"):
        output = tmp_path / f"{dataset}.json"
        args = eval_args(checkpoint, synthetic_root, output)
        assert main([*args, "--dataset", dataset, "--split", "train"]) == 0
        evaluated[dataset] = json.loads(output.read_text())
    annotations = synthetic_root / "annotations"
    out = tmp_path / "predictions"
    args = ["predict", str(synthetic_root / "train2017"), str(synthetic_root / "val2017")]
    args += ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    args += ["--task", "panoptic", "--task", "instance"]
    args += ["--coco-results", str(annotations / "panoptic_train2017.json")]
    assert main(args) == 0
    capsys.readouterr()
    assert not list(out.glob("0000001*"))  # the val images are not listed

    panoptic = json.loads((out / "panoptic_results.json").read_text())
    assert sorted(a["image_id"] for a in panoptic["annotations"]) == [1, 2, 3, 4]
    pq = pq_compute(
        str(annotations / "panoptic_train2017.json"),
        str(out / "panoptic_results.json"),
        str(annotations / "panoptic_train2017"),
        str(out),
    )
    assert evaluated["coco-panoptic"]["PQ"] > 0
    assert pq["All"]["pq"] * 100 == pytest.approx(evaluated["coco-panoptic"]["PQ"], abs=1e-9)
    assert pq["Things"]["pq"] * 100 == pytest.approx(evaluated["coco-panoptic"]["PQ_th"], abs=1e-9)

    ground_truth = COCO(str(annotations / "instances_train2017.json"))
    coco_eval = COCOeval(ground_truth, ground_truth.loadRes(str(out / "instances_results.json")), "segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert evaluated["coco-instance"]["segm"]["AP"] > 0
    assert coco_eval.stats[0] * 100 == pytest.approx(evaluated["coco-instance"]["segm"]["AP"], abs=1e-9)
    assert coco_eval.stats[1] * 100 == pytest.approx(evaluated["coco-instance"]["segm"]["AP50"], abs=1e-9)

    results = {
        name: (out / name).read_bytes() for name in ("panoptic_results.json", "instances_results.json")
    }
    (out / "000000000002.instances.npz").unlink()  # as if the run had stopped there
    (out / "panoptic_results.json").unlink()
    assert main([*args, "--skip-existing"]) == 0
    assert {name: (out / name).read_bytes() for name in results} == results


def test_predict_coco_results_bad_input_is_one_clear_line(synthetic_root, trained_run, tmp_path, capsys):
    checkpoint = trained_run / "model_final.safetensors"
    images_json = synthetic_root / "annotations" / "panoptic_train2017.json"
    base = ["predict", str(synthetic_root / "train2017"), "--out", str(tmp_path / "out"), "--device", "cpu"]

    one_image = ["predict", str(next((synthetic_root / "train2017").glob("*.jpg")))]
    assert (
        main([*one_image, *base[2:], "--checkpoint", str(checkpoint), "--coco-results", str(images_json)])
        == 2
    )
    assert (
        f"3 images that {images_json} lists are not among the inputs: 000000000002.jpg"
        in capsys.readouterr().err
    )

    no_categories = demo_checkpoint(tmp_path / "random.safetensors")
    assert main([*base, "--checkpoint", str(no_categories), "--coco-results", str(images_json)]) == 2
    assert "stores no dataset category ids" in capsys.readouterr().err

    semantic = [
        *base,
        "--checkpoint",
        str(checkpoint),
        "--task",
        "semantic",
        "--coco-results",
        str(images_json),
    ]
    assert main(semantic) == 2
    assert "COCO results files are for the panoptic and instance tasks" in capsys.readouterr().err

    malformed = tmp_path / "images.json"
    malformed.write_text(json.dumps({"images": [{"id": 1.5, "file_name": "000000000001.jpg"}]}))
    assert main([*base, "--checkpoint", str(checkpoint), "--coco-results", str(malformed)]) == 2
    assert f'{malformed}: "images" must be a list of' in capsys.readouterr().err
    malformed.write_text(json.dumps({"images": [{"id": True, "file_name": "000000000001.jpg"}]}))
    assert main([*base, "--checkpoint", str(checkpoint), "--coco-results", str(malformed)]) == 2
    assert f'{malformed}: "images" must be a list of' in capsys.readouterr().err
    twice = {"images": [{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}]}
    malformed.write_text(json.dumps(twice))
    assert main([*base, "--checkpoint", str(checkpoint), "--coco-results", str(malformed)]) == 2
    assert "the file name 'x.jpg' is listed twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_grad_checkpointing(synthetic_root, tmp_path, capsys, monkeypatch):
    """The same weights after a step as without; refused before the data is read for a backbone whose
    BatchNorm layers update running statistics (demo-tiny's)."""
    import dataclasses

    from safetensors.torch import load_file

    import m2f
    from m2f.engine import train
    from m2f.models.mask2former import Mask2Former

    config = m2f.get_config("demo-tiny")
    config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, frozen_batchnorm=True))
    calls = []
    set_grad_checkpointing = Mask2Former.set_grad_checkpointing
    monkeypatch.setattr(
        Mask2Former,
        "set_grad_checkpointing",
        lambda model, enable=True: calls.append(enable) or set_grad_checkpointing(model, enable),
    )
    weights = {}
    for enable in (False, True):
        out = tmp_path / f"run-{enable}"
        options = dict(max_iters=1, batch_size=2, image_size=64, num_workers=0, device="cpu", progress=False)
        train.run_training(config, synthetic_root, out, grad_checkpointing=enable, **options)
        weights[enable] = load_file(str(out / "model_final.safetensors"))
    assert calls == [False, True]
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, msg=name)

    monkeypatch.setattr(train, "build_dataset", lambda *a, **k: pytest.fail("the data was read"))
    args = [*train_args(synthetic_root, tmp_path / "refused", 1), "--grad-checkpointing"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert (
        "grad checkpointing: backbone 'test_resnet' has BatchNorm layers" in error and error.count("\n") == 1
    )


def test_predict_no_overlay_writes_the_same_raw_files_only(
    synthetic_root, trained_run, tmp_path, monkeypatch
):
    from m2f.engine import predict

    images = sorted((synthetic_root / "val2017").glob("*.jpg"))
    args = ["predict", *map(str, images), "--checkpoint", str(trained_run / "model_final.safetensors")]
    args += ["--device", "cpu", "--task", "panoptic", "--task", "instance", "--task", "semantic"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    assert main([*args, "--out", str(tmp_path / "raw"), "--no-overlay"]) == 0
    raw_suffixes = (".panoptic_ids.png", ".panoptic.json", ".instances.npz", ".semantic_labels.png")
    expected = {p.name: p.read_bytes() for p in (tmp_path / "all").iterdir() if p.name.endswith(raw_suffixes)}
    assert len(expected) == 4 * len(images)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == expected

    predicted = count_predictions(monkeypatch, predict)  # the raw files are all a --no-overlay run needs
    assert main([*args, "--out", str(tmp_path / "raw"), "--no-overlay", "--skip-existing"]) == 0
    assert predicted == []


def test_predict_category_ids_writes_each_class_as_its_dataset_id(
    synthetic_root, trained_run, tmp_path, monkeypatch, capsys
):
    """--category-ids: the semantic labels of the plain run, each class index replaced by the id of the
    dataset's category at that index (categories sorted by id; the synthetic ids are not contiguous)."""
    from m2f.engine import predict

    categories = json.loads((synthetic_root / "annotations" / "panoptic_val2017.json").read_text())[
        "categories"
    ]
    id_of_class = np.array(sorted(c["id"] for c in categories))
    assert list(id_of_class) != list(range(1, len(id_of_class) + 1))
    folder = synthetic_root / "val2017"
    checkpoint = str(trained_run / "model_final.safetensors")
    args = ["predict", str(folder), "--checkpoint", checkpoint, "--device", "cpu", "--task", "semantic"]
    assert main([*args, "--out", str(tmp_path / "index")]) == 0
    assert main([*args, "--out", str(tmp_path / "ids"), "--category-ids"]) == 0

    images = sorted(folder.glob("*.jpg"))
    written = sorted(p.name for p in (tmp_path / "ids").iterdir())
    assert written == sorted(
        f"{i.stem}{s}" for i in images for s in (".semantic.png", ".semantic_category_ids.png")
    )
    for image in images:
        labels = np.asarray(Image.open(tmp_path / "index" / f"{image.stem}.semantic_labels.png"))
        ids = np.asarray(Image.open(tmp_path / "ids" / f"{image.stem}.semantic_category_ids.png"))
        assert ids.dtype == np.uint8
        np.testing.assert_array_equal(ids, id_of_class[labels])

    predicted = count_predictions(monkeypatch, predict)
    assert main([*args, "--out", str(tmp_path / "ids"), "--category-ids", "--skip-existing"]) == 0
    assert predicted == []
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "index"), "--category-ids", "--skip-existing"]) == 0
    assert len(predicted) == len(images)  # the class-index files are not the ones asked for
    # a folder of these predictions as input: its label files are not images to predict
    assert main(["predict", str(tmp_path / "ids"), *args[2:], "--out", str(tmp_path / "again")]) == 2
    assert f"folder {tmp_path / 'ids'} holds no image file" in capsys.readouterr().err


def test_predict_category_ids_bad_input_is_one_clear_line(synthetic_root, trained_run, tmp_path, capsys):
    images = str(synthetic_root / "val2017")
    base = ["predict", images, "--out", str(tmp_path / "out"), "--device", "cpu", "--category-ids"]
    checkpoint = str(trained_run / "model_final.safetensors")
    assert main([*base, "--checkpoint", checkpoint, "--task", "panoptic"]) == 2
    error = capsys.readouterr().err
    assert "category_ids: the category id labels are the semantic task's, got tasks ['panoptic']" in error
    assert error.count("\n") == 1

    no_categories = demo_checkpoint(tmp_path / "random.safetensors")
    assert main([*base, "--checkpoint", str(no_categories), "--task", "semantic"]) == 2
    error = capsys.readouterr().err
    assert "category_ids: " in error and "stores no dataset category ids" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_config_command_prints_a_config_and_writes_one_to_train_with(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """`m2f config` prints a config (a name, a JSON file or a checkpoint's) with --set applied, --out writes
    it; `m2f train --config FILE.json --set ...` trains that config, stores it in the checkpoint, and its
    output folder defaults to output/<file stem>."""
    import m2f
    from m2f.config import ModelConfig

    assert main(["config", "demo-tiny", "--set", "decoder.num_queries=8"]) == 0
    text = capsys.readouterr().out
    assert '\n    "out_strides": [4, 8, 16, 32],\n' in text  # one line per field
    printed = ModelConfig.from_dict(json.loads(text))
    expected = m2f.get_config("demo-tiny")
    expected = dataclasses.replace(expected, decoder=dataclasses.replace(expected.decoder, num_queries=8))
    assert printed == expected
    path = tmp_path / "mine.json"
    assert main(["config", "demo-tiny", "--set", "decoder.num_queries=8", "--out", str(path)]) == 0
    assert capsys.readouterr().out == f"wrote {path}\n"
    assert ModelConfig.from_dict(json.loads(path.read_text())) == expected

    monkeypatch.chdir(tmp_path)
    args = train_args(synthetic_root, "unused", 1)
    del args[args.index("--out") : args.index("--out") + 2]
    args[args.index("demo-tiny")] = str(path)
    assert main([*args, "--set", "loss.num_points=64"]) == 0
    checkpoint = tmp_path / "output" / "mine" / "model_final.safetensors"
    metadata, shapes = ckpt.read_header(checkpoint)
    stored = ModelConfig.from_dict(json.loads(metadata["config"]))
    assert (stored.decoder.num_queries, stored.loss.num_points) == (8, 64)
    assert shapes["transformer_decoder.query_embed.weight"][0] == 8
    capsys.readouterr()
    assert main(["config", str(checkpoint), "--set", "inference.top_k=7"]) == 0
    from_checkpoint = ModelConfig.from_dict(json.loads(capsys.readouterr().out))
    assert from_checkpoint == dataclasses.replace(
        stored, inference=dataclasses.replace(stored.inference, top_k=7)
    )


@pytest.mark.parametrize("command", ["eval", "predict", "export", "convert"])
@pytest.mark.parametrize("named", [False, True])
def test_set_applies_to_the_checkpoint_config_of_each_command(
    trained_run, tmp_path, monkeypatch, command, named
):
    """--set changes the stored config (or the one --config names) before eval, predict, export and
    convert --to build the model; without --set they get --config as given."""
    import m2f
    from m2f.config import ModelConfig

    received = []
    module, name, result = {
        "eval": ("m2f.engine.evaluate", "run_evaluation", None),
        "predict": ("m2f.engine.predict", "run_prediction", []),
        "export": ("m2f.engine.export", "export_onnx", {"path": "", "shapes": [], "max_difference": {}}),
        "convert": ("m2f.convert", "export_to_file", ({}, [])),
    }[command]
    if command == "export":
        result["max_difference_every_key_visible"] = None

    def capture(*args, config_name=None, **kwargs):
        received.append(config_name)
        return result

    monkeypatch.setattr(f"{module}.{name}", capture)
    checkpoint = str(trained_run / "model_final.safetensors")
    args = {
        "eval": ["eval", "--checkpoint", checkpoint, "--data-root", str(tmp_path)],
        "predict": ["predict", checkpoint, "--checkpoint", checkpoint, "--out", str(tmp_path / "out")],
        "export": ["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "m.onnx")],
        "convert": ["convert", checkpoint, "--to", "mmdet", "--out", str(tmp_path / "m.pth")],
    }[command]
    if named:
        args += ["--config", "demo-tiny"]
    assert main(args) == 0
    assert main([*args, "--set", "inference.top_k=7", "--set", "decoder.mask_threshold=0.25"]) == 0
    assert received[0] == ("demo-tiny" if named else None)
    base = m2f.get_config("demo-tiny")
    if not named:
        base = ModelConfig.from_dict(json.loads(ckpt.read_header(checkpoint)[0]["config"]))
    assert received[1] == dataclasses.replace(
        base,
        inference=dataclasses.replace(base.inference, top_k=7),
        decoder=dataclasses.replace(base.decoder, mask_threshold=0.25),
    )


def test_set_reaches_the_model_eval_builds(synthetic_root, trained_run, tmp_path, capsys):
    """A decoder of 8 queries where the checkpoint has 16: the model built from the overridden config does
    not take the weights, and the error says so."""
    checkpoint = trained_run / "model_final.safetensors"
    args = eval_args(checkpoint, synthetic_root, tmp_path / "results.json")
    assert main([*args, "--set", "decoder.num_queries=8"]) == 2
    error = capsys.readouterr().err
    assert (
        "checkpoint does not match the model" in error and "transformer_decoder.query_embed.weight" in error
    )
    assert main([*args, "--set", "decoder.num_queries=eight"]) == 2
    assert "config.decoder.num_queries must be of type int, got 'eight'" in capsys.readouterr().err


def test_semantic_dataset_with_its_own_classes_trains_and_evaluates_on_them(tmp_path, capsys):
    """An ADE20K-layout dataset whose classes.txt names 6 classes (the synthetic one's): the model gets a
    head of 6 + 1 classes, the checkpoint their names, eval's table their per-class IoU, and predict
    --category-ids the PNG values."""
    from m2f.data import SYNTHETIC_CATEGORIES, make_synthetic_ade20k

    root = Path(make_synthetic_ade20k(str(tmp_path / "ade"), num_train=2, num_val=1, image_size=48, seed=0))
    names = [category["name"] for category in SYNTHETIC_CATEGORIES]
    assert (root / "classes.txt").read_text().splitlines() == names
    out = tmp_path / "run"
    assert main([*train_args(root, out, 1), "--dataset", "ade20k"]) == 0
    checkpoint = out / "model_final.safetensors"
    metadata, shapes = ckpt.read_header(checkpoint)
    assert shapes[ckpt.CLASS_HEAD_KEYS[0]][0] == len(names) + 1
    stored_names, _, categories = ckpt.stored_classes(metadata, checkpoint)
    assert stored_names == names and [c["id"] for c in categories] == list(range(1, len(names) + 1))
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(root), "--num-workers", "0"]
    assert main([*args, "--no-progress"]) == 0
    results = json.loads((out / "model_final.eval-ade20k-val.json").read_text())
    assert results["per_class"] and set(results["per_class"]) <= set(names)  # the classes of the val labels
    image = next((root / "images" / "validation").glob("*.jpg"))
    predict = ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "predicted")]
    assert main([*predict, "--task", "semantic", "--category-ids"]) == 0
    values = np.unique(
        np.array(Image.open(tmp_path / "predicted" / f"{image.stem}.semantic_category_ids.png"))
    )
    assert 1 <= values.min() and values.max() <= len(names)

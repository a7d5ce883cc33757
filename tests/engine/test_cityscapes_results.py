"""predict's Cityscapes instance results: the files cityscapesscripts finds by its own name pattern and scores
as the benchmark does."""

import copy
import os

import numpy as np
import pytest
from PIL import Image

from m2f.data import CityscapesInstanceDataset, make_synthetic_cityscapes
from m2f.data.cityscapes import instance_segments
from m2f.data.common import read_label_png
from m2f.engine.cityscapes_results import RESULTS_FOLDER, write_cityscapes_results

THING_LABEL_IDS = [24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_cityscapes(
        str(tmp_path_factory.mktemp("cityscapes")), num_train=1, num_val=3, image_size=64
    )
    return CityscapesInstanceDataset(root, "val")


def write_ground_truth_npz(dataset, out_dir, silent=()):
    """predict's <stem>.instances.npz holding each image's objects (none for the indices in silent)."""
    stems = []
    for index in range(len(dataset)):
        ids = read_label_png(dataset.annotation_path(index))
        values, labels = instance_segments(ids)
        if index in silent:
            values, labels = values[:0], labels[:0]
        stems.append(os.path.basename(dataset.file_names[index]).removesuffix(".png"))
        np.savez(
            out_dir / f"{stems[-1]}.instances.npz",
            masks=ids[None] == values[:, None, None],
            scores=np.linspace(0.9, 0.5, len(values)),
            labels=labels,
            boxes=np.zeros((len(values), 4)),
        )
    return stems


def official_scores(dataset, folder):
    """cityscapesscripts' AP of the results folder, each image's file found by the script's own pattern."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as evaluation

    args = copy.deepcopy(evaluation.args)
    args.predictionPath, args.predictionWalk = str(folder), None
    args.gtInstancesFile = str(folder.parent / "gtInstances.json")
    args.JSONOutput, args.quiet = False, True
    ground_truth = [os.path.abspath(dataset.annotation_path(i)) for i in range(len(dataset))]
    predictions = [evaluation.getPrediction(path, args) for path in ground_truth]
    working = os.getcwd()
    os.chdir(folder.parent)
    try:
        return evaluation.evaluateImgLists(predictions, ground_truth, args)["averages"]
    finally:
        os.chdir(working)


def test_results_files_score_as_their_predictions(dataset, tmp_path):
    stems = write_ground_truth_npz(dataset, tmp_path)
    folder = write_cityscapes_results(tmp_path, stems, THING_LABEL_IDS)
    assert folder == tmp_path / RESULTS_FOLDER
    first = (folder / f"{stems[0]}.txt").read_text().splitlines()
    values = instance_segments(read_label_png(dataset.annotation_path(0)))[0]
    assert len(first) == len(values) > 0
    mask_name, label_id, score = first[0].split(" ")
    assert (
        mask_name == f"masks/{stems[0]}_0.png" and int(label_id) == values[0] // 1000 and float(score) == 0.9
    )
    mask = np.asarray(Image.open(folder / mask_name).convert("L"))  # as cityscapesscripts reads it
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask == 255, read_label_png(dataset.annotation_path(0)) == values[0])
    averages = official_scores(dataset, folder)
    assert averages["allAp"] == pytest.approx(1.0)


def test_a_silent_image_lowers_the_score_and_a_rerun_replaces_the_files(dataset, tmp_path):
    stems = write_ground_truth_npz(dataset, tmp_path)
    write_cityscapes_results(tmp_path, stems, THING_LABEL_IDS)
    stems = write_ground_truth_npz(dataset, tmp_path, silent={0})
    folder = write_cityscapes_results(tmp_path, stems, THING_LABEL_IDS)
    assert (folder / f"{stems[0]}.txt").read_text() == ""
    assert not any(name.startswith(stems[0]) for name in os.listdir(folder / "masks"))
    assert official_scores(dataset, folder)["allAp"] < 1.0

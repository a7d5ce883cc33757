import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from engine_standins import OracleModel, eval_parts_ddp_worker, free_port, oracle_answers, oracle_eval_setup

from m2f.data import make_synthetic
from m2f.engine.evaluate import evaluate_model, predict_masks, summarize


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(root), num_train=1, num_val=3, image_size=64, seed=5)
    return root


def test_perfect_predictions_score_full_pq(synthetic_root):
    config, dataset = oracle_eval_setup(synthetic_root)
    oracle = OracleModel(oracle_answers(synthetic_root), dataset.metadata.num_classes)
    evaluation = evaluate_model(oracle, dataset, config, progress=False)
    assert evaluation["results"]["num_images"] == 3
    assert evaluation["results"]["PQ"] == pytest.approx(100.0)
    assert evaluation["summary"]["PQ"] == evaluation["results"]["PQ"]


def test_empty_predictions_score_zero(synthetic_root):
    config, dataset = oracle_eval_setup(synthetic_root)
    oracle = OracleModel(oracle_answers(synthetic_root, silent={0, 1, 2}), dataset.metadata.num_classes)
    evaluation = evaluate_model(oracle, dataset, config, progress=False)
    assert evaluation["results"]["PQ"] == 0.0


def test_semantic_evaluation_of_a_panoptic_dataset(synthetic_root):
    """The mIoU of a panoptic model against the panoptic annotations read as semantic ground truth: 100 for
    the oracle; with every segment of the first image called class 0, the mIoU of the confusion counted here
    from the PNGs."""
    import json
    import os

    import numpy as np
    from panopticapi.utils import rgb2id
    from PIL import Image

    config, dataset = oracle_eval_setup(synthetic_root)
    num_classes = dataset.metadata.num_classes
    oracle = OracleModel(oracle_answers(synthetic_root), num_classes)
    perfect = evaluate_model(oracle, dataset, config, task="semantic", progress=False)["results"]
    assert perfect["task"] == "semantic" and perfect["mIoU"] == pytest.approx(100.0)
    assert perfect["num_images"] == len(dataset) == 3

    answers = oracle_answers(synthetic_root)
    answers[0] = (torch.zeros_like(answers[0][0]), answers[0][1])
    results = evaluate_model(
        OracleModel(answers, num_classes), dataset, config, task="semantic", progress=False
    )
    with open(os.path.join(synthetic_root, "annotations", "panoptic_val2017.json")) as f:
        data = json.load(f)
    class_of_category = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for number, annotation in enumerate(data["annotations"]):
        png = os.path.join(synthetic_root, "annotations", "panoptic_val2017", annotation["file_name"])
        ids = rgb2id(np.array(Image.open(png), dtype=np.uint32))
        for segment in annotation["segments_info"]:
            label = class_of_category[segment["category_id"]]
            confusion[label, 0 if number == 0 else label] += (ids == segment["id"]).sum()
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    expected = 100 * iou[confusion.sum(1) > 0].mean()
    assert expected < 95
    assert results["results"]["mIoU"] == pytest.approx(expected)


def test_no_image_to_evaluate_is_refused(synthetic_root):
    """PQ 0.000 and exit 0 before: the score of a model that finds nothing."""
    config, dataset = oracle_eval_setup(synthetic_root)
    oracle = OracleModel(oracle_answers(synthetic_root), dataset.metadata.num_classes)
    with pytest.raises(ValueError, match="nothing to evaluate: the dataset has 3 images, max_images 0"):
        evaluate_model(oracle, dataset, config, progress=False, max_images=0)


@pytest.mark.parametrize("mapped", [True, False])
def test_panoptic_model_is_evaluated_on_instances_by_category_id(synthetic_root, mapped):
    """An oracle whose classes are the panoptic categories (things and stuff) in reverse order, evaluated on
    the COCO instance annotations: mapped to the instance classes by category id, with its stuff segments
    dropped, it scores mask AP 100; read as instance class indices, its labels name the wrong classes."""
    from m2f.engine.train import build_dataset

    config, panoptic = oracle_eval_setup(synthetic_root)
    instances = build_dataset("coco-instance", synthetic_root, "val", panoptic.transforms)
    categories = panoptic.metadata.categories[::-1]
    assert any(not c["isthing"] for c in categories)
    answers = [(len(categories) - 1 - labels, masks) for labels, masks in oracle_answers(synthetic_root)]
    oracle = OracleModel(answers, len(categories))
    options = {"model_categories": categories} if mapped else {}
    try:
        results = evaluate_model(oracle, instances, config, task="instance", progress=False, **options)
        ap = results["results"]["segm"]["AP"]
    except ValueError:  # labels beyond the instance classes
        ap = None
    assert (ap == pytest.approx(100.0)) == mapped
    with pytest.raises(ValueError, match="instance predictions only"):
        evaluate_model(oracle, panoptic, config, progress=False, model_categories=categories)
    renamed = [{**c, "name": c["name"] + " (another dataset)"} for c in categories]
    with pytest.raises(ValueError, match="share no category"):
        evaluate_model(oracle, instances, config, task="instance", progress=False, model_categories=renamed)


def test_a_failed_evaluation_leaves_the_model_in_training_mode(synthetic_root):
    """An evaluation that raised (a refused prediction, a model error) left the model in eval mode, so
    training that went on after catching the error ran without dropout."""
    config, dataset = oracle_eval_setup(synthetic_root)
    oracle = OracleModel([], dataset.metadata.num_classes).train()  # no answer: its forward raises
    with pytest.raises(IndexError):
        evaluate_model(oracle, dataset, config, progress=False)
    assert oracle.training


@pytest.mark.parametrize("size", [(48, 70), (50, 68), (64, 96), (33, 31)])
def test_predicted_masks_are_upsampled_at_the_padded_size_then_cropped(size):
    """detectron2's Mask2Former inference: masks at 1/4 of the padded input are upsampled to the padded size,
    then cropped. Cropping them at 1/4 first differs in the last rows and columns of inputs whose height or
    width is a multiple of 4 but not of 32."""
    import torch.nn.functional as F

    import m2f

    torch.manual_seed(0)
    model = m2f.build_model("demo-tiny", backend="torch").eval()
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    decoder_masks = []
    model.transformer_decoder.register_forward_hook(
        lambda module, args, outputs: decoder_masks.append(outputs["pred_masks"])
    )
    mask_cls, masks = predict_masks(model, image, device=torch.device("cpu"))
    padded_size = (-(-size[0] // 32) * 32, -(-size[1] // 32) * 32)
    with torch.no_grad():
        model(image[None].float())
    expected = F.interpolate(decoder_masks[1], size=padded_size, mode="bilinear", align_corners=False)
    expected = expected[0, :, : size[0], : size[1]]
    torch.testing.assert_close(masks.at(size), expected, atol=1e-5, rtol=1e-5)
    queries = torch.tensor([3, 0, 3])
    torch.testing.assert_close(masks.at(size, queries), expected[queries], atol=1e-5, rtol=1e-5)
    smaller = F.interpolate(expected[None], size=(7, 11), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(masks.at((7, 11)), smaller, atol=1e-5, rtol=1e-5)
    assert mask_cls.shape == (model.config.decoder.num_queries, model.num_classes + 1)
    with pytest.raises(ValueError, match="amp must be"):
        predict_masks(model, image, device=torch.device("cpu"), amp="bfloat16")
    # A float image in 0..1 ran on normalization made for 0..255, and a gray one was copied to 3 channels.
    for other, described in (
        (image.float() / 255, r"\(3, \d+, \d+\) torch.float32 tensor"),
        (image[:1], r"\(1, \d+, \d+\) torch.uint8 tensor"),
        (image.permute(1, 2, 0), r"\(\d+, \d+, 3\) torch.uint8 tensor"),
        (image.numpy(), "numpy.ndarray"),
    ):
        with pytest.raises(
            ValueError, match=f"image must be a \\(3, h, w\\) uint8 tensor .*got .*{described}"
        ):
            predict_masks(model, other, device=torch.device("cpu"))
    # In training mode the batch norms would learn from the image and drop path would drop layers.
    with pytest.raises(ValueError, match=r"predict_masks needs the model in eval mode \(model.eval\(\)\)"):
        predict_masks(model.train(), image, device=torch.device("cpu"))


def semantic_scores(model, image, short, max_size, flipped=False):
    """The oracle of one test-time copy: the image resized (short side, long side at most max_size), mirrored
    if flipped, predicted; softmax class probabilities (no-object dropped) times sigmoid masks summed over the
    queries, bilinearly resized to the image's size and mirrored back."""
    import numpy as np
    import torch.nn.functional as F

    from m2f.data import ResizeShortestEdge

    height, width = image.shape[-2:]
    geometry = ResizeShortestEdge(short, max_size).get_geometry(height, width)
    resized = torch.from_numpy(np.ascontiguousarray(geometry.apply_image(image.permute(1, 2, 0).numpy())))
    resized = resized.permute(2, 0, 1)
    mask_cls, masks = predict_masks(
        model, resized.flip(-1) if flipped else resized, device=torch.device("cpu")
    )
    mask_pred = masks.at(masks.image_size)
    scores = torch.einsum("qc,qhw->chw", mask_cls.softmax(-1)[:, :-1], mask_pred.sigmoid())
    scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return scores.flip(-1) if flipped else scores


@pytest.mark.parametrize("size", [(50, 70), (30, 190)])
def test_semantic_tta_averages_the_scaled_and_flipped_copies(size):
    """Mask2Former's multi-scale and flip test: the mean of the copies' scores, each at the test size (128 for
    demo-tiny) times the scale, the long side at most the test's (128) times the largest scale (a 30 x 190
    image reaches it), mirrored copies mirrored back."""
    import m2f
    from m2f.engine.evaluate import postprocess, predict_semantic_tta

    torch.manual_seed(0)
    model = m2f.build_model("demo-tiny", backend="torch").eval()
    config = model.config
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    cpu = torch.device("cpu")

    scores = predict_semantic_tta(model, image, config, device=cpu, scales=(0.5, 1.25), flip=True)
    copies = [semantic_scores(model, image, short, 160, flipped) for short in (64, 160) for flipped in (0, 1)]
    torch.testing.assert_close(scores, torch.stack(copies).mean(0), atol=1e-5, rtol=1e-5)

    # one scale of 1, no flip: the ordinary semantic inference of a semantic model
    single = predict_semantic_tta(model, image, config, device=cpu, scales=(1.0,), flip=False)
    torch.testing.assert_close(single, semantic_scores(model, image, 128, 128), atol=1e-5, rtol=1e-5)
    from m2f.engine.evaluate import inference_transform

    geometry = inference_transform(config).get_geometry(*size)
    resized = torch.from_numpy(geometry.apply_image(image.permute(1, 2, 0).numpy()).copy()).permute(2, 0, 1)
    semantic_config = dataclasses.replace(config, task="semantic")
    plain = postprocess(
        ["semantic"], *predict_masks(model, resized, device=cpu), size, semantic_config, set()
    )
    assert torch.equal(single.argmax(0), plain["semantic"])

    with pytest.raises(ValueError, match="scales must be a non-empty sequence of positive numbers"):
        predict_semantic_tta(model, image, config, device=cpu, scales=(1.0, 0.0))


def test_tta_is_refused_for_other_tasks_and_for_resized_images(synthetic_root):
    """The multi-scale and flip test is for semantic segmentation, of each image at its original size: a
    dataset that resizes its images (here 64 to 256 pixels) is named with the sizes."""
    from m2f.engine.train import build_dataset

    config, resized = oracle_eval_setup(synthetic_root)
    original = build_dataset("coco-panoptic", synthetic_root, "val")
    model = OracleModel(oracle_answers(synthetic_root), resized.metadata.num_classes)
    with pytest.raises(
        ValueError, match="tta: the multi-scale and flip test is for semantic segmentation, not panoptic"
    ):
        evaluate_model(model, original, config, tta=True, progress=False)
    with pytest.raises(
        ValueError,
        match=r"tta: the dataset gives image 0 at \(256, 256\), not at its original size \(64, 64\)",
    ):
        evaluate_model(model, resized, config, task="semantic", tta=True, progress=False)


def test_summarize_flattens_groups_and_skips_per_class():
    results = {"task": "instance", "segm": {"AP": 40.0, "per_class": {"a": 1.0}}, "num_images": 5, "PQ": 3}
    assert summarize(results) == {"segm/AP": 40.0, "PQ": 3.0}


def test_parts_give_the_results_of_one_pass_and_are_reused(synthetic_root, tmp_path, monkeypatch):
    """Parts of 2 images: an oracle that is right on some images and silent on others gives a PQ strictly
    between 0 and 100; a second pass over the stored parts predicts nothing and gives the same results."""
    from m2f.engine import evaluate

    monkeypatch.setattr(evaluate, "PART_SIZE", 2)
    config, dataset = oracle_eval_setup(synthetic_root)
    num_classes = dataset.metadata.num_classes
    answers = oracle_answers(synthetic_root, silent={1})
    one_pass = evaluate_model(OracleModel(answers, num_classes), dataset, config, progress=False)
    assert 0 < one_pass["results"]["PQ"] < 100

    parts = tmp_path / "parts"
    key = {"run": 1}
    in_parts = evaluate_model(
        OracleModel(answers, num_classes), dataset, config, progress=False, parts_dir=parts, run_key=key
    )
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.json", "part-000001.json"]
    assert in_parts["results"]["PQ"] == pytest.approx(one_pass["results"]["PQ"], rel=1e-12)
    assert in_parts["results"]["num_images"] == 3
    reused = evaluate_model(
        OracleModel([], num_classes), dataset, config, progress=False, parts_dir=parts, run_key=key
    )
    assert reused["results"] == in_parts["results"]
    with pytest.raises(ValueError, match=r"part-000000\.json belongs to another evaluation"):
        evaluate_model(
            OracleModel([], num_classes), dataset, config, progress=False, parts_dir=parts, run_key={"run": 2}
        )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_parts_of_a_two_process_run_are_reused_by_one_process(synthetic_root, tmp_path, monkeypatch):
    """Two gloo ranks share the parts (one image each): their results equal one process's, and one process
    then finds every part and predicts nothing."""
    import json

    from m2f.engine import evaluate

    parts, out = tmp_path / "parts", tmp_path / "results.json"
    mp.spawn(
        eval_parts_ddp_worker,
        args=(2, free_port(), str(synthetic_root), str(parts), str(out)),
        nprocs=2,
        join=True,
    )
    config, dataset = oracle_eval_setup(synthetic_root)
    num_classes = dataset.metadata.num_classes
    single = evaluate_model(
        OracleModel(oracle_answers(synthetic_root, silent={1}), num_classes), dataset, config, progress=False
    )
    two_processes = json.loads(out.read_text())
    assert two_processes["num_images"] == 3
    assert two_processes["PQ"] == pytest.approx(single["results"]["PQ"], rel=1e-12)
    assert sorted(p.name for p in parts.iterdir()) == [f"part-00000{i}.json" for i in range(3)]
    monkeypatch.setattr(evaluate, "PART_SIZE", 1)
    reused = evaluate_model(
        OracleModel([], num_classes), dataset, config, progress=False, parts_dir=parts, run_key={"run": 1}
    )
    assert reused["results"]["PQ"] == pytest.approx(single["results"]["PQ"], rel=1e-12)


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"stats": "none", "image_ids": []},
        {"stats": {"iou": [0.9], "tp": [1], "fp": [0], "fn": [0]}, "image_ids": [10**6]},  # one category
        [1, 2],
    ],
)
def test_a_part_with_a_malformed_state_is_named(synthetic_root, tmp_path, monkeypatch, state):
    """A part whose state the evaluator cannot take (edited, or from another version) is refused by file name
    before anything is predicted, as a part of another run is."""
    import json

    from m2f.engine import evaluate

    monkeypatch.setattr(evaluate, "PART_SIZE", 2)
    config, dataset = oracle_eval_setup(synthetic_root)
    num_classes = dataset.metadata.num_classes
    parts, key = tmp_path / "parts", {"run": 1}
    answers = oracle_answers(synthetic_root)
    evaluate_model(
        OracleModel(answers, num_classes), dataset, config, progress=False, parts_dir=parts, run_key=key
    )
    part = parts / "part-000001.json"
    stored = json.loads(part.read_text())
    part.write_text(json.dumps({**stored, "state": state}))
    with pytest.raises(ValueError, match=r"part-000001\.json: not a readable evaluation part"):
        evaluate_model(
            OracleModel([], num_classes), dataset, config, progress=False, parts_dir=parts, run_key=key
        )


@pytest.fixture(scope="module")
def ade20k_root(tmp_path_factory):
    """The scenes of synthetic_root in ADE20K's layout: string image ids, category ids from 0."""
    from m2f.data import make_synthetic_ade20k

    return make_synthetic_ade20k(
        str(tmp_path_factory.mktemp("ade")), num_train=1, num_val=3, image_size=64, seed=5
    )


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    """The scenes of synthetic_root in Cityscapes' layout: city folders, the 19 classes, label ids."""
    from m2f.data import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    return make_synthetic_cityscapes(str(root), num_train=1, num_val=3, image_size=64, seed=5)


def scene_number(kind: str, record) -> int:
    """The synthetic scene of a panoptic record: the number its writer gave the image."""
    stem = os.path.basename(record[1]).split(".")[0]
    if kind == "coco-panoptic":
        return int(stem) - 100001
    if kind == "ade20k-panoptic":
        return int(stem.split("_")[-1]) - 1
    return int(stem.split("_")[2])


@pytest.mark.parametrize("layout", ["ade20k", "cityscapes"])
@pytest.mark.parametrize("silent_scenes", [set(), {1}])
def test_other_panoptic_layouts_score_as_the_same_scenes_in_cocos(
    request, synthetic_root, layout, silent_scenes
):
    """PQ and the semantic mIoU of an oracle (silent on the same scenes) on ADE20K's panoptic files (string
    image ids, ids from 0) and Cityscapes' (city folders, 19 classes) equal those on the COCO files of the same
    scenes, which the COCO tests check against panopticapi."""
    scores = []
    for root, kind in (
        (synthetic_root, "coco-panoptic"),
        (request.getfixturevalue(f"{layout}_root"), f"{layout}-panoptic"),
    ):
        config, dataset = oracle_eval_setup(root, kind)
        silent = {
            i for i, record in enumerate(dataset.records) if scene_number(kind, record) in silent_scenes
        }
        assert len(silent) == len(silent_scenes)
        num_classes = dataset.metadata.num_classes
        results = [
            evaluate_model(
                OracleModel(oracle_answers(root, silent, kind), num_classes),
                dataset,
                config,
                task=task,
                progress=False,
            )["results"]
            for task in ("panoptic", "semantic")
        ]
        scores.append((results[0]["PQ"], results[0]["SQ"], results[0]["RQ"], results[1]["mIoU"]))
    # A silent image's pixels fall to class 0 in the semantic inference, which names another scene class in
    # Cityscapes' order: its mIoU is compared where no image is silent.
    compared = 4 if layout == "ade20k" or not silent_scenes else 3
    assert scores[1][:compared] == pytest.approx(scores[0][:compared])
    assert (scores[1][0] == pytest.approx(100.0)) == (not silent_scenes)


def test_ade20k_panoptic_model_is_evaluated_on_ade20k_instances(ade20k_root):
    """Mask2Former gives ADE20K's instance classes the panoptic category ids, so a panoptic model's thing
    predictions map to them: an oracle scores mask AP 100 through pycocotools with string image ids."""
    from m2f.engine.train import build_dataset

    config, panoptic = oracle_eval_setup(ade20k_root, "ade20k-panoptic")
    instances = build_dataset("ade20k-instance", ade20k_root, "val", panoptic.transforms)
    assert instances.metadata.num_classes < panoptic.metadata.num_classes
    oracle = OracleModel(oracle_answers(ade20k_root, kind="ade20k-panoptic"), panoptic.metadata.num_classes)
    results = evaluate_model(
        oracle,
        instances,
        config,
        task="instance",
        progress=False,
        model_categories=panoptic.metadata.categories,
    )["results"]
    assert results["num_images"] == 3
    assert results["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("silent_scenes", [set(), {1}])
def test_cityscapes_panoptic_model_is_evaluated_on_cityscapes_instances(cityscapes_root, silent_scenes):
    """A panoptic model's things map to the 8 instance classes by label id, and cityscapesscripts scores them
    against the instance id maps: an oracle (silent on some scenes) finds no false positive, so each class's
    AP is the share of its objects (of 100 pixels or more, the benchmark's smallest) that it finds, counted
    here from the id maps."""
    import numpy as np

    from m2f.data.common import read_label_png
    from m2f.engine.train import build_dataset

    config, panoptic = oracle_eval_setup(cityscapes_root, "cityscapes-panoptic")
    instances = build_dataset("cityscapes-instance", cityscapes_root, "val", panoptic.transforms)
    assert [record[1] for record in panoptic.records] == instances.file_names
    silent = {
        i for i, record in enumerate(panoptic.records) if scene_number("cityscapes", record) in silent_scenes
    }
    found, total = {}, {}
    for index in range(len(instances)):
        ids = read_label_png(instances.annotation_path(index))
        values, counts = np.unique(ids[ids >= 1000], return_counts=True)
        for value in values[counts >= 100].tolist():
            name = {24: "person", 26: "car", 33: "bicycle"}[value // 1000]
            total[name] = total.get(name, 0) + 1
            found[name] = found.get(name, 0) + (index not in silent)
    assert total and (found != total) == bool(silent_scenes)

    oracle = OracleModel(
        oracle_answers(cityscapes_root, silent, kind="cityscapes-panoptic"), panoptic.metadata.num_classes
    )
    results = evaluate_model(
        oracle,
        instances,
        config,
        task="instance",
        progress=False,
        model_categories=panoptic.metadata.categories,
    )["results"]
    assert results["benchmark"] == "cityscapes" and results["num_images"] == 3
    expected = {name: 100 * found[name] / total[name] for name in total}
    assert results["segm"]["per_class"] == pytest.approx(expected)
    assert results["segm"]["AP"] == pytest.approx(np.mean(list(expected.values())))
    assert results["segm"]["AP50"] == pytest.approx(results["segm"]["AP"])

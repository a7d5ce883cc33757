import pytest
import torch
import torch.multiprocessing as mp
from engine_standins import OracleModel, eval_parts_ddp_worker, free_port, oracle_answers, oracle_eval_setup

from m2f.data import make_synthetic
from m2f.engine.evaluate import evaluate_model, summarize


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

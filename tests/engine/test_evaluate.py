import dataclasses

import pytest
import torch
from torch import nn

from m2f.config import get_config
from m2f.data import make_synthetic
from m2f.engine.evaluate import evaluate_model, inference_transform, summarize
from m2f.engine.train import build_dataset


class OracleModel(nn.Module):
    """Answers each forward with the ground truth of the next queued image: one confident query per segment
    (class logit 10) whose mask logits are +-20 on the ground-truth mask, the other queries "no object"."""

    def __init__(
        self, ground_truth: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, num_queries=16
    ):
        super().__init__()
        self.ground_truth = list(ground_truth)
        self.num_classes = num_classes
        self.num_queries = num_queries

    def forward(self, images: torch.Tensor) -> dict:
        labels, masks = self.ground_truth.pop(0)
        height, width = -(-images.shape[-2] // 4), -(-images.shape[-1] // 4)
        assert masks.shape[-2:] == (height, width), "the test expects 1/4 of the input = the original size"
        logits = torch.full((1, self.num_queries, self.num_classes + 1), -10.0)
        logits[0, :, -1] = 10.0
        mask_logits = torch.full((1, self.num_queries, height, width), -20.0)
        for q, (label, mask) in enumerate(zip(labels.tolist(), masks)):
            logits[0, q, -1] = -10.0
            logits[0, q, label] = 10.0
            mask_logits[0, q][mask] = 20.0
        return {"pred_logits": logits, "pred_masks": mask_logits}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(root), num_train=1, num_val=3, image_size=64, seed=5)
    return root


def test_perfect_predictions_score_full_pq(synthetic_root):
    config = get_config("demo-tiny")
    inference = dataclasses.replace(config.inference, test_short_edge=256, test_max_size=256)
    config = dataclasses.replace(config, inference=inference)
    ground_truth = build_dataset("coco-panoptic", synthetic_root, "val")
    oracle = OracleModel(
        [(item["labels"], item["masks"]) for item in ground_truth], ground_truth.metadata.num_classes
    )
    dataset = build_dataset("coco-panoptic", synthetic_root, "val", inference_transform(config))
    evaluation = evaluate_model(oracle, dataset, config, progress=False)
    assert evaluation["results"]["num_images"] == 3
    assert evaluation["results"]["PQ"] == pytest.approx(100.0)
    assert evaluation["summary"]["PQ"] == evaluation["results"]["PQ"]


def test_empty_predictions_score_zero(synthetic_root):
    config = get_config("demo-tiny")
    inference = dataclasses.replace(config.inference, test_short_edge=256, test_max_size=256)
    config = dataclasses.replace(config, inference=inference)
    dataset = build_dataset("coco-panoptic", synthetic_root, "val", inference_transform(config))
    num_classes = dataset.metadata.num_classes
    empty = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 64, 64, dtype=torch.bool))] * 3
    evaluation = evaluate_model(OracleModel(empty, num_classes), dataset, config, progress=False)
    assert evaluation["results"]["PQ"] == 0.0


def test_summarize_flattens_groups_and_skips_per_class():
    results = {"task": "instance", "segm": {"AP": 40.0, "per_class": {"a": 1.0}}, "num_images": 5, "PQ": 3}
    assert summarize(results) == {"segm/AP": 40.0, "PQ": 3.0}

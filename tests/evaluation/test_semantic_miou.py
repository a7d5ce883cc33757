import json

import numpy as np
import pytest
import torch

from m2f.evaluation import SemanticEvaluator


def test_hand_computed_case():
    evaluator = SemanticEvaluator(2, class_names=["a", "b"])
    evaluator.update(np.array([[0, 1], [1, 1]]), np.array([[0, 0], [1, 255]]))
    results = evaluator.compute()
    # class a: TP 1, gt 2, pred 1 -> IoU 1/2, acc 1/2; class b: TP 1, gt 1, pred 2 -> IoU 1/2, acc 1
    assert results["mIoU"] == pytest.approx(50.0)
    assert results["mACC"] == pytest.approx(75.0)
    assert results["pACC"] == pytest.approx(100 * 2 / 3)
    assert results["fwIoU"] == pytest.approx(50.0)
    assert results["per_class"] == {"a": {"IoU": 50.0, "ACC": 50.0}, "b": {"IoU": 50.0, "ACC": 100.0}}


def test_against_a_per_class_loop():
    rng = np.random.default_rng(0)
    num_classes = 5
    evaluator = SemanticEvaluator(num_classes)
    gts, preds = [], []
    for _ in range(3):
        gt = rng.integers(0, num_classes, size=(17, 23))
        gt[rng.uniform(size=gt.shape) < 0.1] = 255
        gt[gt == 3] = 2  # class 3 never appears in the ground truth
        pred = np.where(rng.uniform(size=gt.shape) < 0.6, gt, rng.integers(0, num_classes, size=gt.shape))
        pred[pred == 255] = 4
        evaluator.update(torch.from_numpy(pred), torch.from_numpy(gt))
        gts.append(gt)
        preds.append(pred)
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    valid = gt != 255
    ious, accs = [], []
    for c in range(num_classes):
        in_gt, in_pred = (gt == c) & valid, (pred == c) & valid
        if in_gt.sum() == 0:
            continue
        ious.append((in_gt & in_pred).sum() / (in_gt | in_pred).sum())
        accs.append((in_gt & in_pred).sum() / in_gt.sum())
    results = evaluator.compute()
    assert results["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert results["mACC"] == pytest.approx(100 * np.mean(accs))
    assert results["pACC"] == pytest.approx(100 * (gt == pred)[valid].mean())
    assert "3" not in results["per_class"] and len(results["per_class"]) == 4


def test_scores_are_argmaxed():
    scores = torch.zeros(3, 2, 2)
    scores[2, 0, 0] = 1.0
    scores[1, 1, :] = 1.0
    a, b = SemanticEvaluator(3), SemanticEvaluator(3)
    gt = np.array([[2, 0], [1, 1]])
    a.update(scores, gt)
    b.update(scores.argmax(0), gt)
    assert np.array_equal(a.confusion, b.confusion) and a.compute()["pACC"] == 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_scores_give_the_float32_results(dtype):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, 7, generator=generator)
    gt = torch.randint(0, 4, (9, 7), generator=generator)
    a, b = SemanticEvaluator(4), SemanticEvaluator(4)
    a.update(scores.to(dtype), gt)
    b.update(scores.to(dtype).float(), gt)
    assert np.array_equal(a.confusion, b.confusion)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_classes"):
        SemanticEvaluator(0)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        SemanticEvaluator(True)
    assert SemanticEvaluator(np.int64(150)).num_classes == 150  # was refused
    evaluator = SemanticEvaluator(2)
    with pytest.raises(ValueError, match="same size"):
        evaluator.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="gt has class indices"):
        evaluator.update(np.zeros((1, 2)), np.array([[0, 7]]))
    # A (1, H, W) label map is not a score map: argmax over its one channel made every pixel class 0.
    with pytest.raises(ValueError, match=r"\(2, H, W\) scores, got \(1, 2, 2\)"):
        evaluator.update(np.ones((1, 2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="no labeled"):
        evaluator.compute()


def test_classes_sharing_a_name_keep_their_own_results():
    evaluator = SemanticEvaluator(3, class_names=["wall", "wall", "sky"])
    evaluator.update(np.array([[0, 1, 2, 2]]), np.array([[0, 0, 1, 2]]))
    per_class = evaluator.compute()["per_class"]
    assert per_class == {
        "wall (0)": {"IoU": 50.0, "ACC": 50.0},
        "wall (1)": {"IoU": 0.0, "ACC": 0.0},
        "sky": {"IoU": 50.0, "ACC": 100.0},
    }


def test_a_state_of_another_class_count_is_refused():
    """A (1, 1) confusion matrix was broadcast over every cell: each class gained the other state's count."""
    evaluator = SemanticEvaluator(3)
    with pytest.raises(ValueError, match=r"confusion matrix of shape \(1, 1\), expected \(3, 3\)"):
        evaluator.merge_state({"confusion": [[5]]})
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 3\)"):
        evaluator.merge_state(SemanticEvaluator(2).get_state())
    assert evaluator.get_state() == SemanticEvaluator(3).get_state()


def test_keys_stay_unique_when_a_name_looks_like_a_generated_key():
    from m2f.evaluation.arrays import per_class_keys

    assert per_class_keys(["wall", "wall", "sky"], [3, 7, 9]) == ["wall (3)", "wall (7)", "sky"]
    # "wall (1)" is both the second wall's key and the third class's name: every class gets its id.
    assert per_class_keys(["wall", "wall", "wall (1)"], [0, 1, 2]) == ["wall (0)", "wall (1)", "wall (1) (2)"]


def test_fwiou_weights_by_ground_truth_pixels():
    evaluator = SemanticEvaluator(2)
    evaluator.update(np.array([[0, 0, 1, 1]]), np.array([[0, 0, 0, 1]]))
    results = evaluator.compute()
    # class 0: TP 2, gt 3, pred 2 -> IoU 2/3; class 1: TP 1, gt 1, pred 2 -> IoU 1/2.
    # Weighted by the ground-truth counts (3, 1): (3 * 2/3 + 1 * 1/2) / 4 = 0.625 (by the predicted counts
    # (2, 2) it would be (2 * 2/3 + 2 * 1/2) / 4 = 0.583).
    assert results["per_class"]["0"]["IoU"] == pytest.approx(200 / 3)
    assert results["per_class"]["1"]["IoU"] == pytest.approx(50.0)
    assert results["fwIoU"] == pytest.approx(62.5)


def test_image_count_travels_with_the_state():
    """num_images counts updates, and merged states add theirs (the evaluation in parts and processes)."""
    first, second, merged = SemanticEvaluator(2), SemanticEvaluator(2), SemanticEvaluator(2)
    for _ in range(3):
        first.update(np.zeros((2, 2)), np.zeros((2, 2)))
    second.update(np.ones((2, 2)), np.ones((2, 2)))
    for evaluator in (first, second):
        merged.merge_state(json.loads(json.dumps(evaluator.get_state())))
    assert (first.compute()["num_images"], merged.compute()["num_images"]) == (3, 4)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match=r"state\['num_images'\] must be an int >= 0"):
            SemanticEvaluator(2).merge_state({**first.get_state(), "num_images": bad})

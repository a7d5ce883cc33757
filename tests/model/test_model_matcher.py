"""HungarianMatcher against costs written out with grid_sample and a brute-force assignment search."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from m2f.losses import HungarianMatcher


def sample(maps, coords):
    """maps (N, H, W), coords (P, 2) in [0, 1] (x, y) -> (N, P), bilinear, align_corners=False, zero padding."""
    grid = (2 * coords - 1)[None, None].expand(maps.shape[0], 1, -1, 2)
    return F.grid_sample(maps[:, None].double(), grid.double(), align_corners=False)[:, 0, 0]


def loop_cost(pred_logits, pred_masks, labels, masks, coords, w_class, w_mask, w_dice):
    """The matcher's cost, one (query, target) pair at a time."""
    probs = pred_logits.double().softmax(-1)
    pred_points = sample(pred_masks, coords)
    target_points = sample(masks.double(), coords)
    cost = torch.zeros(pred_masks.shape[0], masks.shape[0], dtype=torch.float64)
    for q in range(pred_masks.shape[0]):
        for t in range(masks.shape[0]):
            x, y = pred_points[q], target_points[t]
            ce = F.binary_cross_entropy_with_logits(x, y)
            p = x.sigmoid()
            dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            cost[q, t] = -w_class * probs[q, labels[t]] + w_mask * ce + w_dice * dice
    return cost


def brute_force_min(cost):
    """Minimum total cost over all injective maps of targets to queries."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), num_targets)
    )


def random_case(generator, num_queries=5, num_targets=3, num_classes=4, size=(12, 10)):
    pred_logits = torch.randn(num_queries, num_classes + 1, generator=generator) * 2
    pred_masks = torch.randn(num_queries, size[0] // 2, size[1] // 2, generator=generator) * 3
    labels = torch.randint(0, num_classes, (num_targets,), generator=generator)
    masks = torch.rand(num_targets, *size, generator=generator) > 0.5
    return pred_logits, pred_masks, labels, masks


def test_cost_matrix_matches_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    pred_logits, pred_masks, labels, masks = random_case(g)
    coords = torch.rand(64, 2, generator=g)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    cost = matcher.cost_matrix(pred_logits, pred_masks, labels, masks, coords)
    expected = loop_cost(pred_logits, pred_masks, labels, masks, coords, 2.0, 5.0, 5.0)
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)


def test_many_targets_are_made_floating_a_few_at_a_time():
    """More targets than TARGETS_PER_SAMPLE: the cost is the loop's, and no floating copy of all the
    full-resolution target masks is made (Mask2Former's matcher makes one: 200 MB for 50 masks of 1024^2)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from m2f.losses import matcher as matcher_module

    g = torch.Generator().manual_seed(0)
    num_targets = 2 * matcher_module.TARGETS_PER_SAMPLE + 3
    pred_logits, pred_masks, labels, masks = random_case(
        g, num_queries=7, num_targets=num_targets, size=(64, 48)
    )
    coords = torch.rand(50, 2, generator=g)
    largest = []

    class LargestFloatOutput(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    largest.append(t.numel())
            return out

    matcher = HungarianMatcher(num_points=50)
    with LargestFloatOutput():
        cost = matcher.cost_matrix(pred_logits, pred_masks, labels, masks, coords)
    assert max(largest) <= matcher_module.TARGETS_PER_SAMPLE * 64 * 48 < masks.numel()
    expected = loop_cost(pred_logits, pred_masks, labels, masks, coords, 2.0, 5.0, 5.0)
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_targets", [1, 3, 5])
def test_assignment_is_optimal_against_brute_force(num_targets):
    g = torch.Generator().manual_seed(num_targets)
    cases = [random_case(g, num_queries=5, num_targets=num_targets) for _ in range(2)]
    outputs = {
        "pred_logits": torch.stack([c[0] for c in cases]),
        "pred_masks": torch.stack([c[1] for c in cases]),
    }
    targets = [{"labels": c[2], "masks": c[3]} for c in cases]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    indices = matcher(outputs, targets, generator=torch.Generator().manual_seed(7))

    replay = torch.Generator().manual_seed(
        7
    )  # the matcher draws one (P, 2) set of points per image, in order
    for (query_idx, target_idx), case in zip(indices, cases):
        coords = torch.rand(50, 2, generator=replay)
        cost = loop_cost(*case, coords, 2.0, 5.0, 5.0)
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert len(query_idx) == num_targets
        assert sorted(target_idx.tolist()) == list(range(num_targets))
        assert len(set(query_idx.tolist())) == num_targets
        total = cost[query_idx, target_idx].sum().item()
        assert total == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_several_predictions_are_each_matched_optimally_with_one_host_copy(host_copies):
    """match_predictions draws each prediction's points in turn (image after image) and assigns each optimally;
    the cost matrices of all predictions and images reach the host in one copy."""
    g = torch.Generator().manual_seed(11)
    cases = [random_case(g, num_queries=5, num_targets=num) for num in (3, 2)]
    targets = [{"labels": c[2], "masks": c[3]} for c in cases]
    targets.insert(1, {"labels": cases[0][2][:0], "masks": cases[0][3][:0]})  # an image without targets
    predictions = [
        {
            "pred_logits": torch.randn(3, 5, 5, generator=g) * 2,
            "pred_masks": torch.randn(3, 5, 6, 5, generator=g) * 3,
        }
        for _ in range(3)
    ]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=40)
    indices = matcher.match_predictions(predictions, targets, generator=torch.Generator().manual_seed(5))
    assert len(host_copies) == 1

    replay = torch.Generator().manual_seed(5)
    assert len(indices) == len(predictions)
    for prediction, image_indices in zip(predictions, indices):
        assert image_indices[1][0].numel() == 0 and image_indices[1][1].numel() == 0
        for b in (0, 2):
            coords = torch.rand(40, 2, generator=replay)
            case = (
                prediction["pred_logits"][b],
                prediction["pred_masks"][b],
                targets[b]["labels"],
                targets[b]["masks"],
            )
            cost = loop_cost(*case, coords, 2.0, 5.0, 5.0)
            query_idx, target_idx = image_indices[b]
            assert sorted(target_idx.tolist()) == list(range(len(targets[b]["labels"])))
            assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_a_prediction_of_another_batch_size_is_refused_naming_it():
    """Every prediction (here the second, a decoder layer's) must have one image per target dict."""
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}] * 2
    fits = {"pred_logits": torch.zeros(2, 3, 4), "pred_masks": torch.zeros(2, 3, 4, 4)}
    too_many = {"pred_logits": torch.zeros(3, 3, 4), "pred_masks": torch.zeros(3, 3, 4, 4)}
    with pytest.raises(ValueError, match=r"got 2 targets for a batch of 3 \(prediction 1\)"):
        HungarianMatcher(num_points=8).match_predictions([fits, too_many], targets)


def test_no_predictions_give_no_matches():
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    assert HungarianMatcher(num_points=8).match_predictions([], targets) == []


def test_more_targets_than_queries_and_empty_targets():
    g = torch.Generator().manual_seed(3)
    pred_logits, pred_masks, labels, masks = random_case(g, num_queries=2, num_targets=4)
    outputs = {"pred_logits": torch.stack([pred_logits] * 2), "pred_masks": torch.stack([pred_masks] * 2)}
    targets = [
        {"labels": labels, "masks": masks},
        {"labels": labels[:0], "masks": masks[:0]},
    ]
    indices = HungarianMatcher(num_points=32)(outputs, targets)
    assert len(indices[0][0]) == 2 and len(set(indices[0][1].tolist())) == 2
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0


def test_class_cost_alone_picks_the_most_confident_query():
    # Two targets of classes 1 and 2; query 3 is sure of class 1, query 0 of class 2.
    pred_logits = torch.full((4, 4), -5.0)
    pred_logits[3, 1] = 5.0
    pred_logits[0, 2] = 5.0
    outputs = {"pred_logits": pred_logits[None], "pred_masks": torch.zeros(1, 4, 3, 3)}
    targets = [{"labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 6, 6, dtype=torch.bool)}]
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=8)
    ((query_idx, target_idx),) = matcher(outputs, targets)
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 3, 1: 0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=0)
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)
    matcher = HungarianMatcher(num_points=8)
    outputs = {"pred_logits": torch.zeros(2, 3, 3), "pred_masks": torch.zeros(2, 3, 4, 4)}
    with pytest.raises(ValueError, match="targets"):
        matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 8, 8)}])
    outputs["pred_logits"][0, 1, 2] = float("nan")
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}] * 2
    with pytest.raises(FloatingPointError, match="image 0"):
        matcher(outputs, targets)


def test_smaller_target_masks_are_padded_as_the_loss_pads_them():
    """An image whose target masks are smaller than the batch's largest is matched on its masks zero-padded at
    the bottom and right (as the mask losses see them), not stretched over the prediction."""
    masks = torch.full((2, 2, 8, 8), -8.0)
    masks[:, 0, :4, :4] = 8.0  # query 0: the top-left quadrant of the 32 x 32 padded frame
    masks[:, 1] = 8.0  # query 1: everything
    outputs = {"pred_logits": torch.zeros(2, 2, 3), "pred_masks": masks}
    quadrant = torch.zeros(1, 32, 32, dtype=torch.bool)
    quadrant[:, :16, :16] = True
    small = torch.ones(1, 16, 16, dtype=torch.bool)  # the same object in an image of 16 x 16
    targets = [
        {"labels": torch.tensor([0]), "masks": quadrant},
        {"labels": torch.tensor([0]), "masks": small},
    ]
    matcher = HungarianMatcher(1.0, 5.0, 5.0, num_points=500)
    indices = matcher(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert [query.tolist() for query, _ in indices] == [[0], [0]]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_costs_are_sampled_in_float32_under_autocast(backend):
    """Under bfloat16 autocast, the costs of bfloat16 mask logits are those of the same logits in float32 (the
    PyTorch backend's matrix products included)."""
    generator = torch.Generator().manual_seed(4)
    pred_logits, pred_masks, labels, masks = random_case(generator)
    pred_masks = pred_masks.bfloat16()
    coords = torch.rand(50, 2, generator=generator)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=50, backend=backend)
    expected = matcher.cost_matrix(pred_logits, pred_masks.float(), labels, masks, coords)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher.cost_matrix(pred_logits, pred_masks, labels, masks, coords)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_smaller_target_masks_are_padded_at_the_bottom_right():
    """One query per quadrant of the 32 x 32 batch frame: the 16 x 16 image's full mask, padded at the bottom and
    right, is the top-left quadrant (query 0); padded at the top or left it would be another quadrant's."""
    masks = torch.full((2, 4, 8, 8), -8.0)
    masks[:, 0, :4, :4] = 8.0  # query 0: top left
    masks[:, 1, 4:, 4:] = 8.0  # query 1: bottom right
    masks[:, 2, :4, 4:] = 8.0  # query 2: top right
    masks[:, 3, 4:, :4] = 8.0  # query 3: bottom left
    outputs = {"pred_logits": torch.zeros(2, 4, 3), "pred_masks": masks}
    bottom_right = torch.zeros(1, 32, 32, dtype=torch.bool)
    bottom_right[:, 16:, 16:] = True
    small = torch.ones(1, 16, 16, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([0]), "masks": bottom_right},
        {"labels": torch.tensor([0]), "masks": small},
    ]
    matcher = HungarianMatcher(1.0, 5.0, 5.0, num_points=500)
    indices = matcher(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert [query.tolist() for query, _ in indices] == [[1], [0]]

"""Criterion against an unfused computation (grid_sample, explicit sums) with the same matches and points."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import m2f_kernels
from m2f.config import get_config
from m2f.losses import Criterion, HungarianMatcher, build_criterion

NUM_CLASSES = 3


def make_batch(
    generator, batch=2, queries=6, layers=2, mask_size=(8, 8), image_size=(32, 32), targets_per_image=(2, 3)
):
    def prediction():
        return {
            "pred_logits": torch.randn(
                batch, queries, NUM_CLASSES + 1, generator=generator, requires_grad=True
            ),
            "pred_masks": (torch.randn(batch, queries, *mask_size, generator=generator) * 2).requires_grad_(
                True
            ),
        }

    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(layers)]
    targets = []
    for num in targets_per_image:
        targets.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (num,), generator=generator),
                "masks": torch.rand(num, *image_size, generator=generator) > 0.6,
            }
        )
    return outputs, targets


def spy_on(monkeypatch, criterion):
    """Records the matches and the loss points the criterion uses, without changing them."""
    calls = {"indices": [], "coords": []}
    real_match = criterion.matcher.match_predictions
    real_sample = m2f_kernels.sample_uncertain_points

    def match(predictions, targets, generator=None):
        indices = real_match(predictions, targets, generator)
        calls["indices"].extend(indices)
        return indices

    def sample(*args, **kwargs):
        coords = real_sample(*args, **kwargs)
        calls["coords"].append(coords)
        return coords

    monkeypatch.setattr(criterion.matcher, "match_predictions", match)
    monkeypatch.setattr(m2f_kernels, "sample_uncertain_points", sample)
    return calls


def unfused_layer_losses(prediction, targets, indices, coords, num_masks, no_object_weight):
    """Unweighted (ce, mask, dice) of one prediction, written out in float64."""
    logits = prediction["pred_logits"].double()
    batch, queries, _ = logits.shape
    ce_sum, weight_sum = 0.0, 0.0
    for b in range(batch):
        matched = dict(zip(indices[b][0].tolist(), indices[b][1].tolist()))
        for q in range(queries):
            label = targets[b]["labels"][matched[q]].item() if q in matched else NUM_CLASSES
            weight = no_object_weight if label == NUM_CLASSES else 1.0
            ce_sum += -weight * logits[b, q].log_softmax(-1)[label]
            weight_sum += weight
    mask_ce, dice = 0.0, 0.0
    row = 0
    for b in range(batch):
        for q, t in zip(indices[b][0].tolist(), indices[b][1].tolist()):
            grid = (2 * coords[row].double() - 1)[None, None]
            x = F.grid_sample(
                prediction["pred_masks"][b, q][None, None].double(), grid, align_corners=False
            ).flatten()
            y = F.grid_sample(
                targets[b]["masks"][t][None, None].double(), grid, align_corners=False
            ).flatten()
            mask_ce = mask_ce + F.binary_cross_entropy_with_logits(x, y)
            p = x.sigmoid()
            dice = dice + 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            row += 1
    return ce_sum / weight_sum, mask_ce / num_masks, dice / num_masks


def make_criterion(num_points=40, deep_supervision=True):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return Criterion(
        NUM_CLASSES,
        matcher,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        deep_supervision=deep_supervision,
    )


def test_weighted_losses_match_unfused_computation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    outputs, targets = make_batch(g)
    criterion = make_criterion()
    calls = spy_on(monkeypatch, criterion)
    losses = criterion(outputs, targets)

    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    num_masks = 5.0
    predictions = [outputs, *outputs["aux_outputs"]]
    assert len(calls["indices"]) == len(calls["coords"]) == 3
    for i, (prediction, suffix) in enumerate(zip(predictions, ["", "_0", "_1"])):
        indices, coords = calls["indices"][i], calls["coords"][i]
        assert coords.shape == (5, 40, 2)
        ce, mask, dice = unfused_layer_losses(prediction, targets, indices, coords, num_masks, 0.1)
        torch.testing.assert_close(losses[f"loss_ce{suffix}"].double(), 2.0 * ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[f"loss_mask{suffix}"].double(), 5.0 * mask, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[f"loss_dice{suffix}"].double(), 5.0 * dice, rtol=1e-5, atol=1e-6)


def test_the_cost_matrices_of_every_layer_reach_the_host_in_one_copy(host_copies):
    """Three predictions of two images: one device-to-host copy (it waits for the GPU), not six."""
    outputs, targets = make_batch(torch.Generator().manual_seed(0))
    criterion = make_criterion()
    criterion(outputs, targets)
    # the (prediction, image) cost matrices, 6 queries x 2 and 3 targets, together
    assert host_copies == [(3 * (6 * 2 + 6 * 3),)]


def test_outside_the_matcher_a_criterion_call_reads_the_device_once(host_reads, monkeypatch):
    """For the targets' value ranges (labels, 0/1 masks), with three predictions of two images and float masks;
    the mask count of one process is not read back, nor the matched pairs. (The matcher copies its costs to
    the host once, test_the_cost_matrices_of_every_layer_reach_the_host_in_one_copy, and works there.)"""
    outputs, targets = make_batch(torch.Generator().manual_seed(0))
    criterion = make_criterion()
    real_match = criterion.matcher.match_predictions

    def match_uncounted(*args, **kwargs):
        before = len(host_reads)
        indices = real_match(*args, **kwargs)
        del host_reads[before:]
        return indices

    monkeypatch.setattr(criterion.matcher, "match_predictions", match_uncounted)
    # point_mask_loss checks the values of float targets on the CPU only; on a GPU it does not read them.
    monkeypatch.setattr("m2f_kernels.ops.point_mask_loss.check_unit_interval", lambda name, tensor: None)
    criterion(outputs, [{**t, "masks": t["masks"].float()} for t in targets])
    assert host_reads == ["tolist"]


def test_matched_pairs_of_several_predictions_in_one_copy(monkeypatch):
    """Image, query and target index (counting the batch's targets) per pair, image after image, for each
    prediction, moved to the device by one Tensor.to."""
    from m2f.losses.criterion import matched_pairs

    long = lambda *values: torch.tensor(values, dtype=torch.int64)
    all_indices = [
        [
            (long(4, 1), long(0, 2)),
            (
                long(
                    3,
                ),
                long(
                    1,
                ),
            ),
        ],
        [(long(), long()), (long(0, 5), long(1, 0))],
    ]
    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or real_to(self, *a, **k))
    first, second = matched_pairs(all_indices, [3, 2], torch.device("cpu"))
    assert len(calls) == 1
    assert first.tolist() == [[0, 0, 1], [4, 1, 3], [0, 2, 4]]
    assert second.tolist() == [[1, 1], [0, 5], [4, 3]]
    assert matched_pairs([], [3, 2], torch.device("cpu")) == []


def test_more_targets_than_queries_match_unfused_computation(monkeypatch):
    """Some targets unmatched (2 queries, 3 targets): the matched targets are gathered in matching order."""
    g = torch.Generator().manual_seed(3)
    outputs, targets = make_batch(g, queries=2, layers=0, targets_per_image=(3, 1))
    criterion = make_criterion()
    calls = spy_on(monkeypatch, criterion)
    losses = criterion(outputs, targets)
    (indices,), (coords,) = calls["indices"], calls["coords"]
    ce, mask, dice = unfused_layer_losses(outputs, targets, indices, coords, 4.0, 0.1)
    torch.testing.assert_close(losses["loss_ce"].double(), 2.0 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_mask"].double(), 5.0 * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_dice"].double(), 5.0 * dice, rtol=1e-5, atol=1e-6)


def test_every_layer_keeps_the_one_copy_of_the_targets():
    """With every target matched, the layers' mask losses share one copy of the batch's targets for their
    backward instead of a gathered copy each (1 GB over 10 layers at 2 x 50 masks of 1024 x 1024)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    outputs, targets = make_batch(g, layers=4)
    target_shape = (5, 32, 32)
    copies = []

    class TargetCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.bool and tuple(out.shape) == target_shape:
                copies.append(func)
            return out

    with TargetCopies():
        losses = make_criterion()(outputs, targets)
    assert len(copies) == 1  # the batch's targets, concatenated once
    sum(losses.values()).backward()


def test_gradients_match_unfused_computation(monkeypatch):
    g = torch.Generator().manual_seed(1)
    outputs, targets = make_batch(g, layers=0)
    criterion = make_criterion()
    calls = spy_on(monkeypatch, criterion)
    sum(criterion(outputs, targets).values()).backward()
    grad_logits, grad_masks = outputs["pred_logits"].grad.clone(), outputs["pred_masks"].grad.clone()

    leaves = {k: outputs[k].detach().double().requires_grad_(True) for k in ("pred_logits", "pred_masks")}
    ce, mask, dice = unfused_layer_losses(leaves, targets, calls["indices"][0], calls["coords"][0], 5.0, 0.1)
    (2.0 * ce + 5.0 * mask + 5.0 * dice).backward()
    torch.testing.assert_close(grad_logits.double(), leaves["pred_logits"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_masks.double(), leaves["pred_masks"].grad, rtol=1e-4, atol=1e-6)


def test_points_are_importance_sampled_with_configured_counts(monkeypatch):
    g = torch.Generator().manual_seed(2)
    outputs, targets = make_batch(g, layers=0)
    criterion = make_criterion(num_points=100)
    seen = {}
    real_sample = m2f_kernels.sample_uncertain_points

    def sample(mask_logits, num_points, oversample_ratio, importance_ratio, **kwargs):
        seen.update(
            shape=tuple(mask_logits.shape), num_points=num_points, ratios=(oversample_ratio, importance_ratio)
        )
        assert not mask_logits.requires_grad
        return real_sample(mask_logits, num_points, oversample_ratio, importance_ratio, **kwargs)

    monkeypatch.setattr(m2f_kernels, "sample_uncertain_points", sample)
    criterion(outputs, targets)
    assert seen == {"shape": (5, 8, 8), "num_points": 100, "ratios": (3.0, 0.75)}


def test_no_targets_gives_zero_mask_losses_and_no_object_ce():
    g = torch.Generator().manual_seed(3)
    outputs, targets = make_batch(g, layers=1, targets_per_image=(0, 0))
    losses = make_criterion()(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice_0"].item() == 0
    expected_ce = F.cross_entropy(
        outputs["pred_logits"].detach().flatten(0, 1), torch.full((12,), NUM_CLASSES)
    )
    torch.testing.assert_close(losses["loss_ce"], 2.0 * expected_ce)
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None


def test_no_targets_in_float16_gives_zero_mask_losses():
    """Float16 mask logits whose sum overflows float16 (a real background: every logit about -20): the mask
    losses of a batch without targets are still 0, not NaN, and float32."""
    outputs = {
        "pred_logits": torch.randn(2, 100, NUM_CLASSES + 1).half(),
        "pred_masks": torch.full((2, 100, 64, 64), -20.0, dtype=torch.float16, requires_grad=True),
    }
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 256, 256)}] * 2
    losses = make_criterion(deep_supervision=False)(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_mask"].dtype == torch.float32 and torch.isfinite(losses["loss_ce"])


@pytest.mark.parametrize("logits", ["one infinite", "all 1e38"])
def test_no_targets_with_huge_mask_logits_gives_zero_mask_losses(logits):
    """Nothing matched, nothing to lose, whatever the logits: an infinite logit, or finite ones whose float32
    sum overflows, used to give NaN (sum * 0) mask losses, and the trainer stopped on them."""
    pred_masks = torch.full((2, 100, 8, 8), 1e38)
    if logits == "one infinite":
        pred_masks.zero_()[0, 0, 0, 0] = math.inf
    pred_masks.requires_grad_()
    outputs = {"pred_logits": torch.randn(2, 100, NUM_CLASSES + 1), "pred_masks": pred_masks}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32)}] * 2
    losses = make_criterion(deep_supervision=False)(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert torch.equal(pred_masks.grad, torch.zeros_like(pred_masks))


def test_deep_supervision_off_ignores_aux_outputs():
    g = torch.Generator().manual_seed(4)
    outputs, targets = make_batch(g, layers=2)
    losses = make_criterion(deep_supervision=False)(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def test_build_criterion_uses_config_weights():
    config = get_config("panoptic-r50")
    criterion = build_criterion(config)
    assert criterion.num_classes == 133
    assert criterion.empty_weight[-1].item() == pytest.approx(0.1)
    assert criterion.empty_weight[:-1].eq(1).all()
    assert (criterion.class_weight, criterion.mask_weight, criterion.dice_weight) == (2.0, 5.0, 5.0)
    assert criterion.num_points == criterion.matcher.num_points == 12544
    assert (criterion.oversample_ratio, criterion.importance_sample_ratio) == (3.0, 0.75)
    assert build_criterion(config, num_classes=7).num_classes == 7


def test_bad_targets():
    g = torch.Generator().manual_seed(5)
    outputs, targets = make_batch(g, layers=0)
    criterion = make_criterion()
    with pytest.raises(ValueError, match="targets"):
        criterion(outputs, targets[:1])
    targets[1]["labels"] = torch.tensor([0, 1, NUM_CLASSES])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\]"):
        criterion(outputs, targets)
    targets[1]["labels"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        criterion(outputs, targets)
    targets[1]["labels"] = torch.tensor([0.0, 1.0, 2.0])
    with pytest.raises(TypeError, match=r"targets\[1\]\['labels'\] must be integer class indices"):
        criterion(outputs, targets)
    empty = {"pred_logits": outputs["pred_logits"][:0], "pred_masks": outputs["pred_masks"][:0]}
    with pytest.raises(ValueError, match="targets is empty"):  # was "max() arg is an empty sequence"
        criterion(empty, [])
    # No points made the mask and dice losses 0, so training went on without them.
    with pytest.raises(ValueError, match="num_points must be a positive int, got 0"):
        Criterion(NUM_CLASSES, criterion.matcher, num_points=0)
    # True was taken as 1 class or 1 point.
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        Criterion(True, criterion.matcher)
    with pytest.raises(ValueError, match="num_points must be a positive int, got True"):
        HungarianMatcher(num_points=True)
    assert HungarianMatcher(num_points=np.int64(7)).num_points == 7


def test_masks_must_be_bool_or_zero_one_values():
    """A 0/255 uint8 mask gave negative losses; 0/1 masks in any real dtype give the bool masks' losses."""
    outputs, targets = make_batch(torch.Generator().manual_seed(5), layers=0)
    criterion = make_criterion()
    torch.manual_seed(0)
    expected = criterion(outputs, targets)
    for dtype in (torch.uint8, torch.float32):
        torch.manual_seed(0)
        got = criterion(outputs, [{**t, "masks": t["masks"].to(dtype)} for t in targets])
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], msg=f"{dtype} {name}")
    images = [{**t, "masks": t["masks"].to(torch.uint8) * 255} for t in targets]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must be bool or hold values in \[0, 1\]"):
        criterion(outputs, images)


def test_any_integer_label_dtype_and_default_dtype_give_the_same_losses():
    """int32 labels (as many datasets store them) and a float64 default dtype leave the losses unchanged."""
    outputs, targets = make_batch(torch.Generator().manual_seed(6), layers=0)
    criterion = make_criterion()
    torch.manual_seed(0)
    expected = criterion(outputs, targets)
    int32_targets = [{**t, "labels": t["labels"].int()} for t in targets]
    torch.manual_seed(0)
    got = criterion(outputs, int32_targets)
    # uint8 labels indexed the matcher's class probabilities as a boolean mask: other costs, other matches.
    uint8_targets = [{**t, "labels": t["labels"].to(torch.uint8)} for t in targets]
    torch.manual_seed(0)
    got_uint8 = criterion(outputs, uint8_targets)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        under_float64 = criterion(outputs, targets)
    finally:
        torch.set_default_dtype(default_dtype)
    for name, value in expected.items():
        assert torch.equal(got[name], value) and torch.equal(got_uint8[name], value), name
        torch.testing.assert_close(under_float64[name].float(), value.float(), rtol=1e-6, atol=1e-6)


def test_float64_predictions_give_float64_losses_that_pass_gradcheck():
    """The class loss was computed in float32 whatever the logits' dtype (gradcheck saw float32 rounding)."""
    outputs, targets = make_batch(
        torch.Generator().manual_seed(7),
        batch=1,
        queries=3,
        layers=0,
        mask_size=(5, 4),
        targets_per_image=(2,),
    )
    logits = outputs["pred_logits"].detach().double().requires_grad_()
    masks = outputs["pred_masks"].detach().double().requires_grad_()
    criterion = make_criterion(num_points=12)

    def losses(logits, masks):
        torch.manual_seed(0)  # the same points at every call
        values = criterion({"pred_logits": logits, "pred_masks": masks}, targets)
        return tuple(values[name] for name in sorted(values))

    assert [value.dtype for value in losses(logits, masks)] == [torch.float64] * 3
    assert torch.autograd.gradcheck(losses, (logits, masks))


def num_masks_worker(rank, store_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        counts = [2, 5][rank]
        targets = [{"labels": torch.zeros(counts, dtype=torch.int64), "masks": torch.zeros(counts, 4, 4)}]
        value = Criterion.average_num_masks(targets, torch.device("cpu"))
        torch.save(torch.tensor(value), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_num_masks_is_averaged_over_processes(tmp_path):
    store = str(tmp_path / "store")
    mp.spawn(num_masks_worker, args=(store, str(tmp_path / "num_masks")), nprocs=2, join=True)
    values = [torch.load(tmp_path / f"num_masks.{rank}", weights_only=True).item() for rank in range(2)]
    assert values == [3.5, 3.5]
    assert Criterion.average_num_masks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0


def test_smaller_target_masks_are_padded_at_the_bottom_right(monkeypatch):
    """Targets of 32 x 32 and 24 x 20 in one batch: the losses are those of the smaller image's masks zero-padded
    at the bottom and right to 32 x 32 by hand (the predictions cover the padded batch frame)."""
    g = torch.Generator().manual_seed(8)
    outputs, targets = make_batch(g, layers=1)
    targets[1]["masks"] = targets[1]["masks"][:, :24, :20].clone()
    criterion = make_criterion()
    calls = spy_on(monkeypatch, criterion)
    losses = criterion(outputs, targets)

    padded = torch.zeros(3, 32, 32, dtype=torch.bool)
    padded[:, :24, :20] = targets[1]["masks"]
    padded_targets = [targets[0], {"labels": targets[1]["labels"], "masks": padded}]
    for i, (prediction, suffix) in enumerate(zip([outputs, *outputs["aux_outputs"]], ["", "_0"])):
        indices, coords = calls["indices"][i], calls["coords"][i]
        ce, mask, dice = unfused_layer_losses(prediction, padded_targets, indices, coords, 5.0, 0.1)
        torch.testing.assert_close(losses[f"loss_ce{suffix}"].double(), 2.0 * ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[f"loss_mask{suffix}"].double(), 5.0 * mask, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[f"loss_dice{suffix}"].double(), 5.0 * dice, rtol=1e-5, atol=1e-6)

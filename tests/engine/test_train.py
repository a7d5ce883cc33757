import csv
import json
import math
import random

import engine_standins
import numpy as np
import pytest
import safetensors.torch
import torch
from engine_standins import TinyNet, collate_tiny, first_step_gradients, make_trainer, tiny_criterion
from torch import nn

from m2f.engine import checkpoint as ckpt
from m2f.engine.train import CsvLog, LRSchedule, StreamBatchSampler, TrainSettings, build_param_groups
from m2f.losses.criterion import Criterion
from m2f.losses.matcher import HungarianMatcher


def test_param_groups_follow_mask2former_rules():
    model = TinyNet()
    groups = {g["name"]: g for g in build_param_groups(model, 1e-4, 0.05, 0.1)}
    by_param = {id(p): g for g in groups.values() for p in g["params"]}
    expected = {  # name -> (lr, weight decay), written out by hand
        "backbone.0.weight": (1e-5, 0.05),
        "backbone.0.bias": (1e-5, 0.05),
        "backbone.1.weight": (1e-5, 0.0),
        "backbone.1.bias": (1e-5, 0.0),
        "query.weight": (1e-4, 0.0),
        "head.weight": (1e-4, 0.05),
        "head.bias": (1e-4, 0.05),
        "head_norm.weight": (1e-4, 0.0),
        "head_norm.bias": (1e-4, 0.0),
    }
    named = dict(model.named_parameters())
    assert set(named) == set(expected)
    for name, (lr, decay) in expected.items():
        group = by_param[id(named[name])]
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == decay, name
    assert sum(len(g["params"]) for g in groups.values()) == len(expected)


def test_only_norm_layers_get_the_norm_weight_decay_in_mask2former():
    """In the real model, the parameters of norm layers (GroupNorm, LayerNorm, BatchNorm) and only those get
    weight_decay_norm; e.g. the pixel decoder's convolutions followed by a GroupNorm keep the weight decay."""
    import m2f

    model = m2f.build_model("demo-tiny", backend="torch")
    groups = build_param_groups(model, 1e-4, 0.05, 0.1, weight_decay_norm=0.0, weight_decay_embed=0.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    embedding_names = ("relative_position_bias_table", "absolute_pos_embed")
    checked = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding) or name in embedding_names or not param.requires_grad:
                continue
            assert decay[id(param)] == (0.0 if isinstance(module, norm_types) else 0.05), (module, name)
            checked += 1
    lateral = model.pixel_decoder.lateral_convs[0]
    assert decay[id(lateral.weight)] == 0.05 and decay[id(lateral.norm.weight)] == 0.0
    assert checked > 50


def test_step_schedule_drops_at_90_and_95_percent():
    schedule = LRSchedule(TrainSettings(max_iters=100))
    factors = [schedule.factor(i) for i in (0, 89, 90, 94, 95, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_poly_schedule_with_warmup():
    settings = TrainSettings(
        max_iters=10, lr_schedule="poly", poly_power=2.0, warmup_iters=4, warmup_factor=0.5
    )
    schedule = LRSchedule(settings)
    assert schedule.factor(0) == pytest.approx(0.5)
    assert schedule.factor(2) == pytest.approx((1 - 0.2) ** 2 * 0.75)
    assert schedule.factor(5) == pytest.approx(0.25)


def test_settings_from_solver_scale_the_steps():
    from m2f.config import get_config

    settings = TrainSettings.from_solver(get_config("panoptic-r50").solver, max_iters=1000)
    assert settings.lr_steps == (900, 950)
    assert settings.clip_grad_norm == 0.01 and settings.backbone_lr_multiplier == 0.1


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="max_iters"):
        TrainSettings(max_iters=0)
    with pytest.raises(ValueError, match="amp"):
        TrainSettings(max_iters=1, amp="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        StreamBatchSampler(10, batch_size=6, grad_accum_steps=4, rank=0, world_size=1, seed=0)
    # clip_grad_norm_ with a norm of 0 zeroes every gradient, with a negative one reverses it.
    for clip in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            TrainSettings(max_iters=1, clip_grad_norm=clip)
    assert TrainSettings(max_iters=1, clip_grad_norm=None).clip_grad_norm is None
    for name, value in (("seed", -1), ("seed", 1.5), ("backbone_lr_multiplier", -0.1), ("lr_gamma", 0.0)):
        with pytest.raises(ValueError, match=name):
            TrainSettings(max_iters=1, **{name: value})
    # True counted as 1 iteration and a fractional eval_period or warmup_iters was taken; numpy ints are ints.
    for name, value, expected in (
        ("max_iters", True, "a positive int, got True"),
        ("log_period", 2.0, "a positive int, got 2.0"),
        ("eval_period", 2.5, "a non-negative int, got 2.5"),
        ("warmup_iters", -1, "a non-negative int, got -1"),
        ("num_workers", False, "a non-negative int, got False"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be {expected}"):
            TrainSettings(**{"max_iters": 1, name: value})
    settings = TrainSettings(max_iters=np.int64(5), seed=np.int32(3))
    assert (settings.max_iters, settings.seed) == (5, 3) and type(settings.max_iters) is int
    # An infinite lr wrote NaN weights and stopped on a "non-finite loss"; a NaN one failed inside torch.
    for name in ("base_lr", "weight_decay", "backbone_lr_multiplier", "weight_decay_norm", "lr_gamma"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                TrainSettings(max_iters=1, **{name: value})


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_global_batch_does_not_depend_on_ranks_or_accumulation():
    single = take(StreamBatchSampler(10, 8, 1, 0, 1, seed=3), 3)
    for accum, world in ((2, 1), (1, 2), (2, 2), (4, 2)):
        per_rank = [take(StreamBatchSampler(10, 8, accum, r, world, seed=3), 3 * accum) for r in range(world)]
        for step in range(3):
            merged = [s for a in range(accum) for r in range(world) for s in per_rank[r][step * accum + a]]
            assert merged == single[step]
    positions = [p for batch in single for p, _ in batch]
    assert positions == list(range(24))
    first_epoch = [i for batch in single for _, i in batch][:10]
    assert sorted(first_epoch) == list(range(10))
    resumed = take(StreamBatchSampler(10, 8, 1, 0, 1, seed=3, start_iteration=2), 1)
    assert resumed[0] == single[2]


def read_weights(path):
    return safetensors.torch.load_file(str(path))


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    reference = make_trainer(tmp_path / "full").train()

    calls = {"n": 0}

    def crashing_criterion(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 5:  # inside iteration 5; the last checkpoint is after iteration 3
            raise KeyboardInterrupt
        return tiny_criterion(outputs, targets)

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", criterion=crashing_criterion).train()
    assert ckpt.find_last_checkpoint(tmp_path / "run").name == "model_0000003.safetensors"
    resumed = make_trainer(tmp_path / "run", resume=True)
    assert resumed.start_iteration == 3
    final = resumed.train()

    expected, got = read_weights(reference), read_weights(final)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    state_full = ckpt.load_training_state(tmp_path / "full" / "model_0000006.safetensors")
    state_run = ckpt.load_training_state(tmp_path / "run" / "model_0000006.safetensors")
    for index, param_state in state_full["optimizer"]["state"].items():
        for key, value in param_state.items():
            torch.testing.assert_close(state_run["optimizer"]["state"][index][key], value, rtol=0, atol=1e-6)
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    with (tmp_path / "full" / "metrics.csv").open() as f:
        full_rows = list(csv.DictReader(f))
    assert [float(r["total_loss"]) for r in rows] == pytest.approx(
        [float(r["total_loss"]) for r in full_rows]
    )
    assert {"total_loss", "loss_mse", "loss_l1", "lr", "time"} <= set(rows[0])
    # max_iters 6: both steps at int(0.9 * 6) = int(0.95 * 6) = 5 iterations done; the head's lr is logged
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2] * 5 + [1e-4])


def test_evaluation_does_not_change_the_training(tmp_path):
    """An evaluation that draws from every global RNG (torch, python, numpy) leaves the run as it is without
    it, so a run resumed from a checkpoint written just before an evaluation stays exact."""

    def evaluate_fn(model):
        torch.randn(3)
        random.random()
        np.random.rand()  # noqa: NPY002
        return {"score": 1.0}

    plain = make_trainer(tmp_path / "plain").train()
    evaluated = make_trainer(tmp_path / "evaluated", eval_period=2)
    evaluated.evaluate_fn = evaluate_fn
    final = evaluated.train()
    expected, got = read_weights(plain), read_weights(final)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_resume_with_fewer_iterations_than_the_checkpoint_is_refused(tmp_path):
    make_trainer(tmp_path / "run").train()  # 6 iterations
    with pytest.raises(ValueError, match=r"model_0000006\.safetensors is at iteration 6, past max_iters 3"):
        make_trainer(tmp_path / "run", max_iters=3, resume=True)
    assert make_trainer(tmp_path / "run", resume=True).start_iteration == 6  # a finished run resumes as done


@pytest.mark.parametrize("kind", ["step", "poly"])
def test_resume_with_more_iterations_follows_the_new_schedule(tmp_path, kind, capsys):
    """A run of 3 iterations resumed with max_iters 6 trains with the learning rates of a 6-iteration run
    (the step schedule's drops move to 90 and 95 % of 6; poly decays to 6), not the first run's."""
    straight = make_trainer(tmp_path / "straight", lr_schedule=kind)
    straight.train()
    make_trainer(tmp_path / "extended", lr_schedule=kind, max_iters=3).train()
    resumed = make_trainer(tmp_path / "extended", lr_schedule=kind, resume=True)
    assert "max_iters 3 -> 6" in capsys.readouterr().out
    resumed.train()
    rates = {}
    for run in ("straight", "extended"):
        with (tmp_path / run / "metrics.csv").open() as f:
            rates[run] = {int(r["iteration"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert list(rates["extended"]) == [1, 2, 3, 4, 5, 6]
    expected = [1e-2 * straight.schedule.factor(i - 1) for i in (4, 5, 6)]
    assert [rates["straight"][i] for i in (4, 5, 6)] == pytest.approx(expected)
    assert [rates["extended"][i] for i in (4, 5, 6)] == pytest.approx(expected)


def test_evaluation_interrupted_at_a_checkpoint_runs_on_resume(tmp_path):
    """A run stopped while evaluating the checkpoint of iteration 3 evaluates it first when resumed: eval.csv
    gets every row, and the weights are those of an uninterrupted run."""
    calls = []

    def evaluate_fn(model):
        calls.append(len(calls))
        return {"call": float(len(calls))}

    def interrupted_evaluate_fn(model):
        raise KeyboardInterrupt

    uninterrupted = make_trainer(tmp_path / "full", eval_period=3)
    uninterrupted.evaluate_fn = evaluate_fn
    expected = read_weights(uninterrupted.train())
    interrupted = make_trainer(tmp_path / "run", eval_period=3)
    interrupted.evaluate_fn = interrupted_evaluate_fn
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = make_trainer(tmp_path / "run", eval_period=3, resume=True)
    resumed.evaluate_fn = evaluate_fn
    got = read_weights(resumed.train())
    with (tmp_path / "run" / "eval.csv").open() as f:
        assert [int(row["iteration"]) for row in csv.DictReader(f)] == [3, 6]
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    resumed_again = make_trainer(tmp_path / "run", eval_period=3, max_iters=9, resume=True)
    assert not resumed_again._missing_evaluation(CsvLog(tmp_path / "run" / "eval.csv", 6))


def test_resume_says_when_the_data_stream_changes(tmp_path, capsys):
    make_trainer(tmp_path, max_iters=3).train()
    make_trainer(tmp_path, resume=True)
    assert "data seed" not in capsys.readouterr().out
    make_trainer(tmp_path, resume=True, seed=7, batch_size=2)
    printed = capsys.readouterr().out
    assert "data seed than the checkpoint's: 0 -> 7" in printed
    assert "another batch size" in printed and "from sample 6" in printed


def test_resume_says_when_the_configuration_or_the_step_settings_change(tmp_path, capsys):
    """A resumed run with another crop size, dataset, precision or accumulation is no exact continuation;
    such changes used to pass without a word."""
    config = {"solver": {"image_size": 64, "lr": 1e-4}, "num_queries": 100}
    metadata = {"config": json.dumps(config), "dataset": "coco_panoptic"}
    make_trainer(tmp_path, max_iters=3, metadata=metadata).train()
    make_trainer(tmp_path, resume=True, metadata=metadata)
    printed = capsys.readouterr().out
    assert "another configuration" not in printed and "other step settings" not in printed
    config["solver"]["image_size"] = 96
    changed = {"config": json.dumps(config), "dataset": "ade20k"}
    make_trainer(tmp_path, resume=True, metadata=changed, amp="bf16", grad_accum_steps=2)
    printed = capsys.readouterr().out
    assert "config.solver.image_size 64 -> 96" in printed and "dataset coco_panoptic -> ade20k" in printed
    assert "lr" not in printed.split("configuration than the checkpoint's")[1].splitlines()[0]
    assert "amp None -> bf16" in printed and "grad_accum_steps 1 -> 2" in printed


def test_elapsed_time_goes_on_after_a_resume(tmp_path):
    make_trainer(tmp_path, max_iters=3).train()
    make_trainer(tmp_path, max_iters=6, resume=True).train()
    with open(tmp_path / "metrics.csv", newline="") as f:
        elapsed = [float(row["elapsed"]) for row in csv.DictReader(f)]
    assert len(elapsed) == 6 and elapsed == sorted(elapsed), elapsed


def test_seeds_beyond_32_bits_are_refused_up_front():
    """A seed of 2**64 failed at the first batch with "Overflow when unpacking long long"; one just below
    2**64 failed epochs later."""
    TrainSettings(max_iters=1, seed=2**32 - 1)
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*32"):
        TrainSettings(max_iters=1, seed=2**32)


def test_each_rank_draws_training_random_numbers_from_its_own_seed(tmp_path, monkeypatch):
    """Rank r's training RNG starts at seed + r (as detectron2 seeds its ranks): with one seed for all, every
    rank of a DDP run drew the same sampled points and dropout masks."""
    from m2f.engine import distributed

    draws = {}
    for rank in (0, 1, 3):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        make_trainer(tmp_path / f"rank_{rank}", seed=7)
        draws[rank] = torch.rand(8)
    for rank, drawn in draws.items():
        torch.manual_seed(7 + rank)
        assert torch.equal(drawn, torch.rand(8)), rank


def test_a_fresh_run_in_a_used_folder_is_not_resumed_from_the_old_one(tmp_path, capsys):
    """A run started without resume in a folder of an earlier run, stopped before its first checkpoint,
    resumes from iteration 0, not from the earlier run's last checkpoint."""
    make_trainer(tmp_path, max_iters=3).train()
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000003.safetensors"
    calls = {"n": 0}

    def crashing_criterion(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2:  # iteration 2, before the first checkpoint (after iteration 3)
            raise KeyboardInterrupt
        return tiny_criterion(outputs, targets)

    fresh = make_trainer(tmp_path, criterion=crashing_criterion)
    assert "--resume will no longer continue from model_0000003.safetensors" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        fresh.train()
    assert ckpt.find_last_checkpoint(tmp_path) is None
    assert make_trainer(tmp_path, resume=True).start_iteration == 0


def test_poly_schedule_ends_at_zero():
    schedule = LRSchedule(TrainSettings(max_iters=10, lr_schedule="poly", warmup_iters=0))
    assert schedule.factor(10) == 0.0 and schedule.factor(12) == 0.0


def test_nan_loss_stops_with_iteration_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_criterion(outputs, targets):
        calls["n"] += 1
        losses = tiny_criterion(outputs, targets)
        if calls["n"] == 3:
            losses["loss_mse"] = losses["loss_mse"] * float("nan")
        return losses

    trainer = make_trainer(tmp_path, criterion=nan_criterion, checkpoint_period=1)
    with pytest.raises(FloatingPointError, match=r"iteration 3\b.*model_0000002\.safetensors"):
        trainer.train()
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000002.safetensors"
    assert not (tmp_path / "model_0000003.safetensors").exists()
    ckpt.load_training_state(tmp_path / "model_0000002.safetensors")


def test_nan_predictions_refused_by_the_matcher_stop_like_a_nan_loss(tmp_path):
    """The matcher raises on NaN costs inside forward_backward: the trainer still names the iteration and the
    last good checkpoint, as for a NaN loss."""
    criterion = Criterion(2, HungarianMatcher(num_points=16), num_points=16, deep_supervision=False)
    masks = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    calls = {"n": 0}

    def nan_at_the_third_call(outputs, targets):
        calls["n"] += 1
        pred = outputs["pred"] * (math.nan if calls["n"] == 3 else 1.0)  # (B, 3)
        predictions = {
            "pred_logits": pred[:, None, :],
            "pred_masks": pred[:, :1, None, None].expand(-1, 1, 4, 4),
        }
        return criterion(predictions, [{"labels": torch.tensor([0]), "masks": masks}] * pred.shape[0])

    trainer = make_trainer(tmp_path, criterion=nan_at_the_third_call, checkpoint_period=1)
    with pytest.raises(FloatingPointError, match=r"iteration 3\b.*NaN.*model_0000002\.safetensors"):
        trainer.train()
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000002.safetensors"


class _InfiniteGradient(torch.autograd.Function):
    """0 forward; an infinite gradient backward (a finite loss whose backward overflows)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"), dtype=grad.dtype)


@pytest.mark.parametrize("amp, clip", [(None, None), (None, 1.0), ("bf16", None), ("fp16", 1.0)])
def test_non_finite_gradients_never_reach_the_weights(tmp_path, amp, clip):
    """A finite loss with infinite gradients at iteration 3: fp16's loss scaling skips the step; without it
    the run stops naming the iteration and the last good checkpoint, before saving anything."""
    calls = {"n": 0}

    def overflowing_criterion(outputs, targets):
        calls["n"] += 1
        losses = tiny_criterion(outputs, targets)
        if calls["n"] == 3:
            losses["loss_mse"] = losses["loss_mse"] + _InfiniteGradient.apply(outputs["pred"])
        return losses

    trainer = make_trainer(
        tmp_path, criterion=overflowing_criterion, checkpoint_period=1, amp=amp, clip_grad_norm=clip
    )
    if amp == "fp16":
        final = trainer.train()
        assert all(torch.isfinite(t).all() for t in read_weights(final).values())
        return
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at iteration 3 .*model_0000002"):
        trainer.train()
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000002.safetensors"
    assert all(torch.isfinite(t).all() for t in trainer.module.state_dict().values())


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """The losses and the largest gradient (checked before the step) reach the host in one read per
    iteration: on a GPU each read waits for the queued work."""
    import sys

    reads = []
    for name in ("cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _real=real, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith("m2f/engine/train.py") and caller.co_name != "index_at":
                reads.append(f"{caller.co_name}: {_name}")  # index_at: the sampler's host permutation
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    make_trainer(tmp_path, max_iters=4, checkpoint_period=100).train()
    assert reads == ["train: tolist"] * 4


def test_huge_finite_gradients_are_not_taken_for_infinite_ones(tmp_path):
    """Gradients of 1e20 (a sum of squares beyond float32) are finite: the step is taken."""

    def huge_gradient_criterion(outputs, targets):
        losses = tiny_criterion(outputs, targets)
        losses["loss_mse"] = losses["loss_mse"] * 1e20
        return losses

    trainer = make_trainer(tmp_path, criterion=huge_gradient_criterion, max_iters=1, base_lr=1e-30)
    assert torch.isfinite(read_weights(trainer.train())["head.weight"]).all()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    whole = first_step_gradients(make_trainer(tmp_path / "a", dropout=0.0))
    accumulated = first_step_gradients(make_trainer(tmp_path / "b", dropout=0.0, grad_accum_steps=2))
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


class MaskCountCriterion(Criterion):
    """Stands in for Criterion's mask losses: a per-image term for each of its target masks, summed and
    divided by num_masks (by default the batch's count, as Criterion does)."""

    def __init__(self):
        nn.Module.__init__(self)

    def forward(self, outputs, targets, num_masks=None):
        if num_masks is None:
            num_masks = self.average_num_masks(targets, outputs["pred"].device)
        errors = torch.stack([((outputs["pred"][b] - t["value"]) ** 2).sum() for b, t in enumerate(targets)])
        counts = torch.tensor([float(len(t["labels"])) for t in targets])
        return {"loss_mask": (counts * errors).sum() / num_masks}


def collate_with_masks(items):
    """collate_tiny, and 0 to 4 target masks per image (image_id * 3 mod 5)."""
    images, targets, infos = collate_tiny(items)
    for target, info in zip(targets, infos):
        target["labels"] = torch.zeros(info["image_id"] * 3 % 5, dtype=torch.int64)
    return images, targets, infos


def test_gradient_accumulation_divides_mask_losses_by_the_whole_steps_masks(tmp_path, monkeypatch):
    """Mask2Former divides the mask losses by the global batch's target masks. Accumulating micro-batches
    divided each by its own count, so an image with 1 mask beside 4 weighed 1/2 instead of 1/5."""
    monkeypatch.setattr(engine_standins, "collate_tiny", collate_with_masks)
    whole = first_step_gradients(make_trainer(tmp_path / "a", dropout=0.0, criterion=MaskCountCriterion()))
    accumulated = first_step_gradients(
        make_trainer(tmp_path / "b", dropout=0.0, criterion=MaskCountCriterion(), grad_accum_steps=2)
    )
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_clipping_bounds_the_update(tmp_path):
    trainer = make_trainer(tmp_path, clip_grad_norm=1e-3)
    first_step_gradients(trainer)
    trainer.optimizer_step(0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.module.parameters()]))
    assert norm <= 1e-3 * (1 + 1e-4)


def test_resumed_log_drops_a_row_cut_short(tmp_path):
    """A crash while a row was appended leaves part of it; the resume rewrites the log without it (a missing
    field read as None, or an iteration cut in two, was kept or raised)."""
    for cut in ("3,0.3", "1"):
        path = tmp_path / "metrics.csv"
        path.write_text(f"iteration,total_loss,lr\n1,0.5,0.1\n2,0.4,0.1\n{cut}")
        log = CsvLog(path, resume_iteration=5)
        assert log.iterations == {1, 2}
        assert path.read_text().splitlines() == ["iteration,total_loss,lr", "1,0.5,0.1", "2,0.4,0.1"]


@pytest.mark.parametrize("left", ["", "iteration,total_lo", "\n"])
def test_resumed_log_without_a_complete_header_starts_afresh(tmp_path, left):
    """The header was written to a new file in a step of its own: a crash in between left an empty or cut
    header, on which every resume failed ('NoneType' object is not iterable) or lost columns."""
    path = tmp_path / "metrics.csv"
    path.write_text(left)
    log = CsvLog(path, resume_iteration=5)
    assert log.iterations == set()
    log.write({"iteration": 6, "total_loss": 0.25, "lr": 0.1})
    assert path.read_text().splitlines() == ["iteration,total_loss,lr", "6,0.25,0.1"]


def test_training_removes_the_temporary_files_a_killed_run_left(tmp_path):
    make_trainer(tmp_path, max_iters=2, checkpoint_period=2).train()
    stale = tmp_path / ".model_0000004.state.pt.w6mx2d2z.tmp"
    stale.write_bytes(b"partial checkpoint")
    other = tmp_path / ".notes.txt.abcdefgh.tmp"
    other.write_bytes(b"not the trainer's")
    make_trainer(tmp_path, max_iters=4, checkpoint_period=2, resume=True).train()
    assert not stale.exists() and other.exists()


def test_new_log_holds_its_header_and_first_row_at_once(tmp_path, monkeypatch):
    import m2f.engine.train as train_module

    path = tmp_path / "metrics.csv"
    writes = []
    real = train_module.write_bytes_atomic
    monkeypatch.setattr(
        train_module, "write_bytes_atomic", lambda p, data: (writes.append(data), real(p, data))
    )
    log = CsvLog(path, resume_iteration=None)
    log.write({"iteration": 1, "total_loss": 0.5})
    log.write({"iteration": 2, "total_loss": 0.4})
    assert writes == [b"iteration,total_loss\r\n1,0.5\r\n"]
    assert path.read_text().splitlines() == ["iteration,total_loss", "1,0.5", "2,0.4"]


def test_resume_with_fp16_of_a_run_saved_without_it(tmp_path, capsys):
    """A bf16/float32 run's disabled GradScaler saves an empty state, which an enabled one refused to load."""
    make_trainer(tmp_path, amp=None, max_iters=2, checkpoint_period=2).train()
    trainer = make_trainer(tmp_path, amp="fp16", max_iters=4, checkpoint_period=2, resume=True)
    assert trainer.start_iteration == 2
    assert "the loss scale starts afresh" in capsys.readouterr().out
    final = trainer.train()
    assert ckpt.load_training_state(final.with_name("model_0000004.safetensors"))["scaler"]["scale"] > 0


def test_auto_amp_is_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs (emulated bf16, no tensor cores)."""
    from m2f.config import get_config
    from m2f.engine.train import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    config = get_config("panoptic-r50")
    assert config.solver.amp
    assert resolve_amp(None, config, torch.device("cuda", 0)) == "fp16"
    assert resolve_amp("bf16", config, torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp(None, config, torch.device("cuda", 0)) == "bf16"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_and_stays_finite(tmp_path, amp):
    final = make_trainer(tmp_path, amp=amp, max_iters=2).train()
    weights = read_weights(final)
    assert all(torch.isfinite(t).all() for t in weights.values())
    if amp == "fp16":
        state = ckpt.load_training_state(tmp_path / "model_0000002.safetensors")
        assert state["scaler"]["scale"] > 0


def test_periodic_evaluation_is_logged(tmp_path):
    seen = []

    def evaluate_fn(model):
        seen.append(model.training)
        return {"score": float(len(seen))}

    trainer = make_trainer(tmp_path, eval_period=2)
    trainer.evaluate_fn = evaluate_fn
    trainer.train()
    assert seen == [False, False, False]
    with (tmp_path / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["iteration"]), float(r["score"])) for r in rows] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert trainer.module.training


def test_iteration_time_leaves_out_evaluation_and_checkpoints(tmp_path):
    """metrics.csv's time is seconds per training iteration: evaluations and checkpoints are left out, also
    those inside a window (at iteration 3 of the window (2, 4])."""
    import time as clock

    def slow_evaluation(model):
        clock.sleep(2.0)
        return {"score": 0.0}

    trainer = make_trainer(tmp_path, eval_period=3, log_period=2, checkpoint_period=3)
    trainer.evaluate_fn = slow_evaluation
    trainer.train()
    with (tmp_path / "metrics.csv").open() as f:
        times = [float(row["time"]) for row in csv.DictReader(f)]
    # With an evaluation in it, a window's time would be over 1 s per iteration; a tiny iteration takes a few
    # hundredths of that, up to 0.2 s on a loaded 2-core machine.
    assert len(times) == 3 and max(times) < 0.8


def test_resume_follows_this_runs_optimizer_settings(tmp_path, capsys):
    """A run resumed with another base_lr and weight decay trains with them (the optimizer state would bring
    the checkpoint's), and says so."""
    make_trainer(tmp_path, max_iters=3).train()
    resumed = make_trainer(tmp_path, resume=True, base_lr=1e-3, weight_decay=0.0, warmup_iters=0)
    assert "resuming with other optimizer settings than the checkpoint's" in capsys.readouterr().out
    multiplier = resumed.settings.backbone_lr_multiplier
    for group in resumed.optimizer.param_groups:
        in_backbone = group["name"].startswith("backbone_")
        assert group["initial_lr"] == pytest.approx(1e-3 * (multiplier if in_backbone else 1.0))
        assert group["weight_decay"] == 0.0
    resumed.train()
    with (tmp_path / "metrics.csv").open() as f:
        logged = {int(row["iteration"]): float(row["lr"]) for row in csv.DictReader(f)}
    assert logged[4] == pytest.approx(1e-3 * resumed.schedule.factor(3))


def test_evaluation_after_the_last_iteration(tmp_path):
    """max_iters 7 with eval_period 3: evaluations after iterations 3, 6 and 7; a run stopped while evaluating
    iteration 7 evaluates it when resumed."""
    seen = []

    def evaluate_fn(model):
        seen.append(1)
        return {"score": float(len(seen))}

    trainer = make_trainer(tmp_path, eval_period=3, max_iters=7)
    trainer.evaluate_fn = evaluate_fn
    trainer.train()
    with (tmp_path / "eval.csv").open() as f:
        assert [int(row["iteration"]) for row in csv.DictReader(f)] == [3, 6, 7]
    resumed = make_trainer(tmp_path, eval_period=3, max_iters=7, resume=True)
    resumed.evaluate_fn = evaluate_fn
    assert resumed._evaluation_due(7) and not resumed._evaluation_due(5)


class _StopAfterDataset(Exception):
    pass


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 3, "grad_accum_steps": 2}, "batch_size 3 must be divisible by grad_accum_steps"),
        ({"batch_size": 0}, "batch_size must be"),  # was taken as "the config's batch size"
        ({"seed": 2**32}, "seed must be below"),
        ({"dataset_kind": "coco_panoptic"}, "dataset_kind must be one of"),  # was a bare KeyError
        ({"backbone_weights": "no-such-file.safetensors"}, "backbone_weights: no such file"),
    ],
)
def test_bad_training_options_are_refused_before_the_data_is_read(monkeypatch, tmp_path, options, message):
    """These were refused after the data had been validated and loaded and the model built, and the batch
    split only after last_checkpoint had been removed: a later --resume started from scratch."""
    from m2f.engine import train

    def data_read(*args, **kwargs):
        raise AssertionError("the data was read before the options were checked")

    monkeypatch.setattr(train, "validate_split", data_read)
    monkeypatch.setattr(train, "build_dataset", data_read)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.run_training("demo-tiny", tmp_path, tmp_path / "out", device="cpu", progress=False, **options)


def test_the_data_workers_end_with_training(tmp_path):
    """The loader's persistent workers outlived train(), as long as the Trainer did (a notebook)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    trainer = make_trainer(tmp_path, max_iters=2, num_workers=2)
    trainer.train()
    assert set(multiprocessing.active_children()) <= before


def test_evaluating_during_training_needs_val_images(tmp_path):
    """With no val image the first evaluation, after eval_period iterations of training, would stop the run."""
    from m2f.data import make_synthetic
    from m2f.engine import train

    make_synthetic(str(tmp_path / "data"), num_train=2, num_val=0, image_size=64)
    with pytest.raises(ValueError, match=r"eval_period 1: the val split of .* has no image to evaluate"):
        train.run_training(
            "demo-tiny", tmp_path / "data", tmp_path / "out", device="cpu", progress=False, eval_period=1
        )
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_a_refused_run_leaves_the_earlier_one_resumable(tmp_path):
    make_trainer(tmp_path, max_iters=3).train()
    with pytest.raises(ValueError, match="must be divisible"):
        make_trainer(tmp_path, batch_size=3, grad_accum_steps=2)
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000003.safetensors"


@pytest.mark.parametrize(
    "config_name, expected", [("semantic-ade20k-r50", "SemanticAugmentation"), ("panoptic-r50", "LSJ")]
)
def test_training_augmentation_follows_the_task(monkeypatch, tmp_path, config_name, expected):
    """Semantic configs train with Mask2Former's ADE20K recipe (crop with the category-area limit), the others
    with large-scale jitter."""
    from m2f.engine import train

    seen = {}

    def capture(kind, data_root, split, transforms=None, seed=0):
        seen["transforms"] = transforms
        raise _StopAfterDataset

    monkeypatch.setattr(train, "build_dataset", capture)
    with pytest.raises(_StopAfterDataset):
        train.run_training(
            config_name, tmp_path, tmp_path / "out", device="cpu", progress=False, validate=False
        )
    assert type(seen["transforms"]).__name__ == expected


def test_ddp_on_gpus_synchronizes_the_batch_norm_layers(monkeypatch, capsys):
    """Mask2Former's "SyncBN": under DDP on GPUs a trainable BatchNorm normalizes over the batches of all
    processes. The conversion needs no GPU: the model stays on the CPU, only the device type is given."""
    from m2f.engine import train
    from m2f.models import build_model

    def batch_norms(model):
        return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    model = build_model("demo-tiny")
    parameters, keys = dict(model.named_parameters()), list(model.state_dict())
    assert batch_norms(model) and not any(isinstance(m, nn.SyncBatchNorm) for m in batch_norms(model))
    assert train.synchronize_batch_norm(model, torch.device("cuda")) is model  # one process
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in batch_norms(model))

    monkeypatch.setattr(train.dist_utils, "is_distributed", lambda: True)
    converted = train.synchronize_batch_norm(model, torch.device("cuda"))
    assert all(isinstance(m, nn.SyncBatchNorm) for m in batch_norms(converted))
    assert list(converted.state_dict()) == keys  # checkpoints keep their keys
    assert all(p is parameters[name] for name, p in converted.named_parameters())  # the optimizer's tensors
    assert capsys.readouterr().out == ""

    on_cpu = build_model("demo-tiny")
    assert train.synchronize_batch_norm(on_cpu, torch.device("cpu")) is on_cpu
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in batch_norms(on_cpu))
    assert "BatchNorm layers normalize over each process's part of the batch" in capsys.readouterr().out
    with torch.device("meta"):
        frozen = build_model("panoptic-r50")
    assert train.synchronize_batch_norm(frozen, torch.device("cuda")) is frozen and not batch_norms(frozen)

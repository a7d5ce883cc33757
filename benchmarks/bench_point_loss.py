"""Point-sampled mask losses (DESIGN.md 2.3): the fused point_mask_loss, pairwise_mask_cost and the
uncertainty sampler, each against the unfused Mask2Former computation in the same run.

GPU: batch 2 x 50 matched masks = 100 masks, mask logits 256 x 256, targets 1024 x 1024 (bool), 12,544 points;
pairwise cost at Q=100, T=50, P=12,544. CPU: the same per-mask sizes with 8 masks (and Q=100, T=20) for the
CPU kernels against the same baseline.

    pytest benchmarks/bench_point_loss.py -s
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels
from benchmarks.harness import compulsory_bytes
from m2f_kernels import available_backends

NUM_POINTS = 12544
GPU_SHAPE = {
    "masks": 100,
    "logits": (256, 256),
    "targets": (1024, 1024),
    "queries": 100,
    "targets_per_image": 50,
}
CPU_SHAPE = {
    "masks": 8,
    "logits": (256, 256),
    "targets": (1024, 1024),
    "queries": 100,
    "targets_per_image": 20,
}


def _shape(device: torch.device) -> dict:
    return GPU_SHAPE if device.type == "cuda" else CPU_SHAPE


def _kernel_backends(device: torch.device) -> list[str]:
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [name for name in wanted if name in available_backends()]


def _loss_inputs(device: torch.device, dtype: torch.dtype = torch.float32):
    shape = _shape(device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape["masks"], *shape["logits"], generator=generator) * 4
    targets = torch.rand(shape["masks"], *shape["targets"], generator=generator) > 0.5
    coords = torch.rand(shape["masks"], NUM_POINTS, 2, generator=generator)
    logits = logits.to(device=device, dtype=dtype).requires_grad_()
    return logits, targets.to(device), coords.to(device)


def mask2former_point_loss(logits, targets, coords, num_masks):
    """The unfused computation of Mask2Former's SetCriterion.loss_masks (grid_sample + BCE + dice)."""
    targets = targets.to(logits)
    grid = 2.0 * coords.unsqueeze(2) - 1.0
    point_logits = (
        F.grid_sample(logits.unsqueeze(1), grid.to(logits), align_corners=False).squeeze(1).squeeze(-1)
    )
    point_labels = (
        F.grid_sample(targets.unsqueeze(1), grid.to(logits), align_corners=False).squeeze(1).squeeze(-1)
    )
    ce = (
        F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum()
        / num_masks
    )
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
    return ce, dice


def mask2former_pairwise_cost(pred_point_logits, target_point_labels):
    """Mask2Former's batch_sigmoid_ce_loss and batch_dice_loss (matcher costs)."""
    num_points = pred_point_logits.shape[1]
    positive = F.binary_cross_entropy_with_logits(
        pred_point_logits, torch.ones_like(pred_point_logits), reduction="none"
    )
    negative = F.binary_cross_entropy_with_logits(
        pred_point_logits, torch.zeros_like(pred_point_logits), reduction="none"
    )
    ce = torch.einsum("nc,mc->nm", positive, target_point_labels)
    ce = (ce + torch.einsum("nc,mc->nm", negative, 1 - target_point_labels)) / num_points
    probs = pred_point_logits.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", probs, target_point_labels)
    denominator = probs.sum(-1)[:, None] + target_point_labels.sum(-1)[None, :]
    return ce, 1 - (numerator + 1) / (denominator + 1)


def mask2former_uncertain_points(logits, num_points, oversample_ratio=3.0, importance_ratio=0.75):
    """Mask2Former's get_uncertain_point_coords_with_randomness (all masks' candidates at once)."""
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_sampled, 2, device=logits.device)
    sampled = F.grid_sample(logits.unsqueeze(1), 2 * candidates.unsqueeze(1) - 1, align_corners=False)
    uncertainty = -sampled[:, 0, 0].abs()
    num_uncertain = int(importance_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(num_masks, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def _sum_losses(losses):
    ce, dice = losses
    return ce + dice


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_point_mask_loss(bench, device, mode):
    logits, targets, coords = _loss_inputs(device)
    num_masks = float(logits.shape[0])
    params = {**_shape(device), "points": NUM_POINTS, "dtype": "float32", "targets_dtype": "bool"}
    repeats = 10 if device.type == "cuda" else 3
    baseline = bench.run(
        "point_mask_loss",
        "mask2former_unfused",
        lambda: _sum_losses(mask2former_point_loss(logits, targets, coords, num_masks)),
        mode=mode,
        grad_inputs=[logits],
        device=device,
        repeats=repeats,
        params=params,
    )
    for backend in _kernel_backends(device):
        ours = bench.run(
            "point_mask_loss",
            f"fused_{backend}",
            lambda backend=backend: _sum_losses(
                m2f_kernels.point_mask_loss(logits, targets, coords, num_masks, backend=backend)
            ),
            mode=mode,
            grad_inputs=[logits],
            device=device,
            repeats=repeats,
            params=params,
        )
        print(
            f"point_mask_loss {mode} {backend}: {baseline.median_ms / ours.median_ms:.2f}x the unfused loss"
        )


def test_pairwise_mask_cost(bench, device):
    shape = _shape(device)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape["queries"], NUM_POINTS, generator=generator) * 4).to(device)
    labels = (
        (torch.rand(shape["targets_per_image"], NUM_POINTS, generator=generator) > 0.5).float().to(device)
    )
    params = {"queries": shape["queries"], "targets": shape["targets_per_image"], "points": NUM_POINTS}
    # Compulsory traffic: the logits and labels read once, the two float32 (Q, T) cost matrices written.
    moved = compulsory_bytes((logits, labels), 2 * logits.shape[0] * labels.shape[0] * 4)
    baseline = bench.run(
        "pairwise_mask_cost",
        "mask2former_unfused",
        lambda: mask2former_pairwise_cost(logits, labels),
        mode="forward",
        device=device,
        params=params,
        bytes_moved=moved,
    )
    for backend in _kernel_backends(device):
        ours = bench.run(
            "pairwise_mask_cost",
            f"fused_{backend}",
            lambda backend=backend: m2f_kernels.pairwise_mask_cost(logits, labels, backend=backend),
            mode="forward",
            device=device,
            params=params,
            bytes_moved=moved,
        )
        print(f"pairwise_mask_cost {backend}: {baseline.median_ms / ours.median_ms:.2f}x the unfused costs")


def test_sample_uncertain_points(bench, device):
    shape = _shape(device)
    logits = (torch.randn(shape["masks"], *shape["logits"]) * 4).to(device)
    params = {**shape, "points": NUM_POINTS}
    bench.run(
        "sample_uncertain_points",
        "mask2former",
        lambda: mask2former_uncertain_points(logits, NUM_POINTS),
        mode="forward",
        device=device,
        params=params,
    )
    bench.run(
        "sample_uncertain_points",
        "m2f_kernels",
        lambda: m2f_kernels.sample_uncertain_points(logits, NUM_POINTS),
        mode="forward",
        device=device,
        params=params,
    )

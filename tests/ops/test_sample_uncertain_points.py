"""sample_uncertain_points: Mask2Former's importance sampling by uncertainty -|logit|, checked statistically."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import m2f_kernels
from m2f_kernels.ops import sample_uncertain_points as sampler_module

NUM_POINTS = 2000


def half_plane_logits(num_masks=3, size=64):
    """Logit 0 (most uncertain) where x < 0.5, 20 elsewhere."""
    logits = torch.full((num_masks, size, size), 20.0)
    logits[:, :, : size // 2] = 0.0
    return logits


def mask2former_uncertain_points(logits, num_points, oversample_ratio, importance_ratio, generator):
    """Mask2Former's get_uncertain_point_coords_with_randomness, written out with grid_sample."""
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_sampled, 2, generator=generator)
    sampled = F.grid_sample(logits[:, None], 2 * candidates[:, None] - 1, align_corners=False)[:, 0, 0]
    num_uncertain = int(importance_ratio * num_points)
    top = (-sampled.abs()).topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(num_masks, num_points - num_uncertain, 2, generator=generator)
    return torch.cat([chosen, uniform], dim=1)


def test_importance_fraction_and_uniform_rest():
    logits = half_plane_logits()
    generator = torch.Generator().manual_seed(1234)
    coords = m2f_kernels.sample_uncertain_points(logits, NUM_POINTS, 3.0, 0.75, generator=generator)
    num_uncertain = int(0.75 * NUM_POINTS)
    assert coords.shape == (3, NUM_POINTS, 2) and coords.dtype == torch.float32
    # Points whose bilinear logit is exactly 0 lie left of the last zero column's centre, 31.5 / 64.
    exact_zero_region = coords[..., 0] < 31.5 / 64
    # About 3 * 2000 * 0.49 ~ 2950 candidates per mask have logit 0, more than the 1500 uncertain points.
    assert exact_zero_region[:, :num_uncertain].all()
    rest = coords[:, num_uncertain:].reshape(-1, 2)
    for axis in range(2):
        assert stats.kstest(rest[:, axis].numpy(), "uniform").pvalue > 1e-3
    # Overall fraction in the region: importance_ratio + (1 - importance_ratio) * area.
    expected = 0.75 + 0.25 * 31.5 / 64
    observed = exact_zero_region.float().mean().item()
    area = 31.5 / 64
    num_random = 3 * (NUM_POINTS - num_uncertain)
    std = (num_random * area * (1 - area)) ** 0.5 / (3 * NUM_POINTS)
    assert abs(observed - expected) < 5 * std


def test_distribution_matches_mask2former_algorithm():
    # A smooth uncertainty: the logit is 0 on the line x = 0.3 and grows away from it.
    x = (torch.arange(48) + 0.5) / 48
    logits = ((x - 0.3) * 25).expand(4, 40, 48).contiguous()
    ours = m2f_kernels.sample_uncertain_points(
        logits, 1000, 3.0, 0.75, generator=torch.Generator().manual_seed(1)
    )
    theirs = mask2former_uncertain_points(logits, 1000, 3.0, 0.75, torch.Generator().manual_seed(2))
    for part in (slice(0, 750), slice(750, 1000)):
        for axis in range(2):
            a = ours[:, part, axis].reshape(-1).numpy()
            b = theirs[:, part, axis].reshape(-1).numpy()
            assert stats.ks_2samp(a, b).pvalue > 1e-3


def test_reproducible_with_generator_and_chunked(monkeypatch):
    logits = torch.randn(5, 16, 12)
    first = m2f_kernels.sample_uncertain_points(logits, 100, generator=torch.Generator().manual_seed(7))
    second = m2f_kernels.sample_uncertain_points(logits, 100, generator=torch.Generator().manual_seed(7))
    other = m2f_kernels.sample_uncertain_points(logits, 100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # With one mask per chunk, every point of a mask still comes from that mask's own candidates.
    monkeypatch.setattr(sampler_module, "_CANDIDATES_PER_CHUNK", 1)
    chunked = m2f_kernels.sample_uncertain_points(half_plane_logits(4, 32), 64, generator=torch.Generator())
    assert (chunked[:, :48, 0] < 15.5 / 32).all()
    assert ((chunked >= 0) & (chunked < 1)).all()


@pytest.mark.parametrize(
    ("num_points", "oversample_ratio", "importance_ratio"),
    [(1, 3.0, 0.75), (12544, 3.0, 0.75), (10, 1.0, 1.0)],
)
def test_shapes_and_ranges(num_points, oversample_ratio, importance_ratio):
    logits = torch.randn(2, 9, 7, dtype=torch.float64)
    coords = m2f_kernels.sample_uncertain_points(logits, num_points, oversample_ratio, importance_ratio)
    assert coords.shape == (2, num_points, 2) and coords.dtype == torch.float64
    assert ((coords >= 0) & (coords < 1)).all()


def test_no_masks_and_no_gradient():
    assert m2f_kernels.sample_uncertain_points(torch.randn(0, 4, 4), 10).shape == (0, 10, 2)
    logits = torch.randn(2, 4, 4, requires_grad=True)
    assert not m2f_kernels.sample_uncertain_points(logits, 10).requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_logits"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 1, 4, 4), 10)
    with pytest.raises(TypeError, match="mask_logits"):
        m2f_kernels.sample_uncertain_points(torch.zeros(2, 4, 4, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="num_points"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), -1)
    with pytest.raises(ValueError, match="num_points must be a non-negative int, got True"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), True)
    # A numpy int was refused as "num_points must be a non-negative int, got 4".
    assert m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), np.int64(4)).shape == (2, 4, 2)
    with pytest.raises(ValueError, match="oversample_ratio"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_ratio"):
        m2f_kernels.sample_uncertain_points(torch.randn(2, 4, 4), 10, importance_ratio=1.5)


def test_compiles_with_a_dynamic_mask_count():
    """The chunk loop over the mask count and torch.rand(..., generator=None) failed under
    torch.compile(fullgraph=True, dynamic=True)."""
    compiled = torch.compile(
        lambda logits: m2f_kernels.sample_uncertain_points(logits, 400),
        fullgraph=True,
        dynamic=True,
        backend="eager",
    )
    for num_masks in (2, 3):
        coords = compiled(half_plane_logits(num_masks))
        assert coords.shape == (num_masks, 400, 2)
        assert ((coords >= 0) & (coords <= 1)).all()
        assert (coords[:, :300, 0] < 31.5 / 64).all()  # the most uncertain 75 % come from the zero half


@pytest.mark.cuda
def test_cuda_generator_reproducible_and_fraction():
    logits = half_plane_logits().cuda()
    first = m2f_kernels.sample_uncertain_points(
        logits, NUM_POINTS, generator=torch.Generator("cuda").manual_seed(3)
    )
    second = m2f_kernels.sample_uncertain_points(
        logits, NUM_POINTS, generator=torch.Generator("cuda").manual_seed(3)
    )
    assert torch.equal(first, second)
    assert (first[:, : int(0.75 * NUM_POINTS), 0] < 31.5 / 64).all()


@pytest.mark.parametrize(
    "backend", [b for b in ("torch", "cpu", "triton") if b in m2f_kernels.available_backends()]
)
def test_every_backend_draws_the_same_points(backend):
    """backend picks point_sample's backend: every one chooses the same points from the same draws."""
    logits = torch.randn(3, 16, 12)
    expected = m2f_kernels.sample_uncertain_points(logits, 50, generator=torch.Generator().manual_seed(1))
    got = m2f_kernels.sample_uncertain_points(
        logits, 50, generator=torch.Generator().manual_seed(1), backend=backend
    )
    torch.testing.assert_close(got.sort(dim=1).values, expected.sort(dim=1).values)
    for importance_ratio in (0.75, 0.0):  # also when no point_sample call would see it
        with pytest.raises(ValueError, match="backend must be one of"):
            m2f_kernels.sample_uncertain_points(logits, 50, importance_ratio=importance_ratio, backend="gpu")


def test_uncertainty_is_ranked_in_float32():
    """bfloat16 logits, or float32 ones under bfloat16 autocast, give the points of the same logits in float32
    (16-bit sampled values would reorder near-ties)."""
    logits = (torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()

    def points(values):
        drawn = m2f_kernels.sample_uncertain_points(values, 200, generator=torch.Generator().manual_seed(0))
        return drawn.sort(dim=1).values

    expected = points(logits.float())
    assert torch.equal(points(logits), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(points(logits.float()), expected)

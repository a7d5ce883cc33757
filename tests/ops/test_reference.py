"""The PyTorch references against independent computations: plain loops, grid_sample, dense formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels
from m2f_kernels import reference
from m2f_kernels.reference.bilinear import bilinear_sample


def loop_bilinear(image, x, y):
    """image (H, W, C) float64; pixel coordinates x, y as Python floats -> (C,), the convention by hand."""
    height, width, channels = image.shape
    out = torch.zeros(channels, dtype=torch.float64)
    if not (-1 < x < width and -1 < y < height):
        return out
    x0, y0 = math.floor(x), math.floor(y)
    for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= cx < width and 0 <= cy < height:
            weight = (1 - abs(x - cx)) * (1 - abs(y - cy))
            out += weight * image[cy, cx]
    return out


def random_levels(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cumsum(sizes, 0) - sizes


def msda_inputs(batch=2, queries=3, heads=2, channels=3, shapes=((3, 5), (2, 2)), points=2, spread=1.4):
    spatial_shapes, starts = random_levels(shapes)
    total = int(spatial_shapes.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, total, heads, channels, dtype=torch.float64)
    locations = (
        torch.rand(batch, queries, heads, levels, points, 2, dtype=torch.float64) * spread - (spread - 1) / 2
    )
    weights = torch.rand(batch, queries, heads, levels, points, dtype=torch.float64)
    return value, spatial_shapes, starts, locations, weights


def test_ms_deform_attn_matches_loops():
    value, shapes, starts, locations, weights = msda_inputs()
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # image border
    locations[0, 1, 0, 0, 0] = torch.tensor([0.5 / 5, 1.5 / 3])  # exactly on a pixel centre
    locations[1, 2, 1, 1, 1] = torch.tensor([float("nan"), 0.5])
    out = reference.ms_deform_attn(value, shapes, starts, locations, weights)
    batch, queries, heads, _, points, _ = locations.shape
    channels = value.shape[-1]
    expected = torch.zeros(batch, queries, heads, channels, dtype=torch.float64)
    for n in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level, (height, width) in enumerate(shapes.tolist()):
                    start = int(starts[level])
                    image = value[n, start : start + height * width, m].reshape(height, width, channels)
                    for p in range(points):
                        loc_x, loc_y = locations[n, q, m, level, p].tolist()
                        sample = loop_bilinear(image, loc_x * width - 0.5, loc_y * height - 0.5)
                        expected[n, q, m] += weights[n, q, m, level, p] * sample
    torch.testing.assert_close(out, expected.reshape(batch, queries, heads * channels))


def test_ms_deform_attn_matches_grid_sample():
    """mmcv's multi_scale_deformable_attn_pytorch formulation (grid_sample, zeros, align_corners=False)."""
    value, shapes, starts, locations, weights = msda_inputs(batch=2, queries=5, heads=3, channels=4, points=3)
    batch, queries, heads, levels, points, _ = locations.shape
    channels = value.shape[-1]
    per_level = value.split(shapes.prod(1).tolist(), dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes.tolist()):
        image = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Q, L*P)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    expected = (stacked * w).sum(-1).view(batch, heads * channels, queries).transpose(1, 2)
    out = reference.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out, expected)


def test_ms_deform_attn_fused_matches_explicit_softmax():
    value, shapes, starts, _, _ = msda_inputs(points=3)
    batch, queries, heads, levels, points = 2, 3, 2, 2, 3
    reference_points = torch.rand(batch, queries, levels, 2, dtype=torch.float64)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, dtype=torch.float64)
    logits = torch.randn(batch, queries, heads, levels * points, dtype=torch.float64)
    wh = shapes.flip(-1).double()
    locations = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    expected = reference.ms_deform_attn(
        value, shapes, starts, locations, weights.view(batch, queries, heads, levels, points)
    )
    out = reference.ms_deform_attn_fused(value, shapes, starts, reference_points, offsets, logits)
    torch.testing.assert_close(out, expected)


def test_point_sample_matches_grid_sample_and_loops():
    image = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, dtype=torch.float64) * 1.4 - 0.2
    coords[0, 0] = torch.tensor([0.0, 0.0])
    coords[0, 1] = torch.tensor([1.0, 1.0])
    out = reference.point_sample(image, coords)
    expected = F.grid_sample(image, 2 * coords[:, :, None] - 1, align_corners=False).squeeze(-1)
    torch.testing.assert_close(out, expected)
    x, y = coords[1, 4].tolist()
    torch.testing.assert_close(
        out[1, :, 4], loop_bilinear(image[1].permute(1, 2, 0), x * 7 - 0.5, y * 5 - 0.5)
    )


def test_samples_read_no_pixel_outside_their_cell():
    """A corner outside the image was read at a clamped pixel and multiplied by 0: a NaN or inf there turned
    samples that never touch it into NaN. grid_sample's zero padding reads nothing."""
    image = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(1, 1, 3, 4)
    image[0, 0, 0, 0], image[0, 0, 2, 3] = math.nan, math.inf
    # Far outside, just outside the far corner, inside away from both, and on the NaN pixel's cell.
    coords = torch.tensor(
        [[[1.5, 1.5], [-0.8, 0.5], [1.2, 1.2], [0.45, 0.5], [0.1, 0.1]]], dtype=torch.float64
    )
    coords.requires_grad_()
    out = reference.point_sample(image, coords)
    expected = F.grid_sample(image, 2 * coords.detach()[:, :, None] - 1, align_corners=False).squeeze(-1)
    torch.testing.assert_close(out.detach(), expected, equal_nan=True)
    assert out[0, 0, :4].isfinite().all() and out[0, 0, 4].isnan()
    out[0, 0, :4].sum().backward()
    assert coords.grad[0, :4].isfinite().all()


def test_bilinear_sample_in_float16_on_large_images():
    """Pixel indices of a 96 x 80 image pass 2048, beyond float16's exact integers: they must still address
    the right pixels (the sample in float16 matches the float32 one taken at the same float16 locations)."""
    image = torch.randn(1, 96, 80, 2).half()
    x = (torch.rand(1, 500) * 80 - 0.5).half()
    y = (torch.rand(1, 500) * 96 - 0.5).half()
    x[0, 0], y[0, 0] = 79, 95  # the last pixel, index 7679
    out = bilinear_sample(image, x, y)
    expected = bilinear_sample(image.float(), x.float(), y.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_locations_are_turned_into_pixels_in_float32(dtype):
    """A 16-bit location u is exact as given, but u * W - 0.5 rounded to 16 bits moves by pixels in a
    1000-pixel row (bfloat16: 698.72 -> 700). The references, like the kernels, compute it in float32."""
    width = 1000
    u = torch.tensor(0.7, dtype=dtype)
    x = float(u) * width - 0.5
    image = torch.eye(width, dtype=torch.float64)  # channel c is one-hot at pixel c
    expected = loop_bilinear(image.reshape(1, width, width), x, 0.0).to(dtype)
    assert expected.count_nonzero() == 2  # two pixels, neither of them 700
    coords = torch.stack([u, torch.tensor(0.5, dtype=dtype)]).reshape(1, 1, 2)
    sampled = reference.point_sample(image.T.reshape(1, width, 1, width).to(dtype), coords)
    assert torch.equal(sampled.reshape(width), expected)
    value = image.reshape(1, width, 1, width).to(dtype)  # (N, S, M, D), one level of 1 x width
    locations = coords.reshape(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=dtype)
    out = reference.ms_deform_attn(value, *random_levels([[1, width]]), locations, weights)
    assert out.dtype == dtype and torch.equal(out.reshape(width), expected)


def test_fused_offsets_of_a_zero_size_level_get_a_zero_gradient():
    """A zero-size level reads nothing: its offsets do not change the output, and their gradient is 0, not
    the NaN of 0 * (1 / 0)."""
    generator = torch.Generator().manual_seed(3)
    spatial_shapes, starts = random_levels([[0, 3], [2, 2]])
    value = torch.randn(1, 4, 2, 3, dtype=torch.float64, generator=generator)
    reference_points = torch.rand(1, 5, 2, 2, dtype=torch.float64, generator=generator)
    offsets = torch.randn(1, 5, 2, 2, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    logits = torch.randn(1, 5, 2, 6, dtype=torch.float64, generator=generator)
    out = reference.ms_deform_attn_fused(value, spatial_shapes, starts, reference_points, offsets, logits)
    (grad,) = torch.autograd.grad(out.sum(), offsets)
    assert torch.equal(grad[:, :, :, 0], torch.zeros_like(grad[:, :, :, 0]))
    assert grad[:, :, :, 1].abs().sum() > 0


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_masked_attention_matches_loops(threshold):
    batch, heads, queries, keys, dim = 2, 2, 4, 6, 3
    q = torch.randn(batch, heads, queries, dim, dtype=torch.float64)
    k = torch.randn(batch, heads, keys, dim, dtype=torch.float64)
    v = torch.randn(batch, heads, keys, dim, dtype=torch.float64)
    logits = torch.randn(batch, queries, keys, dtype=torch.float64)
    logits[0, 1] = -5.0  # fully blocked row: attends to every key
    logits[1, 2, 3] = float("nan")
    out, probs = reference.masked_attention(q, k, v, mask_logits=logits, threshold=threshold)
    for b in range(batch):
        for h in range(heads):
            for i in range(queries):
                visible = [j for j in range(keys) if 1 / (1 + math.exp(-float(logits[b, i, j]))) >= threshold]
                if not visible:
                    visible = list(range(keys))
                scores = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(dim) for j in visible])
                p = torch.softmax(scores, 0)
                expected = sum(p[n] * v[b, h, j] for n, j in enumerate(visible))
                torch.testing.assert_close(out[b, h, i], expected)
                torch.testing.assert_close(
                    probs[b, h, i, visible].sum(), torch.tensor(1.0, dtype=torch.float64)
                )


def test_masked_attention_bool_mask_matches_sdpa():
    batch, heads, queries, keys, dim = 2, 3, 5, 9, 4
    q, k, v = (torch.randn(batch, heads, n, dim, dtype=torch.float64) for n in (queries, keys, keys))
    blocked = torch.rand(batch * heads, queries, keys) < 0.6
    blocked[0, 0] = True
    out, _ = reference.masked_attention(q, k, v, attn_mask=blocked)
    allowed = ~blocked
    allowed[allowed.sum(-1) == 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.view(batch, heads, queries, keys))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("batch", "keys", "dim"), [(0, 5, 16), (2, 0, 16), (2, 5, 0)], ids=["no-batch", "no-keys", "no-head-dim"]
)
def test_masked_attention_of_empty_inputs(batch, keys, dim):
    """The reference took no empty batch or key set with an attn_mask (a reshape of 0 elements with -1)
    and no empty head dim (0 ** -0.5). Its output, as the public op's, is empty or, with no keys to attend
    to, zeros."""
    q = torch.randn(batch, 2, 3, dim)
    k, v = torch.randn(batch, 2, keys, dim), torch.randn(batch, 2, keys, dim)
    masks = torch.zeros(batch, 3, keys)
    for mask in (
        {"attn_mask": masks.bool()},
        {"attn_mask": masks.bool().repeat(2, 1, 1)},
        {"mask_logits": masks},
    ):
        out, probs = reference.masked_attention(q, k, v, **mask)
        assert probs.shape == (batch, 2, 3, keys)
        assert torch.equal(out, torch.zeros_like(q))
        assert torch.equal(m2f_kernels.masked_attention(q, k, v, backend="torch", **mask), out)


def test_threshold_to_logit_edges():
    assert reference.threshold_to_logit(0.5) == 0.0
    assert reference.threshold_to_logit(0.0) == -math.inf
    assert reference.threshold_to_logit(1.0) == math.inf
    with pytest.raises(ValueError, match="threshold"):
        reference.threshold_to_logit(1.5)


def test_point_mask_loss_matches_mask2former_formulas():
    logits = torch.randn(3, 6, 5, dtype=torch.float64)
    targets = torch.rand(3, 12, 10) > 0.5
    coords = torch.rand(3, 17, 2, dtype=torch.float64)
    ce, dice = reference.point_mask_loss(logits, targets, coords, num_masks=2.5)
    sampled = F.grid_sample(logits[:, None], 2 * coords[:, :, None] - 1, align_corners=False).flatten(1)
    labels = F.grid_sample(
        targets[:, None].double(), 2 * coords[:, :, None] - 1, align_corners=False
    ).flatten(1)
    p = 1 / (1 + torch.exp(-sampled))
    bce = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))
    expected_dice = 1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)
    torch.testing.assert_close(ce, bce.mean(1).sum() / 2.5)
    torch.testing.assert_close(dice, expected_dice.sum() / 2.5)


def test_pairwise_mask_cost_matches_pairs():
    logits = torch.randn(4, 9, dtype=torch.float64)
    labels = (torch.rand(3, 9) > 0.5).double()
    ce, dice = reference.pairwise_mask_cost(logits, labels)
    for i in range(4):
        for j in range(3):
            expected_ce = F.binary_cross_entropy_with_logits(logits[i], labels[j])
            p = logits[i].sigmoid()
            expected_dice = 1 - (2 * (p * labels[j]).sum() + 1) / (p.sum() + labels[j].sum() + 1)
            torch.testing.assert_close(ce[i, j], expected_ce)
            torch.testing.assert_close(dice[i, j], expected_dice)


def test_reference_gradcheck():
    value, shapes, starts, locations, weights = msda_inputs(batch=1, queries=2, heads=2, channels=2, points=2)
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: reference.ms_deform_attn(v, shapes, starts, loc, w), (value, locations, weights)
    )
    q, k, v = (torch.randn(1, 2, n, 3, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5))
    logits = torch.randn(1, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: reference.masked_attention(q, k, v, logits)[0], (q, k, v))
    image = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(2, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.point_sample, (image, coords))
    mask_logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 8, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: reference.point_mask_loss(x, targets, coords.detach(), 2.0), (mask_logits,)
    )

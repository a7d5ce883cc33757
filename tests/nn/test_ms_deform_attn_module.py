"""m2f_kernels.nn.MSDeformAttn against an independent grid_sample computation, checkpoint key names, init."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2f_kernels.nn import MSDeformAttn

SHAPES = [(5, 7), (3, 4), (2, 1)]


def grid_sample_deform_attn(value, shapes, locations, weights):
    """value (N, S, M, D), locations (N, Q, M, L, P, 2) in [0, 1], weights (N, Q, M, L, P) -> (N, Q, M*D)."""
    batch, _, heads, channels = value.shape
    queries, points = locations.shape[1], locations.shape[4]
    out = 0
    for level, level_value in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        height, width = shapes[level]
        v = level_value.permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid = 2 * locations[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2) - 1
        samples = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        w = weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        out = out + (samples * w).sum(-1)
    return (
        out.view(batch, heads, channels, queries)
        .permute(0, 3, 1, 2)
        .reshape(batch, queries, heads * channels)
    )


def independent_forward(state, query, reference_points, input_flatten, padding_mask, heads, levels, points):
    """The module's computation written out from its state dict with plain torch ops and grid_sample."""
    batch, queries, d_model = query.shape
    value = F.linear(input_flatten, state["value_proj.weight"], state["value_proj.bias"])
    if padding_mask is not None:
        value = value * (~padding_mask)[..., None]
    value = value.view(batch, -1, heads, d_model // heads)
    offsets = F.linear(query, state["sampling_offsets.weight"], state["sampling_offsets.bias"])
    offsets = offsets.view(batch, queries, heads, levels, points, 2)
    logits = F.linear(query, state["attention_weights.weight"], state["attention_weights.bias"])
    weights = (
        logits.view(batch, queries, heads, levels * points)
        .softmax(-1)
        .view(batch, queries, heads, levels, points)
    )
    if reference_points.shape[-1] == 2:
        normalizer = torch.tensor([[w, h] for h, w in SHAPES], dtype=query.dtype)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
    else:
        ref = reference_points[:, :, None, :, None, :]
        locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
    out = grid_sample_deform_attn(value, SHAPES, locations, weights)
    return F.linear(out, state["output_proj.weight"], state["output_proj.bias"])


def official_state_dict(d_model, heads, levels, points, generator, prefix=""):
    """A checkpoint as the official Deformable-DETR / Mask2Former module or mmcv's module stores it."""
    shapes = {
        "sampling_offsets.weight": (heads * levels * points * 2, d_model),
        "sampling_offsets.bias": (heads * levels * points * 2,),
        "attention_weights.weight": (heads * levels * points, d_model),
        "attention_weights.bias": (heads * levels * points,),
        "value_proj.weight": (d_model, d_model),
        "value_proj.bias": (d_model,),
        "output_proj.weight": (d_model, d_model),
        "output_proj.bias": (d_model,),
    }
    return {
        prefix + k: torch.randn(s, generator=generator, dtype=torch.float64) * 0.5 for k, s in shapes.items()
    }


def make_inputs(batch, queries, d_model, ref_dim, generator):
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, queries, d_model, generator=generator, dtype=torch.float64)
    input_flatten = torch.randn(batch, total, d_model, generator=generator, dtype=torch.float64)
    reference = torch.rand(batch, queries, len(SHAPES), ref_dim, generator=generator, dtype=torch.float64)
    if ref_dim == 4:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.05
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.tensor([0, *[h * w for h, w in SHAPES]], dtype=torch.long).cumsum(0)[:-1]
    return query, reference, input_flatten, spatial_shapes, start


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("with_padding", [False, True])
def test_matches_grid_sample_with_official_checkpoint(ref_dim, with_padding):
    g = torch.Generator().manual_seed(1)
    d_model, heads, levels, points = 16, 2, len(SHAPES), 3
    state = official_state_dict(d_model, heads, levels, points, g)
    module = MSDeformAttn(d_model, levels, heads, points, backend="torch").double()
    module.load_state_dict(state, strict=True)
    query, reference, input_flatten, spatial_shapes, start = make_inputs(2, 6, d_model, ref_dim, g)
    padding = None
    if with_padding:
        padding = torch.rand(2, input_flatten.shape[1], generator=g) < 0.3
    query.requires_grad_(True)
    out = module(query, reference, input_flatten, spatial_shapes, start, padding)
    query_ref = query.detach().clone().requires_grad_(True)
    expected = independent_forward(state, query_ref, reference, input_flatten, padding, heads, levels, points)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    torch.testing.assert_close(query.grad, query_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float32_backends_agree_with_grid_sample(backend):
    g = torch.Generator().manual_seed(2)
    d_model, heads, levels, points = 32, 4, len(SHAPES), 4
    module = MSDeformAttn(d_model, levels, heads, points, backend=backend)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.3, generator=g)
        module.attention_weights.weight.normal_(0, 0.3, generator=g)
    state = {k: v.double() for k, v in module.state_dict().items()}
    query, reference, input_flatten, spatial_shapes, start = make_inputs(3, 10, d_model, 2, g)
    query32 = query.float().requires_grad_(True)
    input32 = input_flatten.float().requires_grad_(True)
    out = module(query32, reference.float(), input32, spatial_shapes, start)
    query.requires_grad_(True)
    input_flatten.requires_grad_(True)
    expected = independent_forward(state, query, reference, input_flatten, None, heads, levels, points)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * grad.float()).sum().backward()
    (expected * grad).sum().backward()
    torch.testing.assert_close(query32.grad.double(), query.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(input32.grad.double(), input_flatten.grad, rtol=1e-3, atol=1e-4)


def test_mmcv_and_mask2former_prefixed_keys_load_after_stripping_prefix():
    g = torch.Generator().manual_seed(3)
    for prefix in (
        "encoder.layers.0.attentions.0.",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.",
    ):
        checkpoint = official_state_dict(32, 8, 3, 4, g, prefix=prefix)
        module = MSDeformAttn(32, n_levels=3, n_heads=8, n_points=4).double()
        stripped = {k[len(prefix) :]: v for k, v in checkpoint.items()}
        module.load_state_dict(stripped, strict=True)
        for key, tensor in stripped.items():
            assert torch.equal(module.state_dict()[key], tensor)


def test_state_dict_keys_and_shapes():
    module = MSDeformAttn(256, n_levels=4, n_heads=8, n_points=4)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_official_initialization():
    heads, levels, points = 8, 3, 4
    module = MSDeformAttn(64, levels, heads, points)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) == 0
    bias = module.sampling_offsets.bias.view(heads, levels, points, 2)
    # Head h points along angle h * 45 degrees, scaled so the larger coordinate is 1, times point index + 1.
    directions = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    for h, (dx, dy) in enumerate(directions):
        for p in range(points):
            for lvl in range(levels):
                torch.testing.assert_close(
                    bias[h, lvl, p], torch.tensor([dx, dy], dtype=torch.float32) * (p + 1)
                )
    bound = math.sqrt(6 / (64 + 64))
    assert module.value_proj.weight.abs().max() <= bound


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, n_heads=8)
    with pytest.raises(ValueError, match="n_points"):
        MSDeformAttn(32, n_points=0)
    module = MSDeformAttn(16, n_levels=3, n_heads=2, n_points=2)
    query, reference, input_flatten, spatial_shapes, start = make_inputs(1, 4, 16, 2, torch.Generator())
    query, reference, input_flatten = query.float(), reference.float(), input_flatten.float()
    with pytest.raises(ValueError, match="reference_points"):
        module(query, reference[..., :1], input_flatten, spatial_shapes, start)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, reference[:, :, :2], input_flatten, spatial_shapes, start)
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        module(query, reference, input_flatten, spatial_shapes[:2], start)
    with pytest.raises(ValueError, match="channels"):
        module(query[..., :8], reference, input_flatten, spatial_shapes, start)
    with pytest.raises(ValueError, match=r"query must have 3 dimensions"):
        module(query[0], reference, input_flatten, spatial_shapes, start)
    with pytest.raises(ValueError, match=r"input_flatten must have 3 dimensions"):
        module(query, reference, input_flatten[0], spatial_shapes, start)
    with pytest.raises(ValueError, match=r"input_flatten must have shape \(1, \*, 16\)"):
        module(query, reference, input_flatten.expand(2, -1, -1), spatial_shapes, start)
    with pytest.raises(TypeError, match="query must be float16"):
        module(query.long(), reference, input_flatten, spatial_shapes, start)
    with pytest.raises(TypeError, match=r"input_spatial_shapes must be a torch\.Tensor"):
        module(query, reference, input_flatten, spatial_shapes.tolist(), start)
    padding = torch.zeros(1, input_flatten.shape[1], dtype=torch.bool)
    with pytest.raises(TypeError, match="input_padding_mask must be bool"):
        module(query, reference, input_flatten, spatial_shapes, start, padding.float())
    with pytest.raises(ValueError, match="input_padding_mask must have shape"):
        module(query, reference, input_flatten, spatial_shapes, start, padding[:, 1:])
    with pytest.raises(ValueError, match="spatial_shapes is on the meta device"):
        module(query, reference, input_flatten, spatial_shapes.to("meta"), start)
    for size in (True, 2.0):
        with pytest.raises(ValueError, match="n_heads must be a positive int"):
            MSDeformAttn(16, n_heads=size)


def test_sizes_may_be_numpy_integers():
    module = MSDeformAttn(np.int64(16), n_levels=np.int32(3), n_heads=np.int64(2), n_points=np.int16(2))
    assert (module.d_model, module.n_levels, module.n_heads, module.n_points) == (16, 3, 2, 2)
    assert all(
        type(size) is int for size in (module.d_model, module.n_levels, module.n_heads, module.n_points)
    )


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_sampling_stays_float32_under_autocast(ref_dim):
    """Under autocast the projections run in bfloat16 but the samples are taken at the float32 reference
    points: rounded to bfloat16, a point of a 200-pixel row would move by up to 0.4 pixel."""
    g = torch.Generator().manual_seed(4)
    d_model, width = 8, 200
    module = MSDeformAttn(d_model, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        for linear in (module.value_proj, module.output_proj):
            linear.weight.copy_(torch.eye(d_model))
            linear.bias.zero_()
        for linear in (module.sampling_offsets, module.attention_weights):
            linear.weight.zero_()
            linear.bias.zero_()
    value = torch.randn(1, width, d_model, generator=g).bfloat16().float()  # exact through bfloat16
    reference = torch.rand(1, 50, 1, ref_dim, generator=g)
    query = torch.randn(1, 50, d_model, generator=g)
    shapes, start = torch.tensor([[1, width]]), torch.tensor([0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, reference, value, shapes, start)
    assert out.dtype == torch.bfloat16
    locations = reference[:, :, None, :, None, :2]  # zero offsets: the samples sit at the reference points
    expected = grid_sample_deform_attn(
        value.view(1, width, 1, d_model), [(1, width)], locations, torch.ones(1, 50, 1, 1, 1)
    )
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)

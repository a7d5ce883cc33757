"""Property tests (hypothesis): the C++ CPU kernels against independent float64 computations (DESIGN.md 4).

Shapes, dtypes and values are drawn at random (derandomized, so every run checks the same examples); tensor
values come from a torch.Generator seeded by a drawn integer. Each op goes through the public API with
backend="cpu" and is compared, forward and backward, with the float64 reference of m2f_kernels.reference,
a composition of torch ops (grid_sample) or a direct formula, on the same (rounded) inputs. The Triton
kernels (interpreter on CPU) get the same checks on a few small examples.

Tolerances: float64 results agree to rounding (1e-10). float32 kernels accumulate in float32, so their error
grows with the magnitude of the summed terms rather than of the result: max error <= 1e-5 * (1 + max |exact|)
absolute and 1e-5 relative, DESIGN.md's fp32 tolerance (the backend grid tests use the same bound).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_ms_deform_attn_backends import forward_backward, level_tables
from test_ms_deform_attn_fused_backends import composed_reference

import m2f_kernels
from m2f_kernels import _backend, reference
from m2f_kernels.reference.masked_attention import threshold_to_logit

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**31 - 1)


def property_settings(max_examples: int) -> settings:
    """Reproducible examples; the autouse seed fixture is harmless since values come from the drawn seed."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def needs_cpu_kernel(kernel_name: str):
    return pytest.mark.skipif(
        not _backend.has_kernel(kernel_name, "cpu"), reason="the C++ CPU kernel is not built"
    )


def needs_triton(op_name: str):
    available = _backend.triton_module(op_name) is not None and _backend.triton_runs_on("cpu")
    return pytest.mark.skipif(not available, reason="Triton runs on CPU only with TRITON_INTERPRET=1")


def assert_close_to_exact(
    name: str, actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, magnitude: float | None = None
):
    """actual (computed in ``dtype``) against the float64 ``exact``, with the module's tolerance relative to
    ``magnitude`` (default: max |exact|), the size of the terms the kernel sums."""
    tol = TOLERANCE[dtype]
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name} has non-finite entries"
    scale = magnitude if magnitude is not None else exact.abs().max().item() if exact.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), exact, atol=tol * (1 + scale), rtol=tol, msg=lambda m: f"{name}: {m}"
    )


def is_power_of_two(size: int) -> bool:
    return size & (size - 1) == 0


def axis_coordinates(generator, shape, size: int, dtype, special_fraction: float, nan_fraction: float):
    """Normalized coordinates (float64) along an axis of ``size`` pixels.

    Uniform in [-0.3, 1.3], kept 1e-4 pixel away from the cell edges (integer pixel coordinates): there the
    float32 kernel and the float64 reference may round into different cells and take different one-sided
    gradients. A ``special_fraction`` of them lie on cell edges that both compute exactly: the borders 0 and
    1, multiples of 1/32, pixel centres (j + 0.5) / size for j = -1..size (pixel coordinates -1 and size
    included) when size is a power of two (for other sizes only in float64, where the kernel and the
    reference round them identically). A ``nan_fraction`` of them are NaN.
    """
    coordinates = torch.rand(shape, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    pixel = coordinates * size - 0.5
    near_edge = (pixel - pixel.round()).abs() < 1e-4
    coordinates = torch.where(near_edge, (pixel.round() + 2e-4 + 0.5) / size, coordinates)
    pool = [0.0, 1.0, *(i / 32 for i in range(-8, 41))]
    if dtype == torch.float64 or is_power_of_two(size):
        pool += [(j + 0.5) / size for j in range(-1, size + 1)]
    pool = torch.tensor(pool, dtype=torch.float64)
    choice = torch.rand(shape, generator=generator, dtype=torch.float64)
    special = pool[torch.randint(len(pool), shape, generator=generator)]
    coordinates = torch.where(choice < special_fraction, special, coordinates)
    return torch.where(choice > 1 - nan_fraction, math.nan, coordinates)


# ---- ms_deform_attn ----


def deform_attn_inputs(generator, batch, queries, heads, channels, levels, points, dtype, special, nan):
    spatial_shapes, level_start_index = level_tables(levels)
    num_values = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, num_values, heads, channels, generator=generator, dtype=torch.float64)
    sample_shape = (batch, queries, heads, points)
    locations = torch.stack(
        [
            torch.stack(
                [
                    axis_coordinates(generator, sample_shape, width, dtype, special, nan),
                    axis_coordinates(generator, sample_shape, height, dtype, special, nan),
                ],
                dim=-1,
            )
            for height, width in levels
        ],
        dim=3,
    )
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(batch, queries, heads * channels, generator=generator, dtype=torch.float64)
    floats = [t.to(dtype) for t in (value, locations, weights, grad_output)]
    return (floats[0], spatial_shapes, level_start_index, floats[1], floats[2]), floats[3]


def grid_sample_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """ms_deform_attn written with grid_sample (zero padding, align_corners=False), NaN moved outside."""
    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = locations.shape
    grid = 2 * torch.nan_to_num(locations, nan=10.0) - 1
    out = value.new_zeros(batch * heads, channels, queries, points)
    for level, ((height, width), start) in enumerate(
        zip(spatial_shapes.tolist(), level_start_index.tolist())
    ):
        image = value[:, start : start + height * width].permute(0, 2, 3, 1)
        image = image.reshape(batch * heads, channels, height, width)
        level_grid = grid[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples = F.grid_sample(image, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + samples * weights[:, :, :, level].transpose(1, 2).reshape(
            batch * heads, 1, queries, points
        )
    out = out.sum(-1).reshape(batch, heads, channels, queries)
    return out.permute(0, 3, 1, 2).reshape(batch, queries, heads * channels)


def deform_attn_cases(batch=3, queries=6, heads=4, channels=9, levels=4, plane_size=12, points=8):
    """Keyword arguments of check_ms_deform_attn / check_ms_deform_attn_fused, sizes up to the given ones."""
    return st.fixed_dictionaries(
        {
            "batch": st.integers(1, batch),
            "queries": st.integers(0, queries),
            "heads": st.integers(1, heads),
            "channels": st.integers(1, channels),
            "levels": st.lists(
                st.tuples(st.integers(1, plane_size), st.integers(1, plane_size)), min_size=1, max_size=levels
            ),
            "points": st.integers(1, points),
            "dtype": DTYPES,
            "special_fraction": st.sampled_from([0.0, 0.3, 1.0]),
            "nan_fraction": st.sampled_from([0.0, 0.1]),
            "seed": SEEDS,
        }
    )


def deform_attn_case(batch, queries, heads, channels, levels, points, special_fraction, nan_fraction):
    """A hand-picked float32 case for @example."""
    return {
        "batch": batch,
        "queries": queries,
        "heads": heads,
        "channels": channels,
        "levels": levels,
        "points": points,
        "dtype": torch.float32,
        "special_fraction": special_fraction,
        "nan_fraction": nan_fraction,
        "seed": 0,
    }


def check_ms_deform_attn(
    backend, batch, queries, heads, channels, levels, points, dtype, special_fraction, nan_fraction, seed
):
    generator = torch.Generator().manual_seed(seed)
    inputs, grad_output = deform_attn_inputs(
        generator, batch, queries, heads, channels, levels, points, dtype, special_fraction, nan_fraction
    )
    ours = forward_backward(lambda *t: m2f_kernels.ms_deform_attn(*t, backend=backend), inputs, grad_output)
    exact = forward_backward(reference.ms_deform_attn, inputs, grad_output, torch.float64)
    assert all(t.dtype == dtype for t in ours)
    for name, actual, expected in zip(
        ("output", "grad_value", "grad_locations", "grad_weights"), ours, exact
    ):
        assert_close_to_exact(name, actual, expected, dtype)
    # The output once more against a second, grid_sample-based formulation of the same op.
    with_grid_sample = grid_sample_deform_attn(*[t.double() if t.is_floating_point() else t for t in inputs])
    assert_close_to_exact("output vs grid_sample", ours[0], with_grid_sample, dtype)


@needs_cpu_kernel("_ms_deform_attn_forward")
@property_settings(max_examples=100)
@given(case=deform_attn_cases())
@example(case=deform_attn_case(1, 0, 2, 3, [(1, 1), (2, 5)], 4, 0.3, 0.1))  # no queries
@example(case=deform_attn_case(2, 3, 1, 1, [(1, 1)], 1, 1.0, 0.0))  # one 1x1 level
def test_ms_deform_attn_matches_float64(case):
    check_ms_deform_attn("cpu", **case)


@needs_triton("ms_deform_attn")
@property_settings(max_examples=6)
@given(case=deform_attn_cases(batch=2, queries=3, heads=2, channels=4, levels=2, plane_size=5, points=3))
def test_ms_deform_attn_triton_matches_float64(case):
    check_ms_deform_attn("triton", **case)


# ---- ms_deform_attn_fused ----


def fused_inputs(generator, batch, queries, heads, channels, levels, points, dtype, special, nan):
    """Reference points, pixel offsets and logits; a ``special`` fraction of (n, q, level) reference points at
    pixel centres with integer offsets (exact pixel-centre samples on power-of-two axes), a ``nan`` fraction
    of NaN offsets and as many far outside the image (1e4 pixels)."""
    spatial_shapes, level_start_index = level_tables(levels)
    num_levels = len(levels)
    num_values = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, num_values, heads, channels, generator=generator, dtype=torch.float64)
    reference_points = torch.rand(batch, queries, num_levels, 2, generator=generator, dtype=torch.float64)
    reference_points = reference_points * 1.2 - 0.1
    offsets = torch.randn(
        batch, queries, heads, num_levels, points, 2, generator=generator, dtype=torch.float64
    )
    offsets = offsets * 2
    logits = torch.randn(batch, queries, heads, num_levels * points, generator=generator, dtype=torch.float64)
    logits = logits * 2
    sizes = spatial_shapes.flip(-1).double()  # (L, 2) as (W, H)
    exact_axis = torch.tensor([[is_power_of_two(w), is_power_of_two(h)] for h, w in levels])
    at_centre = torch.rand(batch, queries, num_levels, 1, generator=generator) < special
    at_centre = at_centre & exact_axis  # (N, Q, L, 2)
    centre_index = torch.floor(torch.rand(at_centre.shape, generator=generator, dtype=torch.float64) * sizes)
    reference_points = torch.where(at_centre, (centre_index + 0.5) / sizes, reference_points)
    exact_offsets = at_centre[:, :, None, :, None, :].expand_as(offsets)
    offsets = torch.where(exact_offsets, offsets.round(), offsets)
    # Elsewhere keep the samples 1e-4 pixel away from cell edges (see axis_coordinates).
    pixel = (reference_points[:, :, None, :, None, :] + offsets / sizes[:, None, :]) * sizes[:, None, :] - 0.5
    near_edge = ((pixel - pixel.round()).abs() < 1e-4) & ~exact_offsets
    offsets = torch.where(near_edge, offsets + 2e-4, offsets)
    choice = torch.rand(offsets.shape, generator=generator, dtype=torch.float64)
    offsets = torch.where(choice < nan, math.nan, torch.where(choice > 1 - nan, 1e4, offsets))
    grad_output = torch.randn(batch, queries, heads * channels, generator=generator, dtype=torch.float64)
    floats = [t.to(dtype) for t in (value, reference_points, offsets, logits, grad_output)]
    return (floats[0], spatial_shapes, level_start_index, *floats[1:4]), floats[4]


def check_ms_deform_attn_fused(
    backend, batch, queries, heads, channels, levels, points, dtype, special_fraction, nan_fraction, seed
):
    generator = torch.Generator().manual_seed(seed)
    inputs, grad_output = fused_inputs(
        generator, batch, queries, heads, channels, levels, points, dtype, special_fraction, nan_fraction
    )
    ours = forward_backward(
        lambda *t: m2f_kernels.ms_deform_attn_fused(*t, backend=backend), inputs, grad_output
    )
    exact = forward_backward(composed_reference, inputs, grad_output, torch.float64)
    names = ("output", "grad_value", "grad_reference_points", "grad_offsets", "grad_logits")
    assert all(t.dtype == dtype for t in ours)
    for name, actual, expected in zip(names, ours, exact):
        assert_close_to_exact(name, actual, expected, dtype)


@needs_cpu_kernel("_ms_deform_attn_fused_forward")
@property_settings(max_examples=100)
@given(case=deform_attn_cases())
@example(case=deform_attn_case(1, 0, 2, 3, [(1, 1), (2, 5)], 4, 0.3, 0.1))  # no queries
@example(case=deform_attn_case(2, 3, 2, 5, [(4, 8), (1, 1), (2, 1)], 3, 1.0, 0.0))  # all at pixel centres
def test_ms_deform_attn_fused_matches_float64(case):
    check_ms_deform_attn_fused("cpu", **case)


@needs_triton("ms_deform_attn_fused")
@property_settings(max_examples=6)
@given(case=deform_attn_cases(batch=2, queries=3, heads=2, channels=4, levels=2, plane_size=5, points=3))
def test_ms_deform_attn_fused_triton_matches_float64(case):
    check_ms_deform_attn_fused("triton", **case)


# ---- masked_attention ----

KEY_COUNTS = st.one_of(st.integers(1, 300), st.sampled_from([1, 15, 16, 17, 127, 128, 129, 255, 256, 257]))
HEAD_DIMS = st.sampled_from([1, 8, 16, 32, 33])
THRESHOLDS = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
SCALES = st.one_of(st.none(), st.floats(0.05, 2.0))


def attention_inputs(generator, batch, heads, queries, keys, head_dim, dtype):
    """q, k, v and grad_out in ``dtype``."""
    shapes = [(queries, head_dim), (keys, head_dim), (keys, head_dim), (queries, head_dim)]
    return [
        torch.randn(batch, heads, *shape, generator=generator, dtype=torch.float64).to(dtype)
        for shape in shapes
    ]


def random_mask_logits(generator, batch, queries, keys, threshold_logit, dtype):
    """(B, Q, K) logits with a random visible density per row, 10% exactly at the threshold logit (visible),
    3% NaN (blocked) and about a fifth of the rows fully blocked."""
    density = torch.rand(batch, queries, 1, generator=generator, dtype=torch.float64)
    visible = torch.rand(batch, queries, keys, generator=generator, dtype=torch.float64) < density
    magnitude = torch.rand(batch, queries, keys, generator=generator, dtype=torch.float64) * 4 + 0.01
    logits = threshold_logit + torch.where(visible, magnitude, -magnitude)
    choice = torch.rand(batch, queries, keys, generator=generator, dtype=torch.float64)
    logits = torch.where(choice < 0.1, threshold_logit, torch.where(choice > 0.97, math.nan, logits))
    blocked_row = torch.rand(batch, queries, 1, generator=generator) < 0.2
    logits = torch.where(blocked_row, threshold_logit - magnitude, logits)
    return logits.to(dtype)


def random_bool_mask(generator, rows, queries, keys):
    """(rows, Q, K) bool, True = blocked, with a random density per row and some fully blocked rows."""
    density = torch.rand(rows, queries, 1, generator=generator)
    blocked = torch.rand(rows, queries, keys, generator=generator) < density
    return blocked | (torch.rand(rows, queries, 1, generator=generator) < 0.2)


def attention_and_gradients(q, k, v, grad_out, backend="cpu", **options):
    """The public op (default: on the C++ CPU kernel): output and the gradients of q, k and v."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = m2f_kernels.masked_attention(*leaves, backend=backend, **options)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def softmax_attention_float64(q, k, v, grad_out, scale):
    """softmax(q k^T * scale) v without a mask, in float64, with its gradients by autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    q64, k64, v64 = leaves
    out = ((q64 @ k64.transpose(-1, -2)) * scale).softmax(dim=-1) @ v64
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


ATTENTION_NAMES = ("output", "grad_q", "grad_k", "grad_v")


def assert_attention_close(ours, exact, dtype, label=""):
    """Output and gradients against float64, all relative to their largest exact magnitude: the gradients
    share the row terms dP = dO . v and D = dO . out, whose float32 rounding (relative to |dO| |v|) does not
    shrink where they cancel (one visible key gives exactly zero grad_q and grad_k)."""
    magnitude = max(t.abs().max().item() for t in exact)
    assert all(t.dtype == dtype for t in ours)
    for name, actual, expected in zip(ATTENTION_NAMES, ours, exact):
        assert_close_to_exact(f"{name}{label}", actual, expected, dtype, magnitude)


def attention_cases(heads=3, queries=24, keys=KEY_COUNTS, dtypes=DTYPES):
    """Keyword arguments of check_masked_attention."""
    return st.fixed_dictionaries(
        {
            "batch": st.integers(1, 2),
            "heads": st.integers(1, heads),
            "queries": st.integers(1, queries),
            "keys": keys,
            "head_dim": HEAD_DIMS,
            "dtype": dtypes,
            "mask_kind": st.sampled_from(["logits", "bool", "bool_per_head"]),
            "threshold": THRESHOLDS,
            "scale": SCALES,
            "seed": SEEDS,
        }
    )


def check_masked_attention(
    backend, batch, heads, queries, keys, head_dim, dtype, mask_kind, threshold, scale, seed
):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = attention_inputs(generator, batch, heads, queries, keys, head_dim, dtype)
    mask_logits, attn_mask = None, None
    if mask_kind == "logits":
        threshold_logit = threshold_to_logit(threshold)
        mask_logits = random_mask_logits(generator, batch, queries, keys, threshold_logit, dtype)
    else:
        attn_mask = random_bool_mask(
            generator, batch * (heads if mask_kind == "bool_per_head" else 1), queries, keys
        )
    ours = attention_and_gradients(
        q,
        k,
        v,
        grad_out,
        mask_logits=mask_logits,
        attn_mask=attn_mask,
        threshold=threshold,
        scale=scale,
        backend=backend,
    )
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    logits64 = None if mask_logits is None else mask_logits.double()
    out, _ = reference.masked_attention(*leaves, logits64, attn_mask, threshold, scale)
    exact = (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))
    assert_attention_close(ours, exact, dtype)


@needs_cpu_kernel("_masked_attention_forward")
@property_settings(max_examples=100)
@given(case=attention_cases())
def test_masked_attention_matches_float64(case):
    check_masked_attention("cpu", **case)


@needs_triton("masked_attention")
@property_settings(max_examples=6)
@given(case=attention_cases(heads=2, queries=5, keys=st.integers(1, 70), dtypes=st.just(torch.float32)))
def test_masked_attention_triton_matches_float64(case):
    check_masked_attention("triton", **case)


@needs_cpu_kernel("_masked_attention_forward")
@property_settings(max_examples=30)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    queries=st.integers(1, 16),
    keys=KEY_COUNTS,
    head_dim=HEAD_DIMS,
    dtype=DTYPES,
    scale=SCALES,
    seed=SEEDS,
)
@example(1, 2, 6, 1, 32, torch.float32, 2.0, 613664)  # one key: grad_q and grad_k are exactly zero
def test_masked_attention_without_effective_mask_is_softmax_attention(
    batch, heads, queries, keys, head_dim, dtype, scale, seed
):
    """Masks that block nothing, and masks that block everything (every row falls back to all keys), give
    plain softmax attention, as does the unmasked public op."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = attention_inputs(generator, batch, heads, queries, keys, head_dim, dtype)
    exact = softmax_attention_float64(q, k, v, grad_out, head_dim**-0.5 if scale is None else scale)
    no_mask = {"attn_mask": None}
    visible_logits = {"mask_logits": torch.full((batch, queries, keys), 3.0, dtype=dtype), "threshold": 0.5}
    nan_logits = {"mask_logits": torch.full((batch, queries, keys), math.nan, dtype=dtype)}
    nothing_blocked = {"attn_mask": torch.zeros(batch, queries, keys, dtype=torch.bool)}
    everything_blocked = {"attn_mask": torch.ones(batch * heads, queries, keys, dtype=torch.bool)}
    for options in (no_mask, visible_logits, nan_logits, nothing_blocked, everything_blocked):
        ours = attention_and_gradients(q, k, v, grad_out, scale=scale, **options)
        assert_attention_close(ours, exact, dtype, f" with {sorted(options)}")


@needs_cpu_kernel("_masked_attention_forward")
@property_settings(max_examples=30)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    queries=st.integers(1, 16),
    keys=KEY_COUNTS,
    head_dim=HEAD_DIMS,
    dtype=DTYPES,
    threshold=THRESHOLDS,
    seed=SEEDS,
)
def test_masked_attention_bool_mask_equals_logits(
    batch, heads, queries, keys, head_dim, dtype, threshold, seed
):
    """The bool mask ~(logit >= threshold logit), shared or repeated per head, gives bitwise the same output
    and gradients as the logits."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = attention_inputs(generator, batch, heads, queries, keys, head_dim, dtype)
    threshold_logit = threshold_to_logit(threshold)
    logits = random_mask_logits(generator, batch, queries, keys, threshold_logit, dtype)
    blocked = ~(logits.double() >= threshold_logit)
    from_logits = attention_and_gradients(q, k, v, grad_out, mask_logits=logits, threshold=threshold)
    per_head = blocked.repeat_interleave(heads, dim=0)  # (B * H, Q, K), batch-major like q's (B, H) layout
    for attn_mask in (blocked, per_head):
        from_bool = attention_and_gradients(q, k, v, grad_out, attn_mask=attn_mask)
        for name, a, b in zip(ATTENTION_NAMES, from_logits, from_bool):
            assert torch.equal(a, b), f"{name} differs with a bool mask of shape {tuple(attn_mask.shape)}"


# ---- point_sample, point_mask_loss, pairwise_mask_cost ----


def plane_coordinates(generator, batch, points, height, width, dtype, special=0.3, nan=0.05):
    """(N, P, 2) normalized (x, y) for an H x W plane (see axis_coordinates)."""
    x = axis_coordinates(generator, (batch, points), width, dtype, special, nan)
    y = axis_coordinates(generator, (batch, points), height, dtype, special, nan)
    return torch.stack([x, y], dim=-1)


def point_sample_cases(batch=3, channels=4, plane_size=12, points=25):
    """Keyword arguments of check_point_sample."""
    return st.fixed_dictionaries(
        {
            "batch": st.integers(1, batch),
            "channels": st.integers(1, channels),
            "height": st.integers(1, plane_size),
            "width": st.integers(1, plane_size),
            "points": st.integers(0, points),
            "dtype": DTYPES,
            "seed": SEEDS,
        }
    )


def check_point_sample(backend, batch, channels, height, width, points, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64).to(dtype)
    coords = plane_coordinates(generator, batch, points, height, width, dtype).to(dtype)
    grad_output = torch.randn(batch, channels, points, generator=generator, dtype=torch.float64).to(dtype)
    ours = forward_backward(
        lambda *t: m2f_kernels.point_sample(*t, backend=backend), (image, coords), grad_output
    )
    exact = forward_backward(reference.point_sample, (image, coords), grad_output, torch.float64)
    assert all(t.dtype == dtype for t in ours)
    for name, actual, expected in zip(("output", "grad_input", "grad_coords"), ours, exact):
        assert_close_to_exact(name, actual, expected, dtype)
    # detectron2's definition: grid_sample on 2 * coords - 1 (NaN moved outside the image).
    grid = 2 * torch.nan_to_num(coords.double(), nan=10.0).unsqueeze(2) - 1
    with_grid_sample = F.grid_sample(image.double(), grid, align_corners=False, padding_mode="zeros")
    assert_close_to_exact("output vs grid_sample", ours[0], with_grid_sample.squeeze(3), dtype)


def point_sample_case(batch, channels, height, width, points):
    """A hand-picked float32 case for @example."""
    return {
        "batch": batch,
        "channels": channels,
        "height": height,
        "width": width,
        "points": points,
        "dtype": torch.float32,
        "seed": 0,
    }


@needs_cpu_kernel("_point_sample_forward")
@property_settings(max_examples=100)
@given(case=point_sample_cases())
@example(case=point_sample_case(2, 3, 1, 1, 9))  # 1x1 plane
@example(case=point_sample_case(1, 2, 3, 5, 0))  # no points
def test_point_sample_matches_float64(case):
    check_point_sample("cpu", **case)


@needs_triton("point_sample")
@property_settings(max_examples=6)
@given(case=point_sample_cases(batch=2, channels=2, plane_size=5, points=6))
def test_point_sample_triton_matches_float64(case):
    check_point_sample("triton", **case)


def random_targets(generator, shape, kind, dtype):
    """Binary targets as bool or uint8, or fractional float targets in ``dtype`` ("float") or in float32
    whatever ``dtype`` ("float32"), with exact 0 and 1 included."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "bool":
        return uniform > 0.5
    if kind == "uint8":
        return (uniform > 0.5).to(torch.uint8)
    soft = torch.where(uniform < 0.3, 0.0, torch.where(uniform > 0.7, 1.0, uniform))
    return soft.to(torch.float32 if kind == "float32" else dtype)


def point_mask_loss_cases(masks=4, plane_size=12, target_size=20, points=30):
    """Keyword arguments of check_point_mask_loss."""
    return st.fixed_dictionaries(
        {
            "masks": st.integers(1, masks),
            "logit_size": st.tuples(st.integers(1, plane_size), st.integers(1, plane_size)),
            "target_size": st.tuples(st.integers(1, target_size), st.integers(1, target_size)),
            "points": st.integers(1, points),
            "target_kind": st.sampled_from(["bool", "uint8", "float", "float32"]),
            "dtype": DTYPES,
            "num_masks": st.floats(0.5, 10.0),
            "seed": SEEDS,
        }
    )


def check_point_mask_loss(
    backend, masks, logit_size, target_size, points, target_kind, dtype, num_masks, seed
):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(masks, *logit_size, generator=generator, dtype=torch.float64) * 3).to(dtype)
    targets = random_targets(generator, (masks, *target_size), target_kind, dtype)
    coords = plane_coordinates(generator, masks, points, *logit_size, dtype).to(dtype)
    ce_weight, dice_weight = torch.rand(2, generator=generator, dtype=torch.float64).tolist()

    def weighted_losses(function, mask_logits):
        ce, dice = function(mask_logits, targets if target_kind != "float" else targets.to(mask_logits.dtype))
        return ce, dice, *torch.autograd.grad(ce_weight * ce + dice_weight * dice, mask_logits)

    ours = weighted_losses(
        lambda x, t: m2f_kernels.point_mask_loss(x, t, coords, num_masks, backend=backend),
        logits.detach().requires_grad_(),
    )
    exact = weighted_losses(
        lambda x, t: reference.point_mask_loss(x, t, coords.double(), num_masks),
        logits.detach().double().requires_grad_(),
    )
    assert ours[0].dtype == ours[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[2].dtype == dtype
    for name, actual, expected in zip(("ce", "dice", "grad_mask_logits"), ours, exact):
        assert_close_to_exact(name, actual, expected, dtype)


ONE_PIXEL_LOSS_CASE = {
    "masks": 1,
    "logit_size": (1, 1),
    "target_size": (1, 1),
    "points": 1,
    "target_kind": "bool",
    "dtype": torch.float32,
    "num_masks": 1.0,
    "seed": 0,
}


@needs_cpu_kernel("_point_mask_loss_forward")
@property_settings(max_examples=100)
@given(case=point_mask_loss_cases())
@example(case=ONE_PIXEL_LOSS_CASE)  # 1x1 planes, one point
def test_point_mask_loss_matches_float64(case):
    check_point_mask_loss("cpu", **case)


@needs_triton("point_mask_loss")
@property_settings(max_examples=6)
@given(case=point_mask_loss_cases(masks=2, plane_size=5, target_size=7, points=8))
def test_point_mask_loss_triton_matches_float64(case):
    check_point_mask_loss("triton", **case)


def direct_pairwise_costs(logits, labels):
    """Mask2Former's matcher costs by their definition over the (Q, T, P) broadcast, float64."""
    x = logits.double()[:, None, :]
    t = labels.double()[None, :, :]
    bce = x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return bce.mean(-1), dice


def pairwise_inputs(generator, num_queries, num_targets, num_points, label_kind, dtype):
    """Logits of large magnitude (a fifth at +-60, the saturated range of the softplus) and labels."""
    logits = torch.randn(num_queries, num_points, generator=generator, dtype=torch.float64) * 8
    choice = torch.rand(num_queries, num_points, generator=generator)
    logits = torch.where(choice < 0.1, 60.0, torch.where(choice > 0.9, -60.0, logits))
    labels = random_targets(generator, (num_targets, num_points), label_kind, dtype)
    return logits.to(dtype), labels


def pairwise_cases(num_queries=20, num_targets=20, num_points=60):
    """Keyword arguments of check_pairwise_mask_cost."""
    return st.fixed_dictionaries(
        {
            "num_queries": st.integers(1, num_queries),
            "num_targets": st.integers(0, num_targets),
            "num_points": st.integers(1, num_points),
            "label_kind": st.sampled_from(["bool", "uint8", "float", "float32"]),
            "dtype": DTYPES,
            "seed": SEEDS,
        }
    )


def check_pairwise_mask_cost(backend, num_queries, num_targets, num_points, label_kind, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    logits, labels = pairwise_inputs(generator, num_queries, num_targets, num_points, label_kind, dtype)
    ce, dice = m2f_kernels.pairwise_mask_cost(logits, labels, backend=backend)
    exact_ce, exact_dice = direct_pairwise_costs(logits, labels)
    assert ce.dtype == dice.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_exact("ce", ce, exact_ce, dtype)
    assert_close_to_exact("dice", dice, exact_dice, dtype)


def pairwise_case(num_queries, num_targets, label_kind):
    """A hand-picked float32 case for @example."""
    return {
        "num_queries": num_queries,
        "num_targets": num_targets,
        "num_points": 7,
        "label_kind": label_kind,
        "dtype": torch.float32,
        "seed": 0,
    }


@needs_cpu_kernel("_pairwise_mask_cost")
@property_settings(max_examples=100)
@given(case=pairwise_cases())
@example(case=pairwise_case(1, 3, "float"))  # Q = 1
@example(case=pairwise_case(4, 0, "bool"))  # T = 0
def test_pairwise_mask_cost_matches_float64(case):
    check_pairwise_mask_cost("cpu", **case)


@needs_triton("pairwise_mask_cost")
@property_settings(max_examples=6)
@given(case=pairwise_cases(num_queries=4, num_targets=4, num_points=20))
def test_pairwise_mask_cost_triton_matches_float64(case):
    check_pairwise_mask_cost("triton", **case)


@needs_cpu_kernel("_pairwise_mask_cost")
@needs_cpu_kernel("_point_mask_loss_forward")
@property_settings(max_examples=30)
@given(
    num_queries=st.integers(1, 6),
    num_targets=st.integers(1, 6),
    num_points=st.integers(1, 40),
    label_kind=st.sampled_from(["uint8", "float"]),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_pairwise_mask_cost_equals_point_mask_loss_per_pair(
    num_queries, num_targets, num_points, label_kind, dtype, seed
):
    """Cost (i, j) is the point loss of prediction i against target j, each laid out as a 1 x W plane
    (W the next power of two >= P, so that the pixel-centre coordinates are exact) sampled at its P centres."""
    generator = torch.Generator().manual_seed(seed)
    logits, labels = pairwise_inputs(generator, num_queries, num_targets, num_points, label_kind, dtype)
    ce, dice = m2f_kernels.pairwise_mask_cost(logits, labels, backend="cpu")

    width = 1 << (num_points - 1).bit_length()
    pairs = num_queries * num_targets
    logit_planes = logits.new_zeros(pairs, 1, width)
    logit_planes[:, 0, :num_points] = logits.repeat_interleave(num_targets, dim=0)
    label_planes = labels.new_zeros(pairs, 1, width)
    label_planes[:, 0, :num_points] = labels.repeat(num_queries, 1)
    centres = torch.stack([(torch.arange(num_points) + 0.5) / width, torch.full((num_points,), 0.5)], dim=-1)
    coords = centres.to(dtype).expand(pairs, num_points, 2).contiguous()
    pair_ce, pair_dice, _ = torch.ops.m2f_kernels._point_mask_loss_forward(logit_planes, label_planes, coords)
    assert_close_to_exact("ce", ce, pair_ce.double().reshape(num_queries, num_targets), dtype)
    assert_close_to_exact("dice", dice, pair_dice.double().reshape(num_queries, num_targets), dtype)

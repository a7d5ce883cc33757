"""Multi-scale deformable attention, Triton kernels (DESIGN.md 2.1 and 3).

One program handles BLOCK_Q queries of one (batch, head) pair and all D channels. The same kernels serve the
fused op (m2f_kernels/triton/ms_deform_attn_fused.py) through the FUSED flag: then the "locations" are pixel
offsets added to reference points and the "weights" are logits, softmaxed over the L * P samples in the kernel.

Sampling convention (as the reference): x = loc_x * W - 0.5, y = loc_y * H - 0.5; a sample contributes only
if -1 < x < W and -1 < y < H; floor cell; corners outside the image read zero.

Backward adds grad_value with atomics; with deterministic=True it instead lists every (sample, corner)
contribution, sorts them by destination (stable) and sums each destination row in that fixed order.
"""

import torch
import triton
import triton.language as tl

from ._common import SAMPLING_OPTIONS, block_configs, size_class


def _configs() -> list:
    return block_configs(
        triton.Config({"BLOCK_Q": 16}, num_warps=4),
        [{"BLOCK_Q": block_q} for block_q in (16, 32, 64)],
        (2, 4, 8),
    )


@triton.jit
def _program_queries(Q, M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Batch n, head m and query indices of this program. The grid is 1-D (no 65,535 limit on batch * heads):
    program = (n * M + m) * query_blocks + query_block, so the blocks of one (n, m) pair run consecutively."""
    query_blocks = tl.cdiv(Q, BLOCK_Q)
    pair = tl.program_id(0) // query_blocks
    q = (tl.program_id(0) % query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return pair // M, pair % M, q


@triton.jit
def _load_sample(
    loc_ptr,
    ref_ptr,
    weight_ptr,
    query,
    sample,
    level,
    height_f,
    width_f,
    softmax_max,
    softmax_sum,
    row_mask,
    L: tl.constexpr,
    FUSED: tl.constexpr,
    ACC: tl.constexpr,
):
    """Normalized location (x, y) and attention weight of one sample for each row ([BLOCK_Q] each)."""
    raw_x = tl.load(loc_ptr + 2 * sample, mask=row_mask, other=0.0).to(ACC)
    raw_y = tl.load(loc_ptr + 2 * sample + 1, mask=row_mask, other=0.0).to(ACC)
    raw_w = tl.load(weight_ptr + sample, mask=row_mask, other=0.0).to(ACC)
    if FUSED:
        ref_x = tl.load(ref_ptr + 2 * (query * L + level), mask=row_mask, other=0.0).to(ACC)
        ref_y = tl.load(ref_ptr + 2 * (query * L + level) + 1, mask=row_mask, other=0.0).to(ACC)
        if ACC == tl.float32:
            # The correctly rounded quotient, as the reference and the CUDA kernels form it: float32 `/`
            # compiles to an approximate division on NVIDIA GPUs, which moves some boundary locations a cell.
            loc_x = ref_x + tl.div_rn(raw_x, width_f)
            loc_y = ref_y + tl.div_rn(raw_y, height_f)
        else:
            loc_x = ref_x + raw_x / width_f
            loc_y = ref_y + raw_y / height_f
        weight = tl.exp(raw_w - softmax_max) / softmax_sum
    else:
        loc_x = raw_x
        loc_y = raw_y
        weight = raw_w
    return loc_x, loc_y, weight


@triton.jit
def _softmax_stats(weight_ptr, head, row_mask, LP: tl.constexpr, LP_PAD: tl.constexpr, ACC: tl.constexpr):
    """Maximum and sum of exp(logit - maximum) over the L * P logits of each row's head."""
    cols = tl.arange(0, LP_PAD)
    mask = row_mask[:, None] & (cols[None, :] < LP)
    logits = tl.load(weight_ptr + head[:, None] * LP + cols[None, :], mask=mask, other=-float("inf")).to(ACC)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_mask, row_max, 0.0)
    row_sum = tl.sum(tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0), axis=1)
    row_sum = tl.where(row_mask, row_sum, 1.0)
    return row_max, row_sum


@triton.jit
def _bilinear(loc_x, loc_y, height_f, width_f, row_mask):
    """Validity, floor cell (x0, y0) and fractional parts of the pixel coordinate."""
    x = loc_x * width_f - 0.5
    y = loc_y * height_f - 0.5
    valid = row_mask & (x > -1.0) & (x < width_f) & (y > -1.0) & (y < height_f)
    x = tl.where(valid, x, 0.0)
    y = tl.where(valid, y, 0.0)
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    return valid, x_floor.to(tl.int64), y_floor.to(tl.int64), x - x_floor, y - y_floor


@triton.jit
def _corner(x0, y0, frac_x, frac_y, valid, height, width, DX: tl.constexpr, DY: tl.constexpr):
    """Corner (x0 + DX, y0 + DY): inside mask, y * W + x, bilinear weight and its d/dx, d/dy (pixels)."""
    cx = x0 + DX
    cy = y0 + DY
    inside = valid & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    if DX == 1:
        wx = frac_x
        sign_x = 1.0
    else:
        wx = 1.0 - frac_x
        sign_x = -1.0
    if DY == 1:
        wy = frac_y
        sign_y = 1.0
    else:
        wy = 1.0 - frac_y
        sign_y = -1.0
    return inside, cy * width + cx, wx * wy, sign_x * wy, sign_y * wx


@triton.autotune(configs=_configs(), key=["D", "M", "L", "P", "SIZE_CLASS", "FUSED"])
@triton.jit
def _forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    ref_ptr,
    loc_ptr,
    weight_ptr,
    out_ptr,
    Q,
    S,
    D,
    SIZE_CLASS,
    M: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    LP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FUSED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    n, m, q = _program_queries(Q, M, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_mask = q < Q
    d_mask = d < D
    query = n.to(tl.int64) * Q + q
    head = query * M + m
    softmax_max = tl.zeros([BLOCK_Q], ACC)
    softmax_sum = tl.full([BLOCK_Q], 1.0, ACC)
    if FUSED:
        softmax_max, softmax_sum = _softmax_stats(weight_ptr, head, row_mask, L * P, LP_PAD, ACC)
    head_value = value_ptr + (n.to(tl.int64) * S * M + m) * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
    for level in range(L):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(ACC)
        width_f = width.to(ACC)
        for p in range(P):
            sample = head * (L * P) + level * P + p
            loc_x, loc_y, weight = _load_sample(
                loc_ptr,
                ref_ptr,
                weight_ptr,
                query,
                sample,
                level,
                height_f,
                width_f,
                softmax_max,
                softmax_sum,
                row_mask,
                L,
                FUSED,
                ACC,
            )
            valid, x0, y0, frac_x, frac_y = _bilinear(loc_x, loc_y, height_f, width_f, row_mask)
            weight = tl.where(valid, weight, 0.0)  # a sample outside reads nothing, not even a NaN weight
            for corner in tl.static_range(4):
                inside, pixel, corner_weight, _, _ = _corner(
                    x0, y0, frac_x, frac_y, valid, height, width, corner % 2, corner // 2
                )
                rows = (start + pixel) * (M * D)
                v = tl.load(
                    head_value + rows[:, None] + d[None, :], mask=inside[:, None] & d_mask[None, :], other=0.0
                ).to(ACC)
                acc += (weight * corner_weight)[:, None] * v
    out = out_ptr + head[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.autotune(
    configs=_configs(),
    key=["D", "M", "L", "P", "SIZE_CLASS", "FUSED", "ATOMIC_GRAD_VALUE"],
    reset_to_zero=["grad_value_ptr"],
)
@triton.jit
def _backward_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    ref_ptr,
    loc_ptr,
    weight_ptr,
    grad_value_ptr,
    grad_weight_ptr,
    grad_xy_ptr,
    Q,
    S,
    D,
    SIZE_CLASS,
    M: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    LP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FUSED: tl.constexpr,
    ATOMIC_GRAD_VALUE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """grad_weight (d loss / d weight) and grad_xy (normalized units, or pixels when FUSED) per sample;
    grad_value with atomics when ATOMIC_GRAD_VALUE. All gradient buffers are in the accumulation dtype."""
    n, m, q = _program_queries(Q, M, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_mask = q < Q
    d_mask = d < D
    tile_mask = row_mask[:, None] & d_mask[None, :]
    query = n.to(tl.int64) * Q + q
    head = query * M + m
    softmax_max = tl.zeros([BLOCK_Q], ACC)
    softmax_sum = tl.full([BLOCK_Q], 1.0, ACC)
    if FUSED:
        softmax_max, softmax_sum = _softmax_stats(weight_ptr, head, row_mask, L * P, LP_PAD, ACC)
    go = tl.load(grad_out_ptr + head[:, None] * D + d[None, :], mask=tile_mask, other=0.0).to(ACC)
    head_offset = (n.to(tl.int64) * S * M + m) * D
    for level in range(L):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(ACC)
        width_f = width.to(ACC)
        for p in range(P):
            sample = head * (L * P) + level * P + p
            loc_x, loc_y, weight = _load_sample(
                loc_ptr,
                ref_ptr,
                weight_ptr,
                query,
                sample,
                level,
                height_f,
                width_f,
                softmax_max,
                softmax_sum,
                row_mask,
                L,
                FUSED,
                ACC,
            )
            valid, x0, y0, frac_x, frac_y = _bilinear(loc_x, loc_y, height_f, width_f, row_mask)
            weight = tl.where(valid, weight, 0.0)
            grad_weight = tl.zeros([BLOCK_Q], ACC)
            grad_x = tl.zeros([BLOCK_Q], ACC)
            grad_y = tl.zeros([BLOCK_Q], ACC)
            for corner in tl.static_range(4):
                inside, pixel, corner_weight, dweight_dx, dweight_dy = _corner(
                    x0, y0, frac_x, frac_y, valid, height, width, corner % 2, corner // 2
                )
                offsets = head_offset + ((start + pixel) * (M * D))[:, None] + d[None, :]
                corner_mask = inside[:, None] & d_mask[None, :]
                v = tl.load(value_ptr + offsets, mask=corner_mask, other=0.0).to(ACC)
                dot = tl.sum(go * v, axis=1)
                grad_weight += corner_weight * dot
                grad_x += dweight_dx * dot
                grad_y += dweight_dy * dot
                if ATOMIC_GRAD_VALUE:
                    tl.atomic_add(
                        grad_value_ptr + offsets,
                        (weight * corner_weight)[:, None] * go,
                        mask=corner_mask,
                        sem="relaxed",
                    )
            grad_x = grad_x * weight
            grad_y = grad_y * weight
            if not FUSED:
                grad_x = grad_x * width_f
                grad_y = grad_y * height_f
            tl.store(grad_weight_ptr + sample, grad_weight, mask=row_mask)
            tl.store(grad_xy_ptr + 2 * sample, grad_x, mask=row_mask)
            tl.store(grad_xy_ptr + 2 * sample + 1, grad_y, mask=row_mask)


@triton.jit
def _contribution_kernel(
    shapes_ptr,
    starts_ptr,
    ref_ptr,
    loc_ptr,
    weight_ptr,
    destination_ptr,
    coefficient_ptr,
    Q,
    S,
    num_rows,
    M: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    LP_PAD: tl.constexpr,
    FUSED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Deterministic grad_value, step 1: destination row (n, s, m) of each (sample, corner), or num_rows when
    it contributes nothing, and its coefficient weight * bilinear weight."""
    n, m, q = _program_queries(Q, M, BLOCK_Q)
    row_mask = q < Q
    query = n.to(tl.int64) * Q + q
    head = query * M + m
    softmax_max = tl.zeros([BLOCK_Q], ACC)
    softmax_sum = tl.full([BLOCK_Q], 1.0, ACC)
    if FUSED:
        softmax_max, softmax_sum = _softmax_stats(weight_ptr, head, row_mask, L * P, LP_PAD, ACC)
    for level in range(L):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(ACC)
        width_f = width.to(ACC)
        for p in range(P):
            sample = head * (L * P) + level * P + p
            loc_x, loc_y, weight = _load_sample(
                loc_ptr,
                ref_ptr,
                weight_ptr,
                query,
                sample,
                level,
                height_f,
                width_f,
                softmax_max,
                softmax_sum,
                row_mask,
                L,
                FUSED,
                ACC,
            )
            valid, x0, y0, frac_x, frac_y = _bilinear(loc_x, loc_y, height_f, width_f, row_mask)
            for corner in tl.static_range(4):
                inside, pixel, corner_weight, _, _ = _corner(
                    x0, y0, frac_x, frac_y, valid, height, width, corner % 2, corner // 2
                )
                row = (n.to(tl.int64) * S + start + pixel) * M + m
                row = tl.where(inside, row, num_rows)
                tl.store(destination_ptr + 4 * sample + corner, row, mask=row_mask)
                tl.store(coefficient_ptr + 4 * sample + corner, weight * corner_weight, mask=row_mask)


@triton.jit
def _gather_grad_value_kernel(
    grad_out_ptr,
    order_ptr,
    coefficient_ptr,
    row_begin_ptr,
    grad_value_ptr,
    D,
    SAMPLES_PER_HEAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    """Deterministic grad_value, step 2: row (n, s, m) sums its contributions in sorted order."""
    row = tl.program_id(0).to(tl.int64)
    begin = tl.load(row_begin_ptr + row)
    end = tl.load(row_begin_ptr + row + 1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_D], ACC)
    for first in range(begin, end, BLOCK_E):
        e = first + tl.arange(0, BLOCK_E)
        e_mask = e < end
        entry = tl.load(order_ptr + e, mask=e_mask, other=0)
        coefficient = tl.load(coefficient_ptr + entry, mask=e_mask, other=0.0)
        head = entry // SAMPLES_PER_HEAD
        go = tl.load(
            grad_out_ptr + head[:, None] * D + d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0
        ).to(ACC)
        acc += tl.sum(coefficient[:, None] * go, axis=0)
    tl.store(grad_value_ptr + row * D + d, acc, mask=d_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_constants(value: torch.Tensor, levels: int, points: int) -> dict:
    _, _, heads, channels = value.shape
    return dict(
        M=heads,
        L=levels,
        P=points,
        LP_PAD=triton.next_power_of_2(levels * points),
        BLOCK_D=triton.next_power_of_2(channels),
        ACC=_tl_acc(value.dtype),
    )


def sampling_forward(value, spatial_shapes, level_start_index, reference_points, locations, weights, fused):
    """Shared forward of the plain (locations, weights) and fused (offsets, logits) ops. -> (N, Q, M * D)."""
    batch, num_values, heads, channels = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    output = torch.empty(batch, queries, heads * channels, device=value.device, dtype=value.dtype)
    if output.numel() == 0:
        return output
    grid = lambda meta: (triton.cdiv(queries, meta["BLOCK_Q"]) * batch * heads,)
    _forward_kernel[grid](
        value,
        spatial_shapes,
        level_start_index,
        reference_points,
        locations,
        weights,
        output,
        queries,
        num_values,
        channels,
        size_class(batch * queries * heads),
        FUSED=fused,
        **_launch_constants(value, levels, points),
        **SAMPLING_OPTIONS,
    )
    return output


def sampling_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    locations,
    weights,
    fused,
    deterministic,
):
    """Shared backward. Returns grad_value (value's dtype) and, in the accumulation dtype, d loss / d weight
    (N, Q, M, L, P) and d loss / d location (normalized units; pixels when fused) (N, Q, M, L, P, 2)."""
    batch, num_values, heads, channels = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    acc_dtype = _acc_dtype(value.dtype)
    grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_dtype)
    grad_weight = torch.zeros(locations.shape[:5], device=value.device, dtype=acc_dtype)
    grad_xy = torch.zeros(locations.shape, device=value.device, dtype=acc_dtype)
    if grad_weight.numel() == 0 or value.numel() == 0:
        return grad_value.to(value.dtype), grad_weight, grad_xy
    grad_output = grad_output.contiguous()
    constants = _launch_constants(value, levels, points)
    grid = lambda meta: (triton.cdiv(queries, meta["BLOCK_Q"]) * batch * heads,)
    _backward_kernel[grid](
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        reference_points,
        locations,
        weights,
        grad_value,
        grad_weight,
        grad_xy,
        queries,
        num_values,
        channels,
        size_class(batch * queries * heads),
        FUSED=fused,
        ATOMIC_GRAD_VALUE=not deterministic,
        **constants,
        **SAMPLING_OPTIONS,
    )
    if deterministic:
        num_samples = grad_weight.numel()
        num_rows = batch * num_values * heads
        destination = torch.empty(4 * num_samples, device=value.device, dtype=torch.int64)
        coefficient = torch.empty(4 * num_samples, device=value.device, dtype=acc_dtype)
        block_q = 16
        constants.pop("BLOCK_D")
        _contribution_kernel[(triton.cdiv(queries, block_q) * batch * heads,)](
            spatial_shapes,
            level_start_index,
            reference_points,
            locations,
            weights,
            destination,
            coefficient,
            queries,
            num_values,
            num_rows,
            FUSED=fused,
            BLOCK_Q=block_q,
            **constants,
            **SAMPLING_OPTIONS,
        )
        # A stable sort keeps each row's contributions in sample order: a fixed summation order.
        sorted_destination, order = torch.sort(destination, stable=True)
        rows = torch.arange(num_rows + 1, device=value.device, dtype=torch.int64)
        row_begin = torch.searchsorted(sorted_destination, rows)
        _gather_grad_value_kernel[(num_rows,)](
            grad_output,
            order,
            coefficient,
            row_begin,
            grad_value,
            channels,
            SAMPLES_PER_HEAD=4 * levels * points,
            BLOCK_D=triton.next_power_of_2(channels),
            BLOCK_E=16,
            ACC=constants["ACC"],
        )
    return grad_value.to(value.dtype), grad_weight, grad_xy


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N, S, M, D); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
    sampling_locations (N, Q, M, L, P, 2); attention_weights (N, Q, M, L, P) -> (N, Q, M * D)."""
    return sampling_forward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        sampling_locations,
        attention_weights,
        fused=False,
    )


def ms_deform_attn_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    deterministic,
):
    """-> (grad_value, grad_sampling_locations, grad_attention_weights), each in value's dtype."""
    grad_value, grad_weight, grad_xy = sampling_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        sampling_locations,
        attention_weights,
        fused=False,
        deterministic=deterministic,
    )
    return grad_value, grad_xy.to(value.dtype), grad_weight.to(value.dtype)

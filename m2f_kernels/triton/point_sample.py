"""Triton kernels of point_sample (bilinear, align_corners=False, zero padding), DESIGN.md 2.3.

Also holds the bilinear helpers shared by the other point-loss Triton kernels. Convention (all backends): a
point contributes, in value and gradient, only if -1 < x < W and -1 < y < H with x = u * W - 0.5; corners
outside the image read 0; gradients use the floor cell.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SAMPLING_OPTIONS, block_configs, size_class

POINT_BLOCKS = [{"BLOCK": block} for block in (128, 256, 512, 1024)]
FORWARD_FIXED = triton.Config({"BLOCK": 256}, num_warps=4)
BACKWARD_FIXED = triton.Config({"BLOCK": 256}, num_warps=4)
SEGMENT_BLOCK = 128


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulate_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def program_points(num_points, BLOCK: tl.constexpr):
    """Batch row n (image or mask, int64) and point indices of this program. The grid is 1-D, the point blocks
    of a row consecutive: a 2-D grid would bound the block count by CUDA's 65,535 limit on axes 1 and 2."""
    blocks = tl.cdiv(num_points, BLOCK)
    n = (tl.program_id(0) // blocks).to(tl.int64)
    points = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
    return n, points


@triton.jit
def locate_points(coord_x, coord_y, point_mask, height, width):
    """Floor cell of each point: (x0, y0) int64, fractions (lx, ly) and whether the point contributes."""
    x = coord_x * width - 0.5
    y = coord_y * height - 0.5
    valid = point_mask & (x > -1.0) & (x < width) & (y > -1.0) & (y < height)
    x = tl.where(valid, x, 0.0)
    y = tl.where(valid, y, 0.0)
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    return x_floor.to(tl.int64), y_floor.to(tl.int64), x - x_floor, y - y_floor, valid


@triton.jit
def corner_masks(x0, y0, valid, height, width):
    """Which of the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) lie inside the plane."""
    x0_in = x0 >= 0
    x1_in = x0 + 1 < width
    y0_in = valid & (y0 >= 0)
    y1_in = valid & (y0 + 1 < height)
    return y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in


@triton.jit
def read_corners(plane_ptr, x0, y0, valid, height, width, ACC: tl.constexpr):
    """The four corner values (0 outside) as ACC."""
    in00, in01, in10, in11 = corner_masks(x0, y0, valid, height, width)
    offset = y0 * width + x0
    v00 = tl.load(plane_ptr + offset, mask=in00, other=0).to(ACC)
    v01 = tl.load(plane_ptr + offset + 1, mask=in01, other=0).to(ACC)
    v10 = tl.load(plane_ptr + offset + width, mask=in10, other=0).to(ACC)
    v11 = tl.load(plane_ptr + offset + width + 1, mask=in11, other=0).to(ACC)
    return v00, v01, v10, v11


@triton.jit
def sample_plane(plane_ptr, x0, y0, lx, ly, valid, height, width, ACC: tl.constexpr):
    v00, v01, v10, v11 = read_corners(plane_ptr, x0, y0, valid, height, width, ACC)
    hx = 1.0 - lx
    hy = 1.0 - ly
    return hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)


@triton.jit
def scatter_corners(
    grad_plane_ptr,
    index_ptr,
    value_ptr,
    grad,
    x0,
    y0,
    lx,
    ly,
    valid,
    point_mask,
    height,
    width,
    DETERMINISTIC: tl.constexpr,
):
    """Adds grad * bilinear weight to the four corners of each point.

    Deterministic: writes (flat index, contribution) pairs to index_ptr / value_ptr at 4 * point + corner
    (index -1 and contribution 0 for corners outside), for add_pairs_in_order afterwards. Otherwise
    atomically adds into grad_plane_ptr.
    """
    in00, in01, in10, in11 = corner_masks(x0, y0, valid, height, width)
    hx = 1.0 - lx
    hy = 1.0 - ly
    offset = y0 * width + x0
    if DETERMINISTIC:
        tl.store(index_ptr + 0, tl.where(in00, offset, -1), mask=point_mask)
        tl.store(value_ptr + 0, tl.where(in00, grad * hx * hy, 0.0), mask=point_mask)
        tl.store(index_ptr + 1, tl.where(in01, offset + 1, -1), mask=point_mask)
        tl.store(value_ptr + 1, tl.where(in01, grad * lx * hy, 0.0), mask=point_mask)
        tl.store(index_ptr + 2, tl.where(in10, offset + width, -1), mask=point_mask)
        tl.store(value_ptr + 2, tl.where(in10, grad * hx * ly, 0.0), mask=point_mask)
        tl.store(index_ptr + 3, tl.where(in11, offset + width + 1, -1), mask=point_mask)
        tl.store(value_ptr + 3, tl.where(in11, grad * lx * ly, 0.0), mask=point_mask)
    else:
        tl.atomic_add(grad_plane_ptr + offset, grad * hx * hy, mask=in00, sem="relaxed")
        tl.atomic_add(grad_plane_ptr + offset + 1, grad * lx * hy, mask=in01, sem="relaxed")
        tl.atomic_add(grad_plane_ptr + offset + width, grad * hx * ly, mask=in10, sem="relaxed")
        tl.atomic_add(grad_plane_ptr + offset + width + 1, grad * lx * ly, mask=in11, sem="relaxed")


@triton.autotune(
    configs=block_configs(FORWARD_FIXED, POINT_BLOCKS, (2, 4, 8)),
    key=["POINTS_CLASS", "PLANE_CLASS", "CHANNELS_CLASS"],
)
@triton.jit
def _point_sample_forward_kernel(
    input_ptr,
    coords_ptr,
    output_ptr,
    channels,
    height,
    width,
    num_points,
    POINTS_CLASS,
    PLANE_CLASS,
    CHANNELS_CLASS,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, points = program_points(num_points, BLOCK)
    point_mask = points < num_points
    coord_offset = (n * num_points + points) * 2
    coord_x = tl.load(coords_ptr + coord_offset, mask=point_mask, other=0).to(ACC)
    coord_y = tl.load(coords_ptr + coord_offset + 1, mask=point_mask, other=0).to(ACC)
    x0, y0, lx, ly, valid = locate_points(coord_x, coord_y, point_mask, height, width)
    for c in range(channels):
        plane = n * channels + c
        value = sample_plane(input_ptr + plane * height * width, x0, y0, lx, ly, valid, height, width, ACC)
        tl.store(
            output_ptr + plane * num_points + points, value.to(output_ptr.dtype.element_ty), mask=point_mask
        )


@triton.autotune(
    configs=block_configs(BACKWARD_FIXED, POINT_BLOCKS, (2, 4, 8)),
    key=["POINTS_CLASS", "PLANE_CLASS", "CHANNELS_CLASS", "DETERMINISTIC"],
    reset_to_zero=["grad_input_ptr"],
)
@triton.jit
def _point_sample_backward_kernel(
    grad_output_ptr,
    input_ptr,
    coords_ptr,
    grad_input_ptr,
    grad_coords_ptr,
    index_ptr,
    value_ptr,
    channels,
    height,
    width,
    num_points,
    POINTS_CLASS,
    PLANE_CLASS,
    CHANNELS_CLASS,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    n, points = program_points(num_points, BLOCK)
    point_mask = points < num_points
    coord_offset = (n * num_points + points) * 2
    coord_x = tl.load(coords_ptr + coord_offset, mask=point_mask, other=0).to(ACC)
    coord_y = tl.load(coords_ptr + coord_offset + 1, mask=point_mask, other=0).to(ACC)
    x0, y0, lx, ly, valid = locate_points(coord_x, coord_y, point_mask, height, width)
    hx = 1.0 - lx
    hy = 1.0 - ly
    grad_x = tl.zeros([BLOCK], dtype=ACC)
    grad_y = tl.zeros([BLOCK], dtype=ACC)
    for c in range(channels):
        plane = n * channels + c
        grad = tl.load(grad_output_ptr + plane * num_points + points, mask=point_mask, other=0).to(ACC)
        v00, v01, v10, v11 = read_corners(
            input_ptr + plane * height * width, x0, y0, valid, height, width, ACC
        )
        grad_x += grad * (hy * (v01 - v00) + ly * (v11 - v10))
        grad_y += grad * (hx * (v10 - v00) + lx * (v11 - v01))
        pair_offset = (plane * num_points + points) * 4
        scatter_corners(
            grad_input_ptr + plane * height * width,
            index_ptr + pair_offset,
            value_ptr + pair_offset,
            grad,
            x0,
            y0,
            lx,
            ly,
            valid,
            point_mask,
            height,
            width,
            DETERMINISTIC,
        )
    grad_x = tl.where(valid, grad_x * width, 0.0)
    grad_y = tl.where(valid, grad_y * height, 0.0)
    tl.store(grad_coords_ptr + coord_offset, grad_x.to(grad_coords_ptr.dtype.element_ty), mask=point_mask)
    tl.store(grad_coords_ptr + coord_offset + 1, grad_y.to(grad_coords_ptr.dtype.element_ty), mask=point_mask)


def point_sample_forward(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """input (N, C, H, W), coords (N, P, 2) normalized (x, y) -> (N, C, P) in input's dtype.

    Every output is computed by one lane, so the result does not depend on the autotuned config.
    """
    batch, channels, height, width = input.shape
    num_points = coords.shape[1]
    output = torch.empty(batch, channels, num_points, dtype=input.dtype, device=input.device)
    _point_sample_forward_kernel[lambda meta: (batch * triton.cdiv(num_points, meta["BLOCK"]),)](
        input,
        coords,
        output,
        channels,
        height,
        width,
        num_points,
        size_class(num_points),
        size_class(height * width),
        size_class(channels),
        ACC=triton_accumulate_dtype(input.dtype),
        **SAMPLING_OPTIONS,
    )
    return output


@triton.jit
def _add_segments_kernel(
    target_ptr, positions_ptr, starts_ptr, counts_ptr, values_ptr, num_segments, BLOCK: tl.constexpr
):
    """target[positions[s]] += values[starts[s]] + ... + values[starts[s] + counts[s] - 1], summed left to right."""
    segments = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    segment_mask = segments < num_segments
    starts = tl.load(starts_ptr + segments, mask=segment_mask, other=0)
    counts = tl.load(counts_ptr + segments, mask=segment_mask, other=0)
    total = tl.zeros([BLOCK], dtype=values_ptr.dtype.element_ty)
    for k in range(0, tl.max(counts, axis=0)):
        total += tl.load(values_ptr + starts + k, mask=k < counts, other=0)
    positions = tl.load(positions_ptr + segments, mask=segment_mask, other=0)
    current = tl.load(target_ptr + positions, mask=segment_mask, other=0)
    tl.store(target_ptr + positions, current + total, mask=segment_mask)


def add_pairs_in_order(grad_planes: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Adds values (planes, K) at flat positions index (planes, K) of grad_planes (planes, H * W); index -1 = skip.

    Deterministic on every device, without relying on torch.use_deterministic_algorithms: the pairs are
    stably sorted by position (so duplicates keep their order in `values`), and each position's contributions
    are summed by one lane, left to right, then added to grad_planes. The result is the sequential sum in pair
    order and does not depend on block sizes or thread timing. The work of a block of positions is its
    largest number of duplicates.
    """
    plane_size = grad_planes.shape[1]
    plane_offsets = torch.arange(grad_planes.shape[0], device=index.device).unsqueeze(1) * plane_size
    inside = (index >= 0).view(-1)
    flat_index = (index + plane_offsets).view(-1)[inside]
    if flat_index.numel() == 0:
        return
    sorted_index, order = torch.sort(flat_index, stable=True)
    sorted_values = values.reshape(-1)[inside][order].contiguous()
    positions, counts = torch.unique_consecutive(sorted_index, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    num_segments = positions.numel()
    _add_segments_kernel[(triton.cdiv(num_segments, SEGMENT_BLOCK),)](
        grad_planes, positions, starts, counts, sorted_values, num_segments, BLOCK=SEGMENT_BLOCK
    )


def point_sample_backward(
    grad_output: torch.Tensor, input: torch.Tensor, coords: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_input (N, C, H, W) in input's dtype, grad_coords (N, P, 2) in coords' dtype).

    grad_coords sums over channels in order in one lane; with deterministic, grad_input is summed by
    add_pairs_in_order: both are then independent of the autotuned config. Otherwise grad_input is
    accumulated with atomics (order depends on timing).
    """
    batch, channels, height, width = input.shape
    num_points = coords.shape[1]
    acc_dtype = accumulate_dtype(input.dtype)
    grad_input = torch.zeros(batch * channels, height * width, dtype=acc_dtype, device=input.device)
    grad_coords = torch.empty_like(coords)
    if deterministic:
        index = torch.empty(batch * channels, num_points * 4, dtype=torch.int64, device=input.device)
        values = torch.empty(batch * channels, num_points * 4, dtype=acc_dtype, device=input.device)
    else:
        index = values = grad_input  # unused
    _point_sample_backward_kernel[lambda meta: (batch * triton.cdiv(num_points, meta["BLOCK"]),)](
        grad_output,
        input,
        coords,
        grad_input,
        grad_coords,
        index,
        values,
        channels,
        height,
        width,
        num_points,
        size_class(num_points),
        size_class(height * width),
        size_class(channels),
        ACC=triton_accumulate_dtype(input.dtype),
        DETERMINISTIC=deterministic,
        **SAMPLING_OPTIONS,
    )
    if deterministic:
        add_pairs_in_order(grad_input, index, values)
    return grad_input.view(input.shape).to(input.dtype), grad_coords

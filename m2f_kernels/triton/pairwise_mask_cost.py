"""Triton kernels of pairwise_mask_cost: the matcher's (Q, T) sigmoid-CE and dice costs, DESIGN.md 2.3.

The CE cost is the sigmoid CE summed over the points, (sum softplus(x) - x . t) / P: Mask2Former's three dot
products softplus(-x) . t + softplus(x) . (1 - t) come to that sum (softplus(-x) - softplus(x) = -x), so two dot
products per pair suffice, x . t and sigmoid(x) . t. Where a prediction is confidently right the two sums
cancel: there the float32 cost is exact to a few 1e-6 (at |x| up to 20) rather than relatively, and it is kept
at 0 or above.

The points are split into consecutive ranges, so that a few (queries x targets) tiles still fill the GPU: a
program of the partial kernel owns one tile and one split, walks over the split's points and writes the
split's two dot products per pair, its sums of softplus(x) and sigmoid(x) (from the first target tile) and of
the labels (from the first query tile); no (Q, T, P) tensor is stored. The finalize kernel adds the splits in a
fixed order and forms the costs. The number of splits depends only on the shapes and the multiprocessor count,
and a split's length is a multiple of every config's BLOCK_P. The tile and point-chunk sizes are autotuned per
shape class (queries, targets, points bucketed to powers of two); the sums within a split follow the chunking,
so their rounding depends on the config, which is pinned to FIXED while
torch.are_deterministic_algorithms_enabled().
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_configs, dot, interpreting, launch, multiprocessor_count, size_class
from .point_sample import accumulate_dtype, triton_accumulate_dtype

FIXED = triton.Config({"BLOCK_Q": 32, "BLOCK_T": 32, "BLOCK_P": 32}, num_warps=4)
TILES = [
    {"BLOCK_Q": block_q, "BLOCK_T": block_t, "BLOCK_P": block_p}
    for block_q in (32, 64)
    for block_t in (16, 32, 64)
    for block_p in (32, 64)
]
SPLIT_ALIGNMENT = max(FIXED.kwargs["BLOCK_P"], *(tile["BLOCK_P"] for tile in TILES))
MIN_SPLIT_CHUNKS = 8  # on GPU, a split is at least this many chunks of SPLIT_ALIGNMENT points
INTERPRETER_SPLITS = 4
MAX_SPLITS = 65535  # CUDA's limit on grid dimension 1
FINALIZE_BLOCK_SPLITS = 16
FINALIZE_BLOCK_PAIRS = 64


@triton.autotune(
    configs=block_configs(FIXED, TILES, (4, 8)), key=["QUERIES_CLASS", "TARGETS_CLASS", "POINTS_CLASS"]
)
@triton.jit
def _pairwise_partial_kernel(
    logits_ptr,
    targets_ptr,
    partial_dots_ptr,
    partial_query_sums_ptr,
    partial_target_sums_ptr,
    num_queries,
    num_targets,
    num_points,
    points_per_split,
    QUERIES_CLASS,
    TARGETS_CLASS,
    POINTS_CLASS,
    ACC: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Grid (query tiles * target tiles, splits). Writes partial_dots[split, :, q, t] = (x . t, sigmoid(x) . t)
    over the split's points, partial_query_sums[split, :, q] = (sum softplus(x), sum sigmoid(x)) and
    partial_target_sums[split, t]."""
    # Axis 0 holds the tiles (no 65,535 limit): program = query_tile * target_tiles + target_tile.
    target_tiles = tl.cdiv(num_targets, BLOCK_T)
    query_tile = tl.program_id(0) // target_tiles
    target_tile = tl.program_id(0) % target_tiles
    split = tl.program_id(1)
    queries = query_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    targets = target_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    query_mask = queries < num_queries
    target_mask = targets < num_targets
    point_begin = split * points_per_split
    point_end = tl.minimum(point_begin + points_per_split, num_points)
    logit_dot = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)  # x . t
    prob_dot = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)  # sigmoid(x) . t
    softplus_sum = tl.zeros([BLOCK_Q], dtype=ACC)
    prob_sum = tl.zeros([BLOCK_Q], dtype=ACC)
    target_sum = tl.zeros([BLOCK_T], dtype=ACC)
    for start in range(point_begin, point_end, BLOCK_P):
        points = start + tl.arange(0, BLOCK_P)
        point_mask = points < point_end
        logit_mask = query_mask[:, None] & point_mask[None, :]
        label_mask = target_mask[:, None] & point_mask[None, :]
        logit = tl.load(
            logits_ptr + queries[:, None].to(tl.int64) * num_points + points[None, :],
            mask=logit_mask,
            other=0,
        ).to(ACC)
        label = tl.load(
            targets_ptr + targets[:, None].to(tl.int64) * num_points + points[None, :],
            mask=label_mask,
            other=0,
        ).to(ACC)
        exp_term = tl.exp(-tl.abs(logit))
        softplus = tl.where(logit_mask, tl.maximum(logit, 0.0) + tl.log(1.0 + exp_term), 0.0)
        prob = tl.where(logit_mask, tl.where(logit >= 0, 1.0, exp_term) / (1.0 + exp_term), 0.0)
        label_t = tl.trans(label)
        logit_dot += dot(logit, label_t, INTERPRETED)
        prob_dot += dot(prob, label_t, INTERPRETED)
        softplus_sum += tl.sum(softplus, axis=1)
        prob_sum += tl.sum(prob, axis=1)
        target_sum += tl.sum(label, axis=1)
    # Rows of the (S, 2, Q) planes, which index the (S, 2, Q, T) dot products too.
    logit_rows = split.to(tl.int64) * 2 * num_queries + queries
    prob_rows = logit_rows + num_queries
    pair_mask = query_mask[:, None] & target_mask[None, :]
    logit_dots_ptr = partial_dots_ptr + logit_rows[:, None] * num_targets + targets[None, :]
    prob_dots_ptr = partial_dots_ptr + prob_rows[:, None] * num_targets + targets[None, :]
    tl.store(logit_dots_ptr, logit_dot, mask=pair_mask)
    tl.store(prob_dots_ptr, prob_dot, mask=pair_mask)
    query_sums_mask = query_mask & (target_tile == 0)
    tl.store(partial_query_sums_ptr + logit_rows, softplus_sum, mask=query_sums_mask)
    tl.store(partial_query_sums_ptr + prob_rows, prob_sum, mask=query_sums_mask)
    split_targets = split.to(tl.int64) * num_targets + targets
    tl.store(partial_target_sums_ptr + split_targets, target_sum, mask=target_mask & (query_tile == 0))


@triton.jit
def _pairwise_finalize_kernel(
    partial_dots_ptr,
    partial_query_sums_ptr,
    partial_target_sums_ptr,
    ce_ptr,
    dice_ptr,
    num_queries,
    num_targets,
    num_points,
    num_splits,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    """Grid (pair blocks,). Sums partial_dots (S, 2, Q, T), partial_query_sums (S, 2, Q) and
    partial_target_sums (S, T) over the S splits, BLOCK_SPLITS at a time in split order, into ce and dice
    (Q, T)."""
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    queries = pairs // num_targets
    targets = pairs % num_targets
    pair_mask = queries < num_queries
    acc_dtype = partial_dots_ptr.dtype.element_ty
    logit_dot = tl.zeros([BLOCK_PAIRS], dtype=acc_dtype)
    prob_dot = tl.zeros([BLOCK_PAIRS], dtype=acc_dtype)
    softplus_sum = tl.zeros([BLOCK_PAIRS], dtype=acc_dtype)
    prob_sum = tl.zeros([BLOCK_PAIRS], dtype=acc_dtype)
    target_sum = tl.zeros([BLOCK_PAIRS], dtype=acc_dtype)
    for first_split in range(0, num_splits, BLOCK_SPLITS):
        splits = first_split + tl.arange(0, BLOCK_SPLITS).to(tl.int64)
        mask = (splits[:, None] < num_splits) & pair_mask[None, :]
        logit_rows = splits[:, None] * 2 * num_queries + queries[None, :]
        prob_rows = logit_rows + num_queries
        split_targets = splits[:, None] * num_targets + targets[None, :]
        logit_dots = tl.load(
            partial_dots_ptr + logit_rows * num_targets + targets[None, :], mask=mask, other=0
        )
        prob_dots = tl.load(partial_dots_ptr + prob_rows * num_targets + targets[None, :], mask=mask, other=0)
        logit_dot += tl.sum(logit_dots, axis=0)
        prob_dot += tl.sum(prob_dots, axis=0)
        softplus_sum += tl.sum(tl.load(partial_query_sums_ptr + logit_rows, mask=mask, other=0), axis=0)
        prob_sum += tl.sum(tl.load(partial_query_sums_ptr + prob_rows, mask=mask, other=0), axis=0)
        target_sum += tl.sum(tl.load(partial_target_sums_ptr + split_targets, mask=mask, other=0), axis=0)
    ce = (softplus_sum - logit_dot) / num_points
    ce = tl.where(ce < 0, 0.0, ce)  # rounding where the two sums cancel; NaN stays NaN
    dice = 1.0 - (2.0 * prob_dot + 1.0) / (prob_sum + target_sum + 1.0)
    tl.store(ce_ptr + pairs, ce, mask=pair_mask)
    tl.store(dice_ptr + pairs, dice, mask=pair_mask)


def _point_splits(
    num_queries: int, num_targets: int, num_points: int, device: torch.device
) -> tuple[int, int]:
    """(number of splits, points per split) of the P points.

    On GPU, enough splits to give every multiprocessor about two programs (counting FIXED's tiles), each split
    at least MIN_SPLIT_CHUNKS * SPLIT_ALIGNMENT points long; under the interpreter, up to INTERPRETER_SPLITS
    splits of at least SPLIT_ALIGNMENT points. The points per split are a multiple of SPLIT_ALIGNMENT.
    """
    if interpreting():
        wanted, min_points = INTERPRETER_SPLITS, SPLIT_ALIGNMENT
    else:
        query_tiles = triton.cdiv(num_queries, FIXED.kwargs["BLOCK_Q"])
        tiles = query_tiles * triton.cdiv(num_targets, FIXED.kwargs["BLOCK_T"])
        multiprocessors = multiprocessor_count(device)
        wanted, min_points = triton.cdiv(2 * multiprocessors, tiles), MIN_SPLIT_CHUNKS * SPLIT_ALIGNMENT
    num_splits = max(1, min(wanted, triton.cdiv(num_points, min_points), MAX_SPLITS))
    chunks_per_split = max(1, triton.cdiv(triton.cdiv(num_points, num_splits), SPLIT_ALIGNMENT))
    points_per_split = chunks_per_split * SPLIT_ALIGNMENT
    return max(1, triton.cdiv(num_points, points_per_split)), points_per_split


def pairwise_mask_cost(
    pred_point_logits: torch.Tensor, target_point_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred_point_logits (Q, P), target_point_labels (T, P) -> (ce (Q, T), dice (Q, T)).

    Costs are float32 (float64 for float64 logits). ValueError for P = 0.
    """
    num_queries, num_points = pred_point_logits.shape
    if num_points == 0:
        raise ValueError("pred_point_logits must have at least one point (P >= 1)")
    num_targets = target_point_labels.shape[0]
    acc_dtype = accumulate_dtype(pred_point_logits.dtype)
    device = pred_point_logits.device
    ce = torch.empty(num_queries, num_targets, dtype=acc_dtype, device=device)
    dice = torch.empty(num_queries, num_targets, dtype=acc_dtype, device=device)
    if num_queries == 0 or num_targets == 0:
        return ce, dice
    num_splits, points_per_split = _point_splits(num_queries, num_targets, num_points, device)
    partial_dots = torch.empty(num_splits, 2, num_queries, num_targets, dtype=acc_dtype, device=device)
    partial_query_sums = torch.empty(num_splits, 2, num_queries, dtype=acc_dtype, device=device)
    partial_target_sums = torch.empty(num_splits, num_targets, dtype=acc_dtype, device=device)
    args = (
        pred_point_logits,
        target_point_labels,
        partial_dots,
        partial_query_sums,
        partial_target_sums,
        num_queries,
        num_targets,
        num_points,
        points_per_split,
        size_class(num_queries),
        size_class(num_targets),
        size_class(num_points),
        triton_accumulate_dtype(pred_point_logits.dtype),
        interpreting(),
    )
    launch(
        _pairwise_partial_kernel,
        lambda meta: (
            triton.cdiv(num_queries, meta["BLOCK_Q"]) * triton.cdiv(num_targets, meta["BLOCK_T"]),
            num_splits,
        ),
        args,
        FIXED,
        pinned=torch.are_deterministic_algorithms_enabled(),
    )
    _pairwise_finalize_kernel[(triton.cdiv(num_queries * num_targets, FINALIZE_BLOCK_PAIRS),)](
        partial_dots,
        partial_query_sums,
        partial_target_sums,
        ce,
        dice,
        num_queries,
        num_targets,
        num_points,
        num_splits,
        BLOCK_SPLITS=FINALIZE_BLOCK_SPLITS,
        BLOCK_PAIRS=FINALIZE_BLOCK_PAIRS,
    )
    return ce, dice

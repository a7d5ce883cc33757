"""Triton kernel of pairwise_mask_cost: the matcher's (Q, T) sigmoid-CE and dice costs, DESIGN.md 2.3.

Each program owns a (queries x targets) tile and walks over the points; no (Q, T, P) tensor is stored.
The tile and point-chunk sizes are autotuned per shape class (queries, targets, points bucketed to powers
of two); the sums over points follow the chunking, so their rounding depends on the config, which is pinned
to FIXED while torch.are_deterministic_algorithms_enabled().
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_configs, launch, size_class
from .point_sample import accumulate_dtype, triton_accumulate_dtype

FIXED = triton.Config({"BLOCK_Q": 32, "BLOCK_T": 32, "BLOCK_P": 32}, num_warps=4)
TILES = [
    {"BLOCK_Q": block_q, "BLOCK_T": block_t, "BLOCK_P": block_p}
    for block_q in (32, 64)
    for block_t in (16, 32, 64)
    for block_p in (32, 64)
]


@triton.autotune(
    configs=block_configs(FIXED, TILES, (4, 8)), key=["QUERIES_CLASS", "TARGETS_CLASS", "POINTS_CLASS"]
)
@triton.jit
def _pairwise_mask_cost_kernel(
    logits_ptr,
    targets_ptr,
    ce_ptr,
    dice_ptr,
    num_queries,
    num_targets,
    num_points,
    QUERIES_CLASS,
    TARGETS_CLASS,
    POINTS_CLASS,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # 1-D grid (no 65,535 limit on the target blocks): program = query_block * target_blocks + target_block.
    target_blocks = tl.cdiv(num_targets, BLOCK_T)
    queries = (tl.program_id(0) // target_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    targets = (tl.program_id(0) % target_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    query_mask = queries < num_queries
    target_mask = targets < num_targets
    positive_dot = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)  # softplus(-x) . t
    negative_dot = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)  # softplus(x) . (1 - t)
    prob_dot = tl.zeros([BLOCK_Q, BLOCK_T], dtype=ACC)  # sigmoid(x) . t
    prob_sum = tl.zeros([BLOCK_Q], dtype=ACC)
    target_sum = tl.zeros([BLOCK_T], dtype=ACC)
    for start in range(0, num_points, BLOCK_P):
        points = start + tl.arange(0, BLOCK_P)
        point_mask = points < num_points
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
        log_term = tl.log(1.0 + tl.exp(-tl.abs(logit)))
        positive = tl.where(logit_mask, tl.maximum(-logit, 0.0) + log_term, 0.0)
        negative = tl.where(logit_mask, tl.maximum(logit, 0.0) + log_term, 0.0)
        prob = tl.where(logit_mask, 1.0 / (1.0 + tl.exp(-logit)), 0.0)
        label_t = tl.trans(label)
        positive_dot += tl.dot(positive, label_t, input_precision="ieee", out_dtype=ACC)
        negative_dot += tl.dot(negative, 1.0 - label_t, input_precision="ieee", out_dtype=ACC)
        prob_dot += tl.dot(prob, label_t, input_precision="ieee", out_dtype=ACC)
        prob_sum += tl.sum(prob, axis=1)
        target_sum += tl.sum(label, axis=1)
    ce = (positive_dot + negative_dot) / num_points
    dice = 1.0 - (2.0 * prob_dot + 1.0) / (prob_sum[:, None] + target_sum[None, :] + 1.0)
    out_offset = queries[:, None].to(tl.int64) * num_targets + targets[None, :]
    out_mask = query_mask[:, None] & target_mask[None, :]
    tl.store(ce_ptr + out_offset, ce, mask=out_mask)
    tl.store(dice_ptr + out_offset, dice, mask=out_mask)


def pairwise_mask_cost(
    pred_point_logits: torch.Tensor, target_point_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred_point_logits (Q, P), target_point_labels (T, P) -> (ce (Q, T), dice (Q, T)).

    Costs are float32 (float64 for float64 logits).
    """
    num_queries, num_points = pred_point_logits.shape
    num_targets = target_point_labels.shape[0]
    acc_dtype = accumulate_dtype(pred_point_logits.dtype)
    device = pred_point_logits.device
    ce = torch.empty(num_queries, num_targets, dtype=acc_dtype, device=device)
    dice = torch.empty(num_queries, num_targets, dtype=acc_dtype, device=device)
    if num_queries == 0 or num_targets == 0:
        return ce, dice
    args = (
        pred_point_logits,
        target_point_labels,
        ce,
        dice,
        num_queries,
        num_targets,
        num_points,
        size_class(num_queries),
        size_class(num_targets),
        size_class(num_points),
        triton_accumulate_dtype(pred_point_logits.dtype),
    )
    launch(
        _pairwise_mask_cost_kernel,
        lambda meta: (triton.cdiv(num_queries, meta["BLOCK_Q"]) * triton.cdiv(num_targets, meta["BLOCK_T"]),),
        args,
        FIXED,
        pinned=torch.are_deterministic_algorithms_enabled(),
    )
    return ce, dice

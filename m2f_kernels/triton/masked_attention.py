"""Triton kernels for masked cross-attention with the mask built in-kernel.

Shapes: q (B, H, Q, d), k/v (B, H, K, d); the mask comes either from mask_logits (B, Q, K) (key visible iff
logit >= threshold_logit, NaN blocked) or from attn_mask (B, Hm, Q, K) bool, Hm in {1, H}, True = blocked.
A row with no visible key attends to all keys: a first pass over the mask (shared by the heads when the mask
has one head) stores one "row has a visible key" flag per row, read by the attention kernels.

Forward: online softmax over key blocks; the keys may be split across programs (split-K), each writing a
partial (max, sum, acc) that a combine kernel merges. Backward: P is recomputed from the forward's lse, with
delta = rowsum(dO * O) from a kernel of its own; one program per key block loops over all queries for dk and
dv. By default the same program adds its share of dq, dS K, to a float32 buffer with atomics, so that P and dS
are computed once. While torch.are_deterministic_algorithms_enabled(), a separate dq kernel (split over keys,
partials summed in a fixed order) recomputes them instead, and nothing uses atomics.

The query and key block sizes, warps and stages are autotuned per shape class (queries and keys bucketed to
powers of two, head dim); the sums follow the blocks, so their rounding depends on the config, which is
pinned to the head dim's fixed config while torch.are_deterministic_algorithms_enabled(). A key split is a
multiple of every key block size a launch may use.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner

from ._common import autotuning, dot, interpreting, multiprocessor_count, size_class

_MASK_LOGITS = 0
_MASK_BOOL = 1
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimensions 1 and 2 (the key splits)

# (BLOCK_Q, BLOCK_K, num_warps, num_stages) the autotuner tries; a dk/dv program owns BLOCK_K keys. Small
# blocks give the small-Q, K = 1024 shapes more programs; large ones need fewer loads per key at large K.
TUNED_BLOCKS = (
    (32, 64, 4, 2),
    (32, 64, 4, 3),
    (16, 64, 2, 2),
    (32, 32, 4, 2),
    (64, 64, 4, 2),
    (32, 128, 4, 2),
)
TUNED_CONFIGS = [
    triton.Config({"BLOCK_Q": block_q, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
    for block_q, block_k, warps, stages in TUNED_BLOCKS
]
FLAG_BLOCK_ROWS = 16
FLAG_BLOCK_K = 256
DELTA_BLOCK_ROWS = 64


@functools.cache
def fixed_config(head_dim: int) -> triton.Config:
    """The config of every launch when not autotuning (interpreter, M2F_KERNELS_TRITON_AUTOTUNE=0) and while
    deterministic algorithms are enabled: 32 queries by 64 keys, 32 keys from head dim 33 on (registers)."""
    block_k = 64 if _block_d(head_dim) <= 32 else 32
    return triton.Config({"BLOCK_Q": 32, "BLOCK_K": block_k}, num_warps=4, num_stages=3)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _autotuned(kernel, reset_to_zero=None):
    """`kernel` autotuned over TUNED_CONFIGS; `reset_to_zero` names the buffers it accumulates into, zeroed
    before each timed launch and before the real one."""
    return triton.autotune(
        configs=TUNED_CONFIGS, key=["QUERIES_CLASS", "KEYS_CLASS", "head_dim"], reset_to_zero=reset_to_zero
    )(kernel)


@triton.jit
def _block_and_batch_head(num_rows, BLOCK: tl.constexpr):
    """(block, batch * H + head) of this program. The grid's axis 0 holds both, blocks fastest, so that
    batch * heads is not bound by the 65,535 limit of axes 1 and 2."""
    blocks = tl.cdiv(num_rows, BLOCK)
    return tl.program_id(0) % blocks, tl.program_id(0) // blocks


@triton.jit
def _scaled_scores(scores, scale, INTERPRETED: tl.constexpr):
    """scores * scale, rounded: on a GPU never fused into an FMA with the subtraction of the row max or lse
    that follows, which would leave the product's rounding error where 0 belongs (past exp's range once
    |score * scale| nears 2^31). The interpreter never fuses."""
    if INTERPRETED:
        return scores * scale
    return tl.inline_asm_elementwise(
        "mul.rn.f32 $0, $1, $2;", "=r,r,r", [scores, scale], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _load_visibility(
    mask_ptr,
    mask_row_offsets,
    key_index,
    valid,
    threshold_logit,
    MASK_KIND: tl.constexpr,
):
    """Visibility of the keys `key_index` for the rows whose mask starts at `mask_row_offsets`."""
    if MASK_KIND == 0:
        logits = tl.load(mask_ptr + mask_row_offsets + key_index, mask=valid, other=float("nan"))
        visible = logits.to(tl.float32) >= threshold_logit
    else:
        blocked = tl.load(mask_ptr + mask_row_offsets + key_index, mask=valid, other=1)
        visible = blocked == 0
    return visible & valid


@triton.jit
def _row_has_visible_kernel(
    mask_ptr,
    flag_ptr,
    num_rows,
    num_keys,
    threshold_logit,
    MASK_KIND: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (row blocks, key programs): sets flag[r] = 1 (flags zeroed before) if row r of the (rows, K) mask
    has a visible key among this program's key blocks (every key_programs-th block from its own).

    Programs that find a visible key in the same row all store the same 1, so the result does not depend on
    their order."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < num_rows
    row_offsets = rows.to(tl.int64)[:, None] * num_keys
    any_visible = tl.zeros((BLOCK_ROWS,), dtype=tl.int32)
    for key_start in range(tl.program_id(1) * BLOCK_K, num_keys, tl.num_programs(1) * BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        valid = row_valid[:, None] & (keys[None, :] < num_keys)
        visible = _load_visibility(mask_ptr, row_offsets, keys[None, :], valid, threshold_logit, MASK_KIND)
        any_visible = tl.maximum(any_visible, tl.max(visible.to(tl.int32), axis=1))
    tl.store(flag_ptr + rows, any_visible.to(tl.int8), mask=row_valid & (any_visible != 0))


@_autotuned
@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    flag_ptr,
    out_ptr,
    lse_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    num_heads,
    num_queries,
    num_keys,
    head_dim,
    mask_heads,
    keys_per_split,
    threshold_logit,
    scale,
    QUERIES_CLASS,
    KEYS_CLASS,
    MASK_KIND: tl.constexpr,
    INTERPRETED: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    q_block, batch_head = _block_and_batch_head(num_queries, BLOCK_Q)
    split = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_row_block = batch * mask_heads + head * (mask_heads > 1)

    queries = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    query_valid = queries < num_queries
    dim_valid = dims < head_dim

    qkv_row_base = batch_head.to(tl.int64)
    q_offsets = (qkv_row_base * num_queries + queries)[:, None] * head_dim + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=query_valid[:, None] & dim_valid[None, :], other=0.0)
    mask_rows = mask_row_block.to(tl.int64) * num_queries + queries
    row_has_visible = tl.load(flag_ptr + mask_rows, mask=query_valid, other=1) != 0
    mask_row_offsets = mask_rows[:, None] * num_keys

    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)

    key_begin = split * keys_per_split
    key_end = tl.minimum(key_begin + keys_per_split, num_keys)
    for key_start in range(key_begin, key_end, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_valid = keys < key_end
        kv_offsets = (qkv_row_base * num_keys + keys)[:, None] * head_dim + dims[None, :]
        kv_valid = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_valid, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_valid, other=0.0)

        valid = query_valid[:, None] & key_valid[None, :]
        visible = _load_visibility(
            mask_ptr, mask_row_offsets, keys[None, :], valid, threshold_logit, MASK_KIND
        )
        visible = (visible | ~row_has_visible[:, None]) & valid
        scores = _scaled_scores(dot(q, tl.trans(k), INTERPRETED), scale, INTERPRETED)
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row with nothing visible yet keeps max -inf; subtracting 0 then gives exp(-inf) = 0.
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - finite_max)
        weights = tl.exp(scores - finite_max[:, None])
        row_sum = row_sum * alpha + tl.sum(weights, axis=1)
        acc = acc * alpha[:, None] + dot(weights.to(v.dtype), v, INTERPRETED)
        row_max = new_max

    out_valid = query_valid[:, None] & dim_valid[None, :]
    stat_rows = qkv_row_base * num_queries + queries
    if SINGLE_SPLIT:
        # Padding rows (query_valid False) have row_sum 0 and are not stored.
        row_sum = tl.where(query_valid, row_sum, 1.0)
        out = acc / row_sum[:, None]
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=out_valid)
        tl.store(lse_ptr + stat_rows, row_max + tl.log(row_sum), mask=query_valid)
    else:
        num_rows = (tl.num_programs(0) // tl.cdiv(num_queries, BLOCK_Q)).to(tl.int64) * num_queries
        split_rows = split * num_rows + stat_rows
        tl.store(partial_max_ptr + split_rows, row_max, mask=query_valid)
        tl.store(partial_sum_ptr + split_rows, row_sum, mask=query_valid)
        acc_offsets = split_rows[:, None] * head_dim + dims[None, :]
        tl.store(partial_acc_ptr + acc_offsets, acc, mask=out_valid)


@triton.jit
def _combine_kernel(
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    out_ptr,
    lse_ptr,
    num_rows,
    head_dim,
    num_splits,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merges the split-K partials (max, sum, acc) of each row into out and lse."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < num_rows
    valid = row_valid[:, None] & (dims[None, :] < head_dim)

    row_max = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    split_rows = rows  # split * num_rows + rows, kept in int64
    for _ in range(num_splits):
        part_max = tl.load(partial_max_ptr + split_rows, mask=row_valid, other=float("-inf"))
        part_sum = tl.load(partial_sum_ptr + split_rows, mask=row_valid, other=0.0)
        part_acc = tl.load(
            partial_acc_ptr + split_rows[:, None] * head_dim + dims[None, :], mask=valid, other=0.0
        )
        new_max = tl.maximum(row_max, part_max)
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - finite_max)
        beta = tl.exp(part_max - finite_max)
        row_sum = row_sum * alpha + part_sum * beta
        acc = acc * alpha[:, None] + part_acc * beta[:, None]
        row_max = new_max
        split_rows += num_rows

    row_sum = tl.where(row_valid, row_sum, 1.0)
    out = acc / row_sum[:, None]
    tl.store(out_ptr + rows[:, None] * head_dim + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(lse_ptr + rows, row_max + tl.log(row_sum), mask=row_valid)


@triton.jit
def _delta_kernel(
    out_ptr,
    grad_out_ptr,
    delta_ptr,
    num_rows,
    head_dim,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[r] = sum over the head dim of grad_out[r] * out[r] in float32, for the (rows, d) planes."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < num_rows
    valid = row_valid[:, None] & (dims[None, :] < head_dim)
    offsets = rows[:, None] * head_dim + dims[None, :]
    grad_out = tl.load(grad_out_ptr + offsets, mask=valid, other=0.0)
    out = tl.load(out_ptr + offsets, mask=valid, other=0.0)
    tl.store(delta_ptr + rows, tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=1), mask=row_valid)


@triton.jit
def _backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    mask_ptr,
    flag_ptr,
    grad_q_partial_ptr,
    delta_ptr,
    num_heads,
    num_queries,
    num_keys,
    head_dim,
    mask_heads,
    keys_per_split,
    threshold_logit,
    scale,
    QUERIES_CLASS,
    KEYS_CLASS,
    MASK_KIND: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_q_partial[split] = scale * sum over the split's keys of dS K, with dS = P (dP - delta) and
    delta = rowsum(dO * O) from the delta kernel; float32 partials, or grad_q itself (q's dtype) with one
    split. Deterministic backward only, so never autotuned."""
    q_block, batch_head = _block_and_batch_head(num_queries, BLOCK_Q)
    split = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_row_block = batch * mask_heads + head * (mask_heads > 1)

    queries = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    query_valid = queries < num_queries
    dim_valid = dims < head_dim
    qkv_row_base = batch_head.to(tl.int64)
    stat_rows = qkv_row_base * num_queries + queries
    q_offsets = stat_rows[:, None] * head_dim + dims[None, :]
    q_valid = query_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_valid, other=0.0)
    grad_out = tl.load(grad_out_ptr + q_offsets, mask=q_valid, other=0.0)
    lse = tl.load(lse_ptr + stat_rows, mask=query_valid, other=0.0)
    delta = tl.load(delta_ptr + stat_rows, mask=query_valid, other=0.0)
    mask_rows = mask_row_block.to(tl.int64) * num_queries + queries
    row_has_visible = tl.load(flag_ptr + mask_rows, mask=query_valid, other=1) != 0
    mask_row_offsets = mask_rows[:, None] * num_keys

    grad_q = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    key_begin = split * keys_per_split
    key_end = tl.minimum(key_begin + keys_per_split, num_keys)
    for key_start in range(key_begin, key_end, BLOCK_K):
        keys = key_start + tl.arange(0, BLOCK_K)
        key_valid = keys < key_end
        kv_offsets = (qkv_row_base * num_keys + keys)[:, None] * head_dim + dims[None, :]
        kv_valid = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_valid, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_valid, other=0.0)

        valid = query_valid[:, None] & key_valid[None, :]
        visible = _load_visibility(
            mask_ptr, mask_row_offsets, keys[None, :], valid, threshold_logit, MASK_KIND
        )
        visible = (visible | ~row_has_visible[:, None]) & valid
        scores = _scaled_scores(dot(q, tl.trans(k), INTERPRETED), scale, INTERPRETED)
        probs = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        grad_probs = dot(grad_out, tl.trans(v), INTERPRETED)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += dot(grad_scores.to(k.dtype), k, INTERPRETED)

    num_rows = (tl.num_programs(0) // tl.cdiv(num_queries, BLOCK_Q)).to(tl.int64) * num_queries
    partial_offsets = (split * num_rows + stat_rows)[:, None] * head_dim + dims[None, :]
    grad_q = (grad_q * scale).to(grad_q_partial_ptr.dtype.element_ty)
    tl.store(grad_q_partial_ptr + partial_offsets, grad_q, mask=q_valid)


@functools.partial(_autotuned, reset_to_zero=["grad_q_ptr"])
@triton.jit
def _backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    delta_ptr,
    grad_out_ptr,
    lse_ptr,
    mask_ptr,
    flag_ptr,
    grad_k_ptr,
    grad_v_ptr,
    grad_q_ptr,
    num_heads,
    num_queries,
    num_keys,
    head_dim,
    mask_heads,
    threshold_logit,
    scale,
    QUERIES_CLASS,
    KEYS_CLASS,
    MASK_KIND: tl.constexpr,
    INTERPRETED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per key block: dV = P^T dO and dK = scale * dS^T Q over all queries, with
    delta = rowsum(dO * O). With ATOMIC_DQ it also adds scale * dS K of its keys to grad_q (float32, zeroed
    before)."""
    key_block, batch_head = _block_and_batch_head(num_keys, BLOCK_K)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_row_block = batch * mask_heads + head * (mask_heads > 1)

    keys = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    key_valid = keys < num_keys
    dim_valid = dims < head_dim
    qkv_row_base = batch_head.to(tl.int64)
    kv_offsets = (qkv_row_base * num_keys + keys)[:, None] * head_dim + dims[None, :]
    kv_valid = key_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_valid, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_valid, other=0.0)

    grad_k = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for query_start in range(0, num_queries, BLOCK_Q):
        queries = query_start + tl.arange(0, BLOCK_Q)
        query_valid = queries < num_queries
        stat_rows = qkv_row_base * num_queries + queries
        q_offsets = stat_rows[:, None] * head_dim + dims[None, :]
        q_valid = query_valid[:, None] & dim_valid[None, :]
        q = tl.load(q_ptr + q_offsets, mask=q_valid, other=0.0)
        grad_out = tl.load(grad_out_ptr + q_offsets, mask=q_valid, other=0.0)
        lse = tl.load(lse_ptr + stat_rows, mask=query_valid, other=0.0)
        delta = tl.load(delta_ptr + stat_rows, mask=query_valid, other=0.0)
        mask_rows = mask_row_block.to(tl.int64) * num_queries + queries
        row_has_visible = tl.load(flag_ptr + mask_rows, mask=query_valid, other=1) != 0

        # Transposed tiles: rows are keys, columns are queries.
        valid = key_valid[:, None] & query_valid[None, :]
        visible = _load_visibility(
            mask_ptr, mask_rows[None, :] * num_keys, keys[:, None], valid, threshold_logit, MASK_KIND
        )
        visible = (visible | ~row_has_visible[None, :]) & valid
        scores = _scaled_scores(dot(k, tl.trans(q), INTERPRETED), scale, INTERPRETED)
        probs = tl.where(visible, tl.exp(scores - lse[None, :]), 0.0)
        grad_v += dot(probs.to(grad_out.dtype), grad_out, INTERPRETED)
        grad_probs = dot(v, tl.trans(grad_out), INTERPRETED)
        grad_scores = probs * (grad_probs - delta[None, :])
        grad_k += dot(grad_scores.to(q.dtype), q, INTERPRETED)
        if ATOMIC_DQ:
            grad_q = dot(tl.trans(grad_scores.to(k.dtype)), k, INTERPRETED) * scale
            tl.atomic_add(grad_q_ptr + q_offsets, grad_q, mask=q_valid, sem="relaxed")

    tl.store(grad_k_ptr + kv_offsets, (grad_k * scale).to(grad_k_ptr.dtype.element_ty), mask=kv_valid)
    tl.store(grad_v_ptr + kv_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_valid)


def _mask_source(mask_logits, attn_mask, batch, num_queries, num_keys):
    """Returns (mask tensor viewed for the kernels, mask kind, number of mask heads)."""
    if (mask_logits is None) == (attn_mask is None):
        raise ValueError("exactly one of mask_logits and attn_mask must be given")
    if mask_logits is not None:
        if tuple(mask_logits.shape) != (batch, num_queries, num_keys):
            raise ValueError(f"mask_logits must have shape (B, Q, K), got {tuple(mask_logits.shape)}")
        return mask_logits.contiguous(), _MASK_LOGITS, 1
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        raise TypeError("attn_mask must be a bool tensor of shape (B, Hm, Q, K)")
    return attn_mask.contiguous().view(torch.uint8), _MASK_BOOL, attn_mask.shape[1]


def _launch_configs(
    head_dim: int, config: triton.Config | None, deterministic: bool
) -> tuple[triton.Config | None, int]:
    """(the config every launch is pinned to, or None to autotune; the key blocks a split is a multiple of).

    `config` (tests) pins a config of TUNED_CONFIGS or any other; otherwise the launches are pinned to
    fixed_config(head_dim) when not autotuning or when `deterministic`."""
    if config is None and (not autotuning() or deterministic):
        config = fixed_config(head_dim)
    if config is not None:
        return config, config.kwargs["BLOCK_K"]
    return None, max(tuned.kwargs["BLOCK_K"] for tuned in TUNED_CONFIGS)


def _run(kernel, grid, args, config, **constexprs):
    """Launches an autotuned kernel, or the kernel (an autotuned one's function) with `config` when given."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        jit_function = kernel.fn if isinstance(kernel, Autotuner) else kernel
        jit_function[grid](*args, **config.all_kwargs(), **constexprs)


def _key_splits(device, num_keys, head_dim, num_programs, split_alignment, num_splits):
    """(number of key splits, keys per split, a multiple of split_alignment).

    By default enough splits to give every multiprocessor a few of the `num_programs` programs (counted with
    fixed_config's query blocks), each with at least four of its key blocks; `num_splits` overrides the wanted
    number."""
    if num_splits is None:
        if device.type == "cuda":
            multiprocessors = multiprocessor_count(device)
            min_split_keys = 4 * fixed_config(head_dim).kwargs["BLOCK_K"]
            wanted = triton.cdiv(4 * multiprocessors, num_programs)
            num_splits = max(1, min(wanted, triton.cdiv(num_keys, min_split_keys)))
        else:
            num_splits = 1
    num_splits = min(num_splits, _MAX_GRID_Y)
    keys_per_split = triton.cdiv(triton.cdiv(num_keys, num_splits), split_alignment) * split_alignment
    return triton.cdiv(num_keys, keys_per_split), keys_per_split


def _launch_plan(q, num_keys, config, deterministic, num_splits):
    """(the pinned config or None, number of key splits, keys per split) of the attention launches for q
    (B, H, Q, d), the programs counted with fixed_config's query blocks."""
    batch, num_heads, num_queries, head_dim = q.shape
    config, split_alignment = _launch_configs(head_dim, config, deterministic)
    query_blocks = triton.cdiv(num_queries, fixed_config(head_dim).kwargs["BLOCK_Q"])
    num_splits, keys_per_split = _key_splits(
        q.device, num_keys, head_dim, query_blocks * batch * num_heads, split_alignment, num_splits
    )
    return config, num_splits, keys_per_split


def _row_flags(mask, mask_kind, num_keys, threshold_logit):
    num_rows = mask.numel() // num_keys
    flags = torch.zeros(num_rows, device=mask.device, dtype=torch.int8)
    key_programs = min(triton.cdiv(num_keys, FLAG_BLOCK_K), _MAX_GRID_Y)
    _row_has_visible_kernel[(triton.cdiv(num_rows, FLAG_BLOCK_ROWS), key_programs)](
        mask,
        flags,
        num_rows,
        num_keys,
        threshold_logit,
        MASK_KIND=mask_kind,
        BLOCK_ROWS=FLAG_BLOCK_ROWS,
        BLOCK_K=FLAG_BLOCK_K,
    )
    return flags


def _check_inputs(q, k, v):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float32, float16 or bfloat16 for the triton backend, got {q.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"q must be (B, H, Q, d) and k, v (B, H, K, d), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


def masked_attention_forward(
    q, k, v, mask_logits, attn_mask, threshold_logit, scale, *, num_splits=None, config=None
):
    """Masked attention forward.

    q (B, H, Q, d), k/v (B, H, K, d); mask_logits (B, Q, K) or attn_mask bool (B, Hm, Q, K).
    Returns out (B, H, Q, d) in q's dtype and lse (B, H, Q) float32 (natural log). `num_splits` overrides the
    number of key splits (default: from the device's multiprocessor count), `config` the launch config.
    """
    _check_inputs(q, k, v)
    batch, num_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask, mask_kind, mask_heads = _mask_source(mask_logits, attn_mask, batch, num_queries, num_keys)
    flags = _row_flags(mask, mask_kind, num_keys, threshold_logit)

    deterministic = torch.are_deterministic_algorithms_enabled()
    config, num_splits, keys_per_split = _launch_plan(q, num_keys, config, deterministic, num_splits)
    batch_heads = batch * num_heads
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads, num_queries), device=q.device, dtype=torch.float32)
    num_rows = batch_heads * num_queries
    if num_splits == 1:
        partial_max = partial_sum = partial_acc = lse
    else:
        partial_max = torch.empty((num_splits, num_rows), device=q.device, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
        partial_acc = torch.empty((num_splits, num_rows, head_dim), device=q.device, dtype=torch.float32)
    args = (
        q,
        k,
        v,
        mask,
        flags,
        out,
        lse,
        partial_max,
        partial_sum,
        partial_acc,
        num_heads,
        num_queries,
        num_keys,
        head_dim,
        mask_heads,
        keys_per_split,
        threshold_logit,
        scale,
        size_class(num_queries),
        size_class(num_keys),
    )
    block_d = _block_d(head_dim)
    grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_Q"]) * batch_heads, num_splits)
    constexprs = {"MASK_KIND": mask_kind, "INTERPRETED": interpreting(), "BLOCK_D": block_d}
    _run(_forward_kernel, grid, args, config, SINGLE_SPLIT=num_splits == 1, **constexprs)
    if num_splits > 1:
        block_rows = 32
        _combine_kernel[(triton.cdiv(num_rows, block_rows),)](
            partial_max,
            partial_sum,
            partial_acc,
            out,
            lse,
            num_rows,
            head_dim,
            num_splits,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
        )
    return out, lse


def masked_attention_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    mask_logits,
    attn_mask,
    threshold_logit,
    scale,
    deterministic,
    *,
    num_splits=None,
    config=None,
):
    """Gradients (grad_q, grad_k, grad_v) of masked_attention_forward, in q's dtype.

    With `deterministic` (the op passes torch.are_deterministic_algorithms_enabled()) the launch config is
    pinned and dq comes from its own kernel, without atomics; otherwise the dk/dv kernel adds dq with atomics.
    """
    _check_inputs(q, k, v)
    batch, num_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    mask, mask_kind, mask_heads = _mask_source(mask_logits, attn_mask, batch, num_queries, num_keys)
    out = out.contiguous()
    flags = _row_flags(mask, mask_kind, num_keys, threshold_logit)

    config, num_splits, keys_per_split = _launch_plan(q, num_keys, config, deterministic, num_splits)
    batch_heads = batch * num_heads
    delta = torch.empty_like(lse)
    sizes = (num_heads, num_queries, num_keys, head_dim, mask_heads)
    mask_and_scale = (threshold_logit, scale, size_class(num_queries), size_class(num_keys))
    block_d = _block_d(head_dim)
    constexprs = {"MASK_KIND": mask_kind, "INTERPRETED": interpreting(), "BLOCK_D": block_d}
    num_rows = batch_heads * num_queries
    _delta_kernel[(triton.cdiv(num_rows, DELTA_BLOCK_ROWS),)](
        out, grad_out, delta, num_rows, head_dim, BLOCK_ROWS=DELTA_BLOCK_ROWS, BLOCK_D=block_d
    )
    if deterministic:
        if num_splits == 1:
            grad_q = grad_q_partial = torch.empty_like(q)
        else:
            grad_q_partial = torch.empty(
                (num_splits, batch, num_heads, num_queries, head_dim), device=q.device, dtype=torch.float32
            )
        dq_grid = lambda meta: (triton.cdiv(num_queries, meta["BLOCK_Q"]) * batch_heads, num_splits)
        dq_args = (q, k, v, grad_out, lse, mask, flags, grad_q_partial, delta, *sizes, keys_per_split)
        _run(_backward_dq_kernel, dq_grid, (*dq_args, *mask_and_scale), config, **constexprs)
        if num_splits > 1:
            grad_q = grad_q_partial.sum(0).to(q.dtype)
        grad_q_acc = grad_q  # not written without ATOMIC_DQ
    else:
        grad_q_acc = torch.zeros_like(q, dtype=torch.float32)

    grad_k = torch.empty_like(k)
    grad_v = torch.empty_like(v)
    dkdv_grid = lambda meta: (triton.cdiv(num_keys, meta["BLOCK_K"]) * batch_heads,)
    dkdv_args = (
        q,
        k,
        v,
        delta,
        grad_out,
        lse,
        mask,
        flags,
        grad_k,
        grad_v,
        grad_q_acc,
        *sizes,
        *mask_and_scale,
    )
    _run(_backward_dkdv_kernel, dkdv_grid, dkdv_args, config, ATOMIC_DQ=not deterministic, **constexprs)
    if not deterministic:
        grad_q = grad_q_acc.to(q.dtype)
    return grad_q, grad_k, grad_v

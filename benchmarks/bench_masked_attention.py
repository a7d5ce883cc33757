"""Masked cross-attention (DESIGN.md 2.2) against the usual Mask2Former computation, in the same run.

Baselines: the bool (B*H, Q, K) mask built from the mask logits (threshold 0.5, fully blocked rows opened) and
``F.scaled_dot_product_attention``; on GPU also ``flex_attention`` (compiled) with the same mask as a mask_mod
over a block mask built per call (the mask changes at every decoder layer). On GPU the Triton kernels run a
second time with deterministic algorithms on (fixed configs, dq from its own kernel instead of atomics).

GPU: decoder shapes at 1024 x 1024: B in {2, 8}, H=8, d=32, Q in {100, 200}, K in {1024, 4096, 16384}, mask
density 10 / 50 / 100 %, in float32 and in bfloat16 (q, k, v and the mask logits, as under mixed-precision
training). CPU: B=2, H=8, d=32, Q=100, K in {1024, 4096} for the C++ kernel, float32.

    pytest benchmarks/bench_masked_attention.py -s
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import m2f_kernels
from benchmarks.harness import compulsory_bytes
from m2f_kernels import available_backends

HEADS, HEAD_DIM = 8, 32
DENSITIES = (0.1, 0.5, 1.0)
# (B, Q, K), the smallest key count first: a run cut off by a time limit keeps the shapes furthest from target.
GPU_SHAPES = [
    (batch, queries, keys)
    for keys, batch, queries in itertools.product((1024, 4096, 16384), (2, 8), (100, 200))
]
CPU_SHAPES = [(2, 100, 1024), (2, 100, 4096)]
MODES = ("forward", "backward", "full")


def _configs(device: torch.device):
    """(B, Q, K, density, dtype) for the device."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    return [(*shape, density, dtype) for shape in shapes for dtype in dtypes for density in DENSITIES]


def _inputs(batch, queries, keys, density, device, dtype=torch.float32):
    """q, k, v (requiring grad) and mask logits in `dtype`, a fraction `density` of each row visible."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, queries, HEAD_DIM, generator=generator)
    k = torch.randn(batch, HEADS, keys, HEAD_DIM, generator=generator)
    v = torch.randn(batch, HEADS, keys, HEAD_DIM, generator=generator)
    magnitude = torch.rand(batch, queries, keys, generator=generator) * 4 + 0.01
    visible = torch.rand(batch, queries, keys, generator=generator) < density
    mask_logits = torch.where(visible, magnitude, -magnitude)
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, mask_logits.to(device, dtype)


def mask2former_bool_mask(mask_logits, heads):
    """Mask2Former's decoder mask: (B * heads, Q, K) bool, True = blocked, fully blocked rows opened."""
    blocked = (mask_logits.sigmoid() < 0.5).repeat_interleave(heads, dim=0)
    blocked[blocked.all(-1)] = False
    return blocked


def mask2former_sdpa(q, k, v, mask_logits):
    """Mask2Former's decoder: a bool mask per head, then dense attention."""
    batch, heads, queries, keys = *q.shape[:3], k.shape[2]
    allowed = ~mask2former_bool_mask(mask_logits, heads).view(batch, heads, queries, keys)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


_compiled_flex_attention = None


def flex_attention_masked(q, k, v, mask_logits):
    """flex_attention with the same rule as a mask_mod; the block mask is rebuilt per call, as per layer."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    batch, _, queries, keys = *q.shape[:3], k.shape[2]
    visible = mask_logits >= 0
    row_empty = ~visible.any(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible[b, q_idx, kv_idx] | row_empty[b, q_idx]

    block_mask = create_block_mask(mask_mod, batch, None, queries, keys, device=q.device)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside, the previous setting after: the Triton backward then
    takes its dq kernel instead of adding dq with atomics."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _kernel_backends(device: torch.device) -> list[str]:
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [name for name in wanted if name in available_backends()]


def _bytes_moved(q, k, v, mask_logits, mode: str) -> int:
    """Compulsory traffic of one call: the forward reads q, k, v and the mask logits and writes the output;
    the backward ("full" mode) reads them, the output and its gradient and writes the q, k and v gradients
    (the (B, H, Q) log-sum-exp left out)."""
    forward = compulsory_bytes((q, k, v, mask_logits), q.numel() * q.element_size())
    if mode == "forward":
        return forward
    grads_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    output, grad_output = q, q  # the same size as q
    return forward + compulsory_bytes((q, k, v, mask_logits, output, grad_output), grads_bytes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "config",
    _configs(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    ids=lambda config: "B{}-Q{}-K{}-density{:.0%}-{}".format(
        *config[:4], str(config[4]).removeprefix("torch.")
    ),
)
def test_masked_attention(bench, device, mode, config):
    batch, queries, keys, density, dtype = config
    q, k, v, mask_logits = _inputs(batch, queries, keys, density, device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    # float32 groups keep their earlier names, so that results files compare across commits
    group = f"masked_attention B{batch} Q{queries} K{keys} density{density:.0%}" + (
        "" if dtype == torch.float32 else f" {dtype_name}"
    )
    params = {
        "batch": batch,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "queries": queries,
        "keys": keys,
        "density": density,
        "dtype": dtype_name,
    }
    options = {
        "mode": mode,
        "grad_inputs": [q, k, v],
        "device": device,
        "params": params,
        "bytes_moved": _bytes_moved(q, k, v, mask_logits, mode),
    }
    if device.type == "cpu":
        options.update(warmup=1, repeats=5)
    baseline = bench.run(group, "sdpa_bool_mask", lambda: mask2former_sdpa(q, k, v, mask_logits), **options)
    if device.type == "cuda":
        try:
            bench.run(group, "flex_attention", lambda: flex_attention_masked(q, k, v, mask_logits), **options)
        except Exception as error:  # flex_attention availability differs between torch builds and GPUs
            print(f"flex_attention skipped: {type(error).__name__}: {error}")
    for backend in _kernel_backends(device):
        ours = bench.run(
            group,
            f"masked_attention_{backend}",
            lambda backend=backend: m2f_kernels.masked_attention(
                q, k, v, mask_logits=mask_logits, backend=backend
            ),
            **options,
        )
        print(f"{group} {mode} {backend}: {baseline.median_ms / ours.median_ms:.2f}x sdpa_bool_mask")
    if device.type == "cuda" and mode != "forward" and "triton" in _kernel_backends(device):
        with deterministic_algorithms():
            bench.run(
                group,
                "masked_attention_triton_deterministic",
                lambda: m2f_kernels.masked_attention(q, k, v, mask_logits=mask_logits, backend="triton"),
                **options,
            )


MODULE_EMBED = HEADS * HEAD_DIM
MODULE_SHAPES = {"cuda": [(2, 100, 1024), (2, 100, 4096), (2, 100, 16384)], "cpu": [(2, 100, 4096)]}


def _module_configs(device: torch.device):
    return MODULE_SHAPES["cuda" if device.type == "cuda" else "cpu"]


@pytest.mark.parametrize("mode", ("forward", "full"))
@pytest.mark.parametrize(
    "config",
    _module_configs(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    ids=lambda config: "B{}-Q{}-K{}".format(*config),
)
def test_masked_multihead_attention_module(bench, device, mode, config):
    """The decoder's cross-attention layer as Mask2Former code calls it (sequence first, embed 256, 8 heads,
    mask density 50 %): nn.MultiheadAttention with the (B*H, Q, K) bool mask built from the mask logits,
    with need_weights=False and with the default need_weights=True that detectron2's and transformers'
    decoders use, against m2f_kernels.nn.MaskedMultiheadAttention given the same bool mask (the drop-in) or
    the mask logits."""
    from torch import nn

    from m2f_kernels.nn import MaskedMultiheadAttention

    batch, queries, keys = config
    generator = torch.Generator().manual_seed(0)
    torch_attention = nn.MultiheadAttention(MODULE_EMBED, HEADS).to(device)
    ours = MaskedMultiheadAttention(MODULE_EMBED, HEADS).to(device)
    ours.load_state_dict(torch_attention.state_dict())
    query = torch.randn(queries, batch, MODULE_EMBED, generator=generator).to(device).requires_grad_()
    memory = torch.randn(keys, batch, MODULE_EMBED, generator=generator).to(device).requires_grad_()
    magnitude = torch.rand(batch, queries, keys, generator=generator) * 4 + 0.01
    visible = torch.rand(batch, queries, keys, generator=generator) < 0.5
    mask_logits = torch.where(visible, magnitude, -magnitude).to(device)

    def bool_mask():
        return mask2former_bool_mask(mask_logits, HEADS)

    group = f"masked_multihead_attention B{batch} Q{queries} K{keys}"
    params = {"batch": batch, "heads": HEADS, "embed": MODULE_EMBED, "queries": queries, "keys": keys}
    options = {"mode": mode, "grad_inputs": [query, memory], "device": device, "params": params}
    if device.type == "cpu":
        options.update(warmup=1, repeats=5)
    entries = {
        "nn_multihead_attention": lambda: torch_attention(
            query, memory, memory, attn_mask=bool_mask(), need_weights=False
        )[0],
        "nn_multihead_attention_need_weights": lambda: torch_attention(
            query, memory, memory, attn_mask=bool_mask()
        )[0],
        "ours_bool_mask": lambda: ours(query, memory, memory, attn_mask=bool_mask())[0],
        "ours_mask_logits": lambda: ours(query, memory, memory, mask_logits=mask_logits)[0],
    }
    results = {name: bench.run(group, name, fn, **options) for name, fn in entries.items()}
    baseline = results["nn_multihead_attention"].median_ms
    for name, result in results.items():
        print(f"{group} {mode} {name}: {baseline / result.median_ms:.2f}x nn_multihead_attention")

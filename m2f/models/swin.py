"""Swin Transformer backbone computing what the official Swin detection backbone computes, for any input size.

The official backbone (Mask2Former's D2SwinTransformer, Hugging Face's SwinBackbone) pads every stage's
feature map on the right and bottom to a multiple of the window, then rolls it by half a window in the shifted
blocks and builds the shifted-window attention mask on the padded map; nothing depends on the size the model
was built for. Padded tokens are zero vectors (padding follows norm1) and take part in the attention as
keys, as in the official code. The input image is padded to a multiple of the patch size and odd feature maps
to an even size before patch merging.

Parameter names and shapes are timm's `SwinTransformer` (`swin_tiny_patch4_window7_224`, ...), so timm
checkpoints and the converter key maps apply unchanged:

    patch_embed.proj                     Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    patch_embed.norm                     LayerNorm(embed_dim)
    layers.{i}.downsample.norm           LayerNorm(4 C_{i-1}), i >= 1: patch merging at the start of stage i
    layers.{i}.downsample.reduction      Linear(4 C_{i-1}, C_i, bias=False); input channels ordered as the
                                         2x2 neighbours (row, col) = (0, 0), (1, 0), (0, 1), (1, 1)
    layers.{i}.blocks.{j}.norm1 / norm2  LayerNorm(C_i)
    layers.{i}.blocks.{j}.attn.qkv       Linear(C_i, 3 C_i): q, k, v stacked, heads contiguous in each
    layers.{i}.blocks.{j}.attn.proj      Linear(C_i, C_i)
    layers.{i}.blocks.{j}.attn.relative_position_bias_table  ((2 window - 1)^2, heads)
    layers.{i}.blocks.{j}.mlp.fc1 / fc2  Linear(C_i, mlp_ratio C_i) -> GELU -> Linear(mlp_ratio C_i, C_i)

with C_i = embed_dim * 2^i. The classifier's final `norm` and `head` are not part of the backbone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .padding import padded_size

# Architectures of timm's Swin models (patch size 4 for all).
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
SWIN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": dict(_TINY, window_size=7),
    "swin_small_patch4_window7_224": dict(_SMALL, window_size=7),
    "swin_base_patch4_window7_224": dict(_BASE, window_size=7),
    "swin_base_patch4_window12_384": dict(_BASE, window_size=12),
    "swin_large_patch4_window7_224": dict(_LARGE, window_size=7),
    "swin_large_patch4_window12_384": dict(_LARGE, window_size=12),
}

# timm keyword arguments accepted by `build_swin`; the ignored ones only steer timm's construction-time
# fitting of windows to a fixed image size, which this module does not do.
_ARCHITECTURE_ARGS = {
    "embed_dim", "depths", "num_heads", "window_size", "patch_size", "in_chans", "mlp_ratio", "qkv_bias",
    "drop_path_rate",
}  # fmt: skip
_IGNORED_ARGS = {"img_size", "strict_img_size", "dynamic_img_size"}

# Entries of timm Swin checkpoints for the classifier (final norm and head), unused by the backbone.
CLASSIFIER_KEYS = frozenset({"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"})

# Attention logit added between tokens of a shifted window that come from different regions of the map (the
# official value; -inf would give slightly different outputs).
_MASKED_LOGIT = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) long: row of the bias table for query token i and key token j of a window.

    Tokens are numbered row-major; the row is (dy + window - 1) * (2 window - 1) + (dx + window - 1) with
    (dy, dx) = position of i minus position of j.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive attention mask of the shifted windows of a padded (height, width) map (multiples of window).

    Returns (num_windows, window^2, window^2): 0 between two tokens of the same region, -100 otherwise.
    After the cyclic shift by `shift`, each axis has three regions: [0, size - window), [size - window,
    size - shift) and [size - shift, size); the last window along an axis mixes tokens that were not
    neighbours.
    """

    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window).long() + (index >= size - shift).long()

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = labels.view(height // window, window, width // window, window).transpose(1, 2)
    labels = labels.reshape(-1, window * window)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill(different, _MASKED_LOGIT)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of window -> (B, num_windows, window^2, C), windows row-major."""
    batch, height, width, channels = x.shape
    rows, cols = height // window, width // window
    x = x.view(batch, rows, window, cols, window, channels).transpose(2, 3)
    # The copy reshape would make, then a view: a tracer at symbolic sizes needs no proof that dims merge.
    return x.clone(memory_format=torch.contiguous_format).view(batch, rows * cols, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: (B, num_windows, window^2, C) -> (B, height, width, C)."""
    batch, _, _, channels = windows.shape
    x = windows.view(batch, height // window, width // window, window, window, channels).transpose(2, 3)
    return x.clone(memory_format=torch.contiguous_format).view(batch, height, width, channels)


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, ceil(H / patch), ceil(W / patch), embed_dim); zero-pads H, W to the patch."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        patch = self.patch_size
        x = F.pad(x, (0, padded_size(width, patch) - width, 0, padded_size(height, patch) - height))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), out_dim): 2x2 neighbours concatenated, norm, Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        rows, cols = padded_size(height, 2) // 2, padded_size(width, 2) // 2
        x = F.pad(x, (0, 0, 0, 2 * cols - width, 0, 2 * rows - height))
        # per merged token its 2 x 2 neighbours in the official order (0, 0), (1, 0), (0, 1), (1, 1) as (dy, dx)
        x = x.view(batch, rows, 2, cols, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.clone(memory_format=torch.contiguous_format).view(batch, rows, cols, 4 * channels)
        return self.reduction(self.norm(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias per head.

    forward(windows (B, num_windows, window^2, C), mask (num_windows, window^2, window^2) additive or None)
    -> (B, num_windows, window^2, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the stage width {dim}")
        self.num_heads = num_heads
        self.window_size = (window_size, window_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, num_windows, tokens, channels = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows).view(batch, num_windows, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, num_windows, heads, tokens, head_dim)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        if mask is None:
            shape = (batch * num_windows, heads, tokens, -1)
            attn_bias = bias.unsqueeze(0)
        else:  # windows and heads share one axis so that the per-window mask broadcasts over the batch
            shape = (batch, num_windows * heads, tokens, -1)
            attn_bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(
                1, num_windows * heads, tokens, tokens
            )
        q, k, v = (t.reshape(shape) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
        # A copy in every trace: the strides of SDPA's output differ between its fake kernel and the kernels
        # an exporter decomposes it into, so a reshape traced as a view fails there (ONNX export).
        out = out.view(batch, num_windows, heads, tokens, -1).transpose(2, 3)
        out = out.clone(memory_format=torch.contiguous_format).view(windows.shape)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last dimension."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention and MLP, each residual with stochastic depth.

    forward(x (B, H, W, C), mask) -> (B, H, W, C). Shifted blocks (shift_size > 0) take the
    `shifted_window_mask` of the padded map; unshifted blocks take None.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[1:3]
        window, shift = self.window_size, self.shift_size
        padded_height, padded_width = padded_size(height, window), padded_size(width, window)
        y = F.pad(self.norm1(x), (0, 0, 0, padded_width - width, 0, padded_height - height))
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, window), mask), window, padded_height, padded_width)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path1(y[:, :height, :width])
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional patch merging (stages after the first), then blocks alternating plain and shifted windows.

    forward((B, H, W, C_in)) -> (B, H', W', dim) with H' = ceil(H / 2) after merging, else H.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=self.shift_size if i % 2 else 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        window = self.window_size
        mask = None
        if len(self.blocks) > 1 and self.shift_size:
            height, width = x.shape[1:3]
            padded_height, padded_width = padded_size(height, window), padded_size(width, window)
            mask = shifted_window_mask(
                padded_height, padded_width, window, self.shift_size, x.dtype, x.device
            )
        for block in self.blocks:
            block_mask = mask if block.shift_size else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, block_mask, use_reentrant=False)
            else:
                x = block(x, block_mask)
        return x


class SwinTransformer(nn.Module):
    """forward(x (B, in_chans, H, W)) -> one feature map per stage, stage i:
    (B, embed_dim 2^i, ceil(H / (patch 2^i)), ceil(W / (patch 2^i))), NCHW views of channels-last tensors,
    taken before the next stage's patch merging and without output norm.

    Attribute feature_info: timm-style list of dicts (num_chs, reduction, module) per stage.
    drop_path_rate: stochastic depth rising linearly from 0 over all blocks to this value.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(
                f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must be non-empty, same length"
            )
        for name, value in (
            ("embed_dim", embed_dim),
            ("window_size", window_size),
            ("patch_size", patch_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            stage = SwinStage(
                in_dim=dims[max(i - 1, 0)],
                dim=dims[i],
                depth=depth,
                num_heads=heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rates[start : start + depth],
                downsample=i > 0,
            )
            self.layers.append(stage)
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's call)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def prune_stages(self, num_stages: int) -> None:
        """Keeps the first num_stages stages (the later ones compute no requested feature)."""
        self.layers = self.layers[:num_stages]
        self.feature_info = self.feature_info[:num_stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        features = []
        for stage in self.layers:
            x = stage(x)
            features.append(x.permute(0, 3, 1, 2))
        return features


def _init_weights(module: nn.Module) -> None:
    """timm's Swin initialization: truncated normal (std 0.02) linear weights and bias table, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


def build_swin(timm_name: str, timm_kwargs: Mapping[str, Any]) -> SwinTransformer:
    """The Swin backbone of timm model `timm_name` (a SWIN_ARCHITECTURES key) with timm's keyword overrides.

    Accepted overrides: embed_dim, depths, num_heads, window_size (an int), patch_size, in_chans, mlp_ratio,
    qkv_bias, drop_path_rate (timm's default 0.1); img_size, strict_img_size and dynamic_img_size are ignored
    (every input size works). Anything else raises ValueError.
    """
    if timm_name not in SWIN_ARCHITECTURES:
        raise ValueError(
            f"timm_name {timm_name!r} is not one of the Swin models {sorted(SWIN_ARCHITECTURES)}"
        )
    unknown = sorted(set(timm_kwargs) - _ARCHITECTURE_ARGS - _IGNORED_ARGS)
    if unknown:
        raise ValueError(
            f"timm_kwargs {unknown} are not supported for the Swin backbone {timm_name!r} "
            f"(supported: {sorted(_ARCHITECTURE_ARGS | _IGNORED_ARGS)})"
        )
    arguments = dict(SWIN_ARCHITECTURES[timm_name], patch_size=4)
    arguments.update({k: v for k, v in timm_kwargs.items() if k in _ARCHITECTURE_ARGS})
    return SwinTransformer(**arguments)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm names for a timm or an original (Microsoft Swin-Transformer) ImageNet checkpoint.

    Drops the recomputed buffers (relative_position_index, attn_mask). Original checkpoints merge patches at
    the end of stage i (`layers.{i}.downsample`), timm at the start of stage i + 1, with the same tensors, and
    name the classifier `head` instead of `head.fc`. `model` is unused (timm's filter signature).
    """
    original = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if original:
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key
            )
            key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out

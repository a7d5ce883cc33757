"""Mask2Former's multi-scale masked-attention transformer decoder.

Module tree (names kept from Mask2Former's `sem_seg_head.predictor`):

    pe_layer                                    PositionEmbeddingSine(hidden_dim / 2), no parameters
    transformer_cross_attention_layers.{i}      CrossAttentionLayer: multihead_attn, norm
    transformer_self_attention_layers.{i}       SelfAttentionLayer: self_attn, norm
    transformer_ffn_layers.{i}                  FFNLayer: linear1, linear2, norm
    decoder_norm                                LayerNorm(hidden_dim), before every prediction head
    query_feat, query_embed                     Embedding(num_queries, hidden_dim): content and position
    level_embed                                 Embedding(num_levels, hidden_dim)
    input_proj.{l}                              Conv2d(in, hidden_dim, 1) or an empty Sequential (identity)
    class_embed                                 Linear(hidden_dim, num_classes + 1)
    mask_embed.layers.{0,1,2}                   MLP hidden_dim -> hidden_dim -> hidden_dim -> mask_dim, ReLU

`multihead_attn` / `self_attn` are m2f_kernels.nn.MaskedMultiheadAttention, with nn.MultiheadAttention's
parameters (`in_proj_weight` (3D, D) as [q; k; v], `in_proj_bias`, `out_proj.weight`, `out_proj.bias`). Layer i runs masked cross-attention on level i % L
(L = 3: 1/32, 1/16, 1/8), then self-attention, then the FFN, each post-norm with a residual. A query sees the
keys where the previous prediction's mask, bilinearly resized to the level, has sigmoid >= 0.5; a query that
would see nothing sees everything (m2f_kernels.masked_attention's rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2f_kernels.nn import MaskedMultiheadAttention

from ..config import DecoderConfig
from .position_encoding import PositionEmbeddingSine


class CrossAttentionLayer(nn.Module):
    """tgt = norm(tgt + attn(tgt + query_pos, memory + pos, memory, mask)); with pre_norm,
    tgt + attn(norm(tgt) + query_pos, ...)."""

    def __init__(
        self, d_model: int, num_heads: int, mask_threshold: float, backend: str, pre_norm: bool = False
    ):
        super().__init__()
        self.multihead_attn = MaskedMultiheadAttention(
            d_model, num_heads, batch_first=True, mask_threshold=mask_threshold, backend=backend
        )
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        nn.init.xavier_uniform_(self.multihead_attn.out_proj.weight)

    def forward(self, tgt, memory, mask_logits, pos, query_pos):
        queries = self.norm(tgt) if self.pre_norm else tgt
        out, _ = self.multihead_attn(queries + query_pos, memory + pos, memory, mask_logits=mask_logits)
        return tgt + out if self.pre_norm else self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    """tgt = norm(tgt + attn(tgt + query_pos, tgt + query_pos, tgt)); with pre_norm, the same attention of
    norm(tgt) added to tgt."""

    def __init__(self, d_model: int, num_heads: int, backend: str, pre_norm: bool = False):
        super().__init__()
        self.self_attn = MaskedMultiheadAttention(d_model, num_heads, batch_first=True, backend=backend)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        nn.init.xavier_uniform_(self.self_attn.out_proj.weight)

    def forward(self, tgt, query_pos):
        values = self.norm(tgt) if self.pre_norm else tgt
        q = values + query_pos
        out, _ = self.self_attn(q, q, values)
        return tgt + out if self.pre_norm else self.norm(tgt + out)


class FFNLayer(nn.Module):
    """tgt = norm(tgt + linear2(relu(linear1(tgt)))); with pre_norm, tgt + linear2(relu(linear1(norm(tgt))))."""

    def __init__(self, d_model: int, ffn_dim: int, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt):
        if self.pre_norm:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in zip(dims, [*dims[1:], output_dim])
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """forward(multi_scale_features [L maps (B, C_l, H_l, W_l), coarsest first],
    mask_features (B, mask_dim, H/4, W/4), aux_outputs=True) -> {"pred_logits": (B, Q, C+1),
    "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [num_layers dicts of the same keys, from the query state
    before each layer; left out, and those masks not computed, with aux_outputs=False]}.
    """

    def __init__(
        self,
        config: DecoderConfig,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        num_levels: int = 3,
        backend: str = "auto",
    ):
        super().__init__()
        d = config.hidden_dim
        self.num_heads = config.num_heads
        self.num_layers = config.num_layers
        self.num_levels = num_levels
        self.pe_layer = PositionEmbeddingSine(d // 2)
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, config.num_heads, config.mask_threshold, backend, config.pre_norm)
            for _ in range(config.num_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, config.num_heads, backend, config.pre_norm)
            for _ in range(config.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, config.ffn_dim, config.pre_norm) for _ in range(config.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(config.num_queries, d)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.level_embed = nn.Embedding(num_levels, d)
        self.input_proj = nn.ModuleList()
        for _ in range(num_levels):
            if in_channels != d or config.enforce_input_proj:
                proj = nn.Conv2d(in_channels, d, 1)
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.constant_(proj.bias, 0)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.mask_embed = MLP(d, d, mask_dim, 3)

    def forward(
        self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor, aux_outputs: bool = True
    ) -> dict:
        if len(multi_scale_features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale_features)}")
        sources, positions, sizes = [], [], []
        for lvl, x in enumerate(multi_scale_features):
            sizes.append(tuple(x.shape[-2:]))
            positions.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # (B, HW, D)
            src = self.input_proj[lvl](x).flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]
            sources.append(src)
        # A layer attends where the previous prediction's mask logits, resized to its level, are >= the
        # threshold. Resizing is linear in each channel, so those are the logits of the mask features resized
        # to the level, once per level rather than 100-odd masks per layer.
        with torch.no_grad():
            level_mask_features = [
                F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                for size in sizes
            ]
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        output = self.query_feat.weight[None].expand(batch, -1, -1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, mask_logits = self.forward_prediction_heads(
            output, mask_features, level_mask_features[0], full=aux_outputs
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            output = self.transformer_cross_attention_layers[i](
                output, sources[lvl], mask_logits, positions[lvl], query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, mask_logits = self.forward_prediction_heads(
                output,
                mask_features,
                level_mask_features[(i + 1) % self.num_levels],
                full=aux_outputs or i == self.num_layers - 1,
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        outputs = {"pred_logits": predictions_class[-1], "pred_masks": predictions_mask[-1]}
        if aux_outputs:
            outputs["aux_outputs"] = [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ]
        return outputs

    def forward_prediction_heads(self, output, mask_features, level_mask_features, full: bool = True):
        """-> class logits (B, Q, C+1) and mask logits (B, Q, H/4, W/4) (None and None unless full), and the
        detached mask logits (B, Q, h*w) of level_mask_features (B, mask_dim, h, w), the mask features resized
        to the next layer's level."""
        decoder_output = self.decoder_norm(output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_class = outputs_mask = None
        if full:
            outputs_class = self.class_embed(decoder_output)
            outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        with torch.no_grad():  # the attention masks carry no gradient (Mask2Former detaches them)
            mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embed, level_mask_features).flatten(2)
        return outputs_class, outputs_mask, mask_logits

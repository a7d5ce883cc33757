"""Model building blocks against torch.nn / hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2f.config import DecoderConfig, PixelDecoderConfig
from m2f.models.pixel_decoder import MSDeformAttnPixelDecoder, encoder_reference_points
from m2f.models.position_encoding import PositionEmbeddingSine
from m2f.models.transformer_decoder import (
    CrossAttentionLayer,
    FFNLayer,
    MultiScaleMaskedTransformerDecoder,
    SelfAttentionLayer,
)


def detr_sine(batch, height, width, num_feats, temperature=10000.0):
    """DETR's normalized sine encoding from a (all valid) padding mask, with cumsum."""
    not_mask = torch.ones(batch, height, width)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(num_feats) // 2) / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def test_position_embedding_matches_detr_formula():
    x = torch.zeros(2, 7, 5, 6)
    pos = PositionEmbeddingSine(16)(x)
    assert pos.shape == (2, 32, 5, 6)
    torch.testing.assert_close(pos, detr_sine(2, 5, 6, 16), rtol=1e-5, atol=1e-5)
    assert len(PositionEmbeddingSine(16).state_dict()) == 0


def test_encoder_reference_points_are_pixel_centers():
    points = encoder_reference_points(
        [(2, 3), (1, 2)], batch=2, device=torch.device("cpu"), dtype=torch.float32
    )
    assert points.shape == (2, 8, 2, 2)
    expected_first = [
        [1 / 6, 1 / 4],
        [3 / 6, 1 / 4],
        [5 / 6, 1 / 4],
        [1 / 6, 3 / 4],
        [3 / 6, 3 / 4],
        [5 / 6, 3 / 4],
    ]
    expected = torch.tensor([*expected_first, [1 / 4, 1 / 2], [3 / 4, 1 / 2]])
    for level in range(2):
        torch.testing.assert_close(points[1, :, level], expected)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_cross_attention_layer_matches_torch_multihead_attention(pre_norm):
    """norm(tgt + attention(tgt + query_pos, memory + pos, memory)) with the rule-applied bool mask; with
    pre_norm, tgt + attention(norm(tgt) + query_pos, ...)."""
    layer = CrossAttentionLayer(32, 4, mask_threshold=0.5, backend="auto", pre_norm=pre_norm)
    with torch.no_grad():
        layer.multihead_attn.in_proj_bias.normal_()
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True)
    torch_mha.load_state_dict(layer.multihead_attn.state_dict())
    tgt, query_pos = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    memory, pos = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    mask_logits = torch.randn(2, 5, 9)
    mask_logits[0, 1] = -1.0  # a query that sees no key: Mask2Former lets it see every key
    blocked = mask_logits.sigmoid() < 0.5
    blocked[blocked.all(-1)] = False
    queries = layer.norm(tgt) if pre_norm else tgt
    attended, _ = torch_mha(
        queries + query_pos, memory + pos, memory, attn_mask=blocked.repeat_interleave(4, dim=0)
    )
    expected = tgt + attended if pre_norm else layer.norm(tgt + attended)
    actual = layer(tgt, memory, mask_logits, pos, query_pos)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_self_attention_and_ffn_layers_match_their_definitions(pre_norm):
    layer = SelfAttentionLayer(32, 4, backend="auto", pre_norm=pre_norm)
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True)
    torch_mha.load_state_dict(layer.self_attn.state_dict())
    tgt, query_pos = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    values = layer.norm(tgt) if pre_norm else tgt
    attended, _ = torch_mha(values + query_pos, values + query_pos, values)
    expected = tgt + attended if pre_norm else layer.norm(tgt + attended)
    torch.testing.assert_close(layer(tgt, query_pos), expected, rtol=1e-5, atol=1e-5)
    ffn = FFNLayer(32, 64, pre_norm=pre_norm)
    inner = ffn.norm(tgt) if pre_norm else tgt
    transformed = ffn.linear2(torch.relu(ffn.linear1(inner)))
    expected = tgt + transformed if pre_norm else ffn.norm(tgt + transformed)
    torch.testing.assert_close(ffn(tgt), expected)


def test_pixel_decoder_shapes_and_level_order():
    config = PixelDecoderConfig(
        conv_dim=32, mask_dim=16, encoder_layers=1, encoder_heads=2, encoder_ffn_dim=64
    )
    channels = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    decoder = MSDeformAttnPixelDecoder(config, channels, strides)
    assert decoder.transformer_features == ["res5", "res4", "res3"]
    assert decoder.fpn_features == ["res2"]
    features = {
        name: torch.randn(2, c, 64 // strides[name], 96 // strides[name]) for name, c in channels.items()
    }
    mask_features, multi_scale = decoder(features)
    assert mask_features.shape == (2, 16, 16, 24)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    with pytest.raises(ValueError, match="conv_dim"):
        MSDeformAttnPixelDecoder(PixelDecoderConfig(conv_dim=48), channels, strides)
    with pytest.raises(ValueError, match="transformer_strides"):
        MSDeformAttnPixelDecoder(PixelDecoderConfig(transformer_strides=(8, 16, 64)), channels, strides)


def test_encoder_layer_is_its_definition_and_copies_no_slices_in_the_backward():
    """norm2(x + linear2(relu(linear1(x)))) after norm1(src + attention), by the formula; its in-place ReLU acts
    on a tensor of its own, so the graph holds no CopySlices node (which copies the whole FFN hidden layer
    twice in the backward pass)."""
    from m2f.models.pixel_decoder import MSDeformAttnEncoderLayer

    torch.manual_seed(0)
    layer = MSDeformAttnEncoderLayer(
        d_model=16, ffn_dim=32, n_levels=2, n_heads=2, n_points=2, backend="torch"
    )
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    src = torch.randn(2, 30, 16, requires_grad=True)
    pos = torch.randn(2, 30, 16)
    reference_points = torch.rand(2, 30, 2, 2)
    out = layer(src, pos, reference_points, shapes, starts)
    attended = layer.norm1(src + layer.self_attn(src + pos, reference_points, src, shapes, starts))
    expected = layer.norm2(attended + layer.linear2(torch.relu(layer.linear1(attended))))
    torch.testing.assert_close(out, expected)
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert "ReluBackward0" in names and "CopySlices" not in names


def _torch_attention(module, num_heads):
    """nn.MultiheadAttention (sequence first, as Mask2Former's) holding a MaskedMultiheadAttention's weights."""
    attention = nn.MultiheadAttention(module.embed_dim, num_heads)
    attention.load_state_dict(module.state_dict())
    return attention


def mask2former_decoder_reference(decoder, features, mask_features, num_heads):
    """Mask2Former's MultiScaleMaskedTransformerDecoder.forward (post-norm), written as in its repository:
    sequence-first tensors, torch attention with a bool mask of the keys where the previous prediction's
    mask, bilinearly resized to the level, has sigmoid < 0.5 (a fully blocked row unblocked), layer i on
    level i % L, prediction heads before the first layer and after each one. Returns (class, mask) pairs."""
    src, pos, sizes = [], [], []
    for level, x in enumerate(features):
        batch, _, height, width = x.shape
        sizes.append((height, width))
        pos.append(
            detr_sine(batch, height, width, decoder.pe_layer.num_pos_feats).flatten(2).permute(2, 0, 1)
        )
        projected = decoder.input_proj[level](x).flatten(2) + decoder.level_embed.weight[level][None, :, None]
        src.append(projected.permute(2, 0, 1))
    batch = mask_features.shape[0]
    query_embed = decoder.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
    output = decoder.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)

    def heads(output, size):
        decoded = decoder.decoder_norm(output).transpose(0, 1)
        outputs_class = decoder.class_embed(decoded)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", decoder.mask_embed(decoded), mask_features)
        attn_mask = F.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach()

    predictions = []
    outputs_class, outputs_mask, attn_mask = heads(output, sizes[0])
    predictions.append((outputs_class, outputs_mask))
    for i in range(decoder.num_layers):
        level = i % len(features)
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        cross = decoder.transformer_cross_attention_layers[i]
        attended = _torch_attention(cross.multihead_attn, num_heads)(
            output + query_embed, src[level] + pos[level], src[level], attn_mask=attn_mask
        )[0]
        output = cross.norm(output + attended)
        self_layer = decoder.transformer_self_attention_layers[i]
        q = output + query_embed
        output = self_layer.norm(output + _torch_attention(self_layer.self_attn, num_heads)(q, q, output)[0])
        ffn = decoder.transformer_ffn_layers[i]
        output = ffn.norm(output + ffn.linear2(torch.relu(ffn.linear1(output))))
        outputs_class, outputs_mask, attn_mask = heads(output, sizes[(i + 1) % len(features)])
        predictions.append((outputs_class, outputs_mask))
    return predictions


def test_transformer_decoder_matches_mask2former_forward():
    """Four layers over three levels (the round robin wraps), queries from query_feat with query_embed as
    their position, heads before every layer, masks from the previous prediction at each level's size."""
    torch.manual_seed(0)
    config = DecoderConfig(hidden_dim=32, num_queries=6, num_heads=4, ffn_dim=64, num_layers=4)
    decoder = MultiScaleMaskedTransformerDecoder(config, in_channels=24, mask_dim=16, num_classes=5).eval()
    with torch.no_grad():
        for parameter in decoder.parameters():  # non-trivial biases, norms and embeddings everywhere
            parameter.add_(0.3 * torch.randn_like(parameter))
    features = [torch.randn(2, 24, h, w) for h, w in ((2, 3), (4, 5), (7, 9))]
    mask_features = torch.randn(2, 16, 14, 18)
    with torch.no_grad():
        out = decoder(features, mask_features)
        expected = mask2former_decoder_reference(decoder, features, mask_features, num_heads=4)
    actual = [(aux["pred_logits"], aux["pred_masks"]) for aux in out["aux_outputs"]]
    actual.append((out["pred_logits"], out["pred_masks"]))
    assert len(actual) == len(expected) == 5
    for layer, ((logits, masks), (ref_logits, ref_masks)) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4, msg=f"logits {layer}")
        torch.testing.assert_close(masks, ref_masks, rtol=1e-4, atol=1e-4, msg=f"masks {layer}")


def test_attention_masks_are_the_detached_previous_masks_resized_to_the_level():
    """Each layer attends by the previous prediction's mask logits bilinearly resized to its level (computed
    from the mask features resized once per level), without gradient (Mask2Former detaches them); without
    aux_outputs the last prediction is the same and the earlier masks are not computed."""
    torch.manual_seed(0)
    config = DecoderConfig(hidden_dim=32, num_queries=6, num_heads=4, ffn_dim=64, num_layers=4)
    decoder = MultiScaleMaskedTransformerDecoder(config, in_channels=24, mask_dim=16, num_classes=5)
    features = [torch.randn(2, 24, h, w) for h, w in ((2, 3), (4, 5), (7, 9))]
    mask_features = torch.randn(2, 16, 14, 18, requires_grad=True)
    seen = []
    for layer in decoder.transformer_cross_attention_layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    out = decoder(features, mask_features)
    previous = [aux["pred_masks"] for aux in out["aux_outputs"]]
    assert len(seen) == len(previous) == 4 and all(m.requires_grad for m in previous)
    for i, (logits, masks) in enumerate(zip(seen, previous)):
        size = features[i % 3].shape[-2:]
        resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False).flatten(2)
        assert not logits.requires_grad
        torch.testing.assert_close(logits, resized, rtol=1e-5, atol=1e-5, msg=f"layer {i}")
    seen.clear()
    with torch.no_grad():
        final = decoder(features, mask_features, aux_outputs=False)
    assert final.keys() == {"pred_logits", "pred_masks"} and len(seen) == 4
    torch.testing.assert_close(final["pred_logits"], out["pred_logits"])
    torch.testing.assert_close(final["pred_masks"], out["pred_masks"])

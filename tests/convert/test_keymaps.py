"""The rule engine of m2f.convert.keymaps and the Swin patch-merging channel reorder."""

import pytest
import torch
import torch.nn.functional as F

from m2f.convert.keymaps import (
    ConversionError,
    Drop,
    Fuse,
    Rename,
    apply_rules,
    reverse_rules,
    swin_official_to_unfold,
    swin_unfold_to_official,
)


def test_rename_with_offsets_and_words_both_ways():
    rules = [Rename("backbone.res{s}.{b}.conv{c}.norm.{p:w}", "layer{s-1}.{b}.bn{c}.{p}")]
    tensor = torch.ones(3)
    out, unmatched = apply_rules({"backbone.res3.1.conv2.norm.running_mean": tensor, "other": tensor}, rules)
    assert list(out) == ["layer2.1.bn2.running_mean"] and out["layer2.1.bn2.running_mean"] is tensor
    assert unmatched == ["other"]
    back, unmatched = apply_rules(out, reverse_rules(rules))
    assert list(back) == ["backbone.res3.1.conv2.norm.running_mean"] and unmatched == []


def test_rest_field_spans_dots_and_first_rule_wins():
    rules = [
        Rename("a.special.{rest:*}", "x.{rest}"),
        Rename("a.{rest:*}", "y.{rest}"),
        Drop("a.skip.{i}"),
    ]
    out, unmatched = apply_rules({"a.special.b.c": torch.zeros(1), "a.b.c.d": torch.zeros(1)}, rules)
    assert sorted(out) == ["x.b.c", "y.b.c.d"] and unmatched == []


def test_drop():
    out, unmatched = apply_rules({"a.skip.3": torch.zeros(1)}, [Drop("a.skip.{i}")])
    assert out == {} and unmatched == []


def test_fuse_and_split_round_trip():
    rules = [Fuse(tuple(f"l.{{i}}.{n}.weight" for n in "qkv"), "l.{i}.qkv.weight")]
    parts = {f"l.0.{n}.weight": torch.full((2, 3), float(j)) for j, n in enumerate("qkv")}
    fused, _ = apply_rules(parts, rules)
    assert torch.equal(fused["l.0.qkv.weight"], torch.cat(list(parts.values())))
    split, _ = apply_rules(fused, reverse_rules(rules))
    assert split.keys() == parts.keys() and all(torch.equal(split[k], parts[k]) for k in parts)


def test_fuse_with_a_missing_part_names_it():
    rules = [Fuse(tuple(f"l.{{i}}.{n}.weight" for n in "qkv"), "l.{i}.qkv.weight")]
    with pytest.raises(ConversionError, match=r"l\.4\.k\.weight"):
        apply_rules({"l.4.q.weight": torch.zeros(1), "l.4.v.weight": torch.zeros(1)}, rules)


def test_two_keys_onto_one_is_an_error():
    with pytest.raises(ConversionError, match="map to 'z'"):
        apply_rules({"a": torch.zeros(1), "b": torch.zeros(1)}, [Rename("a", "z"), Rename("b", "z")])


def _official_merge(x: torch.Tensor) -> torch.Tensor:
    """Swin's patch merging concatenation, (B, H, W, C) -> (B, H/2, W/2, 4C), written from the paper's code."""
    x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
    x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    return torch.cat([x0, x1, x2, x3], -1)


def _unfold_merge(x: torch.Tensor) -> torch.Tensor:
    """mmdet's patch merging: nn.Unfold(2, stride 2) on NCHW, (B, H, W, C) -> (B, H/2, W/2, 4C)."""
    b, h, w, _ = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L)
    return cols.transpose(1, 2).reshape(b, h // 2, w // 2, -1)


def test_swin_patch_merging_reorder_matches_unfold():
    channels = 3
    x = torch.randn(2, 4, 6, channels, dtype=torch.float64)
    weight_unfold = torch.randn(5, 4 * channels, dtype=torch.float64)
    norm_w, norm_b = (
        torch.randn(4 * channels, dtype=torch.float64),
        torch.randn(4 * channels, dtype=torch.float64),
    )

    def merging(merged, weight, nw, nb):
        return F.layer_norm(merged, (4 * channels,), nw, nb) @ weight.T

    reference = merging(_unfold_merge(x), weight_unfold, norm_w, norm_b)
    ours = merging(
        _official_merge(x),
        swin_unfold_to_official(weight_unfold),
        swin_unfold_to_official(norm_w),
        swin_unfold_to_official(norm_b),
    )
    torch.testing.assert_close(ours, reference)
    assert torch.equal(swin_official_to_unfold(swin_unfold_to_official(weight_unfold)), weight_unfold)

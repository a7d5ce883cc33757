"""Key-renaming rules between checkpoint formats, and the engine that applies them.

A rule names one family of keys on each side with a template: `{name}` matches an integer, `{name+K}` /
`{name-K}` an integer stored with an offset (detectron2's `res{s+2}` is timm's `layer{s+1}`), `{name:w}` a
dotted-free word and `{name:*}` any rest of the key. Rules run in both directions, so every map can also
produce the foreign format (used for round-trip tests and exports).

The hub format is detectron2's naming for the whole model (`backbone.res2.0.conv1.weight`,
`sem_seg_head.pixel_decoder...`, `sem_seg_head.predictor...`): every other format maps to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

_FIELD = re.compile(r"\{(\w+)(?:([+-]\d+)|:(w|\*))?\}")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists the offending keys."""


class _Template:
    """A key pattern with integer / word fields (see the module docstring)."""

    def __init__(self, text: str, kinds: Mapping[str, str]) -> None:
        """kinds: field name -> "w" / "*" for word fields declared on the other side of the rule."""
        self.text = text
        self.fields: dict[str, tuple[str | None, int]] = {}  # name -> (kind, offset)
        parts, pos = [], 0
        for match in _FIELD.finditer(text):
            name, offset, kind = match.groups()
            kind = kind or kinds.get(name)
            self.fields[name] = (kind, int(offset) if offset else 0)
            parts.append(re.escape(text[pos : match.start()]))
            group = {"w": r"[A-Za-z0-9_]+", "*": r".+"}.get(kind, r"\d+")
            parts.append(f"(?P<{name}>{group})")
            pos = match.end()
        parts.append(re.escape(text[pos:]))
        self.pattern = re.compile("".join(parts) + r"\Z")

    def parse(self, key: str) -> dict[str, int | str] | None:
        match = self.pattern.match(key)
        if match is None:
            return None
        values: dict[str, int | str] = {}
        for name, text in match.groupdict().items():
            kind, offset = self.fields[name]
            values[name] = text if kind else int(text) - offset
        return values

    def render(self, values: Mapping[str, int | str]) -> str:
        def field(match: re.Match[str]) -> str:
            name, offset, _ = match.groups()
            value = values[name]
            return str(int(value) + int(offset)) if offset else str(value)

        return _FIELD.sub(field, self.text)


@dataclass(frozen=True)
class Rename:
    """One key on each side; `to_dst` / `to_src` transform the tensor when the layouts differ."""

    src: str
    dst: str
    to_dst: Callable[[torch.Tensor], torch.Tensor] | None = None
    to_src: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reversed(self) -> Rename:
        return Rename(self.dst, self.src, self.to_src, self.to_dst)


@dataclass(frozen=True)
class Fuse:
    """Several source keys concatenated along dim 0 into one (q, k, v -> qkv); reversed it splits evenly."""

    srcs: tuple[str, ...]
    dst: str


@dataclass(frozen=True)
class Split:
    """One source key split evenly along dim 0 into several (the reverse of Fuse)."""

    src: str
    dsts: tuple[str, ...]


@dataclass(frozen=True)
class Drop:
    """Source keys that carry no weights we need (buffers recomputed at run time, unused heads)."""

    src: str


Rule = Rename | Fuse | Split | Drop


def reverse_rules(rules: Iterable[Rule]) -> list[Rule]:
    """The rules that map the destination format back to the source format (Drop rules have no inverse)."""
    out: list[Rule] = []
    for rule in rules:
        if isinstance(rule, Rename):
            out.append(rule.reversed())
        elif isinstance(rule, Fuse):
            out.append(Split(rule.dst, rule.srcs))
        elif isinstance(rule, Split):
            out.append(Fuse(rule.dsts, rule.src))
    return out


def apply_rules(
    state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename `state_dict` with `rules` (first matching rule wins for each key).

    Returns (converted, unmatched): `unmatched` lists the source keys no rule claimed, sorted. Raises
    ConversionError when a Fuse group is incomplete or two keys map to the same destination.
    """
    rules = list(rules)
    compiled = [(rule, _compile(rule)) for rule in rules]
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    fuse_groups: dict[tuple[int, str], tuple[dict[str, int | str], dict[int, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        for index, (rule, templates) in enumerate(compiled):
            values, part = _match(_sources(rule, templates), key)
            if values is None:
                continue
            if isinstance(rule, Drop):
                pass
            elif isinstance(rule, Rename):
                _put(out, templates[-1].render(values), rule.to_dst(tensor) if rule.to_dst else tensor, key)
            elif isinstance(rule, Split):
                if tensor.shape[0] % len(rule.dsts):
                    raise ConversionError(
                        f"{key}: dim 0 of shape {tuple(tensor.shape)} does not split in {len(rule.dsts)}"
                    )
                for template, piece in zip(templates[1:], tensor.chunk(len(rule.dsts), dim=0)):
                    _put(out, template.render(values), piece, key)
            else:
                destination = templates[-1].render(values)
                fuse_groups.setdefault((index, destination), (values, {}))[1][part] = tensor
            break
        else:
            unmatched.append(key)
    for (index, destination), (values, parts) in fuse_groups.items():
        rule, templates = compiled[index]
        if len(parts) != len(rule.srcs):
            missing = [templates[i].render(values) for i in range(len(rule.srcs)) if i not in parts]
            raise ConversionError(f"missing keys {missing}, needed with the others to build {destination!r}")
        _put(out, destination, torch.cat([parts[i] for i in range(len(rule.srcs))], dim=0), destination)
    return out, sorted(unmatched)


def _compile(rule: Rule) -> list[_Template]:
    if isinstance(rule, Rename):
        texts = [rule.src, rule.dst]
    elif isinstance(rule, Fuse):
        texts = [*rule.srcs, rule.dst]
    elif isinstance(rule, Split):
        texts = [rule.src, *rule.dsts]
    else:
        texts = [rule.src]
    kinds = {m.group(1): m.group(3) for text in texts for m in _FIELD.finditer(text) if m.group(3)}
    return [_Template(text, kinds) for text in texts]


def _sources(rule: Rule, templates: list[_Template]) -> list[_Template]:
    return templates[:-1] if isinstance(rule, Fuse) else templates[:1]


def _match(sources: list[_Template], key: str) -> tuple[dict[str, int | str] | None, int]:
    """(field values, index of the matching source template); a Fuse has several source templates."""
    for part, template in enumerate(sources):
        values = template.parse(key)
        if values is not None:
            return values, part
    return None, -1


def _put(out: dict[str, torch.Tensor], key: str, tensor: torch.Tensor, source: str) -> None:
    if key in out:
        raise ConversionError(f"two checkpoint entries map to {key!r} (the second is {source!r})")
    out[key] = tensor


def prefixed(prefix_src: str, prefix_dst: str, rules: Iterable[Rule]) -> list[Rule]:
    """The same rules with a prefix added to every source and destination template."""
    out: list[Rule] = []
    for rule in rules:
        if isinstance(rule, Rename):
            out.append(Rename(prefix_src + rule.src, prefix_dst + rule.dst, rule.to_dst, rule.to_src))
        elif isinstance(rule, Fuse):
            out.append(Fuse(tuple(prefix_src + s for s in rule.srcs), prefix_dst + rule.dst))
        elif isinstance(rule, Split):
            out.append(Split(prefix_src + rule.src, tuple(prefix_dst + d for d in rule.dsts)))
        else:
            out.append(Drop(prefix_src + rule.src))
    return out


# ---------------------------------------------------------------------------------------------------------
# Backbones: detectron2 names (the hub) <-> timm names (our model, before its own prefix).

BN_PARAM = "{p:w}"  # weight, bias, running_mean, running_var, num_batches_tracked

DETECTRON2_TO_TIMM_RESNET: list[Rule] = [
    Rename("backbone.stem.conv1.weight", "conv1.weight"),
    Rename(f"backbone.stem.conv1.norm.{BN_PARAM}", f"bn1.{BN_PARAM}"),
    Rename("backbone.res{s}.{b}.conv{c}.weight", "layer{s-1}.{b}.conv{c}.weight"),
    Rename(f"backbone.res{{s}}.{{b}}.conv{{c}}.norm.{BN_PARAM}", f"layer{{s-1}}.{{b}}.bn{{c}}.{BN_PARAM}"),
    Rename("backbone.res{s}.{b}.shortcut.weight", "layer{s-1}.{b}.downsample.0.weight"),
    Rename(
        f"backbone.res{{s}}.{{b}}.shortcut.norm.{BN_PARAM}", f"layer{{s-1}}.{{b}}.downsample.1.{BN_PARAM}"
    ),
]

# Mask2Former's Swin (detectron2 port of the official code) keeps the official names; timm moves each patch
# merging layer from the end of stage s to the start of stage s + 1. The official concatenation order of the
# 2x2 neighbours is the same in both, so the tensors are unchanged.
DETECTRON2_TO_TIMM_SWIN: list[Rule] = [
    Rename("backbone.patch_embed.proj.{p:w}", "patch_embed.proj.{p}"),
    Rename("backbone.patch_embed.norm.{p:w}", "patch_embed.norm.{p}"),
    Drop("backbone.layers.{s}.blocks.{b}.attn.relative_position_index"),
    Rename("backbone.layers.{s}.blocks.{b}.{rest:*}", "layers.{s}.blocks.{b}.{rest}"),
    Rename("backbone.layers.{s}.downsample.{rest:*}", "layers.{s+1}.downsample.{rest}"),
]


def swin_unfold_to_official(tensor: torch.Tensor) -> torch.Tensor:
    """Patch-merging weights from mmdet's nn.Unfold channel order (c, dy, dx) to the official (dx, dy, c).

    Works on the reduction weight (out, 4C) and on the norm parameters (4C,).
    """
    channels = tensor.shape[-1] // 4
    lead = tensor.shape[:-1]
    return (
        tensor.reshape(*lead, channels, 2, 2)
        .permute(*range(len(lead)), -1, -2, -3)
        .reshape(*lead, 4 * channels)
    )


def swin_official_to_unfold(tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of `swin_unfold_to_official`."""
    channels = tensor.shape[-1] // 4
    lead = tensor.shape[:-1]
    return (
        tensor.reshape(*lead, 2, 2, channels)
        .permute(*range(len(lead)), -1, -2, -3)
        .reshape(*lead, 4 * channels)
    )


def detect_backbone(keys: Iterable[str]) -> str:
    """'resnet' or 'swin' from detectron2-named keys."""
    keys = list(keys)
    if any(k.startswith("backbone.res") or k.startswith("backbone.stem.") for k in keys):
        return "resnet"
    if any(k.startswith("backbone.layers.") or k.startswith("backbone.patch_embed.") for k in keys):
        return "swin"
    raise ConversionError("no ResNet or Swin backbone weights found in the checkpoint")


# ---------------------------------------------------------------------------------------------------------
# detectron2 names (the hub) <-> m2f.models.Mask2Former names.

OURS_BACKBONE = "backbone.body."

DETECTRON2_TO_MODEL_HEAD: list[Rule] = [
    # m2f's pixel decoder keeps detectron2's names except its single FPN level (res2): adapter_1 / layer_1
    Rename("sem_seg_head.pixel_decoder.adapter_1.{rest:*}", "pixel_decoder.lateral_convs.0.{rest}"),
    Rename("sem_seg_head.pixel_decoder.layer_1.{rest:*}", "pixel_decoder.output_convs.0.{rest}"),
    Rename("sem_seg_head.pixel_decoder.{rest:*}", "pixel_decoder.{rest}"),
    Rename("sem_seg_head.predictor.{rest:*}", "transformer_decoder.{rest}"),
    Drop("criterion.empty_weight"),
]


def detectron2_to_model_rules(backbone: str) -> list[Rule]:
    """Rules from detectron2 names to m2f's Mask2Former names for a 'resnet' or 'swin' backbone."""
    if backbone == "resnet":
        body = prefixed("", OURS_BACKBONE, DETECTRON2_TO_TIMM_RESNET)
        return [*body, *DETECTRON2_TO_MODEL_HEAD]
    if backbone == "swin":
        body = prefixed("", OURS_BACKBONE, DETECTRON2_TO_TIMM_SWIN)
        norms = [Rename("backbone.norm{s}.{p:w}", "backbone.norms.{s}.{p}")]
        return [*body, *norms, *DETECTRON2_TO_MODEL_HEAD]
    raise ValueError(f"backbone must be 'resnet' or 'swin', got {backbone!r}")

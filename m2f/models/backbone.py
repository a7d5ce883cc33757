"""timm backbones returning detectron2-style feature dicts, with local-file weight loading.

`Backbone(config)` wraps `timm.create_model(config.timm_name, pretrained=False)` (never a hub download),
pruned to the stages it needs (no classifier, no final norm). The Swin models (names in
m2f.models.swin.SWIN_ARCHITECTURES) are built by m2f.models.swin instead, which computes the official Swin
detection backbone at every input size under timm's parameter names. State-dict keys under `body.` are timm's
own names (e.g. `body.layer1.0.conv1.weight`, `body.layers.0.blocks.0.attn.qkv.weight`), so a timm checkpoint
loads unchanged; `norms.{i}` are the per-output LayerNorms of transformer backbones (Mask2Former's Swin
`norm0..norm3`).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import timm
import torch
import torchvision
from timm.layers import freeze_batch_norm_2d
from torch import nn

from ..config import BackboneConfig
from .swin import CLASSIFIER_KEYS, SWIN_ARCHITECTURES, build_swin


def feature_name(stride: int) -> str:
    """detectron2's name of the feature at `stride`: 4 -> "res2", ..., 32 -> "res5"."""
    return f"res{int(math.log2(stride))}"


class FrozenBatchNorm2d(torchvision.ops.misc.FrozenBatchNorm2d):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias per channel of x (B, C, H, W), in x's
    dtype, with torchvision's buffers and state dict.

    torchvision's forward, x * scale + shift, writes the map twice and, with float32 statistics, turns a
    float16 or bfloat16 map (autocast) into a float32 one, so every layer after it would run in float32.
    One addcmul writes it once, and its backward keeps only the (C,) scale.
    """

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) scale and shift with y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))


class Backbone(nn.Module):
    """forward(x (B, 3, H, W) normalized) -> {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}.

    Attributes: out_features (names, finest first), out_channels and out_strides (same order).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.timm_name = config.timm_name
        self.is_swin = config.timm_name in SWIN_ARCHITECTURES
        if self.is_swin:
            body = build_swin(config.timm_name, config.timm_kwargs)
        else:
            body = timm.create_model(config.timm_name, pretrained=False, **config.timm_kwargs)
        info = body.feature_info
        reductions = [f["reduction"] for f in info]
        self.indices = []
        for stride in config.out_strides:
            matches = [i for i, r in enumerate(reductions) if r == stride]
            if not matches:
                raise ValueError(
                    f"backbone {config.timm_name!r} has no feature at stride {stride} (strides: {reductions})"
                )
            self.indices.append(matches[-1])
        keys_before_pruning = set(body.state_dict())
        if self.is_swin:
            body.prune_stages(max(self.indices) + 1)
            keys_before_pruning |= CLASSIFIER_KEYS
        else:
            body.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        if config.frozen_batchnorm:
            # Frozen as detectron2's FrozenBatchNorm2d starts (scale 1, shift 0) until weights are loaded:
            # timm zero-initializes the last norm of each residual block, which frozen would stay 0 and leave
            # every residual branch without output and gradient.
            for module in body.modules():
                if isinstance(module, nn.BatchNorm2d) and module.affine:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            body = freeze_batch_norm_2d(body)
            for module in body.modules():
                if type(module) is torchvision.ops.misc.FrozenBatchNorm2d:
                    module.__class__ = FrozenBatchNorm2d  # the same buffers, a one-pass forward
        self.body = body
        # Checkpoint entries for the classifier, final norm and unused stages; ignored when loading.
        self.pruned_keys = keys_before_pruning - set(body.state_dict())
        self.out_features = [feature_name(s) for s in config.out_strides]
        self.out_channels = [info[i]["num_chs"] for i in self.indices]
        self.out_strides = list(config.out_strides)
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels) if config.output_norm else None

    def fold_frozen_batchnorm(self) -> int:
        """For inference: multiplies each conv of a ResNet body by the scale of the frozen norm after it and
        gives it the norm's shift as bias, with nn.Identity in the norm's place. The features stay the same up
        to rounding and an R-50 body takes about 15 % less time on the CPU, but the state dict changes (conv biases,
        no norm buffers): fold a model that is neither trained nor saved afterwards. Returns the number of norms
        folded (0 for other bodies)."""
        if not isinstance(self.body, timm.models.ResNet):
            return 0
        folded = 0
        for parent in list(self.body.modules()):
            children = list(parent.named_children())
            if isinstance(parent, nn.Sequential):  # a downsample path or a deep stem: in call order
                pairs = [(conv, name) for (_, conv), (name, _) in itertools.pairwise(children)]
            else:  # a block or the stem: conv{i} -> bn{i}
                named = dict(children)
                pairs = [
                    (named.get("conv" + name[2:]), name) for name, _ in children if name.startswith("bn")
                ]
            for conv, norm_name in pairs:
                norm = getattr(parent, norm_name)
                if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                    with torch.no_grad():
                        scale, shift = norm.scale_and_shift()
                        bias = shift if conv.bias is None else conv.bias * scale + shift
                        conv.weight.mul_(scale.view(-1, 1, 1, 1))
                    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
                    setattr(parent, norm_name, nn.Identity())
                    folded += 1
        return folded

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of each block (ResNet bottleneck, Swin block) in the backward pass instead
        of keeping them. ValueError for a body with BatchNorm layers that update running statistics, which the
        recomputation would update a second time (ResNet configs freeze them, as detectron2 does)."""
        tracking = [
            name
            for name, module in self.body.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        ]
        if enable and tracking:
            raise ValueError(
                f"grad checkpointing: backbone {self.timm_name!r} has BatchNorm layers that update running "
                f"statistics ({tracking[0]}, ...), which recomputing them would update twice; it needs a config "
                "with frozen_batchnorm"
            )
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.is_swin:
            stages = self.body(x)
            features = [stages[i] for i in self.indices]
        else:
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                # oneDNN's CPU convolutions run fastest on channels-last images (an R-50 inference at 800 x 1088
                # took 25 % less time). On a GPU the layout stays as it comes, and so it does in traced graphs,
                # whose dynamic sizes the layout change would pin (torch.export, ONNX).
                x = x.contiguous(memory_format=torch.channels_last)
            features = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        if self.norms is not None:
            features = [
                norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, f in zip(self.norms, features)
            ]
        return dict(zip(self.out_features, features))

    def load_weights(self, path: str | Path) -> None:
        """Loads a timm-format state dict (safetensors, or a torch file read with weights_only=True).

        Accepts the dict at the top level or under "model" / "state_dict"; applies the architecture's
        checkpoint filter (timm's; m2f.models.swin.checkpoint_filter_fn for Swin, which also reads the
        original Microsoft layout). Classifier and final-norm entries are ignored; any other missing or
        unexpected key, or a tensor of another shape, raises ValueError listing them.
        """
        state = read_state_dict(path)
        filter_fn = getattr(sys.modules[type(self.body).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, self.body)
        state = {
            k: v
            for k, v in state.items()
            if k not in self.pruned_keys and not k.endswith("num_batches_tracked")
        }
        own = self.body.state_dict()
        mismatched = [
            f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if mismatched:
            raise ValueError(
                f"backbone weights {str(path)!r} do not match timm model {self.timm_name!r}: tensor shapes "
                f"differ for {mismatched[:20]}{' ...' if len(mismatched) > 20 else ''}"
            )
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"backbone weights {str(path)!r} do not match timm model {self.timm_name!r}: "
                f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file (weights_only); FileNotFoundError names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            return safetensors.torch.load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} is not a safetensors file or a torch file loadable with weights_only=True ({error}); "
            "backbone weights are a timm or torchvision state dict (a detectron2 .pkl is not one: m2f.convert "
            "reads whole Mask2Former checkpoints, not backbone files)"
        ) from error
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    return state

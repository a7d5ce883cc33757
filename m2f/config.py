"""Model configurations: one per row of the Mask2Former results table, plus a tiny CPU demo.

`get_config(name)` returns a fresh `ModelConfig`; change fields with `dataclasses.replace` (nested groups:
`replace(cfg, loss=replace(cfg.loss, num_points=1024))`). `ModelConfig.to_dict()` / `ModelConfig.from_dict()`
round-trip through plain Python types (for checkpoints and JSON). `load_config` also reads a JSON file of
one, and `apply_overrides(cfg, ["solver.lr=2e-4"])` sets fields by dotted name (the CLI's `--set`).

Units: image sizes and strides in pixels, learning rates per step, iterations are optimizer steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("panoptic", "instance", "semantic")

# ImageNet statistics on the 0..255 scale (detectron2 convention, RGB order).
IMAGENET_PIXEL_MEAN = (123.675, 116.280, 103.530)
IMAGENET_PIXEL_STD = (58.395, 57.120, 57.375)


@dataclass
class BackboneConfig:
    """A backbone named as in timm. ResNets are built by `timm.create_model(timm_name, **timm_kwargs)`; Swin
    names by `m2f.models.swin.build_swin` (official pad-then-shift windows, timm's parameter names).

    out_strides: the feature strides handed to the pixel decoder (res2..res5 = 4, 8, 16, 32).
    frozen_batchnorm: replace BatchNorm2d by FrozenBatchNorm2d (detectron2's "FrozenBN" for ResNets).
    output_norm: a LayerNorm on each returned feature map (Mask2Former's Swin: norm0..norm3).
    """

    timm_name: str = "resnet50"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    out_strides: tuple[int, ...] = (4, 8, 16, 32)
    frozen_batchnorm: bool = False
    output_norm: bool = False


@dataclass
class PixelDecoderConfig:
    """MSDeformAttn pixel decoder: a deformable encoder on the coarse levels, then an FPN down to 1/4.
    encoder_dropout must be 0.0: the encoder layers have no dropout (Mask2Former trains without)."""

    conv_dim: int = 256
    mask_dim: int = 256
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_points: int = 4
    encoder_ffn_dim: int = 1024
    encoder_dropout: float = 0.0
    transformer_strides: tuple[int, ...] = (8, 16, 32)
    common_stride: int = 4


@dataclass
class DecoderConfig:
    """Masked-attention transformer decoder. pre_norm: LayerNorm before each attention and FFN block instead of
    after it (Mask2Former: after). dropout must be 0.0: the layers have none (Mask2Former trains without)."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9
    dropout: float = 0.0
    pre_norm: bool = False
    enforce_input_proj: bool = False
    mask_threshold: float = 0.5


@dataclass
class LossConfig:
    """Matcher costs and loss weights (the same numbers for both, as in Mask2Former)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class InferenceConfig:
    """Post-processing thresholds (see m2f.models.postprocess)."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    top_k: int = 100
    test_short_edge: int = 800
    test_max_size: int = 1333


@dataclass
class SolverConfig:
    """Optimizer and schedule. lr_schedule "step": x lr_gamma at each of lr_steps; "poly": power 0.9."""

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_lr_multiplier: float = 0.1
    grad_clip_norm: float = 0.01
    max_iter: int = 368750
    lr_schedule: str = "step"
    lr_steps: tuple[int, ...] = (331875, 350312)
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    batch_size: int = 16
    image_size: int = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    # Crops of the resize-and-crop recipe (ADE20K, Cityscapes): height / width, the long side image_size
    # (Cityscapes: 0.5, crops of 512 x 1024). Large-scale jitter (COCO) crops squares.
    crop_aspect: float = 1.0
    # The resize-and-crop recipe resizes the short side to base x [min_scale, max_scale], base resize_base x the
    # crop's long side (Mapillary Vistas: 2, 1024-pixel crops from 1024-4096 short sides).
    resize_base: float = 1.0
    # Semantic training crops: redraw (up to 10 times) while one class covers this share of the crop; 1.0 = off.
    single_category_max_area: float = 1.0
    amp: bool = True

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the resize-and-crop recipe's crops: the long side image_size, the other by
        crop_aspect."""
        if not 0 < self.crop_aspect < math.inf:
            return (0, 0)
        return (
            round(self.image_size * min(1.0, self.crop_aspect)),
            round(self.image_size * min(1.0, 1.0 / self.crop_aspect)),
        )


@dataclass
class ModelConfig:
    """Everything needed to build, train and run one Mask2Former variant.

    num_classes counts the real classes (C); the classifier predicts C + 1 with the last index "no object".
    size_divisibility: images are padded to a multiple of this before the backbone.
    """

    name: str = "custom"
    task: str = "panoptic"
    dataset: str = "coco"
    num_classes: int = 133
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    pixel_mean: tuple[float, float, float] = IMAGENET_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_PIXEL_STD
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name, value in (("num_classes", self.num_classes), ("size_divisibility", self.size_divisibility)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if (
            len(self.pixel_mean) != 3
            or len(self.pixel_std) != 3
            or not all(math.isfinite(value) for value in (*self.pixel_mean, *self.pixel_std))
            or not all(std > 0 for std in self.pixel_std)
        ):
            raise ValueError(
                f"pixel_mean and pixel_std must hold 3 finite values (R, G, B), pixel_std positive ones, got "
                f"{self.pixel_mean} and {self.pixel_std}"
            )
        # The sine position encodings split the channels into (x, y) halves of (sin, cos) pairs.
        for name, value in (
            ("decoder.hidden_dim", self.decoder.hidden_dim),
            ("pixel_decoder.conv_dim", self.pixel_decoder.conv_dim),
        ):
            if value % 4:
                raise ValueError(f"{name} must be a multiple of 4 (sine position encoding), got {value}")
        strides = self.backbone.out_strides
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"backbone.out_strides must increase (finest first), got {strides}")
        if self.solver.optimizer != "adamw":
            raise ValueError(
                f"solver.optimizer must be 'adamw' (the only one implemented), got {self.solver.optimizer!r}"
            )
        if self.size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1 (1: no padding), got {self.size_divisibility}")
        inference, loss = self.inference, self.loss
        for name, value, low, high in (
            ("decoder.num_queries", self.decoder.num_queries, 1, None),
            ("decoder.mask_threshold", self.decoder.mask_threshold, 0.0, 1.0),
            ("loss.class_weight", loss.class_weight, 0.0, None),
            ("loss.mask_weight", loss.mask_weight, 0.0, None),
            ("loss.dice_weight", loss.dice_weight, 0.0, None),
            ("loss.no_object_weight", loss.no_object_weight, 0.0, None),
            ("loss.num_points", loss.num_points, 1, None),
            ("loss.oversample_ratio", loss.oversample_ratio, 1.0, None),
            ("loss.importance_sample_ratio", loss.importance_sample_ratio, 0.0, 1.0),
            ("decoder.num_layers", self.decoder.num_layers, 0, None),
            ("decoder.hidden_dim", self.decoder.hidden_dim, 1, None),
            ("inference.object_mask_threshold", inference.object_mask_threshold, 0.0, 1.0),
            ("inference.overlap_threshold", inference.overlap_threshold, 0.0, 1.0),
            ("inference.top_k", inference.top_k, 1, None),
            ("inference.test_short_edge", inference.test_short_edge, 1, None),
            ("inference.test_max_size", inference.test_max_size, 1, None),
        ):
            if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be {bounds}, got {value}")
        solver = self.solver
        for name, value in (
            ("solver.max_iter", solver.max_iter),
            ("solver.batch_size", solver.batch_size),
            ("solver.image_size", solver.image_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if solver.lr_schedule not in ("step", "poly"):
            raise ValueError(f"solver.lr_schedule must be 'step' or 'poly', got {solver.lr_schedule!r}")
        # A step past max_iter never comes: a shorter max_iter needs its own steps (or --max-iters).
        steps = solver.lr_steps
        if list(steps) != sorted(steps) or not all(0 <= step <= solver.max_iter for step in steps):
            raise ValueError(
                "solver.lr_steps must be in increasing order, each from 0 to solver.max_iter "
                f"({solver.max_iter}), got {steps}"
            )
        if not 0 < solver.crop_aspect < math.inf or min(solver.crop_size) < 1:
            raise ValueError(
                f"solver.crop_aspect must be positive and leave crops of at least one pixel, got "
                f"{solver.crop_aspect} (crops of {solver.crop_size[0]} x {solver.crop_size[1]})"
            )
        if not 0 < solver.resize_base < math.inf:
            raise ValueError(f"solver.resize_base must be positive, got {solver.resize_base}")
        if not 0 < solver.min_scale <= solver.max_scale < math.inf:
            raise ValueError(
                "solver.min_scale and solver.max_scale must be positive and min_scale <= max_scale, got "
                f"{solver.min_scale} and {solver.max_scale}"
            )
        if self.decoder.dropout != 0.0 or self.pixel_decoder.encoder_dropout != 0.0:
            raise ValueError(
                "dropout is not supported (Mask2Former trains without it): decoder.dropout and "
                f"pixel_decoder.encoder_dropout must be 0.0, got {self.decoder.dropout} and "
                f"{self.pixel_decoder.encoder_dropout}"
            )

    @property
    def num_queries(self) -> int:
        return self.decoder.num_queries

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (after a trip through JSON): lists become tuples, also inside dict fields.
        ValueError naming the field for an unknown field or a value of the wrong type."""
        return _dataclass_from_dict(cls, data, "config")


# Fields that earlier versions wrote and nothing reads: configs stored with them still load.
RETIRED_FIELDS = {"InferenceConfig": {"panoptic_on", "instance_on", "semantic_on"}}


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a dict of {cls.__name__} fields, got {data!r}")
    data = {key: value for key, value in data.items() if key not in RETIRED_FIELDS.get(cls.__name__, ())}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    kwargs = {}
    for name, value in data.items():
        default_factory = fields[name].default_factory
        default = fields[name].default if default_factory is dataclasses.MISSING else default_factory()
        if dataclasses.is_dataclass(default):
            kwargs[name] = _dataclass_from_dict(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _field_from_plain(f"{where}.{name}", default, value, types[name])
    return cls(**kwargs)


def _field_from_plain(where: str, default: Any, value: Any, annotation: Any) -> Any:
    """`value` as the type of the field's `default`; JSON lists become tuples of the annotation's length and
    element types (tuple[int, ...], tuple[float, float, float])."""
    if isinstance(default, bool):
        valid = isinstance(value, bool)
    elif isinstance(default, int | float):
        valid = _is_number_of(value, type(default))
    elif isinstance(default, str):
        valid = isinstance(value, str)
    elif isinstance(default, tuple):
        valid, value = _tuple_of(annotation, value)
    elif isinstance(default, dict):
        valid = isinstance(value, dict)
        value = {key: _tuples(item) for key, item in value.items()} if valid else value
    else:
        valid = True
    if not valid:
        expected = annotation if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"{where} must be of type {expected}, got {value!r}")
    return float(value) if isinstance(default, float) else value


def _tuple_of(annotation: Any, value: Any) -> tuple[bool, Any]:
    """(valid, value as a tuple) for a tuple[X, ...] or tuple[X, Y, Z] field; float elements become floats."""
    if not isinstance(value, list | tuple):
        return False, value
    value = _tuples(value)
    kinds = typing.get_args(annotation)
    if len(kinds) == 2 and kinds[1] is Ellipsis:
        kinds = (kinds[0],) * len(value)
    if len(kinds) != len(value) or not all(_is_number_of(item, kind) for item, kind in zip(value, kinds)):
        return False, value
    return True, tuple(float(item) if kind is float else item for item, kind in zip(value, kinds))


def _is_number_of(value: Any, kind: type) -> bool:
    """Whether a JSON value fits an int or float field (a float field takes ints too); other kinds pass."""
    if kind not in (int, float):
        return True
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (kind is float or isinstance(value, int))
    )


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def _step_solver(max_iter: int, **overrides: Any) -> SolverConfig:
    """x0.1 at 0.9 and 0.95 of training (the paper's COCO schedule)."""
    steps = (int(0.9 * max_iter), int(0.95 * max_iter))
    return SolverConfig(max_iter=max_iter, lr_steps=steps, **overrides)


def _poly_solver(max_iter: int, image_size: int, **overrides: Any) -> SolverConfig:
    """Power-0.9 decay without warmup over scales 0.5-2.0 of the base size (the paper's ADE20K, Cityscapes
    and Mapillary Vistas schedule)."""
    return SolverConfig(
        max_iter=max_iter,
        lr_schedule="poly",
        lr_steps=(),
        warmup_iters=0,
        image_size=image_size,
        min_scale=0.5,
        max_scale=2.0,
        **overrides,
    )


def _resnet(depth: int, frozen_batchnorm: bool = True) -> BackboneConfig:
    """detectron2's ResNet: frozen BatchNorm ("FrozenBN"), or trainable ("SyncBN", synchronized under DDP on
    GPUs)."""
    return BackboneConfig(timm_name=f"resnet{depth}", frozen_batchnorm=frozen_batchnorm)


# (timm model, pretraining image size); Mask2Former uses windows of 7 (224 pretraining) or 12 (384).
_SWIN = {
    "t": ("swin_tiny_patch4_window7_224", 224),
    "s": ("swin_small_patch4_window7_224", 224),
    "b": ("swin_base_patch4_window12_384", 384),
    "l": ("swin_large_patch4_window12_384", 384),
}


def _swin(size: str) -> BackboneConfig:
    timm_name, img_size = _SWIN[size]
    kwargs = {"img_size": img_size, "strict_img_size": False, "drop_path_rate": 0.3}
    return BackboneConfig(timm_name=timm_name, timm_kwargs=kwargs, output_norm=True)


COCO_50_EPOCHS = 368750
COCO_100_EPOCHS = 737500
ADE20K_160K = 160000


# COCO's classes per task: the 133 of the panoptic annotations, the 80 thing classes for instances.
COCO_CLASSES = {"panoptic": 133, "instance": 80}


def _coco(
    name: str, task: str, backbone: BackboneConfig, num_queries: int = 100, max_iter: int = COCO_50_EPOCHS
) -> ModelConfig:
    """Mask2Former's COCO recipe: large-scale jitter crops of 1024, step schedule, 50 (or 100) epochs."""
    return ModelConfig(
        name=name,
        task=task,
        dataset="coco",
        num_classes=COCO_CLASSES[task],
        backbone=backbone,
        decoder=DecoderConfig(num_queries=num_queries),
        solver=_step_solver(max_iter),
    )


# ADE20K's classes per task: 150 for scene parsing and panoptic segmentation, the 100 thing classes for
# instance segmentation.
ADE20K_CLASSES = {"semantic": 150, "panoptic": 150, "instance": 100}


def _ade20k(name: str, task: str, backbone: BackboneConfig, crop: int, num_queries: int = 100) -> ModelConfig:
    """Mask2Former's ADE20K recipe, the same for the three tasks: crops of crop x crop from the short side
    resized to 0.5-2.0 crops, 160k iterations of poly schedule, tested at the crop size."""
    return ModelConfig(
        name=name,
        task=task,
        dataset="ade20k",
        num_classes=ADE20K_CLASSES[task],
        backbone=backbone,
        decoder=DecoderConfig(num_queries=num_queries),
        inference=InferenceConfig(test_short_edge=crop, test_max_size=4 * crop),
        solver=_poly_solver(ADE20K_160K, image_size=crop),
    )


CITYSCAPES_90K = 90000


def _cityscapes(name: str, task: str, backbone: BackboneConfig, num_queries: int = 100) -> ModelConfig:
    """Mask2Former's Cityscapes recipe: 512 x 1024 crops from the short side resized to 512-2048, 90k
    iterations of poly schedule, tested with the short side at 1024 (long side at most 2048). Semantic and
    panoptic models have the 19 evaluated classes, instance models the 8 thing classes."""
    return ModelConfig(
        name=name,
        task=task,
        dataset="cityscapes",
        num_classes=8 if task == "instance" else 19,
        backbone=backbone,
        decoder=DecoderConfig(num_queries=num_queries),
        inference=InferenceConfig(test_short_edge=1024, test_max_size=2048),
        solver=_poly_solver(CITYSCAPES_90K, image_size=1024, crop_aspect=0.5),
    )


MAPILLARY_300K = 300000


def _mapillary(name: str, task: str, backbone: BackboneConfig, num_queries: int = 100) -> ModelConfig:
    """Mask2Former's Mapillary Vistas recipe: 1024 x 1024 crops from the short side resized to 1024-4096,
    300k iterations of poly schedule, tested with the long side at 2048, every query's mask kept (object mask
    threshold 0); the 65 classes."""
    return ModelConfig(
        name=name,
        task=task,
        dataset="mapillary",
        num_classes=65,
        backbone=backbone,
        decoder=DecoderConfig(num_queries=num_queries),
        inference=InferenceConfig(object_mask_threshold=0.0, test_short_edge=2048, test_max_size=2048),
        solver=_poly_solver(MAPILLARY_300K, image_size=1024, resize_base=2.0),
    )


def _demo_tiny() -> ModelConfig:
    """0.8M parameters, 128-pixel images: trains on the synthetic dataset on a CPU in minutes."""
    return ModelConfig(
        name="demo-tiny",
        task="panoptic",
        dataset="synthetic",
        num_classes=6,  # the synthetic dataset's 3 thing + 3 stuff categories
        backbone=BackboneConfig(timm_name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64, mask_dim=64, encoder_layers=2, encoder_heads=4, encoder_points=2, encoder_ffn_dim=128
        ),
        decoder=DecoderConfig(hidden_dim=64, num_queries=16, num_heads=4, ffn_dim=128, num_layers=6),
        loss=LossConfig(num_points=1024),
        inference=InferenceConfig(test_short_edge=128, test_max_size=128),
        solver=SolverConfig(
            lr=3e-4,
            max_iter=1000,
            lr_steps=(900, 950),
            grad_clip_norm=1.0,
            backbone_lr_multiplier=1.0,
            batch_size=4,
            image_size=128,
            min_scale=0.5,
            max_scale=1.5,
            amp=False,
        ),
    )


_BUILDERS = {
    "panoptic-r50": lambda: _coco("panoptic-r50", "panoptic", _resnet(50)),
    "panoptic-r101": lambda: _coco("panoptic-r101", "panoptic", _resnet(101)),
    "panoptic-swin-t": lambda: _coco("panoptic-swin-t", "panoptic", _swin("t")),
    "panoptic-swin-s": lambda: _coco("panoptic-swin-s", "panoptic", _swin("s")),
    "panoptic-swin-b": lambda: _coco("panoptic-swin-b", "panoptic", _swin("b")),
    "panoptic-swin-b-in21k": lambda: _coco("panoptic-swin-b-in21k", "panoptic", _swin("b")),
    "panoptic-swin-l-in21k": lambda: _coco(
        "panoptic-swin-l-in21k", "panoptic", _swin("l"), num_queries=200, max_iter=COCO_100_EPOCHS
    ),
    "instance-r50": lambda: _coco("instance-r50", "instance", _resnet(50)),
    "instance-r101": lambda: _coco("instance-r101", "instance", _resnet(101)),
    "instance-swin-t": lambda: _coco("instance-swin-t", "instance", _swin("t")),
    "instance-swin-s": lambda: _coco("instance-swin-s", "instance", _swin("s")),
    "instance-swin-b": lambda: _coco("instance-swin-b", "instance", _swin("b")),
    "instance-swin-b-in21k": lambda: _coco("instance-swin-b-in21k", "instance", _swin("b")),
    "instance-swin-l-in21k": lambda: _coco(
        "instance-swin-l-in21k", "instance", _swin("l"), num_queries=200, max_iter=COCO_100_EPOCHS
    ),
    "semantic-ade20k-r50": lambda: _ade20k("semantic-ade20k-r50", "semantic", _resnet(50), crop=512),
    # The one published ADE20K config that trains its ResNet's BatchNorm (SyncBN).
    "semantic-ade20k-r101": lambda: _ade20k(
        "semantic-ade20k-r101", "semantic", _resnet(101, frozen_batchnorm=False), crop=512
    ),
    "semantic-ade20k-swin-t": lambda: _ade20k("semantic-ade20k-swin-t", "semantic", _swin("t"), crop=512),
    "semantic-ade20k-swin-s": lambda: _ade20k("semantic-ade20k-swin-s", "semantic", _swin("s"), crop=512),
    "semantic-ade20k-swin-b": lambda: _ade20k("semantic-ade20k-swin-b", "semantic", _swin("b"), crop=640),
    "semantic-ade20k-swin-b-in21k": lambda: _ade20k(
        "semantic-ade20k-swin-b-in21k", "semantic", _swin("b"), crop=640
    ),
    "semantic-ade20k-swin-l": lambda: _ade20k("semantic-ade20k-swin-l", "semantic", _swin("l"), crop=640),
    "panoptic-ade20k-r50": lambda: _ade20k("panoptic-ade20k-r50", "panoptic", _resnet(50), crop=640),
    "panoptic-ade20k-swin-l": lambda: _ade20k(
        "panoptic-ade20k-swin-l", "panoptic", _swin("l"), crop=640, num_queries=200
    ),
    "instance-ade20k-r50": lambda: _ade20k("instance-ade20k-r50", "instance", _resnet(50), crop=640),
    # Cityscapes' ResNets train their BatchNorm (SyncBN).
    "semantic-cityscapes-r50": lambda: _cityscapes("semantic-cityscapes-r50", "semantic", _resnet(50, False)),
    "semantic-cityscapes-r101": lambda: _cityscapes(
        "semantic-cityscapes-r101", "semantic", _resnet(101, False)
    ),
    "semantic-cityscapes-swin-s": lambda: _cityscapes("semantic-cityscapes-swin-s", "semantic", _swin("s")),
    "semantic-cityscapes-swin-l": lambda: _cityscapes("semantic-cityscapes-swin-l", "semantic", _swin("l")),
    "panoptic-cityscapes-r50": lambda: _cityscapes("panoptic-cityscapes-r50", "panoptic", _resnet(50, False)),
    "panoptic-cityscapes-swin-t": lambda: _cityscapes("panoptic-cityscapes-swin-t", "panoptic", _swin("t")),
    "panoptic-cityscapes-swin-b-in21k": lambda: _cityscapes(
        "panoptic-cityscapes-swin-b-in21k", "panoptic", _swin("b")
    ),
    "instance-cityscapes-r50": lambda: _cityscapes("instance-cityscapes-r50", "instance", _resnet(50, False)),
    "instance-cityscapes-swin-l-in21k": lambda: _cityscapes(
        "instance-cityscapes-swin-l-in21k", "instance", _swin("l"), num_queries=200
    ),
    "semantic-mapillary-r50": lambda: _mapillary("semantic-mapillary-r50", "semantic", _resnet(50)),
    "semantic-mapillary-swin-l-in21k": lambda: _mapillary(
        "semantic-mapillary-swin-l-in21k", "semantic", _swin("l")
    ),
    "panoptic-mapillary-r50": lambda: _mapillary("panoptic-mapillary-r50", "panoptic", _resnet(50)),
    "panoptic-mapillary-swin-l-in21k": lambda: _mapillary(
        "panoptic-mapillary-swin-l-in21k", "panoptic", _swin("l"), num_queries=200
    ),
    "demo-tiny": _demo_tiny,
}

CONFIG_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_config(name: str) -> ModelConfig:
    """A fresh ModelConfig for one of CONFIG_NAMES; ValueError listing the names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _BUILDERS:
        raise ValueError(f"unknown config name {name!r}; available: {', '.join(CONFIG_NAMES)}")
    return _BUILDERS[name]()


def load_config(config: str | os.PathLike | ModelConfig) -> ModelConfig:
    """`config` itself if it is a ModelConfig, else one of CONFIG_NAMES, else a .json file of
    `ModelConfig.to_dict()` (what `m2f config NAME --out FILE.json` writes). ValueError naming the file for an
    unreadable one, listing the names for anything else."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str) and config in _BUILDERS:
        return get_config(config)
    if not isinstance(config, str | os.PathLike):
        raise TypeError(f"config must be a name, a path or a ModelConfig, got {type(config).__name__}")
    path = Path(config)
    if path.suffix != ".json":
        raise ValueError(
            f"unknown config name {str(config)!r}; available: {', '.join(CONFIG_NAMES)}, or a config's "
            ".json file"
        )
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except ValueError as error:  # json.JSONDecodeError included
        raise ValueError(f"{path}: {error}") from None


def apply_overrides(config: ModelConfig, overrides: Iterable[str]) -> ModelConfig:
    """A copy of `config` with each "FIELD=VALUE" of `overrides` set, in order. FIELD is dotted
    (`solver.lr`, `decoder.num_queries`, `backbone.timm_kwargs.drop_path_rate`); VALUE is read as JSON (`2e-4`,
    `true`, `[1000, 2000]`), except that a text field takes the text as it is (`task=semantic`). The result
    is checked as `ModelConfig.from_dict` checks a stored config; ValueError naming the field otherwise."""
    data = config.to_dict()
    for override in overrides:
        field_path, equals, text = override.partition("=")
        if not equals or not field_path:
            raise ValueError(f"an override must be FIELD=VALUE (e.g. solver.lr=2e-4), got {override!r}")
        *groups, name = field_path.split(".")
        node, cls = data, ModelConfig
        for depth, group in enumerate(groups):
            where = ".".join(groups[: depth + 1])
            default = _field_default(cls, group, where) if cls is not None else node.get(group)
            if not isinstance(default, dict) and not dataclasses.is_dataclass(default):
                raise ValueError(f"{where} is not a group of fields (in the override {override!r})")
            cls = type(default) if dataclasses.is_dataclass(default) else None
            node = node[group]
        if cls is not None:
            default = _field_default(cls, name, field_path)
            if dataclasses.is_dataclass(default):
                raise ValueError(
                    f"{field_path} is a group of fields: set one of them ({field_path}.FIELD=VALUE)"
                )
        else:
            default = node.get(name)
        value = _json_or_text(text)
        node[name] = text if isinstance(default, str) and not isinstance(value, str) else value
    return ModelConfig.from_dict(data)


def _field_default(cls: type, name: str, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{where}: {cls.__name__} has no field {name!r}; its fields: {', '.join(fields)}")
    field_ = fields[name]
    return field_.default if field_.default_factory is dataclasses.MISSING else field_.default_factory()


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text

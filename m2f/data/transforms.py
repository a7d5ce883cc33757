"""Geometric augmentations that keep images, segmentation maps and polygons aligned.

A transform draws a `Geometry` for an image size (random parts from a numpy Generator); the geometry is then
applied to the image (bilinear), to id-maps (nearest) and to polygons (exact coordinates), so all targets see
the same resize, crop, flip and pad. Coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1).

`SemanticAugmentation` is the semantic segmentation training recipe: it also looks at the label map (crops
that one class dominates are redrawn) and distorts the image colours (`PhotometricDistortion`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from m2f.checks import check_int
from m2f.data.common import IGNORE_LABEL


@dataclass(frozen=True)
class ColorJitter:
    """One draw of PhotometricDistortion; None skips a step. brightness: offset on the 0..255 scale;
    contrast: factor on the pixel values; saturation: factor on the HSV saturation; hue: rotation in degrees.
    Order: brightness, then contrast, saturation, hue (or saturation, hue, contrast when contrast_last)."""

    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    contrast_last: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W, 3) uint8; values are clipped to 0..255 after every step."""
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
        out = image.astype(np.float32)
        if self.brightness is not None:
            out = np.clip(out + self.brightness, 0, 255)
        if self.contrast is not None and not self.contrast_last:
            out = np.clip(out * self.contrast, 0, 255)
        if self.saturation is not None:
            out = np.clip(_scale_saturation(out, self.saturation), 0, 255)
        if self.hue is not None:
            out = np.clip(_rotate_hue(out, self.hue), 0, 255)
        if self.contrast is not None and self.contrast_last:
            out = np.clip(out * self.contrast, 0, 255)
        return np.round(out).astype(np.uint8)


@dataclass(frozen=True)
class Geometry:
    """Resize in_size -> resized_size, take the window of out_size at (top, left) of the resized image,
    mirror its content horizontally when flip, then pad the bottom and right up to out_size (padding is
    never mirrored). Sizes are (H, W). color: a colour jitter applied to the image's part of the output (not
    to the padding nor to segmentation maps)."""

    in_size: tuple[int, int]
    resized_size: tuple[int, int]
    top: int = 0
    left: int = 0
    out_size: tuple[int, int] | None = None
    flip: bool = False
    color: ColorJitter | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        return self.out_size if self.out_size is not None else self.resized_size

    @property
    def valid_size(self) -> tuple[int, int]:
        """(H, W) of the output's top-left part that comes from the image; the rest is padding."""
        out_h, out_w = self.output_size
        resized_h, resized_w = self.resized_size
        return max(0, min(out_h, resized_h - self.top)), max(0, min(out_w, resized_w - self.left))

    def _check(self, array: np.ndarray, name: str) -> None:
        if tuple(array.shape[:2]) != tuple(self.in_size):
            raise ValueError(f"{name} has size {array.shape[:2]}, the geometry expects {self.in_size}")

    def _window(self, resized: np.ndarray, fill) -> np.ndarray:
        out_h, out_w = self.output_size
        out = np.full((out_h, out_w, *resized.shape[2:]), fill, dtype=resized.dtype)
        src = resized[self.top : self.top + out_h, self.left : self.left + out_w]
        out[: src.shape[0], : src.shape[1]] = src[:, ::-1] if self.flip else src
        return out

    def apply_image(self, image: np.ndarray, pad_value: int = 128) -> np.ndarray:
        """(H, W, 3) uint8 -> (out_h, out_w, 3) uint8, bilinear. Padding gets pad_value: 128 by default, as
        detectron2's FixedSizeCrop (Mask2Former's LSJ) pads, near the pixel mean, so it normalizes to about 0."""
        self._check(image, "image")
        if self.resized_size != self.in_size:
            h, w = self.resized_size
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        out = self._window(image, pad_value)
        if self.color is not None:
            valid_h, valid_w = self.valid_size
            out[:valid_h, :valid_w] = self.color.apply(out[:valid_h, :valid_w])
        return out

    def apply_segmentation(self, seg: np.ndarray, fill: int) -> np.ndarray:
        """(H, W) integer map (values fit int32) -> (out_h, out_w) int32, nearest; padding gets `fill`."""
        self._check(seg, "segmentation")
        seg = seg.astype(np.int32)
        if self.resized_size != self.in_size:
            h, w = self.resized_size
            seg = np.asarray(Image.fromarray(seg).resize((w, h), Image.NEAREST), dtype=np.int32)
        return self._window(seg, fill)

    def apply_polygons(self, polygons: list[list[float]]) -> list[list[float]]:
        """COCO polygons [x0, y0, x1, y1, ...] in input pixels -> the same in output pixels."""
        scale_y = self.resized_size[0] / self.in_size[0]
        scale_x = self.resized_size[1] / self.in_size[1]
        valid_w = self.valid_size[1]
        result = []
        for polygon in polygons:
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
            x = xy[:, 0] * scale_x - self.left
            y = xy[:, 1] * scale_y - self.top
            if self.flip:
                x = valid_w - x
            result.append(np.stack([x, y], axis=1).reshape(-1).tolist())
        return result


class LSJ:
    """Large-scale jitter: resize so the image fits image_size * s (s uniform in [min_scale, max_scale],
    aspect kept), random crop to image_size when larger, pad bottom/right when smaller, horizontal flip with
    probability 0.5. Output is always (image_size, image_size).

    The crop's top and left offsets are drawn independently. detectron2's FixedSizeCrop, which Mask2Former
    trains with, scales both by one uniform draw, so its crops of an image larger on both sides lie on the
    diagonal from the top-left to the bottom-right corner; here every window of the image can be drawn."""

    def __init__(self, image_size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip: bool = True):
        check_int("image_size", image_size, 1)
        if not 0 < min_scale <= max_scale < math.inf:
            raise ValueError(f"need 0 < min_scale <= max_scale < inf, got {min_scale}, {max_scale}")
        self.image_size = int(image_size)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.flip = flip

    def get_geometry(self, height: int, width: int, rng: np.random.Generator) -> Geometry:
        target = self.image_size * rng.uniform(self.min_scale, self.max_scale)
        factor = min(target / height, target / width)
        resized_h = max(1, round(height * factor))
        resized_w = max(1, round(width * factor))
        top = round(rng.uniform() * max(0, resized_h - self.image_size))
        left = round(rng.uniform() * max(0, resized_w - self.image_size))
        flip = bool(self.flip and rng.uniform() < 0.5)
        return Geometry(
            (height, width), (resized_h, resized_w), top, left, (self.image_size, self.image_size), flip
        )

    def __repr__(self) -> str:
        return f"LSJ(image_size={self.image_size}, min_scale={self.min_scale}, max_scale={self.max_scale})"


class ResizeShortestEdge:
    """Resize so the short side is `short` (a random choice when a sequence) unless the long side would
    pass max_size, then the long side is max_size (detectron2's rule, sizes rounded half up). Optional
    horizontal flip with probability 0.5 (for training)."""

    def __init__(self, short: int | Sequence[int] = 800, max_size: int = 1333, flip: bool = False):
        self.short_choices = [short] if isinstance(short, (int, np.integer)) else list(short)
        if not self.short_choices:
            raise ValueError("short must be an int or a non-empty sequence of ints")
        for value in self.short_choices:
            check_int("short", value, 1)
        check_int("max_size", max_size, 1)
        self.max_size = int(max_size)
        self.flip = flip

    def output_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        scale = short / min(height, width)
        new_h, new_w = height * scale, width * scale
        if max(new_h, new_w) > self.max_size:
            rescale = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * rescale, new_w * rescale
        return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))

    def get_geometry(self, height: int, width: int, rng: np.random.Generator | None = None) -> Geometry:
        if rng is None:
            rng = np.random.default_rng(0)
        short = self.short_choices[int(rng.integers(len(self.short_choices)))]
        flip = bool(self.flip and rng.uniform() < 0.5)
        return Geometry((height, width), self.output_size(height, width, short), flip=flip)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short={self.short_choices}, max_size={self.max_size})"


def random_window(
    size: tuple[int, int], crop_size: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a uniformly placed window of crop_size (clamped to size) inside size."""
    crop_h, crop_w = min(crop_size[0], size[0]), min(crop_size[1], size[1])
    top = int(rng.integers(size[0] - crop_h + 1))
    left = int(rng.integers(size[1] - crop_w + 1))
    return top, left, crop_h, crop_w


def category_limited_crop(
    sem_seg: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    single_category_max_area: float = 1.0,
    ignore_label: int = IGNORE_LABEL,
    max_tries: int = 10,
) -> tuple[int, int]:
    """(top, left) of a random window of crop_size (clamped to the map's size) of sem_seg (H, W).

    With single_category_max_area >= 1 the first random window is taken. Below 1, windows are drawn until one
    holds at least two classes and its most frequent class covers less than single_category_max_area of its
    non-ignore pixels; after max_tries draws the last one is taken.
    """
    if sem_seg.ndim != 2:
        raise ValueError(f"sem_seg must be (H, W), got shape {sem_seg.shape}")
    if not single_category_max_area > 0:  # NaN too: no window would ever pass
        raise ValueError(f"single_category_max_area must be > 0, got {single_category_max_area}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    for _ in range(max_tries):
        top, left, crop_h, crop_w = random_window(sem_seg.shape, crop_size, rng)
        if single_category_max_area >= 1.0:
            break
        window = sem_seg[top : top + crop_h, left : left + crop_w]
        _, counts = np.unique(window[window != ignore_label], return_counts=True)
        if len(counts) > 1 and counts.max() < single_category_max_area * counts.sum():
            break
    return top, left


def _scale_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """(..., 3) float RGB in 0..255 -> HSV saturation multiplied by factor (at most 1), hue and value kept."""
    value = image.max(-1, keepdims=True)
    spread = value - image.min(-1, keepdims=True)
    # saturation = spread / value; every channel's distance below value scales with it
    ratio = np.minimum(factor, value / np.where(spread > 0, spread, 1))
    return value - (value - image) * ratio


def _rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """(..., 3) float RGB in 0..255 -> HSV hue turned by degrees, saturation and value kept."""
    red, green, blue = np.moveaxis(image, -1, 0)
    value = image.max(-1)
    chroma = value - image.min(-1)
    safe_chroma = np.where(chroma > 0, chroma, 1)
    hue = np.where(
        value == red,
        (green - blue) / safe_chroma,
        np.where(value == green, 2 + (blue - red) / safe_chroma, 4 + (red - green) / safe_chroma),
    )
    hue = (hue + degrees / 60) % 6  # in sextants
    channels = []
    for offset in (5, 3, 1):  # red, green, blue
        k = (offset + hue) % 6
        channels.append(value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(channels, -1)


class PhotometricDistortion:
    """SSD-style colour augmentation: a brightness offset uniform in +-brightness_delta, then contrast,
    saturation and hue (contrast first or last, with probability 0.5 each); every step is applied with
    probability 0.5. Contrast and saturation factors are uniform in their ranges, the hue rotation uniform in
    +-hue_delta degrees."""

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 36.0,
    ):
        if brightness_delta < 0:
            raise ValueError(f"brightness_delta must be >= 0, got {brightness_delta}")
        for name, (low, high) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(low, high)}")
        if not 0 <= hue_delta <= 180:
            raise ValueError(f"hue_delta must be in [0, 180] degrees, got {hue_delta}")
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def sample(self, rng: np.random.Generator) -> ColorJitter:
        def maybe(low: float, high: float) -> float | None:
            return float(rng.uniform(low, high)) if rng.uniform() < 0.5 else None

        return ColorJitter(
            brightness=maybe(-self.brightness_delta, self.brightness_delta),
            contrast=maybe(*self.contrast_range),
            saturation=maybe(*self.saturation_range),
            hue=maybe(-self.hue_delta, self.hue_delta),
            contrast_last=bool(rng.uniform() < 0.5),
        )

    def __repr__(self) -> str:
        return (
            f"PhotometricDistortion(brightness_delta={self.brightness_delta}, contrast_range="
            f"{self.contrast_range}, saturation_range={self.saturation_range}, hue_delta={self.hue_delta})"
        )


class SemanticAugmentation:
    """Semantic segmentation training augmentation (Mask2Former's ADE20K and Cityscapes recipe), in this order:

    1. resize the short side to base x s, s a random multiple of 0.1 in [min_scale, max_scale], base the
       crop's long side unless given (Mapillary Vistas: 2 crops), unless the long side would pass max_size
       (default 4 x base; then the long side is max_size);
    2. a random window of crop_size (smaller when the image is), redrawn while one class dominates it (see
       category_limited_crop; off at single_category_max_area = 1, the recipe's value);
    3. horizontal flip with probability 0.5;
    4. PhotometricDistortion on the image when color;
    5. pad the bottom and right to crop_size: the image with image_pad_value, labels with ignore_label.

    crop_size: an int for square crops (ADE20K: 512 or 640) or (height, width) (Cityscapes: (512, 1024)).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        max_size: int | None = None,
        single_category_max_area: float = 1.0,
        base: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        color: bool = True,
        flip: bool = True,
        image_pad_value: int = 128,
    ):
        sizes = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        if not (
            isinstance(sizes, tuple | list)
            and len(sizes) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
        ):
            raise ValueError(
                f"crop_size must be an int >= 1 or (height, width) of ints >= 1, got {crop_size!r}"
            )
        if not 0 < min_scale <= max_scale < math.inf:
            raise ValueError(f"need 0 < min_scale <= max_scale < inf, got {min_scale}, {max_scale}")
        first, last = math.ceil(min_scale * 10 - 1e-6), math.floor(max_scale * 10 + 1e-6)
        if first > last:
            raise ValueError(
                f"no multiple of 0.1 lies in [min_scale, max_scale] = [{min_scale}, {max_scale}]"
            )
        if single_category_max_area <= 0:
            raise ValueError(f"single_category_max_area must be > 0, got {single_category_max_area}")
        self.crop_size = (int(sizes[0]), int(sizes[1]))
        base = max(self.crop_size) if base is None else check_int("base", base, 1)
        self.max_size = 4 * base if max_size is None else max_size
        self.resize = ResizeShortestEdge([base * k // 10 for k in range(first, last + 1)], self.max_size)
        self.single_category_max_area = single_category_max_area
        self.ignore_label = ignore_label
        self.photometric = PhotometricDistortion() if color else None
        self.flip = flip
        self.image_pad_value = image_pad_value

    @property
    def short_sizes(self) -> list[int]:
        return list(self.resize.short_choices)

    def get_geometry(
        self, height: int, width: int, rng: np.random.Generator, sem_seg: np.ndarray | None = None
    ) -> Geometry:
        """The resize, crop, flip and colour jitter for an image of (height, width). sem_seg (height, width) is
        the label map the single-category limit looks at; required when that limit is on."""
        resized_size = self.resize.get_geometry(height, width, rng).resized_size
        crop = self.crop_size
        if self.single_category_max_area < 1.0:
            if sem_seg is None:
                raise ValueError("sem_seg is required when single_category_max_area < 1")
            resized = Geometry((height, width), resized_size).apply_segmentation(sem_seg, self.ignore_label)
            top, left = category_limited_crop(
                resized, crop, rng, self.single_category_max_area, self.ignore_label
            )
        else:
            top, left, _, _ = random_window(resized_size, crop, rng)
        flip = bool(self.flip and rng.uniform() < 0.5)
        color = self.photometric.sample(rng) if self.photometric is not None else None
        return Geometry((height, width), resized_size, top, left, crop, flip, color)

    def apply(
        self, image: np.ndarray, sem_seg: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """image (H, W, 3) uint8, sem_seg (H, W) ints -> (crop height, crop width, 3) uint8 and
        (crop height, crop width) int32 (padding = ignore_label)."""
        if tuple(sem_seg.shape) != tuple(image.shape[:2]):
            raise ValueError(f"sem_seg has size {sem_seg.shape}, the image {image.shape[:2]}")
        geometry = self.get_geometry(*image.shape[:2], rng, sem_seg)
        return geometry.apply_image(image, self.image_pad_value), geometry.apply_segmentation(
            sem_seg, self.ignore_label
        )

    def __repr__(self) -> str:
        return (
            f"SemanticAugmentation(crop_size={self.crop_size}, short_sizes={self.short_sizes}, "
            f"max_size={self.max_size}, single_category_max_area={self.single_category_max_area}, "
            f"color={self.photometric is not None}, flip={self.flip})"
        )

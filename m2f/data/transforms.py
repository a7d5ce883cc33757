"""Geometric augmentations that keep images, segmentation maps and polygons aligned.

A transform draws a `Geometry` for an image size (random parts from a numpy Generator); the geometry is then
applied to the image (bilinear), to id-maps (nearest) and to polygons (exact coordinates), so all targets see
the same resize, crop/pad and flip. Coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Geometry:
    """Resize in_size -> resized_size, take the window of out_size at (top, left) of the resized image
    (parts beyond it are padding), then mirror horizontally when flip. Sizes are (H, W)."""

    in_size: tuple[int, int]
    resized_size: tuple[int, int]
    top: int = 0
    left: int = 0
    out_size: tuple[int, int] | None = None
    flip: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        return self.out_size if self.out_size is not None else self.resized_size

    def _check(self, array: np.ndarray, name: str) -> None:
        if tuple(array.shape[:2]) != tuple(self.in_size):
            raise ValueError(f"{name} has size {array.shape[:2]}, the geometry expects {self.in_size}")

    def _window(self, resized: np.ndarray, fill) -> np.ndarray:
        out_h, out_w = self.output_size
        out = np.full((out_h, out_w, *resized.shape[2:]), fill, dtype=resized.dtype)
        src = resized[self.top : self.top + out_h, self.left : self.left + out_w]
        out[: src.shape[0], : src.shape[1]] = src
        return out[:, ::-1].copy() if self.flip else out

    def apply_image(self, image: np.ndarray, pad_value: int = 0) -> np.ndarray:
        """(H, W, 3) uint8 -> (out_h, out_w, 3) uint8, bilinear."""
        self._check(image, "image")
        if self.resized_size != self.in_size:
            h, w = self.resized_size
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        return self._window(image, pad_value)

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
        out_w = self.output_size[1]
        result = []
        for polygon in polygons:
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
            x = xy[:, 0] * scale_x - self.left
            y = xy[:, 1] * scale_y - self.top
            if self.flip:
                x = out_w - x
            result.append(np.stack([x, y], axis=1).reshape(-1).tolist())
        return result


def _check_size(name: str, size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")


class LSJ:
    """Large-scale jitter: resize so the image fits image_size * s (s uniform in [min_scale, max_scale],
    aspect kept), random crop to image_size when larger, pad bottom/right when smaller, horizontal flip with
    probability 0.5. Output is always (image_size, image_size)."""

    def __init__(self, image_size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip: bool = True):
        _check_size("image_size", image_size)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
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
            _check_size("short", value)
        _check_size("max_size", max_size)
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

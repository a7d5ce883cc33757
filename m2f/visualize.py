"""Drawing of panoptic, instance and semantic results (PIL + numpy) and of the training loss curve.

Images are (H, W, 3) uint8 RGB arrays; every draw_* function returns a new PIL image: the input blended with
one colour per segment, segment outlines, and a legend panel on the right naming the classes shown.
"""

from __future__ import annotations

import colorsys
import csv
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2f.files import save_figure_atomic

MASK_ALPHA = 0.55
LEGEND_FONT_SIZE = 12
MIN_DISPLAY_SIZE = 256  # smaller images are enlarged (nearest neighbour, integer factor) before drawing


def class_colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8, well separated hues (golden-ratio steps) at two brightness levels."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    colors = [
        colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.7)
        for i in range(num_classes)
    ]
    return (np.array(colors, dtype=np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)


# (fraction, toward): instance k's colour is the class colour moved that fraction of the way toward black (0) or
# white (255), by turns, so that neighbouring instances differ clearly; the cycle repeats every 7 instances.
INSTANCE_SHADES = ((0.0, 0), (0.4, 0), (0.4, 255), (0.65, 0), (0.65, 255), (0.2, 0), (0.2, 255))


def instance_color(class_color: np.ndarray, instance: int) -> np.ndarray:
    """A shade of a class colour per instance (instance 0 is the class colour itself), INSTANCE_SHADES."""
    fraction, toward = INSTANCE_SHADES[int(instance) % len(INSTANCE_SHADES)]
    color = np.asarray(class_color, dtype=np.float64)
    return np.round(color + fraction * (toward - color)).astype(np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    return image


def _check_map(name: str, array: np.ndarray, image: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got {array.dtype}")
    if array.shape != image.shape[:2]:
        raise ValueError(f"{name} must have the image's size {image.shape[:2]}, got {array.shape}")
    return array


def enlarge(array: np.ndarray, factor: int, first_axis: int) -> np.ndarray:
    """Repeats axes first_axis and first_axis + 1 (height and width) `factor` times (nearest neighbour)."""
    for axis in (first_axis, first_axis + 1):
        array = np.repeat(array, factor, axis=axis)
    return array


def display_factor(height: int, width: int) -> int:
    """The integer enlargement that brings the long side to at least MIN_DISPLAY_SIZE (1 if it is already)."""
    return max(1, -(-MIN_DISPLAY_SIZE // max(height, width, 1)))


def segment_boundaries(segment_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another segment."""
    edges = np.zeros(segment_map.shape, dtype=bool)
    edges[:, :-1] |= segment_map[:, :-1] != segment_map[:, 1:]
    edges[:-1, :] |= segment_map[:-1, :] != segment_map[1:, :]
    return edges


def blend_segments(image: np.ndarray, segment_map: np.ndarray, colors: dict[int, np.ndarray]) -> np.ndarray:
    """Blends colors[id] over the pixels of each segment id (ids not in `colors` stay as they are) and darkens
    the segment outlines. Returns (H, W, 3) uint8."""
    out = image.astype(np.float32)
    for segment_id, color in colors.items():
        region = segment_map == segment_id
        out[region] = (1 - MASK_ALPHA) * out[region] + MASK_ALPHA * np.asarray(color, dtype=np.float32)
    out[segment_boundaries(segment_map)] *= 0.3
    return out.round().clip(0, 255).astype(np.uint8)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _one_line(text: str) -> str:
    """A name as one line of text (PIL cannot measure multiline text; names may hold newlines or tabs)."""
    return " ".join(str(text).split())


def add_legend(image: Image.Image, entries: Sequence[tuple[str, np.ndarray]], title: str = "") -> Image.Image:
    """Appends a panel on the right with a colour swatch and a name per entry (duplicates shown once)."""
    font = ImageFont.load_default(size=LEGEND_FONT_SIZE)
    unique = list(dict.fromkeys((_one_line(name), tuple(int(c) for c in color)) for name, color in entries))
    lines = ([(title, None)] if title else []) + unique
    line_height = LEGEND_FONT_SIZE + 6
    scratch = ImageDraw.Draw(image)
    text_width = max([scratch.textlength(name, font=font) for name, _ in lines] + [40])
    width = int(text_width) + 34
    height = max(image.height, line_height * len(lines) + 10)
    canvas = Image.new("RGB", (image.width + width, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (name, color) in enumerate(lines):
        top = 5 + row * line_height
        left = image.width + 6
        if color is not None:
            draw.rectangle(
                [left, top + 2, left + 14, top + 2 + LEGEND_FONT_SIZE], fill=color, outline=(0, 0, 0)
            )
        draw.text((left + (20 if color is not None else 0), top), name, fill=(0, 0, 0), font=font)
    return canvas


def draw_panoptic(
    image: np.ndarray,
    panoptic_seg: np.ndarray,
    segments_info: Sequence[dict],
    class_names: Sequence[str],
) -> Image.Image:
    """panoptic_seg (H, W) int segment ids (0 = void); segments_info: dicts with "id", "category_id"
    (contiguous class index) and optionally "isthing". Things of one class get shades of its colour."""
    image = _check_image(image)
    panoptic_seg = _check_map("panoptic_seg", panoptic_seg, image)
    factor = display_factor(*image.shape[:2])
    panoptic_seg, image = enlarge(panoptic_seg, factor, 0), enlarge(image, factor, 0)
    palette = class_colors(len(class_names))
    colors, legend, seen_per_class = {}, [], {}
    for segment in segments_info:
        label = int(segment["category_id"])
        if not 0 <= label < len(class_names):
            raise ValueError(f"segments_info category_id {label} is outside the {len(class_names)} classes")
        nth = seen_per_class.get(label, 0)
        seen_per_class[label] = nth + 1
        colors[int(segment["id"])] = instance_color(palette[label], nth if segment.get("isthing") else 0)
        legend.append((class_names[label], palette[label]))
    overlay = Image.fromarray(blend_segments(image, panoptic_seg, colors))
    return add_legend(overlay, legend, title="panoptic")


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Image.Image:
    """masks (K, H, W) bool; instances with score >= score_threshold are drawn with a box and "name score"."""
    image = _check_image(image)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (K, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    if not len(labels) == len(scores) == len(masks):
        raise ValueError(
            f"masks, labels and scores must have the same length: {len(masks)}, {len(labels)}, {len(scores)}"
        )
    factor = display_factor(*image.shape[:2])
    masks, image = enlarge(masks, factor, 1), enlarge(image, factor, 0)
    palette = class_colors(len(class_names))
    keep = [k for k in np.argsort(-np.asarray(scores, dtype=np.float64)) if scores[k] >= score_threshold]
    bad = [labels[k] for k in keep if not (_is_int(labels[k]) and 0 <= labels[k] < len(class_names))]
    if bad:
        raise ValueError(
            f"labels {bad} are not among the {len(class_names)} classes (ints 0..{len(class_names) - 1})"
        )
    segment_map = np.zeros(image.shape[:2], dtype=np.int64)
    colors, legend = {}, []
    for rank, k in enumerate(reversed(keep)):  # the highest score is painted last, on top
        segment_map[masks[k]] = rank + 1
        colors[rank + 1] = instance_color(palette[int(labels[k])], rank)
    overlay = Image.fromarray(blend_segments(image, segment_map, colors))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=LEGEND_FONT_SIZE)
    for rank, k in enumerate(reversed(keep)):
        ys, xs = np.nonzero(masks[k])
        if len(xs) == 0:
            continue
        color = tuple(int(c) for c in colors[rank + 1])
        draw.rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], outline=color, width=2)
        draw.text(
            (int(xs.min()) + 2, int(ys.min()) + 1),
            f"{_one_line(class_names[int(labels[k])])} {scores[k]:.2f}",
            fill=(255, 255, 255),
            font=font,
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
        legend.append((class_names[int(labels[k])], palette[int(labels[k])]))
    return add_legend(overlay, legend, title="instances")


def draw_semantic(
    image: np.ndarray, label_map: np.ndarray, class_names: Sequence[str], ignore_index: int | None = 255
) -> Image.Image:
    """label_map (H, W) int class per pixel; ignore_index pixels are left uncoloured (None: every pixel has a
    class, e.g. a prediction of a model with 256 or more classes)."""
    image = _check_image(image)
    label_map = _check_map("label_map", label_map, image)
    factor = display_factor(*image.shape[:2])
    label_map, image = enlarge(label_map, factor, 0), enlarge(image, factor, 0)
    palette = class_colors(len(class_names))
    present = [int(v) for v in np.unique(label_map) if ignore_index is None or v != ignore_index]
    bad = [v for v in present if not 0 <= v < len(class_names)]
    if bad:
        raise ValueError(f"label_map has classes {bad} outside the {len(class_names)} classes")
    overlay = Image.fromarray(blend_segments(image, label_map, {v: palette[v] for v in present}))
    return add_legend(overlay, [(class_names[v], palette[v]) for v in present], title="semantic")


def read_metrics_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The training log written by m2f.engine.train -> column name -> float array."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}


def plot_loss_curve(
    metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str = "training loss"
) -> None:
    """Plots total_loss and the final-layer loss_* columns (not the numbered deep-supervision ones) against
    iteration, log scale, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_metrics_csv(metrics_csv)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(columns["iteration"], columns["total_loss"], label="total_loss", linewidth=2, color="black")
    for name in sorted(columns):
        if name.startswith("loss_") and not name.rsplit("_", 1)[-1].isdigit() and columns[name].max() > 0:
            axis.plot(columns["iteration"], columns[name], label=name, linewidth=1, alpha=0.8)
    axis.set_yscale("log")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss (weighted)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    save_figure_atomic(figure, out_png)
    plt.close(figure)

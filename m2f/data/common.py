"""Shared pieces of the datasets: metadata, errors, file helpers, the panoptic id encoding and collate."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from m2f.checks import check_int

IGNORE_LABEL = 255


class DatasetError(Exception):
    """A dataset on disk is inconsistent. `problems` lists one line per problem (file and id named)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass
class DatasetMetadata:
    """What the model, the evaluators and the visualizer need to know about a dataset's classes.

    categories: COCO category dicts (id, name, isthing, ...) sorted by id; contiguous class index i is
    categories[i]. Paths point at the ground truth the evaluators read (None when not applicable).
    """

    categories: list[dict[str, Any]]
    panoptic_json: str | None = None
    panoptic_root: str | None = None
    instances_json: str | None = None
    image_root: str | None = None
    ignore_label: int = IGNORE_LABEL
    contiguous_to_category_id: list[int] = field(init=False)
    category_id_to_contiguous: dict[int, int] = field(init=False)
    thing_classes: set[int] = field(init=False)
    class_names: list[str] = field(init=False)

    def __post_init__(self):
        self.categories = sorted(self.categories, key=lambda c: c["id"])
        ids = [c["id"] for c in self.categories]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"duplicate category ids in {sorted(ids)}")
        self.contiguous_to_category_id = ids
        self.category_id_to_contiguous = {cid: i for i, cid in enumerate(ids)}
        self.thing_classes = {i for i, c in enumerate(self.categories) if c.get("isthing", 1) == 1}
        self.class_names = [c["name"] for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)


def read_json(path: str) -> Any:
    """Load a JSON file, raising DatasetError that names the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: invalid JSON ({error})") from error


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic PNG colours (H, W, 3) uint8 -> segment ids (H, W) int64, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) in [0, 2^24) -> (H, W, 3) uint8 colours; inverse of rgb_to_id."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("ids must be in [0, 2^24)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


@contextlib.contextmanager
def naming_unreadable(path: str):
    """Turns PIL's errors for a file it cannot decode (truncated, not an image, too large), which do not say
    which file, into a DatasetError that does."""
    try:
        yield
    except (OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: unreadable ({error})") from error


def read_panoptic_png(path: str) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO panoptic PNG. DatasetError naming the file when it cannot be read."""
    with naming_unreadable(path), Image.open(path) as png:
        return rgb_to_id(np.asarray(png.convert("RGB")))


def check_annotations_exist(paths: list[str], what: str, source: str) -> None:
    """DatasetError listing the missing files among paths; what: their kind, source: where they come from."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DatasetError(
            f"{len(missing)} images lack a {what} ({source}), first: {missing[0]}",
            [f"{path}: missing {what}" for path in missing],
        )


def read_label_png(path: str) -> np.ndarray:
    """(H, W) int64 values of a single-channel label PNG (8 or 16 bit) as stored. DatasetError naming the file
    when it cannot be read or has more than one channel."""
    with naming_unreadable(path), Image.open(path) as png:
        raw = np.asarray(png, dtype=np.int64)
    if raw.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel label PNG, got shape {raw.shape}")
    return raw


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (as detectron2's read_image). A 16-bit grayscale image
    keeps its high byte (PIL's conversion to RGB would clip every value above 255). DatasetError naming the
    file when it cannot be read."""
    with naming_unreadable(path), Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (as read_image does), without
    decoding it."""
    width, height = image.size
    return (
        (height, width)
        if image.getexif().get(ImageOps.ExifTags.Base.Orientation) in (5, 6, 7, 8)
        else (width, height)
    )


def check_image_size(image: np.ndarray, expected_hw: tuple[int, int], path: str) -> None:
    if tuple(image.shape[:2]) != tuple(expected_hw):
        raise DatasetError(
            f"{path}: image size {image.shape[:2]} differs from the annotation's {expected_hw}"
        )


def collate(
    batch: list[dict[str, Any]],
    size_divisibility: int = 32,
    pad_value: Sequence[float] = (0.0, 0.0, 0.0),
):
    """Batch dataset items.

    Returns images (B, 3, Hp, Wp) float32 in 0..255 padded at the bottom/right with pad_value (per RGB
    channel; the model's pixel mean pads as detectron2 does, with 0 after normalization), Hp and Wp the
    largest height and width rounded up to `size_divisibility`; targets: list of {"labels" (T,) int64, "masks"
    (T, Hp, Wp) bool} (plus "sem_seg" (Hp, Wp) int64 padded with 255 when items have one); infos: list of
    {"image_id", "file_name", "orig_size", "image_size" (H, W) before padding}.
    """
    if not batch:
        raise ValueError("batch must not be empty")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    heights = [item["image"].shape[-2] for item in batch]
    widths = [item["image"].shape[-1] for item in batch]
    padded_h = -(-max(heights) // size_divisibility) * size_divisibility
    padded_w = -(-max(widths) // size_divisibility) * size_divisibility
    if len(pad_value) != 3:
        raise ValueError(f"pad_value must have one value per RGB channel, got {pad_value!r}")
    pad = torch.tensor(pad_value, dtype=torch.float32).view(1, 3, 1, 1)
    images = pad.expand(len(batch), 3, padded_h, padded_w).clone()
    targets, infos = [], []
    for i, item in enumerate(batch):
        h, w = item["image"].shape[-2:]
        images[i, :, :h, :w] = item["image"]
        masks = torch.zeros(item["masks"].shape[0], padded_h, padded_w, dtype=torch.bool)
        masks[:, :h, :w] = item["masks"]
        target = {"labels": item["labels"], "masks": masks}
        if "sem_seg" in item:
            sem_seg = torch.full((padded_h, padded_w), IGNORE_LABEL, dtype=torch.int64)
            sem_seg[:h, :w] = item["sem_seg"]
            target["sem_seg"] = sem_seg
        targets.append(target)
        infos.append(
            {
                "image_id": item["image_id"],
                "file_name": item["file_name"],
                "orig_size": tuple(item["orig_size"]),
                "image_size": (h, w),
            }
        )
    return images, targets, infos


class PackedRecords(Sequence):
    """Dataset records (picklable values) packed into one numpy byte array, unpickled per item.

    A DataLoader worker forked from the process that built them reads them without touching one Python object
    per record: as a list, every record a worker reads (and every garbage-collector pass) would write to the
    objects' reference counts and make the worker copy their memory pages, gigabytes per worker and epoch for
    COCO's instance polygons.
    """

    def __init__(self, records: Iterable):
        blobs = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int | slice):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(memoryview(self._bytes[start : int(self._ends[index])]))


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of the datasets: per-index seeding and the shared target decoding.

    Randomness of item i in epoch e comes only from numpy's Generator seeded with (seed, e, i), so items are
    the same whatever worker loads them; call set_epoch(e) each epoch to draw new augmentations. No file is
    opened outside __getitem__ except the annotation JSON read once in __init__ (and the id maps
    CityscapesInstanceDataset reads there to leave out images without objects).
    """

    def __init__(self, transforms=None, seed: int = 0):
        if transforms is not None and not hasattr(transforms, "get_geometry"):
            raise TypeError(
                f"transforms must have a get_geometry(height, width, rng) method, got {transforms!r}"
            )
        self.transforms = transforms
        self.seed = check_int("seed", seed, 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    def item_rng(self, index: int) -> np.random.Generator:
        """The only source of randomness of item `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def geometry(self, index: int, height: int, width: int, sem_seg=None):
        """The transform of item `index`. sem_seg: a callable giving its (height, width) class map (ignore
        label where none), called only for a SemanticAugmentation whose crop looks at the classes."""
        from m2f.data.transforms import Geometry, SemanticAugmentation

        if self.transforms is None:
            return Geometry((height, width), (height, width))
        rng = self.item_rng(index)
        if isinstance(self.transforms, SemanticAugmentation) and self.transforms.single_category_max_area < 1:
            if sem_seg is None:
                raise ValueError(
                    f"{type(self).__name__} has no class map for the crop's single-category limit "
                    f"(single_category_max_area {self.transforms.single_category_max_area}); use 1.0"
                )
            return self.transforms.get_geometry(height, width, rng, sem_seg())
        return self.transforms.get_geometry(height, width, rng)


def masks_from_index_map(index_map: np.ndarray, count: int) -> torch.Tensor:
    """index_map (H, W) int with values in [0, count) or negative (no segment) -> masks (count, H, W) bool."""
    index_map = torch.from_numpy(np.ascontiguousarray(index_map)).long()
    return index_map[None] == torch.arange(count)[:, None, None]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def index_map_from_ids(ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """ids (H, W) int segment ids -> (H, W) int32 position of each pixel's id in segment_ids, -1 if absent."""
    if not len(segment_ids):
        return np.full(ids.shape, -1, dtype=np.int32)
    order = np.argsort(segment_ids).astype(np.int32)
    sorted_ids = np.asarray(segment_ids)[order]
    position = np.searchsorted(sorted_ids, ids)
    np.minimum(position, len(sorted_ids) - 1, out=position)
    index_map = order[position]
    index_map[sorted_ids[position] != ids] = -1
    return index_map


def pool_context():
    """Multiprocessing context for CPU-only worker pools (numpy/PIL work): fork where the platform has it
    (fast start, as torch's DataLoader), else spawn."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")

"""Conversion of the evaluators' inputs (tensors on any device, numpy arrays, lists) to numpy arrays, the
check their merges share and the keys of their per-class results."""

from __future__ import annotations

import collections

import numpy as np


def to_numpy(value) -> np.ndarray:
    """A numpy array of `value`; a tensor is detached and moved to the CPU, and a bfloat16 one (which numpy
    lacks) widened to float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:
            value = value.float()
    return np.asarray(value)


def check_new_images(seen: set, image_ids) -> None:
    """ValueError unless every id of image_ids is new to `seen` and listed once: an image evaluated twice
    would count twice."""
    repeated = [i for i, count in collections.Counter(image_ids).items() if count > 1 or i in seen]
    if repeated:
        raise ValueError(f"image ids {repeated[:10]} were already evaluated")


def per_class_keys(names, ids) -> list[str]:
    """Keys of per-class results: each class's name, and "name (id)" for a name that several classes share
    (for every class when such a key would be another class's name), so that no class's results replace
    another's."""
    names = [str(name) for name in names]
    counts = collections.Counter(names)
    keys = [name if counts[name] == 1 else f"{name} ({i})" for name, i in zip(names, ids, strict=True)]
    if len(set(keys)) < len(keys):
        keys = [f"{name} ({i})" for name, i in zip(names, ids, strict=True)]
    return keys

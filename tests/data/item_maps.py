"""Helpers for the dataset tests."""

import numpy as np


def semantic_map(item) -> np.ndarray:
    """(H, W) class of each pixel from an item's masks, 255 where none; the masks must not overlap."""
    masks = item["masks"].numpy()
    assert masks.sum(0).max() <= 1, "masks overlap"
    out = np.full(masks.shape[1:], 255, dtype=np.int64)
    for label, mask in zip(item["labels"].tolist(), masks):
        out[mask] = label
    return out

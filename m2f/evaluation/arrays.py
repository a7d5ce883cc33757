"""Conversion of the evaluators' inputs (tensors on any device, numpy arrays, lists) to numpy arrays."""

from __future__ import annotations

import numpy as np


def to_numpy(value) -> np.ndarray:
    """A numpy array of `value`; a tensor is detached and moved to the CPU, and a bfloat16 one (which numpy
    lacks) widened to float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:
            value = value.float()
    return np.asarray(value)

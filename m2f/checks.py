"""Argument checks shared by the model, the losses, training, the datasets and the evaluators."""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int when it is an int (numpy ints too, bool not) of at least ``minimum``; else a
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)

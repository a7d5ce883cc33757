"""Padding arithmetic that stays exact for symbolic sizes (torch.export, ONNX export)."""


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= size (size >= 0, multiple >= 1).

    Written so that, for a symbolic size, the result is seen to divide by `multiple` and every intermediate
    is non-negative (size + (-size) % multiple is neither: ONNX divides negative integers towards zero).
    """
    return (size + multiple - 1) // multiple * multiple

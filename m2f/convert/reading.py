"""Reading a foreign checkpoint file, with a ConversionError naming the file when it cannot be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .keymaps import ConversionError


def read_checkpoint_file(path: str | Path) -> Any:
    """The tensors of a .safetensors file, or what torch.load(weights_only=True) reads from any other file."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(
            f"{path}: a directory, not a checkpoint file (a transformers model directory: --format transformers)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # a missing or unreadable file says so itself, with its name
    except Exception as error:  # safetensors and the restricted unpickler raise several types
        how = "a safetensors file" if path.suffix == ".safetensors" else "torch.load(weights_only=True)"
        raise ConversionError(
            f"{path}: could not be read as {how} ({error}); if it is a trusted checkpoint in another format, "
            "re-save its state dict alone with torch.save"
        ) from error

"""detectron2 / Mask2Former checkpoints: model-zoo .pkl files and detectron2-trained .pth files.

A .pkl is read with a restricted unpickler that builds only numpy arrays, numpy dtypes/scalars and plain
Python containers; any other global (os.system, builtins.eval, a class...) raises UnsafeCheckpointError
before anything is constructed, so no code in the file runs. A .pth goes through
torch.load(weights_only=True).
detectron2 checkpoints carry no class names (detectron2 keeps them in its dataset catalog, not in the
weights): pass them to m2f.convert.convert_to_file as `classes`.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_bytes_atomic
from .keymaps import ConversionError
from .reading import read_checkpoint_file


class UnsafeCheckpointError(ConversionError, pickle.UnpicklingError):
    """A pickle asks for an object outside the allowed set (numpy arrays, dtypes, scalars, containers)."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array reconstructors, wherever they live
    from_buffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (out-of-band capable) arrays
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = from_buffer
    # numpy >= 1.25 pickles dtypes as numpy.dtypes.<Name>DType classes
    for name in dir(np.dtypes) if hasattr(np, "dtypes") else ():
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How protocol-2 pickles written by Python 3 store bytes; only the latin1 codec is accepted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class returns only allowed numpy/container globals."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {module}.{name}: detectron2 checkpoints may only contain numpy arrays and "
                "plain containers (the file would construct or call an arbitrary object)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            "refusing a pickle with persistent ids (not a detectron2 .pkl checkpoint)"
        )


def restricted_load(data: bytes) -> Any:
    """Unpickles `data` with RestrictedUnpickler (latin1 for Python 2 era model-zoo files)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray | np.generic)


def _to_tensor(value: torch.Tensor | np.ndarray | np.generic) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.array(value, copy=True))


def load_detectron2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a detectron2 checkpoint: the "model" entry of a .pkl/.pth, or a flat dict."""
    path = Path(path)
    if path.suffix == ".pkl":
        try:
            checkpoint = restricted_load(path.read_bytes())
        except UnsafeCheckpointError as error:
            raise UnsafeCheckpointError(f"{path}: {error}") from None
        except Exception as error:  # every kind of damaged pickle
            raise ConversionError(f"{path}: cannot be read as a detectron2 pickle: {error}") from error
    else:
        checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{path}: expected a dict of arrays, got {type(checkpoint).__name__}")
    not_arrays = [key for key, value in checkpoint.items() if not _is_array(value)]
    if not_arrays:
        hint = " (an mmdet checkpoint: --format mmdet)" if "state_dict" in not_arrays else ""
        raise ConversionError(
            f'{path}: not a detectron2 checkpoint: a "model" dict or a flat dict of arrays was expected, but '
            f"{', '.join(map(repr, not_arrays[:5]))} hold no array{hint}"
        )
    return {key: _to_tensor(value) for key, value in checkpoint.items()}


def save_detectron2_pkl(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Writes a model-zoo style .pkl ({"model": {name: ndarray}, "__author__": ...}) for detectron2."""
    arrays = {key: tensor.detach().cpu().numpy() for key, tensor in state_dict.items()}
    payload = {"model": arrays, "__author__": "m2f", "matching_heuristics": False}
    write_bytes_atomic(path, pickle.dumps(payload))

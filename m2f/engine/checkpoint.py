"""Atomic, code-free checkpoints: safetensors for the weights, a weights_only torch file for the rest.

A training checkpoint at iteration i in DIR is the pair
  DIR/model_{i:07d}.safetensors   model weights; metadata: format, iteration and model information (strings)
  DIR/model_{i:07d}.state.pt      optimizer, scheduler, grad scaler, RNG states, sampler position, iteration,
                                  and the SHA-256 of the weights file it belongs to
and DIR/last_checkpoint names the newest complete pair. Every file is written to a temporary file in the
same directory, fsynced and moved into place with os.replace, and last_checkpoint is updated only after both
files are in place, so a crash leaves the previous checkpoint intact. Loading never unpickles arbitrary
objects: safetensors holds only tensors and torch.load runs with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Collection
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from m2f.files import write_bytes_atomic

CHECKPOINT_FORMAT = "m2f-checkpoint-v1"
LAST_CHECKPOINT_FILE = "last_checkpoint"
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
# The class head's weights, (classes + 1, hidden) and (classes + 1,): what fine-tuning on other classes replaces.
CLASS_HEAD_KEYS = ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model; the message names the file."""


def checkpoint_stem(iteration: int) -> str:
    return f"model_{iteration:07d}"


def state_path_for(weights_path: str | os.PathLike) -> Path:
    """DIR/model_0000100.safetensors -> DIR/model_0000100.state.pt"""
    weights_path = Path(weights_path)
    if not weights_path.name.endswith(WEIGHTS_SUFFIX):
        raise CheckpointError(f"{weights_path}: a checkpoint's weights file must end with {WEIGHTS_SUFFIX}")
    return weights_path.with_name(weights_path.name[: -len(WEIGHTS_SUFFIX)] + STATE_SUFFIX)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def weights_to_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """Serializes the model's state dict (CPU copies, shared storage split) to safetensors bytes."""
    state = {
        name: t.detach().cpu().clone().contiguous() for name, t in unwrap_model(model).state_dict().items()
    }
    full_metadata = {"format": CHECKPOINT_FORMAT, **metadata}
    bad = [k for k, v in full_metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be str; not for keys {bad}")
    return safetensors.torch.save(state, metadata=full_metadata)


def save_weights(path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, str]) -> str:
    """Writes the model weights atomically; returns the file's SHA-256 hex digest."""
    data = weights_to_bytes(model, metadata)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    out_dir: str | os.PathLike,
    iteration: int,
    model: torch.nn.Module,
    training_state: dict,
    metadata: dict[str, str],
) -> Path:
    """Writes model_{iteration}.safetensors and .state.pt, then last_checkpoint; returns the weights path.

    training_state: anything torch.load(weights_only=True) can read back (tensors, numbers, strings, lists,
    tuples, dicts), e.g. optimizer/scheduler/scaler state dicts and `capture_rng_state()`.
    """
    out_dir = Path(out_dir)
    weights_path = out_dir / (checkpoint_stem(iteration) + WEIGHTS_SUFFIX)
    digest = save_weights(weights_path, model, {**metadata, "iteration": str(iteration)})
    buffer = io.BytesIO()
    torch.save(
        {"format": CHECKPOINT_FORMAT, "iteration": iteration, "weights_sha256": digest, **training_state},
        buffer,
    )
    write_bytes_atomic(state_path_for(weights_path), buffer.getvalue())
    write_bytes_atomic(out_dir / LAST_CHECKPOINT_FILE, (weights_path.name + "\n").encode())
    return weights_path


def find_last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The weights path named by DIR/last_checkpoint, or None when DIR has no checkpoint yet."""
    marker = Path(out_dir) / LAST_CHECKPOINT_FILE
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    weights_path = marker.parent / name
    if not name or not weights_path.exists():
        raise CheckpointError(f"{marker}: names {name!r}, which does not exist in {marker.parent}")
    return weights_path


def forget_last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """Removes DIR/last_checkpoint (a fresh run in DIR must not be resumed from an earlier run's checkpoint);
    returns the weights path it named, or None when there was none."""
    marker = Path(out_dir) / LAST_CHECKPOINT_FILE
    try:
        name = marker.read_text().strip()
    except FileNotFoundError:
        return None
    marker.unlink()
    return marker.parent / name


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads a safetensors file -> (state dict on CPU, metadata); CheckpointError naming it if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        data = path.read_bytes()
        state = safetensors.torch.load(data)
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt or not a safetensors checkpoint ({error})") from error
    return state, metadata or {}


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A safetensors file's (metadata, shape of each tensor), without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt or not a safetensors checkpoint ({error})") from error
    return metadata, shapes


def class_head_classes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The number of classes of a checkpoint's class head (its rows less "no object"), from read_header's
    shapes; None without one."""
    shape = shapes.get(CLASS_HEAD_KEYS[0])  # (classes + 1, hidden)
    return None if shape is None else shape[0] - 1


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def stored_classes(
    metadata: dict[str, str], path: str | os.PathLike
) -> tuple[list[str] | None, list[int] | None, list[dict] | None]:
    """The checkpoint's class metadata: "class_names" (names), "thing_classes" (indices of the thing classes)
    and "categories" (the dataset's categories, each with an int "id" and a str "name"); None for each the
    metadata does not hold. Raises CheckpointError naming the file and the key when one is malformed."""

    def parsed(key: str, valid, expected: str) -> list | None:
        if key not in metadata:
            return None
        try:
            value = json.loads(metadata[key])
        except ValueError as error:
            raise CheckpointError(f"{path}: metadata {key!r} is not JSON ({error})") from None
        if not isinstance(value, list) or not all(valid(item) for item in value):
            raise CheckpointError(f"{path}: metadata {key!r} must be {expected}, got {metadata[key][:200]}")
        return value

    names = parsed("class_names", lambda name: isinstance(name, str), "a JSON list of class names")
    things = parsed("thing_classes", _is_index, "a JSON list of class indices")
    categories = parsed(
        "categories",
        lambda c: isinstance(c, dict) and _is_index(c.get("id")) and isinstance(c.get("name"), str),
        'a JSON list of categories, each with an int "id" and a str "name"',
    )
    if names is not None and things is not None and any(index >= len(names) for index in things):
        raise CheckpointError(
            f"{path}: metadata 'thing_classes' {things} names classes beyond the {len(names)} of 'class_names'"
        )
    return names, things, categories


def load_config_for_checkpoint(config_name, metadata: dict[str, str], checkpoint: str | os.PathLike):
    """The config given (a name, a JSON file or a ModelConfig: m2f.config.load_config), else the one stored
    in the checkpoint's metadata."""
    from m2f.config import ModelConfig, load_config

    if config_name is not None:
        return load_config(config_name)
    if "config" not in metadata:
        raise ValueError(f"{checkpoint}: the checkpoint stores no config; pass --config NAME")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except ValueError as error:  # json.JSONDecodeError included
        raise ValueError(
            f"{checkpoint}: its stored config is unreadable ({error}); pass --config NAME"
        ) from error


def load_model_weights(
    model: torch.nn.Module, path: str | os.PathLike, *, keep_if_mis_shaped: Collection[str] = ()
) -> dict[str, str]:
    """Loads weights into `model` (strict: same keys and shapes); returns the file's metadata.

    keep_if_mis_shaped: keys whose checkpoint tensor may have another shape, in which case the model keeps
    its own (CLASS_HEAD_KEYS to fine-tune on other classes). Raises CheckpointError naming the file and
    listing missing, unexpected and mis-shaped keys.
    """
    state, metadata = read_weights(path)
    target = unwrap_model(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    for key in set(keep_if_mis_shaped) & set(state) & set(expected):
        if state[key].shape != expected[key].shape:
            state[key] = expected[key]
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{path}: checkpoint does not match the model"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape", mis_shaped),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError("; ".join(parts))
    target.load_state_dict(state, strict=True)
    return metadata


def load_training_state(weights_path: str | os.PathLike) -> dict:
    """Reads the .state.pt beside a weights file (weights_only=True); checks the pair belongs together."""
    weights_path = Path(weights_path)
    state_path = state_path_for(weights_path)
    if not state_path.is_file():
        raise CheckpointError(
            f"training state file not found: {state_path} (needed to resume from {weights_path})"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{state_path}: corrupt training state file ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{state_path}: not an {CHECKPOINT_FORMAT} training state file")
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if state.get("weights_sha256") != digest:
        raise CheckpointError(
            f"{weights_path}: weights file does not match its training state {state_path} (SHA-256 differs); "
            "the file is corrupt or was replaced"
        )
    return state


def capture_rng_state() -> dict:
    """The RNG states of python `random`, numpy's global generator, torch CPU and (if present) CUDA."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw; a resumed process may see fewer (or more) GPUs.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)

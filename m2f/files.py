"""Atomic file writes: every file m2f writes appears whole or not at all.

The data goes to a temporary file in the target's folder, is flushed to disk (fsync), renamed over the target
(os.replace) and the folder entry is flushed too, so a crash leaves either the old file or the new one.
Images, arrays and figures are encoded in memory first.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _process_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (parent folders are created). The file gets the permissions a plain open()
    would give it (0o666 less the umask), or those of the file it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    # The temporary name starts like the target's, kept short (32 characters are at most 128 bytes) so that
    # it fits wherever the target's name does.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name[:_TEMPORARY_TARGET_CHARS]}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_TEMPORARY_TARGET_CHARS = 32
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike, prefixes: tuple[str, ...]) -> list[Path]:
    """Removes the temporary files write_bytes_atomic left in `folder` for targets whose names start with
    one of `prefixes` (a process killed while writing: SIGKILL, power loss); returns their paths. Only for
    targets that no other running process writes."""
    prefixes = tuple(prefix[:_TEMPORARY_TARGET_CHARS] for prefix in prefixes)  # as the names are cut
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY_NAME.match(path.name)
        if match and match["target"].startswith(prefixes) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_path(
    path: str | os.PathLike, what: str, *, folder: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Raises ValueError naming `what` unless `path` can be written as a file (or, with folder, made a folder):
    neither it (for a file) nor a folder above it may be a file of the other kind, and it may not be one of
    the command's `inputs` (however spelled). Checked before long work that ends by writing there. Returns
    the path."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise ValueError(f"{what} {path} is {kind}; expected {'a folder' if folder else 'a file name'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
            break
    if path.exists():  # only an existing file can be an input
        resolved = path.resolve()
        for source in inputs:
            if Path(source).resolve() == resolved:
                raise ValueError(f"{what} {path} would overwrite an input of this command ({source})")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())


def save_image_atomic(image, path: str | os.PathLike, **save_kwargs) -> None:
    """Saves a PIL image in the format its suffix names (.png, .jpg, ...)."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats:
        raise ValueError(f"no image format for the suffix {suffix!r} of {path}")
    buffer = io.BytesIO()
    image.save(buffer, format=formats[suffix], **save_kwargs)
    write_bytes_atomic(path, buffer.getvalue())


def save_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """np.savez_compressed of `arrays` to `path` (named as given: no .npz is appended)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def save_figure_atomic(figure, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Saves a matplotlib figure in the format its suffix names."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or None, **savefig_kwargs)
    write_bytes_atomic(path, buffer.getvalue())

"""Atomic file writes: write a temporary file next to the target, then rename it over the target.

    with atomic_path("out/case.nii.gz") as tmp:         # a temporary name with the same suffix
        nib.save(img, tmp)
    atomic_write(path, lambda f: np.save(f, array))      # any writer of a binary file object
    atomic_write_text(path, json.dumps(report, default=json_default))   # numpy/torch scalars too
    check_writable("runs/demo", "out_dir")               # before long work: one line if not writable

An interrupted or failed write (full disk, crash) leaves the previous file intact and no
temporary file behind; readers never see a half-written file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch

from core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix, for writers that pick the format from
    it); renamed to ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(file)`` into a temporary file in ``path``'s folder, then rename it to ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and one-element tensors as Python
    numbers; anything else is a ``TypeError`` as without it."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def check_writable(folder: str | Path, what: str) -> None:
    """``UserError`` (one line naming ``folder`` and ``what`` sets it) unless a file can be created
    in ``folder``: the folder is created if needed, probed with a temporary file, and every folder
    the probe created is removed again."""
    folder = Path(folder)
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)) or err.errno == errno.ENOTDIR:
            reason = "a file of that name is in the way"
        raise UserError(f"{folder}: cannot write there ({reason}); set {what} to a writable folder") from None
    finally:
        for path in created:  # deepest first: remove only what the probe made
            with contextlib.suppress(OSError):
                path.rmdir()

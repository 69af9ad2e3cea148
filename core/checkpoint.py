"""Checkpoints: atomic save, safe load (``weights_only=True``), one format for train and infer.

A checkpoint is a plain dict of tensors and plain types::

    {"format": "brats-seg/1",
     "config": to_dict(cfg),          # the resolved config: rebuilds model + preprocessing
     "task": task.to_dict(),          # the task schema of the training data (labels, regions, rules)
     "modalities": [...],             # input channels (canonical names), "output_mode": labels | regions
     "model": state_dict,             # unwrapped from DDP / torch.compile
     ... training state (optimizer, scheduler, scaler, epoch, iteration, best, rng) ...}

Checkpoints written before tasks existed hold ``"convention": "2021" | "2023"`` instead of
``"task"``; they load as the BraTS glioma task of that convention (``stored_task``), and their
config's old keys are migrated (``core.config.migrate_keys``).
"""
from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_path
from core.config import migrate_keys
from core.errors import UserError
from core.task import Task, TaskError, legacy_task

FORMAT = "brats-seg/1"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint (or exported model) file, read in 1-MB chunks: what identifies the
    weights that wrote a prediction folder or an ONNX export."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to ``path.tmp`` then rename: an interrupted write never leaves a corrupt file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; ``UserError`` if missing, corrupt or not one of ours: one
    line naming the file and the problem (a folder lists the checkpoints in it)."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.name for p in path.glob("*.pt") if p.is_file())
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise UserError(f"{path}: is a folder; its checkpoints: {', '.join(names[:10])}{more}" if names
                        else f"{path}: is a folder with no checkpoint (*.pt) in it")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    with warnings.catch_warnings(record=True) as caught:  # torch warns about files it then refuses
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise UserError(f"{path}: {unreadable_reason(path, err)}") from None
    for warning in caught:  # a checkpoint that loads: its warnings, if any, are shown
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this repository (no '{FORMAT}' format tag)")
    for key in ("config", "model"):
        if key not in state:
            raise UserError(f"{path}: checkpoint is missing '{key}'")
    if "task" not in state and "convention" not in state:
        raise UserError(f"{path}: checkpoint is missing 'task'")
    if isinstance(state["config"], dict):
        migrate_keys(state["config"])
    return state


# the first bytes of files that are mistaken for checkpoints -> what they are
_OTHER_FORMATS = ((b"\x1f\x8b", "a gzip file: a NIfTI image .nii.gz?"), (b"\x93NUMPY", "a NumPy .npy array"),
                  (b"\x89HDF", "an HDF5 file, e.g. Keras weights"), (b"\x89PNG", "a PNG image"))
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"  # torch.save before the zip format
_TRUNCATED = ("central directory", "truncated", "ran out of input", "unexpected end", "corrupt", "eof")


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``err``, in words (no ANSI codes, no
    advice of torch's): what the file is, judged by its first bytes and the error."""
    if isinstance(err, OSError):
        return f"cannot read the file ({err.strerror or type(err).__name__})"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    text = " ".join(str(err).split()).lower()
    refused = isinstance(err, pickle.UnpicklingError) or "weights only load failed" in text
    if size == 0:
        return "the file is empty (an interrupted copy?)"
    if head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH):  # what torch.save writes
        if head.startswith(b"PK") and not _is_torch_zip(path):
            return ("the file is truncated or corrupt (an incomplete copy?)" if not zipfile.is_zipfile(path)
                    else "a zip archive, not a PyTorch checkpoint")
        if refused:
            found = re.search(r"global ([\w.]+)", str(err), flags=re.IGNORECASE)
            what = f" ({found.group(1)})" if found else ""
            return (f"holds Python objects that torch.load(weights_only=True) refuses{what}: not a checkpoint "
                    "of this repository")
        return "the file is truncated or corrupt (an incomplete copy?)"
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"not a PyTorch checkpoint ({what})"
    if head.startswith(b"\x80"):
        return "not a PyTorch checkpoint (a Python pickle not written by torch.save)"
    if b"\x00" not in head and _looks_like_text(head):
        return "not a PyTorch checkpoint (a text file?)"
    if isinstance(err, EOFError) or any(word in text for word in _TRUNCATED):
        return "the file is truncated or corrupt"
    return "not a PyTorch checkpoint (unrecognised content)"


def _is_torch_zip(path: Path) -> bool:
    """A zip archive holding ``<name>/data.pkl``, as ``torch.save`` writes (False if unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sample
            return False
    printable = sum(32 <= b < 127 or b in b"\t\n\r" or b >= 128 for b in head)
    return printable >= 0.95 * len(head)


def stored_task(state: dict[str, Any], path: str | Path) -> Task:
    """The task a checkpoint was trained on (a pre-task checkpoint: the glioma task of its
    label convention); ``UserError`` naming ``path`` if the stored schema is invalid."""
    if "task" in state:
        return Task.from_dict(state["task"], where=f"{path}: stored task")
    try:
        return legacy_task(state["convention"])
    except TaskError as err:
        raise UserError(f"{path}: {err}") from None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

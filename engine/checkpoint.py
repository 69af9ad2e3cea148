"""Checkpoints: atomic save, safe load (``weights_only=True``), one format for train and infer.

A checkpoint is a plain dict of tensors and plain types::

    {"format": "brats-seg/1",
     "config": to_dict(cfg),          # the resolved config: rebuilds model + preprocessing
     "convention": "2021" | "2023",   # label convention of the training data (ET = 4 or 3)
     "model": state_dict,             # unwrapped from DDP / torch.compile
     ... training state (optimizer, scheduler, scaler, epoch, iteration, best, rng) ...}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError

FORMAT = "brats-seg/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to ``path.tmp`` then rename: an interrupted write never leaves a corrupt file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; ``UserError`` if missing, corrupt or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        msg = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this repository (no '{FORMAT}' format tag)")
    for key in ("config", "model", "convention"):
        if key not in state:
            raise UserError(f"{path}: checkpoint is missing '{key}'")
    return state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

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
config's old keys are migrated (``engine.config.migrate_keys``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engine.config import migrate_keys
from engine.errors import UserError
from engine.task import Task, TaskError, legacy_task

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
    for key in ("config", "model"):
        if key not in state:
            raise UserError(f"{path}: checkpoint is missing '{key}'")
    if "task" not in state and "convention" not in state:
        raise UserError(f"{path}: checkpoint is missing 'task'")
    if isinstance(state["config"], dict):
        migrate_keys(state["config"])
    return state


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

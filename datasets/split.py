"""Train/validation split: from a JSON file, or one fold of a seeded k-fold split.

    split = make_split(index.case_ids, cfg.data)   # {"train": [...], "val": [...]}
    save_split(split, run_dir / "split.json")      # the run records which cases it used
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from engine.config import DataConfig
from engine.errors import UserError


def make_split(case_ids: list[str], data_cfg: DataConfig) -> dict[str, list[str]]:
    """``{"train": ids, "val": ids}`` from ``data_cfg.split_file`` if set, else fold
    ``data_cfg.fold`` of a ``data_cfg.folds``-fold split of the cases shuffled with ``data_cfg.seed``.

    The k-fold split depends only on the set of ids and the seed (ids are sorted first); the
    validation folds partition the cases and differ in size by at most one.
    """
    if data_cfg.split_file:
        return load_split(data_cfg.split_file, case_ids)
    return kfold_split(case_ids, data_cfg.folds, data_cfg.fold, data_cfg.seed)


def kfold_split(case_ids: list[str], folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """Fold ``fold`` of a ``folds``-fold split; ``UserError`` for bad settings (names the key)."""
    if folds < 2:
        raise UserError(f"data.folds must be >= 2 for a k-fold split, got {folds} (or set data.split_file)")
    if not 0 <= fold < folds:
        raise UserError(f"data.fold must be in 0..{folds - 1}, got {fold}")
    ids = sorted(set(case_ids))
    if len(ids) < folds:
        raise UserError(f"data.folds = {folds} but only {len(ids)} labelled case(s); "
                        "lower data.folds or add cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    val_positions = set(np.array_split(order, folds)[fold].tolist())
    return {"train": [ids[i] for i in range(len(ids)) if i not in val_positions],
            "val": [ids[i] for i in range(len(ids)) if i in val_positions]}


def load_split(path: str | Path, case_ids: list[str]) -> dict[str, list[str]]:
    """Read ``{"train": [...], "val": [...]}``; every id must be one of ``case_ids``, and no id
    may be in both lists (``UserError`` naming the file and the id)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split file not found (data.split_file)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: invalid JSON in split file ({err})") from None
    if not isinstance(raw, dict) or not {"train", "val"} <= set(raw):
        raise UserError(f'{path}: split file must be an object with "train" and "val" lists')
    known = set(case_ids)
    split = {}
    for key in ("train", "val"):
        ids = raw[key]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise UserError(f'{path}: "{key}" must be a list of case ids (strings)')
        for case_id in ids:
            if case_id not in known:
                raise UserError(f'{path}: case "{case_id}" in "{key}" is not a labelled case of the data folder')
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise UserError(f'{path}: case "{duplicates[0]}" is listed twice in "{key}"')
        split[key] = list(ids)
    overlap = sorted(set(split["train"]) & set(split["val"]))
    if overlap:
        raise UserError(f'{path}: case "{overlap[0]}" is in both "train" and "val"')
    if not split["train"]:
        raise UserError(f'{path}: "train" is empty')
    return split


def save_split(split: dict[str, list[str]], path: str | Path) -> Path:
    """Write the split as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"train": list(split["train"]), "val": list(split["val"])}, indent=1))
    os.replace(tmp, path)
    return path

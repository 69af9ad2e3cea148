"""Train/validation split: from a JSON file, or one fold of a seeded k-fold split by patient.

    split = make_split(index.case_ids, cfg.data)   # {"train": [...], "val": [...]}
    save_split(split, run_dir / "split.json")      # the run records which cases it used

``BraTS-XXX-NNNNN-TTT`` (any cohort, also ``BraTS-MEN-RT-NNNN-T``) is time point ``TTT`` of
patient ``BraTS-XXX-NNNNN``: the k-fold split keeps all time points of a patient in one fold, so
no patient is in both training and validation. Other ids (``BraTS2021_00000``, ``BRATS_001``)
are one patient each.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_text
from core.config import DataConfig
from core.errors import UserError

# BraTS-<cohort, possibly several words>-<patient number>-<time point>
_TIMEPOINT_ID = re.compile(r"^(BraTS-(?:[A-Za-z]+-)+\d+)-\d+$", re.IGNORECASE)


def patient_id(case_id: str) -> str:
    """``"BraTS-GLI-00007-101"`` -> ``"BraTS-GLI-00007"``, ``"BraTS-MEN-RT-0007-1"`` ->
    ``"BraTS-MEN-RT-0007"``; any other id is its own patient (``"BraTS2021_00007"``)."""
    match = _TIMEPOINT_ID.match(case_id)
    return match.group(1) if match else case_id


def make_split(case_ids: list[str], data_cfg: DataConfig) -> dict[str, list[str]]:
    """``{"train": ids, "val": ids}`` from ``data_cfg.split_file`` if set, else fold
    ``data_cfg.fold`` of a ``data_cfg.folds``-fold split by patient (``kfold_split``) with
    ``data_cfg.seed``."""
    if data_cfg.split_file:
        return load_split(data_cfg.split_file, case_ids)
    return kfold_split(case_ids, data_cfg.folds, data_cfg.fold, data_cfg.seed)


def kfold_split(case_ids: list[str], folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """Fold ``fold`` of a ``folds``-fold split by patient (``patient_id``); ``UserError`` when there
    are fewer patients than folds (the ranges of data.folds and data.fold are the config's). Both
    lists are sorted.

    The split depends only on the set of ids and the seed. The patients (ordered by their first
    case id) are shuffled with ``seed``. Patients with several cases go first, largest first (ties
    in shuffled order), each to the fold with the fewest cases so far (ties: the lowest fold);
    then the single-case patients fill the folds up as evenly as possible, lowest folds first,
    each fold taking the next run of the shuffled order. With one case per patient this is the
    split of ``numpy.array_split`` of the shuffled cases (the folds of earlier versions), and the
    validation folds differ in size by at most one case; with several time points they differ by
    as little as the patients' sizes allow.
    """
    ids = sorted(set(case_ids))
    groups: dict[str, list[str]] = {}
    for case_id in ids:  # sorted ids: patients ordered by their first case id
        groups.setdefault(patient_id(case_id), []).append(case_id)
    patients = list(groups.values())
    if len(patients) < folds:
        what = (f"{len(ids)} labelled case(s)" if len(patients) == len(ids) else
                f"{len(patients)} patient(s) in {len(ids)} labelled cases (all time points of a patient "
                "stay in one fold)")
        raise UserError(f"data.folds = {folds} but only {what}; lower data.folds or add cases")
    order = np.random.default_rng(seed).permutation(len(patients)).tolist()
    counts = [0] * folds
    assignment: dict[int, int] = {}
    multi = sorted((p for p in order if len(patients[p]) > 1), key=lambda p: -len(patients[p]))  # stable
    for p in multi:
        target = counts.index(min(counts))
        assignment[p] = target
        counts[target] += len(patients[p])
    singles = [p for p in order if len(patients[p]) == 1]
    start = 0
    for target, take in enumerate(_fill_evenly(counts, len(singles))):
        for p in singles[start:start + take]:
            assignment[p] = target
        start += take
    val = {case_id for p, target in assignment.items() if target == fold for case_id in patients[p]}
    return {"train": [i for i in ids if i not in val], "val": [i for i in ids if i in val]}


def _fill_evenly(counts: list[int], items: int) -> list[int]:
    """How many of ``items`` each fold gets so the final counts are as even as possible (water
    filling: one at a time to the fold with the fewest, ties to the lowest fold)."""
    counts = list(counts)
    take = [0] * len(counts)
    for _ in range(items):
        target = counts.index(min(counts))
        counts[target] += 1
        take[target] += 1
    return take


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
    return atomic_write_text(path, json.dumps({"train": list(split["train"]), "val": list(split["val"])}, indent=1))

"""Evaluate prediction files against reference label files (used by evaluate.py and infer.py).

    pairs, extra, skipped = pair_cases("preds/", "data/brats")   # [(case_id, pred_path, ref_path), ...]
    scores = evaluate_files(pred_path, ref_path, task, convention="legacy")

References are either a dataset folder or one case folder (cases found by
``datasets.io.discover_cases``; only their ``case_id`` and ``seg`` are used) or a flat folder of label files ``<case_id>.nii[.gz]`` (a
trailing ``_seg``/``-seg``/``_gtv``/``-gtv`` is dropped from the id). Predictions are
``PRED_DIR/<case_id>.nii[.gz]``. Files whose name starts with ``.`` (macOS ``._x.nii.gz``) are
ignored. Reference labels are read as labels of ``task``, predictions as labels of ``pred_task``
(default ``task``). Every problem is a ``UserError`` naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.task import Task
from datasets.io import NIFTI_SUFFIXES, discover_cases, load_nifti, read_label
from metrics.case import case_metrics, check_same_regions

_LABEL_SUFFIX = re.compile(r"[_-](seg|gtv)$", re.IGNORECASE)


def nifti_files(folder: Path) -> dict[str, Path]:
    """``{name without .nii/.nii.gz: path}`` of the NIfTI files directly in ``folder`` (not dot-files)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        for suffix in NIFTI_SUFFIXES:
            if path.name.endswith(suffix) and path.is_file():
                out[path.name[: -len(suffix)]] = path
                break
    return out


def reference_files(ref_dir: str | Path) -> dict[str, Path]:
    """``{case_id: label file}`` of a flat folder of label files or a dataset folder."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise UserError(f"{ref_dir}: reference folder not found")
    flat = nifti_files(ref_dir)
    # a flat folder of label files, unless it is one case folder (NAME/NAME[_-]<suffix>.nii.gz)
    case_prefix = re.compile(re.escape(ref_dir.name) + r"[_-][A-Za-z0-9]+$", re.IGNORECASE)
    if flat and not all(case_prefix.fullmatch(name) for name in flat):
        refs: dict[str, Path] = {}
        for name, path in flat.items():
            case_id = _LABEL_SUFFIX.sub("", name)
            if case_id in refs:
                raise UserError(f"{ref_dir}: two reference files for case {case_id} "
                                f"({refs[case_id].name}, {path.name})")
            refs[case_id] = path
        return refs
    refs = {case.case_id: Path(case.seg) for case in discover_cases(ref_dir)
            if case.seg is not None and not Path(case.seg).name.startswith(".")}
    if not refs:
        raise UserError(f"{ref_dir}: no reference segmentations (no <case_id>.nii.gz files and no case folder "
                        "with a label file)")
    return refs


def pair_cases(pred_dir: str | Path, ref_dir: str | Path, subset: bool = False
               ) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """``(pairs, extra_predictions, skipped_references)``: ``pairs`` = ``[(case_id, prediction,
    reference), ...]`` in reference order, ``extra_predictions`` = ids of predictions without a
    reference, ``skipped_references`` = ids of references without a prediction (only with
    ``subset=True``; without it such a reference is a ``UserError``).

    ``UserError`` also if ``pred_dir`` has no NIfTI file, or (``subset``) no prediction matches
    any reference.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder not found")
    preds = nifti_files(pred_dir)
    if not preds:
        raise UserError(f"{pred_dir}: no predictions (expected <case_id>.nii.gz files)")
    refs = reference_files(ref_dir)
    missing = [case_id for case_id in refs if case_id not in preds]
    if missing and not subset:
        raise UserError(f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference cases "
                        f"(first: expected {missing[0]}.nii.gz; evaluate a subset to skip them)")
    pairs = [(case_id, preds[case_id], path) for case_id, path in refs.items() if case_id in preds]
    if not pairs:
        raise UserError(f"{pred_dir}: no prediction matches a reference case of {ref_dir} "
                        f"(first reference: {next(iter(refs))})")
    extra = sorted(set(preds) - set(refs))
    return pairs, extra, missing


def read_classes(path: str | Path, task: Task) -> tuple[np.ndarray, object]:
    """Label file -> ``(training classes (X, Y, Z) uint8, nibabel image)``; ``UserError`` naming the
    file, the values found and the task when its values are not labels of ``task``."""
    path = Path(path)
    img = load_nifti(path)
    labels = read_label(img, path)
    values = np.unique(labels)
    unexpected = task.unexpected_values(values.tolist())
    if unexpected:
        raise UserError(f"{path}: label values {values.tolist()} do not fit task {task.name} "
                        f"({unexpected} are not among its labels 0 background, {task.describe_labels()})")
    return task.labels_to_classes(labels), img


def evaluate_files(pred_path: str | Path, ref_path: str | Path, task: Task, convention: str = "legacy",
                   hd95: bool = True, pred_task: Task | None = None) -> dict[str, dict]:
    """``case_metrics`` of one prediction file (labels of ``pred_task``, default ``task``) against its
    reference file (labels of ``task``).

    The spacing comes from the reference's affine. ``UserError`` if the prediction's shape or
    affine differs from the reference's, for label values outside their task, or for a
    ``pred_task`` whose classes/regions differ from ``task``'s.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred_task = pred_task or task
    try:
        check_same_regions(pred_task, task)
    except ValueError as err:
        raise UserError(f"{pred_path}: {err}") from None
    ref, ref_img = read_classes(ref_path, task)
    pred_img = load_nifti(pred_path)
    if tuple(pred_img.shape) != tuple(ref_img.shape):
        raise UserError(f"{pred_path}: shape {tuple(pred_img.shape)} differs from the reference "
                        f"{ref_path.name} {tuple(ref_img.shape)}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        raise UserError(f"{pred_path}: affine differs from the reference {ref_path.name} "
                        "(prediction not written on the reference grid)")
    pred, _ = read_classes(pred_path, pred_task)
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(ref_img.affine)[:3, :3], axis=0))  # mm per array axis
    return case_metrics(pred, ref, spacing, task, convention, hd95)

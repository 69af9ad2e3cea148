"""Evaluate prediction files against reference label files (used by evaluate.py and infer.py).

    pairs = pair_cases("preds/", "data/brats")       # [(case_id, pred_path, ref_path), ...]
    scores = evaluate_files(pred_path, ref_path, convention="legacy")

References are either a BraTS dataset folder (case folders with a ``seg`` file, found by
``datasets.io.discover_cases``) or a flat folder of label files ``<case_id>.nii.gz`` (a trailing
``_seg``/``-seg`` is dropped from the id). Predictions are ``PRED_DIR/<case_id>.nii[.gz]``.
Each file's label convention (ET = 4 or 3) is detected from its values. Every problem is a
``UserError`` naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from datasets.io import NIFTI_SUFFIXES, Geometry, discover_cases, load_nifti, read_label
from datasets.labels import labels_to_classes
from engine.errors import UserError
from metrics.case import case_metrics, label_convention

_SEG_SUFFIX = re.compile(r"[_-]seg$", re.IGNORECASE)


def nifti_files(folder: Path) -> dict[str, Path]:
    """``{name without .nii/.nii.gz: path}`` of the NIfTI files directly in ``folder``."""
    out = {}
    for path in sorted(folder.iterdir()):
        for suffix in NIFTI_SUFFIXES:
            if path.is_file() and path.name.endswith(suffix) and not path.name.startswith("."):
                out[path.name[: -len(suffix)]] = path
                break
    return out


def reference_files(ref_dir: str | Path) -> dict[str, Path]:
    """``{case_id: label file}`` of a flat folder of label files or a BraTS dataset folder."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise UserError(f"{ref_dir}: reference folder not found")
    flat = nifti_files(ref_dir)
    if flat:
        return {_SEG_SUFFIX.sub("", name): path for name, path in flat.items()}
    refs = {case.case_id: case.seg for case in discover_cases(ref_dir) if case.seg is not None}
    if not refs:
        raise UserError(f"{ref_dir}: no reference segmentations (no <case_id>.nii.gz files and no case folder with a seg file)")
    return refs


def pair_cases(pred_dir: str | Path, ref_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``([(case_id, prediction, reference), ...], ids of predictions without reference)``.

    ``UserError`` if ``pred_dir`` has no NIfTI file or a reference case has no prediction.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder not found")
    preds = nifti_files(pred_dir)
    if not preds:
        raise UserError(f"{pred_dir}: no predictions (expected <case_id>.nii.gz files)")
    refs = reference_files(ref_dir)
    missing = [case_id for case_id in refs if case_id not in preds]
    if missing:
        raise UserError(f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference cases "
                        f"(first: expected {missing[0]}.nii.gz)")
    extra = sorted(set(preds) - set(refs))
    return [(case_id, preds[case_id], path) for case_id, path in refs.items()], extra


def read_classes(path: str | Path) -> tuple[np.ndarray, object]:
    """Label file -> ``(training classes (X, Y, Z) uint8, nibabel image)``; ``UserError`` for
    label values that fit neither convention."""
    path = Path(path)
    img = load_nifti(path)
    labels = read_label(img, path)
    try:
        convention = label_convention(labels)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return labels_to_classes(labels, convention), img


def evaluate_files(pred_path: str | Path, ref_path: str | Path, convention: str = "legacy", hd95: bool = True,
                   dilation: int = 3, min_volume: float = 50.0) -> dict[str, dict]:
    """``case_metrics`` of one prediction file against its reference file.

    The spacing comes from the reference's affine. ``UserError`` if the prediction's shape or
    affine differs from the reference's, or for unknown label values.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref, ref_img = read_classes(ref_path)
    pred_img = load_nifti(pred_path)
    if tuple(pred_img.shape) != tuple(ref_img.shape):
        raise UserError(f"{pred_path}: shape {tuple(pred_img.shape)} differs from the reference "
                        f"{ref_path.name} {tuple(ref_img.shape)}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
        raise UserError(f"{pred_path}: affine differs from the reference {ref_path.name} "
                        "(prediction not written on the reference grid)")
    pred, _ = read_classes(pred_path)
    spacing = Geometry(affine=ref_img.affine, header=None, shape=tuple(ref_img.shape)).spacing
    return case_metrics(pred, ref, spacing, convention, hd95, dilation, min_volume)

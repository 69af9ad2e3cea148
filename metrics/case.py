"""Per-case metrics of the three BraTS regions under either convention.

    scores = case_metrics(pred_classes, ref_classes, spacing, convention="legacy")
    scores["ET"]["dice"], scores["ET"]["hd95"]

``pred``/``ref`` are training-class maps ``(X, Y, Z)`` (0 bg, 1 NCR, 2 ED, 3 ET); file labels
are converted first with ``datasets.labels.labels_to_classes`` (or use ``evaluate_labels``).
Each region's dict holds ``dice``, ``sensitivity``, ``specificity``, ``hd95`` (mm; omitted when
``hd95=False``), ``ref_voxels`` and ``pred_voxels``. Under ``"lesionwise"`` ``dice``/``hd95``
are the lesion-wise scores and the dict adds ``legacy_dice``, ``legacy_hd95`` and the lesion
counts ``num_lesions``, ``num_tp``, ``num_fn``, ``num_fp``. Sensitivity and specificity are
voxel-wise in both conventions (as in the BraTS 2023 code). ``RULES`` states every rule.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from datasets.labels import REGION_CLASSES, REGIONS, detect_convention, labels_to_classes
from datasets.preprocess import bounding_box, crop
from metrics.lesionwise import LESION_MISS_HD95, lesionwise_metrics
from metrics.overlap import Counts, confusion_matrix, mask_counts, overlap_metrics, region_counts
from metrics.surface import LEGACY_EMPTY_HD95, check_spacing, expand_box, legacy_hd95

CONVENTIONS = ("legacy", "lesionwise")

RULES = {
    "legacy": (
        "Legacy BraTS (2017-2022), per case and region (WT=NCR+ED+ET, TC=NCR+ET, ET): "
        "Dice = 2TP/(2TP+FP+FN), 1 if reference and prediction are both empty, 0 if exactly one is empty; "
        "sensitivity = TP/(TP+FN), 1 if both are empty, 0 if only the reference is empty; "
        "specificity = TN/(TN+FP), 1 if the reference has no background voxel; "
        f"HD95 (mm) = 95th percentile of the pooled border-to-border distances of both directions "
        f"(6-connected borders, voxel spacing from the header; = medpy hd95), 0 if both are empty, "
        f"{LEGACY_EMPTY_HD95} if exactly one is empty."),
    "lesionwise": (
        "BraTS 2023 lesion-wise, per case and region: reference lesions = 26-connected components after "
        "{dilation} dilation(s) with the 18-connected structure (nearby pieces merge); lesions of at most "
        "{min_volume:g} mm^3 are not scored; predicted 26-connected components touching a lesion's dilated "
        "area are matched to it, the others are false positives (FP); per lesion Dice and HD95 against the "
        f"whole matched components, a missed lesion scores Dice 0 and HD95 {LESION_MISS_HD95:g}; "
        "lesion Dice = sum of lesion Dice / (lesions + FP); "
        f"lesion HD95 = (sum of lesion HD95 + {LESION_MISS_HD95:g} x FP) / (lesions + FP); "
        "nothing to score on either side: Dice 1, HD95 0. HD95 is the pooled (medpy) definition. "
        "Sensitivity, specificity, legacy_dice and legacy_hd95 are voxel-wise with the legacy rules."),
}


def rules_text(convention: str, dilation: int = 3, min_volume: float = 50.0) -> str:
    """The empty-mask and lesion rules of ``convention`` in words (for reports)."""
    check_convention(convention)
    return RULES[convention].format(dilation=dilation, min_volume=min_volume)


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], convention: str = "legacy",
                   hd95: bool = True, dilation: int = 3, min_volume: float = 50.0) -> dict:
    """Metrics of one region given as binary masks ``(X, Y, Z)``; keys as in ``case_metrics``."""
    check_convention(convention)
    spacing = check_spacing(spacing)
    counts = mask_counts(pred, ref)
    return _region_scores(np.asarray(pred, bool), np.asarray(ref, bool), counts, spacing, convention,
                          hd95, dilation, min_volume)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], convention: str = "legacy",
                 hd95: bool = True, dilation: int = 3, min_volume: float = 50.0) -> dict[str, dict]:
    """``{"WT": {...}, "TC": {...}, "ET": {...}}`` for training-class maps ``pred``, ``ref``.

    ``spacing`` is the voxel size in mm per array axis; ``dilation``/``min_volume`` (mm^3) are
    the lesion-wise parameters (gliomas: 3 and 50; BraTS-MEN 1 and 50; BraTS-MET 1 and 2).
    """
    check_convention(convention)
    spacing = check_spacing(spacing)
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    # everything happens near the tumour: crop once to the union of the nonzero voxels (+ room
    # for the lesion dilation); every voxel outside is background in both maps
    margin = dilation + 1 if convention == "lesionwise" else 0
    box = expand_box(bounding_box((pred != 0) | (ref != 0)), margin, pred.shape)
    full_size = pred.size
    pred, ref = crop(pred, box), crop(ref, box)
    confusion = confusion_matrix(pred, ref)
    confusion[0, 0] += full_size - pred.size
    counts = region_counts(confusion)
    out = {}
    for name in REGIONS:
        classes = list(REGION_CLASSES[name])
        out[name] = _region_scores(np.isin(pred, classes), np.isin(ref, classes), counts[name], spacing,
                                   convention, hd95, dilation, min_volume)
    return out


def evaluate_labels(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float],
                    convention: str = "legacy", hd95: bool = True, pred_convention: str | None = None,
                    ref_convention: str | None = None, dilation: int = 3, min_volume: float = 50.0) -> dict:
    """``case_metrics`` of two file-label maps; each one's label convention ("2021": ET=4,
    "2023": ET=3) is detected from its values unless given. ``ValueError`` for unknown values."""
    pred = labels_to_classes(pred_labels, pred_convention or label_convention(pred_labels))
    ref = labels_to_classes(ref_labels, ref_convention or label_convention(ref_labels))
    return case_metrics(pred, ref, spacing, convention, hd95, dilation, min_volume)


def label_convention(labels: np.ndarray) -> str:
    """Detected convention of a label map; all-{0,1,2} maps read the same in both ("2023")."""
    return detect_convention(np.unique(labels)) or "2023"


def _region_scores(pred: np.ndarray, ref: np.ndarray, counts: Counts, spacing: tuple[float, ...],
                   convention: str, hd95: bool, dilation: int, min_volume: float) -> dict:
    scores: dict = overlap_metrics(counts)
    if hd95:
        scores["hd95"] = legacy_hd95(pred, ref, spacing)
    if convention == "lesionwise":
        scores["legacy_dice"] = scores["dice"]
        if hd95:
            scores["legacy_hd95"] = scores["hd95"]
        scores.update(lesionwise_metrics(pred, ref, spacing, hd95, dilation, min_volume))
    scores["ref_voxels"] = counts.ref_voxels
    scores["pred_voxels"] = counts.pred_voxels
    return scores

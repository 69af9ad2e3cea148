"""Voxel-overlap metrics (Dice, sensitivity, specificity) with explicit empty-mask rules.

Counts come from one joint histogram of the two class maps (one pass over the volume for all
three regions), so a 240 x 240 x 155 case takes tens of milliseconds.

Rules (legacy BraTS, as in the BraTS 2023 evaluation code):

- Dice = 2 TP / (2 TP + FP + FN); **1 when reference and prediction are both empty**, 0 when
  exactly one of them is empty.
- Sensitivity = TP / (TP + FN); undefined for an empty reference: **1 when the prediction is
  empty too, 0 otherwise**.
- Specificity = TN / (TN + FP); 1 when the reference has no background voxel at all (nothing
  can be a false positive).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.labels import NUM_CLASSES, REGION_CLASSES, REGIONS


@dataclass(frozen=True)
class Counts:
    """Voxel counts of one binary comparison."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def ref_voxels(self) -> int:
        return self.tp + self.fn

    @property
    def pred_voxels(self) -> int:
        return self.tp + self.fp


def mask_counts(pred: np.ndarray, ref: np.ndarray) -> Counts:
    """TP/FP/FN/TN of two binary masks of the same shape (any dtype; nonzero = foreground)."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    pred_n, ref_n = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    return Counts(tp=tp, fp=pred_n - tp, fn=ref_n - tp, tn=pred.size - pred_n - ref_n + tp)


def confusion_matrix(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(4, 4)`` int64 voxel counts ``[pred class, ref class]`` of two training-class maps.

    Raises ``ValueError`` for different shapes or class values outside 0..3.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    for name, array in (("prediction", pred), ("reference", ref)):
        if array.size and (array.min() < 0 or array.max() >= NUM_CLASSES):
            raise ValueError(f"{name} has values outside the training classes 0..{NUM_CLASSES - 1} "
                             f"(found {int(array.min())}..{int(array.max())}); convert file labels "
                             "with datasets.labels.labels_to_classes")
    joint = pred.astype(np.uint8) * np.uint8(NUM_CLASSES) + ref.astype(np.uint8)
    counts = np.bincount(joint.ravel(), minlength=NUM_CLASSES * NUM_CLASSES)
    return counts.reshape(NUM_CLASSES, NUM_CLASSES).astype(np.int64)


def region_counts(confusion: np.ndarray) -> dict[str, Counts]:
    """Per-region ``Counts`` (WT, TC, ET) from a ``confusion_matrix``."""
    out = {}
    total = int(confusion.sum())
    for name in REGIONS:
        inside = np.zeros(NUM_CLASSES, dtype=bool)
        inside[list(REGION_CLASSES[name])] = True
        tp = int(confusion[np.ix_(inside, inside)].sum())
        pred_n = int(confusion[inside].sum())
        ref_n = int(confusion[:, inside].sum())
        out[name] = Counts(tp=tp, fp=pred_n - tp, fn=ref_n - tp, tn=total - pred_n - ref_n + tp)
    return out


def dice_from_counts(c: Counts) -> float:
    """Dice; 1.0 when both masks are empty."""
    denominator = 2 * c.tp + c.fp + c.fn
    return 1.0 if denominator == 0 else 2.0 * c.tp / denominator


def sensitivity_from_counts(c: Counts) -> float:
    """TP / (TP + FN); empty reference: 1.0 if the prediction is empty too, else 0.0."""
    if c.ref_voxels == 0:
        return 1.0 if c.pred_voxels == 0 else 0.0
    return c.tp / c.ref_voxels


def specificity_from_counts(c: Counts) -> float:
    """TN / (TN + FP); 1.0 when the reference has no background voxel."""
    negatives = c.tn + c.fp
    return 1.0 if negatives == 0 else c.tn / negatives


def overlap_metrics(c: Counts) -> dict[str, float]:
    """``{"dice", "sensitivity", "specificity"}`` from ``Counts`` (rules in the module doc)."""
    return {"dice": dice_from_counts(c), "sensitivity": sensitivity_from_counts(c),
            "specificity": specificity_from_counts(c)}

"""Voxel-overlap metrics (Dice, sensitivity, specificity) with explicit empty-mask rules.

Counts come from one joint histogram of the two class maps (one pass over the volume for all
of a task's regions), so a 240 x 240 x 155 case takes tens of milliseconds.

Rules (legacy BraTS, as in the BraTS 2023/2024 evaluation code):

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

from core.task import Task


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


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K+1, K+1)`` int64 voxel counts ``[pred class, ref class]`` of two training-class maps with
    ``num_classes`` = K + 1 classes (``task.num_classes``), from one joint histogram.

    Raises ``ValueError`` for different shapes or class values outside ``0..num_classes - 1``.
    """
    num_classes = int(num_classes)
    if not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be 1..255, got {num_classes}")
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    for name, array in (("prediction", pred), ("reference", ref)):
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise ValueError(f"{name} has values outside the training classes 0..{num_classes - 1} "
                             f"(found {int(array.min())}..{int(array.max())}); convert file labels "
                             "with task.labels_to_classes")
    dtype = np.uint8 if num_classes <= 16 else np.uint16  # joint index < num_classes ** 2
    joint = pred.astype(dtype) * dtype(num_classes) + ref.astype(dtype)
    counts = np.bincount(joint.ravel(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def region_counts(confusion: np.ndarray, task: Task) -> dict[str, Counts]:
    """Per-region ``Counts`` of ``task.regions`` (in order) from a ``confusion_matrix``."""
    if confusion.shape != (task.num_classes, task.num_classes):
        raise ValueError(f"confusion matrix {confusion.shape} does not fit task {task.name} "
                         f"({task.num_classes} classes)")
    out = {}
    total = int(confusion.sum())
    for region in task.regions:
        inside = np.zeros(task.num_classes, dtype=bool)
        inside[list(region.classes)] = True
        tp = int(confusion[np.ix_(inside, inside)].sum())
        pred_n = int(confusion[inside].sum())
        ref_n = int(confusion[:, inside].sum())
        out[region.name] = Counts(tp=tp, fp=pred_n - tp, fn=ref_n - tp, tn=total - pred_n - ref_n + tp)
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

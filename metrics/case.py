"""Per-case metrics of a task's evaluated regions under either convention.

    task = load_task("brats-gli-2024")
    scores = case_metrics(pred_classes, ref_classes, spacing, task, convention="legacy")
    scores["ET"]["dice"], scores["RC"]["nsd_1.0"]

``pred``/``ref`` are training-class maps ``(X, Y, Z)`` (``0..task.num_classes - 1``); file labels
are converted first with ``task.labels_to_classes`` (or use ``evaluate_labels``). The result has
one dict per region of ``task.regions``, in that order. Each holds ``dice``, ``sensitivity``,
``specificity``, ``ref_voxels``, ``pred_voxels`` and, unless ``hd95=False``, the surface metrics
``hd95``, ``nsd_0.5``, ``nsd_1.0`` (mm; one distance computation for the three). Under
``"lesionwise"`` ``dice``/``hd95``/``nsd_*`` are the lesion-wise scores (each region with its
``task.lesion_rule``), and the dict adds ``legacy_dice``, ``legacy_hd95``, ``legacy_nsd_0.5``,
``legacy_nsd_1.0`` (voxel-wise) and the lesion counts ``num_lesions``, ``num_tp``, ``num_fn``,
``num_fp``. Sensitivity and specificity are voxel-wise in both conventions (as in the official
code). ``rules_text`` states every rule.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.boxes import bounding_box, crop, expand_box
from core.task import LesionRule, Task
from metrics.lesionwise import LESION_MISS_HD95, lesionwise_metrics
from metrics.overlap import Counts, confusion_matrix, mask_counts, overlap_metrics, region_counts
from metrics.surface import LEGACY_EMPTY_HD95, NSD_TOLERANCES, SURFACE_KEYS, check_spacing, surface_scores

CONVENTIONS = ("legacy", "lesionwise")

_NSD_RULE = ("NSD (normalized surface Dice, BraTS 2025 scripts) at {tolerances} mm = mean over the two directions "
             "of the fraction of border voxels (mask XOR its 6-connected erosion) whose distance to the other "
             "border is <= the tolerance; 1 if both are empty, 0 if exactly one is empty")

RULES = {
    "legacy": (
        "Legacy BraTS (2017-2022), per case and region ({regions}): "
        "Dice = 2TP/(2TP+FP+FN), 1 if reference and prediction are both empty, 0 if exactly one is empty; "
        "sensitivity = TP/(TP+FN), 1 if both are empty, 0 if only the reference is empty; "
        "specificity = TN/(TN+FP), 1 if the reference has no background voxel; "
        "HD95 (mm) = 95th percentile of the pooled border-to-border distances of both directions "
        "(6-connected borders, voxel spacing from the header; = medpy hd95), 0 if both are empty, "
        f"{LEGACY_EMPTY_HD95} if exactly one is empty; {_NSD_RULE}."),
    "lesionwise": (
        "BraTS 2023+ lesion-wise, per case and region ({regions}): reference lesions = 26-connected "
        "components after the region's number of dilations with the 18-connected structure (nearby pieces "
        "merge); lesions of at most the region's minimum volume are not scored; predicted lesions = "
        "26-connected components, or, where prediction merging is on (BraTS 2024 scripts), components merged "
        "by the same dilation with merged predicted lesions of at most the minimum volume removed; a predicted "
        "lesion touching a lesion's dilated area is matched to it, the others are false positives (FP); per "
        "lesion Dice, HD95 and NSD against the whole matched predicted lesions, a missed lesion scores Dice 0, "
        f"HD95 {LESION_MISS_HD95:g}, NSD 0; lesion Dice = sum of lesion Dice / (lesions + FP); "
        f"lesion HD95 = (sum of lesion HD95 + {LESION_MISS_HD95:g} x FP) / (lesions + FP); "
        "lesion NSD = sum of lesion NSD / (lesions + FP); nothing to score on either side: Dice 1, HD95 0, "
        "NSD 1. HD95 is the pooled (medpy) definition; " + _NSD_RULE + ". Per region: {parameters}. "
        "Sensitivity, specificity, legacy_dice, legacy_hd95 and legacy_nsd_* are voxel-wise with the legacy "
        "rules on the raw masks."),
}


def describe_rule(rule: LesionRule) -> str:
    """``"3 dilation(s), lesions <= 20 mm^3 not scored, predictions merged (merged <= 20 mm^3 dropped)"``."""
    merging = (f"predictions merged by the dilation (merged predicted lesions <= {rule.min_volume:g} mm^3 dropped)"
               if rule.merge_predictions else "raw predicted components (no merging)")
    return f"{rule.dilation} dilation(s), lesions <= {rule.min_volume:g} mm^3 not scored, {merging}"


def rules_text(convention: str, task: Task) -> str:
    """The empty-mask, NSD and (lesion-wise) per-region lesion rules of ``convention`` for
    ``task``, in words (for reports)."""
    check_convention(convention)
    names = {c: n for c, n in enumerate(task.class_names)}
    regions = ", ".join(f"{r.name}={'+'.join(names[c] for c in r.classes)}" for r in task.regions)
    parameters = "; ".join(f"{r.name}: {describe_rule(task.lesion_rule(r.name))}" for r in task.regions)
    tolerances = " and ".join(f"{t:g}" for t in NSD_TOLERANCES)
    return RULES[convention].format(regions=f"task {task.name}: {regions}", parameters=parameters,
                                    tolerances=tolerances)


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], convention: str = "legacy",
                   hd95: bool = True, dilation: int = 3, min_volume: float = 50.0,
                   merge_predictions: bool = False) -> dict:
    """Metrics of one region given as binary masks ``(X, Y, Z)``; keys as in ``case_metrics``;
    ``dilation``/``min_volume``/``merge_predictions`` are the region's ``LesionRule``."""
    check_convention(convention)
    spacing = check_spacing(spacing)
    counts = mask_counts(pred, ref)
    rule = LesionRule(dilation=dilation, min_volume=min_volume, merge_predictions=merge_predictions)
    return _region_scores(np.asarray(pred, bool), np.asarray(ref, bool), counts, spacing, convention, hd95, rule)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], task: Task,
                 convention: str = "legacy", hd95: bool = True) -> dict[str, dict]:
    """``{region name: {...}}`` of ``task.regions`` (in order) for training-class maps ``pred``, ``ref``.

    ``spacing`` is the voxel size in mm per array axis; the lesion-wise parameters of each region
    are ``task.lesion_rule(name)``. ``ValueError`` for different shapes or class values outside
    ``0..task.num_classes - 1``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"case_metrics needs a Task (core.task.load_task), got {type(task).__name__}")
    check_convention(convention)
    spacing = check_spacing(spacing)
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    # everything happens near the tumour: crop once to the union of the nonzero voxels (+ room
    # for the largest lesion dilation); every voxel outside is background in both maps
    rules = {name: task.lesion_rule(name) for name in task.region_names}
    margin = max(r.dilation for r in rules.values()) + 1 if convention == "lesionwise" else 0
    box = expand_box(bounding_box((pred != 0) | (ref != 0)), margin, pred.shape)
    full_size = pred.size
    pred, ref = crop(pred, box), crop(ref, box)
    confusion = confusion_matrix(pred, ref, task.num_classes)  # one pass for every region
    confusion[0, 0] += full_size - pred.size
    counts = region_counts(confusion, task)
    out = {}
    for region in task.regions:
        classes = list(region.classes)
        out[region.name] = _region_scores(np.isin(pred, classes), np.isin(ref, classes), counts[region.name],
                                          spacing, convention, hd95, rules[region.name])
    return out


def evaluate_labels(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float], task: Task,
                    convention: str = "legacy", hd95: bool = True, pred_task: Task | None = None) -> dict:
    """``case_metrics`` of two file-label maps: ``ref_labels`` in the labels of ``task``,
    ``pred_labels`` in those of ``pred_task`` (default ``task``; e.g. a BraTS 2021 prediction,
    ET = 4, against 2023 references). ``ValueError`` for values that are not labels of their task
    or a ``pred_task`` whose classes/regions differ from ``task``'s."""
    pred_task = pred_task or task
    check_same_regions(pred_task, task)
    pred = pred_task.labels_to_classes(pred_labels)
    ref = task.labels_to_classes(ref_labels)
    return case_metrics(pred, ref, spacing, task, convention, hd95)


def check_same_regions(pred_task: Task, task: Task) -> None:
    """``ValueError`` unless the two tasks have the same classes and evaluated regions in class terms
    (they may differ in label values and names, as BraTS 2021 and 2023 gliomas)."""
    if pred_task is task:
        return
    same = (pred_task.num_classes == task.num_classes
            and [(r.name, r.classes) for r in pred_task.regions] == [(r.name, r.classes) for r in task.regions])
    if not same:
        raise ValueError(f"predictions of task {pred_task.name} cannot be evaluated against references of task "
                         f"{task.name}: their classes or regions differ ({pred_task.describe_labels()} vs "
                         f"{task.describe_labels()})")


def _region_scores(pred: np.ndarray, ref: np.ndarray, counts: Counts, spacing: tuple[float, ...],
                   convention: str, hd95: bool, rule: LesionRule) -> dict:
    scores: dict = overlap_metrics(counts)
    if hd95:
        scores.update(surface_scores(pred, ref, spacing))
    if convention == "lesionwise":
        scores["legacy_dice"] = scores["dice"]
        if hd95:
            for key in SURFACE_KEYS:
                scores[f"legacy_{key}"] = scores[key]
        scores.update(lesionwise_metrics(pred, ref, spacing, hd95, rule.dilation, rule.min_volume,
                                         rule.merge_predictions))
    scores["ref_voxels"] = counts.ref_voxels
    scores["pred_voxels"] = counts.pred_voxels
    return scores

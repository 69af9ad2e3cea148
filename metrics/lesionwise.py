"""BraTS 2023+ lesion-wise Dice and HD95 of one region (binary masks).

Follows the BraTS 2023 lesion-wise evaluation (``BraTS-2023-Metrics``), step by step:

1. The reference is dilated ``dilation`` times (3 for gliomas, 1 for MEN/MET) with the
   18-connected structure (``generate_binary_structure(3, 2)``); the 26-connected components of
   the dilated mask are the lesions' *areas*. Each reference voxel takes the id of the area it
   lies in, so pieces whose dilations touch are one lesion. (The dilation of a lesion is exactly
   its area, so "the lesion's dilated area" and "the area component" are the same set.)
2. Prediction components are 26-connected. A component that touches a lesion's area is matched
   to that lesion (one component may match several lesions); components matched to no lesion
   are false positives (FP), whatever their size.
3. Per lesion: Dice and HD95 between the lesion and the union of **whole** matched components
   (including their parts outside the area). A lesion with no match scores Dice 0, HD95 374.
4. Lesions whose volume is ``<= min_volume`` mm^3 (voxels x voxel volume; = voxels at 1 mm) are
   left out of both sums and the count; components matched to them are not false positives.
5. lesion Dice = sum(lesion Dice) / (lesions + FP);
   lesion HD95 = (sum(lesion HD95) + 374 * FP) / (lesions + FP);
   when lesions + FP = 0 (nothing to score on either side): Dice 1, HD95 0.

Difference from the 2023 script: per-lesion HD95 here is the official pooled HD95
(``metrics.surface.hd95``, = medpy), the same definition as every other HD95 in this
repository; the 2023 script used DeepMind's surface-distance package (larger of the two directed
95th percentiles, surface-area weighted), so its per-lesion HD95 can be slightly larger.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from datasets.preprocess import bounding_box, crop
from metrics.surface import check_spacing, expand_box, hd95 as pooled_hd95

LESION_MISS_HD95 = 374.0  # HD95 of a missed lesion and of each false positive (mm)
EIGHTEEN_CONNECTED = ndimage.generate_binary_structure(3, 2)  # dilation structure of the 2023 code
TWENTY_SIX_CONNECTED = np.ones((3, 3, 3), dtype=bool)  # component connectivity


def lesionwise_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95: bool = True,
                       dilation: int = 3, min_volume: float = 50.0) -> dict[str, float | int]:
    """Lesion-wise scores of binary masks ``pred``, ``ref`` ``(X, Y, Z)`` (rules in the module doc).

    Returns ``{"dice", "hd95" (if hd95), "num_lesions", "num_tp", "num_fn", "num_fp"}`` where
    ``num_lesions`` counts scored reference lesions (volume > ``min_volume``), ``num_tp``/``num_fn``
    those matched/missed and ``num_fp`` unmatched prediction components.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = check_spacing(spacing, pred.ndim)
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if not pred.any() and not ref.any():
        return _scores([], [], 0, 0, 0, hd95)
    # crop to the union box plus room for the dilation (exact: nothing outside can change)
    box = expand_box(bounding_box(pred | ref), dilation + 1, pred.shape)
    pred, ref = crop(pred, box), crop(ref, box)

    areas, n_lesions = _areas(ref, dilation)
    lesions = np.where(ref, areas, 0)
    components, n_components = ndimage.label(pred, structure=TWENTY_SIX_CONNECTED)

    # (lesion, component) pairs where a component touches a lesion's area
    touching = (areas > 0) & (components > 0)
    pairs = np.unique(areas[touching].astype(np.int64) * (n_components + 1) + components[touching])
    pair_lesion, pair_component = pairs // (n_components + 1), pairs % (n_components + 1)
    num_fp = n_components - len(np.unique(pair_component))

    lesion_sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)
    component_sizes = np.bincount(components.ravel(), minlength=n_components + 1)
    overlap = np.bincount(lesions[pred], minlength=n_lesions + 1)  # predicted voxels in each lesion
    voxel_volume = float(np.prod(spacing))

    dices, hds, num_tp, num_fn = [], [], 0, 0
    for lesion in range(1, n_lesions + 1):
        if lesion_sizes[lesion] * voxel_volume <= min_volume:
            continue
        matched = pair_component[pair_lesion == lesion]
        if matched.size == 0:
            num_fn += 1
            dices.append(0.0)
            hds.append(LESION_MISS_HD95)
            continue
        num_tp += 1
        dices.append(2.0 * overlap[lesion] / (lesion_sizes[lesion] + component_sizes[matched].sum()))
        if hd95:
            hds.append(pooled_hd95(np.isin(components, matched), lesions == lesion, spacing))
    return _scores(dices, hds, num_tp, num_fn, num_fp, hd95)


def _areas(ref: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """26-connected components of the reference dilated ``dilation`` times (18-connected)."""
    dilated = ndimage.binary_dilation(ref, structure=EIGHTEEN_CONNECTED, iterations=dilation) if dilation else ref
    return ndimage.label(dilated, structure=TWENTY_SIX_CONNECTED)


def _scores(dices: list[float], hds: list[float], num_tp: int, num_fn: int, num_fp: int,
            hd95: bool) -> dict[str, float | int]:
    count = len(dices) + num_fp
    out: dict[str, float | int] = {"dice": 1.0 if count == 0 else float(sum(dices)) / count}
    if hd95:
        out["hd95"] = 0.0 if count == 0 else (float(sum(hds)) + LESION_MISS_HD95 * num_fp) / count
    out.update(num_lesions=len(dices), num_tp=num_tp, num_fn=num_fn, num_fp=num_fp)
    return out

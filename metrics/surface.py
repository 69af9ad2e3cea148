"""Surface metrics in mm: HD95 as the official BraTS evaluation computes it, and the normalized
surface Dice (NSD) of the BraTS 2025 scripts.

Definition (identical to medpy's ``hd95`` and the ``brats-evaluation``/panoptica package):

1. border voxels of a mask = mask XOR its erosion by the 6-connected structure (voxels on the
   array edge count as border: the erosion treats outside the array as background);
2. for every border voxel of the prediction, the Euclidean distance (mm, with the voxel spacing,
   so anisotropic grids are handled) to the nearest border voxel of the reference, and the same
   from the reference border to the prediction border (``scipy.ndimage.distance_transform_edt``
   with ``sampling=spacing``);
3. HD95 = the 95th percentile (numpy's linear interpolation) of the two sets of distances
   **pooled** into one.

MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes the larger of the two
*directed* 95th percentiles, which is never smaller than the pooled value and can be several mm
larger. (The BraTS 2023 lesion-wise script used DeepMind's surface-distance package, which also
takes the larger directed percentile and weights border points by surface area.)

For speed both masks are cropped to the bounding box of their union before eroding and
transforming. This is exact: every voxel outside that box is background in both masks, which is
what the erosion assumes beyond the crop edge, and every border voxel lies inside the box.
Empty masks have no surface: ``hd95`` raises ``ValueError`` and callers apply their convention
(``LEGACY_EMPTY_HD95`` for the legacy rules).

NSD (normalized surface Dice) at a tolerance ``tol`` (mm), as the official BraTS 2025 scripts
compute it (``rachitsaluja/BraTS-2024-Metrics``, ``normalized_surface_dice`` in ``metrics_*.py``,
adapted from nnU-Net v1 ``nnunet/evaluation/surface_dice.py``, with medpy's
``__surface_distances``, connectivity 1):

1. the same borders and directed distances as HD95 above (``a_to_b``: from each border voxel of
   A to the nearest border voxel of B; ``b_to_a`` likewise);
2. NSD = (fraction of ``a_to_b <= tol`` + fraction of ``b_to_a <= tol``) / 2. The script writes
   ``(tp_a + tp_b) / (tp_a + tp_b + fp + fn + 1e-8)`` with each count already divided by its
   direction's number of border voxels, which is this mean up to the ``1e-8`` (left out here, so
   a perfect match scores exactly 1). nnU-Net v1's original pools the raw counts of both
   directions instead (``(tp_a + tp_b) / (|border A| + |border B|)``), which differs when the two
   borders have different sizes;
3. both masks empty: 1; exactly one empty: 0 (the scripts' rules).

This is not DeepMind's surface Dice (``surface_distance.compute_surface_dice_at_tolerance``,
which weights each border point by its surface area from a marching-cubes lookup table) nor
MONAI's ``compute_surface_dice`` (its own border extraction and empty rules); values differ.
Tolerances used by BraTS 2025: 0.5 and 1.0 mm (``NSD_TOLERANCES``; result keys ``nsd_0.5``,
``nsd_1.0``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from core.boxes import bounding_box, crop

# legacy BraTS HD95 when exactly one mask is empty: the diagonal of the 240x240x155 1 mm volume
LEGACY_EMPTY_HD95 = 373.13
SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)
NSD_TOLERANCES = (0.5, 1.0)  # mm, BraTS 2025


def nsd_key(tolerance: float) -> str:
    """Result key of the NSD at ``tolerance`` mm: ``0.5 -> "nsd_0.5"``, ``1 -> "nsd_1.0"``."""
    return f"nsd_{float(tolerance)}"


SURFACE_KEYS = ("hd95",) + tuple(nsd_key(t) for t in NSD_TOLERANCES)


def check_spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """``spacing`` as a tuple of ``ndim`` positive floats, else ``ValueError``."""
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {tuple(spacing)}")
    return values


def border(mask: np.ndarray) -> np.ndarray:
    """Border voxels: ``mask`` XOR its 6-connected erosion (bool, same shape)."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask, structure=SIX_CONNECTED)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed border distances in mm: ``(pred border -> ref border, ref border -> pred border)``.

    Both masks must be non-empty (``ValueError`` otherwise); computed on the cropped union box.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = check_spacing(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        raise ValueError("HD95 is undefined for an empty mask (apply the convention's empty-mask rule)")
    box = bounding_box(pred | ref)
    pred_border, ref_border = border(crop(pred, box)), border(crop(ref, box))
    to_ref = ndimage.distance_transform_edt(~ref_border, sampling=spacing)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[ref_border]
    return to_ref, to_pred


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Official (pooled) HD95 in mm of two non-empty binary masks ``(X, Y, Z)``."""
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def nsd_from_distances(to_ref: np.ndarray, to_pred: np.ndarray, tolerance: float) -> float:
    """NSD from the two directed border distances of non-empty masks (module doc)."""
    return float((np.mean(to_ref <= tolerance) + np.mean(to_pred <= tolerance)) / 2.0)


def nsd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalized surface Dice at ``tolerance`` mm of two binary masks ``(X, Y, Z)``, as the BraTS
    2025 scripts compute it (module doc): both empty -> 1.0, exactly one empty -> 0.0."""
    tolerance = float(tolerance)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"NSD tolerance must be a number >= 0 (mm), got {tolerance}")
    pred_any, ref_any = bool(np.any(pred)), bool(np.any(ref))
    if not pred_any or not ref_any:
        if np.shape(pred) != np.shape(ref):
            raise ValueError(f"prediction shape {np.shape(pred)} != reference shape {np.shape(ref)}")
        check_spacing(spacing, np.ndim(pred))
        return 1.0 if pred_any == ref_any else 0.0
    return nsd_from_distances(*surface_distances(pred, ref, spacing), tolerance)


def surface_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   tolerances: Sequence[float] = NSD_TOLERANCES) -> dict[str, float]:
    """``{"hd95", "nsd_0.5", "nsd_1.0"}`` from one distance computation, with the legacy empty
    rules: both empty -> HD95 0, NSD 1; exactly one empty -> HD95 ``LEGACY_EMPTY_HD95``, NSD 0."""
    pred_any, ref_any = bool(np.any(pred)), bool(np.any(ref))
    if not pred_any or not ref_any:
        if np.shape(pred) != np.shape(ref):
            raise ValueError(f"prediction shape {np.shape(pred)} != reference shape {np.shape(ref)}")
        check_spacing(spacing, np.ndim(pred))
        both = pred_any == ref_any
        return {"hd95": 0.0 if both else LEGACY_EMPTY_HD95, **{nsd_key(t): float(both) for t in tolerances}}
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    out = {"hd95": float(np.percentile(np.concatenate([to_ref, to_pred]), 95))}
    out.update({nsd_key(t): nsd_from_distances(to_ref, to_pred, t) for t in tolerances})
    return out


def legacy_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 with the legacy empty rules: both empty -> 0.0, exactly one empty ->
    ``LEGACY_EMPTY_HD95`` (373.13 mm), else ``hd95``."""
    pred_any, ref_any = bool(np.any(pred)), bool(np.any(ref))
    if not pred_any and not ref_any:
        return 0.0
    if pred_any != ref_any:
        return LEGACY_EMPTY_HD95
    return hd95(pred, ref, spacing)

"""95th-percentile Hausdorff distance (HD95) in mm, as the official BraTS evaluation computes it.

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
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from datasets.preprocess import bounding_box, crop

# legacy BraTS HD95 when exactly one mask is empty: the diagonal of the 240x240x155 1 mm volume
LEGACY_EMPTY_HD95 = 373.13
SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def check_spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """``spacing`` as a tuple of ``ndim`` positive floats, else ``ValueError``."""
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {tuple(spacing)}")
    return values


def expand_box(box: tuple[tuple[int, int], ...], margin: int, shape: Sequence[int]
               ) -> tuple[tuple[int, int], ...]:
    """Grow a half-open box by ``margin`` voxels per side, clipped to ``shape``."""
    return tuple((max(0, a - margin), min(int(n), b + margin)) for (a, b), n in zip(box, shape))


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


def legacy_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 with the legacy empty rules: both empty -> 0.0, exactly one empty ->
    ``LEGACY_EMPTY_HD95`` (373.13 mm), else ``hd95``."""
    pred_any, ref_any = bool(np.any(pred)), bool(np.any(ref))
    if not pred_any and not ref_any:
        return 0.0
    if pred_any != ref_any:
        return LEGACY_EMPTY_HD95
    return hd95(pred, ref, spacing)

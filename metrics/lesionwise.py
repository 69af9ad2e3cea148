"""BraTS 2023+ lesion-wise Dice, HD95 and NSD of one region (binary masks).

Follows the official lesion-wise evaluation, ``rachitsaluja/BraTS-2023-Metrics`` (``metrics.py``)
and ``rachitsaluja/BraTS-2024-Metrics`` (``metrics_{GLI,MEN,MEN_RT,MET,PED,SSA}.py``), step by step:

1. The reference is dilated ``dilation`` times with the 18-connected structure
   (``generate_binary_structure(3, 2)``); the 26-connected components of the dilated mask are the
   lesions' *areas*. Each reference voxel takes the id of the area it lies in, so pieces whose
   dilations touch are one lesion (``get_GTseg_combinedByDilation``). The dilation of a lesion is
   exactly its area, so "the lesion's dilated area" and "the area component" are the same set.
2. Predicted lesions:

   - ``merge_predictions=False`` (BraTS 2023, and the 2024 MEN script): the 26-connected
     components of the prediction;
   - ``merge_predictions=True`` (the 2024 scripts' ``get_Predseg_combinedByDilation``): the
     prediction is merged exactly as the reference (components whose ``dilation``-times
     18-connected dilations touch are one predicted lesion), then merged predicted lesions whose
     volume is ``<= min_volume`` are removed. Volume = voxels x voxel volume in mm^3: the
     official GLI/MET/PED/SSA scripts compare the voxel count with the threshold (identical at
     the 1 mm BraTS grid; MEN-RT divides the threshold by the voxel volume, as here).

   Matching, false positives and per-lesion scores then use these predicted lesions.
3. A predicted lesion that touches a lesion's area is matched to that lesion (one predicted
   lesion may match several lesions); predicted lesions matched to no lesion are false
   positives (FP), whatever their size.
4. Per lesion: Dice, HD95 and NSD (0.5 and 1.0 mm) between the lesion and the union of the
   **whole** matched predicted lesions (including their parts outside the area). A lesion with no
   match scores Dice 0, HD95 374, NSD 0.
5. Lesions whose volume is ``<= min_volume`` mm^3 (voxels x voxel volume) are left out of the
   sums and the count; predicted lesions matched to them are not false positives.
6. lesion Dice = sum(lesion Dice) / (lesions + FP);
   lesion HD95 = (sum(lesion HD95) + 374 * FP) / (lesions + FP);
   lesion NSD = sum(lesion NSD) / (lesions + FP) (the 2025 scripts);
   when lesions + FP = 0 (nothing to score on either side): Dice 1, HD95 0, NSD 1.

Differences from the official scripts:

- per-lesion HD95 here is the official pooled HD95 (``metrics.surface.hd95``, = medpy), the same
  definition as every other HD95 in this repository; the scripts use DeepMind's surface-distance
  package (larger of the two directed 95th percentiles, surface-area weighted), so their
  per-lesion HD95 can be slightly larger. NSD is the scripts' own (medpy-border) definition;
- the 2024/2025 GLI, MET and SSA scripts additionally merge lesions across labels before
  scoring (``combine_lesions_*``: ET lesions that touch the same NETC lesion become one ET lesion;
  GLI does the same among NETC, ET, RC and SNFH); that cross-label step is not done here: every
  region is scored from its own mask, so ET/NETC/RC/SNFH lesion counts can differ;
- the penalty for a miss / FP is 374 mm for every task (the 2025 GLI script uses 337, the 2025
  MET script the image diagonal in voxels);
- the scripts compute legacy Dice/HD95 from the merged and size-filtered prediction; here the
  legacy (voxel-wise) scores always use the raw masks (``metrics.case``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from core.boxes import bounding_box, crop, expand_box
from metrics.surface import NSD_TOLERANCES, check_spacing, nsd_from_distances, nsd_key, surface_distances

LESION_MISS_HD95 = 374.0  # HD95 of a missed lesion and of each false positive (mm)
EIGHTEEN_CONNECTED = ndimage.generate_binary_structure(3, 2)  # dilation structure of the official code
TWENTY_SIX_CONNECTED = np.ones((3, 3, 3), dtype=bool)  # component connectivity


def lesionwise_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95: bool = True,
                       dilation: int = 3, min_volume: float = 50.0, merge_predictions: bool = False
                       ) -> dict[str, float | int]:
    """Lesion-wise scores of binary masks ``pred``, ``ref`` ``(X, Y, Z)`` (rules in the module doc).

    Returns ``{"dice", "hd95", "nsd_0.5", "nsd_1.0" (the surface scores only if hd95),
    "num_lesions", "num_tp", "num_fn", "num_fp"}`` where ``num_lesions`` counts scored reference
    lesions (volume > ``min_volume`` mm^3), ``num_tp``/``num_fn`` those matched/missed and
    ``num_fp`` unmatched predicted lesions. ``dilation``, ``min_volume`` and
    ``merge_predictions`` are a task's ``LesionRule`` (``task.lesion_rule(region)``).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = check_spacing(spacing, pred.ndim)
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if not pred.any() and not ref.any():
        return _scores([], [], [], 0, 0, 0, hd95)
    # crop to the union box plus room for the dilation (exact: nothing outside can change)
    box = expand_box(bounding_box(pred | ref), dilation + 1, pred.shape)
    pred, ref = crop(pred, box), crop(ref, box)
    voxel_volume = float(np.prod(spacing))

    areas, n_lesions = _areas(ref, dilation)
    lesions = np.where(ref, areas, 0)
    if merge_predictions:
        pred_areas, n_components = _areas(pred, dilation)
        components = np.where(pred, pred_areas, 0)
        sizes = np.bincount(components.ravel(), minlength=n_components + 1)
        small = np.flatnonzero(sizes * voxel_volume <= min_volume)
        small = small[small > 0]
        if small.size:  # drop merged predicted lesions of at most min_volume, renumber the rest
            keep = np.ones(n_components + 1, dtype=bool)
            keep[small] = False
            new_id = np.where(keep, np.cumsum(keep) - 1, 0)
            components = new_id[components]
            n_components -= small.size
        pred = components > 0
    else:
        components, n_components = ndimage.label(pred, structure=TWENTY_SIX_CONNECTED)

    # (lesion, predicted lesion) pairs where a predicted lesion touches a lesion's area
    touching = (areas > 0) & (components > 0)
    pairs = np.unique(areas[touching].astype(np.int64) * (n_components + 1) + components[touching])
    pair_lesion, pair_component = pairs // (n_components + 1), pairs % (n_components + 1)
    num_fp = n_components - len(np.unique(pair_component))

    lesion_sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)
    component_sizes = np.bincount(components.ravel(), minlength=n_components + 1)
    overlap = np.bincount(lesions[pred], minlength=n_lesions + 1)  # predicted voxels in each lesion

    dices, hds, nsds, num_tp, num_fn = [], [], [], 0, 0
    for lesion in range(1, n_lesions + 1):
        if lesion_sizes[lesion] * voxel_volume <= min_volume:
            continue
        matched = pair_component[pair_lesion == lesion]
        if matched.size == 0:
            num_fn += 1
            dices.append(0.0)
            hds.append(LESION_MISS_HD95)
            nsds.append([0.0] * len(NSD_TOLERANCES))
            continue
        num_tp += 1
        dices.append(2.0 * overlap[lesion] / (lesion_sizes[lesion] + component_sizes[matched].sum()))
        if hd95:
            to_ref, to_pred = surface_distances(np.isin(components, matched), lesions == lesion, spacing)
            hds.append(float(np.percentile(np.concatenate([to_ref, to_pred]), 95)))
            nsds.append([nsd_from_distances(to_ref, to_pred, t) for t in NSD_TOLERANCES])
    return _scores(dices, hds, nsds, num_tp, num_fn, num_fp, hd95)


def _areas(mask: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """26-connected components of ``mask`` dilated ``dilation`` times (18-connected)."""
    dilated = ndimage.binary_dilation(mask, structure=EIGHTEEN_CONNECTED, iterations=dilation) if dilation else mask
    return ndimage.label(dilated, structure=TWENTY_SIX_CONNECTED)


def _scores(dices: list[float], hds: list[float], nsds: list[list[float]], num_tp: int, num_fn: int,
            num_fp: int, hd95: bool) -> dict[str, float | int]:
    count = len(dices) + num_fp
    out: dict[str, float | int] = {"dice": 1.0 if count == 0 else float(sum(dices)) / count}
    if hd95:
        out["hd95"] = 0.0 if count == 0 else (float(sum(hds)) + LESION_MISS_HD95 * num_fp) / count
        for i, tolerance in enumerate(NSD_TOLERANCES):
            out[nsd_key(tolerance)] = 1.0 if count == 0 else float(sum(n[i] for n in nsds)) / count
    out.update(num_lesions=len(dices), num_tp=num_tp, num_fn=num_fn, num_fp=num_fp)
    return out

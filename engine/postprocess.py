"""Optional post-processing of predicted training classes (0 bg, 1 NCR, 2 ED, 3 ET). Off by default.

Two rules, both from the BraTS winners, set in the ``infer`` config section:

- ``infer.min_component_size = [WT, TC, ET]`` (voxels; 0 = off): connected components
  (26-connectivity) of each nested region smaller than its size are removed, in the order
  WT, TC, ET. Removing a region's component also removes the inner regions inside it (TC inside WT,
  ET inside TC), and the classes are then repainted from the regions: a removed WT component
  becomes background, a removed TC component inside a kept WT becomes ED, a removed ET component
  inside a kept TC becomes NCR.
- ``infer.et_min_volume`` (voxels; 0 = off): when the total ET volume left is above 0 and below this
  threshold, every ET voxel is relabelled NCR (small ET predictions are mostly false positives, and
  an empty-ET case scores Dice 1 only if the prediction is empty too).

    classes = postprocess(classes, cfg.infer)   # (X, Y, Z) uint8 -> (X, Y, Z) uint8, a new array
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from datasets.labels import REGIONS, classes_to_regions, regions_to_classes

NCR, ET = 1, 3
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask (X, Y, Z)`` bool without its 26-connected components of fewer than ``min_size`` voxels."""
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    components, count = ndimage.label(mask, structure=_CONNECTIVITY_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]


def postprocess_classes(classes: np.ndarray, min_component_size: Sequence[int] = (0, 0, 0),
                        et_min_volume: int = 0) -> np.ndarray:
    """Apply both rules (module docstring) to ``classes (X, Y, Z)`` uint8; returns a new array."""
    if len(min_component_size) != len(REGIONS) or any(int(n) < 0 for n in min_component_size):
        raise ValueError(f"min_component_size must be {len(REGIONS)} sizes >= 0 (WT, TC, ET), "
                         f"got {list(min_component_size)}")
    if et_min_volume < 0:
        raise ValueError(f"et_min_volume must be >= 0, got {et_min_volume}")
    classes = np.asarray(classes, dtype=np.uint8)
    if classes.ndim != 3:
        raise ValueError(f"classes must be (X, Y, Z), got shape {classes.shape}")
    out = classes.copy()
    if any(int(n) > 1 for n in min_component_size):
        regions = classes_to_regions(classes)
        for i, min_size in enumerate(min_component_size):
            regions[i] = remove_small_components(regions[i], int(min_size))
            if i > 0:
                regions[i] &= regions[i - 1]  # an inner region never outlives its outer one
        out = regions_to_classes(regions.astype(np.float32))
    if et_min_volume > 0:
        et = out == ET
        if 0 < int(et.sum()) < et_min_volume:
            out[et] = NCR
    return out


def postprocess(classes: np.ndarray, infer_cfg) -> np.ndarray:
    """``postprocess_classes`` with ``infer_cfg.min_component_size`` and ``infer_cfg.et_min_volume``."""
    return postprocess_classes(classes, infer_cfg.min_component_size, infer_cfg.et_min_volume)

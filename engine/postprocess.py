"""Optional post-processing of predicted training classes, by the task's rules. Off by default.

Two rules, both from the BraTS winners, set in the ``infer`` config section:

- ``infer.min_component_size`` (voxels, one per training region of the task, e.g. WT, TC, ET;
  empty or 0 = off): connected components (26-connectivity) of each training region smaller than
  its size are removed. A region inside another (TC inside WT) never outlives it: removing a WT
  component also removes the TC and ET inside it. The classes are then repainted from the regions
  in the task's order: a removed WT component becomes background, a removed TC component inside a
  kept WT becomes edema, a removed ET component inside a kept TC becomes necrosis. Regions outside
  the others (the resection cavity) are handled on their own.
- ``infer.et_min_volume`` (voxels; 0 = off): when the total volume of the task's enhancing label
  (``enhancing.label`` in the task YAML, ET) is above 0 and below this threshold, it is relabelled
  as ``enhancing.relabel_to`` (the non-enhancing core): small ET predictions are mostly false
  positives, and an empty-ET case scores Dice 1 only if the prediction is empty too.

    classes = postprocess(classes, cfg.infer, task)   # (X, Y, Z) uint8 -> (X, Y, Z) uint8, a new array
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from engine.task import Task

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


def check_postprocess(task: Task, min_component_size: Sequence[int], et_min_volume: int) -> None:
    """``ValueError`` naming the ``infer.*`` key whose value does not fit ``task``."""
    names = task.training_region_names
    if min_component_size and (len(min_component_size) != len(names) or min(min_component_size) < 0):
        raise ValueError(f"infer.min_component_size: {list(min_component_size)} must be empty or {len(names)} "
                         f"sizes >= 0, one per training region of task {task.name} ({', '.join(names)})")
    if et_min_volume < 0:
        raise ValueError(f"infer.et_min_volume: {et_min_volume} must be >= 0")
    if et_min_volume > 0 and task.enhancing is None:
        raise ValueError(f"infer.et_min_volume: task {task.name} has no enhancing label to relabel (set it to 0)")


def postprocess_classes(classes: np.ndarray, task: Task, min_component_size: Sequence[int] = (),
                        et_min_volume: int = 0) -> np.ndarray:
    """Apply both rules (module docstring) to ``classes (X, Y, Z)`` uint8; returns a new array."""
    check_postprocess(task, min_component_size, et_min_volume)
    classes = np.asarray(classes, dtype=np.uint8)
    if classes.ndim != 3:
        raise ValueError(f"classes must be (X, Y, Z), got shape {classes.shape}")
    out = classes.copy()
    if any(int(n) > 1 for n in min_component_size):
        regions = task.training_region_masks(classes)
        for i, min_size in enumerate(min_component_size):
            regions[i] = remove_small_components(regions[i], int(min_size))
        members = [set(r.classes) for r in task.training_regions]
        for j in sorted(range(len(members)), key=lambda k: -len(members[k])):  # outer regions first
            for i, outer in enumerate(members):
                if members[j] < outer:
                    regions[j] &= regions[i]  # an inner region never outlives its outer one
        out = task.paint_regions(regions)
    if et_min_volume > 0:
        enhancing, relabel_to = task.enhancing
        et = out == enhancing
        if 0 < int(et.sum()) < et_min_volume:
            out[et] = relabel_to
    return out


def postprocess(classes: np.ndarray, infer_cfg, task: Task) -> np.ndarray:
    """``postprocess_classes`` with ``infer_cfg.min_component_size`` and ``infer_cfg.et_min_volume``."""
    return postprocess_classes(classes, task, infer_cfg.min_component_size, infer_cfg.et_min_volume)

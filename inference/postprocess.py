"""Post-processing of predicted training classes, by the task's rules (``Rules``). Off by default.

The rules of the BraTS winners, set by the ``infer`` config section or chosen on the validation
cases at the end of training (``inference.tuning``) and stored in the checkpoint:

- ``min_component_size`` (one size per training region of the task, e.g. WT, TC, ET; 0 = off):
  connected components (26-connectivity) of each training region smaller than its size are
  removed. A region inside another (TC inside WT) never outlives it: removing a WT component also
  removes the TC and ET inside it. The classes are then repainted from the regions in the task's
  order: a removed WT component becomes background, a removed TC component inside a kept WT becomes
  edema, a removed ET component inside a kept TC becomes necrosis. Regions outside the others (the
  resection cavity) are handled on their own.
- ``et_min_volume`` (0 = off): when the total volume of the task's enhancing label
  (``enhancing.label`` in the task YAML, ET) is above 0 and below this threshold, it is relabelled
  as ``enhancing.relabel_to`` (the non-enhancing core): small ET predictions are mostly false
  positives, and an empty-ET case scores Dice 1 only if the prediction is empty too.
- ``largest_component``: only the largest component of the outermost training region (WT) is kept.
- ``unit``: sizes in ``voxels`` or in ``mm3`` (converted with the case's voxel spacing, so a rule
  tuned on one spacing transfers to another).

    rules = Rules.from_config(cfg.infer)
    classes = postprocess_classes(classes, task, rules, spacing)   # (X, Y, Z) uint8 -> a new array
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from core.boxes import bounding_box, crop
from core.task import Task

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
UNITS = ("voxels", "mm3")


# the infer.* keys that make up the post-processing rules (Rules.from_config)
CONFIG_KEYS = ("min_component_size", "et_min_volume", "postprocess_unit", "largest_component")


@dataclass(frozen=True)
class Rules:
    """One post-processing setting (module docstring). The default is off."""

    min_component_size: tuple[float, ...] = ()
    et_min_volume: float = 0.0
    unit: str = "voxels"
    largest_component: bool = False

    @property
    def active(self) -> bool:
        return any(s > 0 for s in self.min_component_size) or self.et_min_volume > 0 or self.largest_component

    @classmethod
    def from_config(cls, infer_cfg) -> "Rules":
        """The rules of the ``infer.*`` keys ``CONFIG_KEYS``."""
        return cls(tuple(float(s) for s in infer_cfg.min_component_size), float(infer_cfg.et_min_volume),
                   infer_cfg.postprocess_unit, bool(infer_cfg.largest_component))

    def to_dict(self) -> dict:
        return {**asdict(self), "min_component_size": list(self.min_component_size)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Rules":
        return cls(tuple(float(s) for s in raw.get("min_component_size", ())), float(raw.get("et_min_volume", 0.0)),
                   str(raw.get("unit", "voxels")), bool(raw.get("largest_component", False)))

    def describe(self, task: Task) -> str:
        """``"min component TC 50 mm3, ET below 100 mm3 -> NETC"``, or ``"off"``."""
        if not self.active:
            return "off"
        parts = [f"min component {name} {size:g} {self.unit}"
                 for name, size in zip(task.training_region_names, self.min_component_size) if size > 0]
        if self.et_min_volume > 0 and task.enhancing is not None:
            enhancing, relabel_to = task.enhancing
            parts.append(f"{task.class_names[enhancing]} below {self.et_min_volume:g} {self.unit} -> "
                         f"{task.class_names[relabel_to]}")
        if self.largest_component:
            parts.append(f"largest {task.training_region_names[outermost_region(task)]} component only")
        return ", ".join(parts)


def check_rules(task: Task, rules: Rules) -> None:
    """``ValueError`` naming the ``infer.*`` key whose value does not fit ``task``."""
    names = task.training_region_names
    sizes = rules.min_component_size
    if sizes and (len(sizes) != len(names) or min(sizes) < 0):
        raise ValueError(f"infer.min_component_size: {list(sizes)} must be empty or {len(names)} "
                         f"sizes >= 0, one per training region of task {task.name} ({', '.join(names)})")
    if rules.et_min_volume < 0:
        raise ValueError(f"infer.et_min_volume: {rules.et_min_volume:g} must be >= 0")
    if rules.et_min_volume > 0 and task.enhancing is None:
        raise ValueError(f"infer.et_min_volume: task {task.name} has no enhancing label to relabel (set it to 0)")
    if rules.unit not in UNITS:
        raise ValueError(f"infer.postprocess_unit: {rules.unit!r} must be one of {', '.join(UNITS)}")


def remove_small_components(mask: np.ndarray, min_size: float) -> np.ndarray:
    """``mask (X, Y, Z)`` bool without its 26-connected components of fewer than ``min_size`` voxels."""
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    components, sizes, box = label_components(mask)
    keep = sizes >= min_size
    keep[0] = False
    out = np.zeros_like(mask)
    crop(out, box)[...] = keep[components]
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask`` reduced to its largest 26-connected component (ties: the first found)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    components, sizes, box = label_components(mask)
    out = np.zeros_like(mask)
    crop(out, box)[...] = components == int(np.argmax(sizes))
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """26-connected components of ``mask (X, Y, Z)`` bool, labelled within its bounding box (the
    cost of labelling grows with the volume): ``(labels (box shape), sizes, box)``, ``sizes[k]``
    the voxels of component ``k`` (``sizes[0] = 0``)."""
    box = bounding_box(mask)
    components, count = ndimage.label(crop(mask, box), structure=_CONNECTIVITY_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components, sizes, box


def outermost_region(task: Task) -> int:
    """Index of the training region with the most classes (WT)."""
    return max(range(len(task.training_regions)), key=lambda i: len(task.training_regions[i].classes))


def postprocess_classes(classes: np.ndarray, task: Task, rules: Rules = Rules(),
                        spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Apply ``rules`` (module docstring) to ``classes (X, Y, Z)`` uint8 of voxel ``spacing`` mm;
    returns a new array."""
    check_rules(task, rules)
    classes = np.asarray(classes, dtype=np.uint8)
    if classes.ndim != 3:
        raise ValueError(f"classes must be (X, Y, Z), got shape {classes.shape}")
    per_voxel = math.prod(float(s) for s in spacing) if rules.unit == "mm3" else 1.0  # size unit -> voxels
    out = classes.copy()
    if any(s / per_voxel > 1 for s in rules.min_component_size) or rules.largest_component:
        regions = task.training_region_masks(classes)
        for i, size in enumerate(rules.min_component_size):
            regions[i] = remove_small_components(regions[i], size / per_voxel)
        if rules.largest_component:
            outer = outermost_region(task)
            regions[outer] = largest_component(regions[outer])
        members = [set(r.classes) for r in task.training_regions]
        for j in sorted(range(len(members)), key=lambda k: -len(members[k])):  # outer regions first
            for i, outer in enumerate(members):
                if members[j] < outer:
                    regions[j] &= regions[i]  # an inner region never outlives its outer one
        out = task.paint_regions(regions)
    if rules.et_min_volume > 0:
        enhancing, relabel_to = task.enhancing
        et = out == enhancing
        if 0 < int(et.sum()) < rules.et_min_volume / per_voxel:
            out[et] = relabel_to
    return out

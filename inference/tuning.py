"""Post-processing chosen on validation predictions (as nnU-Net's ``determine_postprocessing``).

    result = tune_postprocessing(cases, task, "legacy")   # cases: [(prediction, reference, spacing), ...]
    result.rules            # inference.postprocess.Rules: off unless it helps on these cases
    result.before, result.after                            # objective without / with them
    result.regions_after    # {region: mean Dice with the rules}

The objective is the mean over cases and the task's evaluated regions of the Dice of the metric
convention in use (legacy voxel Dice, or lesion-wise Dice). The search is greedy, one rule at a
time, in a fixed order: the minimum component size of each training region, then the volume below
which the enhancing label is relabelled, then keeping only the largest outermost component. A
candidate is kept only if it raises the objective by more than ``MARGIN`` and lowers the mean
Dice of no region (nnU-Net's rule: a rule that trades one region for another is more likely fitted
to these few cases than true of new ones), so the result is never worse than no post-processing
on these cases, in any region. The whole search runs twice, with sizes in voxels
and in mm^3 (``CANDIDATES``), and the better unit wins (mm^3 on a tie: it transfers across
spacings). The predictions are labels already computed: no second sliding-window pass.

In training, each process tunes on its own share of the validation cases and ``reduce`` sums the
scores over processes, so every process gets the same choice. A case is scored again for a
candidate only when the candidate can change its masks (``_Prepared.effect``), which on
validation predictions is rare: the search costs a few scorings per case, not one per candidate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from core.boxes import bounding_box, crop, expand_box
from core.task import Task
from inference.postprocess import Rules, label_components, outermost_region, postprocess_classes
from metrics import case_metrics

MARGIN = 1e-3  # a rule must raise the objective by more than this to be kept
CANDIDATES = (10.0, 25.0, 50.0, 100.0, 200.0, 500.0)  # component sizes and enhancing volumes, each unit
UNITS = ("mm3", "voxels")  # mm3 first: kept on a tie

Case = tuple  # (prediction classes (X, Y, Z), reference classes (X, Y, Z), spacing (3,)), or tune_case(...)


@dataclass
class Tuning:
    """The chosen rules and what they do on the cases they were chosen on."""

    rules: Rules
    before: float  # objective without post-processing
    after: float  # objective with ``rules``
    regions_before: dict[str, float]
    regions_after: dict[str, float]
    cases: int

    def source(self, convention: str, where: str) -> str:
        """One line saying where the rules come from (stored with them)."""
        return (f"tuned on {self.cases} validation case(s) {where} ({convention} mean Dice {self.before:.4f} -> "
                f"{self.after:.4f})")


def tune_postprocessing(cases: Sequence[Case], task: Task, convention: str,
                        reduce: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> Tuning:
    """Choose post-processing rules on ``cases`` (module docstring). ``reduce`` sums a vector over
    processes (training shards its validation cases); the identity in a single process."""
    regions = task.region_names
    prepared = [c if isinstance(c, _Prepared) else tune_case(*c, task) for c in cases]

    def scores(case: _Prepared, out: np.ndarray) -> np.ndarray:
        """Dice of each region of one case's masks ``out``."""
        metrics = case_metrics(out, case.ref, case.spacing, task, convention, hd95=False)
        return np.array([metrics[r]["dice"] for r in regions])

    def summed(per_case: np.ndarray) -> np.ndarray:
        """``[Dice of each region summed over cases ..., number of cases]`` over all processes."""
        return reduce(np.append(per_case.sum(axis=0), len(per_case)))

    def objective(total: np.ndarray) -> float:
        return float(total[:-1].mean() / max(total[-1], 1))

    def better(trial: np.ndarray, current: np.ndarray) -> bool:
        """A gain above ``MARGIN`` with no region's summed Dice lower (beyond rounding)."""
        return objective(trial) > objective(current) + MARGIN and bool((trial[:-1] >= current[:-1] - 1e-9).all())

    off = np.array([scores(c, c.pred) for c in prepared]).reshape(len(prepared), len(regions))
    off_total = summed(off)
    best_rules, best_total = Rules(), off_total
    unit_voxels = not reduce(np.array([sum(abs(math.prod(c.spacing) - 1.0) > 1e-6 for c in prepared)], float))[0]
    for unit in UNITS[:1] if unit_voxels else UNITS:  # 1 mm^3 voxels everywhere: both searches are one
        rules, current, current_total = Rules(unit=unit), off, off_total
        for case in prepared:
            case.accept(case.pred)
        for axis, choices in _search_steps(task):
            for case in prepared:
                case.start_axis(task)
            for value in choices:
                candidate = _with(rules, axis, value, len(task.training_regions))
                trial, outputs = current.copy(), {}
                for k, case in enumerate(prepared):
                    effect = case.effect(task, axis, rules, candidate)
                    if effect is None:  # the same masks as now: the same scores
                        continue
                    if effect not in case.tried:  # else masks already scored on this axis
                        out = postprocess_classes(case.pred, task, candidate, case.spacing)
                        case.tried[effect] = (out, scores(case, out))
                    outputs[k], trial[k] = case.tried[effect]
                trial_total = summed(trial)
                if better(trial_total, current_total):
                    rules, current, current_total = candidate, trial, trial_total
                    for k, case in enumerate(prepared):
                        case.accept(outputs.get(k, case.current))
        if objective(current_total) > objective(best_total) + (MARGIN if not best_rules.active else 0.0):
            best_rules, best_total = rules, current_total
    count = max(int(off_total[-1]), 1)
    return Tuning(rules=best_rules if best_rules.active else Rules(), before=objective(off_total),
                  after=objective(best_total), regions_before=dict(zip(regions, (off_total[:-1] / count).tolist())),
                  regions_after=dict(zip(regions, (best_total[:-1] / count).tolist())), cases=int(off_total[-1]))


@dataclass
class _Prepared:
    """One case cropped to its tumour (predicted or reference), with its masks under the rules
    chosen so far (``current``), which tell without post-processing it again that a candidate
    cannot change them. Every rule removes whole components of the raw prediction (a component
    of an inner region lies in one component of its outer region) or relabels all of the enhancing
    label, so the components of each region of ``current`` are raw components, and moving a size
    threshold from a to b changes nothing when none of them has a size in [a, b)."""

    pred: np.ndarray  # (X, Y, Z) training classes, cropped
    ref: np.ndarray
    spacing: tuple[float, ...]
    current: np.ndarray | None = None  # the masks under the rules chosen so far
    enhancing_volume: int = 0  # voxels of the enhancing label after the size rules (note_enhancing_volume)
    _sizes: list[np.ndarray] | None = None  # per training region: component sizes (voxels) of ``current``
    tried: dict = dataclasses.field(default_factory=dict)  # effect -> (masks, scores) tried for this rule

    def accept(self, out: np.ndarray) -> None:
        """``out``: the masks under the rules now chosen."""
        if out is not self.current:
            self.current, self._sizes = out, None
        self.tried = {}

    def start_axis(self, task: Task) -> None:
        """Before the candidates of one rule: forget the masks tried for the previous rule, and
        note the enhancing volume the enhancing rule compares with its threshold (searched right
        after the sizes: ``current`` has only those applied)."""
        self.tried = {}
        self.enhancing_volume = int((self.current == task.enhancing[0]).sum()) if task.enhancing else 0

    def component_sizes(self, task: Task) -> list[np.ndarray]:
        if self._sizes is None:
            self._sizes = []
            for mask in task.training_region_masks(self.current):
                self._sizes.append(label_components(mask)[1][1:] if mask.any() else np.zeros(0, np.int64))
        return self._sizes

    def voxels(self, size: float, unit: str) -> float:
        return size / math.prod(self.spacing) if unit == "mm3" else size

    def effect(self, task: Task, axis: tuple, rules: Rules, candidate: Rules):
        """What ``candidate`` (``rules`` with the rule ``axis`` changed) does to ``current``: None
        when nothing, else a key equal for two candidates of this rule that give the same masks."""
        if axis[0] == "size":
            i = axis[1]
            old, new = (r.min_component_size[i] if r.min_component_size else 0.0 for r in (rules, candidate))
            if new < old:  # components that ``rules`` removed may come back: only a new pass can tell
                return ("smaller", new)
            sizes = self.component_sizes(task)[i]
            removed = int(((sizes >= self.voxels(old, rules.unit)) & (sizes < self.voxels(new, rules.unit))).sum())
            return removed or None  # thresholds rise: as many removed components = the same ones
        if axis[0] == "enhancing":
            relabelled = [0 < self.enhancing_volume < self.voxels(r.et_min_volume, r.unit) for r in (rules, candidate)]
            return relabelled[1] if relabelled[0] != relabelled[1] else None
        return True if len(self.component_sizes(task)[outermost_region(task)]) > 1 else None  # largest_component


def tune_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], task: Task) -> _Prepared:
    """One case for ``tune_postprocessing``, cropped to its tumour (predicted or reference) with
    room for the lesion-wise dilation: a (copied) fraction of the volume."""
    margin = max((rule.dilation for rule in task.lesion_rules), default=0) + 2
    box = expand_box(bounding_box((pred != 0) | (ref != 0)), margin, pred.shape)
    pred, ref = (np.array(crop(np.asarray(a, np.uint8), box)) for a in (pred, ref))
    return _Prepared(pred, ref, tuple(float(s) for s in spacing), pred)


def _search_steps(task: Task) -> list[tuple[tuple, tuple]]:
    """``[(which rule, candidate values), ...]`` in search order."""
    steps = [(("size", i), CANDIDATES) for i in range(len(task.training_regions))]
    if task.enhancing is not None:
        steps.append((("enhancing",), CANDIDATES))
    steps.append((("largest",), (True,)))
    return steps


def _with(rules: Rules, axis: tuple, value, regions: int) -> Rules:
    """``rules`` with one rule changed (``regions``: the task's training regions)."""
    if axis[0] == "size":
        sizes = list(rules.min_component_size) or [0.0] * regions
        sizes[axis[1]] = float(value)
        return dataclasses.replace(rules, min_component_size=tuple(sizes))
    if axis[0] == "enhancing":
        return dataclasses.replace(rules, et_min_volume=float(value))
    return dataclasses.replace(rules, largest_component=bool(value))

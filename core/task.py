"""The task schema: a BraTS task's modalities, labels, regions and evaluation rules, as data.

Every task (the built-ins in ``configs/tasks/*.yaml`` and any user YAML given as ``data.task``)
is one ``Task``; no other module knows a label value or a region name::

    task = load_task("brats-gli-2024")             # or load_task("path/to/my_task.yaml")
    classes = task.labels_to_classes(seg)          # file labels -> training classes 0..K (uint8)
    seg = task.classes_to_labels(classes)          # and back, in this task's label values
    masks = task.region_masks(classes)             # {"WT": bool array, "TC": ..., "RC": ...}
    targets = task.training_targets(classes)       # (B, X, Y, Z) -> (B, R, X, Y, Z) float, sigmoid targets
    classes = task.decode(probs, "regions", 0.5)   # network probabilities -> classes

Vocabulary:

- *labels* are the values in a task's label files (e.g. GLI 2024: 1 NETC, 2 SNFH, 3 ET, 4 RC);
- *classes* are the contiguous ids ``0 background, 1..K`` used inside the pipeline, in the order
  the task YAML lists its labels;
- *regions* are unions of labels that are evaluated (``regions``) or trained as sigmoid
  channels (``training_regions``, painted back in order: each channel paints its class where
  its probability is above the threshold, so later channels win);
- two tasks are *compatible* (``Task.compatible_with``) when they have the same classes and the
  same regions in class terms and differ only in naming and label values (BraTS 2021 ET = 4 vs
  2023 ET = 3): a checkpoint of one applies to data of the other.

Loading refuses (``TaskError``, one line naming the key) unknown keys, regions naming labels that
do not exist, and training regions that cannot be decoded back into every label.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml

from core.errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
LAYOUTS = ("brats", "msd")  # case folders with one file per modality | MSD imagesTr/labelsTr with 4D images
OUTPUT_MODES = ("labels", "regions")  # softmax over classes | sigmoid over training regions
# loss name -> output mode of the network it trains (how its outputs decode: Task.decode)
LOSS_OUTPUT_MODES = {"dice_ce": "labels", "region_dice_bce": "regions"}
# every accepted modality name -> canonical name; names not listed here are their own canonical name
MODALITY_ALIASES = {
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
}
DEFAULT_COLOURS = ((230, 40, 40), (40, 200, 60), (250, 220, 30), (60, 120, 255), (230, 60, 230),
                   (40, 220, 230), (255, 140, 20), (160, 100, 60))
LESION_DEFAULTS = {"dilation": 3, "min_volume": 50.0, "merge_predictions": False}
_TOP_KEYS = ("name", "description", "source", "layout", "case_pattern", "modalities", "label_file", "labels",
             "colours", "regions", "training_regions", "lesionwise", "enhancing")
_REQUIRED = ("name", "modalities", "labels", "regions")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class TaskError(UserError):
    """A task YAML that cannot be used, or data that fits no task: one line naming the problem."""


def canonical_modality(name: str) -> str:
    """``'t2f'`` -> ``'flair'``, ``'T1c'`` -> ``'t1ce'``; other names are lower-cased as they are."""
    key = str(name).strip().lower()
    if not re.fullmatch(r"[a-z0-9]+", key):
        raise UserError(f"invalid modality name {name!r} (letters and digits only)")
    return MODALITY_ALIASES.get(key, key)


def display_channels(modalities: Sequence[str]) -> tuple[int, ...]:
    """Channels to show in pictures: indices of FLAIR and T1ce among canonical ``modalities``
    (the tumour's extent and its enhancement), else the first one or two channels."""
    names = list(modalities)
    chosen = [names.index(m) for m in ("flair", "t1ce") if m in names]
    return tuple(chosen) or tuple(range(min(2, len(names))))


@dataclass(frozen=True)
class Region:
    """A union of classes. ``paint`` is the class a training region paints back (None otherwise)."""

    name: str
    classes: tuple[int, ...]
    paint: int | None = None


@dataclass(frozen=True)
class LesionRule:
    """Lesion-wise parameters of one region (BraTS 2023+ evaluation).

    ``dilation``: 18-connected dilation iterations merging nearby reference pieces into one lesion
    and defining the area where predictions match it; ``min_volume``: reference lesions of at
    most this many mm^3 are not scored; ``merge_predictions`` (the 2024 scripts): predicted
    components are merged by the same dilation and merged predictions of at most ``min_volume``
    are dropped before matching.
    """

    dilation: int = 3
    min_volume: float = 50.0
    merge_predictions: bool = False


@dataclass(frozen=True)
class Task:
    """One task. Build with ``load_task`` / ``Task.from_dict`` (validated), not directly."""

    name: str
    description: str
    source: str
    layout: str
    case_pattern: str  # regex searched in case ids, for auto-detection ("" = matches nothing)
    modalities: tuple[str, ...]  # canonical names, in channel order (MSD: the 4D file's order)
    file_modalities: tuple[str, ...]  # the same names as written in the YAML (file suffixes)
    label_file: str  # file suffix of the label file ("seg", "gtv")
    class_names: tuple[str, ...]  # index = class; 0 = "background"
    label_values: tuple[int, ...]  # index = class; file label value of each class (0 for background)
    colours: tuple[tuple[int, int, int], ...]  # index = class; RGB 0..255 (background black)
    regions: tuple[Region, ...]  # evaluated regions, in report order
    training_regions: tuple[Region, ...]  # sigmoid channels, in paint order
    lesion_rules: tuple[LesionRule, ...]  # one per evaluated region
    enhancing: tuple[int, int] | None  # (class, class it becomes) for infer.et_min_volume

    # ------------------------------------------------------------------ sizes and names
    @property
    def num_classes(self) -> int:
        """Classes including background (K + 1)."""
        return len(self.class_names)

    @property
    def foreground_classes(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_classes))

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    @property
    def training_region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.training_regions)

    def region(self, name: str) -> Region:
        for region in self.regions + self.training_regions:
            if region.name == name:
                return region
        raise KeyError(f"task {self.name} has no region {name!r} (regions: {', '.join(self.region_names)})")

    def lesion_rule(self, region_name: str) -> LesionRule:
        return self.lesion_rules[self.region_names.index(region_name)]

    def select_modalities(self, names: Sequence[str]) -> tuple[str, ...]:
        """The input channels: ``names`` (``data.modalities``, any alias, in the order given), or
        all of the task's modalities when ``names`` is empty. Canonical names; ``TaskError``
        naming a modality the task does not have."""
        if not names:
            return self.modalities
        chosen = tuple(canonical_modality(n) for n in names)
        for name, canonical in zip(names, chosen):
            if canonical not in self.modalities:
                raise TaskError(f"data.modalities: '{name}' is not a modality of task {self.name} "
                                f"({', '.join(self.file_modalities)})")
        if len(set(chosen)) != len(chosen):
            raise TaskError(f"data.modalities: {list(names)} names one modality twice")
        return chosen

    def output_channels(self, mode: str) -> int:
        """Network output channels: classes (``labels``: softmax) or training regions (``regions``)."""
        _check_mode(mode)
        return self.num_classes if mode == "labels" else len(self.training_regions)

    # ------------------------------------------------------------------ labels <-> classes
    def unexpected_values(self, values: Iterable[int]) -> list[int]:
        """The values of ``values`` that are not labels of this task (0 is always allowed)."""
        allowed = set(self.label_values)
        return sorted({int(v) for v in values} - allowed)

    def labels_to_classes(self, labels: np.ndarray) -> np.ndarray:
        """File labels ``(...)`` -> uint8 classes; ``ValueError`` naming values outside the task."""
        labels = np.asarray(labels)
        lut = np.full(256, 255, dtype=np.uint8)
        for cls, value in enumerate(self.label_values):
            lut[value] = cls
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"label values outside 0..255 for task {self.name}")
        classes = lut[labels.astype(np.intp)]
        if classes.size and classes.max() == 255:
            found = np.unique(labels[classes == 255]).tolist()
            raise ValueError(f"label values {found} are not labels of task {self.name} "
                             f"({self.describe_labels()})")
        return classes

    def classes_to_labels(self, classes: np.ndarray) -> np.ndarray:
        """uint8 classes -> file labels of this task (uint8)."""
        lut = np.asarray(self.label_values, dtype=np.uint8)
        return lut[np.asarray(classes).astype(np.intp)]

    def describe_labels(self) -> str:
        """``"1 NETC, 2 SNFH, 3 ET, 4 RC"``."""
        return ", ".join(f"{v} {n}" for n, v in zip(self.class_names[1:], self.label_values[1:]))

    # ------------------------------------------------------------------ regions
    def region_mask(self, classes: Any, region: Region | str) -> Any:
        """Boolean mask of ``region`` (a ``Region`` or its name) in a class map (numpy or torch)."""
        region = self.region(region) if isinstance(region, str) else region
        return _isin(classes, region.classes)

    def region_masks(self, classes: Any) -> dict[str, Any]:
        """``{region name: bool mask}`` of every evaluated region."""
        return {region.name: _isin(classes, region.classes) for region in self.regions}

    def training_targets(self, classes: torch.Tensor) -> torch.Tensor:
        """Classes ``(B, X, Y, Z)`` (or ``(B, 1, X, Y, Z)``) -> float32 ``(B, R, X, Y, Z)``, one
        channel per training region (the sigmoid targets of ``region_dice_bce``)."""
        if classes.ndim == 5:
            classes = classes[:, 0]
        return torch.stack([_isin(classes, r.classes) for r in self.training_regions], dim=1).float()

    def training_region_masks(self, classes: np.ndarray) -> np.ndarray:
        """Classes ``(X, Y, Z)`` -> bool ``(R, X, Y, Z)``, one mask per training region."""
        return np.stack([_isin(np.asarray(classes), r.classes) for r in self.training_regions])

    def paint_regions(self, on: Any) -> Any:
        """Boolean or probability maps ``(R, ...)`` of the training regions -> uint8 classes ``(...)``:
        each region paints its class where it is on (``> 0.5`` for floats), in order."""
        is_torch = isinstance(on, torch.Tensor)
        out = (torch.zeros(on.shape[1:], dtype=torch.uint8, device=on.device) if is_torch
               else np.zeros(on.shape[1:], dtype=np.uint8))
        for i, region in enumerate(self.training_regions):
            mask = on[i] if on.dtype in (torch.bool, np.bool_) else on[i] > 0.5
            out[mask] = region.paint
        return out

    def decode(self, probs: Any, mode: str, threshold: float = 0.5) -> Any:
        """Probabilities ``(C, ...)`` -> uint8 classes ``(...)``: argmax over classes (``labels``;
        ties go to the lowest class) or the training regions painted in order (``regions``)."""
        _check_mode(mode)
        if mode == "regions":
            return self.paint_regions(probs > threshold)
        if isinstance(probs, torch.Tensor):
            return _argmax_channels(probs)
        return _argmax_channels(torch.from_numpy(np.ascontiguousarray(probs))).numpy()

    # ------------------------------------------------------------------ compatibility, storage
    def signature(self) -> tuple:
        """What a trained network depends on: classes and regions in class terms (not names of
        labels, not label values, not file naming, not evaluation parameters)."""
        return (self.num_classes,
                tuple((r.name, r.classes, r.paint) for r in self.training_regions),
                tuple((r.name, r.classes) for r in self.regions))

    def compatible_with(self, other: "Task") -> bool:
        """Same classes and regions: the two differ only in naming / label values."""
        return self.signature() == other.signature()

    def to_dict(self) -> dict:
        """The YAML form (what ``from_dict`` reads); stored in checkpoints."""
        name_of = self.class_names
        return {
            "name": self.name, "description": self.description, "source": self.source, "layout": self.layout,
            "case_pattern": self.case_pattern, "modalities": list(self.file_modalities),
            "label_file": self.label_file,
            # lists, not mappings: the order is the class order, whatever a YAML writer does to keys
            "labels": [[n, int(v)] for n, v in zip(self.class_names[1:], self.label_values[1:])],
            "colours": {n: list(c) for n, c in zip(self.class_names[1:], self.colours[1:])},
            "regions": [[r.name, [name_of[c] for c in r.classes]] for r in self.regions],
            "training_regions": [[r.name, [name_of[c] for c in r.classes], name_of[r.paint]]
                                 for r in self.training_regions],
            "lesionwise": {"regions": {r.name: {"dilation": rule.dilation, "min_volume": rule.min_volume,
                                                "merge_predictions": rule.merge_predictions}
                                       for r, rule in zip(self.regions, self.lesion_rules)}},
            "enhancing": (None if self.enhancing is None else
                          {"label": name_of[self.enhancing[0]], "relabel_to": name_of[self.enhancing[1]]}),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = "task") -> "Task":
        """Validated task from its YAML mapping; ``TaskError`` naming ``where`` and the key."""
        return _parse_task(raw, where)


# ==============================================================================================
# Loading
# ==============================================================================================
@functools.lru_cache(maxsize=1)
def builtin_tasks() -> dict[str, Task]:
    """``{name: Task}`` of ``configs/tasks/*.yaml``, in file-name order."""
    tasks = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        task = _read_task_file(path)
        if task.name != path.stem:
            raise TaskError(f"{path}: name '{task.name}' differs from the file name '{path.stem}'")
        tasks[task.name] = task
    return tasks


def load_task(spec: str | Path | dict) -> Task:
    """A built-in task by name, a task YAML file by path, or a task mapping (e.g. from a checkpoint)."""
    if isinstance(spec, dict):
        return Task.from_dict(spec)
    text = str(spec)
    builtins = builtin_tasks()
    if text in builtins:
        return builtins[text]
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise TaskError(f"{path}: task file not found (data.task)")
        return _read_task_file(path)
    close = difflib.get_close_matches(text, list(builtins), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise TaskError(f"data.task: unknown task '{text}'{hint} (built-in: {', '.join(builtins)}; "
                    "or the path of a task YAML)")


def legacy_task(convention: str) -> Task:
    """The task of a checkpoint written before tasks existed: its label convention "2021"
    (ET = 4) or "2023" (ET = 3) of the BraTS glioma labels."""
    names = {"2021": "brats-gli-2021", "2023": "brats-gli-2023"}
    if str(convention) not in names:
        raise TaskError(f"unknown label convention {convention!r} (expected 2021 or 2023)")
    return builtin_tasks()[names[str(convention)]]


def _read_task_file(path: Path) -> Task:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TaskError(f"{path}: cannot read task YAML ({first})") from None
    return _parse_task(raw, str(path))


def _parse_task(raw: Any, where: str) -> Task:
    """A ``Task`` from a task YAML's mapping; ``TaskError`` naming ``where`` and the first bad key."""
    _check_keys(raw, where)
    name = _string(raw, "name", where)
    if not _NAME.match(name):
        raise TaskError(f"{where}: name {name!r} must be letters, digits, '-', '_', '.' or '+'")
    layout = _string(raw, "layout", where, default="brats")
    if layout not in LAYOUTS:
        raise TaskError(f"{where}: layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    pattern = _string(raw, "case_pattern", where, default="")
    try:
        re.compile(pattern)
    except re.error as err:
        raise TaskError(f"{where}: case_pattern {pattern!r} is not a regular expression ({err})") from None
    file_modalities, modalities = _parse_modalities(raw, where)
    class_names, label_values = _parse_labels(raw, where)
    classes_of = _label_lookup(class_names, where)

    regions_raw = _pairs(raw["regions"], "regions", where,
                         "regions must map each evaluated region to its labels, e.g. {WT: [NETC, SNFH, ET]}")
    regions = tuple(Region(str(r), classes_of(f"regions.{r}", names)) for r, names in regions_raw)
    if len({r.name for r in regions}) != len(regions):
        raise TaskError(f"{where}: regions name one region twice")
    training_raw = raw.get("training_regions")
    if training_raw is None:  # one sigmoid channel per label, each painting itself
        training = tuple(Region(class_names[c], (c,), c) for c in range(1, len(class_names)))
    else:
        class_of = {n: c for c, n in enumerate(class_names) if c > 0}
        training = _parse_training_regions(training_raw, regions, class_of, classes_of, where)
    _check_decodable(training, class_names, where)
    return Task(name=name, description=_string(raw, "description", where, default=""),
                source=_string(raw, "source", where, default=""), layout=layout, case_pattern=pattern,
                modalities=modalities, file_modalities=file_modalities,
                label_file=_string(raw, "label_file", where, default="seg").lower(), class_names=tuple(class_names),
                label_values=tuple(label_values), colours=_parse_colours(raw, class_names, where), regions=regions,
                training_regions=training, lesion_rules=_parse_lesionwise(raw.get("lesionwise"), regions, where),
                enhancing=_parse_enhancing(raw, classes_of, where))


def _check_keys(raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: a task must be a mapping of keys ({', '.join(_REQUIRED)}, ...)")
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_TOP_KEYS)}"
            raise TaskError(f"{where}: unknown task key '{key}'{hint}")
    for key in _REQUIRED:
        if key not in raw:
            raise TaskError(f"{where}: task key '{key}' is missing")


def _parse_modalities(raw: dict, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(names as in the files, canonical names)``; one modality named twice is an error."""
    file_modalities = _string_list(raw, "modalities", where)
    try:
        modalities = tuple(canonical_modality(m) for m in file_modalities)
    except UserError as err:
        raise TaskError(f"{where}: modalities: {err}") from None
    if len(set(modalities)) != len(modalities):
        raise TaskError(f"{where}: modalities {file_modalities} name one modality twice (t1 = t1n, t1ce = t1c, "
                        "t2 = t2w, flair = t2f)")
    return tuple(str(m) for m in file_modalities), modalities


def _parse_labels(raw: dict, where: str) -> tuple[list[str], list[int]]:
    """``(class names, label values)``, background (0) first, then the labels in class order."""
    labels = _pairs(raw["labels"], "labels", where,
                    "labels must map each label name to its value, in class order, e.g. {NETC: 1, SNFH: 2, ET: 3}")
    class_names, label_values = ["background"], [0]
    for label, value in labels:
        label = str(label)
        if label.lower() == "background" or not _NAME.match(label):
            raise TaskError(f"{where}: labels: invalid label name {label!r}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise TaskError(f"{where}: labels.{label}: value {value!r} must be an integer in 1..255 (0 is background)")
        if value in label_values:
            raise TaskError(f"{where}: labels.{label}: value {value} is used twice")
        class_names.append(label)
        label_values.append(value)
    return class_names, label_values


def _label_lookup(class_names: list[str], where: str):
    """``classes_of(key, [label names]) -> sorted class indices``, a ``TaskError`` naming ``key``
    for a name that is not a label of the task."""
    class_of = {n: c for c, n in enumerate(class_names) if c > 0}

    def classes_of(key: str, names: Any) -> tuple[int, ...]:
        if not isinstance(names, list) or not names:
            raise TaskError(f"{where}: {key} must be a non-empty list of label names")
        out = []
        for label in names:
            if str(label) not in class_of:
                raise TaskError(f"{where}: {key} names label {label!r}, which is not a label of the task "
                                f"(labels: {', '.join(class_of)})")
            out.append(class_of[str(label)])
        return tuple(sorted(set(out)))
    return classes_of


def _parse_colours(raw: dict, class_names: list[str], where: str) -> tuple[tuple[int, int, int], ...]:
    """One RGB colour per class: the task's ``colours`` where given, else ``DEFAULT_COLOURS``."""
    class_of = {n: c for c, n in enumerate(class_names) if c > 0}
    colours = [(0, 0, 0)] + [DEFAULT_COLOURS[(c - 1) % len(DEFAULT_COLOURS)] for c in range(1, len(class_names))]
    for label, rgb in (raw.get("colours") or {}).items():
        if str(label) not in class_of:
            raise TaskError(f"{where}: colours names label {label!r}, which is not a label of the task")
        if not (isinstance(rgb, list) and len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)):
            raise TaskError(f"{where}: colours.{label} must be [R, G, B] with values 0..255, got {rgb!r}")
        colours[class_of[str(label)]] = tuple(rgb)
    return tuple(colours)


def _parse_enhancing(raw: dict, classes_of, where: str) -> tuple[int, int] | None:
    """``(enhancing class, class it becomes)`` for infer.et_min_volume, or ``None``."""
    spec = raw.get("enhancing")
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"label", "relabel_to"}:
        raise TaskError(f"{where}: enhancing must be {{label: ET, relabel_to: NETC}} (the label that "
                        "infer.et_min_volume relabels, and what it becomes)")
    return (classes_of("enhancing.label", [spec["label"]])[0],
            classes_of("enhancing.relabel_to", [spec["relabel_to"]])[0])


def _parse_training_regions(raw, regions, class_of, classes_of, where: str) -> tuple[Region, ...]:
    """``[[name, [labels] or omitted for an evaluated region, label painted], ...]``."""
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{where}: training_regions must be a list of [region, label painted back] entries")
    by_name = {r.name: r for r in regions}
    out = []
    for i, entry in enumerate(raw):
        key = f"training_regions[{i}]"
        if not isinstance(entry, list) or len(entry) not in (2, 3):
            raise TaskError(f"{where}: {key} must be [region, label painted] or [name, [labels], label painted]")
        name = str(entry[0])
        if len(entry) == 2:
            if name not in by_name:
                raise TaskError(f"{where}: {key} names region {name!r}, which is not an evaluated region "
                                f"(regions: {', '.join(by_name)}); give its labels as [name, [labels], label]")
            classes = by_name[name].classes
        else:
            classes = classes_of(f"{key} labels", entry[1])
        paint = classes_of(f"{key} label painted", [entry[-1]])[0]
        if paint not in classes:
            raise TaskError(f"{where}: {key}: region {name} paints label {entry[-1]!r}, which is not one of its labels")
        if name in [r.name for r in out]:
            raise TaskError(f"{where}: {key}: region {name} is listed twice")
        out.append(Region(name, classes, paint))
    return tuple(out)


def _check_decodable(training: tuple[Region, ...], class_names: list[str], where: str) -> None:
    """Every class must come back from its own region memberships when painted in order."""
    for cls in range(len(class_names)):
        painted = 0
        for region in training:
            if cls in region.classes:
                painted = region.paint
        if painted != cls:
            got = class_names[painted]
            raise TaskError(f"{where}: training_regions cannot be decoded: a voxel of label {class_names[cls]} "
                            f"is painted back as {got} (order the regions so the innermost comes last, and "
                            "let every label be painted by some region)")


def _parse_lesionwise(raw, regions: tuple[Region, ...], where: str) -> tuple[LesionRule, ...]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: lesionwise must be a mapping (dilation, min_volume, merge_predictions, regions)")
    allowed = tuple(LESION_DEFAULTS) + ("regions",)
    for key in raw:
        if key not in allowed:
            raise TaskError(f"{where}: unknown key 'lesionwise.{key}' (valid: {', '.join(allowed)})")
    defaults = _lesion_values({**LESION_DEFAULTS, **{k: v for k, v in raw.items() if k != "regions"}},
                              f"{where}: lesionwise")
    per_region = raw.get("regions") or {}
    if not isinstance(per_region, dict):
        raise TaskError(f"{where}: lesionwise.regions must map region names to parameters")
    names = [r.name for r in regions]
    for name in per_region:
        if name not in names:
            raise TaskError(f"{where}: lesionwise.regions names region {name!r}, which is not an evaluated region "
                            f"(regions: {', '.join(names)})")
    rules = []
    for region in regions:
        override = per_region.get(region.name) or {}
        if not isinstance(override, dict) or set(override) - set(LESION_DEFAULTS):
            raise TaskError(f"{where}: lesionwise.regions.{region.name} may set only {', '.join(LESION_DEFAULTS)}")
        rules.append(LesionRule(**_lesion_values({**defaults, **override},
                                                 f"{where}: lesionwise.regions.{region.name}")))
    return tuple(rules)


def _lesion_values(values: dict, where: str) -> dict:
    dilation, min_volume, merge = values["dilation"], values["min_volume"], values["merge_predictions"]
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
        raise TaskError(f"{where}.dilation: {dilation!r} must be an integer >= 0")
    if isinstance(min_volume, bool) or not isinstance(min_volume, (int, float)) or not min_volume >= 0:
        raise TaskError(f"{where}.min_volume: {min_volume!r} must be a number >= 0 (mm^3)")
    if not isinstance(merge, bool):
        raise TaskError(f"{where}.merge_predictions: {merge!r} must be true or false")
    return {"dilation": dilation, "min_volume": float(min_volume), "merge_predictions": merge}


def _pairs(value: Any, key: str, where: str, message: str) -> list[tuple[str, Any]]:
    """A mapping in written order, or a list of ``[name, value]`` pairs (the stored form)."""
    if isinstance(value, dict) and value:
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(p, list) and len(p) == 2 for p in value):
        return [(str(k), v) for k, v in value]
    raise TaskError(f"{where}: {message}")


def _string(raw: dict, key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if value is None:
        value = default if default is not None else ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TaskError(f"{where}: {key} must be a string, got {value!r}")
    return str(value)


def _string_list(raw: dict, key: str, where: str) -> list[str]:
    value = raw.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TaskError(f"{where}: {key} must be a non-empty list of names")
    return value


def output_mode(loss_cfg) -> str:
    """The output mode a network trained with ``loss_cfg`` (``cfg.loss``) has: ``"labels"`` for
    ``dice_ce``, ``"regions"`` for ``region_dice_bce`` (``LOSS_OUTPUT_MODES``)."""
    if loss_cfg.name not in LOSS_OUTPUT_MODES:
        raise ValueError(f"unknown loss {loss_cfg.name!r} (valid: {', '.join(LOSS_OUTPUT_MODES)})")
    return LOSS_OUTPUT_MODES[loss_cfg.name]


def _check_mode(mode: str) -> None:
    if mode not in OUTPUT_MODES:
        raise ValueError(f"output mode must be one of {', '.join(OUTPUT_MODES)}, got {mode!r}")


def _isin(x: Any, values: Sequence[int]) -> Any:
    if isinstance(x, torch.Tensor):
        out = x == values[0]
        for v in values[1:]:
            out = out | (x == v)
        return out
    return np.isin(x, values)


def _argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(dim=0)`` as uint8 (ties -> the lowest class), one channel at a time: with a
    few channels this is ~10x faster on the CPU than torch's strided reduction over dim 0."""
    best = probs[0].clone()
    classes = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        classes.masked_fill_(higher, k)
        torch.maximum(best, probs[k], out=best)
    return classes


def logits_to_probabilities(logits: torch.Tensor, mode: str, dim: int = 1) -> torch.Tensor:
    """Softmax over classes (``labels``) or element-wise sigmoid (``regions``), in float32."""
    _check_mode(mode)
    logits = logits.float()
    return torch.softmax(logits, dim=dim) if mode == "labels" else torch.sigmoid(logits)


# ==============================================================================================
# Which task a set of cases belongs to
# ==============================================================================================
@dataclass(frozen=True)
class CaseFacts:
    """What detection looks at: the case id, the layout it was found in, the canonical
    modalities present, and the label values of its label file (``None``: no label file). A
    ``None`` layout or modality set (a bare label file, as ``evaluate.py`` sees it) is not checked."""

    case_id: str
    layout: str | None
    modalities: frozenset[str] | None
    values: tuple[int, ...] | None
    where: str = ""  # the label file (or folder), for messages


@dataclass
class TaskChoice:
    """The dataset's task and each case's own task (compatible with it; e.g. 2021 naming in a
    2023 dataset)."""

    task: Task
    per_case: dict[str, Task]


def fits(task: Task, case: CaseFacts, use_pattern: bool = True) -> bool:
    """The case could be of ``task``: layout, modality files, label values (and the case-id pattern)."""
    if case.layout is not None and task.layout != case.layout:
        return False
    if case.modalities is not None and not set(task.modalities) <= case.modalities:
        return False
    if case.values is not None and task.unexpected_values(case.values):
        return False
    return not use_pattern or bool(task.case_pattern and re.search(task.case_pattern, case.case_id))


def case_candidates(case: CaseFacts, tasks: Sequence[Task]) -> list[Task]:
    """Tasks the case fits: among the tasks whose name pattern matches the case id (when some
    does), by layout, files and label values."""
    named = [t for t in tasks if t.case_pattern and re.search(t.case_pattern, case.case_id)]
    return [t for t in (named or tasks) if fits(t, case, use_pattern=False)]


def choose_tasks(cases: Sequence[CaseFacts], tasks: Sequence[Task], explicit: Task | None = None,
                 prefer: Task | None = None) -> TaskChoice:
    """The task of a dataset (``explicit`` when given, else detected) and of each case.

    Detection: every case gets its candidates (``case_candidates``); the tasks are grouped by
    compatibility, and the group that fits every case wins (``prefer``'s group first, then the
    one with the fewest classes). Within it a case takes ``prefer`` / ``explicit`` when it fits,
    else its only candidate. ``TaskError`` (one line) when no group fits every case (the two
    cases that disagree are named), when two groups tie, when a case has several candidates, or
    when a case's label values fit no task.
    """
    if not cases:
        raise TaskError("no cases to determine the task from")
    if explicit is not None:
        return _choose_explicit(cases, tasks, explicit)
    candidates = {c.case_id: case_candidates(c, tasks) for c in cases}
    for case in cases:
        if not candidates[case.case_id]:
            raise TaskError(_no_task_message(case, tasks))
    groups: list[list[Task]] = []
    for task in tasks:
        group = next((g for g in groups if g[0].compatible_with(task)), None)
        group.append(task) if group is not None else groups.append([task])
    fitting = [g for g in groups if all(set(map(id, g)) & set(map(id, candidates[c.case_id])) for c in cases)]
    if not fitting:
        a = cases[0]
        b = next(c for c in cases if not any(t.compatible_with(u) for t in candidates[a.case_id]
                                             for u in candidates[c.case_id]))
        raise TaskError(f"the data mixes tasks: case {a.case_id} is {_names(candidates[a.case_id])} but case "
                        f"{b.case_id} is {_names(candidates[b.case_id])} (train one task per folder, or set data.task)")
    if prefer is not None and any(prefer.compatible_with(g[0]) for g in fitting):
        fitting = [g for g in fitting if prefer.compatible_with(g[0])]
    fewest = min(g[0].num_classes for g in fitting)
    fitting = [g for g in fitting if g[0].num_classes == fewest]
    if len(fitting) > 1:
        raise TaskError(f"cannot tell the task of the data: {_names([t for g in fitting for t in g])} all fit; "
                        "set data.task")
    group_ids = set(map(id, fitting[0]))
    per_case = {}
    for case in cases:
        options = [t for t in candidates[case.case_id] if id(t) in group_ids]
        if prefer is not None and any(t is prefer or t.name == prefer.name for t in options):
            per_case[case.case_id] = prefer
        elif len(options) == 1:
            per_case[case.case_id] = options[0]
        else:
            raise TaskError(f"cannot tell the task of case {case.case_id}: {_names(options)} all fit its files "
                            "and labels; set data.task")
    return TaskChoice(_most_common(per_case, cases), per_case)


def _choose_explicit(cases: Sequence[CaseFacts], tasks: Sequence[Task], explicit: Task) -> TaskChoice:
    family = [t for t in tasks if t.compatible_with(explicit) and t.name != explicit.name]
    per_case = {}
    for case in cases:
        if fits(explicit, case, use_pattern=False):
            per_case[case.case_id] = explicit
            continue
        options = [t for t in family if fits(t, case)]  # e.g. 2021 naming in a 2023 dataset
        if len(options) == 1:
            per_case[case.case_id] = options[0]
            continue
        missing = sorted(set(explicit.modalities) - (case.modalities or set(explicit.modalities)))
        if case.layout is not None and explicit.layout != case.layout:
            problem = f"is in the {case.layout} layout, task {explicit.name} expects {explicit.layout}"
        elif missing:
            problem = f"has no {', '.join(missing)} image(s), which task {explicit.name} needs"
        else:
            problem = (f"has label values {list(case.values)}, task {explicit.name} has "
                       f"{explicit.describe_labels()}")
        others = [t.name for t in tasks if fits(t, case, use_pattern=False)]
        hint = f"; built-in tasks that fit: {', '.join(others)}" if others else ""
        raise TaskError(f"{case.where or case.case_id}: case {case.case_id} {problem}{hint}")
    return TaskChoice(explicit, per_case)


def _no_task_message(case: CaseFacts, tasks: Sequence[Task]) -> str:
    values = "no label file" if case.values is None else f"label values {list(case.values)}"
    unnamed = [t.name for t in tasks if fits(t, case, use_pattern=False)]
    if unnamed:
        detail = f"its files and labels fit {', '.join(unnamed)} (not its name); set data.task"
    else:
        same_files = [t.name for t in tasks if fits(t, CaseFacts(case.case_id, case.layout, case.modalities, None),
                                                     use_pattern=False)]
        detail = (f"tasks with these files ({', '.join(same_files)}) have other labels" if same_files
                  else f"no task has images {sorted(case.modalities or ())} in the {case.layout} layout")
        detail += "; write a task YAML and set data.task to its path"
    return f"{case.where or case.case_id}: case {case.case_id} ({values}) fits no task: {detail}"


def _names(tasks: Sequence[Task]) -> str:
    names = [t.name for t in tasks]
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def _most_common(per_case: dict[str, Task], cases: Sequence[CaseFacts]) -> Task:
    counts: dict[str, int] = {}
    for case in cases:
        name = per_case[case.case_id].name
        counts[name] = counts.get(name, 0) + 1
    best = max(counts.values())
    first = next(c for c in cases if counts[per_case[c.case_id].name] == best)
    return per_case[first.case_id]

"""Which task a folder of cases belongs to (``data.task: auto``), from names, layout and label values.

    choice = resolve_task("auto", cases, cache_dir="cache")   # or a task name / task YAML path
    choice.task                 # the dataset's task (core.task.Task)
    choice.per_case[case_id]    # each case's own task: compatible with it (e.g. 2021 naming in 2023 data)

The rules (``core.task.choose_tasks``): the case-folder prefix narrows the candidates
(``BraTS20xx_``, ``BraTS-GLI-``, ``-PED-``, ``-MET-``, ``-MEN-RT-``, ``-MEN-``, ``-SSA-``,
MSD ``imagesTr/``), the label values decide between tasks that share a prefix (label 4 with
``BraTS-GLI-`` means the 2024 post-treatment task), and a folder whose cases belong to tasks
with different labels is refused. Label values are read once per file and remembered in
``<cache_dir>/label_values.json`` (by size and mtime), so a restart reads only new files.
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from core.atomic import atomic_write_text
from core.task import CaseFacts, Task, TaskChoice, builtin_tasks, choose_tasks, load_task
from datasets.io import Case, load_nifti, read_label

logger = logging.getLogger(__name__)

LABEL_MEMO = "label_values.json"  # in the cache folder: sorted label values per label file


def case_facts(case: Case, values: Sequence[int] | None) -> CaseFacts:
    """What detection needs to know of one case (``values``: its label values, if any)."""
    return CaseFacts(case_id=case.case_id, layout=case.layout, modalities=case.modalities_present(),
                     values=None if values is None else tuple(int(v) for v in values),
                     where=str(case.seg or case.volume or case.folder))


def resolve_task(setting: str, cases: Sequence[Case], cache_dir: str | Path | None = None, workers: int = 1,
                 prefer: Task | None = None, values: dict[str, list[int]] | None = None) -> TaskChoice:
    """The task of ``cases``: ``setting`` ("auto", a built-in name or a task YAML path) checked
    against every case, or detected. ``values`` (case id -> label values) are read when not
    given. ``TaskError`` (one line) when the data fits no task, mixes tasks, or is ambiguous."""
    if values is None:
        values = file_label_values({c.case_id: c.seg for c in cases if c.seg is not None}, cache_dir, workers)
    return choose_from_facts([case_facts(case, values.get(case.case_id)) for case in cases], setting, prefer)


def choose_from_facts(facts: Sequence[CaseFacts], setting: str, prefer: Task | None = None) -> TaskChoice:
    """``core.task.choose_tasks`` over the built-in tasks (plus ``setting``'s and ``prefer``
    when they are not built in), with ``setting`` "auto" or a task name / YAML path."""
    tasks = list(builtin_tasks().values())
    explicit = None if setting == "auto" else load_task(setting)
    for extra in (explicit, prefer):
        if extra is not None and all(extra is not t and extra != t for t in tasks):
            tasks.append(extra)
    choice = choose_tasks(facts, tasks, explicit=explicit, prefer=prefer)
    if explicit is not None:
        _warn_about_names(facts, tasks, explicit)
    counts: dict[str, int] = {}
    for task in choice.per_case.values():
        counts[task.name] = counts.get(task.name, 0) + 1
    if len(counts) > 1:
        logger.info("task %s; cases per naming: %s", choice.task.name,
                    ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    return choice


def _warn_about_names(facts: Sequence[CaseFacts], tasks: Sequence[Task], explicit: Task) -> None:
    """One warning when cases are named like another task than ``data.task`` (and not like a
    naming variant of it): an accepted, but likely unintended, setting."""
    def named_like(case_id: str) -> list[str]:
        return [t.name for t in tasks if t.case_pattern and re.search(t.case_pattern, case_id)]

    others = [(f.case_id, named) for f in facts for named in [named_like(f.case_id)]
              if named and not any(n == explicit.name or builtin_tasks().get(n, explicit).compatible_with(explicit)
                                   for n in named)]
    if others:
        case_id, named = others[0]
        logger.warning("data.task is %s but %d case(s) are named like another task (%s: %s)", explicit.name,
                       len(others), case_id, ", ".join(named))


def file_label_values(files: dict[str, Path], cache_dir: str | Path | None = None, workers: int = 1
                      ) -> dict[str, list[int]]:
    """``{key: sorted label values}`` of label files ``{key: path}``, through the memo in ``cache_dir``."""
    memo_path = Path(cache_dir) / LABEL_MEMO if cache_dir is not None else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except ValueError:
            memo = {}
    values, missing = {}, []
    for key, path in files.items():
        entry = memo.get(str(Path(path).resolve()))
        if entry is not None and entry["stamp"] == _stamp(path):
            values[key] = entry["values"]
        else:
            missing.append(key)
    if missing:
        paths = [files[key] for key in missing]
        if workers > 1 and len(paths) > 1:
            with ProcessPoolExecutor(min(workers, len(paths))) as pool:
                found = list(pool.map(read_label_values, paths))
        else:
            found = [read_label_values(path) for path in paths]
        for key, path, file_values in zip(missing, paths, found):
            values[key] = file_values
            memo[str(Path(path).resolve())] = {"stamp": _stamp(path), "values": file_values}
        if memo_path is not None:
            atomic_write_text(memo_path, json.dumps(memo))
    return values


def read_label_values(seg_path: str | Path) -> list[int]:
    """Sorted distinct values of a label file."""
    return label_values(read_label(load_nifti(seg_path), Path(seg_path)))


def label_values(seg: np.ndarray) -> list[int]:
    """Sorted distinct values of a uint8 label map."""
    return [int(v) for v in np.flatnonzero(np.bincount(seg.ravel(), minlength=256))]


def _stamp(path: Path) -> list[int]:
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]

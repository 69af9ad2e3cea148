"""Preprocessing cache: every labelled case is read, reoriented, cropped, z-scored and resampled
once, and stored as ``.npy``.

    index = prepare_cache(cfg.data)          # builds what is missing or stale, in parallel
    index.task                # the data's task (data.task, or detected when "auto")
    index.spacing             # the target spacing (data.spacing, or planned when "auto"; None: not resampled)
    case = index.load(index.case_ids[0])     # memory-mapped, nothing read until sliced
    case.images               # (C, x, y, z) float16/float32 on the model grid (datasets.preprocess)
    case.classes              # (x, y, z) uint8 training classes of the task (0 background, 1..K)
    case.class_locations[3]   # (N, 3) int32: up to MAX_LOCATIONS random voxel coordinates of class 3

Layout: ``<data.cache_dir>/<settings hash>/`` holds ``<id>_image.npy``, ``<id>_label.npy``,
``<id>_locs.npz`` and ``<id>.json`` per case. The hash covers everything that changes the
arrays (modalities, dtype, the task's classes, the target spacing, data root,
``PREPROCESS_VERSION``), so changed settings get a new folder. Each case's file labels are
converted with its own task (a 2021-named case in 2023 data keeps ET = 4 on disk and becomes the
same class). A case is rebuilt when its json is missing or the size/mtime of one of
its source files changed. Every file is written to a temporary name and renamed, the json last:
an interrupted build never leaves a case that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock (a shared cache then needs one builder)
    fcntl = None

from core.atomic import atomic_write
from core.config import DataConfig
from core.errors import UserError
from core.logger import Progress
from core.task import Task, builtin_tasks
from datasets.detect import file_label_values, label_values, resolve_task
from datasets.io import Case, CaseError, Geometry, check_voxel_spacing, discover_cases, load_nifti, read_case
from datasets.preprocess import preprocess_case
from datasets.spatial import canonical_orientation, canonical_values, plan_spacing

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # bump when preprocessing changes: every cache folder is rebuilt
MAX_LOCATIONS = 10_000  # stored voxel coordinates per foreground class, for foreground sampling


@dataclass
class CachedCase:
    """One preprocessed case; arrays are memory-mapped unless loaded with ``mmap=False``."""

    case_id: str
    images: np.ndarray  # (C, x, y, z) float16/float32
    classes: np.ndarray  # (x, y, z) uint8
    geometry: Geometry  # of the source files, with the crop box
    class_locations: dict[int, np.ndarray]  # class -> (N, 3) int32 voxel coordinates
    class_counts: dict[int, int]  # class -> number of voxels (every class of the task)


@dataclass
class CacheIndex:
    """The cache folder of one set of preprocessing settings, the data's task and its cases."""

    folder: Path
    task: Task
    modalities: tuple[str, ...]  # canonical names, in channel order
    case_ids: list[str]
    spacing: tuple[float, float, float] | None = None  # the target spacing (mm); None: not resampled

    def load(self, case_id: str, mmap: bool = True) -> CachedCase:
        """Open a cached case (``np.load`` with ``mmap_mode='r'`` when ``mmap``)."""
        json_path = self.folder / f"{case_id}.json"
        if not json_path.is_file():
            raise UserError(f"{json_path}: case {case_id} is not in the cache (run prepare_cache)")
        record = json.loads(json_path.read_text())
        mode = "r" if mmap else None
        with np.load(self.folder / f"{case_id}_locs.npz") as locs:
            locations = {int(k): locs[k] for k in locs.files}
        return CachedCase(
            case_id=case_id,
            images=np.load(self.folder / f"{case_id}_image.npy", mmap_mode=mode),
            classes=np.load(self.folder / f"{case_id}_label.npy", mmap_mode=mode),
            geometry=Geometry.from_json(record["geometry"]),
            class_locations=locations,
            class_counts={int(k): int(v) for k, v in record["class_counts"].items()},
        )


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def prepare_cache(data_cfg: DataConfig, cases: list[Case] | None = None,
                  show_progress: bool = True) -> CacheIndex:
    """Build (or reuse) the cache of the labelled cases under ``data_cfg.root`` (or ``cases``).

    Cases without a label file are skipped (logged); no labelled case is a ``UserError``. The
    task is ``data_cfg.task`` or, for "auto", detected from the case names, layout and label
    values (``datasets.detect``); data that fits no task or mixes tasks is a ``UserError``.
    """
    extra = [] if data_cfg.task == "auto" or data_cfg.task in builtin_tasks() else [_task_label_file(data_cfg.task)]
    cases = discover_cases(data_cfg.root, extra) if cases is None else list(cases)
    labelled = _labelled_cases(cases, data_cfg.root)
    cache_dir = Path(data_cfg.cache_dir)
    values = file_label_values({c.case_id: c.seg for c in labelled}, cache_dir, data_cfg.cache_workers)
    choice = resolve_task(data_cfg.task, labelled, values=values)
    task = choice.task
    modalities = task.select_modalities(data_cfg.modalities)
    spacing = target_spacing(data_cfg.spacing, labelled, choice.per_case)
    settings = {"modalities": list(modalities), "cache_dtype": data_cfg.cache_dtype, "task": task.name,
                "classes": repr(task.signature()), "spacing": list(spacing) if spacing else None,
                "root": str(Path(data_cfg.root).resolve()), "version": PREPROCESS_VERSION}
    folder = cache_dir / settings_hash(settings)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings.json").is_file():
        _write_json(folder / "settings.json", settings)  # for people browsing the cache

    stale = [case for case in labelled if not _is_current(folder, case, modalities, choice.per_case[case.case_id])]
    if stale:
        start = time.perf_counter()
        jobs = [(case, modalities, choice.per_case[case.case_id], folder, data_cfg.cache_dtype, spacing)
                for case in stale]
        _run_jobs(build_case, jobs, data_cfg.cache_workers, show_progress, "cache")
        logger.info("cache %s: built %d case(s) in %.1f s, reused %d", folder, len(stale),
                    time.perf_counter() - start, len(labelled) - len(stale))
    else:
        logger.info("cache %s: reused all %d cases", folder, len(labelled))
    return CacheIndex(folder=folder, task=task, modalities=modalities, case_ids=[case.case_id for case in labelled],
                      spacing=spacing)


def target_spacing(setting, cases: list[Case], tasks: dict[str, Task]) -> tuple[float, float, float] | None:
    """``data.spacing`` resolved: ``None`` (null: no resampling), the given ``[x, y, z]`` mm, or for
    "auto" ``datasets.spatial.plan_spacing`` of the cases' spacings (canonical axes, read from the
    headers only; the setting's range was validated with the config)."""
    if setting is None:
        return None
    if setting != "auto":
        return tuple(float(v) for v in setting)
    spacings = []
    for case in cases:
        path, _ = case.image_sources(tasks[case.case_id].modalities[:1], tasks[case.case_id])[0]
        affine = load_nifti(path, channels=case.layout == "msd").affine
        spacings.append(canonical_values(check_voxel_spacing(affine, path), canonical_orientation(affine)))
    return plan_spacing(spacings)


def _task_label_file(spec: str) -> str:
    from core.task import load_task
    return load_task(spec).label_file


def settings_hash(settings: dict) -> str:
    """Short stable hash of the preprocessing settings (the cache sub-folder name)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def source_fingerprint(case: Case, modalities, task: Task) -> list[list]:
    """``[[file name, size, mtime_ns], ...]`` of the files the case is read from (images, labels)."""
    fingerprint = []
    for path in case.source_files(modalities, task):
        stat = Path(path).stat()
        fingerprint.append([Path(path).name, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def build_case(case: Case, modalities, task: Task, folder: Path, cache_dtype: str,
               spacing: tuple[float, float, float] | None = None, rebuild: bool = False) -> str:
    """Read, preprocess (resampled to ``spacing``) and store one case (labels of ``task``) in
    ``folder``; returns its id. Under a per-case lock: a case that another process has built in
    the meantime is kept (unless ``rebuild``).

    Label values outside the task are a ``CaseError`` naming the label file.
    """
    with case_lock(folder, case.case_id):  # another process (another node on a shared cache) may be on it
        if rebuild or not _is_current(folder, case, modalities, task):
            _build_case(case, modalities, task, folder, cache_dtype, spacing)
    return case.case_id


@contextlib.contextmanager
def case_lock(folder: Path, case_id: str):
    """An exclusive lock on ``folder/.<case_id>.lock`` (POSIX ``flock``; none elsewhere): processes
    building one shared cache at the same time build each case once."""
    with open(folder / f".{case_id}.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _build_case(case: Case, modalities, task: Task, folder: Path, cache_dtype: str,
                spacing: tuple[float, float, float] | None) -> None:
    json_path = folder / f"{case.case_id}.json"
    json_path.unlink(missing_ok=True)  # the case is incomplete until the new json is written
    fingerprint = source_fingerprint(case, modalities, task)
    images, seg, geometry = read_case(case, task, modalities)
    values = label_values(seg)
    unexpected = task.unexpected_values(values)
    if unexpected:
        raise CaseError(f"{case.seg}: label values {values} of case {case.case_id} are not labels of task "
                        f"{task.name} ({task.describe_labels()}); see data.task")
    images, classes, geometry = preprocess_case(images, seg, geometry, task, spacing)
    counts = np.bincount(classes.ravel(), minlength=task.num_classes)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    locations = {str(c): _sample_locations(classes, c, rng) for c in task.foreground_classes}

    atomic_write(folder / f"{case.case_id}_image.npy", lambda f: np.save(f, images.astype(cache_dtype)))
    atomic_write(folder / f"{case.case_id}_label.npy", lambda f: np.save(f, classes))
    atomic_write(folder / f"{case.case_id}_locs.npz", lambda f: np.savez(f, **locations))
    _write_json(json_path, {
        "case_id": case.case_id,
        "geometry": geometry.to_json(),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "label_values": values,
        "modalities": list(modalities),
        "fingerprint": fingerprint,
    })


def _sample_locations(classes: np.ndarray, cls: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``MAX_LOCATIONS`` random coordinates ``(N, 3) int32`` of voxels of class ``cls``."""
    flat = np.flatnonzero(classes.ravel() == cls)
    if len(flat) > MAX_LOCATIONS:
        flat = np.sort(rng.choice(flat, MAX_LOCATIONS, replace=False))
    return np.stack(np.unravel_index(flat, classes.shape), axis=1).astype(np.int32).reshape(-1, 3)


def _is_current(folder: Path, case: Case, modalities, task: Task) -> bool:
    """True if the case's cached files exist and were built from the current source files."""
    json_path = folder / f"{case.case_id}.json"
    if not json_path.is_file():
        return False
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    files = [folder / f"{case.case_id}{suffix}" for suffix in ("_image.npy", "_label.npy", "_locs.npz")]
    return (record.get("fingerprint") == source_fingerprint(case, modalities, task)
            and all(path.is_file() for path in files))


def _labelled_cases(cases: list[Case], root) -> list[Case]:
    labelled = [case for case in cases if case.seg is not None]
    skipped = [case.case_id for case in cases if case.seg is None]
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.info("skipping %d case(s) without a seg file for training: %s", len(skipped), shown)
    if not labelled:
        raise UserError(f"{root}: no case has a seg file; training needs labelled cases")
    return labelled


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _run_jobs(func, jobs: list[tuple], workers: int, show_progress: bool, desc: str, stream=None) -> list:
    """``[func(*job) for job in jobs]``, in ``workers`` processes when more than one; the
    first error is raised after the other jobs are cancelled.

    With ``show_progress``, progress goes to ``stream`` (default stderr): a bar on a terminal;
    otherwise (a log file) plain lines without carriage returns: ``desc: N case(s) to do`` and
    ``desc [i/N]`` about every 10 %; in both cases ``desc: N case(s) done in S s`` at the end.
    """
    if not jobs:
        return []
    stream = stream or sys.stderr
    start = time.perf_counter()
    bar = Progress(len(jobs), desc, enabled=show_progress, stream=stream)
    plain = show_progress and bar.bar is None
    if plain:
        stream.write(f"{desc}: {len(jobs)} case(s) to do\n")
        stream.flush()
    results = [None] * len(jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = func(*job)
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                futures = {pool.submit(func, *job): i for i, job in enumerate(jobs)}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    if show_progress:
        stream.write(f"{desc}: {len(jobs)} case(s) done in {time.perf_counter() - start:.1f} s\n")
        stream.flush()
    return results


def _write_json(path: Path, record: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))

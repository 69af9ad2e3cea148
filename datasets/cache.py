"""Preprocessing cache: every labelled case is read, cropped and z-scored once, stored as ``.npy``.

    index = prepare_cache(cfg.data)          # builds what is missing or stale, in parallel
    case = index.load(index.case_ids[0])     # memory-mapped, nothing read until sliced
    case.images               # (C, x, y, z) float16/float32, cropped to the brain, z-scored
    case.classes              # (x, y, z) uint8 training classes (0 bg, 1 NCR, 2 ED, 3 ET)
    case.class_locations[3]   # (N, 3) int32: up to MAX_LOCATIONS random ET voxel coordinates

Layout: ``<data.cache_dir>/<settings hash>/`` holds ``<id>_image.npy``, ``<id>_label.npy``,
``<id>_locs.npz`` and ``<id>.json`` per case. The hash covers everything that changes the
arrays (modalities, dtype, label convention, data root, ``PREPROCESS_VERSION``), so changed
settings get a new folder. A case is rebuilt when its json is missing or the size/mtime of one of
its source files changed. Every file is written to a temporary name and renamed, the json last:
an interrupted build never leaves a case that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.config import DataConfig
from engine.errors import UserError
from datasets.io import Case, CaseError, Geometry, canonical_modality, discover_cases, load_nifti, read_case, read_label
from datasets.labels import LABEL_VALUES, detect_convention
from datasets.preprocess import preprocess_case

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when preprocessing changes: every cache folder is rebuilt
MAX_LOCATIONS = 10_000  # stored voxel coordinates per tumour class, for foreground sampling
TUMOUR_CLASSES = (1, 2, 3)  # NCR, ED, ET
LABEL_MEMO = "label_values.json"  # in data.cache_dir: label values per seg file, for "auto"


@dataclass
class CachedCase:
    """One preprocessed case; arrays are memory-mapped unless loaded with ``mmap=False``."""

    case_id: str
    images: np.ndarray  # (C, x, y, z) float16/float32
    classes: np.ndarray  # (x, y, z) uint8
    geometry: Geometry  # of the source files, with the crop box
    class_locations: dict[int, np.ndarray]  # class -> (N, 3) int32 voxel coordinates
    class_counts: dict[int, int]  # class -> number of voxels (all classes 0..3)


@dataclass
class CacheIndex:
    """The cache folder of one set of preprocessing settings and the cases it holds."""

    folder: Path
    convention: str
    case_ids: list[str]

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

    Cases without a seg file are skipped (logged); no labelled case is a ``UserError``. The
    label convention is ``data_cfg.label_convention`` or, for "auto", detected from the label
    values of every case (mixed or unexpected values are a ``UserError`` naming the case).
    """
    if data_cfg.cache_workers < 0:
        raise UserError(f"data.cache_workers must be >= 0, got {data_cfg.cache_workers}")
    cases = discover_cases(data_cfg.root) if cases is None else list(cases)
    labelled = _labelled_cases(cases, data_cfg.root)
    modalities = [canonical_modality(m) for m in data_cfg.modalities]
    cache_dir = Path(data_cfg.cache_dir)
    convention = resolve_convention(labelled, data_cfg.label_convention, cache_dir, data_cfg.cache_workers)
    settings = {"modalities": modalities, "cache_dtype": data_cfg.cache_dtype, "convention": convention,
                "root": str(Path(data_cfg.root).resolve()), "version": PREPROCESS_VERSION}
    folder = cache_dir / settings_hash(settings)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings.json").is_file():
        _write_json(folder / "settings.json", settings)  # for people browsing the cache

    stale = [case for case in labelled if not _is_current(folder, case, modalities)]
    if stale:
        start = time.perf_counter()
        jobs = [(case, modalities, convention, folder, data_cfg.cache_dtype) for case in stale]
        _run_jobs(build_case, jobs, data_cfg.cache_workers, show_progress, "cache")
        logger.info("cache %s: built %d case(s) in %.1f s, reused %d", folder, len(stale),
                    time.perf_counter() - start, len(labelled) - len(stale))
    else:
        logger.info("cache %s: reused all %d cases", folder, len(labelled))
    return CacheIndex(folder=folder, convention=convention, case_ids=[case.case_id for case in labelled])


def settings_hash(settings: dict) -> str:
    """Short stable hash of the preprocessing settings (the cache sub-folder name)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def source_fingerprint(case: Case, modalities: list[str]) -> list[list]:
    """``[[file name, size, mtime_ns], ...]`` of the case's images (in order) and seg file."""
    paths = case.image_paths(modalities) + ([case.seg] if case.seg is not None else [])
    fingerprint = []
    for path in paths:
        stat = Path(path).stat()
        fingerprint.append([Path(path).name, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def build_case(case: Case, modalities: list[str], convention: str, folder: Path, cache_dtype: str) -> str:
    """Read, preprocess and store one case in ``folder``; returns its id.

    Label values outside ``convention`` are a ``CaseError`` naming the seg file.
    """
    json_path = folder / f"{case.case_id}.json"
    json_path.unlink(missing_ok=True)  # the case is incomplete until the new json is written
    fingerprint = source_fingerprint(case, modalities)
    images, seg, geometry = read_case(case, modalities)
    values = _label_values(seg)
    unexpected = sorted(set(values) - set(LABEL_VALUES[convention]))
    if unexpected:
        raise CaseError(f"{case.seg}: label values {values} of case {case.case_id} do not fit the "
                        f"{convention} convention {list(LABEL_VALUES[convention])} (see data.label_convention)")
    images, classes, geometry = preprocess_case(images, seg, geometry, convention)
    counts = np.bincount(classes.ravel(), minlength=len(TUMOUR_CLASSES) + 1)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    locations = {str(c): _sample_locations(classes, c, rng) for c in TUMOUR_CLASSES}

    _save_atomic(folder / f"{case.case_id}_image.npy", lambda f: np.save(f, images.astype(cache_dtype)))
    _save_atomic(folder / f"{case.case_id}_label.npy", lambda f: np.save(f, classes))
    _save_atomic(folder / f"{case.case_id}_locs.npz", lambda f: np.savez(f, **locations))
    _write_json(json_path, {
        "case_id": case.case_id,
        "geometry": geometry.to_json(),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "label_values": values,
        "modalities": modalities,
        "fingerprint": fingerprint,
    })
    return case.case_id


def _sample_locations(classes: np.ndarray, cls: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``MAX_LOCATIONS`` random coordinates ``(N, 3) int32`` of voxels of class ``cls``."""
    flat = np.flatnonzero(classes.ravel() == cls)
    if len(flat) > MAX_LOCATIONS:
        flat = np.sort(rng.choice(flat, MAX_LOCATIONS, replace=False))
    return np.stack(np.unravel_index(flat, classes.shape), axis=1).astype(np.int32).reshape(-1, 3)


def _is_current(folder: Path, case: Case, modalities: list[str]) -> bool:
    """True if the case's cached files exist and were built from the current source files."""
    json_path = folder / f"{case.case_id}.json"
    if not json_path.is_file():
        return False
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    files = [folder / f"{case.case_id}{suffix}" for suffix in ("_image.npy", "_label.npy", "_locs.npz")]
    return (record.get("fingerprint") == source_fingerprint(case, modalities)
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
# Label convention
# ----------------------------------------------------------------------------------------------
def resolve_convention(cases: list[Case], setting: str, cache_dir: Path, workers: int = 1) -> str:
    """The label convention of ``cases``: ``setting`` unless it is "auto", else detected.

    Detection reads the label values of every seg file (remembered in ``cache_dir/LABEL_MEMO``
    by file size and mtime, so a restart reads only new or changed files). Mixed conventions and
    unexpected values are a ``UserError`` naming the case; no ET anywhere falls back to "2021"
    with a warning.
    """
    if setting != "auto":
        return setting
    values = _case_label_values(cases, cache_dir, workers)
    found: dict[str, Case] = {}
    for case in cases:
        try:
            convention = detect_convention(values[case.case_id])
        except ValueError:
            raise UserError(f"{case.seg}: unexpected label values {values[case.case_id]} in case {case.case_id} "
                            f"(expected {list(LABEL_VALUES['2021'])} or {list(LABEL_VALUES['2023'])})") from None
        if convention is not None:
            found.setdefault(convention, case)
    if len(found) > 1:
        (a, case_a), (b, case_b) = sorted(found.items())
        raise UserError(f"{case_b.seg}: case {case_b.case_id} has label values {values[case_b.case_id]} "
                        f"({b} convention) but case {case_a.case_id} has {values[case_a.case_id]} ({a}); "
                        "a dataset must use one convention (or set data.label_convention)")
    if not found:
        logger.warning("no case contains an ET label (3 or 4): assuming the 2021 convention; "
                       "set data.label_convention if this is wrong")
        return "2021"
    return next(iter(found))


def _case_label_values(cases: list[Case], cache_dir: Path, workers: int) -> dict[str, list[int]]:
    """Sorted label values of every case, read through the memo in ``cache_dir``."""
    memo_path = cache_dir / LABEL_MEMO
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    except ValueError:
        memo = {}
    values, missing = {}, []
    for case in cases:
        key, stamp = str(case.seg.resolve()), _stamp(case.seg)
        entry = memo.get(key)
        if entry is not None and entry["stamp"] == stamp:
            values[case.case_id] = entry["values"]
        else:
            missing.append(case)
    if missing:
        read = _run_jobs(read_label_values, [(case.seg,) for case in missing], workers, False, "labels")
        for case, found in zip(missing, read):
            values[case.case_id] = found
            memo[str(case.seg.resolve())] = {"stamp": _stamp(case.seg), "values": found}
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_json(memo_path, memo)
    return values


def read_label_values(seg_path: Path) -> list[int]:
    """Sorted distinct values of a label file."""
    return _label_values(read_label(load_nifti(seg_path), Path(seg_path)))


def _label_values(seg: np.ndarray) -> list[int]:
    return [int(v) for v in np.flatnonzero(np.bincount(seg.ravel(), minlength=256))]


def _stamp(path: Path) -> list[int]:
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _run_jobs(func, jobs: list[tuple], workers: int, show_progress: bool, desc: str) -> list:
    """``[func(*job) for job in jobs]``, in ``workers`` processes when more than one; the
    first error is raised after the other jobs are cancelled."""
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not show_progress)
    results = [None] * len(jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = func(*job)
                bar.update()
            return results
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            futures = {pool.submit(func, *job): i for i, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results
    finally:
        bar.close()


def _save_atomic(path: Path, write) -> None:
    """``write(file)`` to a temporary file next to ``path``, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, record: dict) -> None:
    _save_atomic(path, lambda f: f.write(json.dumps(record, indent=1).encode()))

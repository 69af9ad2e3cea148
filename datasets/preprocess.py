"""Preprocessing shared by the training cache and inference: crop to the brain, z-score inside it.

    images, classes, geometry = preprocess_case(images, seg, geometry, task)
    # images (C, x, y, z) float32, z-scored inside the brain, background exactly 0
    # classes (x, y, z) uint8 training classes of the task (0 background, 1..K) or None
    # geometry: a copy of the input's with the crop box and the task recorded
"""
from __future__ import annotations

import dataclasses

import numpy as np

from datasets.io import Geometry
from engine.task import Task


def brain_mask(images: np.ndarray) -> np.ndarray:
    """Brain = voxels nonzero in any modality. ``(C, X, Y, Z)`` -> ``(X, Y, Z)`` bool."""
    return (images != 0).any(axis=0)


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``((x0, x1), (y0, y1), (z0, z1))`` half-open box of ``mask``; the full volume if empty."""
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop(array: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``box``."""
    (x0, x1), (y0, y1), (z0, z1) = box
    return array[..., x0:x1, y0:y1, z0:z1]


def zscore_in_mask(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per modality ``(x - mean) / std`` over ``mask`` voxels; voxels outside ``mask`` are 0.

    ``images (C, X, Y, Z)``, ``mask (X, Y, Z)``; a constant modality gets std 1 (no blow-up).
    """
    out = np.zeros_like(images, dtype=np.float32)
    if not mask.any():
        return out
    for c in range(images.shape[0]):
        values = images[c][mask].astype(np.float64)
        mean, std = values.mean(), values.std()
        out[c][mask] = ((values - mean) / (std if std > 1e-8 else 1.0)).astype(np.float32)
    return out


def preprocess_case(images: np.ndarray, seg: np.ndarray | None, geometry: Geometry,
                    task: Task) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Crop to the brain box, z-score each modality inside the brain, file labels -> classes.

    ``seg`` holds file labels of ``task`` (``ValueError`` for other values). Returns a new
    geometry (the input's is not changed) carrying the crop box and the task's name, for
    writing predictions back.
    """
    mask = brain_mask(images)
    box = bounding_box(mask)
    cropped = zscore_in_mask(crop(images, box), crop(mask, box))
    classes = None
    if seg is not None:
        classes = np.ascontiguousarray(task.labels_to_classes(crop(seg, box)))
    return np.ascontiguousarray(cropped), classes, dataclasses.replace(geometry, crop_box=box, task=task.name)

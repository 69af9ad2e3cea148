"""Preprocessing shared by the training cache and inference: one orientation, the foreground crop,
z-scoring, and the target spacing.

    images, classes, geometry = preprocess_case(images, seg, geometry, task, target_spacing)
    # images (C, x, y, z) float32 on the model grid: canonical axes, cropped to the foreground,
    #   z-scored inside it (outside exactly 0), resampled to target_spacing (None: not resampled)
    # classes (x, y, z) uint8 training classes of the task (0 background, 1..K) or None
    # geometry: a copy of the input's recording the orientation, crop box and resampling
    probs = restore_probabilities(probs_on_model_grid, geometry)   # back to the crop's own grid

The order is nnU-Net's: reorient (exact), crop to the foreground (``datasets.spatial.foreground_mask``:
the nonzero voxels of skull-stripped data, else the head), z-score each modality inside it, then
resample images (``"image"`` interpolation) and classes (one-hot linear + argmax).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from core.boxes import bounding_box, crop
from core.task import Task
from datasets.io import CaseError, Geometry
from datasets.spatial import (
    canonical_orientation,
    canonical_values,
    check_resampled_size,
    foreground_mask,
    resample,
    resample_classes,
    resampled_shape,
    to_canonical,
)


def brain_mask(images: np.ndarray) -> np.ndarray:
    """Brain = voxels nonzero in any modality. ``(C, X, Y, Z)`` -> ``(X, Y, Z)`` bool."""
    return (images != 0).any(axis=0)


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


def preprocess_case(images: np.ndarray, seg: np.ndarray | None, geometry: Geometry, task: Task,
                    target_spacing: Sequence[float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Reorient, crop to the foreground, z-score each modality inside it, file labels -> classes,
    and resample to ``target_spacing`` (mm, canonical axes; ``None`` or the case's own spacing:
    nothing is resampled).

    ``seg`` holds file labels of ``task`` (``ValueError`` for other values). Returns a new geometry
    (the input's is not changed) recording every step, for writing predictions back.
    ``CaseError`` when the resampled crop would be too large (``datasets.spatial.MAX_VOXELS``).
    """
    orientation = canonical_orientation(geometry.affine)
    images = to_canonical(images, orientation)
    mask = foreground_mask(images)
    box = bounding_box(mask)
    cropped = zscore_in_mask(crop(images, box), crop(mask, box))
    classes = None
    if seg is not None:
        classes = task.labels_to_classes(crop(to_canonical(seg, orientation), box))
    spacing = canonical_values(geometry.spacing, orientation)
    shape = resampled_shape(cropped.shape[1:], spacing, target_spacing)
    resampled = shape != tuple(cropped.shape[1:])
    if resampled:
        try:
            check_resampled_size(shape, geometry.source or "case")
        except ValueError as err:
            raise CaseError(str(err)) from None
        cropped = resample(cropped, shape, "image", spacing)
        if classes is not None:
            classes = resample_classes(classes, shape, task.num_classes)
    geometry = dataclasses.replace(
        geometry, orientation=orientation, crop_box=box, task=task.name,
        target_spacing=tuple(float(t) for t in target_spacing) if resampled else None,
        resampled_shape=shape if resampled else None)
    return (np.ascontiguousarray(cropped), None if classes is None else np.ascontiguousarray(classes), geometry)


def restore_probabilities(probs: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Probabilities ``(K, *geometry.model_shape)`` -> ``(K, *geometry.cropped_shape)``: resampled
    linearly back to the crop's own grid (before labels are decided), on their device."""
    if geometry.resampled_shape is None:
        return probs
    return resample(probs, geometry.cropped_shape, "linear").clamp_(0.0, 1.0)

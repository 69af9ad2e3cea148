"""The voxel grid a network sees: one orientation, one spacing, the head or brain found in any image.

Every case is brought to the same axis order and direction (``CANONICAL``: the BraTS files' own
L-P-S voxel order, so classic data is never touched) by axis permutations and flips only, then
cropped to its foreground, z-scored, and resampled to the target spacing. Each step is undone for
the outputs::

    orientation = canonical_orientation(affine)          # None when the data already is L-P-S
    canonical = to_canonical(images, orientation)         # (C, X, Y, Z) views, no interpolation
    shape = resampled_shape(crop.shape[1:], spacing, target)
    model_input = resample(crop, shape, "image", spacing)           # torch; CPU or GPU
    probs = resample(probs_on_model_grid, crop.shape[1:], "linear")  # back, before labels are decided
    original = from_canonical(canonical, orientation)     # exact inverse

Interpolation (torch's ``interpolate``): images trilinear, or, across a thick-slice axis (spacing
ratio > ``ANISOTROPY``), bicubic within each slice and linear across slices, resampled separately
as nnU-Net does; probabilities linear; labels as one-hot maps resampled linearly, then argmax (so
a label is never created between two others).
"""
from __future__ import annotations

import math
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

CANONICAL = ("L", "P", "S")  # nibabel axis codes of the canonical voxel order (the BraTS files')
ANISOTROPY = 3.0  # spacing ratio above which an axis counts as thick-slice (nnU-Net's threshold)
SPACING_RTOL = 1e-3  # spacings this close (relative) are equal: nothing is resampled
MAX_VOXELS = 2**28  # a case resampled to more voxels than this (268 M, ~1 GB per float32 channel) is refused
ZERO_BACKGROUND = 0.1  # at least this fraction of exactly-zero voxels: a skull-stripped (or zero-padded) image

Orientation = tuple[tuple[int, bool], ...]  # per canonical axis: (original axis, reversed)


# ----------------------------------------------------------------------------------------------
# Orientation: permutations and flips only
# ----------------------------------------------------------------------------------------------
def canonical_orientation(affine: np.ndarray) -> Orientation | None:
    """How to bring voxel arrays with ``affine`` to the canonical L-P-S order: for each canonical
    axis, the original axis it comes from and whether it is reversed (the closest axes for an
    oblique affine). ``None`` when nothing changes."""
    ornt = nib.orientations.io_orientation(affine)  # per voxel axis: (world axis, +1/-1 in RAS)
    target = nib.orientations.axcodes2ornt(CANONICAL)
    out = []
    for world_axis, direction in target:
        axis = int(np.flatnonzero(ornt[:, 0] == world_axis)[0])
        out.append((axis, bool(ornt[axis, 1] != direction)))
    orientation = tuple(out)
    return None if orientation == ((0, False), (1, False), (2, False)) else orientation


def to_canonical(array, orientation: Orientation | None):
    """The last three axes of ``array`` (numpy or torch) in canonical order (a view when possible)."""
    if orientation is None:
        return array
    lead = array.ndim - 3
    perm = list(range(lead)) + [lead + axis for axis, _ in orientation]
    out = array.permute(perm) if isinstance(array, torch.Tensor) else array.transpose(perm)
    flips = [lead + i for i, (_, flip) in enumerate(orientation) if flip]
    if flips:
        out = out.flip(flips) if isinstance(out, torch.Tensor) else np.flip(out, flips)
    return out


def from_canonical(array, orientation: Orientation | None):
    """Exact inverse of ``to_canonical``: canonical last three axes -> the original order."""
    if orientation is None:
        return array
    lead = array.ndim - 3
    flips = [lead + i for i, (_, flip) in enumerate(orientation) if flip]
    if flips:
        array = array.flip(flips) if isinstance(array, torch.Tensor) else np.flip(array, flips)
    inverse = [0, 0, 0]
    for i, (axis, _) in enumerate(orientation):
        inverse[axis] = i
    perm = list(range(lead)) + [lead + i for i in inverse]
    return array.permute(perm) if isinstance(array, torch.Tensor) else array.transpose(perm)


def canonical_affine(spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-world (RAS+ mm) matrix of a canonical (L-P-S) grid of ``spacing`` mm, without
    translation: what pictures of the model grid need to know about its orientation."""
    affine = np.eye(4)
    for axis, (world, direction) in enumerate(nib.orientations.axcodes2ornt(CANONICAL)):
        affine[:3, axis] = 0.0
        affine[int(world), axis] = direction * float(spacing[axis])
    return affine


def canonical_values(values: Sequence, orientation: Orientation | None) -> tuple:
    """Per-axis values (shape, spacing) of the original axes, in canonical axis order."""
    values = tuple(values)
    return values if orientation is None else tuple(values[axis] for axis, _ in orientation)


# ----------------------------------------------------------------------------------------------
# Foreground: the brain of skull-stripped data, the head of other data
# ----------------------------------------------------------------------------------------------
def foreground_mask(images: np.ndarray) -> np.ndarray:
    """The region to crop to and normalize in: ``(C, X, Y, Z)`` -> ``(X, Y, Z)`` bool.

    Skull-stripped BraTS data has an exactly-zero background: then (at least ``ZERO_BACKGROUND``
    of the voxels exactly 0) the foreground is the voxels nonzero in any modality. Otherwise (a
    head with skull and scanner noise, e.g. defaced PED / MEN-RT data) it is the head: voxels of
    the channel-mean image (each channel scaled by its 99th percentile) above Otsu's threshold,
    the largest connected component with its holes filled.
    """
    nonzero = (images != 0).any(axis=0)
    if 1.0 - nonzero.mean() >= ZERO_BACKGROUND:
        return nonzero
    scaled = [c / max(float(np.percentile(c, 99)), 1e-6) for c in images.astype(np.float32)]
    log_mean = np.log(np.maximum(np.mean(scaled, axis=0), 1e-6))  # noise vs tissue, whatever the tissue contrasts
    head = log_mean > otsu_threshold(log_mean)
    labels, count = ndimage.label(head)
    if count == 0:
        return nonzero
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(labels == largest)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the split of their histogram with the largest between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[between >= between.max() * (1 - 1e-9)].mean())  # the middle of a flat maximum (a gap)


# ----------------------------------------------------------------------------------------------
# Spacing
# ----------------------------------------------------------------------------------------------
def plan_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """``data.spacing: auto`` (nnU-Net's rule): the median spacing of the training cases per axis;
    when the coarsest axis is more than ``ANISOTROPY`` times the finest of the others, that axis
    takes its 10th percentile instead (not below the other axes' spacing), so thick-slice cases are
    not all blurred to the thickest slices. ``spacings``: ``(N, 3)`` mm, canonical axes."""
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [target[i] for i in range(3) if i != worst]
    if target[worst] > ANISOTROPY * max(others):
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), max(others))
    return tuple(round(float(s), 6) for s in target)


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= SPACING_RTOL * y for x, y in zip(a, b))


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """The shape of a ``shape`` grid of ``spacing`` mm resampled to ``target`` mm (the same
    physical extent, rounded; at least 1); ``shape`` itself when nothing is resampled."""
    if target is None or same_spacing(spacing, target):
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def is_anisotropic(spacing: Sequence[float]) -> bool:
    return max(spacing) > ANISOTROPY * min(spacing)


def resample(array: np.ndarray | torch.Tensor, shape: Sequence[int], kind: str,
             spacing: Sequence[float] | None = None) -> np.ndarray | torch.Tensor:
    """``array (C, X, Y, Z)`` (float) resampled to ``(C, *shape)`` on its device, same physical extent.

    ``kind``: ``"linear"`` (trilinear; probabilities) or ``"image"``: trilinear, except when the
    source or the target grid has a thick-slice axis (from ``spacing``, the source spacing, and the
    ratio of the shapes): then bicubic within each slice and linear across the slices, separately.
    numpy in, numpy out (float32).
    """
    if kind not in ("linear", "image"):
        raise ValueError(f"kind must be 'linear' or 'image', got {kind!r}")
    shape = tuple(int(s) for s in shape)
    is_numpy = isinstance(array, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) if is_numpy else array.float()
    if tuple(x.shape[1:]) == shape:
        out = x
    else:
        thick = _thick_axis(x.shape[1:], shape, spacing) if kind == "image" else None
        out = _separate(x, shape, thick) if thick is not None else \
            F.interpolate(x[None], size=shape, mode="trilinear", align_corners=False)[0]
    return out.numpy() if is_numpy else out


def _thick_axis(source: Sequence[int], shape: Sequence[int], spacing: Sequence[float] | None) -> int | None:
    """The thick-slice axis of the source or the target grid, or ``None``."""
    if spacing is None:
        return None
    target = [s * n / m for s, n, m in zip(spacing, source, shape)]
    for grid in (spacing, target):
        if is_anisotropic(grid):
            return int(np.argmax(grid))
    return None


def _separate(x: torch.Tensor, shape: tuple[int, ...], thick: int) -> torch.Tensor:
    """Bicubic in the slices (the two fine axes), then linear along the ``thick`` axis."""
    c = x.shape[0]
    moved = x.movedim(thick + 1, 1)  # (C, T, A, B): slices along T
    t, a, b = moved.shape[1:]
    fine = [shape[i] for i in range(3) if i != thick]
    slices = moved.reshape(c * t, 1, a, b)
    slices = F.interpolate(slices, size=fine, mode="bicubic", align_corners=False).reshape(c, t, *fine)
    along = slices.permute(0, 2, 3, 1).reshape(c, fine[0] * fine[1], t)  # (C, A'B', T)
    along = F.interpolate(along, size=shape[thick], mode="linear", align_corners=False)
    out = along.reshape(c, fine[0], fine[1], shape[thick]).permute(0, 3, 1, 2)  # (C, T', A', B')
    return out.movedim(1, thick + 1).contiguous()


def resample_classes(classes: np.ndarray, shape: Sequence[int], num_classes: int) -> np.ndarray:
    """Class map ``(X, Y, Z)`` uint8 -> ``shape``: each class's one-hot map resampled linearly, then
    the most likely class per voxel (ties to the lower class); the set of classes is kept except
    for structures thinner than a voxel of the new grid."""
    shape = tuple(int(s) for s in shape)
    if tuple(classes.shape) == shape:
        return classes
    source = torch.from_numpy(np.ascontiguousarray(classes))
    best = torch.full(shape, -1.0)
    out = torch.zeros(shape, dtype=torch.uint8)
    for cls in range(num_classes):  # one class at a time: memory of two maps, not num_classes
        onehot = (source == cls).float()[None, None]
        score = F.interpolate(onehot, size=shape, mode="trilinear", align_corners=False)[0, 0]
        higher = score > best
        out[higher] = cls
        best = torch.where(higher, score, best)
    return out.numpy()


def check_resampled_size(shape: Sequence[int], where: str) -> None:
    """``ValueError`` (naming ``where`` and the size) for a grid of more than ``MAX_VOXELS``."""
    voxels = math.prod(int(s) for s in shape)
    if voxels > MAX_VOXELS:
        raise ValueError(f"{where}: resampled to {'x'.join(map(str, shape))} = {voxels:.3g} voxels, more than "
                         f"the limit of {MAX_VOXELS:.3g}; choose a coarser data.spacing")


# ----------------------------------------------------------------------------------------------
# Network pooling for a spacing
# ----------------------------------------------------------------------------------------------
def plan_strides(spacing: Sequence[float], stages: int) -> list[list[int]]:
    """Per-stage ``[x, y, z]`` strides for ``spacing`` (nnU-Net's planning): an axis is pooled only
    while its current spacing is at most twice the finest current spacing, so a thick-slice axis
    waits until the others have caught up. ``stages`` entries, the first ``[1, 1, 1]``."""
    current = [float(s) for s in spacing]
    strides = [[1, 1, 1]]
    for _ in range(stages - 1):
        finest = min(current)
        step = [2 if s <= 2 * finest else 1 for s in current]
        current = [s * k for s, k in zip(current, step)]
        strides.append(step)
    return strides


def pooling_problem(strides: Sequence, spacing: Sequence[float]) -> str | None:
    """Why ``strides`` (ints or ``[x, y, z]``) pool a coarse axis too early for ``spacing``, or
    ``None``: at every stage a pooled axis must be at most twice as coarse as the finest axis."""
    current = [float(s) for s in spacing]
    for i, stride in enumerate(strides):
        step = list(stride) if isinstance(stride, (list, tuple)) else [int(stride)] * 3
        finest = min(current)
        for axis in range(3):
            if step[axis] > 1 and current[axis] > 2 * finest:
                return (f"stage {i} pools axis {'xyz'[axis]} at {current[axis]:g} mm while the finest axis is "
                        f"{finest:g} mm")
        current = [s * k for s, k in zip(current, step)]
    return None

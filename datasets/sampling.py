"""Where to cut a training patch, and cutting it from a memory-mapped volume.

    start = choose_patch_start(case.classes.shape, (128, 128, 128), rng, case.class_locations,
                               force_foreground=True)
    image = extract_patch(case.images, start, (128, 128, 128))   # (C, 128, 128, 128)
    label = extract_patch(case.classes, start, (128, 128, 128))  # (128, 128, 128)

Along an axis where the volume is at least as long as the patch, the patch stays inside the
volume. Where it is shorter, the start is in ``[size - patch, 0]`` (the volume lies somewhere
inside the patch) and the rest is padded.
"""
from __future__ import annotations

import numpy as np


def start_range(size: int, patch: int) -> tuple[int, int]:
    """Inclusive ``(low, high)`` range of valid patch starts along one axis."""
    return min(0, size - patch), max(0, size - patch)


def choose_patch_start(shape, patch_size, rng: np.random.Generator,
                       class_locations: dict[int, np.ndarray] | None,
                       force_foreground: bool) -> tuple[int, int, int]:
    """Start corner of a patch of ``patch_size`` in a volume of ``shape`` (both 3 ints).

    Random, or, when ``force_foreground`` and some class has stored locations, placed so that
    it contains a tumour voxel: a class is drawn uniformly among the classes present (so small
    ET regions are seen as often as large edema), then one of its stored voxel coordinates
    ``class_locations[c] (N, 3)``, then a random position of that voxel inside the patch; the
    start is clipped to the valid range, which keeps the voxel inside.
    """
    ranges = [start_range(int(s), int(p)) for s, p in zip(shape, patch_size)]
    present = [c for c, locs in sorted((class_locations or {}).items()) if len(locs)]
    if not force_foreground or not present:
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
    locs = class_locations[present[rng.integers(len(present))]]
    voxel = locs[rng.integers(len(locs))]
    offsets = rng.integers(0, np.asarray(patch_size))  # position of the voxel inside the patch
    return tuple(int(np.clip(v - o, lo, hi)) for v, o, (lo, hi) in zip(voxel, offsets, ranges))


def extract_patch(array: np.ndarray, start, patch_size, pad_value: float = 0) -> np.ndarray:
    """The patch ``[start, start + patch_size)`` of the last three axes of ``array``.

    Reads only the patch (works on memmaps in time proportional to the patch); voxels outside
    the array are ``pad_value``. Returns a new array ``(..., *patch_size)`` of ``array``'s dtype.
    """
    spatial = array.shape[-3:]
    src, dst = [], []
    for s, p, size in zip(start, patch_size, spatial):
        lo, hi = max(int(s), 0), min(int(s) + int(p), size)
        if hi <= lo:  # no overlap along this axis: the patch is all padding
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            src.append(slice(lo, hi))
            dst.append(slice(lo - int(s), hi - int(s)))
    lead = (slice(None),) * (array.ndim - 3)
    out = np.full(array.shape[:-3] + tuple(int(p) for p in patch_size), pad_value, dtype=array.dtype)
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out

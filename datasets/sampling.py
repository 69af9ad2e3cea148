"""Where to cut a training patch, and cutting it from a memory-mapped volume.

    start = choose_patch_start(case.classes.shape, (128, 128, 128), rng, case.class_locations,
                               force_foreground=True)
    image = extract_patch(case.images, start, (128, 128, 128), dtype=np.float32)  # (C, 128, 128, 128)
    label = extract_patch(case.classes, start, (128, 128, 128))                    # (128, 128, 128) uint8

Along an axis where the volume is at least as long as the patch, the patch stays inside the
volume. Where it is shorter, the start is in ``[size - patch, 0]`` (the volume lies somewhere
inside the patch) and the rest is padded.
"""
from __future__ import annotations

import numpy as np
import torch

_TORCH_FLOATS = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))  # native byte order


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


def extract_patch(array: np.ndarray, start, patch_size, pad_value: float = 0, dtype=None) -> np.ndarray:
    """The patch ``[start, start + patch_size)`` of the last three axes of ``array``, as a new
    array ``(..., *patch_size)`` of ``dtype`` (default: ``array``'s dtype).

    Reads only the part of the patch inside the array (works on memmaps in time proportional to
    the patch) and casts it while copying it into place; only the voxels outside the array are
    written with ``pad_value``. Float-to-float casts (float16 cache -> float32) go through torch,
    whose vectorised cast is several times faster than numpy's.
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
    shape = tuple(int(p) for p in patch_size)
    out = np.empty(array.shape[:-3] + shape, dtype=array.dtype if dtype is None else dtype)
    for axis, (kept, p) in enumerate(zip(dst, shape)):  # the slabs before and after the kept part
        for pad in (slice(0, kept.start), slice(kept.stop, p)):
            if pad.stop > pad.start:
                out[lead + (slice(None),) * axis + (pad,)] = pad_value
    if all(d.stop > d.start for d in dst):
        inside = array[lead + tuple(src)]
        if inside.dtype != out.dtype and inside.dtype in _TORCH_FLOATS and out.dtype in _TORCH_FLOATS:
            # read with numpy (torch does not wrap read-only memmaps), cast with torch
            torch.from_numpy(out[lead + tuple(dst)]).copy_(torch.from_numpy(np.array(inside)))
        else:
            out[lead + tuple(dst)] = inside  # numpy casts while copying
    return out

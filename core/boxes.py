"""Half-open bounding boxes over the last three axes: of a mask, grown by a margin, and crops.

    box = bounding_box(mask)            # ((x0, x1), (y0, y1), (z0, z1)); the full volume if empty
    box = expand_box(box, 2, mask.shape)
    part = crop(array, box)             # array[..., x0:x1, y0:y1, z0:z1] (a view)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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


def expand_box(box: tuple[tuple[int, int], ...], margin: int, shape: Sequence[int]
               ) -> tuple[tuple[int, int], ...]:
    """Grow a half-open box by ``margin`` voxels per side, clipped to ``shape``."""
    return tuple((max(0, a - margin), min(int(n), b + margin)) for (a, b), n in zip(box, shape))


def crop(array: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``box``."""
    (x0, x1), (y0, y1), (z0, z1) = box
    return array[..., x0:x1, y0:y1, z0:z1]

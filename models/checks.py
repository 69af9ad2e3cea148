"""Argument checks shared by the model constructors: each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_int_list(name: str, value: Any, length: int | None = None) -> list[int]:
    """A non-empty list of ints >= 1 (of ``length`` items when given), else ``ValueError``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have {length} entries (one per stage), got {len(value)}: {list(value)!r}")
    for i, item in enumerate(value):
        positive_int(f"{name}[{i}]", item)
    return list(value)


def stride_list(name: str, value: Any, length: int) -> list[tuple[int, int, int]]:
    """Per-stage strides, each an int (all axes) or ``[x, y, z]``, as ``(x, y, z)`` tuples of ints >= 1
    (``length`` entries), else ``ValueError`` naming ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must have {length} entries (one per stage), got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            if len(item) != 3:
                raise ValueError(f"{name}[{i}] must be an integer or [x, y, z], got {list(item)!r}")
            out.append(tuple(positive_int(f"{name}[{i}]", s) for s in item))
        else:
            out.append((positive_int(f"{name}[{i}]", item),) * 3)
    return out


def as_spatial_shape(value: Any) -> tuple[int, int, int]:
    """``(X, Y, Z)`` as three ints >= 1, else ``ValueError`` naming ``spatial_shape``."""
    try:
        shape = tuple(operator.index(s) for s in value)
    except TypeError:
        raise ValueError(f"spatial_shape must be three positive integers (X, Y, Z), got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"spatial_shape must be three positive integers (X, Y, Z), got {list(shape)!r}")
    return shape

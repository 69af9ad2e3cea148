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


def as_spatial_shape(value: Any) -> tuple[int, int, int]:
    """``(X, Y, Z)`` as three ints >= 1, else ``ValueError`` naming ``spatial_shape``."""
    try:
        shape = tuple(operator.index(s) for s in value)
    except TypeError:
        raise ValueError(f"spatial_shape must be three positive integers (X, Y, Z), got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"spatial_shape must be three positive integers (X, Y, Z), got {list(shape)!r}")
    return shape

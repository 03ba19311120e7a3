"""Argument checks shared by every public entry point.

Each check raises the given :class:`StoreError` subclass with a message that
names the argument (and, through ``where``, the rank, file or call at fault).
bool is refused wherever an int is meant: ``layer=True`` is a bug, not layer 1.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .errors import StoreError

__all__ = [
    "MAX_BYTES",
    "check_bool",
    "check_bytes",
    "check_device",
    "check_index",
    "check_int",
    "check_timeout",
    "is_int",
]

# 2**62: larger than any memory or file, small enough to pack as a signed 64-bit word.
MAX_BYTES = 1 << 62


def is_int(x: object) -> bool:
    """True for Python and numpy integers (and 0-d integer tensors), False for bool."""
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def check_int(
    value: object,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    where: str = "",
    error: type[StoreError] = StoreError,
) -> int:
    """``value`` as an int in ``low..high`` (inclusive; None: unbounded)."""
    if not is_int(value):
        raise error(f"{_prefix(where)}{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)  # type: ignore[arg-type]
    if (low is not None and v < low) or (high is not None and v > high):
        span = f"{'' if low is None else low}..{'' if high is None else high}"
        raise error(f"{_prefix(where)}{name} must be in {span}, got {v}")
    return v


def check_index(value: object, name: str, size: int, *, where: str = "", error: type[StoreError] = StoreError) -> int:
    """``value`` as an index into ``size`` items (0..size-1)."""
    return check_int(value, name, low=0, high=size - 1, where=where, error=error)


def check_bytes(value: object, name: str, *, where: str = "", error: type[StoreError] = StoreError) -> int:
    """A positive byte count below :data:`MAX_BYTES`."""
    return check_int(value, name, low=1, high=MAX_BYTES, where=where, error=error)


def check_bool(value: object, name: str, *, where: str = "", error: type[StoreError] = StoreError) -> bool:
    """A real bool (1, "yes" and None are refused: they hide a wrong argument)."""
    if not isinstance(value, bool):
        raise error(f"{_prefix(where)}{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_timeout(value: object, name: str = "timeout_s", *, where: str = "") -> float:
    """A finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise StoreError(f"{_prefix(where)}{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def check_device(value: Any, name: str = "device", *, where: str = "") -> torch.device:
    """A torch.device the store can hold slots on; a bare ``cuda`` means the current CUDA device."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device)):
        raise StoreError(f"{_prefix(where)}{name} must be a torch.device or a string like 'cuda:0', got {value!r}")
    try:
        d = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise StoreError(f"{_prefix(where)}{name}={value!r} is not a device: {e}") from None
    if d.type not in ("cpu", "cuda"):
        raise StoreError(f"{_prefix(where)}{name} must be a cpu or cuda device, got {d}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise StoreError(f"{_prefix(where)}{name}={value!r}: CUDA is not available on this machine")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        elif d.index >= torch.cuda.device_count():
            raise StoreError(f"{_prefix(where)}{name}={value!r}: this machine has {torch.cuda.device_count()} GPUs")
    return d

"""What one expert is made of (an ordered list of tensors), and its record layout.

The **record** (transfer slabs, checkpoint staging) holds the tensors one after another, each at
an offset aligned to ``RECORD_ALIGN``; the resident layout is in :mod:`expert_store.layout`.
Kernels and checksums see each tensor as a stream of ``word_bytes`` words.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SpecError

__all__ = ["RECORD_ALIGN", "ExpertSpec", "TensorSpec", "dtype_from_name", "dtype_name"]

# 16 bytes: the widest global load/store a GPU thread issues (ld.global.v4.b32).
RECORD_ALIGN = 16

# Every dtype an expert tensor may have, by the name used in manifests (torch's own name; the
# newer float8 and unsigned types only where this torch has them).
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e5m2 int64 int32 int16 int8 uint8 bool "
    "float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu uint16 uint32 uint64"
)
_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES.split() if hasattr(torch, n)}
_NAMES = {dt: name for name, dt in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Stable name of a torch dtype (``torch.float8_e4m3fn`` -> ``"float8_e4m3fn"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise SpecError(f"dtype {dtype!r} is not supported for expert tensors") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise SpecError(f"unknown dtype name {name!r}; known: {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an expert: ``name``, ``shape`` (positive ints), ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __init__(self, name: str, shape: Iterable[int], dtype: torch.dtype) -> None:
        if not isinstance(name, str) or not name:
            raise SpecError(f"tensor name must be a non-empty string, got {name!r}")
        try:
            shape_t = tuple(shape)
        except TypeError:
            raise SpecError(f"tensor {name!r}: shape must be a sequence of ints, got {shape!r}") from None
        if not shape_t:
            raise SpecError(f"tensor {name!r}: shape must have at least one dimension")
        if any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape_t):
            raise SpecError(f"tensor {name!r}: every dimension must be a positive int, got shape {shape_t}")
        if not isinstance(dtype, torch.dtype):
            raise SpecError(f"tensor {name!r}: dtype must be a torch.dtype, got {dtype!r}")
        dtype_name(dtype)  # raises for unsupported dtypes
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", shape_t)
        object.__setattr__(self, "dtype", dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        try:
            return cls(d["name"], d["shape"], dtype_from_name(d["dtype"]))
        except (KeyError, TypeError) as e:
            raise SpecError(f"malformed tensor spec {d!r}: {e}") from None


def _packed(sizes: Iterable[int], align: int) -> tuple[tuple[int, ...], int]:
    """(offset of each block, total) for blocks laid one after another, each start aligned to ``align``."""
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off = (off + n + align - 1) // align * align
    return tuple(offsets), off


class ExpertSpec:
    """The ordered tensors of one expert and their record layout.

    Attributes:
        tensors: the :class:`TensorSpec` list, in order.
        nbytes: sum of the tensors' own sizes (what the accounting counts).
        record_bytes: size of one packed record (each part 16-byte aligned).
        record_offsets: byte offset of each tensor inside a record.
        word_bytes: 4, 2 or 1: the widest word dividing every tensor's size.
    """

    __slots__ = ("_index", "nbytes", "record_bytes", "record_offsets", "tensors", "word_bytes")

    def __init__(self, tensors: Sequence[TensorSpec]) -> None:
        tensors = list(tensors)
        if not tensors:
            raise SpecError("an ExpertSpec needs at least one TensorSpec")
        index: dict[str, int] = {}
        for i, t in enumerate(tensors):
            if not isinstance(t, TensorSpec):
                raise SpecError(f"ExpertSpec takes TensorSpec items, got {t!r}")
            if t.name in index:
                raise SpecError(f"duplicate tensor name {t.name!r} in ExpertSpec")
            index[t.name] = i
        word = 4
        while any(t.nbytes % word for t in tensors):
            word //= 2
        self.tensors: tuple[TensorSpec, ...] = tuple(tensors)
        self.nbytes: int = sum(t.nbytes for t in tensors)
        self.record_offsets, self.record_bytes = _packed((t.nbytes for t in tensors), RECORD_ALIGN)
        self.word_bytes: int = word
        self._index = index

    # -- lookup -------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise SpecError(f"no tensor {name!r} in the spec; it has {list(self._index)}") from None

    def __getitem__(self, name: str) -> TensorSpec:
        return self.tensors[self.index(name)]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def record_views(self, buf: torch.Tensor, i: int = 0) -> dict[str, torch.Tensor]:
        """{name: view} of the tensors of record ``i`` of ``buf`` (uint8 [>= (i + 1) * record_bytes],
        contiguous), in their dtypes and shapes: destinations a checkpoint read can fill."""
        base = i * self.record_bytes
        return {
            t.name: buf[base + off : base + off + t.nbytes].view(t.dtype).view(t.shape)
            for t, off in zip(self.tensors, self.record_offsets)
        }

    # -- identity -----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertSpec) and self.tensors == other.tensors

    def __hash__(self) -> int:
        return hash(self.tensors)

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.name}{list(t.shape)}:{dtype_name(t.dtype)}" for t in self.tensors)
        return f"ExpertSpec({parts}; nbytes={self.nbytes}, record_bytes={self.record_bytes})"

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.tensors]

    @classmethod
    def from_list(cls, items: Sequence[Mapping[str, Any]]) -> ExpertSpec:
        if not isinstance(items, (list, tuple)):
            raise SpecError(f"a serialized ExpertSpec is a list of tensor dicts, got {type(items).__name__}")
        return cls([TensorSpec.from_dict(d) for d in items])

"""Resident slabs: where each (layer, slot, tensor) lives in one device allocation.

Symbols: L layers, S slots per rank, T tensors per expert (``len(spec)``).

One rank keeps all its experts in a single ``uint8`` allocation::

    storage: uint8 [L * layer_bytes]
      layer l  at  l * layer_bytes
        tensor t  at  + region_offsets[t]          (aligned to REGION_ALIGN)
          slot s  at  + s * spec.tensors[t].nbytes  (slots side by side)

so ``storage[region].view(dtype).view(S, *shape)`` is a contiguous, zero-copy
``[S, *shape]`` view per (layer, tensor) whose address never changes while the
store lives: CUDA graphs captured against it stay valid.

Or the engine keeps its own tensors (one ``[S, *shape]`` tensor per layer and
weight kind, anywhere in memory) and :class:`ResidentSlabs` adopts them. Either
way the kernels see an int64 [L, T] table of per-(layer, tensor) base addresses;
one allocation is the case of evenly spaced addresses.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .checks import check_index
from .errors import SpecError, StoreError
from .spec import ExpertSpec, _packed

__all__ = ["REGION_ALIGN", "ResidentSlabs", "SlabLayout", "as_resident", "check_weights"]

# 256 bytes: every (layer, tensor) region starts on a 256-byte boundary, which
# satisfies any dtype's view alignment and the widest (16-byte) vector access,
# and keeps regions on separate L2 sectors.
REGION_ALIGN = 256


@dataclass(frozen=True)
class SlabLayout:
    """Byte layout of one rank's resident slabs (pure arithmetic, no memory)."""

    spec: ExpertSpec
    num_layers: int
    slots: int
    region_offsets: tuple[int, ...]  # per tensor, within a layer
    layer_bytes: int

    @classmethod
    def build(cls, spec: ExpertSpec, *, num_layers: int, slots: int) -> SlabLayout:
        if not isinstance(spec, ExpertSpec):
            raise SpecError(f"spec must be an ExpertSpec, got {type(spec).__name__}")
        if num_layers <= 0 or slots <= 0:
            raise SpecError(f"need num_layers > 0 and slots > 0, got num_layers={num_layers}, slots={slots}")
        offsets, layer_bytes = _packed((slots * t.nbytes for t in spec.tensors), REGION_ALIGN)
        return cls(spec=spec, num_layers=num_layers, slots=slots, region_offsets=offsets, layer_bytes=layer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def slot_offset(self, layer: int, slot: int, tensor: int) -> int:
        """Byte offset of (layer, slot, tensor) in the storage."""
        t = self.spec.tensors[tensor]
        return layer * self.layer_bytes + self.region_offsets[tensor] + slot * t.nbytes


class ResidentSlabs:
    """One rank's resident experts: per (layer, tensor) one ``[S, *shape]`` tensor whose address
    never changes while the store lives.

    Either one allocation the slabs own (``storage``: uint8 [L * layer_bytes], laid out by
    :class:`SlabLayout`), or the engine's own tensors (``weights``: spec name -> L tensors
    ``[S, *shape]``, adopted as they are; ``storage`` is None then). Either way the kernels address
    slot s of tensor t in layer l as ``addresses[l][t] + s * nbytes_t`` through :attr:`table`.
    """

    def __init__(
        self,
        layout: SlabLayout,
        device: torch.device | str,
        *,
        fill: int | None = None,
        weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    ) -> None:
        """``fill``: byte value of a new allocation (None: uninitialized). ``weights``: tensors to
        adopt instead of allocating (checked by :func:`check_weights`); they are never copied."""
        self.layout = layout
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # as tensors report it: cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._table: torch.Tensor | None = None
        self._alignment: int | None = None
        if weights is not None:
            self.storage: torch.Tensor | None = None
            self.tensors = check_weights(weights, layout, self.device)
            return
        try:
            if fill is None:
                self.storage = torch.empty(layout.total_bytes, dtype=torch.uint8, device=self.device)
            else:
                self.storage = torch.full((layout.total_bytes,), fill, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # out of memory, bad device
            raise StoreError(
                f"cannot allocate {layout.total_bytes} bytes of resident slabs on {self.device}: {e}"
            ) from None
        self.tensors = _views(self.storage, layout)

    @classmethod
    def over(cls, storage: torch.Tensor, layout: SlabLayout, table: torch.Tensor | None = None) -> ResidentSlabs:
        """Slabs over an existing allocation ``storage`` (uint8 [layout.total_bytes], trusted), no copy.
        ``table``: its :attr:`table`, when the caller kept it. The views are made when first asked for."""
        self = cls.__new__(cls)
        self.layout, self.device, self.storage, self._table = layout, storage.device, storage, table
        self._tensors, self._alignment = None, None
        return self

    @property
    def tensors(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """[L][T]: the ``[S, *shape]`` tensor of tensor t in layer l."""
        if self._tensors is None:
            self._tensors = _views(self.storage, self.layout)
        return self._tensors

    @tensors.setter
    def tensors(self, value: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        self._tensors = value

    @property
    def spec(self) -> ExpertSpec:
        return self.layout.spec

    @property
    def addresses(self) -> list[list[int]]:
        """[L][T] byte address of slot 0 of tensor t in layer l."""
        if self.storage is not None:  # evenly spaced: no view needed
            base, lb, offs = self.storage.data_ptr(), self.layout.layer_bytes, self.layout.region_offsets
            return [[base + layer * lb + o for o in offs] for layer in range(self.layout.num_layers)]
        return [[t.data_ptr() for t in row] for row in self.tensors]

    @property
    def alignment(self) -> int:
        """Largest power of two (<= 16) dividing every address: regions of one allocation are
        REGION_ALIGN-aligned, so there it is the allocation's own."""
        if self.storage is not None:
            return _pow2(self.storage.data_ptr())
        if self._alignment is None:  # adopted tensors never move: computed once
            self._alignment = min(_pow2(a) for row in self.addresses for a in row)
        return self._alignment

    @property
    def table(self) -> torch.Tensor:
        """int64 [L, T] on the device: :attr:`addresses`, what the kernels read (built once)."""
        if self._table is None:
            self._table = torch.tensor(self.addresses, dtype=torch.int64).to(self.device)
        return self._table

    def weights(self, name: str, layer: int) -> torch.Tensor:
        """``[S, *shape]`` tensor of ``name`` in ``layer`` (zero-copy, stable address)."""
        if not isinstance(name, str):
            raise StoreError(f"tensor name must be a str, got {type(name).__name__} {name!r}")
        i = self.spec.index(name)
        layer = check_index(layer, "layer", self.layout.num_layers, where=f"weights({name!r})")
        return self.tensors[layer][i]

    def slot_tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        """{name: view of one slot} for (layer, slot): what a checkpoint read fills."""
        return {t.name: self.tensors[layer][i][slot] for i, t in enumerate(self.spec.tensors)}


def _pow2(address: int) -> int:
    """Largest power of two up to 16 dividing ``address``."""
    return min(16, address & -address) if address else 16


def _views(storage: torch.Tensor, layout: SlabLayout) -> tuple[tuple[torch.Tensor, ...], ...]:
    S = layout.slots
    rows = []
    for layer in range(layout.num_layers):
        row = []
        for i, t in enumerate(layout.spec.tensors):
            start = layout.slot_offset(layer, 0, i)
            row.append(storage[start : start + S * t.nbytes].view(t.dtype).view(S, *t.shape))
        rows.append(tuple(row))
    return tuple(rows)


def check_weights(weights: object, layout: SlabLayout, device: torch.device) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The engine's tensors as [L][T] (spec order), or a StoreError naming the tensor and layer at fault.

    ``weights``: spec name -> sequence of L tensors, each ``[S, *shape]`` of the spec's dtype,
    contiguous, on ``device``, no two sharing a byte."""
    spec, L, S = layout.spec, layout.num_layers, layout.slots
    if not isinstance(weights, Mapping):
        raise StoreError(f"weights must be a mapping of tensor name -> {L} tensors, got {type(weights).__name__}")
    missing = [n for n in spec.names if n not in weights]
    extra = [n for n in weights if n not in spec.names]
    if missing or extra:
        raise SpecError(f"weights: names differ from the spec's {list(spec.names)}: missing {missing}, extra {extra}")
    cols = []
    for t in spec.tensors:
        seq = weights[t.name]
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise SpecError(f"weights[{t.name!r}] must be a sequence of {L} tensors (one per layer), "
                            f"got {type(seq).__name__}")  # fmt: skip
        if len(seq) != L:
            raise SpecError(f"weights[{t.name!r}] must hold one tensor per layer ({L}), got {len(seq)}")
        for layer, x in enumerate(seq):
            where = f"weights[{t.name!r}] layer {layer}"
            if not isinstance(x, torch.Tensor):
                raise SpecError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
            if tuple(x.shape) != (S, *t.shape) or x.dtype != t.dtype:
                raise SpecError(
                    f"{where} must be {t.dtype} [{S}, {', '.join(map(str, t.shape))}] (S slots of the spec's "
                    f"shape), got {x.dtype} {list(x.shape)}"
                )
            if x.device != device:
                raise StoreError(f"{where} must be on {device} (the store's device), got {x.device}")
            if not x.is_contiguous():
                raise StoreError(f"{where} must be contiguous, got stride {x.stride()}")
        cols.append(tuple(seq))
    spans = sorted(
        (x.data_ptr(), x.data_ptr() + S * t.nbytes, f"weights[{t.name!r}] layer {layer}")
        for t, col in zip(spec.tensors, cols)
        for layer, x in enumerate(col)
    )
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:  # each slot is written on its own: two names for one byte would corrupt each other
            raise StoreError(f"{a} and {b} share memory; every (layer, tensor) needs its own bytes")
    return tuple(tuple(col[layer] for col in cols) for layer in range(L))


def as_resident(storage: ResidentSlabs | torch.Tensor, layout: SlabLayout) -> ResidentSlabs:
    """``storage`` as slabs: ResidentSlabs as they are, a uint8 allocation through :meth:`ResidentSlabs.over`."""
    return storage if isinstance(storage, ResidentSlabs) else ResidentSlabs.over(storage, layout)

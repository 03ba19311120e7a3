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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_index
from .errors import SpecError, StoreError
from .spec import ExpertSpec, _packed

__all__ = ["REGION_ALIGN", "ResidentSlabs", "SlabLayout"]

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
    """One rank's resident experts: one allocation, stable per-tensor views.

    ``storage`` is ``uint8 [L * layer_bytes]`` on ``device``; ``weights(name,
    layer)`` returns the ``[S, *shape]`` view of that tensor in that layer. The
    allocation is made once and never replaced, so view addresses are stable.
    """

    def __init__(self, layout: SlabLayout, device: torch.device | str, *, fill: int | None = None) -> None:
        self.layout = layout
        self.device = torch.device(device)
        try:
            if fill is None:
                self.storage = torch.empty(layout.total_bytes, dtype=torch.uint8, device=self.device)
            else:
                self.storage = torch.full((layout.total_bytes,), fill, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # out of memory, bad device
            raise StoreError(
                f"cannot allocate {layout.total_bytes} bytes of resident slabs on {self.device}: {e}"
            ) from None
        S = layout.slots
        self._views: list[list[torch.Tensor]] = [[] for _ in range(layout.num_layers)]
        for layer, row in enumerate(self._views):
            for i, t in enumerate(layout.spec.tensors):
                start = layout.slot_offset(layer, 0, i)
                row.append(self.storage[start : start + S * t.nbytes].view(t.dtype).view(S, *t.shape))

    @property
    def spec(self) -> ExpertSpec:
        return self.layout.spec

    def weights(self, name: str, layer: int) -> torch.Tensor:
        """``[S, *shape]`` view of tensor ``name`` in ``layer`` (zero-copy, stable address)."""
        if not isinstance(name, str):
            raise StoreError(f"tensor name must be a str, got {type(name).__name__} {name!r}")
        i = self.spec.index(name)
        layer = check_index(layer, "layer", self.layout.num_layers, where=f"weights({name!r})")
        return self._views[layer][i]

    def slot_tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        """{name: view of one slot} for (layer, slot): what a checkpoint read fills."""
        return {t.name: self._views[layer][i][slot] for i, t in enumerate(self.spec.tensors)}

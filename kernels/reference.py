"""Plain-torch reference of every kernel in :mod:`expert_store.kernels.records`.

The test oracle of the Triton kernels and the CPU fallback of the launchers (CPU tensors without
``TRITON_INTERPRET=1``: the gloo tests of the store). Resident experts are addressed as the kernels
address them, per (layer, tensor): ``ResidentSlabs.tensors[l][t]`` (the engine's tensors, or views
of one allocation). It loops over the layers a call names and the T tensors of the spec, never
over experts or bytes, so small CPU cases take milliseconds; it runs on CUDA tensors too. Inputs are
trusted: the launchers in ``records.py`` validate them. Symbols: L layers, S slots per rank, n
experts in one call, K records a slab can hold (``slab.numel() // record_bytes``).

Checksum of one expert (the definition the kernels implement bit for bit)::

    W = spec.word_bytes; total = 0 (uint64, wrapping)
    for tensor t, for i in range(nbytes_t // W):
        w = little-endian unsigned W-byte word i of tensor t, zero-extended
        p = spec.record_offsets[t] // W + i
        z = w + (p + 1) * 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        total += z
    result: int64 holding total's bits

Each word is hashed with its position in the record (a splitmix64 finalizer), so swapped words, a
flipped bit or an expert in another tensor position change the sum; padding is never read, so a
resident slot and a record holding the same expert have the same checksum.
"""

from __future__ import annotations

import torch

from expert_store.layout import ResidentSlabs, SlabLayout, as_resident
from expert_store.spec import ExpertSpec

__all__ = [
    "CHECKSUM_GOLDEN",
    "CHECKSUM_MIX1",
    "CHECKSUM_MIX2",
    "pack_records_reference",
    "resident_checksums_reference",
    "slab_checksums_reference",
    "unpack_records_reference",
]

# splitmix64 constants (the golden-ratio increment and the two finalizer multipliers).
CHECKSUM_GOLDEN = 0x9E3779B97F4A7C15
CHECKSUM_MIX1 = 0xBF58476D1CE4E5B9
CHECKSUM_MIX2 = 0x94D049BB133111EB

# As signed int64 (torch has no general uint64 arithmetic): int64 products and sums wrap to the uint64 bits.
_GOLDEN_S, _MIX1_S, _MIX2_S = (c - (1 << 64) for c in (CHECKSUM_GOLDEN, CHECKSUM_MIX1, CHECKSUM_MIX2))

# Words hashed per torch op: int64 temporaries stay ~32 MiB whatever the expert (a DeepSeek-V3 w13 is 7.3 M words).
_CHECKSUM_PIECE_WORDS = 1 << 22

_WORD_DTYPE = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _unit(x: torch.Tensor, w: int) -> int:
    """Widest word (<= w) that ``x``'s address and storage offset allow viewing it in."""
    at = x.data_ptr() | (x.storage_offset() * x.element_size()) | w
    return at & -at


def _slot_rows(x: torch.Tensor, unit: int) -> torch.Tensor:
    """[S, nbytes_t / unit] words of the contiguous [S, *shape] tensor ``x`` of one (layer, tensor)."""
    return x.reshape(-1).view(torch.uint8).view(_WORD_DTYPE[unit]).view(x.shape[0], -1)


def _checksum_words(x: torch.Tensor, slots: torch.Tensor, w: int) -> torch.Tensor:
    """[n, nbytes_t / w] W-byte words of slots ``slots`` of ``x`` (as :func:`_slot_rows`); gathered
    from narrower little-endian pieces (int64) when the address is narrower than a word."""
    u = _unit(x, w)
    rows = _slot_rows(x, u)[slots]
    if u == w:
        return rows
    pieces = (rows.to(torch.int64) & ((1 << 8 * u) - 1)).view(rows.shape[0], -1, w // u)
    shifts = torch.arange(0, 8 * w, 8 * u, dtype=torch.int64, device=rows.device)
    return (pieces << shifts).sum(dim=2)


def _record_rows(slab: torch.Tensor, spec: ExpertSpec, t: int, unit: int | None = None) -> torch.Tensor:
    """[K, nbytes_t / unit] view of tensor t of every record the slab can hold, in words (unit None: W)."""
    u = spec.word_bytes if unit is None else unit
    cap = slab.numel() // spec.record_bytes
    start = spec.record_offsets[t] // u
    records = slab[: cap * spec.record_bytes].view(_WORD_DTYPE[u]).view(cap, spec.record_bytes // u)
    return records[:, start : start + spec.tensors[t].nbytes // u]


def _by_layer(layers: torch.Tensor):
    """(layer, positions of the items in that layer) for each layer the items name."""
    for layer in torch.unique(layers).tolist():
        yield layer, (layers == layer).nonzero().flatten()


def _pairs(storage, layout: SlabLayout, slab: torch.Tensor, layers, slots, records):
    """Per (layer, tensor) the call names: the slots' word rows, the slab's record rows (one word
    size, the widest the tensor's address allows) and the slot and record indices of its items."""
    res = as_resident(storage, layout)
    layers, slots, records = _items(res.device, layers, slots, records)
    for layer, sel in _by_layer(layers):
        for t, x in enumerate(res.tensors[layer]):
            u = _unit(x, layout.spec.word_bytes)
            yield _slot_rows(x, u), _record_rows(slab, layout.spec, t, u), slots[sel], records[sel]


def _items(device: torch.device, layers: torch.Tensor, slots: torch.Tensor, records: torch.Tensor | None):
    """layers, slots and records (None: arange(n)) on ``device``."""
    records = torch.arange(layers.numel(), dtype=torch.int64, device=device) if records is None else records.to(device)
    return layers.to(device), slots.to(device), records


def pack_records_reference(
    storage: ResidentSlabs | torch.Tensor,
    layout: SlabLayout,
    layers: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    records: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy expert (layers[i], slots[i]) of ``storage`` (ResidentSlabs of ``layout``, or its uint8
    [L * layout.layer_bytes] allocation) into record records[i] of ``out`` (uint8 [>= K *
    record_bytes], written in place).

    layers, slots, records: int64 [n] (records None: arange(n)). Returns ``out``; padding bytes of
    the records are left as they were.
    """
    for slot_rows, record_rows, s, r in _pairs(storage, layout, out, layers, slots, records):
        record_rows[r] = slot_rows[s]
    return out


def unpack_records_reference(
    slab: torch.Tensor,
    storage: ResidentSlabs | torch.Tensor,
    layout: SlabLayout,
    layers: torch.Tensor,
    slots: torch.Tensor,
    records: torch.Tensor | None = None,
) -> None:
    """Copy record records[i] of ``slab`` (uint8 [>= K * record_bytes]; only tensor bytes are read)
    into (layers[i], slots[i]) of ``storage`` (as in :func:`pack_records_reference`, written in place).

    layers, slots: int64 [n], distinct (layer, slot) pairs; records: int64 [n] (None: arange(n)), may repeat.
    """
    for slot_rows, record_rows, s, r in _pairs(storage, layout, slab, layers, slots, records):
        slot_rows[s] = record_rows[r]


def _hash_words(words: torch.Tensor, first_position: int) -> torch.Tensor:
    """int64 [m]: wrapping row sums of the mixed ``words`` (int64 [m, k], zero-extended) at record
    positions first_position .. first_position + k - 1."""
    k = words.shape[1]
    p1 = torch.arange(first_position + 1, first_position + 1 + k, dtype=torch.int64, device=words.device)
    z = words + p1 * _GOLDEN_S
    # ``>>`` on int64 is arithmetic; masking off the copied sign bits makes it logical.
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1_S
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2_S
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return z.sum(dim=1)


def _checksum_rows(rows_of: list[torch.Tensor], spec: ExpertSpec) -> torch.Tensor:
    """int64 [n]: checksum of n experts given, per tensor t, its [n, nbytes_t / W] word rows (any strides)."""
    w = spec.word_bytes
    n = rows_of[0].shape[0]
    total = torch.zeros(n, dtype=torch.int64, device=rows_of[0].device)
    for t, rows in enumerate(rows_of):
        nwords = spec.tensors[t].nbytes // w
        first = spec.record_offsets[t] // w
        piece = _CHECKSUM_PIECE_WORDS
        group = max(1, piece // min(nwords, piece))
        for i0 in range(0, n, group):
            for c0 in range(0, nwords, piece):
                c1 = min(nwords, c0 + piece)
                words = rows[i0 : i0 + group, c0:c1].to(torch.int64) & ((1 << 8 * w) - 1)
                total[i0 : i0 + group] += _hash_words(words, first + c0)
    return total


def resident_checksums_reference(
    storage: ResidentSlabs | torch.Tensor, layout: SlabLayout, layers: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """int64 [n]: checksum of expert (layers[i], slots[i]) of ``storage`` (as in :func:`pack_records_reference`)."""
    res = as_resident(storage, layout)
    layers, slots = layers.to(res.device), slots.to(res.device)
    total = torch.zeros(layers.numel(), dtype=torch.int64, device=res.device)
    for layer, sel in _by_layer(layers):
        rows = [_checksum_words(x, slots[sel], layout.spec.word_bytes) for x in res.tensors[layer]]
        total[sel] = _checksum_rows(rows, layout.spec)
    return total


def slab_checksums_reference(slab: torch.Tensor, spec: ExpertSpec, n: int) -> torch.Tensor:
    """int64 [n]: checksum of records 0..n-1 of ``slab`` (uint8 [>= n * record_bytes])."""
    rows = [_record_rows(slab, spec, t)[:n] for t in range(len(spec))]
    return _checksum_rows(rows, spec)

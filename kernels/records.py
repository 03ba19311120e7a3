"""Pack, unpack and checksum expert records: one Triton launch per call.

Symbols: L layers, S slots per rank, T tensors per expert, n experts in one
call, K records a transfer slab can hold, C chunks per expert (per spec and
kernel configuration), W = ``spec.word_bytes``.

Byte layouts (see :mod:`expert_store.layout` and :mod:`expert_store.spec`)::

    storage: uint8 [L * layer_bytes]   tensor t of (l, s) at l*layer_bytes + region_offsets[t] + s*nbytes_t
    slab:    uint8 [K * record_bytes]  tensor t of record r at r*record_bytes + record_offsets[t]

Work decomposition. Every tensor of an expert is cut into chunks of
``chunk_bytes`` (the last chunk of a tensor is shorter). The spec is fixed, so
the C chunks of one expert are described once by a small int64 table ``[C, 4]``
of (resident offset in a layer, slot stride, record offset, length), in words,
built on the first call and cached on the device. A call on n experts launches
n * C programs; program k copies chunk k % C of item k // C. Each program does
the same amount of work whatever the tensor shapes, so a DeepSeek-V3 expert
(w13 of 29 MB beside 3.5 KB scales) is as balanced as a bf16 one.

Words. Storage and slab are viewed as int32 when W == 4 (int16 / uint8 when
W is 2 / 1), so every dtype, fp8 and scales included, takes the same path.
When every tensor size is a multiple of 16 bytes, every chunk starts on a
16-byte boundary in both layouts (regions are 256-aligned, records 16-aligned,
chunks multiples of 16): the kernels then tell Triton so with ``tl.multiple_of``
and each thread moves 16-byte vectors (ld/st.global.v4.b32 in the PTX, checked
by compiling for sm_90a; without the hints they are 4-byte accesses).

Expected bandwidth (H200, HBM3e, 4.8 TB/s peak; torch's device copy reaches
4232 GB/s read+written). With 16-byte vectors and 32 KiB contiguous per
program, DRAM sees the same full-sector streams as a memcpy, so pack and
unpack should reach 92-100 % of the copy (~3.9-4.2 TB/s). What they pay on top
is (a) one L2 round trip per program for its 7 scalar loads (indices and table
row), hidden by the other resident programs of the SM, and (b) the tail: the
last programs of the grid run with too few bytes in flight to fill HBM, for
about one program's lifetime (~2-3 us for 32 KiB), which is ~5 % of a 64 MiB
call (~32 us) and ~1-2 % at 256 MiB. The short chunks of scale tensors are 2
of 1346 programs per DeepSeek-V3 expert. A spec whose sizes are not multiples
of 16 bytes (W = 2 or 1, or unaligned slot starts) falls back to W-byte
accesses and is several times slower; no production spec does that. Checksums read once but mix each word
with three 64-bit multiplies (emulated with 32-bit IMADs), so they are bounded
by integer throughput, not DRAM: expect roughly 1.5-3 TB/s.

Host side: validation in plain Python on the n indices plus one pinned H2D
copy of the [n, 3] index rows and one launch, about 13 us of Python before the
launch (measured on CPU) plus Triton's launch path. A 64 MiB pack is ~32 us of
GPU time, so back-to-back calls at that size are close to host bound; at
>= 128 MiB, or when pack overlaps a transfer, the host is hidden.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module was
imported (the tests do that), and otherwise the plain-torch reference in
:mod:`expert_store.kernels.reference`.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from expert_store.errors import SpecError, StoreError
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec

from . import reference as _ref

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "chunks_per_expert",
    "pack_records",
    "resident_checksums",
    "slab_checksums",
    "unpack_records",
]

# The triton.jit decorator picks interpreter or compiler when the module is
# imported, so the dispatch follows the same moment.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# 32 KiB chunks (two loop iterations): small enough that the grid's tail (the
# last programs, running with too few bytes in flight) costs ~2-3 us, large
# enough that the per-program L2 round trip for indices and table row is hidden
# by the SM's other resident programs. A 64 MiB slab makes ~2048 programs (two
# waves of 132 SMs x 8), a DeepSeek-V3 expert 1346. The GPU script sweeps 16-128 KiB.
CHUNK_BYTES = 32 * 1024
# 16 KiB per loop iteration: with 8 warps each thread moves 64 B = four 16-byte
# vectors per iteration; 8 resident programs per SM keep ~128 KiB in flight per
# SM, about 4x what Little's law asks of HBM3e (~30 KiB per SM at ~800 ns).
BLOCK_BYTES = 16 * 1024
# 8 warps (256 threads): 8 programs fill an SM's 2048 threads. ptxas (sm_90a)
# gives the copy kernels 32 registers per thread, so occupancy is not register
# bound (the checksum kernel takes 64: 4 programs per SM, still ~64 KiB in flight).
NUM_WARPS = 8


@dataclass(frozen=True)
class KernelConfig:
    """Work decomposition of the kernels (benchmarks sweep it; defaults are the module constants).

    chunk_bytes: bytes of a tensor one program handles (multiple of block_bytes).
    block_bytes: bytes one loop iteration of a program moves (power of two, >= 16).
    num_warps: warps per program (power of two, 1..32).
    """

    chunk_bytes: int = CHUNK_BYTES
    block_bytes: int = BLOCK_BYTES
    num_warps: int = NUM_WARPS

    def __post_init__(self) -> None:
        b = self.block_bytes
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise StoreError(f"KernelConfig.block_bytes must be a power of two >= 16, got {b!r}")
        c = self.chunk_bytes
        if not isinstance(c, int) or c <= 0 or c % b:
            raise StoreError(f"KernelConfig.chunk_bytes must be a positive multiple of block_bytes={b}, got {c!r}")
        w = self.num_warps
        if not isinstance(w, int) or w not in (1, 2, 4, 8, 16, 32):
            raise StoreError(f"KernelConfig.num_warps must be one of 1, 2, 4, 8, 16, 32, got {w!r}")


DEFAULT_CONFIG = KernelConfig()

_WORD_DTYPE = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
# Loops run CHUNK_BLOCKS (constexpr) iterations, masked past the chunk's length:
# a fully masked iteration issues no memory traffic, and a loaded value cannot
# be a range bound in Triton's interpreter (it converts it with int(), which
# numpy >= 2 refuses for 1-element arrays), which the CPU tests rely on.
#
# No scalar argument differs per rank or per call: n is carried by the grid and
# the item indices by idx_ptr, while layer_words / record_words / C depend only
# on the spec and layout, which every rank shares. They are left specializable
# on purpose: their divisibility by 16 feeds Triton's alignment analysis.


@triton.jit
def _chunk_addresses(idx_ptr, table_ptr, layer_words, record_words, C, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Item, resident word offset, record word offset, record-relative offset and length of this program's chunk.

    idx_ptr: int64 [n, 3] rows (layer, slot, record); table_ptr: int64 [C, 4]
    rows (region offset in a layer, slot stride, record offset, length), words.
    """
    pid = tl.program_id(0).to(tl.int64)  # widened: n * C * words overflows int32
    item = pid // C
    chunk = pid - item * C
    layer = tl.load(idx_ptr + item * 3)
    slot = tl.load(idx_ptr + item * 3 + 1)
    record = tl.load(idx_ptr + item * 3 + 2)
    region = tl.load(table_ptr + chunk * 4)
    stride = tl.load(table_ptr + chunk * 4 + 1)
    rec_off = tl.load(table_ptr + chunk * 4 + 2)
    length = tl.load(table_ptr + chunk * 4 + 3)
    res_base = layer * layer_words + slot * stride + region
    rec_base = record * record_words + rec_off
    if ALIGNED:
        # Every size is a multiple of 16 bytes = VEC words: both chunk starts
        # and the chunk length are multiples of VEC, so loads and stores (and
        # their masks) split into 16-byte vectors.
        res_base = tl.multiple_of(res_base, VEC)
        rec_base = tl.multiple_of(rec_base, VEC)
        length = tl.multiple_of(length, VEC)
    return item, res_base, rec_base, rec_off, length


@triton.jit
def _pack_records_kernel(
    storage_ptr,
    slab_ptr,
    idx_ptr,
    table_ptr,
    layer_words,
    record_words,
    C,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
):
    """storage -> slab: chunk (pid % C) of item (pid // C)."""
    _, res_base, rec_base, _, length = _chunk_addresses(idx_ptr, table_ptr, layer_words, record_words, C, ALIGNED, VEC)
    src = storage_ptr + res_base
    dst = slab_ptr + rec_base
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _unpack_records_kernel(
    slab_ptr,
    storage_ptr,
    idx_ptr,
    table_ptr,
    layer_words,
    record_words,
    C,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
):
    """slab -> storage: chunk (pid % C) of item (pid // C)."""
    _, res_base, rec_base, _, length = _chunk_addresses(idx_ptr, table_ptr, layer_words, record_words, C, ALIGNED, VEC)
    src = slab_ptr + rec_base
    dst = storage_ptr + res_base
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _checksum_kernel(
    src_ptr,
    out_ptr,
    idx_ptr,
    table_ptr,
    layer_words,
    record_words,
    C,
    FROM_SLAB: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
):
    """out[item] += sum of mixed words of chunk (pid % C) of item (pid // C); out is zeroed first.

    Integer atomic adds commute, so the result does not depend on program order.
    """
    item, res_base, rec_base, rec_off, length = _chunk_addresses(
        idx_ptr, table_ptr, layer_words, record_words, C, ALIGNED, VEC
    )
    if FROM_SLAB:
        src = src_ptr + rec_base
    else:
        src = src_ptr + res_base
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        w = tl.load(src + offs, mask=mask, other=0)
        # Zero-extend the little-endian word: reinterpret as unsigned first.
        if WORD_BYTES == 4:
            w = w.to(tl.uint32, bitcast=True)
        elif WORD_BYTES == 2:
            w = w.to(tl.uint16, bitcast=True)
        p1 = (rec_off + offs + 1).to(tl.uint64)  # record position of the word, plus one
        z = w.to(tl.uint64) + p1 * 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9  # uint64: >> is a logical shift
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        acc += tl.where(mask, z, tl.zeros_like(z))
    total = tl.sum(acc, axis=0)
    tl.atomic_add(out_ptr + item, total.to(tl.int64, bitcast=True), sem="relaxed")


# --------------------------------------------------------------------------
# host side: chunk tables, validation, dispatch
# --------------------------------------------------------------------------
# The host path is kept lean (plain Python on the n indices, one small H2D copy,
# one launch): a 64 MiB pack takes ~32 us on an H200, so host overhead of the
# same order would make the call host bound.


class _Plan(NamedTuple):
    """What one (spec, layout, chunk size, device) needs at launch, built once."""

    spec: ExpertSpec  # strong reference: keeps id(spec), part of the cache key, from being reused
    table: torch.Tensor  # int64 [C, 4] on the device: (region offset, slot stride, record offset, length), words
    chunks: int  # C
    word_dtype: torch.dtype  # int32 / int16 / uint8 for word_bytes 4 / 2 / 1
    aligned: bool  # every tensor size a multiple of 16 bytes: 16-byte vector accesses
    vec: int  # words per 16 bytes


_PLANS: dict[tuple, _Plan] = {}
_PLANS_LOCK = threading.Lock()


def _chunk_rows(spec: ExpertSpec, region_offsets: tuple[int, ...], chunk_bytes: int) -> list[list[int]]:
    """Rows (region offset, slot stride, record offset, length) of every chunk of one expert, in words."""
    w = spec.word_bytes
    rows = []
    for t, ts in enumerate(spec.tensors):
        nb = ts.nbytes
        for start in range(0, nb, chunk_bytes):
            length = min(chunk_bytes, nb - start)
            rows.append([(region_offsets[t] + start) // w, nb // w, (spec.record_offsets[t] + start) // w, length // w])
    return rows


def chunks_per_expert(spec: ExpertSpec, *, config: KernelConfig | None = None) -> int:
    """C: programs launched per expert for ``spec`` under ``config`` (a call on n experts launches n * C)."""
    chunk = (config or DEFAULT_CONFIG).chunk_bytes
    return sum(-(-t.nbytes // chunk) for t in spec.tensors)


def _plan(spec: ExpertSpec, region_offsets: tuple[int, ...], chunk_bytes: int, device: torch.device) -> _Plan:
    """The cached launch plan; the chunk table is built and copied to ``device`` on first use only."""
    key = (id(spec), region_offsets, chunk_bytes, device)
    plan = _PLANS.get(key)
    if plan is not None and plan.spec is spec:
        return plan
    rows = _chunk_rows(spec, region_offsets, chunk_bytes)
    w = spec.word_bytes
    plan = _Plan(
        spec=spec,
        table=torch.tensor(rows, dtype=torch.int64).to(device),
        chunks=len(rows),
        word_dtype=_WORD_DTYPE[w],
        aligned=all(t.nbytes % 16 == 0 for t in spec.tensors),
        vec=max(1, 16 // w),
    )
    with _PLANS_LOCK:
        _PLANS[key] = plan
    return plan


def _backend(device: torch.device, what: str) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "triton" if _INTERPRET else "torch"
    raise StoreError(f"{what}: tensors on {device} are not supported; expected a cuda or cpu device")


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: switch to ``device`` when it is another one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return nullcontext()


def _check_layout(layout: object, what: str) -> SlabLayout:
    if not isinstance(layout, SlabLayout):
        raise SpecError(f"{what}: layout must be a SlabLayout, got {type(layout).__name__}")
    return layout


def _check_byte_tensor(name: str, t: object, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise StoreError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise StoreError(f"{what}: {name} must be torch.uint8, got {t.dtype}")
    if t.dim() != 1:
        raise StoreError(f"{what}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise StoreError(f"{what}: {name} must be contiguous, got stride {t.stride()}")
    return t


def _check_word_alignment(name: str, t: torch.Tensor, word: int, what: str) -> None:
    """The kernels view bytes as W-byte words, which needs a W-aligned start."""
    if t.device.type in ("cpu", "cuda") and t.data_ptr() % word:
        raise StoreError(
            f"{what}: {name} must start on a {word}-byte boundary (spec word_bytes={word}), "
            f"got address {t.data_ptr():#x}"
        )


def _check_storage(storage: object, layout: SlabLayout, what: str) -> torch.Tensor:
    storage = _check_byte_tensor("storage", storage, what)
    if storage.numel() != layout.total_bytes:
        raise StoreError(
            f"{what}: storage must hold layout.total_bytes = {layout.total_bytes} bytes "
            f"(L={layout.num_layers} x layer_bytes={layout.layer_bytes}), got {storage.numel()}"
        )
    _check_word_alignment("storage", storage, layout.spec.word_bytes, what)
    return storage


def _check_same_device(name: str, t: torch.Tensor, device: torch.device, what: str) -> None:
    if t.device != device:
        raise StoreError(f"{what}: {name} must be on {device} (the storage's device), got {t.device}")


def _check_index(name: str, t: object, n: int | None, device: torch.device, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise StoreError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise StoreError(f"{what}: {name} must be torch.int64, got {t.dtype}")
    if t.dim() != 1:
        raise StoreError(f"{what}: {name} must be 1-D [n], got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise StoreError(f"{what}: {name} must have n = {n} entries (as many as layers), got {t.numel()}")
    if t.device.type != "cpu" and t.device != device:
        raise StoreError(f"{what}: {name} must be on cpu or on {device} (the storage's device), got {t.device}")
    return t


def _check_range(name: str, values: list[int], upper: int, meaning: str, what: str) -> None:
    """Raise unless 0 <= v < upper for every v in values."""
    if values and (min(values) < 0 or max(values) >= upper):
        bad = [i for i, v in enumerate(values) if not 0 <= v < upper]
        i = bad[0]
        raise StoreError(
            f"{what}: {name}[{i}] = {values[i]} is out of range: {meaning} is {upper} "
            f"(valid 0..{upper - 1}); {len(bad)} bad entries in all"
        )


def _check_distinct(keys: list[int], describe, what: str, why: str) -> None:
    """Raise if ``keys`` repeats a value; describe(i) names the target of item i."""
    if len(set(keys)) == len(keys):
        return
    first: dict[int, int] = {}
    for i, k in enumerate(keys):
        if k in first:
            raise StoreError(f"{what}: items {first[k]} and {i} both target {describe(i)}; {why}")
        first[k] = i


class _Items(NamedTuple):
    layers: list[int]
    slots: list[int]
    records: list[int] | None  # None: records default to arange(n)
    idx: torch.Tensor  # int64 [n, 3] rows (layer, slot, record) on the storage's device


def _prepare_items(
    storage: torch.Tensor, layout: SlabLayout, layers: object, slots: object, records: object | None, what: str
) -> _Items:
    """Validate indices on the host before anything is launched; build the index matrix.

    Device indices are copied to the host once (one sync), so that no
    out-of-range index ever reaches a kernel.
    """
    dev = storage.device
    layers = _check_index("layers", layers, None, dev, what)
    n = layers.numel()
    slots = _check_index("slots", slots, n, dev, what)
    if records is not None:
        records = _check_index("records", records, n, dev, what)
        rec_col = records
    else:
        rec_col = torch.arange(n, dtype=torch.int64, device=layers.device)
    cols = [layers, slots, rec_col]
    if any(c.device != cols[0].device for c in cols):
        cols = [c.to(dev) for c in cols]
    rows = torch.stack(cols, dim=1)  # int64 [n, 3]
    h_layers, h_slots, h_records = rows.t().tolist()  # syncs once when the indices live on the device
    _check_range("layers", h_layers, layout.num_layers, "the layout's number of layers L", what)
    _check_range("slots", h_slots, layout.slots, "the layout's slots per layer S", what)
    if records is not None and h_records and min(h_records) < 0:
        i = next(i for i, r in enumerate(h_records) if r < 0)
        raise StoreError(f"{what}: records[{i}] = {h_records[i]} is negative; record indices start at 0")
    return _Items(h_layers, h_slots, h_records if records is not None else None, _to_device(rows, dev))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without a stream sync.

    A plain ``.to("cuda")`` from pageable memory synchronizes the stream after
    the copy, which would stall the host behind every kernel already queued
    (and keep pack from overlapping a transfer); from pinned memory the copy is
    asynchronous and the caching host allocator keeps the buffer until it is done.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _launch_copy(
    kernel,
    src: torch.Tensor,
    dst: torch.Tensor,
    idx: torch.Tensor,
    plan: _Plan,
    layout: SlabLayout,
    config: KernelConfig,
) -> None:
    """One launch of the pack or unpack kernel over all n items (idx: int64 [n, 3])."""
    w = plan.spec.word_bytes
    with _device_guard(src.device):
        kernel[(idx.shape[0] * plan.chunks,)](
            src.view(plan.word_dtype),
            dst.view(plan.word_dtype),
            idx,
            plan.table,
            layout.layer_bytes // w,
            plan.spec.record_bytes // w,
            plan.chunks,
            BLOCK=config.block_bytes // w,
            CHUNK_BLOCKS=config.chunk_bytes // config.block_bytes,
            ALIGNED=plan.aligned,
            VEC=plan.vec,
            num_warps=config.num_warps,
        )


def _launch_checksum(
    src: torch.Tensor, idx: torch.Tensor, plan: _Plan, layer_bytes: int, from_slab: bool, config: KernelConfig
) -> torch.Tensor:
    """Zero int64 [n] sums, then one launch of the checksum kernel adding every chunk's share."""
    w = plan.spec.word_bytes
    n = idx.shape[0]
    out = torch.zeros(n, dtype=torch.int64, device=src.device)
    with _device_guard(src.device):
        _checksum_kernel[(n * plan.chunks,)](
            src.view(plan.word_dtype),
            out,
            idx,
            plan.table,
            layer_bytes // w,
            plan.spec.record_bytes // w,
            plan.chunks,
            FROM_SLAB=from_slab,
            WORD_BYTES=w,
            BLOCK=config.block_bytes // w,
            CHUNK_BLOCKS=config.chunk_bytes // config.block_bytes,
            ALIGNED=plan.aligned,
            VEC=plan.vec,
            num_warps=config.num_warps,
        )
    return out


def _slab_prefix(slab: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """The whole-record prefix of a slab (uint8 [K * record_bytes]), viewable as words."""
    return slab[: (slab.numel() // spec.record_bytes) * spec.record_bytes]


# --------------------------------------------------------------------------
# public launchers
# --------------------------------------------------------------------------
def pack_records(
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: torch.Tensor,
    slots: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    records: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Gather n resident experts into transfer-slab records, in one launch.

    Args:
        storage: uint8 [L * layout.layer_bytes], one rank's resident slabs.
        layout: the SlabLayout of ``storage``.
        layers, slots: int64 [n] (CPU or storage's device): the experts to pack; may repeat.
        out: optional uint8 [>= m * record_bytes] on storage's device, where m is
            the number of records used (n, or max(records) + 1); allocated when None.
        records: optional int64 [n], distinct: record index in ``out`` of item i
            (default i).
        config: kernel work decomposition (default DEFAULT_CONFIG).

    Returns:
        uint8 [m * record_bytes]: the used prefix of ``out``. Padding bytes
        inside records, and records no item names, are left as they were.

    Raises:
        StoreError: bad dtype / shape / device, an index out of range, repeated
            records, or ``out`` too small. Nothing is written then.
    """
    what = "pack_records"
    layout = _check_layout(layout, what)
    storage = _check_storage(storage, layout, what)
    backend = _backend(storage.device, what)
    config = config or DEFAULT_CONFIG
    spec = layout.spec
    items = _prepare_items(storage, layout, layers, slots, records, what)
    n = len(items.layers)
    if items.records is None:
        used = n
    else:
        used = max(items.records) + 1 if n else 0
        recs = items.records
        _check_distinct(recs, lambda i: f"record {recs[i]}", what, "each record may be written once per call")
    need = used * spec.record_bytes
    if out is None:
        out = torch.empty(need, dtype=torch.uint8, device=storage.device)
    else:
        out = _check_byte_tensor("out", out, what)
        _check_same_device("out", out, storage.device, what)
        if out.numel() < need:
            raise StoreError(
                f"{what}: out must hold at least {need} bytes ({used} records x record_bytes={spec.record_bytes}), "
                f"got {out.numel()}"
            )
        _check_word_alignment("out", out, spec.word_bytes, what)
    if n:
        if backend == "torch":
            _ref.pack_records_reference(storage, layout, items.idx[:, 0], items.idx[:, 1], out, items.idx[:, 2])
        else:
            plan = _plan(spec, layout.region_offsets, config.chunk_bytes, storage.device)
            _launch_copy(_pack_records_kernel, storage, _slab_prefix(out, spec), items.idx, plan, layout, config)
    return out[:need]


def unpack_records(
    slab: torch.Tensor,
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: torch.Tensor,
    slots: torch.Tensor,
    *,
    records: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> None:
    """Scatter transfer-slab records into resident (layer, slot) destinations, in one launch.

    Args:
        slab: uint8 [>= K * record_bytes] on storage's device; its first K whole records are readable.
        storage: uint8 [L * layout.layer_bytes], written in place.
        layout: the SlabLayout of ``storage``.
        layers, slots: int64 [n] (CPU or storage's device), distinct (layer, slot) pairs.
        records: optional int64 [n]: record of ``slab`` copied to item i (default i);
            may repeat (one received record duplicated into several slots).
        config: kernel work decomposition (default DEFAULT_CONFIG).

    Padding bytes of the records are never read; bytes of ``storage`` outside
    the named slots' tensors are never written.

    Raises:
        StoreError: bad dtype / shape / device, an index out of range (a record
            >= K included), or a (layer, slot) named twice. Nothing is written then.
    """
    what = "unpack_records"
    layout = _check_layout(layout, what)
    storage = _check_storage(storage, layout, what)
    backend = _backend(storage.device, what)
    slab = _check_byte_tensor("slab", slab, what)
    _check_same_device("slab", slab, storage.device, what)
    config = config or DEFAULT_CONFIG
    spec = layout.spec
    _check_word_alignment("slab", slab, spec.word_bytes, what)
    items = _prepare_items(storage, layout, layers, slots, records, what)
    n = len(items.layers)
    cap = slab.numel() // spec.record_bytes
    capacity = f"the slab's record capacity ({slab.numel()} bytes // record_bytes={spec.record_bytes})"
    if items.records is None:
        if n > cap:
            raise StoreError(f"{what}: {n} items read records 0..{n - 1}, but {capacity} is {cap}")
    else:
        _check_range("records", items.records, cap, capacity, what)
    lay, slo = items.layers, items.slots
    _check_distinct(
        [la * layout.slots + s for la, s in zip(lay, slo)],
        lambda i: f"(layer {lay[i]}, slot {slo[i]})",
        what,
        "each destination slot may be written once per call",
    )
    if not n:
        return
    if backend == "torch":
        _ref.unpack_records_reference(slab, storage, layout, items.idx[:, 0], items.idx[:, 1], items.idx[:, 2])
    else:
        plan = _plan(spec, layout.region_offsets, config.chunk_bytes, storage.device)
        _launch_copy(_unpack_records_kernel, _slab_prefix(slab, spec), storage, items.idx, plan, layout, config)


def resident_checksums(
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: torch.Tensor,
    slots: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """int64 [n] on storage's device: checksum of resident expert (layers[i], slots[i]).

    Args:
        storage: uint8 [L * layout.layer_bytes].
        layout: the SlabLayout of ``storage``.
        layers, slots: int64 [n] (CPU or storage's device); may repeat.
        config: kernel work decomposition (default DEFAULT_CONFIG).

    The checksum is defined in :mod:`expert_store.kernels.reference`; it
    equals :func:`slab_checksums` of a record holding the same expert.
    """
    what = "resident_checksums"
    layout = _check_layout(layout, what)
    storage = _check_storage(storage, layout, what)
    backend = _backend(storage.device, what)
    config = config or DEFAULT_CONFIG
    items = _prepare_items(storage, layout, layers, slots, None, what)
    if not items.layers:
        return torch.zeros(0, dtype=torch.int64, device=storage.device)
    if backend == "torch":
        return _ref.resident_checksums_reference(storage, layout, items.idx[:, 0], items.idx[:, 1])
    plan = _plan(layout.spec, layout.region_offsets, config.chunk_bytes, storage.device)
    return _launch_checksum(storage, items.idx, plan, layout.layer_bytes, False, config)


def slab_checksums(slab: torch.Tensor, spec: ExpertSpec, n: int, *, config: KernelConfig | None = None) -> torch.Tensor:
    """int64 [n] on slab's device: checksum of records 0..n-1 of ``slab`` (uint8 [>= n * record_bytes]).

    Padding bytes inside records are not read.
    """
    what = "slab_checksums"
    if not isinstance(spec, ExpertSpec):
        raise SpecError(f"{what}: spec must be an ExpertSpec, got {type(spec).__name__}")
    slab = _check_byte_tensor("slab", slab, what)
    backend = _backend(slab.device, what)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StoreError(f"{what}: n must be a non-negative int, got {n!r}")
    if n * spec.record_bytes > slab.numel():
        raise StoreError(
            f"{what}: {n} records need {n * spec.record_bytes} bytes (record_bytes={spec.record_bytes}), "
            f"slab has {slab.numel()}"
        )
    _check_word_alignment("slab", slab, spec.word_bytes, what)
    config = config or DEFAULT_CONFIG
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=slab.device)
    if backend == "torch":
        return _ref.slab_checksums_reference(slab, spec, n)
    idx = torch.zeros(n, 3, dtype=torch.int64)
    idx[:, 2] = torch.arange(n)
    # Records only: the table's resident columns are zero and unused.
    plan = _plan(spec, (0,) * len(spec), config.chunk_bytes, slab.device)
    return _launch_checksum(_slab_prefix(slab, spec), _to_device(idx, slab.device), plan, 0, True, config)

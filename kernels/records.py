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
When every tensor size is a multiple of 16 bytes and both buffers start on a
16-byte boundary (the host checks the addresses at each call), every chunk
starts on a 16-byte boundary in both layouts (regions are 256-aligned, records
16-aligned, chunks multiples of 16): the kernels then tell Triton so with
``tl.multiple_of`` on the chunk's base pointers and each thread moves 16-byte
vectors (ld/st.global.v4 in the PTX, checked by compiling for sm_90a; without
the hints they are 4-byte accesses). The hints carry the alignment, not
Triton's argument specialization: the pointer arguments are
``do_not_specialize_on_alignment`` so that one compiled kernel serves every
buffer (see "Host side").

Expected bandwidth (H200, HBM3e, 4.8 TB/s peak; torch's device copy reaches
4232 GB/s read+written). With 16-byte vectors and 64 KiB contiguous per
program, DRAM sees the same full-sector streams as a memcpy, so pack and
unpack should reach 92-100 % of the copy (~3.9-4.2 TB/s). What they pay on top
is (a) one L2 round trip per program for its 7 scalar loads (indices and table
row), hidden by the other resident programs of the SM, and (b) the tail: the
last programs of the grid run with too few bytes in flight to fill HBM, for
about one program's lifetime (a few us), which is ~5 % of a 64 MiB call
(~32 us) and ~1-2 % at 256 MiB. The first H200 run measured 90-95 % of the
copy at 256+ MiB for every configuration swept. A spec whose sizes are not
multiples of 16 bytes (W = 2 or 1, or unaligned slot starts) falls back to
W-byte accesses and is several times slower; no production spec does that.
Checksums read once but mix each word with three 64-bit multiplies (emulated
with 32-bit IMADs), so they are bounded by integer throughput, not DRAM: the
H200 run measured 1.2-2.4 TB/s.

Host side. A 64 MiB pack is ~32-45 us of GPU time, so the host work of one call
must stay well below that or back-to-back calls are host bound (the first H200
run measured ~125 us per call: pin_memory, an H2D copy with its allocation,
torch.stack / arange / tolist round trips and Triton's generic launch path).
One call now does:

* validation in plain Python on lists of ints (index tensors are converted
  with one ``tolist()`` each, indices on the device are fetched together with
  one sync), so that no out-of-range index ever reaches a kernel;
* the index rows ``int64 [n, 3]`` (layer, slot, record) packed with
  :mod:`array`, one ``memmove`` into a slot of the device's pinned ring buffer
  and one asynchronous H2D copy into the matching slot of a device buffer
  (:class:`_IndexRing`: no allocation, no sync, nothing per call but the
  copy). The copy runs on a side stream that the launching stream waits for,
  so it does not sit between two kernels of back-to-back calls;
* one launch. On CUDA the compiled kernel is cached per (plan, kernel,
  alignment) after its first launch through Triton's normal path and called
  directly afterwards with raw addresses (``CompiledKernel.run``), skipping
  Triton's per-call binding, specialization, cache-key and hook work. This is
  sound because nothing in Triton's specialization can differ between two
  calls with the same cache key: pointers are not specialized on alignment,
  their dtypes are fixed by the plan, and the integer arguments and
  constexprs are functions of (layout or spec, config), which the plan is
  keyed on. While a Triton launch hook is installed (profilers), every launch
  takes Triton's normal path so that the hook sees it. The cache does not
  follow Triton knobs changed after the first launch (instrumentation mode).

The launchers are not meant for CUDA graph capture: the index rows are staged
per call (as they were before the ring).

Measured on a CPU (AMD EPYC, 2 cores, no GPU), pack of 8 bf16 experts with
the CUDA-only work left out: 15 us -> 11 us with the launch stubbed, 20 us ->
12 us with Triton's launch path (a mock driver compiles for sm_90 and does
not launch). The old figures also leave out its pin_memory and H2D copy with
their allocations; the new ones include the ring's memmove and copy (into CPU
memory) and its side-stream bookkeeping.
``tools/bench_kernels_gpu.py`` measures the host time per call on the GPU
host and breaks it down.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module was
imported (the tests do that), and otherwise the plain-torch reference in
:mod:`expert_store.kernels.reference`.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
from array import array
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from expert_store.errors import SpecError, StoreError
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec

from . import reference as _ref

__all__ = [
    "DEFAULT_CONFIG",
    "Indices",
    "KernelConfig",
    "PreparedCopies",
    "chunks_per_expert",
    "pack_records",
    "resident_checksums",
    "slab_checksums",
    "unpack_records",
]

# The triton.jit decorator picks interpreter or compiler when the module is
# imported, so the dispatch follows the same moment.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Defaults: the winner of the second H200 sweep (2026-11-29, back-to-back calls
# between two events, results/bench_kernels_h200_20261129.txt): 128 KiB chunks,
# 32 KiB per iteration, 16 warps: mean 95.1 %, worst 92.9 % of the device copy
# over bf16 (H=2048, I=768) and DeepSeek-V3 fp8 experts at 72-294 MiB, pack and
# unpack. The first sweep's pick (64 KiB chunks) fell to 51 % on the 72 MiB bf16
# case back to back (93.5 % when queued behind other work): twice the programs,
# and the host's launch work (~75 us) outlasted the 36 us copy.
#
# 128 KiB chunks: a 64 MiB slab makes ~512-700 programs, one to two waves of
# 132 SMs x 4 resident programs; fewer, longer programs amortize the chunk-table
# lookup and keep each SM streaming.
CHUNK_BYTES = 128 * 1024
# 32 KiB per loop iteration: with 16 warps each thread moves 64 B = four 16-byte
# vectors per iteration; 4 resident programs per SM keep ~128 KiB in flight per
# SM, about 4x what Little's law asks of HBM3e (~30 KiB per SM at ~800 ns).
BLOCK_BYTES = 32 * 1024
# 16 warps (512 threads): 4 programs fill an SM's 2048 threads. ptxas (sm_90a)
# gives the copy kernels 32 registers per thread (cuobjdump -res-usage), so
# occupancy is not register bound (checksums: see CHECKSUM_WARPS).
NUM_WARPS = 16

# Checksums use at most 16 KiB blocks and 8 warps, whatever the config: each
# thread keeps a uint64 accumulator per word it loads, and at 16 words per
# thread ptxas (sm_90a) gives the kernel 64-80 registers (73 with 16 warps), so
# 512-thread programs would fit one per SM; 256-thread programs fit 3-4, as in
# the first H200 run (8 warps, 16 KiB). The chunk table is shared with the
# copies (chunk_bytes is a multiple of both block sizes).
CHECKSUM_BLOCK_BYTES = 16 * 1024
CHECKSUM_WARPS = 8

# The pinned / device index ring of one device (see _IndexRing): 2 MiB in 8
# segments of 64 slots of 4 KiB. A call on up to 170 experts (n * 24 bytes of
# index rows) takes one slot; larger calls take several, up to a segment
# (10922 experts), and larger still stage through torch's pinned allocator.
# A segment is reused after the 7 others: hundreds of calls may be in flight
# before the host ever waits.
RING_SLOT_BYTES = 4096
RING_SEGMENTS = 8
RING_BYTES = RING_SEGMENTS * 64 * RING_SLOT_BYTES

# Whether CUDA launches may call the cached compiled kernel directly (see the
# module docstring); False sends every launch through Triton's normal path.
# The GPU benchmark flips it to measure what the direct path saves.
_DIRECT_LAUNCH = True
# Whether index rows are copied on the ring's side stream (see _IndexRing);
# False copies them on the launching stream. The GPU benchmark flips it too.
_SIDE_STREAM_COPY = True

Indices = torch.Tensor | Sequence[int]
"""Index argument of the launchers: int64 [n] tensor (CPU or the storage's device) or a list / tuple / range of ints."""


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
# on purpose: their divisibility by 16 feeds Triton's alignment analysis, and
# the host's launch cache is keyed on their values. Pointers are never
# specialized on alignment (see the module docstring): ALIGNED says it instead.
_POINTERS = ["a_ptr", "b_ptr", "idx_ptr", "table_ptr"]


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


@triton.jit(do_not_specialize_on_alignment=_POINTERS)
def _pack_records_kernel(
    a_ptr,  # storage words
    b_ptr,  # slab words
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
    src = a_ptr + res_base
    dst = b_ptr + rec_base
    if ALIGNED:
        # The host checked both bases; a helper function cannot set this hint
        # (on a callee's argument tl.multiple_of is silently dropped).
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize_on_alignment=_POINTERS)
def _unpack_records_kernel(
    a_ptr,  # slab words
    b_ptr,  # storage words
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
    src = a_ptr + rec_base
    dst = b_ptr + res_base
    if ALIGNED:
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize_on_alignment=_POINTERS)
def _checksum_kernel(
    a_ptr,  # storage or slab words
    b_ptr,  # int64 [n] sums, zeroed
    idx_ptr,
    table_ptr,
    layer_words,
    record_words,
    C,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    FROM_SLAB: tl.constexpr,
    WORD_BYTES: tl.constexpr,
):
    """out[item] += sum of mixed words of chunk (pid % C) of item (pid // C); out is zeroed first.

    Integer atomic adds commute, so the result does not depend on program order.
    """
    item, res_base, rec_base, rec_off, length = _chunk_addresses(
        idx_ptr, table_ptr, layer_words, record_words, C, ALIGNED, VEC
    )
    if FROM_SLAB:
        src = a_ptr + rec_base
    else:
        src = a_ptr + res_base
    if ALIGNED:
        src = tl.multiple_of(src, 16)
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
    tl.atomic_add(b_ptr + item, total.to(tl.int64, bitcast=True), sem="relaxed")


# --------------------------------------------------------------------------
# host side: launch plans
# --------------------------------------------------------------------------
class _Plan:
    """What one (layout or spec, config, device) needs at launch, built once.

    ``args[aligned]`` holds the launch arguments after the four pointers, in the
    kernels' parameter order: (layer_words, record_words, C, BLOCK, CHUNK_BLOCKS,
    ALIGNED, VEC), then (FROM_SLAB, WORD_BYTES) for the checksum kernel. They are
    all functions of the plan's key, which the launch cache relies on.
    """

    __slots__ = ("args", "chunks", "compiled", "num_warps", "owner", "table", "table_ptr", "word_bytes", "word_dtype")

    def __init__(
        self,
        owner: object,
        spec: ExpertSpec,
        region_offsets: tuple[int, ...],
        layer_bytes: int,
        from_slab: bool | None,  # None: pack / unpack; False / True: checksums of slots / of records
        config: KernelConfig,
        device: torch.device,
    ) -> None:
        w = spec.word_bytes
        rows = _chunk_rows(spec, region_offsets, config.chunk_bytes)
        self.owner = owner  # strong reference: keeps id(owner), part of the cache key, from being reused
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)  # int64 [C, 4], words
        self.table_ptr = self.table.data_ptr()
        self.chunks = len(rows)
        self.word_bytes = w
        self.word_dtype = _WORD_DTYPE[w]
        block, self.num_warps = config.block_bytes, config.num_warps
        if from_slab is not None:  # checksums: see CHECKSUM_BLOCK_BYTES
            block, self.num_warps = min(block, CHECKSUM_BLOCK_BYTES), min(self.num_warps, CHECKSUM_WARPS)
        # Every tensor size a multiple of 16 bytes: 16-byte vectors when the buffers allow it (checked per call).
        sizes_aligned = all(t.nbytes % 16 == 0 for t in spec.tensors)
        head = (layer_bytes // w, spec.record_bytes // w, self.chunks, block // w, config.chunk_bytes // block)
        tail = (max(1, 16 // w),) + ((from_slab, w) if from_slab is not None else ())
        self.args = {False: (*head, False, *tail), True: (*head, sizes_aligned, *tail)}
        # (id(kernel), aligned) -> (kernel, CompiledKernel), CUDA only
        self.compiled: dict[tuple[int, bool], tuple[object, Any]] = {}


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


def _plan(kind: str, owner: SlabLayout | ExpertSpec, config: KernelConfig, device: torch.device) -> _Plan:
    """The cached plan of ``owner`` (a layout: kind "copy" / "resident-sum"; a spec: kind "slab-sum")."""
    key = (kind, id(owner), config.chunk_bytes, config.block_bytes, config.num_warps, device)
    plan = _PLANS.get(key)
    if plan is not None and plan.owner is owner:
        return plan
    if kind == "slab-sum":
        # Records only: the table's resident columns are zero and unused.
        plan = _Plan(owner, owner, (0,) * len(owner), 0, True, config, device)
    else:
        plan = _Plan(
            owner,
            owner.spec,
            owner.region_offsets,
            owner.layer_bytes,
            False if kind == "resident-sum" else None,
            config,
            device,
        )
    with _PLANS_LOCK:
        _PLANS[key] = plan
    return plan


# --------------------------------------------------------------------------
# host side: index staging and launch
# --------------------------------------------------------------------------
class _IndexRing:
    """Staging of the index rows of one device's launches: a pinned host buffer and a device buffer of one size.

    Args:
        host: uint8 [cap] (pinned on CUDA), written by memmove.
        dev: uint8 [cap] on the device; slot i of ``dev`` receives slot i of ``host``.
        slot_bytes: the unit handed out; cap is a multiple of ``segments * slot_bytes``.
        segments: number of equal segments of the ring.
        current_stream: returns the stream object of the launching (current) stream.
        new_event: returns an event with ``record(stream)`` and ``synchronize()``.
        copy_stream: optional side stream for the copies (see below), with
            ``set_stream`` making a stream current; streams have ``wait_event``.

    A call takes the next ceil(rows / slot_bytes) slots of the current
    segment, or starts the next segment when they do not fit. One-slot calls
    copy the whole slot through views made once, so staging costs a memmove
    and one ``copy_`` (bytes past the rows belong to the same call and are
    never read). Leaving a segment records one event on each stream that
    staged into it since it was entered, after those calls' copies and
    launches were enqueued; entering it again waits for those events, so a
    slot is rewritten only after every copy and kernel that used it has
    finished. The host waits only when the other segments are all still in
    flight (hundreds of calls). ``lock`` is held from staging to launch so
    that another thread cannot record a segment's event before this call's
    launch is enqueued.

    Side stream: a copy enqueued on the launching stream would run only after
    the previous kernel there, and its few microseconds of DMA latency would
    sit between two kernels of back-to-back calls (~5 % of a 64 MiB pack).
    On ``copy_stream`` it runs while the previous kernel still does, and the
    launching stream waits for its event, which has completed by then. Every
    copy precedes (by that wait) the kernel that reads it, so the segment
    events on the launching streams cover the copies too.
    """

    def __init__(
        self,
        host: torch.Tensor,
        dev: torch.Tensor,
        *,
        slot_bytes: int,
        segments: int,
        current_stream: Callable[[], Any],
        new_event: Callable[[], Any],
        copy_stream: Any = None,
        set_stream: Callable[[Any], None] | None = None,
    ) -> None:
        self.host, self.dev = host, dev
        self.copy_stream, self.set_stream = copy_stream, set_stream
        # One event serves every call: a stream's wait takes the event's latest record at the time of the wait.
        self.copy_event = new_event() if copy_stream is not None else None
        self.host_ptr, self.dev_ptr = host.data_ptr(), dev.data_ptr()
        self.slot_bytes = slot_bytes
        self.segments = segments
        self.seg_slots = host.numel() // (segments * slot_bytes)
        self.views = [
            (host[i * slot_bytes : (i + 1) * slot_bytes], dev[i * slot_bytes : (i + 1) * slot_bytes])
            for i in range(segments * self.seg_slots)
        ]
        self.cur = 0  # current segment
        self.head = 0  # next free slot
        self.end = self.seg_slots  # first slot past the current segment
        self.users: list[dict[int, Any]] = [{} for _ in range(segments)]  # per segment: raw stream -> stream
        self.guards: list[list[Any]] = [[] for _ in range(segments)]  # per segment: events to wait for
        self.spare: list[Any] = []  # completed events, reused
        self.current_stream = current_stream
        self.new_event = new_event
        self.lock = threading.Lock()

    def stage(self, rows: array, raw_stream: int) -> int | None:
        """Copy ``rows`` to the device on the current stream; the byte offset of the copy in ``dev``.

        Returns None when the rows are larger than a segment (the caller stages them another way).
        """
        nbytes = len(rows) * rows.itemsize
        k = -(-nbytes // self.slot_bytes)
        if k > self.seg_slots:
            return None
        if self.head + k > self.end:
            self._next_segment()
        i = self.head
        self.head = i + k
        users = self.users[self.cur]
        main = users.get(raw_stream)
        if main is None:
            main = users[raw_stream] = self.current_stream()
        off = i * self.slot_bytes
        ctypes.memmove(self.host_ptr + off, rows.buffer_info()[0], nbytes)
        if k == 1:
            h, d = self.views[i]
        else:
            h, d = self.host[off : off + nbytes], self.dev[off : off + nbytes]
        if self.copy_stream is None or not _SIDE_STREAM_COPY:
            d.copy_(h, non_blocking=True)
            return off
        # The copy runs on the side stream while the launching stream's queue
        # drains; the launching stream only waits for its event.
        self.set_stream(self.copy_stream)
        try:
            d.copy_(h, non_blocking=True)
        finally:
            self.set_stream(main)
        self.copy_event.record(self.copy_stream)
        main.wait_event(self.copy_event)
        return off

    def _next_segment(self) -> None:
        j = self.cur
        for stream in self.users[j].values():
            ev = self.spare.pop() if self.spare else self.new_event()
            ev.record(stream)
            self.guards[j].append(ev)
        self.users[j] = {}
        j = (j + 1) % self.segments
        for ev in self.guards[j]:
            ev.synchronize()  # returns at once when the event has completed
            self.spare.append(ev)
        self.guards[j] = []
        self.cur = j
        self.head = j * self.seg_slots
        self.end = self.head + self.seg_slots


_RINGS: dict[int, _IndexRing] = {}
_RINGS_LOCK = threading.Lock()


def _ring(device: torch.device) -> _IndexRing:
    """The index ring of a CUDA device, allocated on first use (call with ``device`` current)."""
    ring = _RINGS.get(device.index)
    if ring is None:
        with _RINGS_LOCK:
            ring = _RINGS.get(device.index)
            if ring is None:
                ring = _IndexRing(
                    torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True),
                    torch.empty(RING_BYTES, dtype=torch.uint8, device=device),
                    slot_bytes=RING_SLOT_BYTES,
                    segments=RING_SEGMENTS,
                    current_stream=lambda: torch.cuda.current_stream(device),
                    new_event=torch.cuda.Event,
                    copy_stream=torch.cuda.Stream(device),
                    set_stream=torch.cuda.set_stream,
                )
                _RINGS[device.index] = ring
    return ring


_get_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw_stream(index: int) -> int:
    """Handle of the current CUDA stream of device ``index`` (what Triton launches on)."""
    if _get_raw_stream is not None:
        return _get_raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def _launch_hooks_set() -> bool:
    """A Triton launch hook (a profiler) is installed: launches must take Triton's normal path."""
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def _is_compiled_kernel(obj: object) -> bool:
    from triton.compiler import CompiledKernel

    return isinstance(obj, CompiledKernel)


def _words(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``t`` (uint8 [m]) as words; a slab's trailing partial word (never part of a record) is cut off."""
    extra = t.numel() % plan.word_bytes
    return (t[: t.numel() - extra] if extra else t).view(plan.word_dtype)


def _launch(kernel, plan: _Plan, rows: array, n: int, a: torch.Tensor, b: torch.Tensor, *, b_words: bool) -> None:
    """One launch of ``kernel`` over n items; a, b: the source and destination (or sums) tensors.

    rows: the int64 [n, 3] index rows (layer, slot, record), validated.
    """
    if a.device.type == "cuda":
        _launch_cuda(kernel, plan, rows, n, a, b, b_words=b_words)
        return
    # CPU tensors: Triton's interpreter.
    aligned = (a.data_ptr() | b.data_ptr()) % 16 == 0
    idx = torch.frombuffer(rows, dtype=torch.int64)
    b_arg = _words(b, plan) if b_words else b
    kernel[(n * plan.chunks,)](_words(a, plan), b_arg, idx, plan.table, *plan.args[aligned], num_warps=plan.num_warps)


def _launch_cuda(kernel, plan: _Plan, rows: array, n: int, a: torch.Tensor, b: torch.Tensor, *, b_words: bool) -> None:
    """:func:`_launch` on a CUDA device: rows staged through the device's ring, cached compiled kernel."""
    device = a.device
    with _device_guard(device):
        raw = _raw_stream(device.index)
        ring = _ring(device)
        with ring.lock:
            off = ring.stage(rows, raw)
            if off is None:  # more rows than a ring segment holds: torch's pinned allocator guards the copy
                idx = torch.frombuffer(rows, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
                _run_cuda(kernel, plan, raw, idx.data_ptr(), lambda: idx, n, a, b, b_words=b_words)
            else:
                view = lambda: ring.dev[off : off + len(rows) * 8].view(torch.int64)
                _run_cuda(kernel, plan, raw, ring.dev_ptr + off, view, n, a, b, b_words=b_words)


def _run_cuda(
    kernel, plan: _Plan, raw: int, idx_ptr: int, idx_view, n: int, a: torch.Tensor, b: torch.Tensor, *, b_words: bool
) -> None:
    """Launch ``kernel`` on stream ``raw`` with index rows already on the device at ``idx_ptr``
    (``idx_view()``: the same rows as an int64 tensor, for Triton's normal launch path)."""
    grid = n * plan.chunks
    a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    aligned = (a_ptr | b_ptr) % 16 == 0
    args = plan.args[aligned]
    key = (id(kernel), aligned)
    direct = _DIRECT_LAUNCH and not _launch_hooks_set()
    entry = plan.compiled.get(key) if direct else None
    if entry is not None and entry[0] is kernel:
        compiled = entry[1]
        compiled.run(
            grid, 1, 1, raw, compiled.function, compiled.packed_metadata, None, None, None,
            a_ptr, b_ptr, idx_ptr, plan.table_ptr, *args,
        )  # fmt: skip
        return
    b_arg = _words(b, plan) if b_words else b
    compiled = kernel[(grid,)](_words(a, plan), b_arg, idx_view(), plan.table, *args, num_warps=plan.num_warps)
    if direct and _is_compiled_kernel(compiled):
        plan.compiled[key] = (kernel, compiled)  # the kernel held: its id is not reused


def _backend(device: torch.device, what: str) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "triton" if _INTERPRET else "torch"
    raise StoreError(f"{what}: tensors on {device} are not supported; expected a cuda or cpu device")


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: switch to ``device`` when it is another one."""
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return nullcontext()


# --------------------------------------------------------------------------
# host side: validation
# --------------------------------------------------------------------------
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


def _int_list(name: str, value: Sequence[object], what: str) -> list[int]:
    """A list / tuple / range of ints as a new list; bools, floats and other non-integers are refused."""
    vals = list(value)
    if all(type(v) is int for v in vals):  # the common case, one C-level pass
        return vals
    for i, v in enumerate(vals):
        if isinstance(v, bool):
            raise StoreError(f"{what}: {name}[{i}] must be an int, got bool {v!r}")
        try:
            vals[i] = operator.index(v)  # numpy integers, 0-d integer tensors
        except TypeError:
            raise StoreError(f"{what}: {name}[{i}] must be an int, got {type(v).__name__} {v!r}") from None
    return vals


def _index_values(name: str, value: object, device: torch.device, what: str) -> list[int] | torch.Tensor:
    """The entries of an index argument: a list, or the tensor itself when it lives on ``device`` (fetched later)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise StoreError(f"{what}: {name} must be torch.int64, got {value.dtype}")
        if value.dim() != 1:
            raise StoreError(f"{what}: {name} must be 1-D [n], got shape {tuple(value.shape)}")
        if value.device.type == "cpu":
            return value.tolist()
        if value.device != device:
            raise StoreError(f"{what}: {name} must be on cpu or on {device} (the storage's device), got {value.device}")
        return value
    if isinstance(value, (list, tuple, range)):
        return _int_list(name, value, what)
    raise StoreError(
        f"{what}: {name} must be a torch.Tensor (int64 [n]) or a list / tuple / range of ints, "
        f"got {type(value).__name__}"
    )


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


def _check_records_distinct(recs: list[int], what: str) -> None:
    _check_distinct(recs, lambda i: f"record {recs[i]}", what, "each record may be written once per call")


def _check_targets_distinct(layers: list[int], slots: list[int], layout: SlabLayout, what: str) -> None:
    s_count = layout.slots
    _check_distinct(
        [la * s_count + s for la, s in zip(layers, slots)],
        lambda i: f"(layer {layers[i]}, slot {slots[i]})",
        what,
        "each destination slot may be written once per call",
    )


class _Items(NamedTuple):
    layers: list[int]
    slots: list[int]
    records: list[int] | None  # None: records default to 0..n-1


def _prepare_items(
    storage: torch.Tensor, layout: SlabLayout, layers: object, slots: object, records: object | None, what: str
) -> _Items:
    """Validate indices on the host before anything is launched.

    Indices on the device are copied to the host together (one sync), so that
    no out-of-range index ever reaches a kernel.
    """
    dev = storage.device
    lay = _index_values("layers", layers, dev, what)
    n = len(lay)
    cols = [lay]
    for name, value in (("slots", slots), ("records", records)):
        if value is None:
            continue
        col = _index_values(name, value, dev, what)
        if len(col) != n:
            raise StoreError(f"{what}: {name} must have n = {n} entries (as many as layers), got {len(col)}")
        cols.append(col)
    on_device = [c for c in cols if isinstance(c, torch.Tensor)]
    if on_device:
        flat = torch.cat(on_device).tolist()  # the one sync
        k = 0
        for j, c in enumerate(cols):
            if isinstance(c, torch.Tensor):
                cols[j] = flat[k : k + n]
                k += n
    lay, slo = cols[0], cols[1]
    rec = cols[2] if records is not None else None
    _check_range("layers", lay, layout.num_layers, "the layout's number of layers L", what)
    _check_range("slots", slo, layout.slots, "the layout's slots per layer S", what)
    if rec and min(rec) < 0:
        i = next(i for i, r in enumerate(rec) if r < 0)
        raise StoreError(f"{what}: records[{i}] = {rec[i]} is negative; record indices start at 0")
    return _Items(lay, slo, rec)


def _rows(layers: list[int], slots: list[int], records: Sequence[int] | None) -> array:
    """The kernels' index rows: int64 [n, 3] (layer, slot, record), row-major, from validated indices."""
    n = len(layers)
    rows = array("q", bytes(24 * n))
    rows[0::3] = array("q", layers)
    rows[1::3] = array("q", slots)
    rows[2::3] = array("q", range(n) if records is None else records)
    return rows


def _rows_tensor(rows: array, n: int) -> torch.Tensor:
    """The rows as a CPU int64 [n, 3] tensor sharing the array's memory (for the torch reference)."""
    return torch.frombuffer(rows, dtype=torch.int64).view(n, 3)


# --------------------------------------------------------------------------
# public launchers
# --------------------------------------------------------------------------
def pack_records(
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: Indices,
    slots: Indices,
    *,
    out: torch.Tensor | None = None,
    records: Indices | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Gather n resident experts into transfer-slab records, in one launch.

    Args:
        storage: uint8 [L * layout.layer_bytes], one rank's resident slabs.
        layout: the SlabLayout of ``storage``.
        layers, slots: [n] indices of the experts to pack (may repeat): int64
            tensors on the CPU or storage's device, or lists / tuples / ranges
            of ints (the cheapest form: no tensor is built).
        out: optional uint8 [>= m * record_bytes] on storage's device, where m is
            the number of records used (n, or max(records) + 1); allocated when None.
        records: optional [n] indices (same forms), distinct: record index in
            ``out`` of item i (default i).
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
        _check_records_distinct(items.records, what)
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
        rows = _rows(items.layers, items.slots, items.records)
        if backend == "torch":
            idx = _rows_tensor(rows, n)
            _ref.pack_records_reference(storage, layout, idx[:, 0], idx[:, 1], out, idx[:, 2])
        else:
            plan = _plan("copy", layout, config, storage.device)
            _launch(_pack_records_kernel, plan, rows, n, storage, out, b_words=True)
    return out if out.numel() == need else out[:need]


def unpack_records(
    slab: torch.Tensor,
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: Indices,
    slots: Indices,
    *,
    records: Indices | None = None,
    config: KernelConfig | None = None,
) -> None:
    """Scatter transfer-slab records into resident (layer, slot) destinations, in one launch.

    Args:
        slab: uint8 [>= K * record_bytes] on storage's device; its first K whole records are readable.
        storage: uint8 [L * layout.layer_bytes], written in place.
        layout: the SlabLayout of ``storage``.
        layers, slots: [n] indices, distinct (layer, slot) pairs: int64 tensors
            on the CPU or storage's device, or lists / tuples / ranges of ints.
        records: optional [n] indices (same forms): record of ``slab`` copied to
            item i (default i); may repeat (one received record duplicated into several slots).
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
    if items.records is None:
        if n > cap:
            raise StoreError(
                f"{what}: {n} items read records 0..{n - 1}, but the slab's record capacity "
                f"({slab.numel()} bytes // record_bytes={spec.record_bytes}) is {cap}"
            )
    else:
        capacity = f"the slab's record capacity ({slab.numel()} bytes // record_bytes={spec.record_bytes})"
        _check_range("records", items.records, cap, capacity, what)
    lay, slo = items.layers, items.slots
    _check_targets_distinct(lay, slo, layout, what)
    if not n:
        return
    rows = _rows(lay, slo, items.records)
    if backend == "torch":
        idx = _rows_tensor(rows, n)
        _ref.unpack_records_reference(slab, storage, layout, idx[:, 0], idx[:, 1], idx[:, 2])
    else:
        plan = _plan("copy", layout, config, storage.device)
        _launch(_unpack_records_kernel, plan, rows, n, slab, storage, b_words=True)


class PreparedCopies:
    """Many pack / unpack launches over one storage, validated and staged at once.

    Each entry is checked as :func:`pack_records` / :func:`unpack_records` check their
    arguments, and the index rows of all entries go to the device in one copy; launching
    entry i then costs only the kernel launch (no per-call validation or staging). A
    rebalance prepares its rounds this way while the ranks' agreement is in flight.

    Args:
        storage: uint8 [L * layout.layer_bytes], one rank's resident slabs.
        layout: the SlabLayout of ``storage``.
        entries: per launch, ``(direction, layers, slots, records)``: "pack" gathers the
            (layer, slot) items into the given records of a buffer (records distinct), "unpack"
            scatters records of a buffer into the items ((layer, slot) distinct). Indices
            as lists / tuples / ranges of ints or int64 CPU tensors.
        config: kernel work decomposition (default DEFAULT_CONFIG).

    Raises:
        StoreError: as the launchers do, naming the entry; nothing is launched then.
    """

    def __init__(
        self,
        storage: torch.Tensor,
        layout: SlabLayout,
        entries: Sequence[tuple[str, Indices, Indices, Indices]],
        *,
        config: KernelConfig | None = None,
    ) -> None:
        what = "PreparedCopies"
        self.layout = _check_layout(layout, what)
        self.storage = _check_storage(storage, layout, what)
        self.backend = _backend(storage.device, what)
        self.plan = _plan("copy", layout, config or DEFAULT_CONFIG, storage.device)
        rows = array("q")
        self._entries: list[tuple[bool, int, int, int]] = []  # (pack, first row, n, records needed)
        for i, (direction, layers, slots, records) in enumerate(entries):
            where = f"{what} entry {i}"
            if direction not in ("pack", "unpack"):
                raise StoreError(f"{where}: direction must be 'pack' or 'unpack', got {direction!r}")
            items = _prepare_items(storage, layout, layers, slots, records, where)
            n = len(items.layers)
            recs = items.records if items.records is not None else list(range(n))
            if direction == "pack":
                _check_records_distinct(recs, where)
            else:
                _check_targets_distinct(items.layers, items.slots, layout, where)
            self._entries.append((direction == "pack", len(rows) // 3, n, max(recs) + 1 if n else 0))
            rows.extend(_rows(items.layers, items.slots, recs))
        self._rows = rows
        self._dev_rows: torch.Tensor | None = None
        if self.backend == "triton" and storage.device.type == "cuda" and len(rows):
            self._host_rows = torch.frombuffer(rows, dtype=torch.int64).pin_memory()  # held until we are dropped
            self._dev_rows = self._host_rows.to(storage.device, non_blocking=True)  # queued before every launch

    def __len__(self) -> int:
        return len(self._entries)

    def launch(self, i: int, buffer: torch.Tensor) -> None:
        """Run entry i with ``buffer`` (uint8, storage's device) as the records' slab."""
        pack, first, n, need = self._entries[i]
        what = f"PreparedCopies entry {i}"
        buffer = _check_byte_tensor("buffer", buffer, what)
        _check_same_device("buffer", buffer, self.storage.device, what)
        rb = self.layout.spec.record_bytes
        if buffer.numel() < need * rb:
            raise StoreError(f"{what}: buffer must hold {need} records ({need * rb} bytes), got {buffer.numel()}")
        _check_word_alignment("buffer", buffer, self.layout.spec.word_bytes, what)
        if not n:
            return
        a, b = (self.storage, buffer) if pack else (buffer, self.storage)
        kernel = _pack_records_kernel if pack else _unpack_records_kernel
        if self._dev_rows is not None:
            device = self.storage.device
            rows_ptr = self._dev_rows.data_ptr() + 24 * first  # int64 [n, 3] rows of this entry

            def view() -> torch.Tensor:  # only for Triton's normal launch path (first launch, profilers)
                return self._dev_rows[3 * first : 3 * (first + n)]

            with _device_guard(device):
                _run_cuda(kernel, self.plan, _raw_stream(device.index), rows_ptr, view, n, a, b, b_words=True)
            return
        rows = self._rows[3 * first : 3 * (first + n)]
        if self.backend == "torch":
            idx = _rows_tensor(rows, n)
            if pack:
                _ref.pack_records_reference(self.storage, self.layout, idx[:, 0], idx[:, 1], buffer, idx[:, 2])
            else:
                _ref.unpack_records_reference(buffer, self.storage, self.layout, idx[:, 0], idx[:, 1], idx[:, 2])
        else:
            _launch(kernel, self.plan, rows, n, a, b, b_words=True)


def resident_checksums(
    storage: torch.Tensor,
    layout: SlabLayout,
    layers: Indices,
    slots: Indices,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """int64 [n] on storage's device: checksum of resident expert (layers[i], slots[i]).

    Args:
        storage: uint8 [L * layout.layer_bytes].
        layout: the SlabLayout of ``storage``.
        layers, slots: [n] indices (may repeat): int64 tensors on the CPU or
            storage's device, or lists / tuples / ranges of ints.
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
    n = len(items.layers)
    if not n:
        return torch.zeros(0, dtype=torch.int64, device=storage.device)
    rows = _rows(items.layers, items.slots, None)
    if backend == "torch":
        idx = _rows_tensor(rows, n)
        return _ref.resident_checksums_reference(storage, layout, idx[:, 0], idx[:, 1])
    out = torch.zeros(n, dtype=torch.int64, device=storage.device)
    plan = _plan("resident-sum", layout, config, storage.device)
    _launch(_checksum_kernel, plan, rows, n, storage, out, b_words=False)
    return out


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
    if backend == "torch":
        if n == 0:
            return torch.zeros(0, dtype=torch.int64, device=slab.device)
        return _ref.slab_checksums_reference(slab, spec, n)
    out = torch.zeros(n, dtype=torch.int64, device=slab.device)
    if n:
        plan = _plan("slab-sum", spec, config, slab.device)
        rows = array("q", bytes(24 * n))
        rows[2::3] = array("q", range(n))
        _launch(_checksum_kernel, plan, rows, n, slab, out, b_words=False)
    return out

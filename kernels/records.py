"""Pack, unpack and checksum expert records: one Triton launch per call.

Symbols: L layers, S slots per layer, T tensors per expert, n experts in one call, K records a slab
holds, C chunks per expert, W = ``spec.word_bytes``.

Byte layouts (:mod:`expert_store.layout`, :mod:`expert_store.spec`)::

    resident: int64 [L, T] addresses   tensor t of (l, s) at addresses[l, t] + s*nbytes_t
    slab:     uint8 [K * record_bytes] tensor t of record r at r*record_bytes + record_offsets[t]

The address table (``ResidentSlabs.table``, built once) covers the engine's own tensors and one
allocation alike (there ``base + l*layer_bytes + region_offsets[t]``). Under Triton's interpreter
the loaded address becomes a pointer as on the GPU and is read as host memory: CPU tensors only
(CUDA tensors there take the reference).

Work decomposition: tensors are cut into chunks of ``chunk_bytes``, one row each of an int64 [C, 4]
device table per layout (region offset, slot stride, record offset, length; in words); a call's
items are int64 [n, 3] rows (layer, slot, record). Program k of the n * C moves chunk k % C of item
k // C, so programs do equal work whatever the shapes (a 29 MB DeepSeek-V3 w13 beside 3.5 KB scales
balances like bf16 experts). Only ``_chunk_addresses`` forms resident addresses: one load of the
address table per program (8 bytes beside a 128 KiB chunk).

16-byte vectors: both sides are viewed as words of U = W bytes (narrower, down to 1, where a table
address is: the checksum then gathers each W-byte word from W / U pieces), one path for every
dtype. When every tensor size is a multiple of 16 bytes and the slab and every table address are
16-byte aligned (checked per call; the table's once), so is
every chunk (regions 256-aligned, records 16-aligned, chunks multiples of 16), and ALIGNED's
``tl.multiple_of`` hints make each thread move 16-byte vectors (ld/st.global.v4 in the sm_90a PTX;
without them 4-byte accesses, several times slower). On the H200 (results/bench_kernels_*) pack and
unpack reach 93-98 % of torch's device copy when the host keeps up; checksums (three 64-bit
multiplies a word) are integer bound, 1.2-2.4 TB/s read.

Host cost: a 64 MiB pack is ~32-45 us of GPU time, so a call's host work must stay below that. A
call validates its indices in Python (device index tensors in one sync), stages its rows through the
device's pinned ring (:class:`_IndexRing`: no allocation, no sync) and launches once in
:func:`_run`, through the compiled kernel's launcher with raw addresses where :func:`launch_path`
allows. Pack of 72 MiB bf16 experts, host us per call / ratio to the copy back to back:
``kernel[grid]`` 68-112 / 33-57 %, direct 35-64 / 63-93 %, :class:`PreparedCopies` (rows staged
once) 17 / 93 %. Rows are staged per call: not for CUDA graph capture. CPU tensors run in Triton's
interpreter if ``TRITON_INTERPRET=1`` at import (the tests), else in the plain-torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime.interpreter import InterpretedFunction

from expert_store.checks import check_index, check_int, is_int
from expert_store.errors import SpecError, StoreError
from expert_store.layout import ResidentSlabs, SlabLayout
from expert_store.spec import ExpertSpec

from . import reference as _ref

__all__ = [
    "Indices",
    "PreparedCopies",
    "launch_path",
    "pack_records",
    "resident_checksums",
    "slab_checksums",
    "unpack_records",
]

Indices = torch.Tensor | Sequence[int]
"""Index argument of the launchers: int64 [n] tensor (CPU or the storage's device) or a list / tuple / range of ints."""


@dataclass(frozen=True)
class _Tuning:
    """Work decomposition of the kernels; the defaults won the second H200 sweep (2026-11-29,
    results/bench_kernels_h200_20261129.txt): mean 95.1 %, worst 92.9 % of the device copy back
    to back over bf16 and DeepSeek-V3 fp8 experts at 72-294 MiB, pack and unpack.

    chunk_bytes: 128 KiB. A 64 MiB slab makes ~512-700 programs, one to two waves of 132 SMs x 4;
        64 KiB chunks (the first sweep's pick) fell to 51 % on 72 MiB bf16 back to back.
    block_bytes / num_warps: 32 KiB per loop iteration over 16 warps, four 16-byte vectors per
        thread; 4 resident programs per SM keep ~128 KiB in flight, ~4x what Little's law asks of
        HBM3e. ptxas gives the copy 32 registers per thread: occupancy is not register bound.
    sum_block_bytes / sum_warps: checksums keep a uint64 accumulator per loaded word (64-80
        registers at 16 words per thread), so 16 KiB over 8 warps fits 3-4 programs per SM.
    """

    chunk_bytes: int = 128 * 1024
    block_bytes: int = 32 * 1024
    num_warps: int = 16
    sum_block_bytes: int = 16 * 1024
    sum_warps: int = 8

    def __post_init__(self) -> None:  # blocks feed tl.arange; chunks must keep their tensor's 16-byte alignment
        blocks = (self.block_bytes, self.sum_block_bytes)
        if self.chunk_bytes <= 0 or self.chunk_bytes % 16 or any(b < 16 or b & (b - 1) for b in blocks):
            raise StoreError(f"{self}: expected blocks powers of two >= 16 and chunk_bytes a positive multiple of 16")


_TUNING = _Tuning()

# Index ring of a device (_IndexRing): 2 MiB in 8 segments of 64 slots of 4 KiB. A call on up to 170
# experts (24 bytes each) takes one slot, up to 10922 a segment; larger ones stage through torch's
# pinned allocator. A segment is reused after the 7 others: hundreds of calls queue before the host waits.
RING_SLOT_BYTES = 4096
RING_SEGMENTS = 8
RING_BYTES = RING_SEGMENTS * 64 * RING_SLOT_BYTES

# ---- kernels ----
# Loops run CHUNK_BLOCKS (constexpr) iterations masked past the chunk's length: a fully masked
# iteration issues no memory traffic, and Triton's interpreter cannot take a loaded value as a
# range bound. No scalar argument differs per call (n is the grid, the items come through
# idx_ptr), so none needs do_not_specialize; T, record_words and C differ per layout only and
# stay specializable (the direct launch's cache is per plan). Pointers are never specialized on
# alignment: ALIGNED says it.
_POINTERS = ["res_ptr", "slab_ptr", "out_ptr", "idx_ptr", "table_ptr"]


@triton.jit
def _word_pointer(address, UNIT: tl.constexpr):
    """An int64 byte address as a pointer to UNIT-byte words (the kernels' one element type)."""
    if UNIT == 4:
        p = address.to(tl.pointer_type(tl.int32))
    elif UNIT == 2:
        p = address.to(tl.pointer_type(tl.int16))
    else:
        p = address.to(tl.pointer_type(tl.uint8))
    return p


@triton.jit
def _chunk_addresses(
    res_ptr, slab_ptr, idx_ptr, table_ptr, T, record_words, C,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, UNIT: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """Item, resident pointer (RESIDENT only), record pointer, record-relative offset and length
    (in UNIT-byte words) of this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)  # widened before it scales anything: n * C * words overflows int32
    item = pid // C
    chunk = pid - item * C
    record = tl.load(idx_ptr + item * 3 + 2)
    rec_off = tl.load(table_ptr + chunk * 5 + 3)
    length = tl.load(table_ptr + chunk * 5 + 4)
    rec_base = record * record_words + rec_off
    if ALIGNED:  # every size a multiple of 16 bytes = VEC words: chunk starts and lengths split into vectors
        rec_base = tl.multiple_of(rec_base, VEC)
        length = tl.multiple_of(length, VEC)
    res = slab_ptr  # unused unless RESIDENT
    if RESIDENT:
        layer = tl.load(idx_ptr + item * 3)
        slot = tl.load(idx_ptr + item * 3 + 1)
        tensor = tl.load(table_ptr + chunk * 5)
        start = tl.load(table_ptr + chunk * 5 + 1)
        stride = tl.load(table_ptr + chunk * 5 + 2)
        base = tl.load(res_ptr + layer * T + tensor)  # the one load table addressing adds
        offset = slot * stride + start
        if ALIGNED:
            offset = tl.multiple_of(offset, VEC)
        res = _word_pointer(base, UNIT) + offset
    return item, res, slab_ptr + rec_base, rec_off, length


@triton.jit(do_not_specialize_on_alignment=_POINTERS)
def _copy_kernel(
    res_ptr, slab_ptr, idx_ptr, table_ptr, T, record_words, C,  # res: int64 [L, T] addresses, slab: words
    BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    UNIT: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """PACK: resident -> slab, else slab -> resident; chunk pid % C of item pid // C."""
    _, res, rec, _, length = _chunk_addresses(
        res_ptr, slab_ptr, idx_ptr, table_ptr, T, record_words, C, ALIGNED, VEC, UNIT, True
    )
    if PACK:
        src = res
        dst = rec
    else:
        src = rec
        dst = res
    if ALIGNED:  # the host checked every address (a helper cannot set this: on a callee's argument it is dropped)
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < length
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize_on_alignment=_POINTERS)
def _checksum_kernel(
    res_ptr, slab_ptr, out_ptr, idx_ptr, table_ptr, T, record_words, C,  # out: int64 [n] sums
    BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    UNIT: tl.constexpr, FROM_SLAB: tl.constexpr, PIECES: tl.constexpr,
):  # fmt: skip
    """out[item] += mixed words of chunk pid % C of item pid // C (integer atomic adds commute: order-free).

    A checksum word is PIECES * UNIT = spec.word_bytes bytes; BLOCK counts checksum words."""
    item, res, rec, rec_off, length = _chunk_addresses(
        res_ptr, slab_ptr, idx_ptr, table_ptr, T, record_words, C, ALIGNED, VEC, UNIT, not FROM_SLAB
    )
    if FROM_SLAB:
        src = rec
    else:
        src = res
    if ALIGNED:
        src = tl.multiple_of(src, 16)
    words = length // PIECES
    first = rec_off // PIECES  # record offsets are 16-byte aligned: whole checksum words
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    for i in range(0, CHUNK_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < words
        w = tl.zeros([BLOCK], dtype=tl.uint64)
        for k in tl.static_range(PIECES):  # an address narrower than the word: little-endian pieces
            piece = tl.load(src + offs * PIECES + k, mask=mask, other=0)
            if UNIT == 4:  # zero-extend: reinterpret as unsigned first
                piece = piece.to(tl.uint32, bitcast=True)
            elif UNIT == 2:
                piece = piece.to(tl.uint16, bitcast=True)
            w = w | (piece.to(tl.uint64) << (8 * UNIT * k))
        p1 = (first + offs + 1).to(tl.uint64)  # record position of the word, plus one
        z = w + p1 * 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9  # uint64: >> is a logical shift
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        acc += tl.where(mask, z, tl.zeros_like(z))
    tl.atomic_add(out_ptr + item, tl.sum(acc, axis=0).to(tl.int64, bitcast=True), sem="relaxed")


# The triton.jit decorator chose interpreter or compiler at import: CPU tensors follow that choice.
_INTERPRET = isinstance(_copy_kernel, InterpretedFunction)
# The interpreter keeps the grid being run in module state: two threads launching at once (a rebalance
# job's staging thread and the stepping thread) corrupt each other's grid ("x >= grid_dim[0]", seen).
# Compiled launches and the torch reference are safe from several threads and take no lock.
_INTERPRETER_LOCK = threading.Lock() if _INTERPRET else None


# ---- host side: plans and the launch ----
class _Plan:
    """What launches of one mode ("pack", "unpack", "sum-resident" or "sum-slab") over one layout
    (a spec for "sum-slab") on one device in one word size need, built once. ``args[aligned]``:
    the arguments after the pointers, all functions of the plan's key, which the direct launch
    relies on (it caches its compiled kernels here, per ``aligned``).

    Chunk table rows, in ``unit``-byte words: (tensor, start in the slot's tensor, slot stride,
    record offset, length). ``unit`` is spec.word_bytes unless a resident address is narrower."""

    def __init__(
        self, mode: str, owner: SlabLayout | ExpertSpec, device: torch.device, tuning: _Tuning, unit: int
    ) -> None:
        slab_only = mode == "sum-slab"  # records only: the resident columns are zero and unused
        spec = owner if slab_only else owner.spec
        w, u, chunk = spec.word_bytes, unit, tuning.chunk_bytes
        stride = [0 if slab_only else ts.nbytes // u for ts in spec.tensors]
        rows = [
            [t, s // u, stride[t], (spec.record_offsets[t] + s) // u, min(chunk, ts.nbytes - s) // u]
            for t, ts in enumerate(spec.tensors)
            for s in range(0, ts.nbytes, chunk)
        ]
        self.mode, self.owner = mode, owner  # owner held: its id (in the key) stays unique
        self.dtype = _ref._WORD_DTYPE[u]
        self.reference = (device.type == "cpu") != _INTERPRET  # the interpreter reads addresses as host memory
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.table_ptr = self.table.data_ptr()
        self.chunks = len(rows)
        sums = mode.startswith("sum")
        self.kernel = _checksum_kernel if sums else _copy_kernel
        self.num_warps = tuning.sum_warps if sums else tuning.num_warps
        if sums:  # blocks of checksum words (w bytes), each gathered from w // u pieces
            block, tail = tuning.sum_block_bytes, (slab_only, w // u)
            loop = (tuning.sum_block_bytes // w, -(-chunk // tuning.sum_block_bytes))
        else:
            block, tail = tuning.block_bytes, (mode == "pack",)
            loop = (block // u, -(-chunk // block))
        head = (len(spec), spec.record_bytes // u, self.chunks, *loop)
        sizes_aligned = all(t.nbytes % 16 == 0 for t in spec.tensors)
        self.args = {a: (*head, a and sizes_aligned, max(1, 16 // u), u, *tail) for a in (False, True)}
        self.compiled: dict[bool, CompiledKernel] = {}


_PLANS: dict[tuple, _Plan] = {}


def _plan(
    mode: str, owner: SlabLayout | ExpertSpec, device: torch.device, unit: int | None = None, tuning: _Tuning = _TUNING
) -> _Plan:
    """The plan of ``mode``; ``unit``: the word size (None: spec.word_bytes)."""
    unit = (owner if mode == "sum-slab" else owner.spec).word_bytes if unit is None else unit
    key = (mode, id(owner), device, unit, tuning)
    plan = _PLANS.get(key)
    if plan is None or plan.owner is not owner:
        plan = _PLANS[key] = _Plan(mode, owner, device, tuning, unit)
    return plan


def _unit(slabs: ResidentSlabs) -> int:
    """Word size of the kernels over ``slabs``: spec.word_bytes, narrowed to what every address allows."""
    return min(slabs.spec.word_bytes, slabs.alignment)


# CompiledKernel.run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
# exit_hook, *args) is how triton 3.6's JITFunction.run launches (runtime/jit.py), measured above on 3.6.0.
# Other versions take Triton's public launch until their launcher has been read and measured too.
_DIRECT_VERSIONS = ("3.6",)


def launch_path(triton_version: str, device_type: str, hooks_installed: bool) -> str:
    """How a launch reaches the device: "direct" or "triton".

    "direct": the cached compiled kernel's launcher called with raw addresses, skipping Triton's
    per-call binding, specialization and cache lookup (sound: nothing Triton specializes on differs
    between two calls of one plan). Only on CUDA, on the Triton versions it was verified on, and
    while no launch hook (a profiler) is installed, so that hooks see every launch. Otherwise
    "triton": ``kernel[grid](...)``, also the first launch of a plan, which compiles and fills the
    cache; the cache does not follow Triton knobs changed after that (instrumentation).
    """
    verified = ".".join(triton_version.split(".")[:2]) in _DIRECT_VERSIONS
    direct = device_type == "cuda" and not hooks_installed and verified
    return "direct" if direct else "triton"


def _hooks_installed() -> bool:
    """Whether a Triton launch hook (a profiler) is installed: then every launch takes Triton's own path."""
    rt = triton.knobs.runtime
    return any(bool(getattr(h, "calls", h)) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _raw_stream(index: int) -> int:
    """Handle of the current CUDA stream of device ``index`` (what Triton launches on, found as Triton finds it)."""
    return torch._C._cuda_getCurrentRawStream(index)


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [m] as words; a slab's trailing partial word (never part of a record) is cut off."""
    size = t.numel() - t.numel() % dtype.itemsize
    return (t if size == t.numel() else t[:size]).view(dtype)


def _run(
    plan: _Plan,
    n: int,
    res: ResidentSlabs | None,
    slab: torch.Tensor | None,
    out: torch.Tensor | None,
    idx: torch.Tensor,
    start: int,
) -> None:
    """The one launch of every call: plan's kernel over n items, index rows ``idx[start : start + 3 * n]``
    (int64 on the device, which is current). res: the resident slabs (None for slab sums); slab:
    the uint8 records (None for resident sums); out: the int64 [n] sums (None for copies). On the
    CPU without the interpreter (and on CUDA under it), the torch reference instead."""
    if plan.reference:
        layers, slots, records = idx[start : start + 3 * n].view(n, 3).unbind(1)
        if plan.mode == "pack":
            _ref.pack_records_reference(res, plan.owner, layers, slots, slab, records)
        elif plan.mode == "unpack":
            _ref.unpack_records_reference(slab, res, plan.owner, layers, slots, records)
        elif plan.mode == "sum-resident":
            out.copy_(_ref.resident_checksums_reference(res, plan.owner, layers, slots))
        else:
            out.copy_(_ref.slab_checksums_reference(slab, plan.owner, n))
        return
    grid = n * plan.chunks
    res_t = plan.table if res is None else res.table  # slab sums read no address: any tensor will do
    slab_t = res_t if slab is None else slab
    aligned, fixed = _direct_args(plan, res, slab_t, out, idx.data_ptr() + 8 * start)
    sums = plan.kernel is _checksum_kernel
    hooks = _hooks_installed()
    direct = launch_path(triton.__version__, slab_t.device.type, hooks) == "direct"
    compiled = plan.compiled.get(aligned) if direct else None
    if compiled is not None:
        _direct(compiled, grid, _raw_stream(slab_t.device.index), fixed)
        return
    tensors = (res_t, slab_t if slab is None else _words(slab, plan.dtype), *((out,) if sums else ()))
    idx_arg = idx[start : start + 3 * n]
    with _INTERPRETER_LOCK or nullcontext():
        compiled = plan.kernel[(grid,)](*tensors, idx_arg, plan.table, *plan.args[aligned], num_warps=plan.num_warps)
    if direct and isinstance(compiled, CompiledKernel):
        plan.compiled[aligned] = compiled


def _direct_args(
    plan: _Plan, res: ResidentSlabs | None, slab_t: torch.Tensor, out: torch.Tensor | None, idx_ptr: int
) -> tuple[bool, tuple]:
    """(aligned, the launcher's arguments after the stream) of a direct launch: raw addresses of
    the address table, the records (any tensor for resident sums), the sums (for sums) and the
    index rows, then the plan's chunk table and constants."""
    res_t = plan.table if res is None else res.table
    aligned = _aligned(res, slab_t)
    sums = plan.kernel is _checksum_kernel
    ptrs = (res_t.data_ptr(), slab_t.data_ptr(), *((out.data_ptr(),) if sums else ()))
    return aligned, (*ptrs, idx_ptr, plan.table_ptr, *plan.args[aligned])


def _aligned(res: ResidentSlabs | None, slab_t: torch.Tensor) -> bool:
    """Whether a launch may take the 16-byte-access kernel: every resident address and the records 16-aligned."""
    return (res is None or res.alignment == 16) and slab_t.data_ptr() % 16 == 0


def _direct(compiled: CompiledKernel, grid: int, stream: int, fixed: tuple) -> None:
    """Launch ``compiled`` over ``grid`` programs on ``stream`` through its launcher (see :func:`launch_path`)."""
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *fixed)


def _nothing() -> None:
    """An entry of no items."""


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: switch to ``device`` when it is another one."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return nullcontext()


class _IndexRing:
    """Pinned host buffer and device buffer (RING_BYTES each) for the index rows of one device's launches.

    A call takes the next ceil(bytes / RING_SLOT_BYTES) slots of the current segment, or starts the
    next segment; one-slot calls copy a whole slot through views made once. Leaving a segment records
    an event on every stream that staged into it and entering it again waits for them, so a slot is
    rewritten only after every kernel that used it (and so its copy) finished. The copy runs on a
    side stream: on the launching stream its few us of DMA latency sat between back-to-back kernels
    (pack 72 MiB bf16: 75.7 % of the copy there, 93.2 % on the side stream). ``lock`` is held from
    staging to launch, so that no other thread records a segment's event before the launch is queued.
    """

    def __init__(self, device: torch.device) -> None:
        self.host = torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty(RING_BYTES, dtype=torch.uint8, device=device)
        self.rows = self.dev.view(torch.int64)
        self.host_ptr, self.index = self.host.data_ptr(), device.index
        self.copy_stream, self.copy_event = torch.cuda.Stream(device), torch.cuda.Event()
        s = RING_SLOT_BYTES
        self.views = [(self.host[i : i + s], self.dev[i : i + s]) for i in range(0, RING_BYTES, s)]
        self.seg_slots = len(self.views) // RING_SEGMENTS
        self.cur, self.head, self.end = 0, 0, self.seg_slots  # segment, next free slot, its end
        self.users: list[dict[int, torch.cuda.Stream]] = [{} for _ in range(RING_SEGMENTS)]
        self.guards: list[list[torch.cuda.Event]] = [[] for _ in range(RING_SEGMENTS)]
        self.lock = threading.Lock()

    def stage(self, ptr: int, nbytes: int) -> int | None:
        """Queue the copy of the ``nbytes`` of int64 rows at host address ``ptr`` for the current
        stream; their first index in ``self.rows``, or None when they exceed a segment."""
        k = -(-nbytes // RING_SLOT_BYTES)
        if k > self.seg_slots:
            return None
        if self.head + k > self.end:
            self._next_segment()
        i, self.head = self.head, self.head + k
        raw = _raw_stream(self.index)
        main = self.users[self.cur].get(raw)
        if main is None:
            main = self.users[self.cur][raw] = torch.cuda.current_stream(self.index)
        off = i * RING_SLOT_BYTES
        ctypes.memmove(self.host_ptr + off, ptr, nbytes)
        h, d = self.views[i] if k == 1 else (self.host[off : off + nbytes], self.dev[off : off + nbytes])
        torch.cuda.set_stream(self.copy_stream)
        try:
            d.copy_(h, non_blocking=True)
        finally:
            torch.cuda.set_stream(main)
        self.copy_event.record(self.copy_stream)  # a wait takes the event's latest record
        main.wait_event(self.copy_event)
        return off // 8

    def _next_segment(self) -> None:
        j = self.cur
        self.guards[j] = [stream.record_event() for stream in self.users[j].values()]
        self.users[j] = {}
        j = (j + 1) % RING_SEGMENTS
        for ev in self.guards[j]:
            ev.synchronize()  # returns at once when it has completed
        self.guards[j] = []
        self.cur, self.head, self.end = j, j * self.seg_slots, (j + 1) * self.seg_slots


_RINGS: dict[int, _IndexRing] = {}
_RINGS_LOCK = threading.Lock()


@contextmanager
def staged_rows(device: torch.device, ptr: int, nbytes: int) -> Iterator[tuple[torch.Tensor, int]]:
    """The ``nbytes`` of int64 rows at host address ``ptr`` on CUDA ``device``, for one launch made
    inside the block: yields (int64 tensor on the device, index of the first row). Through the
    device's index ring (no allocation, the copy on a side stream), or, for more rows than a ring
    segment holds, through torch's pinned allocator, which guards that copy until it has run."""
    with _device_guard(device):
        ring = _RINGS.get(device.index)
        if ring is None:
            with _RINGS_LOCK:
                ring = _RINGS.get(device.index) or _RINGS.setdefault(device.index, _IndexRing(device))
        with ring.lock:
            start = ring.stage(ptr, nbytes)
            if start is not None:
                yield ring.rows, start
                return
        host = torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.int64)
        yield host.pin_memory().to(device, non_blocking=True), 0


def _launch(plan: _Plan, n: int, device: torch.device, rows: array, *tensors) -> None:
    """Stage the validated index rows (int64 [n, 3]) on ``device``, then :func:`_run` with ``tensors``
    (res, slab, out)."""
    if device.type != "cuda":
        _run(plan, n, *tensors, torch.frombuffer(rows, dtype=torch.int64), 0)
        return
    with staged_rows(device, rows.buffer_info()[0], len(rows) * 8) as (idx, start):
        _run(plan, n, *tensors, idx, start)


# ---- host side: validation ----
def _check_bytes(name: str, t: object, spec: ExpertSpec, what: str, device=None, records: int = 0) -> torch.Tensor:
    """A contiguous 1-D uint8 tensor on ``device`` (None: on a cpu or cuda device) of at least
    ``records`` records, starting on a word boundary (the kernels view it as W-byte words)."""
    if not isinstance(t, torch.Tensor):
        raise StoreError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise StoreError(
            f"{what}: {name} must be a contiguous 1-D torch.uint8 tensor, "
            f"got {t.dtype} of shape {tuple(t.shape)} and stride {t.stride()}"
        )
    if device is None and t.device.type not in ("cpu", "cuda"):
        raise StoreError(f"{what}: tensors on {t.device} are not supported; expected a cuda or cpu device")
    if device is not None and t.device != device:
        raise StoreError(f"{what}: {name} must be on {device} (the storage's device), got {t.device}")
    w, rb = spec.word_bytes, spec.record_bytes
    if t.data_ptr() % w:
        raise StoreError(f"{what}: {name} must start on a {w}-byte boundary (spec word_bytes), got {t.data_ptr():#x}")
    if t.numel() < records * rb:
        raise StoreError(
            f"{what}: {name} must hold at least {records} records ({records * rb} bytes, record_bytes={rb}), "
            f"got {t.numel()} bytes"
        )
    return t


# Tables of plain uint8 storages (ResidentSlabs.over): (device, address, id(layout)) -> (layout, table).
# The table depends on the address and layout only, so a later allocation at the same address reuses
# it; no storage is held. Bounded: the oldest goes first.
_TABLES: dict[tuple, tuple[SlabLayout, torch.Tensor]] = {}
_TABLES_MAX = 64


def _check_storage(storage: object, layout: object, what: str) -> ResidentSlabs:
    """``storage`` (ResidentSlabs of ``layout``, or its one uint8 allocation) as ResidentSlabs."""
    if not isinstance(layout, SlabLayout):
        raise SpecError(f"{what}: layout must be a SlabLayout, got {type(layout).__name__}")
    if isinstance(storage, ResidentSlabs):
        if storage.layout != layout:
            raise StoreError(f"{what}: storage is ResidentSlabs of another layout than the one given")
        if storage.device.type not in ("cpu", "cuda"):
            raise StoreError(f"{what}: tensors on {storage.device} are not supported; expected a cuda or cpu device")
        return storage
    storage = _check_bytes("storage", storage, layout.spec, what)
    if storage.numel() != layout.total_bytes:
        raise StoreError(
            f"{what}: storage must hold layout.total_bytes = {layout.total_bytes} bytes "
            f"(L={layout.num_layers} x layer_bytes={layout.layer_bytes}), got {storage.numel()}"
        )
    key = (storage.device, storage.data_ptr(), id(layout))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is layout:
        return ResidentSlabs.over(storage, layout, hit[1])
    slabs = ResidentSlabs.over(storage, layout)
    if len(_TABLES) >= _TABLES_MAX:
        del _TABLES[next(iter(_TABLES))]
    _TABLES[key] = (layout, slabs.table)
    return slabs


def _index_values(name: str, value: object, device: torch.device, what: str) -> list[int] | torch.Tensor:
    """An index argument as a new list, or the tensor itself when it lives on ``device`` (fetched later)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.dim() != 1:
            raise StoreError(
                f"{what}: {name} must be a 1-D torch.int64 [n], got {value.dtype} of shape {tuple(value.shape)}"
            )
        if value.device.type == "cpu":
            return value.tolist()
        if value.device != device:
            raise StoreError(f"{what}: {name} must be on cpu or on {device} (the storage's device), got {value.device}")
        return value
    if not isinstance(value, (list, tuple, range)):
        raise StoreError(
            f"{what}: {name} must be a torch.Tensor (int64 [n]) or a list / tuple / range of ints, "
            f"got {type(value).__name__}"
        )
    vals = list(value)
    if all(type(v) is int for v in vals):  # the common case, one C-level pass
        return vals
    for i, v in enumerate(vals):
        if not is_int(v):  # bools, floats, strings; numpy integers and 0-d integer tensors pass
            raise StoreError(f"{what}: {name}[{i}] must be an int, got {type(v).__name__} {v!r}")
    return [operator.index(v) for v in vals]


def _check_range(name: str, values: list[int], upper: int, meaning: str, what: str) -> None:
    if values and (min(values) < 0 or max(values) >= upper):
        bad = [i for i, v in enumerate(values) if not 0 <= v < upper]
        raise StoreError(
            f"{what}: {name}[{bad[0]}] = {values[bad[0]]} is out of range: {meaning} is {upper} "
            f"(valid 0..{upper - 1}); {len(bad)} bad entries in all"
        )


def _check_distinct(keys: Sequence[int], describe, what: str, why: str) -> None:
    """Raise if ``keys`` repeats a value; describe(i) names the target of item i."""
    first: dict[int, int] = {}
    for i, k in enumerate(keys if len(set(keys)) < len(keys) else ()):
        if first.setdefault(k, i) != i:
            raise StoreError(f"{what}: items {first[k]} and {i} both target {describe(i)}; {why}")


def _rows(layers: list[int], slots: list[int], records: Sequence[int]) -> array:
    """The kernels' index rows: int64 [n, 3] (layer, slot, record), row-major."""
    rows = array("q", bytes(24 * len(layers)))
    rows[0::3], rows[1::3], rows[2::3] = array("q", layers), array("q", slots), array("q", records)
    return rows


def _entry(
    pack: bool, slabs: ResidentSlabs, layout: SlabLayout, layers, slots, records, what: str
) -> tuple[array, int, int]:
    """One validated call: its index rows, n and the records it needs (max record + 1). Device index
    tensors are fetched together (one sync), so no out-of-range index ever reaches a kernel.
    pack: records distinct (each written once); unpack: (layer, slot) pairs distinct."""
    device = slabs.device
    cols = [_index_values("layers", layers, device, what), _index_values("slots", slots, device, what)]
    if records is not None:
        cols.append(_index_values("records", records, device, what))
    n = len(cols[0])
    for name, c in zip(("slots", "records"), cols[1:]):
        if len(c) != n:
            raise StoreError(f"{what}: {name} must have n = {n} entries (as many as layers), got {len(c)}")
    on_device = [c for c in cols if isinstance(c, torch.Tensor)]
    if on_device:
        flat = iter(torch.cat(on_device).tolist())  # the one sync
        cols = [[next(flat) for _ in range(n)] if isinstance(c, torch.Tensor) else c for c in cols]
    lay, slo = cols[0], cols[1]
    _check_range("layers", lay, layout.num_layers, "the layout's number of layers L", what)
    _check_range("slots", slo, layout.slots, "the layout's slots per layer S", what)
    if records is None:
        rec, need = range(n), n
    else:
        rec = cols[2]
        if rec and min(rec) < 0:
            i = next(i for i, r in enumerate(rec) if r < 0)
            raise StoreError(f"{what}: records[{i}] = {rec[i]} is negative; record indices start at 0")
        if pack:
            _check_distinct(rec, lambda i: f"record {rec[i]}", what, "each record may be written once per call")
        need = max(rec) + 1 if n else 0
    if not pack:
        _check_distinct(
            [la * layout.slots + s for la, s in zip(lay, slo)],
            lambda i: f"(layer {lay[i]}, slot {slo[i]})",
            what,
            "each destination slot may be written once per call",
        )
    return _rows(lay, slo, rec), n, need


def _copy(pack, storage, layout, layers, slots, records, buf, what: str, tuning: _Tuning = _TUNING) -> torch.Tensor:
    """pack_records / unpack_records: validate everything, then one launch; the used prefix of ``buf``."""
    slabs = _check_storage(storage, layout, what)
    rows, n, need = _entry(pack, slabs, layout, layers, slots, records, what)
    rb, device = layout.spec.record_bytes, slabs.device
    if buf is None:
        buf = torch.empty(need * rb, dtype=torch.uint8, device=device)
    buf = _check_bytes("out" if pack else "slab", buf, layout.spec, what, device, need)
    if n:
        plan = _plan("pack" if pack else "unpack", layout, device, _unit(slabs), tuning)
        _launch(plan, n, device, rows, slabs, buf, None)
    return buf if buf.numel() == need * rb else buf[: need * rb]


# ---- public launchers ----
def pack_records(
    storage: ResidentSlabs | torch.Tensor,
    layout: SlabLayout,
    layers: Indices,
    slots: Indices,
    *,
    out: torch.Tensor | None = None,
    records: Indices | None = None,
) -> torch.Tensor:
    """Gather n resident experts into transfer-slab records, in one launch.

    Args:
        storage: one rank's resident slabs: a :class:`~expert_store.layout.ResidentSlabs` of
            ``layout`` (its own allocation or the engine's tensors), or the one uint8
            [L * layout.layer_bytes] allocation such slabs own.
        layout: the SlabLayout of ``storage``.
        layers, slots: [n] indices of the experts to pack (may repeat): int64 tensors on the
            CPU or storage's device, or lists / tuples / ranges of ints (the cheapest form).
        out: optional uint8 [>= m * record_bytes] on storage's device, where m is the number of
            records used (n, or max(records) + 1); allocated when None.
        records: optional [n] indices (same forms), distinct: record of ``out`` for item i (default i).

    Returns:
        uint8 [m * record_bytes], the used prefix of ``out``. Padding bytes inside records, and
        records no item names, are left as they were.

    Raises:
        StoreError: bad dtype / shape / device, an index out of range, repeated records, or
            ``out`` too small. Nothing is written then.
    """
    return _copy(True, storage, layout, layers, slots, records, out, "pack_records")


def unpack_records(
    slab: torch.Tensor,
    storage: ResidentSlabs | torch.Tensor,
    layout: SlabLayout,
    layers: Indices,
    slots: Indices,
    *,
    records: Indices | None = None,
) -> None:
    """Scatter transfer-slab records into resident (layer, slot) destinations, in one launch.

    Args:
        slab: uint8 [>= K * record_bytes] on storage's device; its first K whole records are readable.
        storage: the resident slabs (forms as in :func:`pack_records`), written in place.
        layout: the SlabLayout of ``storage``.
        layers, slots: [n] indices, distinct (layer, slot) pairs (forms as in :func:`pack_records`).
        records: optional [n] indices (same forms): record copied to item i (default i); may
            repeat (one received record duplicated into several slots).

    Padding bytes of the records are never read; bytes of ``storage`` outside the named slots'
    tensors are never written.

    Raises:
        StoreError: bad dtype / shape / device, an index out of range (a record >= K included),
            or a (layer, slot) named twice. Nothing is written then.
    """
    _copy(False, storage, layout, layers, slots, records, slab, "unpack_records")


class PreparedCopies:
    """Many pack / unpack launches over one storage, validated and staged at once.

    Each entry is checked as :func:`pack_records` / :func:`unpack_records` check theirs, and the index
    rows of all entries go to the device in one copy on the current stream; launching entry i then
    costs only the launch (a rebalance prepares its rounds while the ranks' agreement is in flight).

    Args:
        storage: one rank's resident slabs: a :class:`~expert_store.layout.ResidentSlabs` of
            ``layout`` (its own allocation or the engine's tensors), or the one uint8
            [L * layout.layer_bytes] allocation such slabs own.
        layout: the SlabLayout of ``storage``.
        entries: per launch, ``(direction, layers, slots, records)``: "pack" gathers the (layer,
            slot) items into the given records of a buffer (records distinct, None: 0..n-1),
            "unpack" scatters records of a buffer into the items ((layer, slot) distinct).

    Raises:
        StoreError: as the launchers do, naming the entry; nothing is launched then.
    """

    def __init__(
        self,
        storage: ResidentSlabs | torch.Tensor,
        layout: SlabLayout,
        entries: Sequence[tuple[str, Indices, Indices, Indices | None]],
    ) -> None:
        what = "PreparedCopies"
        self.slabs, self.layout = _check_storage(storage, layout, what), layout
        storage, unit = self.slabs, _unit(self.slabs)
        rows = array("q")
        self._entries: list[tuple[_Plan, int, int, int]] = []  # (plan, first index in rows, n, records needed)
        for i, (direction, layers, slots, records) in enumerate(entries):
            where = f"{what} entry {i}"
            if direction not in ("pack", "unpack"):
                raise StoreError(f"{where}: direction must be 'pack' or 'unpack', got {direction!r}")
            r, n, need = _entry(direction == "pack", storage, layout, layers, slots, records, where)
            self._entries.append((_plan(direction, layout, storage.device, unit), len(rows), n, need))
            rows.extend(r)
        self._rows = rows  # the CPU tensor below shares its memory
        self._idx = torch.frombuffer(rows, dtype=torch.int64) if rows else torch.zeros(0, dtype=torch.int64)
        if storage.device.type == "cuda":
            with _device_guard(storage.device):
                self._host = self._idx.pin_memory()  # held until the copy has surely completed
                self._idx = self._host.to(storage.device, non_blocking=True)
                self._stream = _raw_stream(storage.device.index)
                self._copied = torch.cuda.Event()
                self._copied.record()

    def __len__(self) -> int:
        return len(self._entries)

    def launch(self, i: int, buffer: torch.Tensor) -> None:
        """Run entry i with ``buffer`` (uint8, storage's device) as the records' slab."""
        plan, first, n, need = self._entries[check_index(i, "i", len(self._entries), where="PreparedCopies.launch")]
        device = self.slabs.device
        buffer = _check_bytes("buffer", buffer, self.layout.spec, f"PreparedCopies entry {i}", device, need)
        if not n:
            return
        with _device_guard(device):
            if device.type == "cuda" and _raw_stream(device.index) != self._stream:
                torch.cuda.current_stream(device).wait_event(self._copied)  # the rows were copied on another stream
            _run(plan, n, self.slabs, buffer, None, self._idx, first)

    def compile(self, buffer: torch.Tensor) -> None:
        """Compile (or load from Triton's cache) and load the kernels of every entry for record
        slabs aligned as ``buffer`` (uint8, the storage's device), without launching anything:
        the first launch of a kernel in a process otherwise pays that inside the call (15-17 ms
        measured on the H200 host, where a rebalance job's first switch took it between two
        forward passes). CUDA only; elsewhere nothing is compiled ahead."""
        device = self.slabs.device
        if device.type != "cuda" or launch_path(triton.__version__, device.type, False) != "direct":
            return
        buffer = _check_bytes("buffer", buffer, self.layout.spec, "PreparedCopies.compile", device)
        aligned = _aligned(self.slabs, buffer)
        with _device_guard(device):
            for plan, _, n, _ in self._entries:
                if n and aligned not in plan.compiled:
                    tensors = (self.slabs.table, _words(buffer, plan.dtype))
                    compiled = plan.kernel.warmup(
                        *tensors, self._idx, plan.table, *plan.args[aligned], grid=(1,), num_warps=plan.num_warps
                    )
                    compiled = compiled.result() if hasattr(compiled, "result") else compiled  # (async compiles)
                    if isinstance(compiled, CompiledKernel):
                        _ = compiled.run  # loads the module now (the launcher's first use would)
                        plan.compiled[aligned] = compiled

    def launcher(self, i: int, buffer: torch.Tensor) -> Callable[[], None]:
        """Entry i with ``buffer`` checked now: each call of the function returned runs it on the
        current stream, as :meth:`launch` does, for about the cost of the launch alone (the
        addresses and arguments are resolved here). A rebalance job binds a layer's switch once
        its staging is complete and calls it between two forward passes, where the host time
        counts: a launch through :meth:`launch` measured 110-150 us of host time on the H200
        host, most of it checks and argument building. ``buffer`` must stay allocated."""
        plan, first, n, need = self._entries[check_index(i, "i", len(self._entries), where="PreparedCopies.launcher")]
        device = self.slabs.device
        buffer = _check_bytes("buffer", buffer, self.layout.spec, f"PreparedCopies entry {i}", device, need)
        if not n:
            return _nothing
        if plan.reference or launch_path(triton.__version__, device.type, False) != "direct":
            return functools.partial(self.launch, i, buffer)
        aligned, fixed = _direct_args(plan, self.slabs, buffer, None, self._idx.data_ptr() + 8 * first)
        grid, index, waited = n * plan.chunks, device.index, {self._stream}

        def run() -> None:
            compiled = plan.compiled.get(aligned)
            if compiled is None or _hooks_installed() or torch.cuda.current_device() != index:
                self.launch(i, buffer)  # the first launch compiles; hooks and other devices take the checked path
                return
            stream = _raw_stream(index)
            if stream not in waited:
                torch.cuda.current_stream(device).wait_event(self._copied)  # the rows were copied on another stream
                waited.add(stream)
            _direct(compiled, grid, stream, fixed)

        return run


def resident_checksums(
    storage: ResidentSlabs | torch.Tensor, layout: SlabLayout, layers: Indices, slots: Indices
) -> torch.Tensor:
    """int64 [n] on storage's device: checksum of resident expert (layers[i], slots[i]).

    storage, layers, slots: as in :func:`pack_records` (indices may repeat). The checksum is
    defined in :mod:`expert_store.kernels.reference`; it equals :func:`slab_checksums` of a
    record holding the same expert.
    """
    what = "resident_checksums"
    slabs = _check_storage(storage, layout, what)
    rows, n, _ = _entry(True, slabs, layout, layers, slots, None, what)
    out = torch.zeros(n, dtype=torch.int64, device=slabs.device)
    if n:
        _launch(_plan("sum-resident", layout, slabs.device, _unit(slabs)), n, slabs.device, rows, slabs, None, out)
    return out


def slab_checksums(slab: torch.Tensor, spec: ExpertSpec, n: int) -> torch.Tensor:
    """int64 [n] on slab's device: checksum of records 0..n-1 of ``slab`` (uint8 [>= n * record_bytes]).

    Padding bytes inside records are not read.
    """
    what = "slab_checksums"
    if not isinstance(spec, ExpertSpec):
        raise SpecError(f"{what}: spec must be an ExpertSpec, got {type(spec).__name__}")
    n = check_int(n, "n", low=0, where=what)
    slab = _check_bytes("slab", slab, spec, what, None, n)
    out = torch.zeros(n, dtype=torch.int64, device=slab.device)
    if n:
        _launch(
            _plan("sum-slab", spec, slab.device), n, slab.device, _rows([0] * n, [0] * n, range(n)), None, slab, out
        )
    return out

"""Gather arbitrary tensors into one uint8 slab, and scatter a slab back into tensors: one launch per call.

A *piece* is a whole contiguous tensor of any dtype and shape (a weight row ``w[slot]``, a block of
fp32 scales, a byte range ``w[s].view(-1).view(torch.uint8)[a:b]``). :func:`gather_pieces` copies
each piece's bytes to its byte offset in the slab; :func:`scatter_pieces` copies slab bytes at an
offset into each piece. Whatever the number of pieces, dtypes and shapes, a call is one launch.

Work decomposition: the host writes one int64 row per *span* (a piece, or its aligned / unaligned
parts) into a table (source address, destination address, bytes, width); program (k, c) moves
chunk c (``chunk_bytes``) of span k, on a grid of (spans, chunks of the longest span), so a 29 MB
DeepSeek-V3 w13 row beside 3.5 KB of scales balances like equal pieces (the scales' extra programs
find an empty mask and end).
Addresses are raw (``data_ptr()``), which is what lets one launch address tensors of unrelated
allocations.

Widths: a piece whose source and destination addresses agree modulo 16 is cut into a byte head up to
the next 16-byte boundary, a body of whole 16-byte vectors (width 16: 4-byte words with
``tl.multiple_of`` hints, so each thread moves 16-byte vectors) and a byte tail. Addresses that agree
only modulo 4 get 4-byte words without the hints (width 4); anything else moves byte by byte (width
1). Every vLLM/SGLang weight row of a 16-aligned allocation whose size is a multiple of 16 bytes is
all width 16.

Interpreter (``TRITON_INTERPRET=1``, the CPU tests): in Triton 3.6 an int64 address converted with
``.to(tl.pointer_type(...))`` is dereferenced by the interpreter as process memory, so the kernel's
raw-address path runs unchanged on CPU tensors and the tests exercise the real kernel logic (the
spans, widths, masks), not a substitute. CPU tensors without the interpreter use the torch reference
(:func:`gather_pieces_reference`, :func:`scatter_pieces_reference`), which is also the test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime.interpreter import InterpretedFunction

from expert_store.checks import is_int
from expert_store.errors import StoreError

from .records import _hooks_installed, _raw_stream, launch_path, staged_rows

__all__ = [
    "gather_pieces",
    "gather_pieces_reference",
    "scatter_pieces",
    "scatter_pieces_reference",
]


@dataclass(frozen=True)
class _Tuning:
    """Spans of ``chunk_bytes``; each program loops over ``block_words`` 4-byte words per iteration.

    The GPU values follow records.py's sweep (128 KiB chunks, 32 KiB per iteration over 16 warps).
    The interpreter runs every lane of a masked iteration in numpy, so it gets small blocks: the
    tests then cost milliseconds, and their odd sizes still cross several iterations and spans."""

    chunk_bytes: int
    block_words: int
    num_warps: int

    @property
    def chunk_blocks(self) -> int:
        return -(-self.chunk_bytes // (4 * self.block_words))

    @property
    def chunk(self) -> int:
        """Bytes of one program's chunk, as the kernel computes it."""
        return self.chunk_blocks * 4 * self.block_words


_GPU = _Tuning(chunk_bytes=128 * 1024, block_words=8192, num_warps=16)
_INTERPRETER = _Tuning(chunk_bytes=512, block_words=32, num_warps=4)


@triton.jit
def _span_copy(table_ptr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    """Program (k, c) copies chunk c (CHUNK_BLOCKS * BLOCK words) of span k: table row (src address,
    dst address, bytes, width). Chunks past a span's end copy nothing (their masks are empty)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4
    start = tl.program_id(1).to(tl.int64) * (CHUNK_BLOCKS * BLOCK * 4)  # bytes before this chunk
    src = tl.load(row) + start
    dst = tl.load(row + 1) + start
    nbytes = tl.minimum(tl.load(row + 2) - start, CHUNK_BLOCKS * BLOCK * 4)  # <= 0: nothing to copy
    width = tl.load(row + 3)
    if width == 16:  # the host checked both addresses and the size: whole 16-byte vectors
        s = tl.multiple_of(src.to(tl.pointer_type(tl.int32)), 16)
        d = tl.multiple_of(dst.to(tl.pointer_type(tl.int32)), 16)
        words = tl.multiple_of(tl.maximum(nbytes, 0) // 4, 4)  # chunks start on 16-byte multiples
        for i in range(0, CHUNK_BLOCKS):
            offs = i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < words
            tl.store(d + offs, tl.load(s + offs, mask=mask), mask=mask)
    elif width == 4:
        s4 = src.to(tl.pointer_type(tl.int32))
        d4 = dst.to(tl.pointer_type(tl.int32))
        words4 = nbytes // 4
        for i in range(0, CHUNK_BLOCKS):
            offs = i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < words4
            tl.store(d4 + offs, tl.load(s4 + offs, mask=mask), mask=mask)
    else:  # bytes: heads, tails and addresses that never align (4x the iterations of a word loop)
        s1 = src.to(tl.pointer_type(tl.uint8))
        d1 = dst.to(tl.pointer_type(tl.uint8))
        for i in range(0, 4 * CHUNK_BLOCKS):
            offs = i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < nbytes
            tl.store(d1 + offs, tl.load(s1 + offs, mask=mask), mask=mask)


# The triton.jit decorator chose interpreter or compiler at import: CPU tensors follow that choice.
_INTERPRET = isinstance(_span_copy, InterpretedFunction)


# ---- host side: the span table ----
def _segments(src: np.ndarray, dst: np.ndarray, size: np.ndarray, align: int) -> tuple[np.ndarray, ...]:
    """Cut copies whose addresses agree modulo ``align`` into (head, body, tail); the others are
    returned whole. Returns (src, dst, size, width) of every non-empty segment; width is ``align``
    for bodies, 1 for the rest."""
    co = (src % align) == (dst % align)
    head = np.where(co, np.minimum((-src) % align, size), size)  # not co-aligned: all of it is "head"
    body = np.where(co, (size - head) // align * align, 0)
    tail = size - head - body
    s = np.concatenate([src, src + head, src + head + body])
    d = np.concatenate([dst, dst + head, dst + head + body])
    n = np.concatenate([head, body, tail])
    w = np.concatenate([np.ones_like(head), np.full_like(body, align), np.ones_like(tail)])
    keep = n > 0
    return s[keep], d[keep], n[keep], w[keep]


def _span_table(src: np.ndarray, dst: np.ndarray, size: np.ndarray) -> np.ndarray:
    """int64 [k, 4] rows (src address, dst address, bytes, width), one per span: a piece, or its
    head / body / tail where only part of it aligns. The kernel cuts spans into chunks itself:
    cutting them here cost 76 us per call of 58 pieces (2,088 rows, 256 MiB) on an H200's host,
    half of the call's host work, against about 10 us for one row per piece."""
    if not ((src | dst | size) % 16).any():  # the usual case: engine rows and slab offsets all 16-aligned
        keep = size > 0
        s, d, n = src[keep], dst[keep], size[keep]
        w = np.full_like(n, 16)
    else:
        s, d, n, w = _segments(src, dst, size, 16)
        narrow = w == 1  # what is left: cut again at 4-byte agreement (a 4-aligned fp32 piece at an odd offset)
        s4, d4, n4, w4 = _segments(s[narrow], d[narrow], n[narrow], 4)
        s, d, n, w = (np.concatenate([a[~narrow], b]) for a, b in ((s, s4), (d, d4), (n, n4), (w, w4)))
    return np.stack([s, d, n, w], axis=1)


def _one_chunk_rows(table: np.ndarray, chunk: int) -> np.ndarray:
    """``table``'s spans cut into rows of at most ``chunk`` bytes (same layout, int64 [k', 4])."""
    count = -(-table[:, 2] // chunk)
    rep = np.repeat(np.arange(len(table)), count)
    within = (np.arange(len(rep), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)) * chunk
    out = table[rep].copy()
    out[:, 0] += within
    out[:, 1] += within
    out[:, 2] = np.minimum(out[:, 2] - within, chunk)
    return out


def _launch(device: torch.device, src: np.ndarray, dst: np.ndarray, size: np.ndarray) -> None:
    """The one launch of a call: copy size[i] bytes from address src[i] to dst[i] (all validated).
    Grid: (spans, chunks of the longest span)."""
    tuning = _INTERPRETER if _INTERPRET else _GPU
    table = _span_table(src, dst, size)
    if not len(table):
        return
    if _INTERPRET:
        # The interpreter runs every program in Python, empty ones too: rows of one chunk each, so
        # the grid holds only programs with work (a (span, chunk) grid made the CPU tests' calls
        # with one large piece beside small ones run thousands of empty programs).
        table = _one_chunk_rows(table, tuning.chunk)
    grid = (len(table), -(-int(table[:, 2].max()) // tuning.chunk))
    if grid[1] > 65535:  # CUDA's limit on a grid's second dimension
        raise StoreError(f"pieces: a piece of {int(table[:, 2].max())} bytes exceeds {65535 * tuning.chunk} bytes")
    rows = torch.from_numpy(table)
    if device.type != "cuda":
        _span_copy[grid](rows, tuning.block_words, tuning.chunk_blocks, num_warps=tuning.num_warps)
        return
    # The table goes to the device as records.py's index rows do (its ring: no allocation per call).
    with staged_rows(device, table.ctypes.data, table.nbytes) as (rows, start):
        if _COMPILED and launch_path(triton.__version__, "cuda", _hooks_installed()) == "direct":
            # The cached launcher with the raw table address, as records.py launches (Triton's
            # per-call binding and cache lookup cost more than the rest of a small call's host work).
            k = _COMPILED[0]
            k.run(*grid, 1, _raw_stream(device.index), k.function, k.packed_metadata, None, None, None,
                  rows.data_ptr() + 8 * start, tuning.block_words, tuning.chunk_blocks)  # fmt: skip
            return
        compiled = _span_copy[grid](
            rows[start : start + table.size], tuning.block_words, tuning.chunk_blocks, num_warps=tuning.num_warps
        )
        if isinstance(compiled, CompiledKernel) and not _COMPILED:
            _COMPILED.append(compiled)


_COMPILED: list[CompiledKernel] = []  # the GPU kernel once compiled (one tuning, no specialization on the table)


# ---- host side: validation ----
def _check_slab(slab: object, what: str) -> torch.Tensor:
    if not isinstance(slab, torch.Tensor):
        raise StoreError(f"{what}: slab must be a torch.Tensor, got {type(slab).__name__}")
    if slab.dtype != torch.uint8 or slab.dim() != 1 or not slab.is_contiguous():
        raise StoreError(
            f"{what}: slab must be a contiguous 1-D torch.uint8 tensor, got {slab.dtype} of shape "
            f"{tuple(slab.shape)} and stride {slab.stride()}"
        )
    if slab.device.type not in ("cpu", "cuda"):
        raise StoreError(f"{what}: tensors on {slab.device} are not supported; expected a cuda or cpu device")
    return slab


def _check_pieces(
    pieces: object, slab: torch.Tensor, what: str, *, tensor_first: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor addresses, slab offsets, sizes) of validated pieces; raises naming the first bad piece."""
    if not isinstance(pieces, Sequence) or isinstance(pieces, (str, bytes)):
        raise StoreError(f"{what}: pieces must be a sequence of pairs, got {type(pieces).__name__}")
    form = "(tensor, slab offset)" if tensor_first else "(slab offset, tensor)"
    cap, device = slab.numel(), slab.device
    addr, off, size = [], [], []
    # Python lists, one numpy conversion at the end: per piece this loop is the call's host cost
    # (58 pieces: 47 us with numpy item stores, ~25 us like this on the CI machine's CPU).
    for i, pair in enumerate(pieces):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise StoreError(f"{what}: piece {i} must be a pair {form}, got {type(pair).__name__} {pair!r:.80}")
        t, o = pair if tensor_first else pair[::-1]
        if not isinstance(t, torch.Tensor):
            raise StoreError(f"{what}: piece {i}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise StoreError(
                f"{what}: piece {i}: tensor of shape {tuple(t.shape)} and stride {t.stride()} is not contiguous"
            )
        if t.device != device:
            raise StoreError(f"{what}: piece {i}: tensor is on {t.device}, the slab on {device}")
        if type(o) is not int:
            if not is_int(o):
                raise StoreError(f"{what}: piece {i}: slab offset must be an int, got {type(o).__name__} {o!r}")
            o = int(o)
        nb = t.nbytes
        if o < 0 or o + nb > cap:
            raise StoreError(
                f"{what}: piece {i}: bytes [{o}, {o + nb}) ({tuple(t.shape)} {t.dtype}) are outside the slab's "
                f"[0, {cap})"
            )
        addr.append(t.data_ptr())
        off.append(o)
        size.append(nb)
    as_array = lambda xs: np.array(xs, dtype=np.int64)
    return as_array(addr), as_array(off), as_array(size)


def _check_disjoint(start: np.ndarray, size: np.ndarray, what: str, where: str) -> None:
    """Raise if two non-empty byte ranges [start, start + size) overlap, naming both pieces."""
    live = np.flatnonzero(size > 0)
    if len(live) < 2:
        return
    order = live[np.argsort(start[live], kind="stable")]
    ends = start[order] + size[order]
    bad = np.flatnonzero(start[order[1:]] < np.maximum.accumulate(ends)[:-1])
    if len(bad):
        j = int(order[bad[0] + 1])
        prev = order[: bad[0] + 1]
        i = int(prev[np.argmax(start[prev] + size[prev] > start[j])])
        raise StoreError(
            f"{what}: pieces {min(i, j)} and {max(i, j)} overlap in {where} (bytes [{start[i]}, {start[i] + size[i]}) "
            f"and [{start[j]}, {start[j] + size[j]})); each byte may be written once per call"
        )


# ---- public launchers ----
def gather_pieces(pieces: Sequence[tuple[torch.Tensor, int]], slab: torch.Tensor) -> torch.Tensor:
    """Copy every piece's bytes into ``slab`` at its offset, in one launch.

    Args:
        pieces: ``(tensor, offset)`` pairs: any contiguous tensor (any dtype, shape, size; views
            allowed) on slab's device, copied byte for byte to ``slab[offset : offset + nbytes]``.
            Destination ranges must not overlap; sources may repeat.
        slab: contiguous 1-D torch.uint8 on a cuda or cpu device.

    Returns:
        ``slab``. Bytes no piece covers are left as they were.

    Raises:
        StoreError: a piece that is not a contiguous tensor on slab's device, an offset outside
            the slab, two destination ranges that overlap (naming the pieces). Nothing is written then.
    """
    what = "gather_pieces"
    slab = _check_slab(slab, what)
    addr, off, size = _check_pieces(pieces, slab, what, tensor_first=True)
    _check_disjoint(off, size, what, "the slab")
    if slab.device.type == "cpu" and not _INTERPRET:
        gather_pieces_reference(pieces, slab)
    else:
        _launch(slab.device, addr, slab.data_ptr() + off, size)
    return slab


def scatter_pieces(slab: torch.Tensor, pieces: Sequence[tuple[int, torch.Tensor]]) -> None:
    """Copy ``slab[offset : offset + nbytes]`` into every piece's tensor, in one launch.

    Args:
        slab: contiguous 1-D torch.uint8 on a cuda or cpu device.
        pieces: ``(offset, tensor)`` pairs: destination tensors contiguous (any dtype, shape; views
            allowed) on slab's device, written in place. Slab ranges may repeat (one received row
            copied into several slots); destination memory must not overlap.

    Raises:
        StoreError: as :func:`gather_pieces`, naming the piece; destinations that overlap in memory.
            Nothing is written then.
    """
    what = "scatter_pieces"
    slab = _check_slab(slab, what)
    addr, off, size = _check_pieces(pieces, slab, what, tensor_first=False)
    _check_disjoint(addr - slab.data_ptr(), size, what, "destination memory")
    if slab.device.type == "cpu" and not _INTERPRET:
        scatter_pieces_reference(slab, pieces)
    else:
        _launch(slab.device, slab.data_ptr() + off, addr, size)


# ---- plain-torch reference: test oracle and CPU fallback ----
def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as uint8 [nbytes] (shares its memory)."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def gather_pieces_reference(pieces: Sequence[tuple[torch.Tensor, int]], slab: torch.Tensor) -> torch.Tensor:
    """What :func:`gather_pieces` does, one ``copy_`` per piece (inputs trusted)."""
    for t, o in pieces:
        b = _bytes_of(t)
        slab[int(o) : int(o) + b.numel()].copy_(b)
    return slab


def scatter_pieces_reference(slab: torch.Tensor, pieces: Sequence[tuple[int, torch.Tensor]]) -> None:
    """What :func:`scatter_pieces` does, one ``copy_`` per piece (inputs trusted)."""
    for o, t in pieces:
        b = _bytes_of(t)
        b.copy_(slab[int(o) : int(o) + b.numel()])

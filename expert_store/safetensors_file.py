"""Safetensors files, parsed and mapped by the store itself.

A safetensors file is::

    bytes [0, 8)          N: uint64, little endian (header length)
    bytes [8, 8 + N)      JSON object {name: {"dtype": str, "shape": [int], "data_offsets": [begin, end]},
                                       "__metadata__": {str: str} (optional)}
    bytes [8 + N, size)   data section; tensor ``name`` is bytes [8 + N + begin, 8 + N + end)

:func:`parse_header` reads only the first ``8 + N`` bytes and checks every
entry against the file size, so that later reads can trust the byte ranges.
:class:`MappedFile` holds one open file: a read-only memory map (for
zero-copy views, page-cache residency checks and registration of page-cache
pages with CUDA) and a file descriptor (for ``preadv`` into caller memory).

Every problem is a :class:`~expert_store.errors.CheckpointError` whose message
names the file (and the tensor, where there is one).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import json
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CheckpointError

__all__ = [
    "MAX_HEADER_BYTES",
    "PAGE_SIZE",
    "SAFETENSORS_DTYPES",
    "MappedFile",
    "SafetensorsHeader",
    "TensorEntry",
    "parse_header",
]

# safetensors dtype string -> torch dtype. The packed sub-byte formats (F4,
# F6_*) are left out on purpose: their "shape" counts values, not bytes of a
# torch dtype, so numel * itemsize would not give their size.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _st_name, _torch_name in (
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[_st_name] = getattr(torch, _torch_name)

_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in SAFETENSORS_DTYPES.values()}

# 100 MB: the same bound the safetensors library puts on headers. Real headers
# are tens of KB (DeepSeek-V3 shards: ~60 KB); anything near this is corruption.
MAX_HEADER_BYTES = 100_000_000

PAGE_SIZE = mmap.PAGESIZE

# madvise advice values (linux/mman.h); the mmap module lacks POPULATE_READ.
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MADV_POPULATE_READ = 22  # Linux >= 5.14

# madvise / mincore through ctypes rather than mmap.madvise: ctypes releases the
# GIL for the call, so reader threads can populate or check ranges in parallel.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in its file.

    ``offset`` is the absolute byte offset in the file (data section start +
    ``data_offsets[0]``); ``nbytes`` = ``numel * itemsize`` (checked).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked header: ``tensors`` by name, ``metadata``, sizes."""

    path: str
    file_size: int
    data_offset: int  # 8 + N: absolute offset of the data section
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: str, name: str, raw: object, data_size: int, data_offset: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: header entry must be a JSON object, got {type(raw).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in raw:
            raise CheckpointError(f"{where}: header entry has no {field!r} field")
    st_dtype = raw["dtype"]
    if not isinstance(st_dtype, str) or st_dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {st_dtype!r}; known: {sorted(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[st_dtype]
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = raw["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
    begin, end = offsets
    if begin < 0 or begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] run past the data section ({data_size} bytes; "
            f"file truncated or header corrupt)"
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * _ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} of {st_dtype} "
            f"needs {expected}"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=data_offset + begin, nbytes=expected)


def parse_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at ``path`` (reads only the header bytes).

    Raises:
        CheckpointError: the file is missing, shorter than 8 bytes, its header
            length runs past the end of the file (or exceeds
            :data:`MAX_HEADER_BYTES`), the header is not a JSON object, an
            entry lacks a field, has an unknown dtype, or a byte range is out of
            the data section, of the wrong size or overlaps another.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open safetensors file: {e.strerror}") from None
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 8:
            raise CheckpointError(f"{path}: file is {file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes (corrupt file?)")
        if 8 + n > file_size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    if len(raw) != n:
        raise CheckpointError(f"{path}: short read of the header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ must be a JSON object, got {type(metadata).__name__}")
    data_offset = 8 + n
    data_size = file_size - data_offset
    tensors = {name: _parse_entry(path, name, raw_entry, data_size, data_offset) for name, raw_entry in header.items()}
    # Overlap check: sort by start; empty tensors occupy no bytes and may share offsets.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, prev_end, prev_name), (begin, end, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise CheckpointError(
                f"{path}: tensor {name!r} (bytes [{begin}, {end})) overlaps tensor {prev_name!r} (ends at {prev_end})"
            )
    return SafetensorsHeader(
        path=path, file_size=file_size, data_offset=data_offset, tensors=tensors, metadata=metadata
    )


class MappedFile:
    """One safetensors file held open: a read-only memory map plus a descriptor.

    ``array`` is a read-only ``numpy.uint8 [file_size]`` view of the map (numpy
    copies release the GIL, so several threads can copy out of it at once);
    ``fd`` serves ``preadv`` reads. Nothing is read at construction: pages come
    in only when a range is touched. The file must keep the size its header was
    checked against: a file truncated under a live map raises SIGBUS on access,
    so the size is checked again here, when the map is made.

    Whatever maps pages of the file into this process (``copy_into`` with
    ``"mmap"``, CUDA registration by the checkpoint reader) drops those page
    table entries again with :meth:`release` once done: a page that a process
    maps cannot be dropped by ``POSIX_FADV_DONTNEED`` and counts in its RSS.
    """

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self.path = header.path
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open safetensors file: {e.strerror}") from None
        try:
            size = os.fstat(self.fd).st_size
            if size != header.file_size:
                raise CheckpointError(
                    f"{self.path}: file size changed from {header.file_size} to {size} bytes since its header was read"
                )
            if hasattr(os, "posix_fadvise"):  # a hint: filesystems may refuse it (OSError)
                # RANDOM turns off the kernel's readahead on this descriptor: a
                # pread then reads exactly the requested range (in one go, however
                # large) and nothing of the neighbouring experts we were not asked
                # for. Queue depth for cold reads comes from explicit WILLNEED
                # hints on the needed ranges instead (advise_willneed).
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._map = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(self.fd)
            raise
        self.array: np.ndarray = np.frombuffer(self._map, dtype=np.uint8)
        # First byte of the map; mmap returns page-aligned addresses.
        self.address: int = int(self.array.ctypes.data)
        self._host: torch.Tensor | None = None

    def page_range(self, offset: int, nbytes: int) -> tuple[int, int]:
        """(address, length) of the whole pages holding file bytes [offset, offset + nbytes)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.header.file_size:
            raise CheckpointError(
                f"{self.path}: bytes [{offset}, {offset + nbytes}) are outside the file ({self.header.file_size} bytes)"
            )
        lo = offset // PAGE_SIZE * PAGE_SIZE
        hi = -(-(offset + nbytes) // PAGE_SIZE) * PAGE_SIZE
        return self.address + lo, hi - lo

    def _madvise(self, offset: int, nbytes: int, advice: int, what: str) -> None:
        if nbytes <= 0:
            return
        addr, length = self.page_range(offset, nbytes)
        if _libc.madvise(ctypes.c_void_p(addr), length, advice) != 0:
            err = ctypes.get_errno()
            raise CheckpointError(
                f"{self.path}: madvise({what}) of bytes [{offset}, {offset + nbytes}) failed: {os.strerror(err)}"
            )

    def host_tensor(self) -> torch.Tensor:
        """A CPU ``torch.uint8 [file_size]`` tensor over the map (no copy), for host-to-device
        copies out of page-cache pages registered with CUDA. Never write to it: the pages are
        mapped read-only (a write faults). Valid until :meth:`close`."""
        if self._host is None:
            if self.fd < 0:
                raise CheckpointError(f"{self.path}: file is closed")
            # From the address rather than the buffer: torch refuses read-only buffers with a
            # warning, and an exported buffer would keep the map from closing.
            raw = (ctypes.c_uint8 * self.header.file_size).from_address(self.address)
            self._host = torch.from_numpy(np.ctypeslib.as_array(raw))
        return self._host

    def resident(self, offset: int, nbytes: int, *, samples: int | None = None) -> bool:
        """Whether the pages holding bytes [offset, offset + nbytes) are in the page cache
        (``mincore``; touches no page, maps nothing).

        With ``samples`` (>= 2), only that many pages spread evenly over the range, first and
        last included, are checked (one ``mincore`` each): a full check walks the page cache
        once per 4 KiB page (~48 GB/s on the CI VM, i.e. 0.35 ms per 16 MiB).
        """
        if nbytes <= 0:
            return True
        addr, length = self.page_range(offset, nbytes)
        pages = length // PAGE_SIZE
        if samples is not None and samples < 2:
            raise CheckpointError(f"{self.path}: residency samples must be >= 2, got {samples}")
        if samples is None or pages <= samples:
            spans = [(addr, pages)]
        else:
            picks = sorted({(pages - 1) * j // (samples - 1) for j in range(samples)})
            spans = [(addr + i * PAGE_SIZE, 1) for i in picks]
        for start, count in spans:
            vec = (ctypes.c_ubyte * count)()
            if _libc.mincore(ctypes.c_void_p(start), count * PAGE_SIZE, vec) != 0:
                err = ctypes.get_errno()
                raise CheckpointError(
                    f"{self.path}: mincore of bytes [{offset}, {offset + nbytes}) failed: {os.strerror(err)}"
                )
            if not (np.frombuffer(vec, dtype=np.uint8) & 1).all():
                return False
        return True

    def populate(self, offset: int, nbytes: int) -> None:
        """Map the pages of bytes [offset, offset + nbytes) into this process in one call
        (``MADV_POPULATE_READ``, Linux >= 5.14), reading missing ones, instead of one page
        fault per few pages later."""
        self._madvise(offset, nbytes, _MADV_POPULATE_READ, "MADV_POPULATE_READ")

    def release(self, offset: int, nbytes: int) -> None:
        """Drop this process's page table entries for the pages of bytes [offset, offset +
        nbytes) (``MADV_DONTNEED`` on a shared file map): the page cache keeps the pages, and
        they become evictable again. Safe while other threads copy out of the same pages:
        they fault them back in."""
        self._madvise(offset, nbytes, _MADV_DONTNEED, "MADV_DONTNEED")

    def advise_hugepage(self) -> None:
        """Ask for huge page table entries over the whole map (``MADV_HUGEPAGE``): the kernel
        may then map large page-cache folios with one entry. A hint; it changes no byte."""
        self._madvise(0, self.header.file_size, _MADV_HUGEPAGE, "MADV_HUGEPAGE")

    def advise_willneed(self, offset: int, nbytes: int) -> None:
        """Start reading ``[offset, offset + nbytes)`` into the page cache without waiting."""
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def copy_into(self, offset: int, dest: Sequence[np.ndarray], *, method: str, populate: bool = False) -> None:
        """Copy file bytes starting at ``offset`` into the uint8 arrays ``dest``, one after another.

        ``method`` is ``"pread"`` (one ``preadv`` system call: the kernel copies
        page-cache pages straight into ``dest``, no page tables touched) or
        ``"mmap"`` (numpy copies out of the memory map, page faults bring the
        pages in; with ``populate``, one ``MADV_POPULATE_READ`` maps them
        first; afterwards :meth:`release` drops the mappings).
        """
        total = sum(d.nbytes for d in dest)
        if offset < 0 or offset + total > self.header.file_size:
            raise CheckpointError(
                f"{self.path}: read of bytes [{offset}, {offset + total}) is outside the file "
                f"({self.header.file_size} bytes)"
            )
        if method == "pread":
            bufs = [memoryview(d) for d in dest]
            done = 0
            # preadv may return short (signals, >2 GiB requests); continue where it stopped.
            while done < total:
                k = 0
                skip = done
                while skip >= bufs[k].nbytes:
                    skip -= bufs[k].nbytes
                    k += 1
                rest = [bufs[k][skip:], *bufs[k + 1 :]]
                try:
                    got = os.preadv(self.fd, rest, offset + done)
                except OSError as e:
                    raise CheckpointError(f"{self.path}: read at offset {offset + done} failed: {e.strerror}") from None
                if got <= 0:
                    raise CheckpointError(
                        f"{self.path}: unexpected end of file at offset {offset + done} (file truncated?)"
                    )
                done += got
        elif method == "mmap":
            if populate:
                self.populate(offset, total)
            try:
                pos = offset
                for d in dest:
                    np.copyto(d, self.array[pos : pos + d.nbytes])
                    pos += d.nbytes
            finally:
                self.release(offset, total)
        else:
            raise CheckpointError(f"unknown read method {method!r}; use 'pread' or 'mmap'")

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        if self.fd < 0:
            return
        self.array = np.empty(0, dtype=np.uint8)  # drop the export so the map can close
        self._host = None
        # BufferError: a caller still holds a numpy view of the map; the map is
        # freed when that view dies. The descriptor is ours to close either way.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Safetensors files, parsed and read by the store itself.

A safetensors file is::

    bytes [0, 8)          N: uint64, little endian (header length)
    bytes [8, 8 + N)      JSON object {name: {"dtype": str, "shape": [int], "data_offsets": [begin, end]},
                                       "__metadata__": {str: str} (optional)}
    bytes [8 + N, size)   data section; tensor ``name`` is bytes [8 + N + begin, 8 + N + end)

:func:`parse_header` checks every entry against the file size, so that later reads can trust the
byte ranges; :class:`ShardFile` reads them with ``preadv``, never through a memory map (where a
truncated file raises SIGBUS instead of a short read), buffered or, for cold ranges, with ``O_DIRECT``
(:meth:`ShardFile.read_direct`). Every problem is a
:class:`~expert_store.errors.CheckpointError` naming the file (and the tensor, where there is one).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .checks import is_int
from .errors import CheckpointError

__all__ = [
    "MAX_HEADER_BYTES",
    "PAGE_SIZE",
    "SAFETENSORS_DTYPES",
    "SafetensorsHeader",
    "ShardFile",
    "TensorEntry",
    "parse_header",
]

# safetensors dtype string -> torch dtype (safetensors name=torch name; the newer float8 and
# unsigned types only where this torch has them). The packed sub-byte formats (F4, F6_*) are left
# out on purpose: their "shape" counts values, not bytes of a torch dtype, so numel * itemsize
# would not give their size.
_ST_TORCH_NAMES = (
    "F64=float64 F32=float32 F16=float16 BF16=bfloat16 F8_E4M3=float8_e4m3fn F8_E5M2=float8_e5m2 I64=int64 "
    "I32=int32 I16=int16 I8=int8 U8=uint8 BOOL=bool C64=complex64 F8_E4M3FNUZ=float8_e4m3fnuz "
    "F8_E5M2FNUZ=float8_e5m2fnuz F8_E8M0=float8_e8m0fnu U16=uint16 U32=uint32 U64=uint64"
)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in (p.split("=") for p in _ST_TORCH_NAMES.split()) if hasattr(torch, name)
}

_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in SAFETENSORS_DTYPES.values()}

# 100 MB: the same bound the safetensors library puts on headers. Real headers
# are tens of KB (DeepSeek-V3 shards: ~60 KB); anything near this is corruption.
MAX_HEADER_BYTES = 100_000_000

PAGE_SIZE = mmap.PAGESIZE

# mmap / mincore / munmap through ctypes: the mmap module gives no address without
# exporting a buffer, and ctypes releases the GIL during the calls.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


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
    """A parsed, checked header: ``tensors`` by name, ``metadata``, sizes, and ``identity``:
    (device, inode, size, mtime in ns) of the file it was parsed from."""

    path: str
    file_size: int
    data_offset: int  # 8 + N: absolute offset of the data section
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    identity: tuple[int, int, int, int]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = raw["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
    begin, end = offsets
    if begin < 0 or begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] run past the data section ({data_size} bytes; "
            f"file truncated or header corrupt)"
        )
    expected = math.prod(shape) * _ITEMSIZE[dtype]
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
        # Identity before the header bytes: any later write moves the mtime on.
        identity = _identity(os.fstat(fd))
        file_size = identity[2]
        if file_size < 8:
            raise CheckpointError(f"{path}: file is {file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes (corrupt file?)")
        if 8 + n > file_size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the header: {e.strerror}") from None
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
    return SafetensorsHeader(path, file_size, data_offset, tensors, metadata, identity)


class ShardFile:
    """The file a :class:`SafetensorsHeader` was parsed from, read with ``preadv``.

    The descriptor is opened by the first :meth:`check` and held until :meth:`close` (a later
    :meth:`check` opens it again); so is the ``O_DIRECT`` one, by :meth:`open_direct`. Not
    thread-safe for :meth:`check` / :meth:`open_direct` / :meth:`close`; :meth:`read`,
    :meth:`read_direct` and :meth:`resident` may run in several threads between them.
    """

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self.path = header.path
        self._fd = -1
        self._dfd = -1  # O_DIRECT descriptor, or -1
        self._direct = True  # False once O_DIRECT was refused (open or read): buffered from then on

    def _verify(self, now: Sequence[tuple[int, int, int, int]]) -> None:
        was = self.header.identity
        for ident in now:
            if ident != was:
                how = "replaced by another file" if ident[:2] != was[:2] else f"size {ident[2]}, was {was[2]}"
                raise CheckpointError(
                    f"{self.path}: the file changed since its header was read ({how}; mtime {ident[3]} ns, "
                    f"was {was[3]}); open a new Checkpoint to read it"
                )

    def check(self) -> None:
        """Open the file if needed, and raise CheckpointError unless both the open descriptor
        and the path are still the file the header was parsed from (same inode, size, mtime)."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY)
                # RANDOM turns off the kernel's readahead on this descriptor: a preadv then
                # reads exactly the requested range and nothing of the neighbouring experts
                # nobody asked for. A hint: filesystems may refuse it.
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            now = [_identity(os.fstat(self._fd)), _identity(os.stat(self.path))]
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open or stat the file: {e.strerror}") from None
        self._verify(now)

    def open_direct(self) -> bool:
        """Open the ``O_DIRECT`` descriptor if needed (after :meth:`check`); whether
        :meth:`read_direct` can be used. A filesystem that refuses ``O_DIRECT`` (tmpfs on older
        kernels, some network filesystems: EINVAL) is remembered until :meth:`close`, and the
        reads stay buffered. Raises CheckpointError if the path is no longer the file parsed."""
        flag = getattr(os, "O_DIRECT", 0)
        if not self._direct or not flag:
            return False
        if self._dfd < 0:
            try:
                fd = os.open(self.path, os.O_RDONLY | flag)
            except OSError:
                self._direct = False
                return False
            try:
                self._verify([_identity(os.fstat(fd))])
            except BaseException:
                os.close(fd)
                raise
            self._dfd = fd
        return True

    def read(self, offset: int, dest: Sequence[memoryview]) -> None:
        """Fill the writable buffers ``dest``, one after another, from file bytes starting at
        ``offset`` (one ``preadv``, continued where a short one stopped)."""
        total = sum(d.nbytes for d in dest)
        done = 0
        while done < total:
            k, skip = 0, done
            while skip >= dest[k].nbytes:
                skip -= dest[k].nbytes
                k += 1
            try:
                got = os.preadv(self._fd, [dest[k][skip:], *dest[k + 1 :]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{self.path}: read at offset {offset + done} failed: {e.strerror}") from None
            if got <= 0:
                raise CheckpointError(
                    f"{self.path}: unexpected end of file at offset {offset + done} "
                    f"(truncated since its header was read?)"
                )
            done += got

    def read_direct(self, offset: int, nbytes: int, buf: memoryview) -> int | None:
        """Read ``[offset, offset + nbytes)`` with ``O_DIRECT`` into the writable ``buf``, as
        its page-aligned superset ``[offset // PAGE_SIZE * PAGE_SIZE, end rounded up)`` (page
        alignment covers every logical block size up to a page); return where the wanted bytes
        start in ``buf``. None: not read (no ``O_DIRECT`` descriptor, ``buf`` not page-aligned
        or too small, or the first read refused with EINVAL, e.g. a logical block larger than a
        page): the caller reads buffered. A read that ends before ``offset + nbytes`` (the file
        shrank) raises CheckpointError; bytes past the wanted ones may be short at the end of
        the file."""
        fd = self._dfd
        if fd < 0 or not self._direct or not nbytes:
            return None
        lo = offset // PAGE_SIZE * PAGE_SIZE
        need = offset + nbytes - lo
        span = -(-need // PAGE_SIZE) * PAGE_SIZE
        if span > buf.nbytes or buf.readonly:
            return None
        anchor = ctypes.c_char.from_buffer(buf)
        address = ctypes.addressof(anchor)
        del anchor  # release the buffer export now, not when an exception's frames go
        if address % PAGE_SIZE:
            return None
        done = 0
        while done < need:
            try:
                got = os.preadv(fd, [buf[done:span]], lo + done)
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:
                    self._direct = False  # refused here: this file is read buffered from now on
                    return None
                raise CheckpointError(f"{self.path}: read at offset {lo + done} failed: {e.strerror}") from None
            if got <= 0 or (got % PAGE_SIZE and done + got < need):
                # O_DIRECT reads come short only at the end of the file: the file shrank.
                at = lo + done + max(got, 0)
                raise CheckpointError(
                    f"{self.path}: unexpected end of file at offset {at} (truncated since its header was read?)"
                )
            done += got
        return offset - lo

    def resident(self, extents: Sequence[tuple[int, int]], samples: int) -> list[bool]:
        """Per ``(offset, nbytes)`` extent: whether ``samples`` of its pages, spread evenly, first and
        last included, are all in the page cache. ``mincore`` needs an address, so the file is
        mapped for the question and unmapped before returning; no mapped byte is ever touched (a
        truncated file cannot SIGBUS). If the file cannot be mapped, every extent counts as
        resident: a wrong guess costs speed, never bytes."""
        size = self.header.file_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, self._fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return [True] * len(extents)
        try:
            vec = (ctypes.c_ubyte * 1)()
            out = []
            for off, n in extents:
                first, last = off // PAGE_SIZE, (off + n - 1) // PAGE_SIZE
                pages = sorted({first + (last - first) * j // (samples - 1) for j in range(samples)})
                out.append(all(_libc.mincore(addr + p * PAGE_SIZE, PAGE_SIZE, vec) == 0 and vec[0] & 1 for p in pages))
            return out
        finally:
            _libc.munmap(addr, size)

    def close(self) -> None:
        """Close the descriptors. Idempotent."""
        for name in ("_fd", "_dfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._direct = True

    __del__ = close  # a Checkpoint dropped without close() must not keep its descriptors

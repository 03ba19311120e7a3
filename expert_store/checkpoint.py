"""Read experts out of safetensors checkpoints, only the bytes that are needed.

Symbols: L MoE layers held by the store, E logical experts per layer, T tensors
per expert (``len(spec)``), H hidden size, I expert intermediate size.

A :class:`Checkpoint` maps each spec tensor (``"w13"``) to one or more
checkpoint tensor names built from templates with ``{layer}`` and ``{expert}``
(``"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"``). Several
templates are concatenated along dim 0, in order: gate_proj + up_proj give
``w13 [2I, H]``. Store layer ``i`` is checkpoint layer ``layers[i]`` when
``layers`` is given (DeepSeek-V3's MoE layers start at checkpoint layer 3).

Reads never touch bytes of experts that were not asked for. The byte ranges
come from headers parsed by :mod:`expert_store.safetensors_file`; the data
moves in one of four ways (``method``):

* ``"pread"``: CPU destinations get one ``preadv`` per file-contiguous run
  straight into their memory (no intermediate copy). For CUDA destinations,
  reader threads ``preadv`` into pinned host staging buffers
  (``staging_bytes`` in total), then issue ``non_blocking`` copies on side
  streams straight into the destination views; a CUDA event per buffer says
  when it may be refilled. Reading the next chunk (page cache or disk)
  overlaps the host-to-device copy of the previous ones, and no device buffer
  other than the destinations is used.
* ``"mmap"``: the same, with numpy copies out of the memory map instead of
  ``preadv``.
* ``"register"`` (zero-copy, CUDA destinations): the needed pages of the map
  are cut into page-aligned windows; each window is registered with CUDA
  (``cudaHostRegister``, read-only), the copy engine reads the page-cache
  pages straight into the destination views, and the window is unregistered
  once its copies are done. Windows under 1 MiB (scales) go through staging.
* ``"auto"``: ``"register"`` for windows whose pages are in the page cache,
  ``"pread"`` through staging for the others.

For CPU destinations ``"register"`` and ``"auto"`` read like ``"pread"``.

**Warm and cold reads are scheduled apart** (``adaptive=True``, the default).
Ranges are sorted by (file, offset) and cut into reads of at most
``chunk_bytes``; before anything moves, each read is classified as *warm* (its
pages are in the page cache: ``mincore`` on a few pages of it) or *cold*.

* Warm reads are memory copies: ``threads`` readers take them in any order,
  as fast as the host's memory bandwidth allows.
* Cold reads go to the disk: ``cold_threads`` readers (few) take them strictly
  in file order, and one prefetch thread asks the kernel for the next
  ``readahead_bytes`` of them (``POSIX_FADV_WILLNEED``), no further, so that
  the disk sees one near-sequential stream with a deep queue instead of many
  readers seeking between distant offsets. (The H200 host, ext4, 16 of 128
  DeepSeek-V3 experts, 0.7 GB: 8 readers plus a prefetcher hinting every
  range at once read cold at 0.64 GB/s, 0.37x a plain sequential read; 4
  readers 0.89x.)

Both kinds share the pinned staging and the asynchronous host-to-device copies.
``adaptive=False`` gives the former scheduler (every read to ``threads``
readers, every range hinted at once), kept for comparison in benchmarks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import string
import threading
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, StoreError
from .safetensors_file import PAGE_SIZE, MappedFile, SafetensorsHeader, TensorEntry, parse_header
from .spec import ExpertSpec

__all__ = [
    "DEFAULT_BUFFERS_PER_THREAD",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_COLD_THREADS",
    "DEFAULT_METHOD",
    "DEFAULT_READAHEAD_BYTES",
    "DEFAULT_STAGING_BYTES",
    "DEFAULT_THREADS",
    "INDEX_NAME",
    "METHODS",
    "Checkpoint",
    "ReadStats",
]

INDEX_NAME = "model.safetensors.index.json"

# Warm path, measured on the H200 host (32 cores, ext4), 16 of 128 DeepSeek-V3
# experts (0.70 GB) into CUDA slots, 16 MiB staging buffers, 2 per thread:
# 4 threads 14.95 GB/s, 8 threads 20.8, 10 threads 19.7, 12 threads 11.3 (a
# collapse: the readers, the CUDA driver's threads and the GIL then fight for the
# cores and the memory bus), mmap copies 18.1, safe_open(device="cuda") 5.40.
# The warm path is most likely bound by the host's memory bandwidth: every byte
# crosses the memory bus four times (page cache read, staging written with its
# read-for-ownership, staging read by the DMA). Same run: 8 threads into CPU
# memory (three passes) 27.5 GB/s, pinned H2D alone 54.3; 27.5 * 3 ~ 20.8 * 4
# ~ 83 GB/s. Zero-copy ("register") would need one pass, but cudaHostRegister
# itself runs at ~17-21 GB/s and is serialized in the driver (9.2 GB/s end to
# end), so it is not the default.
DEFAULT_THREADS = 8
# Cold reads: 2 readers in file order behind a bounded prefetcher. One reader
# copies page cache -> staging at >= 3 GB/s, faster than the disk (plain
# sequential read 1.74 GB/s on the H200 host), so 2 are enough to keep the
# staging buffers moving while the prefetcher keeps the disk queue full; more
# readers only add seeks (8 readers: 0.64 GB/s, 4: 1.55).
DEFAULT_COLD_THREADS = 2
# 64 MiB of WILLNEED ahead of the cold readers: ~37 ms of disk time at 1.7 GB/s,
# a deep queue for any SSD; bounded so the prefetcher never races far ahead of the
# readers (pages hinted long before they are read can be evicted again, and a
# reader that overtakes the prefetcher issues its own, competing, reads).
DEFAULT_READAHEAD_BYTES = 64 << 20
# 256 MiB of pinned staging at most (the buffers actually used are smaller: see
# DEFAULT_CHUNK_BYTES and DEFAULT_BUFFERS_PER_THREAD).
DEFAULT_STAGING_BYTES = 256 << 20
# 2 staging buffers per reader thread: each thread fills one while the copy
# engine drains its previous one.
DEFAULT_BUFFERS_PER_THREAD = 2
# 16 MiB reads (and staging buffers). Measured on an H200 host (2026-11-29, 16 of
# 128 DeepSeek-V3 experts, 0.705 GB into GPU slots, results/bench_checkpoint_h200_20261129.txt):
# warm 4 MiB 12.8 GB/s, 8 MiB 16.4, 16 MiB 19.3, 32 MiB 19.9, 64 MiB 19.1
# (safe_open(device="cuda") 4.26); cold all within 0.96-1.14x a plain sequential
# read. Small reads into a cache-resident ring did lift the CPU copy alone (8 threads,
# 2 x 4 MiB per thread: 45 GB/s) but not the pipeline with the host-to-device DMA,
# which then dominates: per-read Python and event overhead outweigh the cache gain.
DEFAULT_CHUNK_BYTES = 16 << 20
METHODS = ("pread", "mmap", "register", "auto")
# "pread": preadv into the destination / staging buffer. mmap copies fault the
# pages in through the map (and drop the mappings afterwards, so the pages stay
# evictable); on the H200 host they were slower warm (18.1 vs 20.8 GB/s). A file
# truncated under us gives preadv a short read (an error) instead of a SIGBUS.
DEFAULT_METHOD = "pread"

# Staging buffers and windows are multiples of this (page-aligned buffers;
# registration works on whole pages).
_PAGE = max(4096, PAGE_SIZE)
# Pieces per read: preadv takes at most IOV_MAX (1024 on Linux) buffers, and a
# run of adjacent tiny tensors (every expert's scales side by side) can exceed it.
_MAX_PIECES = 512
# Windows smaller than this go through staging even with "register"/"auto": a
# cudaHostRegister + cudaHostUnregister pair has a fixed cost (driver calls,
# page-table walk) that a 7 KB scale tensor cannot amortize, and a preadv of a
# few pages into staging is ~10 us.
_MIN_ZERO_COPY_BYTES = 1 << 20
# Each read is classified warm or cold by this many pages of it (first and last
# included) instead of all of them: one mincore call per page costs a few
# microseconds (ctypes), i.e. 4 samples per 4 MiB read ~ 1 ms per 0.7 GB, 3% of a
# warm read at 25 GB/s; a full mincore walks the page cache per 4 KiB page
# (122 GB/s on the H200 host). A wrong guess costs speed, never bytes: a warm
# reader (or a registration) faults a missing page in itself.
_RESIDENCY_SAMPLES = 4
# cudaHostRegister flags (cuda_runtime_api.h): Portable = pinned for every
# context (destinations may sit on several devices); ReadOnly = the device only
# reads (required: the map is PROT_READ, so the pages cannot be pinned writable).
_CUDA_HOST_REGISTER_PORTABLE = 0x01
_CUDA_HOST_REGISTER_READ_ONLY = 0x08
_LAYER_FIELDS = frozenset({"layer", "expert"})


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_template(spec_name: str, template: object) -> str:
    if not isinstance(template, str) or not template:
        raise CheckpointError(f"names[{spec_name!r}]: a template must be a non-empty string, got {template!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        template.format(layer=0, expert=0)
    except (ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"names[{spec_name!r}]: template {template!r} does not format: {e}") from None
    if not fields <= _LAYER_FIELDS:
        raise CheckpointError(
            f"names[{spec_name!r}]: template {template!r} uses fields {sorted(fields - _LAYER_FIELDS)}; "
            f"only {{layer}} and {{expert}} are allowed"
        )
    if "expert" not in fields:
        raise CheckpointError(f"names[{spec_name!r}]: template {template!r} has no {{expert}} field")
    return template


def _check_names(names: object) -> dict[str, tuple[str, ...]]:
    if not isinstance(names, Mapping) or not names:
        raise CheckpointError(f"names must be a non-empty mapping {{spec tensor: template(s)}}, got {names!r}")
    out: dict[str, tuple[str, ...]] = {}
    for key, value in names.items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"names: keys are spec tensor names (non-empty strings), got {key!r}")
        templates = (value,) if isinstance(value, str) else value
        if not isinstance(templates, (list, tuple)) or not templates:
            raise CheckpointError(f"names[{key!r}]: need a template or a non-empty list of templates, got {value!r}")
        out[key] = tuple(_check_template(key, t) for t in templates)
    return out


def _check_layers(layers: object) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise CheckpointError(f"layers must be a sequence of checkpoint layer numbers, got {layers!r}")
    out = tuple(layers)
    if not out:
        raise CheckpointError("layers must not be empty (use None for store layer i = checkpoint layer i)")
    for i, x in enumerate(out):
        if not _is_int(x) or x < 0:
            raise CheckpointError(f"layers[{i}] must be a non-negative int, got {x!r}")
    out = tuple(int(x) for x in out)
    if len(set(out)) != len(out):
        raise CheckpointError(f"layers lists a checkpoint layer twice: {list(out)}")
    return out


@dataclass
class _Job:
    """One read: ``nbytes`` file bytes at ``offset``, scattered into ``pieces``.

    ``pieces``: (destination index, byte offset in the destination, nbytes), in
    file order; their sizes add up to ``nbytes``.
    """

    path: str
    offset: int
    nbytes: int = 0
    pieces: list[tuple[int, int, int]] = field(default_factory=list)


def _make_jobs(parts: list[tuple[str, int, int, int, int]], max_bytes: int) -> list[_Job]:
    """Sort ``parts`` (path, file offset, nbytes, dest index, dest offset) by file position
    and merge file-contiguous runs into jobs of at most ``max_bytes`` and ``_MAX_PIECES`` pieces."""
    jobs: list[_Job] = []
    cur: _Job | None = None
    for path, off, n, dest, doff in sorted(parts, key=lambda p: (p[0], p[1])):
        pos = 0
        while pos < n:
            if (
                cur is None
                or cur.path != path
                or cur.offset + cur.nbytes != off + pos
                or cur.nbytes >= max_bytes
                or len(cur.pieces) >= _MAX_PIECES
            ):
                cur = _Job(path, off + pos)
                jobs.append(cur)
            take = min(n - pos, max_bytes - cur.nbytes)
            cur.pieces.append((dest, doff + pos, take))
            cur.nbytes += take
            pos += take
    return jobs


@dataclass
class _Window:
    """A page-aligned range ``[start, end)`` of one file, registered (or staged) as a unit.

    ``pieces``: (file offset, destination index, byte offset in the destination,
    nbytes), sorted by file offset; every piece lies inside the window. Windows of
    one call never share a page, so registering them one by one never overlaps.
    """

    path: str
    start: int
    end: int
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def span(self) -> tuple[int, int]:
        """(first, one past the last) file byte that a piece needs."""
        return self.pieces[0][0], max(f + n for f, _, _, n in self.pieces)


def _make_windows(parts: list[tuple[str, int, int, int, int]], max_bytes: int, page: int) -> list[_Window]:
    """Cover ``parts`` (path, file offset, nbytes, dest index, dest offset) with page-aligned
    windows of at most ``max_bytes`` (rounded down to pages, at least one page).

    The whole pages of the parts are merged where they share a page (so no page is in two
    windows) and cut at page boundaries; each part becomes one piece per window it crosses.
    Parts may repeat or overlap (one expert read into two destinations)."""
    max_bytes = max(page, max_bytes // page * page)
    by_path: dict[str, list[tuple[int, int, int, int]]] = {}
    for path, off, n, dest, doff in parts:
        if n > 0:
            by_path.setdefault(path, []).append((off, n, dest, doff))
    windows: list[_Window] = []
    for path in sorted(by_path):
        items = sorted(by_path[path])
        regions: list[list[int]] = []
        for off, n, _, _ in items:
            lo, hi = off // page * page, -(-(off + n) // page) * page
            if regions and lo < regions[-1][1]:
                regions[-1][1] = max(regions[-1][1], hi)
            else:
                regions.append([lo, hi])
        mine = [_Window(path, a, min(a + max_bytes, hi)) for lo, hi in regions for a in range(lo, hi, max_bytes)]
        starts = [w.start for w in mine]
        for off, n, dest, doff in items:
            k = bisect_right(starts, off) - 1
            pos, end = off, off + n
            while pos < end:
                w = mine[k]
                take = min(end, w.end) - pos
                w.pieces.append((pos, dest, doff + pos - off, take))
                pos += take
                k += 1
        for w in mine:
            w.pieces.sort()
        windows += mine
    return windows


@dataclass(frozen=True)
class ReadStats:
    """What one read call did (:attr:`Checkpoint.last_read`): how its reads were split.

    ``warm_*``: reads whose sampled pages were all in the page cache when the call
    started; ``cold_*``: the others (read in file order behind the prefetcher).
    With ``adaptive=False`` every read counts as warm. ``buffers`` x
    ``buffer_bytes``: the pinned staging used (0 without CUDA destinations).
    """

    warm_bytes: int
    cold_bytes: int
    warm_reads: int
    cold_reads: int
    warm_threads: int
    cold_threads: int
    buffers: int
    buffer_bytes: int


def _split_reads(resident: Sequence[bool], *, adaptive: bool) -> tuple[list[int], list[int]]:
    """(warm, cold) read indices, each in the given (file) order: resident reads are warm;
    without ``adaptive`` every read is warm (one pool, the former scheduler)."""
    if not adaptive:
        return list(range(len(resident))), []
    return [i for i, r in enumerate(resident) if r], [i for i, r in enumerate(resident) if not r]


def _readahead_allows(j: int, claimed: int, cum: Sequence[int], readahead_bytes: int) -> bool:
    """Whether the prefetcher may hint cold read ``j`` while ``claimed`` cold reads have been
    taken by readers: the next unclaimed read always, later ones while the hinted bytes from
    the first unclaimed read up to ``j``'s end stay within ``readahead_bytes``. ``cum[k]`` is
    the byte count of cold reads ``0 .. k-1``."""
    return j <= claimed or cum[j + 1] - cum[claimed] <= readahead_bytes


def _positive(name: str, value: object, default: int) -> int:
    if value is None:
        return default
    if not _is_int(value) or value <= 0:
        raise CheckpointError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class _CudaOps:
    """The CUDA calls of the device path, in one place. Tests swap in a stand-in (module
    attribute ``_DEVICE_OPS``) that treats CPU tensors as device destinations, so the
    staging and zero-copy pipelines also run, and are checked, on CPU-only machines."""

    def is_device(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def event(self) -> Any:
        # blocking: a thread waiting for its buffer sleeps instead of spinning on a core
        # that another reader needs.
        return torch.cuda.Event(blocking=True)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def host_register(self, addr: int, nbytes: int, flags: int) -> str | None:
        """Register host memory; None on success, else the CUDA error string."""
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(addr, nbytes, flags)
        return None if int(err) == 0 else cudart.cudaGetErrorString(err)

    def host_unregister(self, addr: int) -> str | None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostUnregister(addr)
        return None if int(err) == 0 else cudart.cudaGetErrorString(err)


_DEVICE_OPS: _CudaOps = _CudaOps()


class Checkpoint:
    """A safetensors checkpoint and the names of its expert tensors.

    Args:
        path: a directory of ``*.safetensors`` files (with or without
            ``model.safetensors.index.json``) or one ``.safetensors`` file.
        names: ``{spec tensor name: template or list of templates}``; templates
            use ``{layer}`` (checkpoint layer) and ``{expert}``; a list is
            concatenated along dim 0 in order.
        layers: optional; store layer ``i`` reads checkpoint layer ``layers[i]``.

    Opening parses the index (or, without one, every shard's header, and only
    the header); shards named by an index are parsed and mapped on first use.
    Holds open files and maps until :meth:`close` (also a context manager).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        names: Mapping[str, str | Sequence[str]],
        layers: Sequence[int] | None = None,
    ) -> None:
        self.path: str = os.fspath(path)
        self.names: dict[str, tuple[str, ...]] = _check_names(names)
        self.layers: tuple[int, ...] | None = _check_layers(layers)
        self._lock = threading.Lock()
        self._zero_copy_lock = threading.Lock()
        self._headers: dict[str, SafetensorsHeader] = {}
        self._files: dict[str, MappedFile] = {}
        self._closed = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._index_path: str | None = None
        # How the most recent read call split its reads (for benchmarks and operators).
        self.last_read: ReadStats | None = None
        self._weight_map: dict[str, str] = self._build_weight_map()

    # -- opening ------------------------------------------------------------
    def _build_weight_map(self) -> dict[str, str]:
        """{checkpoint tensor name: path of its shard}."""
        if os.path.isfile(self.path):
            header = self._header(self.path)
            return dict.fromkeys(header.tensors, header.path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: checkpoint path does not exist")
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index):
            return self._read_index(index)
        shards = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: directory holds no *.safetensors file and no {INDEX_NAME}")
        weight_map: dict[str, str] = {}
        for shard in shards:
            header = self._header(os.path.join(self.path, shard))
            for name in header.tensors:
                other = weight_map.setdefault(name, header.path)
                if other != header.path:
                    raise CheckpointError(f"tensor {name!r} is in two shards: {other} and {header.path}")
        return weight_map

    def _read_index(self, index: str) -> dict[str, str]:
        self._index_path = index
        try:
            with open(index, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{index}: cannot read the index: {e}") from None
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: the index has no 'weight_map' object")
        out: dict[str, str] = {}
        checked: dict[str, bool] = {}
        for name, shard in wm.items():
            if not isinstance(shard, str) or not shard or os.path.isabs(shard):
                raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, not a shard file name")
            full = os.path.join(self.path, shard)
            if shard not in checked:
                checked[shard] = os.path.isfile(full)
            if not checked[shard]:
                raise CheckpointError(f"{index}: tensor {name!r} is in shard {full}, which does not exist")
            out[name] = full
        return out

    def _header(self, path: str) -> SafetensorsHeader:
        with self._lock:
            header = self._headers.get(path)
        if header is None:
            header = parse_header(path)
            with self._lock:
                header = self._headers.setdefault(path, header)
        return header

    def _mapped(self, path: str) -> MappedFile:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.path}: checkpoint is closed")
            mf = self._files.get(path)
            if mf is None:
                mf = self._files[path] = MappedFile(self._headers[path])
            return mf

    # -- name resolution ----------------------------------------------------
    def _ckpt_layer(self, layer: object) -> int:
        if not _is_int(layer) or layer < 0:
            raise CheckpointError(f"{self.path}: layer must be a non-negative int, got {layer!r}")
        if self.layers is None:
            return int(layer)
        if layer >= len(self.layers):
            raise CheckpointError(
                f"{self.path}: layer {layer} is out of range: layers= maps store layers 0..{len(self.layers) - 1}"
            )
        return self.layers[layer]

    def _entry(self, tensor: str, where: str) -> tuple[str, TensorEntry]:
        """(shard path, header entry) of checkpoint tensor ``tensor``; ``where`` says why it is needed."""
        path = self._weight_map.get(tensor)
        if path is None:
            src = self._index_path or self.path
            raise CheckpointError(f"{src}: tensor {tensor!r} ({where}) is in no shard of the checkpoint")
        try:
            header = self._header(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (shard of tensor {tensor!r}, {where})") from None
        entry = header.tensors.get(tensor)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {tensor!r} ({where}) is named by {self._index_path} but missing")
        return path, entry

    def _expert_entries(self, layer: int, expert: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], list]]:
        """{spec name: (dtype, concatenated shape, [(path, TensorEntry)])} for one expert, checked
        for concatenation (same dtype, same trailing dims) but not against a spec."""
        if not _is_int(expert) or expert < 0:
            raise CheckpointError(f"{self.path}: expert must be a non-negative int, got {expert!r}")
        ck_layer = self._ckpt_layer(layer)
        out = {}
        for spec_name, templates in self.names.items():
            where = f"spec tensor {spec_name!r}, layer {layer} (checkpoint layer {ck_layer}), expert {expert}"
            entries = []
            for template in templates:
                tensor = template.format(layer=ck_layer, expert=expert)
                entries.append(self._entry(tensor, where))
            first_path, first = entries[0]
            for path, e in entries[1:]:
                if e.dtype != first.dtype:
                    raise CheckpointError(
                        f"{path}: tensor {e.name!r} ({where}) is {e.dtype}, but {first.name!r} in {first_path} "
                        f"is {first.dtype}; concatenated tensors need one dtype"
                    )
                if not e.shape or not first.shape or e.shape[1:] != first.shape[1:]:
                    raise CheckpointError(
                        f"{path}: tensor {e.name!r} ({where}) has shape {list(e.shape)}, which cannot be "
                        f"concatenated on dim 0 with {first.name!r} {list(first.shape)}"
                    )
            if len(entries) == 1:
                shape = first.shape
            else:
                shape = (sum(e.shape[0] for _, e in entries), *first.shape[1:])
            out[spec_name] = (first.dtype, shape, entries)
        return out

    def _check_spec_names(self, spec: ExpertSpec) -> None:
        if not isinstance(spec, ExpertSpec):
            raise CheckpointError(f"spec must be an ExpertSpec, got {type(spec).__name__}")
        missing = [n for n in spec.names if n not in self.names]
        extra = [n for n in self.names if n not in spec.names]
        if missing or extra:
            raise CheckpointError(
                f"{self.path}: names= does not match the spec: spec tensors without a template {missing}, "
                f"templates for tensors not in the spec {extra}"
            )

    def _spec_entries(self, spec: ExpertSpec, layer: int, expert: int) -> list[list[tuple[str, TensorEntry]]]:
        """Per spec tensor (spec order), the checkpoint parts, checked against the spec."""
        found = self._expert_entries(layer, expert)
        out = []
        for t in spec.tensors:
            dtype, shape, entries = found[t.name]
            path, first = entries[0]
            what = f"spec tensor {t.name!r}, layer {layer}, expert {expert}"
            if dtype != t.dtype:
                raise CheckpointError(
                    f"{path}: tensor {first.name!r} ({what}) is {dtype}, the spec says {t.dtype} (no casts are made)"
                )
            if tuple(shape) != t.shape:
                parts = " + ".join(f"{e.name!r} {list(e.shape)}" for _, e in entries)
                raise CheckpointError(
                    f"{path}: {parts} ({what}) give shape {list(shape)}, the spec says {list(t.shape)}"
                )
            out.append(entries)
        return out

    # -- public API -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"path", "names" (lists), "layers" (list or None)}``: what a manifest records."""
        return {
            "path": self.path,
            "names": {k: list(v) for k, v in self.names.items()},
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Checkpoint:
        """Inverse of :meth:`to_dict` (opens the checkpoint)."""
        try:
            return cls(d["path"], d["names"], d.get("layers"))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"malformed checkpoint record {d!r}: {e}") from None

    def validate(self, spec: ExpertSpec, *, num_layers: int, num_experts: int) -> None:
        """Check that every (layer < num_layers, expert < num_experts, spec tensor) exists in the
        checkpoint with the spec's dtype (no casts) and, concatenated, the spec's shape. Byte ranges
        were checked against the file sizes when the headers were parsed. Reads headers only.

        Raises:
            CheckpointError: naming the file, tensor, layer and expert of the first problem.
        """
        self._check_spec_names(spec)
        if not _is_int(num_layers) or num_layers <= 0 or not _is_int(num_experts) or num_experts <= 0:
            raise CheckpointError(f"need num_layers > 0 and num_experts > 0, got {num_layers}, {num_experts}")
        if self.layers is not None and num_layers > len(self.layers):
            raise CheckpointError(
                f"{self.path}: num_layers={num_layers} but layers= maps only {len(self.layers)} store layers"
            )
        for layer in range(num_layers):
            for expert in range(num_experts):
                self._spec_entries(spec, layer, expert)

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """``{spec name: CPU tensor}`` of one expert, templates concatenated on dim 0.

        The tensors own fresh memory (not views of the map); only this expert's
        bytes are read. dtypes and shapes are the checkpoint's.
        """
        found = self._expert_entries(layer, expert)
        out: dict[str, torch.Tensor] = {}
        dests: list[torch.Tensor] = []
        parts: list[tuple[str, int, int, int, int]] = []
        for name, (dtype, shape, entries) in found.items():
            t = torch.empty(shape, dtype=dtype)
            out[name] = t
            doff = 0
            for path, e in entries:
                parts.append((path, e.offset, e.nbytes, len(dests), doff))
                doff += e.nbytes
            dests.append(t.reshape(-1).view(torch.uint8))
        self._execute(parts, dests, threads=DEFAULT_THREADS, staging_bytes=DEFAULT_STAGING_BYTES)
        return out

    def read_into(
        self,
        spec: ExpertSpec,
        targets: Sequence[tuple[int, int, Mapping[str, torch.Tensor]]],
        *,
        threads: int | None = None,
        staging_bytes: int | None = None,
        chunk_bytes: int | None = None,
        method: str | None = None,
        prefetch: bool = True,
        populate: bool = False,
        huge_pages: bool = False,
        streams: int | None = None,
        cold_threads: int | None = None,
        readahead_bytes: int | None = None,
        buffers_per_thread: int | None = None,
        adaptive: bool = True,
    ) -> int:
        """Read experts straight into caller tensors.

        Args:
            spec: the expert spec; its tensor names must equal ``names``' keys.
            targets: ``(layer, expert, {spec name: destination})`` per expert.
                Every destination is a contiguous tensor of the spec tensor's
                shape and dtype, on CPU or CUDA (e.g. one slot of a resident
                slab: ``ResidentSlabs.slot_tensors(layer, slot)``).
            threads: reader threads (default :data:`DEFAULT_THREADS`).
            staging_bytes: pinned host staging in total, for CUDA destinations
                (default :data:`DEFAULT_STAGING_BYTES`).
            chunk_bytes: largest single read, and largest registered window
                (default :data:`DEFAULT_CHUNK_BYTES`).
            method: one of :data:`METHODS` (default :data:`DEFAULT_METHOD`);
                see the module docstring.
            prefetch: ask the kernel to read the ranges ahead (``WILLNEED``).
            populate: map each range with one ``MADV_POPULATE_READ`` before
                copying out of the map or registering it (``"mmap"``,
                ``"register"``, ``"auto"``), instead of page faults.
            huge_pages: ``MADV_HUGEPAGE`` on the maps of the files read (a
                hint: large page-cache folios may then be mapped whole).
            streams: CUDA side streams per destination device that the
                host-to-device copies are spread over (default 1).
            cold_threads: readers of cold reads, which they take in file order
                (default :data:`DEFAULT_COLD_THREADS`).
            readahead_bytes: how far ahead of the cold readers the prefetcher
                hints (default :data:`DEFAULT_READAHEAD_BYTES`).
            buffers_per_thread: pinned staging buffers per reader thread
                (default :data:`DEFAULT_BUFFERS_PER_THREAD`), within
                ``staging_bytes``.
            adaptive: split warm and cold reads (module docstring); False
                gives every read to ``threads`` readers and hints every range
                at once (the former scheduler).

        Returns:
            bytes read: ``len(targets) * spec.nbytes``. How the reads were split
            (warm / cold) is left in :attr:`last_read`.

        Everything (names, shards, dtypes, shapes, destinations) is checked
        before the first byte is written; a failure then leaves the
        destinations untouched. An I/O error during the copy (a disk error, a
        file truncated since it was opened) raises CheckpointError and may
        leave destinations partly written. When CUDA destinations are given,
        the copies are complete (the side streams are synchronized) on return,
        and they start only after work already queued on each destination
        device's current stream. ``"register"`` / ``"auto"`` fail with
        CheckpointError where the driver cannot register read-only file pages
        (``method="pread"`` needs no registration).
        """
        self._check_spec_names(spec)
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
            raise CheckpointError(f"targets must be a sequence of (layer, expert, {{name: tensor}}), got {targets!r}")
        dests: list[torch.Tensor] = []
        parts: list[tuple[str, int, int, int, int]] = []
        for i, target in enumerate(targets):
            if not isinstance(target, (tuple, list)) or len(target) != 3:
                raise CheckpointError(f"targets[{i}] must be (layer, expert, {{name: tensor}}), got {target!r}")
            layer, expert, tensors = target
            if not isinstance(tensors, Mapping) or set(tensors) != set(spec.names):
                got = sorted(tensors) if isinstance(tensors, Mapping) else type(tensors).__name__
                raise CheckpointError(
                    f"targets[{i}] (layer {layer}, expert {expert}): destinations must be given for exactly "
                    f"the spec tensors {list(spec.names)}, got {got}"
                )
            entries = self._spec_entries(spec, layer, expert)
            for t, t_entries in zip(spec.tensors, entries):
                dst = tensors[t.name]
                what = f"targets[{i}] (layer {layer}, expert {expert}) destination {t.name!r}"
                if not isinstance(dst, torch.Tensor):
                    raise CheckpointError(f"{what} must be a torch.Tensor, got {type(dst).__name__}")
                if dst.dtype != t.dtype or tuple(dst.shape) != t.shape:
                    raise CheckpointError(
                        f"{what} is {dst.dtype} {list(dst.shape)}, the spec says {t.dtype} {list(t.shape)}"
                    )
                if not dst.is_contiguous():
                    raise CheckpointError(f"{what} is not contiguous (strides {dst.stride()})")
                if dst.device.type not in ("cpu", "cuda"):
                    raise CheckpointError(f"{what} is on {dst.device}; only cpu and cuda are supported")
                doff = 0
                for path, e in t_entries:
                    parts.append((path, e.offset, e.nbytes, len(dests), doff))
                    doff += e.nbytes
                dests.append(dst.detach().reshape(-1).view(torch.uint8))
        self._execute(
            parts,
            dests,
            threads=_positive("threads", threads, DEFAULT_THREADS),
            staging_bytes=_positive("staging_bytes", staging_bytes, DEFAULT_STAGING_BYTES),
            chunk_bytes=_positive("chunk_bytes", chunk_bytes, DEFAULT_CHUNK_BYTES),
            method=DEFAULT_METHOD if method is None else method,
            prefetch=prefetch,
            populate=populate,
            huge_pages=huge_pages,
            streams=_positive("streams", streams, 1),
            cold_threads=_positive("cold_threads", cold_threads, DEFAULT_COLD_THREADS),
            readahead_bytes=_positive("readahead_bytes", readahead_bytes, DEFAULT_READAHEAD_BYTES),
            buffers_per_thread=_positive("buffers_per_thread", buffers_per_thread, DEFAULT_BUFFERS_PER_THREAD),
            adaptive=bool(adaptive),
        )
        return len(targets) * spec.nbytes

    # -- the mover ----------------------------------------------------------
    def _execute(
        self,
        parts: list[tuple[str, int, int, int, int]],
        dests: list[torch.Tensor],
        *,
        threads: int,
        staging_bytes: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        method: str = DEFAULT_METHOD,
        prefetch: bool = True,
        populate: bool = False,
        huge_pages: bool = False,
        streams: int = 1,
        cold_threads: int = DEFAULT_COLD_THREADS,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        buffers_per_thread: int = DEFAULT_BUFFERS_PER_THREAD,
        adaptive: bool = True,
    ) -> None:
        """Copy ``parts`` (path, file offset, nbytes, dest index, dest byte offset) into
        ``dests`` (flat uint8 tensors). Everything has been validated by the caller."""
        if method not in METHODS:
            raise CheckpointError(f"unknown read method {method!r}; use one of {list(METHODS)}")
        parts = [p for p in parts if p[2] > 0]
        if not parts:
            self.last_read = ReadStats(0, 0, 0, 0, 0, 0, 0, 0)
            return
        files = {path: self._mapped(path) for path in {p[0] for p in parts}}
        if huge_pages:
            for mf in files.values():
                mf.advise_hugepage()
        ops = _DEVICE_OPS
        cuda_parts = [p for p in parts if ops.is_device(dests[p[3]])]
        cpu_parts = [p for p in parts if not ops.is_device(dests[p[3]])]
        copy_method = "mmap" if method == "mmap" else "pread"
        zero_copy = method in ("register", "auto") and bool(cuda_parts)

        # Staging buffers are a multiple of the page size (every buffer starts
        # page-aligned), at most chunk_bytes, and buffers_per_thread of them per
        # reader fit in staging_bytes. With zero-copy, the buffer count also bounds
        # the windows registered at once.
        buf_bytes = 0
        cuda_tasks: list[tuple[str, Any]] = []
        if cuda_parts:
            if staging_bytes < _PAGE:
                raise CheckpointError(f"staging_bytes={staging_bytes} is below one page ({_PAGE} bytes)")
            most = min(buffers_per_thread * max(threads, cold_threads), staging_bytes // _PAGE)
            buf_bytes = max(_PAGE, min(chunk_bytes, staging_bytes // most) // _PAGE * _PAGE)
            if zero_copy:
                windows = _make_windows(cuda_parts, buf_bytes, _PAGE)
                cuda_tasks = [("window", w) for w in windows]
                largest = max(w.span[1] - w.span[0] for w in windows)
            else:
                jobs_ = _make_jobs(cuda_parts, buf_bytes)
                cuda_tasks = [("staged", j) for j in jobs_]
                largest = max(j.nbytes for j in jobs_)
            buf_bytes = min(buf_bytes, -(-largest // _PAGE) * _PAGE)
        tasks: list[tuple[str, Any]] = [("cpu", j) for j in _make_jobs(cpu_parts, chunk_bytes)] + cuda_tasks
        tasks.sort(key=lambda t: (t[1].path, t[1].offset if t[0] != "window" else t[1].start))

        def extent(kind: str, t: Any) -> tuple[int, int]:
            """(first file byte, nbytes) that a task reads or registers."""
            if kind == "window":
                return t.start, min(t.end, files[t.path].header.file_size) - t.start
            return t.offset, t.nbytes

        # Warm / cold: a few pages of each read, checked before anything moves.
        resident = [True] * len(tasks)
        if adaptive or method == "auto":
            for k, (kind, t) in enumerate(tasks):
                off, n = extent(kind, t)
                resident[k] = files[t.path].resident(off, n, samples=_RESIDENCY_SAMPLES)
        warm, cold = _split_reads(resident, adaptive=adaptive)
        warm_used, cold_used = min(threads, len(warm)), min(cold_threads, len(cold))
        nbuf = 0
        if cuda_tasks:
            nbuf = min(buffers_per_thread * (warm_used + cold_used), staging_bytes // buf_bytes, len(cuda_tasks))
        sizes = [extent(kind, t)[1] for kind, t in tasks]
        self.last_read = ReadStats(
            warm_bytes=sum(sizes[k] for k in warm),
            cold_bytes=sum(sizes[k] for k in cold),
            warm_reads=len(warm),
            cold_reads=len(cold),
            warm_threads=warm_used,
            cold_threads=cold_used,
            buffers=nbuf,
            buffer_bytes=buf_bytes if nbuf else 0,
        )

        cpu_arrays: dict[int, np.ndarray] = {}
        for p in cpu_parts:
            if p[3] not in cpu_arrays:
                cpu_arrays[p[3]] = dests[p[3]].numpy()

        # Free list of in-flight slots: (staging buffer index, CUDA events of the copies
        # last issued from it, the window registered for them or None). FIFO: the slot
        # taken is the one released longest ago, whose copies are the most likely done.
        free: queue.Queue[tuple[int, list[Any], tuple[MappedFile, int, int] | None]] = queue.Queue()
        staging_box: list[tuple[torch.Tensor, np.ndarray]] = []
        staging_lock = threading.Lock()
        side: dict[torch.device, list[Any]] = {}
        if cuda_tasks:
            for b in range(nbuf):
                free.put((b, [], None))
            for d in {dests[p[3]].device for p in cuda_parts}:
                side[d] = [ops.stream(d) for _ in range(streams)]
                for s in side[d]:
                    # Destinations may still be read by work queued before this call.
                    s.wait_stream(ops.current_stream(d))

        def staging_buffers() -> tuple[torch.Tensor, np.ndarray]:
            # Allocated on first use: a zero-copy call over resident pages needs none.
            with staging_lock:
                if not staging_box:
                    t = ops.pinned(nbuf * buf_bytes)
                    staging_box.append((t, t.numpy()))
                return staging_box[0]

        if cuda_tasks and not zero_copy:
            staging_buffers()

        def register(mf: MappedFile, start: int, size: int) -> tuple[MappedFile, int, int]:
            """Register the whole pages of file bytes [start, start + size) (start is page-aligned)."""
            addr, length = mf.page_range(start, size)
            flags = _CUDA_HOST_REGISTER_READ_ONLY | _CUDA_HOST_REGISTER_PORTABLE
            err = ops.host_register(addr, length, flags)
            if err is not None:
                raise CheckpointError(
                    f"{mf.path}: cudaHostRegister (read-only, zero-copy) of file bytes [{start}, {start + size}) "
                    f"failed: {err}; method='pread' reads through pinned staging instead"
                )
            return mf, start, size

        def unregister(reg: tuple[MappedFile, int, int]) -> None:
            mf, start, size = reg
            err = ops.host_unregister(mf.address + start)
            if err is not None:
                raise CheckpointError(
                    f"{mf.path}: cudaHostUnregister of file bytes [{start}, {start + size}) failed: {err}"
                )
            mf.release(start, size)  # registration mapped the pages into this process

        def stream_for(dev: torch.device, k: int) -> Any:
            ss = side[dev]
            return ss[k % len(ss)]

        def run_cpu(k: int, job: _Job) -> None:
            arrays = [cpu_arrays[d][o : o + n] for d, o, n in job.pieces]
            files[job.path].copy_into(job.offset, arrays, method=copy_method, populate=populate)

        def issue(k: int, src: torch.Tensor, base: int, pieces: Iterable[tuple[int, int, int, int]]) -> list:
            """Queue ``dests[d][o : o + n] <- src[base + f : base + f + n]`` for each piece
            (f, d, o, n); return an event per stream used."""
            used: dict[Any, None] = {}
            for f, d, o, n in pieces:
                dst = dests[d]
                s = stream_for(dst.device, k)
                with ops.use_stream(s):
                    dst[o : o + n].copy_(src[base + f : base + f + n], non_blocking=True)
                used[s] = None
            events = []
            for s in used:
                ev = ops.event()
                ev.record(s)
                events.append(ev)
            return events

        def run_staged(k: int, job: _Job) -> None:
            b, events, reg = free.get()
            try:
                for ev in events:
                    ev.synchronize()  # the buffer's previous H2D copies are done
                events = []
                staging, staging_np = staging_buffers()
                start = b * buf_bytes
                files[job.path].copy_into(
                    job.offset, [staging_np[start : start + job.nbytes]], method=copy_method, populate=populate
                )
                pieces, pos = [], job.offset
                for d, o, n in job.pieces:
                    pieces.append((pos, d, o, n))
                    pos += n
                events = issue(k, staging, start - job.offset, pieces)
            finally:
                free.put((b, events, reg))

        def run_window(k: int, w: _Window) -> None:
            b, events, reg = free.get()
            try:
                for ev in events:
                    ev.synchronize()  # copies out of the slot's last window are done
                events = []
                if reg is not None:
                    unregister(reg)
                    reg = None
                mf = files[w.path]
                size = min(w.end, mf.header.file_size) - w.start
                direct = size >= _MIN_ZERO_COPY_BYTES and (method == "register" or resident[k])
                if direct:
                    if populate:
                        mf.populate(w.start, size)
                    reg = register(mf, w.start, size)
                    events = issue(k, mf.host_tensor(), 0, w.pieces)
                else:
                    lo, hi = w.span
                    staging, staging_np = staging_buffers()
                    start = b * buf_bytes
                    mf.copy_into(lo, [staging_np[start : start + hi - lo]], method="pread")
                    events = issue(k, staging, start - lo, w.pieces)
            finally:
                free.put((b, events, reg))

        runners = {"cpu": run_cpu, "staged": run_staged, "window": run_window}
        failed = threading.Event()
        errors: list[BaseException] = []
        # Cold reads claimed so far (readers take them in file order); the prefetcher
        # waits on ``progress`` for claims before it hints further ahead.
        claimed = [0]
        progress = threading.Condition()
        cold_cum = [0]
        for k in cold:
            cold_cum.append(cold_cum[-1] + sizes[k])

        def run(k: int) -> bool:
            kind, task = tasks[k]
            try:
                runners[kind](k, task)
                return True
            except BaseException as e:
                if not isinstance(e, StoreError):
                    first, n = extent(kind, task)
                    e = CheckpointError(f"{task.path}: reading bytes [{first}, {first + n}) failed: {e}")
                errors.append(e)
                failed.set()
                with progress:
                    progress.notify_all()  # wake the prefetcher so it can stop
                return False

        next_warm = iter(warm)
        warm_lock = threading.Lock()

        def warm_worker() -> None:
            while not failed.is_set():
                with warm_lock:
                    k = next(next_warm, None)
                if k is None or not run(k):
                    return

        def cold_worker() -> None:
            while not failed.is_set():
                with progress:
                    j = claimed[0]
                    if j >= len(cold):
                        return
                    claimed[0] = j + 1
                    progress.notify_all()
                if not run(cold[j]):
                    return

        def hint(k: int) -> bool:
            kind, t = tasks[k]
            off, n = extent(kind, t)
            try:
                files[t.path].advise_willneed(off, n)
            except OSError:
                return False  # a hint only: reads still work without it
            return True

        def cold_prefetcher() -> None:
            """Hint the cold reads in file order, never more than readahead_bytes past the first
            one no reader has taken yet; skip those a reader took first (its read fetches them)."""
            for j in range(len(cold)):
                with progress:
                    while not failed.is_set() and not _readahead_allows(j, claimed[0], cold_cum, readahead_bytes):
                        progress.wait(0.1)
                    if failed.is_set():
                        return
                    if j < claimed[0]:
                        continue
                if not hint(cold[j]):
                    return

        def flat_prefetcher() -> None:
            # adaptive=False: every range at once, in file order (the former scheduler).
            for k in range(len(tasks)):
                if failed.is_set() or not hint(k):
                    return

        if adaptive:
            prefetcher = cold_prefetcher if prefetch and len(cold) > 1 else None
        else:
            prefetcher = flat_prefetcher if prefetch and len(tasks) > 1 else None
        workers = [warm_worker] * warm_used + [cold_worker] * cold_used + ([prefetcher] if prefetcher else [])
        # Registrations of two concurrent calls could overlap (the driver refuses that).
        lock = self._zero_copy_lock if zero_copy else contextlib.nullcontext()
        with lock:
            try:
                if len(workers) == 1:
                    workers[0]()  # nothing to overlap: stay on the caller's thread
                else:
                    pool = self._executor(len(workers))
                    concurrent.futures.wait([pool.submit(w) for w in workers])
            finally:
                # Staging and registered windows must outlive the copies out of them.
                for ss in side.values():
                    for s in ss:
                        s.synchronize()
                while not free.empty():
                    _, _, reg = free.get_nowait()
                    if reg is not None:
                        try:
                            unregister(reg)
                        except BaseException as e:
                            errors.append(e)
        if errors:
            raise errors[0]

    # -- resources ----------------------------------------------------------
    def _executor(self, workers: int) -> concurrent.futures.ThreadPoolExecutor:
        """The reader threads, kept between calls: starting 9 threads per call cost ~0.5 ms, a
        third of a 12 MB warm read (measured on the 2-core CI VM). Grows to the largest request."""
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.path}: checkpoint is closed")
            if self._pool is None or self._pool_size < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)  # idle threads exit; running calls finish
                self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="es-ckpt-read")
                self._pool_size = workers
            return self._pool

    def close(self) -> None:
        """Close every mapped file and stop the reader threads. Idempotent; the checkpoint cannot
        read afterwards."""
        with self._lock:
            self._closed = True
            files, self._files = list(self._files.values()), {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for mf in files:
            mf.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self._weight_map)} tensors, layers={self.layers})"

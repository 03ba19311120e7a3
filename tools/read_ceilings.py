"""The plain reads and copies that bound a checkpoint read, shared by the GPU tools.

tools/bench_checkpoint_gpu.py and tools/diagnose_reads_gpu.py measure their rows against the
same ceilings; one implementation of each keeps their figures comparable:

* ``host_copy``: page cache -> pinned host memory by N threads (``preadv``, or ``memcpy`` out of
  a map of the files), each into its own ring of 2 buffers;
* ``sequential_reader``: the same bytes read in file order by one thread, or by N;
* ``direct_reader``: the same bytes read with ``O_DIRECT`` (no page cache) by N threads;
* ``pinned_h2d``: one pinned host-to-device copy of the same number of bytes.

Each returns the function of one run, which the tools time; the threaded readers take their
ranges in file order, the next free thread the next range (``run_pool``). ``local_dir``: where
to write the checkpoint that they read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

# The tools import this module after putting the repository root on sys.path.
from expert_store.safetensors_file import _MAP_FAILED, _libc

MiB = 1 << 20
CHUNK = 16 * MiB
T = TypeVar("T")


# -- threads ------------------------------------------------------------------------


def run_threads(work: Callable[[int], None], threads: int) -> None:
    """``work(i)`` on ``threads`` threads at once (i = 0 .. threads - 1); returns when all are done."""
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def run_pool(items: Iterable[T], threads: int, work: Callable[[int, Iterator[T]], None]) -> None:
    """``work(i, queue)`` on ``threads`` threads; every ``queue`` draws from the one iterator over
    ``items`` (under a lock), so the items go out in order, each to whichever thread asks next."""
    it = iter(items)
    lock = threading.Lock()

    def queue() -> Iterator[T]:
        while True:
            with lock:
                r = next(it, None)
            if r is None:
                return
            yield r

    run_threads(lambda i: work(i, queue()), threads)


def file_ranges(files: list[Path], cap: int, chunk: int) -> list[tuple[Path, int, int]]:
    """(file, offset, n) chunks covering the first ``cap`` bytes of the files, in order."""
    out, left = [], cap
    for f in files:
        size = f.stat().st_size
        for off in range(0, size, chunk):
            n = min(chunk, size - off, left)
            if n <= 0:
                return out
            out.append((f, off, n))
            left -= n
    return out


# -- page cache -> pinned host memory ----------------------------------------------------


class Maps:
    """Read-only maps of the files (addresses for memmove). The pages come in on the first run
    that copies out of them (the callers' untimed warm-up run)."""

    def __init__(self, files: list[Path]) -> None:
        self.fds, self.addr, self.size = {}, {}, {}
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            size = os.fstat(fd).st_size
            a = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if a is None or a == _MAP_FAILED:
                raise OSError(f"cannot map {f}")
            self.fds[f], self.addr[f], self.size[f] = fd, a, size

    def close(self) -> None:
        for f, a in self.addr.items():
            _libc.munmap(a, self.size[f])
            os.close(self.fds[f])


def host_copy(
    ranges: list[tuple[Path, int, int]],
    threads: int,
    chunk: int,
    method: str,
    maps: Maps | None,
    *,
    pinned: bool = True,
    piece: int | None = None,
) -> Callable[[], None]:
    """``threads`` readers take ``ranges`` in order, each into its own ring of 2 host buffers of
    ``chunk`` bytes (pinned unless ``pinned`` is false: a run without CUDA); ``method`` "preadv",
    or "memcpy_map" (memmove out of ``maps``); ``piece`` (preadv only): each range read by preadvs
    of at most that size. The files are opened when this is built; the run's ``close()`` closes
    them (not ``maps``), its ``ring`` is the buffers."""
    ring = torch.empty(threads * 2 * chunk, dtype=torch.uint8, pin_memory=pinned)
    ring_np = ring.numpy()
    base = ring.data_ptr()
    fds = {f: os.open(f, os.O_RDONLY) for f in {r[0] for r in ranges}}
    step = piece or chunk

    def run() -> None:
        def work(i: int, queue: Iterator[tuple[Path, int, int]]) -> None:
            k = 0
            for f, off, n in queue:
                lo = (2 * i + k) * chunk
                if method == "preadv":
                    for at in range(0, n, step):
                        m = min(step, n - at)
                        os.preadv(fds[f], [memoryview(ring_np[lo + at : lo + at + m])], off + at)
                else:
                    ctypes.memmove(base + lo, maps.addr[f] + off, n)
                k ^= 1

        run_pool(ranges, threads, work)

    def close() -> None:
        for fd in fds.values():
            os.close(fd)

    run.close = close  # type: ignore[attr-defined]
    run.ring = ring  # type: ignore[attr-defined]
    return run


# -- plain reads of the same bytes ---------------------------------------------------------


def sequential_reader(files: list[Path], nbytes: int, *, threads: int = 1, chunk: int = CHUNK) -> Callable[[], None]:
    """Read ``nbytes`` consecutive bytes from the start of ``files`` (in order) into a pageable buffer:
    one thread with ``chunk`` readinto (plain), or ``threads`` threads with ``chunk`` preadv. The
    files are opened (and closed) inside the run."""
    buf = np.ones(nbytes, dtype=np.uint8)  # ones: the pages exist before timing
    ranges = []  # (file, file offset, buffer offset, n)
    pos = 0
    for f, off, n in file_ranges(files, nbytes, chunk):
        ranges.append((f, off, pos, n))
        pos += n

    def plain() -> None:
        for f in {r[0]: None for r in ranges}:
            with open(f, "rb", buffering=0) as fh:
                for rf, off, boff, n in ranges:
                    if rf == f:
                        fh.seek(off)
                        fh.readinto(memoryview(buf[boff : boff + n]))

    def pooled() -> None:
        fds = {f: os.open(f, os.O_RDONLY) for f in {r[0] for r in ranges}}

        def work(_: int, queue: Iterator[tuple[Path, int, int, int]]) -> None:
            for f, off, boff, n in queue:
                os.preadv(fds[f], [memoryview(buf[boff : boff + n])], off)

        run_pool(ranges, threads, work)
        for fd in fds.values():
            os.close(fd)

    return plain if threads == 1 else pooled


def direct_reader(files: list[Path], nbytes: int, *, threads: int = 8, chunk: int = CHUNK) -> Callable[[], None]:
    """``nbytes`` consecutive bytes from the start of ``files`` read with ``O_DIRECT`` (no page
    cache) by ``threads`` readers, ``chunk`` per read (queue depth ``threads``), each into its own
    page-aligned buffer. Raises OSError where the filesystem refuses O_DIRECT."""
    # O_DIRECT reads whole 4 KiB blocks: a short last read (of a file, or of nbytes) is rounded
    # up to them (past a file's end the read returns what there is).
    ranges = [(f, off, -(-n // 4096) * 4096) for f, off, n in file_ranges(files, nbytes, chunk)]
    fds = {f: os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for f in {r[0] for r in ranges}}
    bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]  # anonymous maps are page-aligned

    def run() -> None:
        def work(i: int, queue: Iterator[tuple[Path, int, int]]) -> None:
            view = memoryview(bufs[i])
            for f, off, n in queue:
                os.preadv(fds[f], [view[:n]], off)

        run_pool(ranges, threads, work)

    return run


# -- the host-to-device copy ----------------------------------------------------------------


def pinned_h2d(nbytes: int) -> Callable[[], None]:
    """One copy of ``nbytes`` from pinned host memory to the current GPU, waited for (the warm
    ceiling); the run's ``src`` and ``dst`` are its buffers."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    run.src, run.dst = src, dst  # type: ignore[attr-defined]
    return run


# -- where to write the checkpoint -----------------------------------------------------------


def fs_type(path: Path) -> str:
    """The type of the filesystem mounted where ``path`` lies ("?" if /proc/mounts cannot say)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, fstype, *_ = line.split()
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        pass
    return kind


def local_dir(requested: str | None) -> Path:
    """``requested``, else the temporary directory if it is on a disk-backed filesystem, else the
    working directory (tmpfs pages cannot be evicted, so a cold read there would mean nothing)."""
    if requested:
        return Path(requested)
    tmp = Path(tempfile.gettempdir())
    return tmp if fs_type(tmp) not in ("tmpfs", "ramfs") else Path.cwd()

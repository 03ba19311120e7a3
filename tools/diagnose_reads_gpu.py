#!/usr/bin/env python
"""Where a warm checkpoint read into GPU slots spends its time (issue 13), in one run.

One command on the GPU machine, from the repository root (under 3 minutes on the H200 host)::

    python tools/diagnose_reads_gpu.py             # DeepSeek-V3 sized, 128 experts (5.6 GB)
    python tools/diagnose_reads_gpu.py --experts 64
    python tools/diagnose_reads_gpu.py --smoke     # tiny, CPU only: checks the script itself

Writes one MoE layer of DeepSeek-V3 fp8 experts (H=7168, I=2048: 44 MB each with their fp32
scales) to a local temporary directory, brings it into the page cache, then measures, as GB/s:

1. **ceilings**: the pinned host-to-device copy of 1 GiB (one copy, and as 4 / 16 MiB copies
   on one stream), and a pageable one;
2. **page cache -> pinned host memory** with 1 / 2 / 4 / 8 / 16 threads, by ``preadv`` and by
   ``memcpy`` out of a (pre-faulted) map, 4 and 16 MiB reads into a ring of 2 buffers per thread,
   and 16 / 32 MiB buffers each filled by 4 MiB preadvs (the library's warm staged reads:
   whether the small reads' rate holds in a large buffer) (aggregate and per thread);
3. **contention**: the pinned H2D copy while 8 / 16 threads copy page cache -> pinned (both
   rates in the same window): whether the host memory bus carries both at once;
4. **a lean pipeline** (in this script, as little Python per read as possible): N threads, each
   ``preadv`` into its own pinned buffer then ``copy_`` on one shared stream, event before reuse;
   what the approach reaches without the library's bookkeeping;
5. **expert-store ``read_into``** warm for 16 and 128 experts, untimed-traced once through the
   private hook ``expert_store.checkpoint._TRACE``: per reader thread, the time waiting for a free
   staging buffer (the buffer's earlier copies), reading (its copy rate), queueing the copies and
   between reads (locks, the GIL); the copy engine's busy and idle time (CUDA timing events around
   each read's copies); staging size, buffers, reads per buffer, setup time before the first read;
6. **a sweep of the reader's settings** on 16 and on all 128 experts: the library's defaults,
   the settings before issue 13 (8 threads, one 16 MiB preadv per 16 MiB buffer), and
   ``_ReadSettings`` variants: 2 / 4 / 8 (/ 16) MiB preadvs into 16 / 32 MiB staging buffers
   (2 per thread), 12 / 16 threads, and 4 MiB reads into 8 MiB buffers; round-robin over the
   settings (``--sweep-repeats`` rounds, median), GB/s and the ratio to the pinned H2D copy; the
   best row on 128 experts and the line of ``_ReadSettings`` that would make it the default.

Prints short tables; writes everything to ``$OUT/diagnose_reads.json`` if ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "tests", _ROOT / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import ckpt_factory as cf  # noqa: E402
import torch  # noqa: E402
from read_ceilings import Maps, file_ranges, host_copy, local_dir, pinned_h2d, run_pool  # noqa: E402

import expert_store.checkpoint as ckmod  # noqa: E402
from expert_store.layout import ResidentSlabs, SlabLayout  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30

# The reader's settings before issue 13's work (what the issue's table measured: 8 threads, one
# 16 MiB preadv per 16 MiB staging buffer), compared with in the same run. Fields a version of
# _ReadSettings lacks are dropped (so this runs against the settings of either version).
BASELINE = {
    "threads": 8,
    "chunk_bytes": 16 * MiB,
    "read_bytes": 16 * MiB,
    "buffers_per_thread": 2,
    "staging_bytes": 256 * MiB,
}
BEFORE = "8 thr, 16 MiB reads = buffers (before issue 13)"
# The library's own settings in the sweep (read_into's defaults, staging_bytes=None).
LIBRARY = "library defaults"


# -- device, or a CPU stand-in (--smoke) ---------------------------------------------


class _CpuEvent:
    """A stand-in CUDA event: the host time of record()."""

    def __init__(self, *a, **k) -> None:
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.t - self.t) * 1e3


class _CpuStream:
    def wait_stream(self, other) -> None: ...

    def synchronize(self) -> None: ...


class Dev:
    """The few device calls the measurements need, on CUDA or (smoke) on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.name = "cuda" if cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def pinned(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)

    def empty(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, device=self.name)

    def stream(self):
        return torch.cuda.Stream() if self.cuda else _CpuStream()

    def use(self, stream):
        return torch.cuda.stream(stream) if self.cuda else _Null()

    def event(self, timing: bool = False):
        if not self.cuda:
            return _CpuEvent()
        return torch.cuda.Event(enable_timing=True) if timing else torch.cuda.Event(blocking=True)

    def free_host_cache(self) -> None:
        """Give cached pinned blocks back (the sweep allocates many sizes)."""
        if self.cuda and hasattr(torch._C, "_host_emptyCache"):
            torch.cuda.synchronize()
            torch._C._host_emptyCache()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a) -> None: ...


class _SmokeOps(ckmod._CudaOps):
    """--smoke: every destination counts as a device destination (the staged pipeline on CPU)."""

    def is_device(self, t):
        return True

    def stream(self, device):
        return _CpuStream()

    current_stream = stream

    def use_stream(self, stream):
        return _Null()

    def event(self):
        return _CpuEvent()

    def pinned(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)


# -- timing helpers -------------------------------------------------------------------


def median_s(fn: Callable[[], object], dev: Dev, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    dev.sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dev.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# -- 1. ceilings ----------------------------------------------------------------------


def h2d_ceilings(dev: Dev, repeats: int, nbytes: int) -> dict[str, float]:
    copy = pinned_h2d(nbytes)
    src, dst = copy.src, copy.dst
    src.fill_(1)
    out = {"pinned_h2d_1copy": gbps(nbytes, median_s(copy, dev, repeats))}
    for chunk in (4 * MiB, 16 * MiB):

        def chunked(chunk=chunk) -> None:
            for o in range(0, nbytes, chunk):
                dst[o : o + chunk].copy_(src[o : o + chunk], non_blocking=True)

        out[f"pinned_h2d_{chunk // MiB}MiB_copies"] = gbps(nbytes, median_s(chunked, dev, repeats))
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    out["pageable_h2d_1copy"] = gbps(nbytes, median_s(lambda: dst.copy_(pageable, non_blocking=True), dev, repeats))
    copy = src = dst = pageable = None
    dev.free_host_cache()
    return out


# -- 2. page cache -> pinned ----------------------------------------------------------


# (method, buffer MiB, piece MiB or None): the rows of the page-cache table. "preadv 4 in 16":
# 16 MiB ring buffers, each filled by four 4 MiB preadvs (the library's warm staged reads).
HOST_ROWS = (
    ("preadv", 4, None),
    ("preadv", 16, None),
    ("preadv", 16, 4),
    ("preadv", 32, 4),
    ("memcpy_map", 4, None),
    ("memcpy_map", 16, None),
)


def host_row_name(method: str, buf: int, piece: int | None) -> str:
    return f"{method} {buf}Mi" if piece is None else f"{method} {piece} in {buf}Mi"


def page_cache_to_pinned(files, dev, repeats, cap, thread_counts, smoke: bool = False) -> list[dict]:
    rows = []
    maps = Maps(files)
    try:
        for method, buf, piece in HOST_ROWS:
            # --smoke: the same rows in KiB
            chunk, step = (buf * MiB, piece and piece * MiB) if not smoke else (buf << 10, piece and piece << 10)
            ranges = file_ranges(files, cap, chunk)
            nbytes = sum(r[2] for r in ranges)
            for t in thread_counts:
                fn = host_copy(ranges, t, chunk, method, maps, pinned=dev.cuda, piece=step)
                s = median_s(fn, dev, repeats)
                fn.close()
                rows.append(
                    {
                        "method": method,
                        "chunk_MiB": buf,
                        "piece_MiB": piece,
                        "name": host_row_name(method, buf, piece),
                        "threads": t,
                        "gbps": gbps(nbytes, s),
                    }
                )
                rows[-1]["per_thread_gbps"] = rows[-1]["gbps"] / t
                del fn
            dev.free_host_cache()
    finally:
        maps.close()
    return rows


# -- 3. contention: DMA and CPU copies at once ----------------------------------------


def contention(files, dev, threads: int, chunk: int, seconds: float) -> dict[str, float]:
    """H2D copies of 256 MiB back to back on the main thread while ``threads`` readers copy page
    cache -> pinned in a loop; both rates over the same window."""
    ranges = file_ranges(files, 1 << 62, chunk)
    n_h2d = 256 * MiB
    src, dst = dev.pinned(n_h2d), dev.empty(n_h2d)
    ring = dev.pinned(threads * 2 * chunk)
    ring_np = ring.numpy()
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    stop = threading.Event()
    counts = [0] * threads

    def work(i: int) -> None:
        k, j = 0, i
        while not stop.is_set():
            f, off, n = ranges[j % len(ranges)]
            lo = (2 * i + k) * chunk
            os.preadv(fds[f], [memoryview(ring_np[lo : lo + n])], off)
            counts[i] += n
            k ^= 1
            j += threads

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    try:
        time.sleep(0.05)
        dev.sync()
        c0, t0, copies = sum(counts), time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):
                dst.copy_(src, non_blocking=True)
            copies += 4
            dev.sync()
        t1, c1 = time.perf_counter(), sum(counts)
    finally:
        stop.set()
        for t in ts:
            t.join()
        for fd in fds.values():
            os.close(fd)
    out = {"threads": threads, "chunk_MiB": chunk // MiB}
    out["h2d_gbps_under_load"] = gbps(copies * n_h2d, t1 - t0)
    out["host_copy_gbps_under_load"] = gbps(c1 - c0, t1 - t0)
    src = dst = ring = ring_np = None
    dev.free_host_cache()
    return out


# -- 4. a lean pipeline -----------------------------------------------------------------


def lean_pipeline(files, dev, repeats, cap, threads: int, chunk: int, bufs: int, dst: torch.Tensor) -> dict:
    ranges = file_ranges(files, cap, chunk)
    nbytes = sum(r[2] for r in ranges)
    doffs = [0]
    for r in ranges:
        doffs.append(doffs[-1] + r[2])
    staging = dev.pinned(threads * bufs * chunk)
    st_np = staging.numpy()
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    stream = dev.stream()

    def run() -> None:
        def work(i: int, queue) -> None:
            evs = [None] * bufs
            k = 0
            with dev.use(stream):
                for j in queue:
                    f, off, n = ranges[j]
                    if evs[k] is not None:
                        evs[k].synchronize()
                    lo = (i * bufs + k) * chunk
                    os.preadv(fds[f], [memoryview(st_np[lo : lo + n])], off)
                    dst[doffs[j] : doffs[j] + n].copy_(staging[lo : lo + n], non_blocking=True)
                    evs[k] = dev.event()
                    evs[k].record(stream)
                    k = (k + 1) % bufs
            for e in evs:
                if e is not None:
                    e.synchronize()

        run_pool(range(len(ranges)), threads, work)

    try:
        s = median_s(run, dev, repeats)
    finally:
        for fd in fds.values():
            os.close(fd)
    staging = st_np = None
    dev.free_host_cache()
    return {"threads": threads, "chunk_MiB": chunk // MiB, "bufs_per_thread": bufs, "gbps": gbps(nbytes, s)}


# -- 5. read_into, traced ---------------------------------------------------------------


class Trace:
    """The object set as ``checkpoint._TRACE``: keeps what the mover reports."""

    def __init__(self, dev: Dev) -> None:
        self.dev = dev
        self.plans: list[dict] = []
        self.rows: list[tuple] = []
        self.t_plan = 0.0

    def plan(self, *, nbuf, buf_bytes, warm, cold, readers, read_bytes=None) -> None:
        self.t_plan = time.perf_counter()
        self.plans.append(
            {
                "nbuf": nbuf,
                "buf_bytes": buf_bytes,
                "read_bytes": read_bytes,
                "staging_bytes": nbuf * buf_bytes,
                "warm_reads": len(warm),
                "cold_reads": len(cold),
                "readers": list(readers),
            }
        )

    def copies_begin(self, streams):
        marks = []
        for st in streams:
            e = self.dev.event(timing=True)
            e.record(st)
            marks.append((st, e))
        return marks

    def read(self, job, buffer, t0, t1, t2, t3, mark) -> None:
        ends = None
        if mark is not None:
            ends = []
            for st, _ in mark:
                e = self.dev.event(timing=True)
                e.record(st)
                ends.append(e)
        self.rows.append((threading.get_ident(), job.nbytes, len(job.pieces), buffer, t0, t1, t2, t3, mark, ends))


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def traced_read(ckpt, spec, targets, dev: Dev, staging: int | None = None) -> dict:
    """One read_into with the trace on; what the threads and the copy engine did."""
    tr = Trace(dev)
    ref = dev.event(timing=True)
    ref.record()
    dev.sync()
    t_call = time.perf_counter()
    ckmod._TRACE = tr
    try:
        stats = ckpt.read_into(spec, targets, staging_bytes=staging)
    finally:
        ckmod._TRACE = None
    dev.sync()
    t_end = time.perf_counter()
    wall = t_end - t_call
    rows = tr.rows
    out: dict = {"wall_ms": wall * 1e3, "traced_gbps": gbps(stats.nbytes, wall), "reads": len(rows)}
    out |= tr.plans[-1] if tr.plans else {}
    if not rows:
        return out
    first = min(r[4] for r in rows)
    out["setup_ms"] = (first - t_call) * 1e3  # checks, planning, mincore, staging, streams, threads
    out["plan_to_first_read_ms"] = (first - tr.t_plan) * 1e3 if tr.t_plan else None
    out["after_last_queued_ms"] = (t_end - max(r[7] for r in rows)) * 1e3  # last copies draining, checks
    if out.get("nbuf"):
        out["reads_per_buffer"] = len(rows) / out["nbuf"]
    out["pieces_per_read"] = sum(r[2] for r in rows) / len(rows)
    per: dict[int, list] = {}
    for r in rows:
        per.setdefault(r[0], []).append(r)
    threads = []
    for rs in per.values():
        rs.sort(key=lambda r: r[4])
        nb = sum(r[1] for r in rs)
        wait = sum(r[5] - r[4] for r in rs)
        read = sum(r[6] - r[5] for r in rs)
        queue = sum(r[7] - r[6] for r in rs)
        gaps = sum(b[4] - a[7] for a, b in itertools.pairwise(rs))
        span = rs[-1][7] - rs[0][4]
        threads.append(
            {
                "reads": len(rs),
                "bytes": nb,
                "span_ms": span * 1e3,
                "wait_buffer_ms": wait * 1e3,
                "read_ms": read * 1e3,
                "queue_copies_ms": queue * 1e3,
                "between_reads_ms": gaps * 1e3,
                "copy_gbps": gbps(nb, read),
            }
        )
    out["threads"] = threads
    tot = {k: sum(t[k] for t in threads) for k in ("span_ms", "wait_buffer_ms", "read_ms", "queue_copies_ms")}
    tot["between_reads_ms"] = sum(t["between_reads_ms"] for t in threads)
    out["thread_time_split"] = {k: v / max(tot["span_ms"], 1e-9) for k, v in tot.items() if k != "span_ms"}
    out["per_thread_copy_gbps"] = gbps(sum(t["bytes"] for t in threads), tot["read_ms"] / 1e3)
    out["thread_copy_gbps_min_max"] = [min(t["copy_gbps"] for t in threads), max(t["copy_gbps"] for t in threads)]
    # The copy engine: each staged read's copies between two timing events on the side stream.
    iv = []
    for r in rows:
        if r[8] is None:
            continue
        for (_, b), e in zip(r[8], r[9]):
            iv.append((ref.elapsed_time(b), ref.elapsed_time(e)))
    if iv:
        lo, hi = min(s for s, _ in iv), max(e for _, e in iv)
        busy = _union_ms(iv)
        out["dma"] = {
            "first_copy_ms": lo,
            "last_copy_end_ms": hi,
            "busy_ms": busy,
            "idle_in_window_ms": hi - lo - busy,
            "idle_fraction_of_wall": 1 - busy / (wall * 1e3),
            "rate_while_busy_gbps": gbps(sum(r[1] for r in rows if r[8] is not None), busy / 1e3),
        }
    return out


def print_trace(what: str, tr: dict) -> None:
    sp, dma = tr.get("thread_time_split", {}), tr.get("dma", {})
    rb = tr.get("read_bytes")
    print(
        f"  {what}, traced {tr['traced_gbps']:.1f} GB/s: staging {tr.get('nbuf')} x "
        f"{tr.get('buf_bytes', 0) / MiB:.0f} MiB"
        + (f" filled by <= {rb / MiB:g} MiB preadvs" if rb else "")
        + f", {tr.get('reads_per_buffer', 0):.1f} reads per buffer, "
        f"{tr.get('pieces_per_read', 0):.2f} copies per read, {len(tr.get('threads', []))} threads; "
        f"setup {tr.get('setup_ms', 0):.1f} ms, drain after last queued {tr.get('after_last_queued_ms', 0):.1f} ms "
        f"of {tr['wall_ms']:.1f}"
    )
    print(
        "    reader time: "
        + ", ".join(f"{k.replace('_ms', '')} {v:.0%}" for k, v in sp.items())
        + f"; copy rate per thread {tr.get('per_thread_copy_gbps', 0):.2f} GB/s "
        f"(min/max {', '.join(f'{x:.2f}' for x in tr.get('thread_copy_gbps_min_max', []))})"
    )
    if dma:
        print(
            f"    copy engine: first copy at {dma['first_copy_ms']:.1f} ms, busy {dma['busy_ms']:.1f} ms, "
            f"idle {dma['idle_in_window_ms']:.1f} ms between copies, idle {dma['idle_fraction_of_wall']:.0%} "
            f"of the call; {dma['rate_while_busy_gbps']:.1f} GB/s while busy"
        )


# -- 6. the settings sweep ---------------------------------------------------------------


def settings_variant(over: dict) -> tuple[ckmod._ReadSettings, int | None]:
    """A _ReadSettings with the fields of ``over`` that this version has; and staging_bytes."""
    names = {f.name for f in dataclasses.fields(ckmod._ReadSettings)}
    kw = {k: v for k, v in over.items() if k in names and k != "staging_bytes"}
    return dataclasses.replace(ckmod._ReadSettings(), **kw), over.get("staging_bytes")


def es_rate(ckpt, spec, targets, dev: Dev, repeats: int, over: dict | None) -> tuple[float, dict]:
    """Median GB/s of read_into with the settings ``over`` (None: the library's own)."""
    saved = ckmod._SETTINGS
    staging = None
    if over is not None:
        ckmod._SETTINGS, staging = settings_variant(over)
    try:
        last: list = []

        def run() -> None:
            last[:] = [ckpt.read_into(spec, targets, staging_bytes=staging)]

        s = median_s(run, dev, repeats)
    finally:
        ckmod._SETTINGS = saved
    return gbps(last[0].nbytes, s), {"warm_reads": last[0].warm_reads, "cold_reads": last[0].cold_reads}


def sweep_grid(smoke: bool) -> dict[str, dict | None]:
    """{label: settings (None: the library's own)}: the library's defaults, the settings before
    issue 13, last run's best (16 threads, one 16 MiB preadv per 16 MiB buffer), and warm staged
    reads cut into 2 / 4 / 8 MiB preadvs into 16 / 32 MiB buffers by 12 / 16 threads (2 buffers
    per thread, the staging sized to hold them), and 16 threads with 4 MiB reads into 8 MiB
    buffers. --smoke: the same in KiB, 2 / 4 threads."""
    unit = MiB if not smoke else 1 << 10
    before = BASELINE if not smoke else {k: v // MiB * unit if k.endswith("_bytes") else v for k, v in BASELINE.items()}
    grid: dict[str, dict | None] = {LIBRARY: None, BEFORE: before}
    for threads in (12, 16) if not smoke else (2, 4):
        for buf in (16, 32):
            for piece in (2, 4, 8, 16) if buf == 16 else (2, 4, 8):
                over = {
                    "threads": threads,
                    "chunk_bytes": buf * unit,
                    "read_bytes": piece * unit,
                    "buffers_per_thread": 2,
                    "staging_bytes": threads * 2 * buf * unit,
                }
                grid[label(over, smoke)] = over
    # A smaller staging footprint (if 4 MiB reads won by the ring's size in the cache, not theirs)
    threads = 16 if not smoke else 4
    over = {"threads": threads, "chunk_bytes": 8 * unit, "read_bytes": 4 * unit, "buffers_per_thread": 2}
    grid[label(over, smoke)] = over | {"staging_bytes": threads * 2 * 8 * unit}
    return grid


def label(over: dict, smoke: bool = False) -> str:
    u, name = (MiB, "MiB") if not smoke else (1 << 10, "KiB")
    return (
        f"{over['threads']} thr, {over['read_bytes'] // u} {name} reads into {over['chunk_bytes'] // u} {name} "
        f"x {over['buffers_per_thread']}/thr"
    )


def sweep(ckpt, spec, targets, dev: Dev, repeats: int, grid: dict[str, dict | None]) -> dict[str, float]:
    """Median GB/s of read_into per setting, the settings taken round-robin (one run each per
    round, after one warm-up round), so that a drift of the host hits every row alike."""
    nbytes = len(targets) * spec.nbytes
    times: dict[str, list[float]] = {k: [] for k in grid}
    saved = ckmod._SETTINGS
    try:
        for rnd in range(repeats + 1):
            for name, over in grid.items():
                staging = None
                ckmod._SETTINGS = saved
                if over is not None:
                    ckmod._SETTINGS, staging = settings_variant(over)
                dev.sync()
                t0 = time.perf_counter()
                ckpt.read_into(spec, targets, staging_bytes=staging)
                dev.sync()
                if rnd:
                    times[name].append(time.perf_counter() - t0)
    finally:
        ckmod._SETTINGS = saved
    return {k: gbps(nbytes, statistics.median(v)) for k, v in times.items()}


def adopt_line(over: dict | None) -> str:
    """What to change in _ReadSettings (expert_store/checkpoint.py) to make ``over`` the default."""
    if over is None:
        return "keep the defaults (the library's own settings won)"
    lib = dataclasses.asdict(ckmod._SETTINGS)
    lines = []
    for k in ("threads", "chunk_bytes", "read_bytes", "buffers_per_thread", "staging_bytes"):
        v = over.get(k)
        if v is None or v == lib.get(k) or (k == "staging_bytes" and v <= lib[k]):  # staging: a cap
            continue
        if k == "threads":
            lines.append(f"threads: int = field(default_factory=lambda: max(1, min({v}, _cpus())))")
        elif k.endswith("_bytes"):
            lines.append(f"{k}: int = {v // MiB} << 20" if v % MiB == 0 else f"{k}: int = {v}")
        else:
            lines.append(f"{k}: int = {v}")
    return "; ".join(lines) if lines else "nothing (the row is the library's defaults)"


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128, help="experts in the checkpoint (one layer)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: local temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, measures nothing)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-repeats", type=int, default=5, help="timed rounds of the settings sweep")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    dev = Dev(cuda)
    if not cuda:
        ckmod._DEVICE_OPS = _SmokeOps()
    H, I = (7168, 2048) if not args.smoke else (512, 256)  # noqa: E741
    cap = 2 * GiB if not args.smoke else 16 * MiB  # bytes per host-copy / pipeline measurement
    h2d_bytes = GiB if not args.smoke else 16 * MiB
    thread_counts = (1, 2, 4, 8, 16) if not args.smoke else (1, 2)
    doc: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "library_settings": dataclasses.asdict(ckmod._SETTINGS),
    }
    print(f"device: {doc['device']} | torch {torch.__version__} | cpus {os.cpu_count()} | kernel {doc['kernel']}")
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="es-diag-reads-", dir=local_dir(args.dir)))
    try:
        t0 = time.perf_counter()
        n_exp = args.experts if not args.smoke else 16
        info = cf.write_deepseek(work, H=H, I=I, num_layers=1, num_experts=n_exp, num_shards=args.shards, extras=False)
        files = list(info.files)
        for f in files:  # into the page cache (the writes put most of it there already)
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(64 * MiB)
                while fh.readinto(buf):
                    pass
        resident = min(cf.resident_fraction(f) for f in files)
        print(
            f"checkpoint: {n_exp} experts x {info.spec.nbytes / 1e6:.1f} MB = {info.total_bytes / 1e9:.2f} GB in "
            f"{len(files)} shards, written and read in {time.perf_counter() - t0:.1f} s; resident {resident:.0%}"
        )
        doc["checkpoint"] = {"experts": n_exp, "expert_bytes": info.spec.nbytes, "total_bytes": info.total_bytes}
        doc["resident_fraction"] = resident

        # 1. ceilings
        if cuda:
            doc["h2d"] = h2d_ceilings(dev, args.repeats, h2d_bytes)
            print("host -> device, 1 GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["h2d"].items()) + " GB/s")

        # 2. page cache -> pinned
        rows = page_cache_to_pinned(files, dev, args.repeats, cap, thread_counts, args.smoke)
        doc["page_cache_to_pinned"] = rows
        print(
            f"page cache -> pinned ({min(cap, info.total_bytes) / 1e9:.1f} GB; ring of 2 buffers per thread; "
            "'preadv 4 in 16Mi': 16 MiB buffers filled by 4 MiB preadvs), GB/s:"
        )
        print(f"  {'method, buffer':20s} " + " ".join(f"{t:>5d}thr" for t in thread_counts) + "  per thread at max")
        for method, buf, piece in HOST_ROWS:
            rs = [r for r in rows if r["name"] == host_row_name(method, buf, piece)]
            print(
                f"  {rs[0]['name']:20s} "
                + " ".join(f"{r['gbps']:8.1f}" for r in rs)
                + f"  {rs[-1]['per_thread_gbps']:.2f}"
            )

        # 3. contention
        if cuda:
            doc["contention"] = [contention(files, dev, t, 4 * MiB, 1.0) for t in (8, 16)]
            for c in doc["contention"]:
                print(
                    f"contention, {c['threads']} thr preadv 4 MiB + H2D at once: H2D {c['h2d_gbps_under_load']:.1f} "
                    f"GB/s, host copy {c['host_copy_gbps_under_load']:.1f} GB/s"
                )

        # 4. lean pipeline
        dst = dev.empty(min(cap, info.total_bytes) + 32 * MiB)
        doc["lean_pipeline"] = []
        lean = [(8, 16, 2), (8, 4, 2), (16, 4, 2), (16, 2, 2), (16, 4, 3), (12, 8, 2)]
        for t, c, b in lean if not args.smoke else [(2, 1, 2)]:
            doc["lean_pipeline"].append(lean_pipeline(files, dev, args.repeats, cap, t, c * MiB, b, dst))
        del dst
        print(
            "lean pipeline (preadv -> own pinned buffer -> copy_ on one stream): "
            + "; ".join(
                f"{r['threads']} thr {r['chunk_MiB']} MiB x{r['bufs_per_thread']} {r['gbps']:.1f}"
                for r in doc["lean_pipeline"]
            )
            + " GB/s"
        )

        # 5. read_into, traced
        experts_all = list(range(n_exp))
        k16 = min(16, n_exp)
        experts_16 = sorted(random.Random(0).sample(experts_all, k16))
        slabs = ResidentSlabs(SlabLayout.build(info.spec, num_layers=1, slots=n_exp), dev.name, fill=0xA5)
        sets = {
            f"{k16} of {n_exp}": [(0, e, slabs.slot_tensors(0, s)) for s, e in enumerate(experts_16)],
            f"all {n_exp}": [(0, e, slabs.slot_tensors(0, s)) for s, e in enumerate(experts_all)],
        }
        doc["read_into"] = {}
        with info.checkpoint() as ckpt:
            for name, targets in sets.items():
                nbytes = len(targets) * info.spec.nbytes
                rate, st = es_rate(ckpt, info.spec, targets, dev, args.repeats, None)
                base, _ = es_rate(ckpt, info.spec, targets, dev, args.repeats, BASELINE)
                saved = ckmod._SETTINGS
                ckmod._SETTINGS = settings_variant(BASELINE)[0]
                try:
                    tr_before = traced_read(ckpt, info.spec, targets, dev, BASELINE.get("staging_bytes"))
                finally:
                    ckmod._SETTINGS = saved
                tr = traced_read(ckpt, info.spec, targets, dev)
                doc["read_into"][name] = {
                    "bytes": nbytes,
                    "gbps": rate,
                    "before_gbps": base,
                    **st,
                    "trace": tr,
                    "trace_before": tr_before,
                }
                print(
                    f"read_into {name} ({nbytes / 1e9:.2f} GB): {rate:.1f} GB/s (library settings), "
                    f"{base:.1f} ({BEFORE})"
                )
                print_trace("8 thr, 16 MiB reads = buffers", tr_before)
                print_trace("library now", tr)

            # 6. sweep
            if not args.skip_sweep:
                grid = sweep_grid(args.smoke)
                h2d = doc.get("h2d", {}).get("pinned_h2d_1copy")
                doc["sweep"] = {}
                t_sw = time.perf_counter()
                for name, targets in sets.items():
                    rates = sweep(ckpt, info.spec, targets, dev, args.sweep_repeats, grid)
                    doc["sweep"][name] = [
                        {"label": k, "settings": grid[k], "gbps": v, "ratio_to_pinned_h2d": v / h2d if h2d else None}
                        for k, v in rates.items()
                    ]
                    dev.free_host_cache()
                print(
                    f"settings sweep ({args.sweep_repeats} rounds round-robin, median; "
                    f"{time.perf_counter() - t_sw:.0f} s), GB/s and x pinned H2D {h2d or float('nan'):.1f}:"
                )
                names = list(sets)
                print(f"  {'settings':58s} " + " ".join(f"{n:>18s}" for n in names))
                for k in grid:
                    cells = []
                    for n in names:
                        r = next(r for r in doc["sweep"][n] if r["label"] == k)
                        ratio = f" ({r['ratio_to_pinned_h2d']:.2f}x)" if r["ratio_to_pinned_h2d"] else ""
                        cells.append(f"{r['gbps']:10.1f}{ratio:>8s}")
                    print(f"  {k:58s} " + " ".join(cells))
                big = names[-1]
                best = max(doc["sweep"][big], key=lambda r: r["gbps"])
                lib = next(r for r in doc["sweep"][big] if r["label"] == LIBRARY)
                doc["best_all"] = best
                print(
                    f"best on {big}: {best['label']} {best['gbps']:.1f} GB/s; library defaults {lib['gbps']:.1f} "
                    f"({(best['gbps'] / lib['gbps'] - 1) * 100:+.0f}%)"
                )
                print(
                    "  to make it the default (_ReadSettings in expert_store/checkpoint.py): "
                    + adopt_line(best["settings"])
                )
        h2d = doc.get("h2d", {}).get("pinned_h2d_1copy")
        if h2d:
            print(f"target (75% of pinned H2D {h2d:.1f}): {0.75 * h2d:.1f} GB/s")
        doc["seconds"] = time.perf_counter() - t_start
        print(f"total {doc['seconds']:.0f} s")
        out = os.environ.get("OUT")
        if out:
            Path(out, "diagnose_reads.json").write_text(json.dumps(doc, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Can a warm checkpoint read skip the host copy? DMA straight out of the page cache (issue 13).

    python tools/diagnose_register_gpu.py [--gib 4] [--out DIR]

A warm read today copies page cache -> pinned staging (``preadv``) and then DMAs staging -> GPU:
two passes over host memory. This measures, in one run on a warm file of ``--gib`` GiB:

* the pinned host-to-device copy (the ceiling of issue 13's warm target);
* the current path in miniature: T threads, 8 MiB ``preadv`` into 16 MiB pinned buffers, one
  ``non_blocking`` copy per buffer;
* the registered path: the file mapped read-only, each chunk of C MiB page-locked in place with
  ``cudaHostRegister(..., cudaHostRegisterReadOnly)`` and copied to the GPU by one DMA, then
  unregistered once its copy is done; T threads. The CPU never touches the mapping, so a
  truncated file cannot raise SIGBUS: the registration fails instead (checked at the end on a
  file truncated under its map);
* the cost of registering alone (GB/s of pages locked).

Every copy is checked against the file's bytes (``torch.equal`` of the GPU bytes against a
``preadv`` of the same range) on a sample of chunks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_ceilings import run_threads

READ_ONLY = 8  # cudaHostRegisterReadOnly
MiB = 1 << 20


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def write_file(path: Path, nbytes: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(nbytes // (64 * MiB)):
            f.write(rng.integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes())
    with open(path, "rb") as f:  # warm: every page in the cache
        while f.read(64 * MiB):
            pass


def pinned_h2d(dst: torch.Tensor, reps: int = 5) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst[: src.numel()].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(_rate(src.numel(), time.perf_counter() - t))
    return sorted(out)[len(out) // 2]


def preadv_path(path: Path, dst: torch.Tensor, threads: int, buf: int = 16 * MiB, read: int = 8 * MiB) -> float:
    size = dst.numel()
    fd = os.open(path, os.O_RDONLY)
    chunks = itertools.count().__next__
    n = size // buf

    def worker():
        stream = torch.cuda.Stream()
        bufs = [torch.empty(buf, dtype=torch.uint8).pin_memory() for _ in range(2)]
        evs = [None, None]
        k = 0
        with torch.cuda.stream(stream):
            while (c := chunks()) < n:
                b = k % 2
                if evs[b] is not None:
                    evs[b].synchronize()
                view = memoryview(bufs[b].numpy())
                for o in range(0, buf, read):
                    os.preadv(fd, [view[o : o + read]], c * buf + o)
                dst[c * buf : (c + 1) * buf].copy_(bufs[b], non_blocking=True)
                evs[b] = torch.cuda.Event()
                evs[b].record(stream)
                k += 1
            stream.synchronize()

    torch.cuda.synchronize()
    t = time.perf_counter()
    run_threads(lambda _: worker(), threads)
    torch.cuda.synchronize()
    os.close(fd)
    return _rate(size, time.perf_counter() - t)


class Mapped:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115
        self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        self.np = np.frombuffer(self.mm, dtype=np.uint8)
        self.base = self.np.ctypes.data
        self.t = torch.from_numpy(self.np)  # never read on the CPU: only DMA sources

    def close(self) -> None:
        del self.t
        del self.np
        self.mm.close()
        self.f.close()


def register_path(m: Mapped, dst: torch.Tensor, threads: int, chunk: int, lock_stats: list | None = None) -> float:
    cudart = torch.cuda.cudart()
    size = dst.numel()
    n = size // chunk
    chunks = itertools.count().__next__
    errors = []

    def worker():
        stream = torch.cuda.Stream()
        pending = []  # (event, ptr)
        reg_s = 0.0
        with torch.cuda.stream(stream):
            while (c := chunks()) < n:
                ptr = m.base + c * chunk
                t = time.perf_counter()
                err = cudart.cudaHostRegister(ptr, chunk, READ_ONLY)
                reg_s += time.perf_counter() - t
                if int(err) != 0:
                    errors.append(f"cudaHostRegister chunk {c}: {err}")
                    return
                dst[c * chunk : (c + 1) * chunk].copy_(m.t[c * chunk : (c + 1) * chunk], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                pending.append((ev, ptr))
                while len(pending) > 2 or (pending and pending[0][0].query()):
                    ev0, p0 = pending.pop(0)
                    ev0.synchronize()
                    cudart.cudaHostUnregister(p0)
            for ev0, p0 in pending:
                ev0.synchronize()
                cudart.cudaHostUnregister(p0)
        if lock_stats is not None:
            lock_stats.append(reg_s)

    torch.cuda.synchronize()
    t = time.perf_counter()
    run_threads(lambda _: worker(), threads)
    torch.cuda.synchronize()
    if errors:
        raise RuntimeError(errors[0])
    return _rate(size, time.perf_counter() - t)


def register_only(m: Mapped, size: int, chunk: int) -> tuple[float, float]:
    cudart = torch.cuda.cudart()
    t = time.perf_counter()
    for c in range(size // chunk):
        assert int(cudart.cudaHostRegister(m.base + c * chunk, chunk, READ_ONLY)) == 0
    t1 = time.perf_counter()
    for c in range(size // chunk):
        cudart.cudaHostUnregister(m.base + c * chunk)
    t2 = time.perf_counter()
    return _rate(size, t1 - t), _rate(size, t2 - t1)


def check(path: Path, dst: torch.Tensor, samples: int = 16) -> bool:
    size = dst.numel()
    fd = os.open(path, os.O_RDONLY)
    ok = True
    rng = np.random.default_rng(1)
    for off in rng.integers(0, size // MiB - 1, samples).tolist():
        want = np.empty(MiB, dtype=np.uint8)
        os.preadv(fd, [memoryview(want)], off * MiB)
        ok &= torch.equal(dst[off * MiB : (off + 1) * MiB].cpu(), torch.from_numpy(want))
    os.close(fd)
    return ok


def truncated(path: Path) -> str:
    """Register a range of a mapped file beyond its (new) end: the error, not a signal."""
    small = path.with_suffix(".small")
    with open(small, "wb") as f:
        f.write(b"\1" * (64 * MiB))
    m = Mapped(small)
    os.truncate(small, 4 * MiB)
    err = torch.cuda.cudart().cudaHostRegister(m.base, 64 * MiB, READ_ONLY)
    if int(err) == 0:
        torch.cuda.cudart().cudaHostUnregister(m.base)
    m.close()
    small.unlink()
    return str(err)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    size = args.gib << 30
    path = Path(args.dir) / "es-register-diag.bin"
    t = time.perf_counter()
    write_file(path, size)
    print(f"file {args.gib} GiB written and warm in {time.perf_counter() - t:.1f} s", flush=True)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    rows = {}
    rows["pinned H2D 1 GiB"] = pinned_h2d(dst)
    for T in (8, 16):
        dst.fill_(0)
        rows[f"preadv 8 MiB -> pinned 16 MiB -> GPU, {T} threads"] = preadv_path(path, dst, T)
        rows[f"  bytes equal ({T})"] = check(path, dst)
    m = Mapped(path)
    try:
        for chunk_mib in (16, 64):
            r, u = register_only(m, size, chunk_mib * MiB)
            rows[f"register only, {chunk_mib} MiB chunks, 1 thread: lock / unlock GB/s"] = f"{r:.1f} / {u:.1f}"
        for chunk_mib in (16, 64, 256):
            for T in (1, 4, 8, 16):
                dst.fill_(0)
                stats: list = []
                try:
                    rate = register_path(m, dst, T, chunk_mib * MiB, stats)
                    rows[f"registered map -> GPU, {chunk_mib} MiB chunks, {T} threads"] = rate
                    rows[f"  register s per thread ({chunk_mib} MiB, {T})"] = f"{max(stats):.3f}"
                    if T == 16:
                        rows[f"  bytes equal ({chunk_mib} MiB, {T})"] = check(path, dst)
                except RuntimeError as e:
                    rows[f"registered map -> GPU, {chunk_mib} MiB chunks, {T} threads"] = f"FAILED {e}"
    finally:
        m.close()
    rows["register beyond a truncated file's end"] = truncated(path)
    path.unlink()
    print(f"\ndevice {torch.cuda.get_device_name(0)}; torch {torch.__version__}; warm file {args.gib} GiB")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "register_diag.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Checkpoint reads into CUDA slots: expert-store vs safetensors vs the disk, warm and cold.

One command on the GPU machine (from the repository root)::

    python tools/bench_checkpoint_gpu.py                 # DeepSeek-V3 sized fp8 experts
    python tools/bench_checkpoint_gpu.py --style qwen    # Qwen3-235B sized bf16 experts

Writes a checkpoint of N experts (one MoE layer; DeepSeek-V3 dims H=7168,
I=2048: 44 MB per expert, 5.6 GB for N=128) under a temporary directory on
local disk, then reads K of them (spread over the file) into the K slots of a
resident slab on the GPU, and times, as GB/s of expert bytes:

* ``es.read_into`` (default settings, and variants: mmap, no prefetch, threads);
* ``safe_open(device="cuda")`` + copy into the slots (what engines do today);
* safetensors CPU ``get_tensor`` then ``.to("cuda")``;
* a plain sequential read of the same number of bytes (one thread, 16 MiB
  ``readinto``), and the same bytes read by 8 threads (``preadv``);
* a pinned host-to-device copy of the same bytes (warm ceiling).

Cold = ``POSIX_FADV_DONTNEED`` on every shard before each run, checked with
``mincore`` (the residency before the run is printed). Targets (DESIGN section
6): warm >= 5x safe_open(cuda); cold >= 80% of the plain sequential read.
Prints a table plus device and versions; writes JSON to $OUT if set.
"""

from __future__ import annotations

import argparse
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
for _p in (_ROOT, _ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import ckpt_factory as cf  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from expert_store.checkpoint import Checkpoint  # noqa: E402
from expert_store.layout import ResidentSlabs, SlabLayout  # noqa: E402
from expert_store.safetensors_file import parse_header  # noqa: E402

CHUNK = 16 << 20


# -- baselines ----------------------------------------------------------------------


def safetensors_cuda_reader(info: cf.CheckpointInfo, targets) -> Callable[[], None]:
    """safe_open(device="cuda") per shard, get_tensor per checkpoint tensor, copy into the slot."""
    plan = _plan(info, targets)

    def run() -> None:
        for shard, items in plan.items():
            with safe_open(str(shard), framework="pt", device="cuda") as f:
                for name, dst in items:
                    dst.copy_(f.get_tensor(name))
        torch.cuda.synchronize()

    return run


def safetensors_cpu_then_cuda_reader(info: cf.CheckpointInfo, targets) -> Callable[[], None]:
    """safe_open(device="cpu"), get_tensor, then a (pageable) .to("cuda") copy into the slot."""
    plan = _plan(info, targets)

    def run() -> None:
        for shard, items in plan.items():
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name, dst in items:
                    dst.copy_(f.get_tensor(name).to(dst.device))
        torch.cuda.synchronize()

    return run


def _plan(info: cf.CheckpointInfo, targets) -> dict[Path, list[tuple[str, torch.Tensor]]]:
    """{shard: [(checkpoint tensor, destination slice)]} for the targets (w13 = gate rows then up rows)."""
    where = {}
    for f in info.files:
        for name in parse_header(f).tensors:
            where[name] = f
    plan: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for layer, expert, dests in targets:
        ck = info.ckpt_layer(layer)
        for t in info.spec.tensors:
            templates = info.names[t.name]
            templates = [templates] if isinstance(templates, str) else templates
            row = 0
            for template in templates:
                shape, _ = info.templates[template]
                name = template.format(layer=ck, expert=expert)
                plan.setdefault(where[name], []).append((name, dests[t.name][row : row + shape[0]]))
                row += shape[0]
    return plan


def sequential_reader(files: list[Path], nbytes: int, *, threads: int = 1) -> Callable[[], None]:
    """Read ``nbytes`` consecutive bytes from the start of ``files`` (in order) into a pageable buffer:
    one thread with 16 MiB readinto (plain), or ``threads`` threads with 16 MiB preadv."""
    buf = np.empty(nbytes, dtype=np.uint8)
    ranges = []  # (file, file offset, buffer offset, n)
    left, pos = nbytes, 0
    for f in files:
        take = min(left, f.stat().st_size)
        for off in range(0, take, CHUNK):
            ranges.append((f, off, pos + off, min(CHUNK, take - off)))
        pos += take
        left -= take
        if not left:
            break

    def plain() -> None:
        for f in {r[0]: None for r in ranges}:
            with open(f, "rb", buffering=0) as fh:
                for rf, off, boff, n in ranges:
                    if rf == f:
                        fh.seek(off)
                        fh.readinto(memoryview(buf[boff : boff + n]))

    def pooled() -> None:
        fds = {f: os.open(f, os.O_RDONLY) for f in {r[0] for r in ranges}}
        it = iter(ranges)
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    r = next(it, None)
                if r is None:
                    return
                f, off, boff, n = r
                os.preadv(fds[f], [memoryview(buf[boff : boff + n])], off)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        for fd in fds.values():
            os.close(fd)

    return plain if threads == 1 else pooled


def pinned_h2d(nbytes: int) -> Callable[[], None]:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    return run


# -- measuring ----------------------------------------------------------------------


def measure(fn: Callable[[], None], files: list[Path], *, cold: bool, repeats: int) -> tuple[float, float]:
    """(median seconds, largest page-cache residency seen just before a run)."""
    if not cold:
        fn()  # bring the needed pages in (and pinned buffers, CUDA context)
    times, resident = [], 0.0
    for _ in range(repeats):
        if cold:
            for f in files:
                cf.evict_page_cache(f)
        resident = max([resident, *(cf.resident_fraction(f) for f in files)])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), resident


def _fs_type(path: Path) -> str:
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


def _local_dir(requested: str | None) -> Path:
    """A directory on a disk-backed filesystem (tmpfs pages cannot be evicted, so cold would mean nothing)."""
    if requested:
        return Path(requested)
    tmp = Path(tempfile.gettempdir())
    return tmp if _fs_type(tmp) not in ("tmpfs", "ramfs") else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", choices=["deepseek", "qwen"], default="deepseek")
    ap.add_argument("--experts", type=int, default=128, help="experts in the checkpoint (N)")
    ap.add_argument("--read", type=int, default=16, help="experts to read (K)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: local temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--quick", action="store_true", help="baselines and the default reader only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2

    base = _local_dir(args.dir)
    work = Path(tempfile.mkdtemp(prefix="es-bench-ckpt-", dir=base))
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | safetensors {safetensors.__version__}")
    print(f"python {platform.python_version()} | kernel {platform.release()} | cpus {os.cpu_count()}")
    print(f"checkpoint dir: {work} ({_fs_type(work)})")
    try:
        t0 = time.perf_counter()
        if args.style == "deepseek":
            info = cf.write_deepseek(
                work, H=7168, I=2048, num_layers=1, num_experts=args.experts, num_shards=args.shards, extras=False
            )
        else:
            info = cf.write_qwen(
                work,
                H=4096,
                I=1536,
                num_layers=1,
                num_experts=args.experts,
                num_shards=args.shards,
                index=True,
                extras=False,
            )
        files = list(info.files)
        for f in files:
            cf.evict_page_cache(f)  # also flushes the fresh file to disk before any timing
        print(
            f"wrote {args.style}: {args.experts} experts x {info.spec.nbytes / 1e6:.1f} MB = "
            f"{info.total_bytes / 1e9:.2f} GB in {len(files)} shards ({time.perf_counter() - t0:.1f} s)"
        )
        experts = sorted(random.Random(0).sample(range(args.experts), args.read))
        layout = SlabLayout.build(info.spec, num_layers=1, slots=args.read)
        slabs = ResidentSlabs(layout, "cuda", fill=0xA5)
        targets = [(0, e, slabs.slot_tensors(0, s)) for s, e in enumerate(experts)]
        nbytes = args.read * info.spec.nbytes

        ckpt = Checkpoint(info.path, info.names, info.layers)
        ckpt.validate(info.spec, num_layers=1, num_experts=args.experts)

        def es(**kw) -> Callable[[], None]:
            return lambda: ckpt.read_into(info.spec, targets, **kw)

        # Correctness once: every slot against the regenerated bytes.
        es()()
        torch.cuda.synchronize()
        for s, e in enumerate(experts[:2]):
            want = info.expected_expert(0, e)
            got = slabs.slot_tensors(0, s)
            for k in want:
                assert torch.equal(got[k].cpu().view(torch.uint8), want[k].view(torch.uint8)), (e, k)

        cpu_dests = [(0, e, {t.name: torch.empty(t.shape, dtype=t.dtype) for t in info.spec.tensors}) for e in experts]
        rows: list[tuple[str, Callable[[], None]]] = [
            ("es.read_into (pread, 8 thr, prefetch)", es()),
        ]
        if not args.quick:
            rows += [
                ("es.read_into mmap", es(method="mmap")),
                ("es.read_into no prefetch", es(prefetch=False)),
                ("es.read_into 4 threads", es(threads=4)),
                ("es.read_into 16 threads", es(threads=16)),
                ("es.read_into 64 MiB chunks, 1 GiB staging", es(chunk_bytes=64 << 20, staging_bytes=1 << 30)),
                ("es.read_into -> CPU (no H2D)", lambda: ckpt.read_into(info.spec, cpu_dests)),
                ("safetensors cpu get_tensor -> .to(cuda)", safetensors_cpu_then_cuda_reader(info, targets)),
            ]
        rows += [
            ('safe_open(device="cuda")', safetensors_cuda_reader(info, targets)),
            ("plain sequential read, same bytes", sequential_reader(files, nbytes)),
            ("8-thread sequential preadv, same bytes", sequential_reader(files, nbytes, threads=8)),
        ]
        results = {}
        print(f"\nreading {args.read} of {args.experts} experts = {nbytes / 1e9:.3f} GB, median of {args.repeats}")
        print(f"{'what':44s} {'warm GB/s':>10s} {'cold GB/s':>10s} {'resident before cold':>21s}")
        for name, fn in rows:
            warm, _ = measure(fn, files, cold=False, repeats=args.repeats)
            cold, resident = measure(fn, files, cold=True, repeats=args.repeats)
            results[name] = {"warm_gbps": nbytes / warm / 1e9, "cold_gbps": nbytes / cold / 1e9, "resident": resident}
            r = results[name]
            print(f"{name:44s} {r['warm_gbps']:10.2f} {r['cold_gbps']:10.2f} {resident:20.1%}", flush=True)
        h2d, _ = measure(pinned_h2d(nbytes), [], cold=False, repeats=args.repeats)
        print(f"{'pinned H2D copy, same bytes':44s} {nbytes / h2d / 1e9:10.2f}")

        ours = results["es.read_into (pread, 8 thr, prefetch)"]
        st = results['safe_open(device="cuda")']
        seq = results["plain sequential read, same bytes"]
        ratios = {
            "warm_vs_safe_open_cuda": ours["warm_gbps"] / st["warm_gbps"],
            "cold_vs_safe_open_cuda": ours["cold_gbps"] / st["cold_gbps"],
            "cold_vs_sequential_read": ours["cold_gbps"] / seq["cold_gbps"],
            "warm_vs_pinned_h2d": ours["warm_gbps"] / (nbytes / h2d / 1e9),
        }
        print("\nratios (targets: warm vs safe_open >= 5, cold vs sequential >= 0.8):")
        for k, v in ratios.items():
            print(f"  {k:28s} {v:6.2f}")
        if max(r["resident"] for r in results.values()) > 0.05:
            print("WARNING: eviction did not work on this filesystem; 'cold' numbers are warm")
        out = os.environ.get("OUT")
        if out:
            doc = {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "safetensors": safetensors.__version__,
                "style": args.style,
                "experts": args.experts,
                "read": args.read,
                "bytes": nbytes,
                "results": results,
                "ratios": ratios,
                "pinned_h2d_gbps": nbytes / h2d / 1e9,
            }
            Path(out, "bench_checkpoint.json").write_text(json.dumps(doc, indent=2))
        ckpt.close()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

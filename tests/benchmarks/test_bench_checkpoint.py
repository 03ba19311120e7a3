"""Benchmarks: reading experts out of a checkpoint, against their ceilings in the same run.

Symbols: N experts in the checkpoint, K experts read, H hidden size, I expert
intermediate size.

* CPU (runs everywhere): ``read_into`` CPU destinations, warm page cache, vs one
  ``preadv`` of the same number of contiguous bytes from the same file.
* CUDA gates (skipped without a GPU): ``read_into`` slots of a resident slab
  (K=8 of N=32 DeepSeek-V3 experts, 352 MB), warm: >= 75 % of the same run's pinned
  host-to-device copy of the same bytes; cold (page cache dropped before each run,
  residency checked before every run): >= 90 % of the same run's best plain read of the
  same number of bytes (one sequential reader, 8 parallel buffered readers, or 8 parallel
  ``O_DIRECT`` readers where the filesystem takes it). ``safe_open(device="cuda")`` on the
  same tensors is reported beside them.

Issue 13's full table (16 of 128 and all 128 experts, fastsafetensors, the page-cache copy):
``python tools/bench_checkpoint_gpu.py --table``.

The baselines are the ones of ``tools/bench_checkpoint_gpu.py`` (the standalone,
larger version of the CUDA benchmark). Medians of 3 runs: cold runs read 352 MB from
the disk each.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ckpt_factory as cf
import pytest
import torch
from gates import gate, median_seconds

from expert_store.layout import ResidentSlabs, SlabLayout

WARM_TARGET = 0.75  # of the pinned host-to-device copy
COLD_TARGET = 0.90  # of the best plain read of the same bytes

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_checkpoint_gpu.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_checkpoint_gpu", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _median_seconds(fn, *, setup=None) -> float:
    """Median of 3 runs (each warmed by the benchmark before, or cold by ``setup``)."""
    return median_seconds(fn, rounds=3, warmup=0, setup=setup)


def _report(benchmark, name: str, nbytes: int, ours_s: float, ceilings: dict[str, float]) -> None:
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["gbps"] = nbytes / ours_s / 1e9
    line = [f"{name}: {nbytes / ours_s / 1e9:.2f} GB/s"]
    for what, seconds in ceilings.items():
        benchmark.extra_info[f"{what}_gbps"] = nbytes / seconds / 1e9
        benchmark.extra_info[f"ratio_vs_{what}"] = seconds / ours_s
        line.append(f"{what} {nbytes / seconds / 1e9:.2f} GB/s (ratio {seconds / ours_s:.2f})")
    print("\n" + "; ".join(line))


def test_bench_read_into_cpu_warm(benchmark, tmp_path):
    """Warm page cache, CPU destinations: K=8 of N=32 bf16 experts (1.5 MB each) vs a single-thread
    preadv of the same number of contiguous bytes of the same file."""
    info = cf.write_qwen(tmp_path, H=512, I=512, num_layers=1, num_experts=32, extras=False)
    experts = [1, 5, 6, 11, 17, 22, 28, 31]
    targets = [(0, e, {t.name: torch.empty(t.shape, dtype=t.dtype) for t in info.spec}) for e in experts]
    nbytes = len(experts) * info.spec.nbytes
    buf = bytearray(nbytes)
    fd = os.open(info.path, os.O_RDONLY)
    ceiling = lambda: os.preadv(fd, [buf], 8)
    try:
        with info.checkpoint() as ckpt:
            run = lambda: ckpt.read_into(info.spec, targets)
            run()
            ceiling()
            ours = _median_seconds(run)
            seq = _median_seconds(ceiling)
            benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        os.close(fd)
    _report(benchmark, "read_into CPU warm", nbytes, ours, {"preadv_same_bytes": seq})


def _gate_read(
    benchmark, what: str, nbytes: int, ours: float, ceiling: tuple[str, float], *, target, digits, rates, **more
):
    """Gate a read of ``nbytes`` in ``ours`` seconds against ``ceiling`` (its name, its seconds for
    the same bytes, in the same run): the ratio of the times, figure and ceiling in GB/s to
    ``digits`` places; records the read's rate, then ``rates`` ({figure key: seconds for the same
    bytes}) as GB/s, then ``more``, then the bytes."""
    name, ceiling_s = ceiling
    gate(
        benchmark,
        what,
        ratio=ceiling_s / ours,
        target=target,
        figure=f"{nbytes / ours / 1e9:.{digits}f} GB/s",
        ceiling=f"{name} {nbytes / ceiling_s / 1e9:.{digits}f} GB/s",
        device="cuda",
        GBps=round(nbytes / ours / 1e9, 2),
        **{key: round(nbytes / s / 1e9, 2) for key, s in rates.items()},
        **more,
        bytes=nbytes,
    )


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tool = _tool()
    # DeepSeek-V3 expert dims (44 MB per expert), N=32, K=8: 1.4 GB written, 352 MB read.
    info = cf.write_deepseek(
        tmp_path_factory.mktemp("ds"), H=7168, I=2048, num_layers=1, num_experts=32, num_shards=2, extras=False
    )
    files = list(info.files)
    for f in files:
        cf.evict_page_cache(f)
    experts = [0, 3, 9, 12, 18, 21, 27, 30]
    slabs = ResidentSlabs(SlabLayout.build(info.spec, num_layers=1, slots=len(experts)), "cuda", fill=0xA5)
    targets = [(0, e, slabs.slot_tensors(0, s)) for s, e in enumerate(experts)]
    ckpt = info.checkpoint()
    yield tool, info, files, targets, ckpt
    ckpt.close()


def _evict(files, seen: list[float] | None = None):
    """Evict every file; with ``seen``, append the largest residency left (mincore) after each."""

    def evict() -> None:
        # Returns None: benchmark.pedantic treats a setup's return value as (args, kwargs).
        for f in files:
            cf.evict_page_cache(f)
        if seen is not None:
            seen.append(max(cf.resident_fraction(f) for f in files))

    return evict


@pytest.mark.gpu
@pytest.mark.xfail(
    strict=True,
    reason="target missed: warm reads reach about 0.35-0.45 of the pinned copy (page-cache copy and "
    "DMA do not overlap fully); the fix is the recovery-read work still to come",
)
def test_gate_read_into_cuda_warm(benchmark, gpu_setup):
    """Warm page cache, CUDA slots: read_into >= 75 % of the pinned host-to-device copy of the same bytes."""
    tool, info, _files, targets, ckpt = gpu_setup
    nbytes = len(targets) * info.spec.nbytes

    def run():
        ckpt.read_into(info.spec, targets)
        torch.cuda.synchronize()

    st = tool.safetensors_cuda_reader(info, targets)
    h2d = tool.pinned_h2d(nbytes)
    for fn in (run, st, h2d):
        fn()
    ours = _median_seconds(run)
    h2d_s, st_s = _median_seconds(h2d), _median_seconds(st)
    benchmark.pedantic(run, rounds=3, iterations=1)
    _gate_read(
        benchmark,
        "checkpoint warm read into GPU slots vs pinned H2D copy",
        nbytes,
        ours,
        ("pinned H2D copy", h2d_s),
        target=WARM_TARGET,
        digits=1,
        rates={"pinned_h2d_GBps": h2d_s, "safe_open_cuda_GBps": st_s},
    )


@pytest.mark.gpu
def test_gate_read_into_cuda_cold(benchmark, gpu_setup):
    """Cold page cache (DONTNEED before each run, checked with mincore), CUDA slots: read_into >= 90 %
    of the best plain read (1 or 8 readers) of the same number of bytes from the same files."""
    tool, info, files, targets, ckpt = gpu_setup
    nbytes = len(targets) * info.spec.nbytes
    seen: list[float] = []
    evict = _evict(files, seen)
    evict()
    # The reader maps no file (it reads with preadv), so after the warm benchmarks (same
    # Checkpoint) eviction must work wherever the filesystem honours DONTNEED.
    resident = max(cf.resident_fraction(f) for f in files)
    if resident > 0.05:
        pytest.skip(f"POSIX_FADV_DONTNEED does not evict here ({resident:.0%} resident)")

    last: list = []

    def run():
        last[:] = [ckpt.read_into(info.spec, targets)]
        torch.cuda.synchronize()

    ours = _median_seconds(run, setup=evict)
    seq_s = _median_seconds(tool.sequential_reader(files, nbytes), setup=evict)
    par_s = _median_seconds(tool.sequential_reader(files, nbytes, threads=8), setup=evict)
    try:
        direct_s = _median_seconds(tool.direct_reader(files, nbytes, threads=8), setup=evict)
    except OSError:  # the filesystem refuses O_DIRECT
        direct_s = float("inf")
    st_s = _median_seconds(tool.safetensors_cuda_reader(info, targets), setup=evict)
    benchmark.pedantic(run, setup=evict, rounds=3, iterations=1)
    if max(seen) > 0.01:
        pytest.skip(f"a cold run started with {max(seen):.1%} of the files resident (not cold)")
    best = min(seq_s, par_s, direct_s)
    cold_fraction = last[0].cold_bytes / max(1, last[0].nbytes)  # every byte should have been classified cold
    _gate_read(
        benchmark,
        "checkpoint cold read into GPU slots vs best plain read",
        nbytes,
        ours,
        ("best plain read", best),
        target=COLD_TARGET,
        digits=2,
        rates={
            "sequential_GBps": seq_s,
            "parallel_8_GBps": par_s,
            "direct_8_GBps": direct_s,
            "safe_open_cuda_GBps": st_s,
        },
        resident_before_cold=round(max(seen), 4),
        cold_bytes_fraction=round(cold_fraction, 4),
    )

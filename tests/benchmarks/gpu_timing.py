"""Back-to-back timing of launches, shared by tests/benchmarks and tools/bench_kernels_gpu.py."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def window_seconds(
    fns: list[Callable[[], object]], *, calls: int, windows: int, spin_seconds: float | None = None
) -> tuple[float, float]:
    """Per-call GPU seconds of ``calls`` back-to-back calls (rotating among ``fns``) between two
    CUDA events, and host microseconds per call; medians of ``windows`` windows.

    spin_seconds: None starts each window on an idle GPU (what a caller sees); otherwise a GPU
    spin that long is enqueued first, so that every call is enqueued before the first one runs and
    the window measures the kernels alone. Without CUDA, wall time per call (the numbers then only
    check the calling code)."""
    cuda = torch.cuda.is_available()
    for f in fns:  # warm: compile, fill the launch cache
        f()
    if cuda:
        torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(windows):
        if not cuda:
            t0 = time.perf_counter()
            for i in range(calls):
                fns[i % len(fns)]()
            gpu.append((time.perf_counter() - t0) / calls)
            host.append(gpu[-1] * 1e6)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin_seconds is not None:
            torch.cuda._sleep(int(spin_seconds * 2e9))  # clock64 cycles at ~2 GHz
        start.record()
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(gpu), statistics.median(host)

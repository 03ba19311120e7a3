"""Benchmarks: pack / unpack records vs torch's device copy of the same bytes (CUDA only).

Run on the GPU machine with ``pytest tests/benchmarks/test_bench_kernels.py --benchmark-only``.

Symbols: n experts per call, H hidden size, I intermediate size, K calls per window.

Each benchmark builds slabs of >= 64 MiB (64 and 256 MiB) of bf16 experts
(H=2048, I=768, 9.4 MB each) or DeepSeek-V3 fp8 experts with fp32 block scales
(H=7168, I=2048, 44 MB each), and in the same run times the operation and the
ceiling, ``dst.copy_(src)`` of the same n * spec.nbytes bytes, each rotating
among three buffer sets so that L2 never serves the previous call:

* back-to-back (the ratio the target applies to): K consecutive calls between
  two CUDA events, starting from an idle GPU, per call, median of several
  windows; a call whose host work exceeds its GPU time shows here;
* single: ``triton.testing.do_bench`` median of one call.

Bandwidth counts bytes read plus written (2 x n x spec.nbytes).
Gate (see gates.py): back-to-back ratio to the copy >= 0.90. The ceiling is
measured in the same run on the same number of bytes, so a slower or busier GPU
moves both sides; the median of WINDOWS windows of K calls absorbs a stray
preemption. ``extra_info`` also holds the single-call ratio and the host
microseconds per call; pytest-benchmark's own statistics time one call followed
by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from expert_store import presets
from expert_store.kernels import pack_records, resident_checksums, unpack_records
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gates import environment, gate
from gpu_timing import window_seconds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MiB = 1 << 20
ROTATE = 3  # buffer sets per timed function; each >= 64 MiB, beyond L2 (50-60 MB)
K = 60  # calls per back-to-back window (a multiple of ROTATE): the first call's host latency is ~1 % of it
WINDOWS = 7
RECORDS_TARGET = 0.90  # pack / unpack >= 90 % of the device copy of the same bytes


KINDS = {"bf16": lambda: presets.qwen3_moe_spec(2048, 768), "fp8-dsv3": lambda: presets.deepseek_v3_spec(7168, 2048)}


def _random_bytes(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (numel,), dtype=torch.uint8, device="cuda", generator=g)


class _Case:
    """ROTATE disjoint sets of n resident experts (over 2 layers) and ROTATE slabs, plus copy buffers."""

    def __init__(self, spec: ExpertSpec, slab_mib: int) -> None:
        self.spec = spec
        self.n = n = -(-slab_mib * MiB // spec.record_bytes)
        slots = -(-ROTATE * n // 2)
        self.layout = SlabLayout.build(spec, num_layers=2, slots=slots)
        self.storage = _random_bytes(self.layout.total_bytes, 1)
        order = torch.randperm(2 * slots, generator=torch.Generator().manual_seed(2)).tolist()
        self.items = []
        for r in range(ROTATE):
            flat = order[r * n : (r + 1) * n]
            self.items.append(([f // slots for f in flat], [f % slots for f in flat]))  # lists: the cheapest form
        self.slabs = [_random_bytes(n * spec.record_bytes, 10 + r) for r in range(ROTATE)]
        self.copy_src = [_random_bytes(n * spec.nbytes, 20 + r) for r in range(ROTATE)]
        self.copy_dst = [torch.empty_like(s) for s in self.copy_src]
        self.bytes_moved = 2 * n * spec.nbytes


def _rotating(fns):
    state = [0]

    def run() -> None:
        fns[state[0] % len(fns)]()
        state[0] += 1

    return run


def _median_seconds(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def _back_to_back(fns) -> tuple[float, float]:
    """(GPU seconds, host microseconds) per call of K calls rotating among fns between two events; medians."""
    return window_seconds(fns, calls=K, windows=WINDOWS)


def _op_fns(case: _Case, op: str):
    if op == "pack":
        return [
            lambda r=r: pack_records(case.storage, case.layout, *case.items[r], out=case.slabs[r])
            for r in range(ROTATE)
        ]
    return [lambda r=r: unpack_records(case.slabs[r], case.storage, case.layout, *case.items[r]) for r in range(ROTATE)]


@pytest.mark.parametrize("op", ["pack", "unpack"])
@pytest.mark.parametrize("slab_mib", [64, 256])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bench_records(benchmark, kind, slab_mib, op):
    """pack / unpack bandwidth vs the device copy of the same bytes in the same run (target b2b ratio >= 0.90)."""
    case = _Case(KINDS[kind](), slab_mib)
    op_fns = _op_fns(case, op)
    copy_fns = [lambda d=d, s=s: d.copy_(s) for d, s in zip(case.copy_dst, case.copy_src)]
    copy_b2b, copy_host = _back_to_back(copy_fns)
    op_b2b, op_host = _back_to_back(op_fns)
    copy_s = _median_seconds(_rotating(copy_fns))
    op_s = _median_seconds(_rotating(op_fns))
    op_run = _rotating(op_fns)

    def timed() -> None:
        op_run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    gate(
        benchmark,
        f"{op} {kind} {slab_mib} MiB slab vs device copy",
        ratio=copy_b2b / op_b2b,
        target=RECORDS_TARGET,
        figure=f"{case.bytes_moved / op_b2b / 1e9:.0f} GB/s",
        ceiling=f"device copy {case.bytes_moved / copy_b2b / 1e9:.0f} GB/s",
        device="cuda",
        experts=case.n,
        slab_bytes=case.n * case.spec.record_bytes,
        op_GBps=round(case.bytes_moved / op_b2b / 1e9, 1),
        copy_GBps=round(case.bytes_moved / copy_b2b / 1e9, 1),
        single_call_ratio=round(copy_s / op_s, 4),
        host_us_per_call=round(op_host, 1),
        copy_host_us_per_call=round(copy_host, 1),
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_bench_resident_checksums(benchmark, kind):
    """Checksum read bandwidth beside the device copy's (read+written) bandwidth; no target, for the record."""
    case = _Case(KINDS[kind](), 256)
    fns = [lambda r=r: resident_checksums(case.storage, case.layout, *case.items[r]) for r in range(ROTATE)]
    copy_fns = [lambda d=d, s=s: d.copy_(s) for d, s in zip(case.copy_dst, case.copy_src)]
    copy_b2b, _ = _back_to_back(copy_fns)
    s, host = _back_to_back(fns)
    read_gbps = case.n * case.spec.nbytes / s / 1e9
    copy_gbps = case.bytes_moved / copy_b2b / 1e9
    run = _rotating(fns)

    def timed() -> None:
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    benchmark.extra_info.update(
        environment("cuda")
        | {
            "kind": kind,
            "experts": case.n,
            "read_GBps": round(read_gbps, 1),
            "copy_GBps": round(copy_gbps, 1),
            "ratio_to_copy": round(read_gbps / copy_gbps, 4),
            "host_us_per_call": round(host, 1),
        }
    )
    print(
        f"\nresident_checksums {kind} n={case.n}: {read_gbps:.0f} GB/s read, copy {copy_gbps:.0f} GB/s (back-to-back)"
    )

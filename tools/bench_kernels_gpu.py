#!/usr/bin/env python
"""Check and time the pack / unpack / checksum kernels on one CUDA GPU (one call, < 3 minutes).

    python tools/bench_kernels_gpu.py            # full run
    python tools/bench_kernels_gpu.py --quick    # default config only, one slab size

1. Correctness at real sizes on CUDA: every kernel (under every swept
   configuration) against the torch reference, bit for bit, on bf16 experts
   (H=2048, I=768), DeepSeek-V3 fp8 experts with their fp32 scales, and an
   odd-sized W=2 spec. Exits with status 1 on any mismatch.
2. Timing, per expert kind and slab size (>= 64 MiB): torch's device copy of
   the same bytes (the ceiling), index_select on a stacked tensor, a per-tensor
   ``copy_`` loop, then pack and unpack under a small sweep of kernel
   configurations, and the checksum kernels. Each timed function rotates among
   several buffer sets so that L2 never holds the previous call's data, and is
   timed with ``triton.testing.do_bench`` (median). Bandwidth counts bytes read
   plus bytes written (2 x n x spec.nbytes); the ratio is to the copy of the
   same run.

Symbols: L layers, S slots per layer, n experts per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import triton
import triton.testing

from expert_store.kernels import (
    DEFAULT_CONFIG,
    KernelConfig,
    chunks_per_expert,
    pack_records,
    resident_checksums,
    slab_checksums,
    unpack_records,
)
from expert_store.kernels import reference as ref
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec, TensorSpec

MiB = 1 << 20
DEVICE = "cuda"  # "cpu" only for --smoke (a check of this script's own code on a machine without a GPU)
ROTATE = 3  # buffer sets per timed function: the previous call's bytes (>= 64 MiB) are out of L2 (50-60 MB)

# (chunk_bytes, block_bytes, num_warps): the default first, then smaller / larger
# chunks (balance vs per-program setup) and wider blocks (bytes in flight per thread).
SWEEP = [
    DEFAULT_CONFIG,  # 32K chunk, 16K block, 8 warps
    KernelConfig(16 * 1024, 16 * 1024, 8),
    KernelConfig(64 * 1024, 16 * 1024, 8),
    KernelConfig(128 * 1024, 16 * 1024, 8),
    KernelConfig(32 * 1024, 8 * 1024, 4),
    KernelConfig(64 * 1024, 32 * 1024, 16),
]


def spec_bf16(h: int = 2048, i: int = 768) -> ExpertSpec:
    return ExpertSpec([TensorSpec("w13", (2 * i, h), torch.bfloat16), TensorSpec("w2", (h, i), torch.bfloat16)])


def spec_fp8_dsv3(h: int = 7168, i: int = 2048) -> ExpertSpec:
    return ExpertSpec(
        [
            TensorSpec("w13", (2 * i, h), torch.float8_e4m3fn),
            TensorSpec("w13_scale", (2 * i // 128, h // 128), torch.float32),
            TensorSpec("w2", (h, i), torch.float8_e4m3fn),
            TensorSpec("w2_scale", (h // 128, i // 128), torch.float32),
        ]
    )


def spec_odd() -> ExpertSpec:
    return ExpertSpec(
        [
            TensorSpec("w", (1023, 771), torch.bfloat16),
            TensorSpec("s", (1,), torch.bfloat16),
            TensorSpec("z", (3,), torch.float16),
        ]
    )


KINDS = {"bf16 H2048 I768": spec_bf16, "fp8 DeepSeek-V3": spec_fp8_dsv3}


def random_bytes(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randint(0, 256, (numel,), dtype=torch.uint8, device=DEVICE, generator=g)


def idx(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------
def check_spec(name: str, spec: ExpertSpec, configs: list[KernelConfig]) -> list[str]:
    """Kernel vs reference at real size; returns the failures."""
    failures = []
    layout = SlabLayout.build(spec, num_layers=2, slots=4)
    storage = random_bytes(layout.total_bytes, 1)
    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(8, generator=g)[:6].tolist()
    layers, slots = idx([f // 4 for f in flat]), idx([f % 4 for f in flat])
    n = len(flat)
    want_sums = ref.resident_checksums_reference(storage, layout, layers, slots)
    want_slab = torch.full((n * spec.record_bytes,), 0xA5, dtype=torch.uint8, device=DEVICE)
    ref.pack_records_reference(storage, layout, layers, slots, want_slab)
    dst_flat = torch.randperm(8, generator=g)[:6].tolist()
    dst_l, dst_s = idx([f // 4 for f in dst_flat]), idx([f % 4 for f in dst_flat])
    records = idx([0, 0, 3, 1, 5, 3])  # repeated records
    base = random_bytes(layout.total_bytes, 3)
    want_storage = base.clone()
    ref.unpack_records_reference(want_slab, want_storage, layout, dst_l, dst_s, records)
    for cfg in configs:
        tag = f"{name} {cfg}"
        slab = torch.full_like(want_slab, 0xA5)
        pack_records(storage, layout, layers, slots, out=slab, config=cfg)
        if not torch.equal(slab, want_slab):
            failures.append(f"pack {tag}")
        dest = base.clone()
        unpack_records(want_slab, dest, layout, dst_l, dst_s, records=records, config=cfg)
        if not torch.equal(dest, want_storage):
            failures.append(f"unpack {tag}")
        if not torch.equal(resident_checksums(storage, layout, layers, slots, config=cfg), want_sums):
            failures.append(f"resident_checksums {tag}")
        if not torch.equal(slab_checksums(want_slab, spec, n, config=cfg), want_sums):
            failures.append(f"slab_checksums {tag}")
    if not torch.equal(ref.slab_checksums_reference(want_slab, spec, n), want_sums):
        failures.append(f"reference slot vs record checksum {name}")
    return failures


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
def rotating(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """One callable that runs fns[0], fns[1], ... in turn (one buffer set per call)."""
    state = [0]

    def run() -> None:
        fns[state[0] % len(fns)]()
        state[0] += 1

    return run


def median_seconds(fn: Callable[[], None]) -> float:
    if DEVICE == "cpu":  # --smoke: exercise the code, the numbers mean nothing
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def host_microseconds(fn: Callable[[], None], calls: int = 20) -> float | None:
    """CPU time of one call while the GPU is kept busy (launch and validation overhead)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or DEVICE == "cpu":
        return None
    torch.cuda.synchronize()
    sleep(int(2e8))  # ~0.1 s of GPU spin: every call below is only enqueued
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


class Case:
    """Buffers for one (expert kind, n): ROTATE disjoint sets of sources and destinations."""

    def __init__(self, spec: ExpertSpec, n: int) -> None:
        self.spec, self.n = spec, n
        slots = -(-ROTATE * n // 2)
        self.layout = SlabLayout.build(spec, num_layers=2, slots=slots)
        self.storage = random_bytes(self.layout.total_bytes, 10)
        g = torch.Generator().manual_seed(11)
        order = torch.randperm(2 * slots, generator=g).tolist()
        self.items = []  # ROTATE disjoint (layers, slots) sets, spread over both layers
        for r in range(ROTATE):
            flat = order[r * n : (r + 1) * n]
            self.items.append((idx([f // slots for f in flat]), idx([f % slots for f in flat])))
        self.slabs = [random_bytes(n * spec.record_bytes, 20 + r) for r in range(ROTATE)]
        self.bytes_moved = 2 * n * spec.nbytes  # read + written

    def release(self) -> None:
        del self.storage, self.slabs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def time_baselines(case: Case) -> dict[str, float]:
    spec, n = case.spec, case.n
    nbytes = n * spec.nbytes
    src = [random_bytes(nbytes, 30 + r) for r in range(ROTATE)]
    dst = [torch.empty_like(s) for s in src]
    out = {"copy": median_seconds(rotating([lambda d=d, s=s: d.copy_(s) for d, s in zip(dst, src)]))}
    del src, dst
    # index_select of n whole experts out of a stacked [N, nbytes / 4] int32 tensor.
    stacked = random_bytes(ROTATE * n * spec.nbytes, 40).view(torch.int32).view(ROTATE * n, spec.nbytes // 4)
    picks = [torch.arange(r, ROTATE * n, ROTATE, device=DEVICE) for r in range(ROTATE)]
    sel_out = [torch.empty(n, spec.nbytes // 4, dtype=torch.int32, device=DEVICE) for _ in range(ROTATE)]
    out["index_select"] = median_seconds(
        rotating([lambda p=p, o=o, x=stacked: torch.index_select(x, 0, p, out=o) for p, o in zip(picks, sel_out)])
    )
    del stacked, sel_out
    # Per-tensor copy_ loop into records (what engines do today: n x T copies).
    layout = case.layout

    def loop(r: int) -> None:
        layers, slots = case.items[r]
        slab = case.slabs[r]
        for i, (la, s) in enumerate(zip(layers.tolist(), slots.tolist())):
            for t, ts in enumerate(spec.tensors):
                a = layout.slot_offset(la, s, t)
                b = i * spec.record_bytes + spec.record_offsets[t]
                slab[b : b + ts.nbytes].copy_(case.storage[a : a + ts.nbytes])

    out["copy_ loop"] = median_seconds(rotating([lambda r=r: loop(r) for r in range(ROTATE)]))
    return out


def pack_fns(case: Case, cfg: KernelConfig) -> list[Callable[[], object]]:
    return [
        lambda r=r: pack_records(case.storage, case.layout, *case.items[r], out=case.slabs[r], config=cfg)
        for r in range(ROTATE)
    ]


def unpack_fns(case: Case, cfg: KernelConfig) -> list[Callable[[], object]]:
    return [
        lambda r=r: unpack_records(case.slabs[r], case.storage, case.layout, *case.items[r], config=cfg)
        for r in range(ROTATE)
    ]


def _size(nbytes: int) -> str:
    return f"{nbytes // 1024}K" if nbytes % 1024 == 0 else f"{nbytes}B"


def gbps(case: Case, seconds: float) -> float:
    return case.bytes_moved / seconds / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default configuration and 64 MiB slabs only")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks this script's code")
    args = parser.parse_args()
    global DEVICE, KINDS
    t_start = time.time()
    sweep = SWEEP[:1] if args.quick else SWEEP
    slab_sizes = [64 * MiB] if args.quick else [64 * MiB, 256 * MiB]
    if args.smoke:
        DEVICE = "cpu"
        KINDS = {"bf16 tiny": lambda: spec_bf16(256, 128), "fp8 tiny": lambda: spec_fp8_dsv3(256, 256)}
        slab_sizes = [1 * MiB]
        sweep = [KernelConfig(256, 64, 1), KernelConfig(512, 256, 2)]
    elif not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    print(f"device: {device_name}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"default config: {DEFAULT_CONFIG}")

    failures = []
    for name, make in [*KINDS.items(), ("odd W=2", spec_odd)]:
        if args.smoke and make is spec_odd:
            make = lambda: ExpertSpec([TensorSpec("w", (13, 7), torch.bfloat16), TensorSpec("s", (1,), torch.int16)])
        failures += check_spec(name, make(), sweep)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print(f"correctness: pack, unpack, resident/slab checksums bit-exact vs reference, {len(sweep)} configs: OK")

    scores: dict[KernelConfig, list[float]] = {cfg: [] for cfg in sweep}
    for kind, make in KINDS.items():
        spec = make()
        for size in slab_sizes:
            n = -(-size // spec.record_bytes)
            case = Case(spec, n)
            print(
                f"\n== {kind}: n={n} experts, slab {n * spec.record_bytes / MiB:.0f} MiB, "
                f"{case.bytes_moved / 1e9:.2f} GB read+written per call =="
            )
            base = time_baselines(case)
            copy_s = base["copy"]
            print(f"{'what':<44} {'GB/s':>8} {'vs copy':>8}")
            for what, s in base.items():
                print(f"{what:<44} {gbps(case, s):8.0f} {copy_s / s:8.1%}")
            for cfg in sweep:
                c = chunks_per_expert(spec, config=cfg)
                label = f"chunk={_size(cfg.chunk_bytes)} block={_size(cfg.block_bytes)} warps={cfg.num_warps}"
                for op, fns in (("pack", pack_fns(case, cfg)), ("unpack", unpack_fns(case, cfg))):
                    s = median_seconds(rotating(fns))
                    scores[cfg].append(copy_s / s)
                    print(f"{op + ' ' + label:<44} {gbps(case, s):8.0f} {copy_s / s:8.1%}   ({n * c} programs)")
            # Checksums read once: report read bandwidth beside the copy's.
            sums = [lambda r=r, c=case: resident_checksums(c.storage, c.layout, *c.items[r]) for r in range(ROTATE)]
            s = median_seconds(rotating(sums))
            print(f"{'resident_checksums (GB/s read)':<44} {n * spec.nbytes / s / 1e9:8.0f}")
            s = median_seconds(
                rotating([lambda r=r, c=case: slab_checksums(c.slabs[r], c.spec, c.n) for r in range(ROTATE)])
            )
            print(f"{'slab_checksums (GB/s read)':<44} {n * spec.nbytes / s / 1e9:8.0f}")
            host = host_microseconds(rotating(pack_fns(case, DEFAULT_CONFIG)))
            if host is not None:
                print(f"host time per pack call: {host:.0f} us (the copy takes {copy_s * 1e6:.0f} us on the GPU)")
            case.release()

    print("\n== summary: mean ratio to copy over kinds, sizes, pack and unpack ==")
    ranked = sorted(sweep, key=lambda cfg: -statistics.mean(scores[cfg]))
    for cfg in ranked:
        r = scores[cfg]
        print(f"{cfg}: mean {statistics.mean(r):.1%}, worst {min(r):.1%}")
    print(f"winner: {ranked[0]}{' (the default)' if ranked[0] == DEFAULT_CONFIG else ''}")
    print(f"target: >= 90% of copy for pack and unpack; total time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

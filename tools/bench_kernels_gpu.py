#!/usr/bin/env python
"""Check and time the pack / unpack / checksum kernels on one CUDA GPU (one call, about a minute).

    python tools/bench_kernels_gpu.py            # full run
    python tools/bench_kernels_gpu.py --quick    # default tuning only, 64 MiB slabs
    python tools/bench_kernels_gpu.py --smoke    # CPU only: checks this script's own code

1. Correctness at real sizes on CUDA: every kernel (pack and unpack under
   every swept tuning) against the torch reference, bit for bit, on bf16 experts
   (H=2048, I=768), DeepSeek-V3 fp8 experts with their fp32 scales, and an
   odd-sized W=2 spec, with 16-byte aligned and unaligned slabs. Exits with
   status 1 on any mismatch.
2. Timing, per expert kind and slab size (>= 64 MiB), of torch's device copy
   of the same bytes (the ceiling), index_select on a stacked tensor, a
   per-tensor ``copy_`` loop, pack and unpack under a sweep of kernel
   tunings (``records._Tuning``), and the checksum kernels. Three measures, each rotating
   among ROTATE buffer sets so that L2 never holds the previous call's data:

   * b2b: K back-to-back calls between two CUDA events, starting from an idle
     GPU, per call (median of REPS). What a caller sees for a run of calls:
     if the host work of a call exceeds its GPU time, this shows it. The
     host's enqueue time of these windows is the "host us" column.
   * queued: the same K calls enqueued behind a GPU spin, so that the host
     never limits them: the kernels' own throughput.
   * single: ``triton.testing.do_bench`` median of one call (L2 flushed
     between calls; the host work of a call shows when it exceeds the flush).

   Bandwidth counts bytes read plus bytes written (2 x n x spec.nbytes); each
   ratio is to the copy under the same measure in the same run.
3. For the first case, a breakdown: host time per call (CPU time while the
   GPU is kept busy) of pack with lists or tensors, through Triton's public
   launch (forced by installing a launch hook, as a profiler does) instead of
   the direct launch, of its validation and index rows alone, of
   PreparedCopies, of the other launchers and of bare torch ops; then pack's
   b2b and queued ratios on the direct path, the public path and
   PreparedCopies.

The table at the end holds, per case and op, the default tuning's ratios and
whether the project's target (>= 90 % of the copy for slabs >= 64 MiB) holds
under b2b.

Symbols: L layers, S slots per layer, n experts per call, K calls per b2b window.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import triton
import triton.testing

from expert_store import presets
from expert_store.kernels import PreparedCopies, launch_path, pack_records, resident_checksums, slab_checksums
from expert_store.kernels import records as rec
from expert_store.kernels import reference as ref
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec, TensorSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "benchmarks"))
from gpu_timing import window_seconds as _window_seconds

MiB = 1 << 20
DEVICE = "cuda"  # "cpu" only for --smoke (a check of this script's own code on a machine without a GPU)
ROTATE = 3  # buffer sets per timed function: the previous call's bytes (>= 64 MiB) are out of L2 (50-60 MB)
K = 60  # calls per back-to-back window (a multiple of ROTATE): ~2.7 ms at 64 MiB; one call's startup is ~1 %
REPS = 7  # windows per b2b / queued measure (median)
TARGET = 0.90

# (chunk_bytes, block_bytes, num_warps): the default first (the second run's winner: 128K chunk,
# 32K block, 16 warps), then the first run's winner, smaller chunks and narrower programs.
Tuning = rec._Tuning  # private: tools may sweep it, the library's callers cannot
SWEEP = [
    rec._TUNING,
    Tuning(64 * 1024, 32 * 1024, 16),
    Tuning(32 * 1024, 16 * 1024, 8),
    Tuning(16 * 1024, 16 * 1024, 8),
    Tuning(64 * 1024, 16 * 1024, 8),
    Tuning(32 * 1024, 8 * 1024, 4),
]


def pack_with(cfg: Tuning, storage, layout, layers, slots, out) -> None:
    """pack_records under tuning ``cfg`` (the launchers' own code path, ``records._copy``)."""
    rec._copy(True, storage, layout, layers, slots, None, out, "bench pack", cfg)


def unpack_with(cfg: Tuning, slab, storage, layout, layers, slots, records=None) -> None:
    rec._copy(False, storage, layout, layers, slots, records, slab, "bench unpack", cfg)


def spec_bf16(h: int = 2048, i: int = 768) -> ExpertSpec:
    return presets.qwen3_moe_spec(h, i)


def spec_fp8_dsv3(h: int = 7168, i: int = 2048) -> ExpertSpec:
    return presets.deepseek_v3_spec(h, i)


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


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------
def check_spec(name: str, spec: ExpertSpec, configs: list[Tuning]) -> list[str]:
    """Kernel vs reference at real size, slabs 16-byte aligned and not; returns the failures."""
    failures = []
    layout = SlabLayout.build(spec, num_layers=2, slots=4)
    storage = random_bytes(layout.total_bytes, 1)
    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(8, generator=g)[:6].tolist()
    layers, slots = [f // 4 for f in flat], [f % 4 for f in flat]
    n = len(flat)
    rb = spec.record_bytes
    want_sums = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    want_slab = torch.full((n * rb,), 0xA5, dtype=torch.uint8, device=DEVICE)
    ref.pack_records_reference(storage, layout, idx(layers), idx(slots), want_slab)
    dst_flat = torch.randperm(8, generator=g)[:6].tolist()
    dst_l, dst_s = [f // 4 for f in dst_flat], [f % 4 for f in dst_flat]
    records = [0, 0, 3, 1, 5, 3]  # repeated records
    base = random_bytes(layout.total_bytes, 3)
    want_storage = base.clone()
    ref.unpack_records_reference(want_slab, want_storage, layout, idx(dst_l), idx(dst_s), idx(records))
    for cfg in configs:
        for shift in (0, spec.word_bytes):  # shift > 0: the slab is not 16-byte aligned (unhinted kernels)
            tag = f"{name} {cfg} slab offset {shift}"
            buf = torch.full((n * rb + 16,), 0xA5, dtype=torch.uint8, device=DEVICE)
            slab = buf[shift : shift + n * rb]
            for _ in range(2):  # the second call takes the direct launch (on a verified Triton)
                pack_with(cfg, storage, layout, layers, slots, slab)
            if not torch.equal(slab, want_slab):
                failures.append(f"pack {tag}")
            dest = base.clone()
            unpack_with(cfg, slab, dest, layout, dst_l, dst_s, records)
            if not torch.equal(dest, want_storage):
                failures.append(f"unpack {tag}")
            if cfg == rec._TUNING and not torch.equal(resident_checksums(storage, layout, layers, slots), want_sums):
                failures.append(f"resident_checksums {tag}")
            if cfg == rec._TUNING and not torch.equal(slab_checksums(slab, spec, n), want_sums):
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


def single_seconds(fn: Callable[[], None]) -> float:
    """do_bench median of one call (L2 flushed between calls)."""
    if DEVICE == "cpu":  # --smoke: exercise the code, the numbers mean nothing
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def window_seconds(fns: list[Callable[[], object]], *, spin_seconds: float | None) -> tuple[float, float]:
    """:func:`gpu_timing.window_seconds` with this script's K calls per window and REPS windows."""
    return _window_seconds(fns, calls=K, windows=REPS, spin_seconds=spin_seconds)


def host_microseconds(fns: list[Callable[[], object]], calls: int = 60) -> float | None:
    """CPU time of one call while the GPU is kept busy (validation, staging and launch), median of 3 runs."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or DEVICE == "cpu":
        return None
    for f in fns:
        f()
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        sleep(int(1e8))  # ~50 ms of GPU spin: every call below is only enqueued
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(runs)


class Case:
    """Buffers for one (expert kind, n): ROTATE disjoint sets of sources and destinations."""

    def __init__(self, spec: ExpertSpec, n: int) -> None:
        self.spec, self.n = spec, n
        slots = -(-ROTATE * n // 2)
        self.layout = SlabLayout.build(spec, num_layers=2, slots=slots)
        self.storage = random_bytes(self.layout.total_bytes, 10)
        g = torch.Generator().manual_seed(11)
        order = torch.randperm(2 * slots, generator=g).tolist()
        self.items = []  # ROTATE disjoint (layers, slots) sets, spread over both layers, as lists of ints
        for r in range(ROTATE):
            flat = order[r * n : (r + 1) * n]
            self.items.append(([f // slots for f in flat], [f % slots for f in flat]))
        self.slabs = [random_bytes(n * spec.record_bytes, 20 + r) for r in range(ROTATE)]
        self.bytes_moved = 2 * n * spec.nbytes  # read + written

    def release(self) -> None:
        del self.storage, self.slabs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    def pack_fns(self, cfg: Tuning) -> list[Callable[[], object]]:
        return [
            lambda r=r: pack_with(cfg, self.storage, self.layout, *self.items[r], self.slabs[r]) for r in range(ROTATE)
        ]

    def unpack_fns(self, cfg: Tuning) -> list[Callable[[], object]]:
        return [
            lambda r=r: unpack_with(cfg, self.slabs[r], self.storage, self.layout, *self.items[r])
            for r in range(ROTATE)
        ]


class Measure:
    """Seconds per call under b2b / queued / single, and host microseconds per call (from the b2b windows)."""

    def __init__(self, fns: list[Callable[[], object]], *, single: bool = True) -> None:
        self.b2b, self.host = window_seconds(fns, spin_seconds=None)
        # The spin covers three times the host's enqueue time of a window (at least 1 ms).
        self.queued, _ = window_seconds(fns, spin_seconds=max(1e-3, 3 * K * self.host / 1e6))
        self.single = single_seconds(rotating(fns)) if single else None


def _size(nbytes: int) -> str:
    return f"{nbytes // 1024}K" if nbytes % 1024 == 0 else f"{nbytes}B"


def _label(cfg: Tuning) -> str:
    return f"chunk={_size(cfg.chunk_bytes)} block={_size(cfg.block_bytes)} warps={cfg.num_warps}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


class PublicLaunch:
    """Within the block every launch takes Triton's public path: a launch hook is installed, as a
    profiler would (the hook itself does nothing; Triton then builds its launch metadata)."""

    def __enter__(self) -> None:
        triton.knobs.runtime.launch_enter_hook.add(self.hook)

    def __exit__(self, *exc: object) -> None:
        triton.knobs.runtime.launch_enter_hook.remove(self.hook)

    @staticmethod
    def hook(metadata: object) -> None:
        return None


def print_breakdown(case: Case, copy: Measure) -> None:
    """Where the time of one pack call goes on this machine: host rows, then GPU-side staging variants."""
    print("\nbreakdown (this case): host us per call while the GPU is kept busy")
    if DEVICE == "cpu":
        print("  (skipped: no GPU)")
        return
    pack = case.pack_fns(rec._TUNING)
    tensors = [(idx(la), idx(s)) for la, s in case.items]
    pack_t = [
        lambda r=r: pack_records(case.storage, case.layout, *tensors[r], out=case.slabs[r]) for r in range(ROTATE)
    ]
    path = launch_path(triton.__version__, "cuda", False)
    rows: list[tuple[str, float | None]] = [(f"pack_records, lists ({path} launch)", host_microseconds(pack))]
    rows.append(("pack_records, CPU int64 tensors", host_microseconds(pack_t)))
    with PublicLaunch():
        rows.append(("pack_records, Triton's public launch (a hook installed)", host_microseconds(pack)))
    validate = [
        lambda r=r: rec._entry(True, case.storage, case.layout, *case.items[r], None, "bench") for r in range(ROTATE)
    ]
    rows.append(("pack_records' validation and index rows alone", host_microseconds(validate)))
    prepared = PreparedCopies(case.storage, case.layout, [("pack", la, sl, None) for la, sl in case.items])
    prepared_pack = [lambda r=r: prepared.launch(r, case.slabs[r]) for r in range(ROTATE)]
    rows.append(("PreparedCopies.launch (rows validated and staged once)", host_microseconds(prepared_pack)))
    rows.append(("unpack_records, lists", host_microseconds(case.unpack_fns(rec._TUNING))))
    sums = [lambda r=r: resident_checksums(case.storage, case.layout, *case.items[r]) for r in range(ROTATE)]
    rows.append(("resident_checksums, lists", host_microseconds(sums)))
    rows.append(("slab_checksums", host_microseconds([lambda: slab_checksums(case.slabs[0], case.spec, case.n)])))
    pinned = torch.zeros(4096, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(4096, dtype=torch.uint8, device=DEVICE)
    rows.append(
        (
            "bare torch: 4 KiB pinned H2D copy_(non_blocking)",
            host_microseconds([lambda: dev.copy_(pinned, non_blocking=True)]),
        )
    )
    a, b = torch.empty(1024, dtype=torch.uint8, device=DEVICE), torch.empty(1024, dtype=torch.uint8, device=DEVICE)
    rows.append(("bare torch: small device copy_", host_microseconds([lambda: b.copy_(a)])))
    rows.append(("bare torch: torch.tensor(list) + pin_memory + .to(cuda)", host_microseconds(
        [lambda: torch.tensor(case.items[0][0], dtype=torch.int64).pin_memory().to(DEVICE, non_blocking=True)]
    )))  # fmt: skip
    for what, us in rows:
        print(f"  {what:<58} {'-' if us is None else f'{us:6.1f}'}")
    print("breakdown (this case): pack, ratio to copy per measure, default tuning")
    print(f"  {'variant':<58} {'b2b':>7} {'queued':>7}")
    for what, ctx in ((f"pack_records ({path} launch)", nullcontext()), ("Triton's public launch", PublicLaunch())):
        with ctx:
            m = Measure(pack, single=False)
        print(f"  {what:<58} {copy.b2b / m.b2b:7.1%} {copy.queued / m.queued:7.1%}")
    m = Measure(prepared_pack, single=False)  # the path a rebalance's rounds take
    what = "PreparedCopies (rows staged once, as in rebalance rounds)"
    print(f"  {what:<58} {copy.b2b / m.b2b:7.1%} {copy.queued / m.queued:7.1%}")


def run_case(
    kind: str,
    spec: ExpertSpec,
    n: int,
    sweep: list[Tuning],
    scores: dict[Tuning, list[float]],
    summary: list[tuple],
    *,
    breakdown: bool,
) -> None:
    """Time every function on n experts of ``spec``; append to scores (b2b ratios per config) and summary."""
    case = Case(spec, n)
    title = f"{kind}, {n * spec.record_bytes / MiB:.0f} MiB (n={n})"
    print(f"\n== {title}: {case.bytes_moved / 1e9:.2f} GB read+written per call ==")
    src = [random_bytes(n * spec.nbytes, 30 + r) for r in range(ROTATE)]
    dst = [torch.empty_like(s) for s in src]
    copy = Measure([lambda d=d, s=s: d.copy_(s) for d, s in zip(dst, src)])
    del src, dst
    print(f"{'what':<46} {'b2b GB/s':>9} {'vs copy':>8} {'queued':>8} {'single':>8} {'host us':>8}")

    def line(what: str, m: Measure, extra: str = "") -> tuple[float, float, float | None]:
        r_b2b, r_q = copy.b2b / m.b2b, copy.queued / m.queued
        r_single = copy.single / m.single if m.single is not None else None
        print(
            f"{what:<46} {case.bytes_moved / m.b2b / 1e9:9.0f} {r_b2b:8.1%} {r_q:8.1%} "
            f"{_pct(r_single):>8} {m.host:8.0f}{extra}"
        )
        return r_b2b, r_q, r_single

    line("copy (the ceiling)", copy)
    stacked = random_bytes(ROTATE * n * spec.nbytes, 40).view(torch.int32).view(ROTATE * n, spec.nbytes // 4)
    picks = [torch.arange(r, ROTATE * n, ROTATE, device=DEVICE) for r in range(ROTATE)]
    sel = [torch.empty(n, spec.nbytes // 4, dtype=torch.int32, device=DEVICE) for _ in range(ROTATE)]
    fns = [lambda p=p, o=o, x=stacked: torch.index_select(x, 0, p, out=o) for p, o in zip(picks, sel)]
    line("index_select (stacked experts)", Measure(fns))
    del stacked, sel, fns
    line("copy_ loop (one copy per tensor)", Measure([lambda r=r: copy_loop(case, r) for r in range(ROTATE)]))
    for cfg in sweep:
        c = rec._plan("pack", case.layout, case.storage.device, cfg).chunks
        default = cfg == rec._TUNING
        for op, fns in (("pack", case.pack_fns(cfg)), ("unpack", case.unpack_fns(cfg))):
            m = Measure(fns)
            r_b2b, r_q, r_single = line(f"{op} {_label(cfg)}", m, f"   ({n * c} programs)")
            scores[cfg].append(r_b2b)
            if default:
                summary.append((title, op, r_b2b, r_q, r_single, m.host))
    sums = [lambda r=r: resident_checksums(case.storage, case.layout, *case.items[r]) for r in range(ROTATE)]
    m = Measure(sums, single=False)
    print(f"{'resident_checksums (b2b GB/s read)':<46} {n * spec.nbytes / m.b2b / 1e9:9.0f}")
    m = Measure([lambda r=r: slab_checksums(case.slabs[r], spec, n) for r in range(ROTATE)], single=False)
    print(f"{'slab_checksums (b2b GB/s read)':<46} {n * spec.nbytes / m.b2b / 1e9:9.0f}")
    if breakdown:
        print_breakdown(case, copy)
    case.release()


def copy_loop(case: Case, r: int) -> None:
    """What engines do today: one copy_ per (expert, tensor) into the records of slab r."""
    spec, layout = case.spec, case.layout
    layers, slots = case.items[r]
    slab = case.slabs[r]
    for i, (la, s) in enumerate(zip(layers, slots)):
        for t, ts in enumerate(spec.tensors):
            a = layout.slot_offset(la, s, t)
            b = i * spec.record_bytes + spec.record_offsets[t]
            slab[b : b + ts.nbytes].copy_(case.storage[a : a + ts.nbytes])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default tuning and 64 MiB slabs only")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks this script's code")
    args = parser.parse_args()
    global DEVICE, KINDS, REPS
    t_start = time.time()
    sweep = SWEEP[:1] if args.quick else SWEEP
    slab_sizes = [64 * MiB] if args.quick else [64 * MiB, 256 * MiB]
    odd = spec_odd
    if args.smoke:
        DEVICE = "cpu"
        REPS = 1
        KINDS = {"bf16 tiny": lambda: spec_bf16(256, 128), "fp8 tiny": lambda: spec_fp8_dsv3(256, 256)}
        slab_sizes = [1 * MiB]
        sweep = [rec._TUNING, Tuning(256, 64, 1), Tuning(512, 256, 2)]
        odd = lambda: ExpertSpec([TensorSpec("w", (13, 7), torch.bfloat16), TensorSpec("s", (1,), torch.int16)])
    elif not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    versions = f"torch {torch.__version__}  triton {triton.__version__}  python {sys.version.split()[0]}"
    print(f"device: {device_name}  {versions}")
    print(f"default tuning: {rec._TUNING}; launch: {launch_path(triton.__version__, DEVICE, False)}")
    print(f"b2b / queued: K={K} calls per window, median of {REPS} windows")

    failures = []
    for name, make in [*KINDS.items(), ("odd W=2", odd)]:
        failures += check_spec(name, make(), sweep)
    sync()
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print(f"correctness: pack, unpack, resident/slab checksums bit-exact vs reference, {len(sweep)} tunings, "
          "aligned and unaligned slabs: OK")  # fmt: skip

    scores: dict[Tuning, list[float]] = {cfg: [] for cfg in sweep}
    summary: list[tuple] = []  # (case, op, b2b ratio, queued ratio, single ratio, host us), default tuning
    first = True
    for kind, make in KINDS.items():
        spec = make()
        for size in slab_sizes:
            run_case(kind, spec, -(-size // spec.record_bytes), sweep, scores, summary, breakdown=first)
            first = False

    print("\n== sweep: mean / worst b2b ratio to copy over kinds, sizes, pack and unpack ==")
    ranked = sorted(sweep, key=lambda cfg: -statistics.mean(scores[cfg]))
    for cfg in ranked:
        r = scores[cfg]
        print(f"  {_label(cfg):<36} mean {statistics.mean(r):6.1%}  worst {min(r):6.1%}")
    print(f"  winner: {_label(ranked[0])}{' (the default)' if ranked[0] == rec._TUNING else ''}")

    print(f"\n== default tuning ({_label(rec._TUNING)}): ratio to the device copy, target b2b >= {TARGET:.0%} ==")
    print(f"  {'case':<32} {'op':<7} {'b2b':>7} {'queued':>7} {'single':>7} {'host us':>8}  target")
    held = bool(summary)
    for title, op, r_b2b, r_q, r_single, host in summary:
        ok = r_b2b >= TARGET
        held &= ok
        print(f"  {title:<32} {op:<7} {r_b2b:7.1%} {r_q:7.1%} {_pct(r_single):>7} {host:8.0f}  {'yes' if ok else 'NO'}")
    print(f"  target held in every case: {'yes' if held else 'NO'}; total time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

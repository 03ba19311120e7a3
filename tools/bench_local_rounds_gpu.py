#!/usr/bin/env python3
"""One GPU: the rebalance round machinery without a network, against the kernels' own time.

    python tools/bench_local_rounds_gpu.py [--profile DIR]

A one-rank store of 128 Qwen3-30B-A3B-sized bf16 experts (9.4 MB) swaps the two
halves of its slots (every slot changes; each pair is a 2-cycle of local moves),
so rebalance runs the same rounds as an exchange, minus the transfer. Compared
with one pack + one unpack of the same bytes, this shows the per-call and per-round
overheads (agreement, plan, launches, commit) that the NCCL benchmark cannot separate.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "tests")]

import ckpt_factory as cf  # noqa: E402
import torch  # noqa: E402

import expert_store as es  # noqa: E402
from expert_store.kernels import pack_records, unpack_records  # noqa: E402


def profile(store, p0, p1, out: Path) -> None:
    """Host profile (cProfile) and a torch.profiler trace of a few rebalances, written under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(staging_bytes=4 << 30, round_bytes=2 << 30)
    for i in range(4):
        store.rebalance(p1 if i % 2 == 0 else p0, **kw)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for i in range(10):
        store.rebalance(p1 if i % 2 == 0 else p0, **kw)
        torch.cuda.synchronize()
    pr.disable()
    with open(out / "cprofile_local_rounds.txt", "w") as f:
        st = pstats.Stats(pr, stream=f)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(60)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as prof:
        for i in range(2):
            store.rebalance(p1 if i % 2 == 0 else p0, **kw)
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace_local_rounds.json"))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=None, help="also write a host profile and a trace here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    base = Path(tempfile.mkdtemp(prefix="es-local-"))
    E = 128
    info = cf.write_qwen(base / "ckpt", H=2048, I=768, num_layers=1, num_experts=E, extras=False)
    p0 = es.Placement.contiguous(num_layers=1, num_experts=E, num_ranks=1, slots_per_rank=E)
    p1 = es.Placement(torch.roll(p0.phy2log, E // 2, dims=1), num_ranks=1, num_experts=E)
    t0 = time.perf_counter()
    store = es.ExpertStore.create(
        base / "store", spec=info.spec, placement=p0, checkpoint=info.checkpoint(), device=dev
    )
    t1 = time.perf_counter()
    first = store.rebalance(p1, staging_bytes=1 << 30)  # the first call in this process: nothing compiled yet?
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    store.rebalance(p0, staging_bytes=1 << 30)
    print(f"create {t1 - t0:.2f} s; first rebalance {(t2 - t1) * 1e3:.1f} ms ({first.rounds} rounds)")
    nbytes = E * info.spec.nbytes
    # kernels alone: pack all E experts into one slab, unpack them back (same bytes as the rebalance)
    slab = torch.empty(E * info.spec.record_bytes, dtype=torch.uint8, device=dev)
    idx = list(range(E))
    zeros = [0] * E

    def kernels():
        pack_records(store.slabs.storage, store.layout, zeros, idx, out=slab)
        unpack_records(slab, store.slabs.storage, store.layout, zeros, idx)  # back in place: slots unchanged

    for _ in range(3):
        kernels()
    torch.cuda.synchronize()
    t = []
    for _ in range(10):
        t0 = time.perf_counter()
        kernels()
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    k_s = statistics.median(t)
    # copy ceiling of the same bytes, twice (pack + unpack each read and write them)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        a.copy_(b)
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    c_s = statistics.median(t)
    print(f"{torch.cuda.get_device_name()} | {nbytes / 1e6:.0f} MB moved per rebalance (swap of {E} experts)")
    print(f"two device copies of the bytes: {c_s * 1e3:.2f} ms; pack + unpack of all experts: {k_s * 1e3:.2f} ms")
    cases = [
        (1 << 30, 256 << 20, False),
        (1 << 30, 256 << 20, True),
        (1 << 30, 512 << 20, False),
        (4 << 30, 2 << 30, False),
    ]
    for staging, rnd, verify in cases:
        kw = dict(staging_bytes=staging, round_bytes=rnd, verify=verify)
        store.rebalance(p1, **kw)
        store.rebalance(p0, **kw)
        tot, ex, reps = [], [], None
        for i in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = store.rebalance(p1 if i % 2 == 0 else p0, **kw)
            torch.cuda.synchronize()
            tot.append(time.perf_counter() - t0)
            ex.append(reps.phase_seconds["exchange"])
        ph = " ".join(f"{k}={v * 1e3:.2f}" for k, v in reps.phase_seconds.items())
        total = statistics.median(tot)
        print(
            f"staging {staging >> 20} MiB, rounds of {rnd >> 20} MiB, verify={verify}: {reps.rounds} rounds; total "
            f"{total * 1e3:.2f} ms, exchange {statistics.median(ex) * 1e3:.2f} ms (kernels alone {k_s * 1e3:.2f}; "
            f"target total <= {(k_s + 1e-3) * 1e3:.2f}: {'PASS' if total <= k_s + 1e-3 else 'MISS'}); phases ms {ph}"
        )
    if args.profile is not None:
        profile(store, p0, p1, args.profile)
    store.verify()
    print("verify: ok")


if __name__ == "__main__":
    main()

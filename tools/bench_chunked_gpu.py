#!/usr/bin/env python3
"""One GPU: a many-layer rebalance planned all at once vs. in layer chunks (planning overlapped).

    python tools/bench_chunked_gpu.py [--layers 24] [--experts 64]

A one-rank store of L layers of E Qwen3-30B-A3B-sized bf16 experts (9.4 MB) moves to a
random permutation of every layer (long cycles: parks included), and back. Printed per mode:
the call's wall time, its plan phase (before the first round; only chunk 0 when chunked),
and, for reference in the same run, the plan + schedule of all layers alone on the CPU and
one pack + unpack of all the bytes on the GPU. Every slot is verified at the end.
"""

from __future__ import annotations

import argparse
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
from expert_store import plan as plan_module  # noqa: E402
from expert_store.kernels import pack_records, unpack_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device("cuda")
    L, E = args.layers, args.experts
    base = Path(tempfile.mkdtemp(prefix="es-chunked-"))
    info = cf.write_qwen(base / "ckpt", H=2048, I=768, num_layers=L, num_experts=E, extras=False)
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=E)
    gen = torch.Generator().manual_seed(0)
    p1 = es.Placement(torch.stack([torch.randperm(E, generator=gen) for _ in range(L)]), num_ranks=1, num_experts=E)
    store = es.ExpertStore.create(
        base / "store", spec=info.spec, placement=p0, checkpoint=info.checkpoint(), device=dev
    )
    nbytes = L * E * info.spec.nbytes
    print(
        f"{torch.cuda.get_device_name()} | L={L} layers x {E} experts of {info.spec.nbytes / 1e6:.1f} MB: "
        f"{nbytes / 1e9:.1f} GB"
    )

    # references in the same run: planning all layers on the CPU; pack + unpack of every slot on the GPU
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        plan = plan_module.plan_rebalance(p0, p1, expert_bytes=info.spec.nbytes)
        plan_module.schedule_rounds(plan, record_bytes=info.spec.record_bytes, budget_bytes=256 << 20)
        t.append(time.perf_counter() - t0)
    plan_s = statistics.median(t)
    slab = torch.empty(E * info.spec.record_bytes, dtype=torch.uint8, device=dev)
    t = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(L):
            pack_records(store.slabs.storage, store.layout, [layer] * E, range(E), out=slab)
            unpack_records(slab, store.slabs.storage, store.layout, [layer] * E, range(E))
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    kern_s = statistics.median(t)
    print(
        f"plan + schedule of all layers alone: {plan_s * 1e3:.1f} ms; "
        f"pack + unpack of every slot: {kern_s * 1e3:.1f} ms"
    )

    for mode, min_slots in (("all at once", 1 << 62), ("chunked", 0)):
        plan_module.CHUNK_MIN_SLOTS = min_slots
        chunks = len(plan_module.layer_chunks(p0, p1))
        tot, ph = [], []
        for i in range(2 * args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            rep = store.rebalance(p1 if i % 2 == 0 else p0)
            torch.cuda.synchronize()
            if i >= 2:  # the first two calls warm up
                tot.append(time.perf_counter() - t0)
                ph.append(rep.phase_seconds)
        med = statistics.median(tot)
        phases = " ".join(f"{k}={statistics.median(p[k] for p in ph) * 1e3:.1f}" for k in ph[0])
        print(
            f"{mode:12s}: {chunks} chunks, {rep.rounds} rounds: total {med * 1e3:.1f} ms "
            f"({nbytes / med / 1e9:.0f} GB/s moved); phases ms {phases}; staging peak {rep.staging_peak >> 20} MiB"
        )
    store.verify()
    print("verify: ok")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cold whole-checkpoint reads: the reader's cold settings against fastsafetensors (issue 13).

    python tools/sweep_cold_gpu.py [--rounds 2] [--out DIR]

All 128 DeepSeek-V3 fp8 experts of one layer (5.64 GB, 4 shards) into GPU slots, every shard's
pages evicted before each run and its residency checked (as tools/bench_checkpoint_gpu.py does),
rows round-robin over ``--rounds`` rounds (median): ``read_into`` with cold readers x read size
variants of its settings (the library's first), fastsafetensors loading whole files and with its
tensor filter, and parallel O_DIRECT reads of the same bytes by 8 and 16 threads of 16 and 32 MiB.
Every ``read_into`` row is checked bit-exact against ``safe_open``'s tensors. Prints one table
(GB/s, ratio to fastsafetensors whole files and to the best O_DIRECT row); JSON to
``--out`` (default $OUT) as sweep_cold.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bench_checkpoint_gpu as bench
import ckpt_factory as cf
from read_ceilings import direct_reader, local_dir

import expert_store.checkpoint as ckmod
from expert_store import Checkpoint
from expert_store.layout import ResidentSlabs, SlabLayout

MiB = 1 << 20
# (cold readers, read MiB): the library's settings first
VARIANTS = [(8, 16), (16, 16), (8, 32), (16, 32), (24, 16)]


def es_factory(info, targets, cold_threads: int, chunk_mib: int):
    def factory():
        saved = ckmod._SETTINGS
        ckmod._SETTINGS = dataclasses.replace(saved, cold_threads=cold_threads, chunk_bytes=chunk_mib * MiB)
        # staging for 2 buffers of chunk_bytes per reader (warm readers included), as the library sizes them
        staging = 2 * max(saved.threads, cold_threads) * chunk_mib * MiB
        ckpt = Checkpoint(info.path, names=info.names, layers=info.layers)

        def close() -> None:
            ckpt.close()
            ckmod._SETTINGS = saved

        return (lambda: ckpt.read_into(info.spec, targets, staging_bytes=staging)), close

    return factory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="es-sweep-cold-", dir=local_dir(args.dir)))
    try:
        info = cf.write_deepseek(work, H=7168, I=2048, num_layers=1, num_experts=128, num_shards=4, extras=False)
        files, n = list(info.files), 128
        nbytes = n * info.spec.nbytes
        slabs = ResidentSlabs(SlabLayout.build(info.spec, num_layers=1, slots=n), "cuda", fill=0xA5)
        targets = [(0, e, slabs.slot_tensors(0, e)) for e in range(n)]
        scratch = [
            (0, e, {t.name: torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in info.spec}) for e in range(n)
        ]
        bench.safetensors_cuda_reader(info, scratch)()
        oracle = {(e, k): bench._u8(v) for _, e, d in scratch for k, v in d.items()}
        del scratch

        def check(label: str) -> None:
            torch.cuda.synchronize()
            for _, e, d in targets:
                for k, v in d.items():
                    if not torch.equal(bench._u8(v), oracle[(e, k)]):
                        raise AssertionError(f"{label}: expert {e} tensor {k} differs from safe_open's bytes")

        rows = [(f"read_into, {t} cold readers x {c} MiB", es_factory(info, targets, t, c), True) for t, c in VARIANTS]
        for only in (False, True):
            f = bench.fastsafetensors_reader(info, targets, only_needed=only)
            if f is not None:
                rows.append((f"fastsafetensors, {'tensor filter' if only else 'whole files'}", bench.plain(f), False))
        for t, c in ((8, 16), (16, 16), (8, 32), (16, 32)):
            rows.append(
                (
                    f"O_DIRECT, {t} threads x {c} MiB",
                    bench.plain(direct_reader(files, nbytes, threads=t, chunk=c * MiB)),
                    False,
                )
            )
        times: dict[str, list[float]] = {lab: [] for lab, _, _ in rows}
        resid: dict[str, float] = {lab: 0.0 for lab, _, _ in rows}
        t0 = time.perf_counter()
        for rnd in range(args.rounds):
            for lab, factory, checked in rows:
                if checked:
                    slabs.storage.fill_(0xA5)
                sec, r = bench.measure_cold_once(factory, files)
                if checked:
                    check(lab)
                times[lab].append(sec)
                resid[lab] = max(resid[lab], r)
            print(f"round {rnd + 1}: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {lab: nbytes / statistics.median(ts) / 1e9 for lab, ts in times.items()}
    fst = rate.get("fastsafetensors, whole files")
    best_direct = max(v for k, v in rate.items() if k.startswith("O_DIRECT"))
    print(f"\ndevice {torch.cuda.get_device_name()}; torch {torch.__version__}; all 128 DeepSeek-V3 experts "
          f"({nbytes / 1e9:.2f} GB) cold, median of {args.rounds}; bit-exact checks passed")  # fmt: skip
    print("| row | GB/s | / fastsafetensors whole files | / best O_DIRECT | residency before |")
    print("| --- | --- | --- | --- | --- |")
    for lab, v in rate.items():
        f = f"{v / fst:.2f}" if fst else "-"
        print(f"| {lab} | {v:.2f} | {f} | {v / best_direct:.2f} | {resid[lab]:.1%} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep_cold.json").write_text(json.dumps({"times": times, "rate": rate}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

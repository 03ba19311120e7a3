#!/usr/bin/env python3
"""Where the host time inside ``job.step()`` goes (issue 12's diagnosis), on one GPU.

    python tools/diagnose_step_gpu.py [--model deepseek-v3] [--out DIR]

Runs tools/bench_job_gpu.py's two scenarios (eplb: local moves; elastic: reads of a dead rank's
experts) with timers around the parts of ``step()`` (wall time and the stepping thread's CPU
time: wall much above CPU means the thread waited, for the GIL or a lock), in two variants:

* ``busy``: as the benchmark runs it (the staging thread and the checkpoint readers work while
  the engine steps);
* ``quiet``: staging large enough for every layer, and the first step waits until the staging
  thread has staged every layer and ended: the same steps with no other Python thread running.

The difference between the two is what the background threads cost the stepping thread. Prints
one table per variant; writes ``step_diag.json`` under ``--out`` (default $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_job_gpu as bench

from expert_store.launch import run_ranks

_PARTS = [
    ("step", "expert_store.job", "RebalanceJob", "step"),
    ("_step", "expert_store.job", "RebalanceJob", "_step"),
    ("answer", "expert_store.job", "RebalanceJob", "_answer"),
    ("switch", "expert_store.job", "RebalanceJob", "_switch"),
    ("launches", "expert_store.job", "_Stager", "switch"),
    ("release", "expert_store.job", "_Stager", "release"),
    ("wake", "expert_store.job", "_Stager", "wake"),
    ("gather", "expert_store.comm", "Comm", "start_gather"),
    ("launch1", "expert_store.kernels", "PreparedCopies", "launch"),
]


def _install(records: list[dict], prestage: bool) -> None:
    """Wrap the parts of step() with timers that count only on the stepping thread."""
    import importlib

    main = threading.get_ident()
    state = {"cur": None}
    for key, mod, cls, name in _PARTS:
        owner = getattr(importlib.import_module(mod), cls)
        fn = getattr(owner, name)

        def wrapped(*a, __fn=fn, __key=key, **k):
            if threading.get_ident() != main:
                return __fn(*a, **k)
            if __key == "step":
                job = a[0]
                if prestage and not records:
                    job._stager.thread.join(120.0)  # every layer staged, the thread ended
                    time.sleep(0.2)
                state["cur"] = {"wall": {}, "cpu": {}, "n": {}}
            cur = state["cur"]
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return __fn(*a, **k)
            finally:
                if cur is not None:
                    cur["wall"][__key] = cur["wall"].get(__key, 0.0) + time.perf_counter() - w0
                    cur["cpu"][__key] = cur["cpu"].get(__key, 0.0) + time.thread_time() - c0
                    cur["n"][__key] = cur["n"].get(__key, 0) + 1
                if __key == "step" and cur is not None:
                    records.append(cur)

        setattr(owner, name, wrapped)


def diag_worker(rank: int, world: int, cfg: dict):
    records: list[dict] = []
    _install(records, cfg["prestage"])
    out = bench.scenario_worker(rank, world, cfg)
    if out is None:
        return None
    # which steps switched: the benchmark's per-step records are not returned; steps are in order,
    # and a step that ran the launch wrapper (or the blocking path) switched
    out["diag"] = records
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def summarize(records: list[dict]) -> dict:
    body = records[:-1]  # the last step commits: apart
    sw = [r for r in body if r["n"].get("switch")]
    idle = [r for r in body if not r["n"].get("switch")]
    keys = [k for k, *_ in _PARTS]
    out = {}
    for tag, rs in (("switched", sw), ("idle", idle)):
        per = {}
        for k in keys:
            per[k] = {
                "wall_us": _median([r["wall"].get(k, 0.0) * 1e6 / max(1, r["n"].get("switch", 1)) for r in rs]),
                "cpu_us": _median([r["cpu"].get(k, 0.0) * 1e6 / max(1, r["n"].get("switch", 1)) for r in rs]),
            }
        out[tag] = {"steps": len(rs), "parts": per}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3", choices=["qwen3", "deepseek-v3"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    shape = bench.make_shape(args.model, device=args.device, quick=args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="es-stepdiag-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    results = {}
    try:
        ckpt = bench.write_checkpoint(tmp / "ckpt", shape)
        for variant in ("busy", "quiet"):
            for name in ("eplb", "elastic"):
                world = 1 if name == "eplb" else 2
                S = shape.eplb_slots if name == "eplb" else shape.E
                rb = shape.spec().record_bytes
                staging = max(bench.DEFAULT_STAGING_BYTES, S * rb)
                if variant == "quiet":
                    staging = shape.L * S * rb  # every layer at once
                cfg = dict(shape=shape, device=args.device, scenario=name, ckpt=str(ckpt),
                           root=str(tmp / f"{variant}-{name}"), steps=args.steps, layers_per_step=1,
                           staging_bytes=staging, prestage=variant == "quiet")  # fmt: skip
                try:
                    r = run_ranks(diag_worker, world, cfg, timeout_s=240.0)[0]
                    results[f"{variant}/{name}"] = {"summary": summarize(r["diag"]), "step": r["step"],
                                                    "checks_ok": bench.ok_checks(r["checks"])}  # fmt: skip
                except Exception as e:  # a diagnosis prints what failed and goes on
                    results[f"{variant}/{name}"] = {"error": repr(e)}
                shutil.rmtree(tmp / f"{variant}-{name}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k, *_ in _PARTS]
    for run, res in results.items():
        if "error" in res:
            print(f"\n## {run}: FAILED {res['error']}")
            continue
        print(f"\n## {run} (checks {'ok' if res['checks_ok'] else 'FAILED'}); median us, wall / thread CPU")
        print("| steps | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for tag in ("switched", "idle"):
            s = res["summary"][tag]
            cells = [f"{s['parts'][k]['wall_us']:.0f} / {s['parts'][k]['cpu_us']:.0f}" for k in keys]
            print(f"| {tag} ({s['steps']}) | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step_diag.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    torch.multiprocessing.set_start_method("spawn", force=True)
    sys.exit(main())

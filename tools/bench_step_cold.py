#!/usr/bin/env python3
"""Host time of a ``job.step()`` that switches nothing, hot and cache-cold, on the CPU.

    python tools/bench_step_cold.py [--steps 300]

An engine calls ``step()`` once per forward pass, after 10-100 ms in which its own work and the
job's background threads evicted the step's code and data from the CPU caches: the step runs
cold. This measures, in one process on this machine's CPU (no GPU needed), a single-rank job whose
staging thread is stopped (every step switches nothing):

* ``hot``: steps back to back;
* ``cold``: each step after a 10 ms sleep and a pass over 64 MB of memory (the caches refilled
  with other data, as a forward pass does);
* ``floor``: a cold call of a function that does nothing (what any Python call costs cold).

The job-benchmark target (<= 50 us inside a step that switches nothing, tools/bench_job_gpu.py on
the H200 host) is met or missed by the cold figure, not the hot one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import ckpt_factory as cf
from store_util import random_placement

import expert_store as es


def quantiles(xs: list[float]) -> str:
    xs = sorted(x * 1e6 for x in xs)
    return f"p50 {xs[len(xs) // 2]:.1f} us, p90 {xs[int(len(xs) * 0.9)]:.1f} us"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = cf.write_qwen(root / "ckpt", H=32, I=16, num_layers=3, num_experts=6)
        gen = torch.Generator().manual_seed(7)
        p0, p1 = (random_placement(gen, L=3, E=6, R=1, S=9) for _ in range(2))
        store = es.ExpertStore.create(root / "store", spec=info.spec, placement=p0, checkpoint=info.checkpoint())
        store.routing()
        job = store.start_rebalance(p1)
        job._stager.shutdown(5.0)  # staging stopped and reported as nothing staged: no step switches
        with job._stager.cv:
            job._stager.publish(ready=0)
        junk = np.ones(8 << 20)  # 64 MB

        def run(fn, cold: bool) -> list[float]:
            out = []
            for _ in range(args.steps):
                if cold:
                    time.sleep(0.01)
                    junk.sum()
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out

        hot = run(job.step, cold=False)
        cold = run(job.step, cold=True)
        floor = run(lambda: None, cold=True)
        assert job.switched_layers == 0
        print(f"idle job.step(), {args.steps} steps each, on this CPU")
        print(f"  hot:   {quantiles(hot)}")
        print(f"  cold:  {quantiles(cold)}")
        print(f"  floor: {quantiles(floor)} (a cold call of an empty function)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

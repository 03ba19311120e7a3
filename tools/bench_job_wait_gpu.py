"""Blocking ``rebalance`` against a rebalance job run to completion (``start_rebalance(...).wait()``)
on the same change, one process, one device: is one engine enough for both?

The EPLB reshuffle of ``tools/bench_job_gpu.py`` (local moves only; its synthetic checkpoint and
shapes), back and forth between the two placements, each way timed ``--repeats`` times (median).
The job runs with ``layers_per_step`` = L (every staged layer switches at the next step) and = 1.

    python tools/bench_job_wait_gpu.py [--model deepseek-v3|qwen3] [--device cuda|cpu] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_job_gpu import eplb_placements, make_shape, write_checkpoint

import expert_store as es


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["deepseek-v3", "qwen3"], default="qwen3")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = make_shape(args.model, device=device.type, quick=False)
    old, new, _ = eplb_placements(shape)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = shape.checkpoint(write_checkpoint(Path(tmp) / "ckpt", shape))
        store = es.ExpertStore.create(Path(tmp) / "s", spec=shape.spec(), placement=old, checkpoint=ckpt,
                                      device=device)  # fmt: skip
        staging = es.store.DEFAULT_STAGING_BYTES
        ways = {
            "rebalance": lambda p: store.rebalance(p, staging_bytes=staging),
            f"job.wait(), {shape.L} layers a step": lambda p: store.start_rebalance(
                p, staging_bytes=staging, layers_per_step=shape.L
            ).wait(),
            "job.wait(), 1 layer a step": lambda p: store.start_rebalance(p, staging_bytes=staging).wait(),
        }
        times = {k: [] for k in ways}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in ways.items():
                for target in (new, old):
                    sync()
                    t0 = time.perf_counter()
                    fn(target)
                    sync()
                    times[name].append(time.perf_counter() - t0)
        store.verify()
        mb = sum(
            shape.spec().nbytes for layer in range(shape.L) for a, b in zip(old.phy2log[layer], new.phy2log[layer])
            if a != b
        ) / 1e6  # fmt: skip
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"{name}; torch {torch.__version__}; {args.model}: L={shape.L} E={shape.E} S={shape.eplb_slots}, "
              f"staging {staging >> 20} MiB; slots changed per way: {mb:.1f} MB")  # fmt: skip
        print("| way | median ms | min ms | x rebalance |\n|---|---|---|---|")
        base = statistics.median(times["rebalance"][2:])
        for k, v in times.items():
            v = v[2:]
            med = statistics.median(v)
            print(f"| {k} | {med * 1e3:.1f} | {min(v) * 1e3:.1f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

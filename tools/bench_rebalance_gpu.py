#!/usr/bin/env python3
"""Rebalance over NCCL between 2 GPUs against its ceilings, in one call on the 2-GPU machine.

    python tools/bench_rebalance_gpu.py [--cases qwen,small,ds,qwen8] [--out DIR]

For each case, a generated checkpoint, two ranks holding half the experts each,
and a new placement that swaps the halves (so every expert moves one way or the
other). Prints GB/s per direction for (a) one slab each way, (b) one P2P op
per tensor, and store.rebalance end to end and its exchange phase, with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "tests"), str(HERE / "tests" / "benchmarks")]

import ckpt_factory as cf  # noqa: E402
import torch  # noqa: E402
from dist_util import run_ranks  # noqa: E402
from rebalance_worker import bench_worker, summarize  # noqa: E402

CASES = {
    # Qwen3-30B-A3B-sized bf16 experts (9.4 MB): 64 move each way
    "qwen": dict(style="qwen", H=2048, I=768, E=128),
    # many small tensors: 512 experts each way, w13 64 KiB + w2 32 KiB (1024 tensors each way)
    "small": dict(style="qwen", H=128, I=128, E=1024),
    # DeepSeek-V3 fp8 experts with block scales (44 MB): 64 move each way
    "ds": dict(style="ds", H=7168, I=2048, E=128),
    # 8 layers of the qwen case (4.8 GB each way, 1024 changed slots): planned in layer chunks
    "qwen8": dict(style="qwen", H=2048, I=768, E=128, L=8),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="qwen,small,ds")
    ap.add_argument("--configs", default="1024:256,1024:128,1024:512,4096:2048", help="staging_MiB:round_MiB pairs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    configs = [tuple(int(v) << 20 for v in c.split(":")) for c in args.configs.split(",")]
    print(f"torch {torch.__version__}; {torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)}", flush=True)
    report = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="es-bench-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    for case in args.cases.split(","):
        c = CASES[case]
        t0 = time.perf_counter()
        if c["style"] == "qwen":
            info = cf.write_qwen(
                base / case, H=c["H"], I=c["I"], num_layers=c.get("L", 1), num_experts=c["E"], extras=False
            )
        else:
            info = cf.write_deepseek(
                base / case, H=c["H"], I=c["I"], num_layers=1, num_experts=c["E"], extras=False, num_shards=4
            )
        print(f"[{case}] checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg = {"backend": "nccl", "configs": configs, "reps": args.reps, "check": case != "ds", "profile": args.profile}
        res = run_ranks(bench_worker, 2, info, base / f"{case}-store", cfg, backend="nccl", timeout_s=500)[0]
        report[case] = res
        print(f"[{case}]", *summarize(res), sep="\n", flush=True)
        if "profile" in res:
            (Path(args.out) / f"profile_{case}.txt").write_text(res.pop("profile"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_rebalance.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

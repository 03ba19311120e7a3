#!/usr/bin/env python3
"""DeepSeek-V3-sized elastic rebalance over NCCL on one host with N GPUs (N = 2, 4 or 8).

    python tools/elastic_rebalance_gpus.py [--gpus N] [--layers L] [--out results/]

fp8 experts with block scales (H=7168, I=2048: 44 MB each), 256 logical
experts, P = 256 + N*k physical slots (k chosen so the N-1 survivors of a lost
rank can still hold every expert). Steps, each followed by verify() on every
live rank:

  0. create: every rank loads its slots from a generated checkpoint;
  1. EPLB rebalance from a skewed load (all ranks alive);
  2. loss of rank N-1: the survivors rebalance without it (its unique experts
     are read from the checkpoint);
  3. its return, fresh (empty): filled from its peers.

Prints per step: bytes per link (from the plan), GB/s per rank against the
same run's single-slab NCCL send/recv between the same pair, seconds per
phase, staging peak and the verify result. Writes the output and a JSON file
under --out.
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
sys.path[:0] = [str(HERE / "tests")]

import ckpt_factory as cf  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import expert_store as es  # noqa: E402
from expert_store.launch import run_ranks  # noqa: E402
from expert_store.plan import plan_rebalance  # noqa: E402

E = 256


def _skewed_load(L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pop = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    return torch.stack([pop[torch.randperm(E, generator=g)] * 1e6 for _ in range(L)])


def _eplb(load, *, ranks, slots, previous):
    phy2log, _, _ = es.eplb.rebalance_experts(load, ranks * slots, 1, 1, ranks, previous=previous)
    return phy2log


def _device(rank: int, cfg) -> torch.device:
    return torch.device("cuda", rank) if cfg["backend"] == "nccl" else torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _pair_ceiling(rank: int, world: int, nbytes: int, dev: torch.device, reps: int = 5) -> dict[int, float]:
    """Single-slab send/recv, both ways at once, between rank 0 and every other rank: GB/s per direction."""
    buf_s = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    buf_r = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out = {}
    for peer in range(1, world):
        times = []
        for _ in range(reps + 1):
            dist.barrier()
            _sync(dev)
            t0 = time.perf_counter()
            if rank in (0, peer):
                other = peer if rank == 0 else 0
                ops = [dist.P2POp(dist.isend, buf_s, other), dist.P2POp(dist.irecv, buf_r, other)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[peer] = nbytes / sorted(times[1:])[len(times[1:]) // 2] / 1e9
    return out


def worker(rank, world, info, root, cfg):
    dev = _device(rank, cfg)
    L, S = info.num_layers, cfg["S"]
    kw = dict(rank=rank, world_size=world, device=dev, timeout_s=600)
    ck = info.checkpoint()
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=world, slots_per_rank=S)
    rows = []
    t0 = time.perf_counter()
    store = es.ExpertStore.create(root, spec=info.spec, placement=p0, checkpoint=ck, **kw)
    t_create = time.perf_counter() - t0
    store.verify()
    rows.append({"step": "create", "rank": rank, "seconds": t_create, "verify": "ok"})
    ceiling = _pair_ceiling(rank, world, cfg["ceiling_bytes"], dev)
    dead = world - 1
    alive = [r != dead for r in range(world)]
    load = _skewed_load(L, 0)
    p1 = es.Placement(_eplb(load, ranks=world, slots=S, previous=p0.phy2log), num_ranks=world, num_experts=E)
    live = _eplb(load, ranks=dead, slots=S, previous=p1.phy2log[:, : dead * S])
    p2 = es.Placement(torch.cat([live, live[:, :S]], dim=1), num_ranks=world, num_experts=E)
    p3 = es.Placement(
        _eplb(_skewed_load(L, 1), ranks=world, slots=S, previous=p2.phy2log), num_ranks=world, num_experts=E
    )
    steps = [
        ("1 eplb", p1, dict(), list(range(world))),
        ("2 rank lost", p2, dict(alive=alive), [r for r in range(world) if alive[r]]),
        ("3 rank back", p3, dict(fresh=(dead,)), list(range(world))),
    ]
    for name, target, extra, live_ranks in steps:
        if rank not in live_ranks:
            del store
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            log = es.ManifestLog(root)
            while (log.latest() or 0) < 3:
                time.sleep(0.05)
            store = es.ExpertStore.join(root, checkpoint=ck, **kw)
            continue
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        rep = store.rebalance(target, **extra)
        extra_peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else 0
        t_v = time.perf_counter()
        try:
            store.verify()
            verdict = "ok"
        except es.IntegrityError as e:
            verdict = f"FAILED: {e}"
        rows.append(
            {
                "step": name,
                "rank": rank,
                "version": rep.version,
                "bytes_p2p": rep.bytes_p2p,
                "bytes_local": rep.bytes_local,
                "bytes_disk": rep.bytes_disk,
                "missing": sum(len(v) for v in rep.missing.values()),
                "seconds": rep.seconds,
                "phases": rep.phase_seconds,
                "rounds": rep.rounds,
                "staging_peak": rep.staging_peak,
                "device_extra_peak": extra_peak,
                "verify": verdict,
                "verify_s": time.perf_counter() - t_v,
                "p2p_GBps": rep.bytes_p2p / max(rep.phase_seconds.get("exchange", 0.0), 1e-9) / 1e9,
            }
        )
    return {"rows": rows, "ceiling": ceiling, "placements": [p.phy2log.tolist() for p in (p0, p1, p2, p3)]}


def _links(old, new, *, world, spec, old_alive, alive, fresh):
    """Bytes per (src, dst) link of the plan the store runs: moves between ranks, and relays of
    missing experts from the rank that reads one to the others needing it."""
    plan = plan_rebalance(
        old, new, expert_bytes=spec.nbytes, old_alive=old_alive, alive=alive, fresh=fresh, relay_missing=True
    )
    links: dict[tuple[int, int], int] = {}
    for m in [*plan.moves, *plan.relays]:
        if m.src_rank != m.dst_rank:
            links[(m.src_rank, m.dst_rank)] = links.get((m.src_rank, m.dst_rank), 0) + spec.nbytes
    return links


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 2))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", action="store_true", help="gloo on the CPU with tiny experts: checks the script")
    args = ap.parse_args()
    N, L = args.gpus, args.layers
    H, I = (256, 128) if args.smoke else (7168, 2048)  # noqa: E741
    backend = "gloo" if args.smoke else "nccl"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # Slots per rank: at least one spare, and enough that N-1 survivors hold all E experts.
    S = max(-(-E // (N - 1)), -(-E // N) + 1)
    P = N * S
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    device_name = "cpu (smoke run)" if args.smoke else torch.cuda.get_device_name(0)
    say(f"{time.strftime('%Y-%m-%d %H:%M')} | {N} x {device_name} | torch {torch.__version__}")
    say(f"DeepSeek-V3-style fp8 experts H={H} I={I}, E={E}, L={L}, P={P} = {E} + {N}*{(P - E) // N}")
    base = Path(tempfile.mkdtemp(prefix="es-elastic-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    t0 = time.perf_counter()
    info = cf.write_deepseek(base / "ckpt", H=H, I=I, num_layers=L, num_experts=E, extras=False, num_shards=8)
    say(f"checkpoint {info.expert_bytes / 1e9:.1f} GB written in {time.perf_counter() - t0:.0f} s")
    cfg = {"S": S, "ceiling_bytes": (1 << 20) if args.smoke else (1 << 30), "backend": backend}
    res = run_ranks(
        worker, N, info, base / "store", cfg, backend=backend, timeout_s=1500, pg_timeout_s=600,
        env={"TRITON_INTERPRET": None},
    )  # fmt: skip
    ceiling = res[0]["ceiling"]
    pairs = ", ".join(f"r{p}: {v:.0f}" for p, v in ceiling.items())
    say(f"single-slab {backend} send/recv, both ways, {cfg['ceiling_bytes'] >> 20} MiB, rank 0 <-> r: {pairs} GB/s")
    ps = [es.Placement(torch.tensor(t), num_ranks=N, num_experts=E) for t in res[0]["placements"]]
    all_alive = [True] * N
    alive = [r != N - 1 for r in range(N)]
    link_steps = {
        "1 eplb": _links(ps[0], ps[1], world=N, spec=info.spec, old_alive=all_alive, alive=all_alive, fresh=()),
        "2 rank lost": _links(ps[1], ps[2], world=N, spec=info.spec, old_alive=all_alive, alive=alive, fresh=()),
        "3 rank back": _links(ps[2], ps[3], world=N, spec=info.spec, old_alive=alive, alive=all_alive, fresh=(N - 1,)),
    }
    ref = sum(ceiling.values()) / len(ceiling)
    for step in ["create", "1 eplb", "2 rank lost", "3 rank back"]:
        say()
        say(f"== {step}")
        if step in link_steps:
            ls = link_steps[step]
            say(
                "  bytes per link (src->dst): "
                + (", ".join(f"{a}->{b} {v / 1e9:.2f} GB" for (a, b), v in sorted(ls.items())) or "none")
            )
        say(f"  {'rank':>4} {'p2p GB':>7} {'local GB':>8} {'disk GB':>7} {'miss':>5} {'rounds':>6} {'total s':>7} "
            f"{'exch s':>7} {'p2p GB/s':>8} {'vs slab':>7} {'staging MiB':>11} {'verify':>6}")  # fmt: skip
        for r in range(N):
            for row in res[r]["rows"]:
                if row["step"] != step:
                    continue
                if step == "create":
                    say(f"  {r:>4} create {row['seconds']:.1f} s, verify {row['verify']}")
                    continue
                ph = row["phases"]
                gbps = row["p2p_GBps"] if row["bytes_p2p"] else 0.0
                gb = {key: row[key] / 1e9 for key in ("bytes_p2p", "bytes_local", "bytes_disk")}
                say(f"  {r:>4} {gb['bytes_p2p']:>7.2f} {gb['bytes_local']:>8.2f} {gb['bytes_disk']:>7.2f} "
                    f"{row['missing']:>5} {row['rounds']:>6} {row['seconds']:>7.2f} {ph.get('exchange', 0):>7.2f} "
                    f"{gbps:>8.1f} {gbps / ref:>7.1%} {row['staging_peak'] / 2**20:>11.0f} "
                    f"{row['verify'][:6]:>6}")  # fmt: skip
                say("       phases: " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"elastic_{N}{'cpu_smoke' if args.smoke else 'gpu'}_{time.strftime('%Y%m%d')}"
    (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps({"ceiling": ceiling, "rows": [x["rows"] for x in res]}, indent=1, default=str)
    )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / f"{stem}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

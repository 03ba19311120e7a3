"""``python -m expert_store demo``: the store's main job, end to end, on this machine.

The steps (create, EPLB rebalance, rank lost, rank rejoined, reopen+verify) are described in the
README's Demo section. Prints one line per step and rank: bytes from peers / local copies / disk, time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from . import eplb
from .checkpoint import Checkpoint
from .launch import run_ranks
from .manifest import ManifestLog
from .placement import Placement
from .store import ExpertStore
from .synthetic import SyntheticCheckpoint, write_synthetic_checkpoint

__all__ = ["main"]


def _skewed_load(counter: eplb.LoadCounter, *, L: int, E: int, device, seed: int, steps: int = 8) -> None:
    """Route tokens with a Zipf-like popularity (a different hot set per layer)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for layer in range(L):
            popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.1
            popularity = popularity[torch.randperm(E, generator=torch.Generator().manual_seed(seed + layer))]
            ids = torch.multinomial(popularity, 256 * 8, replacement=True, generator=g).view(256, 8)
            counter.record(layer, ids.to(device))
        counter.step()


def _row(step: str, rank: int, rep) -> dict:
    missing = sum(len(v) for v in rep.missing.values())
    return {"step": step, "rank": rank, "version": rep.version, "p2p_mb": rep.bytes_p2p / 1e6,
            "local_mb": rep.bytes_local / 1e6, "disk_mb": rep.bytes_disk / 1e6, "missing": missing,
            "seconds": rep.seconds, "rounds": rep.rounds}  # fmt: skip


def _loaded_row(step: str, rank: int, store: ExpertStore, seconds: float = 0.0) -> dict:
    """The row of a store whose every distinct expert came from the checkpoint (create, reopen)."""
    distinct = sum(len(set(row.tolist())) for row in store.local_experts())
    return {"step": step, "rank": rank, "version": store.version, "p2p_mb": 0.0, "local_mb": 0.0,
            "disk_mb": distinct * store.spec.nbytes / 1e6, "missing": 0, "seconds": seconds, "rounds": 0}  # fmt: skip


def demo_rank(rank: int, world: int, ck: SyntheticCheckpoint, root: Path, use_cuda: bool, spare: int) -> list[dict]:
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    L, E = ck.num_layers, ck.num_experts
    S = -(-E // world) + spare
    if world > 1:  # the survivors of a lost rank must still hold every expert
        S = max(S, -(-E // (world - 1)))
    checkpoint = Checkpoint(ck.path, names=ck.names, layers=ck.layers)
    kw = dict(rank=rank, world_size=world, device=device)
    p0 = Placement.contiguous(num_layers=L, num_experts=E, num_ranks=world, slots_per_rank=S)
    store = ExpertStore.create(root, spec=ck.spec, placement=p0, checkpoint=checkpoint, **kw)
    rows = [_loaded_row("create", rank, store)]
    counter = eplb.LoadCounter(num_layers=L, num_experts=E, window=8, device=device)

    def eplb_phy2log(ranks: int, previous: torch.Tensor) -> torch.Tensor:
        """EPLB's placement of the measured load over ``ranks`` ranks, close to ``previous``."""
        return eplb.rebalance_experts(counter.load().cpu(), ranks * S, 1, 1, ranks, previous=previous)[0]

    # 1. EPLB from a skewed load
    _skewed_load(counter, L=L, E=E, device=device, seed=0)
    target = Placement(eplb_phy2log(world, store.placement.phy2log), num_ranks=world, num_experts=E)
    rows.append(_row("eplb", rank, store.rebalance(target, verify=True)))
    if world > 1:
        # 2. the last rank dies; the survivors rebalance over their own slots
        dead = world - 1
        alive = [r != dead for r in range(world)]
        live = eplb_phy2log(dead, store.placement.phy2log[:, : dead * S])
        without = Placement(torch.cat([live, live[:, :S]], dim=1), num_ranks=world, num_experts=E)
        if rank != dead:
            rows.append(_row("rank lost", rank, store.rebalance(without, alive=alive, verify=True)))
        else:
            del store  # the process "restarts": wait for the survivors' commit, then join empty
            log, deadline = ManifestLog(root), time.monotonic() + 300
            while (log.latest() or 0) < 3:
                if time.monotonic() > deadline:
                    raise TimeoutError("survivors never committed version 3")
                time.sleep(0.05)
            store = ExpertStore.join(root, checkpoint=checkpoint, **kw)
        # 3. it comes back fresh and is filled from its peers
        _skewed_load(counter, L=L, E=E, device=device, seed=1)
        back = Placement(eplb_phy2log(world, without.phy2log), num_ranks=world, num_experts=E)
        rows.append(_row("rank rejoined", rank, store.rebalance(back, fresh=(dead,), verify=True)))
    # 4. a restarted process reopens the committed version and verifies every slot
    t0 = time.perf_counter()
    again = ExpertStore.open(root, checkpoint=checkpoint, **kw)
    rows.append(_loaded_row("reopen+verify", rank, again, time.perf_counter() - t0))
    return rows


def _print(rows_by_rank: list[list[dict]]) -> None:
    head = f"{'step':<14}{'rank':>5}{'version':>8}{'peers MB':>10}{'local MB':>10}{'disk MB':>9}{'missing':>8}"
    head += f"{'rounds':>7}{'seconds':>9}"
    print(head)
    print("-" * len(head))
    for step in dict.fromkeys(r["step"] for rows in rows_by_rank for r in rows):
        for rows in rows_by_rank:
            for r in rows:
                if r["step"] == step:
                    print(
                        f"{r['step']:<14}{r['rank']:>5}{r['version']:>8}{r['p2p_mb']:>10.2f}{r['local_mb']:>10.2f}"
                        f"{r['disk_mb']:>9.2f}{r['missing']:>8}{r['rounds']:>7}{r['seconds']:>9.3f}"
                    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="expert-store demo", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="EP ranks (processes); default 2")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512, help="H (DeepSeek-V3: 7168)")
    ap.add_argument("--intermediate", type=int, default=256, help="I (DeepSeek-V3: 2048)")
    ap.add_argument("--spare", type=int, default=2, help="redundant slots per rank")
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the checkpoint and store")
    args = ap.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.device_count() >= args.ranks)
    if use_cuda and torch.cuda.device_count() < args.ranks:
        ap.error(f"--device cuda needs {args.ranks} GPUs, found {torch.cuda.device_count()}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="expert-store-demo-"))
    t0 = time.perf_counter()
    ck = write_synthetic_checkpoint(
        work / "checkpoint", H=args.hidden, I=args.intermediate, num_layers=args.layers, num_experts=args.experts
    )
    print(
        f"checkpoint: {ck.path} ({ck.nbytes / 1e6:.1f} MB of experts, L={ck.num_layers}, E={ck.num_experts}, "
        f"{ck.spec.nbytes / 1e6:.3f} MB per expert) written in {time.perf_counter() - t0:.1f} s"
    )
    root = work / "store"
    backend = "nccl" if use_cuda else "gloo"
    transport = f"{backend} between {args.ranks} processes" if args.ranks > 1 else "one process, no process group"
    print(f"store: {root}; {args.ranks} rank(s) on {'cuda' if use_cuda else 'cpu'} ({transport})")
    if args.ranks == 1:
        rows = [demo_rank(0, 1, ck, root, use_cuda, args.spare)]
    else:
        rows = run_ranks(demo_rank, args.ranks, ck, root, use_cuda, args.spare, backend=backend, timeout_s=900)
    _print(rows)
    log = ManifestLog(root)
    m = log.read()
    print(f"committed versions: {log.versions()}; current {m.version} ({m.reason}), alive {m.alive.tolist()}")
    return 0

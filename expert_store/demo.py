"""``python -m expert_store demo``: a tour of the store on this machine, on several ranks.

The tour (README, "Demo"): write a checkpoint (or use --checkpoint), create the store with
fewer slots per rank than experts, move to an EPLB placement of a skewed load (experts travel
between ranks in packed peer-to-peer rounds), lose a rank (the survivors rebalance; the experts
only the dead rank held come from the checkpoint), bring it back empty and fill it from its peers,
then reopen the committed version and verify every slot. Each step prints a row per rank and a
summary; the end prints the inspect-store commands to look at what was committed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import eplb
from .checkpoint import INDEX_NAME, Checkpoint
from .errors import StoreError
from .launch import run_ranks
from .manifest import ManifestLog
from .placement import Placement
from .presets import MODELS, NAMINGS
from .safetensors_file import parse_header
from .spec import ExpertSpec
from .store import ExpertStore
from .synthetic import write_synthetic_checkpoint

__all__ = ["TourConfig", "TourResult", "demo_rank", "main", "slots_per_rank", "tour"]

STEPS = {
    "create": "every rank loads its slots from the checkpoint; version 1 is committed",
    "eplb": "EPLB places the measured skewed load; experts move between ranks in packed peer-to-peer rounds",
    "rank lost": "the last rank dies; the survivors rebalance over their own slots (alive=), reading the "
    "experts only it held from the checkpoint",
    "rank rejoined": "the rank restarts, joins empty and is filled from its peers (fresh=)",
    "load shift": "the load moves on; EPLB places it again",
    "reopen+verify": "a restarted process reopens the committed version and verifies every slot's checksum",
}


@dataclass(frozen=True)
class TourConfig:
    """What every rank of the tour is given (plain data: it crosses to spawned processes)."""

    root: str  # the store's root
    checkpoint: dict  # Checkpoint.to_dict()
    spec: ExpertSpec
    num_layers: int
    num_experts: int
    slots_per_rank: int
    use_cuda: bool
    lose_rank: bool  # False: a second EPLB step instead of the loss and return
    progress: bool = False  # rank 0 draws a bar over the steps


def slots_per_rank(num_experts: int, num_ranks: int) -> int:
    """S for the tour: one redundant slot per rank at least (EPLB replicates hot experts), and with
    3 or more ranks enough for the survivors of a lost rank to hold every expert."""
    E, R = num_experts, num_ranks
    S = -(-E // R) + 1
    if R >= 3:
        S = max(S, -(-E // (R - 1)))
    return min(S, E)


def _skewed_load(counter: eplb.LoadCounter, *, L: int, E: int, device, seed: int, steps: int = 8) -> None:
    """Route tokens with a Zipf-like popularity (a different hot set per layer and seed)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for layer in range(L):
            popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.1
            popularity = popularity[torch.randperm(E, generator=torch.Generator().manual_seed(seed * 1000 + layer))]
            ids = torch.multinomial(popularity, 256 * 8, replacement=True, generator=g).view(256, 8)
            counter.record(layer, ids.to(device))
        counter.step()


def _report_row(step: str, rank: int, rep) -> dict:
    return {"step": step, "rank": rank, "version": rep.version, "bytes_p2p": rep.bytes_p2p,
            "bytes_local": rep.bytes_local, "bytes_disk": rep.bytes_disk, "missing": dict(rep.missing),
            "seconds": rep.seconds, "rounds": rep.rounds}  # fmt: skip


def _loaded_row(step: str, rank: int, store: ExpertStore, seconds: float) -> dict:
    """A store loaded from the checkpoint (create, reopen): each distinct expert of a layer read
    once, its other slots copied locally."""
    experts = store.local_experts()
    distinct = sum(len(set(row.tolist())) for row in experts)
    nbytes = store.spec.nbytes
    return {"step": step, "rank": rank, "version": store.version, "bytes_p2p": 0,
            "bytes_local": (experts.numel() - distinct) * nbytes, "bytes_disk": distinct * nbytes, "missing": {},
            "seconds": seconds, "rounds": 0}  # fmt: skip


def _wait_for_version(root: str, version: int, rank: int, timeout_s: float = 300.0) -> None:
    log, deadline = ManifestLog(root), time.monotonic() + timeout_s
    while (log.latest() or 0) < version:
        if time.monotonic() > deadline:
            raise StoreError(f"rank {rank}: the survivors never committed version {version} under {root}")
        time.sleep(0.05)


def demo_rank(rank: int, world: int, cfg: TourConfig) -> list[dict]:
    """The tour on one rank; returns its rows (one a step it took part in) with the report's numbers:
    step, rank, version, bytes_p2p / bytes_local / bytes_disk, missing {layer: [experts]}, seconds,
    rounds (reopen+verify adds slots_verified)."""
    device = torch.device("cuda", rank) if cfg.use_cuda else torch.device("cpu")
    L, E, S = cfg.num_layers, cfg.num_experts, cfg.slots_per_rank
    checkpoint = Checkpoint.from_dict(cfg.checkpoint)
    kw = dict(rank=rank, world_size=world, device=device)
    steps = ["create", "eplb", *(("rank lost", "rank rejoined") if cfg.lose_rank else ("load shift",)), "reopen+verify"]
    bar = tqdm(total=len(steps), desc="tour", unit="step", disable=None if cfg.progress and rank == 0 else True)

    def step(name: str) -> str:
        bar.set_description(name)
        return name

    t0 = time.perf_counter()
    p0 = Placement.contiguous(num_layers=L, num_experts=E, num_ranks=world, slots_per_rank=S)
    store = ExpertStore.create(cfg.root, spec=cfg.spec, placement=p0, checkpoint=checkpoint, **kw)
    rows = [_loaded_row(step("create"), rank, store, time.perf_counter() - t0)]
    bar.update()
    counter = eplb.LoadCounter(num_layers=L, num_experts=E, window=8, device=device)

    def eplb_phy2log(ranks: int, previous: torch.Tensor) -> torch.Tensor:
        """EPLB's placement of the measured load over ``ranks`` ranks, keeping what it can of ``previous``."""
        return eplb.rebalance_experts(counter.load().cpu(), ranks * S, 1, 1, ranks, previous=previous)[0]

    def rebalance(name: str, target: Placement, **kw) -> None:
        """One rebalance step, verified, recording the load its placement was computed from."""
        rows.append(_report_row(step(name), rank, store.rebalance(target, verify=True, load=counter.load(), **kw)))
        bar.update()

    def eplb_target(seed: int) -> Placement:
        _skewed_load(counter, L=L, E=E, device=device, seed=seed)
        return Placement(eplb_phy2log(world, store.placement.phy2log), num_ranks=world, num_experts=E)

    rebalance("eplb", eplb_target(seed=0))
    if cfg.lose_rank:
        dead = world - 1
        alive = [r != dead for r in range(world)]
        live = eplb_phy2log(dead, store.placement.phy2log[:, : dead * S])
        # The dead rank's slots must name some expert; nobody reads them while it is dead.
        without = Placement(torch.cat([live, live[:, :S]], dim=1), num_ranks=world, num_experts=E)
        if rank != dead:
            rebalance("rank lost", without, alive=alive)
        else:
            # The process "restarts": its memory goes, it waits for the survivors' commit and joins empty.
            step("rank lost")
            store.close()
            _wait_for_version(cfg.root, 3, rank)
            store = ExpertStore.join(cfg.root, checkpoint=checkpoint, **kw)
            bar.update()
        rebalance("rank rejoined", eplb_target(seed=1), fresh=(dead,))
    else:
        rebalance("load shift", eplb_target(seed=1))
    step("reopen+verify")
    store.close()
    t0 = time.perf_counter()
    again = ExpertStore.open(cfg.root, checkpoint=checkpoint, **kw)
    checked = again.verify()
    rows.append({**_loaded_row("reopen+verify", rank, again, time.perf_counter() - t0), "slots_verified": checked})
    again.close()
    bar.update()
    bar.close()
    return rows


# ---------------------------------------------------------------------------- report
def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f}"


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 and nbytes else "-"


def _print_step(step: str, rows: list[dict], world: int) -> None:
    print(f"\n== {step}: {STEPS[step]}")
    head = f"{'rank':>6}{'version':>9}{'peers MB':>11}{'local MB':>11}{'disk MB':>10}{'missing':>9}{'seconds':>10}"
    head += f"{'GB/s':>8}"
    print(head)
    by_rank = {r["rank"]: r for r in rows}
    for rank in range(world):
        r = by_rank.get(rank)
        if r is None:
            print(f"{rank:>6}  dead: takes no part, is never contacted")
            continue
        moved = r["bytes_p2p"] + r["bytes_local"] + r["bytes_disk"]
        missing = sum(len(v) for v in r["missing"].values())
        print(
            f"{rank:>6}{r['version']:>9}{_mb(r['bytes_p2p']):>11}{_mb(r['bytes_local']):>11}{_mb(r['bytes_disk']):>10}"
            f"{missing:>9}{r['seconds']:>10.3f}{_gbps(moved, r['seconds']):>8}"
        )
    p2p, local, disk = (sum(r[k] for r in rows) for k in ("bytes_p2p", "bytes_local", "bytes_disk"))
    slowest = max(r["seconds"] for r in rows)
    versions = sorted({r["version"] for r in rows})
    line = (
        f"   {len(rows)} ranks at version {', '.join(map(str, versions))}: {_mb(p2p)} MB from peers, "
        f"{_mb(local)} MB local, {_mb(disk)} MB from disk in {slowest:.3f} s (slowest rank), "
        f"{_gbps(p2p + local + disk, slowest)} GB/s over all ranks"
    )
    missing = sorted({(layer, e) for r in rows for layer, es in r["missing"].items() for e in es})
    if missing:
        line += f"; {len(missing)} experts held by no live peer read from the checkpoint"
    if "slots_verified" in rows[0]:
        line += f"; {sum(r['slots_verified'] for r in rows)} slots verified"
    print(line)


def print_tour(rows_by_rank: list[list[dict]]) -> None:
    """The rows of :func:`demo_rank`, step by step: a row per rank, then a summary line."""
    world = len(rows_by_rank)
    for step in dict.fromkeys(r["step"] for rows in rows_by_rank for r in rows):
        _print_step(step, [r for rows in rows_by_rank for r in rows if r["step"] == step], world)


def inspect_commands(root: str | os.PathLike[str], versions: list[int], fresh: int | None) -> list[list[str]]:
    """The ``inspect-store`` commands (argument lists) that look at the tour's store."""
    root = os.fspath(root)
    a, b = (2, 3) if len(versions) >= 3 else (versions[0], versions[-1])
    plan = ["plan", root, str(versions[-2]), str(versions[-1])]
    if fresh is not None:
        plan += ["--fresh", str(fresh)]
    return [["summary", root], ["versions", root], ["show", root, "--layer", "0"], ["diff", root, str(a), str(b)],
            plan, ["verify", root]]  # fmt: skip


# ------------------------------------------------------------------------ checkpoints
def _tensor_names(ck: Checkpoint) -> list[str]:
    """Every tensor name of the checkpoint, from its index or its shards' headers (no tensor data)."""
    path = Path(ck.path)
    if path.is_file():
        return list(parse_header(path).tensors)
    index = path / INDEX_NAME
    if index.exists():  # the Checkpoint read it already: it is a JSON object with a weight_map
        return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    return [name for shard in sorted(path.glob("*.safetensors")) for name in parse_header(shard).tensors]


def open_checkpoint(path: str | os.PathLike[str], naming: str, max_layers: int) -> tuple[Checkpoint, ExpertSpec, int]:
    """A checkpoint in ``naming`` (a key of presets.NAMINGS) over its first ``max_layers`` MoE
    layers, the spec of its experts and E, all from its headers. StoreError naming the file when
    the names do not match."""
    names = NAMINGS[naming].names()
    ck = Checkpoint(path, names=names)
    where = (
        os.path.join(ck.path, INDEX_NAME) if os.path.isdir(ck.path) and Path(ck.path, INDEX_NAME).exists() else ck.path
    )
    first = next(iter(names.values()))
    template = first if isinstance(first, str) else first[0]
    pattern = re.escape(template.format(layer="LAYER", expert="EXPERT"))
    pattern = re.compile(pattern.replace("LAYER", r"(\d+)").replace("EXPERT", r"(\d+)") + "$")
    experts: dict[int, set[int]] = {}
    all_names = _tensor_names(ck)
    for name in all_names:
        m = pattern.match(name)
        if m:
            experts.setdefault(int(m[1]), set()).add(int(m[2]))
    if not experts:
        sample = ", ".join(repr(n) for n in all_names[:3])
        raise StoreError(
            f"{where}: no tensor is named like {template!r} (--names {naming}); its tensors are named like "
            f"{sample}: try the other --names"
        )
    layers = sorted(experts)[:max_layers]
    E = len(experts[layers[0]])
    for layer in layers:
        if experts[layer] != set(range(E)):
            raise StoreError(
                f"{where}: checkpoint layer {layer} has experts {sorted(experts[layer])[:8]}..., "
                f"not 0..{E - 1} like layer {layers[0]}"
            )
    ck = Checkpoint(path, names=names, layers=layers)
    w13 = ck.read_expert(0, 0)["w13"]  # gate and up stacked: [2I, H]
    spec = NAMINGS[naming].spec(w13.shape[1], w13.shape[0] // 2)
    ck.validate(spec, num_layers=len(layers), num_experts=E)  # names, dtypes and shapes of every expert
    return ck, spec, E


# --------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="expert-store demo",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Ranks: a rank that is lost can only be survived when the others hold every expert in their "
        "slots; with fewer slots per rank than experts that takes 3 ranks or more, so the tour runs 3 "
        "gloo ranks on the CPU by default (with 2 ranks the loss is skipped, with a note why). With 2 or "
        "more GPUs it runs one NCCL rank per GPU.",
    )
    ap.add_argument(
        "--model", choices=sorted(MODELS), default=None, help="synthetic checkpoint to write (default tiny)"
    )
    ap.add_argument("--layers", type=int, default=2, help="MoE layers to write or use (default 2)")
    ap.add_argument("--ranks", type=int, default=None, help="EP ranks, one process each (default: 3 on the CPU, "
                    "the GPU count with 2 or more GPUs)")  # fmt: skip
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--root", type=Path, default=None, help="where to leave the store and the checkpoint "
                    "(default: a new temporary directory, kept)")  # fmt: skip
    ap.add_argument("--checkpoint", type=Path, default=None, help="tour a checkpoint you have instead (with --names)")
    ap.add_argument("--names", choices=sorted(NAMINGS), default=None, help="the checkpoint's naming")
    return ap


def _choose_ranks(args, ap: argparse.ArgumentParser) -> tuple[int, bool]:
    """(ranks, use CUDA) from --ranks and --device (a usage error for what cannot run)."""
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "cuda" and gpus < 2:
        ap.error(f"--device cuda needs 2 or more GPUs (one NCCL rank each); found {gpus}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and gpus >= 2)
    ranks = args.ranks if args.ranks is not None else (gpus if use_cuda else 3)
    if ranks < 2:
        ap.error(
            f"--ranks {ranks}: the tour moves experts between ranks and needs 2 or more (3 to survive a lost rank)"
        )
    if use_cuda and ranks > gpus:
        ap.error(f"--ranks {ranks} on cuda needs {ranks} GPUs (one rank each); found {gpus}")
    return ranks, use_cuda


@dataclass(frozen=True)
class TourResult:
    """What :func:`tour` did: the rows of :func:`demo_rank` by rank, the versions committed, and the
    ``inspect-store`` argument lists it printed."""

    root: Path  # the store's root
    checkpoint: Path
    layers: list[int]  # checkpoint layers
    num_experts: int
    slots_per_rank: int
    rows: list[list[dict]]
    versions: list[int]
    commands: list[list[str]]


def _write_checkpoint(name: str, layers: int, work: Path) -> tuple[Checkpoint, ExpertSpec, int]:
    """Write the first ``layers`` MoE layers of model preset ``name`` under ``work``, saying how
    large it is first (DeepSeek-V3: 11 GB a layer)."""
    model = MODELS[name]
    L, E, spec = min(layers, model.num_moe_layers), model.num_experts, model.spec()
    size = L * E * spec.nbytes
    free = shutil.disk_usage(work).free
    print(f"checkpoint: writing a synthetic {name} checkpoint to {work / 'checkpoint'}: {L} of "
          f"{model.num_moe_layers} MoE layers x {E} experts x {spec.nbytes / 1e6:.3f} MB "
          f"= {size / 1e9:.3f} GB")  # fmt: skip
    if size > free:
        raise StoreError(f"{work}: {size / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free; try fewer --layers")
    t0 = time.perf_counter()
    with tqdm(total=size, unit="B", unit_scale=True, desc="writing checkpoint", disable=None) as bar:
        written = write_synthetic_checkpoint(work / "checkpoint", model=model, num_layers=L, progress=bar.update)
    print(f"            written in {time.perf_counter() - t0:.1f} s")
    return Checkpoint(written.path, names=written.names, layers=written.layers), spec, E


def tour(argv: list[str] | None = None) -> TourResult:
    """Run the demo with command-line arguments ``argv`` (printing as it goes). A usage error exits
    (SystemExit 2, as argparse does); bad input raises StoreError naming the file or option."""
    ap = _parser()
    args = ap.parse_args(argv)
    if (args.checkpoint is None) != (args.names is None):
        ap.error("--checkpoint and --names go together")
    if args.checkpoint is not None and args.model is not None:
        ap.error("--model writes a synthetic checkpoint; --checkpoint uses yours: give one of them")
    if args.layers < 1:
        ap.error(f"--layers {args.layers}: needs 1 or more")
    ranks, use_cuda = _choose_ranks(args, ap)
    if args.checkpoint is not None:  # opened first: a mismatch leaves nothing behind
        ck, spec, E = open_checkpoint(args.checkpoint, args.names, args.layers)
    work = args.root.resolve() if args.root is not None else Path(tempfile.mkdtemp(prefix="expert-store-demo-"))
    root = work / "store"
    if root.exists() and any(root.iterdir()):
        raise StoreError(f"{root} holds a store already; give another --root")
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None:
        print(f"checkpoint: {ck.path} ({args.names} naming): {E} experts in checkpoint layers {list(ck.layers)}, "
              f"{spec.nbytes / 1e6:.3f} MB per expert")  # fmt: skip
    else:
        ck, spec, E = _write_checkpoint(args.model or "tiny", args.layers, work)
    L = len(ck.layers)
    S = slots_per_rank(E, ranks)
    lose = ranks >= 3
    backend = "nccl" if use_cuda else "gloo"
    print(f"store: {root}")
    print(f"       {ranks} ranks ({backend}, {'cuda' if use_cuda else 'cpu'}), {L} layers, {E} experts, "
          f"{S} slots per rank ({ranks * S} slots: {ranks * S - E} redundant), "
          f"{L * S * spec.nbytes / 1e6:.1f} MB of slots per rank")  # fmt: skip
    if S >= E:
        print(f"       note: {S} slots per rank hold all {E} experts: nothing needs to move between ranks")
    if not lose:
        print("       the lost-rank step is skipped: with 2 ranks and fewer slots than experts, one rank cannot "
              "hold all experts; run 3 ranks or more to see it")  # fmt: skip
    cfg = TourConfig(
        root=str(root), checkpoint=ck.to_dict(), spec=spec, num_layers=L, num_experts=E, slots_per_rank=S,
        use_cuda=use_cuda, lose_rank=lose, progress=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    rows = run_ranks(demo_rank, ranks, cfg, backend=backend, timeout_s=3600)
    print_tour(rows)
    versions = ManifestLog(root).versions()
    print(f"\ncommitted versions {versions} in {time.perf_counter() - t0:.1f} s")
    print(f"the store and the checkpoint are kept under {work}; look at them with:")
    commands = inspect_commands(root, versions, ranks - 1 if lose else None)
    for cmd in commands:
        print("  inspect-store " + shlex.join(cmd))
    return TourResult(root, Path(ck.path), list(ck.layers), E, S, rows, versions, commands)


def main(argv: list[str] | None = None) -> int:
    """``expert-store demo``: 0 done, 1 bad input (one line on stderr), 2 usage error."""
    try:
        tour(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), returned as a code to callers
        return e.code if isinstance(e.code, int) else 2
    except StoreError as e:
        print(f"expert-store demo: error: {e}", file=sys.stderr)
        return 1
    return 0

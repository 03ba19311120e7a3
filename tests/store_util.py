"""Checks shared by the store tests (single rank, gloo and NCCL)."""

from __future__ import annotations

import torch

from expert_store.placement import Placement

__all__ = ["assert_slots_exact", "expected_accounting", "random_placement"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1).cpu()


def assert_slots_exact(store, info, *, what: str = "") -> None:
    """Every slot of ``store`` holds exactly the checkpoint bytes of the expert its placement names."""
    experts = store.placement.rank_experts(store.rank)
    L, S = experts.shape
    for layer in range(L):
        for s in range(S):
            e = int(experts[layer, s])
            want = info.expected_expert(layer, e)
            for name, w in want.items():
                got = store.weights(name, layer)[s]
                if not torch.equal(_bytes(got), _bytes(w)):
                    raise AssertionError(
                        f"{what}: rank {store.rank} layer {layer} slot {s} tensor {name} != checkpoint expert {e}"
                    )


def _brought(o, n, r: int, valid: list[bool], live_holders: set[int]) -> tuple[int, int, list[int]]:
    """(experts from peers, local copies, experts from the checkpoint) of rank r in one layer
    (o, n: int64 [R, S], the layer's old and new experts per rank)."""
    S = n.shape[1]
    held = set(o[r].tolist()) if valid[r] else set()
    changed = [s for s in range(S) if not valid[r] or int(o[r, s]) != int(n[r, s])]
    got: set[int] = set()
    p2p, local, disk = 0, 0, []
    for s in changed:
        e = int(n[r, s])
        # an unchanged slot of an expert also counts as "held": duplicates into changed slots are local
        if e in held or e in got:
            local += 1
            continue
        got.add(e)
        if e in live_holders:
            p2p += 1
        else:
            disk.append(e)
    return p2p, local, disk


def expected_accounting(
    old: Placement,
    new: Placement,
    *,
    rank,
    expert_bytes,
    old_alive,
    alive,
    fresh,
    relay_missing=False,
    ranks_per_node=None,
):
    """The contract's accounting, computed independently of the planner (set arithmetic per rank).

    ``relay_missing`` (a blocking rebalance's contract): an expert that several live ranks read from
    the checkpoint in a layer is read by one of them, its reader (the rule of expert_store.plan's
    docstring), and brought to the others as p2p bytes, unlisted in their ``missing``.

    Returns (bytes_p2p, bytes_local, bytes_disk, missing)."""
    R, S, L = new.num_ranks, new.slots_per_rank, new.num_layers
    valid = [bool(alive[r]) and bool(old_alive[r]) and r not in fresh for r in range(R)]
    p2p = local = disk = 0
    missing: dict[int, list[int]] = {}
    for layer in range(L):
        o = old.phy2log[layer].view(R, S)
        n = new.phy2log[layer].view(R, S)
        live_holders = set()
        for r in range(R):
            if valid[r]:
                live_holders |= set(o[r].tolist())
        n_p2p, n_local, reads = _brought(o, n, rank, valid, live_holders)
        if relay_missing and reads:
            from_disk = {r: set(_brought(o, n, r, valid, live_holders)[2]) for r in range(R) if alive[r]}
            for j, e in enumerate(sorted(set().union(*from_disk.values()))):
                needers = [r for r in sorted(from_disk) if e in from_disk[r]]
                cands = needers
                if ranks_per_node:
                    nodes = [r // ranks_per_node for r in needers]
                    best = min(set(nodes), key=lambda x: (-nodes.count(x), x))  # most needers, lowest on ties
                    cands = [r for r in needers if r // ranks_per_node == best]
                if e in reads and cands[(layer + j) % len(cands)] != rank:
                    reads.remove(e)
                    n_p2p += 1
        p2p += n_p2p * expert_bytes
        local += n_local * expert_bytes
        disk += len(reads) * expert_bytes
        if reads:
            missing[layer] = sorted(reads)
    return p2p, local, disk, missing


def random_placement(gen: torch.Generator, *, L: int, E: int, R: int, S: int) -> Placement:
    """A random placement: every expert once, the P - E spare slots random duplicates, shuffled."""
    rows = []
    for _ in range(L):
        extra = torch.randint(0, E, (R * S - E,), generator=gen)
        row = torch.cat([torch.arange(E), extra])
        rows.append(row[torch.randperm(R * S, generator=gen)])
    return Placement(torch.stack(rows).to(torch.int64), num_ranks=R, num_experts=E)

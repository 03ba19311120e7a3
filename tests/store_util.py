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


def expected_accounting(old: Placement, new: Placement, *, rank, expert_bytes, old_alive, alive, fresh):
    """The contract's accounting, computed independently of the planner (set arithmetic per rank).

    Returns (bytes_p2p, bytes_local, bytes_disk, missing)."""
    R, S, L = new.num_ranks, new.slots_per_rank, new.num_layers
    valid = [bool(alive[r]) and bool(old_alive[r]) and r not in fresh for r in range(R)]
    p2p = local = disk = 0
    missing: dict[int, list[int]] = {}
    for layer in range(L):
        o = old.phy2log[layer].view(R, S)
        n = new.phy2log[layer].view(R, S)
        held = set(o[rank].tolist()) if valid[rank] else set()
        live_holders = set()
        for r in range(R):
            if valid[r]:
                live_holders |= set(o[r].tolist())
        changed = [s for s in range(S) if not valid[rank] or int(o[rank, s]) != int(n[rank, s])]
        brought = set()
        for s in changed:
            e = int(n[rank, s])
            if e in held or e in brought:
                local += expert_bytes
            elif e in live_holders:
                p2p += expert_bytes
                brought.add(e)
            else:
                disk += expert_bytes
                brought.add(e)
                missing.setdefault(layer, []).append(e)
        # an unchanged slot of an expert also counts as "held": duplicates into changed slots are local
    for v in missing.values():
        v.sort()
    return p2p, local, disk, missing


def random_placement(gen: torch.Generator, *, L: int, E: int, R: int, S: int) -> Placement:
    """A random placement: every expert once, the P - E spare slots random duplicates, shuffled."""
    rows = []
    for _ in range(L):
        extra = torch.randint(0, E, (R * S - E,), generator=gen)
        row = torch.cat([torch.arange(E), extra])
        rows.append(row[torch.randperm(R * S, generator=gen)])
    return Placement(torch.stack(rows).to(torch.int64), num_ranks=R, num_experts=E)

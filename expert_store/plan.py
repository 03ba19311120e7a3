"""Rebalance planning: who gets which expert from where, and in which round.

Pure and deterministic: every live rank computes the same plan from the same
(old placement, new placement, old alive mask, alive, fresh, ranks_per_node),
so no plan is ever sent over the wire.

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S.
Slots in a plan are *local* slot indices (0..S-1) of the rank named beside them.

For each live rank r and layer l, with H = experts r held before (empty if r is
fresh or was dead in the old version) and the slots whose expert changes:

* the first changed slot wanting an expert e not in H *obtains* e: a
  :class:`Move` from a live, non-fresh holder (``bytes_p2p``), or a
  :class:`DiskRead` when no live holder exists (``bytes_disk``, ``missing``);
* every other changed slot is a local copy (``bytes_local``): a :class:`Move`
  from the rank's own old slot when every old slot of e changes (its old
  content must be packed before it is overwritten), otherwise a
  :class:`PostCopy` after all moves, from a slot that holds e by then;
* unchanged slots cost nothing.

Moves are then scheduled into rounds (:func:`schedule_rounds`) so that each
rank's staging per round stays within a budget and no slot is overwritten
before every move reading its old content has been packed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import PlacementError, StoreError
from .placement import Placement

__all__ = [
    "DiskRead",
    "Move",
    "Park",
    "PostCopy",
    "RankAccount",
    "RebalancePlan",
    "Round",
    "plan_rebalance",
    "schedule_rounds",
]


@dataclass(frozen=True)
class Move:
    """One expert record from (src_rank, layer, src_slot) to (dst_rank, layer, dst_slot).

    ``src_rank == dst_rank`` is a local move of old content within a rank."""

    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    src_park: int = -1  # >= 0: read from this park record of src_rank instead of the slot

    @property
    def is_local(self) -> bool:
        return self.src_rank == self.dst_rank


@dataclass(frozen=True)
class Park:
    """Save the old content of (rank, layer, slot) into park record ``park`` of that rank.

    Breaks a cycle of moves that does not fit one round: the parked slot may
    then be overwritten, and the moves that needed its old content read the
    park record instead."""

    rank: int
    layer: int
    slot: int
    park: int


@dataclass
class Round:
    """One round: parks are packed first, then every move's record, then moves are unpacked."""

    parks: list[Park]
    moves: list[Move]


@dataclass(frozen=True)
class DiskRead:
    """Read (layer, expert) from the checkpoint into local slot ``slot`` of ``rank``."""

    rank: int
    layer: int
    expert: int
    slot: int


@dataclass(frozen=True)
class PostCopy:
    """After all moves and reads: copy local slot src_slot to dst_slot of ``rank`` (same expert)."""

    rank: int
    layer: int
    expert: int
    src_slot: int
    dst_slot: int


@dataclass
class RankAccount:
    """Exact accounting of one rank (DESIGN.md section 3)."""

    bytes_p2p: int = 0
    bytes_local: int = 0
    bytes_disk: int = 0
    missing: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class RebalancePlan:
    """The whole plan; every live rank holds an identical copy."""

    num_ranks: int
    slots_per_rank: int
    alive: tuple[bool, ...]
    holders_valid: tuple[bool, ...]  # rank's old slots hold valid content (alive before and now, not fresh)
    moves: list[Move]
    disk_reads: list[DiskRead]
    post_copies: list[PostCopy]
    accounts: dict[int, RankAccount]
    changed: set[tuple[int, int, int]]  # (rank, layer, local slot) whose content is (re)written


def _as_mask(values: Sequence[bool] | torch.Tensor | None, n: int, what: str) -> tuple[bool, ...]:
    if values is None:
        return (True,) * n
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    values = tuple(bool(v) for v in values)
    if len(values) != n:
        raise PlacementError(f"{what} must have one entry per rank ({n}), got {len(values)}")
    return values


def plan_rebalance(
    old: Placement,
    new: Placement,
    *,
    expert_bytes: int,
    old_alive: Sequence[bool] | torch.Tensor | None = None,
    alive: Sequence[bool] | torch.Tensor | None = None,
    fresh: Iterable[int] = (),
    ranks_per_node: int | None = None,
) -> RebalancePlan:
    """Compute the rebalance plan from ``old`` to ``new``.

    Args:
        old, new: placements with the same L, E, R and S.
        expert_bytes: bytes of one expert (``spec.nbytes``), for the accounting.
        old_alive: bool [R]: ranks whose slots were filled in the old version.
        alive: bool [R]: ranks taking part now (dead ranks are never sources or destinations).
        fresh: live ranks whose memory is empty (restarted); destinations only.
        ranks_per_node: when set, a holder on the destination's node is preferred.
    """
    if (old.num_layers, old.num_experts, old.num_ranks, old.slots_per_rank) != (
        new.num_layers,
        new.num_experts,
        new.num_ranks,
        new.slots_per_rank,
    ):
        raise PlacementError(
            "new placement has (L, E, R, S) = "
            f"{(new.num_layers, new.num_experts, new.num_ranks, new.slots_per_rank)}, the store has "
            f"{(old.num_layers, old.num_experts, old.num_ranks, old.slots_per_rank)}"
        )
    R, S, L = new.num_ranks, new.slots_per_rank, new.num_layers
    alive_t = _as_mask(alive, R, "alive")
    old_alive_t = _as_mask(old_alive, R, "old alive mask")
    fresh_set = set()
    for r in fresh:
        r = int(r)
        if not 0 <= r < R:
            raise PlacementError(f"fresh rank {r} out of range 0..{R - 1}")
        if not alive_t[r]:
            raise PlacementError(f"rank {r} is listed as fresh but not alive")
        fresh_set.add(r)
    if not any(alive_t):
        raise PlacementError("no rank is alive")
    if ranks_per_node is not None and ranks_per_node <= 0:
        raise PlacementError(f"ranks_per_node must be positive, got {ranks_per_node}")
    valid = tuple(alive_t[r] and old_alive_t[r] and r not in fresh_set for r in range(R))
    new.check_servable(torch.tensor(alive_t))

    old_np = old.phy2log.numpy()
    new_np = new.phy2log.numpy()
    moves: list[Move] = []
    disk: list[DiskRead] = []
    post: list[PostCopy] = []
    accounts = {r: RankAccount() for r in range(R) if alive_t[r]}
    changed: set[tuple[int, int, int]] = set()
    sent_bytes = [0] * R  # load already given to each holder, for spreading
    node_of = (lambda r: r // ranks_per_node) if ranks_per_node else (lambda r: 0)
    live_ranks = [r for r in range(R) if alive_t[r]]

    for layer in range(L):
        o = old_np[layer].reshape(R, S)
        n = new_np[layer].reshape(R, S)
        # Plain Python lists: element access on numpy arrays costs ~10x a list's in these loops.
        o_rows, n_rows = o.tolist(), n.tolist()
        same_rows = (o == n).tolist()
        # holders[e] = [(rank, first local slot)] over valid holders, ascending rank
        holders: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for r in range(R):
            if not valid[r]:
                continue
            seen: set[int] = set()
            for s, e in enumerate(o_rows[r]):
                if e not in seen:
                    seen.add(e)
                    holders[e].append((r, s))
        for r in live_ranks:
            acct = accounts[r]
            orow, nrow, same = o_rows[r], n_rows[r], same_rows[r]
            if valid[r]:
                changed_slots = [s for s in range(S) if not same[s]]
                if not changed_slots:
                    continue
                held = set(orow)
                unchanged_home = {nrow[s]: s for s in range(S) if same[s]}
                old_home: dict[int, int] = {}
                for s in range(S):
                    old_home.setdefault(orow[s], s)
            else:
                changed_slots = list(range(S))
                held, unchanged_home, old_home = set(), {}, {}
            filled: dict[int, int] = {}  # expert -> slot that holds it once moves/reads are done
            for s in changed_slots:
                e = nrow[s]
                changed.add((r, layer, s))
                if e in filled or e in unchanged_home:
                    src = filled.get(e, unchanged_home.get(e))
                    post.append(PostCopy(r, layer, e, src, s))
                    acct.bytes_local += expert_bytes
                elif e in held:
                    moves.append(Move(layer, e, r, old_home[e], r, s))
                    filled[e] = s
                    acct.bytes_local += expert_bytes
                elif e in holders:
                    cands = holders[e]
                    if ranks_per_node:
                        same = [c for c in cands if node_of(c[0]) == node_of(r)]
                        if same:
                            cands = same
                    src_rank, src_slot = min(cands, key=lambda c: (sent_bytes[c[0]], c[0]))
                    sent_bytes[src_rank] += expert_bytes
                    moves.append(Move(layer, e, src_rank, src_slot, r, s))
                    filled[e] = s
                    acct.bytes_p2p += expert_bytes
                else:
                    disk.append(DiskRead(r, layer, e, s))
                    filled[e] = s
                    acct.bytes_disk += expert_bytes
                    acct.missing.setdefault(layer, []).append(e)
    for acct in accounts.values():
        for lst in acct.missing.values():
            lst.sort()
    return RebalancePlan(
        num_ranks=R,
        slots_per_rank=S,
        alive=alive_t,
        holders_valid=valid,
        moves=moves,
        disk_reads=disk,
        post_copies=post,
        accounts=accounts,
        changed=changed,
    )


def schedule_rounds(plan: RebalancePlan, *, record_bytes: int, budget_bytes: int) -> list[Round]:
    """Split ``plan.moves`` into rounds.

    In every round each rank packs all the records it sends (and its local
    moves) before it unpacks anything, so a move may write slot X in round k
    only if every move reading X's old content is in round <= k. Per rank and
    round, bytes sent + bytes received + bytes parked (a local move counts
    once) stay within ``budget_bytes``. When no move can go (a cycle of moves
    larger than a round), one blocked slot is *parked*: its old content is
    kept in a park record until every move needing it has run. Deterministic:
    every rank gets the same rounds.

    Raises StoreError when the budget is below two records, or when parked
    records alone fill a rank's budget.
    """
    moves = list(plan.moves)
    if not moves:
        return []
    if budget_bytes < 2 * record_bytes:
        raise StoreError(
            f"staging budget of {budget_bytes} bytes per round is below two expert records "
            f"({2 * record_bytes} bytes); raise staging_bytes"
        )

    cap = budget_bytes // record_bytes  # records per rank per round
    n_layers = max(m.layer for m in moves) + 1
    width = plan.slots_per_rank

    def key(rank: int, layer: int, slot: int) -> int:
        return (rank * n_layers + layer) * width + slot

    src_rank = [m.src_rank for m in moves]
    dst_rank = [m.dst_rank for m in moves]
    local = [m.is_local for m in moves]
    skey = [key(m.src_rank, m.layer, m.src_slot) for m in moves]  # -1 once the source is parked
    dkey = [key(m.dst_rank, m.layer, m.dst_slot) for m in moves]
    # readers[X]: moves still to run that read slot X's old content, for every X some move writes.
    readers: dict[int, list[int]] = defaultdict(list)
    dests = set(dkey)
    for i, k in enumerate(skey):
        if k in dests:
            readers[k].append(i)
    remaining = list(range(len(moves)))
    done: set[int] = set()
    park_refs: dict[tuple[int, int], int] = {}  # (rank, park id) -> moves still reading it
    free_parks: dict[int, list[int]] = defaultdict(list)
    next_park: dict[int, int] = defaultdict(int)
    rounds: list[Round] = []
    while remaining:
        parks: list[Park] = []
        used: dict[int, int] = defaultdict(int)  # records per rank this round
        for rank, _ in park_refs:
            used[rank] += 1
        chosen: set[int] = set()

        def closure_if_fits(i: int, chosen=chosen, done=done, used=used) -> list[int] | None:
            """Move i plus every move still to run that reads the destination of a move in the set
            (together they can share a round: all packs precede all unpacks), or None as soon as
            the set outgrows some rank's budget for this round."""
            out, stack, seen = [], [i], {i}
            need: dict[int, int] = defaultdict(int)
            while stack:
                j = stack.pop()
                out.append(j)
                for rank in (src_rank[j],) if local[j] else (src_rank[j], dst_rank[j]):
                    need[rank] += 1
                    if used[rank] + need[rank] > cap:
                        return None
                for r in readers.get(dkey[j], ()):
                    if r not in seen and r not in done and r not in chosen:
                        seen.add(r)
                        stack.append(r)
            for rank, n in need.items():
                used[rank] += n
            return out

        while True:
            for i in remaining:
                if i in chosen:
                    continue
                if used[src_rank[i]] >= cap or used[dst_rank[i]] >= cap:
                    continue  # cheap pre-check: this move alone does not fit any more
                group = closure_if_fits(i)
                if group is not None:
                    chosen.update(group)
            if chosen:
                break
            # Deadlock: a cycle of moves larger than a round. Park the destination of the
            # first remaining move: its readers then read the park record, breaking the cycle.
            i0 = next((i for i in remaining if any(r not in done for r in readers.get(dkey[i], ()))), None)
            if i0 is None:
                raise StoreError(
                    f"cannot schedule {len(remaining)} remaining moves within {budget_bytes} staging bytes per "
                    "round; raise staging_bytes"
                )
            m0 = moves[i0]
            rank, layer, slot = m0.dst_rank, m0.layer, m0.dst_slot
            if used[rank] + 2 > cap:
                raise StoreError(
                    f"cannot schedule {len(remaining)} remaining moves within {budget_bytes} staging bytes per "
                    f"round: rank {rank} already parks {used[rank]} records; raise staging_bytes"
                )
            pid = free_parks[rank].pop() if free_parks[rank] else next_park[rank]
            next_park[rank] = max(next_park[rank], pid + 1)
            parks.append(Park(rank, layer, slot, pid))
            used[rank] += 1
            parked = dkey[i0]
            pending_readers = [i for i in readers.pop(parked, []) if i not in done]
            for i in pending_readers:
                moves[i] = replace(moves[i], src_park=pid)
                skey[i] = -1
            park_refs[(rank, pid)] = len(pending_readers)
        for i in chosen:
            if moves[i].src_park >= 0:
                park_refs[(src_rank[i], moves[i].src_park)] -= 1
        for k in [k for k, v in park_refs.items() if v == 0]:
            del park_refs[k]
            free_parks[k[0]].append(k[1])
        done |= chosen
        rounds.append(Round(parks=parks, moves=[moves[i] for i in sorted(chosen)]))
        remaining = [i for i in remaining if i not in chosen]
    return rounds

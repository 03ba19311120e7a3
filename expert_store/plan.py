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

:func:`schedule_rounds` then splits the moves into rounds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

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
    "layer_chunks",
    "merge_plans",
    "plan_chunks",
    "plan_rebalance",
    "round_budget",
    "schedule_rounds",
]


class Move(NamedTuple):
    """One expert record from (src_rank, layer, src_slot) to (dst_rank, layer, dst_slot).

    ``src_rank == dst_rank`` is a local move of old content within a rank.
    (Plans hold tens of thousands of these: a named tuple is built in 0.18 us,
    a frozen dataclass in 0.61 us, measured with Python 3.11.)"""

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


class Park(NamedTuple):
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


class DiskRead(NamedTuple):
    """Read (layer, expert) from the checkpoint into local slot ``slot`` of ``rank``."""

    rank: int
    layer: int
    expert: int
    slot: int


class PostCopy(NamedTuple):
    """After all moves and reads: copy local slot src_slot to dst_slot of ``rank`` (same expert)."""

    rank: int
    layer: int
    expert: int
    src_slot: int
    dst_slot: int


@dataclass
class RankAccount:
    """Exact accounting of one rank: bytes brought from peers, copied locally, read from disk."""

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
    layers: Sequence[int] | None = None,
    load: list[int] | None = None,
) -> RebalancePlan:
    """Compute the rebalance plan from ``old`` to ``new``.

    Args:
        old, new: placements with the same L, E, R and S.
        expert_bytes: bytes of one expert (``spec.nbytes``), for the accounting.
        old_alive: bool [R]: ranks whose slots were filled in the old version.
        alive: bool [R]: ranks taking part now (dead ranks are never sources or destinations).
        fresh: live ranks whose memory is empty (restarted); destinations only.
        ranks_per_node: when set, a holder on the destination's node is preferred.
        layers: plan only these layers (default all), in this order.
        load: int [R], bytes each rank already sends (updated in place): planning layers in
            pieces with one ``load`` gives the same moves as planning them at once.
    """
    dims = [(p.num_layers, p.num_experts, p.num_ranks, p.slots_per_rank) for p in (old, new)]
    if dims[0] != dims[1]:
        raise PlacementError(f"new placement has (L, E, R, S) = {dims[1]}, the store has {dims[0]}")
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
    sent_bytes = [0] * R if load is None else load  # load already given to each holder, for spreading
    if len(sent_bytes) != R:
        raise PlacementError(f"load must have one entry per rank ({R}), got {len(sent_bytes)}")
    node_of = (lambda r: r // ranks_per_node) if ranks_per_node else (lambda r: 0)
    live_ranks = [r for r in range(R) if alive_t[r]]

    for layer in range(L) if layers is None else layers:
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
                unchanged_home = {nrow[s]: s for s in range(S) if same[s]}
                old_home: dict[int, int] = {}  # expert -> its first old slot
                for s in range(S):
                    old_home.setdefault(orow[s], s)
            else:
                changed_slots = list(range(S))
                unchanged_home, old_home = {}, {}
            filled: dict[int, int] = {}  # expert -> slot that holds it once moves/reads are done
            for s in changed_slots:
                e = nrow[s]
                changed.add((r, layer, s))
                if e in filled or e in unchanged_home:
                    src = filled.get(e, unchanged_home.get(e))
                    post.append(PostCopy(r, layer, e, src, s))
                    acct.bytes_local += expert_bytes
                elif e in old_home:
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


def merge_plans(plans: Sequence[RebalancePlan]) -> RebalancePlan:
    """One plan from plans of disjoint layers (see :func:`plan_chunks`)."""
    first = plans[0]
    accounts: dict[int, RankAccount] = {r: RankAccount() for r in first.accounts}
    for p in plans:
        for r, a in p.accounts.items():
            m = accounts[r]
            m.bytes_p2p += a.bytes_p2p
            m.bytes_local += a.bytes_local
            m.bytes_disk += a.bytes_disk
            for layer, experts in a.missing.items():
                m.missing[layer] = experts
    return RebalancePlan(
        num_ranks=first.num_ranks,
        slots_per_rank=first.slots_per_rank,
        alive=first.alive,
        holders_valid=first.holders_valid,
        moves=[m for p in plans for m in p.moves],
        disk_reads=[d for p in plans for d in p.disk_reads],
        post_copies=[c for p in plans for c in p.post_copies],
        accounts=accounts,
        changed=set().union(*(p.changed for p in plans)),
    )


# Planning costs ~5 us per changed slot on the CPU (1-2 ms per layer of a large model), as
# much as moving the bytes. Layers are planned in chunks so that chunk k+1 is planned while
# chunk k's rounds run on the GPU: 1 layer first (the GPU starts early), then twice as many
# each time, up to CHUNK_MAX_LAYERS. Below CHUNK_MIN_SLOTS changed slots (~5 ms of planning)
# a rebalance is one chunk: each chunk costs a partly filled last round and a pipeline
# restart (a few hundred us).
CHUNK_MAX_LAYERS = 8
CHUNK_MIN_SLOTS = 1024


def layer_chunks(old: Placement, new: Placement) -> list[range]:
    """The layer ranges :func:`plan_chunks` plans one at a time."""
    L = new.num_layers
    if L == 1 or int((old.phy2log != new.phy2log).sum()) < CHUNK_MIN_SLOTS:
        return [range(L)]
    chunks, start, size = [], 0, 1
    while start < L:
        chunks.append(range(start, min(L, start + size)))
        start += size
        size = min(2 * size, CHUNK_MAX_LAYERS)
    return chunks


def plan_chunks(
    old: Placement,
    new: Placement,
    *,
    expert_bytes: int,
    record_bytes: int,
    staging_bytes: int,
    round_bytes: int,
    old_alive: Sequence[bool] | torch.Tensor | None = None,
    alive: Sequence[bool] | torch.Tensor | None = None,
    fresh: Iterable[int] = (),
    ranks_per_node: int | None = None,
) -> Iterator[tuple[RebalancePlan, list[Round], int]]:
    """(plan, rounds, staging bytes for those rounds) per chunk of layers, computed lazily.

    One chunk: the whole staging. Several (only when half the staging holds four records):
    each chunk's rounds get half of it, since the next chunk is packed while the last rounds
    of the previous one are still in flight.
    Identical on every rank; merged, the plans equal :func:`plan_rebalance` of all layers."""
    chunks = layer_chunks(old, new)
    if staging_bytes // 2 < 4 * record_bytes:  # half the staging must still double-buffer 2-record rounds
        chunks = [range(new.num_layers)]
    staging = staging_bytes if len(chunks) == 1 else staging_bytes // 2
    budget = round_budget(staging_bytes=staging, round_bytes=round_bytes, record_bytes=record_bytes)
    load = [0] * new.num_ranks
    fresh = tuple(fresh)
    for layers in chunks:
        plan = plan_rebalance(
            old,
            new,
            expert_bytes=expert_bytes,
            old_alive=old_alive,
            alive=alive,
            fresh=fresh,
            ranks_per_node=ranks_per_node,
            layers=layers,
            load=load,
        )
        yield plan, schedule_rounds(plan, record_bytes=record_bytes, budget_bytes=budget), staging


def round_budget(*, staging_bytes: int, round_bytes: int, record_bytes: int) -> int:
    """Bytes of records per rank and round, as a rebalance schedules them: ``round_bytes``,
    at most half the staging (two rounds are in flight at once), and at least two records
    when half the staging holds them (the scheduler's minimum)."""
    half = staging_bytes // 2
    return max(min(round_bytes, half), min(2 * record_bytes, half))


def schedule_rounds(plan: RebalancePlan, *, record_bytes: int, budget_bytes: int) -> list[Round]:
    """Split ``plan.moves`` into rounds.

    In every round each rank packs all the records it sends (and its local
    moves) before it unpacks anything, so a move may write slot X in round k
    only if every move reading X's old content is in round <= k. Per rank and
    round, bytes sent + bytes received + bytes parked (a local move counts
    once) stay within ``budget_bytes``. Deterministic: every rank gets the same
    rounds.

    How: "j reads the old content of the slot w writes" makes j a *reader* of w.
    Moves that read each other in a cycle (a swap, say) form a strongly connected
    component that must share a round; the components form a DAG, and a component
    is *ready* once every reader outside it is scheduled. Each round takes ready
    components first-fit, in the order of their first move, and a component that
    becomes ready during the round may still join it. When a component does not fit
    even an empty round, one of its slots is *parked*: its old content is kept in a
    park record until every move needing it has run, which cuts the cycle.

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
    cap = budget_bytes // record_bytes
    records = [0] * plan.num_ranks  # per rank, to send, receive or move locally
    for m in moves:
        records[m.src_rank] += 1
        if m.dst_rank != m.src_rank:
            records[m.dst_rank] += 1
    if max(records) <= cap:
        # Everything fits one round: all packs precede all unpacks, so any order is safe.
        return [Round(parks=[], moves=moves)]
    return _Scheduler(moves, records, cap=cap).run(budget_bytes)


class _Scheduler:
    """State of :func:`schedule_rounds`: moves by index, components by id.

    Flat lists instead of an object per move or per component: with tens of
    thousands of moves, small containers cost more in garbage-collector passes
    than in the work itself."""

    def __init__(self, moves: list[Move], records: list[int], *, cap: int) -> None:
        n = len(moves)
        self.moves = moves
        self.cap = cap  # records per rank per round
        self.src = [m.src_rank for m in moves]
        self.dst = [m.dst_rank for m in moves]
        self.num_ranks = len(records)
        writer_of = {(m.dst_rank, m.layer, m.dst_slot): i for i, m in enumerate(moves)}  # one writer per slot
        get = writer_of.get
        # source_writer[j]: the move writing the slot j reads (j must not run after it), or -1.
        # Readers of w, in CSR form: rd[rd_start[w]:rd_start[w + 1]], valid while source_writer[j] == w.
        self.source_writer = sw = [get((m.src_rank, m.layer, m.src_slot), -1) for m in moves]
        start = [0] * (n + 1)
        for w in sw:
            if w >= 0:
                start[w + 1] += 1
        for i in range(n):
            start[i + 1] += start[i]
        fill = start[:-1]
        rd = [0] * start[n]
        for j, w in enumerate(sw):
            if w >= 0:
                rd[fill[w]] = j
                fill[w] += 1
        self.rd, self.rd_start = rd, start
        self.done = bytearray(n)
        self.comp = [-1] * n  # component id of each move
        self.cm: list[int] = []  # members of component c: cm[cm_start[c]:cm_start[c + 1]], ascending
        self.cm_start = [0]
        self.comp_first: list[int] = []  # first (lowest) move of each component: the scheduling order
        self.multi_need: dict[int, tuple[tuple[int, int], ...]] = {}  # (rank, records) of components > 1 move
        self.pending: list[int] = []  # readers outside the component, not yet scheduled
        self.dead: list[bool] = []  # split by a park
        self.work_left = records  # records per rank still to schedule
        self.park_refs: dict[tuple[int, int], int] = {}  # (rank, park id) -> moves still reading it
        self.free_parks: dict[int, list[int]] = defaultdict(list)
        self.next_park: dict[int, int] = defaultdict(int)
        self._index = [-1] * n  # Tarjan scratch
        self._low = [0] * n
        self.ready = self._add_components(range(n))  # ready components, by first move

    def _readers(self, w: int):
        sw = self.source_writer
        return (j for j in self.rd[self.rd_start[w] : self.rd_start[w + 1]] if sw[j] == w)

    # -- components ----------------------------------------------------------------
    def _add_components(self, nodes: Iterable[int]) -> list[int]:
        """Strongly connected components of the reader graph restricted to ``nodes``
        (iterative Tarjan); returns the new ones that are ready, by first move."""
        nodes = list(nodes)
        inside = bytearray(len(self.moves))
        for v in nodes:
            inside[v] = 1
        index, low = self._index, self._low
        for v in nodes:
            index[v] = -1
        rd, rd_start, sw, comp = self.rd, self.rd_start, self.source_writer, self.comp
        stack: list[int] = []
        on_stack = bytearray(len(self.moves))
        counter = 0
        new_first = len(self.cm_start) - 1
        for root in nodes:
            if index[root] >= 0:
                continue
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on_stack[root] = 1
            work_v, work_pos = [root], [rd_start[root]]
            while work_v:
                v = work_v[-1]
                pos, end = work_pos[-1], rd_start[v + 1]
                w = -1
                while pos < end:
                    u = rd[pos]
                    pos += 1
                    if not inside[u] or sw[u] != v:
                        continue
                    if index[u] < 0:
                        w = u
                        break
                    if on_stack[u] and index[u] < low[v]:
                        low[v] = index[u]
                work_pos[-1] = pos
                if w >= 0:  # descend into w
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = 1
                    work_v.append(w)
                    work_pos.append(rd_start[w])
                    continue
                work_v.pop()
                work_pos.pop()
                if work_v and low[v] < low[work_v[-1]]:
                    low[work_v[-1]] = low[v]
                if low[v] == index[v]:
                    c = len(self.cm_start) - 1
                    k = len(stack) - 1
                    while stack[k] != v:
                        k -= 1
                    group = stack[k:]
                    del stack[k:]
                    for u in group:
                        on_stack[u] = 0
                        comp[u] = c
                    if len(group) > 1:
                        group.sort()
                        need: dict[int, int] = defaultdict(int)
                        for j in group:
                            need[self.src[j]] += 1
                            if self.dst[j] != self.src[j]:
                                need[self.dst[j]] += 1
                        self.multi_need[c] = tuple(need.items())
                    self.comp_first.append(group[0])  # groups are sorted
                    self.cm.extend(group)
                    self.cm_start.append(len(self.cm))
                    self.pending.append(0)
                    self.dead.append(False)
        done, cm, cm_start, pending, ready = self.done, self.cm, self.cm_start, self.pending, []
        for c in range(new_first, len(cm_start) - 1):
            count = 0
            for w in cm[cm_start[c] : cm_start[c + 1]]:
                for pos in range(rd_start[w], rd_start[w + 1]):
                    j = rd[pos]
                    if sw[j] == w and comp[j] != c and not done[j]:
                        count += 1
            pending[c] = count
            if count == 0:
                ready.append(c)
        ready.sort(key=self.comp_first.__getitem__)
        return ready

    def _members(self, c: int) -> list[int]:
        return self.cm[self.cm_start[c] : self.cm_start[c + 1]]

    def _park(self, c: int, used: list[int], parks: list[Park], remaining: int) -> list[int]:
        """Cut component c (too large for any round) by parking the destination of its first
        move that other members read; returns its parts that are ready."""
        comp, done = self.comp, self.done
        i0 = next(i for i in self._members(c) if any(comp[j] == c for j in self._readers(i)))
        m0 = self.moves[i0]
        rank = m0.dst_rank
        if used[rank] + 2 > self.cap:
            raise StoreError(
                f"cannot schedule {remaining} remaining moves within {self.cap} records per round: "
                f"rank {rank} already parks {used[rank]} records; raise staging_bytes"
            )
        pid = self.free_parks[rank].pop() if self.free_parks[rank] else self.next_park[rank]
        self.next_park[rank] = max(self.next_park[rank], pid + 1)
        parks.append(Park(rank, m0.layer, m0.dst_slot, pid))
        used[rank] += 1
        moved = [j for j in self._readers(i0) if not done[j]]
        for j in moved:  # they read the park record from now on
            self.moves[j] = self.moves[j]._replace(src_park=pid)
            self.source_writer[j] = -1
            if comp[j] != c:  # a reader outside c no longer holds c back
                self.pending[c] -= 1
        self.park_refs[(rank, pid)] = len(moved)
        self.dead[c] = True
        return self._add_components(self._members(c))

    def _fill(self, candidates: list[int], used: list[int], chosen: list[int], keep: list[int]) -> list[int]:
        """Take the candidates that fit this round, in order; the others go to ``keep``.
        Returns the components that became ready meanwhile."""
        cap, done, dead = self.cap, self.done, self.dead
        src, dst, cm, cm_start, multi_need = self.src, self.dst, self.cm, self.cm_start, self.multi_need
        work_left, source_writer, comp, pending = self.work_left, self.source_writer, self.comp, self.pending
        open_ranks = sum(1 for r, k in enumerate(work_left) if k and used[r] < cap)
        released: list[int] = []
        for pos, c in enumerate(candidates):
            if not open_ranks:  # every rank with work left is full: nothing else can fit
                keep.extend(candidates[pos:])
                break
            if dead[c]:
                continue
            lo, hi = cm_start[c], cm_start[c + 1]
            if hi - lo == 1:  # one move: one record on its source, one on its destination
                j = cm[lo]
                a, b = src[j], dst[j]
                if used[a] >= cap or used[b] >= cap:
                    keep.append(c)
                    continue
                items = ((a, 1),) if a == b else ((a, 1), (b, 1))
            else:
                items = multi_need[c]
                if any(used[r] + k > cap for r, k in items):
                    keep.append(c)
                    continue
            for r, k in items:
                was_open = used[r] < cap and work_left[r] > 0
                used[r] += k
                work_left[r] -= k
                if was_open and (used[r] >= cap or not work_left[r]):
                    open_ranks -= 1
            for pos in range(lo, hi):
                j = cm[pos]
                chosen.append(j)
                done[j] = 1
            for pos in range(lo, hi):  # release the writers of what c read
                w = source_writer[cm[pos]]
                if w >= 0 and comp[w] != c:
                    cw = comp[w]
                    pending[cw] -= 1
                    if pending[cw] == 0:
                        released.append(cw)
        return released

    # -- rounds ----------------------------------------------------------------------
    def run(self, budget_bytes: int) -> list[Round]:
        rounds: list[Round] = []
        remaining = len(self.moves)
        first = self.comp_first.__getitem__
        while remaining:
            parks: list[Park] = []
            used = [0] * self.num_ranks  # records per rank this round
            for rank, _ in self.park_refs:
                used[rank] += 1
            chosen: list[int] = []
            keep: list[int] = []
            candidates = self.ready
            while True:
                # components freed during the round may still join it (all packs precede all unpacks)
                while candidates:
                    released = self._fill(candidates, used, chosen, keep)
                    candidates = sorted(released, key=first)
                if chosen:
                    break
                # Nothing fits a round holding only parks: a cycle larger than a round.
                big = next((c for c in keep if not self.dead[c] and self.cm_start[c + 1] - self.cm_start[c] > 1), None)
                if big is None:
                    raise StoreError(
                        f"cannot schedule {remaining} remaining moves within {budget_bytes} staging bytes per "
                        "round; raise staging_bytes"
                    )
                candidates = sorted([c for c in keep if c != big] + self._park(big, used, parks, remaining), key=first)
                keep = []
            self.ready = sorted((c for c in keep if not self.dead[c]), key=first)
            for i in chosen:
                m = self.moves[i]
                if m.src_park >= 0:
                    self.park_refs[(m.src_rank, m.src_park)] -= 1
            for k in [k for k, v in self.park_refs.items() if v == 0]:
                del self.park_refs[k]
                self.free_parks[k[0]].append(k[1])
            remaining -= len(chosen)
            rounds.append(Round(parks=parks, moves=[self.moves[i] for i in sorted(chosen)]))
        return rounds

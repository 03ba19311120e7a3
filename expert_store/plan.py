"""Rebalance planning: who gets which expert from where, and in which round.

Pure and deterministic: every live rank computes the same plan from the same
(old placement, new placement, old alive mask, alive, fresh, ranks_per_node),
so no plan is ever sent over the wire.

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S.
Slots in a plan are *local* slot indices (0..S-1) of the rank named beside them.

For each live rank r and layer l, with H = experts r held before (empty if r is
fresh or was dead in the old version) and the slots whose expert changes:

* the first changed slot wanting an expert e not in H *obtains* e: a
  :class:`Move` from a live, non-fresh holder (``bytes_p2p``), or, when no live
  holder exists, a :class:`DiskRead` (``bytes_disk``, ``missing``); with
  ``relay_missing`` (what a rebalance plans) only one of the live ranks obtaining
  e from the checkpoint in a layer reads it (its *reader*), and the others get it
  from the reader as a :class:`Relay` once the read is done (``bytes_p2p``);
* every other changed slot is a local copy (``bytes_local``): a :class:`Move`
  from the rank's own old slot when every old slot of e changes (its old
  content must be packed before it is overwritten), otherwise a
  :class:`PostCopy` after all moves, from a slot that holds e by then;
* unchanged slots cost nothing.

:func:`schedule_rounds` then splits the moves into rounds, :func:`relay_rounds` the relays.

The reader of a missing expert (layer l, expert e): let N be the live ranks obtaining e
from the checkpoint in layer l (ascending), and j the position of e among the experts of
layer l that some live rank obtains from the checkpoint (ascending, from 0). The
candidates C are N, or with ``ranks_per_node`` the ranks of N on the node holding most of
N (the lowest such node on ties); the reader is ``C[(l + j) % len(C)]``. So relays stay on
one node when they can, and reads rotate over the candidates from expert to expert and
layer to layer (no rank reads every shared expert); the choice depends on the layer alone,
so layer chunks plan the same readers as the whole.
"""

from __future__ import annotations

import bisect
import functools
import gc
import itertools
import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
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
    "Relay",
    "Round",
    "layer_chunks",
    "merge_plans",
    "plan_chunks",
    "plan_rebalance",
    "relay_rounds",
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


class Relay(NamedTuple):
    """Send the record of (src_rank, layer, src_slot), just read from the checkpoint there, into
    (dst_rank, layer, dst_slot): a missing expert read once and sent to the other ranks needing it.

    Runs after the reader's :class:`DiskRead` of (layer, expert) into ``src_slot`` is complete
    and after every :class:`Move` (``dst_slot`` may hold old content a move reads), before the
    post copies (a post copy may read ``dst_slot``). The fields and their order are those of a
    :class:`Move` (``Move(*relay)``); ``src_rank != dst_rank`` always."""

    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


class PostCopy(NamedTuple):
    """After all moves, reads and relays: copy local slot src_slot to dst_slot of ``rank`` (same expert)."""

    rank: int
    layer: int
    expert: int
    src_slot: int
    dst_slot: int


@dataclass
class RankAccount:
    """Exact accounting of one rank: bytes brought from peers (moves and relays received), copied
    locally, read from disk (``missing``: layer -> the experts this rank reads from the checkpoint)."""

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
    # Missing experts sent on by their reader (planned with relay_missing): each (layer, expert) is
    # in ``disk_reads`` once, on its reader (``Relay.src_rank``), and relayed to the other ranks
    # needing it. Order: the moves, the reads, then the relays, then the post copies.
    relays: list[Relay] = field(default_factory=list)


# Named tuples from plain tuples without a Python-level __new__ per record (~0.15 us each).
_new_move = functools.partial(tuple.__new__, Move)
_new_post = functools.partial(tuple.__new__, PostCopy)
_new_disk = functools.partial(tuple.__new__, DiskRead)
_new_park = functools.partial(tuple.__new__, Park)
_new_relay = functools.partial(tuple.__new__, Relay)


@contextmanager
def _gc_paused():
    """Planning allocates tens of thousands of small acyclic containers (tuples, lists of ints),
    which refcounting frees; each 700 allocations trigger a cyclic-GC pass that finds nothing,
    and the full passes walk every object of the process. With GC on, building 18,432 moves
    took 24 ms instead of 4.6 ms in a process holding 200k objects (torch imported)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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
    relay_missing: bool = False,
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
        relay_missing: a missing expert that several live ranks need in a layer is read from the
            checkpoint by one of them and relayed to the others (``plan.relays``; see the module
            docstring for the reader). False: every rank needing it reads it (no relays).
    """
    dims = [(p.num_layers, p.num_experts, p.num_ranks, p.slots_per_rank) for p in (old, new)]
    if dims[0] != dims[1]:
        raise PlacementError(f"new placement has (L, E, R, S) = {dims[1]}, the store has {dims[0]}")
    R, S, L, E = new.num_ranks, new.slots_per_rank, new.num_layers, new.num_experts
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
    sent_bytes = [0] * R if load is None else load  # load already given to each holder, for spreading
    if len(sent_bytes) != R:
        raise PlacementError(f"load must have one entry per rank ({R}), got {len(sent_bytes)}")
    lay = np.arange(L) if layers is None else np.array([operator.index(x) for x in layers], dtype=np.int64)
    with _gc_paused():
        cols = _plan_columns(old.phy2log.numpy(), new.phy2log.numpy(), lay, R, S, E, alive_t, valid, ranks_per_node)
        readers = (E, ranks_per_node) if relay_missing else None
        return _plan_objects(cols, R, S, lay, alive_t, valid, expert_bytes, sent_bytes, readers)


def _plan_columns(old_np, new_np, lay, R, S, E, alive_t, valid, ranks_per_node) -> dict[str, np.ndarray]:
    """Every layer at once, in flat (layer position, rank, slot) order, the order the plan lists
    things in: what each changed slot does (post copy, local move, move from a peer, disk read)
    and from which local slot. Vectorized: the per-slot dicts of the loop this replaces cost
    ~1.5 us per changed slot, most of planning."""
    Q = len(lay)
    was = old_np[lay].reshape(Q, R, S)
    now = new_np[lay].reshape(Q, R, S)
    live = np.array(alive_t)[None, :, None]
    validv = np.array(valid)[None, :, None]
    same = (was == now) & validv
    changed = ~same & live
    uh = np.zeros((Q, R, S), dtype=bool)  # expert also in an unchanged slot: post copy from the last one
    uh_src = np.zeros((Q, R, S), dtype=np.int64)
    first = np.zeros((Q, R, S), dtype=np.int64)  # first changed slot wanting the same expert
    has_old = np.zeros((Q, R, S), dtype=bool)  # rank held the expert before: local move from old_home
    old_home = np.zeros((Q, R, S), dtype=np.int64)
    holds = np.zeros((Q, R, S), dtype=bool)  # first old slot of its expert on a valid rank: a holder
    rev = np.arange(S - 1, -1, -1)
    # Slot-by-slot comparisons within each rank, [..., S, S], a few million at a time (bounded memory).
    step = max(1, 4_000_000 // (R * S * S))
    for q0 in range(0, Q, step):
        q = slice(q0, q0 + step)
        o, n = was[q], now[q]
        nn = n[..., :, None] == n[..., None, :]
        m = nn & same[q][..., None, :]
        uh[q] = m.any(-1)
        uh_src[q] = rev[np.argmax(m[..., ::-1], axis=-1)]
        first[q] = np.argmax(nn & changed[q][..., None, :], axis=-1)
        no = n[..., :, None] == o[..., None, :]
        has_old[q] = no.any(-1)
        old_home[q] = np.argmax(no, axis=-1)
        holds[q] = np.argmax(o[..., :, None] == o[..., None, :], axis=-1) == np.arange(S)
    has_old &= validv
    holds &= validv
    post = changed & (uh | (first != np.arange(S)))
    obtain = changed & ~post
    local = obtain & has_old
    remote = obtain & ~has_old
    # Holders of each (layer position, expert), by rank; node is monotone in rank, so one order
    # serves both the whole group and its same-node part.
    hq, hr, hs = np.nonzero(holds)
    hkey = hq * E + was[hq, hr, hs]
    order = np.argsort(hkey, kind="stable")
    hkey, hr, hs = hkey[order], hr[order], hs[order]
    rq, rr, rs = np.nonzero(remote)
    rkey = rq * E + now[rq, rr, rs]
    # group of each key by a dense count (Q * E entries): searchsorted over 18k unsorted keys cost 1.4 ms
    start = np.zeros(Q * E + 1, dtype=np.int64)
    np.cumsum(np.bincount(hkey, minlength=Q * E), out=start[1:])
    lo, hi = start[rkey], start[rkey + 1]
    multi = np.flatnonzero(hi - lo > 1)  # a single holder is the source whatever its node
    if ranks_per_node and len(multi):
        node = np.arange(R) // ranks_per_node
        hnode, rnode = hkey * R + node[hr], rkey[multi] * R + node[rr[multi]]
        nlo = np.searchsorted(hnode, rnode, "left")
        nhi = np.searchsorted(hnode, rnode, "right")
        on_node = nhi > nlo
        lo[multi] = np.where(on_node, nlo, lo[multi])
        hi[multi] = np.where(on_node, nhi, hi[multi])
    return dict(
        now=now, changed=changed, post=post, local=local, remote=remote, uh=uh, uh_src=uh_src, first=first,
        old_home=old_home, hr=hr, hs=hs, lo=lo, hi=hi,
    )  # fmt: skip


def _reader_of(q, r, e, lay, E: int, ranks_per_node: int | None) -> np.ndarray:
    """The checkpoint reads of a plan, at positions (layer position q, rank r) for expert e, in
    flat (q, r, slot) order: for each, the index of the read of the same (layer, expert) that is
    its reader (itself when it reads). The rule is the module docstring's; vectorized."""
    n = len(q)
    key = q * E + e
    order = np.argsort(key, kind="stable")  # by (layer position, expert); ranks ascending within
    ks, rs = key[order], r[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = ks[1:] != ks[:-1]
    gid = np.cumsum(new_group) - 1
    gstart = np.flatnonzero(new_group)
    glen = np.diff(np.append(gstart, n))
    gq = q[order[gstart]]  # ascending
    ordinal = np.arange(len(gstart)) - np.searchsorted(gq, gq)  # the expert's position in its layer
    cstart, clen = gstart, glen
    if ranks_per_node:
        node = rs // ranks_per_node  # ascending within a group: its nodes are runs
        new_run = new_group.copy()
        new_run[1:] |= node[1:] != node[:-1]
        rstart = np.flatnonzero(new_run)
        rlen = np.diff(np.append(rstart, n))
        rg = gid[rstart]
        best = np.lexsort((rstart, -rlen, rg))  # per group: its longest run first, the lowest node on ties
        first = best[np.flatnonzero(np.diff(rg[best], prepend=-1) != 0)]
        cstart, clen = rstart[first], rlen[first]
    reader = cstart + (lay[gq] + ordinal) % clen  # sorted index of each group's reader
    out = np.empty(n, dtype=np.int64)
    out[order] = order[reader[gid]]
    return out


def _plan_objects(cols, R, S, lay, alive_t, valid, expert_bytes, sent_bytes, readers) -> RebalancePlan:
    """The public plan from :func:`_plan_columns`: sources of moves from peers (sequential, as
    each choice spreads ``sent_bytes``), then the named tuples, built once from columns.
    ``readers``: (E, ranks_per_node) to read each missing (layer, expert) once and relay it, or None."""
    now, lo, hi = cols["now"], cols["lo"], cols["hi"]
    has_src = hi > lo
    lo, hi, hr = lo[has_src], hi[has_src], cols["hr"]
    pick = lo.copy()  # a single holder is the source: only choices among several walk in order
    multi = np.flatnonzero(hi - lo > 1)
    single = np.flatnonzero(hi - lo == 1)
    s_rank = hr[lo[single]]
    order = np.argsort(s_rank, kind="stable")
    split = np.cumsum(np.bincount(s_rank, minlength=R))[:-1]
    singles_of = [x.tolist() for x in np.split(single[order], split)]  # positions, ascending, by source
    sent = list(sent_bytes)  # without the single-holder moves, added from singles_of when needed
    hr_l = hr.tolist()
    for t, a, b in zip(multi.tolist(), lo[multi].tolist(), hi[multi].tolist()):
        j, best = -1, 0
        for x in range(a, b):  # least loaded holder, lowest rank on ties (holders are by rank)
            r = hr_l[x]
            v = sent[r] + expert_bytes * bisect.bisect_left(singles_of[r], t)
            if j < 0 or v < best:
                j, best = x, v
        sent[hr_l[j]] += expert_bytes
        pick[t] = j
    for r in range(R):
        sent_bytes[r] = sent[r] + expert_bytes * len(singles_of[r])
    remote = cols["remote"]
    p2p = np.zeros_like(remote)
    p2p[remote] = has_src
    disk = remote & ~p2p
    moving = cols["local"] | p2p
    src_rank = np.broadcast_to(np.arange(R)[None, :, None], now.shape).copy()
    src_slot = cols["old_home"].copy()
    pick_a = pick
    src_rank[p2p] = cols["hr"][pick_a]
    src_slot[p2p] = cols["hs"][pick_a]

    def at(mask, *arrays):
        q, r, s = np.nonzero(mask)
        out = {"q": q, "r": r, "s": s, "layer": lay[q]}
        return out, [a[q, r, s] if a.ndim == 3 else a for a in arrays]

    mv, (m_e, m_sr, m_ss) = at(moving, now, src_rank, src_slot)
    n_moves = len(mv["q"])
    moves = list(
        map(
            _new_move,
            zip(
                mv["layer"].tolist(), m_e.tolist(), m_sr.tolist(), m_ss.tolist(), mv["r"].tolist(), mv["s"].tolist(),
                itertools.repeat(-1, n_moves),
            ),
        )
    )  # fmt: skip
    post = cols["post"]
    pc, (p_e, p_src) = at(post, now, np.where(cols["uh"], cols["uh_src"], cols["first"]))
    post_copies = list(
        map(_new_post, zip(pc["r"].tolist(), pc["layer"].tolist(), p_e.tolist(), p_src.tolist(), pc["s"].tolist()))
    )
    dk, (d_e,) = at(disk, now)
    relays: list[Relay] = []
    if readers is not None and len(d_e):
        src = _reader_of(dk["q"], dk["r"], d_e, lay, *readers)
        reads = src == np.arange(len(src))
        if not reads.all():
            x, y = np.flatnonzero(~reads), src[~reads]
            relays = list(
                map(
                    _new_relay,
                    zip(
                        dk["layer"][x].tolist(), d_e[x].tolist(), dk["r"][y].tolist(), dk["s"][y].tolist(),
                        dk["r"][x].tolist(), dk["s"][x].tolist(),
                    ),
                )
            )  # fmt: skip
            relayed = np.bincount(dk["r"][x], minlength=R)
            dk = {k: v[reads] for k, v in dk.items()}
            d_e = d_e[reads]
    disk_reads = list(map(_new_disk, zip(dk["r"].tolist(), dk["layer"].tolist(), d_e.tolist(), dk["s"].tolist())))
    ch, _ = at(cols["changed"])
    changed = set(zip(ch["r"].tolist(), ch["layer"].tolist(), ch["s"].tolist()))
    # exact accounting: one expert per changed slot, by what fills it
    n_local = np.bincount(mv["r"][~p2p[mv["q"], mv["r"], mv["s"]]], minlength=R) + np.bincount(pc["r"], minlength=R)
    n_p2p = np.bincount(np.nonzero(p2p)[1], minlength=R) + (relayed if relays else 0)
    n_disk = np.bincount(dk["r"], minlength=R)
    accounts = {}
    for r in range(R):
        if alive_t[r]:
            accounts[r] = RankAccount(
                bytes_p2p=int(n_p2p[r]) * expert_bytes,
                bytes_local=int(n_local[r]) * expert_bytes,
                bytes_disk=int(n_disk[r]) * expert_bytes,
            )
    for d in disk_reads:
        accounts[d.rank].missing.setdefault(d.layer, []).append(d.expert)
    for acct in accounts.values():
        for lst in acct.missing.values():
            lst.sort()
    return RebalancePlan(
        num_ranks=R,
        slots_per_rank=S,
        alive=alive_t,
        holders_valid=valid,
        moves=moves,
        disk_reads=disk_reads,
        post_copies=post_copies,
        accounts=accounts,
        changed=changed,
        relays=relays,
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
        relays=[x for p in plans for x in p.relays],
    )


# Planning costs ~1.5 us per changed slot on the CPU (~0.5 ms per layer of a large model; it
# was ~5 us before columns and cycles), a good part of moving the bytes. Layers are planned in
# chunks so that chunk k+1 is planned while chunk k's rounds run on the GPU: 1 layer first (the
# GPU starts early), then twice as many each time, up to CHUNK_MAX_LAYERS. Below CHUNK_MIN_SLOTS
# changed slots a rebalance is one chunk: each chunk costs a partly filled last round and a
# pipeline restart (a few hundred us).
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
    relay_missing: bool = True,
) -> Iterator[tuple[RebalancePlan, list[Round], int]]:
    """(plan, rounds, staging bytes for those rounds) per chunk of layers, computed lazily.

    ``relay_missing`` (what a rebalance does): see :func:`plan_rebalance`; the relays of every
    chunk run after all of them, in :func:`relay_rounds` of the merged plan.

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
            relay_missing=relay_missing,
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
    return _schedule(list(plan.moves), plan.num_ranks, record_bytes=record_bytes, budget_bytes=budget_bytes)


def relay_rounds(plan: RebalancePlan, *, record_bytes: int, staging_bytes: int, round_bytes: int) -> list[Round]:
    """The rounds of ``plan.relays`` (as moves, ``Move(*relay)``), run after every chunk's rounds,
    reads and the wait for both, before the post copies; the whole staging is free by then, so
    per rank and round they carry :func:`round_budget` of ``staging_bytes``. The relays read
    nothing another relay writes, so they fill the rounds first-fit, in plan order. Identical on
    every rank; [] without relays."""
    if not plan.relays:
        return []
    budget = round_budget(staging_bytes=staging_bytes, round_bytes=round_bytes, record_bytes=record_bytes)
    moves = [Move(*x) for x in plan.relays]
    return _schedule(moves, plan.num_ranks, record_bytes=record_bytes, budget_bytes=budget)


def _schedule(moves: list[Move], num_ranks: int, *, record_bytes: int, budget_bytes: int) -> list[Round]:
    if not moves:
        return []
    if budget_bytes < 2 * record_bytes:
        raise StoreError(
            f"staging budget of {budget_bytes} bytes per round is below two expert records "
            f"({2 * record_bytes} bytes); raise staging_bytes"
        )
    cap = budget_bytes // record_bytes
    n = len(moves)
    with _gc_paused():
        # columns of the moves: (layer, expert, src_rank, src_slot, dst_rank, dst_slot, src_park)
        cols = np.fromiter(itertools.chain.from_iterable(moves), dtype=np.int64, count=7 * n).reshape(n, 7)
        src, dst = cols[:, 2], cols[:, 4]
        R = max(num_ranks, int(src.max()) + 1, int(dst.max()) + 1)
        # records per rank, to send, receive or move locally
        records = np.bincount(src, minlength=R) + np.bincount(dst[dst != src], minlength=R)
        if int(records.max()) <= cap:
            # Everything fits one round: all packs precede all unpacks, so any order is safe.
            return [Round(parks=[], moves=moves)]
        return _Scheduler(moves, cols, records.tolist(), cap=cap).run(budget_bytes)


class _Scheduler:
    """State of :func:`schedule_rounds`: moves by index, components by their first move.

    The reader graph has out-degree <= 1 (a move reads one slot, a slot has one writer), so
    its strongly connected components are its cycles, found from dense arrays (the Tarjan
    over dicts of tuples this replaces was ~70% of scheduling). A component is named by its
    first (lowest) move, which is also its scheduling order, so ready lists sort as plain
    ints. Flat lists instead of an object per move or per component: with tens of thousands
    of moves, small containers cost more in garbage-collector passes than in the work itself."""

    def __init__(self, moves: list[Move], cols: np.ndarray, records: list[int], *, cap: int) -> None:
        n = len(moves)
        self.moves = moves
        self.cap = cap  # records per rank per round
        self.num_ranks = len(records)
        layer = cols[:, 0] - cols[:, 0].min()
        S = int(max(cols[:, 3].max(), cols[:, 5].max())) + 1
        R = self.num_ranks
        dst_flat = (layer * R + cols[:, 4]) * S + cols[:, 5]
        src_flat = (layer * R + cols[:, 2]) * S + cols[:, 3]
        writer = np.full(int(layer.max() + 1) * R * S, -1, dtype=np.int64)
        writer[dst_flat] = np.arange(n)  # one writer per slot
        # source_writer[j]: the move writing the slot j reads (j must not run after it), or -1.
        sw = writer[src_flat]
        idx = np.arange(n)
        # Moves on a cycle: f^(2^k) for 2^k >= n maps every move onto a cycle (or the sink n).
        g = np.append(np.where(sw >= 0, sw, n), n)
        for _ in range(max(1, n.bit_length())):
            g = g[g]
        on_cycle = np.zeros(n + 1, dtype=bool)
        on_cycle[g] = True
        on_cycle = on_cycle[:n] & (sw != idx)  # a move reading its own slot is a component alone
        indeg = np.bincount(sw[sw >= 0], minlength=n)
        pending = indeg - (sw == idx)  # readers outside the component, not yet scheduled
        self.src, self.dst = cols[:, 2].tolist(), cols[:, 4].tolist()
        self.source_writer = sw_l = sw.tolist()
        self.comp = comp = idx.tolist()  # component of each move: its first move
        self.need: list[tuple[tuple[int, int], ...] | None] = [None] * n  # (rank, records) of cycles
        self.members: dict[int, list[int]] = {}  # moves of each cycle, ascending
        self.pending = pend = pending.tolist()
        ready = np.flatnonzero(~on_cycle & (pending == 0)).tolist()  # ready singletons, ascending
        if on_cycle.any():
            seen = bytearray(n)
            src, dst, need_of, indeg_l = self.src, self.dst, self.need, indeg.tolist()
            heads = []
            for v in np.flatnonzero(on_cycle).tolist():  # ascending: v is its cycle's first move
                if seen[v]:
                    continue
                group, u = [v], sw_l[v]
                seen[v] = 1
                while u != v:
                    group.append(u)
                    seen[u] = 1
                    u = sw_l[u]
                group.sort()
                need: dict[int, int] = {}
                count = -len(group)  # each member has one reader inside the cycle
                for j in group:
                    comp[j] = v
                    count += indeg_l[j]
                    a, b = src[j], dst[j]
                    need[a] = need.get(a, 0) + 1
                    if b != a:
                        need[b] = need.get(b, 0) + 1
                need_of[v] = tuple(need.items())
                self.members[v] = group
                pend[v] = count
                if not count:
                    heads.append(v)
            if heads:
                ready = sorted(ready + heads)
        self.done = bytearray(n)
        self.work_left = records  # records per rank still to schedule
        self.park_of: list[int] = []  # park record each move reads instead of its slot (-1: none), once parked
        self.park_refs: dict[tuple[int, int], int] = {}  # (rank, park id) -> moves still reading it
        self.free_parks: dict[int, list[int]] = defaultdict(list)
        self.next_park: dict[int, int] = defaultdict(int)
        self._rd: tuple[list[int], list[int]] | None = None
        self.ready = ready  # ready components, ascending

    def _readers(self, w: int) -> list[int]:
        if self._rd is None:  # only parks need readers: CSR by writer, valid while source_writer[j] == w
            sw = np.array(self.source_writer)
            order = np.argsort(sw, kind="stable")
            start = np.searchsorted(sw[order], np.arange(len(sw) + 1))
            self._rd = order.tolist(), start.tolist()
        rd, start = self._rd
        sw = self.source_writer
        return [j for j in rd[start[w] : start[w + 1]] if sw[j] == w]

    def _park(self, c: int, used: list[int], parks: list[Park], remaining: int) -> list[int]:
        """Cut cycle c (too large for any round) by parking the destination of its first move
        that other members read; its members become components of their own; returns the
        ready ones."""
        comp, done = self.comp, self.done
        members = self.members.pop(c)
        i0 = next(i for i in members if any(comp[j] == c for j in self._readers(i)))
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
        if not self.park_of:
            self.park_of = [-1] * len(self.moves)
        moved = [j for j in self._readers(i0) if not done[j]]
        for j in moved:  # they read the park record from now on
            self.park_of[j] = pid
            self.source_writer[j] = -1
        self.park_refs[(rank, pid)] = len(moved)
        self.need[c] = None
        for u in members:  # a cut cycle is a chain: every member is a component alone
            comp[u] = u
        ready = []
        for u in members:
            count = sum(1 for j in self._readers(u) if j != u and not done[j])
            self.pending[u] = count
            if not count:
                ready.append(u)
        return ready

    def _fill(self, candidates: list[int], used: list[int], chosen: list[int], keep: list[int]) -> list[int]:
        """Take the candidates that fit this round, in order; the others go to ``keep``.
        Returns the components that became ready meanwhile."""
        cap, done, need, members = self.cap, self.done, self.need, self.members
        src, dst, work_left, source_writer = self.src, self.dst, self.work_left, self.source_writer
        comp, pending = self.comp, self.pending
        open_ranks = sum(1 for r, k in enumerate(work_left) if k and used[r] < cap)
        released: list[int] = []
        for pos, c in enumerate(candidates):
            if not open_ranks:  # every rank with work left is full: nothing else can fit
                keep.extend(candidates[pos:])
                break
            items = need[c]
            if items is None:  # one move: one record on its source, one on its destination
                a, b = src[c], dst[c]
                ua, ub = used[a], used[b]
                if ua >= cap or ub >= cap:
                    keep.append(c)
                    continue
                # both ranks were open (below cap, this move's record still to do)
                used[a] = ua = ua + 1
                work_left[a] = wa = work_left[a] - 1
                if ua >= cap or not wa:
                    open_ranks -= 1
                if a != b:
                    used[b] = ub = ub + 1
                    work_left[b] = wb = work_left[b] - 1
                    if ub >= cap or not wb:
                        open_ranks -= 1
                chosen.append(c)
                done[c] = 1
                w = source_writer[c]
                if w >= 0 and w != c:  # release the writer of what c read
                    cw = comp[w]
                    pending[cw] = p = pending[cw] - 1
                    if not p:
                        released.append(cw)
                continue
            for r, k in items:
                if used[r] + k > cap:
                    break
            else:
                r = -1
            if r >= 0:
                keep.append(c)
                continue
            for r, k in items:
                was_open = used[r] < cap and work_left[r] > 0
                used[r] += k
                work_left[r] -= k
                if was_open and (used[r] >= cap or not work_left[r]):
                    open_ranks -= 1
            group = members[c]
            for j in group:
                chosen.append(j)
                done[j] = 1
            for j in group:  # release the writers of what c read
                w = source_writer[j]
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
        need = self.need
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
                    candidates = sorted(released)
                if chosen:
                    break
                # Nothing fits a round holding only parks: a cycle larger than a round.
                big = next((c for c in keep if need[c] is not None), None)
                if big is None:
                    raise StoreError(
                        f"cannot schedule {remaining} remaining moves within {budget_bytes} staging bytes per "
                        "round; raise staging_bytes"
                    )
                candidates = sorted([c for c in keep if c != big] + self._park(big, used, parks, remaining))
                keep = []
            keep.sort()
            self.ready = keep
            chosen.sort()
            moves, park_of = self.moves, self.park_of
            if park_of:
                for i in chosen:
                    if park_of[i] >= 0:
                        self.park_refs[(self.src[i], park_of[i])] -= 1
                for k in [k for k, v in self.park_refs.items() if v == 0]:
                    del self.park_refs[k]
                    self.free_parks[k[0]].append(k[1])
                picked = [moves[i] if park_of[i] < 0 else moves[i]._replace(src_park=park_of[i]) for i in chosen]
            else:
                picked = [moves[i] for i in chosen]
            remaining -= len(chosen)
            rounds.append(Round(parks=parks, moves=picked))
        return rounds

"""The machinery under the engine integrations (:mod:`expert_store.integrations.vllm`,
:mod:`expert_store.integrations.sglang`): a planner over physical-to-logical maps with ``-1``
(empty) slots, a scheduler that cuts the work into rounds within a staging budget, and an executor
that moves each round as one packed slab per peer and direction
(:func:`expert_store.kernels.gather_pieces` / ``scatter_pieces``, one launch each) through the
store's message layer (:mod:`expert_store.comm`: call ids, headers, deadlines).

Symbols: L layers, R ranks, S slots per rank (num_local_physical_experts), P = R * S, T weight
tensors per layer. Weight tensor t of a layer is ``[S, ...]`` on every rank; slot p lives on rank
p // S as row p % S.

Rounds: a unit of work is (layer, tensor, byte range of its rows). Within a round every rank packs
everything it sends and copies locally before it writes anything, and a unit's reads and writes
cover the same byte range of the same layer and tensor, so no byte is overwritten before every read
of it (swaps and cycles included) wherever the round boundaries fall. A layer that does not fit the
budget is split by tensor, then by 16-byte-aligned column ranges of the rows.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from expert_store.comm import DEFAULT_TIMEOUT_S, Comm, Kind, call_id
from expert_store.errors import AgreementError, StoreError
from expert_store.kernels import gather_pieces, scatter_pieces

__all__ = ["DEFAULT_STAGING_BYTES", "LayerMoves", "plan_layer"]

# 1 GiB of staging per rank and round: a DeepSeek-V3 layer's changed slots on one rank (44 MB an
# expert) take a few hundred MB, so a typical rebalance runs a few layers a round; a rank holding
# less spare memory passes staging_bytes.
DEFAULT_STAGING_BYTES = 1 << 30


@dataclass
class LayerMoves:
    """What one layer needs, identical on every rank.

    remote: ``(src_rank, src_slot, dst_rank, dst_slots, expert)``: one row sent once, written into
        every local slot of ``dst_slots`` (duplicates on one rank travel once).
    local: ``(rank, src_slot, dst_slots, expert)``: the rank held the expert before (in an
        unchanged slot or one about to be overwritten): copied through staging.
    missing: ``(rank, expert, dst_slots)``: no live rank held the expert; the slots are left as
        they were (SGLang reads them from the checkpoint).
    items: int64 [R]: rows each rank sends, receives or copies locally (its staging, per byte of row).
    """

    remote: list[tuple[int, int, int, tuple[int, ...], int]] = field(default_factory=list)
    local: list[tuple[int, int, tuple[int, ...], int]] = field(default_factory=list)
    missing: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    items: np.ndarray | None = None


def plan_layer(
    old: Sequence[int] | np.ndarray,
    new: Sequence[int] | np.ndarray,
    *,
    num_ranks: int,
    live: Sequence[bool] | None = None,
    ranks_per_node: int | None = None,
) -> LayerMoves:
    """Plan one layer: for each live rank's slot whose new expert e (not -1) differs from its old
    one, a local copy when the rank held e before, else a row from a live holder of e.

    Args:
        old, new: int [P] physical slot -> logical expert, -1 for an empty slot (old: not a source;
            new: nothing wanted there).
        num_ranks: R; P must be a multiple of it.
        live: bool [R]; ranks not live are neither sources nor destinations (default all live).
        ranks_per_node: when set, a holder on the destination's node is preferred.

    Source choice, deterministic: the holders of e (live ranks, ascending) on the destination's
    node when there are any, else all holders; destinations wanting e from the same holder set take
    them in turn (rank order), spreading the sends.
    """
    old = np.asarray(old, dtype=np.int64).reshape(num_ranks, -1)
    new = np.asarray(new, dtype=np.int64).reshape(num_ranks, -1)
    R = old.shape[0]
    live = [True] * R if live is None else [bool(x) for x in live]
    first: dict[tuple[int, int], int] = {}  # (rank, expert) -> first old slot holding it
    holders: dict[int, list[int]] = {}
    wants: dict[tuple[int, int], list[int]] = {}
    old_l, new_l = old.tolist(), new.tolist()
    for r in range(R):
        if not live[r]:
            continue
        for s, e in enumerate(old_l[r]):
            if e >= 0 and (r, e) not in first:
                first[(r, e)] = s
                holders.setdefault(e, []).append(r)
        for s, (e, was) in enumerate(zip(new_l[r], old_l[r])):
            if e >= 0 and e != was:
                wants.setdefault((r, e), []).append(s)
    out = LayerMoves(items=np.zeros(R, dtype=np.int64))
    turn: dict[tuple[int, tuple[int, ...]], int] = {}
    for (r, e), slots in wants.items():  # insertion order: rank, then slot
        src = first.get((r, e))
        if src is not None:
            out.local.append((r, src, tuple(slots), e))
            out.items[r] += 1
            continue
        cands = holders.get(e, [])
        if ranks_per_node and cands:
            same = [h for h in cands if h // ranks_per_node == r // ranks_per_node]
            cands = same or cands
        if not cands:
            out.missing.append((r, e, tuple(slots)))
            continue
        key = (e, tuple(cands))
        k = turn.get(key, 0)
        turn[key] = k + 1
        h = cands[k % len(cands)]
        out.remote.append((h, first[(h, e)], r, tuple(slots), e))
        out.items[h] += 1
        out.items[r] += 1
    return out


# ---- rounds ----
Unit = tuple[int, int, int, int]  # (layer, tensor, first byte, end byte) of every row the layer moves


def schedule(plans: Sequence[LayerMoves], row_bytes: Sequence[Sequence[int]], budget: int) -> list[list[Unit]]:
    """Cut the layers' moves into rounds whose staging stays within ``budget`` bytes on every rank.

    Units are taken in layer order, first-fit into the current round: a whole layer, else its
    tensors one by one, else ranges of a tensor's rows (multiples of 16 bytes, the kernel's vector
    width). Identical on every rank: only the plans (identical) and the row sizes enter."""
    if budget < 16:
        raise StoreError(f"staging budget must be at least 16 bytes, got {budget}")
    rounds: list[list[Unit]] = []
    cur: list[Unit] = []
    load = None

    def add(unit: Unit, cost: np.ndarray) -> None:
        nonlocal cur, load
        if cur and int((load + cost).max()) > budget:
            rounds.append(cur)
            cur, load = [], None
        cur.append(unit)
        load = cost.copy() if load is None else load + cost

    for layer, (plan, sizes) in enumerate(zip(plans, row_bytes)):
        items = plan.items
        peak = int(items.max()) if items is not None and len(items) else 0
        if not peak:
            continue
        if peak * sum(sizes) <= budget:
            for t, nb in enumerate(sizes):
                add((layer, t, 0, nb), items * nb)
            continue
        width = max(16, budget // peak // 16 * 16)  # a range of every moved row that fits an empty round
        for t, nb in enumerate(sizes):
            for a in range(0, nb, width):
                b = min(nb, a + width)
                add((layer, t, a, b), items * (b - a))
    if cur:
        rounds.append(cur)
    return rounds


# ---- execution ----
class Runner:
    """Moves rows between ranks by rounds of packed slabs.

    Args:
        comm: the message layer (its ranks are the engine group's ranks).
        rows: per layer, per tensor, uint8 [S, row_bytes] views of this rank's weight tensors.
        staging_bytes: the budget per rank and round.
    """

    def __init__(self, comm: Comm, rows: Sequence[Sequence[torch.Tensor]], staging_bytes: int) -> None:
        self.comm, self.rows, self.staging_bytes = comm, rows, staging_bytes

    def run(self, plans: Sequence[LayerMoves], *, what: str) -> int:
        """Run every layer's remote and local moves; returns the number of rounds."""
        me = self.comm.rank
        sizes = [[int(r.shape[1]) for r in layer] for layer in self.rows]
        rounds = schedule(plans, sizes, self.staging_bytes)
        layouts = [self._layout(plans, units, me) for units in rounds]
        need = max((lay[0] for lay in layouts), default=0)
        if not need:
            return len(rounds)
        device = self.rows[0][0].device
        staging = torch.empty(need, dtype=torch.uint8, device=device)
        for seq, (_, gathers, scatters, sends, recvs) in enumerate(layouts):
            if gathers:
                gather_pieces([(self._piece(*g), o) for g, o in gathers], staging)
            ex = self.comm.start_exchange(
                {p: staging[o : o + n] for p, (o, n) in sends.items()},
                {p: staging[o : o + n] for p, (o, n) in recvs.items()},
                seq=seq,
            )
            self.comm.finish_exchange(ex)
            if scatters:
                scatter_pieces(staging, [(o, self._piece(*g)) for o, g in scatters])
        self.comm.sync_device(device, what=what)
        return len(rounds)

    def _piece(self, layer: int, t: int, slot: int, a: int, b: int) -> torch.Tensor:
        return self.rows[layer][t][slot, a:b]

    @staticmethod
    def _layout(plans: Sequence[LayerMoves], units: Sequence[Unit], me: int):
        """This rank's staging layout of one round: (bytes, gathers, scatters, sends, recvs).

        Local copies first, then one region per peer sent to, then one per peer received from,
        each filled in unit order and, within a unit, in the plan's order: sender and receiver
        walk the same lists, so their offsets agree."""
        local: list = []
        out: dict[int, list] = {}
        inc: dict[int, list] = {}
        for layer, t, a, b in units:
            plan = plans[layer]
            for r, src, dsts, _ in plan.local:
                if r == me:
                    local.append(((layer, t, src, a, b), [(layer, t, d, a, b) for d in dsts]))
            for h, src, r, dsts, _ in plan.remote:
                if h == me:
                    out.setdefault(r, []).append(((layer, t, src, a, b), b - a))
                elif r == me:
                    inc.setdefault(h, []).append(([(layer, t, d, a, b) for d in dsts], b - a))
        gathers, scatters = [], []
        off = 0
        for g, dsts in local:
            gathers.append((g, off))
            scatters.extend((off, d) for d in dsts)
            off += g[4] - g[3]
        sends, recvs = {}, {}
        for p in sorted(out):
            start = off
            for g, n in out[p]:
                gathers.append((g, off))
                off += n
            sends[p] = (start, off - start)
        for p in sorted(inc):
            start = off
            for dsts, n in inc[p]:
                scatters.extend((off, d) for d in dsts)
                off += n
            recvs[p] = (start, off - start)
        return off, gathers, scatters, sends, recvs


# ---- shared argument handling ----
def byte_rows(tensors: Sequence[object], slots: int, what: str) -> list[torch.Tensor]:
    """uint8 [S, row_bytes] views of one layer's weight tensors (each contiguous, [S, ...], on one device)."""
    if not isinstance(tensors, Sequence) or not tensors:
        raise StoreError(f"{what}: expected a non-empty sequence of weight tensors, got {type(tensors).__name__}")
    rows = []
    device = None
    for t, w in enumerate(tensors):
        if not isinstance(w, torch.Tensor):
            raise StoreError(f"{what}, tensor {t}: expected a torch.Tensor, got {type(w).__name__}")
        if w.dim() < 1 or w.shape[0] != slots:
            raise StoreError(
                f"{what}, tensor {t}: expected shape [S={slots}, ...] (S = num_local_physical_experts), "
                f"got {tuple(w.shape)}"
            )
        if not w.is_contiguous():
            raise StoreError(f"{what}, tensor {t}: must be contiguous, got stride {w.stride()} for {tuple(w.shape)}")
        if device is None:
            device = w.device
        elif w.device != device:
            raise StoreError(f"{what}, tensor {t}: on {w.device}, tensor 0 on {device}")
        flat = w.reshape(slots, -1)
        rows.append(flat if flat.dtype == torch.uint8 else flat.view(torch.uint8))
    return rows


def open_comm(group, device: torch.device, timeout_s: float, what: str) -> Comm:
    """The message layer over ``group`` (None: the default group); a one-rank world needs no group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return Comm(None, rank=0, world_size=1, device=device, timeout_s=timeout_s)
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError) as e:  # a group this process is not part of, a destroyed group
        raise StoreError(f"{what}: cannot read this process's rank in the group: {e}") from None
    if rank < 0:
        raise StoreError(f"{what}: this process is not a member of the given group")
    return Comm(group if world > 1 else None, rank=rank, world_size=world, device=device, timeout_s=timeout_s)


def agree(comm: Comm, live: Sequence[int], parts: Sequence[bytes], what: str) -> int:
    """Check that every live rank called with the same inputs (a digest of ``parts``), through the
    store's leader gather; returns the call id the messages of this call carry. A rank with other
    inputs makes every rank raise AgreementError naming it, before anything moves."""
    digest = hashlib.blake2b(b"\0".join(parts), digest_size=8).digest()
    # The agreement's own messages must match whatever the inputs, so they are named by the live
    # set alone (not a per-process call count: SGLang's inactive ranks skip calls).
    n = np.array(sorted(live), dtype=np.int64).tobytes()
    comm.begin(call_id(b"integration-agree", n))
    value = struct.unpack("<q", digest)[0]
    if comm.world_size > 1:
        table = comm.start_gather(live, torch.tensor([value]), kind=Kind.AGREEMENT, what=what).result()
        other = [r for r, v in zip(sorted(live), table[:, 0].tolist()) if v != value]
        if other:
            raise AgreementError(
                f"rank {comm.rank}: {what}: ranks {other} called with other indices, shapes or options than this "
                f"rank; nothing moved"
            )
    call = call_id(b"integration", digest, n)
    comm.begin(call)
    return call


def digest_parts(*arrays: np.ndarray, shapes: Sequence[Sequence[int]] = (), extra: Sequence[int] = ()) -> list[bytes]:
    """Byte strings naming a call's inputs for :func:`agree`."""
    parts = [np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in arrays]
    parts.append(np.array([x for s in shapes for x in (*s, -1)], dtype=np.int64).tobytes())
    parts.append(np.array(list(extra), dtype=np.int64).tobytes())
    return parts


__all__ += ["DEFAULT_TIMEOUT_S"]

"""Placement policy: expert-parallel load balancing (EPLB) and load measurement.

Symbols: L MoE layers; E logical experts per layer; G expert groups (group-limited routing),
E % G == 0; N nodes; R GPUs (ranks), R % N == 0; S slots per GPU; P = R * S physical slots, P >= E.
Slot p lives on GPU ``p // S`` and node ``p // (P // N)``.

:func:`rebalance_experts` has the signature and output meaning of DeepSeek's open-source
``eplb.rebalance_experts`` (an independent implementation) and adds ``previous=`` and ``tolerance=``:
keep the placement in service where the balance allows (within ``tolerance`` of the from-scratch
one), since every expert brought onto a rank is weight bytes to move; :func:`movement` counts them.
:class:`LoadCounter` measures the load on the device without host
syncs. Planning is CPU tensor arithmetic vectorized over layers (and over nodes inside a layer): the
greedy loops run once per item of one node, not per (layer, item), which keeps a DeepSeek-V3-sized
plan well under a millisecond per layer.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import PlacementError

__all__ = ["LoadCounter", "Movement", "movement", "rebalance_experts"]

# Rounds of local search per matched item after the greedy GPU matching. Each round keeps at least one
# more slot; on zipf loads at DeepSeek-V3 sizes (L = 58, E = 256, R = 32 and 64, the benchmark's inputs)
# it settled within 4 rounds, so the cap only bounds the worst case.
_SWAP_ROUNDS_PER_ITEM = 4

# Swap steps of the movement-aware repair before a layer falls back to the from-scratch contents, and
# of the descent that brings a distinct-GPU packing down to the plain packing's largest GPU load.
_REPAIR_STEPS = 64

# Re-packings of a row that still has two copies of an expert on one GPU after the distinct-GPU packing,
# each with that expert's replicas capped at the GPUs it spans (its spare replicas go to other experts).
# On Pareto loads at L = 58, E = 256, P = 288, R = 32 a third one removed no further pair.
_CAP_ROUNDS = 2


def _count(value: Any, what: str) -> int:
    """``value`` as a positive Python int; bools and non-integers are errors (no silent truncation)."""
    if isinstance(value, bool):
        raise PlacementError(f"{what} must be a positive int, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise PlacementError(f"{what} must be a positive int, got {type(value).__name__} {value!r}") from None
    if n <= 0:
        raise PlacementError(f"{what} must be a positive int, got {n}")
    return n


def _check_weight(weight: Any) -> torch.Tensor:
    """float64 CPU copy of ``weight`` [L, E] after checking it is a finite, non-negative real matrix."""
    if not isinstance(weight, torch.Tensor):
        raise PlacementError(f"weight must be a torch.Tensor [L, E] of expert loads, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise PlacementError(f"weight must be 2-D [L, E] (layers, logical experts), got shape {list(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise PlacementError(f"weight must hold real loads (a float or integer dtype), got {weight.dtype}")
    if 0 in weight.shape:
        raise PlacementError(f"weight must have at least one layer and one expert, got shape {list(weight.shape)}")
    # float64 holds every integer count below 2**53 exactly and keeps the greedy sums order-independent
    # in practice; planning runs on the CPU by design.
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        layer, expert = (int(i) for i in bad.nonzero()[0])
        raise PlacementError(
            f"weight[{layer}, {expert}] = {float(w[layer, expert])}: loads must be finite and >= 0 "
            f"(layer {layer}, logical expert {expert}; {int(bad.sum())} bad entries in all)"
        )
    return w


def _check_previous(previous: Any, L: int, E: int, P: int) -> torch.Tensor:
    """CPU int64 [L, P] copy of ``previous`` after checking shape, dtype and expert ids."""
    if not isinstance(previous, torch.Tensor):
        raise PlacementError(f"previous must be an int64 torch.Tensor [L, P] (phy2log), got {type(previous).__name__}")
    if previous.dtype != torch.int64:
        raise PlacementError(f"previous (phy2log) must be torch.int64, got {previous.dtype}")
    if tuple(previous.shape) != (L, P):
        raise PlacementError(
            f"previous (phy2log) must have shape [L, P] = [{L}, {P}] to match weight and num_replicas, "
            f"got {list(previous.shape)}"
        )
    prev = previous.detach().to("cpu")
    bad = (prev < 0) | (prev >= E)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise PlacementError(
            f"previous (phy2log) layer {layer}, slot {slot}: logical expert id {int(prev[layer, slot])} "
            f"is outside [0, {E})"
        )
    return prev.contiguous()


def _check_tolerance(tolerance: Any) -> float:
    """``tolerance`` as a float >= 0 (a real number, not a bool)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise PlacementError(f"tolerance must be a real number >= 0, got {type(tolerance).__name__} {tolerance!r}")
    t = float(tolerance)
    if not math.isfinite(t) or t < 0:
        raise PlacementError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return t


def _pack_equal(
    load: torch.Tensor,
    num_packs: int,
    key: torch.Tensor | None = None,
    num_keys: int = 0,
    keyed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy balanced packing of the n items of each row of ``load`` (float64 [B, n], n a multiple
    of num_packs) into ``num_packs`` packs of n / num_packs items: heaviest first, each to the
    lightest pack with room (longest-processing-time first with a cardinality limit).

    With ``key`` (int64 [B, n] in [0, num_keys): the expert of each replica), each item goes to the
    lightest pack with room among those holding the fewest items of its key: replicas of one expert
    land on distinct packs while there are packs with room that lack it. ``keyed`` (bool [B]) limits
    that to some rows (the others are packed as without ``key``: one loop packs both ways).

    Returns int64 [B, n] twice: the pack of each item, and its place in the pack.
    """
    B, n = load.shape
    per_pack = n // num_packs
    if num_packs == 1:
        return torch.zeros(B, n, dtype=torch.int64), torch.arange(n).expand(B, n).clone()
    if per_pack == 1:
        # One item per pack: every bijection has the same pack loads.
        return torch.arange(n).expand(B, n).clone(), torch.zeros(B, n, dtype=torch.int64)
    # numpy: the loop runs n small steps, where a torch call costs several times a numpy one.
    w = load.numpy()
    order = np.argsort(-w, axis=1, kind="stable")  # heaviest first, ties in index order
    sorted_load = np.take_along_axis(w, order, axis=1)
    base = np.arange(B) * num_packs
    pack_load = np.zeros(B * num_packs)  # flat [B, num_packs]
    free = np.zeros((B, num_packs))  # pack load, inf once full
    free_flat = free.reshape(-1)
    fill = np.zeros(B * num_packs, dtype=np.int64)
    pack_sorted = np.empty((B, n), dtype=np.int64)
    pos_sorted = np.empty((B, n), dtype=np.int64)
    if key is not None:
        sorted_key = np.take_along_axis(key.numpy(), order, axis=1)
        copies = np.zeros((B, num_keys, num_packs))
        # A copy of the key outweighs any load difference: lexicographic (copies, load) in one sum.
        heavy = 2 * w.sum(axis=1) + 1
        if keyed is not None:
            heavy = np.where(keyed.numpy(), heavy, 0.0)
        rows = np.arange(B)
    for k in range(n):
        # argmin returns the first minimum: ties go to the lowest pack, deterministically.
        if key is None:
            p = free.argmin(axis=1)
        else:
            e = sorted_key[:, k]
            p = (copies[rows, e] * heavy[:, None] + free).argmin(axis=1)
            copies[rows, e, p] += 1
        flat = base + p
        f = fill[flat]
        pack_sorted[:, k] = p
        pos_sorted[:, k] = f
        fill[flat] = f + 1
        acc = pack_load[flat] + sorted_load[:, k]
        pack_load[flat] = acc
        free_flat[flat] = np.where(f + 1 < per_pack, acc, np.inf)
    pack = np.empty_like(pack_sorted)
    pos = np.empty_like(pos_sorted)
    np.put_along_axis(pack, order, pack_sorted, axis=1)
    np.put_along_axis(pos, order, pos_sorted, axis=1)
    return torch.from_numpy(pack), torch.from_numpy(pos)


def _replicate(
    load: torch.Tensor, num_slots: int, cap: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the n experts of each row of ``load`` (float64 [B, n]) ``num_slots`` >= n replicas: one
    each, then each extra one to the expert with the highest load per replica (ties: fewest
    replicas, then lowest id, so an idle layer spreads its extra replicas instead of piling them
    on expert 0). ``cap`` (int64 [B, n] >= 1, with room for num_slots in every row): an expert at
    its cap gets no more.

    Returns slot_item int64 [B, num_slots], the expert of each replica (the first n are 0..n-1),
    and count int64 [B, n], replicas per expert.
    """
    B, n = load.shape
    rows = torch.arange(B)
    count = torch.ones(B, n, dtype=torch.int64)
    slot_item = torch.empty(B, num_slots, dtype=torch.int64)
    slot_item[:, :n] = torch.arange(n)
    too_many = torch.tensor(num_slots + 1, dtype=torch.int64)
    for k in range(n, num_slots):
        per_replica = load / count if cap is None else torch.where(count < cap, load / count, -1.0)
        top = per_replica.max(dim=1, keepdim=True).values
        e = torch.where(per_replica == top, count, too_many).argmin(dim=1)
        slot_item[:, k] = e
        count[rows, e] += 1
    return slot_item, count


def _plan(w: torch.Tensor, P: int, G: int, N: int, R: int) -> torch.Tensor:
    """phy2log int64 [L, P] for loads ``w`` float64 [L, E]; G % N == 0 (hierarchical, or G = N = 1 for global)."""
    L, E = w.shape
    group_size = E // G
    experts_per_node = E // N
    slots_per_node = P // N

    # 1. Whole groups to nodes, balancing node load. "meta" numbers the experts so
    # that node n holds meta ids [n * E/N, (n + 1) * E/N), group by group.
    if N == 1:
        log_of_meta = torch.arange(E).expand(L, E)
    else:
        group_load = w.view(L, G, group_size).sum(dim=2)
        node, pos = _pack_equal(group_load, N)  # [L, G]
        group_start = (node * (G // N) + pos) * group_size  # first meta id of each group
        meta_of_log = group_start.repeat_interleave(group_size, dim=1) + torch.arange(E) % group_size
        log_of_meta = torch.empty_like(meta_of_log).scatter_(1, meta_of_log, torch.arange(E).expand(L, E))

    # 2. Inside each node, replicate its experts to fill its slots; (layer, node) pairs are independent rows.
    node_load = w.gather(1, log_of_meta).reshape(L * N, experts_per_node)
    slot_item, count = _replicate(node_load, slots_per_node)  # local meta ids

    # 3. Pack the node's replicas onto its GPUs, S each, balancing GPU load; a
    # replica carries an equal share of its expert's load.
    # One loop packs each row twice: as the published recipe does (its largest GPU load is the bound
    # below), and keeping replicas apart (the first candidate of _pack_distinct).
    B = L * N
    keyed = torch.arange(2 * B) >= B
    both = _packed(node_load.repeat(2, 1), slot_item.repeat(2, 1), count.repeat(2, 1), R // N, keyed)
    rows, distinct = both.part(slice(0, B)), both.part(slice(B, 2 * B))
    # The layer's largest GPU load, whichever node it is on, bounds every later change: balancedness
    # is the layer's max over its mean, so a node below it has room to spare.
    limit = rows.load.view(L, R).max(dim=1).values.repeat_interleave(N)

    # 4. Second copies of an expert on one GPU go to GPUs without one, where that costs no balance.
    _spread_replicas(rows, limit)
    _pack_distinct(rows, distinct, node_load, count, limit)
    meta = rows.x.view(L, N, slots_per_node) + (torch.arange(N) * experts_per_node).view(1, N, 1)
    return log_of_meta.gather(1, meta.view(L, P))


def _packed(
    node_load: torch.Tensor, slot_item: torch.Tensor, count: torch.Tensor, g: int, keyed: torch.Tensor | None = None
) -> _Rows:
    """The replicas ``slot_item`` (int64 [B, n], expert ids < ``node_load``'s [B, K] width, ``count``
    replicas each) packed onto g GPUs per row by :func:`_pack_equal`, keyed by expert in the rows
    ``keyed`` (bool [B]; None: none)."""
    B, n = slot_item.shape
    K = node_load.shape[1]
    replica_load = (node_load / count).gather(1, slot_item)
    key = None if keyed is None else slot_item
    gpu, pos = _pack_equal(replica_load, g, key, K, keyed)
    dest = gpu * (n // g) + pos
    x = torch.empty_like(slot_item).scatter_(1, dest, slot_item)
    a = torch.empty_like(replica_load).scatter_(1, dest, replica_load)
    return _Rows(x.view(B, g, n // g), a.view(B, g, n // g), K)


def _pack_distinct(
    rows: _Rows, distinct: _Rows, node_load: torch.Tensor, count: torch.Tensor, limit: torch.Tensor
) -> None:
    """Give the rows of ``rows`` that still hold two copies of an expert on one GPU a placement with
    fewer such pairs whose largest GPU load stays <= ``limit`` (float64 [B]), where one is found.

    Candidates, each tried on the rows still holding pairs: ``distinct``, the same replicas (``count``
    per expert of ``node_load`` [B, K]) packed by the distinct-GPU packing (:func:`_pack_equal` keyed
    by expert), then up to ``_CAP_ROUNDS`` times the same with the
    replicas of each expert that still shares a GPU capped at the GPUs it spans (the spare replicas
    go to other experts by the usual rule). Each candidate's most loaded GPU is lowered by swaps that
    keep replicas apart (:func:`_lower_max`) down to ``limit``, then :func:`_spread_replicas` runs;
    a row takes it if it ends within ``limit`` with fewer pairs.
    """
    _, g, S = rows.x.shape
    pairs = rows.pairs()
    cap = count.clone()
    for round_ in range(1 + _CAP_ROUNDS):
        idx = (pairs > 0).nonzero().view(-1)
        if idx.numel() == 0:
            return
        if round_ == 0:
            cand = distinct.part(idx)
        else:
            # An expert with extra copies on shared GPUs keeps one replica per GPU it spans.
            has = rows.has[idx]
            spans = (has > 0).sum(dim=1)
            shared = (has.sum(dim=1) > spans) & ~rows.many[idx]
            cap[idx] = torch.where(shared, torch.minimum(cap[idx], spans), cap[idx])
            items, counts = _replicate(node_load[idx], g * S, cap[idx])
            cand = _packed(node_load[idx], items, counts, g, torch.ones(idx.numel(), dtype=torch.bool))
        _lower_max(cand, limit[idx])
        _spread_replicas(cand, limit[idx])
        better = (cand.load.max(dim=1).values <= limit[idx]) & (cand.pairs() < pairs[idx])
        rows.take(idx[better], cand, better)
        pairs[idx[better]] = cand.pairs()[better]


def _slot_shares(w: torch.Tensor, phy2log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [L, P], the load each slot of ``phy2log`` [L, P] serves (an equal share of its
    expert's load ``w`` [L, E]), and int64 [L, E], replicas per expert."""
    count = torch.zeros(w.shape, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    return (w / count.clamp(min=1)).gather(1, phy2log), count


class _Rows:
    """A placement as B independent rows of g GPUs of S slots, and swaps of slots inside a row.

    A row is a layer, or one node of a layer under the hierarchical policy (slots never leave their
    row, so groups stay on their node). x int64 [B, g, S]: expert per slot; a float64 [B, g, S]:
    its load; load float64 [B, g]: per GPU; has int64 [B, g, E]: copies of each expert per GPU;
    many bool [B, E]: experts with more replicas than the row has GPUs (they must share one).
    """

    def __init__(self, x: torch.Tensor, a: torch.Tensor, E: int) -> None:
        B, g, _ = x.shape
        self.x, self.a = x.clone(), a.clone()
        self.load = self.a.sum(dim=2)
        self.has = torch.zeros(B, g, E, dtype=torch.int64).scatter_add_(2, self.x, torch.ones_like(self.x))
        self.many = self.has.sum(dim=1) > g

    def pairs(self) -> torch.Tensor:
        """int64 [B]: extra copies of experts sharing a GPU, not counting experts in ``many``."""
        extra = (self.has - 1).clamp(min=0).sum(dim=1)  # [B, E]
        return torch.where(self.many, 0, extra).sum(dim=1)

    def part(self, r: torch.Tensor | slice) -> _Rows:
        """A copy of rows ``r``."""
        out = _Rows.__new__(_Rows)
        for name in ("x", "a", "load", "has", "many"):
            setattr(out, name, getattr(self, name)[r].clone())
        return out

    def take(self, r: torch.Tensor, other: _Rows, sel: torch.Tensor) -> None:
        """Rows ``r`` become the rows ``sel`` (bool over other's rows) of ``other``."""
        for name in ("x", "a", "load", "has", "many"):
            getattr(self, name)[r] = getattr(other, name)[sel]

    def swaps(self, idx: torch.Tensor, h: torch.Tensor, i: torch.Tensor | None = None) -> torch.Tensor:
        """pm float64 [Li, S(i), g(c), S(j)] for rows ``idx`` [Li]: the larger of the loads of GPUs h
        (``h`` [Li]) and c after swapping h's slot i with c's slot j; inf where the swap would put a
        second copy of an expert on a GPU (unless it has more replicas than GPUs), or moves no load.
        With ``i`` [Li], only that slot of h moves: pm is [Li, 1, g, S]."""
        _, g, S = self.x.shape
        Li = idx.numel()
        r = idx.view(Li, 1)
        x, a, load = self.x[idx], self.a[idx], self.load[idx]
        slots = torch.arange(S).expand(Li, S) if i is None else i.view(Li, 1)
        xh, ah = self.x[r, h.view(Li, 1), slots], self.a[r, h.view(Li, 1), slots]  # [Li, k]
        k = xh.shape[1]
        lh = load.gather(1, h.view(Li, 1))
        d = ah.view(Li, k, 1, 1) - a.view(Li, 1, g, S)  # load moving from h to c
        pm = torch.maximum(lh.view(Li, 1, 1, 1) - d, load.view(Li, 1, g, 1) + d)
        # c may take h's expert only if it holds none (or the expert has more replicas than GPUs),
        # and h may take c's expert likewise.
        c_has_i = self.has[r.view(Li, 1, 1), torch.arange(g).view(1, 1, g), xh.view(Li, k, 1)]  # [Li, k, g]
        ok_i = (c_has_i == 0) | self.many[r, xh].view(Li, k, 1)
        h_has_j = self.has[r.view(Li, 1, 1), h.view(Li, 1, 1), x]  # [Li, g, S]
        ok_j = (h_has_j == 0) | self.many[r.view(Li, 1, 1), x]
        ok = ok_i.unsqueeze(3) & ok_j.unsqueeze(1) & (d != 0)
        ok &= (torch.arange(g) != h.view(Li, 1)).view(Li, 1, g, 1)
        return torch.where(ok, pm, torch.inf)

    def apply(self, r: torch.Tensor, h: torch.Tensor, flat: torch.Tensor) -> None:
        """In rows ``r`` (distinct), swap slot i of GPU h with slot j of GPU c, flat = (i * g + c) * S + j."""
        _, g, S = self.x.shape
        i, c, j = flat // (g * S), flat // S % g, flat % S
        ei, ej = self.x[r, h, i], self.x[r, c, j]
        ai, aj = self.a[r, h, i], self.a[r, c, j]
        self.x[r, h, i], self.x[r, c, j] = ej, ei
        self.a[r, h, i], self.a[r, c, j] = aj, ai
        self.load[r, h] += aj - ai
        self.load[r, c] += ai - aj
        for gpu, out, into in ((h, ei, ej), (c, ej, ei)):
            self.has[r, gpu, out] -= 1
            self.has[r, gpu, into] += 1


def _spread_replicas(rows: _Rows, limit: torch.Tensor | None = None) -> None:
    """Move second copies of an expert off a GPU (when it has at most as many replicas as the row
    has GPUs) by swaps that keep both GPUs at or under ``limit`` (float64 [B]; default: the row's
    largest GPU load, so the balance never gets worse).

    The plain packing puts replicas of one expert on one GPU when that GPU stays the lightest, though
    a GPU holding two copies serves their tokens as one would: on Pareto loads (shape 1.5) at L = 58,
    E = 256, P = 288, R = 32 it left 116 such pairs (hierarchical) and 32 (global), and these swaps
    30 and 17 (both copies heavy on the row's busiest GPU); :func:`_pack_distinct` takes it from there.
    """
    B, g, S = rows.x.shape
    if limit is None:
        limit = rows.load.max(dim=1).values
    stuck = torch.zeros(B, g, S, dtype=torch.bool)
    for _ in range(B * g * S):  # each swap removes a duplicate and each failure marks one: a bound
        dup = (rows.has.gather(2, rows.x) > 1) & ~rows.many.gather(1, rows.x.view(B, -1)).view(B, g, S) & ~stuck
        idx = dup.view(B, -1).any(dim=1).nonzero().view(-1)
        if idx.numel() == 0:
            return
        first = dup[idx].view(idx.numel(), -1).to(torch.uint8).argmax(dim=1)
        h, i = first // S, first % S
        pm = rows.swaps(idx, h, i)  # only the duplicate slot moves, and neither GPU may exceed the limit
        best = torch.where(pm <= limit[idx].view(-1, 1, 1, 1), pm, torch.inf).view(idx.numel(), -1).min(dim=1)
        can = torch.isfinite(best.values)
        stuck[idx[~can], h[~can], i[~can]] = True
        if bool(can.any()):
            rows.apply(idx[can], h[can], best.indices[can] + i[can] * (g * S))


def _repair(
    prev: torch.Tensor, share: torch.Tensor, held: torch.Tensor, bound: torch.Tensor, N: int, R: int, rpn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap slots of ``prev`` (int64 [La, P]; ``share`` its float64 [La, P] slot loads, ``held`` its
    int64 [La, R, E] copies per GPU) until every GPU load is <= ``bound`` (float64 [La]).

    Each step takes the most loaded GPU h of a row over the bound and the swap of one of its slots
    with a slot of another GPU of the row that lowers h: among the swaps that leave both GPUs within
    the bound, the one bringing the fewest experts onto GPUs that did not hold them in ``prev``
    (an expert no rank of the GPU's node held counts 1.5: ``rpn`` ranks per node), then the most
    balanced; when none fits, the most balanced. Returns the placement and bool [La], the layers that
    got within the bound (the others are left half-repaired: the caller replaces them).
    """
    La, P = prev.shape
    E, g = held.shape[2], R // N
    B, S = La * N, P // R
    rows = _Rows(prev.view(B, g, S), share.view(B, g, S), E)
    bound_r = bound.repeat_interleave(N)
    held_old = held.view(B, g, E) > 0
    # Physical nodes inside a row: a hierarchical row is one node; a global row spans R / rpn nodes.
    per_node = g if N > 1 else rpn
    node_held = held_old.view(B, g // per_node, per_node, E).any(dim=2)
    node_of = torch.arange(g) // per_node

    def cost(idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        Li = idx.numel()
        xh, xc = rows.x[idx, h], rows.x[idx]
        new_i = ~held_old[idx].gather(2, xh.view(Li, 1, S).expand(Li, g, S)).transpose(1, 2)  # c lacked i
        far_i = ~node_held[idx][:, node_of].gather(2, xh.view(Li, 1, S).expand(Li, g, S)).transpose(1, 2)
        new_j = ~held_old[idx, h].gather(1, xc.view(Li, g * S)).view(Li, g, S)  # h lacked j
        far_j = ~node_held[idx, node_of[h]].gather(1, xc.view(Li, g * S)).view(Li, g, S)
        return (new_i + 0.5 * far_i).unsqueeze(3) + (new_j + 0.5 * far_j).unsqueeze(1)

    failed = _lower_max(rows, bound_r, cost)
    _spread_replicas(rows, bound_r)
    return rows.x.view(La, P), ~failed.view(La, N).any(dim=1)


def _lower_max(rows: _Rows, bound: torch.Tensor, cost=None) -> torch.Tensor:
    """Swap slots until every GPU load of a row is <= ``bound`` (float64 [B]), at most
    ``_REPAIR_STEPS`` steps; returns bool [B], the rows still over it.

    Each step takes the most loaded GPU h of a row over the bound and the swap of one of its slots
    with a slot of another GPU of the row that lowers h and puts no second copy of an expert on a
    GPU (:meth:`_Rows.swaps`): among the swaps that leave both GPUs within the bound, the one of
    least ``cost(idx, h)`` (float [Li, S, g, S], default 0), then the most balanced; when none fits,
    the most balanced. A row where no swap lowers h stops there.
    """
    B = rows.x.shape[0]
    failed = torch.zeros(B, dtype=torch.bool)
    for _ in range(_REPAIR_STEPS):
        idx = ((rows.load.max(dim=1).values > bound) & ~failed).nonzero().view(-1)
        Li = idx.numel()
        if Li == 0:
            break
        lh, h = rows.load[idx].max(dim=1)
        pm = rows.swaps(idx, h)
        pm = torch.where(pm < lh.view(Li, 1, 1, 1), pm, torch.inf)
        rel = pm / lh.view(Li, 1, 1, 1)  # < 1 for every allowed swap
        within = 0 if cost is None else 2 * cost(idx, h)
        key = torch.where(pm <= bound[idx].view(Li, 1, 1, 1), within + rel, 100 + rel)
        best = key.reshape(Li, -1).min(dim=1)
        can = torch.isfinite(best.values)
        failed[idx[~can]] = True
        if bool(can.any()):
            rows.apply(idx[can], h[can], best.indices[can])
    return failed | (rows.load.max(dim=1).values > bound)


def _keep_previous(
    w: torch.Tensor, prev: torch.Tensor, scratch: torch.Tensor, tolerance: float, G: int, N: int, R: int, rpn: int
) -> torch.Tensor:
    """phy2log int64 [L, P] close to ``prev`` whose every layer's largest GPU load under ``w`` is at
    most (1 + tolerance) times that of ``scratch`` (the from-scratch placement, int64 [L, P])."""
    L, E = w.shape
    P = prev.shape[1]
    S = P // R
    share_s, _ = _slot_shares(w, scratch)
    bound = (1 + tolerance) * share_s.view(L, R, S).sum(dim=2).max(dim=1).values
    share, count = _slot_shares(w, prev)
    held = torch.zeros(L, R, E, dtype=torch.int64).scatter_add_(
        2, prev.view(L, R, S), torch.ones(L, R, S, dtype=torch.int64)
    )
    # A layer of prev is a start only if it already has the shape of a result: every expert placed
    # and (hierarchical) whole groups per node.
    usable = (count >= 1).all(dim=1)
    if N > 1:
        on = torch.zeros(L, G, N, dtype=torch.bool)
        on[torch.arange(L).view(L, 1), prev // (E // G), torch.arange(P) // (P // N)] = True
        usable &= (on.sum(dim=2) == 1).all(dim=1) & (on.sum(dim=1) == G // N).all(dim=1)
    within = share.view(L, R, S).sum(dim=2).max(dim=1).values <= bound
    if bool((usable & within).all()):
        return prev
    out = prev.clone()
    failed = ~usable
    todo = (usable & ~within).nonzero().view(-1)
    if todo.numel():
        repaired, ok = _repair(prev[todo], share[todo], held[todo], bound[todo], N, R, rpn)
        out[todo[ok]] = repaired[ok]
        failed[todo[~ok]] = True
    if bool(failed.any()):
        f = failed.nonzero().view(-1)
        out[f] = _follow_previous(scratch[f], prev[f], E, N, R)
    return out


def _occurrence(x: torch.Tensor) -> torch.Tensor:
    """int64 [..., S]: k where ``x[..., s]`` is the k-th occurrence (from 0) of its value in its row.

    (expert, occurrence) pairs name expert copies: two GPUs share a pair once for every copy of an
    expert both hold, so equal pairs count the slots that can stay put (multiset intersection).
    """
    S = x.shape[-1]
    earlier = torch.ones(S, S, dtype=torch.bool).tril(diagonal=-1)  # [k, j]: j < k
    return ((x.unsqueeze(-1) == x.unsqueeze(-2)) & earlier).sum(dim=-1)


def _match(score: torch.Tensor) -> torch.Tensor:
    """Assignment maximizing the total score, approximately: greedy then pairwise swaps.

    score: int64 [B, n, n] >= 0, score[b, i, j] for giving new item i the old place j. Returns
    int64 [B, n], the old place of each new item (a permutation per row). The start is the better
    of the greedy assignment and the identity, and swaps only raise the total, so the result is
    never worse than not renumbering. Exact Hungarian would need scipy or a Python loop per layer;
    this solves all B at once and, on 64 x 64 overlaps (R = 64 global policy, zipf load drifting
    5-30%), kept 97-98% of the slots an optimal assignment keeps.
    """
    B, n, _ = score.shape
    rows = torch.arange(B)
    if n == 1:
        return torch.zeros(B, 1, dtype=torch.int64)
    # Greedy: the best remaining (i, j) pair, n times; argmax takes the first maximum, so ties prefer
    # low i, then low j: contents that match their old GPU exactly stay there.
    avail = score.clone()
    greedy = torch.empty(B, n, dtype=torch.int64)
    for _ in range(n):
        flat = avail.view(B, n * n).argmax(dim=1)
        i, j = flat // n, flat % n
        greedy[rows, i] = j
        avail[rows, i, :] = -1
        avail[rows, :, j] = -1
    identity = torch.arange(n).expand(B, n)
    g_total = score.gather(2, greedy.unsqueeze(2)).sum(dim=(1, 2))
    i_total = score.diagonal(dim1=1, dim2=2).sum(dim=1)
    perm = torch.where((g_total > i_total).unsqueeze(1), greedy, identity).clone()

    # 2-opt: swap the places of the pair (i, j) that gains most, while any gains.
    for _ in range(_SWAP_ROUNDS_PER_ITEM * n):
        cross = score.gather(2, perm.unsqueeze(1).expand(B, n, n))  # [b, i, j] = score[b, i, perm[b, j]]
        cur = cross.diagonal(dim1=1, dim2=2)
        gain = cross + cross.transpose(1, 2) - cur.unsqueeze(2) - cur.unsqueeze(1)
        best = gain.view(B, n * n).max(dim=1)
        better = (best.values > 0).nonzero().view(-1)
        if better.numel() == 0:
            break
        i, j = best.indices[better] // n, best.indices[better] % n
        perm[better, i], perm[better, j] = perm[better, j], perm[better, i]
    return perm


def _follow_previous(phy2log: torch.Tensor, previous: torch.Tensor, E: int, N: int, R: int) -> torch.Tensor:
    """Renumber ``phy2log`` [L, P] to keep as many slots of ``previous`` [L, P] as possible.

    The GPU contents (multisets of experts), hence the load balance, stay the same; only which GPU
    gets which contents and the slot order inside a GPU change. Contents move as whole nodes (so
    group-limited routing keeps its node-local groups), then as GPUs within the node pair; inside
    a GPU every expert that was already there keeps its slot.
    """
    L, P = phy2log.shape
    S = P // R
    gpn = R // N
    new, old = phy2log.view(L, R, S), previous.view(L, R, S)
    occ_new = _occurrence(new)
    # overlap[l, i, j]: slots that stay if new GPU contents i go to old GPU j (the multiset intersection):
    # the k-th copy of expert e in i can stay iff old GPU j held more than k copies of e. Gathering j's
    # counts costs L * P * R, where comparing all pairs of copies would cost L * P * P.
    old_count = torch.zeros(L, E * R, dtype=torch.int64)
    old_count.scatter_add_(1, (old * R + torch.arange(R).view(1, R, 1)).view(L, P), torch.ones(L, P, dtype=torch.int64))
    held = old_count.view(L, E, R).gather(1, new.view(L, P, 1).expand(L, P, R))  # [l, new copy, j]
    overlap = (held > occ_new.view(L, P, 1)).view(L, R, S, R).sum(dim=2)

    # Best GPU matching for every (new node, old node) pair, then nodes by those totals.
    blocks = overlap.view(L, N, gpn, N, gpn).permute(0, 1, 3, 2, 4).reshape(L * N * N, gpn, gpn)
    in_block = _match(blocks)  # [L*N*N, gpn]
    block_total = blocks.gather(2, in_block.unsqueeze(2)).sum(dim=(1, 2)).view(L, N, N)
    node_to = _match(block_total)  # [L, N]: new node -> old node
    chosen = in_block.view(L, N, N, gpn).gather(2, node_to.view(L, N, 1, 1).expand(L, N, 1, gpn)).view(L, N, gpn)
    target = (node_to.unsqueeze(2) * gpn + chosen).view(L, R)  # new GPU contents i -> GPU target[i]

    index = target.unsqueeze(2).expand(L, R, S)
    contents = torch.empty_like(new).scatter_(1, index, new)
    # Keys name expert copies uniquely within a GPU: expert * S + occurrence.
    key_old = old * S + _occurrence(old)
    keys = torch.empty_like(new).scatter_(1, index, new * S + occ_new)

    # Inside each GPU: an expert copy whose key was in the old slots keeps that slot; the rest fill the
    # freed slots in increasing slot order.
    same = keys.unsqueeze(3) == key_old.unsqueeze(2)  # [L, R, S(new item), S(old slot)]
    kept = same.any(dim=3)
    kept_slot = same.to(torch.int64).argmax(dim=3)
    free_first = same.any(dim=2).to(torch.int64).argsort(dim=2, stable=True)  # free slots, ascending, first
    nth_unkept = (~kept).to(torch.int64).cumsum(dim=2) - 1
    dest = torch.where(kept, kept_slot, free_first.gather(2, nth_unkept.clamp(min=0)))
    return torch.empty_like(contents).scatter_(2, dest, contents).view(L, P)


def _logical_tables(phy2log: torch.Tensor, E: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log2phy int64 [L, E, width] (slots in increasing order, padded with -1) and logcnt int64 [L, E]."""
    L, P = phy2log.shape
    logcnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    # Sorting by expert * P + slot lists each expert's slots together, in increasing order.
    order = (phy2log * P + torch.arange(P)).argsort(dim=1)
    expert = phy2log.gather(1, order)
    first = logcnt.cumsum(dim=1) - logcnt
    replica = torch.arange(P) - first.gather(1, expert)
    log2phy = torch.full((L, E, width), -1, dtype=torch.int64)
    log2phy[torch.arange(L).unsqueeze(1), expert, replica] = order
    return log2phy, logcnt


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    previous: torch.Tensor | None = None,
    tolerance: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place E logical experts in P physical slots on R GPUs so that GPU loads are balanced.

    When G % N == 0 the policy is hierarchical: whole expert groups go to nodes (balancing node
    load, so group-limited routing stays inside a node), each node replicates its experts to fill
    its P / N slots (each extra replica goes to the expert with the highest load per replica), and
    the node's replicas are packed onto its GPUs, S each, balancing GPU load. Otherwise the same is
    done with all experts and GPUs treated as one node.

    Args:
        weight: [L, E] measured load per logical expert, finite and >= 0 (any real dtype, any
            device; it is copied to the CPU as float64).
        num_replicas: P, a multiple of num_gpus and >= E.
        num_groups: G, E % G == 0.
        num_nodes: N, num_gpus % N == 0.
        num_gpus: R.
        previous: optional int64 [L, P], the phy2log in service. The result then moves as little as
            the balance allows: a layer of ``previous`` whose largest GPU load under ``weight`` is
            within (1 + tolerance) of the from-scratch placement's is kept as it is (when every
            layer is, ``previous`` itself is returned: nothing moves); a layer over it is repaired by
            swapping slots, each time between its most loaded GPU and another GPU of the same node
            (hierarchical) or layer (global), choosing among the swaps that get both within bound
            the one that brings the fewest experts onto GPUs that did not hold them (an expert no
            rank of the node held counts more), until the layer is within bound. Replica counts stay
            those of ``previous``; a layer that swaps cannot bring within bound (or that misses an
            expert, or splits a group over nodes under the hierarchical policy) gets the
            from-scratch contents, GPUs renumbered to keep as many slots of ``previous`` as possible.
        tolerance: float >= 0 (default 0.05): with ``previous``, every layer's max GPU load over
            mean GPU load is at most (1 + tolerance) times the from-scratch placement's; 0 asks for
            the from-scratch balance or better, larger values trade balance for fewer transfers.
            Ignored without ``previous``.

    Returns:
        phy2log: int64 [L, P], the logical expert in each slot;
        log2phy: int64 [L, E, P - E + 1], each expert's slots in increasing order, padded with -1
            (P - E + 1, the most replicas any expert can get, as in DeepSeek's EPLB: the width does
            not depend on the load, so an engine's buffer for it never changes shape);
        logcnt: int64 [L, E], replicas per expert (>= 1).

    Distinct GPUs: let g be the GPUs of a node (hierarchical) or all R (global). What is guaranteed:
    from scratch, every layer's largest GPU load is at most that of the plain packing above (the
    published recipe's), and a GPU holds two replicas of an expert with at most g replicas only if
    none of these kept them apart within that load: swaps of single slots from the plain packing,
    the distinct-GPU packing (each replica to the lightest GPU with room among those holding the
    fewest replicas of its expert) lowered by swaps, and the same after capping such an expert's
    replicas at the GPUs it spans (its spare replicas go to other experts). Zero such pairs is not
    promised at that load, since it is sometimes impossible: with more heavy replicas than GPUs, some
    GPU takes two, and when the lightest two are copies of one expert, any other two weigh more. On
    Pareto loads (shape 1.5) at L = 58, E = 256 none remained at P = 288, R = 32 (either policy) nor
    at P = 320, R = 64 global; 3 at P = 320, R = 64, 8 nodes (8 GPUs of 5 slots per node). Experts
    with more than g replicas spread as evenly as those steps make them. With ``previous``, a layer
    kept as it is keeps its contents, pairs included; swaps never put a second copy on a GPU, and a
    repaired layer's pairs move where a swap keeps both GPUs within the bound; a replaced layer
    gets the from-scratch contents.

    The result is deterministic: ties go to the lowest index everywhere. With integer loads (token
    counts, as :class:`LoadCounter` gives) the only sums over many values (group loads) are exact in
    float64, and every other sum runs in a fixed order, so every machine computes the same placement.

    Raises:
        PlacementError: on malformed arguments, naming the argument and value at fault.
    """
    w = _check_weight(weight)
    L, E = w.shape
    P = _count(num_replicas, "num_replicas")
    G = _count(num_groups, "num_groups")
    N = _count(num_nodes, "num_nodes")
    R = _count(num_gpus, "num_gpus")
    if P % R:
        raise PlacementError(
            f"num_replicas (P = {P}) must be a multiple of num_gpus (R = {R}) so that every GPU gets "
            f"the same number of slots; nearest valid: {P // R * R} or {(P // R + 1) * R}"
        )
    if P < E:
        raise PlacementError(f"num_replicas (P = {P}) must be >= the number of logical experts (E = {E})")
    if E % G:
        raise PlacementError(f"the E = {E} logical experts cannot form num_groups = {G} equal groups (E % G != 0)")
    if R % N:
        raise PlacementError(f"num_gpus (R = {R}) must be a multiple of num_nodes (N = {N}): nodes hold equal GPUs")
    prev = None if previous is None else _check_previous(previous, L, E, P)

    tol = _check_tolerance(tolerance)
    rpn = R // N  # GPUs per physical node, whichever policy applies
    if G % N:
        G, N = 1, 1  # groups cannot be split evenly over nodes: global policy
    phy2log = _plan(w, P, G, N, R)
    if prev is not None:
        phy2log = _keep_previous(w, prev, phy2log, tol, G, N, R, rpn)
    return (phy2log, *_logical_tables(phy2log, E, P - E + 1))


@dataclass(frozen=True)
class Movement:
    """What replacing one placement by another brings onto ranks, per layer (int64 [L] tensors).

    brought_in: (rank, expert) pairs the new placement has and the old did not: each is one expert's
    weights that the rank must receive (from a peer or the checkpoint). same_node / other_node: that
    split by whether some rank of the receiving rank's node held the expert in the old placement
    (None when the node size is not given). local_copies: slots whose expert changes to one the
    rank already held (a copy inside the rank, no transfer).
    """

    brought_in: torch.Tensor
    same_node: torch.Tensor | None
    other_node: torch.Tensor | None
    local_copies: torch.Tensor

    @property
    def total_brought_in(self) -> int:
        return int(self.brought_in.sum())

    @property
    def total_same_node(self) -> int | None:
        return None if self.same_node is None else int(self.same_node.sum())

    @property
    def total_other_node(self) -> int | None:
        return None if self.other_node is None else int(self.other_node.sum())

    @property
    def total_local_copies(self) -> int:
        return int(self.local_copies.sum())

    def totals(self) -> dict[str, int | None]:
        """The four totals by field name (JSON-friendly)."""
        return {
            "brought_in": self.total_brought_in,
            "same_node": self.total_same_node,
            "other_node": self.total_other_node,
            "local_copies": self.total_local_copies,
        }


def movement(
    old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_ranks: int, ranks_per_node: int | None = None
) -> Movement:
    """Per layer, the experts that replacing ``old_phy2log`` by ``new_phy2log`` (int64 [L, P], slot p
    on rank p // (P / num_ranks)) brings onto ranks, and the local copies; see :class:`Movement`.

    ``ranks_per_node`` (ranks n * k .. n * k + k - 1 form node n) splits what is brought in by
    whether it can come from inside the node. It compares placements only: which ranks are alive
    is the transfer planner's business (:mod:`expert_store.plan`).

    Raises:
        PlacementError: on tensors that are not int64 [L, P] of the same shape with ids >= 0, P not
            a multiple of num_ranks, or num_ranks not a multiple of ranks_per_node.
    """
    for name, t in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2:
            what = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise PlacementError(f"{name} must be an int64 torch.Tensor [L, P], got {what}")
        if t.numel() and int(t.min()) < 0:
            raise PlacementError(f"{name} holds a negative expert id ({int(t.min())})")
    if old_phy2log.shape != new_phy2log.shape:
        raise PlacementError(
            f"old_phy2log and new_phy2log must have the same shape [L, P], got {list(old_phy2log.shape)} "
            f"and {list(new_phy2log.shape)}"
        )
    R = _count(num_ranks, "num_ranks")
    L, P = old_phy2log.shape
    if P % R:
        raise PlacementError(f"num_ranks (R = {R}) must divide the P = {P} slots of the placements")
    rpn = None if ranks_per_node is None else _count(ranks_per_node, "ranks_per_node")
    if rpn is not None and R % rpn:
        raise PlacementError(f"ranks_per_node ({rpn}) must divide num_ranks (R = {R})")
    old, new = old_phy2log.detach().cpu(), new_phy2log.detach().cpu()
    E = int(max(old.max(), new.max())) + 1 if L * P else 1
    S = P // R

    def held(phy2log: torch.Tensor) -> torch.Tensor:
        return torch.zeros(L, R, E, dtype=torch.bool).scatter_(2, phy2log.view(L, R, S), True)

    held_old, held_new = held(old), held(new)
    arrived = held_new & ~held_old  # [L, R, E]
    brought = arrived.sum(dim=(1, 2))
    same = other = None
    if rpn is not None:
        node_old = held_old.view(L, R // rpn, rpn, E).any(dim=2)  # [L, nodes, E]
        near = arrived & node_old.repeat_interleave(rpn, dim=1)
        same = near.sum(dim=(1, 2))
        other = brought - same
    rank_of_slot = (torch.arange(P) // S).expand(L, P)
    had = held_old.view(L, R * E).gather(1, rank_of_slot * E + new)
    local = ((old != new) & had).sum(dim=1)
    return Movement(brought, same, other, local)


class LoadCounter:
    """Tokens routed to each (layer, logical expert), summed over a sliding window of steps.

    A step is one forward pass: :meth:`record` adds routed ids on the device with a scatter-add
    (no host sync: bincount would read the largest id back), :meth:`step` closes the step (it keeps
    the ring position on the host: call it outside captured CUDA graphs), and :meth:`load` sums the
    last ``window`` closed steps. Memory: a ring int32 [window, L, E] (59 MB at L = 58, E = 256 and
    the default window) plus two int64 [L, E] (open step, window sum). int32 suffices per step: it
    routes each token to an expert at most once per layer, and no forward pass has 2**31 tokens.

    Args:
        num_layers: L.
        num_experts: E.
        window: steps kept, >= 1.
        device: where counts live (the device of the ids passed to :meth:`record`).
    """

    def __init__(
        self, *, num_layers: int, num_experts: int, window: int = 1000, device: torch.device | str = "cpu"
    ) -> None:
        self.num_layers = _count(num_layers, "num_layers")
        self.num_experts = _count(num_experts, "num_experts")
        self.window = _count(window, "window")
        self.device = torch.device(device)
        L, E = self.num_layers, self.num_experts
        self._ring = torch.empty(self.window, L, E, dtype=torch.int32, device=self.device)
        self._current = torch.empty(L, E, dtype=torch.int64, device=self.device)
        self._total = torch.empty(L, E, dtype=torch.int64, device=self.device)
        self.reset()

    @property
    def num_steps(self) -> int:
        """Closed steps that :meth:`load` currently sums (at most ``window``)."""
        return self._filled

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the routed experts of one layer for the current step.

        Args:
            layer: in [0, L).
            topk_ids: integer [tokens, k] (any integer dtype; any shape is flattened) of logical
                expert ids in [0, E), on the counter's device. Ids are not range-checked (that would
                need a host sync): an out-of-range id fails inside scatter_add_.
        """
        try:
            index = -1 if isinstance(layer, bool) else operator.index(layer)
        except TypeError:
            index = -1
        if not 0 <= index < self.num_layers:
            raise PlacementError(f"LoadCounter.record: layer {layer!r} is outside [0, {self.num_layers})")
        if not isinstance(topk_ids, torch.Tensor):
            raise PlacementError(f"LoadCounter.record (layer {layer}): topk_ids must be a tensor, got {type(topk_ids)}")
        if topk_ids.dtype.is_floating_point or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
            raise PlacementError(f"LoadCounter.record (layer {layer}): topk_ids must be integer, got {topk_ids.dtype}")
        if topk_ids.device != self.device:
            raise PlacementError(
                f"LoadCounter.record (layer {layer}): topk_ids is on {topk_ids.device}, the counter on {self.device}"
            )
        ids = topk_ids.reshape(-1).to(torch.int64)  # scatter_add_ indexes with int64; widening is exact
        self._current[index].scatter_add_(0, ids, torch.ones_like(ids))

    def step(self) -> None:
        """Close the current step: it enters the window, and the oldest step leaves once the window is full."""
        row = self._ring[self._next]
        if self._filled == self.window:
            self._total -= row
        else:
            self._filled += 1
        self._total += self._current
        row.copy_(self._current)
        self._current.zero_()
        self._next = (self._next + 1) % self.window

    def load(self) -> torch.Tensor:
        """float64 [L, E] on the counter's device: tokens per (layer, expert) over the window's closed steps.

        float64 keeps sums exact up to 2**53 (float32 would round past 2**24 tokens, seconds of serving).
        """
        return self._total.to(torch.float64)

    def reset(self) -> None:
        """Forget every step, closed or open."""
        self._ring.zero_()
        self._current.zero_()
        self._total.zero_()
        self._next = 0  # ring row the next closed step goes to
        self._filled = 0  # closed steps in the ring (<= window)

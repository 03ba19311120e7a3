"""Placement: validation, the derived views (log2phy, logcnt), identity and servability.

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from expert_store.errors import PlacementError, StoreError
from expert_store.placement import Placement


def random_phy2log(seed: int, *, L: int, E: int, R: int, S: int) -> torch.Tensor:
    """int64 [L, P]: every expert once, the P - E extra slots random, then shuffled per layer."""
    g = torch.Generator().manual_seed(seed)
    P = R * S
    rows = []
    for _ in range(L):
        row = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
        rows.append(row[torch.randperm(P, generator=g)])
    return torch.stack(rows).to(torch.int64)


def brute_force(phy2log: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log2phy and logcnt by plain Python loops (the oracle)."""
    L, P = phy2log.shape
    slots = [[[] for _ in range(E)] for _ in range(L)]
    for layer in range(L):
        for p in range(P):
            slots[layer][int(phy2log[layer, p])].append(p)
    max_rep = max(len(s) for row in slots for s in row)
    log2phy = torch.full((L, E, max_rep), -1, dtype=torch.int64)
    logcnt = torch.zeros((L, E), dtype=torch.int64)
    for layer in range(L):
        for e in range(E):
            logcnt[layer, e] = len(slots[layer][e])
            for i, p in enumerate(slots[layer][e]):
                log2phy[layer, e, i] = p
    return log2phy, logcnt


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("phy2log", "kwargs", "needle"),
    [
        (torch.zeros((1, 4), dtype=torch.int32), {}, "torch.int64, got torch.int32"),
        (torch.zeros((1, 4), dtype=torch.float32), {}, "torch.int64, got torch.float32"),
        (torch.zeros((1, 4), dtype=torch.bool), {}, "torch.int64, got torch.bool"),
        (np.zeros((1, 4), dtype=np.float64), {}, "must hold integers"),
        (np.zeros((1, 4), dtype=np.bool_), {}, "must hold integers"),
        ([[0.0, 1.0, 0.0, 1.0]], {}, "must hold ints"),
        ([[0, 1], [0]], {}, "rectangular"),
        ("0101", {}, "got str"),
        (torch.tensor([0, 1, 0, 1]), {}, "2-D"),
        (torch.zeros((1, 2, 2), dtype=torch.int64), {}, "2-D"),
        (torch.zeros((0, 4), dtype=torch.int64), {}, "no layers"),
        (torch.tensor([[0, 1, 0]]), {}, "not a positive multiple of R = 2"),
        (torch.tensor([[0, 1, 0, 1]]), {"num_experts": 5}, "fewer than the E = 5"),
        (torch.tensor([[0, 1, 0, 1]]), {"num_ranks": 0}, "num_ranks must be a positive int"),
        (torch.tensor([[0, 1, 0, 1]]), {"num_experts": True}, "num_experts must be a positive int"),
    ],
)
def test_rejects_malformed(phy2log, kwargs, needle):
    """Every malformed phy2log or dimension is a PlacementError that says what is wrong; no silent cast."""
    kw = {"num_ranks": 2, "num_experts": 2} | kwargs
    with pytest.raises(PlacementError, match=needle.replace("(", r"\(").replace(")", r"\)")) as ei:
        Placement(phy2log, **kw)
    assert isinstance(ei.value, StoreError)


@pytest.mark.parametrize("bad_id", [-1, 3, 1000])
def test_rejects_id_out_of_range_naming_layer_and_slot(bad_id):
    """An id outside [0, E) names its layer, slot and rank."""
    p2l = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 1]])
    p2l[1, 3] = bad_id
    with pytest.raises(PlacementError, match=rf"layer 1, slot 3 \(rank 1\): logical expert id {bad_id} "):
        Placement(p2l, num_ranks=2, num_experts=3)


def test_rejects_expert_without_slot_naming_layer_and_expert():
    """A logical expert with no slot in some layer names that layer and expert."""
    p2l = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 1, 3]])
    with pytest.raises(PlacementError, match=r"layer 2: logical expert 2 has no slot"):
        Placement(p2l, num_ranks=2, num_experts=4)


def test_accepts_numpy_and_lists_and_keeps_private_copy():
    """Lists and numpy int arrays are converted; later changes to the input or to a returned view don't leak in."""
    src = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]])
    a = Placement(src, num_ranks=2, num_experts=3)
    b = Placement(src.tolist(), num_ranks=2, num_experts=3)
    c = Placement(src.numpy().astype(np.int32), num_ranks=2, num_experts=3)
    d = Placement(src.numpy().astype(np.uint8), num_ranks=2, num_experts=3)
    assert a == b == c == d
    src[0, 0] = 2
    a.phy2log[0, 1] = 2
    a.log2phy[0, 0, 0] = 3
    a.logcnt[0, 0] = 9
    assert torch.equal(a.phy2log, torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]]))
    assert a == b
    assert a.phy2log.dtype == torch.int64 and a.phy2log.is_contiguous()


def test_accepts_non_contiguous_tensor():
    """A strided view is copied into a contiguous private tensor."""
    base = torch.tensor([[0, 9, 1, 9, 0, 9, 1, 9]])
    p = Placement(base[:, ::2], num_ranks=2, num_experts=2)
    assert torch.equal(p.phy2log, torch.tensor([[0, 1, 0, 1]]))
    assert p.phy2log.is_contiguous()


# --------------------------------------------------------------------------- derived views


@pytest.mark.parametrize(
    ("seed", "L", "E", "R", "S"),
    [(0, 1, 1, 1, 1), (1, 3, 4, 2, 2), (2, 4, 6, 4, 3), (3, 2, 16, 8, 5), (4, 5, 7, 3, 7), (5, 2, 8, 8, 1)],
)
def test_views_match_brute_force(seed, L, E, R, S):
    """log2phy (slots increasing, -1 padded) and logcnt equal a Python-loop oracle on random placements."""
    p2l = random_phy2log(seed, L=L, E=E, R=R, S=S)
    p = Placement(p2l, num_ranks=R, num_experts=E)
    log2phy, logcnt = brute_force(p2l, E)
    assert torch.equal(p.phy2log, p2l)
    assert torch.equal(p.log2phy, log2phy)
    assert torch.equal(p.logcnt, logcnt)
    assert p.log2phy.dtype == p.logcnt.dtype == torch.int64
    assert (p.num_layers, p.num_experts, p.num_ranks, p.slots_per_rank, p.num_physical) == (L, E, R, S, R * S)
    assert p.max_replicas == int(logcnt.max())
    for layer in range(L):
        for e in range(E):
            slots = [q for q in range(R * S) if int(p2l[layer, q]) == e]
            assert p.slots(layer, e) == slots
            assert p.holders(layer, e) == sorted({q // S for q in slots})


def test_rank_queries():
    """rank_of_slot is p // S; rank_experts is the rank's [L, S] block of phy2log; bad ids raise."""
    p2l = random_phy2log(7, L=3, E=5, R=3, S=2)
    p = Placement(p2l, num_ranks=3, num_experts=5)
    assert [p.rank_of_slot(q) for q in range(6)] == [0, 0, 1, 1, 2, 2]
    for r in range(3):
        got = p.rank_experts(r)
        assert got.shape == (3, 2) and got.dtype == torch.int64
        assert torch.equal(got, p2l[:, 2 * r : 2 * r + 2])
    with pytest.raises(PlacementError, match="slot 6 is outside"):
        p.rank_of_slot(6)
    with pytest.raises(PlacementError, match="rank -1 is outside"):
        p.rank_experts(-1)
    with pytest.raises(PlacementError, match="layer 3 is outside"):
        p.holders(3, 0)
    with pytest.raises(PlacementError, match="logical expert 5 is outside"):
        p.holders(0, 5)


# --------------------------------------------------------------------------- contiguous


def test_contiguous_layout():
    """contiguous(): slot p holds p % E in every layer; P > E adds copies of experts 0 .. P-E-1."""
    p = Placement.contiguous(num_layers=2, num_experts=5, num_ranks=4, slots_per_rank=2)
    assert torch.equal(p.phy2log, torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]] * 2))
    assert torch.equal(p.logcnt, torch.tensor([[2, 2, 2, 1, 1]] * 2))
    assert p.slots(1, 0) == [0, 5]
    assert p.holders(1, 0) == [0, 2]
    exact = Placement.contiguous(num_layers=1, num_experts=6, num_ranks=3, slots_per_rank=2)
    assert torch.equal(exact.logcnt, torch.ones((1, 6), dtype=torch.int64))
    assert exact.max_replicas == 1


def test_contiguous_needs_enough_slots():
    """contiguous() with R * S < E is a PlacementError quoting the numbers."""
    with pytest.raises(PlacementError, match=r"R=2 \* S=2 = 4 < E=5"):
        Placement.contiguous(num_layers=1, num_experts=5, num_ranks=2, slots_per_rank=2)
    with pytest.raises(PlacementError, match="num_layers must be a positive int"):
        Placement.contiguous(num_layers=0, num_experts=5, num_ranks=2, slots_per_rank=4)


# --------------------------------------------------------------------------- identity


def test_equality_hash_and_digest():
    """Equal dims + phy2log -> equal, same hash and digest; another R or phy2log -> different."""
    p2l = random_phy2log(3, L=2, E=4, R=2, S=4)
    a = Placement(p2l, num_ranks=2, num_experts=4)
    b = Placement(p2l.clone(), num_ranks=2, num_experts=4)
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert len({a, b}) == 1
    other_r = Placement(p2l, num_ranks=4, num_experts=4)
    assert a != other_r and a.digest() != other_r.digest()
    changed = p2l.clone()
    changed[1, 0], changed[1, 1] = p2l[1, 1], p2l[1, 0]
    c = Placement(changed, num_ranks=2, num_experts=4)
    assert (a == c) == torch.equal(changed, p2l)
    assert a != "not a placement"
    assert "L=2, E=4, R=2, S=4" in repr(a)


def test_digest_is_pinned():
    """digest() is sha256 over fixed little-endian bytes: this value must be the same on every machine.

    If the digest definition changes on purpose, update the hex string here.
    """
    p = Placement.contiguous(num_layers=3, num_experts=8, num_ranks=4, slots_per_rank=3)
    assert p.digest().hex() == "2415aba814f3be633e7a7707231087be4fb00e1aa22309c78e6de6acd5a61b64"
    # The definition, spelled out independently: tag, dims as <i8, phy2log as <i8 row-major.
    row = [p % 8 for p in range(12)]
    raw = b"".join(struct.pack("<q", v) for v in row * 3)
    want = hashlib.sha256(b"expert-store/placement/v1\0" + struct.pack("<4q", 3, 8, 4, 3) + raw).digest()
    assert p.digest() == want


# --------------------------------------------------------------------------- servability


def test_check_servable():
    """Servable iff every (layer, expert) keeps a slot on a live rank; the error names layer, expert, holders."""
    # R=3, S=2, E=4: layer 0 = [0 1 | 2 3 | 0 1]; layer 1 = [0 1 | 2 3 | 2 3]
    p = Placement(torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]]), num_ranks=3, num_experts=4)
    p.check_servable(torch.ones(3, dtype=torch.bool))
    p.check_servable([True, True, True])
    with pytest.raises(PlacementError, match=r"layer 1: logical expert 0 has no slot on a live rank \(held only by"):
        p.check_servable(torch.tensor([False, True, True]))
    p.check_servable(torch.tensor([True, True, False]))  # rank 2 only held copies
    with pytest.raises(PlacementError, match=r"layer 0: logical expert 2 has no slot on a live rank"):
        p.check_servable(torch.tensor([True, False, True]))
    with pytest.raises(PlacementError, match="layer 0: logical expert 0"):
        p.check_servable(torch.zeros(3, dtype=torch.bool))


def test_check_servable_rejects_bad_alive():
    """alive must be bool [R]: another dtype or length is an error, not a cast."""
    p = Placement.contiguous(num_layers=1, num_experts=2, num_ranks=2, slots_per_rank=1)
    with pytest.raises(PlacementError, match=r"torch\.bool"):
        p.check_servable(torch.ones(2, dtype=torch.int64))
    with pytest.raises(PlacementError, match=r"shape \[R\] = \[2\]"):
        p.check_servable(torch.ones(3, dtype=torch.bool))
    with pytest.raises(PlacementError, match="must hold bools"):
        p.check_servable([1, 1])

"""Pure planning: accounting, sources, and in-place safety of the round schedule.

The schedule is checked by simulating it on expert ids: in each round every
rank first packs (parks, then the records of its moves, reading slots or parks),
then unpacks; disk reads and post copies follow. Any slot overwritten before its
old content was packed ends up with the wrong expert id.
"""

from __future__ import annotations

import pytest
import torch
from store_util import expected_accounting, random_placement

import expert_store as es
from expert_store.plan import plan_rebalance, schedule_rounds

RB = 100  # record bytes in these tests (only ratios to the budget matter)


def _simulate(old, new, plan, rounds, *, old_alive, alive, cap):
    R, S, L = new.num_ranks, new.slots_per_rank, new.num_layers
    valid = plan.holders_valid
    slots = {}
    for r in range(R):
        for layer in range(L):
            for s in range(S):
                slots[(r, layer, s)] = int(old.phy2log[layer, r * S + s]) if (alive[r] and old_alive[r]) else -1
    # live[t][rank]: park records held by rank in round t, from the round that parks one to the
    # last round reading it (a park id may be reused afterwards)
    live = [dict() for _ in rounds]
    opened: dict[tuple[int, int], int] = {}
    last_read: dict[tuple[int, int], int] = {}

    def close(key):
        if key in opened:
            for t in range(opened[key], last_read.get(key, opened[key]) + 1):
                live[t][key[0]] = live[t].get(key[0], 0) + 1

    for t, rnd in enumerate(rounds):
        for p in rnd.parks:
            close((p.rank, p.park))
            opened[(p.rank, p.park)] = t
            last_read.pop((p.rank, p.park), None)
        for m in rnd.moves:
            if m.src_park >= 0:
                last_read[(m.src_rank, m.src_park)] = t
    for key in list(opened):
        close(key)
    parks: dict[tuple[int, int], int] = {}
    for t, rnd in enumerate(rounds):
        used = {}
        for p in rnd.parks:
            parks[(p.rank, p.park)] = slots[(p.rank, p.layer, p.slot)]
        held = live[t]
        packed = []
        for m in rnd.moves:
            src = parks[(m.src_rank, m.src_park)] if m.src_park >= 0 else slots[(m.src_rank, m.layer, m.src_slot)]
            assert valid[m.src_rank] and alive[m.dst_rank], m
            packed.append((m, src))
            used[m.src_rank] = used.get(m.src_rank, 0) + 1
            if not m.is_local:
                used[m.dst_rank] = used.get(m.dst_rank, 0) + 1
        for rank, n in used.items():
            assert n + held.get(rank, 0) <= cap, (rank, n, held)
        for m, src in packed:
            assert src == m.expert, f"move {m} packed expert {src}: its source was overwritten too early"
            slots[(m.dst_rank, m.layer, m.dst_slot)] = src
    for d in plan.disk_reads:
        slots[(d.rank, d.layer, d.slot)] = d.expert
    for x in plan.relays:  # after the reads: sent on from the slot the reader filled
        assert slots[(x.src_rank, x.layer, x.src_slot)] == x.expert, x
        slots[(x.dst_rank, x.layer, x.dst_slot)] = x.expert
    for c in plan.post_copies:
        assert slots[(c.rank, c.layer, c.src_slot)] == c.expert, c
        slots[(c.rank, c.layer, c.dst_slot)] = c.expert
    for r in range(R):
        if not alive[r]:
            continue
        for layer in range(L):
            for s in range(S):
                assert slots[(r, layer, s)] == int(new.phy2log[layer, r * S + s]), (r, layer, s)


CASES = [
    # (R, S, E, dead, fresh, ranks_per_node, cap in records)
    (1, 9, 6, None, (), None, 2),
    (2, 6, 8, None, (), None, 3),
    (3, 5, 8, 2, (), None, 2),
    (4, 4, 8, None, (1,), 2, 4),
    (4, 6, 12, 0, (2,), 2, 3),
    (5, 3, 10, None, (), None, 64),
]


@pytest.mark.parametrize("R,S,E,dead,fresh,rpn,cap", CASES)
@pytest.mark.parametrize("seed", range(6))
def test_schedule_is_in_place_safe_and_accounting_exact(R, S, E, dead, fresh, rpn, cap, seed):
    """Simulated on expert ids, the schedule leaves every live slot with its new expert, never reads a
    slot after it was overwritten, keeps each rank within the per-round budget, and the plan's
    accounting equals the contract's (computed independently)."""
    gen = torch.Generator().manual_seed(seed * 100 + R)
    L = 2
    old = random_placement(gen, L=L, E=E, R=R, S=S)
    alive = [r != dead for r in range(R)]
    while True:
        new = random_placement(gen, L=L, E=E, R=R, S=S)
        try:
            new.check_servable(torch.tensor(alive))
            break
        except es.PlacementError:
            continue
    old_alive = [True] * R
    plan = plan_rebalance(old, new, expert_bytes=7, old_alive=old_alive, alive=alive, fresh=fresh, ranks_per_node=rpn)
    for r in range(R):
        if not alive[r]:
            assert r not in plan.accounts
            continue
        a = plan.accounts[r]
        want = expected_accounting(old, new, rank=r, expert_bytes=7, old_alive=old_alive, alive=alive, fresh=fresh)
        assert (a.bytes_p2p, a.bytes_local, a.bytes_disk, a.missing) == want
    rounds = schedule_rounds(plan, record_bytes=RB, budget_bytes=cap * RB)
    assert sum(len(x.moves) for x in rounds) == len(plan.moves)
    _simulate(old, new, plan, rounds, old_alive=old_alive, alive=alive, cap=cap)


def test_schedule_tight_budgets_many_ranks():
    """Tight budgets (2-3 records per rank and round) on 6-8 ranks: long chains and cycles across
    ranks, parks included, stay in-place safe and within budget (60 random cases)."""
    parked = 0
    for seed in range(60):
        gen = torch.Generator().manual_seed(1000 + seed)
        R, S = (6, 5) if seed % 2 else (8, 3)
        E, L, cap = R * S - 4, 3, 2 + seed % 2
        old = random_placement(gen, L=L, E=E, R=R, S=S)
        new = random_placement(gen, L=L, E=E, R=R, S=S)
        plan = plan_rebalance(old, new, expert_bytes=1)
        rounds = schedule_rounds(plan, record_bytes=RB, budget_bytes=cap * RB)
        assert sorted(m for r in rounds for m in [(x.layer, x.dst_rank, x.dst_slot) for x in r.moves]) == sorted(
            (m.layer, m.dst_rank, m.dst_slot) for m in plan.moves
        )
        _simulate(old, new, plan, rounds, old_alive=[True] * R, alive=[True] * R, cap=cap)
        parked += sum(len(r.parks) for r in rounds)
    assert parked > 0  # the cases do exercise parking


def test_rotation_across_ranks_is_parked():
    """Every expert of 4 ranks shifts one slot over (one cycle through every slot of every rank):
    with 2 records per rank and round it completes through parks, in place safely."""
    R, S = 4, 3
    old = es.Placement(torch.arange(R * S).view(1, R * S), num_ranks=R, num_experts=R * S)
    new = es.Placement(torch.roll(torch.arange(R * S), 1).view(1, R * S), num_ranks=R, num_experts=R * S)
    plan = plan_rebalance(old, new, expert_bytes=1)
    rounds = schedule_rounds(plan, record_bytes=RB, budget_bytes=2 * RB)
    assert sum(len(r.parks) for r in rounds) >= 1
    _simulate(old, new, plan, rounds, old_alive=[True] * R, alive=[True] * R, cap=2)


def test_chunks_merge_to_the_whole_plan(monkeypatch):
    """Planned layer chunk by layer chunk (as large rebalances are), the merged plan has exactly
    the moves, reads, copies and accounting of the whole plan, and each chunk's rounds are in
    place safe within the per-chunk budget (half the staging)."""
    from expert_store import plan as plan_module

    monkeypatch.setattr(plan_module, "CHUNK_MIN_SLOTS", 0)
    gen = torch.Generator().manual_seed(77)
    R, S, E, L = 4, 5, 12, 9
    old = random_placement(gen, L=L, E=E, R=R, S=S)
    new = random_placement(gen, L=L, E=E, R=R, S=S)
    alive, fresh = [True, True, True, True], (2,)
    whole = plan_rebalance(old, new, expert_bytes=7, alive=alive, fresh=fresh, ranks_per_node=2, relay_missing=True)
    chunks = list(
        plan_module.plan_chunks(
            old, new, expert_bytes=7, record_bytes=RB, staging_bytes=12 * RB, round_bytes=1 << 30,
            alive=alive, fresh=fresh, ranks_per_node=2,
        )
    )  # fmt: skip
    assert [len(c) for c in plan_module.layer_chunks(old, new)] == [1, 2, 4, 2]
    merged = plan_module.merge_plans([c[0] for c in chunks])
    assert merged.moves == whole.moves and merged.disk_reads == whole.disk_reads
    assert merged.post_copies == whole.post_copies and merged.changed == whole.changed
    assert merged.relays == whole.relays and whole.relays  # a missing expert read once per layer
    assert merged.accounts == whole.accounts
    for plan, rounds, staging in chunks:
        assert staging == 6 * RB
        assert sum(len(x.moves) for x in rounds) == len(plan.moves)
    rounds = [r for c in chunks for r in c[1]]
    _simulate(old, new, merged, rounds, old_alive=[True] * R, alive=alive, cap=3)


def test_permutation_cycle_larger_than_budget_is_parked():
    """A rank that rotates all its slots (one long cycle) with room for 2 records per round still
    completes: one slot is parked, the rest follow as a chain."""
    S = 8
    old = es.Placement(torch.arange(S).view(1, S), num_ranks=1, num_experts=S)
    new = es.Placement(torch.roll(torch.arange(S), 1).view(1, S), num_ranks=1, num_experts=S)
    plan = plan_rebalance(old, new, expert_bytes=1)
    rounds = schedule_rounds(plan, record_bytes=RB, budget_bytes=2 * RB)
    assert sum(len(r.parks) for r in rounds) >= 1
    _simulate(old, new, plan, rounds, old_alive=[True], alive=[True], cap=2)


def test_sources_prefer_same_node_and_spread_load():
    """With ranks_per_node, an expert held on the destination's node comes from there; sending work
    is spread over the holders of an expert."""
    # 4 ranks, 2 per node; experts 0..3 held by every rank; rank 3 is fresh and wants 0..3 twice
    R, S, E = 4, 4, 4
    old = es.Placement(torch.arange(E).repeat(R).view(1, R * S), num_ranks=R, num_experts=E)
    plan = plan_rebalance(old, old, expert_bytes=1, fresh=(3,), ranks_per_node=2)
    srcs = [m.src_rank for m in plan.moves if m.dst_rank == 3]
    assert srcs == [2, 2, 2, 2]  # rank 2 is rank 3's only live node-mate
    plan = plan_rebalance(old, old, expert_bytes=1, fresh=(3,))
    srcs = sorted(m.src_rank for m in plan.moves if m.dst_rank == 3)
    assert srcs == [0, 0, 1, 2] or len(set(srcs)) == 3  # spread over the three holders


def test_unservable_and_bad_inputs_raise():
    """A placement with an expert only on dead ranks, a dead fresh rank, or mismatched shapes raise PlacementError."""
    old = es.Placement.contiguous(num_layers=1, num_experts=4, num_ranks=2, slots_per_rank=2)
    with pytest.raises(es.PlacementError, match="expert"):
        plan_rebalance(old, old, expert_bytes=1, alive=[True, False])
    with pytest.raises(es.PlacementError, match="fresh"):
        plan_rebalance(old, old, expert_bytes=1, alive=[True, False], fresh=(1,))
    other = es.Placement.contiguous(num_layers=1, num_experts=4, num_ranks=2, slots_per_rank=3)
    with pytest.raises(es.PlacementError):
        plan_rebalance(old, other, expert_bytes=1)
    dup = es.Placement.contiguous(num_layers=1, num_experts=2, num_ranks=2, slots_per_rank=2)  # both hold 0, 1
    with pytest.raises(es.StoreError, match="two expert records"):
        schedule_rounds(plan_rebalance(dup, dup, expert_bytes=1, fresh=(1,)), record_bytes=RB, budget_bytes=RB)


def _check_rounds(plan, rounds, *, cap):
    """The round rules of :func:`schedule_rounds`, checked from the rounds alone (no simulation):
    each move once; a move reading a slot's old content runs no later than the move writing
    that slot, or reads a park of it taken no later than that write; a park id is not reused
    while moves still read it; per rank and round, records sent + received (local: once) + park
    records held stay within ``cap``."""
    flat = [(t, m) for t, rnd in enumerate(rounds) for m in rnd.moves]
    assert sorted(m._replace(src_park=-1) for _, m in flat) == sorted(plan.moves)
    write_round = {(m.dst_rank, m.layer, m.dst_slot): t for t, m in flat}
    assert len(write_round) == len(flat)  # one writer per slot
    park_at: dict[tuple[int, int], list[tuple[int, tuple[int, int, int]]]] = {}  # (rank, id) -> [(round, slot)]
    for t, rnd in enumerate(rounds):
        for p in rnd.parks:
            park_at.setdefault((p.rank, p.park), []).append((t, (p.rank, p.layer, p.slot)))
    last_read: dict[tuple[int, int, int], int] = {}  # (rank, id, round parked) -> last round reading it
    for t, m in flat:
        slot = (m.src_rank, m.layer, m.src_slot)
        if m.src_park < 0:
            assert t <= write_round.get(slot, t), f"{m} runs after its source slot is overwritten"
            continue
        taken = [(tp, s) for tp, s in park_at.get((m.src_rank, m.src_park), []) if tp <= t]
        assert taken, f"{m} reads a park not taken yet"
        tp, s = taken[-1]  # the latest park under that id before the read
        assert s == slot, f"{m} reads park {m.src_park} holding {s}"
        assert tp <= write_round.get(slot, tp), f"park of {slot} taken after the slot is overwritten"
        last_read[(m.src_rank, m.src_park, tp)] = max(t, last_read.get((m.src_rank, m.src_park, tp), t))
    held = [dict() for _ in rounds]
    for (rank, pid), takes in park_at.items():
        for k, (tp, _) in enumerate(takes):
            end = last_read.get((rank, pid, tp), tp)
            assert k + 1 == len(takes) or takes[k + 1][0] > end, f"park {pid} of rank {rank} reused while read"
            for t in range(tp, end + 1):
                held[t][rank] = held[t].get(rank, 0) + 1
    for t, rnd in enumerate(rounds):
        used = dict(held[t])
        for m in rnd.moves:
            used[m.src_rank] = used.get(m.src_rank, 0) + 1
            if not m.is_local:
                used[m.dst_rank] = used.get(m.dst_rank, 0) + 1
        assert all(v <= cap for v in used.values()), f"round {t} over budget: {used}"


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_keep_the_round_rules(seed):
    """Seeded random cases: see :func:`_random_case`."""
    _random_case(seed)


def _random_case(seed):
    """Seeded random cases (1-16 ranks, dead, returning and fresh ranks, rotations, budgets from
    exactly two records up): the accounting equals the contract's, the rounds keep the round rules
    (checked independently of the simulation), simulate to the new placement, and scheduling twice
    gives the same rounds."""
    gen = torch.Generator().manual_seed(5000 + seed)
    pick = lambda n: int(torch.randint(0, n, (1,), generator=gen))
    R = [1, 2, 3, 4, 6, 8, 16][pick(7)]
    S, L = 1 + pick(8), 1 + pick(3)
    E = max(1, R * S - pick(R * S))
    old = random_placement(gen, L=L, E=E, R=R, S=S)
    alive = [pick(6) > 0 or R == 1 for _ in range(R)]
    old_alive = [pick(6) > 0 for _ in range(R)]
    fresh = tuple(r for r in range(R) if alive[r] and pick(8) == 0)
    for _ in range(100):
        if seed % 5 == 4:  # every slot moves one over: one cycle through all ranks
            new = es.Placement(torch.roll(old.phy2log, 1 + pick(R * S), dims=1), num_ranks=R, num_experts=E)
        else:
            new = random_placement(gen, L=L, E=E, R=R, S=S)
        try:
            new.check_servable(torch.tensor(alive))
            break
        except es.PlacementError:
            alive = [True] * R
    rpn = [None, 1, 2, 4][pick(4)]
    plan = plan_rebalance(old, new, expert_bytes=7, old_alive=old_alive, alive=alive, fresh=fresh, ranks_per_node=rpn)
    for r in range(R):
        if alive[r]:
            want = expected_accounting(old, new, rank=r, expert_bytes=7, old_alive=old_alive, alive=alive, fresh=fresh)
            a = plan.accounts[r]
            assert (a.bytes_p2p, a.bytes_local, a.bytes_disk, a.missing) == want
    parked = 0
    for cap in (2, 3, 2 + pick(6), 64):
        try:
            budget = cap * RB + pick(RB)
            rounds = schedule_rounds(plan, record_bytes=RB, budget_bytes=budget)
        except es.StoreError as e:
            assert cap <= 3 and "parks" in str(e)  # parked records alone fill a 2-3 record budget
            continue
        _check_rounds(plan, rounds, cap=cap)
        _simulate(old, new, plan, rounds, old_alive=old_alive, alive=alive, cap=cap)
        assert rounds == schedule_rounds(plan, record_bytes=RB, budget_bytes=budget)
        parked += sum(len(r.parks) for r in rounds)
    return parked


def test_random_schedules_do_park():
    """The random cases above do exercise parks."""
    assert sum(_random_case(seed) for seed in range(40)) > 0

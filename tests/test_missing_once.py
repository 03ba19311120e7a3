"""Each missing expert read from the checkpoint once (issue 13, item 3).

An expert that no live, non-fresh rank held is *missing*. When several live ranks need it in a
layer, one of them (its reader) reads it from the checkpoint and sends it on to the others as a
relay, after the rounds and the reads: the reader counts it in ``bytes_disk`` and ``missing``, the
others in ``bytes_p2p``. Pure planning first, then the store on gloo processes (CPU): every slot
bit-exact against the checkpoint, the totals, and a relayed record corrupted in transit caught by
the receiver's verify.
"""

from __future__ import annotations

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks
from store_util import assert_slots_exact, expected_accounting, random_placement

import expert_store as es
from expert_store.plan import Relay, plan_rebalance, relay_rounds
from expert_store.store import DEFAULT_ROUND_BYTES, DEFAULT_STAGING_BYTES

RB = 100  # record bytes in the planning tests
EB = 7  # expert bytes in the planning tests
COMM_TIMEOUT_S = 60.0

# R=4, S=5, E=8. Rank 3 alone holds 5, 6, 7; in the new placement ranks 0, 1 and 2 each want all
# three (rank 3 dead), and rank 0's slots 0 and 1 (which get 5 and 6) hold 3 and 4, which only
# rank 0 held and ranks 1 and 2 want: those slots may be written only after they are sent.
OLD_ROW = [3, 4, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 5, 6, 7, 5, 6]
NEW_ROW = [5, 6, 7, 0, 1, 7, 5, 6, 3, 2, 6, 7, 5, 4, 0, 0, 0, 0, 0, 0]
ALIVE = [True, True, True, False]


def _placements(L=2):
    old = es.Placement(torch.tensor([OLD_ROW] * L), num_ranks=4, num_experts=8)
    new = es.Placement(torch.tensor([NEW_ROW] * L), num_ranks=4, num_experts=8)
    return old, new


def _distinct_missing(plan) -> set[tuple[int, int]]:
    return {(d.layer, d.expert) for d in plan.disk_reads}


def _check_plan(old, new, plan, *, alive, fresh=(), old_alive=None, rpn=None):
    """Reads once, relays from the reader's read slot, accounting as the contract says (per rank and in
    sum), and the plan simulated on expert ids (moves, reads, relay rounds within budget, post copies)
    ends with every live slot holding its new expert."""
    R, S, L = new.num_ranks, new.slots_per_rank, new.num_layers
    old_alive = [True] * R if old_alive is None else old_alive
    every = plan_rebalance(old, new, expert_bytes=EB, old_alive=old_alive, alive=alive, fresh=fresh, ranks_per_node=rpn)
    needed: dict[tuple[int, int], list[int]] = {}  # (layer, expert) -> the ranks needing it, ascending
    for d in every.disk_reads:
        needed.setdefault((d.layer, d.expert), []).append(d.rank)
    assert not every.relays
    reads = [(d.layer, d.expert) for d in plan.disk_reads]
    assert len(reads) == len(set(reads)) and set(reads) == set(needed), "each missing expert read exactly once"
    read_slot = {(d.layer, d.expert): (d.rank, d.slot) for d in plan.disk_reads}
    for d in plan.disk_reads:
        assert d.rank in needed[(d.layer, d.expert)]
    for x in plan.relays:
        assert isinstance(x, Relay) and x.src_rank != x.dst_rank
        assert read_slot[(x.layer, x.expert)] == (x.src_rank, x.src_slot), x
    for (layer, e), ranks in needed.items():
        to = [x.dst_rank for x in plan.relays if (x.layer, x.expert) == (layer, e)]
        got = sorted([read_slot[(layer, e)][0], *to])
        assert got == ranks, (layer, e)
        if rpn:  # the reader sits on the node with most of the ranks needing it
            nodes = [r // rpn for r in ranks]
            assert nodes.count(read_slot[(layer, e)][0] // rpn) == max(nodes.count(n) for n in nodes)
    for r, a in plan.accounts.items():
        want = expected_accounting(old, new, rank=r, expert_bytes=EB, old_alive=old_alive, alive=alive, fresh=fresh,
                                   relay_missing=True, ranks_per_node=rpn)  # fmt: skip
        assert (a.bytes_p2p, a.bytes_local, a.bytes_disk, a.missing) == want, r
        b = every.accounts[r]  # reading or receiving: the same bytes arrive on each rank
        assert a.bytes_p2p + a.bytes_disk == b.bytes_p2p + b.bytes_disk and a.bytes_local == b.bytes_local
    assert sum(a.bytes_disk for a in plan.accounts.values()) == len(needed) * EB
    listed = [(la, e) for a in plan.accounts.values() for la, experts in a.missing.items() for e in experts]
    assert sorted(listed) == sorted(needed)
    # simulate on expert ids
    slots = {(r, la, s): int(old.phy2log[la, r * S + s]) if alive[r] and old_alive[r] else -1
             for r in range(R) for la in range(L) for s in range(S)}  # fmt: skip
    packed = [(m, slots[(m.src_rank, m.layer, m.src_slot)]) for m in plan.moves]  # one round: all packs first
    for m, e in packed:
        assert e == m.expert, m
        slots[(m.dst_rank, m.layer, m.dst_slot)] = e
    for d in plan.disk_reads:
        slots[(d.rank, d.layer, d.slot)] = d.expert
    cap = 2
    rounds = relay_rounds(plan, record_bytes=RB, staging_bytes=2 * cap * RB, round_bytes=1 << 30)
    assert sorted(m for rnd in rounds for m in rnd.moves) == sorted(es.plan.Move(*x) for x in plan.relays)
    for rnd in rounds:
        used: dict[int, int] = {}
        for m in rnd.moves:
            used[m.src_rank] = used.get(m.src_rank, 0) + 1
            used[m.dst_rank] = used.get(m.dst_rank, 0) + 1
            assert slots[(m.src_rank, m.layer, m.src_slot)] == m.expert, m
            slots[(m.dst_rank, m.layer, m.dst_slot)] = m.expert
        assert max(used.values()) <= cap and not rnd.parks
    for c in plan.post_copies:
        assert slots[(c.rank, c.layer, c.src_slot)] == c.expert, c
        slots[(c.rank, c.layer, c.dst_slot)] = c.expert
    for r in range(R):
        for la in range(L):
            for s in range(S):
                if alive[r]:
                    assert slots[(r, la, s)] == int(new.phy2log[la, r * S + s]), (r, la, s)
    return needed


def test_a_dead_ranks_experts_are_read_once_and_spread():
    """Three survivors need each of the dead rank's three experts: each is read once, by one of them,
    and relayed to the other two; the reads rotate, so each survivor reads two of the six."""
    old, new = _placements()
    plan = plan_rebalance(old, new, expert_bytes=EB, alive=ALIVE, relay_missing=True)
    needed = _check_plan(old, new, plan, alive=ALIVE)
    assert len(needed) == 6 and len(plan.relays) == 12
    assert [sum(d.rank == r for d in plan.disk_reads) for r in range(3)] == [2, 2, 2]
    assert all(len(plan.accounts[r].missing[layer]) == 1 for r in range(3) for layer in range(2))


def test_readers_stay_on_the_node_of_most_needers():
    """Two ranks per node: ranks 0 and 1 (node 0) and rank 2 (node 1) need the experts, so readers are
    ranks 0 and 1, taking turns; rank 2 gets every one relayed. With rank 0 dead and its expert needed
    by ranks 1, 2 and 3, the readers are ranks 2 and 3."""
    old, new = _placements()
    plan = plan_rebalance(old, new, expert_bytes=EB, alive=ALIVE, ranks_per_node=2, relay_missing=True)
    _check_plan(old, new, plan, alive=ALIVE, rpn=2)
    assert sorted(sum(d.rank == r for d in plan.disk_reads) for r in range(2)) == [3, 3]
    assert plan.accounts[2].bytes_disk == 0 and plan.accounts[2].missing == {}
    # mirrored: rank 0 dead, ranks 1, 2, 3 need its experts
    flip = lambda row: [e for r in (3, 2, 1, 0) for e in row[5 * r : 5 * r + 5]]
    old_m = es.Placement(torch.tensor([flip(OLD_ROW)] * 3), num_ranks=4, num_experts=8)
    new_m = es.Placement(torch.tensor([flip(NEW_ROW)] * 3), num_ranks=4, num_experts=8)
    alive = ALIVE[::-1]
    plan = plan_rebalance(old_m, new_m, expert_bytes=EB, alive=alive, ranks_per_node=2, relay_missing=True)
    _check_plan(old_m, new_m, plan, alive=alive, rpn=2)
    assert {d.rank for d in plan.disk_reads} == {2, 3} and plan.accounts[1].bytes_disk == 0


def test_without_relays_every_rank_reads():
    """relay_missing=False (what the non-blocking job still plans): every rank needing it reads it."""
    old, new = _placements()
    plan = plan_rebalance(old, new, expert_bytes=EB, alive=ALIVE)
    assert not plan.relays and len(plan.disk_reads) == 18
    for r in range(3):
        want = expected_accounting(old, new, rank=r, expert_bytes=EB, old_alive=[True] * 4, alive=ALIVE, fresh=())
        a = plan.accounts[r]
        assert (a.bytes_p2p, a.bytes_local, a.bytes_disk, a.missing) == want
        assert a.missing == {0: [5, 6, 7], 1: [5, 6, 7]}


@pytest.mark.parametrize("seed", range(12))
def test_random_dead_and_fresh_ranks(seed):
    """Random placements over 3-4 ranks with a dead rank (and a fresh one): reads once, accounting
    exact, the plan in place."""
    gen = torch.Generator().manual_seed(900 + seed)
    R = 3 + seed % 2
    S, E, L = 4, 2 * R + 1, 3
    old = random_placement(gen, L=L, E=E, R=R, S=S)
    alive = [r != seed % R for r in range(R)]
    fresh = ((seed + 1) % R,) if seed % 3 == 0 else ()
    rows = []  # every expert on a live rank
    live = torch.tensor([r * S + s for r in range(R) if alive[r] for s in range(S)])
    for _ in range(L):
        row = torch.randint(0, E, (R * S,), generator=gen)
        fill = torch.cat([torch.arange(E), torch.randint(0, E, (len(live) - E,), generator=gen)])
        row[live] = fill[torch.randperm(len(live), generator=gen)]
        rows.append(row)
    new = es.Placement(torch.stack(rows), num_ranks=R, num_experts=E)
    rpn = (None, 2)[seed % 2]
    plan = plan_rebalance(old, new, expert_bytes=EB, alive=alive, fresh=fresh, ranks_per_node=rpn, relay_missing=True)
    _check_plan(old, new, plan, alive=alive, fresh=fresh, rpn=rpn)


# ---------------------------------------------------------------------- gloo processes
# One set of 4 processes for both cases (spawning them and the kernels in Triton's interpreter are
# most of the time on 2 CPU cores): each rank creates two stores of the same checkpoint, then the
# survivors rebalance each one without rank 3.


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return cf.write_qwen(tmp_path_factory.mktemp("qwen"), H=32, I=16, num_layers=2, num_experts=8)


def _rebalance(store, info, old, new, rank, rpn, staging_bytes):
    """The rebalance without rank 3: every slot bit-exact, the contract's accounting; the report."""
    rep = store.rebalance(new, alive=ALIVE, staging_bytes=staging_bytes, verify=True)
    assert rep.verified
    assert_slots_exact(store, info, what=f"rpn {rpn}")
    want = expected_accounting(old, new, rank=rank, expert_bytes=info.spec.nbytes, old_alive=[True] * 4, alive=ALIVE,
                               fresh=(), relay_missing=True, ranks_per_node=rpn)  # fmt: skip
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    return rep


def read_once_scenario(rank, world, info, root, victim):
    """1. two ranks per node, staging for 4 records (several relay rounds), then the dry run of the
    committed step (rank 0); 2. one node, default staging (one relay round), where the reader
    ``victim[0]`` flips a byte of the first record it relays, in its staging after packing: the
    receiver ``victim[1]`` must catch it with verify, and no rank commits."""
    from expert_store import execute
    from expert_store.inspect import plan_between

    old, new = _placements(info.num_layers)
    kw = dict(spec=info.spec, placement=old, checkpoint=info.checkpoint(), rank=rank, world_size=world,
              timeout_s=COMM_TIMEOUT_S)  # fmt: skip
    stores = [
        es.ExpertStore.create(root / "two-per-node", ranks_per_node=2, **kw),
        es.ExpertStore.create(root / f"corrupt-{rank}", **kw),
    ]
    if rank == 3:
        return None
    out = {}
    rep = _rebalance(stores[0], info, old, new, rank, 2, 4 * info.spec.record_bytes)
    out["two-per-node"] = (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing, rep.rounds, rep.staging_peak)
    if rank == 0:
        d = plan_between(root / "two-per-node", rep.version - 1, rep.version)
        out["dry"] = d["totals"], [(r["bytes_p2p"], r["bytes_disk"], r["staging_peak"]) for r in d["ranks"][:3]]
        out["matches"] = d["recorded"]["matches"]
    if rank == victim[0]:
        pack, relays, on = execute.RoundRunner._pack, execute.ChunkedRun.run_relays, []

        def corrupt_pack(self, k):
            pack(self, k)
            if on and k == 0:
                self.bufs[0][3] ^= 0xFF  # relay rounds have no local moves: the first record sent

        def run_relays(self, stats):
            on.append(1)
            relays(self, stats)

        execute.RoundRunner._pack, execute.ChunkedRun.run_relays = corrupt_pack, run_relays
    with pytest.raises(es.IntegrityError, match=rf"verification failed on ranks \[{victim[1]}\]") as err:
        stores[1].rebalance(new, alive=ALIVE, verify=True)
    assert stores[1].version == 1 and es.ManifestLog(root / f"corrupt-{rank}").latest() == 1
    out["corrupt"] = str(err.value)
    return out


@pytest.mark.timeout(150)
def test_gloo_each_missing_expert_read_once(tmp_path, qwen):
    """4 ranks (2 per node), rank 3 lost: its 3 experts x 2 layers are read from the checkpoint once
    in all (bytes_disk over the ranks), by ranks 0 and 1 taking turns, and every slot is bit-exact;
    with 4 records of staging the relays take several rounds; the dry run's totals, rounds and
    staging peaks equal the rebalance's. A record corrupted on its way from the reader is caught by
    the receiver's verify (IntegrityError naming layer, expert and source rank), nothing committed."""
    old, new = _placements(qwen.num_layers)
    plan = plan_rebalance(old, new, expert_bytes=qwen.spec.nbytes, alive=ALIVE, relay_missing=True)
    rounds = relay_rounds(plan, record_bytes=qwen.spec.record_bytes, staging_bytes=DEFAULT_STAGING_BYTES,
                          round_bytes=DEFAULT_ROUND_BYTES)  # fmt: skip
    assert len(rounds) == 1
    reader = plan.disk_reads[0].rank
    first = min((m for m in rounds[0].moves if m.src_rank == reader), key=lambda m: m.dst_rank)  # packed first
    got = run_ranks(read_once_scenario, 4, qwen, tmp_path, (reader, first.dst_rank), timeout_s=130)
    assert got[3] is None
    nbytes = qwen.spec.nbytes
    reports = [g["two-per-node"] for g in got[:3]]
    assert sum(r[2] for r in reports) == 6 * nbytes  # 6 distinct missing (layer, expert)
    read = sorted((la, e) for r in reports for la, experts in r[3].items() for e in experts)
    assert read == [(la, e) for la in range(2) for e in (5, 6, 7)]
    assert [r[2] for r in reports] == [3 * nbytes, 3 * nbytes, 0]  # node 0 reads, in turns; none reads all
    totals, ranks = got[0]["dry"]
    assert got[0]["matches"] is True and totals["relays"] == 12 and totals["disk_reads"] == 6
    assert (totals["bytes_p2p"], totals["bytes_local"], totals["bytes_disk"]) == tuple(
        sum(r[k] for r in reports) for k in range(3)
    )
    assert totals["rounds"] == reports[0][4] > 3 and ranks == [(r[0], r[2], r[5]) for r in reports]
    msg = got[first.dst_rank]["corrupt"]
    assert f"layer {first.layer} expert {first.expert} arrived in slot {first.dst_slot}" in msg, msg
    assert f"from rank {reader} (relayed" in msg, msg

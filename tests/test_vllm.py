"""expert_store.integrations.vllm on gloo processes (CPU; kernels in Triton's interpreter).

Every weight row of expert e in layer l, tensor t holds bytes that encode (l, e, t) and the byte's
position, so a row that arrives from the wrong expert, layer, tensor or offset differs somewhere.
The expected result is computed here, per tensor and slot, from the indices alone; it never uses
the code under test.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch
from dist_util import run_ranks

import expert_store as es

TIMEOUT_S = 20.0  # deadline of each wait on a peer inside a test: a hang fails fast

# (shape after S, dtype) of one layer: fp8 weights with fp32 scales and a bf16 tensor; odd byte sizes
TENSORS = [((6, 10), torch.float8_e4m3fn), ((1, 3), torch.float32), ((5, 3), torch.bfloat16)]


def row_bytes(layer: int, expert: int, t: int, nbytes: int) -> torch.Tensor:
    """uint8 [nbytes]: the bytes of tensor t's row of (layer, expert); expert -1: an empty slot's junk."""
    base = (layer * 1_000_003 + (expert + 2) * 7_919 + t * 104_729) % 65_521
    return ((torch.arange(nbytes, dtype=torch.int64) * 131 + base) % 251).to(torch.uint8)


def make_weights(old, rank: int, S: int, tensors=TENSORS):
    """expert_weights of this rank for old indices [L, P]: list per layer of tensors [S, ...]."""
    out = []
    for layer in range(old.shape[0]):
        ts = []
        for t, (shape, dtype) in enumerate(tensors):
            w = torch.empty((S, *shape), dtype=dtype)
            b = w.view(S, -1).view(torch.uint8)
            for s in range(S):
                b[s] = row_bytes(layer, int(old[layer, rank * S + s]), t, b.shape[1])
            ts.append(w)
        out.append(ts)
    return out


def expected_bytes(old, new, rank: int, S: int, tensors=TENSORS):
    """Per layer, per tensor: uint8 [S, row bytes] expected after the call (new expert's bytes; old
    bytes where the new expert is -1)."""
    out = []
    for layer in range(old.shape[0]):
        ts = []
        for t, (shape, dtype) in enumerate(tensors):
            nb = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            rows = []
            for s in range(S):
                e = int(new[layer, rank * S + s])
                rows.append(row_bytes(layer, e if e >= 0 else int(old[layer, rank * S + s]), t, nb))
            ts.append(torch.stack(rows))
        out.append(ts)
    return out


def check(weights, want, what: str) -> None:
    for layer, (ws, es_) in enumerate(zip(weights, want)):
        for t, (w, e) in enumerate(zip(ws, es_)):
            got = w.reshape(w.shape[0], -1).view(torch.uint8)
            if not torch.equal(got, e):
                bad = (got != e).any(1).nonzero().flatten().tolist()
                raise AssertionError(f"{what}: layer {layer} tensor {t}: slots {bad} differ")


def random_indices(rng: random.Random, L: int, E: int, P: int, *, holes: float = 0.1):
    """old, new: int64 [L, P] with -1 slots and duplicates; every expert new wants is held in old."""
    old, new = [], []
    for _ in range(L):
        row = list(range(E)) + [rng.randrange(E) for _ in range(P - E)]
        rng.shuffle(row)
        count = {e: row.count(e) for e in set(row)}
        for p in range(P):
            if rng.random() < holes and count[row[p]] > 1:
                count[row[p]] -= 1
                row[p] = -1
        old.append(row)
        new.append([-1 if rng.random() < holes else rng.randrange(E) for _ in range(P)])
    return torch.tensor(old), torch.tensor(new)


def rearrange_cases(rank, world, seed):
    """Random rearrangements of odd sizes; small staging budgets force many rounds and split rows."""
    from expert_store.integrations.vllm import rearrange_expert_weights_inplace

    rng = random.Random(seed)
    # (L, E, S, staging budgets): up to 200 experts and 220 slots. Tiny budgets split rows into many
    # rounds. On 2 ranks every budget on the small and odd cases; a large case (its kernel launches
    # cost the most CI time) takes each budget once over the worlds: 48 on 2 ranks, the default on 4
    # (200 experts in 220 slots), 200 on 8 (112 slots: 8 processes share the CI machine's 2 cores);
    # the odd case on 4 ranks the default and 200.
    cases = {
        2: [(2, 2, 1, (None, 48, 200)), (3, 5, 2, (None, 48, 200)), (2, 200, 55, (48,)), (4, 17, 5, (None, 48, 200))],
        4: [(3, 5, 2, (None, 200)), (2, 200, 55, (None,))],
    }.get(world, [(2, 200, 14, (200,))])
    for case, (L, E, S, budgets) in enumerate(cases):
        P = world * S
        E = min(E, P)
        old, new = random_indices(rng, L, E, P)
        for staging in budgets:
            weights = make_weights(old, rank, S)
            rearrange_expert_weights_inplace(old, new, weights, None, staging_bytes=staging, timeout_s=TIMEOUT_S)
            check(weights, expected_bytes(old, new, rank, S), f"case {case} staging {staging} rank {rank}")
    if world > 4:
        return "ok"  # 8 processes on the CI machine's 2 cores: the large case alone
    # unchanged indices move nothing; swapped halves of one layer (cycles across ranks)
    L, S = 2, 3
    P = world * S
    old = torch.arange(P).repeat(L, 1)
    weights = make_weights(old, rank, S)
    rearrange_expert_weights_inplace(old, old.clone(), weights, None, timeout_s=TIMEOUT_S)
    check(weights, expected_bytes(old, old, rank, S), "unchanged")
    new = torch.roll(old, S, dims=1)
    tiny = 16 if world == 2 else 200  # 16-byte rounds: hundreds of rounds, each one message per peer
    rearrange_expert_weights_inplace(old, new, weights, None, staging_bytes=tiny, timeout_s=TIMEOUT_S)
    check(weights, expected_bytes(old, new, rank, S), f"rolled, {tiny}-byte rounds")
    return "ok"


def special_cases(rank, world):
    """is_profile, newer keyword and positional forms, bf16 weights only, errors raised on every rank."""
    from expert_store.integrations.vllm import rearrange_expert_weights_inplace

    rng = random.Random(7)
    L, E, S = 3, 5, 3
    P = world * S
    old, new = random_indices(rng, L, E, P)
    weights = make_weights(old, rank, S)
    before = [[w.clone() for w in ws] for ws in weights]
    rearrange_expert_weights_inplace(old, new, weights, None, is_profile=True)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for x, y in zip(weights, before)
               for a, b in zip(x, y)), "is_profile moved bytes"  # fmt: skip
    # newer vLLM: (old, new, weights, expert_buffer, ep_group, communicator, is_profile, rank_mapping, ...)
    buffers = [torch.empty_like(w) for w in weights[0]]
    rearrange_expert_weights_inplace(old, new, weights, buffers, None, object(), False, None, False)
    check(weights, expected_bytes(old, new, rank, S), "newer positional form")
    weights = make_weights(old, rank, S)
    rearrange_expert_weights_inplace(
        old, new, weights, ep_group=None, communicator=object(), expert_buffer=buffers, enable_migration_batching=True
    )
    check(weights, expected_bytes(old, new, rank, S), "newer keywords")
    bf16 = [((7,), torch.bfloat16), ((2, 2), torch.bfloat16)]
    weights = make_weights(old, rank, S, bf16)
    rearrange_expert_weights_inplace(old, new, weights, None)
    check(weights, expected_bytes(old, new, rank, S, bf16), "bf16")
    # an expert nobody holds: every rank raises before anything moves
    lost = old.clone()
    lost[lost == 0] = -1
    wanted = new.clone()
    wanted[0, 0] = 0
    weights = make_weights(lost, rank, S)
    with pytest.raises(es.StoreError, match="layer 0: logical expert 0 is wanted by rank 0"):
        rearrange_expert_weights_inplace(lost, wanted, weights, None, timeout_s=TIMEOUT_S)
    # rank 0 with other indices: every rank raises AgreementError, nothing moved
    weights = make_weights(old, rank, S)
    mine = torch.roll(new, 1, dims=1) if rank == 0 else new
    with pytest.raises(es.AgreementError, match="called with other indices"):
        rearrange_expert_weights_inplace(old, mine, weights, None, timeout_s=TIMEOUT_S)
    check(weights, expected_bytes(old, old, rank, S), "after disagreement")
    with pytest.raises(es.StoreError, match="tensor 1: expected shape"):
        rearrange_expert_weights_inplace(old, new, [[weights[0][0], weights[0][1][:2]]] * L, None)
    return "ok"


def elastic_cases(rank, world):
    """rank_mapping: scale-down (the group is the old world) and scale-up (the group is the new one)."""
    from expert_store.integrations.vllm import rearrange_expert_weights_inplace

    rng = random.Random(11)
    L, E, S = 2, 6, 3
    # scale-down 4 -> 3: old rank 1 removed, old ranks 0, 2, 3 become 0, 1, 2
    down = {0: 0, 1: -1, 2: 1, 3: 2}
    old, _ = random_indices(rng, L, E, world * S)
    _, new3 = random_indices(rng, L, E, 3 * S, holes=0.0)
    weights = make_weights(old, rank, S)
    rearrange_expert_weights_inplace(old, new3, weights, None, rank_mapping=down, timeout_s=TIMEOUT_S)
    # expected, computed by hand: old rank o ends with new rank down[o]'s slots; the removed rank keeps its bytes
    n = down[rank]
    new_here = new3[:, n * S : (n + 1) * S] if n >= 0 else torch.full((L, S), -1)
    want_new = torch.full((L, world * S), -1)
    want_new[:, rank * S : (rank + 1) * S] = new_here
    check(weights, expected_bytes(old, want_new, rank, S), f"scale-down rank {rank}")
    # scale-up 2 -> 4: old ranks 0, 1 become 3, 1; new ranks 0 and 2 start empty
    up = {0: 3, 1: 1}
    old2, _ = random_indices(rng, L, E, 2 * S, holes=0.0)
    _, new = random_indices(rng, L, E, world * S)
    inv = {v: k for k, v in up.items()}
    mine = old2[:, inv[rank] * S : (inv[rank] + 1) * S] if rank in inv else torch.full((L, S), -1)
    old_here = torch.full((L, world * S), -1)
    old_here[:, rank * S : (rank + 1) * S] = mine
    weights = make_weights(old_here, rank, S)
    rearrange_expert_weights_inplace(old2, new, weights, None, rank_mapping=up, timeout_s=TIMEOUT_S)
    check(weights, expected_bytes(old_here, new, rank, S), f"scale-up rank {rank}")
    return "ok"


def communicator_cases(rank, world, seed):
    """Random sends and receives of many shapes and dtypes, queued in one order on each side."""
    from expert_store.integrations.vllm import PackedEplbCommunicator

    comm = PackedEplbCommunicator(None, timeout_s=TIMEOUT_S)
    rng = random.Random(seed)
    dtypes = [torch.uint8, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int64]
    for step in range(3):
        transfers = []
        for k in range(rng.randint(0, 12)):
            src, dst = rng.sample(range(world), 2)
            shapes = [((rng.randint(1, 9), rng.randint(1, 5)), rng.choice(dtypes)) for _ in range(rng.randint(1, 3))]
            transfers.append((src, dst, k if rng.random() < 0.7 else None, shapes))
        rng.shuffle(transfers)
        ids_all = rng.random() < 0.5
        received = []
        for k, (src, dst, eid, shapes) in enumerate(transfers):
            eid = k if ids_all else None
            if src == rank:
                ts = make_weights(torch.tensor([[k]]), 0, 1, shapes)[0]
                comm.add_send(ts, dst, expert_id=eid)
            if dst == rank:
                ts = [torch.empty((1, *s), dtype=d) for s, d in shapes]
                for t in ts:
                    t.view(torch.uint8).fill_(0xEE)
                comm.add_recv(ts if len(ts) > 1 else ts[0], src, expert_id=eid)
                received.append((k, shapes, ts))
        comm.execute()
        for k, shapes, ts in received:
            check([ts], expected_bytes(torch.tensor([[k]]), torch.tensor([[k]]), 0, 1, shapes), f"step {step} #{k}")
    messages = comm.messages
    # a size mismatch: rank 1 expects 4 bytes less; both ranks of the pair raise, naming the peer
    if rank < 2:
        peer = 1 - rank
        if rank == 0:
            comm.add_send(torch.ones(8, dtype=torch.int32), peer, expert_id=3)
        else:
            comm.add_recv(torch.ones(7, dtype=torch.int32), peer, expert_id=3)
        with pytest.raises(es.StoreError, match=f"rank {rank} and rank {peer} disagree"):
            comm.execute()
    else:
        comm.execute()  # summaries go to every peer: the other ranks take part with nothing queued
    comm.close()
    return messages


def in_one_launch(rank, world, calls):
    """Each (case function, extra args) of ``calls`` in turn on these processes: the results in order.
    Cases of one world share a launch: starting gloo processes costs seconds on the CI machine."""
    return [fn(rank, world, *args) for fn, args in calls]


@pytest.mark.timeout(240)
def test_rearrange_matches_reference_then_profile_newer_forms_errors_and_communicator_on_2_ranks():
    """rearrange_cases, special_cases and communicator_cases, in that order, on one launch of 2 ranks."""
    calls = [(rearrange_cases, (102,)), (special_cases, ()), (communicator_cases, (7,))]
    got = run_ranks(in_one_launch, 2, calls, timeout_s=230)
    assert [g[:2] for g in got] == [["ok", "ok"]] * 2 and all(g[2] >= 0 for g in got), got


@pytest.mark.timeout(240)
def test_rearrange_matches_reference_then_rank_mapping_scale_down_and_up_on_4_ranks():
    """rearrange_cases, then elastic_cases, on one launch of 4 ranks."""
    got = run_ranks(in_one_launch, 4, [(rearrange_cases, (104,)), (elastic_cases, ())], timeout_s=230)
    assert got == [["ok", "ok"]] * 4


@pytest.mark.timeout(240)
def test_rearrange_matches_reference_on_8_ranks():
    assert run_ranks(rearrange_cases, 8, 108, timeout_s=230) == ["ok"] * 8


@pytest.mark.timeout(90)
def test_packed_communicator_on_3_ranks():
    messages = run_ranks(communicator_cases, 3, 8, timeout_s=80)
    assert all(m >= 0 for m in messages)


def test_import_does_not_import_vllm():
    import expert_store.integrations.sglang
    import expert_store.integrations.vllm  # noqa: F401

    assert "vllm" not in sys.modules and "sglang" not in sys.modules


def test_one_process_without_a_group():
    from expert_store.integrations.vllm import rearrange_expert_weights_inplace

    old = torch.tensor([[0, 1, 2, -1]])
    new = torch.tensor([[2, 2, -1, 1]])
    weights = make_weights(old, 0, 4)
    rearrange_expert_weights_inplace(old, new, weights, None, staging_bytes=32)
    check(weights, expected_bytes(old, new, 0, 4), "one process")

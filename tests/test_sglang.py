"""expert_store.integrations.sglang on gloo processes (CPU; kernels in Triton's interpreter).

Rows encode (layer, expert, tensor) as in test_vllm; the expected result, the missing experts and
the node preference are computed here from the maps alone.
"""

from __future__ import annotations

import random

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks
from test_vllm import TENSORS, TIMEOUT_S, check, expected_bytes, make_weights

import expert_store as es


def _expected_missing(old, new, rank, S, live):
    """Experts this rank's changed slots want that no active rank holds (computed directly)."""
    held = {old[p] for p in range(len(old)) if live[p // S] and old[p] >= 0}
    wanted = {new[p] for p in range(rank * S, (rank + 1) * S) if new[p] >= 0 and new[p] != old[p]}
    return sorted(wanted - held)


def sglang_cases(rank, world, seed):
    from expert_store.integrations.sglang import update_expert_weights_single_layer

    rng = random.Random(seed)
    for case in range(6):
        S = rng.randint(1, 6)
        E = rng.randint(2, world * S)
        P = world * S
        old = [rng.randrange(E) if rng.random() > 0.1 else -1 for _ in range(P)]
        new = [rng.randrange(E) if rng.random() > 0.1 else -1 for _ in range(P)]
        dead = rng.randrange(world) if case % 2 else None  # one inactive rank in odd cases
        live = [r != dead for r in range(world)]
        form = [None, live, [r for r in range(world) if live[r]], torch.tensor(live, dtype=torch.int32)][case % 4]
        if dead is not None and case % 4 == 0:
            form = live
        staging = rng.choice([None, 64])  # drawn on every rank: the generators stay in step
        if rank == dead:
            continue  # inactive ranks do not call
        layer = case
        weights = make_weights(torch.tensor([old] * (layer + 1)), rank, S)[layer:]
        per_node = (1, 2, world)[case % 3]  # world, world / 2 and 1 nodes (4, 2, 1 on 4 ranks)
        got = update_expert_weights_single_layer(
            weights[0], None, old, torch.tensor(new), S, per_node, rank, world, active_ranks=form,
            staging_bytes=staging, timeout_s=TIMEOUT_S,
        )  # fmt: skip
        missing = _expected_missing(old, new, rank, S, live)
        assert got == missing, (case, rank, got, missing)
        # expected: the new expert's bytes, except slots of missing experts keep their old bytes
        want_new = torch.tensor([[-1 if x in missing else x for x in new]] * (layer + 1))
        want = expected_bytes(torch.tensor([old] * (layer + 1)), want_new, rank, S)[layer:]
        check(weights, want, f"case {case} rank {rank}")
    return "ok"


def node_preference(rank, world):
    """4 ranks, 2 per node: expert 0 is held by ranks 0 and 2; rank 1 (node 0) must take it from
    rank 0 and rank 3 (node 1) from rank 2. Rows of the two holders differ on purpose (a marker
    byte) so the source is visible."""
    from expert_store.integrations.sglang import update_expert_weights_single_layer

    S = 1
    old = [0, 1, 0, 2]
    new = [0, 0, 0, 0]
    w = torch.full((S, 8), rank, dtype=torch.uint8)
    update_expert_weights_single_layer([w], None, old, new, S, 2, rank, timeout_s=TIMEOUT_S)
    return int(w[0, 0])


def read_missing_case(rank, world, info):
    from expert_store.integrations.sglang import read_missing, update_expert_weights_single_layer

    spec, S, layer = info.spec, 3, 1
    # rank 1 is inactive: the experts only it held are missing for rank 0
    old = [0, 1, 2, 3, 4, 5]
    new = [3, 4, 3, 0, 1, 2]
    weights = [torch.zeros((S, *t.shape), dtype=t.dtype) for t in spec.tensors]
    for name, w in zip(spec.names, weights):
        for s in range(S):
            w[s].copy_(info.expected_expert(layer, old[rank * S + s])[name])
    got = update_expert_weights_single_layer(weights, None, old, new, S, 1, rank, active_ranks=[0], timeout_s=TIMEOUT_S)
    assert got == [3, 4]
    with info.checkpoint() as ck:
        n = read_missing(ck, spec, layer, got, weights, new, S, rank)
    assert n == 3  # expert 3 into two slots (read once, copied), expert 4 into one
    for s in range(S):
        want = info.expected_expert(layer, new[s])
        for name, w in zip(spec.names, weights):
            assert torch.equal(w[s].view(torch.uint8), want[name].view(torch.uint8)), (s, name)
    return "ok"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_sglang_matches_reference(world):
    assert run_ranks(sglang_cases, world, 40 + world, timeout_s=110) == ["ok"] * world


@pytest.mark.timeout(60)
def test_same_node_source_first():
    assert run_ranks(node_preference, 4, timeout_s=50) == [0, 0, 2, 2]


@pytest.mark.timeout(60)
def test_read_missing_from_checkpoint(tmp_path):
    info = cf.write_qwen(tmp_path / "ckpt", H=16, I=8, num_layers=2, num_experts=6)
    assert run_ranks(read_missing_case, 1, info, timeout_s=50) == ["ok"]


def test_inactive_rank_and_bad_maps_refused():
    from expert_store.integrations.sglang import update_expert_weights_single_layer

    w = [torch.zeros(2, 4)]
    with pytest.raises(es.StoreError, match="rank 0 is not an active rank"):
        update_expert_weights_single_layer(w, None, [0, 1], [1, 0], 2, 1, 0, active_ranks=[False])
    with pytest.raises(es.StoreError, match="maps of 2 and 3 slots"):
        update_expert_weights_single_layer(w, None, [0, 1], [1, 0, 1], 2, 1, 0)
    with pytest.raises(es.StoreError, match="tensor 0: expected shape"):
        update_expert_weights_single_layer([torch.zeros(3, 4)], None, [0, 1], [1, 0], 2, 1, 0)


assert TENSORS  # the layer layout shared with test_vllm

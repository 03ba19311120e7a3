"""Single-rank ExpertStore: create, stable views, local rebalance, reopen, verify, bad input."""

from __future__ import annotations

import ckpt_factory as cf
import pytest
import torch
from store_util import assert_slots_exact, expected_accounting, random_placement

import expert_store as es


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A DeepSeek-style fp8 checkpoint: 2 MoE layers from layer 3, 8 experts, sharded with an index."""
    return cf.write_deepseek(tmp_path_factory.mktemp("ds"), H=256, I=128, num_layers=2, num_experts=8)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


def _create(tmp_path, info, placement, **kw):
    return es.ExpertStore.create(
        tmp_path / "store", spec=info.spec, placement=placement, checkpoint=info.checkpoint(), **kw
    )


@pytest.mark.parametrize("device", DEVICES)
def test_create_loads_own_slots_exact(tmp_path, ds, device):
    """create() fills every slot with the checkpoint bytes of its expert and commits version 1."""
    placement = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=10)
    store = _create(tmp_path, ds, placement, device=device)
    assert store.version == 1 and store.weights("w2", 0).device.type == device
    assert_slots_exact(store, ds, what="after create")
    w = store.weights("w13", 1)
    assert w.shape == (10, *ds.spec["w13"].shape) and w.dtype == torch.float8_e4m3fn and w.is_contiguous()
    assert store.verify() == 20
    m = es.ManifestLog(tmp_path / "store").read()
    assert m.version == 1 and m.parent is None and m.reason == "create"
    assert torch.equal(m.phy2log, placement.phy2log)


@pytest.mark.parametrize("device", DEVICES)
def test_local_rebalance_moves_and_accounts_exactly(tmp_path, ds, device):
    """A one-rank rebalance permutes and duplicates experts in place, with exact accounting,
    stable view addresses, and a new version that open() reloads."""
    gen = torch.Generator().manual_seed(7)
    old = random_placement(gen, L=2, E=8, R=1, S=11)
    store = _create(tmp_path, ds, old, device=device)
    ptrs = {(n, layer): store.weights(n, layer).data_ptr() for n in ds.spec.names for layer in range(2)}
    for step in range(4):
        new = random_placement(gen, L=2, E=8, R=1, S=11)
        report = store.rebalance(new, verify=True, staging_bytes=4 * ds.spec.record_bytes)
        want = expected_accounting(
            old, new, rank=0, expert_bytes=ds.spec.nbytes, old_alive=[True], alive=[True], fresh=()
        )
        assert (report.bytes_p2p, report.bytes_local, report.bytes_disk, report.missing) == want
        assert report.version == step + 2 == store.version
        assert report.staging_peak <= 4 * ds.spec.record_bytes
        assert_slots_exact(store, ds, what=f"step {step}")
        old = new
    assert ptrs == {(n, layer): store.weights(n, layer).data_ptr() for n in ds.spec.names for layer in range(2)}
    reopened = es.ExpertStore.open(tmp_path / "store", checkpoint=ds.checkpoint(), device=device)
    assert reopened.version == 5 and reopened.placement == old
    assert_slots_exact(reopened, ds, what="reopened")


def test_unchanged_placement_costs_nothing(tmp_path, ds):
    """Rebalancing to the same placement moves no byte but still commits a new version."""
    p = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    store = _create(tmp_path, ds, p)
    r = store.rebalance(p)
    assert (r.bytes_p2p, r.bytes_local, r.bytes_disk, r.missing) == (0, 0, 0, {})
    assert store.version == 2


@pytest.mark.parametrize("device", DEVICES)
def test_verify_names_corrupted_slot(tmp_path, ds, device):
    """verify() raises IntegrityError naming layer, slot and expert when a slot's bytes change."""
    p = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    store = _create(tmp_path, ds, p, device=device)
    store.weights("w2_scale", 1)[5].view(torch.uint8).reshape(-1)[0] ^= 1
    with pytest.raises(es.IntegrityError, match=r"layer 1 slot 5 .*expert 5"):
        store.verify()


def test_rebalance_verifies_arrived_records_not_local_copies(tmp_path, ds, monkeypatch):
    """rebalance(verify=True) hashes what arrived from peers or the checkpoint; a rebalance of local
    moves hashes nothing (its bytes were resident), and verify() is what checks resident bytes."""
    import expert_store.execute as ex

    p0 = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    p1 = es.Placement(torch.roll(p0.phy2log, 4, dims=1), num_ranks=1, num_experts=8)
    store = _create(tmp_path, ds, p0)
    hashed: list = []
    real = ex.mismatched_slots
    monkeypatch.setattr(ex, "mismatched_slots", lambda slabs, pairs, *a: hashed.extend(pairs) or real(slabs, pairs, *a))
    store.weights("w2", 1)[2].view(torch.uint8).reshape(-1)[7] ^= 0xFF  # resident corruption, moved locally
    report = store.rebalance(p1, verify=True)
    assert report.bytes_local == 16 * ds.spec.nbytes and hashed == []
    with pytest.raises(es.IntegrityError, match=r"layer 1 slot 6 .*expert 2"):
        store.verify()


def test_open_without_checkpoint_uses_manifest_and_detects_changed_checkpoint(tmp_path, ds, tmp_path_factory):
    """open(checkpoint=None) rebuilds the checkpoint from the manifest; a checkpoint with other bytes is refused."""
    p = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    _create(tmp_path, ds, p)
    again = es.ExpertStore.open(tmp_path / "store")
    assert_slots_exact(again, ds, what="open from manifest")
    other = cf.write_deepseek(
        tmp_path_factory.mktemp("other"), H=256, I=128, num_layers=2, num_experts=8, first_layer=4
    )
    ck = es.Checkpoint(other.path, names=ds.names, layers=ds.layers)
    with pytest.raises(es.StoreError):
        es.ExpertStore.open(tmp_path / "store", checkpoint=ck)


def test_create_refuses_existing_store(tmp_path, ds):
    """create() on a root that already holds a store raises instead of overwriting history."""
    p = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    _create(tmp_path, ds, p)
    with pytest.raises(es.ManifestError, match="already exists"):
        _create(tmp_path, ds, p)


def test_bad_rebalance_input_moves_nothing(tmp_path, ds):
    """Wrong dimensions, an alive mask of the wrong length or a bad staging size raise before any byte moves."""
    p = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=8)
    store = _create(tmp_path, ds, p)
    before = store.slabs.storage.clone()
    wrong = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=1, slots_per_rank=9)
    with pytest.raises(es.PlacementError, match="differs"):
        store.rebalance(wrong)
    with pytest.raises(es.StoreError, match="alive"):
        store.rebalance(p, alive=[True, True])
    with pytest.raises(es.StoreError, match="staging_bytes"):
        store.rebalance(p, staging_bytes=0)
    with pytest.raises(es.StoreError, match="round_bytes"):
        store.rebalance(p, round_bytes=-1)
    with pytest.raises(es.StoreError, match="fresh rank must be an int"):
        store.rebalance(p, fresh=["a"])
    with pytest.raises(es.StoreError, match=r"fresh rank must be in 0\.\.0, got 3"):
        store.rebalance(p, fresh=(3,))
    with pytest.raises(es.PlacementError, match=r"es\.Placement"):
        store.rebalance(p.phy2log)
    with pytest.raises(es.StoreError, match="staging"):
        store.rebalance(random_placement(torch.Generator().manual_seed(1), L=2, E=8, R=1, S=8), staging_bytes=16)
    assert torch.equal(before, store.slabs.storage) and store.version == 1


def test_retention_keeps_the_newest_versions(tmp_path, ds):
    """With keep_versions set, each rebalance commit prunes older manifests; the store still reopens."""
    gen = torch.Generator().manual_seed(3)
    store = _create(tmp_path, ds, random_placement(gen, L=2, E=8, R=1, S=9))
    store.keep_versions = 2
    for _ in range(4):
        store.rebalance(random_placement(gen, L=2, E=8, R=1, S=9), verify=False)  # retention is the point
    assert es.ManifestLog(tmp_path / "store").versions() == [4, 5]
    again = es.ExpertStore.open(tmp_path / "store", checkpoint=ds.checkpoint())
    assert again.version == 5
    assert_slots_exact(again, ds, what="after pruning")


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_rebalance_stays_within_staging(tmp_path, ds, device, monkeypatch):
    """Planned and run layer by layer (two chunks in flight at a time), a rebalance keeps its
    staging peak within staging_bytes, its accounting exact and every slot bit-exact; the
    committed rounds are what inspect-store plan computes."""
    from expert_store import plan as plan_module
    from expert_store.inspect import plan_between

    monkeypatch.setattr(plan_module, "CHUNK_MIN_SLOTS", 0)
    monkeypatch.setattr(plan_module, "CHUNK_MAX_LAYERS", 1)
    gen = torch.Generator().manual_seed(3)
    old = random_placement(gen, L=2, E=8, R=1, S=11)
    store = _create(tmp_path, ds, old, device=device)
    staging = 8 * ds.spec.record_bytes
    for step in range(3):
        new = random_placement(gen, L=2, E=8, R=1, S=11)
        rep = store.rebalance(new, staging_bytes=staging, verify=True)
        want = expected_accounting(
            old, new, rank=0, expert_bytes=ds.spec.nbytes, old_alive=[True], alive=[True], fresh=()
        )
        assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
        assert 0 < rep.staging_peak <= staging
        assert_slots_exact(store, ds, what=f"chunked step {step}")
        planned = plan_between(tmp_path / "store", step + 1, step + 2)
        assert planned["totals"]["rounds"] == rep.rounds and planned["recorded"]["matches"] is True
        old = new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_reserved_staging_is_used_instead_of_allocating(tmp_path, ds, device, chunked, monkeypatch):
    """After reserve_staging, rebalances within the reservation allocate no staging (their buffers
    are carved from it, alternating halves between chunks) and stay bit-exact; a larger
    staging_bytes allocates as before."""
    from expert_store import plan as plan_module

    if chunked:
        monkeypatch.setattr(plan_module, "CHUNK_MIN_SLOTS", 0)
        monkeypatch.setattr(plan_module, "CHUNK_MAX_LAYERS", 1)
    rb = ds.spec.record_bytes
    staging = 8 * rb
    gen = torch.Generator().manual_seed(21)
    old = random_placement(gen, L=2, E=8, R=1, S=11)
    store = _create(tmp_path, ds, old, device=device)
    assert store.staging_reserved == 0 and store.reserve_staging(staging) == staging == store.staging_reserved
    real_empty = torch.empty
    big = []

    def counting_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.dtype == torch.uint8 and t.numel() >= rb:
            big.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", counting_empty)
    for step, budget in enumerate((staging, staging, 2 * staging)):
        big.clear()
        new = random_placement(gen, L=2, E=8, R=1, S=11)
        rep = store.rebalance(new, staging_bytes=budget, verify=False)  # assert_slots_exact checks the bytes
        assert rep.bytes_local > 0 and 0 < rep.staging_peak <= budget
        if budget <= staging:
            assert big == [], f"step {step}: staging allocated despite the reservation: {big}"
        else:
            assert big, "a budget above the reservation allocates its own staging"
        assert_slots_exact(store, ds, what=f"reserved staging, step {step}")
    with pytest.raises(es.StoreError, match=r"nbytes must be in 1\.\."):
        store.reserve_staging(0)


def test_rebalance_records_the_load(tmp_path, ds):
    """rebalance(load=) records the load (float32 [L, E]) in the new version's manifest; a version made
    without it has none; a malformed load is refused (PlacementError naming `load`) before anything
    moves; the load is part of what the ranks agree on."""
    from expert_store.store import _Call

    gen = torch.Generator().manual_seed(9)
    store = _create(tmp_path, ds, random_placement(gen, L=2, E=8, R=1, S=9))
    new = random_placement(gen, L=2, E=8, R=1, S=9)
    load = torch.arange(16, dtype=torch.float64).view(2, 8) * 1.5  # LoadCounter.load() is float64
    before = store.slabs.storage.clone()
    for bad, needle in [
        (load[:1], r"load must be a real tensor \[2, 8\].*\[1, 8\]"),
        (load.bool(), "torch.bool"),
        (load.tolist(), "load must be None or a tensor"),
        (load.clone().index_fill_(1, torch.tensor([3]), float("nan")), r"load\[0, 3\] = nan"),
        (-load, r"load\[0, 1\] = -1.5: loads must be finite and >= 0"),
        (load * 1e300, r"load\[0, 1\] = 1.5e\+300.*fit float32"),
    ]:
        with pytest.raises(es.PlacementError, match=needle):
            store.rebalance(new, load=bad)
    assert torch.equal(before, store.slabs.storage) and store.version == 1
    store.rebalance(new, load=load, verify=False)  # the manifest is the point
    store.rebalance(new, verify=False)
    log = es.ManifestLog(tmp_path / "store")
    assert log.read(1).load is None and log.read(3).load is None
    m = log.read(2)
    assert m.load.dtype == torch.float32 and torch.equal(m.load, load.float())
    call = _Call(new, (True,), (), 1, 1, True, [0], load.float())
    assert call.inputs() != call._replace(load=load.float() + 1).inputs() != call._replace(load=None).inputs()

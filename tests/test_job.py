"""Non-blocking rebalance (``ExpertStore.start_rebalance``): layer by layer between forward passes.

At every step each rank runs a simulated forward: every slot of every layer must hold exactly the
checkpoint bytes of the expert the live placement names (old placement in layers not yet switched,
new one after), and ``routing()`` keeps its addresses and matches the live placement.
"""

from __future__ import annotations

import os
import time

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks
from store_util import assert_slots_exact, expected_accounting, random_placement

import expert_store as es
from expert_store.comm import Comm

COMM_TIMEOUT_S = 60.0
# A forward pass between steps, as in an engine: the staging threads get the CPU (the CI machine
# has 2 cores for several ranks) instead of ranks spinning through empty steps.
FORWARD_S = 0.002
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return cf.write_qwen(tmp_path_factory.mktemp("qwen"), H=32, I=16, num_layers=3, num_experts=6)


def _padded(p: es.Placement) -> torch.Tensor:
    X = p.num_physical - p.num_experts + 1
    out = torch.full((p.num_layers, p.num_experts, X), -1, dtype=torch.int64)
    out[:, :, : p.max_replicas] = p.log2phy
    return out


def _forward(store, info, old, new, switched, ptrs, what):
    """The simulated forward pass: placement per layer, routing tables, every slot's bytes."""
    want = torch.cat([new.phy2log[:switched], old.phy2log[switched:]])
    assert torch.equal(store.placement.phy2log, want), f"{what}: placement after {switched} switched layers"
    log2phy, logcnt = store.routing()
    assert (log2phy.data_ptr(), logcnt.data_ptr()) == ptrs, f"{what}: routing tensors moved"
    assert torch.equal(log2phy.cpu(), _padded(store.placement)), f"{what}: log2phy"
    assert torch.equal(logcnt.cpu(), store.placement.logcnt), f"{what}: logcnt"
    assert_slots_exact(store, info, what=what)


def _step_until(job, done, *, within_s=60.0):
    """Step (as an engine would, once per forward pass) until ``done()``; the layers switched."""
    switched, t0 = [], time.monotonic()
    while not done():
        assert time.monotonic() - t0 < within_s, f"the job made no progress within {within_s} s"
        switched += job.step()
        time.sleep(FORWARD_S)
    return switched


def _run_job(store, info, new, *, layers_per_step=1, **kw):
    old = store.placement
    log2phy, logcnt = store.routing()
    ptrs = (log2phy.data_ptr(), logcnt.data_ptr())
    version = store.version
    job = store.start_rebalance(new, layers_per_step=layers_per_step, **kw)
    steps, order, t0 = 0, [], time.monotonic()
    while not job.done:
        _forward(store, info, old, new, job.switched_layers, ptrs, f"before step {steps}")
        switched = job.step()
        time.sleep(FORWARD_S)
        assert sum(not job.plan.idle[layer] for layer in switched) <= layers_per_step, switched
        order += switched
        steps += 1
        assert time.monotonic() - t0 < 60, "the job made no progress within 60 s"
    assert order == list(range(store.layout.num_layers))
    _forward(store, info, old, new, store.layout.num_layers, ptrs, "done")
    assert job.step() == [] and job.report.version == version + 1 == store.version
    assert store.placement == new
    return job.report


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])],
)
def test_single_process_job_local_moves(tmp_path, qwen, device):
    """World 1: local moves and post copies only, one and two layers per step; the committed
    version reopens exact; while the job is open, other calls are refused."""
    L, E = qwen.num_layers, qwen.num_experts
    gen = torch.Generator().manual_seed(7)
    p0 = random_placement(gen, L=L, E=E, R=1, S=9)
    store = es.ExpertStore.create(
        tmp_path / "store", spec=qwen.spec, placement=p0, checkpoint=qwen.checkpoint(), device=device
    )
    p1 = random_placement(gen, L=L, E=E, R=1, S=9)
    rep = _run_job(store, qwen, p1)
    want = expected_accounting(p0, p1, rank=0, expert_bytes=qwen.spec.nbytes, old_alive=[True], alive=[True], fresh=())
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    assert rep.rounds >= L  # steps answered: one layer each at most
    p2 = random_placement(gen, L=L, E=E, R=1, S=9)
    job = store.start_rebalance(p2, layers_per_step=2)
    with pytest.raises(es.StoreError, match="rebalance job is open"):
        store.rebalance(p2)
    with pytest.raises(es.StoreError, match="rebalance job is open"):
        store.start_rebalance(p2)
    assert store.verify() == L * 9  # read-only calls are allowed
    assert job.step() == []  # the first step reports what is staged; the next ones switch
    first = _step_until(job, lambda: job.switched_layers > 0)
    assert first in ([0], [0, 1]), first
    assert store.verify() == L * 9  # slots and placement agree mid-job
    rep = job.wait()
    assert rep.version == 3 and store.placement == p2
    assert_slots_exact(store, qwen, what="after wait")
    m = es.ManifestLog(tmp_path / "store").read_current()
    assert m.reason == "rebalance" and m.stats["layers_switched"] == L
    again = es.ExpertStore.open(tmp_path / "store", checkpoint=qwen.checkpoint(), device=device)
    assert again.version == 3 and again.placement == p2
    assert_slots_exact(again, qwen, what="reopened")


def test_job_layer_larger_than_staging_switches_by_blocking_rounds(tmp_path, qwen):
    """A layer whose staging alone exceeds staging_bytes is switched by blocking rounds inside one
    step (within staging_bytes), the others through staging; every step exact."""
    L, E = qwen.num_layers, qwen.num_experts
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=E)
    store = es.ExpertStore.create(tmp_path / "store", spec=qwen.spec, placement=p0, checkpoint=qwen.checkpoint())
    rows = p0.phy2log.clone()
    rows[1] = torch.roll(rows[1], 1)  # layer 1: every slot changes (E records of staging)
    rows[2, :2] = rows[2, [1, 0]]  # layer 2: two slots swap
    p1 = es.Placement(rows, num_ranks=1, num_experts=E)
    with pytest.raises(es.StoreError, match="layers_per_step"):
        store.start_rebalance(p1, layers_per_step=0)
    rb = qwen.spec.record_bytes
    rep = _run_job(store, qwen, p1, staging_bytes=4 * rb)
    assert rep.staging_peak <= 4 * rb
    m = es.ManifestLog(tmp_path / "store").read_current()
    assert m.stats["layers_blocking"] == 1 and m.stats["layers_switched"] == L
    assert_slots_exact(es.ExpertStore.open(tmp_path / "store", checkpoint=qwen.checkpoint()), qwen, what="reopened")


# ----------------------------------------------------------------------------- gloo


def job_scenario(rank, world, info, root_base, seed, device="cpu", full=True):
    L, E = info.num_layers, info.num_experts
    S = {2: 5, 3: 4, 4: 2}[world]
    root = root_base / f"rank{rank}"
    gen = torch.Generator().manual_seed(seed)
    kw = dict(rank=rank, world_size=world, timeout_s=COMM_TIMEOUT_S, device=device)
    p0 = random_placement(gen, L=L, E=E, R=world, S=S)
    store = es.ExpertStore.create(root, spec=info.spec, placement=p0, checkpoint=info.checkpoint(), **kw)
    alive = [True] * world
    p1 = random_placement(gen, L=L, E=E, R=world, S=S)
    rep = _run_job(store, info, p1)
    want = expected_accounting(p0, p1, rank=rank, expert_bytes=info.spec.nbytes, old_alive=alive, alive=alive, fresh=())
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    if not full:
        assert_slots_exact(es.ExpertStore.open(root, checkpoint=info.checkpoint(), **kw), info, what="reopened")
        return rep.bytes_p2p
    # two layers a step, staging for about one layer: the job stages what fits
    p2 = random_placement(gen, L=L, E=E, R=world, S=S)
    _run_job(store, info, p2, layers_per_step=2, staging_bytes=2 * S * info.spec.record_bytes)
    # staging for four records: layers that need more are switched by blocking rounds, in step
    p2b = random_placement(gen, L=L, E=E, R=world, S=S)
    _run_job(store, info, p2b, staging_bytes=4 * info.spec.record_bytes)
    assert es.ManifestLog(root).read_current().stats["layers_blocking"] > 0
    # a blocking rebalance afterwards still works, and updates routing() in place
    p3 = random_placement(gen, L=L, E=E, R=world, S=S)
    ptr = store.routing()[0].data_ptr()
    store.rebalance(p3)
    assert store.routing()[0].data_ptr() == ptr and torch.equal(store.routing()[0].cpu(), _padded(p3))
    # disagreement on the job's arguments: every rank raises before anything moves
    before = store.slabs.storage.clone()
    with pytest.raises(es.AgreementError):
        store.start_rebalance(p1, layers_per_step=1 + (rank == 0))
    mine = random_placement(torch.Generator().manual_seed(99 + (rank == 0)), L=L, E=E, R=world, S=S)
    with pytest.raises(es.AgreementError):
        store.start_rebalance(mine)
    assert torch.equal(before, store.slabs.storage) and store.version == 5
    again = es.ExpertStore.open(root, checkpoint=info.checkpoint(), **kw)
    assert again.version == 5 and again.placement == p3
    assert_slots_exact(again, info, what="reopened")
    return rep.bytes_p2p


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [3])  # 2 ranks: the corrupt-record test (CI time)
def test_job_gloo(tmp_path, qwen, world):
    """Layer-by-layer jobs on gloo: exact slots and routing at every step, exact accounting, the
    committed version reopens exact; disagreeing ranks all raise before anything moves."""
    got = run_ranks(job_scenario, world, qwen, tmp_path / "store", 11 + world, timeout_s=200)
    assert any(b > 0 for b in got)


@pytest.mark.timeout(200)
def test_job_gloo_four_ranks(tmp_path, qwen):
    """Four ranks (two slots each): one job, exact slots and routing at every step, exact
    accounting, the committed version reopens exact on every rank."""
    got = run_ranks(job_scenario, 4, qwen, tmp_path / "store", 17, "cpu", False, timeout_s=160)
    assert any(b > 0 for b in got)


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_job_gloo_on_one_gpu(tmp_path, qwen):
    """The same jobs with 3 ranks whose slabs live on one GPU (Triton kernels on CUDA, gloo
    bouncing records through the host, checkpoint reads into device staging)."""
    got = run_ranks(job_scenario, 3, qwen, tmp_path / "store", 5, "cuda:0", timeout_s=280)
    assert any(b > 0 for b in got)


def corrupt_scenario(rank, world, info, root):
    """Rank 1 corrupts the records it sends for layer 1: layer 0 switches, then every rank raises
    IntegrityError naming layer 1; layer 0 is committed as a partial version."""
    L, E = info.num_layers, info.num_experts
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=world, slots_per_rank=E // world)
    store = es.ExpertStore.create(root / f"rank{rank}", spec=info.spec, placement=p0, checkpoint=info.checkpoint(),
                                  rank=rank, world_size=world, timeout_s=COMM_TIMEOUT_S)  # fmt: skip
    p1 = es.Placement(torch.roll(p0.phy2log, E // world, dims=1), num_ranks=world, num_experts=E)
    if rank == 1:
        real = Comm.start_exchange

        def corrupting(self, sends, recvs, *, seq):
            if seq == 1:
                sends = {p: t.clone() for p, t in sends.items()}
                for t in sends.values():
                    t[:16].bitwise_xor_(0xFF)
            return real(self, sends, recvs, seq=seq)

        Comm.start_exchange = corrupting
    job = store.start_rebalance(p1)
    with pytest.raises(es.IntegrityError, match="layer 1 expert") as failed:
        _step_until(job, lambda: False)
    assert job.switched_layers == 1  # layer 0 was ready everywhere, layer 1 failed on rank 0
    message = str(failed.value)
    assert "rank 1" in message, message
    assert job.failed is not None and store.version == 2 and store._job is None
    with pytest.raises(es.StoreError, match="ended"):
        job.step()
    m = es.ManifestLog(root / f"rank{rank}").read_current()
    assert m.reason == "rebalance-partial" and m.stats["layers_switched"] == 1
    want = torch.cat([p1.phy2log[:1], p0.phy2log[1:]])
    assert torch.equal(store.placement.phy2log, want)
    assert_slots_exact(store, info, what="after the corrupt record")
    store.verify()
    again = es.ExpertStore.open(root / f"rank{rank}", checkpoint=info.checkpoint(), rank=rank, world_size=world)
    assert torch.equal(again.placement.phy2log, want)
    assert_slots_exact(again, info, what="reopened partial")
    return message


@pytest.mark.timeout(180)
def test_job_verify_catches_corrupt_record(tmp_path, qwen):
    """A record corrupted in flight is caught in staging, before it touches a live slot."""
    messages = run_ranks(corrupt_scenario, 2, qwen, tmp_path, timeout_s=150)
    assert "this rank staged layer 1" in messages[0] and "from rank 1" in messages[0], messages


def killed_scenario(rank, world, info, root):
    """Rank 2 dies (os._exit) once layer 0 has switched; survivors raise PeerTimeoutError."""
    L, E = info.num_layers, info.num_experts
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=world, slots_per_rank=E // world)
    store = es.ExpertStore.create(root, spec=info.spec, placement=p0, checkpoint=info.checkpoint(), rank=rank,
                                  world_size=world, timeout_s=8.0)  # fmt: skip
    p1 = es.Placement(torch.roll(p0.phy2log, E // world, dims=1), num_ranks=world, num_experts=E)
    job = store.start_rebalance(p1)
    if rank == 2:
        _step_until(job, lambda: job.switched_layers > 0)
        os._exit(17)  # right after a step: its peers may be in the same step or the next
    t0 = time.monotonic()
    with pytest.raises(es.PeerTimeoutError) as failed:
        _step_until(job, lambda: False)
    waited = time.monotonic() - t0
    assert "rank 2" in str(failed.value), str(failed.value)
    assert store.version == 2 and store._job is None
    k = job.switched_layers  # the survivors got the same tables: they switched the same layers
    assert 1 <= k < L
    want = torch.cat([p1.phy2log[:k], p0.phy2log[k:]])
    assert torch.equal(store.placement.phy2log, want)
    assert_slots_exact(store, info, what="survivor after the failure")
    assert store.weights("w2", 0) is not None  # usable
    m = es.ManifestLog(root).read_current()
    assert m.reason == "rebalance-partial" and m.stats["layers_switched"] == k
    again = es.ExpertStore.open(root, checkpoint=info.checkpoint(), rank=rank, world_size=world)
    assert torch.equal(again.placement.phy2log, want)
    assert_slots_exact(again, info, what="reopened partial")
    return waited, k


@pytest.mark.timeout(180)
def test_job_peer_killed(tmp_path, qwen):
    """A peer killed mid-job: survivors raise PeerTimeoutError within about timeout_s, the switched
    layers are committed as a partial version (one shared root: identical commits) that opens exact."""
    got = run_ranks(killed_scenario, 3, qwen, tmp_path / "store", timeout_s=150, may_die=(2,))
    assert got[2] is None and got[0][1] == got[1][1], got
    assert all(w < 2 * 8.0 + 5 for w, _ in got[:2]), got


def lost_rank_scenario(rank, world, info, root, device="cpu"):
    """Rank 2 is gone before the job: survivors read its unique experts from the checkpoint into
    staging (verified there) and switch layer by layer."""
    L, E = info.num_layers, info.num_experts
    p0 = es.Placement(torch.tensor([[0, 1, 2, 3, 0, 1, 4, 5, 2]] * L), num_ranks=world, num_experts=E)
    store = es.ExpertStore.create(root / f"rank{rank}", spec=info.spec, placement=p0, checkpoint=info.checkpoint(),
                                  rank=rank, world_size=world, timeout_s=COMM_TIMEOUT_S, device=device)  # fmt: skip
    if rank == 2:
        return None
    alive = [True, True, False]
    # experts 4 and 5 (rank 2's only) go to the survivors, whose experts change places
    p1 = es.Placement(torch.tensor([[4, 2, 1, 0, 3, 5, 0, 0, 0]] * L), num_ranks=world, num_experts=E)
    rep = _run_job(store, info, p1, alive=alive)
    want = expected_accounting(p0, p1, rank=rank, expert_bytes=info.spec.nbytes, old_alive=[True] * 3, alive=alive,
                               fresh=())  # fmt: skip
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    assert rep.bytes_disk > 0
    again = es.ExpertStore.open(root / f"rank{rank}", checkpoint=info.checkpoint(), rank=rank, world_size=world,
                                device=device)  # fmt: skip
    assert again.placement == p1 and not bool(again.alive[2])
    assert_slots_exact(again, info, what="reopened")
    return rep.bytes_disk


@pytest.mark.timeout(180)
def test_job_with_a_lost_rank_reads_the_checkpoint(tmp_path, qwen):
    """Experts only the lost rank held come from the checkpoint, through verified staging."""
    got = run_ranks(lost_rank_scenario, 3, qwen, tmp_path, timeout_s=150)
    assert got[2] is None and got[0] > 0 and got[1] > 0


@pytest.mark.gpu
@pytest.mark.timeout(200)
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_job_with_a_lost_rank_on_one_gpu(tmp_path, qwen):
    """Checkpoint reads into device staging, verified by the CUDA checksum kernel."""
    got = run_ranks(lost_rank_scenario, 3, qwen, tmp_path, "cuda:0", timeout_s=180)
    assert got[2] is None and got[0] > 0 and got[1] > 0


def _switched_exact(store, info, switched: int, what: str) -> None:
    """Layers 0..switched-1 of this rank's slots hold the checkpoint experts the placement names."""
    experts = store.placement.rank_experts(store.rank)
    for layer in range(switched):
        for s, e in enumerate(experts[layer].tolist()):
            for name, w in info.expected_expert(layer, e).items():
                got = store.weights(name, layer)[s]
                assert torch.equal(got.view(torch.uint8), w.contiguous().view(torch.uint8)), (
                    f"{what}: rank {store.rank} layer {layer} slot {s} {name} != expert {e}"
                )


def fresh_scenario(rank, world, info, root):
    """Rank 2 restarts empty (ExpertStore.join) and is filled by a job, layer by layer, while the
    others serve; on the fresh rank only switched layers are checked (the others hold nothing)."""
    L, E = info.num_layers, info.num_experts
    gen = torch.Generator().manual_seed(31)
    kw = dict(rank=rank, world_size=world, timeout_s=COMM_TIMEOUT_S)
    p0 = random_placement(gen, L=L, E=E, R=world, S=4)
    store = es.ExpertStore.create(root, spec=info.spec, placement=p0, checkpoint=info.checkpoint(), **kw)
    if rank == 2:  # the process restarts: its memory is gone
        store.close()
        store = es.ExpertStore.join(root, checkpoint=info.checkpoint(), **kw)
        store.slabs.storage.fill_(0xA5)
    p1 = random_placement(gen, L=L, E=E, R=world, S=4)
    job = store.start_rebalance(p1, fresh=(2,))
    t0 = time.monotonic()
    while not job.done:
        k = job.switched_layers
        if rank == 2:
            _switched_exact(store, info, k, f"fresh rank, {k} layers switched")
        else:
            assert_slots_exact(store, info, what=f"{k} layers switched")
        job.step()
        time.sleep(FORWARD_S)
        assert time.monotonic() - t0 < 60
    assert_slots_exact(store, info, what="done")
    assert store.verify() == L * 4 and store.placement == p1
    want = expected_accounting(p0, p1, rank=rank, expert_bytes=info.spec.nbytes, old_alive=[True] * world,
                               alive=[True] * world, fresh=(2,), relay_missing=True)  # fmt: skip
    rep = job.report
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    return rep.bytes_p2p


@pytest.mark.timeout(180)
def test_job_fills_a_fresh_rank(tmp_path, qwen):
    """A rank that joined empty is filled through a job (from its peers), exact at every step."""
    got = run_ranks(fresh_scenario, 3, qwen, tmp_path / "store", timeout_s=150)
    assert got[2] > 0


def engine_traffic_scenario(rank, world, info, root):
    """The engine runs a collective of its own (all_reduce on the default group) at every forward
    while the job's transfers run on the store's two groups; nothing hangs, every step is exact."""
    import torch.distributed as dist

    L, E = info.num_layers, info.num_experts
    store_group = dist.new_group(backend="gloo")  # every process makes both groups, in this order
    transfer_group = dist.new_group(backend="gloo")
    gen = torch.Generator().manual_seed(41)
    p0 = random_placement(gen, L=L, E=E, R=world, S=4)
    store = es.ExpertStore.create(root / f"rank{rank}", spec=info.spec, placement=p0, checkpoint=info.checkpoint(),
                                  group=store_group, timeout_s=COMM_TIMEOUT_S)  # fmt: skip
    with pytest.raises(es.StoreError, match="another process group"):
        store.start_rebalance(p0, transfer_group=store_group)
    for n, p in enumerate([random_placement(gen, L=L, E=E, R=world, S=4)]):
        job = store.start_rebalance(p, transfer_group=transfer_group, staging_bytes=8 * info.spec.record_bytes)
        steps = 0
        while not job.done:
            x = torch.full((1024,), float(rank + 1))
            dist.all_reduce(x)  # the engine's dispatch stands in here
            assert torch.equal(x, torch.full((1024,), float(world * (world + 1) // 2)))
            assert_slots_exact(store, info, what=f"job {n} step {steps}")
            job.step()
            steps += 1
            assert steps < 500
        assert store.placement == p
    return steps


@pytest.mark.timeout(180)
def test_job_beside_engine_collectives(tmp_path, qwen):
    """Engine collectives on another group at every step, the job on its own groups."""
    got = run_ranks(engine_traffic_scenario, 3, qwen, tmp_path, timeout_s=150)
    assert all(s >= qwen.num_layers for s in got)


def test_job_into_engine_owned_weights(tmp_path, qwen):
    """A job fills the engine's own tensors: the same storage before, during and after."""
    L, E = qwen.num_layers, qwen.num_experts
    gen = torch.Generator().manual_seed(5)
    p0 = random_placement(gen, L=L, E=E, R=1, S=8)
    poisoned = lambda t: torch.full((8 * t.nbytes,), 0xA5, dtype=torch.uint8).view(t.dtype).view(8, *t.shape)
    w = {t.name: [poisoned(t) for _ in range(L)] for t in qwen.spec.tensors}
    store = es.ExpertStore.create(tmp_path / "s", spec=qwen.spec, placement=p0, checkpoint=qwen.checkpoint(),
                                  weights=w)  # fmt: skip
    ptrs = {(n, layer): t.data_ptr() for n, ts in w.items() for layer, t in enumerate(ts)}
    _run_job(store, qwen, random_placement(gen, L=L, E=E, R=1, S=8), layers_per_step=2)
    assert all(store.weights(n, layer).data_ptr() == p for (n, layer), p in ptrs.items())
    assert_slots_exact(store, qwen, what="engine tensors after the job")


def relay_scenario(rank, world, info, root):
    """Rank 2 is gone; its experts 4 and 5 are needed by both survivors: each is read from the
    checkpoint once (by one survivor) and relayed to the other within the job."""
    L, E = info.num_layers, info.num_experts
    p0 = es.Placement(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]] * L), num_ranks=world, num_experts=E)
    store = es.ExpertStore.create(root / f"rank{rank}", spec=info.spec, placement=p0, checkpoint=info.checkpoint(),
                                  rank=rank, world_size=world, timeout_s=COMM_TIMEOUT_S)  # fmt: skip
    if rank == 2:
        return None
    alive = [True, True, False]
    p1 = es.Placement(torch.tensor([[4, 5, 0, 1, 4, 5, 2, 3, 0, 0, 0, 0]] * L), num_ranks=world, num_experts=E)
    rep = _run_job(store, info, p1, alive=alive)
    want = expected_accounting(p0, p1, rank=rank, expert_bytes=info.spec.nbytes, old_alive=[True] * 3, alive=alive,
                               fresh=(), relay_missing=True)  # fmt: skip
    assert (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk, rep.missing) == want
    return rep.bytes_disk


@pytest.mark.timeout(180)
def test_job_reads_each_missing_expert_once(tmp_path, qwen):
    """Two survivors need the lost rank's experts: the disk bytes over the ranks are those of the
    distinct missing experts (2 per layer), every slot exact at every step."""
    got = run_ranks(relay_scenario, 3, qwen, tmp_path, timeout_s=150)
    assert got[2] is None and got[0] + got[1] == 2 * qwen.num_layers * qwen.spec.nbytes, got

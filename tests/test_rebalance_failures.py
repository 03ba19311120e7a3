"""Failure paths of the distributed rebalance (gloo, CPU): nothing hangs, nothing false is committed."""

from __future__ import annotations

import time

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks

import expert_store as es


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return cf.write_qwen(tmp_path_factory.mktemp("qwen"), H=128, I=64, num_layers=2, num_experts=8)


def _create(rank, world, info, root, timeout_s):
    p0 = es.Placement.contiguous(num_layers=2, num_experts=8, num_ranks=world, slots_per_rank=4)
    store = es.ExpertStore.create(
        root, spec=info.spec, placement=p0, checkpoint=info.checkpoint(), rank=rank, world_size=world,
        timeout_s=timeout_s,
    )  # fmt: skip
    swapped = es.Placement(torch.cat([p0.phy2log[:, 4:], p0.phy2log[:, :4]], dim=1), num_ranks=world, num_experts=8)
    return store, swapped


def silent_peer(rank, world, info, root):
    """Rank 1 is listed alive but never calls rebalance: rank 0 must raise within its timeout."""
    store, target = _create(rank, world, info, root, timeout_s=3.0)
    if rank == 1:
        time.sleep(8.0)  # alive, but busy elsewhere: never enters the rebalance
        return "silent"
    t0 = time.monotonic()
    with pytest.raises(es.PeerTimeoutError, match="rank 1"):
        store.rebalance(target)
    waited = time.monotonic() - t0
    assert waited < 6.0, waited
    assert store.version == 1 and es.ManifestLog(root).latest() == 1
    return waited


def corrupt_source(rank, world, info, root):
    """Rank 0 holds a corrupted copy of an expert it must send: rank 1's verify fails, so no rank
    commits, every rank raises IntegrityError and refuses further use until reopened."""
    store, target = _create(rank, world, info, root, timeout_s=30.0)
    if rank == 0:
        store.weights("w2", 1)[2].view(torch.uint8).reshape(-1)[5] ^= 0xFF
    with pytest.raises(es.IntegrityError, match="verification failed on ranks \\[1\\]"):
        store.rebalance(target, verify=True)
    assert store.version == 1 and es.ManifestLog(root).latest() == 1
    with pytest.raises(es.StoreError, match="unusable"):
        store.rebalance(target)
    again = es.ExpertStore.open(root, checkpoint=info.checkpoint(), rank=rank, world_size=world)
    assert again.version == 1 and again.verify() == 8
    return "ok"


@pytest.mark.timeout(120)
def test_silent_peer_times_out_instead_of_hanging(tmp_path, ckpt):
    """A live-listed rank that never answers makes the others raise PeerTimeoutError naming it,
    within the store's timeout; the version is unchanged."""
    waited, silent = run_ranks(silent_peer, 2, ckpt, tmp_path / "store", timeout_s=90)
    assert silent == "silent" and waited >= 2.5


@pytest.mark.timeout(120)
def test_failed_verification_commits_nothing(tmp_path, ckpt):
    """A corrupted source detected by verify=True on the receiver: no version is committed anywhere."""
    assert run_ranks(corrupt_source, 2, ckpt, tmp_path / "store", timeout_s=90) == ["ok", "ok"]


def manifest_write_fails(rank, world, info, root):
    """Rank 1 cannot write the new manifest (disk full, say) while the bytes move: the failure
    travels with the completion messages, so no rank commits and every rank names rank 1."""
    store, target = _create(rank, world, info, root, timeout_s=30.0)
    if rank == 1:

        def refuse(self, m):
            raise es.ManifestError(f"{self.dir}: cannot write the manifest: no space left on device")

        es.ManifestLog.prepare = refuse  # this process only
    with pytest.raises(es.ManifestError, match="manifest could not be written on ranks \\[1\\]"):
        store.rebalance(target)
    assert store.version == 1 and es.ManifestLog(root).latest() == 1
    with pytest.raises(es.StoreError, match="unusable"):
        store.rebalance(target)
    return "ok"


@pytest.mark.timeout(120)
def test_failed_manifest_write_commits_nothing(tmp_path, ckpt):
    """A rank that cannot write the new manifest stops the commit on every rank: version stays 1."""
    assert run_ranks(manifest_write_fails, 2, ckpt, tmp_path / "store", timeout_s=90) == ["ok", "ok"]


def staging_out_of_memory(rank, world, info, root):
    """Rank 1 cannot allocate its staging (device memory full, say). It finds out before the
    agreement message goes out, so every rank raises at once, naming it, with nothing moved;
    the store stays usable and the same rebalance succeeds once memory is back."""
    store, target = _create(rank, world, info, root, timeout_s=30.0)
    before = store.slabs.storage.clone()
    real_empty = torch.empty
    if rank == 1:

        def no_memory(*size, **kw):
            t = real_empty(*size, **kw)
            if t.dtype == torch.uint8 and t.numel() >= info.spec.record_bytes:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return t

        torch.empty = no_memory
    expected = "cannot allocate" if rank == 1 else r"refused before anything moved by rank 1 \(no plan or no staging"
    with pytest.raises(es.StoreError, match=expected):
        store.rebalance(target)
    torch.empty = real_empty
    assert torch.equal(store.slabs.storage, before) and store.version == 1
    store.rebalance(target)
    assert store.version == 2
    return "ok"


@pytest.mark.timeout(120)
def test_staging_out_of_memory_refuses_everywhere(tmp_path, ckpt):
    """A rank without staging memory makes every rank refuse the rebalance before any byte moves."""
    assert run_ranks(staging_out_of_memory, 2, ckpt, tmp_path / "store", timeout_s=90) == ["ok", "ok"]

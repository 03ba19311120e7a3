"""The store over the engine's own weight tensors: adopted as they are, never copied or moved.

Engine tensors come per (layer, tensor) from separate allocations, or carved from one uint8 buffer
at offsets that break 16-byte (and for fp8, even word) alignment, so the kernels' address table
and their narrow paths carry every byte. Slots are compared with the checkpoint by torch.equal.
"""

from __future__ import annotations

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks
from store_util import assert_slots_exact, random_placement

import expert_store as es
from expert_store.errors import IntegrityError, SpecError, StoreError
from expert_store.kernels import reference as ref

L, E = 2, 4  # few slots: under Triton's interpreter the kernels cost per slot (CI time)
POISON = 0xA5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return cf.write_deepseek(tmp_path_factory.mktemp("ds"), H=256, I=128, num_layers=L, num_experts=E)


def engine_weights(spec, S, *, carve: str = "separate", device="cpu") -> dict[str, list[torch.Tensor]]:
    """Poisoned ``[S, *shape]`` tensors per (name, layer). carve: "separate" (one allocation each),
    "misaligned" (one uint8 buffer, each tensor at itemsize mod 16: fp8 at odd addresses, float32
    at 4 mod 16), "scales" (only the float32 scales at 4 mod 16, everything else 16-aligned)."""
    if carve == "separate":
        fresh = lambda t: torch.full((S * t.nbytes,), POISON, dtype=torch.uint8, device=device)
        return {t.name: [fresh(t).view(t.dtype).view(S, *t.shape) for _ in range(L)] for t in spec.tensors}
    sizes = [S * t.nbytes + 32 for t in spec.tensors] * L
    buf = torch.full((sum(sizes) + 64,), POISON, dtype=torch.uint8, device=device)
    base = -buf.data_ptr() % 16  # offsets below are relative to a 16-aligned address
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in spec.tensors}
    off = base
    for _ in range(L):
        for t in spec.tensors:
            shift = t.itemsize % 16 if carve == "misaligned" or t.dtype == torch.float32 else 0
            start = -(-off // 16) * 16 + shift
            out[t.name].append(buf[start : start + S * t.nbytes].view(t.dtype).view(S, *t.shape))
            off = start + S * t.nbytes
    return out


def _u8(x: torch.Tensor) -> torch.Tensor:
    """The bytes of ``x`` (torch.equal on float8 values would call a NaN pattern unequal to itself)."""
    return x.reshape(-1).view(torch.uint8)


def _ptrs(weights):
    return {(n, layer): x.data_ptr() for n, xs in weights.items() for layer, x in enumerate(xs)}


def _create(root, info, placement, **kw):
    return es.ExpertStore.create(root, spec=info.spec, placement=placement, checkpoint=info.checkpoint(), **kw)


@pytest.mark.parametrize("carve", ["separate", "misaligned", "scales"])
def test_store_over_engine_tensors(tmp_path, ds, carve):
    """create fills the engine's tensors with the checkpoint bytes; rebalances move bytes inside them
    (never the tensors); open reloads into fresh ones; close leaves them to the engine."""
    gen = torch.Generator().manual_seed(3)
    S = 5
    w = engine_weights(ds.spec, S, carve=carve)
    ptrs = _ptrs(w)
    store = _create(tmp_path / "s", ds, random_placement(gen, L=L, E=E, R=1, S=S), weights=w)
    assert_slots_exact(store, ds, what="create")
    for step in range(2):
        store.rebalance(random_placement(gen, L=L, E=E, R=1, S=S), staging_bytes=4 * ds.spec.record_bytes)
        assert_slots_exact(store, ds, what=f"rebalance {step}")
        for (n, layer), p in ptrs.items():
            assert store.weights(n, layer).data_ptr() == p and store.weights(n, layer) is w[n][layer]
    assert store.verify() == L * S
    held = {(n, layer): _u8(w[n][layer]).clone() for n, layer in ptrs}
    store.close()
    assert all(torch.equal(_u8(w[n][layer]), x) for (n, layer), x in held.items())  # close wrote nothing
    w2 = engine_weights(ds.spec, S, carve=carve)
    with es.ExpertStore.open(tmp_path / "s", weights=w2) as again:
        assert_slots_exact(again, ds, what="open")
        assert again.weights("w2", 1).data_ptr() == w2["w2"][1].data_ptr()


def _pattern(spec, S, experts: torch.Tensor, carve: str) -> dict[str, list[torch.Tensor]]:
    """Engine tensors whose every byte encodes (layer, expert, tensor, position): slots holding one
    expert hold the same bytes."""
    w = engine_weights(spec, S, carve=carve)
    for ti, t in enumerate(spec.tensors):
        for layer in range(L):
            for s in range(S):
                e = int(experts[layer, s])
                i = torch.arange(t.nbytes, dtype=torch.int64) * 0x9E3779B1 + (layer * 97 + e * 13 + ti) * 0x85EBCA6B
                _u8(w[t.name][layer][s]).copy_((i >> 13) & 0xFF)
    return w


@pytest.mark.parametrize("carve", ["separate", "misaligned"])
def test_loaded_adopts_the_bytes(tmp_path, ds, carve):
    """create(loaded=True) keeps the tensors' bytes, and the manifest's checksums are theirs: equal to
    the checksum definition over the same bytes packed as records, and to those of a store that
    loaded the same bytes from the checkpoint; verify() passes, a flipped byte is caught."""
    S = 6  # slots 4 and 5 repeat experts 0 and 1
    placement = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=S)
    experts = placement.rank_experts(0)
    w = _pattern(ds.spec, S, experts, carve)
    before = {(n, layer): _u8(x).clone() for n, xs in w.items() for layer, x in enumerate(xs)}
    store = _create(tmp_path / "a", ds, placement, weights=w, loaded=True)
    assert all(torch.equal(_u8(w[n][layer]), x) for (n, layer), x in before.items())
    m = es.ManifestLog(tmp_path / "a").read()
    for layer in range(L):
        for s in range(S):
            e = int(experts[layer, s])
            rec = torch.zeros(ds.spec.record_bytes, dtype=torch.uint8)
            for t, off in zip(ds.spec.tensors, ds.spec.record_offsets):
                rec[off : off + t.nbytes] = _u8(w[t.name][layer][s])
            assert int(m.checksums[layer, e]) == int(ref.slab_checksums_reference(rec, ds.spec, 1)[0])
    assert store.verify() == L * S
    _u8(w["w13_scale"][1][3])[5] ^= 1
    with pytest.raises(IntegrityError, match="layer 1 slot 3"):
        store.verify()
    store.close()
    # The checkpoint's own bytes, adopted: the same checksums as the store that read them itself.
    with _create(tmp_path / "b", ds, placement) as loaded:
        w3 = engine_weights(ds.spec, S, carve=carve)
        for n, xs in w3.items():
            for layer, x in enumerate(xs):
                _u8(x).copy_(_u8(loaded.weights(n, layer)))
        want = loaded.checksums
    with _create(tmp_path / "c", ds, placement, weights=w3, loaded=True) as adopted:
        assert torch.equal(adopted.checksums, want)


def _bad(spec, S, case):
    w = engine_weights(spec, S)
    if case == "missing":
        del w["w2_scale"]
    elif case == "extra":
        w["w4"] = w["w2"]
    elif case == "layers":
        w["w2"] = w["w2"][:1]
    elif case == "shape":
        w["w2"][1] = w["w2"][1][:-1]
    elif case == "dtype":
        w["w13_scale"][0] = w["w13_scale"][0].to(torch.float16)
    elif case == "device":
        w["w2"][1] = torch.empty_like(w["w2"][1], device="meta")
    elif case == "contiguous":
        x = w["w13_scale"][1]
        w["w13_scale"][1] = torch.empty(x.shape[::-1], dtype=x.dtype).transpose(0, -1)
    elif case == "layers-share":
        w["w2"][1] = w["w2"][0]
    elif case == "tensors-overlap":
        x = w["w13"][1]
        w["w2"][0] = x.view(-1)[: w["w2"][0].numel()].view(w["w2"][0].shape)
    elif case == "not-a-mapping":
        w = list(w.values())
    return w


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing", SpecError, r"missing \['w2_scale'\]"),
        ("extra", SpecError, r"extra \['w4'\]"),
        ("layers", SpecError, r"weights\['w2'\] must hold one tensor per layer \(2\), got 1"),
        ("shape", SpecError, r"weights\['w2'\] layer 1 must be .*\[10, 256, 128\].*got .*\[9, 256, 128\]"),
        ("dtype", SpecError, r"weights\['w13_scale'\] layer 0 must be torch.float32.*got torch.float16"),
        ("device", StoreError, r"weights\['w2'\] layer 1 must be on cpu"),
        ("contiguous", StoreError, r"weights\['w13_scale'\] layer 1 must be contiguous"),
        ("layers-share", StoreError, r"weights\['w2'\] layer 0 and weights\['w2'\] layer 1 share memory"),
        ("tensors-overlap", StoreError, r"weights\['w2'\] layer 0 and weights\['w13'\] layer 1 share memory"),
        ("not-a-mapping", StoreError, r"weights must be a mapping"),
    ],
)
def test_bad_weights_are_named(tmp_path, ds, case, error, message):
    placement = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=10)
    with pytest.raises(error, match=message):
        _create(tmp_path / "s", ds, placement, weights=_bad(ds.spec, 10, case))
    assert es.ManifestLog(tmp_path / "s").latest() is None


def test_loaded_needs_weights_and_join_holds_them(tmp_path, ds):
    placement = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=5)
    with pytest.raises(StoreError, match="loaded=True"):
        _create(tmp_path / "s", ds, placement, loaded=True)
    _create(tmp_path / "s", ds, placement).close()
    w = engine_weights(ds.spec, 5, carve="misaligned")
    with es.ExpertStore.join(tmp_path / "s", weights=w) as joined:
        assert joined.weights("w13", 1) is w["w13"][1]
        with pytest.raises(StoreError, match="joined"):
            joined.verify()


def _gloo_scenario(rank, world, info, root, carve):
    gen = torch.Generator().manual_seed(11)
    S = 3
    w = engine_weights(info.spec, S, carve=carve if rank == 0 else "separate")
    ptrs = _ptrs(w)
    kw = dict(rank=rank, world_size=world, timeout_s=60.0)
    store = _create(root, info, random_placement(gen, L=L, E=E, R=world, S=S), weights=w, **kw)
    assert_slots_exact(store, info, what="create")
    for step in range(2):
        store.rebalance(random_placement(gen, L=L, E=E, R=world, S=S), staging_bytes=6 * info.spec.record_bytes)
        assert_slots_exact(store, info, what=f"rebalance {step}")
        assert all(store.weights(n, layer).data_ptr() == p for (n, layer), p in ptrs.items())
    store.close()
    return True


def test_gloo_two_ranks_over_engine_tensors(tmp_path, ds):
    """Two gloo ranks, rank 0 over misaligned carved tensors: peer moves land in the engine's tensors."""
    assert run_ranks(_gloo_scenario, 2, ds, tmp_path / "g", "misaligned", timeout_s=240.0) == [True, True]


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_over_engine_tensors_sees_rebalanced_weights(tmp_path, ds):
    """A CUDA graph captured over the engine's tensors (a kernel reading w2 of slot 0) replays with the
    expert a rebalance moved into that slot: the tensors were written in place, never replaced. The
    captured kernel copies the slot's bytes (a matmul over random fp8 bytes would compare NaNs)."""
    S = 8
    gen = torch.Generator().manual_seed(5)
    p0 = random_placement(gen, L=L, E=E, R=1, S=S)
    w = engine_weights(ds.spec, S, device="cuda")
    store = _create(tmp_path / "s", ds, p0, weights=w, device="cuda")
    w2 = store.weights("w2", 0)
    seen = torch.empty_like(w2[0].view(torch.uint8))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        seen.copy_(w2[0].view(torch.uint8))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.copy_(w2[0].view(torch.uint8))
    p1 = p0
    while int(p1.rank_experts(0)[0, 0]) == int(p0.rank_experts(0)[0, 0]):
        p1 = random_placement(gen, L=L, E=E, R=1, S=S)
    store.rebalance(p1)
    assert store.weights("w2", 0).data_ptr() == w["w2"][0].data_ptr()
    seen.fill_(0xA5)
    graph.replay()
    torch.cuda.synchronize()
    e = int(p1.rank_experts(0)[0, 0])
    assert torch.equal(seen.cpu(), ds.expected_expert(0, e)["w2"].view(torch.uint8))
    store.close()

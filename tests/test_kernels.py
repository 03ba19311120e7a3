"""Pack / unpack / checksum kernels: bit-exact byte movement, checksum identity, host-side staging.

Symbols: L layers, S slots per rank, T tensors per expert, n experts in one call.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny. Small-shape tests run on "cpu" and,
where CUDA exists, also on "cuda" (marked gpu); the real-size tests at the end
are GPU only. Every byte of test data comes from a generator seeded by (layer,
slot, tensor), destinations are poisoned first (twice, with two different
values, so an unwritten byte cannot match by chance), and comparisons are
``torch.equal`` on uint8 views.
"""

from __future__ import annotations

import re

import pytest
import torch

import expert_store.kernels.records as records_mod
from expert_store import presets
from expert_store.errors import SpecError, StoreError
from expert_store.kernels import (
    KernelConfig,
    chunks_per_expert,
    pack_records,
    resident_checksums,
    slab_checksums,
    unpack_records,
)
from expert_store.kernels import reference as ref
from expert_store.layout import SlabLayout
from expert_store.spec import ExpertSpec, TensorSpec

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[gpu, needs_cuda]),
]

ALL_DTYPES = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.int8,
    torch.uint8,
    torch.int32,
]

# Tiny chunks and blocks: tensors of a few hundred bytes span several chunks,
# chunks span several loop iterations, and tails are partial (interpreter-sized).
SMALL = KernelConfig(chunk_bytes=64, block_bytes=16, num_warps=1)
CONFIGS = [pytest.param(None, id="default"), pytest.param(SMALL, id="small-chunks")]

POISONS = (0xA5, 0x5A)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _seed(layer: int, slot: int, tensor: int, salt: int = 0) -> int:
    return ((salt * 1009 + layer) * 1009 + slot) * 101 + tensor + 1


def fill_storage(layout: SlabLayout, device: str, *, salt: int = 0) -> torch.Tensor:
    """uint8 [L * layer_bytes]: slot bytes random per (layer, slot, tensor), region padding 0xEE."""
    storage = torch.full((layout.total_bytes,), 0xEE, dtype=torch.uint8, device=device)
    for layer in range(layout.num_layers):
        for slot in range(layout.slots):
            for t, ts in enumerate(layout.spec.tensors):
                g = torch.Generator(device=device).manual_seed(_seed(layer, slot, t, salt))
                off = layout.slot_offset(layer, slot, t)
                storage[off : off + ts.nbytes] = torch.randint(
                    0, 256, (ts.nbytes,), dtype=torch.uint8, generator=g, device=device
                )
    return storage


def slot_bytes(storage: torch.Tensor, layout: SlabLayout, layer: int, slot: int, t: int) -> torch.Tensor:
    """uint8 [nbytes_t] of tensor t of (layer, slot), by the layout's arithmetic (independent of the kernels)."""
    off = layout.slot_offset(layer, slot, t)
    return storage[off : off + layout.spec.tensors[t].nbytes]


def record_bytes(slab: torch.Tensor, spec: ExpertSpec, record: int, t: int) -> torch.Tensor:
    """uint8 [nbytes_t] of tensor t of a record."""
    off = record * spec.record_bytes + spec.record_offsets[t]
    return slab[off : off + spec.tensors[t].nbytes]


def idx(values, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def random_items(layout: SlabLayout, n: int, seed: int, *, distinct: bool = True) -> tuple[list[int], list[int]]:
    """n (layer, slot) pairs in random order, covering several layers."""
    g = torch.Generator().manual_seed(seed)
    total = layout.num_layers * layout.slots
    if distinct:
        flat = torch.randperm(total, generator=g)[:n].tolist()
    else:
        flat = torch.randint(0, total, (n,), generator=g).tolist()
    return [f // layout.slots for f in flat], [f % layout.slots for f in flat]


def checksum_definition(parts: list[bytes], spec: ExpertSpec) -> int:
    """The checksum exactly as the definition reads, in Python ints (the test's own oracle)."""
    mask = (1 << 64) - 1
    w = spec.word_bytes
    total = 0
    for t, data in enumerate(parts):
        for i in range(len(data) // w):
            word = int.from_bytes(data[i * w : (i + 1) * w], "little")
            p = spec.record_offsets[t] // w + i
            z = (word + (p + 1) * 0x9E3779B97F4A7C15) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            z = z ^ (z >> 31)
            total = (total + z) & mask
    return total - (1 << 64) if total >= 1 << 63 else total


class LaunchCounter:
    """Stands in for a Triton kernel object and records each launch's grid."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


# Specs: aligned (every size a multiple of 16), odd sizes with W = 4, 2 and 1.
def spec_all_dtypes() -> ExpertSpec:
    return ExpertSpec([TensorSpec(f"t{i}", (4, 16), dt) for i, dt in enumerate(ALL_DTYPES)])


def spec_odd_w4() -> ExpertSpec:
    # 12, 20, 4 bytes: W = 4, slot starts not 16-aligned, a one-element scale.
    return ExpertSpec(
        [
            TensorSpec("w", (3,), torch.float32),
            TensorSpec("v", (2, 5), torch.bfloat16),
            TensorSpec("s", (1,), torch.int32),
        ]
    )


def spec_odd_w2() -> ExpertSpec:
    # 30, 4, 14, 2 bytes: W = 2.
    return ExpertSpec(
        [
            TensorSpec("w13", (3, 5), torch.bfloat16),
            TensorSpec("w13_scale", (1,), torch.float32),
            TensorSpec("w2", (2, 7), torch.float8_e4m3fn),
            TensorSpec("w2_scale", (2,), torch.int8),
        ]
    )


def spec_bytes_w1() -> ExpertSpec:
    # a 3-byte tensor forces W = 1; 15 and 8 bytes beside it.
    return ExpertSpec(
        [
            TensorSpec("tiny", (3,), torch.uint8),
            TensorSpec("w", (5, 3), torch.float8_e5m2),
            TensorSpec("h", (4,), torch.bfloat16),
        ]
    )


def spec_multichunk() -> ExpertSpec:
    # 400-byte and 36-byte tensors: several SMALL chunks each, with partial tails.
    return ExpertSpec([TensorSpec("w", (10, 20), torch.float16), TensorSpec("s", (9,), torch.float32)])


SPECS = [
    pytest.param(spec_all_dtypes, id="all-dtypes-aligned"),
    pytest.param(spec_odd_w4, id="odd-w4"),
    pytest.param(spec_odd_w2, id="odd-w2"),
    pytest.param(spec_bytes_w1, id="bytes-w1"),
    pytest.param(spec_multichunk, id="multichunk"),
]


def test_specs_cover_every_word_size():
    """The odd specs really force the unaligned W=4, W=2 and W=1 paths."""
    assert spec_all_dtypes().word_bytes == 4
    assert spec_odd_w4().word_bytes == 4 and spec_odd_w4().tensors[0].nbytes % 16
    assert spec_odd_w2().word_bytes == 2
    assert spec_bytes_w1().word_bytes == 1
    assert chunks_per_expert(spec_multichunk(), config=SMALL) == 7 + 1


# ----------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------
def check_pack(storage, layout, layers, slots, device, *, config=None, records=None, extra_records=0):
    """Pack into poisoned slabs; every record's tensor bytes must equal its slot's bytes and the reference's."""
    spec = layout.spec
    n = len(layers)
    used = n if records is None else max(records) + 1
    cap = used + extra_records
    for poison in POISONS:
        out = torch.full((cap * spec.record_bytes + 5,), poison, dtype=torch.uint8, device=device)
        expected = out.clone()
        rec_t = None if records is None else idx(records, device)
        ref.pack_records_reference(storage, layout, idx(layers, device), idx(slots, device), expected, rec_t)
        got = pack_records(storage, layout, idx(layers), idx(slots), out=out, records=rec_t, config=config)
        assert got.data_ptr() == out.data_ptr() and got.numel() == used * spec.record_bytes
        recs = list(range(n)) if records is None else records
        for i in range(n):
            for t in range(len(spec)):
                want = slot_bytes(storage, layout, layers[i], slots[i], t)
                assert torch.equal(record_bytes(out, spec, recs[i], t), want), (i, t, poison)
                assert torch.equal(record_bytes(expected, spec, recs[i], t), want), (i, t, poison)
        # Records nobody named, and the tail past the used prefix, keep the poison.
        untouched = torch.ones(out.numel(), dtype=torch.bool, device=device)
        for r in recs:
            untouched[r * spec.record_bytes : (r + 1) * spec.record_bytes] = False
        assert bool((out[untouched] == poison).all())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make_spec", SPECS)
def test_pack_is_bit_exact(make_spec, config, device):
    """pack_records copies every tensor byte of each (layer, slot) into its record, across layers, in any order."""
    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    storage = fill_storage(layout, device)
    layers, slots = random_items(layout, 7, seed=1)
    assert len(set(layers)) > 1
    before = storage.clone()
    check_pack(storage, layout, layers, slots, device, config=config)
    assert torch.equal(storage, before), "pack must not write its source"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 16), (3, 5), (1,)], ids=["aligned", "odd", "one-element"])
def test_pack_unpack_every_dtype(dtype, shape, device):
    """Every dtype (fp8 included) moves as raw words, aligned or odd-sized, and round-trips bit for bit."""
    spec = ExpertSpec([TensorSpec("w", shape, dtype), TensorSpec("scale", (1,), torch.float32)])
    layout = SlabLayout.build(spec, num_layers=2, slots=3)
    storage = fill_storage(layout, device)
    layers, slots = [1, 0, 1, 0], [2, 0, 0, 2]
    slab = check_pack(storage, layout, layers, slots, device)
    for poison in POISONS:
        dest = torch.full_like(storage, poison)
        unpack_records(slab, dest, layout, idx(layers), idx(slots))
        for la, s in zip(layers, slots):
            for t in range(len(spec)):
                assert torch.equal(slot_bytes(dest, layout, la, s, t), slot_bytes(storage, layout, la, s, t))
        # The typed views agree too (bit-exact, fp8 compared through uint8).
        view = dest[layout.slot_offset(1, 2, 0) :][: spec.tensors[0].nbytes].view(dtype)
        orig = storage[layout.slot_offset(1, 2, 0) :][: spec.tensors[0].nbytes].view(dtype)
        assert torch.equal(view.view(torch.uint8), orig.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_pack_records_argument_places_items(device):
    """records[i] picks the record of item i; unnamed records and the slab tail are left alone."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=3)
    storage = fill_storage(layout, device)
    check_pack(storage, layout, [1, 0, 1], [2, 1, 0], device, records=[4, 0, 2], extra_records=2)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_same_expert_twice(device):
    """The same (layer, slot) may be packed into two records."""
    layout = SlabLayout.build(spec_odd_w4(), num_layers=2, slots=2)
    storage = fill_storage(layout, device)
    check_pack(storage, layout, [1, 1, 0], [0, 0, 1], device)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_allocates_when_out_is_none(device):
    """Without out, pack allocates exactly n records on the storage's device."""
    layout = SlabLayout.build(spec_all_dtypes(), num_layers=2, slots=2)
    storage = fill_storage(layout, device)
    got = pack_records(storage, layout, idx([1, 0]), idx([0, 1]))
    assert got.device == storage.device and got.numel() == 2 * layout.spec.record_bytes
    for t in range(len(layout.spec)):
        assert torch.equal(record_bytes(got, layout.spec, 1, t), slot_bytes(storage, layout, 0, 1, t))
    empty = pack_records(storage, layout, idx([]), idx([]))
    assert empty.numel() == 0


# ----------------------------------------------------------------------------
# unpack
# ----------------------------------------------------------------------------
def make_slab(layout: SlabLayout, n: int, device: str, *, salt: int, padding: int = 0x3C) -> torch.Tensor:
    """n records with seeded tensor bytes and ``padding`` in every padding byte."""
    spec = layout.spec
    slab = torch.full((n * spec.record_bytes,), padding, dtype=torch.uint8, device=device)
    for r in range(n):
        for t, ts in enumerate(spec.tensors):
            g = torch.Generator(device=device).manual_seed(_seed(99, r, t, salt))
            off = r * spec.record_bytes + spec.record_offsets[t]
            slab[off : off + ts.nbytes] = torch.randint(
                0, 256, (ts.nbytes,), dtype=torch.uint8, generator=g, device=device
            )
    return slab


def expected_after_unpack(storage, slab, layout, layers, slots, records):
    """The storage after the unpack, built slot by slot with the layout's arithmetic."""
    want = storage.clone()
    for la, s, r in zip(layers, slots, records):
        for t in range(len(layout.spec)):
            slot_bytes(want, layout, la, s, t).copy_(record_bytes(slab, layout.spec, r, t))
    return want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make_spec", SPECS)
def test_unpack_is_bit_exact(make_spec, config, device):
    """unpack_records writes each record's tensor bytes into its (layer, slot) and no other byte of storage."""
    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    layers, slots = random_items(layout, 6, seed=2)
    records = [3, 0, 5, 1, 4, 2]
    slab = make_slab(layout, 6, device, salt=7)
    for poison in POISONS:
        storage = fill_storage(layout, device)
        for la, s in zip(layers, slots):  # destinations poisoned
            for t in range(len(layout.spec)):
                slot_bytes(storage, layout, la, s, t).fill_(poison)
        want = expected_after_unpack(storage, slab, layout, layers, slots, records)
        oracle = storage.clone()
        ref.unpack_records_reference(slab, oracle, layout, idx(layers), idx(slots), idx(records))
        unpack_records(slab, storage, layout, idx(layers), idx(slots), records=idx(records), config=config)
        assert torch.equal(storage, want)
        assert torch.equal(oracle, want)


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_repeated_records(device):
    """One received record may fill several slots (records repeat)."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=4)
    slab = make_slab(layout, 3, device, salt=3)
    storage = fill_storage(layout, device)
    layers, slots, records = [0, 1, 1, 0, 1], [3, 0, 2, 0, 1], [1, 1, 0, 1, 2]
    want = expected_after_unpack(storage, slab, layout, layers, slots, records)
    unpack_records(slab, storage, layout, idx(layers), idx(slots), records=idx(records), config=SMALL)
    assert torch.equal(storage, want)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_never_read(device):
    """Padding bytes of records are never required: unpack and checksums ignore them."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=3)
    assert layout.spec.record_bytes > layout.spec.nbytes  # the spec has padding
    a = make_slab(layout, 3, device, salt=5, padding=0x00)
    b = make_slab(layout, 3, device, salt=5, padding=0xFF)
    assert not torch.equal(a, b)
    layers, slots = idx([1, 0, 1]), idx([2, 0, 0])
    sa, sb = fill_storage(layout, device), fill_storage(layout, device)
    unpack_records(a, sa, layout, layers, slots)
    unpack_records(b, sb, layout, layers, slots)
    assert torch.equal(sa, sb)
    assert torch.equal(slab_checksums(a, layout.spec, 3), slab_checksums(b, layout.spec, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_roundtrip_between_layers(device):
    """pack then unpack into other (layer, slot) pairs moves experts intact; checksums follow them."""
    layout = SlabLayout.build(spec_multichunk(), num_layers=3, slots=3)
    storage = fill_storage(layout, device)
    src_l, src_s = [2, 0, 1, 2], [1, 2, 0, 0]
    dst_l, dst_s = [0, 1, 2, 1], [0, 1, 2, 2]
    slab = pack_records(storage, layout, idx(src_l), idx(src_s), config=SMALL)
    before = resident_checksums(storage, layout, idx(src_l), idx(src_s))
    unpack_records(slab, storage, layout, idx(dst_l), idx(dst_s), config=SMALL)
    after = resident_checksums(storage, layout, idx(dst_l), idx(dst_s), config=SMALL)
    assert torch.equal(before, after)
    assert torch.equal(before, slab_checksums(slab, layout.spec, 4))


# ----------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_call(device, monkeypatch):
    """Each call is one kernel launch of n * C programs, whatever n, the layers and the tensors."""
    if device == "cpu" and not records_mod._INTERPRET:
        pytest.skip("CPU runs the torch reference unless TRITON_INTERPRET=1")
    layout = SlabLayout.build(spec_odd_w2(), num_layers=3, slots=3)
    storage = fill_storage(layout, device)
    c = chunks_per_expert(layout.spec, config=SMALL)
    counters = {
        name: LaunchCounter(getattr(records_mod, name))
        for name in ("_pack_records_kernel", "_unpack_records_kernel", "_checksum_kernel")
    }
    for name, counter in counters.items():
        monkeypatch.setattr(records_mod, name, counter)
    layers, slots = random_items(layout, 5, seed=4)
    slab = pack_records(storage, layout, idx(layers), idx(slots), config=SMALL)
    unpack_records(slab, storage, layout, idx(layers), idx(slots), config=SMALL)
    resident_checksums(storage, layout, idx(layers), idx(slots), config=SMALL)
    slab_checksums(slab, layout.spec, 5, config=SMALL)
    assert counters["_pack_records_kernel"].grids == [(5 * c,)]
    assert counters["_unpack_records_kernel"].grids == [(5 * c,)]
    assert counters["_checksum_kernel"].grids == [(5 * c,), (5 * c,)]


def test_cpu_dispatch(monkeypatch):
    """CPU tensors run the Triton kernels under TRITON_INTERPRET=1 and the torch reference otherwise."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=2)
    storage = fill_storage(layout, "cpu")
    calls = []
    real = ref.pack_records_reference

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "pack_records_reference", spy)
    # Kernels compiled for a GPU (no TRITON_INTERPRET at import) cannot run CPU tensors: test the fallback only.
    for interpret in (False, True) if records_mod._INTERPRET else (False,):
        monkeypatch.setattr(records_mod, "_INTERPRET", interpret)
        calls.clear()
        got = pack_records(storage, layout, idx([1, 0]), idx([0, 1]))
        assert calls == ([] if interpret else [1])
        for t in range(len(layout.spec)):
            assert torch.equal(record_bytes(got, layout.spec, 0, t), slot_bytes(storage, layout, 1, 0, t))


# ----------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make_spec", SPECS)
def test_checksums_match_definition(make_spec, config, device):
    """Kernel, torch reference and the definition (Python ints) agree; slot and record of one expert agree."""
    layout = SlabLayout.build(make_spec(), num_layers=2, slots=3)
    spec = layout.spec
    storage = fill_storage(layout, device)
    layers, slots = [1, 0, 1, 1], [2, 0, 0, 2]  # (1, 2) twice: checksums may repeat items
    got = resident_checksums(storage, layout, idx(layers), idx(slots), config=config)
    assert got.dtype == torch.int64 and got.shape == (4,) and got.device == storage.device
    want = [
        checksum_definition(
            [bytes(slot_bytes(storage, layout, la, s, t).cpu().tolist()) for t in range(len(spec))], spec
        )
        for la, s in zip(layers, slots)
    ]
    assert got.tolist() == want
    oracle = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    assert oracle.tolist() == want
    slab = pack_records(storage, layout, idx(layers), idx(slots), config=config)
    assert slab_checksums(slab, spec, 4, config=config).tolist() == want
    assert ref.slab_checksums_reference(slab, spec, 4).tolist() == want
    assert len(set(want[:3])) == 3


def _expert_checksum(parts: list[torch.Tensor], spec: ExpertSpec, device: str) -> int:
    """Checksum of one expert given its tensors' bytes, through a one-record slab and the kernel."""
    slab = torch.zeros(spec.record_bytes, dtype=torch.uint8, device=device)
    for t, p in enumerate(parts):
        record_bytes(slab, spec, 0, t).copy_(p)
    return int(slab_checksums(slab, spec, 1, config=SMALL)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", SPECS)
def test_checksum_sensitivity(make_spec, device):
    """A swap of two words, any single flipped bit, or tensors trading places changes the checksum."""
    spec = make_spec()
    w = spec.word_bytes
    g = torch.Generator().manual_seed(11)
    parts = [torch.randint(0, 256, (t.nbytes,), dtype=torch.uint8, generator=g).to(device) for t in spec.tensors]
    base = _expert_checksum(parts, spec, device)
    # swap two different words inside the largest tensor
    big = max(range(len(spec)), key=lambda t: spec.tensors[t].nbytes)
    swapped = [p.clone() for p in parts]
    words = swapped[big].view(-1, w)
    i, j = 0, words.shape[0] - 1
    if torch.equal(words[i], words[j]):
        words[j, 0] ^= 1
    words[[i, j]] = words[[j, i]].clone()
    assert _expert_checksum(swapped, spec, device) != base
    # flip single bits: first, last and a middle bit of every tensor
    for t, ts in enumerate(spec.tensors):
        for byte, bit in ((0, 0), (ts.nbytes - 1, 7), (ts.nbytes // 2, 3)):
            flipped = [p.clone() for p in parts]
            flipped[t][byte] ^= 1 << bit
            assert _expert_checksum(flipped, spec, device) != base, (t, byte, bit)


@pytest.mark.parametrize("device", DEVICES)
def test_checksum_depends_on_tensor_position(device):
    """The same bytes in another tensor position of the record hash differently (position is mixed in)."""
    spec = ExpertSpec([TensorSpec("a", (8,), torch.float32), TensorSpec("b", (8,), torch.float32)])
    g = torch.Generator().manual_seed(12)
    a, b = (torch.randint(0, 256, (32,), dtype=torch.uint8, generator=g).to(device) for _ in range(2))
    assert _expert_checksum([a, b], spec, device) != _expert_checksum([b, a], spec, device)
    # An expert moved to another (layer, slot) keeps its checksum: only record positions count.
    layout = SlabLayout.build(spec, num_layers=2, slots=2)
    storage = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
    for la, s in ((0, 1), (1, 0)):
        slot_bytes(storage, layout, la, s, 0).copy_(a)
        slot_bytes(storage, layout, la, s, 1).copy_(b)
    c = resident_checksums(storage, layout, idx([0, 1]), idx([1, 0]), config=SMALL)
    assert int(c[0]) == int(c[1]) == _expert_checksum([a, b], spec, device)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


GOLDEN = [
    # An all-zero float32 [2] expert: the first two splitmix64 outputs of seed 0
    # (0xE220A8397B1DCDAF + 0x6E789E6AA1B965F4, wrapped).
    ([TensorSpec("w", (2,), torch.float32)], [bytes(8)], 0x509946A41CD733A3),
    ([TensorSpec("w", (2,), torch.float32)], [bytes([1, 2, 3, 4, 0, 0, 0, 0])], 0xD052AE536C190305),
    # W = 1, second tensor at record offset 16: positions 16 and 17.
    (
        [TensorSpec("a", (3,), torch.uint8), TensorSpec("b", (2,), torch.uint8)],
        [bytes([1, 2, 3]), bytes([255, 7])],
        0x9EE743AA8DF8D5E3,
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_checksum_golden_values(case, device):
    """Pins the checksum definition to fixed values (a change of definition is a decision, not an accident)."""
    tensors, parts, value = GOLDEN[case]
    spec = ExpertSpec(tensors)
    assert checksum_definition(parts, spec) == _signed(value)
    slab = torch.zeros(spec.record_bytes, dtype=torch.uint8, device=device)
    for t, data in enumerate(parts):
        record_bytes(slab, spec, 0, t).copy_(torch.tensor(list(data), dtype=torch.uint8))
    assert int(ref.slab_checksums_reference(slab, spec, 1)[0]) == _signed(value)
    assert int(slab_checksums(slab, spec, 1)[0]) == _signed(value)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------
def _setup():
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=3)
    storage = fill_storage(layout, "cpu")
    return layout, storage


BAD_PACK = [
    (
        "layers-int32",
        dict(layers=torch.tensor([0, 1], dtype=torch.int32)),
        "layers must be torch.int64, got torch.int32",
    ),
    ("slots-float", dict(slots=torch.tensor([0.0, 1.0])), "slots must be torch.int64, got torch.float32"),
    ("layers-2d", dict(layers=idx([[0, 1]])), "1-D"),
    ("slots-length", dict(slots=idx([0, 1, 2])), "n = 2 entries"),
    ("layer-too-big", dict(layers=idx([0, 2])), "layers[1] = 2 is out of range"),
    ("layer-negative", dict(layers=idx([-1, 0])), "layers[0] = -1 is out of range"),
    ("slot-too-big", dict(slots=idx([0, 3])), "slots[1] = 3 is out of range"),
    ("record-negative", dict(records=idx([0, -1])), "records[1] = -1 is negative"),
    ("records-repeat", dict(records=idx([1, 1])), "each record may be written once"),
    ("records-int32", dict(records=torch.tensor([0, 1], dtype=torch.int32)), "records must be torch.int64"),
    ("layers-str", dict(layers="01"), "layers must be a torch.Tensor (int64 [n]) or a list / tuple / range of ints"),
    ("slots-list-float", dict(slots=[0, 1.0]), "slots[1] must be an int, got float"),
    ("layers-list-bool", dict(layers=[True, 0]), "layers[0] must be an int, got bool"),
    ("records-tuple-str", dict(records=(0, "1")), "records[1] must be an int, got str"),
    ("layers-list-too-big", dict(layers=[0, 2]), "layers[1] = 2 is out of range"),
    ("slots-tuple-negative", dict(slots=(0, -3)), "slots[1] = -3 is out of range"),
    ("records-list-negative", dict(records=[-1, 0]), "records[0] = -1 is negative"),
    ("records-range-repeat", dict(records=[1, 1]), "each record may be written once"),
    ("slots-list-length", dict(slots=[0]), "n = 2 entries"),
    ("layers-meta", dict(layers=torch.zeros(2, dtype=torch.int64, device="meta")), "must be on cpu or on cpu"),
]


@pytest.mark.parametrize("case, change, message", BAD_PACK, ids=[c[0] for c in BAD_PACK])
def test_pack_rejects_bad_indices(case, change, message):
    """Bad indices raise StoreError naming expected vs actual, and nothing is written."""
    layout, storage = _setup()
    out = torch.full((4 * layout.spec.record_bytes,), 0xA5, dtype=torch.uint8)
    args = dict(layers=idx([0, 1]), slots=idx([0, 1]), records=None)
    args.update(change)
    with pytest.raises(StoreError, match=re.escape(message)):
        pack_records(storage, layout, args["layers"], args["slots"], out=out, records=args["records"])
    assert bool((out == 0xA5).all())


def test_pack_rejects_bad_buffers():
    """Wrong storage / out (dtype, size, device, layout type) raise StoreError before any write."""
    layout, storage = _setup()
    rb = layout.spec.record_bytes
    two = (idx([0, 1]), idx([0, 1]))
    with pytest.raises(StoreError, match="out must hold at least"):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb - 1, dtype=torch.uint8))
    with pytest.raises(StoreError, match=r"out must hold at least .* \(4 records"):
        pack_records(storage, layout, *two, out=torch.zeros(3 * rb, dtype=torch.uint8), records=idx([3, 0]))
    with pytest.raises(StoreError, match=r"out must be torch\.uint8, got torch\.int32"):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb, dtype=torch.int32))
    with pytest.raises(StoreError, match="out must be on cpu"):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb, dtype=torch.uint8, device="meta"))
    with pytest.raises(StoreError, match=r"storage must hold layout\.total_bytes"):
        pack_records(storage[:-2], layout, *two)
    with pytest.raises(StoreError, match=r"storage must be torch\.uint8"):
        pack_records(storage.view(torch.int16), layout, *two)
    with pytest.raises(StoreError, match="storage must be contiguous"):
        pack_records(torch.zeros(2 * layout.total_bytes, dtype=torch.uint8)[::2], layout, *two)
    with pytest.raises(SpecError, match="layout must be a SlabLayout"):
        pack_records(storage, layout.spec, *two)
    with pytest.raises(StoreError, match="not supported"):
        pack_records(storage.to("meta"), layout, *two)
    with pytest.raises(StoreError, match="2-byte boundary"):
        unaligned = torch.zeros(layout.total_bytes + 1, dtype=torch.uint8)[1:]
        pack_records(unaligned, layout, *two)


def test_unpack_rejects_bad_input():
    """Out-of-range records or slots, repeated destinations and foreign devices raise before any write."""
    layout, storage = _setup()
    slab = make_slab(layout, 2, "cpu", salt=1)
    before = storage.clone()
    cases = [
        (dict(records=idx([0, 2])), r"records\[1\] = 2 is out of range: the slab's record capacity"),
        (dict(layers=idx([0, 1, 1]), slots=idx([0, 1, 2])), "3 items read records 0..2"),
        (dict(slots=idx([0, 5])), r"slots\[1\] = 5 is out of range"),
        (dict(layers=idx([1, 1]), slots=idx([2, 2]), records=idx([0, 1])), r"both target \(layer 1, slot 2\)"),
        (dict(layers=torch.tensor([0, 1], dtype=torch.int32)), "layers must be torch.int64, got torch.int32"),
    ]
    for change, message in cases:
        args = dict(layers=idx([0, 1]), slots=idx([0, 1]), records=None)
        args.update(change)
        with pytest.raises(StoreError, match=message):
            unpack_records(slab, storage, layout, args["layers"], args["slots"], records=args["records"])
    with pytest.raises(StoreError, match="slab must be on cpu"):
        unpack_records(slab.to("meta"), storage, layout, idx([0]), idx([0]))
    with pytest.raises(StoreError, match=r"slab must be torch\.uint8"):
        unpack_records(slab.view(torch.int16), storage, layout, idx([0]), idx([0]))
    assert torch.equal(storage, before)


def test_checksums_reject_bad_input():
    """Checksum launchers validate like pack: indices, slab size, n and spec type."""
    layout, storage = _setup()
    slab = make_slab(layout, 2, "cpu", salt=1)
    with pytest.raises(StoreError, match=r"layers\[0\] = 2 is out of range"):
        resident_checksums(storage, layout, idx([2]), idx([0]))
    with pytest.raises(StoreError, match=r"slots must be torch\.int64, got torch\.int32"):
        resident_checksums(storage, layout, idx([0]), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(StoreError, match="3 records need"):
        slab_checksums(slab, layout.spec, 3)
    with pytest.raises(StoreError, match="n must be a non-negative int"):
        slab_checksums(slab, layout.spec, -1)
    with pytest.raises(SpecError, match="spec must be an ExpertSpec"):
        slab_checksums(slab, layout, 1)
    assert slab_checksums(slab, layout.spec, 0).shape == (0,)
    assert resident_checksums(storage, layout, idx([]), idx([])).shape == (0,)


def test_kernel_config_validation():
    """A KernelConfig that the kernels cannot run raises StoreError."""
    with pytest.raises(StoreError, match="block_bytes must be a power of two"):
        KernelConfig(block_bytes=24)
    with pytest.raises(StoreError, match="chunk_bytes must be a positive multiple"):
        KernelConfig(chunk_bytes=100, block_bytes=64)
    with pytest.raises(StoreError, match="num_warps"):
        KernelConfig(num_warps=3)


# ----------------------------------------------------------------------------
# index forms
# ----------------------------------------------------------------------------
def _index_forms(device: str) -> dict[str, object]:
    """Every accepted form of an index argument, as a function of the values."""
    np = pytest.importorskip("numpy")
    return {
        "cpu-tensor": lambda v: idx(v),
        "device-tensor": lambda v: idx(v, device),
        "list": list,
        "tuple": tuple,
        "numpy-ints": lambda v: [np.int64(x) for x in v],
        "0d-tensors": lambda v: [torch.tensor(x) for x in v],
    }


@pytest.mark.parametrize("device", DEVICES)
def test_index_forms_are_equivalent(device):
    """Tensors (CPU or device), lists, tuples, numpy integers and 0-d tensors name the same items, bit for bit."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=4)
    spec = layout.spec
    storage = fill_storage(layout, device)
    layers, slots, records = [1, 0, 1, 0], [3, 0, 1, 2], [2, 0, 3, 1]
    want = torch.full((4 * spec.record_bytes,), 0xA5, dtype=torch.uint8, device=device)
    ref.pack_records_reference(storage, layout, idx(layers, device), idx(slots, device), want, idx(records, device))
    want_sums = ref.resident_checksums_reference(storage, layout, idx(layers, device), idx(slots, device))
    dst_l, dst_s = [0, 1, 1, 0], [0, 1, 3, 2]
    want_dest = expected_after_unpack(fill_storage(layout, device, salt=2), want, layout, dst_l, dst_s, records)
    forms = _index_forms(device)
    for name, form in forms.items():
        out = torch.full_like(want, 0xA5)
        pack_records(storage, layout, form(layers), form(slots), out=out, records=form(records), config=SMALL)
        assert torch.equal(out, want), name
        dest = fill_storage(layout, device, salt=2)
        unpack_records(want, dest, layout, form(dst_l), form(dst_s), records=form(records), config=SMALL)
        assert torch.equal(dest, want_dest), name
        assert torch.equal(resident_checksums(storage, layout, form(layers), form(slots)), want_sums), name
    # Mixed forms in one call, and a range for the default record order.
    out = torch.full_like(want, 0xA5)
    pack_records(storage, layout, list(layers), idx(slots), out=out, records=tuple(records))
    assert torch.equal(out, want)
    a, b = torch.full_like(want, 0x5A), torch.full_like(want, 0x5A)
    pack_records(storage, layout, layers, slots, out=a, records=range(4))
    pack_records(storage, layout, idx(layers), idx(slots), out=b)
    assert torch.equal(a, b)
    assert pack_records(storage, layout, [], ()).numel() == 0
    assert resident_checksums(storage, layout, range(0), []).shape == (0,)


def test_index_lists_are_not_modified():
    """The launchers read list arguments and never change them (validation converts a copy)."""
    layout, storage = _setup()
    layers, slots = [1, 0], [0, 2]
    np = pytest.importorskip("numpy")
    records = [np.int64(1), np.int64(0)]
    pack_records(storage, layout, layers, slots, records=records)
    assert layers == [1, 0] and slots == [0, 2] and all(type(r) is np.int64 for r in records)


# ----------------------------------------------------------------------------
# index staging ring (host logic, with simulated streams and events)
# ----------------------------------------------------------------------------
class FakeStream:
    """A stream that has enqueued ``enqueued`` kernels and finished ``done`` of them."""

    def __init__(self) -> None:
        self.enqueued = 0
        self.done = 0


class FakeEvent:
    """Completes when its stream has finished everything enqueued before record(); synchronize() waits for it."""

    created = 0

    def __init__(self) -> None:
        FakeEvent.created += 1
        self.stream: FakeStream | None = None
        self.mark = 0

    def record(self, stream: FakeStream) -> None:
        self.stream, self.mark = stream, stream.enqueued

    def synchronize(self) -> None:
        self.stream.done = max(self.stream.done, self.mark)


def make_ring(current: list[FakeStream], *, slot_bytes=64, seg_slots=8, segments=4):
    cap = slot_bytes * seg_slots * segments
    return records_mod._IndexRing(
        torch.zeros(cap, dtype=torch.uint8),
        torch.zeros(cap, dtype=torch.uint8),
        slot_bytes=slot_bytes,
        segments=segments,
        current_stream=lambda: current[0],
        new_event=FakeEvent,
    )


def test_ring_never_reuses_slots_in_flight():
    """A slot is handed out again only after every kernel that read it finished, on every stream that used it."""
    from array import array

    streams = [FakeStream(), FakeStream()]
    current = [streams[0]]
    ring = make_ring(current)
    g = torch.Generator().manual_seed(5)
    live: list[tuple[int, int, FakeStream, int]] = []  # (first byte, end byte, stream, kernel number)
    slot = ring.slot_bytes
    waits_needed = 0
    for call in range(3000):
        stream = streams[int(torch.randint(0, 2, (1,), generator=g))]
        current[0] = stream
        n = int(torch.randint(1, 22, (1,), generator=g))  # 1..21 items: 1..8 slots of 64 bytes
        rows = array("q", [call * 1000 + i for i in range(3 * n)])
        before = [s.done for s in streams]
        off = ring.stage(rows, id(stream))
        assert off is not None and off % slot == 0
        end = off + -(-len(rows) * 8 // slot) * slot
        if [s.done for s in streams] != before:
            waits_needed += 1
        # Every earlier use of these bytes has finished on its stream.
        for a, b, s, k in live:
            if a < end and off < b:
                assert s.done >= k, (call, a, b, off, end)
        live = [x for x in live if not (x[0] < end and off < x[1])]
        # The rows reached the device buffer at the returned offset.
        assert ring.dev[off : off + len(rows) * 8].view(torch.int64).tolist() == rows.tolist()
        stream.enqueued += 1  # the launch that reads the rows
        live.append((off, end, stream, stream.enqueued))
        # The GPU makes some progress (sometimes none): the ring must wait when it laps the GPU.
        for s in streams:
            s.done = min(s.enqueued, s.done + int(torch.randint(0, 3, (1,), generator=g)))
    assert waits_needed > 0, "the test never made the ring wait: it does not exercise reuse"
    assert len(ring.spare) + sum(len(gs) for gs in ring.guards) <= 2 * ring.segments  # events are recycled


def test_ring_one_stream_fast_gpu_never_waits(monkeypatch):
    """When the GPU keeps up, laps of the ring never block the host."""
    from array import array

    stream = FakeStream()
    ring = make_ring([stream])
    blocked = []
    real = FakeEvent.synchronize

    def spy(self):
        if self.stream.done < self.mark:
            blocked.append(self.mark)
        real(self)

    monkeypatch.setattr(FakeEvent, "synchronize", spy)
    monkeypatch.setattr(FakeEvent, "created", 0)
    for call in range(500):
        ring.stage(array("q", [call] * 6), 0)
        stream.enqueued += 1
        stream.done = stream.enqueued  # the kernel finished before the next call
    assert blocked == []
    assert FakeEvent.created <= 2 * ring.segments + 2  # events are recycled, not created per lap


def test_ring_refuses_rows_larger_than_a_segment():
    """Rows that do not fit in one segment are not staged (the launcher uses torch's pinned allocator)."""
    from array import array

    ring = make_ring([FakeStream()])
    fits = ring.slot_bytes * ring.seg_slots // 8
    assert ring.stage(array("q", [7] * fits), 0) == 0
    assert ring.stage(array("q", [7] * (fits + 1)), 0) is None


class NamedStream(FakeStream):
    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log

    def wait_event(self, ev: FakeEvent) -> None:
        self.log.append(("wait", self.name, ev.stream.name))


def test_ring_side_stream_copy_is_waited_for(monkeypatch):
    """With a side stream, rows are copied there and the launching stream waits for that copy's event."""
    from array import array

    log: list = []
    main, side = NamedStream("main", log), NamedStream("side", log)
    current = [main]

    def set_stream(s):
        log.append(("set", s.name))
        current[0] = s

    ring = records_mod._IndexRing(
        torch.zeros(4 * 8 * 64, dtype=torch.uint8),
        torch.zeros(4 * 8 * 64, dtype=torch.uint8),
        slot_bytes=64,
        segments=4,
        current_stream=lambda: current[0],
        new_event=FakeEvent,
        copy_stream=side,
        set_stream=set_stream,
    )
    rows = array("q", [5, 6, 7])
    off = ring.stage(rows, 1)
    # set side, copy, set main back, record on side, main waits on it (the event's stream is the side stream).
    assert log == [("set", "side"), ("set", "main"), ("wait", "main", "side")]
    assert current[0] is main
    assert ring.dev[off : off + 24].view(torch.int64).tolist() == [5, 6, 7]
    log.clear()
    monkeypatch.setattr(records_mod, "_SIDE_STREAM_COPY", False)
    off = ring.stage(rows, 1)
    assert log == [] and ring.dev[off : off + 24].view(torch.int64).tolist() == [5, 6, 7]


# ----------------------------------------------------------------------------
# GPU, real sizes
# ----------------------------------------------------------------------------
def spec_bf16(h: int = 2048, i: int = 768) -> ExpertSpec:
    return presets.qwen3_moe_spec(h, i)


def spec_fp8_dsv3(h: int = 7168, i: int = 2048) -> ExpertSpec:
    return presets.deepseek_v3_spec(h, i)


def spec_real_odd() -> ExpertSpec:
    # Real-ish size with unaligned slot starts and W = 2: 1.5 MB + 2 + 6 bytes.
    return ExpertSpec(
        [
            TensorSpec("w", (1023, 771), torch.bfloat16),
            TensorSpec("s", (1,), torch.bfloat16),
            TensorSpec("z", (3,), torch.float16),
        ]
    )


REAL_SPECS = [
    pytest.param(spec_bf16, id="bf16-H2048-I768"),
    pytest.param(spec_fp8_dsv3, id="fp8-dsv3"),
    pytest.param(spec_real_odd, id="odd-w2"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("make_spec", REAL_SPECS)
def test_gpu_real_sizes_bit_exact(make_spec):
    """At real expert sizes on CUDA, pack/unpack/checksums equal the reference and the layout oracle."""
    spec = make_spec()
    layout = SlabLayout.build(spec, num_layers=2, slots=3)
    storage = fill_storage(layout, "cuda")
    layers, slots = [1, 0, 1, 0], [2, 0, 0, 1]
    slab = check_pack(storage, layout, layers, slots, "cuda")
    want = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    assert torch.equal(resident_checksums(storage, layout, idx(layers), idx(slots)), want)
    assert torch.equal(slab_checksums(slab, spec, 4), want)
    assert torch.equal(ref.slab_checksums_reference(slab, spec, 4), want)
    for poison in POISONS:
        dest = fill_storage(layout, "cuda", salt=1)
        dst_l, dst_s = [0, 1, 0, 1], [2, 1, 0, 0]
        for la, s in zip(dst_l, dst_s):
            for t in range(len(spec)):
                slot_bytes(dest, layout, la, s, t).fill_(poison)
        expect = expected_after_unpack(dest, slab, layout, dst_l, dst_s, [0, 1, 2, 3])
        unpack_records(slab, dest, layout, idx(dst_l, "cuda"), idx(dst_s, "cuda"))  # device indices
        assert torch.equal(dest, expect)
        assert torch.equal(resident_checksums(dest, layout, idx(dst_l), idx(dst_s)), want)


@gpu
@needs_cuda
def test_gpu_rejects_bad_input():
    """Device-resident indices are range-checked on the host before the launch; CPU buffers are refused."""
    layout = SlabLayout.build(spec_bf16(256, 128), num_layers=2, slots=2)
    storage = fill_storage(layout, "cuda")
    before = storage.clone()
    slab = pack_records(storage, layout, idx([0, 1]), idx([1, 0]))
    with pytest.raises(StoreError, match=r"slots\[1\] = 2 is out of range"):
        unpack_records(slab, storage, layout, idx([0, 1], "cuda"), idx([0, 2], "cuda"))
    with pytest.raises(StoreError, match="out must be on cuda"):
        pack_records(storage, layout, idx([0]), idx([0]), out=torch.empty(layout.spec.record_bytes, dtype=torch.uint8))
    with pytest.raises(StoreError, match="slab must be on cuda"):
        unpack_records(slab.cpu(), storage, layout, idx([0]), idx([0]))
    torch.cuda.synchronize()
    assert torch.equal(storage, before)


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_not_16_byte_aligned(device):
    """Slabs that start on a word but not a 16-byte boundary take the unhinted path and stay bit-exact."""
    layout = SlabLayout.build(spec_all_dtypes(), num_layers=2, slots=3)
    spec = layout.spec
    storage = fill_storage(layout, device)
    layers, slots = [1, 0, 1], [2, 0, 1]
    rb = spec.record_bytes
    for shift in (0, 4, 8):
        buf = torch.full((3 * rb + 16,), 0xA5, dtype=torch.uint8, device=device)
        out = buf[shift : shift + 3 * rb]
        pack_records(storage, layout, layers, slots, out=out, config=SMALL)
        for i in range(3):
            for t in range(len(spec)):
                assert torch.equal(record_bytes(out, spec, i, t), slot_bytes(storage, layout, layers[i], slots[i], t))
        dest = torch.full_like(storage, 0x3C)
        unpack_records(out, dest, layout, layers, slots)
        for i in range(3):
            for t in range(len(spec)):
                assert torch.equal(
                    slot_bytes(dest, layout, layers[i], slots[i], t),
                    slot_bytes(storage, layout, layers[i], slots[i], t),
                )
        assert torch.equal(slab_checksums(out, spec, 3), resident_checksums(storage, layout, layers, slots))


# ----------------------------------------------------------------------------
# GPU: launch cache and staging under load
# ----------------------------------------------------------------------------
@gpu
@needs_cuda
def test_gpu_direct_launch_matches_triton_path(monkeypatch):
    """The cached direct launch moves the same bytes as Triton's normal launch, for aligned and unaligned slabs."""
    layout = SlabLayout.build(spec_bf16(256, 128), num_layers=2, slots=4)
    spec = layout.spec
    storage = fill_storage(layout, "cuda")
    layers, slots = [1, 0, 1], [3, 0, 2]
    rb = spec.record_bytes
    got = {}
    for direct in (False, True):
        monkeypatch.setattr(records_mod, "_DIRECT_LAUNCH", direct)
        for shift in (0, 4):  # 4: ALIGNED is False for this call
            for rep in range(3):  # the first direct call fills the cache, the next ones use it
                buf = torch.full((3 * rb + 16,), 0xA5, dtype=torch.uint8, device="cuda")
                out = buf[shift : shift + 3 * rb]
                pack_records(storage, layout, layers, slots, out=out)
                got[(direct, shift, rep)] = out.clone()
                for i in range(3):
                    for t in range(len(spec)):
                        want = slot_bytes(storage, layout, layers[i], slots[i], t)
                        assert torch.equal(record_bytes(out, spec, i, t), want), (direct, shift, rep, i, t)
    plan = records_mod._plan("copy", layout, records_mod.DEFAULT_CONFIG, storage.device)
    kid = id(records_mod._pack_records_kernel)
    assert (kid, True) in plan.compiled and (kid, False) in plan.compiled


@gpu
@needs_cuda
def test_gpu_launch_hook_sees_every_launch():
    """With a Triton launch hook installed (a profiler), every launch goes through Triton's path and is seen."""
    import triton

    layout = SlabLayout.build(spec_bf16(256, 128), num_layers=2, slots=2)
    storage = fill_storage(layout, "cuda")
    pack_records(storage, layout, [0, 1], [1, 0])  # fills the direct-launch cache
    seen = []
    hook = lambda metadata: seen.append(1)
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            pack_records(storage, layout, [0, 1], [1, 0])
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3


@gpu
@needs_cuda
def test_gpu_many_calls_lap_the_ring():
    """Thousands of queued calls (several laps of the index ring) behind a busy GPU each move their own experts."""
    spec = ExpertSpec([TensorSpec("w", (8, 8), torch.bfloat16), TensorSpec("s", (4,), torch.float32)])
    layout = SlabLayout.build(spec, num_layers=4, slots=64)
    storage = fill_storage(layout, "cuda")
    rb = spec.record_bytes
    calls, n = 3 * (records_mod.RING_BYTES // records_mod.RING_SLOT_BYTES), 3
    g = torch.Generator().manual_seed(9)
    picks = torch.randint(0, layout.num_layers * layout.slots, (calls, n), generator=g).tolist()
    out = torch.full((calls * n * rb,), 0xA5, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(int(5e7))  # the GPU lags: the ring fills up and must wait for its oldest segment
    for c, flat in enumerate(picks):
        pack_records(storage, layout, [f // 64 for f in flat], [f % 64 for f in flat], out=out[c * n * rb :][: n * rb])
    want = torch.full_like(out, 0xA5)
    for c, flat in enumerate(picks):
        ref.pack_records_reference(
            storage, layout, idx([f // 64 for f in flat], "cuda"), idx([f % 64 for f in flat], "cuda"),
            want[c * n * rb :][: n * rb],
        )  # fmt: skip
    assert torch.equal(out, want)


@gpu
@needs_cuda
def test_gpu_more_items_than_a_ring_segment():
    """A call naming more experts than one ring segment holds is staged another way and stays bit-exact."""
    spec = ExpertSpec([TensorSpec("w", (4,), torch.float32)])
    seg_items = records_mod.RING_BYTES // records_mod.RING_SEGMENTS // 24
    layout = SlabLayout.build(spec, num_layers=1, slots=seg_items + 100)
    g = torch.Generator(device="cuda").manual_seed(4)
    storage = torch.randint(0, 256, (layout.total_bytes,), dtype=torch.uint8, device="cuda", generator=g)
    n = seg_items + 100
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    slab = pack_records(storage, layout, [0] * n, perm)
    want = torch.empty_like(slab)
    ref.pack_records_reference(storage, layout, idx([0] * n, "cuda"), idx(perm, "cuda"), want)
    assert torch.equal(slab, want)


# ----------------------------------------------------------------------------
# prepared launches (a rebalance's rounds)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", [spec_all_dtypes, spec_odd_w2], ids=["all-dtypes", "odd-w2"])
def test_prepared_copies_equal_the_launchers(make_spec, device):
    """PreparedCopies launches move exactly the bytes pack_records / unpack_records move for the
    same indices, entry by entry, in any order of launches; destinations are poisoned."""
    from expert_store.kernels import PreparedCopies

    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    rb = layout.spec.record_bytes
    l1, s1 = random_items(layout, 5, seed=11)
    l2, s2 = random_items(layout, 4, seed=12)
    entries = [
        ("pack", l1, s1, [4, 0, 3, 1, 2]),
        ("unpack", l2, s2, [1, 1, 0, 2]),  # a record duplicated into two slots
        ("pack", l2, s2, None),
        ("unpack", [], [], []),
    ]
    for poison in POISONS:
        storage = fill_storage(layout, device)
        want = storage.clone()
        prepared = PreparedCopies(storage, layout, entries)
        assert len(prepared) == 4
        got_pack = torch.full((6 * rb,), poison, dtype=torch.uint8, device=device)
        exp_pack = got_pack.clone()
        pack_records(want, layout, l1, s1, out=exp_pack, records=[4, 0, 3, 1, 2])
        prepared.launch(0, got_pack)
        assert torch.equal(got_pack, exp_pack)
        slab = make_slab(layout, 3, device, salt=5)
        unpack_records(slab, want, layout, l2, s2, records=[1, 1, 0, 2])
        prepared.launch(1, slab)
        prepared.launch(3, slab)  # nothing to do
        assert torch.equal(storage, want)
        got2 = torch.full((4 * rb,), poison, dtype=torch.uint8, device=device)
        exp2 = got2.clone()
        pack_records(want, layout, l2, s2, out=exp2)
        prepared.launch(2, got2)
        assert torch.equal(got2, exp2)


BAD_PREPARED = [
    ("direction", [("copy", [0], [0], None)], "entry 0: direction must be 'pack' or 'unpack'"),
    (
        "slot-range",
        [("pack", [0], [0], None), ("unpack", [0, 1], [0, 3], None)],
        "entry 1: slots[1] = 3 is out of range",
    ),
    ("pack-records-repeat", [("pack", [0, 1], [0, 1], [2, 2])], "each record may be written once"),
    ("unpack-targets-repeat", [("unpack", [1, 1], [2, 2], [0, 1])], "(layer 1, slot 2)"),
    ("record-negative", [("unpack", [0], [0], [-1])], "records[0] = -1 is negative"),
]


@pytest.mark.parametrize("case, entries, message", BAD_PREPARED, ids=[c[0] for c in BAD_PREPARED])
def test_prepared_copies_reject_bad_entries(case, entries, message):
    """A bad entry raises StoreError naming the entry and the index at fault, before any launch."""
    from expert_store.kernels import PreparedCopies

    layout, storage = _setup()
    before = storage.clone()
    with pytest.raises(StoreError, match=re.escape(message)):
        PreparedCopies(storage, layout, entries)
    assert torch.equal(storage, before)


def test_prepared_copies_check_the_buffer_at_launch():
    """A buffer too small for an entry's records, or of the wrong dtype, is refused and nothing is written."""
    from expert_store.kernels import PreparedCopies

    layout, storage = _setup()
    rb = layout.spec.record_bytes
    prepared = PreparedCopies(storage, layout, [("unpack", [0, 1], [0, 2], [0, 3])])
    before = storage.clone()
    with pytest.raises(StoreError, match=re.escape("entry 0: buffer must hold 4 records")):
        prepared.launch(0, torch.zeros(3 * rb, dtype=torch.uint8))
    with pytest.raises(StoreError, match=re.escape("buffer must be torch.uint8")):
        prepared.launch(0, torch.zeros(4 * rb, dtype=torch.int16))
    assert torch.equal(storage, before)

"""Pack / unpack / checksum kernels: bit-exact bytes, checksum identity, argument checks, launch paths.

Symbols: L layers, S slots per layer, T tensors per expert, n experts in one call.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; tests on "cuda" (marked gpu) also run where CUDA exists, and the real-size
ones only there. Source bytes say where they came from: every aligned 4-byte word of a source
buffer is a bijective hash of (buffer, word position), so a byte taken from the wrong place, or
left unwritten, cannot match. Destinations are poisoned first (twice, with two values) and bytes
are compared with torch.equal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from expert_store import presets
from expert_store.errors import SpecError, StoreError
from expert_store.kernels import (
    PreparedCopies,
    launch_path,
    pack_records,
    resident_checksums,
    slab_checksums,
    unpack_records,
)
from expert_store.kernels import reference as ref
from expert_store.layout import ResidentSlabs, SlabLayout
from expert_store.spec import ExpertSpec, TensorSpec

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[gpu, needs_cuda])]
POISONS = (0xA5, 0x5A)
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
BIG = 128 * 1024  # bytes: the tensors of the multichunk specs span several chunks of any tuning swept so far


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def pattern(nbytes: int, salt: int, device: str = "cpu") -> torch.Tensor:
    """uint8 [nbytes]: aligned word i is (i + salt * 2**24) * 0x9E3779B1 mod 2**32, little-endian
    (an odd multiplier: distinct positions and salts give distinct words)."""
    i = torch.arange(-(-nbytes // 4), dtype=torch.int64) + (salt << 24)
    words = (i * 0x9E3779B1) & 0xFFFFFFFF
    return torch.stack([(words >> s) & 0xFF for s in (0, 8, 16, 24)], 1).to(torch.uint8).flatten()[:nbytes].to(device)


def slot_bytes(storage: torch.Tensor, layout: SlabLayout, layer: int, slot: int, t: int) -> torch.Tensor:
    """uint8 [nbytes_t] of tensor t of (layer, slot), by the layout's arithmetic (independent of the kernels)."""
    off = layout.slot_offset(layer, slot, t)
    return storage[off : off + layout.spec.tensors[t].nbytes]


def record_bytes(slab: torch.Tensor, spec: ExpertSpec, record: int, t: int) -> torch.Tensor:
    off = record * spec.record_bytes + spec.record_offsets[t]
    return slab[off : off + spec.tensors[t].nbytes]


def tensor_mask(numel: int, spec: ExpertSpec, records, device: str) -> torch.Tensor:
    """bool [numel]: the tensor bytes of the given records of a slab (padding and other records False)."""
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    for r in records:
        for t in range(len(spec)):
            record_bytes(mask, spec, r, t).fill_(True)
    return mask


def idx(values, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def random_items(layout: SlabLayout, n: int, seed: int, *, distinct: bool = True) -> tuple[list[int], list[int]]:
    """n (layer, slot) pairs in random order over several layers (repeats allowed unless distinct)."""
    g = torch.Generator().manual_seed(seed)
    total = layout.num_layers * layout.slots
    flat = torch.randperm(total, generator=g)[:n] if distinct else torch.randint(0, total, (n,), generator=g)
    return [f // layout.slots for f in flat.tolist()], [f % layout.slots for f in flat.tolist()]


def expected_after_unpack(storage, slab, layout, layers, slots, records):
    """The storage after the unpack, slot by slot with the layout's arithmetic."""
    want = storage.clone()
    for la, s, r in zip(layers, slots, records):
        for t in range(len(layout.spec)):
            slot_bytes(want, layout, la, s, t).copy_(record_bytes(slab, layout.spec, r, t))
    return want


def checksum_definition(parts: list[bytes], spec: ExpertSpec) -> int:
    """The checksum exactly as reference.py's docstring defines it, in Python ints."""
    mask, w, total = (1 << 64) - 1, spec.word_bytes, 0
    for t, data in enumerate(parts):
        for i in range(len(data) // w):
            z = (
                int.from_bytes(data[i * w : (i + 1) * w], "little")
                + (spec.record_offsets[t] // w + i + 1) * 0x9E3779B97F4A7C15
            ) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            total = (total + (z ^ (z >> 31))) & mask
    return total - (1 << 64) if total >= 1 << 63 else total


def expert_checksum(parts: list[torch.Tensor], spec: ExpertSpec, device: str) -> int:
    """Checksum of one expert given its tensors' bytes, through a one-record slab and the kernel."""
    slab = torch.zeros(spec.record_bytes, dtype=torch.uint8, device=device)
    for t, p in enumerate(parts):
        record_bytes(slab, spec, 0, t).copy_(p)
    return int(slab_checksums(slab, spec, 1)[0])


# Specs: aligned (every size a multiple of 16: 16-byte vectors), odd sizes with W = 4, 2 and 1,
# and tensors spanning several chunks with partial tails, aligned and not.
def spec_aligned() -> ExpertSpec:
    return ExpertSpec([TensorSpec(f"t{i}", (4, 16), dt) for i, dt in enumerate(ALL_DTYPES)])


def spec_odd_w4() -> ExpertSpec:  # 12, 20, 4 bytes: slot starts not 16-aligned, a one-element scale
    s = [
        TensorSpec("w", (3,), torch.float32),
        TensorSpec("v", (2, 5), torch.bfloat16),
        TensorSpec("s", (1,), torch.int32),
    ]
    return ExpertSpec(s)


def spec_odd_w2() -> ExpertSpec:  # 30, 4, 14, 2 bytes
    return ExpertSpec(
        [
            TensorSpec("w13", (3, 5), torch.bfloat16),
            TensorSpec("w13_scale", (1,), torch.float32),
            TensorSpec("w2", (2, 7), torch.float8_e4m3fn),
            TensorSpec("w2_scale", (2,), torch.int8),
        ]
    )


def spec_bytes_w1() -> ExpertSpec:  # a 3-byte tensor forces W = 1
    s = [
        TensorSpec("tiny", (3,), torch.uint8),
        TensorSpec("w", (5, 3), torch.float8_e5m2),
        TensorSpec("h", (4,), torch.bfloat16),
    ]
    return ExpertSpec(s)


def spec_multichunk_aligned() -> ExpertSpec:  # 2 * BIG + 4 KiB and 16 bytes
    return ExpertSpec(
        [TensorSpec("w", (2 * BIG // 1024 + 4, 512), torch.bfloat16), TensorSpec("s", (4,), torch.float32)]
    )


def spec_multichunk_odd() -> ExpertSpec:  # 2 * BIG + 2 bytes (W = 2), 2 bytes
    return ExpertSpec([TensorSpec("w", (3, (2 * BIG + 2) // 6), torch.float16), TensorSpec("s", (1,), torch.bfloat16)])


SMALL_SPECS = [
    pytest.param(spec_aligned, id="aligned"),
    pytest.param(spec_odd_w4, id="odd-w4"),
    pytest.param(spec_odd_w2, id="odd-w2"),
    pytest.param(spec_bytes_w1, id="bytes-w1"),
]
SPECS = [
    *SMALL_SPECS,
    pytest.param(spec_multichunk_aligned, id="multichunk-aligned"),
    pytest.param(spec_multichunk_odd, id="multichunk-odd"),
]


def test_specs_cover_what_they_claim():
    """The specs force W = 4 / 2 / 1, unaligned sizes, and tensors larger than two chunks."""
    assert spec_aligned().word_bytes == 4 and all(t.nbytes % 16 == 0 for t in spec_aligned().tensors)
    assert spec_odd_w4().word_bytes == 4 and spec_odd_w4().tensors[0].nbytes % 16
    assert spec_odd_w2().word_bytes == 2 and spec_bytes_w1().word_bytes == 1
    big = spec_multichunk_aligned()
    assert big.word_bytes == 4 and all(t.nbytes % 16 == 0 for t in big.tensors) and big.tensors[0].nbytes > 2 * BIG
    odd = spec_multichunk_odd()
    assert odd.word_bytes == 2 and odd.tensors[0].nbytes == 2 * BIG + 2


# ----------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", SPECS)
def test_pack_is_bit_exact(make_spec, device):
    """Each record's tensor bytes are its slot's, across layers, any order, items repeated, records
    with gaps; padding, unnamed records and the tail keep the poison; the source is not written."""
    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    spec, rb = layout.spec, layout.spec.record_bytes
    storage = pattern(layout.total_bytes, 1, device)
    before = storage.clone()
    layers, slots = random_items(layout, 6, seed=1, distinct=False)
    layers[5], slots[5] = layers[0], slots[0]  # one expert into two records
    records = [4, 0, 7, 2, 5, 1]
    for poison in POISONS:
        out = torch.full((9 * rb + 5,), poison, dtype=torch.uint8, device=device)
        got = pack_records(storage, layout, layers, slots, out=out, records=records)
        assert got.data_ptr() == out.data_ptr() and got.numel() == 8 * rb
        for i, r in enumerate(records):
            for t in range(len(spec)):
                assert torch.equal(record_bytes(out, spec, r, t), slot_bytes(storage, layout, layers[i], slots[i], t))
        assert bool((out[~tensor_mask(out.numel(), spec, records, device)] == poison).all())
        oracle = torch.full_like(out, poison)
        ref.pack_records_reference(storage, layout, idx(layers), idx(slots), oracle, idx(records))
        assert torch.equal(out, oracle)
    assert torch.equal(storage, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", SPECS)
def test_unpack_is_bit_exact(make_spec, device):
    """Each record's tensor bytes land in its (layer, slot), a record may fill several slots, and
    no other byte of the storage is written."""
    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    layers, slots = random_items(layout, 6, seed=2)
    records = [3, 0, 3, 1, 4, 2]
    slab = pattern(5 * layout.spec.record_bytes + 3, 2, device)
    for poison in POISONS:
        storage = pattern(layout.total_bytes, 1, device)
        for la, s in zip(layers, slots):
            for t in range(len(layout.spec)):
                slot_bytes(storage, layout, la, s, t).fill_(poison)
        want = expected_after_unpack(storage, slab, layout, layers, slots, records)
        oracle = storage.clone()
        ref.unpack_records_reference(slab, oracle, layout, idx(layers), idx(slots), idx(records))
        unpack_records(slab, storage, layout, layers, slots, records=records)
        assert torch.equal(storage, want) and torch.equal(oracle, want)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_buffers(device):
    """Slabs on a word but not a 16-byte boundary (no vector hints) move and sum the same bytes."""
    layout = SlabLayout.build(spec_multichunk_aligned(), num_layers=2, slots=2)
    spec, rb = layout.spec, layout.spec.record_bytes
    storage = pattern(layout.total_bytes, 1, device)
    layers, slots = [1, 0], [0, 1]
    sums = resident_checksums(storage, layout, layers, slots)
    for shift in (4, 8):
        out = torch.full((2 * rb + 16,), 0xA5, dtype=torch.uint8, device=device)[shift : shift + 2 * rb]
        pack_records(storage, layout, layers, slots, out=out)
        for i in range(2):
            for t in range(len(spec)):
                assert torch.equal(record_bytes(out, spec, i, t), slot_bytes(storage, layout, layers[i], slots[i], t))
        dest = torch.full_like(storage, 0x3C)
        unpack_records(out, dest, layout, slots, layers)
        assert torch.equal(
            dest, expected_after_unpack(torch.full_like(storage, 0x3C), out, layout, slots, layers, [0, 1])
        )
        assert torch.equal(slab_checksums(out, spec, 2), sums)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_allocates_and_empty_calls(device):
    """Without out, pack allocates exactly n records on the storage's device; empty calls do nothing."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=2)
    storage = pattern(layout.total_bytes, 1, device)
    got = pack_records(storage, layout, idx([1, 0]), idx([0, 1]))
    assert got.device == storage.device and got.numel() == 2 * layout.spec.record_bytes
    for t in range(len(layout.spec)):
        assert torch.equal(record_bytes(got, layout.spec, 1, t), slot_bytes(storage, layout, 0, 1, t))
    assert pack_records(storage, layout, [], ()).numel() == 0
    unpack_records(got[:0], storage, layout, [], [])
    assert resident_checksums(storage, layout, range(0), []).shape == (0,)
    assert slab_checksums(got, layout.spec, 0).shape == (0,)
    assert len(PreparedCopies(storage, layout, [])) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_never_read(device):
    """Unpack and slab checksums ignore the padding bytes of records."""
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=3)
    spec = layout.spec
    assert spec.record_bytes > spec.nbytes
    a, b = pattern(3 * spec.record_bytes, 2, device), pattern(3 * spec.record_bytes, 2, device)
    b[~tensor_mask(b.numel(), spec, range(3), device)] = 0xFF
    assert not torch.equal(a, b)
    sa, sb = pattern(layout.total_bytes, 1, device), pattern(layout.total_bytes, 1, device)
    unpack_records(a, sa, layout, [1, 0, 1], [2, 0, 0])
    unpack_records(b, sb, layout, [1, 0, 1], [2, 0, 0])
    assert torch.equal(sa, sb)
    assert torch.equal(slab_checksums(a, spec, 3), slab_checksums(b, spec, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_roundtrip_between_layers(device):
    """pack, then unpack into other (layer, slot) pairs, moves experts intact; checksums follow them."""
    layout = SlabLayout.build(spec_multichunk_odd(), num_layers=3, slots=2)
    storage = pattern(layout.total_bytes, 1, device)
    src_l, src_s, dst_l, dst_s = [2, 0, 1], [1, 1, 0], [0, 1, 2], [0, 1, 1]
    slab = pack_records(storage, layout, src_l, src_s)
    before = resident_checksums(storage, layout, src_l, src_s)
    unpack_records(slab, storage, layout, dst_l, dst_s)
    assert torch.equal(resident_checksums(storage, layout, dst_l, dst_s), before)
    assert torch.equal(slab_checksums(slab, layout.spec, 3), before)
    for i in range(3):
        for t in range(len(layout.spec)):
            assert torch.equal(
                slot_bytes(storage, layout, dst_l[i], dst_s[i], t), record_bytes(slab, layout.spec, i, t)
            )


# ----------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", SPECS)
def test_checksums_match_definition(make_spec, device):
    """Kernel, reference and (small specs) the definition in Python ints agree; a slot and a record
    holding one expert have one checksum; items may repeat."""
    layout = SlabLayout.build(make_spec(), num_layers=2, slots=3)
    spec = layout.spec
    storage = pattern(layout.total_bytes, 1, device)
    layers, slots = [1, 0, 1, 1], [2, 0, 0, 2]
    got = resident_checksums(storage, layout, idx(layers), idx(slots))
    assert got.dtype == torch.int64 and got.shape == (4,) and got.device == storage.device
    want = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    assert torch.equal(got, want) and len(set(want[:3].tolist())) == 3
    if spec.nbytes < BIG:
        parts = [
            [bytes(slot_bytes(storage, layout, la, s, t).cpu().tolist()) for t in range(len(spec))]
            for la, s in zip(layers, slots)
        ]
        assert want.tolist() == [checksum_definition(p, spec) for p in parts]
    slab = pack_records(storage, layout, layers, slots)
    assert torch.equal(slab_checksums(slab, spec, 4), want)
    assert torch.equal(ref.slab_checksums_reference(slab, spec, 4), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", [spec_odd_w4, spec_odd_w2, spec_bytes_w1], ids=["w4", "w2", "w1"])
def test_checksum_sensitivity(make_spec, device):
    """A swap of two words, a flipped bit anywhere, or tensors trading places changes the checksum."""
    spec = make_spec()
    w = spec.word_bytes
    parts = [pattern(t.nbytes, 5 + i, device) for i, t in enumerate(spec.tensors)]
    base = expert_checksum(parts, spec, device)
    big = max(range(len(spec)), key=lambda t: spec.tensors[t].nbytes)
    swapped = [p.clone() for p in parts]
    words = swapped[big].view(-1, w)
    words[[0, -1]] = words[[-1, 0]].clone()
    assert not torch.equal(swapped[big], parts[big]) and expert_checksum(swapped, spec, device) != base
    for t, ts in enumerate(spec.tensors):
        for byte, bit in ((0, 0), (ts.nbytes - 1, 7), (ts.nbytes // 2, 3)):
            flipped = [p.clone() for p in parts]
            flipped[t][byte] ^= 1 << bit
            assert expert_checksum(flipped, spec, device) != base, (t, byte, bit)


@pytest.mark.parametrize("device", DEVICES)
def test_checksum_depends_on_position_in_the_record_only(device):
    """The same bytes in another tensor position hash differently; another (layer, slot) does not."""
    spec = ExpertSpec([TensorSpec("a", (8,), torch.float32), TensorSpec("b", (8,), torch.float32)])
    a, b = pattern(32, 1, device), pattern(32, 2, device)
    assert expert_checksum([a, b], spec, device) != expert_checksum([b, a], spec, device)
    layout = SlabLayout.build(spec, num_layers=2, slots=2)
    storage = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
    for la, s in ((0, 1), (1, 0)):
        slot_bytes(storage, layout, la, s, 0).copy_(a)
        slot_bytes(storage, layout, la, s, 1).copy_(b)
    c = resident_checksums(storage, layout, [0, 1], [1, 0])
    assert int(c[0]) == int(c[1]) == expert_checksum([a, b], spec, device)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


GOLDEN = [
    # An all-zero float32 [2] expert: the first two splitmix64 outputs of seed 0, wrapped.
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
# index forms and bad input
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_index_forms_are_equivalent(device):
    """Tensors (CPU or device), lists, tuples, ranges, numpy integers and 0-d tensors, mixed too,
    name the same items."""
    np = pytest.importorskip("numpy")
    spec = ExpertSpec([TensorSpec("w", (3, 5), torch.bfloat16), TensorSpec("s", (1,), torch.float32)])
    layout = SlabLayout.build(spec, num_layers=2, slots=4)
    rb = spec.record_bytes
    storage = pattern(layout.total_bytes, 1, device)
    layers, slots, records = [1, 0, 1, 0], [3, 0, 1, 2], [2, 0, 3, 1]
    want = torch.full((4 * rb,), 0xA5, dtype=torch.uint8, device=device)
    ref.pack_records_reference(storage, layout, idx(layers), idx(slots), want, idx(records))
    want_sums = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    dst_l, dst_s = [0, 1], [1, 3]
    want_dest = expected_after_unpack(storage, want, layout, dst_l, dst_s, records[:2])
    forms = [lambda v: idx(v), lambda v: idx(v, device), list, tuple, lambda v: [np.int64(x) for x in v]]
    forms.append(lambda v: [torch.tensor(x) for x in v])
    for k, form in enumerate(forms):
        out = torch.full_like(want, 0xA5)
        pack_records(storage, layout, form(layers), form(slots), out=out, records=form(records))
        assert torch.equal(out, want), k
        dest = storage.clone()
        unpack_records(want, dest, layout, form(dst_l), form(dst_s), records=form(records[:2]))
        assert torch.equal(dest, want_dest), k
        assert torch.equal(resident_checksums(storage, layout, form(layers), form(slots)), want_sums), k
    out = torch.full_like(want, 0xA5)
    pack_records(storage, layout, list(layers), idx(slots, device), out=out, records=tuple(records))
    assert torch.equal(out, want)
    a, b = torch.full_like(want, 0x5A), torch.full_like(want, 0x5A)
    pack_records(storage, layout, layers, slots, out=a, records=range(4))
    pack_records(storage, layout, idx(layers), idx(slots), out=b)
    assert torch.equal(a, b)


def test_index_lists_are_not_modified():
    """The launchers read list arguments and never change them."""
    np = pytest.importorskip("numpy")
    layout, storage = _setup()
    layers, slots, records = [1, 0], [0, 2], [np.int64(1), np.int64(0)]
    pack_records(storage, layout, layers, slots, records=records)
    assert layers == [1, 0] and slots == [0, 2] and all(type(r) is np.int64 for r in records)


def _setup():
    layout = SlabLayout.build(spec_odd_w2(), num_layers=2, slots=3)
    return layout, pattern(layout.total_bytes, 1)


BAD_PACK = [
    (
        "layers-int32",
        dict(layers=torch.tensor([0, 1], dtype=torch.int32)),
        "layers must be a 1-D torch.int64 [n], got torch.int32",
    ),
    ("slots-float", dict(slots=torch.tensor([0.0, 1.0])), "slots must be a 1-D torch.int64 [n], got torch.float32"),
    ("layers-2d", dict(layers=idx([[0, 1]])), "got torch.int64 of shape (1, 2)"),
    ("slots-length", dict(slots=idx([0, 1, 2])), "slots must have n = 2 entries (as many as layers), got 3"),
    ("layer-too-big", dict(layers=idx([0, 2])), "layers[1] = 2 is out of range: the layout's number of layers L is 2"),
    ("layer-negative", dict(layers=[-1, 0]), "layers[0] = -1 is out of range"),
    (
        "slot-too-big",
        dict(slots=(0, 3)),
        "slots[1] = 3 is out of range: the layout's slots per layer S is 3 (valid 0..2)",
    ),
    ("record-negative", dict(records=idx([0, -1])), "records[1] = -1 is negative"),
    ("records-repeat", dict(records=[1, 1]), "items 0 and 1 both target record 1; each record may be written once"),
    ("records-int32", dict(records=torch.tensor([0, 1], dtype=torch.int32)), "records must be a 1-D torch.int64"),
    (
        "layers-str",
        dict(layers="01"),
        "layers must be a torch.Tensor (int64 [n]) or a list / tuple / range of ints, got str",
    ),
    ("slots-list-float", dict(slots=[0, 1.0]), "slots[1] must be an int, got float 1.0"),
    ("layers-list-bool", dict(layers=[True, 0]), "layers[0] must be an int, got bool True"),
    ("records-tuple-str", dict(records=(0, "1")), "records[1] must be an int, got str '1'"),
    ("layers-meta", dict(layers=torch.zeros(2, dtype=torch.int64, device="meta")), "must be on cpu or on cpu"),
]


@pytest.mark.parametrize("case, change, message", BAD_PACK, ids=[c[0] for c in BAD_PACK])
def test_pack_rejects_bad_indices(case, change, message):
    """Bad indices raise StoreError naming expected and actual values; nothing is written."""
    layout, storage = _setup()
    out = torch.full((4 * layout.spec.record_bytes,), 0xA5, dtype=torch.uint8)
    args = dict(layers=idx([0, 1]), slots=idx([0, 1]), records=None) | change
    with pytest.raises(StoreError, match=re.escape(message)):
        pack_records(storage, layout, args["layers"], args["slots"], out=out, records=args["records"])
    assert bool((out == 0xA5).all())


def test_pack_rejects_bad_buffers():
    """Wrong storage / out (dtype, size, device, layout type, alignment) raise before any write."""
    layout, storage = _setup()
    rb = layout.spec.record_bytes
    two = ([0, 1], [0, 1])
    with pytest.raises(
        StoreError,
        match=re.escape(f"out must hold at least 2 records ({2 * rb} bytes, record_bytes={rb}), got {2 * rb - 1}"),
    ):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb - 1, dtype=torch.uint8))
    with pytest.raises(StoreError, match=re.escape("out must hold at least 4 records")):
        pack_records(storage, layout, *two, out=torch.zeros(3 * rb, dtype=torch.uint8), records=[3, 0])
    with pytest.raises(StoreError, match=re.escape("out must be a contiguous 1-D torch.uint8 tensor, got torch.int32")):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb, dtype=torch.int32))
    with pytest.raises(StoreError, match="out must be on cpu"):
        pack_records(storage, layout, *two, out=torch.zeros(2 * rb, dtype=torch.uint8, device="meta"))
    with pytest.raises(
        StoreError, match=re.escape(f"storage must hold layout.total_bytes = {layout.total_bytes} bytes")
    ):
        pack_records(storage[:-2], layout, *two)
    with pytest.raises(StoreError, match=r"storage must be a contiguous .* stride \(2,\)"):
        pack_records(torch.zeros(2 * layout.total_bytes, dtype=torch.uint8)[::2], layout, *two)
    with pytest.raises(SpecError, match="layout must be a SlabLayout, got ExpertSpec"):
        pack_records(storage, layout.spec, *two)
    with pytest.raises(StoreError, match="tensors on meta are not supported"):
        pack_records(storage.to("meta"), layout, *two)
    with pytest.raises(StoreError, match="storage must start on a 2-byte boundary"):
        pack_records(torch.zeros(layout.total_bytes + 1, dtype=torch.uint8)[1:], layout, *two)


def test_unpack_rejects_bad_input():
    """Out-of-range records or slots, repeated destinations and foreign buffers raise before any write."""
    layout, storage = _setup()
    rb = layout.spec.record_bytes
    slab = pattern(2 * rb, 2)
    before = storage.clone()
    cases = [
        (dict(records=[0, 2]), "slab must hold at least 3 records"),
        (dict(layers=[0, 1, 1], slots=[0, 1, 2]), f"slab must hold at least 3 records ({3 * rb} bytes"),
        (dict(slots=[0, 5]), "slots[1] = 5 is out of range"),
        (dict(layers=[1, 1], slots=[2, 2], records=[0, 1]), "items 0 and 1 both target (layer 1, slot 2)"),
    ]
    for change, message in cases:
        args = dict(layers=[0, 1], slots=[0, 1], records=None) | change
        with pytest.raises(StoreError, match=re.escape(message)):
            unpack_records(slab, storage, layout, args["layers"], args["slots"], records=args["records"])
    with pytest.raises(StoreError, match="slab must be on cpu"):
        unpack_records(slab.to("meta"), storage, layout, [0], [0])
    with pytest.raises(StoreError, match=r"slab must be a contiguous 1-D torch\.uint8 tensor, got torch\.int16"):
        unpack_records(slab.view(torch.int16), storage, layout, [0], [0])
    assert torch.equal(storage, before)


def test_checksums_reject_bad_input():
    """Checksum launchers validate like pack: indices, slab size, n and spec type."""
    layout, storage = _setup()
    slab = pattern(2 * layout.spec.record_bytes, 2)
    with pytest.raises(StoreError, match=re.escape("layers[0] = 2 is out of range")):
        resident_checksums(storage, layout, [2], [0])
    with pytest.raises(StoreError, match="slab must hold at least 3 records"):
        slab_checksums(slab, layout.spec, 3)
    with pytest.raises(StoreError, match=re.escape("slab_checksums: n must be in 0.., got -1")):
        slab_checksums(slab, layout.spec, -1)
    with pytest.raises(StoreError, match="n must be an int, got bool"):
        slab_checksums(slab, layout.spec, True)
    with pytest.raises(SpecError, match="spec must be an ExpertSpec, got SlabLayout"):
        slab_checksums(slab, layout, 1)


# ----------------------------------------------------------------------------
# prepared launches (a rebalance's rounds)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_spec", [spec_odd_w4, spec_multichunk_aligned], ids=["odd-w4", "multichunk"])
def test_prepared_copies_equal_the_launchers(make_spec, device):
    """Each PreparedCopies launch moves exactly what pack_records / unpack_records move for its
    indices, in any order of launches; destinations poisoned."""
    layout = SlabLayout.build(make_spec(), num_layers=3, slots=4)
    rb = layout.spec.record_bytes
    l1, s1 = random_items(layout, 3, seed=11)
    l2, s2 = random_items(layout, 3, seed=12)
    entries = [("pack", l1, s1, [4, 0, 2]), ("unpack", l2, s2, [1, 1, 0]), ("pack", l2, s2, None)]
    entries.append(("unpack", [], [], []))
    storage = pattern(layout.total_bytes, 1, device)
    want = storage.clone()
    prepared = PreparedCopies(storage, layout, entries)
    assert len(prepared) == 4
    slab = pattern(2 * rb, 2, device)
    unpack_records(slab, want, layout, l2, s2, records=[1, 1, 0])
    prepared.launch(1, slab)
    prepared.launch(3, slab)  # nothing to do
    assert torch.equal(storage, want)
    for i, layers, slots, records, m in ((2, l2, s2, None, 3), (0, l1, s1, [4, 0, 2], 5)):
        got, exp = (torch.full((m * rb,), 0xA5, dtype=torch.uint8, device=device) for _ in range(2))
        pack_records(want, layout, layers, slots, out=exp, records=records)
        prepared.launch(i, got)
        assert torch.equal(got, exp)
        # a bound launcher moves the same bytes, call after call (on CUDA: the first call compiles,
        # the next ones take the direct launch with the addresses bound)
        got.fill_(0xA5)  # poisoned as exp was: padding inside records is not written
        run = prepared.launcher(i, got)
        for _ in range(2):
            run()
            assert torch.equal(got, exp)
            got.fill_(0xA5)
    storage.copy_(pattern(layout.total_bytes, 1, device))
    run = prepared.launcher(1, slab)
    for _ in range(2):
        run()
        assert torch.equal(storage, want)
    prepared.launcher(3, slab)()  # nothing to do
    assert torch.equal(storage, want)


BAD_PREPARED = [
    (
        "direction",
        [("copy", [0], [0], None)],
        "PreparedCopies entry 0: direction must be 'pack' or 'unpack', got 'copy'",
    ),
    (
        "slot-range",
        [("pack", [0], [0], None), ("unpack", [0, 1], [0, 3], None)],
        "entry 1: slots[1] = 3 is out of range",
    ),
    (
        "pack-records-repeat",
        [("pack", [0, 1], [0, 1], [2, 2])],
        "both target record 2; each record may be written once",
    ),
    ("unpack-targets-repeat", [("unpack", [1, 1], [2, 2], [0, 1])], "both target (layer 1, slot 2)"),
    ("record-negative", [("unpack", [0], [0], [-1])], "records[0] = -1 is negative"),
]


@pytest.mark.parametrize("case, entries, message", BAD_PREPARED, ids=[c[0] for c in BAD_PREPARED])
def test_prepared_copies_reject_bad_entries(case, entries, message):
    """A bad entry raises StoreError naming the entry and the index at fault."""
    layout, storage = _setup()
    with pytest.raises(StoreError, match=re.escape(message)):
        PreparedCopies(storage, layout, entries)


def test_prepared_copies_check_the_launch():
    """A buffer too small or of the wrong dtype, or an entry that does not exist, is refused; nothing is written."""
    layout, storage = _setup()
    rb = layout.spec.record_bytes
    prepared = PreparedCopies(storage, layout, [("unpack", [0, 1], [0, 2], [0, 3])])
    before = storage.clone()
    with pytest.raises(StoreError, match=re.escape(f"entry 0: buffer must hold at least 4 records ({4 * rb} bytes")):
        prepared.launch(0, torch.zeros(3 * rb, dtype=torch.uint8))
    with pytest.raises(
        StoreError, match=re.escape("buffer must be a contiguous 1-D torch.uint8 tensor, got torch.int16")
    ):
        prepared.launch(0, torch.zeros(4 * rb, dtype=torch.int16))
    with pytest.raises(StoreError, match=re.escape("PreparedCopies.launch: i must be in 0..0, got 1")):
        prepared.launch(1, torch.zeros(4 * rb, dtype=torch.uint8))
    with pytest.raises(StoreError, match=re.escape(f"entry 0: buffer must hold at least 4 records ({4 * rb} bytes")):
        prepared.launcher(0, torch.zeros(3 * rb, dtype=torch.uint8))
    with pytest.raises(StoreError, match=re.escape("PreparedCopies.launcher: i must be in 0..0, got 1")):
        prepared.launcher(1, torch.zeros(4 * rb, dtype=torch.uint8))
    assert torch.equal(storage, before)


# ----------------------------------------------------------------------------
# launch paths
# ----------------------------------------------------------------------------
def test_launch_path_selection():
    """The direct launch only on CUDA, on Triton 3.6 (the version it was verified on), without hooks."""
    assert launch_path("3.6.0", "cuda", False) == "direct"
    assert launch_path("3.6.1+git0123abc", "cuda", False) == "direct"
    for version, device, hooks in [
        ("3.6.0", "cuda", True),
        ("3.6.0", "cpu", False),
        ("3.7.0", "cuda", False),
        ("3.5.1", "cuda", False),
        ("4.0.0", "cuda", False),
        ("3.60.0", "cuda", False),
        ("unknown", "cuda", False),
    ]:
        assert launch_path(version, device, hooks) == "triton", (version, device, hooks)


def every_launcher(make_spec, device: str) -> tuple[torch.Tensor, ...]:
    """What each public launcher computes on one small case (run here and in a fresh process)."""
    layout = SlabLayout.build(make_spec(), num_layers=2, slots=3)
    storage = pattern(layout.total_bytes, 1, device)
    slab = torch.zeros(3 * layout.spec.record_bytes, dtype=torch.uint8, device=device)
    pack_records(storage, layout, [1, 0, 1], [2, 0, 0], out=slab, records=[2, 0, 1])
    sums = resident_checksums(storage, layout, [1, 0], [2, 0])
    unpack_records(slab, storage, layout, [0, 1], [1, 1], records=[2, 2])
    prepared = torch.zeros_like(slab)
    PreparedCopies(storage, layout, [("pack", [0, 1], [1, 1], None)]).launch(0, prepared)
    return slab, sums, slab_checksums(slab, layout.spec, 3), storage, prepared


_FALLBACK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_kernels as tk
torch.save({n: tk.every_launcher(getattr(tk, n), "cpu") for n in ("spec_aligned", "spec_bytes_w1")}, sys.argv[2])
"""


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_fallback_matches_the_kernels(device, tmp_path):
    """CPU tensors without the interpreter (the torch reference, in a fresh process) give the bytes
    and sums the kernels give (here: the interpreter on cpu, Triton on cuda)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _FALLBACK, here, str(tmp_path / "r.pt")], env=env, check=True, timeout=240)
    for name, want in torch.load(tmp_path / "r.pt").items():
        got = every_launcher(globals()[name], device)
        for k, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g.cpu(), w), (name, k)


# ----------------------------------------------------------------------------
# GPU: real sizes, both launch paths, staging under load
# ----------------------------------------------------------------------------
REAL_SPECS = [
    pytest.param(lambda: presets.qwen3_moe_spec(2048, 768), id="bf16-H2048-I768"),
    pytest.param(lambda: presets.deepseek_v3_spec(7168, 2048), id="fp8-dsv3"),
    pytest.param(
        lambda: ExpertSpec([TensorSpec("w", (1023, 771), torch.bfloat16), TensorSpec("s", (3,), torch.float16)]),
        id="odd-w2",
    ),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("make_spec", REAL_SPECS)
def test_gpu_real_sizes_bit_exact(make_spec):
    """At real expert sizes, pack / unpack / checksums equal the reference and the layout's arithmetic."""
    layout = SlabLayout.build(make_spec(), num_layers=2, slots=3)
    spec = layout.spec
    storage = pattern(layout.total_bytes, 1, "cuda")
    layers, slots = [1, 0, 1, 0], [2, 0, 0, 1]
    out = torch.full((4 * spec.record_bytes,), 0xA5, dtype=torch.uint8, device="cuda")
    slab = pack_records(storage, layout, layers, slots, out=out)
    oracle = torch.full_like(out, 0xA5)
    ref.pack_records_reference(storage, layout, idx(layers, "cuda"), idx(slots, "cuda"), oracle)
    assert torch.equal(slab, oracle)
    want = ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots))
    assert torch.equal(resident_checksums(storage, layout, layers, slots), want)
    assert torch.equal(slab_checksums(slab, spec, 4), want)
    dest = pattern(layout.total_bytes, 3, "cuda")
    dst_l, dst_s = [0, 1, 0, 1], [2, 1, 0, 0]
    expect = expected_after_unpack(dest, slab, layout, dst_l, dst_s, [0, 1, 2, 3])
    unpack_records(slab, dest, layout, idx(dst_l, "cuda"), idx(dst_s, "cuda"))  # device indices: one sync
    assert torch.equal(dest, expect)


@gpu
@needs_cuda
def test_gpu_device_indices_checked_before_launch():
    """Device-resident indices are range-checked on the host before the launch; CPU buffers are refused."""
    layout = SlabLayout.build(presets.qwen3_moe_spec(256, 128), num_layers=2, slots=2)
    storage = pattern(layout.total_bytes, 1, "cuda")
    before = storage.clone()
    slab = pack_records(storage, layout, [0, 1], [1, 0])
    with pytest.raises(StoreError, match=re.escape("slots[1] = 2 is out of range")):
        unpack_records(slab, storage, layout, idx([0, 1], "cuda"), idx([0, 2], "cuda"))
    with pytest.raises(StoreError, match="slab must be on cuda"):
        unpack_records(slab.cpu(), storage, layout, [0], [0])
    torch.cuda.synchronize()
    assert torch.equal(storage, before)


class _CountLaunches:
    """A Triton launch hook (as a profiler installs one): Triton's public launch then takes every call."""

    def __enter__(self):
        import triton

        self.calls, self.chain = [], triton.knobs.runtime.launch_enter_hook
        self.chain.add(self.hook)
        return self

    def hook(self, metadata) -> None:
        self.calls.append(metadata)

    def __exit__(self, *exc) -> None:
        self.chain.remove(self.hook)


@gpu
@needs_cuda
def test_gpu_both_launch_paths_move_the_same_bytes():
    """With a launch hook installed every call is one launch that the hook sees (Triton's public path),
    and the bytes equal those of the direct path (no hook), for aligned and unaligned slabs."""
    import triton

    layout = SlabLayout.build(presets.qwen3_moe_spec(256, 128), num_layers=2, slots=4)
    rb = layout.spec.record_bytes
    storage = pattern(layout.total_bytes, 1, "cuda")
    layers, slots = [1, 0, 1], [3, 0, 2]
    got = {}
    for hooked in (True, False, True):
        for shift in (0, 4):  # 4: not 16-byte aligned
            for _ in range(3):  # the direct path's first call compiles or fills its cache
                out = torch.full((3 * rb + 16,), 0xA5, dtype=torch.uint8, device="cuda")[shift : shift + 3 * rb]
                with _CountLaunches() if hooked else nullcontext() as seen:
                    pack_records(storage, layout, layers, slots, out=out)
                    sums = resident_checksums(storage, layout, layers, slots)
                    dest = storage.clone()
                    unpack_records(out, dest, layout, [0, 1, 0], [1, 3, 0])
                    slab_sums = slab_checksums(out, layout.spec, 3)
                if hooked:
                    assert len(seen.calls) == 4
                got.setdefault(shift, (out.clone(), sums, dest, slab_sums))
                assert all(torch.equal(a, b) for a, b in zip(got[shift], (out, sums, dest, slab_sums)))
    if triton.__version__.startswith("3.6."):
        assert launch_path(triton.__version__, "cuda", False) == "direct"


@gpu
@needs_cuda
def test_gpu_many_calls_on_two_streams_lap_the_ring():
    """Thousands of queued calls on two streams, one of them far behind, each move their own experts:
    index rows are never overwritten before the kernels that read them ran."""
    spec = ExpertSpec([TensorSpec("w", (8, 8), torch.bfloat16), TensorSpec("s", (4,), torch.float32)])
    layout = SlabLayout.build(spec, num_layers=4, slots=64)
    rb = spec.record_bytes
    storage = pattern(layout.total_bytes, 1, "cuda")
    calls, n = 2000, 3
    picks = torch.randint(0, 4 * 64, (calls, n), generator=torch.Generator().manual_seed(9)).tolist()
    out = torch.full((calls * n * rb,), 0xA5, dtype=torch.uint8, device="cuda")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(streams[0]):
        torch.cuda._sleep(int(2e8))  # stream 0 lags ~0.1 s: the ring must wait for it when it laps
    for c, flat in enumerate(picks):
        with torch.cuda.stream(streams[c % 2]):
            pack_records(
                storage, layout, [f // 64 for f in flat], [f % 64 for f in flat], out=out[c * n * rb :][: n * rb]
            )
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    flat = [f for p in picks for f in p]
    want = torch.full_like(out, 0xA5)
    ref.pack_records_reference(
        storage, layout, idx([f // 64 for f in flat], "cuda"), idx([f % 64 for f in flat], "cuda"), want
    )
    assert torch.equal(out, want)


@gpu
@needs_cuda
def test_gpu_more_items_than_a_ring_segment():
    """A call naming more experts than a ring segment holds is staged another way, bit-exact."""
    spec = ExpertSpec([TensorSpec("w", (4,), torch.float32)])
    n = 12000  # > 2 MiB / 8 segments / 24 bytes
    layout = SlabLayout.build(spec, num_layers=1, slots=n)
    storage = pattern(layout.total_bytes, 1, "cuda")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    slab = pack_records(storage, layout, [0] * n, perm)
    want = torch.empty_like(slab)
    ref.pack_records_reference(storage, layout, idx([0] * n, "cuda"), idx(perm, "cuda"), want)
    assert torch.equal(slab, want)


@gpu
@needs_cuda
def test_gpu_prepared_copies_launch_on_another_stream():
    """PreparedCopies launched on a stream other than the one it was built on waits for its rows."""
    layout = SlabLayout.build(presets.qwen3_moe_spec(256, 128), num_layers=2, slots=4)
    storage = pattern(layout.total_bytes, 1, "cuda")
    out = torch.zeros(3 * layout.spec.record_bytes, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e8))  # the rows' copy is queued behind this on the current stream
    prepared = PreparedCopies(storage, layout, [("pack", [1, 0, 1], [3, 0, 2], None)])
    with torch.cuda.stream(side):
        prepared.launch(0, out)
    torch.cuda.synchronize()
    assert torch.equal(out, pack_records(storage, layout, [1, 0, 1], [3, 0, 2]))


def carved_slabs(layout: SlabLayout, shift: int, device: str) -> tuple[ResidentSlabs, torch.Tensor]:
    """ResidentSlabs over per-(layer, tensor) tensors carved from one uint8 buffer, each at
    ``shift`` mod 16 bytes (rounded down to the tensor's itemsize), layers in reverse order (the
    table is not evenly spaced), filled with pattern bytes; and a plain storage holding the same bytes."""
    spec, S = layout.spec, layout.slots
    buf = torch.zeros(
        2 * layout.total_bytes + 64 * layout.num_layers * len(spec) + 64, dtype=torch.uint8, device=device
    )
    off = -buf.data_ptr() % 16
    w: dict[str, list] = {t.name: [None] * layout.num_layers for t in spec.tensors}
    for layer in reversed(range(layout.num_layers)):
        for t in spec.tensors:
            start = -(-off // 16) * 16 + shift // t.itemsize * t.itemsize
            w[t.name][layer] = buf[start : start + S * t.nbytes].view(t.dtype).view(S, *t.shape)
            off = start + S * t.nbytes + 16
    slabs = ResidentSlabs(layout, device, weights=w)
    storage = pattern(layout.total_bytes, 3, device)
    for layer in range(layout.num_layers):
        for i, t in enumerate(spec.tensors):
            start = layout.slot_offset(layer, 0, i)
            slabs.tensors[layer][i].view(-1).view(torch.uint8).copy_(storage[start : start + S * t.nbytes])
    return slabs, storage


@pytest.mark.parametrize("shift", [0, 4, 2, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_table_addressing_over_engine_tensors(shift, device):
    """Over separately placed tensors (16-byte aligned, 4, 2 or 1 mod 16), pack, unpack, PreparedCopies
    and checksums give exactly the bytes and sums of the same experts in one allocation."""
    spec = ExpertSpec([TensorSpec("w", (40, 8), torch.bfloat16), TensorSpec("s", (3,), torch.float32),
                       TensorSpec("q", (48,), torch.float8_e4m3fn)])  # fmt: skip
    layout = SlabLayout.build(spec, num_layers=3, slots=4)
    slabs, storage = carved_slabs(layout, shift, device)
    assert slabs.alignment == (16 if shift == 0 else shift)
    layers, slots = random_items(layout, 7, seed=shift)
    records = list(range(6, -1, -1))
    want = ref.pack_records_reference(storage, layout, idx(layers), idx(slots), torch.zeros(7 * spec.record_bytes,
                                      dtype=torch.uint8, device=device), idx(records))  # fmt: skip
    mask = tensor_mask(want.numel(), spec, records, device)
    for poison in POISONS:
        out = torch.full_like(want, poison)
        pack_records(slabs, layout, layers, slots, out=out, records=records)
        assert torch.equal(out[mask], want[mask]) and bool((out[~mask] == poison).all())
    assert torch.equal(resident_checksums(slabs, layout, layers, slots),
                       ref.resident_checksums_reference(storage, layout, idx(layers), idx(slots)))  # fmt: skip
    assert torch.equal(ref.resident_checksums_reference(slabs, layout, idx(layers), idx(slots)),
                       slab_checksums(want, spec, 7)[torch.tensor(records)])  # fmt: skip
    slab = pattern(7 * spec.record_bytes, 9, device)
    expect = expected_after_unpack(storage, slab, layout, layers, slots, records)
    for poison in POISONS:
        for x in (t for row in slabs.tensors for t in row):
            x.view(-1).view(torch.uint8).copy_(storage.new_full((x.numel() * x.element_size(),), poison))
        PreparedCopies(slabs, layout, [("unpack", layers, slots, records)]).launch(0, slab)
        for la, s in zip(layers, slots):
            for i in range(len(spec)):
                got = slabs.tensors[la][i][s].reshape(-1).view(torch.uint8)
                assert torch.equal(got, slot_bytes(expect, layout, la, s, i))
    oracle = ResidentSlabs(layout, device, fill=0)
    ref.unpack_records_reference(slab, slabs, layout, idx(layers), idx(slots), idx(records))
    ref.unpack_records_reference(slab, oracle, layout, idx(layers), idx(slots), idx(records))
    unpack_records(slab, slabs, layout, layers, slots, records=records)
    assert torch.equal(
        resident_checksums(slabs, layout, layers, slots), resident_checksums(oracle, layout, layers, slots)
    )

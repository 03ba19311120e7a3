"""gather_pieces / scatter_pieces: the Triton kernel (interpreter on CPU) against the torch reference.

Pieces of many dtypes and odd sizes (one element, sizes not multiples of 16, misaligned slab
offsets and misaligned sources), destinations poisoned first, compared byte for byte.
"""

from __future__ import annotations

import random

import pytest
import torch

import expert_store as es
from expert_store.kernels import gather_pieces, gather_pieces_reference, scatter_pieces, scatter_pieces_reference

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.bfloat16, torch.float16, torch.float32, torch.int64,
          torch.float8_e4m3fn, torch.bool]  # fmt: skip


def _random_tensor(rng: random.Random, g: torch.Generator) -> torch.Tensor:
    dtype = rng.choice(DTYPES)
    shape = rng.choice([(1,), (rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 9)), (3, 1, 5), (700,)])
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=g)  # fmt: skip
    t = raw.view(dtype).view(shape) if dtype != torch.bool else (raw % 2).view(torch.bool).view(shape)
    if rng.random() < 0.3:  # a source that starts off any word boundary: a view into a larger buffer
        k = rng.randint(1, 15)
        big = torch.empty(t.numel() * t.element_size() + k, dtype=torch.uint8)
        view = big[k:]
        view.copy_(t.reshape(-1).view(torch.uint8))
        if t.element_size() == 1:
            t = view.view(dtype).view(shape)
    return t


def _layout(rng: random.Random, tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, off = [], rng.randint(0, 17)
    for t in tensors:
        if rng.random() < 0.5:
            off = -(-off // 16) * 16  # some pieces aligned, some not
        offsets.append(off)
        off += t.numel() * t.element_size() + rng.choice([0, 0, 1, 3, 16])
    return offsets, off + rng.randint(0, 9)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_gather_scatter_match_reference(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tensors = [_random_tensor(rng, g) for _ in range(rng.randint(1, 40))]
    order = list(range(len(tensors)))
    rng.shuffle(order)  # slab order differs from list order
    offsets, size = _layout(rng, [tensors[i] for i in order])
    pieces = [(tensors[i], offsets[k]) for k, i in enumerate(order)]
    slab = torch.full((size,), 0xA5, dtype=torch.uint8)
    want = slab.clone()
    assert gather_pieces(pieces, slab) is slab
    gather_pieces_reference(pieces, want)
    assert torch.equal(slab, want)
    # scatter back into poisoned copies, several of them reading one slab range
    dests = [torch.empty_like(t) for t, _ in pieces]
    for d in dests:
        _as_bytes(d).fill_(0x5A)
    back = [(o, d) for (_, o), d in zip(pieces, dests)]
    extra = [(pieces[0][1], torch.empty_like(pieces[0][0]))]  # the same slab bytes twice
    scatter_pieces(slab, back + extra)
    for (t, _), d in zip(pieces, dests):
        assert torch.equal(_as_bytes(t), _as_bytes(d))
    assert torch.equal(_as_bytes(extra[0][1]), _as_bytes(pieces[0][0]))
    ref_dests = [torch.empty_like(t) for t, _ in pieces]
    scatter_pieces_reference(slab, [(o, d) for (_, o), d in zip(pieces, ref_dests)])
    assert all(torch.equal(_as_bytes(a), _as_bytes(b)) for a, b in zip(dests, ref_dests))


def test_large_piece_crosses_spans_and_widths():
    """A piece of several spans at a slab offset that agrees with its source only modulo 4, and
    one that agrees modulo 16 but starts mid-vector: head, body and tail paths."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=g).view(torch.int32)  # 1250 words
    b = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=g)
    base = torch.empty(4099 + 16, dtype=torch.uint8)
    bv = base[7 : 7 + 4099]
    bv.copy_(b)
    slab = torch.zeros(12000, dtype=torch.uint8)
    pieces = [(a, 4), (bv, 16 * 400 + 7), (a[3:4], 11999 - 4)]
    gather_pieces(pieces, slab)
    want = torch.zeros_like(slab)
    gather_pieces_reference(pieces, want)
    assert torch.equal(slab, want)


def test_empty_calls_and_empty_pieces():
    slab = torch.zeros(8, dtype=torch.uint8)
    assert gather_pieces([], slab) is slab
    scatter_pieces(slab, [])
    gather_pieces([(torch.empty(0, dtype=torch.float32), 8)], slab)  # zero bytes at the end: allowed
    assert not slab.any()


@pytest.mark.parametrize(
    "case, match",
    [
        ("noncontig", "piece 1: tensor of shape"),
        ("offset", r"piece 0: bytes \[6, 10\)"),
        ("negative", r"piece 0: bytes \[-1, 3\)"),
        ("overlap", "pieces 0 and 1 overlap in the slab"),
        ("slab_dtype", "slab must be a contiguous 1-D torch.uint8"),
        ("not_pair", "piece 0 must be a pair"),
        ("not_tensor", "piece 0: expected a torch.Tensor"),
        ("float_offset", "slab offset must be an int"),
    ],
)
def test_gather_rejects_bad_input(case, match):
    slab = torch.zeros(8, dtype=torch.uint8)
    a = torch.ones(4, dtype=torch.uint8)
    pieces = {
        "noncontig": [(a, 0), (torch.ones(2, 4)[:, 1], 4)],
        "offset": [(a, 6)],
        "negative": [(a, -1)],
        "overlap": [(a, 0), (a, 3)],
        "slab_dtype": [(a, 0)],
        "not_pair": [a],
        "not_tensor": [("x", 0)],
        "float_offset": [(a, 1.0)],
    }[case]
    target = torch.zeros(2, dtype=torch.float32) if case == "slab_dtype" else slab
    with pytest.raises(es.StoreError, match=match):
        gather_pieces(pieces, target)
    assert not slab.any()  # nothing written


def test_scatter_rejects_overlapping_destinations_and_bad_ranges():
    slab = torch.arange(8, dtype=torch.uint8)
    dst = torch.zeros(6, dtype=torch.uint8)
    with pytest.raises(es.StoreError, match="pieces 0 and 1 overlap in destination memory"):
        scatter_pieces(slab, [(0, dst[:4]), (0, dst[2:6])])
    with pytest.raises(es.StoreError, match=r"piece 0: bytes \[5, 11\)"):
        scatter_pieces(slab, [(5, dst)])
    assert not dst.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_named():
    slab = torch.zeros(8, dtype=torch.uint8, device="cuda")
    with pytest.raises(es.StoreError, match="piece 0: tensor is on cpu"):
        gather_pieces([(torch.ones(2), 0)], slab)

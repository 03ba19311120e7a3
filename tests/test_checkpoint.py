"""Checkpoint reads: bit-exact bytes, strict validation, only the needed pages.

Symbols: L MoE layers, E experts per layer, H hidden size, I expert intermediate size.
Every tensor of the generated checkpoints holds random bytes seeded by
(checkpoint layer, expert, tensor name) (see ckpt_factory), so a byte read from the
wrong place cannot compare equal; comparisons are on uint8 views (fp8 / bf16 NaNs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import struct
import threading
from pathlib import Path

import ckpt_factory as cf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import expert_store.checkpoint as ckmod
from expert_store.checkpoint import (
    INDEX_NAME,
    METHODS,
    Checkpoint,
    ReadStats,
    _make_windows,
    _readahead_allows,
    _split_reads,
)
from expert_store.errors import CheckpointError, StoreError
from expert_store.safetensors_file import PAGE_SIZE, MappedFile, parse_header
from expert_store.spec import ExpertSpec, TensorSpec

POISON = 0xA5


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_u8(a[k]), _u8(b[k])) for k in a
    )


def _poisoned(spec: ExpertSpec, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {
        t.name: torch.full((t.nbytes,), POISON, dtype=torch.uint8, device=device).view(t.dtype).view(t.shape)
        for t in spec.tensors
    }


def _all_poisoned(dests: dict[str, torch.Tensor]) -> bool:
    return all(bool((_u8(t) == POISON).all()) for t in dests.values())


def _safetensors_expert(info: cf.CheckpointInfo, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The expert as safetensors' own CPU loader sees it (the independent oracle)."""
    ck = info.ckpt_layer(layer)
    out = {}
    for t in info.spec.tensors:
        templates = info.names[t.name]
        templates = [templates] if isinstance(templates, str) else templates
        parts = []
        for template in templates:
            name = template.format(layer=ck, expert=expert)
            for f in info.files:
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    if name in sf.keys():  # noqa: SIM118 (safe_open has no __contains__)
                        parts.append(sf.get_tensor(name))
                        break
        assert len(parts) == len(templates), f"oracle lost a tensor of {t.name}"
        out[t.name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> cf.CheckpointInfo:
    # H, I not multiples of 128: scales get a ragged last block, w13_scale [2*2, 3].
    return cf.write_deepseek(tmp_path_factory.mktemp("ds"), H=320, I=136, num_layers=2, num_experts=6, num_shards=3)


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory) -> cf.CheckpointInfo:
    return cf.write_qwen(tmp_path_factory.mktemp("qw1"), H=96, I=40, num_layers=2, num_experts=5, num_shards=1)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> cf.CheckpointInfo:
    return cf.write_qwen(tmp_path_factory.mktemp("qw3"), H=64, I=48, num_layers=3, num_experts=4, num_shards=3)


# -- good checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("style", ["deepseek", "qwen_file", "qwen_dir"])
def test_read_expert_bit_exact_against_safetensors(style, request):
    """read_expert returns, for every (layer, expert), exactly the bytes safetensors' own loader
    gives (templates concatenated on dim 0), with the checkpoint's dtype and the spec's shape."""
    info: cf.CheckpointInfo = request.getfixturevalue(style)
    with info.checkpoint() as ckpt:
        for layer in range(info.num_layers):
            for expert in range(info.num_experts):
                got = ckpt.read_expert(layer, expert)
                assert _same_bytes(got, _safetensors_expert(info, layer, expert)), (layer, expert)
                assert _same_bytes(got, info.expected_expert(layer, expert)), (layer, expert)
                for t in info.spec.tensors:
                    assert tuple(got[t.name].shape) == t.shape and got[t.name].dtype == t.dtype


def test_read_expert_owns_its_memory(qwen_file):
    """read_expert's tensors are fresh memory: they survive close() and writing them leaves the file alone."""
    ckpt = qwen_file.checkpoint()
    got = ckpt.read_expert(1, 2)
    ckpt.close()
    got["w2"].view(torch.uint8).fill_(0)
    with qwen_file.checkpoint() as again:
        assert _same_bytes(again.read_expert(1, 2), qwen_file.expected_expert(1, 2))
    assert _same_bytes({"w13": got["w13"]}, {"w13": qwen_file.expected_expert(1, 2)["w13"]})


@pytest.mark.parametrize("style", ["deepseek", "qwen_file", "qwen_dir"])
def test_read_into_poisoned_cpu_destinations(style, request):
    """read_into writes every byte of every destination (nothing stays poisoned), bit-exact, for
    targets in any order and repeated, and returns len(targets) * spec.nbytes."""
    info: cf.CheckpointInfo = request.getfixturevalue(style)
    pairs = [(info.num_layers - 1, info.num_experts - 1), (0, 2), (1, 0), (0, 2)]
    dests = [_poisoned(info.spec) for _ in pairs]
    with info.checkpoint() as ckpt:
        n = ckpt.read_into(info.spec, [(la, e, d) for (la, e), d in zip(pairs, dests)])
    assert n == len(pairs) * info.spec.nbytes
    for (la, e), d in zip(pairs, dests):
        assert _same_bytes(d, info.expected_expert(la, e)), (la, e)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_bytes", [4096, 5000, 1 << 20])
def test_read_into_methods_and_chunking(deepseek, method, chunk_bytes):
    """Every read method ("register" and "auto" read CPU destinations like "pread"), reads split
    into many small chunks (not page multiples) over several threads, and one thread, give the
    same bytes."""
    info = deepseek
    pairs = [(la, e) for la in range(info.num_layers) for e in range(info.num_experts)][::3]
    for threads in (1, 3):
        dests = [_poisoned(info.spec) for _ in pairs]
        with info.checkpoint() as ckpt:
            ckpt.read_into(
                info.spec,
                [(la, e, d) for (la, e), d in zip(pairs, dests)],
                threads=threads,
                chunk_bytes=chunk_bytes,
                method=method,
                prefetch=threads > 1,
            )
        for (la, e), d in zip(pairs, dests):
            assert _same_bytes(d, info.expected_expert(la, e)), (la, e, threads)


def test_read_into_offset_views_of_one_buffer(deepseek):
    """Destinations that are views at non-zero offsets of one larger uint8 buffer (like slots of a
    resident slab) are filled exactly, and no byte between or around them is written."""
    info = deepseek
    spec = info.spec
    gap = 48  # a multiple of every itemsize, so each view is aligned for its dtype
    per_expert = sum(t.nbytes + gap for t in spec.tensors)
    buf = torch.full((gap + 3 * per_expert,), POISON, dtype=torch.uint8)
    written = torch.zeros_like(buf, dtype=torch.bool)
    targets = []
    off = gap
    for la, e in [(1, 5), (0, 0), (1, 1)]:
        dests = {}
        for t in spec.tensors:
            dests[t.name] = buf[off : off + t.nbytes].view(t.dtype).view(t.shape)
            written[off : off + t.nbytes] = True
            off += t.nbytes + gap
        targets.append((la, e, dests))
    with info.checkpoint() as ckpt:
        ckpt.read_into(spec, targets)
    for la, e, dests in targets:
        assert _same_bytes(dests, info.expected_expert(la, e))
    assert bool((buf[~written] == POISON).all())


def test_layers_mapping(deepseek):
    """layers= maps store layer i to checkpoint layer layers[i]: DeepSeek's MoE layers start at 3,
    and a custom mapping [4] makes store layer 0 read checkpoint layer 4."""
    info = deepseek
    assert info.layers == (3, 4)
    with info.checkpoint() as ckpt:
        assert _same_bytes(ckpt.read_expert(0, 1), cf.expected_expert(info, 0, 1))
    with Checkpoint(info.path, info.names, layers=[4]) as ckpt:
        assert _same_bytes(ckpt.read_expert(0, 3), info.expected_expert(1, 3))
        with pytest.raises(CheckpointError, match="layer 1 is out of range"):
            ckpt.read_expert(1, 0)
    # Without layers=, store layer 0 is checkpoint layer 0, which is dense: no experts there.
    with Checkpoint(info.path, info.names) as ckpt, pytest.raises(CheckpointError) as ei:
        ckpt.read_expert(0, 0)
    assert "model.layers.0.mlp.experts.0." in str(ei.value)


def test_validate_accepts_good_checkpoints(deepseek, qwen_file, qwen_dir):
    """validate passes on every generated checkpoint over all its layers and experts."""
    for info in (deepseek, qwen_file, qwen_dir):
        with info.checkpoint() as ckpt:
            ckpt.validate(info.spec, num_layers=info.num_layers, num_experts=info.num_experts)


def test_to_dict_round_trip(deepseek):
    """to_dict is plain data (what a manifest stores) and from_dict reopens the same checkpoint."""
    with deepseek.checkpoint() as ckpt:
        d = ckpt.to_dict()
    assert d == {
        "path": str(deepseek.path),
        "names": {k: [v] if isinstance(v, str) else list(v) for k, v in deepseek.names.items()},
        "layers": [3, 4],
    }
    assert json.loads(json.dumps(d)) == d
    with Checkpoint.from_dict(d) as again:
        assert again.names == {k: tuple(v) for k, v in d["names"].items()} and again.layers == (3, 4)
        assert _same_bytes(again.read_expert(1, 4), deepseek.expected_expert(1, 4))


def test_qwen_sharded_with_index(tmp_path):
    """A sharded checkpoint read through its index gives the same bytes as without it."""
    info = cf.write_qwen(tmp_path, H=32, I=16, num_layers=2, num_experts=3, num_shards=2, index=True)
    assert (tmp_path / INDEX_NAME).exists()
    with info.checkpoint() as ckpt:
        for la in range(2):
            for e in range(3):
                assert _same_bytes(ckpt.read_expert(la, e), info.expected_expert(la, e))


def test_format_fields_in_templates(tmp_path):
    """Templates may carry format specs ({expert:03d}); other fields are refused up front."""
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    save_file({"L2.E007.w": t}, str(tmp_path / "m.safetensors"))
    with Checkpoint(tmp_path / "m.safetensors", {"w": "L{layer}.E{expert:03d}.w"}, layers=[2]) as ckpt:
        assert torch.equal(ckpt.read_expert(0, 7)["w"], t)
    for bad in ("L{layer}.w", "L{layer}.{expert}.{other}", "L{layer}.{expert", ""):
        with pytest.raises(CheckpointError, match="names"):
            Checkpoint(tmp_path / "m.safetensors", {"w": bad})


def test_many_adjacent_tiny_tensors(tmp_path):
    """1100 adjacent 4-byte tensors read in one call (more than preadv's 1024-buffer limit in one
    file-contiguous run) all land in their own destinations."""
    n = 1100
    save_file({f"e{i:04d}.s": torch.tensor([i], dtype=torch.int32) for i in range(n)}, str(tmp_path / "m.safetensors"))
    spec = ExpertSpec([TensorSpec("s", (1,), torch.int32)])
    dests = [{"s": torch.full((1,), -1, dtype=torch.int32)} for _ in range(n)]
    with Checkpoint(tmp_path / "m.safetensors", {"s": "e{expert:04d}.s"}) as ckpt:
        assert ckpt.read_into(spec, [(0, i, d) for i, d in enumerate(dests)]) == 4 * n
    assert torch.equal(torch.cat([d["s"] for d in dests]), torch.arange(n, dtype=torch.int32))


# -- bad checkpoints ---------------------------------------------------------------


def _shard_of(info: cf.CheckpointInfo, tensor: str) -> Path:
    wm = json.loads((info.path / INDEX_NAME).read_text())["weight_map"]
    return info.path / wm[tensor]


def _copy_ckpt(info: cf.CheckpointInfo, dst: Path) -> cf.CheckpointInfo:
    dst.mkdir()
    for f in [*info.files, info.path / INDEX_NAME]:
        (dst / f.name).write_bytes(f.read_bytes())
    return dataclasses.replace(info, path=dst, files=tuple(dst / f.name for f in info.files))


def _rewrite_header(path: Path, mutate) -> None:
    """Replace the header of the safetensors file at ``path`` by ``mutate(header dict)`` (a dict,
    or raw bytes), keeping the data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = mutate(header)
    hb = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


GATE = "model.layers.4.mlp.experts.2.gate_proj.weight"  # store layer 1, expert 2


def _entry(h, key):
    return h[GATE].__setitem__(*key) or h


def _same_size_neighbour(h: dict) -> list[int]:
    """data_offsets of another tensor of GATE's size in the same header (to make two ranges collide)."""
    b, e = h[GATE]["data_offsets"]
    return next(
        v["data_offsets"]
        for k, v in h.items()
        if k not in (GATE, "__metadata__") and v["data_offsets"][1] - v["data_offsets"][0] == e - b
    )


def _data_size(path: Path) -> int:
    h = parse_header(path)
    return h.file_size - h.data_offset


SHARD_CORRUPTIONS = {
    "truncated file": lambda p: p.write_bytes(p.read_bytes()[:-1000]),
    "shorter than 8 bytes": lambda p: p.write_bytes(b"\x01\x02"),
    "header length past end": lambda p: p.write_bytes(struct.pack("<Q", p.stat().st_size) + p.read_bytes()[8:]),
    "absurd header length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + p.read_bytes()[8:]),
    "malformed json": lambda p: _rewrite_header(p, lambda h: b'{"a": [1, 2'),
    "json not an object": lambda p: _rewrite_header(p, lambda h: b"[1, 2, 3]"),
    "not safetensors at all": lambda p: p.write_bytes(os.urandom(4096)),
}


def _check_shard_error(ckpt: Checkpoint, info: cf.CheckpointInfo, shard: Path) -> CheckpointError:
    dests = _poisoned(info.spec)
    with pytest.raises(CheckpointError) as ei:
        ckpt.read_into(info.spec, [(0, 0, _poisoned(info.spec)), (1, 2, dests)])
    assert str(shard) in str(ei.value)
    assert _all_poisoned(dests)
    return ei.value


@pytest.mark.parametrize("kind", sorted(SHARD_CORRUPTIONS))
def test_corrupt_shard_named_with_tensor(deepseek, tmp_path, kind):
    """A shard that is not valid safetensors raises CheckpointError naming the shard and the tensor
    that was needed from it, before any destination is written; other shards still read."""
    info = _copy_ckpt(deepseek, tmp_path / "ckpt")
    shard = _shard_of(info, GATE)
    SHARD_CORRUPTIONS[kind](shard)
    with info.checkpoint() as ckpt:
        err = _check_shard_error(ckpt, info, shard)
        assert "model.layers.4.mlp.experts.2." in str(err) or "model.layers.3.mlp.experts.0." in str(err)
        assert isinstance(err, StoreError)


ENTRY_CORRUPTIONS = {
    "missing dtype": (lambda h: h[GATE].pop("dtype") and h, "dtype"),
    "missing shape": (lambda h: h[GATE].pop("shape") and h, "shape"),
    "missing data_offsets": (lambda h: h[GATE].pop("data_offsets") and h, "data_offsets"),
    "entry not an object": (lambda h: h.__setitem__(GATE, [1]) or h, "JSON object"),
    "unknown dtype": (lambda h: _entry(h, ("dtype", "F7")), "unknown dtype"),
    "offsets not ints": (lambda h: _entry(h, ("data_offsets", [0.0, 10])), "data_offsets"),
    "begin after end": (lambda h: _entry(h, ("data_offsets", [h[GATE]["data_offsets"][1], 0])), "begin <= end"),
    "negative shape": (lambda h: _entry(h, ("shape", [-1, 4])), "shape"),
    "size does not match shape": (lambda h: _entry(h, ("shape", [1, 1])), "needs 1"),
    "overlapping ranges": (lambda h: _entry(h, ("data_offsets", _same_size_neighbour(h))), "overlaps"),
}


@pytest.mark.parametrize("kind", sorted(ENTRY_CORRUPTIONS))
def test_corrupt_header_entry_named(deepseek, tmp_path, kind):
    """Every malformed header entry raises CheckpointError naming the file and the bad tensor."""
    info = _copy_ckpt(deepseek, tmp_path / "ckpt")
    shard = _shard_of(info, GATE)
    mutate, words = ENTRY_CORRUPTIONS[kind]
    _rewrite_header(shard, mutate)
    with pytest.raises(CheckpointError) as ei:
        parse_header(shard)
    msg = str(ei.value)
    assert str(shard) in msg and GATE in msg and words in msg
    with info.checkpoint() as ckpt:
        _check_shard_error(ckpt, info, shard)


def test_offsets_past_data_section(tmp_path):
    """A range ending past the data section (file truncated after the header was written) is refused
    when the header is parsed, naming file and tensor, for a single-file checkpoint too."""
    info = cf.write_qwen(tmp_path, H=32, I=16, num_layers=1, num_experts=2, extras=False)
    size = _data_size(info.path)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"

    def push(h):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [size - (e - b) + 2, size + 2]
        return h

    _rewrite_header(info.path, push)
    with pytest.raises(CheckpointError) as ei:
        Checkpoint(info.path, info.names)
    assert str(info.path) in str(ei.value) and name in str(ei.value) and "past the data section" in str(ei.value)


def _mismatched_specs(info: cf.CheckpointInfo):
    H, I = info.spec["w2"].shape  # noqa: E741
    yield "dtype", cf.qwen_spec(H, I, torch.float16), "bfloat16"
    yield "shape", cf.qwen_spec(H, I + 8), "shape"


@pytest.mark.parametrize("what", ["dtype", "shape"])
def test_spec_mismatch_named(qwen_dir, what):
    """A checkpoint tensor whose dtype (no casts) or concatenated shape differs from the spec is refused
    by validate and by read_into, naming file, tensor, layer and expert; destinations stay poisoned."""
    info = qwen_dir
    _, spec, words = next(s for s in _mismatched_specs(info) if s[0] == what)
    with info.checkpoint() as ckpt:
        with pytest.raises(CheckpointError) as ei:
            ckpt.validate(spec, num_layers=info.num_layers, num_experts=info.num_experts)
        msg = str(ei.value)
        assert ".safetensors" in msg and "model.layers.0.mlp.experts.0." in msg and words in msg
        assert "layer 0" in msg and "expert 0" in msg
        dests = _poisoned(spec)
        with pytest.raises(CheckpointError, match=r"\.safetensors.*model\.layers\.2\.mlp\.experts\.3\."):
            ckpt.read_into(spec, [(2, 3, dests)])
        assert _all_poisoned(dests)


def test_missing_tensor_named(deepseek, tmp_path):
    """A tensor absent from the index, or named by the index but absent from its shard, raises
    CheckpointError naming the file and the tensor; a failed read_into writes nothing."""
    info = _copy_ckpt(deepseek, tmp_path / "a")
    index = info.path / INDEX_NAME
    doc = json.loads(index.read_text())
    del doc["weight_map"][GATE]
    index.write_text(json.dumps(doc))
    good, bad = _poisoned(info.spec), _poisoned(info.spec)
    with info.checkpoint() as ckpt:
        with pytest.raises(CheckpointError) as ei:
            ckpt.read_into(info.spec, [(0, 1, good), (1, 2, bad)])
        assert str(index) in str(ei.value) and GATE in str(ei.value)
        assert _all_poisoned(good) and _all_poisoned(bad)
        with pytest.raises(CheckpointError, match=r"layer 1.*expert 2"):
            ckpt.validate(info.spec, num_layers=2, num_experts=info.num_experts)
        with pytest.raises(CheckpointError, match="expert 6"):  # one past the last expert
            ckpt.read_expert(0, 6)

    info = _copy_ckpt(deepseek, tmp_path / "b")
    shard = _shard_of(info, GATE)
    _rewrite_header(shard, lambda h: h.pop(GATE) and h)
    with info.checkpoint() as ckpt, pytest.raises(CheckpointError) as ei:
        ckpt.read_expert(1, 2)
    assert str(shard) in str(ei.value) and GATE in str(ei.value)


def test_index_naming_missing_shard(deepseek, tmp_path):
    """An index naming a shard file that does not exist is refused at open, naming file and tensor."""
    info = _copy_ckpt(deepseek, tmp_path / "ckpt")
    shard = _shard_of(info, GATE)
    shard.unlink()
    with pytest.raises(CheckpointError) as ei:
        info.checkpoint()
    assert str(shard) in str(ei.value) and "does not exist" in str(ei.value)
    assert "tensor '" in str(ei.value)


def test_unreadable_index(deepseek, tmp_path):
    """A malformed index (bad JSON, no weight_map) is refused naming the index file."""
    info = _copy_ckpt(deepseek, tmp_path / "ckpt")
    index = info.path / INDEX_NAME
    for text in ("{not json", json.dumps({"metadata": {}})):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=INDEX_NAME):
            info.checkpoint()


def test_directory_scan_rejects_duplicates_and_bad_shards(qwen_dir, tmp_path):
    """Without an index the directory's headers are scanned: a tensor in two shards, or a shard
    that is not safetensors, is refused naming the files (and the tensor)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in qwen_dir.files:
        (d / f.name).write_bytes(f.read_bytes())
    (d / "dup.safetensors").write_bytes(qwen_dir.files[0].read_bytes())
    with pytest.raises(CheckpointError) as ei:
        Checkpoint(d, qwen_dir.names)
    assert "dup.safetensors" in str(ei.value) and "model." in str(ei.value)
    (d / "dup.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"dup\.safetensors"):
        Checkpoint(d, qwen_dir.names)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint(tmp_path, qwen_dir.names)  # holds only the subdirectory
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere", qwen_dir.names)


def test_bad_destinations_write_nothing(qwen_file):
    """Wrong destinations (dtype, shape, non-contiguous, missing or extra names, bad layer/expert)
    anywhere in the target list are refused before any destination is written."""
    info = qwen_file
    spec = info.spec
    w13 = spec["w13"]
    bad_sets = {
        "dtype": {**_poisoned(spec), "w13": torch.zeros(w13.shape, dtype=torch.float16)},
        "shape": {**_poisoned(spec), "w13": torch.zeros((w13.shape[0] - 1, w13.shape[1]), dtype=w13.dtype)},
        "contiguous": {**_poisoned(spec), "w13": torch.zeros(w13.shape[::-1], dtype=w13.dtype).t()},
        "missing": {"w13": _poisoned(spec)["w13"]},
        "extra": {**_poisoned(spec), "w4": torch.zeros(1)},
        "not a tensor": {**_poisoned(spec), "w13": [0]},
    }
    with info.checkpoint() as ckpt:
        for what, bad in bad_sets.items():
            first = _poisoned(spec)
            with pytest.raises(CheckpointError, match="targets\\[1\\]"):
                ckpt.read_into(spec, [(0, 0, first), (1, 1, bad)])
            assert _all_poisoned(first), what
        for layer, expert in [(-1, 0), (0, -1), (2, 0), ("0", 0)]:
            first = _poisoned(spec)
            with pytest.raises(CheckpointError):
                ckpt.read_into(spec, [(0, 0, first), (layer, expert, _poisoned(spec))])
            assert _all_poisoned(first)
        other = ExpertSpec([TensorSpec("w13", w13.shape, w13.dtype)])
        with pytest.raises(CheckpointError, match="does not match the spec"):
            ckpt.read_into(other, [(0, 0, {"w13": _poisoned(spec)["w13"]})])
        with pytest.raises(CheckpointError, match="threads"):
            ckpt.read_into(spec, [(0, 0, _poisoned(spec))], threads=0)
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read_expert(0, 0)


def test_concatenation_needs_matching_parts(tmp_path):
    """Templates concatenated on dim 0 must share dtype and trailing dims; the error names both tensors."""
    save_file(
        {"a.0": torch.zeros(2, 4, dtype=torch.int16), "b.0": torch.zeros(2, 3, dtype=torch.int16)},
        str(tmp_path / "m.safetensors"),
    )
    ckpt = Checkpoint(tmp_path / "m.safetensors", {"w": ["a.{expert}", "b.{expert}"]})
    with ckpt, pytest.raises(CheckpointError, match=r"'b\.0'.*concatenated.*'a\.0'"):
        ckpt.read_expert(0, 0)


# -- page cache ---------------------------------------------------------------------


def test_reads_only_the_needed_pages(tmp_path):
    """Reading 2 of 64 experts (~1 MB each) from a cold file brings only a small part of the file
    into the page cache: the reader touches only those experts' byte ranges."""
    info = cf.write_qwen(tmp_path, H=512, I=384, num_layers=1, num_experts=64, extras=False)
    path = info.path
    cf.evict_page_cache(path)
    before = cf.resident_fraction(path)
    if before > 0.05:
        pytest.skip(f"POSIX_FADV_DONTNEED does not evict on this filesystem ({before:.0%} still resident)")
    dests = [_poisoned(info.spec) for _ in range(2)]
    with info.checkpoint() as ckpt:
        ckpt.read_into(info.spec, [(0, 17, dests[0]), (0, 42, dests[1])])
        after = cf.resident_fraction(path)
    assert _same_bytes(dests[0], info.expected_expert(0, 17))
    assert _same_bytes(dests[1], info.expected_expert(0, 42))
    needed = 2 * info.spec.nbytes / path.stat().st_size
    assert after < 0.25, f"{after:.1%} of the file resident after reading {needed:.1%} of it"


# -- zero-copy windows and map hygiene ----------------------------------------------


def _check_windows(parts, max_bytes, sizes):
    """Build windows for ``parts`` and check every invariant the zero-copy reader relies on."""
    windows = _make_windows(parts, max_bytes, PAGE_SIZE)
    limit = max(PAGE_SIZE, max_bytes // PAGE_SIZE * PAGE_SIZE)
    pages: dict[str, set[int]] = {}
    for w in windows:
        assert w.start % PAGE_SIZE == 0 and w.end % PAGE_SIZE == 0, w
        assert 0 < w.end - w.start <= limit, w
        assert w.pieces and w.pieces == sorted(w.pieces)
        # No page in two windows (registrations must not overlap).
        mine = set(range(w.start // PAGE_SIZE, w.end // PAGE_SIZE))
        assert not mine & pages.setdefault(w.path, set()), w
        pages[w.path] |= mine
        for f, _, _, n in w.pieces:
            assert w.start <= f and f + n <= w.end and n > 0
        lo, hi = w.span
        assert w.start <= lo < hi <= w.end
    # Replaying the pieces from fake file bytes fills every destination exactly once.
    files = {path: torch.randint(0, 256, (size,), dtype=torch.uint8) for path, size in sizes.items()}
    dests = {}
    for _, _, n, d, doff in parts:
        dests.setdefault(d, torch.zeros(doff + n + 7, dtype=torch.int64))
    for w in windows:
        for f, d, o, n in w.pieces:
            dests[d][o : o + n] += files[w.path][f : f + n].long() + 1000
    for path, off, n, d, doff in parts:
        want = files[path][off : off + n].long() + 1000
        assert torch.equal(dests[d][doff : doff + n], want), (path, off, n, d)
    return windows


def test_make_windows_invariants():
    """Zero-copy windows are page-aligned, at most max_bytes, never share a page (registrations
    cannot overlap), and their pieces cover every part exactly once: parts that share a page, repeat,
    overlap, cross window boundaries or sit in several files."""
    P = PAGE_SIZE
    parts = [
        ("a", 100, 50, 0, 0),  # two parts in one page
        ("a", 200, P, 1, 0),  # crosses into the next page
        ("a", 3 * P, 5 * P + 3, 2, 16),  # crosses window boundaries
        ("a", 3 * P, 5 * P + 3, 3, 0),  # the same bytes again, into another destination
        ("a", 4 * P + 10, 100, 4, 0),  # inside the previous one
        ("a", 20 * P, P, 5, 0),  # page-exact
        ("a", 21 * P, 10, 6, 0),  # the next page: its own window, adjacent
        ("b", 7, 3 * P, 7, 8),
    ]
    sizes = {"a": 22 * P, "b": 4 * P}
    for max_bytes in (P, 2 * P + 5, 4 * P, 1 << 30):
        windows = _check_windows(parts, max_bytes, sizes)
        if max_bytes >= 1 << 30:
            assert [(w.path, w.start, w.end) for w in windows] == [
                ("a", 0, 2 * P),
                ("a", 3 * P, 9 * P),
                ("a", 20 * P, 21 * P),
                ("a", 21 * P, 22 * P),
                ("b", 0, 4 * P),
            ]
    rng = random.Random(7)
    for _ in range(30):
        parts = []
        for d in range(rng.randint(1, 12)):
            off = rng.randrange(0, 40 * P)
            parts.append(("f", off, rng.randint(1, 6 * P), d, rng.randrange(0, 64)))
        _check_windows(parts, rng.choice([P, 3 * P, 8 * P, 100 * P]), {"f": 47 * P})


def test_mapped_file_views_and_residency(qwen_file):
    """MappedFile.host_tensor is the file's bytes without a copy; populate maps a range (then
    resident); release drops only this process's mappings (bytes unchanged); advise_hugepage is a
    hint; ranges outside the file are refused naming the file."""
    path = qwen_file.path
    raw = path.read_bytes()
    with MappedFile(parse_header(path)) as mf:
        host = mf.host_tensor()
        assert host.dtype == torch.uint8 and host.numel() == len(raw)
        assert host.data_ptr() == mf.address and mf.address % PAGE_SIZE == 0
        assert bytes(host[:4096].numpy()) == raw[:4096] and bytes(host[-999:].numpy()) == raw[-999:]
        mf.populate(100, len(raw) - 200)
        assert mf.resident(0, len(raw)) and mf.resident(5, 0) and mf.resident(0, len(raw), samples=3)
        with pytest.raises(CheckpointError, match="samples"):
            mf.resident(0, len(raw), samples=1)
        mf.release(0, len(raw))
        mf.advise_hugepage()
        assert bytes(host[-999:].numpy()) == raw[-999:]
        assert mf.page_range(PAGE_SIZE + 1, 1) == (mf.address + PAGE_SIZE, PAGE_SIZE)
        for off, n in [(-1, 4), (len(raw) - 3, 4)]:
            with pytest.raises(CheckpointError, match=str(path)):
                mf.resident(off, n)
    with pytest.raises(CheckpointError, match="closed"):
        mf.host_tensor()


def test_mmap_reads_leave_pages_evictable(tmp_path):
    """After a read through the map ("mmap", also with populate and huge_pages) the checkpoint,
    still open, holds no mapping of the pages: POSIX_FADV_DONTNEED drops them and mincore shows
    the file cold again (what cold benchmarks rely on), and residency reflects what was read."""
    info = cf.write_qwen(tmp_path, H=512, I=384, num_layers=1, num_experts=16, extras=False)
    path = info.path
    cf.evict_page_cache(path)
    if cf.resident_fraction(path) > 0.05:
        pytest.skip("POSIX_FADV_DONTNEED does not evict on this filesystem")
    with info.checkpoint() as ckpt:
        for kw in ({}, {"populate": True}, {"populate": True, "huge_pages": True}):
            dests = [_poisoned(info.spec) for _ in range(3)]
            ckpt.read_into(info.spec, [(0, e, d) for e, d in zip((2, 9, 15), dests)], method="mmap", **kw)
            for e, d in zip((2, 9, 15), dests):
                assert _same_bytes(d, info.expected_expert(0, e)), (e, kw)
            assert cf.resident_fraction(path) > 0.1
            cf.evict_page_cache(path)
            if not kw.get("huge_pages"):
                # (With MADV_HUGEPAGE some kernels keep large page-cache folios through DONTNEED,
                # mapped or not: seen here at ~10% of the file. Not a mapping we hold.)
                assert cf.resident_fraction(path) < 0.02, kw
        mf = ckpt._mapped(str(path))
        size = path.stat().st_size
        cf.evict_page_cache(path)
        if cf.resident_fraction(path) > 0.02:
            pytest.skip("huge page-cache folios survived POSIX_FADV_DONTNEED on this kernel")
        assert not mf.resident(0, size) and not mf.resident(0, size, samples=4)
        # Only the last page in: a sampled check sees it missing or present exactly as mincore does.
        last = (size - 1) // PAGE_SIZE * PAGE_SIZE
        os.pread(mf.fd, 1, last)
        assert mf.resident(last, size - last) and not mf.resident(0, size, samples=2)
        mf.populate(0, size)
        assert mf.resident(0, size, samples=2) and mf.resident(0, size)
        mf.release(0, size)


def test_bad_method_and_streams(qwen_file):
    """An unknown method or a non-positive stream count is refused before anything is read."""
    info = qwen_file
    dests = _poisoned(info.spec)
    with info.checkpoint() as ckpt:
        with pytest.raises(CheckpointError, match=r"unknown read method 'dma'.*register"):
            ckpt.read_into(info.spec, [(0, 0, dests)], method="dma")
        with pytest.raises(CheckpointError, match="streams"):
            ckpt.read_into(info.spec, [(0, 0, dests)], streams=0)
        for option in ("cold_threads", "readahead_bytes", "buffers_per_thread"):
            with pytest.raises(CheckpointError, match=option):
                ckpt.read_into(info.spec, [(0, 0, dests)], **{option: 0})
    assert _all_poisoned(dests)


class _Nothing:
    """Stream / event stand-in: CPU copies are done when copy_ returns."""

    def wait_stream(self, other) -> None: ...

    def record(self, stream) -> None: ...

    def synchronize(self) -> None: ...


class _FakeDeviceOps(ckmod._CudaOps):
    """CPU stand-in for the CUDA calls: every destination counts as a device destination, so the
    staging and zero-copy pipelines run on CPU. Registrations are checked the way the driver
    would (page-aligned, read-only flag, never overlapping a live one) and recorded."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.live: dict[int, int] = {}
        self.sizes: list[int] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def is_device(self, t):
        return True

    def stream(self, device):
        return _Nothing()

    def current_stream(self, device):
        return _Nothing()

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def event(self):
        return _Nothing()

    def pinned(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def host_register(self, addr, nbytes, flags):
        assert addr % PAGE_SIZE == 0 and nbytes % PAGE_SIZE == 0 and nbytes > 0
        assert flags & ckmod._CUDA_HOST_REGISTER_READ_ONLY
        with self.lock:
            if self.fail_after is not None and len(self.sizes) >= self.fail_after:
                return "cudaErrorNotSupported (fake)"
            for a, n in self.live.items():
                assert addr + nbytes <= a or a + n <= addr, "overlapping registrations"
            self.live[addr] = nbytes
            self.sizes.append(nbytes)
        return None

    def host_unregister(self, addr):
        with self.lock:
            if self.live.pop(addr, None) is None:
                return "cudaErrorHostMemoryNotRegistered (fake)"
        return None


@pytest.fixture(scope="module")
def qwen_mid(tmp_path_factory) -> cf.CheckpointInfo:
    # 1.5 MiB per expert (bf16 [2*512, 512] + [512, 512]), so zero-copy windows reach 1 MiB.
    return cf.write_qwen(tmp_path_factory.mktemp("qmid"), H=512, I=512, num_layers=1, num_experts=6, num_shards=2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"populate": True, "streams": 3, "chunk_bytes": 1 << 20, "threads": 1},
        {"staging_bytes": 3 * 4096 + 1},
        {"adaptive": False, "threads": 3, "chunk_bytes": 1 << 20},
    ],
)
def test_device_pipelines_on_cpu(qwen_mid, monkeypatch, method, options):
    """The device path (staging buffers reused across chunks; zero-copy windows registered, copied
    out of the map, unregistered), run on CPU with the CUDA calls stubbed: every byte lands where it
    belongs for repeated experts and every expert of both shards (their last bytes included);
    "register" registers every window
    of >= 1 MiB, "auto" only resident ones (none when cold); no registration survives the call."""
    info = qwen_mid
    ops = _FakeDeviceOps()
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", ops)
    pairs = [(0, 5), (0, 0), (0, 2), (0, 3), (0, 5), (0, 1), (0, 4)]
    for cache in ("warm", "cold"):
        if cache == "cold":
            for f in info.files:
                cf.evict_page_cache(f)
        ops.sizes.clear()
        dests = [_poisoned(info.spec) for _ in pairs]
        with info.checkpoint() as ckpt:
            if cache == "warm":
                ckpt.read_into(info.spec, [(0, e, _poisoned(info.spec)) for e in range(6)], method="pread")
            n = ckpt.read_into(
                info.spec, [(la, e, d) for (la, e), d in zip(pairs, dests)], method=method, prefetch=False, **options
            )
        assert n == len(pairs) * info.spec.nbytes
        for (la, e), d in zip(pairs, dests):
            assert _same_bytes(d, info.expected_expert(la, e)), (la, e, cache)
        assert not ops.live, "a registration outlived the call"
        big_windows = "staging_bytes" not in options
        if method == "register" or (method == "auto" and cache == "warm"):
            assert bool(ops.sizes) == big_windows, ops.sizes
        else:
            evicts = max(cf.resident_fraction(f) for f in info.files) < 0.5 or cache == "warm"
            assert not ops.sizes or (method == "auto" and not evicts), ops.sizes


def test_zero_copy_registration_failure(qwen_mid, monkeypatch):
    """A registration the driver refuses raises CheckpointError naming the file and the way out
    (method='pread'); the windows registered before it are all unregistered."""
    info = qwen_mid
    ops = _FakeDeviceOps(fail_after=1)
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", ops)
    with info.checkpoint() as ckpt:
        with pytest.raises(CheckpointError, match=r"\.safetensors: cudaHostRegister.*fake.*method='pread'"):
            ckpt.read_into(info.spec, [(0, e, _poisoned(info.spec)) for e in range(6)], method="register")
        assert len(ops.sizes) == 1 and not ops.live
        dests = _poisoned(info.spec)
        ckpt.read_into(info.spec, [(0, 3, dests)], method="pread")  # the checkpoint still reads
    assert _same_bytes(dests, info.expected_expert(0, 3))


# -- warm / cold split ----------------------------------------------------------------


def test_split_and_readahead_rules():
    """Resident reads are warm and the rest cold, each list in file order (adaptive=False puts all in
    one list); the prefetcher may hint the next unclaimed cold read always, and later ones only
    while the bytes from the first unclaimed read through them fit in the readahead."""
    resident = [True, False, False, True, False]
    assert _split_reads(resident, adaptive=True) == ([0, 3], [1, 2, 4])
    assert _split_reads(resident, adaptive=False) == ([0, 1, 2, 3, 4], [])
    cum = [0, 10, 30, 60, 100]  # cold reads of 10, 20, 30, 40 bytes
    assert _readahead_allows(0, 0, cum, 1)  # the next read, whatever its size
    assert _readahead_allows(1, 0, cum, 30) and not _readahead_allows(2, 0, cum, 30)
    assert _readahead_allows(2, 1, cum, 50) and not _readahead_allows(3, 1, cum, 50)
    assert _readahead_allows(1, 3, cum, 1)  # already claimed: the caller skips it


def _expert_ranges(ckpt: Checkpoint, spec: ExpertSpec, expert: int) -> list[tuple[str, int, int]]:
    return [(p, e.offset, e.offset + e.nbytes) for entries in ckpt._spec_entries(spec, 0, expert) for p, e in entries]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_adaptive_split_orders_cold_reads(qwen_mid, monkeypatch, method):
    """With some experts resident and the others not (residency stubbed by byte range), through the
    device pipeline on CPU: every byte lands where it belongs; warm experts are read by the warm
    pool and never hinted; cold reads are done by one reader strictly in file order; each
    WILLNEED hint is for a cold read and never runs more than the readahead (plus one read) ahead
    of the reader; last_read accounts every byte as warm or cold."""
    info = qwen_mid
    ops = _FakeDeviceOps()
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", ops)
    warm_experts, chunk, readahead = {1, 4}, 128 << 10, 384 << 10
    log: list[tuple[str, str, int, int]] = []
    log_lock = threading.Lock()
    real_copy, real_hint = MappedFile.copy_into, MappedFile.advise_willneed

    def copy_into(self, offset, dest, **kw):
        with log_lock:
            log.append(("read", self.path, offset, sum(d.nbytes for d in dest)))
        return real_copy(self, offset, dest, **kw)

    def advise_willneed(self, offset, nbytes):
        with log_lock:
            log.append(("hint", self.path, offset, nbytes))
        return real_hint(self, offset, nbytes)

    pairs = [(0, e) for e in (5, 0, 2, 1, 3, 4, 5)]
    dests = [_poisoned(info.spec) for _ in pairs]
    with info.checkpoint() as ckpt:
        warm_ranges = [r for e in warm_experts for r in _expert_ranges(ckpt, info.spec, e)]
        cold_ranges = [r for e in set(range(6)) - warm_experts for r in _expert_ranges(ckpt, info.spec, e)]

        def touches(ranges, path, lo, hi) -> bool:
            return any(p == path and a < hi and lo < b for p, a, b in ranges)

        def is_warm(path, lo, hi) -> bool:
            return not touches(cold_ranges, path, lo, hi)

        def resident(self, offset, nbytes, *, samples=None):
            # A range is resident when it holds bytes of warm experts only (windows are whole
            # pages, so they may also hold bytes of no expert).
            hi = min(offset + nbytes, self.header.file_size)
            return touches(warm_ranges, self.path, offset, hi) and is_warm(self.path, offset, hi)

        monkeypatch.setattr(MappedFile, "resident", resident)
        monkeypatch.setattr(MappedFile, "copy_into", copy_into)
        monkeypatch.setattr(MappedFile, "advise_willneed", advise_willneed)
        ckpt.read_into(
            info.spec,
            [(la, e, d) for (la, e), d in zip(pairs, dests)],
            method=method,
            chunk_bytes=chunk,
            cold_threads=1,
            threads=3,
            readahead_bytes=readahead,
        )
        stats = ckpt.last_read
    for (la, e), d in zip(pairs, dests):
        assert _same_bytes(d, info.expected_expert(la, e)), (la, e)
    assert not ops.live
    assert isinstance(stats, ReadStats) and stats.cold_threads == 1 and 1 <= stats.warm_threads <= 3
    assert stats.warm_reads > 0 and stats.cold_reads > 1
    warm_bytes = len(warm_experts) * info.spec.nbytes
    # Expert 5 goes to two destinations: read twice, except by windows (one registration or read).
    cold_bytes = (4 if method in ("register", "auto") else 5) * info.spec.nbytes
    # A read (or window) that straddles a warm and a cold expert counts as cold: allow a few.
    slack = 4 * (chunk + PAGE_SIZE)
    assert abs(stats.warm_bytes - warm_bytes) <= slack and abs(stats.cold_bytes - cold_bytes) <= slack, stats
    hints = [(p, o, n) for kind, p, o, n in log if kind == "hint"]
    # Warm reads are never hinted. (Whether any hint is issued at all is a race with the readers:
    # the prefetcher skips reads already claimed, so it is not asserted.)
    assert all(not is_warm(p, o, o + n) for p, o, n in hints)
    cold_reads = [(p, o, n) for kind, p, o, n in log if kind == "read" and not is_warm(p, o, o + n)]
    assert cold_reads == sorted(cold_reads), "cold reads out of file order"
    if method in ("register", "auto"):
        return  # windows: hints are whole windows, reads only the staged ones; order checked above
    # Readahead bound. The one cold reader reads the cold reads in order, so a hint is cold read
    # j (hints skip reads already claimed) and, when it is issued, r reads have started: the
    # prefetcher allows hints while bytes of reads [claimed, j] <= readahead, and claimed <= r + 1.
    cum = [0]
    for _, _, n in cold_reads:
        cum.append(cum[-1] + n)
    r = j = 0
    for kind, p, o, n in log:
        if kind == "read" and not is_warm(p, o, o + n):
            r += 1
        elif kind == "hint":
            while cold_reads[j] != (p, o, n):
                j += 1
            assert cum[j + 1] - cum[max(0, r - 1)] <= readahead + 2 * chunk, (r, j)
            j += 1


def test_adaptive_split_follows_the_page_cache(qwen_mid, monkeypatch):
    """With the real page cache: after eviction, an expert read once is classified warm and one
    never read is classified cold (mincore sampling), and both are read bit-exact."""
    info = qwen_mid
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", _FakeDeviceOps())
    for f in info.files:
        cf.evict_page_cache(f)
    if max(cf.resident_fraction(f) for f in info.files) > 0.05:
        pytest.skip("POSIX_FADV_DONTNEED does not evict on this filesystem")
    with info.checkpoint() as ckpt:
        ckpt.read_into(info.spec, [(0, 2, _poisoned(info.spec))], method="pread")  # expert 2 now warm
        dests = [_poisoned(info.spec), _poisoned(info.spec)]
        ckpt.read_into(info.spec, [(0, 2, dests[0]), (0, 3, dests[1])])
        stats = ckpt.last_read
    assert _same_bytes(dests[0], info.expected_expert(0, 2)) and _same_bytes(dests[1], info.expected_expert(0, 3))
    assert stats.warm_bytes == info.spec.nbytes and stats.cold_bytes == info.spec.nbytes, stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("adaptive", [True, False])
def test_read_error_stops_every_reader(qwen_mid, monkeypatch, adaptive):
    """An I/O error in one read (here a cold one, with warm reads, cold readers and the prefetcher
    running) raises CheckpointError naming the file and bytes, without hanging the prefetcher, and
    the checkpoint reads normally afterwards."""
    info = qwen_mid
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", _FakeDeviceOps())
    real_copy = MappedFile.copy_into
    calls = [0]

    def flaky(self, offset, dest, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(5, "Input/output error (fake)")
        return real_copy(self, offset, dest, **kw)

    with info.checkpoint() as ckpt:
        monkeypatch.setattr(MappedFile, "resident", lambda self, o, n, *, samples=None: o % 2 == 0)
        monkeypatch.setattr(MappedFile, "copy_into", flaky)
        targets = [(0, e, _poisoned(info.spec)) for e in range(6)]
        with pytest.raises(CheckpointError, match=r"\.safetensors: reading bytes \[\d+, \d+\) failed.*fake"):
            ckpt.read_into(info.spec, targets, chunk_bytes=64 << 10, readahead_bytes=64 << 10, adaptive=adaptive)
        monkeypatch.setattr(MappedFile, "copy_into", real_copy)
        dests = _poisoned(info.spec)
        ckpt.read_into(info.spec, [(0, 3, dests)])
    assert _same_bytes(dests, info.expected_expert(0, 3))


# -- GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("staging_bytes", [None, 8192, 3 * 4096 + 1])
def test_read_into_cuda_bit_exact(deepseek, staging_bytes, method):
    """read_into CUDA destinations (slot views of one device buffer), by every method, writes
    exactly the expected bytes, also with staging far smaller than one expert, and touches no byte
    outside the destinations."""
    info = deepseek
    spec = info.spec
    pairs = [(1, 5), (0, 0), (1, 1), (0, 3)]
    buf = torch.full((len(pairs) * spec.nbytes + 256,), POISON, dtype=torch.uint8, device="cuda")
    targets = []
    off = 128
    for la, e in pairs:
        dests = {}
        for t in spec.tensors:
            dests[t.name] = buf[off : off + t.nbytes].view(t.dtype).view(t.shape)
            off += t.nbytes
        targets.append((la, e, dests))
    with info.checkpoint() as ckpt:
        n = ckpt.read_into(spec, targets, staging_bytes=staging_bytes, threads=4, method=method)
    assert n == len(pairs) * spec.nbytes
    for la, e, dests in targets:
        assert _same_bytes({k: v.cpu() for k, v in dests.items()}, info.expected_expert(la, e))
    host = buf.cpu()
    assert bool((host[:128] == POISON).all()) and bool((host[off:] == POISON).all())


@pytest.fixture(scope="module")
def qwen_big(tmp_path_factory) -> cf.CheckpointInfo:
    # w13 [2I, H] bf16 = 2 MiB, w2 1 MiB: windows of >= 1 MiB, so "register"/"auto" really
    # register page-cache pages (smaller windows go through staging).
    return cf.write_qwen(tmp_path_factory.mktemp("qbig"), H=1024, I=512, num_layers=2, num_experts=6, num_shards=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["register", "auto"])
@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize("options", [{}, {"populate": True, "streams": 3}, {"chunk_bytes": 1 << 20, "threads": 1}])
def test_read_into_cuda_zero_copy(qwen_big, method, cache, options):
    """Zero-copy reads (page-cache pages registered with CUDA, DMA straight into the slots) write
    exactly the expected bytes, warm or cold (auto stages cold windows), with repeated experts,
    windows cut inside tensors, several streams; afterwards no registration or mapping is left:
    the same pages register again, and the page cache can be dropped."""
    info = qwen_big
    spec = info.spec
    pairs = [(1, 5), (0, 0), (1, 1), (0, 3), (1, 5)]
    slab = torch.full((len(pairs) * spec.nbytes + 256,), POISON, dtype=torch.uint8, device="cuda")
    targets, off = [], 128
    for la, e in pairs:
        dests = {}
        for t in spec.tensors:
            dests[t.name] = slab[off : off + t.nbytes].view(t.dtype).view(t.shape)
            off += t.nbytes
        targets.append((la, e, dests))
    evicts = max(_evict_all(info)) < 0.05  # whether this filesystem honours DONTNEED at all
    with info.checkpoint() as ckpt:
        for _ in range(2):
            if cache == "cold":
                _evict_all(info)
            else:
                ckpt.read_into(spec, targets, method="pread")
            slab.fill_(POISON)
            ckpt.read_into(spec, targets, method=method, **options)
            for la, e, dests in targets:
                assert _same_bytes({k: v.cpu() for k, v in dests.items()}, info.expected_expert(la, e))
            host = slab.cpu()
            assert bool((host[:128] == POISON).all()) and bool((host[off:] == POISON).all())
        if evicts:
            left = max(_evict_all(info))
            assert left < 0.05, f"{left:.0%} resident after eviction: a mapping or registration leaked"


def _evict_all(info: cf.CheckpointInfo) -> list[float]:
    for f in info.files:
        cf.evict_page_cache(f)
    return [cf.resident_fraction(f) for f in info.files]


def test_safetensors_oracle_agrees_with_factory(qwen_file):
    """The factory's expected bytes are what safetensors.torch.load_file reads (guards the oracle)."""
    sd = load_file(str(qwen_file.path))
    name = "model.layers.1.mlp.experts.4.down_proj.weight"
    assert torch.equal(_u8(sd[name]), _u8(qwen_file.expected_expert(1, 4)["w2"]))

"""Manifests: round trip, pinned bytes, corruption detection, atomic commits and the version log.

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import expert_store.manifest as manifest_mod
from expert_store.errors import ManifestError, StoreError
from expert_store.manifest import (
    FORMAT_VERSION,
    Manifest,
    ManifestLog,
    decode_manifest,
    encode_manifest,
    manifest_to_json,
)
from expert_store.spec import ExpertSpec, TensorSpec

GOLDEN = Path(__file__).parent / "golden" / "manifest_v1.msgpack"
GOLDEN_LOAD = Path(__file__).parent / "golden" / "manifest_v1_load.msgpack"


def fp8_spec(H: int = 32, I: int = 16) -> ExpertSpec:  # noqa: E741 (H hidden size, I MoE intermediate size)
    """A DeepSeek-style fp8 expert with float32 block scales (one-element scales when H, I <= 128)."""
    return ExpertSpec(
        [
            TensorSpec("w13", (2 * I, H), torch.float8_e4m3fn),
            TensorSpec("w13_scale", (max(1, 2 * I // 128), max(1, H // 128)), torch.float32),
            TensorSpec("w2", (H, I), torch.float8_e4m3fn),
            TensorSpec("w2_scale", (max(1, H // 128), max(1, I // 128)), torch.float32),
        ]
    )


NAMES = {
    "w13": [
        "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    ],
    "w13_scale": [
        "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight_scale_inv",
        "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight_scale_inv",
    ],
    "w2": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
    "w2_scale": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight_scale_inv",
}


def make_manifest(
    *,
    version: int = 1,
    parent: int | None = None,
    L: int = 3,
    E: int = 6,
    R: int = 4,
    S: int = 2,
    seed: int = 0,
    ranks_per_node: int | None = 2,
    layers: list[int] | None = None,
    stats: dict | None = None,
    created: float = 1_767_225_600.25,
    reason: str = "test",
) -> Manifest:
    """A valid manifest whose arrays depend on ``seed`` (random placement, full-range int64 checksums)."""
    g = torch.Generator().manual_seed(seed)
    P = R * S
    rows = []
    for _ in range(L):
        row = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
        rows.append(row[torch.randperm(P, generator=g)])
    alive = torch.rand(R, generator=g) < 0.7
    alive[0] = True
    checksums = torch.randint(-(2**63), 2**63 - 1, (L, E), generator=g, dtype=torch.int64)
    return Manifest(
        version=version,
        parent=parent,
        created=created,
        reason=reason,
        spec=fp8_spec(),
        num_layers=L,
        num_experts=E,
        num_ranks=R,
        slots_per_rank=S,
        ranks_per_node=ranks_per_node,
        phy2log=torch.stack(rows).to(torch.int64),
        alive=alive,
        checkpoint={"path": "/ckpt/deepseek", "names": dict(NAMES), "layers": layers},
        checksums=checksums,
        stats={} if stats is None else stats,
    )


def golden_manifest() -> Manifest:
    """The small manifest whose exact bytes tests/golden/manifest_v1.msgpack pins.

    Every value is a literal (no random generator), so only a change of the
    encoding can change the bytes.
    """
    return Manifest(
        version=3,
        parent=2,
        created=1_767_225_600.5,
        reason="rebalance",
        spec=fp8_spec(),
        num_layers=2,
        num_experts=3,
        num_ranks=2,
        slots_per_rank=2,
        ranks_per_node=2,
        phy2log=torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]], dtype=torch.int64),
        alive=torch.tensor([True, False]),
        checkpoint={"path": "/ckpt/deepseek", "names": dict(NAMES), "layers": [3, 5]},
        checksums=torch.tensor([[-(2**63), -1, 0], [1, 0x0123456789ABCDEF, 2**63 - 1]], dtype=torch.int64),
        stats={"bytes_p2p": 123456, "seconds": 0.25, "note": "golden", "verified": True},
    )


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("ranks_per_node", [None, 2])
@pytest.mark.parametrize("layers", [None, [3, 4, 7]])
@pytest.mark.parametrize("stats", [{}, {"bytes_p2p": 2**40, "bytes_disk": 0, "seconds": 1.5e-3, "policy": "eplb"}])
def test_round_trip(ranks_per_node, layers, stats):
    """decode(encode(m)) == m for every field: fp8 spec, ranks_per_node None/int, layers None/list, stats."""
    m = make_manifest(ranks_per_node=ranks_per_node, layers=layers, stats=stats, parent=4, version=5)
    data = encode_manifest(m)
    back = decode_manifest(data, source="mem")
    assert back == m
    for name in ("phy2log", "alive", "checksums"):
        a, b = getattr(m, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert back.spec == m.spec and back.spec["w13"].dtype == torch.float8_e4m3fn
    assert back.checkpoint == m.checkpoint and back.stats == m.stats
    assert back.ranks_per_node == ranks_per_node and back.checkpoint["layers"] == layers
    assert isinstance(back.created, float) and back.created == m.created
    assert back.placement() == m.placement()
    assert encode_manifest(back) == data


def test_encoding_is_deterministic():
    """Same manifest -> same bytes, whatever the insertion order of nested dicts or the tensors' layout."""
    m = make_manifest(stats={"b": 1, "a": 2.0})
    shuffled = dataclasses.replace(
        m,
        stats={"a": 2.0, "b": 1},
        checkpoint={"layers": None, "path": m.checkpoint["path"], "names": dict(reversed(list(NAMES.items())))},
        phy2log=m.phy2log.t().contiguous().t(),  # same values, column-major strides
    )
    assert encode_manifest(m) == encode_manifest(m) == encode_manifest(shuffled)


def test_file_is_plain_msgpack_with_raw_arrays():
    """Any msgpack reader sees one map; arrays are little-endian bytes with dtype and shape, not int lists."""
    m = make_manifest()
    d = msgpack.unpackb(encode_manifest(m), raw=False)
    assert d["kind"] == "expert-store-manifest" and d["format_version"] == FORMAT_VERSION
    assert list(d)[-1] == "sha256" and len(d["sha256"]) == 32
    arr = d["phy2log"]
    assert arr["dtype"] == "int64" and arr["shape"] == [m.num_layers, m.num_ranks * m.slots_per_rank]
    assert arr["data"] == b"".join(int(v).to_bytes(8, "little", signed=True) for v in m.phy2log.view(-1))
    assert d["alive"]["data"] == bytes(int(v) for v in m.alive)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"phy2log": torch.zeros((3, 8), dtype=torch.int32)}, "phy2log must be torch.int64 [3, 8]"),
        ({"alive": torch.ones(4, dtype=torch.int64)}, "alive must be torch.bool [4]"),
        ({"checksums": torch.zeros((3, 5), dtype=torch.int64)}, "checksums must be torch.int64 [3, 6]"),
        ({"phy2log": torch.zeros((3, 8), dtype=torch.int64)}, "not a valid placement: layer 0: logical expert 1"),
        ({"parent": 1}, "parent must be nil or an int in [1, version=1)"),
        ({"format_version": 2}, "format_version must be 1"),
        ({"stats": {"x": [1]}}, "stats['x'] must be an int, a finite float, a str or a bool"),
        ({"checkpoint": {"path": "p", "names": {}}}, "checkpoint must have exactly the keys"),
        ({"checkpoint": {"path": "p", "names": {"w2": []}, "layers": None}}, "non-empty list of str"),
        ({"checkpoint": {"path": "p", "names": {}, "layers": [1, -2]}}, "list of distinct ints >= 0"),
        ({"ranks_per_node": 0}, "ranks_per_node must be in 1.."),
        ({"created": float("nan")}, "created must be unix seconds"),
        ({"load": torch.zeros((3, 6), dtype=torch.float64)}, "load must be None or torch.float32 [3, 6]"),
        ({"load": torch.zeros((3, 5))}, "load must be None or torch.float32 [3, 6], got torch.float32 [3, 5]"),
        ({"load": torch.zeros((3, 6)).index_fill_(1, torch.tensor([4]), -1.0)}, "load[0, 4] = -1.0"),
        ({"load": torch.zeros((3, 6)).index_fill_(0, torch.tensor([2]), float("inf"))}, "load[2, 0] = inf"),
        ({"load": [[0.0] * 6] * 3}, "load must be None or a torch.Tensor"),
    ],
)
def test_encode_rejects_bad_fields(change, needle):
    """encode_manifest refuses ill-typed or inconsistent fields with a ManifestError naming the version."""
    m = dataclasses.replace(make_manifest(), **change)
    with pytest.raises(ManifestError) as ei:
        encode_manifest(m)
    assert "manifest v1" in str(ei.value) and needle in str(ei.value)


def test_manifest_to_json():
    """The operator summary is JSON-serializable and carries the arrays as lists."""
    m = make_manifest(layers=[1, 2, 3], stats={"seconds": 0.5})
    j = manifest_to_json(m)
    json.dumps(j)
    assert j["phy2log"] == m.phy2log.tolist() and j["alive"] == m.alive.tolist()
    assert j["checksums"] == m.checksums.tolist() and j["checkpoint"]["layers"] == [1, 2, 3]
    assert j["spec"][0] == {"name": "w13", "shape": [32, 32], "dtype": "float8_e4m3fn"}
    assert j["placement_digest"] == m.placement().digest().hex()
    assert j["created_iso"] == "2026-01-01T00:00:00Z"


# --------------------------------------------------------------------------- golden bytes


def test_golden_bytes():
    """The encoding of a fixed manifest is pinned byte for byte: a format change must be a decision.

    If the format changes on purpose, bump FORMAT_VERSION (keeping a reader for
    the old one) and regenerate the file deliberately with
    ``EXPERT_STORE_REGEN_GOLDEN=1 python -m pytest tests/test_manifest.py -k golden``,
    then review the diff of tests/golden/ before committing it.
    """
    data = encode_manifest(golden_manifest())
    if os.environ.get("EXPERT_STORE_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes()


def test_golden_decodes():
    """The pinned file still decodes to the same manifest (old files stay readable)."""
    m = decode_manifest(GOLDEN.read_bytes(), source=str(GOLDEN))
    assert m == golden_manifest() and m.load is None


def golden_manifest_with_load() -> Manifest:
    """The golden manifest with a recorded load (float32 [2, 3], exact in float32)."""
    load = torch.tensor([[0.0, 1.5, 1e6], [3.25, 2.0**-10, 7.0]], dtype=torch.float32)
    return dataclasses.replace(golden_manifest(), load=load)


def test_golden_bytes_with_load():
    """A manifest with a load: the golden map plus one float32 array entry, ``load``, after ``stats``
    (regenerate as test_golden_bytes says)."""
    data = encode_manifest(golden_manifest_with_load())
    if os.environ.get("EXPERT_STORE_REGEN_GOLDEN") == "1":
        GOLDEN_LOAD.write_bytes(data)
    assert data == GOLDEN_LOAD.read_bytes()
    d = payload_of(golden_manifest_with_load())
    assert list(d)[-2:] == ["stats", "load"] and d["load"]["dtype"] == "float32" and d["load"]["shape"] == [2, 3]
    assert d["load"]["data"] == golden_manifest_with_load().load.numpy().astype("<f4").tobytes()
    m = decode_manifest(GOLDEN_LOAD.read_bytes(), source=str(GOLDEN_LOAD))
    assert m == golden_manifest_with_load() and m != golden_manifest()
    assert manifest_to_json(m)["load"] == m.load.tolist() and manifest_to_json(golden_manifest())["load"] is None


def test_load_of_wrong_dtype_in_the_file_is_named():
    """A sealed file whose load array is int64, or whose load holds a NaN, is refused naming the field."""
    d = payload_of(golden_manifest_with_load())
    d["load"] = {"dtype": "int64", "shape": [2, 3], "data": bytes(48)}
    expect_corrupt(seal(d), "array 'load' has unknown dtype 'int64' (expected float32)")
    d["load"] = {"dtype": "float32", "shape": [2, 3], "data": np.full(6, np.nan, dtype="<f4").tobytes()}
    expect_corrupt(seal(d), "load[0, 0] = nan: loads must be finite and >= 0")


# --------------------------------------------------------------------------- corruption


class Raw(bytes):
    """A value already packed as msgpack (e.g. a str that is not UTF-8): :func:`seal` writes it verbatim."""


def seal(payload: dict) -> bytes:
    """File bytes for ``payload`` (the top-level map, in its order) closed by a valid sha256 entry:
    the way to build files that pass the checksum but hold wrong values (the file format's own
    definition: the digest covers every byte before the fixed 42-byte ``sha256`` entry)."""
    packer = msgpack.Packer(use_bin_type=True)
    body = packer.pack_map_header(len(payload) + 1) + b"".join(
        packer.pack(k) + (v if isinstance(v, Raw) else packer.pack(v)) for k, v in payload.items()
    )
    return body + b"\xa6sha256\xc4\x20" + hashlib.sha256(body).digest()


def payload_of(m: Manifest) -> dict:
    """The top-level map of m's file without its checksum entry (to build sealed but wrong files)."""
    d = msgpack.unpackb(encode_manifest(m), raw=False)
    del d["sha256"]
    return d


def expect_corrupt(data: bytes, needle: str = "") -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        decode_manifest(data, source="/store/manifests/v00000001.msgpack")
    msg = str(ei.value)
    assert msg.startswith("/store/manifests/v00000001.msgpack: "), msg
    assert needle in msg, msg
    return ei.value


@pytest.mark.parametrize("cut", [0, 1, 7, 100, 0.5, -200, -42, -41, -33, -1])
def test_truncation_detected(cut):
    """A file cut anywhere is a ManifestError naming the file (never a msgpack traceback)."""
    data = encode_manifest(make_manifest())
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    expect_corrupt(data[:n])


def test_every_single_byte_flip_detected():
    """Flipping any single bit of the file is detected (checksum, parse or field check), naming the file."""
    data = encode_manifest(make_manifest(L=1, E=2, R=2, S=1))
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            expect_corrupt(bytes(bad))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 64, b"garbage, not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb({"a": 1})],
)
def test_garbage_detected(data):
    """Bytes that are not a manifest at all raise ManifestError naming the file."""
    expect_corrupt(data)


def test_trailing_bytes_detected():
    """Extra bytes after the map (e.g. two writers interleaved) are corruption."""
    data = encode_manifest(make_manifest())
    expect_corrupt(data + b"\x00")
    expect_corrupt(data + data)


def test_wrong_kind():
    """A well-formed msgpack map of another kind is refused as 'not an expert-store manifest'."""
    d = payload_of(make_manifest())
    d["kind"] = "something-else"
    expect_corrupt(seal(d), "not an expert-store manifest")


def test_newer_format_version():
    """A file from a newer expert-store says so instead of being misread."""
    d = payload_of(make_manifest())
    d["format_version"] = FORMAT_VERSION + 1
    d["new_field"] = "x"
    expect_corrupt(seal(d), f"format_version {FORMAT_VERSION + 1} is newer")


def test_checksum_mismatch_even_if_msgpack_parses():
    """Changing a value while keeping valid msgpack is caught by the checksum."""
    data = bytearray(encode_manifest(make_manifest()))
    i = data.index(b"/ckpt/deepseek")
    data[i + 1] = ord("D")
    expect_corrupt(bytes(data), "checksum mismatch")


@pytest.mark.parametrize(
    "field", ["version", "parent", "created", "spec", "num_layers", "ranks_per_node", "phy2log", "alive", "stats"]
)
def test_missing_field(field):
    """A sealed file missing any field names that field."""
    d = payload_of(make_manifest())
    del d[field]
    expect_corrupt(seal(d), f"field {field!r} is missing")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("version", "1", "version must be an int, got str"),
        ("version", True, "version must be an int, got bool"),
        ("parent", 1.5, "parent must be nil or an int"),
        ("reason", 7, "reason must be a str"),
        ("num_ranks", 5, "phy2log must be torch.int64 [3, 10]"),
        ("spec", [{"name": "w", "shape": [2], "dtype": "float99"}], "malformed spec"),
        ("checkpoint", [], "checkpoint must be a dict"),
        ("stats", {"x": b"raw"}, "stats['x'] must be an int, a finite float"),
        ("phy2log", [1, 2], "array 'phy2log' must be a map"),
        ("extra", 1, "unknown field(s) ['extra']"),
    ],
)
def test_wrong_types(field, value, needle):
    """Ill-typed or inconsistent fields in a sealed file are a ManifestError naming the file and field."""
    d = payload_of(make_manifest())
    d[field] = value
    expect_corrupt(seal(d), needle)


@pytest.mark.parametrize(
    ("arr", "mutate", "needle"),
    [
        ("phy2log", lambda a: a.update(data=a["data"][:-8]), "needs 192 bytes of data, the file holds 184"),
        ("checksums", lambda a: a.update(shape=[3, 7]), "needs 168 bytes of data, the file holds 144"),
        ("alive", lambda a: a.update(data=b"\x01\x02\x00\x01"), "holds a byte other than 0 or 1"),
        ("alive", lambda a: a.update(dtype="float32"), "unknown dtype 'float32'"),
        ("phy2log", lambda a: a.update(shape=[3, -8]), "malformed shape"),
        ("phy2log", lambda a: a.update(data=[1, 2]), "data must be bin"),
        ("checksums", lambda a: a.pop("shape"), "must be a map with keys dtype, shape, data"),
    ],
)
def test_bad_arrays(arr, mutate, needle):
    """Array byte lengths must match dtype * shape; bool bytes are 0/1; errors name the array and file."""
    d = payload_of(make_manifest())
    mutate(d[arr])
    err = expect_corrupt(seal(d), needle)
    assert repr(arr) in str(err)


ODD_VALUES = [None, True, 0, -1, 2**64 - 1, 1.5, "s", b"b", [], {}, [1, "x"], {"a": 1}, {"dtype": "int64"}]


def test_any_ill_typed_value_is_a_manifest_error():
    """Replacing any field or nested entry with any odd value gives ManifestError (or a valid manifest), never
    another exception: the decoder checks every type it relies on."""
    base = payload_of(make_manifest(layers=[1, 2, 3]))
    paths = [(k,) for k in base]
    paths += [(k, sub) for k in ("phy2log", "alive", "checksums", "checkpoint") for sub in base[k]]
    paths += [("checkpoint", "names", "w13"), ("spec", 0), ("spec", 1, "shape"), ("spec", 2, "dtype")]
    for path in paths:
        for value in ODD_VALUES:
            d = msgpack.unpackb(msgpack.packb(base))  # deep copy
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            try:
                decode_manifest(seal(d), source="/fuzz")
            except ManifestError as e:
                assert str(e).startswith("/fuzz: ")


NON_UTF8 = Raw(b"\xa3\xff\xfe\xfd")  # a msgpack str of 3 bytes that are not UTF-8


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("created",), 1e300, "created"),
        (("created",), -1e300, "created"),
        (("created",), float("nan"), "created"),
        (("created",), float("-inf"), "created"),
        (("created",), -1.0, "created"),
        (("created",), 1e12, "created"),  # year 33658: gmtime cannot print it
        (("version",), 2**63, "version"),
        (("version",), 2**64 - 1, "version"),
        (("parent",), 2**64 - 1, "parent"),
        (("format_version",), 2**64 - 1, "format_version"),
        (("ranks_per_node",), 2**64 - 1, "ranks_per_node"),
        (("stats",), {"seconds": float("nan")}, "stats['seconds']"),
        (("stats",), {"seconds": float("inf")}, "stats['seconds']"),
        (("stats",), {"x": None}, "stats['x']"),
        (("checkpoint", "layers"), [3], "checkpoint['layers']"),
        (("checkpoint", "layers"), [3, 3, 4], "checkpoint['layers']"),
        (("checkpoint", "layers"), [2**64 - 1, 1, 2], "checkpoint['layers']"),
        (("spec", 0, "extra"), 1, "spec"),
        (("spec", 0, "shape"), [2**40, 2**40], "spec"),
        (("alive", "data"), b"\x00" * 4, "alive"),
        (("reason",), NON_UTF8, "UTF-8"),
        (
            ("checkpoint",),
            Raw(b"\x83" + b"".join(map(msgpack.packb, ["layers", None, "names", NAMES, "path"])) + NON_UTF8),
            "UTF-8",
        ),
    ],
)
def test_decode_checks_every_value_it_returns(path, value, needle):
    """Well-sealed files with values no store writes (times out of range, ints beyond int64, NaN stats,
    a layer map shorter than L or repeating a layer, a spec of 2**80 bytes, no live rank, bytes that
    are not UTF-8) are a ManifestError naming the file and the field."""
    d = payload_of(make_manifest())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    expect_corrupt(seal(d), needle)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"created": 1e300}, "created"),
        ({"version": 2**63, "parent": None}, "version"),
        ({"stats": {"seconds": float("nan")}}, "stats['seconds']"),
        ({"alive": torch.zeros(4, dtype=torch.bool)}, "alive"),
    ],
)
def test_encode_refuses_what_decode_refuses(change, needle):
    """encode_manifest runs the same checks: it never writes a file that decode_manifest would refuse."""
    with pytest.raises(ManifestError, match=re.escape(needle)):
        encode_manifest(dataclasses.replace(make_manifest(), **change))


# --------------------------------------------------------------------------- the log


def chain(n: int, **kw) -> list[Manifest]:
    """Versions 1..n, each the parent of the next, with different placements."""
    return [make_manifest(version=v, parent=v - 1 or None, seed=v, **kw) for v in range(1, n + 1)]


def test_log_empty(tmp_path):
    """A root without manifests has no versions; read() says so, naming the directory."""
    log = ManifestLog(tmp_path)
    assert log.versions() == [] and log.latest() is None
    with pytest.raises(ManifestError, match="no committed manifest"):
        log.read()
    with pytest.raises(ManifestError, match="version 3 is not committed"):
        log.read(3)


def test_log_commit_and_read(tmp_path):
    """Commits land at manifests/v{version:08d}.msgpack; versions ascend; read(None) is the latest."""
    log = ManifestLog(tmp_path)
    ms = chain(3)
    for m in ms:
        path = log.commit(m)
        assert path == tmp_path / "manifests" / f"v{m.version:08d}.msgpack" == log.path_of(m.version)
    assert log.versions() == [1, 2, 3] and log.latest() == 3
    assert log.read() == ms[2]
    assert [log.read(v) for v in (1, 2, 3)] == ms
    assert sorted(os.listdir(tmp_path / "manifests")) == [f"v0000000{v}.msgpack" for v in (1, 2, 3)]
    with pytest.raises(ManifestError, match=r"a manifest version must be in 1\.\."):
        log.path_of(0)


def test_commit_requires_parent_is_latest(tmp_path):
    """A new version must name the latest committed version as its parent."""
    log = ManifestLog(tmp_path)
    with pytest.raises(ManifestError, match=r"parent 1 is not the latest committed version \(None\)"):
        log.commit(make_manifest(version=2, parent=1))
    log.commit(make_manifest(version=1))
    log.commit(make_manifest(version=2, parent=1, seed=2))
    with pytest.raises(ManifestError, match=r"v00000004.msgpack: parent 1 is not the latest committed version \(2\)"):
        log.commit(make_manifest(version=4, parent=1, seed=4))
    with pytest.raises(ManifestError, match=r"parent None is not the latest"):
        log.commit(make_manifest(version=3, parent=None, seed=3))
    assert log.versions() == [1, 2]


def test_stale_and_identical_recommit(tmp_path):
    """Ranks sharing a root may commit identical bytes twice; different content for one version is refused."""
    a, b = ManifestLog(tmp_path), ManifestLog(tmp_path)
    m1, m2 = chain(2)
    assert a.commit(m1) == b.commit(m1)
    a.commit(m2)
    assert b.commit(m2) == a.path_of(2)  # identical: accepted even though parent 1 is no longer latest
    stale = dataclasses.replace(m2, reason="another writer")
    with pytest.raises(ManifestError, match=r"v00000002.msgpack: version 2 is already committed with different"):
        b.commit(stale)
    assert a.read(2) == m2 and a.versions() == [1, 2]
    assert not [n for n in os.listdir(tmp_path / "manifests") if n.endswith(".tmp")]


def test_prepared_commits_of_ranks_sharing_a_root_leave_no_temporaries(tmp_path):
    """Ranks sharing a root each prepare the same version: whoever publishes second finds it
    committed, and every temporary file is gone afterwards, also that of a refused publish."""
    a, b = ManifestLog(tmp_path), ManifestLog(tmp_path)
    m1, m2, m3 = chain(3)
    a.commit(m1)
    pa, pb = a.prepare(m2), b.prepare(m2)
    assert pa.publish() == pb.publish() == a.path_of(2)
    orphan = b.prepare(dataclasses.replace(m3, parent=1))
    with pytest.raises(ManifestError, match="parent 1 is not the latest"):
        orphan.publish()
    assert a.versions() == [1, 2]
    assert not [n for n in os.listdir(tmp_path / "manifests") if n.endswith(".tmp")]


def test_separate_roots_are_independent(tmp_path):
    """Each rank may keep its own root; their logs do not see each other."""
    logs = [ManifestLog(tmp_path / f"rank{r}") for r in range(2)]
    ms = chain(2)
    for log in logs:
        for m in ms:
            log.commit(m)
    logs[0].commit(make_manifest(version=3, parent=2, seed=9))
    assert logs[0].versions() == [1, 2, 3] and logs[1].versions() == [1, 2]


def test_corrupt_latest_is_an_error_not_a_fallback(tmp_path):
    """read() of a corrupt latest version names that file; it never falls back to an older one."""
    log = ManifestLog(tmp_path)
    for m in chain(2):
        log.commit(m)
    path = log.path_of(2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError) as ei:
        log.read()
    assert str(path) in str(ei.value)
    assert log.latest() == 2 and log.read(1).version == 1


def test_misnamed_file_detected(tmp_path):
    """A file under another version's name (copied by hand) is refused, naming it."""
    log = ManifestLog(tmp_path)
    log.commit(make_manifest(version=1))
    os.link(log.path_of(1), log.path_of(2))
    with pytest.raises(ManifestError, match=r"v00000002.msgpack: the file holds version 1, not 2"):
        log.read()


def test_temporaries_and_strays_are_not_versions(tmp_path):
    """Only v{8 digits}.msgpack files are versions; temporaries are cleaned once old enough."""
    log = ManifestLog(tmp_path)
    log.commit(make_manifest(version=1))
    d = tmp_path / "manifests"
    (d / ".v00000002.123.abcd.tmp").write_bytes(b"partial")
    (d / "v2.msgpack").write_bytes(b"")
    (d / "v000000003.msgpack").write_bytes(b"")
    (d / "notes.txt").write_bytes(b"")
    assert log.versions() == [1]
    assert log.clean_temporaries() == []  # too young: might be another rank's commit in flight
    assert log.clean_temporaries(older_than=0) == [d / ".v00000002.123.abcd.tmp"]
    assert sorted(os.listdir(d)) == ["notes.txt", "v000000003.msgpack", "v00000001.msgpack", "v2.msgpack"]


def test_prune(tmp_path):
    """prune keeps the newest `keep` versions (never the latest) and returns the removed ones."""
    log = ManifestLog(tmp_path)
    ms = chain(5)
    for m in ms:
        log.commit(m)
    assert log.prune(keep=10) == []
    assert log.prune(keep=3) == [1, 2]
    assert log.versions() == [3, 4, 5] and log.read() == ms[4]
    assert log.prune(keep=1) == [3, 4]
    assert log.versions() == [5]
    with pytest.raises(StoreError, match="keep"):
        log.prune(keep=0)
    log.commit(make_manifest(version=6, parent=5, seed=6))
    assert log.versions() == [5, 6]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, "2", None])
def test_prune_refuses_a_bad_keep_before_deleting(tmp_path, keep):
    """keep is a positive int: bool, float, 0, negatives and None are refused before any file is removed."""
    log = ManifestLog(tmp_path)
    for m in chain(3):
        log.commit(m)
    (log.dir / ".v00000004.1.ab.tmp").write_bytes(b"x")
    os.utime(log.dir / ".v00000004.1.ab.tmp", (0, 0))  # old enough to be cleaned by a prune
    with pytest.raises(StoreError, match=r"\bkeep\b"):
        log.prune(keep=keep)
    assert log.versions() == [1, 2, 3] and (log.dir / ".v00000004.1.ab.tmp").exists()


def test_check_keep_versions():
    """The check a store runs when keep_versions is set: None keeps every version, else an int >= 1."""
    check = manifest_mod.check_keep_versions
    assert check(None) is None and check(3) == 3 and check(np.int64(2)) == 2
    for bad in (0, -1, True, False, 1.5, "2", [2]):
        with pytest.raises(StoreError, match="keep_versions"):
            check(bad)


def _store_of_another_kind(change: str) -> Manifest:
    m = make_manifest(
        version=3, parent=2, seed=3, **({change: {"L": 2, "E": 5, "R": 5, "S": 3}[change]} if change in "LERS" else {})
    )
    if change == "ranks_per_node":
        m = dataclasses.replace(m, ranks_per_node=None)
    elif change == "spec":
        m = dataclasses.replace(m, spec=fp8_spec(H=64))
    elif change == "names":
        m = dataclasses.replace(m, checkpoint={**m.checkpoint, "names": {**NAMES, "w2": "other.{layer}.{expert}"}})
    return m


@pytest.mark.parametrize("change", ["L", "E", "R", "S", "ranks_per_node", "spec", "names"])
def test_read_current_refuses_a_parent_of_another_store(tmp_path, change):
    """read_current(): the latest manifest must describe the store its parent describes (spec, L, E, R, S,
    ranks_per_node, checkpoint names); read() of one version does not look at its parent."""
    log = ManifestLog(tmp_path)
    for m in chain(2):
        log.commit(m)
    assert log.read_current() == log.read(2)
    m3 = _store_of_another_kind(change)
    log.commit(m3)
    assert log.read() == m3
    with pytest.raises(ManifestError) as ei:
        log.read_current()
    assert str(log.path_of(3)) in str(ei.value) and str(log.path_of(2)) in str(ei.value), ei.value


def test_read_current_checks_the_version_chain(tmp_path):
    """read_current(): version must be parent + 1 and a parentless version must be the oldest; a pruned
    (missing) parent is fine; a corrupt parent is named."""
    log = ManifestLog(tmp_path)
    for m in chain(2):
        log.commit(m)
    for version, parent in ((4, 2), (3, 1), (3, None)):
        log.path_of(version).write_bytes(encode_manifest(make_manifest(version=version, parent=parent, seed=7)))
        with pytest.raises(ManifestError) as ei:
            log.read_current()
        other = log.path_of(parent or 2)  # the parent named, or the older version of a parentless one
        assert str(log.path_of(version)) in str(ei.value) and str(other) in str(ei.value), ei.value
        log.path_of(version).unlink()
    log.commit(make_manifest(version=3, parent=2, seed=3))
    good = log.path_of(2).read_bytes()
    log.path_of(2).write_bytes(good[:-1])
    with pytest.raises(ManifestError, match=re.escape(str(log.path_of(2)))):
        log.read_current()
    log.path_of(2).write_bytes(good)
    assert log.prune(keep=1) == [1, 2]
    assert log.read_current() == log.read(3)
    with pytest.raises(ManifestError, match="no committed manifest"):
        ManifestLog(tmp_path / "empty").read_current()


def test_reader_sees_old_or_whole_new_at_every_step(tmp_path, monkeypatch):
    """At each step of a commit another reader sees the last committed version or the complete new one."""
    log = ManifestLog(tmp_path)
    m1, m2 = chain(2)
    log.commit(m1)
    seen = {}

    def observe(step: str) -> None:
        reader = ManifestLog(tmp_path)
        seen[step] = (reader.latest(), reader.read().version)

    monkeypatch.setattr(manifest_mod, "_after_step", observe)
    log.commit(m2)
    assert seen == {"written": (1, 1), "synced": (1, 1), "linked": (2, 2)}


def _commit_then_die(root: str, m: Manifest, step: str) -> None:
    """Child process: commit m, SIGKILL ourselves right after `step` (no cleanup, no finally blocks)."""

    def die(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    manifest_mod._after_step = die
    ManifestLog(root).commit(m)
    os._exit(0)  # not reached if the step was hit; exit code 0 tells the test it was missed


@pytest.mark.parametrize("step", ["written", "synced", "linked"])
def test_crash_during_commit_leaves_log_consistent(tmp_path, step):
    """A writer killed after temp write / after fsync / after link (before dir fsync) leaves the last
    committed version readable and latest() consistent; the commit can then be redone."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    log = ManifestLog(tmp_path)
    m1, m2 = chain(2)
    log.commit(m1)
    child = ctx.Process(target=_commit_then_die, args=(str(tmp_path), m2, step))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("commit child hung")
    assert child.exitcode == -signal.SIGKILL, f"child was not killed at step {step!r} (exit {child.exitcode})"

    committed = step == "linked"
    assert log.versions() == ([1, 2] if committed else [1])
    assert log.read() == (m2 if committed else m1)
    assert log.read(1) == m1
    leftovers = [n for n in os.listdir(tmp_path / "manifests") if n.endswith(".tmp")]
    assert len(leftovers) == 1  # the dead writer's temporary, ignored by versions()

    log.commit(m2)  # a fresh commit (before the link) or an identical re-commit (after it)
    assert log.read() == m2 and log.versions() == [1, 2]
    assert [p.name for p in log.clean_temporaries(older_than=0)] == leftovers
    assert all(n.startswith("v") for n in os.listdir(tmp_path / "manifests"))


def test_errors_are_store_errors():
    """ManifestError is a StoreError (engines catch one base class)."""
    assert issubclass(ManifestError, StoreError)

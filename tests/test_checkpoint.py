"""Checkpoint reads: bit-exact bytes, strict validation, only the needed pages, changed files
refused, resources released.

Symbols: L MoE layers, E experts per layer, H hidden size, I expert intermediate size.
Every tensor of the generated checkpoints holds random bytes seeded by (checkpoint layer,
expert, tensor name) (see ckpt_factory), so a byte read from the wrong place cannot compare
equal; comparisons are torch.equal on uint8 views (fp8 / bf16 NaNs), and destinations start
poisoned. The reader's tuning and its CUDA calls are swapped through the module attributes
``_SETTINGS`` and ``_DEVICE_OPS`` (smaller reads; a CPU stand-in that runs the pinned staging
pipeline here); cold reads are forced by answering "not resident" for every read
(``ShardFile.resident``), and which reads went by ``O_DIRECT`` is seen from their descriptors'
flags; no test looks at the reader's private state.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import json
import os
import struct
import threading
from pathlib import Path

import ckpt_factory as cf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import expert_store.checkpoint as ckmod
from expert_store.checkpoint import INDEX_NAME, Checkpoint, ReadStats
from expert_store.errors import CheckpointError, StoreError
from expert_store.layout import ResidentSlabs, SlabLayout
from expert_store.plan import DiskRead
from expert_store.safetensors_file import PAGE_SIZE, ShardFile, parse_header
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


class _Nothing:
    """Stream / event stand-in: CPU copies are done when copy_ returns."""

    def wait_stream(self, other) -> None: ...

    def record(self, stream) -> None: ...

    def synchronize(self) -> None: ...


class _FakeDeviceOps(ckmod._CudaOps):
    """CPU stand-in for the CUDA calls: every destination counts as a device destination, so the
    pinned staging pipeline (buffers reused across reads, copies scattered out of them) runs on
    CPU. Staging starts poisoned, and every size asked for is recorded."""

    def __init__(self) -> None:
        self.pinned_sizes: list[int] = []

    def is_device(self, t):
        return True

    def stream(self, device):
        return _Nothing()

    current_stream = stream

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def event(self):
        return _Nothing()

    def pinned(self, nbytes):
        # Page-aligned, like cudaHostAlloc's memory (O_DIRECT reads into it need that).
        self.pinned_sizes.append(nbytes)
        raw = torch.full((nbytes + PAGE_SIZE + self.misalign,), POISON, dtype=torch.uint8)
        at = -raw.data_ptr() % PAGE_SIZE + self.misalign
        return raw[at : at + nbytes]

    misalign = 0  # bytes past a page boundary (a test of staging that is not page-aligned)


@pytest.fixture(params=["cpu", "staged"])
def path_kind(request, monkeypatch) -> str:
    """Run a test once with CPU destinations and once through the pinned staging pipeline."""
    if request.param == "staged":
        monkeypatch.setattr(ckmod, "_DEVICE_OPS", _FakeDeviceOps())
    return request.param


def _settings(monkeypatch, **kw) -> None:
    monkeypatch.setattr(ckmod, "_SETTINGS", dataclasses.replace(ckmod._SETTINGS, **kw))


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


@pytest.fixture(scope="module")
def qwen_mid(tmp_path_factory) -> cf.CheckpointInfo:
    # 1.5 MiB per expert (bf16 [2*512, 512] + [512, 512]), in 2 shards without an index.
    return cf.write_qwen(tmp_path_factory.mktemp("qmid"), H=512, I=512, num_layers=1, num_experts=6, num_shards=2)


@pytest.fixture
def qwen_copy(qwen_dir, tmp_path) -> cf.CheckpointInfo:
    """A private copy of qwen_dir (no index: every header is parsed when the Checkpoint opens)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in qwen_dir.files:
        (d / f.name).write_bytes(f.read_bytes())
    return dataclasses.replace(qwen_dir, path=d, files=tuple(d / f.name for f in qwen_dir.files))


def _every_expert(info: cf.CheckpointInfo) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    return [(la, e, _poisoned(info.spec)) for la in range(info.num_layers) for e in range(info.num_experts)]


def _check_targets(info: cf.CheckpointInfo, targets) -> None:
    for la, e, d in targets:
        assert _same_bytes(d, info.expected_expert(la, e)), (la, e)


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
def test_read_into_poisoned_destinations(style, request, path_kind):
    """read_into writes every byte of every destination (nothing stays poisoned), bit-exact, for
    targets in any order and repeated, and returns frozen ReadStats whose nbytes is
    len(targets) * spec.nbytes, every byte counted once as warm or cold."""
    info: cf.CheckpointInfo = request.getfixturevalue(style)
    pairs = [(info.num_layers - 1, info.num_experts - 1), (0, 2), (1, 0), (0, 2)]
    targets = [(la, e, _poisoned(info.spec)) for la, e in pairs]
    with info.checkpoint() as ckpt:
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    assert isinstance(stats, ReadStats) and stats.nbytes == len(pairs) * info.spec.nbytes
    assert stats.warm_bytes + stats.cold_bytes == stats.nbytes and stats.warm_reads + stats.cold_reads >= 1
    assert stats.seconds >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.nbytes = 0


def test_read_into_background_same_bytes(deepseek, monkeypatch):
    """A background read (fewer readers, for reads while the engine serves) writes the same bytes."""
    _settings(monkeypatch, chunk_bytes=5000, threads=8, cold_threads=2)
    targets = _every_expert(deepseek)[::2]
    with deepseek.checkpoint() as ckpt:
        stats = ckpt.read_into(deepseek.spec, targets, background=True)
    _check_targets(deepseek, targets)
    assert stats.nbytes == len(targets) * deepseek.spec.nbytes


@pytest.mark.parametrize("chunk_bytes", [4096, 5000, 1 << 20])
@pytest.mark.parametrize("threads", [1, 3])
def test_reads_cut_into_chunks(deepseek, monkeypatch, path_kind, chunk_bytes, threads):
    """Runs split into many small reads (not page multiples, so staging buffers are reused with
    odd fills) over one or several readers give the same bytes, through both paths."""
    _settings(monkeypatch, chunk_bytes=chunk_bytes, threads=threads, cold_threads=min(threads, 2))
    info = deepseek
    targets = _every_expert(info)[::3]
    with info.checkpoint() as ckpt:
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    assert stats.warm_reads + stats.cold_reads >= len(targets) * info.spec.nbytes // chunk_bytes


class _TwoDeviceOps(_FakeDeviceOps):
    """The stand-in with destinations on two "devices" (by the parity of their size in 8-byte
    words): the copies go to two side streams, each entered per copy."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list = []

    def device(self, t):
        key = t.numel() // 8 % 2
        self.keys.append(key)
        return ("fake", key)


@pytest.mark.parametrize(
    ("chunk_bytes", "read_bytes"), [(64 << 10, 16 << 10), (64 << 10, 5000), (48 << 10, 1 << 20), (20000, 8192)]
)
@pytest.mark.parametrize("ops_kind", ["one_device", "two_devices"])
def test_warm_staged_reads_fill_a_buffer_by_smaller_reads(deepseek, monkeypatch, chunk_bytes, read_bytes, ops_kind):
    """A warm staged read fills its staging buffer by preadvs of at most read_bytes (rounded down
    to whole pages, at least one page; one preadv when read_bytes is not smaller than the read),
    buffers reused many times by several readers, destinations on one or two devices: the bytes
    land exactly."""
    ops = _FakeDeviceOps() if ops_kind == "one_device" else _TwoDeviceOps()
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", ops)
    _settings(monkeypatch, chunk_bytes=chunk_bytes, read_bytes=read_bytes, threads=3)
    info = deepseek
    targets = _every_expert(info)
    sizes: list[int] = []
    lock = threading.Lock()
    real = os.preadv

    def preadv(fd, buffers, offset, *flags):
        with lock:
            sizes.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset, *flags)

    with info.checkpoint() as ckpt:
        ckpt.read_into(info.spec, targets[:1])  # the shards warm
        monkeypatch.setattr(os, "preadv", preadv)
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    assert stats.nbytes == len(targets) * info.spec.nbytes
    if stats.cold_bytes:
        pytest.skip("the checkpoint is not in the page cache here")
    step = max(PAGE_SIZE, read_bytes // PAGE_SIZE * PAGE_SIZE)
    assert sum(sizes) == stats.nbytes and max(sizes) <= min(step, chunk_bytes), (max(sizes), step)
    assert len(sizes) >= stats.nbytes // min(step, chunk_bytes)
    if ops_kind == "two_devices":
        assert set(ops.keys) == {0, 1}


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 2), (16, 16), (64, 16)])
def test_warm_readers_follow_the_cores(monkeypatch, cpus, threads):
    """The warm readers default to one per core this process may use, at most 16."""
    monkeypatch.setattr(ckmod, "_cpus", lambda: cpus)
    assert ckmod._ReadSettings().threads == threads


def test_staging_stays_within_staging_bytes(qwen_mid, monkeypatch):
    """Through the staging pipeline, the pinned staging of one call never exceeds staging_bytes
    (one page at least) however small it is, and the bytes still land exactly."""
    ops = _FakeDeviceOps()
    monkeypatch.setattr(ckmod, "_DEVICE_OPS", ops)
    info = qwen_mid
    pairs = [(0, 5), (0, 0), (0, 2), (0, 3), (0, 5), (0, 1), (0, 4)]
    with info.checkpoint() as ckpt:
        for staging in (None, 3 * 4096 + 1, 8192, 1):
            ops.pinned_sizes.clear()
            targets = [(la, e, _poisoned(info.spec)) for la, e in pairs]
            ckpt.read_into(info.spec, targets, staging_bytes=staging)
            _check_targets(info, targets)
            limit = ckmod._SETTINGS.staging_bytes if staging is None else max(staging, PAGE_SIZE)
            assert len(ops.pinned_sizes) == 1 and ops.pinned_sizes[0] <= limit, (staging, ops.pinned_sizes)


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
    _check_targets(info, targets)
    assert bool((buf[~written] == POISON).all())


def test_run_disk_reads_returns_bytes_read(qwen_dir):
    """The store's disk-read step fills the slots it names from the checkpoint and returns the
    bytes read (what rebalance reports as bytes_disk)."""
    from expert_store.execute import run_disk_reads  # here: execute pulls in the kernels

    info = qwen_dir
    slabs = ResidentSlabs(SlabLayout.build(info.spec, num_layers=info.num_layers, slots=2), "cpu", fill=POISON)
    reads = [DiskRead(rank=0, layer=2, expert=3, slot=1), DiskRead(rank=0, layer=0, expert=1, slot=0)]
    with info.checkpoint() as ckpt:
        n = run_disk_reads(reads, slabs=slabs, checkpoint=ckpt, staging_bytes=None)
    assert n == 2 * info.spec.nbytes
    for d in reads:
        assert _same_bytes(slabs.slot_tensors(d.layer, d.slot), info.expected_expert(d.layer, d.expert))


def test_concurrent_reads_of_one_checkpoint(qwen_dir):
    """Two threads reading through one Checkpoint at once both get exact bytes (reads take turns)."""
    info = qwen_dir
    results: dict[int, list] = {}
    with info.checkpoint() as ckpt:

        def work(i: int) -> None:
            targets = _every_expert(info)[i::2]
            for _ in range(5):
                ckpt.read_into(info.spec, targets)
            results[i] = targets

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == [0, 1]
    for targets in results.values():
        _check_targets(info, targets)


def test_layers_mapping(deepseek):
    """layers= maps store layer i to checkpoint layer layers[i]: DeepSeek's MoE layers start at 3,
    and a custom mapping [4] makes store layer 0 read checkpoint layer 4."""
    info = deepseek
    assert info.layers == (3, 4)
    with info.checkpoint() as ckpt:
        assert _same_bytes(ckpt.read_expert(0, 1), cf.expected_expert(info, 0, 1))
    with Checkpoint(info.path, names=info.names, layers=[4]) as ckpt:
        assert _same_bytes(ckpt.read_expert(0, 3), info.expected_expert(1, 3))
        with pytest.raises(CheckpointError, match=r"layers= maps 1 store layers.*layer must be in 0..0, got 1"):
            ckpt.read_expert(1, 0)
    # Without layers=, store layer 0 is checkpoint layer 0, which is dense: no experts there.
    with Checkpoint(info.path, names=info.names) as ckpt, pytest.raises(CheckpointError) as ei:
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
    with pytest.raises(CheckpointError, match="malformed checkpoint record"):
        Checkpoint.from_dict({"names": d["names"]})


def test_qwen_sharded_with_index(tmp_path):
    """A sharded checkpoint read through its index gives the same bytes as without it."""
    info = cf.write_qwen(tmp_path, H=32, I=16, num_layers=2, num_experts=3, num_shards=2, index=True)
    assert (tmp_path / INDEX_NAME).exists()
    with info.checkpoint() as ckpt:
        for la in range(2):
            for e in range(3):
                assert _same_bytes(ckpt.read_expert(la, e), info.expected_expert(la, e))


BAD_TEMPLATES = [
    "L{layer}.w",  # no {expert}
    "L{layer}.{expert}.{other}",
    "L{layer}.{expert",
    "",
    "w.{expert[0]}",  # indexing: TypeError from str.format before the fix
    "w.{layer.real}.{expert}",  # attribute
    "w.{expert!r}",  # conversion
    "w.{expert:>5}",  # alignment: spaces in the name
    "w.{expert:x}",
    "w.{expert:{layer}}",  # nested field
    "w.{}.{expert}",
    "w.{0}.{expert}",
]


def test_format_fields_in_templates(tmp_path):
    """Templates may zero-pad ({expert:03d}); any other field, indexing, attribute, conversion or
    format spec is refused up front with CheckpointError naming names[...] and the template."""
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    save_file({"L2.E007.w": t}, str(tmp_path / "m.safetensors"))
    with Checkpoint(tmp_path / "m.safetensors", names={"w": "L{layer}.E{expert:03d}.w"}, layers=[2]) as ckpt:
        assert torch.equal(ckpt.read_expert(0, 7)["w"], t)
    for bad in BAD_TEMPLATES:
        with pytest.raises(CheckpointError, match=r"names\['w'\]") as ei:
            Checkpoint(tmp_path / "m.safetensors", names={"w": bad})
        assert repr(bad) in str(ei.value), bad


def test_many_adjacent_tiny_tensors(tmp_path):
    """1100 adjacent 4-byte tensors read in one call (more than preadv's 1024-buffer limit in one
    file-contiguous run) all land in their own destinations."""
    n = 1100
    save_file({f"e{i:04d}.s": torch.tensor([i], dtype=torch.int32) for i in range(n)}, str(tmp_path / "m.safetensors"))
    spec = ExpertSpec([TensorSpec("s", (1,), torch.int32)])
    dests = [{"s": torch.full((1,), -1, dtype=torch.int32)} for _ in range(n)]
    with Checkpoint(tmp_path / "m.safetensors", names={"s": "e{expert:04d}.s"}) as ckpt:
        assert ckpt.read_into(spec, [(0, i, d) for i, d in enumerate(dests)]).nbytes == 4 * n
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
        Checkpoint(info.path, names=info.names)
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
        Checkpoint(d, names=qwen_dir.names)
    assert "dup.safetensors" in str(ei.value) and "model." in str(ei.value)
    (d / "dup.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"dup\.safetensors"):
        Checkpoint(d, names=qwen_dir.names)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint(tmp_path, names=qwen_dir.names)  # holds only the subdirectory
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere", names=qwen_dir.names)


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


def test_concatenation_needs_matching_parts(tmp_path):
    """Templates concatenated on dim 0 must share dtype and trailing dims; the error names both tensors."""
    save_file(
        {"a.0": torch.zeros(2, 4, dtype=torch.int16), "b.0": torch.zeros(2, 3, dtype=torch.int16)},
        str(tmp_path / "m.safetensors"),
    )
    ckpt = Checkpoint(tmp_path / "m.safetensors", names={"w": ["a.{expert}", "b.{expert}"]})
    with ckpt, pytest.raises(CheckpointError, match=r"'b\.0'.*concatenated.*'a\.0'"):
        ckpt.read_expert(0, 0)


def test_index_entries_must_stay_inside_the_directory(deepseek, tmp_path):
    """An index entry that leaves the checkpoint directory (absolute, ``..``, or ``..`` hidden
    behind a subdirectory) is refused at open naming the index and the tensor, even when the
    file it points to exists; ``sub/../shard`` that stays inside is read normally."""
    info = _copy_ckpt(deepseek, tmp_path / "ckpt")
    index = info.path / INDEX_NAME
    good = json.loads(index.read_text())
    shard = _shard_of(info, GATE)
    (tmp_path / "x.safetensors").write_bytes(shard.read_bytes())
    (info.path / "sub").mkdir()
    for entry in ("../x.safetensors", "sub/../../x.safetensors", str(tmp_path / "x.safetensors"), "", 7):
        doc = json.loads(json.dumps(good))
        doc["weight_map"][GATE] = entry
        index.write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match="inside the checkpoint directory") as ei:
            info.checkpoint()
        assert str(index) in str(ei.value) and GATE in str(ei.value), entry
    doc = json.loads(json.dumps(good))
    doc["weight_map"][GATE] = f"sub/../{shard.name}"
    index.write_text(json.dumps(doc))
    with info.checkpoint() as ckpt:
        assert _same_bytes(ckpt.read_expert(1, 2), info.expected_expert(1, 2))


def test_arguments_checked_naming_the_argument(qwen_dir):
    """Every argument is checked with CheckpointError naming it: bools, strings and floats where
    ints are meant (layer, expert, layers[i], num_layers, staging_bytes), staging_bytes of 0, < 0
    or 2**64, a path that is not one; names and layers are keyword-only. Nothing is written."""
    info = qwen_dir
    with info.checkpoint() as ckpt:
        for layer, expert, word in [(True, 0, "layer"), (0, False, "expert"), ("0", 0, "layer"), (0, 1.0, "expert")]:
            with pytest.raises(CheckpointError, match=word):
                ckpt.read_expert(layer, expert)
            dests = _poisoned(info.spec)
            with pytest.raises(CheckpointError, match=word):
                ckpt.read_into(info.spec, [(layer, expert, dests)])
            assert _all_poisoned(dests)
        for bad in (2**64, 0, -1, 1.5, "4096", True):
            dests = _poisoned(info.spec)
            with pytest.raises(CheckpointError, match="staging_bytes"):
                ckpt.read_into(info.spec, [(0, 0, dests)], staging_bytes=bad)
            assert _all_poisoned(dests)
        for kw in ({"num_layers": True, "num_experts": 1}, {"num_layers": 1, "num_experts": 0}):
            with pytest.raises(CheckpointError, match="num_"):
                ckpt.validate(info.spec, **kw)
        with pytest.raises(CheckpointError, match="spec must be an ExpertSpec"):
            ckpt.read_into("spec", [])
        with pytest.raises(CheckpointError, match="targets must be"):
            ckpt.read_into(info.spec, "targets")
    for layers, word in [([True], r"layers\[0\]"), ([0, "1"], r"layers\[1\]"), ([0, 1.0], r"layers\[1\]")]:
        with pytest.raises(CheckpointError, match=word):
            Checkpoint(info.path, names=info.names, layers=layers)
    for layers in (3, "012", [], [1, 1]):
        with pytest.raises(CheckpointError, match="layers"):
            Checkpoint(info.path, names=info.names, layers=layers)
    with pytest.raises(CheckpointError, match="path must be"):
        Checkpoint(3, names=info.names)
    with pytest.raises(CheckpointError, match="names must be"):
        Checkpoint(info.path, names=["w13"])
    with pytest.raises(TypeError):
        Checkpoint(info.path, info.names)  # keyword-only


# -- files that change under an open Checkpoint ---------------------------------------


def test_truncated_shard_raises_naming_it(qwen_copy, path_kind):
    """A shard truncated after the first read makes the next read raise CheckpointError naming
    the shard (never SIGBUS, never a raw OSError, never the surviving bytes read silently), also
    for an expert whose bytes are all still in the file; the process lives on and the other
    shards still read."""
    info = qwen_copy
    shard = info.files[1]
    shards = {(la, e): {r[0] for r in _expert_ranges(info, la, e)} for la, e, _ in _every_expert(info)}
    in_shard = [p for p, files in shards.items() if str(shard) in files]
    other = next((*p, _poisoned(info.spec)) for p, files in shards.items() if str(shard) not in files)
    with info.checkpoint() as ckpt:
        ckpt.read_into(info.spec, _every_expert(info))
        os.truncate(shard, shard.stat().st_size - 1000)
        for la, e in (in_shard[0], in_shard[-1]):
            dests = _poisoned(info.spec)
            with pytest.raises(CheckpointError, match=str(shard)):
                ckpt.read_into(info.spec, [(la, e, dests)])
        os.truncate(shard, 0)
        with pytest.raises(CheckpointError, match=str(shard)):
            ckpt.read_expert(*in_shard[0])
        ckpt.read_into(info.spec, [other])
        _check_targets(info, [other])


def _swap_two_tensors(path: Path) -> None:
    """Replace ``path`` (os.replace of a new file) by the same bytes under a header that swaps
    the data_offsets of two same-sized tensors: a valid file of the same size whose tensors
    are not where the old header says."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    a, b = sorted(k for k in h if k.endswith("down_proj.weight"))[:2]
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    hb = json.dumps(h, separators=(",", ":")).encode().ljust(n)
    assert len(hb) == n
    tmp = path.with_suffix(".new")
    tmp.write_bytes(raw[:8] + hb + raw[8 + n :])
    os.replace(tmp, path)


@pytest.mark.parametrize("when", ["before the first read", "after the first read"])
def test_replaced_shard_raises_never_stale_bytes(qwen_copy, path_kind, when):
    """A shard replaced by another valid file of the same size while a Checkpoint holds its
    header (before any read, or after one has opened it) raises CheckpointError naming the
    shard instead of reading the new file's bytes through the old header; a new Checkpoint
    reads the new file exactly as safetensors does."""
    info = qwen_copy
    shard = info.files[0]
    with info.checkpoint() as ckpt:
        if when == "after the first read":
            ckpt.read_into(info.spec, _every_expert(info))
        _swap_two_tensors(shard)
        targets = _every_expert(info)
        with pytest.raises(CheckpointError, match=f"{shard}: the file changed"):
            ckpt.read_into(info.spec, targets)
        assert all(_all_poisoned(d) for _, _, d in targets)
    new = load_file(str(shard))
    with info.checkpoint() as fresh:
        for la, e, _ in _every_expert(info):
            name = f"model.layers.{la}.mlp.experts.{e}.down_proj.weight"
            if name in new:
                assert torch.equal(_u8(fresh.read_expert(la, e)["w2"]), _u8(new[name])), name


def test_shard_rewritten_in_place_raises(qwen_copy):
    """A shard rewritten in place with other bytes of the same size (same inode, new mtime) is
    refused like a replaced one."""
    info = qwen_copy
    shard = info.files[2]
    with info.checkpoint() as ckpt:
        ckpt.read_into(info.spec, _every_expert(info))
        st = shard.stat()
        with open(shard, "r+b") as f:
            f.seek(st.st_size - 64)
            f.write(bytes(64))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        with pytest.raises(CheckpointError, match=f"{shard}: the file changed"):
            ckpt.read_into(info.spec, _every_expert(info))


def test_shard_truncated_during_a_read_raises(qwen_copy, monkeypatch, path_kind):
    """A shard truncated while a read is in flight (after its first preadv) raises CheckpointError
    naming the shard: a short read, or the check when the read ends."""
    info = qwen_copy
    shard = info.files[1]
    real = os.preadv
    done = []

    def preadv(fd, buffers, offset, *flags):
        got = real(fd, buffers, offset, *flags)
        if not done and os.path.samefile(f"/proc/self/fd/{fd}", shard):
            done.append(1)
            os.truncate(shard, shard.stat().st_size // 2)
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    with info.checkpoint() as ckpt, pytest.raises(CheckpointError, match=str(shard)):
        ckpt.read_into(info.spec, _every_expert(info))
    assert done


# -- resources ----------------------------------------------------------------------


def _resources() -> tuple[int, int, int]:
    """(open descriptors, threads, memory maps) of this process."""
    return (
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
        len(Path("/proc/self/maps").read_text().splitlines()),
    )


def test_close_releases_every_resource(qwen_dir, path_kind):
    """100 cycles of (Checkpoint, read_into with several readers, read_expert, close) leave the
    process's open descriptors, threads and memory maps where they were; close is idempotent,
    ``with`` closes, and a read after close reopens what it needs (a store closing a shared
    Checkpoint does not break another user of it)."""
    info = qwen_dir

    def cycle(ckpt: Checkpoint) -> None:
        targets = _every_expert(info)
        ckpt.read_into(info.spec, targets)
        _check_targets(info, targets)
        assert _same_bytes(ckpt.read_expert(1, 2), info.expected_expert(1, 2))

    def flat(before: tuple[int, int, int]) -> bool:
        # Maps may grow by a few malloc arenas that new reader threads make lazily; a leak
        # would add one or more per cycle.
        fds, threads, maps = _resources()
        return fds == before[0] and threads == before[1] and maps <= before[2] + 8

    for _ in range(10):  # warm-up: allocator arenas, torch and numpy caches
        with info.checkpoint() as ckpt:
            cycle(ckpt)
    gc.collect()
    before = _resources()
    for _ in range(100):
        ckpt = info.checkpoint()
        cycle(ckpt)
        ckpt.close()
    gc.collect()
    assert flat(before), (before, _resources())
    shared = info.checkpoint()
    for _ in range(20):
        cycle(shared)
        shared.close()
        shared.close()
    gc.collect()
    assert flat(before), (before, _resources())


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


def _expert_ranges(info: cf.CheckpointInfo, layer: int, expert: int) -> list[tuple[str, int, int]]:
    """(shard, first byte, end) of every checkpoint tensor of (layer, expert), from the headers."""
    ck = info.ckpt_layer(layer)
    out = []
    for f in info.files:
        tensors = parse_header(f).tensors
        for value in info.names.values():
            for template in [value] if isinstance(value, str) else value:
                e = tensors.get(template.format(layer=ck, expert=expert))
                if e is not None:
                    out.append((str(f), e.offset, e.offset + e.nbytes))
    return out


def _cache_only(info: cf.CheckpointInfo, experts) -> None:
    """Evict every shard, then read exactly the bytes of layer 0's ``experts`` back into the page
    cache (readahead off); skip where this filesystem does not evict."""
    for f in info.files:
        cf.evict_page_cache(f)
    if max(cf.resident_fraction(f) for f in info.files) > 0.05:
        pytest.skip("POSIX_FADV_DONTNEED does not evict on this filesystem")
    for e in experts:
        for path, lo, hi in _expert_ranges(info, 0, e):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                os.pread(fd, hi - lo, lo)
            finally:
                os.close(fd)


def test_warm_and_cold_split_follows_the_page_cache(qwen_mid, path_kind):
    """With one expert in the page cache and another not, ReadStats counts exactly the first as
    warm bytes and the second as cold bytes (mincore sampling), and both read bit-exact."""
    info = qwen_mid
    _cache_only(info, [2])
    targets = [(0, 2, _poisoned(info.spec)), (0, 4, _poisoned(info.spec))]
    with info.checkpoint() as ckpt:
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    assert stats.warm_bytes == info.spec.nbytes and stats.cold_bytes == info.spec.nbytes, stats


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _direct_allowed(path) -> bool:
    """Whether this filesystem opens ``path`` with O_DIRECT (else the reader stays buffered)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _address(buf) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class _Reads:
    """Every preadv (file, O_DIRECT?, offset, bytes asked, first buffer's address), in call
    order, through a wrapper of os.preadv."""

    def __init__(self, monkeypatch) -> None:
        self.log: list[tuple[str, bool, int, int, int]] = []
        self.lock = threading.Lock()
        real = os.preadv

        def preadv(fd, buffers, offset, *flags):
            entry = (
                os.path.realpath(f"/proc/self/fd/{fd}"),
                _is_direct(fd),
                offset,
                sum(len(b) for b in buffers),
                _address(buffers[0]),
            )
            with self.lock:
                self.log.append(entry)
            return real(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "preadv", preadv)

    def direct(self) -> list[tuple[str, bool, int, int, int]]:
        return [r for r in self.log if r[1]]


def _all_cold(monkeypatch) -> None:
    """Every read counts as cold (as if no page were in the page cache)."""
    monkeypatch.setattr(ShardFile, "resident", lambda self, extents, samples: [False] * len(extents))


@pytest.mark.parametrize("mode", ["direct", "buffered"])
@pytest.mark.parametrize("chunk_bytes", [4096, 5000, 1 << 20])
@pytest.mark.parametrize("cold_threads", [1, 3])
def test_cold_reads_bit_exact_on_odd_ranges(deepseek, monkeypatch, path_kind, mode, chunk_bytes, cold_threads):
    """Cold reads (forced) of tensors at offsets and of sizes that are not multiples of a page,
    cut into many reads, by one or several cold readers, O_DIRECT (where this filesystem allows
    it) or buffered (as where the filesystem refuses O_DIRECT), through both paths, give exactly the bytes; by
    O_DIRECT, every read is of whole pages at a page-aligned offset into a page-aligned buffer,
    and reads no more than the needed bytes plus the padding to pages (partial reads stay
    partial)."""
    _settings(monkeypatch, chunk_bytes=chunk_bytes, cold_threads=cold_threads)
    if mode == "buffered":
        monkeypatch.setattr(ShardFile, "open_direct", lambda self: False)
    _all_cold(monkeypatch)
    info = deepseek
    entries = [e for f in info.files for e in parse_header(f).tensors.values()]
    assert any(e.offset % PAGE_SIZE for e in entries) and any(e.nbytes % PAGE_SIZE for e in entries)
    targets = [*_every_expert(info)[1::2], (1, 4, _poisoned(info.spec))]
    reads = _Reads(monkeypatch)
    with info.checkpoint() as ckpt:
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    assert stats.cold_bytes == stats.nbytes == len(targets) * info.spec.nbytes and stats.warm_bytes == 0
    assert stats.cold_reads >= stats.nbytes // chunk_bytes
    direct = reads.direct()
    if mode == "buffered" or not _direct_allowed(info.files[0]):
        assert not direct
        assert sum(r[3] for r in reads.log) == stats.nbytes
        return
    assert len(direct) == len(reads.log) == stats.cold_reads  # every cold read, each in one preadv
    for _, _, off, n, addr in direct:
        assert off % PAGE_SIZE == 0 and n % PAGE_SIZE == 0 and addr % PAGE_SIZE == 0, (off, n, addr)
    assert stats.nbytes <= sum(r[3] for r in direct) <= stats.nbytes + 2 * PAGE_SIZE * stats.cold_reads


@pytest.mark.parametrize("where", ["open", "read", "unaligned staging"])
def test_cold_reads_fall_back_when_o_direct_is_refused(qwen_mid, monkeypatch, path_kind, where):
    """Where O_DIRECT is refused, by the open (EINVAL: tmpfs on older kernels) or by the first
    read (EINVAL: a logical block larger than a page), or the staging is not page-aligned, cold
    reads are buffered preadvs of exactly the needed bytes, bit-exact, this call and the next."""
    if where == "unaligned staging" and path_kind == "cpu":
        pytest.skip("no staging on the CPU path")
    _settings(monkeypatch, chunk_bytes=64 << 10, cold_threads=3)
    _all_cold(monkeypatch)
    info = qwen_mid
    tried = []
    if where == "open":
        real_open = os.open

        def refusing_open(path, flags, *args, **kw):
            if flags & os.O_DIRECT:
                tried.append(path)
                raise OSError(errno.EINVAL, "Invalid argument (fake)")
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    elif where == "unaligned staging":
        monkeypatch.setattr(ckmod._DEVICE_OPS, "misalign", 64, raising=False)
    reads = _Reads(monkeypatch)
    if where == "read":
        logged = os.preadv

        def refusing_read(fd, buffers, offset, *flags):
            if _is_direct(fd):
                tried.append(fd)
                raise OSError(errno.EINVAL, "Invalid argument (fake)")
            return logged(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "preadv", refusing_read)
    with info.checkpoint() as ckpt:
        for pairs in ([(0, 5), (0, 1), (0, 2)], [(0, 0), (0, 4), (0, 5)]):
            reads.log.clear()
            targets = [(la, e, _poisoned(info.spec)) for la, e in pairs]
            stats = ckpt.read_into(info.spec, targets)
            _check_targets(info, targets)
            assert stats.cold_bytes == stats.nbytes
            assert not reads.direct() and sum(r[3] for r in reads.log) == stats.nbytes
    if where == "open" or (where == "read" and _direct_allowed(info.files[0])):
        assert tried


@pytest.mark.parametrize("when", ["before the read", "during the read"])
def test_truncated_shard_raises_on_cold_reads(qwen_copy, monkeypatch, path_kind, when):
    """A shard truncated after its header was parsed, before a cold read starts or while its
    O_DIRECT reads are running (to an odd size, so that one read comes short in the middle of a
    page), raises CheckpointError naming the shard: the size check when the read starts, or the
    short read (never SIGBUS, never the bytes past the end taken as read)."""
    _settings(monkeypatch, chunk_bytes=4096, cold_threads=1)
    _all_cold(monkeypatch)
    info = qwen_copy
    targets = _every_expert(info)
    with info.checkpoint() as ckpt:
        if when == "before the read":
            shard = info.files[1]
            os.truncate(shard, shard.stat().st_size // 2 + 123)
            with pytest.raises(CheckpointError, match=f"{shard}: the file changed"):
                ckpt.read_into(info.spec, targets)
            assert all(_all_poisoned(d) for _, _, d in targets)
            return
        if not _direct_allowed(info.files[0]):
            pytest.skip("this filesystem refuses O_DIRECT")
        real = os.preadv
        cut = []

        def preadv(fd, buffers, offset, *flags):
            got = real(fd, buffers, offset, *flags)
            if not cut and _is_direct(fd):
                path = os.path.realpath(f"/proc/self/fd/{fd}")
                cut.append(path)
                os.truncate(path, os.stat(path).st_size // 2 + 123)
            return got

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(CheckpointError, match="unexpected end of file") as ei:
            ckpt.read_into(info.spec, targets)
    assert cut and cut[0] in str(ei.value)


@pytest.mark.timeout(60)
def test_cold_reads_go_in_file_order_around_the_page_cache(qwen_mid, monkeypatch, path_kind):
    """With experts 1 and 4 in the page cache and the others not, every byte lands where it
    belongs; warm reads are buffered (the page cache's copy), cold reads go by O_DIRECT where
    this filesystem allows it and, with one cold reader, strictly in file order; no read is
    hinted (no WILLNEED); ReadStats splits the bytes accordingly."""
    chunk = 128 << 10
    _settings(monkeypatch, chunk_bytes=chunk, threads=3, cold_threads=1)
    info = qwen_mid
    warm_experts = {1, 4}
    _cache_only(info, warm_experts)
    # The warm experts' pages (what _cache_only brought in), adjacent ranges merged: a warm read
    # may span two tensors, and start in a page shared with a cold neighbour.
    warm_ranges: list[tuple[str, int, int]] = []
    pages = sorted(
        (p, a // PAGE_SIZE * PAGE_SIZE, -(-b // PAGE_SIZE) * PAGE_SIZE)
        for e in warm_experts
        for p, a, b in _expert_ranges(info, 0, e)
    )
    for p, a, b in pages:
        if warm_ranges and warm_ranges[-1][0] == p and warm_ranges[-1][2] >= a:
            warm_ranges[-1] = (p, warm_ranges[-1][1], max(b, warm_ranges[-1][2]))
        else:
            warm_ranges.append((p, a, b))
    hints = []
    real_fadvise = os.posix_fadvise

    def is_warm(path: str, lo: int, hi: int) -> bool:
        return any(p == path and a <= lo and hi <= b for p, a, b in warm_ranges)

    def posix_fadvise(fd, offset, nbytes, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            hints.append((fd, offset, nbytes))
        return real_fadvise(fd, offset, nbytes, advice)

    reads = _Reads(monkeypatch)
    monkeypatch.setattr(os, "posix_fadvise", posix_fadvise)
    pairs = [(0, e) for e in (5, 0, 2, 1, 3, 4, 5)]
    targets = [(la, e, _poisoned(info.spec)) for la, e in pairs]
    with info.checkpoint() as ckpt:
        stats = ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)
    # A read that straddles a warm and a cold expert counts as cold: allow a few.
    slack = 4 * (chunk + PAGE_SIZE)
    assert abs(stats.warm_bytes - 2 * info.spec.nbytes) <= slack, stats
    assert abs(stats.cold_bytes - 5 * info.spec.nbytes) <= slack, stats  # expert 5 twice
    assert stats.cold_reads > 1 and stats.warm_reads > 0
    assert not hints
    warm = [r for r in reads.log if is_warm(r[0], r[2], r[2] + r[3])]
    cold = [(p, o, n) for p, _, o, n, _ in reads.log if not is_warm(p, o, o + n)]
    assert warm and not any(r[1] for r in warm)
    assert cold == sorted(cold), "cold reads out of file order"
    if _direct_allowed(info.files[0]):
        assert len(reads.direct()) == stats.cold_reads


@pytest.mark.timeout(60)
def test_read_error_stops_every_reader(qwen_mid, monkeypatch, path_kind):
    """An I/O error in one read, with warm readers and cold (O_DIRECT) readers running, raises
    CheckpointError naming the file (not a raw OSError), without hanging, and the checkpoint
    reads normally afterwards."""
    _settings(monkeypatch, chunk_bytes=64 << 10)
    info = qwen_mid
    _cache_only(info, [0, 2, 4])
    real = os.preadv
    calls = [0]

    def flaky(fd, buffers, offset, *flags):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(5, "Input/output error (fake)")
        return real(fd, buffers, offset, *flags)

    with info.checkpoint() as ckpt:
        monkeypatch.setattr(os, "preadv", flaky)
        with pytest.raises(CheckpointError, match=r"\.safetensors: read at offset \d+ failed.*fake"):
            ckpt.read_into(info.spec, [(0, e, _poisoned(info.spec)) for e in range(6)])
        monkeypatch.setattr(os, "preadv", real)
        targets = [(0, 3, _poisoned(info.spec))]
        ckpt.read_into(info.spec, targets)
    _check_targets(info, targets)


# -- GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("staging_bytes", [None, 8192, 3 * 4096 + 1, 1])
def test_read_into_cuda_bit_exact(deepseek, staging_bytes):
    """read_into CUDA destinations (slot views of one device buffer) writes exactly the expected
    bytes, also with staging far smaller than one expert, and touches no byte outside them."""
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
        assert ckpt.read_into(spec, targets, staging_bytes=staging_bytes).nbytes == len(pairs) * spec.nbytes
    for la, e, dests in targets:
        assert _same_bytes({k: v.cpu() for k, v in dests.items()}, info.expected_expert(la, e))
    host = buf.cpu()
    assert bool((host[:128] == POISON).all()) and bool((host[off:] == POISON).all())


def test_safetensors_oracle_agrees_with_factory(qwen_file):
    """The factory's expected bytes are what safetensors.torch.load_file reads (guards the oracle)."""
    sd = load_file(str(qwen_file.path))
    name = "model.layers.1.mlp.experts.4.down_proj.weight"
    assert torch.equal(_u8(sd[name]), _u8(qwen_file.expected_expert(1, 4)["w2"]))

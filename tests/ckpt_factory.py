"""Checkpoint generators shared by the tests, benchmarks and tools (stable API).

Import it as ``import ckpt_factory`` (``tests/`` is on ``sys.path`` under pytest's
default import mode, because ``tests/conftest.py`` lives there; tools add it
themselves).

Symbols: L MoE layers, E experts per layer, H hidden size, I expert
intermediate size, B = 128 (DeepSeek-V3's fp8 block size).

Two real naming schemes, written with safetensors' own ``save_file``:

* :func:`write_deepseek`: DeepSeek-V3 style. Per MoE layer and expert,
  ``model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight`` (float8_e4m3fn,
  gate/up ``[I, H]``, down ``[H, I]``) and ``.weight_scale_inv`` (float32
  block scales, ``[ceil(I/B), ceil(H/B)]`` / ``[ceil(H/B), ceil(I/B)]``); MoE
  layers start at checkpoint layer ``first_layer`` (3 in DeepSeek-V3); dense
  layers, attention, shared experts, router and embeddings beside them;
  sharded over ``num_shards`` files with ``model.safetensors.index.json``.
* :func:`write_qwen`: Qwen3-MoE style, bf16 ``gate/up/down_proj.weight``, no
  scales; one ``model.safetensors`` or several shards without an index.

Every tensor's bytes are random bytes from a generator seeded by (checkpoint
layer, expert, tensor name) (:func:`tensor_bytes`), so a misplaced byte cannot
pass a ``torch.equal`` check; :meth:`CheckpointInfo.expected_expert` gives the
exact bytes per spec tensor (concatenated) for bit-exact comparisons.

Page-cache helpers for cold-read tests and benchmarks: :func:`evict_page_cache`
and :func:`resident_fraction` (``mincore`` on a map of the file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from expert_store import presets
from expert_store.checkpoint import INDEX_NAME, Checkpoint
from expert_store.spec import ExpertSpec

__all__ = [
    "BLOCK",
    "CheckpointInfo",
    "deepseek_names",
    "deepseek_spec",
    "evict_page_cache",
    "expected_expert",
    "qwen_names",
    "qwen_spec",
    "resident_fraction",
    "tensor_bytes",
    "write_deepseek",
    "write_qwen",
]

BLOCK = 128  # DeepSeek-V3 fp8 weight block: one float32 scale per 128 x 128 block
_EXPERT = "model.layers.{layer}.mlp.experts.{expert}."


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tensor_bytes(layer: int, expert: int, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The deterministic contents of one checkpoint tensor: ``dtype [*shape]``, random bytes.

    Seeded by (``layer`` + 1, ``expert`` + 1, crc32(``name``)) so that
    ``layer`` / ``expert`` = -1 (non-expert tensors) are valid seeds. PCG64's
    raw 64-bit output (4 GB/s, vs 0.2 GB/s for ``Generator.bytes``) viewed as
    little-endian bytes.
    """
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    words = np.random.PCG64([layer + 1, expert + 1, zlib.crc32(name.encode())]).random_raw(_cdiv(nbytes, 8))
    raw = torch.from_numpy(words.view(np.uint8)[:nbytes])
    return raw.view(dtype).reshape(tuple(shape))


# The model presets live in the package; these names are kept for the tests.
deepseek_spec = presets.deepseek_v3_spec
deepseek_names = presets.deepseek_v3_names
qwen_spec = presets.qwen3_moe_spec
qwen_names = presets.qwen3_moe_names


@dataclass(frozen=True)
class CheckpointInfo:
    """What a generator wrote.

    Attributes:
        path: what to pass to ``Checkpoint`` (the directory, or the single file).
        files: every shard written.
        spec, names, layers: the matching ``ExpertSpec``, ``names=`` and
            ``layers=`` (None when store layer i is checkpoint layer i).
        num_layers, num_experts: L, E (store layers 0..L-1).
        templates: {template: (shape, dtype)} of each checkpoint tensor a
            template names (what :meth:`expected_expert` regenerates).
        expert_bytes: bytes of all expert tensors; total_bytes: all tensors.
    """

    path: Path
    files: tuple[Path, ...]
    spec: ExpertSpec
    names: dict[str, list[str] | str]
    layers: tuple[int, ...] | None
    num_layers: int
    num_experts: int
    templates: dict[str, tuple[tuple[int, ...], torch.dtype]]
    expert_bytes: int
    total_bytes: int

    def ckpt_layer(self, layer: int) -> int:
        """Checkpoint layer of store layer ``layer``."""
        return layer if self.layers is None else self.layers[layer]

    def checkpoint(self) -> Checkpoint:
        """A :class:`Checkpoint` over what was written (caller closes it)."""
        return Checkpoint(self.path, names=self.names, layers=self.layers)

    def expected_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """{spec name: CPU tensor} with the exact bytes of store ``layer``, ``expert``
        (templates concatenated on dim 0), regenerated from the seeds."""
        ck = self.ckpt_layer(layer)
        out = {}
        for t in self.spec.tensors:
            templates = self.names[t.name]
            templates = [templates] if isinstance(templates, str) else templates
            parts = []
            for template in templates:
                shape, dtype = self.templates[template]
                parts.append(tensor_bytes(ck, expert, template.format(layer=ck, expert=expert), shape, dtype))
            out[t.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out


def expected_expert(info: CheckpointInfo, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Same as ``info.expected_expert(layer, expert)``."""
    return info.expected_expert(layer, expert)


# (name, layer, expert, shape, dtype); layer/expert -1 where the tensor has none.
_Tensor = tuple[str, int, int, tuple[int, ...], torch.dtype]


def _write_shards(
    root: Path, tensors: list[_Tensor], *, num_shards: int, index: bool, single_name: str | None
) -> tuple[Path, ...]:
    """Split ``tensors`` (in order) into ``num_shards`` files of about equal bytes and write them."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = [t[3] for t in tensors]
    nbytes = [
        int(np.prod(s, dtype=np.int64)) * torch.empty((), dtype=t[4]).element_size() for s, t in zip(sizes, tensors)
    ]
    total = sum(nbytes)
    groups: list[list[_Tensor]] = [[] for _ in range(num_shards)]
    acc = 0
    for t, n in zip(tensors, nbytes):
        groups[min(num_shards - 1, acc * num_shards // max(total, 1))].append(t)
        acc += n
    files = []
    weight_map = {}
    for i, group in enumerate(groups):
        fname = single_name if single_name else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        path = root / fname
        # One shard in memory at a time: a few GB at most for the benchmarks.
        save_file({n: tensor_bytes(la, e, n, s, dt) for n, la, e, s, dt in group}, str(path), metadata={"format": "pt"})
        files.append(path)
        weight_map.update(dict.fromkeys((t[0] for t in group), fname))
    if index:
        doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(doc, indent=2))
    return tuple(files)


def _expert_tensors(
    layers: Iterable[int], num_experts: int, templates: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> list[_Tensor]:
    out = []
    for la in layers:
        for e in range(num_experts):
            for template, (shape, dtype) in templates.items():
                out.append((template.format(layer=la, expert=e), la, e, shape, dtype))
    return out


def _nbytes(tensors: list[_Tensor]) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) * torch.empty((), dtype=dt).element_size() for _, _, _, s, dt in tensors)


def write_deepseek(
    root: str | os.PathLike[str],
    *,
    H: int = 256,
    I: int = 128,  # noqa: E741
    num_layers: int = 2,
    num_experts: int = 8,
    first_layer: int = 3,
    num_shards: int = 3,
    index: bool = True,
    extras: bool = True,
) -> CheckpointInfo:
    """Write a DeepSeek-V3 style fp8 checkpoint under directory ``root``.

    MoE layers are checkpoint layers ``first_layer .. first_layer + num_layers - 1``
    (store layers 0..L-1, ``info.layers`` maps them); layers below
    ``first_layer`` are dense. ``extras=False`` writes the expert tensors only
    (benchmarks at real sizes, H=7168, I=2048: 44 MB per expert).
    """
    root = Path(root)
    f8, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
    hb, ib = _cdiv(H, BLOCK), _cdiv(I, BLOCK)
    templates = {
        _EXPERT + "down_proj.weight": ((H, I), f8),
        _EXPERT + "down_proj.weight_scale_inv": ((hb, ib), f32),
        _EXPERT + "gate_proj.weight": ((I, H), f8),
        _EXPERT + "gate_proj.weight_scale_inv": ((ib, hb), f32),
        _EXPERT + "up_proj.weight": ((I, H), f8),
        _EXPERT + "up_proj.weight_scale_inv": ((ib, hb), f32),
    }
    moe_layers = list(range(first_layer, first_layer + num_layers))
    tensors: list[_Tensor] = []
    if extras:
        tensors.append(("model.embed_tokens.weight", -1, -1, (64, H), bf16))
    expert_bytes = 0
    for la in range(first_layer + num_layers):
        if extras:
            p = f"model.layers.{la}."
            tensors += [
                (p + "input_layernorm.weight", la, -1, (H,), bf16),
                (p + "self_attn.q_proj.weight", la, -1, (H, H), f8),
                (p + "self_attn.q_proj.weight_scale_inv", la, -1, (hb, hb), f32),
                (p + "post_attention_layernorm.weight", la, -1, (H,), bf16),
            ]
            if la < first_layer:
                tensors += [
                    (p + "mlp.gate_proj.weight", la, -1, (I, H), f8),
                    (p + "mlp.gate_proj.weight_scale_inv", la, -1, (ib, hb), f32),
                ]
            else:
                tensors += [
                    (p + "mlp.gate.weight", la, -1, (num_experts, H), bf16),
                    (p + "mlp.gate.e_score_correction_bias", la, -1, (num_experts,), f32),
                    (p + "mlp.shared_experts.gate_proj.weight", la, -1, (I, H), f8),
                    (p + "mlp.shared_experts.gate_proj.weight_scale_inv", la, -1, (ib, hb), f32),
                ]
        if la >= first_layer:
            experts = _expert_tensors([la], num_experts, templates)
            expert_bytes += _nbytes(experts)
            tensors += experts
    if extras:
        tensors += [("model.norm.weight", -1, -1, (H,), bf16), ("lm_head.weight", -1, -1, (64, H), bf16)]
    files = _write_shards(root, tensors, num_shards=num_shards, index=index, single_name=None)
    return CheckpointInfo(
        path=root,
        files=files,
        spec=deepseek_spec(H, I),
        names=deepseek_names(),
        layers=tuple(moe_layers) if first_layer else None,
        num_layers=num_layers,
        num_experts=num_experts,
        templates=templates,
        expert_bytes=expert_bytes,
        total_bytes=_nbytes(tensors),
    )


def write_qwen(
    root: str | os.PathLike[str],
    *,
    H: int = 128,
    I: int = 64,  # noqa: E741
    num_layers: int = 2,
    num_experts: int = 8,
    first_layer: int = 0,
    num_shards: int = 1,
    index: bool = False,
    extras: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> CheckpointInfo:
    """Write a Qwen3-MoE style bf16 checkpoint under directory ``root``.

    ``num_shards=1`` writes one ``model.safetensors`` and ``info.path`` is that
    file; more shards are written without an index unless ``index=True``, and
    ``info.path`` is the directory. Qwen3-30B-A3B: H=2048, I=768 (9.4 MB per
    expert); Qwen3-235B-A22B: H=4096, I=1536 (37.7 MB).
    """
    root = Path(root)
    templates = {
        _EXPERT + "down_proj.weight": ((H, I), dtype),
        _EXPERT + "gate_proj.weight": ((I, H), dtype),
        _EXPERT + "up_proj.weight": ((I, H), dtype),
    }
    layers = list(range(first_layer, first_layer + num_layers))
    tensors: list[_Tensor] = []
    if extras:
        tensors.append(("model.embed_tokens.weight", -1, -1, (64, H), dtype))
    expert_bytes = 0
    for la in layers:
        if extras:
            p = f"model.layers.{la}."
            tensors += [
                (p + "input_layernorm.weight", la, -1, (H,), dtype),
                (p + "self_attn.q_proj.weight", la, -1, (H, H), dtype),
                (p + "mlp.gate.weight", la, -1, (num_experts, H), dtype),
            ]
        experts = _expert_tensors([la], num_experts, templates)
        expert_bytes += _nbytes(experts)
        tensors += experts
    if extras:
        tensors.append(("model.norm.weight", -1, -1, (H,), dtype))
    single = "model.safetensors" if num_shards == 1 else None
    files = _write_shards(root, tensors, num_shards=num_shards, index=index, single_name=single)
    return CheckpointInfo(
        path=files[0] if num_shards == 1 else root,
        files=files,
        spec=qwen_spec(H, I, dtype),
        names=qwen_names(),
        layers=tuple(layers) if first_layer else None,
        num_layers=num_layers,
        num_experts=num_experts,
        templates=templates,
        expert_bytes=expert_bytes,
        total_bytes=_nbytes(tensors),
    )


# -- page cache -----------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def evict_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop ``path``'s pages from the page cache: fsync (dirty pages cannot be
    dropped) then ``POSIX_FADV_DONTNEED`` over the whole file. Check with
    :func:`resident_fraction`: tmpfs and some network filesystems ignore it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of ``path``'s pages in the page cache, by ``mincore`` on a map of the
    file (mapping touches no page, so it does not change the answer)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0.0
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
            arr = np.frombuffer(mm, dtype=np.uint8)
            pages = _cdiv(size, mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            rc = _libc.mincore(ctypes.c_void_p(arr.ctypes.data), size, vec)
            del arr  # release the export before the map closes
            if rc != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore failed on {path}: {os.strerror(err)}")
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / pages

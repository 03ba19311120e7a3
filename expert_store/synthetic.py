"""Write a synthetic MoE checkpoint, for the demo and for trying the store out.

The layout of a real model's (DeepSeek-V3 or Qwen3-MoE naming, see :data:`presets.NAMINGS`):
each spec tensor stored as the checkpoint tensors its templates name (DeepSeek-V3: fp8 e4m3
gate/up/down projections with float32 block scales ``weight_scale_inv``; Qwen3-MoE: bf16), MoE
layers from checkpoint layer ``first_layer``, sharded over several safetensors files with
``model.safetensors.index.json``, plus a few non-expert tensors as in a real model. Expert bytes
are random, drawn from a generator seeded by (layer, expert, tensor), so any misplaced byte shows.
Shards are written one tensor at a time: memory stays at one tensor however large the model.
Symbols: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .presets import MODELS, ModelPreset
from .safetensors_file import SAFETENSORS_DTYPES
from .spec import ExpertSpec

__all__ = ["SyntheticCheckpoint", "write_synthetic_checkpoint"]

_ST_DTYPE = {dtype: st for st, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SyntheticCheckpoint:
    path: Path
    spec: ExpertSpec
    names: dict[str, list[str] | str]
    layers: list[int]
    num_layers: int
    num_experts: int
    nbytes: int


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        # plausible positive scales rather than random bit patterns (NaN/inf are fine to move, but ugly to look at)
        return torch.rand(shape, generator=g, dtype=torch.float32) * 1e-3 + 1e-4
    if dtype in (torch.bfloat16, torch.float16):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    # Random bytes, drawn 8 at a time (a DeepSeek-V3 expert is 44 MB).
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    words = torch.randint(-(2**63), 2**63 - 1, (-(-nbytes // 8),), dtype=torch.int64, generator=g)
    return words.view(torch.uint8)[:nbytes].view(dtype).view(shape)


def checkpoint_parts(
    spec: ExpertSpec, names: dict[str, list[str] | str]
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(template, shape, dtype) of each checkpoint tensor of one expert: a spec tensor named by a
    list of templates is stored as that many equal slices along dim 0 (gate and up -> w13)."""
    out = []
    for t in spec.tensors:
        templates = [names[t.name]] if isinstance(names[t.name], str) else list(names[t.name])
        rows = t.shape[0] // len(templates)
        out += [(template, (rows, *t.shape[1:]), t.dtype) for template in templates]
    return out


def write_shard(
    path: Path,
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    data: Callable[[int], torch.Tensor],
    written: Callable[[int, int], None] | None = None,
) -> None:
    """A safetensors file of ``tensors`` (name, shape, dtype), the bytes of tensor i made by
    ``data(i)`` (a CPU tensor of that shape and dtype) and written in turn, so that a large shard
    never stands in memory at once; ``written(i, nbytes)`` after each."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i in range(len(tensors)):
            raw = data(i).reshape(-1).view(torch.uint8)
            f.write(raw.numpy())
            if written is not None:
                written(i, raw.numel())


def _write_random_shard(
    path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype, int, bool]], progress
) -> None:
    """A shard of random tensors (name, shape, dtype, seed, expert); ``progress(nbytes)`` after each expert tensor."""

    def written(i: int, nbytes: int) -> None:
        if progress is not None and tensors[i][4]:
            progress(nbytes)

    write_shard(path, [t[:3] for t in tensors], lambda i: _random(*tensors[i][1:4]), written)


def write_synthetic_checkpoint(
    root: str | os.PathLike[str],
    *,
    model: ModelPreset | None = None,
    num_layers: int = 4,
    num_shards: int = 2,
    progress: Callable[[int], None] | None = None,
) -> SyntheticCheckpoint:
    """Write the first ``num_layers`` MoE layers of ``model`` (default ``MODELS["tiny"]``) under
    directory ``root`` and describe the checkpoint. ``progress(nbytes)`` is called after each
    expert tensor written. Expert bytes: ``num_layers * model.num_experts * model.spec().nbytes``."""
    model = MODELS["tiny"] if model is None else model
    spec, names, E, H = model.spec(), model.names(), model.num_experts, model.hidden
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layers = list(range(model.first_moe_layer, model.first_moe_layer + num_layers))
    parts = checkpoint_parts(spec, names)
    shards: list[list] = [[] for _ in range(num_shards)]
    files = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    shards[0].append(("model.embed_tokens.weight", (256, H), torch.bfloat16, 1, False))
    for i, layer in enumerate(layers):
        shard = shards[i * num_shards // num_layers]
        shard.append((f"model.layers.{layer}.mlp.gate.weight", (E, H), torch.bfloat16, 2 + layer, False))
        for e in range(E):
            for j, (template, shape, dtype) in enumerate(parts):
                seed = (layer * 100_003 + e) * 16 + j
                shard.append((template.format(layer=layer, expert=e), shape, dtype, seed, True))
    for f, tensors in zip(files, shards):
        _write_random_shard(root / f, tensors, progress)
    weight_map = {t[0]: f for f, tensors in zip(files, shards) for t in tensors}
    total = num_layers * E * spec.nbytes
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return SyntheticCheckpoint(
        path=root, spec=spec, names=names, layers=layers, num_layers=num_layers, num_experts=E, nbytes=total
    )

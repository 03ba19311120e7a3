"""Write a small synthetic MoE checkpoint, for the demo and for trying the store out.

DeepSeek-V3 naming and layout (fp8 e4m3 gate/up/down projections with float32 block scales
``weight_scale_inv``; MoE layers from checkpoint layer ``first_layer``), sharded over several
safetensors files with ``model.safetensors.index.json``, plus a few non-expert tensors as in a real
model. Expert bytes are random, drawn from a generator seeded by (layer, expert, tensor), so any
misplaced byte shows. Symbols: L MoE layers, E experts, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .presets import FP8_BLOCK, deepseek_v3_names, deepseek_v3_spec
from .spec import ExpertSpec

__all__ = ["SyntheticCheckpoint", "write_synthetic_checkpoint"]


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
    size = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (math.prod(shape) * size,), dtype=torch.uint8, generator=g).view(dtype).view(shape)


def write_synthetic_checkpoint(
    root: str | os.PathLike[str],
    *,
    H: int = 512,
    I: int = 256,  # noqa: E741
    num_layers: int = 4,
    num_experts: int = 32,
    first_layer: int = 3,
    num_shards: int = 2,
) -> SyntheticCheckpoint:
    """Write the checkpoint under directory ``root`` and describe it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hb, ib = -(-H // FP8_BLOCK), -(-I // FP8_BLOCK)
    shapes = {
        "gate_proj.weight": ((I, H), torch.float8_e4m3fn),
        "up_proj.weight": ((I, H), torch.float8_e4m3fn),
        "down_proj.weight": ((H, I), torch.float8_e4m3fn),
        "gate_proj.weight_scale_inv": ((ib, hb), torch.float32),
        "up_proj.weight_scale_inv": ((ib, hb), torch.float32),
        "down_proj.weight_scale_inv": ((hb, ib), torch.float32),
    }
    layers = list(range(first_layer, first_layer + num_layers))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    files = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    shards[0]["model.embed_tokens.weight"] = _random((256, H), torch.bfloat16, 1)
    total = 0
    for i, layer in enumerate(layers):
        shard = shards[i * num_shards // num_layers]
        shard[f"model.layers.{layer}.mlp.gate.weight"] = _random((num_experts, H), torch.bfloat16, 2 + layer)
        for e in range(num_experts):
            for j, (suffix, (shape, dtype)) in enumerate(shapes.items()):
                t = _random(shape, dtype, (layer * 100_003 + e) * 16 + j)
                shard[f"model.layers.{layer}.mlp.experts.{e}.{suffix}"] = t
                total += t.numel() * t.element_size()
    weight_map = {name: f for f, tensors in zip(files, shards) for name in tensors}
    for f, tensors in zip(files, shards):
        save_file(tensors, str(root / f), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return SyntheticCheckpoint(
        path=root,
        spec=deepseek_v3_spec(H, I),
        names=deepseek_v3_names(),
        layers=layers,
        num_layers=num_layers,
        num_experts=num_experts,
        nbytes=total,
    )

"""Expert specs and checkpoint name templates of common MoE models.

Symbols: H hidden size, I expert intermediate size, B = 128 (DeepSeek-V3's
fp8 weight block: one float32 scale per B x B block).

    spec = deepseek_v3_spec(7168, 2048)        # fp8 w13/w2 + float32 block scales, 44 MB per expert
    ckpt = es.Checkpoint(path, names=deepseek_v3_names(), layers=range(3, 61))
    spec = qwen3_moe_spec(2048, 768)           # bf16 w13/w2 (Qwen3-30B-A3B), 9.4 MB per expert
    spec = MODELS["qwen3-30b-a3b"].spec()      # the same, from the model presets the demo uses
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .spec import ExpertSpec, TensorSpec

__all__ = [
    "FP8_BLOCK",
    "MODELS",
    "NAMINGS",
    "ModelPreset",
    "Naming",
    "deepseek_v3_names",
    "deepseek_v3_spec",
    "qwen3_moe_names",
    "qwen3_moe_spec",
]

FP8_BLOCK = 128  # DeepSeek-V3 quantizes weights in 128 x 128 blocks
_EXPERT = "model.layers.{layer}.mlp.experts.{expert}."


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def deepseek_v3_spec(H: int = 7168, I: int = 2048) -> ExpertSpec:  # noqa: E741 (the model's own symbols)
    """fp8 e4m3 w13 ``[2I, H]`` (gate and up stacked), w2 ``[H, I]``, and their float32 block scales
    w13_scale ``[2 ceil(I/B), ceil(H/B)]``, w2_scale ``[ceil(H/B), ceil(I/B)]``."""
    b = FP8_BLOCK
    return ExpertSpec(
        [
            TensorSpec("w13", (2 * I, H), torch.float8_e4m3fn),
            TensorSpec("w13_scale", (2 * _cdiv(I, b), _cdiv(H, b)), torch.float32),
            TensorSpec("w2", (H, I), torch.float8_e4m3fn),
            TensorSpec("w2_scale", (_cdiv(H, b), _cdiv(I, b)), torch.float32),
        ]
    )


def deepseek_v3_names() -> dict[str, list[str] | str]:
    """``names=`` for :func:`deepseek_v3_spec` in a DeepSeek-V3 checkpoint (gate + up -> w13)."""
    return {
        "w13": [_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"],
        "w13_scale": [_EXPERT + "gate_proj.weight_scale_inv", _EXPERT + "up_proj.weight_scale_inv"],
        "w2": _EXPERT + "down_proj.weight",
        "w2_scale": _EXPERT + "down_proj.weight_scale_inv",
    }


def qwen3_moe_spec(H: int = 2048, I: int = 768, dtype: torch.dtype = torch.bfloat16) -> ExpertSpec:  # noqa: E741
    """w13 ``[2I, H]`` (gate and up stacked) and w2 ``[H, I]`` in ``dtype`` (bf16 in Qwen3-MoE)."""
    return ExpertSpec([TensorSpec("w13", (2 * I, H), dtype), TensorSpec("w2", (H, I), dtype)])


def qwen3_moe_names() -> dict[str, list[str] | str]:
    """``names=`` for :func:`qwen3_moe_spec` in a Qwen3-MoE checkpoint."""
    return {"w13": [_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"], "w2": _EXPERT + "down_proj.weight"}


@dataclass(frozen=True)
class Naming:
    """A checkpoint naming: the spec of its experts from (H, I), and the ``names=`` templates."""

    spec: Callable[[int, int], ExpertSpec]
    names: Callable[[], dict[str, list[str] | str]]


NAMINGS: dict[str, Naming] = {
    "deepseek-v3": Naming(deepseek_v3_spec, deepseek_v3_names),
    "qwen3-moe": Naming(qwen3_moe_spec, qwen3_moe_names),
}


@dataclass(frozen=True)
class ModelPreset:
    """One model's routed experts: sizes, checkpoint naming (a key of :data:`NAMINGS`), and its MoE
    layers (``num_moe_layers`` of them from checkpoint layer ``first_moe_layer``)."""

    hidden: int
    intermediate: int
    num_experts: int
    num_moe_layers: int
    first_moe_layer: int
    naming: str

    def spec(self) -> ExpertSpec:
        return NAMINGS[self.naming].spec(self.hidden, self.intermediate)

    def names(self) -> dict[str, list[str] | str]:
        return NAMINGS[self.naming].names()


MODELS: dict[str, ModelPreset] = {
    # DeepSeek-V3's format (fp8 + block scales) at a size a laptop moves in a second.
    "tiny": ModelPreset(hidden=512, intermediate=256, num_experts=16, num_moe_layers=4, first_moe_layer=3,
                        naming="deepseek-v3"),
    # Qwen3-30B-A3B: 48 layers, all MoE (bf16).
    "qwen3-30b-a3b": ModelPreset(hidden=2048, intermediate=768, num_experts=128, num_moe_layers=48,
                                 first_moe_layer=0, naming="qwen3-moe"),
    # DeepSeek-V3: layers 0-2 are dense, 3-60 MoE (the multi-token-prediction layer 61 is left out).
    "deepseek-v3": ModelPreset(hidden=7168, intermediate=2048, num_experts=256, num_moe_layers=58,
                               first_moe_layer=3, naming="deepseek-v3"),
}  # fmt: skip

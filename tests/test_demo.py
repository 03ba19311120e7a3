"""The tour, `python -m expert_store demo`, runs end to end on the CPU and reports what moved."""

from __future__ import annotations

import shlex

import pytest
import torch
from safetensors.torch import save_file

from expert_store import inspect
from expert_store.__main__ import main
from expert_store.demo import slots_per_rank, tour
from expert_store.manifest import ManifestLog
from expert_store.presets import ModelPreset
from expert_store.synthetic import write_synthetic_checkpoint


def _step(result, name: str) -> dict[int, dict]:
    """{rank: row} of one step."""
    return {r["rank"]: r for rows in result.rows for r in rows if r["step"] == name}


@pytest.mark.timeout(240)
def test_demo_default_cpu(tmp_path, capsys):
    """The default tour on 3 gloo ranks: EPLB moves experts between ranks, the lost rank's unique
    experts come from disk, the returning rank is filled from its peers alone, versions 1..4, and
    the printed inspect-store commands work."""
    result = tour(["--device", "cpu", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    E, S = result.num_experts, result.slots_per_rank
    assert len(result.rows) == 3 and S < E and 2 * S >= E
    assert result.versions == [1, 2, 3, 4]
    steps = ["create", "eplb", "rank lost", "rank rejoined", "reopen+verify"]
    assert [[r["step"] for r in rows] for rows in result.rows] == [steps, steps, [s for s in steps if s != "rank lost"]]
    for name, version in zip(steps, [1, 2, 3, 4, 4]):
        assert {r["version"] for r in _step(result, name).values()} == {version}
        assert f"== {name}:" in out

    assert any(r["bytes_p2p"] > 0 for r in _step(result, "eplb").values())

    lost = _step(result, "rank lost")
    assert sorted(lost) == [0, 1]
    assert sum(r["bytes_disk"] for r in lost.values()) > 0
    # The experts only the dead rank held in version 2 are exactly those the survivors read from disk.
    v2 = ManifestLog(result.root).read(2).phy2log.view(-1, 3, S)
    unique = {(layer, e) for layer in range(v2.shape[0]) for e in range(E)
              if (v2[layer, 2] == e).any() and not (v2[layer, :2] == e).any()}  # fmt: skip
    missing = {(layer, e) for r in lost.values() for layer, es in r["missing"].items() for e in es}
    assert unique and missing == unique

    back = _step(result, "rank rejoined")
    assert back[2]["bytes_p2p"] > 0
    assert all(r["bytes_disk"] == 0 for r in back.values())  # the survivors held every expert
    assert sum(r["slots_verified"] for r in _step(result, "reopen+verify").values()) == 3 * len(result.layers) * S

    for cmd in result.commands:
        assert f"inspect-store {shlex.join(cmd)}" in out
    assert {c[0] for c in result.commands} == {"summary", "versions", "show", "diff", "plan", "verify"}
    for cmd in result.commands:
        assert inspect.main(cmd) == 0, cmd
    capsys.readouterr()


SMALL_QWEN = ModelPreset(hidden=256, intermediate=128, num_experts=8, num_moe_layers=3, first_moe_layer=0,
                         naming="qwen3-moe")  # fmt: skip


@pytest.mark.timeout(240)
def test_demo_on_a_checkpoint_qwen3(tmp_path, capsys):
    """--checkpoint --names qwen3-moe: E, layers and spec come from the headers; on 2 ranks the loss
    step is skipped with a note and a second EPLB step runs instead."""
    ck = write_synthetic_checkpoint(tmp_path / "ckpt", model=SMALL_QWEN, num_layers=3)
    args = ["--checkpoint", str(ck.path), "--names", "qwen3-moe", "--layers", "2", "--ranks", "2"]
    result = tour([*args, "--device", "cpu", "--root", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert result.layers == [0, 1] and result.num_experts == 8 and result.slots_per_rank == slots_per_rank(8, 2)
    assert "lost-rank step is skipped" in out
    assert result.versions == [1, 2, 3]
    assert [r["step"] for r in result.rows[0]] == ["create", "eplb", "load shift", "reopen+verify"]
    m = ManifestLog(result.root).read()
    assert m.spec == SMALL_QWEN.spec() and m.checkpoint["layers"] == [0, 1]
    assert inspect.main(["summary", str(result.root)]) == 0
    assert inspect.main(["verify", str(result.root)]) == 0


def _mixtral_like(path) -> None:
    path.mkdir()
    save_file({f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": torch.zeros(4, 4) for e in range(2)},
              str(path / "model.safetensors"))  # fmt: skip


@pytest.mark.parametrize("written, names", [("deepseek-v3", "qwen3-moe"), ("qwen3-moe", "deepseek-v3"),
                                            ("other", "qwen3-moe")])  # fmt: skip
def test_demo_names_that_do_not_match(tmp_path, capsys, written, names):
    """Names that do not match the checkpoint: exit 1, one message naming a file of it, no traceback,
    no store made."""
    if written == "other":
        _mixtral_like(tmp_path / "ckpt")
    else:
        model = SMALL_QWEN if written == "qwen3-moe" else None
        write_synthetic_checkpoint(tmp_path / "ckpt", model=model, num_layers=1)
    code = main(["demo", "--checkpoint", str(tmp_path / "ckpt"), "--names", names, "--root", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert str(tmp_path / "ckpt") in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, says",
    [(["--ranks", "1"], "--ranks 1"), (["--ranks", "0"], "--ranks 0"), (["--layers", "0"], "--layers 0"),
     (["--names", "qwen3-moe"], "--checkpoint and --names"),
     (["--model", "tiny", "--checkpoint", ".", "--names", "qwen3-moe"], "--model")],
)  # fmt: skip
def test_demo_usage_errors(tmp_path, capsys, argv, says):
    """Arguments that cannot run: exit 2 with a message, no traceback, nothing written."""
    assert main(["demo", *argv, "--device", "cpu", "--root", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("E, R", [(16, 2), (16, 3), (16, 4), (256, 8), (128, 3)])
def test_slots_per_rank_survives_a_lost_rank(E, R):
    """Fewer slots than experts, at least one redundant slot per rank, and from 3 ranks on the
    survivors of a lost rank hold every expert."""
    S = slots_per_rank(E, R)
    assert S < E and R * S > E
    assert R < 3 or (R - 1) * S >= E


def test_unknown_command():
    """An unknown command exits 2 with a message, no traceback."""
    assert main(["frobnicate"]) == 2

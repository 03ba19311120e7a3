"""The main job, `python -m expert_store demo`, runs end to end on the CPU."""

from __future__ import annotations

import pytest

from expert_store.__main__ import main


@pytest.mark.timeout(180)
def test_demo_two_ranks_cpu(tmp_path, capsys):
    """Demo on 2 gloo ranks: create, EPLB rebalance, lost rank, rejoin, reopen; every step verified."""
    code = main(
        ["demo", "--ranks", "2", "--device", "cpu", "--layers", "2", "--experts", "8", "--hidden", "256",
         "--intermediate", "128", "--workdir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for step in ("create", "eplb", "rank lost", "rank rejoined", "reopen+verify"):
        assert step in out
    assert "committed versions: [1, 2, 3, 4]" in out


def test_unknown_command():
    """An unknown command exits 2 with a message, no traceback."""
    assert main(["frobnicate"]) == 2

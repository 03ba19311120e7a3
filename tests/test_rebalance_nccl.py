"""The elastic rebalance scenario of test_rebalance_gloo over NCCL, one GPU per rank.

Runs only where 2 or more CUDA devices are present (the lent 2-GPU H200 machine):
the same invariants (bit-exact slots, exact accounting, refusals with nothing
moved, reopen) with experts in GPU memory and packed slabs moving over NCCL.
"""

from __future__ import annotations

import ckpt_factory as cf
import pytest
import torch
from dist_util import run_ranks
from test_rebalance_gloo import scenario

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["ds", "qwen"])
def test_elastic_rebalance_nccl(tmp_path, kind):
    """2 ranks over NCCL: random rebalance, dead rank, fresh rejoin, disagreement, unservable, reopen."""
    if kind == "ds":
        info = cf.write_deepseek(tmp_path / "ckpt", H=1024, I=512, num_layers=2, num_experts=8)
    else:
        info = cf.write_qwen(tmp_path / "ckpt", H=1024, I=384, num_layers=3, num_experts=8)
    logs = run_ranks(scenario, 2, info, tmp_path / "store", True, True, None, 99, "cuda", timeout_s=360, backend="nccl")
    assert any(entry[1] > 0 for log in logs for entry in log)

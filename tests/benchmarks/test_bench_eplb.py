"""Gates of the placement policy (CPU) at DeepSeek-V3 scale, and its planning speed.

Run: ``pytest tests/benchmarks/test_bench_eplb.py --benchmark-only``.

Symbols: L = 58 MoE layers, E = 256 experts in G = 8 groups, P physical slots on R GPUs
in N nodes.

Targets, for ``rebalance_experts(..., previous=old)`` after a 5 % load drift (each
expert's load times a factor drawn uniformly from [0.95, 1.05]) of Pareto-distributed
loads, at P = 288 on R = 32 GPUs (DeepSeek's 32 redundant experts), hierarchical (8
groups, 4 nodes) and global (1 group, 1 node):

* speed: <= 50 ms for all 58 layers;
* movement: the experts it brings onto ranks (``expert_store.eplb.movement``) <= 1/2 of
  what a from-scratch placement of the same load brings in;
* balance: its balancedness (max GPU load over mean GPU load, mean over layers) <= 1.05x
  the from-scratch placement's.

The movement and balance gates compare two placements from the same run, so they do
not depend on the machine. ``test_bench_rebalance_experts`` (no target) times the
policy without ``previous`` at the deployment shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from expert_store.eplb import movement, rebalance_experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gates import environment, gate, measure, median_seconds, untimed

L, E = 58, 256
P, G, N, R = 288, 8, 4, 32  # DeepSeek-V3 deployment: 9 slots per GPU, 8 GPUs per node
DRIFT = 0.05
PREVIOUS_TARGET_S = 50e-3
MOVEMENT_TARGET = 0.5  # at most half the bytes a from-scratch placement brings in
BALANCE_TARGET = 1.05  # at most 1.05x the from-scratch balancedness

# (P, G, N, R)
CONFIGS = [
    pytest.param(288, 8, 4, 32, id="P288-R32-N4"),
    pytest.param(320, 8, 8, 64, id="P320-R64-N8"),
    pytest.param(320, 1, 1, 64, id="P320-R64-global"),
]


def _pareto_load(seed: int) -> torch.Tensor:
    """float64 [L, E]: Pareto-distributed expert loads (shape 1.5: a few very hot experts)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(L, E, generator=g, dtype=torch.float64)
    return 1000.0 * (1 - u) ** (-1 / 1.5)


def _drifted(w: torch.Tensor, drift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return w * (1 + drift * (2 * torch.rand(w.shape, generator=g, dtype=torch.float64) - 1))


def _balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> float:
    """Mean over layers of max GPU load / mean GPU load; each replica takes an equal share."""
    cnt = torch.zeros(weight.shape, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    loads = (weight / cnt).gather(1, phy2log).view(phy2log.shape[0], num_ranks, -1).sum(dim=2)
    return float((loads.max(dim=1).values / loads.mean(dim=1)).mean())


# (P, G, N, R) of the gated shapes: the hierarchical policy, and the global one (1 group, 1 node).
GATED = [pytest.param((288, 8, 4, 32), id="hier-P288-R32-N4"), pytest.param((288, 1, 1, 32), id="global-P288-R32")]


@pytest.fixture(scope="module", params=GATED)
def drift_case(request):
    shape = request.param
    w_old = _pareto_load(0)
    old, _, _ = rebalance_experts(w_old, *shape)
    w_new = _drifted(w_old, DRIFT, 1)
    scratch, _, _ = rebalance_experts(w_new, *shape)
    kept, _, _ = rebalance_experts(w_new, *shape, previous=old)
    return shape, w_new, old, scratch, kept


def _name(shape) -> str:
    P, G, N, R = shape
    return f"P={P} R={R}" + (f" N={N} hierarchical" if G % N == 0 and N > 1 else " global")


def test_gate_eplb_previous_speed(benchmark, drift_case):
    """rebalance_experts(previous=) at L=58, E=256, P=288, 32 GPUs within 50 ms. Margin: on the
    2-core CI machine it takes about 8 ms (hierarchical) and 17 ms (global) when quiet, 3x or more
    under the target; the median of 7 rounds (the best of 5 in the quick form) absorbs slow rounds."""
    shape, w_new, old, _, _ = drift_case
    s = measure(benchmark, lambda: rebalance_experts(w_new, *shape, previous=old), rounds=7)
    plain = median_seconds(lambda: rebalance_experts(w_new, *shape), rounds=3)
    gate(
        benchmark,
        f"EPLB with previous, L=58 E=256 {_name(shape)}, within 50 ms",
        ratio=PREVIOUS_TARGET_S / s,
        target=1.0,
        figure=f"{s * 1e3:.1f} ms",
        ceiling="target 50 ms",
        ms=round(s * 1e3, 2),
        ms_without_previous=round(plain * 1e3, 2),
    )


def test_gate_eplb_previous_movement(benchmark, drift_case):
    """Experts brought onto ranks with ``previous`` <= 1/2 of a from-scratch placement's, on a 5 %
    drift. Both placements come from the same loads in the same run: nothing here is timed."""
    shape, _, old, scratch, kept = drift_case
    R, rpn = shape[3], shape[3] // shape[2]
    m_kept, m_scratch = movement(old, kept, R, rpn), movement(old, scratch, R, rpn)
    moved_kept, moved_scratch = m_kept.total_brought_in, m_scratch.total_brought_in
    untimed(benchmark)
    gate(
        benchmark,
        f"EPLB with previous, {_name(shape)}, 5% drift: experts brought in <= 1/2 of from scratch",
        ratio=MOVEMENT_TARGET * moved_scratch / max(1, moved_kept),
        target=1.0,
        figure=f"{moved_kept} experts brought in",
        ceiling=f"half of from scratch's {moved_scratch}",
        brought_in_previous=moved_kept,
        brought_in_scratch=moved_scratch,
        other_node_previous=m_kept.total_other_node,
        local_copies_previous=m_kept.total_local_copies,
        fraction=round(moved_kept / max(1, moved_scratch), 4),
    )


def test_gate_eplb_previous_balance(benchmark, drift_case):
    """Balancedness with ``previous`` <= 1.05x a from-scratch placement's on the same loads."""
    shape, w_new, _, scratch, kept = drift_case
    R = shape[3]
    b_kept, b_scratch = _balancedness(w_new, kept, R), _balancedness(w_new, scratch, R)
    untimed(benchmark)
    gate(
        benchmark,
        f"EPLB with previous, {_name(shape)}, 5% drift: balancedness <= 1.05x from scratch",
        ratio=BALANCE_TARGET * b_scratch / b_kept,
        target=1.0,
        figure=f"balancedness {b_kept:.3f}",
        ceiling=f"1.05x from scratch's {b_scratch:.3f}",
        balancedness_previous=round(b_kept, 4),
        balancedness_scratch=round(b_scratch, 4),
    )


@pytest.mark.parametrize(("P", "G", "N", "R"), CONFIGS)
def test_bench_rebalance_experts(benchmark, P, G, N, R):
    """From-scratch placement time at the deployment shapes; no target of its own (for the record)."""
    w = _pareto_load(0)
    s = measure(benchmark, lambda: rebalance_experts(w, P, G, N, R), rounds=7)
    phy2log, _, _ = rebalance_experts(w, P, G, N, R)
    contiguous = (torch.arange(P) % E).expand(L, P)
    info = {
        "ms_total": round(s * 1e3, 3),
        "ms_per_layer": round(s * 1e3 / L, 4),
        "balancedness": round(_balancedness(w, phy2log, R), 4),
        "balancedness_contiguous": round(_balancedness(w, contiguous, R), 4),
    }
    benchmark.extra_info.update(info | environment())
    print(f"\nrebalance_experts P={P} G={G} N={N} R={R}: {info}")

"""Planning speed of the placement policy (CPU) at DeepSeek-V3 scale.

Run: ``pytest tests/benchmarks/test_bench_eplb.py --benchmark-only``.

L = 58 MoE layers, E = 256 experts in G = 8 groups. The planning target is 1 ms per
layer at E = 256, P = 288, R = 64, but 288 slots do not split evenly over 64 GPUs
(4.5 each), so rebalance_experts rejects that shape; the benchmark uses the two
nearest real deployments instead: P = 288 on R = 32 GPUs in 4 nodes (9 slots
per GPU, DeepSeek's 32 redundant experts) and P = 320 on R = 64 GPUs in 8 nodes
(5 slots per GPU), plus the global policy at R = 64.

A CPU planner has no hardware ceiling to compare with; its yardstick is the
target, 1 ms per layer, so the reported ratio is measured / budget
(below 1 meets it). The ``previous=`` benchmark also reports, from the same
run, its cost relative to planning without it and how many slots it keeps.
"""

from __future__ import annotations

import platform
import statistics
import time

import pytest
import torch

from expert_store.eplb import rebalance_experts

L, E = 58, 256
BUDGET_MS_PER_LAYER = 1.0  # target: planning (CPU) <= 1 ms per layer
REPEATS = 7

# (P, G, N, R)
CONFIGS = [
    pytest.param(288, 8, 4, 32, id="P288-R32-N4"),
    pytest.param(320, 8, 8, 64, id="P320-R64-N8"),
    pytest.param(320, 1, 1, 64, id="P320-R64-global"),
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> dict[str, object]:
    return {"cpu": _cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _zipf_load(s: float, seed: int) -> torch.Tensor:
    """float64 [L, E]: zipf-like loads, a random hot order per layer."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(E, generator=g) for _ in range(L)])
    return torch.round(1e6 / (order + 1.0) ** s)


def _median_ms(fn) -> float:
    fn()  # warm-up: first calls allocate and fill caches
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _imbalance(weight: torch.Tensor, phy2log: torch.Tensor, R: int) -> float:
    """Mean over layers of max GPU load / mean GPU load."""
    cnt = torch.zeros(weight.shape, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    loads = (weight / cnt).gather(1, phy2log).view(L, R, -1).sum(dim=2)
    return float((loads.max(dim=1).values / loads.mean(dim=1)).mean())


@pytest.mark.parametrize(("P", "G", "N", "R"), CONFIGS)
def test_bench_rebalance_experts(benchmark, P, G, N, R):
    w = _zipf_load(1.0, seed=0)
    phy2log, _, _ = benchmark(rebalance_experts, w, P, G, N, R)
    ms = _median_ms(lambda: rebalance_experts(w, P, G, N, R))
    per_layer = ms / L
    contiguous = (torch.arange(P) % E).expand(L, P)
    info = {
        "L": L,
        "E": E,
        "P": P,
        "G": G,
        "N": N,
        "R": R,
        "ms_total": round(ms, 3),
        "ms_per_layer": round(per_layer, 4),
        "budget_ms_per_layer": BUDGET_MS_PER_LAYER,
        "ratio_to_budget": round(per_layer / BUDGET_MS_PER_LAYER, 4),
        "imbalance_max_over_mean": round(_imbalance(w, phy2log, R), 4),
        "imbalance_contiguous": round(_imbalance(w, contiguous, R), 4),
        **_environment(),
    }
    benchmark.extra_info.update(info)
    print(f"\nrebalance_experts {info}")


@pytest.mark.parametrize(("P", "G", "N", "R"), CONFIGS)
def test_bench_rebalance_experts_previous(benchmark, P, G, N, R):
    w_old = _zipf_load(1.0, seed=0)
    old, _, _ = rebalance_experts(w_old, P, G, N, R)
    g = torch.Generator().manual_seed(1)
    w_new = w_old * (1 + 0.2 * torch.rand(L, E, generator=g, dtype=torch.float64))  # load drifts by up to 20%
    phy2log, _, _ = benchmark(rebalance_experts, w_new, P, G, N, R, previous=old)
    ms_prev = _median_ms(lambda: rebalance_experts(w_new, P, G, N, R, previous=old))
    ms_plain = _median_ms(lambda: rebalance_experts(w_new, P, G, N, R))
    plain, _, _ = rebalance_experts(w_new, P, G, N, R)
    per_layer = ms_prev / L
    info = {
        "L": L,
        "E": E,
        "P": P,
        "G": G,
        "N": N,
        "R": R,
        "ms_total": round(ms_prev, 3),
        "ms_per_layer": round(per_layer, 4),
        "budget_ms_per_layer": BUDGET_MS_PER_LAYER,
        "ratio_to_budget": round(per_layer / BUDGET_MS_PER_LAYER, 4),
        "ms_per_layer_without_previous": round(ms_plain / L, 4),
        "ratio_to_without_previous": round(ms_prev / ms_plain, 3),
        "slots_kept_fraction": round(float((phy2log == old).double().mean()), 4),
        "slots_kept_fraction_without_previous": round(float((plain == old).double().mean()), 4),
        **_environment(),
    }
    benchmark.extra_info.update(info)
    print(f"\nrebalance_experts(previous=) {info}")

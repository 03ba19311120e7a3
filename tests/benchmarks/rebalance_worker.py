"""Two-rank rebalance benchmark body, shared by tools/bench_rebalance_gpu.py and
tests/benchmarks/test_bench_rebalance.py.

Each rank holds E/2 experts; the new placement swaps the halves so ``moved``
experts travel each way. Measured in the same run, on the same bytes:

* ``slab``: one NCCL (or gloo) send + receive of a single slab each way (ceiling (a));
* ``per_tensor``: one P2P op per expert tensor in one batch_isend_irecv, as engines do today (baseline (b));
* ``rebalance``: ``store.rebalance`` end to end (agreement, plan, pack, exchange, unpack, commit);
* ``exchange``: its exchange phase (pack + transfer + unpack rounds).

Rates are bytes moved one way per second (GB/s = 1e9 B/s), per direction.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import expert_store as es
from expert_store.layout import ResidentSlabs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps):
    out = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench_worker(rank, world, info, root, cfg):
    """Run on each of 2 ranks; returns a dict of measurements (rank 0's is the report)."""
    assert world == 2
    device = torch.device(f"cuda:{rank}") if cfg["backend"] == "nccl" else torch.device("cpu")
    E, L = info.num_experts, info.num_layers
    S = E // 2
    reps = cfg.get("reps", 5)
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=2, slots_per_rank=S)
    swapped = torch.cat([p0.phy2log[:, S:], p0.phy2log[:, :S]], dim=1)
    p1 = es.Placement(swapped, num_ranks=2, num_experts=E)
    store = es.ExpertStore.create(
        root, spec=info.spec, placement=p0, checkpoint=info.checkpoint(), rank=rank, world_size=2, device=device
    )
    peer = 1 - rank
    spec = info.spec
    nbytes = L * S * spec.nbytes  # one way
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results["bytes_one_way"] = nbytes
    results["tensors_one_way"] = L * S * len(spec)

    # (a) ceiling: one slab each way
    send = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(rank)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def slab():
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    slab()
    results["slab_s"] = _time(slab, device, reps)

    # (b) one op per tensor, from and into resident views (what engines do today)
    sends = [store.weights(t.name, layer)[s] for layer in range(L) for s in range(S) for t in spec.tensors]
    scratch = ResidentSlabs(store.layout, device)
    recvs = [scratch.weights(t.name, layer)[s] for layer in range(L) for s in range(S) for t in spec.tensors]

    def per_tensor():
        ops = []
        for a, b in zip(sends, recvs):
            ops.append(dist.P2POp(dist.isend, a, peer))
            ops.append(dist.P2POp(dist.irecv, b, peer))
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    per_tensor()
    results["per_tensor_s"] = _time(per_tensor, device, reps)

    # rebalance back and forth, end to end, for each (staging, round size)
    for staging, round_bytes in cfg["configs"]:
        key = f"staging_{staging >> 20}MiB_round_{round_bytes >> 20}MiB"
        e2e, to_slots, exch, peaks, rounds = [], [], [], [], []
        targets = [p1, p0] * ((reps + 2) // 2)
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        for i, target in enumerate(targets[: reps + 1]):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            rep = store.rebalance(target, staging_bytes=staging, round_bytes=round_bytes)
            _sync(device)
            dt = time.perf_counter() - t0
            assert rep.bytes_p2p == nbytes, (rep.bytes_p2p, nbytes)
            if i == 0:
                continue  # warm-up: first NCCL connection, kernel compilation
            e2e.append(dt)
            to_slots.append(dt - rep.phase_seconds.get("commit", 0.0))
            exch.append(rep.phase_seconds["exchange"])
            peaks.append(rep.staging_peak)
            rounds.append(rep.rounds)
        extra = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0
        results[key] = {
            "rebalance_s": statistics.median(e2e),
            "to_last_slot_s": statistics.median(to_slots),
            "exchange_s": statistics.median(exch),
            "staging_peak": max(peaks),
            "device_extra_peak": extra,
            "rounds": max(rounds),
            "phases_last": rep.phase_seconds,
        }
    if cfg.get("profile") and rank == 0:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        staging, round_bytes = cfg["configs"][0]
        prof.enable()
        store.rebalance(p1 if store.placement == p0 else p0, staging_bytes=staging, round_bytes=round_bytes)
        _sync(device)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        results["profile"] = buf.getvalue()
    elif cfg.get("profile"):
        staging, round_bytes = cfg["configs"][0]
        store.rebalance(p1 if store.placement == p0 else p0, staging_bytes=staging, round_bytes=round_bytes)
    # correctness after all of it: every slot exact
    if cfg.get("check", True):
        import store_util

        store_util.assert_slots_exact(store, info, what="after benchmark")
    return results


def summarize(res) -> list[str]:
    """Human-readable lines with GB/s per direction and ratios against the ceilings."""
    nb = res["bytes_one_way"]
    slab = nb / res["slab_s"] / 1e9
    per = nb / res["per_tensor_s"] / 1e9
    lines = [
        f"device {res['device']}; {nb / 1e6:.1f} MB each way in {res['tensors_one_way']} tensors",
        f"  (a) one slab each way        {slab:8.1f} GB/s",
        f"  (b) one op per tensor        {per:8.1f} GB/s",
    ]
    for k, v in res.items():
        if not k.startswith("staging_"):
            continue
        e2e = nb / v["rebalance_s"] / 1e9
        slots = nb / v["to_last_slot_s"] / 1e9
        ex = nb / v["exchange_s"] / 1e9
        lines.append(
            f"  {k[8:]}: with commit {e2e:6.1f} GB/s = {e2e / slab:5.1%} of (a), {e2e / per:5.2f}x (b); "
            f"to last slot {slots:6.1f} GB/s = {slots / slab:5.1%}; exchange {ex:6.1f} GB/s = {ex / slab:5.1%}; "
            f"rounds {v['rounds']}, staging peak {v['staging_peak'] / 2**20:.0f} MiB "
            f"(device +{v['device_extra_peak'] / 2**20:.0f} MiB); phases ms "
            + " ".join(f"{a}={b * 1e3:.2f}" for a, b in v["phases_last"].items())
        )
    return lines

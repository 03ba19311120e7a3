"""Benchmarks: gather / scatter of engine-shaped weight rows into one slab, and the packed EPLB
communicator against one message per tensor.

Run with ``pytest tests/benchmarks/test_bench_pieces.py --benchmark-only``.

GPU (CUDA only): the per-layer tensors vLLM holds, one row per slot, gathered into (and scattered
from) one slab of >= 256 MiB, against ``dst.copy_(src)`` of the same bytes (the ceiling; gate:
back-to-back ratio >= 0.85) and against a per-tensor ``copy_`` loop over the same rows (reported).
Each timed function rotates among ROTATE buffer sets so that L2 never serves the previous call.

* DeepSeek-V3 fp8: w13 [S, 4096, 7168] fp8, w13_scale [S, 32, 56] fp32, w2 [S, 7168, 2048] fp8,
  w2_scale [S, 56, 16] fp32 (44 MB a slot);
* Qwen3-30B bf16: w13 [S, 1536, 2048], w2 [S, 2048, 768] (9.4 MB a slot).

CPU (no gate): 4 gloo ranks, one random rearrangement, vLLM's way of queueing sends and receives
(one message per tensor per expert) against :class:`PackedEplbCommunicator` (one slab per peer):
messages and seconds, recorded in ``extra_info``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from expert_store.kernels import gather_pieces, scatter_pieces
from expert_store.launch import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gates import environment, gate, untimed
from gpu_timing import window_seconds

MiB = 1 << 20
ROTATE = 3
K = 30  # calls per back-to-back window (a multiple of ROTATE)
WINDOWS = 5
PIECES_TARGET = 0.85

SHAPES = {
    "fp8-dsv3": [((4096, 7168), torch.float8_e4m3fn), ((32, 56), torch.float32), ((7168, 2048), torch.float8_e4m3fn),
                 ((56, 16), torch.float32)],
    "bf16-qwen3": [((1536, 2048), torch.bfloat16), ((2048, 768), torch.bfloat16)],
}  # fmt: skip


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


class _Case:
    """ROTATE sets of per-layer tensors [S, ...] (S slots: one slab of >= 256 MiB a set) and slabs."""

    def __init__(self, kind: str, slab_mib: int = 256) -> None:
        shapes = SHAPES[kind]
        slot = sum(_nbytes(s, d) for s, d in shapes)
        self.S = S = -(-slab_mib * MiB // slot)
        self.nbytes = S * slot
        self.layers, self.slabs, self.pieces = [], [], []
        for _ in range(ROTATE):
            ts = [torch.randint(0, 256, (S, _nbytes(s, d)), dtype=torch.uint8, device="cuda").view(d).view(S, *s)
                  for s, d in shapes]  # fmt: skip
            self.layers.append(ts)
            self.slabs.append(torch.empty(self.nbytes, dtype=torch.uint8, device="cuda"))
            pieces, off = [], 0
            for s in range(S):
                for t in ts:
                    pieces.append((t[s], off))
                    off += t[s].numel() * t.element_size()
            self.pieces.append(pieces)
        self.copy_src = [torch.empty(self.nbytes, dtype=torch.uint8, device="cuda") for _ in range(ROTATE)]
        self.copy_dst = [torch.empty_like(x) for x in self.copy_src]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", ["gather", "scatter"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_pieces_vs_device_copy(benchmark, kind, direction):
    case = _Case(kind)
    if direction == "gather":
        ops = [lambda r=r: gather_pieces(case.pieces[r], case.slabs[r]) for r in range(ROTATE)]
        loops = [lambda r=r: [case.slabs[r][o : o + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
                              for t, o in case.pieces[r]] for r in range(ROTATE)]  # fmt: skip
    else:
        back = [[(o, t) for t, o in case.pieces[r]] for r in range(ROTATE)]
        ops = [lambda r=r: scatter_pieces(case.slabs[r], back[r]) for r in range(ROTATE)]
        loops = [lambda r=r: [t.reshape(-1).view(torch.uint8).copy_(case.slabs[r][o : o + t.numel() * t.element_size()])
                              for o, t in back[r]] for r in range(ROTATE)]  # fmt: skip
    copies = [lambda r=r: case.copy_dst[r].copy_(case.copy_src[r]) for r in range(ROTATE)]
    op_s, host_us = window_seconds(ops, calls=K, windows=WINDOWS)
    copy_s, _ = window_seconds(copies, calls=K, windows=WINDOWS)
    loop_s, _ = window_seconds(loops, calls=ROTATE, windows=3)
    benchmark.pedantic(ops[0], rounds=3, warmup_rounds=1, iterations=1)
    gbps = 2 * case.nbytes / op_s / 1e9
    gate(
        benchmark, f"{direction} pieces {kind}", ratio=copy_s / op_s, target=PIECES_TARGET,
        figure=f"{gbps:.0f} GB/s", ceiling=f"device copy {2 * case.nbytes / copy_s / 1e9:.0f} GB/s", device="cuda",
        slab_mib=round(case.nbytes / MiB), pieces=len(case.pieces[0]), host_us_per_call=round(host_us, 1),
        copy_loop_gbps=round(2 * case.nbytes / loop_s / 1e9, 1), speedup_vs_copy_loop=round(loop_s / op_s, 2),
    )  # fmt: skip


# ---- CPU: packed communicator vs one message per tensor (4 gloo ranks) ----
def _exchange(rank, world, packed: bool, seed: int):
    """One rearrangement of L layers, queued as vLLM queues it (per expert, per tensor)."""
    import random

    import torch.distributed as dist

    from expert_store.integrations.vllm import PackedEplbCommunicator

    rng = random.Random(seed)
    L, S, shapes = 4, 8, [(64, 96), (4, 6), (96, 32), (6, 2)]
    weights = [[torch.randn(S, *s) for s in shapes] for _ in range(L)]
    plan = []
    for _ in range(L):
        moves = [(rng.randrange(world), rng.randrange(S), rng.randrange(world), rng.randrange(S)) for _ in range(S)]
        plan.append([m for m in moves if m[0] != m[2]])
    comm = PackedEplbCommunicator(None) if packed else None
    buffers = [torch.empty_like(w) for w in weights[0]]
    messages = 0
    dist.barrier()
    t0 = time.perf_counter()
    for layer in range(L):
        ops = []
        for k, (src, ss, dst, ds) in enumerate(plan[layer]):
            if rank == src:
                if packed:
                    comm.add_send([w[ss] for w in weights[layer]], dst, expert_id=k)
                else:
                    ops += [dist.P2POp(dist.isend, w[ss].contiguous(), dst) for w in weights[layer]]
            elif rank == dst:
                if packed:
                    comm.add_recv([b[ds] for b in buffers], src, expert_id=k)
                else:
                    ops += [dist.P2POp(dist.irecv, b[ds], src) for b in buffers]
        if packed:
            comm.execute()
        elif ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            messages += sum(1 for op in ops if op.op is dist.isend)
    seconds = time.perf_counter() - t0
    return (comm.messages if packed else messages), seconds


def test_packed_communicator_vs_per_tensor_gloo(benchmark):
    untimed(benchmark)
    figures = {}
    for packed in (False, True):
        out = run_ranks(_exchange, 4, packed, 3, timeout_s=240, env={"TRITON_INTERPRET": None})
        figures["packed" if packed else "per_tensor"] = {
            "messages": sum(m for m, _ in out), "seconds": round(max(s for _, s in out), 4)
        }  # fmt: skip
    benchmark.extra_info.update(figures | environment("cpu"))
    print(f"\n[bench] packed communicator vs per-tensor messages (4 gloo ranks): {figures}")
    assert figures["packed"]["messages"] <= figures["per_tensor"]["messages"]

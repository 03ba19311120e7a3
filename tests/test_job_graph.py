"""A forward captured once in a CUDA graph over ``store.weights()`` and ``store.routing()`` stays
valid across a rebalance job: after every ``job.step()`` its replay equals an eager forward over
the tensors the store hands out then, with no recapture.

The forward is ``tools/bench_job_gpu.py``'s (``SlotMoE``: routing through log2phy / logcnt, grouped
matmuls over every slot, fp8 experts dequantized with their block scales), on that script's tiny
synthetic checkpoint. The new placement keeps the experts and moves them to other slots (local
moves, one rank), so the model computes the same function at every step: the output also stays
what it was before the job (within bf16 rounding: a GEMM need not round a row alike at another
position). On the CPU the same runs eagerly over the tensors fetched before the job: it guards
that ``weights()`` and ``routing()`` are updated in place (same ``data_ptr()``) at every step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

import expert_store as es

CUDA = torch.cuda.is_available()
TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_job_gpu.py"


@pytest.fixture(scope="module")
def bench():
    name = "bench_job_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _padded(p: es.Placement, X: int) -> torch.Tensor:
    out = torch.full((p.num_layers, p.num_experts, X), -1, dtype=torch.int64)
    out[:, :, : p.max_replicas] = p.log2phy
    return out


def _step_and_check(job, store, fwd, replay, ptrs, before, old, new, layers_per_step) -> list[int]:
    """Step ``job`` to the end; after every switch, replay against eager and the store's state."""
    L = new.num_layers
    deadline = time.monotonic() + 120.0
    switched_so_far, steps = [], 0
    while not job.done:
        switched = job.step()
        steps += 1
        assert time.monotonic() < deadline, f"the job is not done after {steps} steps"
        assert len(switched) <= layers_per_step
        switched_so_far += switched
        n = job.switched_layers if not job.done else L
        assert switched_so_far == list(range(n))
        assert fwd.pointers() == ptrs, f"step {steps}: weights() or routing() moved"
        if not switched:
            time.sleep(0.001)  # in place of a forward pass; nothing changed (layers still staging)
            continue
        got = replay().clone()
        eager = fwd.fresh()  # over weights() / routing() fetched now, with the then-current placement
        assert torch.equal(got, eager), f"step {steps} (switched {switched}): the replay differs from eager"
        want = torch.cat([new.phy2log[:n], old.phy2log[n:]])
        assert torch.equal(store.placement.phy2log, want)
        log2phy, logcnt = store.routing()
        assert torch.equal(log2phy.cpu(), _padded(store.placement, log2phy.shape[2])), f"step {steps}: log2phy"
        assert torch.equal(logcnt.cpu(), store.placement.logcnt), f"step {steps}: logcnt"
        # the same experts in other slots: the same function
        torch.testing.assert_close(got.float(), before.float(), rtol=0.02, atol=0.02)
    return switched_so_far


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.mark.parametrize(
    ("device", "model", "layers_per_step"),
    [
        pytest.param("cuda", "qwen3", 1, marks=_GPU, id="cuda-qwen3-bf16"),
        pytest.param("cuda", "deepseek-v3", 2, marks=_GPU, id="cuda-deepseek-v3-fp8"),
        pytest.param("cpu", "qwen3", 2, id="cpu-qwen3-bf16"),  # no graph: in-place updates only
    ],
)
def test_forward_sees_every_switch_without_recapture(tmp_path, bench, device, model, layers_per_step):
    # tiny (Triton's interpreter computes the checksums on the CPU); DeepSeek-V3's 128 x 128 blocks
    shape = dataclasses.replace(bench.make_shape(model, device="cpu", quick=True), L=3, E=6, eplb_slots=8)
    shape = dataclasses.replace(shape, H=32, I=16) if model == "qwen3" else dataclasses.replace(shape, H=128, I=128)
    ckpt_path = bench.write_checkpoint(tmp_path / "ckpt", shape)
    old, new, _ = bench.eplb_placements(shape, seed=3)
    store = es.ExpertStore.create(
        tmp_path / "store", spec=shape.spec(), placement=old, checkpoint=shape.checkpoint(ckpt_path), device=device
    )
    # capacity T: no assignment is ever dropped, whatever the placement
    fwd = bench.SlotMoE(store, tokens=shape.tokens, top_k=shape.top_k, capacity=shape.tokens)
    assert fwd.counts()["served"] == shape.L * shape.tokens * shape.top_k
    ptrs = fwd.pointers()
    replay = bench.Replay(fwd.bound, torch.device(device))
    assert (replay.graph is not None) == (device == "cuda")
    before = fwd.fresh()
    assert torch.equal(replay().clone(), before)
    job = store.start_rebalance(new, layers_per_step=layers_per_step)
    try:
        switched_so_far = _step_and_check(job, store, fwd, replay, ptrs, before, old, new, layers_per_step)
    finally:
        if not job.done and job.failed is None:
            job.wait()  # a failed check leaves no background transfer running
    assert switched_so_far == list(range(shape.L)) and store.placement == new
    assert job.report.version == 2 == store.version
    with shape.checkpoint(ckpt_path) as ckpt:
        assert bench.check_slots(store, ckpt, new) == []
    store.close()

"""Run a function on several local processes, one rank each, failing instead of hanging.

Used by ``python -m expert_store demo --ranks N``, the multi-process tests and
the benchmarks.

``run_ranks(fn, world_size, *args, timeout_s=...)`` spawns one process per
rank, initializes a gloo (or NCCL) process group on a free loopback port, calls
``fn(rank, world_size, *args)`` and returns the per-rank results (return plain
Python data: tensors in results would be shared with a process that has exited). Any rank's
exception fails the call with every rank's traceback; a rank still running at
the deadline is killed and the call fails (a hang is a failure).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta

from .errors import StoreError

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, pg_timeout_s, backend, args, queue) -> None:
    try:
        import torch
        import torch.distributed as dist

        kw = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
            **kw,
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            # No barrier here: a test may have "dead" ranks that stopped calling.
            dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _set_env(values: dict[str, str | None]) -> None:
    """Set environment variables (None: remove one)."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_ranks(
    fn,
    world_size: int,
    *args,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    backend: str = "gloo",
    env: dict[str, str | None] | None = None,
    may_die: Sequence[int] = (),
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results by rank.

    ``backend`` "gloo" (CPU) or "nccl" (one GPU per rank); ``may_die``: ranks allowed to end
    without a result (a test that kills them; their result is None); ``env`` overrides
    environment variables in the children (None removes one). NVLink multicast stays off
    (NCCL_NVLS_ENABLE=0): the GPU machines are shared."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, pg_timeout_s, backend, args, queue), daemon=True)
        for r in range(world_size)
    ]
    # Children inherit the environment at start; `env` overrides it for them (None removes a variable).
    saved = {k: os.environ.get(k) for k in (env or {})}
    _set_env(env or {})
    try:
        for p in procs:
            p.start()
    finally:
        _set_env(saved)
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = queue.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
                continue
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world_size) if r not in results and r not in may_die]
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    if missing or errors:
        msg = [f"ranks without a result (hung or crashed): {missing}"] if missing else []
        msg += [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        raise StoreError("\n".join(msg))
    return [results[r][1] if r in results else None for r in range(world_size)]

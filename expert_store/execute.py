"""Carry out one rank's part of a rebalance plan.

Symbols: L layers, S slots per rank, n records in a round, B the per-round
staging budget (bytes). A :class:`~expert_store.plan.Round` is parks plus moves;
this rank's view of round k:

    buffer k % 2: uint8 [n_k * record_bytes]
        [ local move records | records sent to peer q (ascending q) | records received from q ]

Pipeline (one packing launch and one unpacking launch per round)::

    pack(0)                      # RoundRunner.prepack, while the agreement is in flight
    issue(0)                     # RoundRunner.queue, once the ranks agree
    for k: pack(k+1); finish(k); issue(k+1); unpack(k)
    while_in_flight()            # host work (the manifest write) under the last transfers
    wait for the device

``pack(k+1)`` never reads a slot that ``unpack(k)`` writes: the schedule puts a
move writing slot X no earlier than the last move reading X's old content, so
packing the next round ahead of unpacking this one is safe, and on NCCL the
transfer of round k+1 overlaps the unpacking of round k and the packing of
round k+2. Two buffers are in use at a time, so staging never exceeds 2 B.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from expert_store.kernels import PreparedCopies, pack_records, unpack_records

from .checkpoint import Checkpoint
from .comm import Comm
from .errors import PeerTimeoutError, StoreError
from .layout import ResidentSlabs
from .plan import DiskRead, Move, PostCopy, RebalancePlan, Round, merge_plans

__all__ = [
    "BackgroundCall",
    "ChunkedRun",
    "ExecutionStats",
    "RoundRunner",
    "copy_slots",
    "run_disk_reads",
    "run_post_copies",
]


@dataclass
class ExecutionStats:
    rounds: int = 0
    staging_peak: int = 0  # bytes of staging allocated at once on this rank
    seconds: dict[str, float] = field(default_factory=dict)
    # With EXPERT_STORE_TIMELINE=1 on CUDA: per round, ms after the first pack was queued at
    # which the GPU had finished that round's (pack, transfer, unpack), from CUDA events.
    timeline: list[tuple[float, float, float]] | None = None


class _Timeline:
    """CUDA events on the current stream at each round's milestones (EXPERT_STORE_TIMELINE=1).

    Shared by the runners of one rebalance: rounds are numbered across them."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and os.environ.get("EXPERT_STORE_TIMELINE") == "1"
        self.ev: dict[tuple[str, int], torch.cuda.Event] = {}
        self.base = 0  # rounds of the runners before the current one

    def start(self) -> None:
        """Mark the start, once per rebalance."""
        if self.on and ("start", 0) not in self.ev:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.ev[("start", 0)] = e

    def mark(self, what: str, k: int) -> None:
        if self.on:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.ev[(what, self.base + k)] = e

    def result(self) -> list[tuple[float, float, float]] | None:
        if not self.on:
            return None
        start = self.ev[("start", 0)]
        n = max(k for _, k in self.ev) + 1
        return [tuple(start.elapsed_time(self.ev[(w, k)]) for w in ("pack", "recv", "unpack")) for k in range(n)]


class _RoundIO:
    """This rank's records of one round, in buffer order."""

    def __init__(self, rank: int, rnd: Round) -> None:
        moves = rnd.moves
        local = [m for m in moves if m.is_local and m.src_rank == rank]
        out: dict[int, list[Move]] = {}
        inc: dict[int, list[Move]] = {}
        for m in moves:
            if m.is_local:
                continue
            if m.src_rank == rank:
                out.setdefault(m.dst_rank, []).append(m)
            elif m.dst_rank == rank:
                inc.setdefault(m.src_rank, []).append(m)
        self.parks = [p for p in rnd.parks if p.rank == rank]
        self.local = local
        self.out = dict(sorted(out.items()))
        self.inc = dict(sorted(inc.items()))
        self.n_pack = len(local) + sum(len(v) for v in self.out.values())
        self.n_total = self.n_pack + sum(len(v) for v in self.inc.values())

    @property
    def empty(self) -> bool:
        return not self.n_total and not self.parks

    def pack_lists(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """(layers, slots, buffer positions) packed from slots; (park ids, positions) copied from parks."""
        ms = self.local + [m for v in self.out.values() for m in v]
        layers, slots, pos, park_ids, park_pos = [], [], [], [], []
        for i, m in enumerate(ms):
            if m.src_park >= 0:
                park_ids.append(m.src_park)
                park_pos.append(i)
            else:
                layers.append(m.layer)
                slots.append(m.src_slot)
                pos.append(i)
        return layers, slots, pos, park_ids, park_pos

    def unpack_lists(self) -> tuple[list[int], list[int], list[int]]:
        layers, slots, recs = [], [], []
        for i, m in enumerate(self.local):
            layers.append(m.layer)
            slots.append(m.dst_slot)
            recs.append(i)
        pos = self.n_pack
        for v in self.inc.values():
            for m in v:
                layers.append(m.layer)
                slots.append(m.dst_slot)
                recs.append(pos)
                pos += 1
        return layers, slots, recs


class RoundRunner:
    """This rank's part of the rounds (parks, sends, receives, local moves).

    ``rounds`` come from :func:`~expert_store.plan.schedule_rounds` with a budget of
    ``staging_bytes // 2`` per round; staging never exceeds ``staging_bytes``.

    :meth:`prepack` allocates the staging and queues the packing of round 0. It writes
    staging only (no slot, no message), so the store calls it while the agreement is
    still in flight and drops the runner if the ranks disagree. :meth:`queue` does the rest.
    """

    def __init__(
        self,
        rounds: list[Round],
        *,
        rank: int,
        slabs: ResidentSlabs,
        comm: Comm,
        staging_bytes: int,
        timeline: _Timeline | None = None,
        arena: torch.Tensor | None = None,
    ) -> None:
        """``arena``: uint8 [>= staging_bytes] of reserved device memory to carve the buffers
        from (nothing is allocated then); None: allocate them."""
        self.rank, self.slabs, self.comm = rank, slabs, comm
        self.rb = slabs.spec.record_bytes
        self.ios = [io for io in (_RoundIO(rank, r) for r in rounds) if not io.empty]
        self.packed = 0  # rounds whose packing is queued
        self.staging_peak = 0
        self.events = timeline if timeline is not None else _Timeline(slabs.device)
        if not self.ios:
            return
        rb, dev = self.rb, slabs.device
        cap = max(max(io.n_total for io in self.ios), 1) * rb
        self.n_parks = max((p.park + 1 for io in self.ios for p in io.parks), default=0)
        # Two buffers let round k+1 be packed while round k is in flight; the schedule
        # keeps cap and the parks each within staging_bytes / 2, so one buffer always fits.
        nbuf = 2 if len(self.ios) > 1 and 2 * cap + self.n_parks * rb <= staging_bytes else 1
        self.staging_peak = nbuf * cap + self.n_parks * rb
        if arena is not None and arena.numel() >= self.staging_peak:
            self.bufs = [arena[i * cap : (i + 1) * cap] for i in range(nbuf)]  # record multiples: aligned
            self.park_buf = arena[nbuf * cap : self.staging_peak]
        else:
            try:
                self.bufs = [torch.empty(cap, dtype=torch.uint8, device=dev) for _ in range(nbuf)]
                self.park_buf = torch.empty(self.n_parks * rb, dtype=torch.uint8, device=dev)
            except RuntimeError as e:
                raise StoreError(
                    f"rank {rank}: cannot allocate {nbuf} x {cap} bytes of staging on {dev}: {e}"
                ) from None
        # Every round's index rows, validated and on the device in one copy: a round's
        # launches then cost no host work but the launch itself.
        entries: list[tuple] = []
        self.launches: list[tuple[int, int, int, tuple[list[int], list[int]]]] = []

        def add(entry) -> int:
            if not entry[1]:
                return -1
            entries.append(entry)
            return len(entries) - 1

        for io in self.ios:
            layers, slots, pos, park_ids, park_pos = io.pack_lists()
            parks = ("pack", [p.layer for p in io.parks], [p.slot for p in io.parks], [p.park for p in io.parks])
            self.launches.append(
                (
                    add(parks),
                    add(("pack", layers, slots, pos)),
                    add(("unpack", *io.unpack_lists())),
                    (park_ids, park_pos),
                )
            )
        self.copies = PreparedCopies(slabs.storage, slabs.layout, entries)

    def _pack(self, k: int) -> None:
        io, rb = self.ios[k], self.rb
        buf = self.bufs[k % len(self.bufs)]
        parks, pack, _, (park_ids, park_pos) = self.launches[k]
        if parks >= 0:
            self.copies.launch(parks, self.park_buf)
        if pack >= 0:
            self.copies.launch(pack, buf)
        if park_ids:
            # Records read from park records: one device copy each (an index tensor built on the
            # host would be a synchronous host-to-device copy, stalling the pipeline every round).
            rows = buf[: io.n_pack * rb].view(io.n_pack, rb)
            parked = self.park_buf.view(self.n_parks, rb)
            for pid, pos in zip(park_ids, park_pos):
                rows[pos].copy_(parked[pid])
        self.events.mark("pack", k)
        self.packed = k + 1

    def _issue(self, k: int) -> list:
        io, rb = self.ios[k], self.rb
        buf = self.bufs[k % len(self.bufs)]
        sends, recvs = {}, {}
        pos = len(io.local)
        for q, v in io.out.items():
            sends[q] = buf[pos * rb : (pos + len(v)) * rb]
            pos += len(v)
        for q, v in io.inc.items():
            recvs[q] = buf[pos * rb : (pos + len(v)) * rb]
            pos += len(v)
        return self.comm.start_exchange(sends, recvs)

    def _unpack(self, k: int) -> None:
        unpack = self.launches[k][2]
        if unpack >= 0:
            self.copies.launch(unpack, self.bufs[k % len(self.bufs)])
        self.events.mark("unpack", k)

    def prepack(self) -> None:
        """Queue the packing of round 0 (staging only: safe before the ranks have agreed)."""
        if self.ios and not self.packed:
            self.events.start()
            self._pack(0)

    def queue(self, stats: ExecutionStats) -> None:
        """Queue every round. On NCCL nothing here waits for the device (the caller does);
        gloo rounds complete one by one."""
        stats.staging_peak = max(stats.staging_peak, self.staging_peak)
        if not self.ios:
            return
        n, nbuf = len(self.ios), len(self.bufs)
        t_pack = t_wait = t_unpack = 0.0
        self.prepack()
        if nbuf == 1:
            # One buffer: each round is packed, exchanged and unpacked before the next.
            for k in range(n):
                t0 = time.perf_counter()
                if self.packed <= k:
                    self._pack(k)
                works = self._issue(k)
                t1 = time.perf_counter()
                self.comm.finish_exchange(works, what=f"round {k} exchange")
                self.events.mark("recv", k)
                t2 = time.perf_counter()
                self._unpack(k)
                t_pack += t1 - t0
                t_wait += t2 - t1
                t_unpack += time.perf_counter() - t2
        else:
            # Two buffers: pack(k+1) is queued before round k's transfer is waited for, and the
            # transfer of round k+1 is issued before round k is unpacked.
            works = self._issue(0)
            for k in range(n):
                t0 = time.perf_counter()
                if k + 1 < n:
                    self._pack(k + 1)
                t1 = time.perf_counter()
                self.comm.finish_exchange(works, what=f"round {k} exchange")
                self.events.mark("recv", k)
                t2 = time.perf_counter()
                works = self._issue(k + 1) if k + 1 < n else []
                self._unpack(k)
                t_pack += t1 - t0
                t_wait += t2 - t1
                t_unpack += time.perf_counter() - t2
        self.events.base += n
        for key, t in (("host_pack", t_pack), ("host_wait", t_wait), ("host_unpack", t_unpack)):
            stats.seconds[key] = stats.seconds.get(key, 0.0) + t


class ChunkedRun:
    """Plan layer chunks one at a time and run each chunk's rounds, planning chunk k+1 while
    chunk k's rounds are on the GPU (see :func:`~expert_store.plan.plan_chunks`).

    Constructing it plans chunk 0 and takes every byte of device memory the rounds will
    need (so a rank that cannot get it says so before anything moves); :meth:`prepack`
    then queues the first packing (staging only), while the agreement is in flight.
    Staging: a chunk's runner gets the staging share :func:`plan_chunks` gives it, and
    chunk k+1's runner starts only once the GPU has finished chunk k-1, so at most two
    runners hold staging at a time (the two halves of one arena)."""

    def __init__(
        self,
        chunks: Iterator[tuple[RebalancePlan, list[Round], int]],
        *,
        rank: int,
        slabs,
        comm,
        staging_bytes: int,
        arena: torch.Tensor | None = None,
    ) -> None:
        """``arena``: reserved staging (uint8, at least ``staging_bytes``) that the runners
        carve their buffers from; None: one runner allocates its own, chunks share an arena
        allocated here."""
        self.rank, self.slabs, self.comm = rank, slabs, comm
        self.arena = arena
        self._chunks = chunks
        self.timeline = _Timeline(slabs.device)
        self.plans: list[RebalancePlan] = []
        self.rounds = 0
        self.plan: RebalancePlan | None = None  # all chunks merged, once every chunk is planned
        self.allocated = 0  # bytes of the arena allocated here (a reserved one costs nothing now)
        nxt = self._plan_next()
        if nxt is not None and nxt[1] < staging_bytes and self.arena is None:  # chunks: both halves now
            try:
                self.arena = torch.empty(2 * nxt[1], dtype=torch.uint8, device=slabs.device)
                self.allocated = self.arena.numel()
            except RuntimeError as e:
                raise StoreError(
                    f"rank {rank}: cannot allocate {2 * nxt[1]} bytes of staging on {slabs.device}: {e}"
                ) from None
        self._runner = self._runner_for(nxt, prepack=False) if nxt is not None else None

    def prepack(self) -> None:
        """Queue the packing of chunk 0's round 0 (staging only: safe before the ranks agree)."""
        if self._runner is not None:
            self._runner.prepack()

    def _plan_next(self) -> tuple[list[Round], int] | None:
        try:
            plan, rounds, staging = next(self._chunks)
        except StopIteration:
            return None
        self.plans.append(plan)
        self.rounds += len(rounds)
        return rounds, staging

    def _runner_for(self, planned: tuple[list[Round], int], *, prepack: bool = True) -> RoundRunner:
        rounds, staging = planned
        arena = None
        if self.arena is not None:  # chunk k uses half k % 2 (the other half may still be in flight)
            half = (len(self.plans) - 1) % 2
            arena = self.arena[half * staging : (half + 1) * staging]
        runner = RoundRunner(
            rounds,
            rank=self.rank,
            slabs=self.slabs,
            comm=self.comm,
            staging_bytes=staging,
            timeline=self.timeline,
            arena=arena,
        )
        if prepack:
            runner.prepack()
        return runner

    def run(
        self,
        stats: ExecutionStats,
        *,
        on_plan: Callable[[RebalancePlan], None],
        while_in_flight: Callable[[], None] | None = None,
    ) -> RebalancePlan:
        """Run every chunk; ``on_plan(plan)`` is called for each chunk's plan before its rounds,
        ``while_in_flight()`` once the last round is queued. Returns the merged plan."""
        cuda = self.slabs.device.type == "cuda"
        stats.staging_peak = max(stats.staging_peak, self.allocated)
        runner, done_before = self._runner, None
        self.prepack()  # (done already when the store called it during the agreement)
        on_plan(self.plans[0])
        while runner is not None:
            runner.queue(stats)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            planned = self._plan_next()  # on the CPU while this chunk's rounds run on the GPU
            if planned is None:
                break
            on_plan(self.plans[-1])
            if done_before is not None:
                self._wait(done_before)  # chunk k-1 is off the GPU: its staging is free
            following = self._runner_for(planned)
            stats.staging_peak = max(stats.staging_peak, runner.staging_peak + following.staging_peak)
            runner, done_before = following, done
        self.plan = merge_plans(self.plans) if len(self.plans) > 1 else self.plans[0]
        if while_in_flight is not None:
            while_in_flight()
        self.comm.sync_device(self.slabs.device, what="rebalance rounds")
        stats.timeline = self.timeline.result()
        stats.rounds = self.rounds
        return self.plan

    def _wait(self, event: torch.cuda.Event) -> None:
        deadline = time.monotonic() + self.comm.timeout_s
        while not event.query():
            if time.monotonic() > deadline:
                raise PeerTimeoutError(
                    f"rank {self.rank}: a chunk of rebalance rounds did not finish within {self.comm.timeout_s:.0f} s"
                )
            time.sleep(0.0002)


def run_disk_reads(
    reads: Sequence[DiskRead], *, slabs: ResidentSlabs, checkpoint: Checkpoint, staging_bytes: int | None
) -> int:
    """Read experts from the checkpoint straight into their slots; returns bytes read."""
    if not reads:
        return 0
    targets = [(d.layer, d.expert, slabs.slot_tensors(d.layer, d.slot)) for d in reads]
    return checkpoint.read_into(slabs.spec, targets, staging_bytes=staging_bytes).nbytes


class BackgroundCall:
    """Run ``fn(*args, **kwargs)`` in a daemon thread while the caller goes on.

    ``result()`` joins and returns the value or re-raises the error; ``wait()`` joins and
    returns the value, or None if the call failed (for clean-up paths)."""

    def __init__(self, fn, *args, name: str = "expert-store-background", **kwargs) -> None:
        self._value = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as e:  # re-raised by result()
                self._error = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self):
        self._thread.join()
        return self._value


def copy_slots(
    slabs: ResidentSlabs,
    layers: Sequence[int],
    src_slots: Sequence[int],
    dst_slots: Sequence[int],
    *,
    budget: int,
    scratch: torch.Tensor | None = None,
) -> int:
    """Copy experts slot to slot within this rank through a staging slab of at most ``budget`` bytes
    (carved from ``scratch`` when it is large enough).

    Sources must not be destinations of the same call. Returns the staging bytes used."""
    n = len(layers)
    if n == 0:
        return 0
    rb = slabs.spec.record_bytes
    per = max(1, budget // rb)
    size = min(per, n) * rb
    if scratch is not None and scratch.numel() >= size:
        buf = scratch[:size]
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=slabs.device)
    for a in range(0, n, per):
        b = min(n, a + per)
        lt = layers[a:b]
        pack_records(slabs.storage, slabs.layout, lt, src_slots[a:b], out=buf)
        unpack_records(buf, slabs.storage, slabs.layout, lt, dst_slots[a:b])
    return buf.numel()


def run_post_copies(
    copies: Sequence[PostCopy], *, slabs: ResidentSlabs, budget: int, scratch: torch.Tensor | None = None
) -> int:
    return copy_slots(
        slabs,
        [c.layer for c in copies],
        [c.src_slot for c in copies],
        [c.dst_slot for c in copies],
        budget=budget,
        scratch=scratch,
    )

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

A rebalance (:class:`RebalanceRun`) on one rank, in order: every chunk's rounds
(checkpoint reads into slots no move reads go on meanwhile, in a thread); the
wait for the device and those reads; the reads into slots the moves read; the
*relay rounds* (:func:`~expert_store.plan.relay_rounds`: each missing expert that
several ranks need was read by one of them, which now sends it on from the slot
just filled; the same round runner, message numbers after the chunks' rounds);
the post copies; the check of what arrived.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from expert_store.kernels import PreparedCopies, pack_records, resident_checksums, unpack_records

from .checkpoint import Checkpoint
from .comm import Comm
from .errors import IntegrityError, StoreError
from .layout import ResidentSlabs
from .plan import DiskRead, Move, RebalancePlan, Round, merge_plans, relay_rounds, round_budget

__all__ = [
    "ChunkedRun",
    "ExecutionStats",
    "RebalanceRun",
    "RoundIO",
    "RoundRunner",
    "copy_slots",
    "exchange_views",
    "planned_staging_peak",
    "run_disk_reads",
]


@dataclass
class ExecutionStats:
    rounds: int = 0
    staging_peak: int = 0  # bytes of staging allocated at once on this rank
    seconds: dict[str, float] = field(default_factory=dict)


class RoundIO:
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
        """(layers, slots, buffer positions) unpacked: local moves first, then what peers sent."""
        ms = self.local + [m for v in self.inc.values() for m in v]
        pos = list(range(len(self.local))) + list(range(self.n_pack, self.n_total))
        return [m.layer for m in ms], [m.dst_slot for m in ms], pos


def _buffers(ios: list[RoundIO], rb: int, staging_bytes: int) -> tuple[int, int, int]:
    """(bytes per buffer, buffers, park records) of a rank's non-empty rounds ``ios``."""
    cap = max(max(io.n_total for io in ios), 1) * rb
    n_parks = max((p.park + 1 for io in ios for p in io.parks), default=0)
    # Two buffers let round k+1 be packed while round k is in flight; the schedule
    # keeps cap and the parks each within staging_bytes / 2, so one buffer always fits.
    nbuf = 2 if len(ios) > 1 and 2 * cap + n_parks * rb <= staging_bytes else 1
    return cap, nbuf, n_parks


def planned_staging_peak(
    chunks: Sequence[tuple[RebalancePlan, list[Round], int]],
    *,
    rank: int,
    record_bytes: int,
    staging_bytes: int,
    relays: Sequence[Round] = (),
) -> int:
    """The staging bytes a rebalance of these chunks (:func:`~expert_store.plan.plan_chunks`) and
    relay rounds (:func:`~expert_store.plan.relay_rounds` of the merged plan) holds at once on
    ``rank``, without running it: its ``RebalanceReport.staging_peak`` when no staging is reserved
    (:meth:`ExpertStore.reserve_staging`)."""
    ios = [io for io in (RoundIO(rank, r) for r in relays) if not io.empty]
    cap, nbuf, _ = _buffers(ios, record_bytes, staging_bytes) if ios else (0, 0, 0)
    relay = nbuf * cap  # the relay rounds run alone, once every chunk is off the device
    peaks = []
    for _, rounds, staging in chunks:
        ios = [io for io in (RoundIO(rank, r) for r in rounds) if not io.empty]
        cap, nbuf, n_parks = _buffers(ios, record_bytes, staging) if ios else (0, 0, 0)
        peaks.append(nbuf * cap + n_parks * record_bytes)
    # ChunkedRun: several chunks share an arena of two halves; two runners hold staging at a time.
    arena = 2 * chunks[0][2] if chunks and chunks[0][2] < staging_bytes else 0
    n_post = sum(c.rank == rank for plan, _, _ in chunks for c in plan.post_copies)
    post = min(max(1, staging_bytes // 2 // record_bytes), n_post) * record_bytes  # copy_slots' buffer
    return max([arena, post, relay, *peaks, *map(sum, pairwise(peaks))])


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
        first_seq: int = 0,
        arena: torch.Tensor | None = None,
    ) -> None:
        """``arena``: uint8 [>= staging_bytes] of reserved device memory to carve the buffers
        from (nothing is allocated then); None: allocate them."""
        self.rank, self.slabs, self.comm = rank, slabs, comm
        self.rb = slabs.spec.record_bytes
        ios = [RoundIO(rank, r) for r in rounds]
        self.ios = [io for io in ios if not io.empty]
        # Message sequence numbers are the plan's round numbers (this rank skips its empty rounds).
        self.seqs = [first_seq + i for i, io in enumerate(ios) if not io.empty]
        self.packed = 0  # rounds whose packing is queued
        self.staging_peak = 0
        if not self.ios:
            return
        rb, dev = self.rb, slabs.device
        cap, nbuf, self.n_parks = _buffers(self.ios, rb, staging_bytes)
        self.staging_peak = nbuf * cap + self.n_parks * rb
        if arena is None or arena.numel() < self.staging_peak:
            arena = allocate_staging(self.staging_peak, dev, rank)
        self.bufs = [arena[i * cap : (i + 1) * cap] for i in range(nbuf)]  # record multiples: aligned
        self.park_buf = arena[nbuf * cap : self.staging_peak]
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
        self.copies = PreparedCopies(slabs, slabs.layout, entries)

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
        self.packed = k + 1

    def _issue(self, k: int) -> list:
        io, rb = self.ios[k], self.rb
        sends, recvs = exchange_views(self.bufs[k % len(self.bufs)], len(io.local), io.out, io.inc, rb)
        return self.comm.start_exchange(sends, recvs, seq=self.seqs[k])

    def _unpack(self, k: int) -> None:
        unpack = self.launches[k][2]
        if unpack >= 0:
            self.copies.launch(unpack, self.bufs[k % len(self.bufs)])

    def prepack(self) -> None:
        """Queue the packing of round 0 (staging only: safe before the ranks have agreed)."""
        if self.ios and not self.packed:
            self._pack(0)

    def queue(self, stats: ExecutionStats) -> None:
        """Queue every round. On NCCL nothing here waits for the device (the caller does);
        gloo rounds complete one by one."""
        stats.staging_peak = max(stats.staging_peak, self.staging_peak)
        if not self.ios:
            return
        n, ahead = len(self.ios), len(self.bufs) == 2
        t_pack = t_wait = t_unpack = 0.0
        self.prepack()
        # One buffer: each round is packed, exchanged and unpacked before the next. Two: pack(k+1)
        # is queued before round k's transfer is waited for, and the transfer of round k+1 is
        # issued before round k is unpacked.
        works = None
        for k in range(n):
            t0 = time.perf_counter()
            if self.packed <= k:
                self._pack(k)
            works = works or self._issue(k)
            if ahead and k + 1 < n:
                self._pack(k + 1)
            t1 = time.perf_counter()
            self.comm.finish_exchange(works)
            t2 = time.perf_counter()
            works = self._issue(k + 1) if ahead and k + 1 < n else None
            self._unpack(k)
            t_pack += t1 - t0
            t_wait += t2 - t1
            t_unpack += time.perf_counter() - t2
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
        round_bytes: int | None = None,
    ) -> None:
        """``arena``: reserved staging (uint8, at least ``staging_bytes``) that the runners
        carve their buffers from; None: one runner allocates its own, chunks share an arena
        allocated here. ``round_bytes``: the rebalance's, for the relay rounds (None: half
        the staging)."""
        self.rank, self.slabs, self.comm = rank, slabs, comm
        self.staging_bytes = staging_bytes
        self.round_bytes = staging_bytes if round_bytes is None else round_bytes
        self.relay_rounds: list[Round] = []  # of the merged plan, once every chunk is planned
        self.arena = arena
        self._chunks = chunks
        self.plans: list[RebalancePlan] = []
        self.rounds = 0
        self.plan: RebalancePlan | None = None  # all chunks merged, once every chunk is planned
        self.allocated = 0  # bytes of the arena allocated here (a reserved one costs nothing now)
        nxt = self._plan_next()
        if nxt is not None and nxt[1] < staging_bytes and self.arena is None:  # chunks: both halves now
            self.arena = allocate_staging(2 * nxt[1], slabs.device, rank)
            self.allocated = self.arena.numel()
        self._runner = self._runner_for(nxt, prepack=False) if nxt is not None else None
        rb = slabs.spec.record_bytes
        budget = round_budget(staging_bytes=staging_bytes, round_bytes=self.round_bytes, record_bytes=rb)
        if budget < 2 * rb and self.plans and self.plans[0].relays:
            # (several chunks only when half the staging holds four records: chunk 0 tells)
            raise StoreError(
                f"rank {rank}: relaying experts read from the checkpoint needs two expert records "
                f"({2 * rb} bytes) per round, the staging gives {budget}; raise staging_bytes"
            )

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
            first_seq=self.rounds - len(rounds),
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
                # chunk k-1 is off the GPU: its staging is free
                self.comm.sync_device(self.slabs.device, what="a chunk of rebalance rounds", event=done_before)
            following = self._runner_for(planned)
            stats.staging_peak = max(stats.staging_peak, runner.staging_peak + following.staging_peak)
            runner, done_before = following, done
        self.plan = merge_plans(self.plans) if len(self.plans) > 1 else self.plans[0]
        self.relay_rounds = relay_rounds(
            self.plan,
            record_bytes=self.slabs.spec.record_bytes,
            staging_bytes=self.staging_bytes,
            round_bytes=self.round_bytes,
        )
        self.rounds += len(self.relay_rounds)
        if while_in_flight is not None:
            while_in_flight()
        self.comm.sync_device(self.slabs.device, what="rebalance rounds")
        self._runner = None  # its staging is free (the relay rounds may take it)
        stats.rounds = self.rounds
        return self.plan

    def run_relays(self, stats: ExecutionStats) -> None:
        """Run :attr:`relay_rounds` (after :meth:`run`, once every checkpoint read of this rank is
        complete: they send slots those reads filled) and wait for the device."""
        if not self.relay_rounds:
            return
        runner = RoundRunner(
            self.relay_rounds,
            rank=self.rank,
            slabs=self.slabs,
            comm=self.comm,
            staging_bytes=self.staging_bytes,
            first_seq=self.rounds - len(self.relay_rounds),
            arena=self.arena,
        )
        runner.queue(stats)
        self.comm.sync_device(self.slabs.device, what="relay rounds")


def exchange_views(
    buf: torch.Tensor, first: int, out: dict[int, list], inc: dict[int, list], record_bytes: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({peer: records sent}, {peer: records received}) as views of ``buf`` laid out as
    ``[first records | sent to q (ascending q) | received from q (ascending q)]``; ``out`` /
    ``inc``: peer -> its moves, in ascending peer order."""
    sends, recvs, pos, rb = {}, {}, first, record_bytes
    for table, views in ((out, sends), (inc, recvs)):
        for q, v in table.items():
            views[q] = buf[pos * rb : (pos + len(v)) * rb]
            pos += len(v)
    return sends, recvs


def allocate_staging(nbytes: int, device: torch.device, rank: int) -> torch.Tensor:
    """uint8 [nbytes] on ``device``; StoreError naming the rank when the memory is not there."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except RuntimeError as e:  # out of memory
        raise StoreError(f"rank {rank}: cannot allocate {nbytes} bytes of staging on {device}: {e}") from None


def run_disk_reads(
    reads: Sequence[DiskRead],
    *,
    slabs: ResidentSlabs,
    checkpoint: Checkpoint,
    staging_bytes: int | None,
    after: torch.cuda.Event | None = None,
) -> int:
    """Read experts from the checkpoint straight into their slots, on the GPU only once ``after``
    (an event of the caller's stream, see :class:`RebalanceRun`) is reached; returns bytes read."""
    if not reads:
        return 0
    targets = [(d.layer, d.expert, slabs.slot_tensors(d.layer, d.slot)) for d in reads]
    if after is None:
        return checkpoint.read_into(slabs.spec, targets, staging_bytes=staging_bytes).nbytes
    stream = torch.cuda.Stream(slabs.device)
    stream.wait_event(after)
    with torch.cuda.stream(stream):
        return checkpoint.read_into(slabs.spec, targets, staging_bytes=staging_bytes).nbytes


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
        pack_records(slabs, slabs.layout, lt, src_slots[a:b], out=buf)
        unpack_records(buf, slabs, slabs.layout, lt, dst_slots[a:b])
    return buf.numel()


class RebalanceRun:
    """Everything this rank does to put its bytes in place for one rebalance, in one object:
    the rounds of every chunk (:class:`ChunkedRun`), the checkpoint reads, the relay rounds,
    the post copies, and the check of every slot that was written against the manifest's
    checksums.

    Constructing it plans the first chunk and takes the staging (a StoreError then means
    nothing moved); :meth:`prepack` only writes staging; :meth:`run` moves the bytes.

    Checkpoint reads into slots that no move reads go in a background thread, one chunk
    after the other, while the rounds run; reads into slots whose old content a move still
    needs wait for the rounds. On the GPU the thread first waits for ``entry``, an event
    recorded on the caller's stream when the call began: without it a read could land in a
    slot before a kernel the caller queued earlier has used it."""

    def __init__(
        self,
        chunks,
        *,
        rank: int,
        slabs: ResidentSlabs,
        comm: Comm,
        checkpoint: Checkpoint,
        staging_bytes: int,
        arena: torch.Tensor | None,
        entry: torch.cuda.Event | None,
        round_bytes: int | None = None,
    ) -> None:
        """``round_bytes``: the rebalance's (the chunks' rounds were planned with it), for the
        relay rounds; None: half the staging."""
        self.rank, self.slabs, self.comm, self.checkpoint = rank, slabs, comm, checkpoint
        self.staging_bytes, self.arena, self.entry = staging_bytes, arena, entry
        self.rounds = ChunkedRun(
            chunks, rank=rank, slabs=slabs, comm=comm, staging_bytes=staging_bytes, arena=arena, round_bytes=round_bytes
        )
        self.stats = ExecutionStats()
        self._reads: list[concurrent.futures.Future] = []  # checkpoint reads in the background
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # one thread: reads go in order
        self._late: list[DiskRead] = []

    def prepack(self) -> None:
        self.rounds.prepack()

    @property
    def plan(self) -> RebalancePlan | None:
        return self.rounds.plan

    def _disk(self) -> dict:
        return dict(slabs=self.slabs, checkpoint=self.checkpoint, staging_bytes=self.staging_bytes // 4)

    def _start_reads(self, plan: RebalancePlan) -> None:
        mine = [d for d in plan.disk_reads if d.rank == self.rank]
        read_first = {(m.layer, m.src_slot) for m in plan.moves if m.src_rank == self.rank}
        early = [d for d in mine if (d.layer, d.slot) not in read_first]
        self._late.extend(d for d in mine if (d.layer, d.slot) in read_first)
        if early:
            if self._reader is None:
                self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-store-disk")
            self._reads.append(self._reader.submit(run_disk_reads, early, after=self.entry, **self._disk()))

    def run(self, phases: dict[str, float], *, while_in_flight: Callable[[], None]) -> RebalancePlan:
        """Move every byte; ``while_in_flight()`` runs once the last round is queued. Returns the
        merged plan. On an error, no thread of this run writes a slot any more when it returns."""
        try:
            t0 = time.perf_counter()
            plan = self.rounds.run(self.stats, on_plan=self._start_reads, while_in_flight=while_in_flight)
            phases["exchange"] = time.perf_counter() - t0
            phases.update(self.stats.seconds)
            t0 = time.perf_counter()
            for f in self._reads:
                f.result()
            run_disk_reads(self._late, **self._disk())  # slots whose old content the moves needed
            phases["disk_wait"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.rounds.relay_rounds:  # every read of this rank is complete: its relays may go
                relay_stats = ExecutionStats()
                self.rounds.run_relays(relay_stats)
                self.stats.staging_peak = max(self.stats.staging_peak, relay_stats.staging_peak)
                phases["relay"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            mine = [c for c in plan.post_copies if c.rank == self.rank]
            scratch = self.arena if self.arena is not None and self.arena.numel() >= self.staging_bytes else None
            used = copy_slots(
                self.slabs,
                [c.layer for c in mine],
                [c.src_slot for c in mine],
                [c.dst_slot for c in mine],
                budget=self.staging_bytes // 2,
                scratch=scratch,
            )
            self.stats.staging_peak = max(self.stats.staging_peak, used)
            self.comm.sync_device(self.slabs.device, what="post copies")
            phases["local_copy"] = time.perf_counter() - t0
        finally:
            if self._reader is not None:  # no thread of this run writes a slot once it returns
                self._reader.shutdown(wait=True, cancel_futures=True)
        return plan

    def verify(self, checksums: torch.Tensor, experts: torch.Tensor, version: int) -> None:
        """Check every record that arrived on this rank (from a peer or the checkpoint) against
        ``checksums`` (int64 [L, E], the manifest's); ``experts`` int64 [L, S]: this rank's
        experts in the new placement. IntegrityError names layer, slot, expert and where the
        bytes came from; nothing is changed.

        Local copies are not hashed again: their bytes were resident on this rank already (checked
        when they arrived, and by ``ExpertStore.verify``), and hashing them cost as much as the
        copy itself (0.9 ms per 1.2 GB on an H200)."""
        me, plan = self.rank, self.plan
        written = sorted(
            {(m.layer, m.dst_slot) for m in plan.moves if m.dst_rank == me and not m.is_local}
            | {(d.layer, d.slot) for d in plan.disk_reads if d.rank == me}
            | {(x.layer, x.dst_slot) for x in plan.relays if x.dst_rank == me}
        )
        bad = mismatched_slots(self.slabs, written, experts, checksums)
        if bad:
            layer, s = written[bad[0]]
            raise IntegrityError(
                f"rank {self.rank}: layer {layer} expert {int(experts[layer, s])} arrived in slot {s} "
                f"(physical {self.rank * self.slabs.layout.slots + s}) from {self._source(layer, s)} with a "
                f"checksum other than version {version}'s ({len(bad)} of {len(written)} arrived records differ)"
            )

    def _source(self, layer: int, slot: int) -> str:
        """Where the plan fills (layer, slot) of this rank from."""
        plan, me = self.plan, self.rank
        for m in plan.moves:
            if (m.dst_rank, m.layer, m.dst_slot) == (me, layer, slot):
                return f"local slot {m.src_slot}" if m.is_local else f"rank {m.src_rank}"
        if any((d.rank, d.layer, d.slot) == (me, layer, slot) for d in plan.disk_reads):
            return f"the checkpoint {self.checkpoint.path}"
        for x in plan.relays:
            if (x.dst_rank, x.layer, x.dst_slot) == (me, layer, slot):
                return f"rank {x.src_rank} (relayed from its checkpoint read)"
        for c in plan.post_copies:
            if (c.rank, c.layer, c.dst_slot) == (me, layer, slot):
                return f"local slot {c.src_slot}"
        return "an unknown source"


def mismatched_slots(slabs: ResidentSlabs, pairs: list[tuple[int, int]], experts, checksums) -> list[int]:
    """Indices i of the (layer, slot) ``pairs`` whose bytes' checksum (Triton kernel) is not
    ``checksums[layer, experts[layer, slot]]`` (experts int64 [L, S], checksums int64 [L, E])."""
    if not pairs:
        return []
    layers = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    slots = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    got = resident_checksums(slabs, slabs.layout, layers, slots).cpu()
    return (got != checksums[layers, experts[layers, slots]]).nonzero().flatten().tolist()

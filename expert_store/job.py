"""A rebalance that moves bytes in the background and switches layer by layer between forward
passes (``ExpertStore.start_rebalance``).

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S, X = P - E + 1.

The job is planned and agreed like a blocking rebalance (one plan per layer, planned in layer
order with one shared load, so the moves and the accounting are those of ``rebalance``). Then:

* **A background thread stages the layers, in order** (:class:`_Stager`). Staging a layer fills
  this rank's region of the staging arena for it, uint8 [n * record_bytes]::

      [ local moves | sent to peer q (ascending q) | received from q | checkpoint reads
        | relays sent (copies of reads, by peer) | relays received (by reader)
        | sources of duplicates that keep their expert ]

  packed from the live slots (only read: the forward passes keep using them), exchanged with
  the peers (one exchange per layer, on the job's own process group and, on a GPU, its own
  stream), read from the checkpoint; a missing expert that several ranks need is read by one
  of them and relayed to the others in a second exchange of the layer. What arrived (from
  peers and the checkpoint) is checked against the manifest's checksums there, before any slot
  is written. A layer is staged only while every live rank's staging of the layers not yet
  switched fits ``staging_bytes`` (the window is computed from the plan, the same on every
  rank, so the ranks exchange the same layers in the same order).
* **``step()`` switches, on the caller's thread and stream.** Each step posts this rank's
  readiness (layers staged, or the failure) to the lowest live rank, which sends the table back;
  the *next* step reads that table, already arrived while the forward pass ran, and switches
  the layers every rank had ready, up to ``layers_per_step`` (layers that change nothing on any
  rank switch for free). Switching a layer is one launch, bound when its staging completed (the
  unpack of its staged records into its slots; a duplicate of an arriving expert unpacks the
  same record), and one in-place device copy of its routing rows: no host-to-device copy,
  nothing that waits for the device. Every live rank switches the same layers at the same step.

A failure (a peer that does not answer within the store's ``timeout_s``, a corrupt record, a
failed checkpoint read) ends the job at the same step on every live rank: the layers switched
so far are committed as a version with reason ``"rebalance-partial"`` (none switched: nothing is
committed), the other layers keep the old placement, and the store stays usable. When the last
layer switches, the version is committed with reason ``"rebalance"``, as ``rebalance`` does.

Known limit: if the lowest live rank dies while it sends a step's table, ranks that got the
table switch one step more than ranks that did not; their partial versions then differ, which
the next call's agreement detects (the ranks raise AgreementError and must reopen).
"""

from __future__ import annotations

import atexit
import collections
import struct
import threading
import time
import weakref
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from expert_store.kernels import PreparedCopies, slab_checksums

from .comm import Comm, Kind, call_id
from .errors import AgreementError, IntegrityError, ManifestError, PeerTimeoutError, StoreError
from .execute import RebalanceRun, RoundIO, allocate_staging, exchange_views
from .messages import Completion, Outcome, StepReady, StepStatus
from .placement import Placement
from .plan import RebalancePlan, Round, merge_plans, plan_rebalance, round_budget, schedule_rounds

if TYPE_CHECKING:
    from .store import ExpertStore, RebalanceReport, _Call

__all__ = ["RebalanceJob", "plan_job"]

_CHECKPOINT = -1  # StepReady.source of a checkpoint read
_NONE = -2


class _LayerPart:
    """This rank's records of one layer, in staging order (see the module docstring)."""

    def __init__(self, plan: RebalancePlan, rank: int, filled: set[int]) -> None:
        self.io = RoundIO(rank, Round(parks=[], moves=plan.moves))
        self.reads = [d for d in plan.disk_reads if d.rank == rank]
        self.posts = [c for c in plan.post_copies if c.rank == rank]
        # a post copy whose source slot keeps its expert (not in ``filled``, this rank's slots
        # that the switch writes) is packed with the local moves; the others duplicate a record
        # the switch unpacks anyway (see _layer_entries)
        self.post_packs = [c for c in self.posts if c.src_slot not in filled]
        self.relay_out: dict[int, list] = {}  # peer -> relays of experts this rank reads for it
        self.relay_in: dict[int, list] = {}  # reader -> relays it sends this rank
        for x in plan.relays:
            if x.src_rank == rank:
                self.relay_out.setdefault(x.dst_rank, []).append(x)
            elif x.dst_rank == rank:
                self.relay_in.setdefault(x.src_rank, []).append(x)
        self.relay_out, self.relay_in = dict(sorted(self.relay_out.items())), dict(sorted(self.relay_in.items()))
        self.n_pack = self.io.n_pack
        self.n_in = self.io.n_total - self.io.n_pack
        self.first_relay = self.io.n_total + len(self.reads)  # [.. reads | relays sent | relays received]
        self.n_relay_out = sum(map(len, self.relay_out.values()))
        self.n_records = self.first_relay + self.n_relay_out + sum(map(len, self.relay_in.values()))
        self.buffer_records = self.n_records + len(self.post_packs)  # [.. | post copies' sources]


def _filled_slots(plan: RebalancePlan) -> collections.defaultdict[int, set[int]]:
    """rank -> the slots its switch of the layer fills from staged records (moves, reads, relays)."""
    filled: collections.defaultdict[int, set[int]] = collections.defaultdict(set)
    for m in plan.moves:
        filled[m.dst_rank].add(m.dst_slot)
    for d in plan.disk_reads:
        filled[d.rank].add(d.slot)
    for x in plan.relays:
        filled[x.dst_rank].add(x.dst_slot)
    return filled


def _records_per_rank(plan: RebalancePlan, R: int, filled: dict[int, set[int]]) -> list[int]:
    """Records of the layer's staging region on each rank (see :class:`_LayerPart`)."""
    n = [0] * R
    for m in plan.moves:
        n[m.src_rank] += 1
        if not m.is_local:
            n[m.dst_rank] += 1
    for d in plan.disk_reads:
        n[d.rank] += 1
    for x in plan.relays:  # a copy of the read record to send, and the record received
        n[x.src_rank] += 1
        n[x.dst_rank] += 1
    for c in plan.post_copies:  # a source that keeps its expert is staged (_LayerPart.post_packs)
        n[c.rank] += c.src_slot not in filled[c.rank]
    return n


def _layer_entries(part: _LayerPart, layer: int) -> tuple[list, bool]:
    """The prepared copies of one layer (region records as in the module docstring): the pack of
    what this rank sends, moves or duplicates from a slot that keeps its expert (when any), then
    its switch, one unpack of everything staged. A duplicate (post copy) of an expert that
    arrives in the layer takes the record its first slot is unpacked from: the unpack writes it
    twice, and a switch is one launch."""
    io, entries = part.io, []
    layers, slots, pos, _, _ = io.pack_lists()
    layers += [layer] * len(part.post_packs)
    slots += [c.src_slot for c in part.post_packs]
    pos += list(range(part.n_records, part.buffer_records))
    if layers:
        entries.append(("pack", layers, slots, pos))
    u_layers, u_slots, u_pos = io.unpack_lists()
    u_layers += [layer] * len(part.reads)
    u_slots += [d.slot for d in part.reads]
    u_pos += list(range(io.n_total, part.first_relay))
    relayed = [x for v in part.relay_in.values() for x in v]
    u_layers += [layer] * len(relayed)
    u_slots += [x.dst_slot for x in relayed]
    u_pos += list(range(part.first_relay + part.n_relay_out, part.n_records))
    record_of = dict(zip(u_slots, u_pos))  # every item is of this layer
    record_of.update((c.src_slot, part.n_records + i) for i, c in enumerate(part.post_packs))
    u_layers += [layer] * len(part.posts)
    u_slots += [c.dst_slot for c in part.posts]
    u_pos += [record_of[c.src_slot] for c in part.posts]
    if u_layers:
        entries.append(("unpack", u_layers, u_slots, u_pos))
    return entries, bool(layers)


class JobPlan:
    """Every layer's plan, this rank's part of each and every rank's staging need per layer."""

    def __init__(self, plans: list[RebalancePlan], rank: int, R: int, record_bytes: int) -> None:
        self.plans = plans
        filled = [_filled_slots(p) for p in plans]
        self.parts = [_LayerPart(p, rank, f[rank]) for p, f in zip(plans, filled)]
        self.need = [[n * record_bytes for n in _records_per_rank(p, R, f)] for p, f in zip(plans, filled)]  # [L][R]
        # layers in which no rank moves, reads or copies anything: they switch without a cost
        self.idle = [not (p.moves or p.disk_reads or p.post_copies) for p in plans]
        self.merged = merge_plans(plans)
        # layers whose staging on some rank exceeds staging_bytes: switched by blocking rounds
        # inside one step (set by plan_job; the same on every rank: it comes from the plan)
        self.blocking = [False] * len(plans)


def plan_job(store: ExpertStore, call: _Call) -> JobPlan | StoreError:
    """Plan every layer (in order, one shared load: the moves of ``plan_rebalance`` of all layers)
    and mark the layers whose staging does not fit ``call.staging_bytes`` on some rank (they are
    switched by blocking rounds). Returns a StoreError instead of raising it (it is shared
    through the agreement)."""
    old = store.placement
    load = [0] * old.num_ranks
    kw = dict(old_alive=store._manifest.alive, alive=call.alive, fresh=call.fresh, ranks_per_node=store.ranks_per_node,
              relay_missing=True)  # fmt: skip
    try:
        plans = [
            plan_rebalance(old, call.new, expert_bytes=store.spec.nbytes, layers=[layer], load=load, **kw)
            for layer in range(old.num_layers)
        ]
        jp = JobPlan(plans, store.rank, old.num_ranks, store.spec.record_bytes)
    except StoreError as e:
        return e
    jp.blocking = [any(n > call.staging_bytes for n in need) for need in jp.need]
    rb = store.spec.record_bytes
    if any(jp.blocking) and round_budget(staging_bytes=call.staging_bytes, round_bytes=call.round_bytes,
                                         record_bytes=rb) < 2 * rb:  # fmt: skip
        layer = jp.blocking.index(True)
        return StoreError(
            f"rank {store.rank}: layer {layer} does not fit staging_bytes={call.staging_bytes} and its blocking "
            f"rounds need at least four expert records of staging ({4 * rb} bytes); raise staging_bytes"
        )
    return jp


# Staging threads still running: stopped at interpreter exit, where a daemon thread frozen in the
# middle of a torch call aborts the process ("dec_ref() is being called while the GIL is ... not held").
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_staging() -> None:
    for stager in list(_RUNNING):
        stager.shutdown(timeout=1.0)


class _Staged:
    """One staged layer: its region of the arena; once staged, ``switch`` (its bound unpack, or
    None when this rank's slots of the layer do not change) and ``freed`` (CUDA: the event the
    switch records, after which the region may be reused)."""

    def __init__(self, start: int, nbytes: int) -> None:
        self.start, self.nbytes = start, nbytes
        self.switch = None
        self.freed = None


class _Stager:
    """The background thread that stages the layers in order (see the module docstring).

    State shared with the stepping thread is guarded by ``cv``: ``ready`` (layers 0..ready-1
    staged), ``fault`` (the StepReady of a failure, and its text), ``switched`` (set by the
    stepping thread), ``stop``. ``state`` is the row a step reports, made by this thread when
    ``ready`` or ``fault`` changes and read by the stepping thread without the lock (one
    attribute read: the step's host time is that of cache-cold Python, see :meth:`publish`). The
    arena is used as a ring: layers are staged and switched in order, so the regions in use are
    always one contiguous run (wrapping once)."""

    def __init__(self, job: RebalanceJob, comm: Comm, arena: torch.Tensor, entry) -> None:
        store = job.store
        self.job, self.comm, self.arena, self.entry = job, comm, arena, entry
        self.cv = threading.Condition()
        self.ready = 0
        self.switched = 0
        self.stop = False
        self.fault: StepReady | None = None
        self.fault_text = ""
        self.state = StepReady(0, 0, StepStatus.READY)
        self.prepared = None  # the new version's manifest, written once every layer is staged
        self.manifest_error = ""
        self.staged: dict[int, _Staged] = {}  # layer -> its region (staged, not yet switched)
        self.held = [0] * store.world_size  # every rank's staging held by unswitched staged layers
        self.peak = 0
        self.freed = None  # CUDA: an event after the last switch's use of the arena
        self.waiting = False  # the thread waits in cv for a switch (set and cleared with cv held)
        cuda = store.device.type == "cuda"
        # Priority 0 is CUDA's lowest: the engine's streams (default priority 0 or higher) go first.
        self.stream = torch.cuda.Stream(store.device, priority=0) if cuda else None
        self.thread = threading.Thread(target=self._run, name=f"expert-store-job-rank{store.rank}", daemon=True)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        job = self.job
        L = job.store.layout.num_layers
        layer = 0
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                if self.entry is not None:
                    self.stream.wait_event(self.entry)  # the engine's work queued before the job comes first
                for layer in range(L):
                    if job.plan.blocking[layer]:
                        # nothing staged: the step switching it runs its rounds in the arena, which
                        # must be empty then (every earlier layer switched) and stay so until it is done
                        if not self._wait_switched(layer):
                            return
                        if layer + 1 == L:
                            self._prepare_manifest()
                        with self.cv:
                            self.publish(ready=layer + 1)
                        if not self._wait_switched(layer + 1):
                            return
                        continue
                    start = self._reserve(layer)
                    if start is None:
                        return
                    fault = self._stage(layer, start)
                    if fault is None:
                        self._bind(layer)
                        if layer + 1 == L:
                            self._prepare_manifest()  # before the last layer is reported ready
                    with self.cv:
                        if fault is not None:
                            self.publish(fault=fault)
                            return
                        self.publish(ready=layer + 1)
        except BaseException as e:  # reported through the next step, never raised in this thread
            status, source = StepStatus.FAILED, _NONE
            if isinstance(e, PeerTimeoutError):
                status, source = StepStatus.PEER_LOST, getattr(e, "peer", _NONE)
            with self.cv:
                self.fault_text = self.fault_text or f"{type(e).__name__}: {e}"
                self.publish(fault=StepReady(0, layer, status, layer, -1, source))
        finally:
            with self.cv:
                if self.stop:  # the job ended while this thread still waited for a peer
                    self.comm.close()

    def publish(self, *, ready: int | None = None, fault: StepReady | None = None) -> None:
        """With ``cv`` held: layers 0..ready-1 staged, or staging failed; wakes the waiters. The
        row a step reports is made here, once per change, not in every step."""
        if fault is not None:
            self.fault = fault
        else:
            self.ready = ready
        self.state = self.fault if self.fault is not None else StepReady(0, self.ready, StepStatus.READY)
        self.cv.notify_all()

    def _bind(self, layer: int) -> None:
        """Bind ``layer``'s switch to its region now, off the stepping thread (what a step then
        does for the layer is one launch and one event record)."""
        with self.cv:
            st = self.staged[layer]
        sw = self.job.launches[layer][1]
        if sw >= 0:
            st.switch = self.job.copies.launcher(sw, self.arena[st.start : st.start + st.nbytes])
        if self.stream is not None and st.nbytes:
            st.freed = torch.cuda.Event()

    def _prepare_manifest(self) -> None:
        """Every layer staged: write and fsync the new version's manifest now (its bytes are known
        from the start), so that the step that switches the last layer only publishes it."""
        try:
            prepared = self.job.store.log.prepare(self.job._manifest("rebalance", switched=len(self.job.plan.plans)))
        except StoreError as e:
            self.manifest_error = str(e)
            return
        with self.cv:
            if self.stop:
                prepared.discard()
            else:
                self.prepared = prepared

    def _wait_switched(self, n: int) -> bool:
        """Wait until layers 0..n-1 are switched; False when the job stops first."""
        with self.cv:
            while not (self.stop or self.switched >= n):
                self._wait()
            return not self.stop

    def _wait(self) -> None:
        """Wait for a switch or the stop (``cv`` held); ``waiting`` tells the stepping thread to wake it."""
        self.waiting = True
        try:
            self.cv.wait()
        finally:
            self.waiting = False

    def _reserve(self, layer: int) -> int | None:
        """Wait until ``layer`` may be staged (the window of every rank, then a contiguous region
        of this rank's arena); returns the region's start, or None when the job stops."""
        need = self.job.plan.need[layer]
        mine = need[self.job.store.rank]
        with self.cv:
            while True:
                if self.stop:
                    return None
                fits = all(h + n <= self.job.call.staging_bytes for h, n in zip(self.held, need))
                if fits or not self.staged:  # an empty staging always takes one layer (plan_job checked it)
                    start = self._place(mine)
                    if start is not None:
                        self.held = [h + n for h, n in zip(self.held, need)]
                        self.staged[layer] = _Staged(start, mine)
                        self.peak = max(self.peak, sum(s.nbytes for s in self.staged.values()))
                        freed = self.freed
                        break
                self._wait()
        if freed is not None:
            self.stream.wait_event(freed)  # the region may have held a layer the engine's stream just unpacked
        return start

    def _place(self, nbytes: int) -> int | None:
        """Start of a free contiguous ``nbytes`` of the arena after the regions in use (FIFO ring)."""
        used = [s for s in self.staged.values() if s.nbytes]
        if not nbytes or not used:
            return 0  # the arena holds any one layer (plan_job checked it against staging_bytes)
        tail, head = used[0].start, used[-1].start + used[-1].nbytes
        if head > tail:  # in use: tail..head
            if head + nbytes <= self.arena.numel():
                return head
            return 0 if nbytes <= tail else None
        return head if head + nbytes <= tail else None  # in use: tail..end and 0..head

    def _stage(self, layer: int, start: int) -> StepReady | None:
        """Fill this rank's region for ``layer``; a StepReady naming a failure, or None."""
        job, store = self.job, self.job.store
        part = job.plan.parts[layer]
        io, rb, spec = part.io, store.spec.record_bytes, store.spec
        region = self.arena[start : start + part.buffer_records * rb]
        pack = job.launches[layer][0]
        if pack >= 0:
            job.copies.launch(pack, region)  # 1. from live slots (only read before the switch)
        # 2. the layer's exchange with its peers, while 3. the checkpoint is read
        sends, recvs = exchange_views(region, len(io.local), io.out, io.inc, rb)
        ex = self.comm.start_exchange(sends, recvs, seq=layer)
        failure = None
        if part.reads:
            targets = [(layer, d.expert, spec.record_views(region, io.n_total + i)) for i, d in enumerate(part.reads)]
            try:
                store.checkpoint.read_into(spec, targets, background=True)
            except StoreError as e:
                failure = StepReady(0, layer, StepStatus.FAILED, layer, part.reads[0].expert, _CHECKPOINT)
                self.fault_text = str(e)
        self.comm.finish_exchange(ex)
        if failure is not None:
            self.comm.sync_device(store.device, what=f"staging of layer {layer}")
            return failure
        if part.relay_out or part.relay_in:  # 3b. experts read here once, sent on to the others needing them
            if part.relay_out:
                at = {d.expert: io.n_total + i for i, d in enumerate(part.reads)}
                src = [at[x.expert] for v in part.relay_out.values() for x in v]
                rows = region.view(-1, rb)
                dst = torch.arange(part.first_relay, part.first_relay + len(src), device=region.device)
                rows.index_copy_(0, dst, rows.index_select(0, torch.tensor(src, device=region.device)))
            sends, recvs = exchange_views(region, part.first_relay, part.relay_out, part.relay_in, rb)
            self.comm.finish_exchange(self.comm.start_exchange(sends, recvs, seq=store.layout.num_layers + layer))
        self.comm.sync_device(store.device, what=f"staging of layer {layer}")
        # 4. what arrived, checked against the manifest before any slot is written
        if job.call.verify and part.n_records > io.n_pack:
            got = slab_checksums(region[io.n_pack * rb :], spec, part.n_records - io.n_pack).cpu()
            arrived = [(m.expert, q) for q, v in io.inc.items() for m in v]
            arrived += [(d.expert, _CHECKPOINT) for d in part.reads]
            arrived += [(x.expert, _CHECKPOINT) for v in part.relay_out.values() for x in v]  # copies of reads
            arrived += [(x.expert, q) for q, v in part.relay_in.items() for x in v]
            want = job._old.checksums[layer, [e for e, _ in arrived]]
            bad = (got != want).nonzero().flatten().tolist()
            if bad:
                e, src = arrived[bad[0]]
                return StepReady(0, layer, StepStatus.VERIFY_FAILED, layer, e, src)
        return None

    # ------------------------------------------------------------------ the stepping thread
    def switch(self, layer: int) -> None:
        """Switch ``layer`` on the current stream (its staging is complete): its bound unpack,
        then the event after which its region may be reused. Every live rank calls it for the
        layer at the same step; the thread does not touch the region again before that event."""
        st = self.staged.get(layer)  # a blocking layer has none; the thread adds entries, never removes them
        if st is None:
            return
        if st.switch is not None:
            st.switch()
        if st.freed is not None:
            st.freed.record()

    def release(self, layer: int) -> None:
        """``layer`` switched: its region (and its place in every rank's window) is free once the
        stepping thread's stream is past the switch (its ``freed`` event)."""
        freed = None
        if layer not in self.staged and self.stream is not None:
            freed = torch.cuda.Event()  # a layer switched by blocking rounds used the arena on this stream
            freed.record()
        with self.cv:
            st = self.staged.pop(layer, None)
            if st is not None:
                self.held = [h - n for h, n in zip(self.held, self.job.plan.need[layer])]
                freed = st.freed
            if freed is not None:
                self.freed = freed
            self.switched = layer + 1

    def wake(self) -> None:
        """Let the thread use the staging that switches freed: called at the end of a step, so that
        its Python work runs under the next forward pass, not while the step holds the GIL. Only a
        waiting thread is woken (``waiting`` is read without the lock: the thread sets it with
        ``cv`` held before it waits, and release() changed the state it waits on with ``cv`` held,
        so a thread that is not waiting now sees that state when it next checks)."""
        if self.waiting:
            with self.cv:
                self.cv.notify_all()

    def wait_progress(self, reported: int, timeout: float) -> None:
        """Block until more layers than ``reported`` are staged, staging failed or ``timeout`` passed."""
        with self.cv:
            self.cv.wait_for(lambda: self.ready > reported or self.fault is not None, timeout=timeout)

    def shutdown(self, timeout: float) -> bool:
        """Stop staging; True once the thread has ended (it ends within the comm's deadline)."""
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        if self.thread.ident is not None:
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.comm.close()
            return True
        return False


class RebalanceJob:
    """A rebalance in progress, made by :meth:`ExpertStore.start_rebalance`.

    Call :meth:`step` on every live rank between forward passes, on the thread that started the
    job, until :attr:`done`; or :meth:`wait` to finish it at once. ``store.placement`` is
    always the placement the slots hold, ``store.routing()`` its routing tables; every live rank
    switches the same layers at the same step. A failure ends the job with the switched
    layers committed (reason ``"rebalance-partial"``); the store stays usable."""

    def __init__(
        self, store: ExpertStore, call: _Call, plan: JobPlan, rows, *, transfers: Comm, phases, t_start: float
    ) -> None:
        self.store, self.call, self.plan = store, call, plan
        self._thread = threading.get_ident()
        self._created = rows[0].clock_ns / 1e9  # the leader's clock: every rank commits the same bytes
        self._nonces = b"".join(struct.pack("<q", a.nonce) for a in rows)
        self._old = store._manifest
        self._old_placement = store.placement
        self._placement, self._placement_at = self._old_placement, 0  # built for _placement_at switched layers
        self._switched = 0  # layers 0.._switched-1 hold the new placement
        self._steps = 0
        self._guard = store._call("RebalanceJob.step", during_job=True)  # entered at every step
        self.blocking_switched: list[int] = []  # layers switched by blocking rounds (staging too small)
        self._answered = 0  # steps whose table every rank got (the same count on every rank: manifests match)
        self._pending = None  # the previous step's readiness gather, in flight
        self._phases = {**phases, "steps": 0.0, "switch": 0.0}  # "steps": all of step(), "switch" within it
        self._t_start = t_start
        self._report: RebalanceReport | None = None
        self._error: str | None = None
        # per layer, the store's routing rows and the new placement's on the device: a switch
        # copies the second into the first (made once routing() has been called)
        self._routes = None if store._routing is None else self._route_pairs()
        entry = None
        if store.device.type == "cuda":
            entry = torch.cuda.Event()
            entry.record()
        arena = store._arena(call.staging_bytes)
        if arena is None:  # the staging the layers need at most, or all of it for blocking rounds
            total = sum(n[store.rank] for n, big in zip(plan.need, plan.blocking) if not big)
            size = call.staging_bytes if any(plan.blocking) else min(call.staging_bytes, total)
            arena = allocate_staging(size, store.device, store.rank)
        # Every layer's copies validated and on the device at once (one pinned buffer, one copy):
        # launches[layer] = (its pack entry, its switch's unpack entry; -1: none).
        entries: list = []
        self.launches: list[tuple[int, int]] = []
        for layer, part in enumerate(plan.parts):
            mine, packs = _layer_entries(part, layer)
            at = len(entries)
            self.launches.append((at if packs else -1, at + packs if len(mine) > packs else -1))
            entries += mine
        self.copies = PreparedCopies(store.slabs, store.layout, entries)
        if len(arena):
            self.copies.compile(arena)  # not at the first switch, between two forward passes
        if self._routes is not None:  # the copy kernel loaded now, for the same reason
            torch._foreach_copy_([t.clone() for t in self._routes[0][0]], self._routes[0][0])
        transfers.begin(call_id(b"rebalance-job-transfers", self._nonces))
        self._stager = _Stager(self, transfers, arena, entry)
        _RUNNING.add(self._stager)
        self._stager.thread.start()

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """True once every layer has switched and the new version is committed."""
        return self._report is not None

    @property
    def failed(self) -> str | None:
        """Why the job ended before it was done (None: it did not)."""
        return self._error

    @property
    def switched_layers(self) -> int:
        """Layers 0..n-1 hold the new placement."""
        return self._switched

    @property
    def report(self) -> RebalanceReport | None:
        """The RebalanceReport once :attr:`done`."""
        return self._report

    @property
    def placement(self) -> Placement:
        """The placement the slots hold now (the new one in switched layers, the old one in the others)."""
        n = self._switched
        if self._placement_at != n:  # built here, not at each switch: a step only counts the layer
            new = self.call.new
            if n == new.num_layers:
                self._placement = new
            else:
                phy2log = torch.cat([new.phy2log[:n], self._old_placement.phy2log[n:]])
                self._placement = Placement(phy2log, num_ranks=self.store.world_size, num_experts=new.num_experts)
            self._placement_at = n
        return self._placement

    # ------------------------------------------------------------------ steps
    def step(self) -> list[int]:
        """Switch the layers every live rank had ready at the previous step (up to
        ``layers_per_step``, in order) and report this rank's readiness for the next. Returns the
        layers switched (empty once done). Collective over the live ranks, once per forward pass;
        it waits for peers only for the previous step's answer, which arrives while the forward
        pass runs. Raises PeerTimeoutError when a peer does not answer within the store's
        ``timeout_s``, IntegrityError when a staged record does not match its checksum (on every
        rank, naming the rank that got it), after committing the layers switched before (see the
        class)."""
        with self._guard:
            if self._error is not None or threading.get_ident() != self._thread:
                self._check_open()  # raises
            if self._report is not None:
                return []
            return self._step()

    def wait(self) -> RebalanceReport:
        """Step until done; returns the RebalanceReport (as :meth:`ExpertStore.rebalance` does)."""
        while not self.done:
            self._stager.wait_progress(self._stager.switched, timeout=0.05)
            self.step()
        return self._report

    def _check_open(self) -> None:
        store = self.store
        if self._error is not None:
            raise StoreError(f"rank {store.rank}: this rebalance job has ended: {self._error}")
        if threading.get_ident() != self._thread:
            raise StoreError(f"rank {store.rank}: a rebalance job is stepped on the thread that started it")

    def _step(self) -> list[int]:
        store, call = self.store, self.call
        L = store.layout.num_layers
        switched: list[int] = []
        t0 = time.perf_counter()
        if self._pending is not None:
            rows = self._answer()
            upto, bad = L, None  # one pass over the table (a step runs cache-cold: every line costs)
            for r, a in zip(call.live, rows):
                if a.status != StepStatus.READY:
                    bad = [*(bad or ()), (r, a)]
                    upto = min(upto, a.layer)
                upto = min(upto, a.ready)
            if self._switched < upto:
                t1 = time.perf_counter()
                try:
                    budget, idle = call.job_layers, self.plan.idle
                    while self._switched < upto and (budget > 0 or idle[self._switched]):
                        budget -= not idle[self._switched]
                        switched.append(self._switched)
                        self._switch(self._switched)
                except BaseException as e:
                    store._broken = f"rebalance job failed while switching layer {self._switched}: {e}"
                    self._error = store._broken
                    self._release()
                    raise
                self._phases["switch"] += time.perf_counter() - t1
            if bad:
                error = self._failure(bad)
                self._end(error)
                raise error
            if self._switched == L:
                self._finish()
                return switched
        mine = self._stager.state  # one attribute read, no lock (see _Stager)
        if len(call.live) == 1:
            self._pending = [mine]  # nobody to agree with: the table is this rank's row (its step unread)
        else:
            mine = mine._replace(step=self._steps)
            comm = store._comm
            comm.begin(call_id(b"rebalance-job", self._nonces, struct.pack("<q", self._steps)))
            try:
                self._pending = comm.start_gather(call.live, mine.encode(), kind=Kind.STEP,
                                                  what=f"rebalance job step {self._steps}")  # fmt: skip
            except StoreError as e:
                self._end(e)
                raise
        self._steps += 1
        if switched:
            self._stager.wake()
        self._phases["steps"] += time.perf_counter() - t0  # inside step(), switches included
        return switched

    def _answer(self) -> list[StepReady]:
        """The table of the previous step's gather (every live rank's readiness)."""
        store, step = self.store, self._steps - 1
        gather, self._pending = self._pending, None
        if isinstance(gather, list):
            self._answered += 1
            return gather
        try:
            try:
                rows = [StepReady.decode(row) for row in gather.result().tolist()]
            except ValueError as e:
                raise AgreementError(f"rank {store.rank}: rebalance job step {step}: {e}") from None
            other = [r for r, a in zip(self.call.live, rows) if a.step != step]
            if other:
                raise AgreementError(
                    f"rank {store.rank}: ranks {other} are at other steps of the rebalance job than step {step}"
                )
            self._answered += 1
        except StoreError as e:
            self._end(e)
            raise
        except BaseException as e:  # nothing of this step touched a slot: the switched layers stand
            error = StoreError(f"rank {store.rank}: rebalance job step {step} failed: {e!r}")
            self._end(error)
            raise error from e
        return rows

    # ------------------------------------------------------------------ switching
    def _switch(self, layer: int) -> None:
        """Unpack ``layer``'s staged records into its slots, run its post copies, and make the store's
        placement and routing say so (on the current stream: nothing here waits for the device)."""
        if self.plan.blocking[layer]:
            self._switch_blocking(layer)
        else:
            self._stager.switch(layer)
        self._stager.release(layer)
        self._switched = layer + 1
        routes = self._routes
        if routes is None and self.store._routing is not None:
            routes = self._routes = self._route_pairs()
        if routes is not None:
            torch._foreach_copy_(*routes[layer])  # log2phy and logcnt rows: one call (one launch on CUDA)

    def _route_pairs(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per layer ([its rows of the store's log2phy, logcnt], [the new placement's]), on the device."""
        live, new = self.store._routing, self.store._routing_rows(self.call.new)
        return [([live[0][la], live[1][la]], [new[0][la], new[1][la]]) for la in range(len(new[1]))]

    def _switch_blocking(self, layer: int) -> None:
        """Switch a layer whose staging does not fit by the rounds of a blocking rebalance of that
        layer alone (within ``staging_bytes``, in the job's arena, which is empty now), its arrived
        records verified, and every live rank's outcome agreed. Every live rank runs it at the same
        step. A failure ends the job (the layers before it committed) and leaves the store to
        reopen: this layer's slots may be partly written."""

        store, call = self.store, self.call
        rb, plan = store.spec.record_bytes, self.plan.plans[layer]
        budget = round_budget(staging_bytes=call.staging_bytes, round_bytes=call.round_bytes, record_bytes=rb)
        rounds = schedule_rounds(plan, record_bytes=rb, budget_bytes=budget)
        arena = self._stager.arena if self._stager.arena.numel() >= call.staging_bytes else None
        store._comm.begin(call_id(b"rebalance-job-layer", self._nonces, struct.pack("<q", layer)))
        entry = None  # checkpoint reads from the run's thread wait for the work queued before the step
        if store.device.type == "cuda":
            entry = torch.cuda.Event()
            entry.record()
        outcome, problem = Outcome.DONE, None
        try:
            run = RebalanceRun(
                iter([(plan, rounds, call.staging_bytes)]), rank=store.rank, slabs=store.slabs, comm=store._comm,
                checkpoint=store.checkpoint, staging_bytes=call.staging_bytes, arena=arena, entry=entry,
                round_bytes=call.round_bytes,
            )  # fmt: skip
            run.run(self._phases, while_in_flight=lambda: None)
            self._stager.peak = max(self._stager.peak, run.stats.staging_peak)
            if call.verify:
                try:
                    run.verify(self._old.checksums, call.new.rank_experts(store.rank), self._old.version + 1)
                except IntegrityError as e:
                    outcome, problem = Outcome.VERIFY_FAILED, e
            table = store._comm.start_gather(call.live, Completion(outcome).encode(), kind=Kind.COMPLETION,
                                             what=f"rebalance job, blocking layer {layer}").result()  # fmt: skip
            bad = [r for r, row in zip(call.live, table.tolist()) if row[0] != int(Outcome.DONE)]
            if bad:
                raise problem or IntegrityError(
                    f"rank {store.rank}: rebalance job: layer {layer} (switched by blocking rounds) failed "
                    f"verification on ranks {bad}"
                )
        except StoreError as e:
            self._end(e)
            store._broken = f"rebalance job: layer {layer} was partly written by blocking rounds that failed ({e})"
            raise
        self.blocking_switched.append(layer)

    # ------------------------------------------------------------------ ending
    def _failure(self, bad) -> StoreError:
        store = self.store
        r, a = bad[0]
        names = {_CHECKPOINT: f"the checkpoint {store.checkpoint.path}", _NONE: "no source"}
        src = names.get(a.source, f"rank {a.source}")
        kept = f"layers 0..{self._switched - 1} switched and committed" if self._switched else "no layer switched"
        if a.status == StepStatus.VERIFY_FAILED:
            where = "this rank" if r == store.rank else f"rank {r}"
            return IntegrityError(
                f"rank {store.rank}: rebalance job: {where} staged layer {a.layer} expert {a.expert} from {src} with "
                f"a checksum other than version {self._old.version}'s; nothing of layer {a.layer} was switched ({kept})"
            )
        detail = self._stager.fault_text if r == store.rank else ""
        if a.status == StepStatus.PEER_LOST:
            src = "a peer" if a.source == _NONE else src
            return PeerTimeoutError(
                f"rank {store.rank}: rebalance job: rank {r} lost {src} while staging layer {a.layer}"
                + (f" ({detail})" if detail else "")
                + f"; {kept}"
            )
        return StoreError(
            f"rank {store.rank}: rebalance job: rank {r} could not stage layer {a.layer} (expert {a.expert} from {src})"
            + (f": {detail}" if detail else "")
            + f"; {kept}"
        )

    def _release(self) -> None:
        """Stop the staging thread and close the job. A thread still waiting for a dead peer ends
        at its deadline; the arena stays with it (the store's reserved staging is dropped then)."""
        store = self.store
        if not self._stager.shutdown(timeout=0.5):
            store._staging = None  # the thread may still receive into it
        if self._stager.prepared is not None:  # the job failed after its manifest was written
            self._stager.prepared.discard()
            self._stager.prepared = None
        if store._job is self:
            store._job = None

    def _end(self, error: StoreError) -> None:
        """The job failed: commit the switched layers (reason "rebalance-partial") and close it."""
        store = self.store
        self._error = f"{type(error).__name__}: {error}"
        self._pending = None
        self._release()
        if not self._switched:
            return  # the slots still hold the committed version
        try:
            m = self._manifest("rebalance-partial")
            store.log.commit(m)
            store._adopt(m, self.placement)
            if self.call.fresh:
                store._empty = store.rank in self.call.fresh
        except StoreError as e:
            store._broken = f"rebalance job failed ({error}) and its partial version could not be committed: {e}"
            self._error = store._broken

    def _manifest(self, reason: str, *, switched: int | None = None):
        """The manifest of what the slots hold once ``switched`` layers (default: those switched now)
        moved. In a partial version the fresh ranks count as not alive (their unswitched layers hold
        nothing). Every live rank makes the same bytes: nothing in it depends on timing."""
        store, call = self.store, self.call
        n = self._switched if switched is None else switched
        plan = merge_plans(self.plan.plans[:n]) if n < len(self.plan.plans) else self.plan.merged
        if n < len(self.plan.plans) and call.fresh:
            call = call._replace(alive=tuple(a and r not in call.fresh for r, a in enumerate(call.alive)))
        return store._next_manifest(
            call, plan, n, self._created, self._old.version + 1,
            placement=self.placement if switched is None else call.new,
            reason=reason, extra={"layers_switched": n, "layers_per_step": call.job_layers,
                                  "layers_blocking": sum(self.plan.blocking[:n])},
        )  # fmt: skip

    def _finish(self) -> None:
        """Every layer switched: agree on the outcome and commit the new version."""
        from .store import RebalanceReport

        store, call = self.store, self.call
        t0 = time.perf_counter()
        prepared, problem = self._stager.prepared, self._stager.manifest_error
        self._stager.prepared = None  # this step publishes or discards it
        outcome = Outcome.DONE if prepared is not None else Outcome.MANIFEST_FAILED
        store._comm.begin(call_id(b"rebalance-job-completion", self._nonces))
        try:
            table = store._comm.start_gather(call.live, Completion(outcome).encode(), kind=Kind.COMPLETION,
                                             what="rebalance job completion").result()  # fmt: skip
            outcomes = [Completion.decode(row).outcome for row in table]
        except (StoreError, ValueError) as e:
            if prepared is not None:
                prepared.discard()
            error = e if isinstance(e, StoreError) else AgreementError(f"rank {store.rank}: {e}")
            self._end(error)
            raise error from None
        bad = [r for r, o in zip(call.live, outcomes) if o != Outcome.DONE]
        if bad:
            if prepared is not None:
                prepared.discard()
            store._broken = (
                f"rebalance job to version {self._old.version + 1}: the manifest could not be written on ranks {bad}"
            )
            self._error = store._broken
            self._release()
            raise ManifestError(f"rank {store.rank}: {store._broken}" + (f" ({problem})" if problem else ""))
        try:
            prepared.publish()
        except BaseException:
            store._broken = f"rebalance job: commit under {store.root} failed"
            self._error = store._broken
            self._release()
            raise
        staging_peak = self._stager.peak
        self._release()
        store._adopt(prepared.manifest, call.new)
        store._empty = False
        if store._keep_versions is not None:
            store.log.prune(keep=store._keep_versions)
        self._phases["commit"] = time.perf_counter() - t0
        acct = self.plan.merged.accounts[store.rank]
        self._report = RebalanceReport(
            version=self._old.version + 1,
            bytes_p2p=acct.bytes_p2p,
            bytes_local=acct.bytes_local,
            bytes_disk=acct.bytes_disk,
            missing={k: list(v) for k, v in sorted(acct.missing.items())},
            seconds=time.perf_counter() - self._t_start,
            phase_seconds=self._phases,
            staging_peak=staging_peak,
            rounds=store.layout.num_layers,  # one exchange per layer
            verified=call.verify,
        )

"""A rebalance that moves layer by layer between forward passes (``ExpertStore.start_rebalance``).

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S.

The job is planned and agreed like a blocking rebalance (one plan per layer, planned in
layer order with one shared load, so the moves and the accounting are those of
``rebalance``). Then each :meth:`RebalanceJob.step`, on every live rank:

1. *stages* the next layers (at most ``layers_per_step`` ahead of the last switched one, and
   only while every live rank's staging of them fits ``staging_bytes``: the window is computed
   from the plan, the same on every rank, so the ranks exchange the same layers). Staging a
   layer fills this rank's buffer for it, uint8 [n * record_bytes]::

       [ local moves | records sent to peer q (ascending q) | records received from q | checkpoint reads ]

   packed from the live slots (only read), exchanged with the peers (one exchange per layer),
   read from the checkpoint; the records that arrived (from peers and the checkpoint) are
   checked against the manifest's checksums there, before any slot is written;
2. *agrees* with the live ranks (a small gather through the lowest live rank, never a
   collective of the whole group) on how many layers every rank has ready, and on failures;
3. *switches* the agreed layers: one unpack of the staged records into the layer's slots, then
   the layer's local post copies; ``store.placement`` and ``store.routing()`` follow.

Staging is done synchronously inside ``step()`` (no background thread): a step costs the
transfer of the layers it stages. A failure (a peer that does not answer within the store's
``timeout_s``, a corrupt record, a failed checkpoint read) ends the job: the layers switched
so far are committed as a version with reason ``"rebalance-partial"`` (none switched: nothing
is committed, the version stays), the other layers keep the old placement, and the store
stays usable. When the last layer switches, the version is committed with reason
``"rebalance"``, as :meth:`ExpertStore.rebalance` commits it.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING

import torch

from expert_store.kernels import pack_records, slab_checksums, unpack_records

from .comm import Kind, call_id
from .errors import AgreementError, IntegrityError, ManifestError, StoreError
from .execute import allocate_staging, copy_slots, exchange_views
from .messages import Completion, Outcome, StepReady, StepStatus
from .placement import Placement
from .plan import Move, RebalancePlan, merge_plans, plan_rebalance

if TYPE_CHECKING:
    from .store import ExpertStore, RebalanceReport, _Call

__all__ = ["RebalanceJob", "plan_job"]

_CHECKPOINT = -1  # StepReady.source of a checkpoint read
_NONE = -2


class _LayerPart:
    """This rank's records of one layer, in staging order."""

    def __init__(self, plan: RebalancePlan, rank: int) -> None:
        out: dict[int, list[Move]] = {}
        inc: dict[int, list[Move]] = {}
        self.local: list[Move] = []
        for m in plan.moves:
            if m.src_park >= 0:
                raise StoreError(f"rank {rank}: layer {m.layer}: a job's plan has no parked records")
            if m.is_local:
                if m.src_rank == rank:
                    self.local.append(m)
            elif m.src_rank == rank:
                out.setdefault(m.dst_rank, []).append(m)
            elif m.dst_rank == rank:
                inc.setdefault(m.src_rank, []).append(m)
        self.out = dict(sorted(out.items()))
        self.inc = dict(sorted(inc.items()))
        self.reads = [d for d in plan.disk_reads if d.rank == rank]
        self.posts = [c for c in plan.post_copies if c.rank == rank]
        self.n_pack = len(self.local) + sum(len(v) for v in self.out.values())
        self.n_in = sum(len(v) for v in self.inc.values())
        self.n_records = self.n_pack + self.n_in + len(self.reads)
        # post copies go through the layer's buffer once it is unpacked: at least one record
        self.buffer_records = max(self.n_records, 1 if self.posts else 0)


def _records_per_rank(plan: RebalancePlan, R: int) -> list[int]:
    """Records of the layer's staging buffer on each rank (see :class:`_LayerPart`)."""
    n = [0] * R
    for m in plan.moves:
        n[m.src_rank] += 1
        if not m.is_local:
            n[m.dst_rank] += 1
    for d in plan.disk_reads:
        n[d.rank] += 1
    for c in plan.post_copies:
        n[c.rank] = max(n[c.rank], 1)
    return n


class JobPlan:
    """Every layer's plan, this rank's part of each and every rank's staging need per layer."""

    def __init__(self, plans: list[RebalancePlan], rank: int, R: int, record_bytes: int) -> None:
        self.plans = plans
        self.parts = [_LayerPart(p, rank) for p in plans]
        self.need = [[n * record_bytes for n in _records_per_rank(p, R)] for p in plans]  # [L][R] bytes
        self.merged = merge_plans(plans)


def plan_job(store: ExpertStore, call: _Call) -> JobPlan | StoreError:
    """Plan every layer (in order, one shared load: the moves of ``plan_rebalance`` of all layers)
    and check that each layer's staging fits ``call.staging_bytes`` on this rank. Returns the
    StoreError instead of raising it (it is shared through the agreement)."""
    old = store.placement
    load = [0] * old.num_ranks
    try:
        plans = []
        for layer in range(old.num_layers):
            kw = dict(old_alive=store._manifest.alive, alive=call.alive, ranks_per_node=store.ranks_per_node)
            plans.append(plan_rebalance(old, call.new, expert_bytes=store.spec.nbytes, layers=[layer], load=load, **kw))
        jp = JobPlan(plans, store.rank, old.num_ranks, store.spec.record_bytes)
    except StoreError as e:
        return e
    for layer, need in enumerate(jp.need):
        if need[store.rank] > call.staging_bytes:
            return StoreError(
                f"rank {store.rank}: layer {layer} needs {need[store.rank]} bytes of staging "
                f"({need[store.rank] // store.spec.record_bytes} records), more than staging_bytes="
                f"{call.staging_bytes}; a job stages whole layers: raise staging_bytes or use rebalance"
            )
    return jp


class RebalanceJob:
    """A rebalance in progress, made by :meth:`ExpertStore.start_rebalance`.

    Call :meth:`step` on every live rank between forward passes, on the thread that started the
    job, until :attr:`done`; or :meth:`wait` to finish it at once. ``store.placement`` is
    always the placement the slots hold, ``store.routing()`` its routing tables; every live rank
    switches the same layers at the same step. A failure ends the job with the switched
    layers committed (reason ``"rebalance-partial"``); the store stays usable."""

    def __init__(self, store: ExpertStore, call: _Call, plan: JobPlan, rows, *, phases, t_start: float) -> None:
        self.store, self.call, self.plan = store, call, plan
        self._thread = threading.get_ident()
        self._created = rows[0].clock_ns / 1e9  # the leader's clock: every rank commits the same bytes
        self._nonces = b"".join(struct.pack("<q", a.nonce) for a in rows)
        self._old = store._manifest
        self._phy2log = store.placement.phy2log  # int64 [L, P]: what the slots hold, layer by layer
        self._new_rows = call.new.phy2log
        self._staged: dict[int, torch.Tensor | None] = {}  # layer -> its staging buffer (None: empty)
        self._staged_bytes = [0] * store.world_size  # every rank's staging held now (from the plan)
        self._switched = 0  # layers 0.._switched-1 hold the new placement
        self._steps = 0
        self._phases = dict(phases)
        self._t_start = t_start
        self._staging_peak = 0
        self._report: RebalanceReport | None = None
        self._error: str | None = None

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

    # ------------------------------------------------------------------ steps
    def step(self) -> list[int]:
        """Stage the next layers, agree with the live ranks on the layers every rank has ready and
        switch up to ``layers_per_step`` of them, in order. Returns the layers switched (empty once
        done). Collective over the live ranks. Raises PeerTimeoutError when a peer does not answer
        within the store's ``timeout_s``, IntegrityError when a staged record does not match its
        checksum (on the rank that got it; its peers raise IntegrityError naming that rank), after
        committing the layers switched before (see the class)."""
        store = self.store
        with store._call("RebalanceJob.step", during_job=True):
            self._check_open()
            if self.done:
                return []
            return self._step()

    def wait(self) -> RebalanceReport:
        """Step until done; returns the RebalanceReport (as :meth:`ExpertStore.rebalance` does)."""
        while not self.done:
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
        comm = store._comm
        comm.begin(call_id(b"rebalance-job", self._nonces, struct.pack("<q", self._steps)))
        t0 = time.perf_counter()
        try:
            mine = self._stage_window()
            self._phases["stage"] = self._phases.get("stage", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            what = f"rebalance job step {self._steps}"
            table = comm.start_gather(call.live, mine.encode(), kind=Kind.STEP, what=what)
            try:
                rows = [StepReady.decode(row) for row in table.result()]
            except ValueError as e:
                raise AgreementError(f"rank {store.rank}: rebalance job step {self._steps}: {e}") from None
            self._phases["agree"] = self._phases.get("agree", 0.0) + time.perf_counter() - t0
            other = [r for r, a in zip(call.live, rows) if a.step != self._steps]
            if other:
                raise AgreementError(
                    f"rank {store.rank}: ranks {other} are at other steps of the rebalance job than step {self._steps}"
                )
        except StoreError as e:
            self._end(e)
            raise
        except BaseException as e:  # nothing of this step touched a slot: the switched layers stand
            self._end(StoreError(f"rank {store.rank}: rebalance job step {self._steps} failed: {e!r}"))
            raise
        self._steps += 1
        bad = [(r, a) for r, a in zip(call.live, rows) if a.status != StepStatus.READY]
        upto = min(min(a.ready for a in rows), self._switched + call.job_layers, L)
        if bad:
            upto = min(upto, min(a.layer for _, a in bad))
        switched = list(range(self._switched, upto))
        t0 = time.perf_counter()
        try:
            for layer in switched:
                self._switch(layer)
        except BaseException as e:
            store._broken = f"rebalance job failed while switching layer {self._switched}: {e}"
            self._error = store._broken
            self._release()
            raise
        self._phases["switch"] = self._phases.get("switch", 0.0) + time.perf_counter() - t0
        if bad:
            self._end(self._failure(bad))
            raise self._failure(bad)
        if self._switched == L:
            self._finish()
        return switched

    # ------------------------------------------------------------------ staging
    def _stage_window(self) -> StepReady:
        """Stage layers up to ``layers_per_step`` past the switched ones while every rank's staging
        fits; returns this rank's StepReady."""
        store, call, plan = self.store, self.call, self.plan
        L = store.layout.num_layers
        nxt = self._switched + len(self._staged)
        while nxt < min(L, self._switched + call.job_layers):
            need = plan.need[nxt]
            fits = all(h + n <= call.staging_bytes for h, n in zip(self._staged_bytes, need))
            if self._staged and not fits:  # an empty staging always takes one layer (plan_job checked it)
                break
            failure = self._stage(nxt)
            self._staged_bytes = [h + n for h, n in zip(self._staged_bytes, need)]
            self._staging_peak = max(self._staging_peak, self._staged_bytes[store.rank])
            if failure is not None:
                return failure
            nxt += 1
        return StepReady(self._steps, nxt, StepStatus.READY)

    def _stage(self, layer: int) -> StepReady | None:
        """Fill this rank's staging of ``layer``; a StepReady naming the failure, or None."""
        store = self.store
        part = self.plan.parts[layer]
        slabs, spec, rb = store.slabs, store.spec, store.spec.record_bytes
        if not part.buffer_records:
            self._staged[layer] = None
            return None
        buf = allocate_staging(part.buffer_records * rb, store.device, store.rank)
        self._staged[layer] = buf
        # 1. the records this rank packs, from live slots (only read before the switch)
        packed = part.local + [m for v in part.out.values() for m in v]
        if packed:
            pack_records(slabs, store.layout, [layer] * len(packed), [m.src_slot for m in packed], out=buf)
        # 2. the layer's exchange with its peers
        sends, recvs = exchange_views(buf, len(part.local), part.out, part.inc, rb)
        ex = store._comm.start_exchange(sends, recvs, seq=layer)
        # 3. checkpoint reads while the records travel
        failure = None
        if part.reads:
            first = part.n_pack + part.n_in
            targets = [(layer, d.expert, self._record(buf, first + i)) for i, d in enumerate(part.reads)]
            try:
                store.checkpoint.read_into(spec, targets)
            except StoreError as e:
                failure = StepReady(self._steps, layer, StepStatus.FAILED, layer, part.reads[0].expert, _CHECKPOINT)
                self._read_error = str(e)
        store._comm.finish_exchange(ex)
        store._comm.sync_device(store.device, what=f"staging of layer {layer}")
        if failure is not None:
            return failure
        # 4. what arrived, checked against the manifest before any slot is written
        n = part.n_in + len(part.reads)
        if self.call.verify and n:
            got = slab_checksums(buf[part.n_pack * rb :], spec, n).cpu()
            arrived = [(m.expert, m.src_rank) for v in part.inc.values() for m in v]
            arrived += [(d.expert, _CHECKPOINT) for d in part.reads]
            want = self._old.checksums[layer, [e for e, _ in arrived]]
            bad = (got != want).nonzero().flatten().tolist()
            if bad:
                e, src = arrived[bad[0]]
                return StepReady(self._steps, layer, StepStatus.VERIFY_FAILED, layer, e, src)
        return None

    def _record(self, buf: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
        """{spec name: view} of record ``i`` of ``buf`` (what a checkpoint read fills)."""
        spec, base = self.store.spec, i * self.store.spec.record_bytes
        views = {}
        for t, off in zip(spec.tensors, spec.record_offsets):
            views[t.name] = buf[base + off : base + off + t.nbytes].view(t.dtype).view(t.shape)
        return views

    # ------------------------------------------------------------------ switching
    def _switch(self, layer: int) -> None:
        """Unpack ``layer``'s staged records into its slots, run its post copies, and make the store's
        placement and routing say so."""
        store = self.store
        part = self.plan.parts[layer]
        buf = self._staged.pop(layer)
        slabs = store.slabs
        inc = [m for v in part.inc.values() for m in v]
        dst = [m.dst_slot for m in part.local] + [m.dst_slot for m in inc] + [d.slot for d in part.reads]
        pos = list(range(len(part.local))) + list(range(part.n_pack, part.n_records))
        if dst:
            unpack_records(buf, slabs, store.layout, [layer] * len(dst), dst, records=pos)
        if part.posts:
            copy_slots(
                slabs, [layer] * len(part.posts), [c.src_slot for c in part.posts], [c.dst_slot for c in part.posts],
                budget=buf.numel(), scratch=buf,
            )  # fmt: skip
        self._staged_bytes = [h - n for h, n in zip(self._staged_bytes, self.plan.need[layer])]
        self._phy2log[layer] = self._new_rows[layer]
        self._switched = layer + 1
        if self._switched == store.layout.num_layers:
            store._placement = self.call.new
        else:
            store._placement = Placement(self._phy2log.clone(), num_ranks=store.world_size,
                                         num_experts=self.call.new.num_experts)  # fmt: skip
        store._refresh_routing([layer])

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
        detail = getattr(self, "_read_error", "") if r == store.rank else ""
        return StoreError(
            f"rank {store.rank}: rebalance job: rank {r} could not stage layer {a.layer} (expert {a.expert} from {src})"
            + (f": {detail}" if detail else "")
            + f"; {kept}"
        )

    def _release(self) -> None:
        self._staged.clear()
        self._staged_bytes = [0] * self.store.world_size
        if self.store._job is self:
            self.store._job = None

    def _end(self, error: StoreError) -> None:
        """The job failed: commit the switched layers (reason "rebalance-partial") and close it."""
        store = self.store
        self._error = f"{type(error).__name__}: {error}"
        self._release()
        if not self._switched:
            return  # the slots still hold the committed version
        try:
            m = self._manifest("rebalance-partial")
            store.log.commit(m)
            store._adopt(m, store._placement)
        except StoreError as e:
            store._broken = f"rebalance job failed ({error}) and its partial version could not be committed: {e}"
            self._error = store._broken

    def _manifest(self, reason: str):
        store = self.store
        n = self._switched
        plan = merge_plans(self.plan.plans[:n]) if n else self.plan.merged
        return store._next_manifest(
            self.call, plan, self._steps, self._created, self._old.version + 1, placement=store._placement,
            reason=reason, extra={"layers_switched": n, "layers_per_step": self.call.job_layers},
        )  # fmt: skip

    def _finish(self) -> None:
        """Every layer switched: agree on the outcome and commit the new version."""
        from .store import RebalanceReport

        store, call = self.store, self.call
        t0 = time.perf_counter()
        prepared, problem = None, ""
        try:
            prepared = store.log.prepare(self._manifest("rebalance"))
            outcome = Outcome.DONE
        except StoreError as e:
            outcome, problem = Outcome.MANIFEST_FAILED, str(e)
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
        store._adopt(prepared.manifest, call.new)
        if store._keep_versions is not None:
            store.log.prune(keep=store._keep_versions)
        self._release()
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
            staging_peak=self._staging_peak,
            rounds=self._steps,
            verified=call.verify,
        )

"""Point-to-point messaging among the *live* ranks only.

The store never calls a collective of the whole process group: a dead rank
would never enter it and the survivors would hang. Everything here is built
from point-to-point operations between live ranks (torch.distributed P2P on
NCCL or gloo, the same code path), and every host-side wait has a deadline.

**Every message names its call.** A message is preceded by (or, for small
rows, starts with) a header of :data:`HEADER_WORDS` int64 words: a magic word,
the call it belongs to, its kind, its sequence number in the call, its length
and its sender. On gloo each (call, kind, sequence) also gets its own tag, so a
message left over from an earlier, failed call is never matched with a receive
of this one (gloo aborts the process when sizes differ). A header that does not
match what the receiver expects raises :class:`AgreementError` naming the rank
that sent it; NCCL has no tags, so there the header is the check.

**No raw transport errors.** A failed or closed peer raises
:class:`PeerTimeoutError` naming that peer and the time waited. Waits on several
peers run concurrently on gloo, so the rank named is the first that failed, not
a survivor whose connection closed later. After such an error the process group
may be unusable (gloo closes a failed pair for good, and messages of the failed
call may still be in flight): build a new group and reopen the store.

Ranks are the store's ranks (0..R-1, the group's ranks); they are mapped to
global ranks for torch.distributed calls.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import struct
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum

import torch

from .errors import AgreementError, PeerTimeoutError, StoreError
from .messages import new_nonce

__all__ = ["DEFAULT_TIMEOUT_S", "HEADER_WORDS", "Comm", "Kind"]

# 300 s: long enough for a first NCCL connection between two ranks on a loaded
# machine, short enough that a lost peer is reported within minutes.
DEFAULT_TIMEOUT_S = 300.0
HEADER_WORDS = 6  # magic, call, kind, seq, payload bytes, sender
_MAGIC = 0x6573_7374_6F72_6531  # "esstore1"
# A blob (a manifest sent to a fresh rank) larger than this is a corrupt header, not a manifest.
_MAX_BLOB_BYTES = 1 << 32
RECOVERY = "the process group may be unusable now: build a new one and reopen the store (ExpertStore.open or join)"


class Kind(IntEnum):
    """What a message is; part of its header and of its gloo tag."""

    AGREEMENT = 1
    TABLE = 2  # the leader's broadcast of a gather
    CHECKSUMS = 3
    COMPLETION = 4
    BLOB = 5
    SLAB = 6
    STEP = 7  # a rebalance job's per-step readiness


def call_id(*parts: bytes) -> int:
    """A non-negative int63 naming a call (a digest of ``parts``)."""
    return int.from_bytes(hashlib.blake2b(b"\0".join(parts), digest_size=8).digest(), "little") >> 1


def _tag(call: int, kind: int, seq: int, part: int) -> int:
    """gloo tag of one message: non-negative int31, one per (call, kind, seq, part)."""
    h = hashlib.blake2b(struct.pack("<qqqq", call, kind, seq, part), digest_size=4).digest()
    return int.from_bytes(h, "little") >> 1


@dataclass
class Exchange:
    """Transfers of one round in flight (see :meth:`Comm.start_exchange`)."""

    works: list = field(default_factory=list)  # (work, peer): slabs, headers sent
    header_works: list = field(default_factory=list)  # (work, peer): headers received
    headers: list = field(default_factory=list)  # (received header, peer, expected payload bytes)
    copy_back: list = field(default_factory=list)  # (host buffer, device destination): gloo with device slabs
    seq: int = 0
    sent_headers: torch.Tensor | None = None


class Comm:
    """Messaging of one rank with its live peers.

    Args:
        group: a torch.distributed process group (None = the default group), or
            ignored when ``world_size == 1``.
        rank, world_size: this rank and R, as the store numbers them.
        device: the store's device; NCCL needs transport tensors on the GPU.
        timeout_s: deadline of each host-side wait.
    """

    def __init__(
        self, group, *, rank: int, world_size: int, device: torch.device, timeout_s: float, background: bool = False
    ) -> None:
        """``background``: the messaging of a thread beside the engine's (a rebalance job's staging):
        device waits poll every 200 us instead of spinning, so that the engine's thread gets the GIL."""
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._poll_s = 2e-4 if background else 0.0
        self.group = group
        self.transport_device = torch.device("cpu")
        self.call = call_id(b"idle")
        self._bounce = False
        self._nccl = False
        self._messages: torch.cuda.Stream | None = None  # NCCL: the stream small messages are ordered on
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._deferred: list[tuple[torch.Tensor, int, int, tuple[int, str]]] = []  # NCCL: checked after a sync
        if world_size == 1:
            self._dist = None
            return
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise StoreError(
                f"rank {rank}: world_size={world_size} needs an initialized torch.distributed process group"
            )
        self._dist = dist
        group_size = dist.get_world_size(group)
        my_rank = dist.get_rank(group)
        if group_size != world_size:
            raise StoreError(f"rank {rank}: process group has {group_size} ranks, the store was given {world_size}")
        if my_rank != rank:
            raise StoreError(f"store rank {rank} differs from this process's group rank {my_rank}")
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            if device.type != "cuda":
                raise StoreError(f"rank {rank}: the NCCL backend needs a CUDA device, got {device}")
            self.transport_device = device
            self._nccl = True
        elif device.type != "cpu":
            # gloo with device slabs: bounce through host memory. Slower than NCCL, but lets
            # several ranks share one GPU (tests on a one-GPU machine).
            self._bounce = True

    def begin(self, call: int) -> None:
        """Messages from now on belong to ``call`` (see :func:`call_id`)."""
        self.call = call
        self._deferred.clear()

    def close(self) -> None:
        """Stop the waiter threads (a wait still blocked in gloo ends at its deadline)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- headers ----------------------------------------------------------------
    def _header(self, kind: Kind, seq: int, nbytes: int) -> list[int]:
        return [_MAGIC, self.call, int(kind), seq, nbytes, self.rank]

    def _check_header(self, got: Sequence[int], *, peer: int, kind: Kind, seq: int, nbytes: int, what: str) -> None:
        want = self._header(kind, seq, nbytes)
        want[5] = peer
        if list(got) == want:
            return
        if got[0] != _MAGIC:
            seen = "bytes that are not an expert-store message"
        else:
            seen = f"call {got[1]:#x} kind {got[2]} seq {got[3]} ({got[4]} bytes) from rank {got[5]}"
        raise AgreementError(
            f"rank {self.rank}: {what}: rank {peer} sent {seen}, expected call {self.call:#x} kind {int(kind)} "
            f"seq {seq} ({nbytes} bytes): a message of an earlier failed call, or a rank with another view of "
            f"this call; nothing of this call is committed; {RECOVERY}"
        )

    # -- posting and waiting ----------------------------------------------------
    def _failure(self, peer: int, error: BaseException, waited: float, what: str) -> PeerTimeoutError:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "timed out" in text.lower() or "timeout" in text.lower():
            cause = f"did not answer within {waited:.1f} s"
        else:
            cause = f"failed after {waited:.1f} s ({text})"
        error = PeerTimeoutError(f"rank {self.rank}: {what}: rank {peer} {cause}; {RECOVERY}")
        error.peer = peer  # the rank that did not answer (a rebalance job tells its peers)
        return error

    def _post(self, ops: list[tuple[bool, torch.Tensor, int, int]], what: str) -> list:
        """Post (is_send, tensor, peer, tag) operations; returns (work, peer) pairs.

        NCCL gets them in one batch (unbatched NCCL point-to-point ops are serialized like
        collectives); gloo one by one, so that a failure names its peer."""
        dist, t0 = self._dist, time.monotonic()
        to_global = (lambda r: r) if self.group is None else (lambda r: dist.get_global_rank(self.group, r))
        p2p = [dist.P2POp(dist.isend if s else dist.irecv, t, to_global(p), self.group, tag) for s, t, p, tag in ops]
        if self._nccl:
            try:
                return list(zip(dist.batch_isend_irecv(p2p), [p for _, _, p, _ in ops]))
            except RuntimeError as e:
                raise self._failure(min(p for _, _, p, _ in ops), e, time.monotonic() - t0, what) from None
        works = []
        for op, (_, _, p, _) in zip(p2p, ops):
            try:
                works.append((op.op(op.tensor, op.peer, op.group, op.tag), p))
            except RuntimeError as e:
                raise self._failure(p, e, time.monotonic() - t0, what) from None
        return works

    def _wait(self, works: Sequence[tuple], what: str) -> None:
        """Wait for (work, peer) pairs with the deadline. gloo: concurrently, naming the first peer
        that fails; NCCL: the wait only orders the current stream (see :meth:`sync_device`)."""
        if not works:
            return
        t0 = time.monotonic()
        if self._nccl:
            for w, p in works:
                try:
                    w.wait()
                except RuntimeError as e:
                    raise self._failure(p, e, time.monotonic() - t0, what) from None
            return
        deadline = timedelta(seconds=self.timeout_s)

        def wait_one(w) -> tuple[float, RuntimeError | None]:
            try:
                w.wait(timeout=deadline)
            except RuntimeError as e:
                return time.monotonic(), e
            return time.monotonic(), None

        if len({p for _, p in works}) == 1:
            results = [(wait_one(w), p) for w, p in works]
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.world_size, thread_name_prefix="expert-store")
            futures = {self._pool.submit(wait_one, w): p for w, p in works}
            results = []
            for f in concurrent.futures.as_completed(futures):
                results.append((f.result(), futures[f]))
                if results[-1][0][1] is not None:
                    break  # the first failure names the peer; the other waits end at their deadline
        failed = [(t, p, e) for (t, e), p in results if e is not None]
        if failed:
            t, p, e = min(failed, key=lambda f: f[0])  # the earliest failure
            raise self._failure(p, e, t - t0, what)

    def _messages_on(self):
        """Small messages (agreement, blobs) get a stream of their own on NCCL: NCCL orders its
        work after the current stream, which may hold a round's packing queued ahead."""
        if not self._nccl:
            return nullcontext()
        if self._messages is None:
            self._messages = torch.cuda.Stream(self.transport_device)
        return torch.cuda.stream(self._messages)

    def _sync_messages(self, what: str) -> None:
        """Wait for the message stream (not for slab transfers, whose headers are checked later)."""
        if self._nccl:
            event = torch.cuda.Event()
            event.record()
            self.sync_device(self.transport_device, what=what, event=event)

    def sync_device(self, device: torch.device, *, what: str, event: torch.cuda.Event | None = None) -> None:
        """Wait, with the deadline, for the work queued on ``device``'s current stream, then check
        the headers of the NCCL transfers it held; or wait for ``event`` only."""
        if device.type != "cuda":
            return
        everything = event is None
        if everything:
            event = torch.cuda.Event()
            event.record()
        start = time.monotonic()
        while not event.query():
            now = time.monotonic()
            if now - start > self.timeout_s:
                raise PeerTimeoutError(
                    f"rank {self.rank}: {what} did not finish within {now - start:.1f} s (a peer did not answer); "
                    f"{RECOVERY}"
                )
            # Spin for the first 20 ms (a round ends within microseconds of its transfer), then
            # back off so a stuck peer does not burn a core for minutes.
            time.sleep(self._poll_s if now - start < 0.02 else 0.001)
        if not everything:
            return  # later transfers may still be writing their headers
        deferred, self._deferred = self._deferred, []
        for hdr, peer, nbytes, where in deferred:
            self._check_header(hdr.tolist(), peer=peer, kind=Kind.SLAB, seq=where[0], nbytes=nbytes, what=where[1])

    # -- bulk exchange ----------------------------------------------------------
    def start_exchange(self, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor], *, seq: int):
        """Post one header and one slab to / from each peer of round ``seq``; returns an Exchange.

        Peers are visited in ascending rank order on both sides, so the pairing is the same
        everywhere."""
        ex = Exchange(seq=seq)
        if not sends and not recvs:
            return ex
        if self._dist is None:
            raise StoreError(f"rank {self.rank}: no peers in a world of one rank")
        what = f"round {seq} exchange"
        if self._bounce:
            # gloo moves CPU tensors only: device slabs travel through host copies.
            sends = {p: t.cpu() for p, t in sends.items()}
            host = {p: torch.empty(t.shape, dtype=t.dtype) for p, t in recvs.items()}
            ex.copy_back = [(host[p], t) for p, t in recvs.items()]
            recvs = host
        dev = self.transport_device
        out = sorted(sends)
        inc = sorted(recvs)
        send_hdr = torch.tensor([self._header(Kind.SLAB, seq, sends[p].numel()) for p in out], dtype=torch.int64)
        if self._nccl and out:
            send_hdr = send_hdr.pin_memory().to(dev, non_blocking=True)
        recv_hdr = torch.empty(len(inc), HEADER_WORDS, dtype=torch.int64, device=dev)
        ops, header_recv = [], set()  # header_recv: positions in ops of the headers received
        for p in sorted(set(out) | set(inc)):
            if p == self.rank:
                raise StoreError(f"rank {self.rank}: a rank cannot exchange with itself")
            for is_send, table, hdr in ((True, sends, send_hdr), (False, recvs, recv_hdr)):
                if p in table:
                    i = (out if is_send else inc).index(p)
                    if not is_send:
                        header_recv.add(len(ops))
                    ops.append((is_send, hdr[i], p, _tag(self.call, Kind.SLAB, seq, 0)))
                    # The slab's tag names its length: on gloo, a slab of another size is never
                    # matched with this receive (gloo would abort), its header says what differs.
                    ops.append((is_send, table[p], p, _tag(self.call, Kind.SLAB, seq, 1 + table[p].numel())))
        works = self._post(ops, what)
        ex.header_works = [works[i] for i in sorted(header_recv)]
        ex.works = [w for i, w in enumerate(works) if i not in header_recv]
        ex.sent_headers = send_hdr  # referenced until the transfers are done
        ex.headers = [(recv_hdr[i], p, recvs[p].numel()) for i, p in enumerate(inc)]
        return ex

    def finish_exchange(self, ex: Exchange) -> None:
        """Wait for an Exchange. On NCCL this only orders the current stream after the transfers
        (the next round's packing overlaps) and the headers are checked at the next
        :meth:`sync_device`; on gloo it blocks with the deadline and checks them now."""
        what = f"round {ex.seq} exchange"
        self._wait(ex.header_works, what)
        for hdr, peer, nbytes in ex.headers:
            if self._nccl:
                self._deferred.append((hdr, peer, nbytes, (ex.seq, what)))
            else:  # before waiting for the slabs: one that does not match would never arrive
                self._check_header(hdr.tolist(), peer=peer, kind=Kind.SLAB, seq=ex.seq, nbytes=nbytes, what=what)
        self._wait(ex.works, what)
        for host, dst in ex.copy_back:
            dst.copy_(host)

    # -- small all-gather through a leader ------------------------------------
    def start_gather(self, live: Sequence[int], row: torch.Tensor, *, kind: Kind, what: str) -> Gather:
        """All-gather one int64 row per live rank via the lowest live rank: post the first
        messages and return; ``.result()`` finishes it (a rank may plan meanwhile).

        Args:
            live: the live ranks (must include this rank); dead ranks are never contacted.
            row: int64 [K], the same K on every live rank.
        """
        live = sorted(int(r) for r in live)
        if self.rank not in live:
            raise StoreError(f"rank {self.rank} is not among the live ranks {live}")
        return Gather(self, live, row.to(torch.int64).reshape(-1).cpu(), kind, what)

    # -- byte strings between two live ranks --------------------------------------
    def send_blob(self, peer: int, data: bytes, *, what: str) -> None:
        """Send ``data`` to ``peer``: a header with its length, then the bytes."""
        dev = self.transport_device
        with self._messages_on():
            hdr = torch.tensor(self._header(Kind.BLOB, 0, len(data)), dtype=torch.int64, device=dev)
            ops = [(True, hdr, peer, _tag(self.call, Kind.BLOB, 0, 0))]
            if data:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
                ops.append((True, payload, peer, _tag(self.call, Kind.BLOB, 0, 1)))
            for op in ops:  # one at a time: the receiver posts the payload once it knows its size
                self._wait(self._post([op], what), what)
            self._sync_messages(what)

    def recv_blob(self, peer: int, *, what: str) -> bytes:
        """Receive what :meth:`send_blob` sent from ``peer``."""
        dev = self.transport_device
        with self._messages_on():
            hdr = torch.empty(HEADER_WORDS, dtype=torch.int64, device=dev)
            self._wait(self._post([(False, hdr, peer, _tag(self.call, Kind.BLOB, 0, 0))], what), what)
            self._sync_messages(what)
            got = hdr.tolist()
            size = got[4] if got[0] == _MAGIC and 0 <= got[4] <= _MAX_BLOB_BYTES else -1
            self._check_header(got, peer=peer, kind=Kind.BLOB, seq=0, nbytes=size, what=what)
            if size == 0:
                return b""
            payload = torch.empty(size, dtype=torch.uint8, device=dev)
            self._wait(self._post([(False, payload, peer, _tag(self.call, Kind.BLOB, 0, 1))], what), what)
            self._sync_messages(what)
            return payload.cpu().numpy().tobytes()


class Gather:
    """An all-gather through the lowest live rank, in flight (see :meth:`Comm.start_gather`).

    Each rank sends ``[header | row]`` to the leader, its header's sequence field naming the
    live set it sees. The leader checks every header, then sends each peer a table header and
    the table of all messages, in which every rank finds its own message unchanged (or learns
    that the leader read a stale one in its place). If a peer sees another live set, the leader
    sends only the header, marked aborted: every rank raises AgreementError, and no receive is
    ever matched with a message of another size."""

    def __init__(self, comm: Comm, live: list[int], row: torch.Tensor, kind: Kind, what: str) -> None:
        self.comm, self.live, self.kind, self.what = comm, live, kind, what
        self.table: torch.Tensor | None = None
        if len(live) == 1:  # nobody to talk to (150 us of header building saved per message)
            self.table = row.unsqueeze(0).clone()
            return
        self.view = call_id(struct.pack(f"<{len(live)}q", *live))
        k = row.numel()
        self.mine = torch.cat([torch.tensor(comm._header(kind, self.view, 8 * k), dtype=torch.int64), row])
        dev, n = comm.transport_device, HEADER_WORDS + k
        self.row_tag = _tag(comm.call, kind, 0, 0)
        self.hdr_tag = _tag(comm.call, Kind.TABLE, int(kind), 0)
        with comm._messages_on():
            self.buf = torch.empty(len(live), n, dtype=torch.int64, device=dev)
            if comm.rank == live[0]:
                self.buf[0].copy_(self.mine)
                ops = [(False, self.buf[i], p, self.row_tag) for i, p in enumerate(live) if i]
            else:
                self.table_hdr = torch.empty(HEADER_WORDS, dtype=torch.int64, device=dev)
                self.sent = self.mine.to(dev)  # referenced until the transfer is done
                ops = [(True, self.sent, live[0], self.row_tag), (False, self.table_hdr, live[0], self.hdr_tag)]
            try:
                self.works = comm._post(ops, what)
            except PeerTimeoutError as e:
                if comm.rank == live[0]:
                    self._tell_lost(e)
                raise

    def result(self) -> torch.Tensor:
        """int64 [len(live), K] on the CPU, row i from live[i]."""
        if self.table is not None:
            return self.table
        comm, live, what = self.comm, self.live, self.what
        with comm._messages_on():
            try:
                comm._wait(self.works, what)
            except PeerTimeoutError as e:
                if comm.rank == live[0]:
                    self._tell_lost(e)
                raise
            comm._sync_messages(what)
            rows = self._lead() if comm.rank == live[0] else self._follow()
        self.table = rows[:, HEADER_WORDS:].clone()
        return self.table

    def _lead(self) -> torch.Tensor:
        comm, live, what = self.comm, self.live, self.what
        rows = self.buf.cpu()
        nbytes = 8 * (rows.shape[1] - HEADER_WORDS)
        other_view = [p for i, p in enumerate(live[1:], 1) if rows[i, 3] != self.view and rows[i, 0] == _MAGIC]
        # The table header carries a fresh nonce and the payload's tag is made from it: a peer
        # posts the payload's receive only once the header matched.
        nonce = new_nonce()
        size = -1 if other_view else 8 * self.buf.numel()
        hdr = torch.tensor(comm._header(Kind.TABLE, nonce, size), dtype=torch.int64).to(self.buf.device)
        # Every row has arrived, so the table stands: a follower that dies now (after sending its
        # row) is not waited for. The others get the table, and the next message to the lost rank
        # fails on every survivor alike; raising here would leave this rank one call behind them.
        self.hdr, per_peer, works = hdr, [], []  # (hdr referenced until the sends are done)
        for p in live[1:]:
            per_peer.append([(True, hdr, p, self.hdr_tag)])
            if not other_view:
                per_peer[-1].append((True, self.buf, p, _tag(comm.call, Kind.TABLE, nonce, 1)))
        batches = [[op for peer_ops in per_peer for op in peer_ops]] if comm._nccl else per_peer  # NCCL: one batch
        for batch in batches:
            with suppress(PeerTimeoutError):
                works.append(comm._post(batch, f"{what} (broadcast)"))
        # Each peer's sends waited for on their own: a wait that stopped at the lost peer's failure
        # would return while the others' sends were still in flight (seen: a survivor never got
        # the table before this rank moved on and exited).
        for peer_works in works:
            with suppress(PeerTimeoutError):
                comm._wait(peer_works, f"{what} (broadcast)")
        comm._sync_messages(what)
        if other_view:
            raise AgreementError(
                f"rank {comm.rank}: {what}: ranks {other_view} see other live ranks than {live}; nothing moved"
            )
        for i, p in enumerate(live[1:], 1):
            comm._check_header(rows[i, :HEADER_WORDS].tolist(), peer=p, kind=self.kind, seq=self.view,
                               nbytes=nbytes, what=what)  # fmt: skip
        return rows

    def _tell_lost(self, error: PeerTimeoutError) -> None:
        """The leader lost a peer: the other peers get a table header naming it (size -2 - peer), so
        that they raise at once, naming the lost rank, instead of waiting for the leader's deadline."""
        comm, peer = self.comm, getattr(error, "peer", None)
        if peer is None:
            return
        hdr = torch.tensor(comm._header(Kind.TABLE, 0, -2 - peer), dtype=torch.int64).to(self.buf.device)
        what = f"{self.what} (lost rank {peer})"
        for p in self.live[1:]:
            if p != peer:
                with suppress(StoreError):  # best effort: a peer that does not take it raises at its deadline
                    comm._wait(comm._post([(True, hdr, p, self.hdr_tag)], what), what)

    def _follow(self) -> torch.Tensor:
        comm, live, what = self.comm, self.live, self.what
        got = self.table_hdr.tolist()
        if got[0] == _MAGIC and got[1] == comm.call and got[4] <= -2:
            error = PeerTimeoutError(
                f"rank {comm.rank}: {what}: rank {live[0]} lost rank {-2 - got[4]} (it did not answer); {RECOVERY}"
            )
            error.peer = -2 - got[4]
            raise error
        if got[0] == _MAGIC and got[1] == comm.call and got[4] == -1:
            raise AgreementError(
                f"rank {comm.rank}: {what}: rank {live[0]} reports ranks that see other live ranks than it does "
                f"(this rank sees {live}); nothing moved"
            )
        comm._check_header(got, peer=live[0], kind=Kind.TABLE, seq=got[3], nbytes=8 * self.buf.numel(), what=what)
        comm._wait(comm._post([(False, self.buf, live[0], _tag(comm.call, Kind.TABLE, got[3], 1))], what), what)
        comm._sync_messages(what)
        rows = self.buf.cpu()
        if not torch.equal(rows[live.index(comm.rank)], self.mine):
            raise AgreementError(
                f"rank {comm.rank}: {what}: rank {live[0]} answered with a stale message of this rank (from an "
                f"earlier failed call) in place of this call's; nothing of this call is committed; {RECOVERY}"
            )
        return rows

"""Point-to-point messaging among the *live* ranks only.

The store never calls a collective of the whole process group: a dead rank
would never enter it and the survivors would hang. Everything here is built
from point-to-point operations between live ranks (torch.distributed P2P on
NCCL or gloo, the same code path), and every host-side wait has a deadline
that raises :class:`PeerTimeoutError` naming the ranks that did not answer.

Ranks are the store's ranks (0..R-1, the group's ranks); they are mapped to
global ranks for torch.distributed calls.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from datetime import timedelta

import torch

from .errors import PeerTimeoutError, StoreError

__all__ = ["DEFAULT_TIMEOUT_S", "Comm"]

# 300 s: long enough for a first NCCL connection between two ranks on a loaded
# machine, short enough that a lost peer is reported within minutes.
DEFAULT_TIMEOUT_S = 300.0


class _CopyBack:
    """A received host buffer to copy into its device destination once the receive is done."""

    def __init__(self, host: torch.Tensor, device_dst: torch.Tensor) -> None:
        self.host = host
        self.dst = device_dst

    def done(self) -> None:
        self.dst.copy_(self.host)


class _Gather:
    """An all-gather through the lowest live rank, in flight (see Comm.start_allgather_live).

    One batch per hop: unbatched NCCL point-to-point ops are serialized like collectives."""

    def __init__(self, comm: Comm, live: list[int], row: torch.Tensor, what: str) -> None:
        self.comm, self.live, self.row, self.what = comm, live, row, what
        self.table: torch.Tensor | None = None
        if len(live) == 1:
            self.table = row.unsqueeze(0).clone()
            return
        dist, dev, g = comm._dist, comm.transport_device, comm._global
        k = row.numel()
        with comm._message_stream():
            self.buf = torch.empty(len(live), k, dtype=torch.int64, device=dev)
            if comm.rank == live[0]:
                self.buf[0].copy_(row)
                ops = [dist.P2POp(dist.irecv, self.buf[i], g(p), comm.group) for i, p in enumerate(live) if i]
                self.works, self.peers = dist.batch_isend_irecv(ops), live[1:]
            else:
                self.send = row.to(dev)
                ops = [
                    dist.P2POp(dist.isend, self.send, g(live[0]), comm.group),
                    dist.P2POp(dist.irecv, self.buf, g(live[0]), comm.group),
                ]
                self.works, self.peers = dist.batch_isend_irecv(ops), [live[0], live[0]]

    def result(self) -> torch.Tensor:
        if self.table is not None:
            return self.table
        comm, live = self.comm, self.live
        with comm._message_stream():
            if comm.rank == live[0]:
                comm._wait(self.works, self.peers, f"{self.what} (gather)")
                dist = comm._dist
                ops = [dist.P2POp(dist.isend, self.buf, comm._global(p), comm.group) for p in live[1:]]
                comm._wait(dist.batch_isend_irecv(ops), live[1:], f"{self.what} (broadcast)")
            else:
                comm._wait(self.works, self.peers, self.what)
            comm._sync_messages(self.what)
            self.table = self.buf.cpu()
        return self.table


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
        self,
        group,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.group = group
        self.transport_device = torch.device("cpu")
        self._bounce = False
        self._messages: torch.cuda.Stream | None = None  # NCCL: the stream small messages are ordered on
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
        self.backend = backend
        if "nccl" in backend:
            if device.type != "cuda":
                raise StoreError(f"rank {rank}: the NCCL backend needs a CUDA device, got {device}")
            self.transport_device = device
        elif device.type != "cpu":
            # gloo (or another CPU transport) with device slabs: bounce through host memory.
            # Slower than NCCL, but lets several ranks share one GPU (tests on a one-GPU machine).
            self._bounce = True

    # -- rank mapping ---------------------------------------------------------
    def _global(self, r: int) -> int:
        if self.group is None:
            return r
        return self._dist.get_global_rank(self.group, r)

    # -- waits ----------------------------------------------------------------
    def _wait(self, works: Sequence, peers: Sequence[int], what: str) -> None:
        deadline = timedelta(seconds=self.timeout_s)
        for w, p in zip(works, peers):
            try:
                ok = w.wait(timeout=deadline)
            except RuntimeError as e:  # torch raises RuntimeError (or a subclass) on timeout / abort
                raise PeerTimeoutError(
                    f"rank {self.rank}: {what} with rank {p} failed or did not finish within {self.timeout_s:.0f} s: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                ) from None
            if ok is False:
                raise PeerTimeoutError(
                    f"rank {self.rank}: {what} with rank {p} did not finish within {self.timeout_s:.0f} s"
                )

    # -- bulk exchange ----------------------------------------------------------
    def start_exchange(self, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor]) -> list:
        """Post one send and/or one receive per peer in one batch; returns the works.

        Peers are visited in ascending rank order on both sides so that the
        pairing is identical everywhere."""
        if not sends and not recvs:
            return []
        if self._dist is None:
            raise StoreError(f"rank {self.rank}: no peers in a world of one rank")
        dist = self._dist
        bounce = []
        if self._bounce:
            # gloo moves CPU tensors only: device slabs travel through host copies.
            sends = {p: t.cpu() if t.device.type != "cpu" else t for p, t in sends.items()}
            host_recvs = {}
            for p, t in recvs.items():
                if t.device.type != "cpu":
                    host_recvs[p] = torch.empty(t.shape, dtype=t.dtype)
                    bounce.append((_CopyBack(host_recvs[p], t), p))
                else:
                    host_recvs[p] = t
            recvs = host_recvs
        ops = []
        peers = []
        for p in sorted(set(sends) | set(recvs)):
            if p == self.rank:
                raise StoreError(f"rank {self.rank}: a rank cannot exchange with itself")
            if p in sends:
                ops.append(dist.P2POp(dist.isend, sends[p], self._global(p), self.group))
                peers.append(p)
            if p in recvs:
                ops.append(dist.P2POp(dist.irecv, recvs[p], self._global(p), self.group))
                peers.append(p)
        works = dist.batch_isend_irecv(ops)
        return [(w, p) for w, p in zip(works, peers)] + bounce

    def finish_exchange(self, works: list, *, what: str = "slab exchange") -> None:
        """Wait for works from :meth:`start_exchange`.

        On NCCL this only orders the current stream after the transfers (the
        host does not block, so the next round's packing overlaps); the host
        deadline is applied by :meth:`sync_device`. On gloo it blocks with the
        deadline."""
        if not works:
            return
        copies = [w for w, _ in works if isinstance(w, _CopyBack)]
        works = [(w, p) for w, p in works if not isinstance(w, _CopyBack)]
        if self.transport_device.type == "cuda":
            for w, _ in works:
                w.wait()
        else:
            self._wait([w for w, _ in works], [p for _, p in works], what)
        for c in copies:
            c.done()

    def _message_stream(self):
        """Context in which small messages (agreement, blobs) are queued on NCCL.

        They get a stream of their own: NCCL orders its work after the current stream,
        and the current stream may hold a round's packing queued ahead of the agreement."""
        if self.transport_device.type != "cuda":
            return nullcontext()
        if self._messages is None:
            self._messages = torch.cuda.Stream(self.transport_device)
        return torch.cuda.stream(self._messages)

    def _sync_messages(self, what: str) -> None:
        """Wait, with the deadline, for the message stream (NCCL waits do not block the host)."""
        if self.transport_device.type == "cuda":
            self.sync_device(self.transport_device, what=what)

    def sync_device(self, device: torch.device, *, what: str) -> None:
        """Wait for all work queued on ``device``'s current stream, with the deadline."""
        if device.type != "cuda":
            return
        ev = torch.cuda.Event()
        ev.record()
        start = time.monotonic()
        deadline = start + self.timeout_s
        while not ev.query():
            now = time.monotonic()
            if now > deadline:
                raise PeerTimeoutError(f"rank {self.rank}: {what} did not finish within {self.timeout_s:.0f} s")
            # Spin for the first 20 ms (a rebalance round ends within microseconds of its
            # transfer), then back off so a stuck peer does not burn a core for minutes.
            time.sleep(0 if now - start < 0.02 else 0.001)

    # -- small all-gather through a leader ------------------------------------
    def allgather_live(self, live: Sequence[int], row: torch.Tensor, *, what: str) -> torch.Tensor:
        """All-gather one int64 row per live rank, via the lowest live rank.

        Args:
            live: ascending live ranks (must include this rank); dead ranks are never contacted.
            row: int64 [K], the same K on every live rank.
        Returns:
            int64 [len(live), K] on the CPU, row i from live[i].
        """
        return self.start_allgather_live(live, row, what=what).result()

    def start_allgather_live(self, live: Sequence[int], row: torch.Tensor, *, what: str) -> _Gather:
        """Post :meth:`allgather_live`'s first messages and return; ``.result()`` finishes it.

        Lets a rank compute (e.g. its plan) while the messages are in flight."""
        live = sorted(int(r) for r in live)
        if self.rank not in live:
            raise StoreError(f"rank {self.rank} is not among the live ranks {live}")
        row = row.to(torch.int64).reshape(-1).cpu()
        return _Gather(self, live, row, what)

    # -- byte strings between two live ranks --------------------------------------
    def send_blob(self, peer: int, data: bytes, *, what: str) -> None:
        """Send ``data`` to ``peer`` (length first, then the bytes)."""
        dist = self._dist
        dev = self.transport_device
        with self._message_stream():
            n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
            ops = [dist.P2POp(dist.isend, n, self._global(peer), self.group)]
            if data:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
                ops.append(dist.P2POp(dist.isend, payload, self._global(peer), self.group))
            for op in ops:  # two batches: the receiver posts the payload's receive once it knows its size
                self._wait(dist.batch_isend_irecv([op]), [peer], what)
            self._sync_messages(what)

    def recv_blob(self, peer: int, *, what: str) -> bytes:
        """Receive what :meth:`send_blob` sent from ``peer``."""
        dist = self._dist
        dev = self.transport_device
        with self._message_stream():
            n = torch.empty(1, dtype=torch.int64, device=dev)
            self._wait(
                dist.batch_isend_irecv([dist.P2POp(dist.irecv, n, self._global(peer), self.group)]), [peer], what
            )
            self._sync_messages(what)
            size = int(n.item())
            if size == 0:
                return b""
            payload = torch.empty(size, dtype=torch.uint8, device=dev)
            op = [dist.P2POp(dist.irecv, payload, self._global(peer), self.group)]
            self._wait(dist.batch_isend_irecv(op), [peer], what)
            self._sync_messages(what)
            return payload.cpu().numpy().tobytes()

"""vLLM's EPLB weight rearrangement on packed slabs; importing this module never imports vLLM.

* :func:`rearrange_expert_weights_inplace`: vLLM's call of that name (``vllm.distributed.eplb``),
  same arguments and result: every rank's MoE weights rearranged from the old physical-to-logical
  indices to the new ones, with a planner and packed rounds of this package in place of one message
  per tensor.
* :class:`PackedEplbCommunicator`: vLLM's EPLB communicator interface (``add_send``, ``add_recv``,
  ``execute``, ``set_stream``): vLLM's own rearrangement code can use it unchanged, and each
  ``execute`` moves one packed slab per peer and direction.

Symbols: L MoE layers, P physical experts (slots) per layer, R = ep_group size, S = P // R slots
per rank (num_local_physical_experts).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from expert_store.comm import DEFAULT_TIMEOUT_S, Comm, call_id
from expert_store.errors import StoreError
from expert_store.kernels import gather_pieces, scatter_pieces

from .moves import DEFAULT_STAGING_BYTES, Runner, agree, byte_rows, digest_parts, open_comm, plan_layer

__all__ = ["PackedEplbCommunicator", "rearrange_expert_weights_inplace"]

_WHAT = "rearrange_expert_weights_inplace"


def _indices(value: object, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise StoreError(f"{_WHAT}: {name} must hold integers, got {value.dtype}")
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise StoreError(f"{_WHAT}: {name} must be an integer [L, P] tensor, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise StoreError(f"{_WHAT}: {name} must be 2-D [L, P], got shape {tuple(arr.shape)}")
    arr = arr.astype(np.int64)
    if (arr < -1).any():
        layer, slot = (int(i) for i in np.argwhere(arr < -1)[0])
        raise StoreError(f"{_WHAT}: {name}[{layer}, {slot}] = {arr[layer, slot]}; expected an expert id or -1")
    return arr


def map_rank_indices(old: np.ndarray, new: np.ndarray, rank_mapping: Mapping[int, int], world: int):
    """vLLM's elastic-EP mapping: bring the old and new indices to the current group's rank space.

    ``rank_mapping``: old rank -> new rank, -1 (or absent) for a removed rank.

    * ``len(rank_mapping) == world``: scale-down, the group is the old (larger) one. The new
      indices (for the surviving ranks) move to their ranks' old positions; a removed rank gets
      only -1 slots. The old indices stay: removed ranks are still in the group and send what they
      hold.
    * otherwise: scale-up, the group is the new (larger) one. The old indices (of
      ``len(rank_mapping)`` ranks) move to their ranks' new positions; a rank absent from the old
      world starts with -1 slots and is never a source.
    """
    mapping = {int(k): int(v) for k, v in rank_mapping.items()}
    if len(mapping) == world:
        new_world = sum(v != -1 for v in mapping.values())
        if new_world <= 0 or new.shape[1] % new_world:
            raise StoreError(
                f"{_WHAT}: scale-down: new indices have P = {new.shape[1]} slots, not a multiple of the "
                f"{new_world} surviving ranks of rank_mapping"
            )
        S = new.shape[1] // new_world
        # new rank n's slots go to the old position of the rank mapped to n
        mapped = _moved(new, S, world, [(n, o) for o, n in mapping.items() if 0 <= n < new_world and 0 <= o < world])
        return old, mapped
    old_world = len(mapping)
    if old_world <= 0 or old.shape[1] % old_world:
        raise StoreError(
            f"{_WHAT}: scale-up: old indices have P = {old.shape[1]} slots, not a multiple of the "
            f"{old_world} ranks of rank_mapping"
        )
    S = old.shape[1] // old_world
    mapped = _moved(old, S, world, [(o, n) for o, n in mapping.items() if 0 <= o < old_world and 0 <= n < world])
    return mapped, new


def _moved(src: np.ndarray, S: int, world: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """int64 [L, world * S], -1 but for each (a, b) in ``pairs``: rank b's slots = src's rank a slots."""
    out = np.full((src.shape[0], world * S), -1, dtype=np.int64)
    for a, b in pairs:
        out[:, b * S : (b + 1) * S] = src[:, a * S : (a + 1) * S]
    return out


def _newer_positional(ep_group, is_profile, rank_mapping, args: tuple, newer: dict):
    """Newer vLLM passes ``(old, new, expert_weights, expert_buffer, ep_group, communicator,
    is_profile, rank_mapping, ...)`` positionally: recognise the buffer list in ``ep_group``'s place."""
    looks_like_buffers = isinstance(ep_group, Sequence) and all(isinstance(b, torch.Tensor) for b in ep_group)
    if not looks_like_buffers:
        return ep_group, is_profile, rank_mapping
    newer.setdefault("expert_buffer", ep_group)
    rest = [rank_mapping, *args]  # is_profile sat where ep_group now is
    group = is_profile
    newer.setdefault("communicator", rest[0] if rest else None)
    is_profile = rest[1] if len(rest) > 1 else False
    rank_mapping = rest[2] if len(rest) > 2 else None
    return group, is_profile, rank_mapping


def rearrange_expert_weights_inplace(
    old_global_expert_indices: torch.Tensor,
    new_global_expert_indices: torch.Tensor,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    ep_group=None,
    is_profile: bool = False,
    rank_mapping: dict[int, int] | None = None,
    *args,
    staging_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **newer,
) -> None:
    """Rearrange every rank's MoE expert weights in place, from the old placement to the new one.

    Args:
        old_global_expert_indices, new_global_expert_indices: int [L, P] (any device): logical
            expert of each physical slot, -1 for an empty slot. Slot p is row p % S of rank p // S.
        expert_weights: per layer, a sequence of contiguous tensors ``[S, ...]`` of any dtypes (fp8
            weights with fp32 scales, bf16, ...), all on one device; moved as bytes.
        ep_group: the torch.distributed process group of expert parallelism (None: the default
            group); ranks are its ranks. Not needed in a one-process run.
        is_profile: vLLM's memory-profiling dry run: the staging buffer a real call would use is
            allocated (so the profiler sees it) and nothing is moved or sent.
        rank_mapping: elastic EP, old rank -> new rank (-1 or absent: removed); see
            :func:`map_rank_indices` for how the indices are brought to the group's rank space.
        staging_bytes: staging per rank and round (default 1 GiB); more work runs in more rounds.
        timeout_s: deadline of every wait on a peer.
        newer: arguments of newer vLLM versions (``expert_buffer``, ``communicator``,
            ``enable_migration_batching``, ...), accepted and not needed: staging and transport are
            this call's own. The newer positional order (buffers before ``ep_group``) is recognised.

    After the call, for every layer and local slot whose new expert e is not -1, every weight
    tensor's row holds the bytes e's row held before the call: copied locally when this rank held e
    (duplicates included), else received from one holder of e (the same choice on every rank).
    Slots whose expert does not change are not touched; slots whose new expert is -1 keep their
    bytes.

    Raises:
        StoreError: malformed indices or weights (naming the layer / tensor), an expert wanted by
            some slot that no rank held (naming layer, expert, rank), or ranks that called with
            other inputs (AgreementError). PeerTimeoutError: a peer that did not answer within
            ``timeout_s``. Everything is checked before the first byte moves.
    """
    ep_group, is_profile, rank_mapping = _newer_positional(ep_group, is_profile, rank_mapping, args, newer)
    old = _indices(old_global_expert_indices, "old_global_expert_indices")
    new = _indices(new_global_expert_indices, "new_global_expert_indices")
    if not isinstance(expert_weights, Sequence) or not expert_weights:
        raise StoreError(f"{_WHAT}: expert_weights must be a non-empty sequence (one entry per layer)")
    L = len(expert_weights)
    if not isinstance(expert_weights[0], Sequence) or not expert_weights[0]:
        raise StoreError(f"{_WHAT}: expert_weights[0] must be a non-empty sequence of tensors")
    first = expert_weights[0][0]
    if not isinstance(first, torch.Tensor) or first.dim() < 1:
        raise StoreError(f"{_WHAT}: expert_weights[0][0] must be a tensor [S, ...], got {type(first).__name__}")
    S = int(first.shape[0])
    device = first.device
    comm = open_comm(ep_group, device, timeout_s, _WHAT)
    try:
        R = comm.world_size
        if rank_mapping is not None:
            old, new = map_rank_indices(old, new, rank_mapping, R)
        for name, arr in (("old_global_expert_indices", old), ("new_global_expert_indices", new)):
            if arr.shape != (L, R * S):
                raise StoreError(
                    f"{_WHAT}: {name} has shape {tuple(arr.shape)} (after rank_mapping), expected "
                    f"[L={L}, P=R*S={R}*{S}] (layers of expert_weights, ep_group size, rows of the weights)"
                )
        rows = []
        for layer, tensors in enumerate(expert_weights):
            rows.append(byte_rows(tensors, S, f"{_WHAT}: layer {layer}"))
            if len(rows[-1]) != len(rows[0]) or rows[-1][0].device != device:
                raise StoreError(
                    f"{_WHAT}: layer {layer} has {len(rows[-1])} tensors on {rows[-1][0].device}; layer 0 has "
                    f"{len(rows[0])} on {device}"
                )
        budget = DEFAULT_STAGING_BYTES if staging_bytes is None else int(staging_bytes)
        if is_profile:
            # What a real call could stage at most: every row of one layer sent and received.
            worst = 2 * S * sum(int(r.shape[1]) for r in rows[0])
            torch.empty(min(budget, worst), dtype=torch.uint8, device=device)
            return
        plans = [plan_layer(old[la], new[la], num_ranks=R) for la in range(L)]
        for la, plan in enumerate(plans):
            if plan.missing:
                r, e, slots = plan.missing[0]
                raise StoreError(
                    f"{_WHAT}: layer {la}: logical expert {e} is wanted by rank {r} (local slots {list(slots)}) "
                    f"but no rank holds it in the old indices; nothing moved"
                )
        shapes = [tuple(r.shape) for layer in rows for r in layer]
        agree(comm, range(R), digest_parts(old, new, shapes=shapes, extra=[budget]), _WHAT)
        Runner(comm, rows, budget).run(plans, what=_WHAT)
    finally:
        comm.close()


class PackedEplbCommunicator:
    """vLLM's EPLB communicator interface over packed slabs.

    ``add_send`` / ``add_recv`` queue tensors; :meth:`execute` gathers everything queued for one
    peer into one slab (one launch for all peers), sends one slab to and receives one from each
    peer, and scatters what arrived into the receive tensors (one launch). Pieces are paired in
    the order they were queued, after a stable sort by ``expert_id`` when every piece of the pair
    has one, as vLLM queues both sides by expert.

    Before any payload moves, ranks exchange a fixed-size summary of what they queued for each
    other (counts, bytes, a digest of the expert ids and sizes) with every peer of the group, so a
    mismatch (a size, an expert, a piece one side did not queue) raises StoreError on both ranks of
    the pair, naming the peer, instead of corrupting a tensor or waiting forever.

    Args:
        ep_group: torch.distributed process group (None: the default group); ranks are its ranks.
        cuda_stream: stream for the copies and transfers (None: the current stream).
        timeout_s: deadline of every wait on a peer.
    """

    needs_profile_buffer_reservation = False  # newer vLLM asks; the slabs are allocated per execute

    def __init__(self, ep_group=None, cuda_stream=None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._group = ep_group
        self._stream = cuda_stream
        self._timeout_s = timeout_s
        self._sends: dict[int, list[tuple[int | None, list[torch.Tensor]]]] = {}
        self._recvs: dict[int, list[tuple[int | None, list[torch.Tensor]]]] = {}
        self._calls = itertools.count()
        self._comm: Comm | None = None
        self.messages = 0  # payload messages sent so far (for benchmarks)

    # -- vLLM's interface -------------------------------------------------------
    def add_send(self, tensor, dst_rank: int, expert_id: int | None = None) -> None:
        """Queue ``tensor`` (a tensor or a list of tensors, each contiguous) for ``dst_rank``."""
        self._sends.setdefault(self._peer(dst_rank, "add_send"), []).append((expert_id, self._tensors(tensor)))

    def add_recv(self, tensor, src_rank: int, expert_id: int | None = None) -> None:
        """Queue ``tensor`` (a tensor or a list of tensors, each contiguous) to be filled from ``src_rank``."""
        self._recvs.setdefault(self._peer(src_rank, "add_recv"), []).append((expert_id, self._tensors(tensor)))

    def set_stream(self, cuda_stream) -> None:
        self._stream = cuda_stream

    def set_transfer_context(self, *args, **kwargs) -> None:
        """Newer vLLM tells the communicator which layer it transfers; nothing here depends on it."""

    def execute(self) -> None:
        """Move everything queued, then clear the queues (also when it raises)."""
        sends, recvs = self._sends, self._recvs
        self._sends, self._recvs = {}, {}
        stream = self._stream
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            self._execute(sends, recvs)

    # -- internals --------------------------------------------------------------
    def _peer(self, rank: object, what: str) -> int:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise StoreError(f"PackedEplbCommunicator.{what}: rank must be an int, got {type(rank).__name__}")
        return int(rank)

    @staticmethod
    def _tensors(tensor) -> list[torch.Tensor]:
        ts = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise StoreError(f"PackedEplbCommunicator: item {i} is a {type(t).__name__}, expected a tensor")
        return ts

    @staticmethod
    def _ordered(entries: list) -> list:
        if entries and all(e is not None for e, _ in entries):
            return sorted(entries, key=lambda x: x[0])  # stable: equal ids keep their queue order
        return entries

    @staticmethod
    def _summary(entries: list) -> list[int]:
        """count, bytes, digest (int63) of (expert id, sizes) of one direction with one peer."""
        h = hashlib.blake2b(digest_size=8)
        nbytes = 0
        for e, ts in entries:
            sizes = [t.numel() * t.element_size() for t in ts]
            nbytes += sum(sizes)
            h.update(np.array([-2 if e is None else int(e), *sizes, -1], dtype=np.int64).tobytes())
        return [len(entries), nbytes, int.from_bytes(h.digest(), "little") >> 1]

    def _execute(self, sends: dict, recvs: dict) -> None:
        what = "PackedEplbCommunicator.execute"
        sends = {p: self._ordered(v) for p, v in sends.items()}
        recvs = {p: self._ordered(v) for p, v in recvs.items()}
        tensors = [t for q in (sends, recvs) for v in q.values() for _, ts in v for t in ts]
        device = tensors[0].device if tensors else torch.device("cpu")
        if self._comm is None:
            self._comm = open_comm(self._group, device, self._timeout_s, what)
        comm = self._comm
        me, R = comm.rank, comm.world_size
        for p in (*sends, *recvs):
            if not 0 <= p < R or p == me:
                raise StoreError(f"{what}: rank {me}: peer rank {p} is not another rank of the group (0..{R - 1})")
        for t in tensors:
            if t.device != device:
                raise StoreError(f"{what}: rank {me}: tensors on {t.device} and {device}; one device per execute")
        comm.begin(call_id(b"packed-eplb-communicator", next(self._calls).to_bytes(8, "little")))
        if R == 1:
            return
        # 1. Summaries with every peer (fixed size: both sides know what to receive).
        mine = {p: self._summary(sends.get(p, [])) + self._summary(recvs.get(p, [])) for p in range(R) if p != me}
        out = {p: torch.tensor(v, dtype=torch.int64) for p, v in mine.items()}
        got = {p: torch.empty(6, dtype=torch.int64) for p in mine}
        if comm.transport_device.type == "cuda":
            out = {p: v.to(comm.transport_device) for p, v in out.items()}
            got = {p: v.to(comm.transport_device) for p, v in got.items()}
        comm.finish_exchange(comm.start_exchange(out, got, seq=0))
        comm.sync_device(comm.transport_device, what=what)
        for p in sorted(mine):
            theirs = got[p].tolist()
            for direction, a, b in (("to", mine[p][:3], theirs[3:]), ("from", mine[p][3:], theirs[:3])):
                if a != b:
                    raise StoreError(
                        f"{what}: rank {me} and rank {p} disagree on what goes {direction} rank {p}: this rank "
                        f"queued {a[0]} pieces of {a[1]} bytes, rank {p} {b[0]} pieces of {b[1]} bytes"
                        f"{' (same counts, other expert ids or sizes)' if a[:2] == b[:2] else ''}; nothing moved"
                    )
        # 2. Payloads: one gather, one slab each way per peer, one scatter.
        peers_out = [p for p in sorted(sends) if mine[p][1]]
        peers_in = [p for p in sorted(recvs) if mine[p][4]]
        total = sum(mine[p][1] for p in peers_out) + sum(mine[p][4] for p in peers_in)
        staging = torch.empty(total, dtype=torch.uint8, device=device)
        gathers, scatters, slabs_out, slabs_in = [], [], {}, {}
        off = 0
        for p in peers_out:
            start = off
            for _, ts in sends[p]:
                for t in ts:
                    gathers.append((t, off))
                    off += t.numel() * t.element_size()
            slabs_out[p] = staging[start:off]
        for p in peers_in:
            start = off
            for _, ts in recvs[p]:
                for t in ts:
                    scatters.append((off, t))
                    off += t.numel() * t.element_size()
            slabs_in[p] = staging[start:off]
        if gathers:
            gather_pieces(gathers, staging)
        comm.finish_exchange(comm.start_exchange(slabs_out, slabs_in, seq=1))
        self.messages += len(slabs_out)
        if scatters:
            scatter_pieces(staging, scatters)
        comm.sync_device(device, what=what)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.close()
            self._comm = None


def _null():
    from contextlib import nullcontext

    return nullcontext()

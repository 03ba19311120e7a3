"""Placement: which logical expert sits in which physical slot, per layer.

Symbols: L layers, E logical experts, R ranks, S slots per rank, P = R * S slots (slot p lives on
rank p // S). The views (``phy2log``, ``log2phy``, ``logcnt``) are named as in DeepSeek's EPLB and
the engines. Everything here is pure CPU int64 arithmetic. A :class:`Placement` is immutable: it
keeps a private copy of ``phy2log`` and hands out copies, so no caller can change a placement that
another part of the store relies on.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .checks import is_int
from .errors import PlacementError

__all__ = ["Placement"]

# Prefix of the bytes that digest() hashes: a placement's digest can never
# collide with the hash of some other byte string the store computes.
_DIGEST_TAG = b"expert-store/placement/v1\0"


def _positive_int(value: Any, what: str) -> int:
    if not is_int(value) or value <= 0:
        raise PlacementError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _index(value: Any, what: str, size: int) -> int:
    if not is_int(value) or not 0 <= value < size:
        raise PlacementError(f"{what} {value!r} is outside [0, {size})")
    return int(value)


def _as_int64_cpu(phy2log: Any) -> torch.Tensor:
    """A private, contiguous CPU int64 copy of ``phy2log`` (checked, never silently cast)."""
    if isinstance(phy2log, torch.Tensor):
        if phy2log.dtype != torch.int64:
            raise PlacementError(f"phy2log must be torch.int64, got {phy2log.dtype}")
        # clone() even on the CPU: the placement must not alias the caller's tensor.
        return phy2log.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if isinstance(phy2log, np.ndarray):
        if phy2log.dtype.kind not in "iu":
            raise PlacementError(f"phy2log must hold integers, got a numpy array of dtype {phy2log.dtype}")
        if phy2log.dtype.kind == "u" and phy2log.size and int(phy2log.max()) > np.iinfo(np.int64).max:
            raise PlacementError(f"phy2log holds an id too large for int64: {int(phy2log.max())}")
        return torch.from_numpy(np.ascontiguousarray(phy2log, dtype=np.int64).copy())
    if isinstance(phy2log, Sequence) and not isinstance(phy2log, (str, bytes)):
        try:
            t = torch.tensor(phy2log)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise PlacementError(f"phy2log must be a rectangular [L, P] nested list of ints: {e}") from None
        if t.dim() == 2 and t.numel() and t.dtype != torch.int64:
            raise PlacementError(f"phy2log must hold ints, got values of type {t.dtype}")
        return t.to(torch.int64) if t.numel() == 0 else t.contiguous()
    raise PlacementError(
        f"phy2log must be an int64 torch tensor, a numpy int array or nested lists, got {type(phy2log).__name__}"
    )


class Placement:
    """An immutable, validated placement of E logical experts in P = R * S slots per layer.

    Args:
        phy2log: int64 ``[L, P]``, the logical expert in each physical slot. A torch
            tensor must already be ``torch.int64`` (any other dtype is an error);
            numpy integer arrays and nested lists of ints are converted.
        num_ranks: R; P must be a multiple of it (S = P // R slots per rank).
        num_experts: E; ids must lie in ``[0, E)`` and every logical expert must
            have at least one slot in every layer.

    Raises:
        PlacementError: naming the layer, expert or slot at fault.
    """

    __slots__ = ("_E", "_L", "_P", "_R", "_S", "_digest", "_log2phy", "_logcnt", "_phy2log")

    def __init__(self, phy2log: Any, *, num_ranks: int, num_experts: int) -> None:
        R = _positive_int(num_ranks, "num_ranks")
        E = _positive_int(num_experts, "num_experts")
        p2l = _as_int64_cpu(phy2log)
        if p2l.dim() != 2:
            raise PlacementError(f"phy2log must be 2-D [L, P], got shape {tuple(p2l.shape)}")
        L, P = p2l.shape
        if L == 0:
            raise PlacementError("phy2log has no layers (L = 0)")
        if P == 0 or P % R:
            raise PlacementError(f"phy2log has P = {P} slots per layer, which is not a positive multiple of R = {R}")
        if P < E:
            raise PlacementError(f"phy2log has P = {P} slots per layer, fewer than the E = {E} logical experts")

        # The arithmetic runs in numpy, single-threaded: these arrays are small, and
        # torch's intra-op thread pool made one torch.full of [58, 256, 5] take 8 ms
        # on a loaded 2-core machine (waking the idle worker) instead of 10 us.
        ids = p2l.numpy()  # shares p2l's memory (read only here)
        bad = (ids < 0) | (ids >= E)
        if bad.any():
            layer, slot = (int(i) for i in np.argwhere(bad)[0])
            raise PlacementError(
                f"layer {layer}, slot {slot} (rank {slot // (P // R)}): logical expert id {int(ids[layer, slot])} "
                f"is outside [0, {E})"
            )

        # key = layer * E + expert numbers every (layer, logical expert) pair.
        layer_base = np.arange(L, dtype=np.int64)[:, None] * E  # [L, 1]
        logcnt = np.bincount((ids + layer_base).reshape(-1), minlength=L * E).reshape(L, E)
        if not logcnt.all():
            missing = np.argwhere(logcnt == 0)
            raise PlacementError(
                f"layer {int(missing[0, 0])}: logical expert {int(missing[0, 1])} has no slot "
                f"({missing.shape[0]} (layer, expert) pair(s) without a slot in all)"
            )
        # Per layer, a stable sort of the slots by expert lists each expert's slots
        # in increasing order. numpy's stable sort of 16-bit keys is a radix sort:
        # 35 us for [58, 320] against ~470 us for an int64 torch.sort.
        order = np.argsort(ids.astype(np.uint16) if E <= 1 << 16 else ids, axis=1, kind="stable")  # [L, P]
        sorted_e = np.take_along_axis(ids, order, axis=1)  # [L, P] expert of each grouped slot
        starts = np.cumsum(logcnt, axis=1) - logcnt  # [L, E] first grouped position of each expert
        replica = np.arange(P, dtype=np.int64) - np.take_along_axis(starts, sorted_e, axis=1)  # [L, P]
        max_rep = int(logcnt.max())
        log2phy = np.full((L, E, max_rep), -1, dtype=np.int64)
        log2phy[np.arange(L)[:, None], sorted_e, replica] = order.astype(np.int64, copy=False)

        self._phy2log = p2l
        self._log2phy = torch.from_numpy(log2phy)
        self._logcnt = torch.from_numpy(logcnt.astype(np.int64, copy=False))
        self._L, self._E, self._R, self._P, self._S = L, E, R, P, P // R
        self._digest: bytes | None = None

    # -- constructors ---------------------------------------------------------
    @classmethod
    def contiguous(cls, *, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int) -> Placement:
        """Slot p holds logical expert ``p % E`` in every layer.

        With P = R * S > E the slots past E hold redundant copies of experts
        ``0 .. P - E - 1``. P < E raises :class:`PlacementError`.
        """
        L = _positive_int(num_layers, "num_layers")
        E = _positive_int(num_experts, "num_experts")
        R = _positive_int(num_ranks, "num_ranks")
        S = _positive_int(slots_per_rank, "slots_per_rank")
        P = R * S
        if P < E:
            raise PlacementError(f"contiguous placement needs R * S >= E, got R={R} * S={S} = {P} < E={E}")
        row = torch.arange(P, dtype=torch.int64) % E
        return cls(row.unsqueeze(0).expand(L, P), num_ranks=R, num_experts=E)

    # -- dimensions -----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self._L

    @property
    def num_experts(self) -> int:
        return self._E

    @property
    def num_ranks(self) -> int:
        return self._R

    @property
    def slots_per_rank(self) -> int:
        return self._S

    @property
    def num_physical(self) -> int:
        return self._P

    @property
    def max_replicas(self) -> int:
        return self._log2phy.shape[2]

    # -- views (copies: a Placement never changes) ------------------------------
    @property
    def phy2log(self) -> torch.Tensor:
        """int64 ``[L, P]``: logical expert in each physical slot (a copy)."""
        return self._phy2log.clone()

    @property
    def log2phy(self) -> torch.Tensor:
        """int64 ``[L, E, max_replicas]``: slots of each logical expert, increasing, padded with -1 (a copy)."""
        return self._log2phy.clone()

    @property
    def logcnt(self) -> torch.Tensor:
        """int64 ``[L, E]``: replicas of each logical expert (a copy)."""
        return self._logcnt.clone()

    # -- queries --------------------------------------------------------------
    def rank_of_slot(self, p: int) -> int:
        """Rank that holds physical slot ``p``."""
        return _index(p, "slot", self._P) // self._S

    def rank_experts(self, rank: int) -> torch.Tensor:
        """int64 ``[L, S]``: logical expert in each of ``rank``'s slots (a copy)."""
        r = _index(rank, "rank", self._R)
        return self._phy2log[:, r * self._S : (r + 1) * self._S].clone()

    def slots(self, layer: int, expert: int) -> list[int]:
        """Physical slots holding ``expert`` in ``layer``, increasing."""
        lay = _index(layer, "layer", self._L)
        e = _index(expert, "logical expert", self._E)
        return self._log2phy[lay, e, : int(self._logcnt[lay, e])].tolist()

    def holders(self, layer: int, expert: int) -> list[int]:
        """Ranks holding ``expert`` in ``layer``, increasing, each listed once."""
        return sorted({p // self._S for p in self.slots(layer, expert)})

    def check_servable(self, alive: Any) -> None:
        """Raise unless every (layer, logical expert) has a slot on a live rank.

        Args:
            alive: bool ``[R]`` (torch tensor, or a sequence of bools), true for live ranks.

        Raises:
            PlacementError: naming the first layer and expert without a live slot.
        """
        if isinstance(alive, torch.Tensor):
            if alive.dtype != torch.bool:
                raise PlacementError(f"alive must be torch.bool [R], got {alive.dtype}")
            a = alive.detach().to("cpu")
        else:
            try:
                items = list(alive)
            except TypeError:
                raise PlacementError(
                    f"alive must be a bool [R] tensor or sequence, got {type(alive).__name__}"
                ) from None
            if not all(isinstance(x, (bool, np.bool_)) for x in items):
                raise PlacementError(f"alive must hold bools, got {items!r}")
            a = torch.tensor([bool(x) for x in items], dtype=torch.bool)
        if tuple(a.shape) != (self._R,):
            raise PlacementError(f"alive must have shape [R] = [{self._R}], got {list(a.shape)}")
        # numpy, single-threaded: see __init__ for why torch's thread pool is avoided here.
        alive_np = a.numpy()
        if alive_np.all():  # every expert has a slot (checked at construction), so a live one
            return
        live_slot = np.repeat(alive_np, self._S)  # bool [P]
        keys = self._phy2log.numpy()[:, live_slot] + np.arange(self._L, dtype=np.int64)[:, None] * self._E
        live_cnt = np.bincount(keys.reshape(-1), minlength=self._L * self._E)
        dead = np.flatnonzero(live_cnt == 0)
        if dead.size:
            layer, expert = divmod(int(dead[0]), self._E)
            dead_ranks = np.flatnonzero(~alive_np).tolist()
            raise PlacementError(
                f"layer {layer}: logical expert {expert} has no slot on a live rank "
                f"(held only by rank(s) {self.holders(layer, expert)}; dead ranks {dead_ranks}; "
                f"{dead.size} (layer, expert) pair(s) unservable in all)"
            )

    # -- identity -------------------------------------------------------------
    def digest(self) -> bytes:
        """sha256 of the dimensions and phy2log as little-endian int64: the same on every machine."""
        if self._digest is None:
            h = hashlib.sha256(_DIGEST_TAG)
            h.update(struct.pack("<4q", self._L, self._E, self._R, self._S))
            h.update(self._phy2log.numpy().astype("<i8", copy=False).tobytes())
            self._digest = h.digest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (self._L, self._E, self._R, self._S) == (other._L, other._E, other._R, other._S) and torch.equal(
            self._phy2log, other._phy2log
        )

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return (
            f"Placement(L={self._L}, E={self._E}, R={self._R}, S={self._S}, P={self._P}, "
            f"max_replicas={self.max_replicas}, digest={self.digest().hex()[:12]})"
        )

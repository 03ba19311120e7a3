"""The small typed messages live ranks exchange around a collective call.

Each message is a frozen record with ``encode() -> int64 [WORDS]`` and
``decode(row)``; :mod:`expert_store.comm` wraps it in a header naming the call,
the kind of message and its length, so that a message of another call is
detected instead of being read as this one.

Statuses are enums, one per message type, so that a code never means two
things.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch

__all__ = ["Agreement", "Completion", "Outcome", "Status", "StepReady", "StepStatus", "digest_words", "new_nonce"]


def digest_words(*parts: bytes) -> tuple[int, int, int, int]:
    """SHA-256 of ``parts`` (each length-prefixed, so concatenations cannot collide) as 4 int64 words."""
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return struct.unpack("<4q", h.digest())


def new_nonce() -> int:
    """A random non-negative int64: tells this call's messages from any earlier call's."""
    return int.from_bytes(os.urandom(8), "little") >> 1


class Status(IntEnum):
    """What a rank says when it enters a collective call."""

    READY = 0  # arguments valid, plan made and staging taken
    REFUSED = 1  # its arguments were bad (it raises its own StoreError)
    NOT_PREPARED = 2  # it could not plan or take the staging memory
    EXISTS = 3  # create: a store already exists at its root


class Outcome(IntEnum):
    """What a rank says once its bytes have moved, before anyone commits."""

    DONE = 1  # every byte in place (and verified when asked)
    VERIFY_FAILED = 2  # an arrived record did not match its checksum
    MANIFEST_FAILED = 3  # the new manifest could not be written


class StepStatus(IntEnum):
    """What a rank says at one step of a rebalance job (:class:`StepReady`)."""

    READY = 0  # the layers it reports are staged (and verified when asked)
    VERIFY_FAILED = 1  # a staged record of ``layer`` did not match its checksum
    FAILED = 2  # staging ``layer`` failed otherwise (a checkpoint read, say)
    PEER_LOST = 3  # a peer did not answer while ``layer`` was staged


def _words(row: torch.Tensor, n: int, what: str) -> list[int]:
    values = row.reshape(-1).tolist()
    if len(values) != n:
        raise ValueError(f"{what} has {n} words, got {len(values)}")
    return values


@dataclass(frozen=True)
class Agreement:
    """A rank's view of the call it is entering.

    ``inputs`` digests what every live rank must pass alike (new placement, alive,
    fresh, options); ``state`` what every rank that holds experts must hold alike
    (version, placement, alive mask); ``clock_ns`` is the sender's wall clock (the
    leader's becomes the commit time, so every rank writes identical bytes);
    ``nonce`` is fresh per call and rank."""

    status: Status
    inputs: tuple[int, int, int, int]
    state: tuple[int, int, int, int]
    version: int
    clock_ns: int
    nonce: int

    WORDS = 12

    def encode(self) -> torch.Tensor:
        return torch.tensor(
            [int(self.status), *self.inputs, *self.state, self.version, self.clock_ns, self.nonce], dtype=torch.int64
        )

    @classmethod
    def decode(cls, row: torch.Tensor) -> Agreement:
        w = _words(row, cls.WORDS, "an agreement")
        try:
            status = Status(w[0])
        except ValueError:
            raise ValueError(f"an agreement carries the unknown status {w[0]}") from None
        return cls(status, tuple(w[1:5]), tuple(w[5:9]), w[9], w[10], w[11])


@dataclass(frozen=True)
class Completion:
    """A rank's outcome once the bytes have moved."""

    outcome: Outcome

    WORDS = 1

    def encode(self) -> torch.Tensor:
        return torch.tensor([int(self.outcome)], dtype=torch.int64)

    @classmethod
    def decode(cls, row: torch.Tensor) -> Completion:
        (w,) = _words(row, cls.WORDS, "a completion")
        try:
            return cls(Outcome(w))
        except ValueError:
            raise ValueError(f"a completion carries the unknown outcome {w}") from None


class StepReady(NamedTuple):
    """A rank's state at one step of a rebalance job (a named tuple: made at every step, where a
    frozen dataclass's construction cost several times as much host time).

    ``step``: the step number (0, 1, ...); ``ready``: layers 0..ready-1 are switched or
    staged on this rank; on a failure, ``layer`` / ``expert`` / ``source`` name what
    failed (``source``: the sending rank, -1 for the checkpoint, -2 for none)."""

    step: int
    ready: int
    status: StepStatus
    layer: int = -1
    expert: int = -1
    source: int = -2

    WORDS = 6

    def encode(self) -> torch.Tensor:
        return torch.tensor(
            [self.step, self.ready, int(self.status), self.layer, self.expert, self.source], dtype=torch.int64
        )

    @classmethod
    def decode(cls, row: torch.Tensor | list[int]) -> StepReady:
        """From a row of the step gather's table: a tensor, or its ``tolist()`` (a step decodes the
        whole table with one ``tolist``: iterating a tensor row by row cost 110-180 us a step)."""
        w = row if isinstance(row, list) else _words(row, cls.WORDS, "a step message")
        if len(w) != cls.WORDS:
            raise ValueError(f"a step message has {cls.WORDS} words, got {len(w)}")
        try:
            status = StepStatus(w[2])
        except ValueError:
            raise ValueError(f"a step message carries the unknown status {w[2]}") from None
        return cls(w[0], w[1], status, w[3], w[4], w[5])

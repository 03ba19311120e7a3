"""Errors raised on purpose by expert-store.

Every error the store raises deliberately is a :class:`StoreError`; the
subclasses say which part of the store found the problem, and every message
names the file, tensor, layer or rank at fault.
"""

from __future__ import annotations

__all__ = [
    "AgreementError",
    "CheckpointError",
    "IntegrityError",
    "ManifestError",
    "PeerTimeoutError",
    "PlacementError",
    "SpecError",
    "StoreError",
]


class StoreError(Exception):
    """Base class of every error expert-store raises on purpose."""


class SpecError(StoreError, ValueError):
    """An ExpertSpec / TensorSpec is malformed."""


class CheckpointError(StoreError):
    """A safetensors checkpoint is missing, malformed or does not match the spec."""


class PlacementError(StoreError, ValueError):
    """A placement (phy2log) is malformed or cannot be served by the live ranks."""


class ManifestError(StoreError):
    """A manifest file is missing, corrupt, of an unknown format or of another store."""


class AgreementError(StoreError):
    """Live ranks disagree on the inputs of a collective store operation."""


class IntegrityError(StoreError):
    """Slot contents do not match the checksums the manifest records."""


class PeerTimeoutError(StoreError, TimeoutError):
    """A peer did not answer within the timeout of a collective store operation."""

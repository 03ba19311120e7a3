"""Triton kernels of expert-store, installed as ``expert_store.kernels``.

``records``: pack / unpack transfer-slab records and checksum experts, one
launch per call; ``reference``: the plain-torch version of each (test oracle
and CPU fallback).
"""

from .records import (
    DEFAULT_CONFIG,
    Indices,
    KernelConfig,
    PreparedCopies,
    chunks_per_expert,
    pack_records,
    resident_checksums,
    slab_checksums,
    unpack_records,
)

__all__ = [
    "DEFAULT_CONFIG",
    "Indices",
    "KernelConfig",
    "PreparedCopies",
    "chunks_per_expert",
    "pack_records",
    "resident_checksums",
    "slab_checksums",
    "unpack_records",
]

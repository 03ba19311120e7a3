"""Triton kernels of expert-store, installed as ``expert_store.kernels``.

``records``: pack / unpack transfer-slab records and checksum experts, one
launch per call; ``reference``: the plain-torch version of each (test oracle
and CPU fallback).
"""

from .records import (
    Indices,
    PreparedCopies,
    launch_path,
    pack_records,
    resident_checksums,
    slab_checksums,
    unpack_records,
)

__all__ = [
    "Indices",
    "PreparedCopies",
    "launch_path",
    "pack_records",
    "resident_checksums",
    "slab_checksums",
    "unpack_records",
]

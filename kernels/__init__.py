"""Triton kernels of expert-store, installed as ``expert_store.kernels``.

``records``: pack / unpack transfer-slab records and checksum experts, one
launch per call; ``reference``: the plain-torch version of each (test oracle
and CPU fallback).
"""

from .pieces import gather_pieces, gather_pieces_reference, scatter_pieces, scatter_pieces_reference  # noqa: F401
from .records import *  # noqa: F403  (the package exports exactly records.__all__)
from .records import __all__  # noqa: F401

"""expert-store: keep and move Mixture-of-Experts weights across GPUs.

Each rank's experts live in packed slabs with zero-copy, address-stable views;
``ExpertStore.rebalance`` moves them to a new placement (packed slabs per peer,
checkpoint reads for what no live peer holds) and commits a versioned manifest.
The README is the user's manual.
"""

from . import eplb, presets
from .checkpoint import Checkpoint
from .errors import (
    AgreementError,
    CheckpointError,
    IntegrityError,
    ManifestError,
    PeerTimeoutError,
    PlacementError,
    SpecError,
    StoreError,
)
from .job import RebalanceJob
from .manifest import Manifest, ManifestLog
from .placement import Placement
from .spec import ExpertSpec, TensorSpec
from .store import ExpertStore, RebalanceReport

__version__ = "0.1.0"

__all__ = [
    "AgreementError",
    "Checkpoint",
    "CheckpointError",
    "ExpertSpec",
    "ExpertStore",
    "IntegrityError",
    "Manifest",
    "ManifestError",
    "ManifestLog",
    "PeerTimeoutError",
    "Placement",
    "PlacementError",
    "RebalanceJob",
    "RebalanceReport",
    "SpecError",
    "StoreError",
    "TensorSpec",
    "eplb",
    "presets",
]

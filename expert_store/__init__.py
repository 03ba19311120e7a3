"""expert-store: keep and move Mixture-of-Experts weights across GPUs.

See README.md for the user's manual and the design notes for the API contract.
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
from .layout import ResidentSlabs, SlabLayout
from .manifest import Manifest, ManifestLog
from .placement import Placement
from .spec import ExpertSpec, TensorSpec
from .store import DEFAULT_STAGING_BYTES, ExpertStore, RebalanceReport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STAGING_BYTES",
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
    "RebalanceReport",
    "ResidentSlabs",
    "SlabLayout",
    "SpecError",
    "StoreError",
    "TensorSpec",
    "eplb",
    "presets",
]

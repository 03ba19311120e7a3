"""expert-store: keep and move Mixture-of-Experts weights across GPUs.

See README.md for the user's manual and DESIGN (section 3) for the API contract.
"""

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
from .spec import ExpertSpec, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "AgreementError",
    "CheckpointError",
    "ExpertSpec",
    "IntegrityError",
    "ManifestError",
    "PeerTimeoutError",
    "PlacementError",
    "ResidentSlabs",
    "SlabLayout",
    "SpecError",
    "StoreError",
    "TensorSpec",
]

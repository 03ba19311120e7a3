"""Shared test setup.

Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must
be set before any kernel module is imported, which this conftest guarantees.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_ignore_collect(collection_path, config):
    """Benchmarks are measurements, not tests: the default run (``python -m pytest``) leaves
    tests/benchmarks out; ``pytest tests/benchmarks --benchmark-only`` runs them."""
    if collection_path.name != "benchmarks" or collection_path.parent != Path(__file__).parent:
        return None
    asked = [Path(a.split("::")[0]).resolve() for a in config.args]
    return not any(a == collection_path or collection_path in a.parents for a in asked)

"""Shared test setup.

Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must
be set before any kernel module is imported, which this conftest guarantees.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

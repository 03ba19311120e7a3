"""Benchmarks and gates: torch's CPU work runs on one intra-op thread.

On a shared 2-core machine, torch's OpenMP threads spinning against another process made
the placement policy 10x slower and 20x noisier (median 127 ms, spread 27-588 ms, against
12.6 ms on one thread, same run); the CPU work measured here is many small operations that
gain nothing from a second thread (4.5 ms either way without contention).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

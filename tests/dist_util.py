"""Multi-process test launcher: re-exported from expert_store.launch."""

from expert_store.launch import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]

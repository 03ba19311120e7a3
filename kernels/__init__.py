"""Triton kernels of expert-store, installed as ``expert_store.kernels``."""

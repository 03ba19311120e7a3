"""Inference-engine integrations: the engines' own expert-rearrangement calls, run on packed slabs.

:mod:`expert_store.integrations.vllm` and :mod:`expert_store.integrations.sglang` keep the engines'
signatures and semantics; importing them never imports the engine. Both are built on
:mod:`expert_store.integrations.moves`.
"""

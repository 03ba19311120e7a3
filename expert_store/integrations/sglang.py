"""SGLang's per-layer expert-weight update on packed slabs; importing this module never imports SGLang.

:func:`update_expert_weights_single_layer` keeps the signature and semantics of SGLang's function of
that name (``sglang.srt.eplb.expert_location_updater``): one MoE layer's routed-expert weights
rearranged from the old physical-to-logical map to the new one, sources on the destination's node
first, with elastic EP's ``active_ranks`` (ranks not active neither send nor receive). It returns
the logical experts this rank wants but no active rank held; :func:`read_missing` reads exactly
those from an :class:`expert_store.Checkpoint` into their slots.

Symbols: P physical experts (slots) per layer, S = num_local_physical_experts slots per rank,
R = P // S ranks. Slot p is row p % S of rank p // S.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from expert_store.checkpoint import Checkpoint
from expert_store.comm import DEFAULT_TIMEOUT_S
from expert_store.errors import StoreError
from expert_store.spec import ExpertSpec

from .moves import DEFAULT_STAGING_BYTES, Runner, agree, byte_rows, digest_parts, open_comm, plan_layer

__all__ = ["read_missing", "update_expert_weights_single_layer"]

_WHAT = "update_expert_weights_single_layer"


def _map(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise StoreError(f"{_WHAT}: {name} must be a 1-D integer [P] map, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def _active(active_ranks: object, R: int) -> list[bool]:
    """A mask of R entries: a bool or int (0/1) tensor / sequence of R entries, or a list of ranks."""
    if active_ranks is None:
        return [True] * R
    if isinstance(active_ranks, torch.Tensor):
        if active_ranks.dim() != 1 or active_ranks.numel() != R:
            shape = tuple(active_ranks.shape)
            raise StoreError(f"{_WHAT}: active_ranks as a tensor must be a mask [R={R}], got shape {shape}")
        return [bool(x) for x in active_ranks.tolist()]
    items = list(active_ranks)
    if items and all(isinstance(x, (bool, np.bool_)) for x in items):
        if len(items) != R:
            raise StoreError(f"{_WHAT}: active_ranks mask must have R = {R} entries, got {len(items)}")
        return [bool(x) for x in items]
    mask = [False] * R
    for r in items:  # a list of ranks
        if isinstance(r, bool) or not 0 <= int(r) < R:
            raise StoreError(f"{_WHAT}: active_ranks lists rank {r!r}, outside 0..{R - 1}")
        mask[int(r)] = True
    return mask


def update_expert_weights_single_layer(
    routed_experts_weights: Sequence[torch.Tensor],
    temp_buffers: Sequence[torch.Tensor] | None,
    old_physical_to_logical_map: Sequence[int] | torch.Tensor,
    new_physical_to_logical_map: Sequence[int] | torch.Tensor,
    num_local_physical_experts: int,
    num_gpu_per_node: int,
    rank: int,
    world_size: int | None = None,
    active_ranks: object = None,
    *,
    group=None,
    staging_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **newer,
) -> list[int]:
    """Rearrange one layer's routed-expert weights on this rank; returns the experts nobody could send.

    Args:
        routed_experts_weights: the layer's contiguous tensors ``[S, ...]`` (any dtypes), moved as bytes.
        temp_buffers: SGLang's scratch tensors; not needed (staging is this call's own, bounded by
            ``staging_bytes``, default 1 GiB) and not touched.
        old_physical_to_logical_map, new_physical_to_logical_map: int [P] (list or tensor): logical
            expert of each slot, -1 for an empty slot.
        num_local_physical_experts: S.
        num_gpu_per_node: ranks per node; a holder on this node is preferred as the source.
        rank: this rank in ``group`` (SGLang passes its global rank; group None is the default group).
        world_size: R; checked against the group and P // S when given.
        active_ranks: elastic EP: a bool or 0/1 mask [R] (tensor or list of bools), or a list of
            rank ids. Inactive ranks are never sources or destinations and must not call.
        group: the process group (None: the default group).

    Semantics: each slot whose new expert e differs from its old one takes e from this rank's own
    old slots when it held e, else from an active holder of e (on this node when one exists),
    spread over the holders; duplicates of e on this rank travel once. Unchanged slots, -1 slots
    and slots of missing experts are left as they were.

    Returns:
        sorted logical experts that some slot of this rank wants and no active rank held: read them
        with :func:`read_missing`.

    Raises:
        StoreError: malformed maps or tensors, an inactive calling rank, ranks that called with other
            maps (AgreementError); PeerTimeoutError: a peer that did not answer within ``timeout_s``.
    """
    del temp_buffers, newer  # accepted for SGLang's signature; nothing here needs them
    S = int(num_local_physical_experts)
    old = _map(old_physical_to_logical_map, "old_physical_to_logical_map")
    new = _map(new_physical_to_logical_map, "new_physical_to_logical_map")
    if S <= 0 or old.size % S or old.shape != new.shape:
        raise StoreError(
            f"{_WHAT}: maps of {old.size} and {new.size} slots with num_local_physical_experts={S}: expected equal "
            f"lengths P, a multiple of S"
        )
    R = old.size // S
    if world_size is not None and int(world_size) != R:
        raise StoreError(f"{_WHAT}: world_size={world_size}, but P={old.size} slots / S={S} give {R} ranks")
    live = _active(active_ranks, R)
    if not 0 <= rank < R or not live[rank]:
        raise StoreError(f"{_WHAT}: rank {rank} is not an active rank of 0..{R - 1}; inactive ranks must not call")
    rows = byte_rows(routed_experts_weights, S, f"{_WHAT}: rank {rank}")
    device = rows[0].device
    comm = open_comm(group, device, timeout_s, _WHAT)
    try:
        if comm.rank != rank or (comm.world_size not in (1, R)):
            raise StoreError(
                f"{_WHAT}: rank {rank} of {R} given, the process group says rank {comm.rank} of {comm.world_size}"
            )
        plan = plan_layer(old, new, num_ranks=R, live=live, ranks_per_node=int(num_gpu_per_node) or None)
        budget = DEFAULT_STAGING_BYTES if staging_bytes is None else int(staging_bytes)
        live_ranks = [r for r in range(R) if live[r]]
        shapes = [tuple(r.shape) for r in rows]
        agree(comm, live_ranks, digest_parts(old, new, np.array(live), shapes=shapes, extra=[budget, S]), _WHAT)
        Runner(comm, [rows], budget).run([plan], what=_WHAT)
    finally:
        comm.close()
    return sorted({e for r, e, _ in plan.missing if r == rank})


def read_missing(
    checkpoint: Checkpoint,
    spec: ExpertSpec,
    layer: int,
    missing: Sequence[int],
    routed_experts_weights: Sequence[torch.Tensor],
    new_physical_to_logical_map: Sequence[int] | torch.Tensor,
    num_local_physical_experts: int,
    rank: int,
    *,
    names: Sequence[str] | None = None,
) -> int:
    """Read the ``missing`` experts of ``layer`` from ``checkpoint`` into every local slot that wants them.

    Args:
        checkpoint: an open :class:`expert_store.Checkpoint` whose names match ``spec``.
        spec: the experts' :class:`expert_store.ExpertSpec`; tensor i of the spec (or ``names[i]``)
            is ``routed_experts_weights[i]``, whose rows have the spec tensor's shape and dtype.
        layer: the store layer (``Checkpoint(layers=...)`` maps it to the checkpoint's layer).
        missing: logical experts, as :func:`update_expert_weights_single_layer` returned them.
        routed_experts_weights, new_physical_to_logical_map, num_local_physical_experts, rank: as there.
        names: spec tensor names in the order of ``routed_experts_weights`` (default: the spec's order).

    Each expert is read once, into its first slot, and copied into its other slots on this rank.
    Returns the number of slots written. Raises CheckpointError / StoreError (naming the tensor,
    layer or expert) before anything is written when names, shapes or dtypes do not match.
    """
    what = "read_missing"
    S = int(num_local_physical_experts)
    new = _map(new_physical_to_logical_map, "new_physical_to_logical_map")
    names = list(spec.names if names is None else names)
    if len(names) != len(routed_experts_weights):
        raise StoreError(
            f"{what}: {len(routed_experts_weights)} weight tensors but {len(names)} spec names {names}; pass names="
        )
    mine = new[rank * S : (rank + 1) * S].tolist()
    targets, copies = [], []
    for e in sorted(set(int(x) for x in missing)):
        slots = [s for s, x in enumerate(mine) if x == e]
        if not slots:
            raise StoreError(f"{what}: layer {layer}: expert {e} is not in rank {rank}'s new slots")
        targets.append((layer, e, {n: w[slots[0]] for n, w in zip(names, routed_experts_weights)}))
        copies.extend((slots[0], s) for s in slots[1:])
    if targets:
        checkpoint.read_into(spec, targets)
    for src, dst in copies:
        for w in routed_experts_weights:
            w[dst].copy_(w[src])
    return len(targets) + len(copies)

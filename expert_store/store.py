"""ExpertStore: one rank's experts in resident slabs, versioned by manifests.

Symbols: L layers, E logical experts, R ranks (world size), S slots per rank,
P = R * S physical slots; local slot s of rank r is physical slot r * S + s.

Lifecycle (DESIGN.md section 3):

* :meth:`ExpertStore.create` loads this rank's slots from the checkpoint and
  commits version 1 with a checksum per (layer, logical expert);
* :meth:`ExpertStore.open` reopens the current version and reloads this rank's
  slots (checked against the manifest's checksums);
* :meth:`ExpertStore.join` gives a restarted rank an empty store at the
  current version, to be filled by ``rebalance(..., fresh=(rank,))``;
* :meth:`ExpertStore.rebalance` is collective over the live ranks: agree,
  plan, move (packed slabs per peer, local copies, checkpoint reads), verify
  (optional), commit version + 1.

A store never claims a version whose bytes are not in place: if a rebalance
fails after bytes started to move, the store is marked unusable until it is
reopened, and the manifest is not advanced.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expert_store.kernels import pack_records, resident_checksums, unpack_records

from .checkpoint import Checkpoint
from .comm import DEFAULT_TIMEOUT_S, Comm
from .errors import AgreementError, IntegrityError, ManifestError, PlacementError, StoreError
from .execute import BackgroundCall, ChunkedRun, ExecutionStats, copy_slots, run_disk_reads, run_post_copies
from .layout import ResidentSlabs, SlabLayout
from .manifest import Manifest, ManifestLog, PreparedManifest, decode_manifest
from .placement import Placement
from .plan import RebalancePlan, plan_chunks
from .spec import ExpertSpec

__all__ = ["DEFAULT_ROUND_BYTES", "DEFAULT_STAGING_BYTES", "ExpertStore", "RebalanceReport"]

# 1 GiB: two rounds in flight, under 1% of an H200's memory.
DEFAULT_STAGING_BYTES = 1 << 30
# 256 MiB of records per rank and round (sent + received): small enough that packing
# round k+1 and unpacking round k-1 hide behind the transfer of round k, large enough
# that NCCL runs near its peak (one-way 256 MiB: 320 GB/s vs 353 GB/s at 1 GiB on H200s).
DEFAULT_ROUND_BYTES = 256 << 20


@dataclass
class RebalanceReport:
    """What one rank did in one rebalance (byte counts exactly as DESIGN.md section 3)."""

    version: int
    bytes_p2p: int
    bytes_local: int
    bytes_disk: int
    missing: dict[int, list[int]]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    staging_peak: int = 0
    rounds: int = 0
    verified: bool = False
    timeline: list | None = None  # EXPERT_STORE_TIMELINE=1 on CUDA: per round GPU ms (packed, received, unpacked)


def _device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _digest_words(*parts: bytes) -> list[int]:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return list(struct.unpack("<4q", h.digest()))


class ExpertStore:
    """One rank's experts. Build with :meth:`create`, :meth:`open` or :meth:`join`."""

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise StoreError("use ExpertStore.create, ExpertStore.open or ExpertStore.join")

    # ------------------------------------------------------------------ setup
    @classmethod
    def _new(
        cls,
        root,
        *,
        spec: ExpertSpec,
        placement: Placement,
        checkpoint: Checkpoint,
        rank: int,
        world_size: int,
        device,
        group,
        ranks_per_node: int | None,
        timeout_s: float,
    ) -> ExpertStore:
        self = cls(_token=_PRIVATE)
        if not isinstance(spec, ExpertSpec):
            raise StoreError(f"spec must be an ExpertSpec, got {type(spec).__name__}")
        if not isinstance(placement, Placement):
            raise StoreError(f"placement must be an es.Placement, got {type(placement).__name__}")
        if not isinstance(checkpoint, Checkpoint):
            raise StoreError(f"checkpoint must be an es.Checkpoint, got {type(checkpoint).__name__}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise StoreError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise StoreError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
        if placement.num_ranks != world_size:
            raise StoreError(
                f"rank {rank}: the placement is for {placement.num_ranks} ranks, world_size is {world_size}"
            )
        if ranks_per_node is not None and (not isinstance(ranks_per_node, int) or ranks_per_node <= 0):
            raise StoreError(f"ranks_per_node must be a positive int or None, got {ranks_per_node!r}")
        self.root = Path(root)
        self.spec = spec
        self.checkpoint = checkpoint
        self.rank = rank
        self.world_size = world_size
        self.device = _device(device)
        self.ranks_per_node = ranks_per_node
        self._placement = placement
        self.layout = SlabLayout.build(spec, num_layers=placement.num_layers, slots=placement.slots_per_rank)
        self.log = ManifestLog(self.root)
        self.comm = Comm(group, rank=rank, world_size=world_size, device=self.device, timeout_s=timeout_s)
        self.slabs = ResidentSlabs(self.layout, self.device)
        _warm_kernels(self.slabs)
        self._version = 0
        self._alive = torch.ones(world_size, dtype=torch.bool)
        self._checksums = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.int64)
        self._empty = False  # joined, not yet filled
        self._broken: str | None = None  # set when bytes may not match the version
        # Retention: after each rebalance commit keep only this many newest versions (None: all).
        self.keep_versions: int | None = None
        self._staging: torch.Tensor | None = None  # reserve_staging()
        return self

    @classmethod
    def create(
        cls,
        root,
        *,
        spec: ExpertSpec,
        placement: Placement,
        checkpoint: Checkpoint,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        group=None,
        ranks_per_node: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ExpertStore:
        """Load this rank's slots from ``checkpoint`` and commit version 1.

        Collective over all R ranks (all are alive at creation)."""
        self = cls._new(
            root,
            spec=spec,
            placement=placement,
            checkpoint=checkpoint,
            rank=rank,
            world_size=world_size,
            device=device,
            group=group,
            ranks_per_node=ranks_per_node,
            timeout_s=timeout_s,
        )
        live = list(range(world_size))
        status = 0
        existing = self.log.latest()
        if existing is not None:
            status = 1
        row = torch.tensor([status, *_digest_words(repr(spec).encode(), placement.digest())], dtype=torch.int64)
        table = self.comm.allgather_live(live, row, what="create agreement")
        if existing is not None:
            raise ManifestError(
                f"rank {rank}: a store already exists under {self.log.path_of(existing)} (version {existing}); "
                "use ExpertStore.open"
            )
        bad = [live[i] for i in range(len(live)) if int(table[i, 0]) != 0]
        if bad:
            raise ManifestError(f"rank {rank}: ranks {bad} found an existing store at their root; nothing created")
        differ = [live[i] for i in range(len(live)) if not torch.equal(table[i, 1:], table[0, 1:])]
        if differ:
            raise AgreementError(
                f"rank {rank}: ranks {differ} were given another spec or placement than rank {live[0]}"
            )
        checkpoint.validate(spec, num_layers=placement.num_layers, num_experts=placement.num_experts)
        self._load_own_slots()
        sums = self._own_checksums()
        self._checksums = self._gather_checksums(sums, live)
        # Every rank commits the same bytes (a shared root accepts identical commits): the
        # creation time is the leader's.
        stamp = self.comm.allgather_live(live, torch.tensor([time.time_ns()]), what="create completion")
        self._commit(version=1, parent=None, reason="create", stats={}, created=int(stamp[0, 0]) / 1e9)
        return self

    @classmethod
    def _from_manifest(
        cls, root, *, checkpoint, rank, world_size, device, group, timeout_s
    ) -> tuple[ExpertStore, Manifest]:
        log = ManifestLog(Path(root))
        m = log.read()  # latest; ManifestError naming the file if missing or corrupt
        if checkpoint is None:
            ck = m.checkpoint
            checkpoint = Checkpoint(ck["path"], names=ck["names"], layers=ck.get("layers"))
        elif not isinstance(checkpoint, Checkpoint):
            raise StoreError(f"checkpoint must be an es.Checkpoint or None, got {type(checkpoint).__name__}")
        else:
            mine = checkpoint.to_dict()
            if mine["names"] != m.checkpoint["names"] or mine["layers"] != m.checkpoint.get("layers"):
                raise StoreError(
                    f"rank {rank}: checkpoint name mapping/layers differ from those recorded in "
                    f"{log.path_of(m.version)}"
                )
        if world_size != m.num_ranks:
            raise StoreError(
                f"rank {rank}: {log.path_of(m.version)} is for {m.num_ranks} ranks, world_size is {world_size}"
            )
        self = cls._new(
            root,
            spec=m.spec,
            placement=m.placement(),
            checkpoint=checkpoint,
            rank=rank,
            world_size=world_size,
            device=device,
            group=group,
            ranks_per_node=m.ranks_per_node,
            timeout_s=timeout_s,
        )
        self._version = m.version
        self._alive = m.alive.clone()
        self._checksums = m.checksums.clone()
        return self, m

    @classmethod
    def open(
        cls,
        root,
        *,
        checkpoint: Checkpoint | None = None,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ExpertStore:
        """Reopen the current version and reload this rank's slots (checked against the manifest).

        Not collective: each rank reopens on its own. ``checkpoint=None`` uses
        the checkpoint recorded in the manifest."""
        self, m = cls._from_manifest(
            root,
            checkpoint=checkpoint,
            rank=rank,
            world_size=world_size,
            device=device,
            group=group,
            timeout_s=timeout_s,
        )
        if not bool(m.alive[rank]):
            raise StoreError(
                f"rank {rank} holds no slots in version {m.version} of {self.root} (it was dead); "
                "use ExpertStore.join and a rebalance with fresh=(rank,)"
            )
        self.checkpoint.validate(self.spec, num_layers=m.num_layers, num_experts=m.num_experts)
        self._load_own_slots()
        self.verify()
        return self

    @classmethod
    def join(
        cls,
        root,
        *,
        checkpoint: Checkpoint | None = None,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ExpertStore:
        """A restarted rank: an empty store at the current version; fill it with
        ``rebalance(..., fresh=(rank,))`` called by every live rank."""
        self, _ = cls._from_manifest(
            root,
            checkpoint=checkpoint,
            rank=rank,
            world_size=world_size,
            device=device,
            group=group,
            timeout_s=timeout_s,
        )
        self._empty = True
        return self

    # ----------------------------------------------------------------- access
    @property
    def version(self) -> int:
        return self._version

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def alive(self) -> torch.Tensor:
        """bool [R]: ranks whose slots are filled in the current version."""
        return self._alive.clone()

    @property
    def checksums(self) -> torch.Tensor:
        """int64 [L, E]: the manifest's checksum of each (layer, logical expert)."""
        return self._checksums.clone()

    def weights(self, name: str, layer: int) -> torch.Tensor:
        """``[S, *shape]`` zero-copy view of tensor ``name`` in ``layer``; its address never changes."""
        return self.slabs.weights(name, layer)

    def local_experts(self) -> torch.Tensor:
        """int64 [L, S]: logical expert in each of this rank's slots (current version)."""
        return self._placement.rank_experts(self.rank)

    # ---------------------------------------------------------------- loading
    def _load_own_slots(self) -> None:
        """Read each distinct expert of this rank once from the checkpoint, then copy duplicates."""
        experts = self.local_experts()
        targets = []
        dup_l, dup_src, dup_dst = [], [], []
        for layer in range(self.layout.num_layers):
            first: dict[int, int] = {}
            for s, e in enumerate(experts[layer].tolist()):
                if e in first:
                    dup_l.append(layer)
                    dup_src.append(first[e])
                    dup_dst.append(s)
                else:
                    first[e] = s
                    targets.append((layer, e, self.slabs.slot_tensors(layer, s)))
        self.checkpoint.read_into(self.spec, targets)
        copy_slots(self.slabs, dup_l, dup_src, dup_dst, budget=DEFAULT_STAGING_BYTES // 4)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _own_checksums(self) -> torch.Tensor:
        """int64 [L, S] checksum of every local slot (Triton kernel)."""
        L, S = self.layout.num_layers, self.layout.slots
        layers = torch.arange(L, dtype=torch.int64).repeat_interleave(S)
        slots = torch.arange(S, dtype=torch.int64).repeat(L)
        return resident_checksums(self.slabs.storage, self.layout, layers, slots).cpu().view(L, S)

    def _gather_checksums(self, own: torch.Tensor, live: list[int]) -> torch.Tensor:
        """Combine every rank's slot checksums into the [L, E] table (holders must agree)."""
        L, E = self._placement.num_layers, self._placement.num_experts
        experts = self.local_experts()
        table = torch.zeros(L, E, dtype=torch.int64)
        held = torch.zeros(L, E, dtype=torch.int64)
        table.scatter_(1, experts, own)
        held.scatter_(1, experts, torch.ones_like(own))
        # Duplicates of one expert on this rank must agree too.
        again = torch.zeros(L, E, dtype=torch.int64).scatter_(1, experts, own)
        if not torch.equal(torch.gather(again, 1, experts), own):
            raise IntegrityError(f"rank {self.rank}: two slots of one expert hold different bytes after loading")
        rows = self.comm.allgather_live(live, torch.cat([table.view(-1), held.view(-1)]), what="checksum table")
        sums = rows[:, : L * E].view(-1, L, E)
        have = rows[:, L * E :].view(-1, L, E).bool()
        out = torch.zeros(L, E, dtype=torch.int64)
        seen = torch.zeros(L, E, dtype=torch.bool)
        for i in range(len(live)):
            clash = seen & have[i] & (out != sums[i])
            if bool(clash.any()):
                layer, e = (int(v) for v in clash.nonzero()[0])
                raise IntegrityError(
                    f"rank {live[i]} loaded layer {layer} expert {e} with other bytes than another rank"
                )
            out = torch.where(have[i] & ~seen, sums[i], out)
            seen |= have[i]
        if not bool(seen.all()):
            layer, e = (int(v) for v in (~seen).nonzero()[0])
            raise IntegrityError(f"no rank holds layer {layer} expert {e} after create")
        return out

    # ------------------------------------------------------------------ verify
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StoreError(f"rank {self.rank}: store is unusable ({self._broken}); reopen it with ExpertStore.open")

    def reserve_staging(self, nbytes: int | None = None) -> int:
        """Allocate the rebalance staging now and keep it (default :data:`DEFAULT_STAGING_BYTES`).

        Rebalances with ``staging_bytes <= nbytes`` then take their buffers from it and allocate
        no device memory; larger ones allocate as usual. Call it before the engine sizes its
        KV cache, so the memory is accounted for. Returns the bytes reserved.

        Raises:
            StoreError: naming the rank and device, if the memory cannot be allocated.
        """
        nbytes = DEFAULT_STAGING_BYTES if nbytes is None else nbytes
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise StoreError(f"rank {self.rank}: reserve_staging needs a positive int of bytes, got {nbytes!r}")
        self._staging = None  # the old reservation goes first
        try:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:
            raise StoreError(
                f"rank {self.rank}: cannot reserve {nbytes} bytes of staging on {self.device}: {e}"
            ) from None
        return nbytes

    @property
    def staging_reserved(self) -> int:
        """Bytes of staging held by :meth:`reserve_staging` (0: none)."""
        return 0 if self._staging is None else self._staging.numel()

    def _arena(self, staging_bytes: int) -> torch.Tensor | None:
        """The reserved staging for a rebalance with this budget, or None to allocate."""
        if self._staging is None or self._staging.numel() < staging_bytes:
            return None
        return self._staging[:staging_bytes]

    def verify(self, *, slots: Iterable[tuple[int, int]] | None = None) -> int:
        """Recompute slot checksums (Triton kernel) and compare them with the manifest.

        Args:
            slots: (layer, local slot) pairs to check; default all of this rank's slots.
        Returns the number of slots checked. Raises IntegrityError naming layer,
        slot and expert at the first mismatch."""
        self._check_usable()
        if self._empty:
            raise StoreError(f"rank {self.rank}: store was joined and holds nothing yet; rebalance with fresh=(rank,)")
        if not bool(self._alive[self.rank]):
            raise StoreError(f"rank {self.rank} holds no slots in version {self._version}")
        experts = self.local_experts()
        S = self.layout.slots
        if slots is None:
            pairs = [(layer, s) for layer in range(self.layout.num_layers) for s in range(S)]
        else:
            pairs = [(int(a), int(b)) for a, b in slots]
        if not pairs:
            return 0
        layers = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        sl = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        got = resident_checksums(self.slabs.storage, self.layout, layers, sl).cpu()
        want = self._checksums[layers, experts[layers, sl]]
        bad = (got != want).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            layer, s = pairs[i]
            raise IntegrityError(
                f"rank {self.rank}: layer {layer} slot {s} (physical {self.rank * S + s}) should hold expert "
                f"{int(experts[layer, s])} of version {self._version} but its checksum differs "
                f"({int(bad.shape[0])} of {len(pairs)} slots differ)"
            )
        return len(pairs)

    # --------------------------------------------------------------- rebalance
    def rebalance(
        self,
        new_placement: Placement,
        alive: Sequence[bool] | torch.Tensor | None = None,
        fresh: Iterable[int] = (),
        staging_bytes: int | None = None,
        verify: bool = False,
        *,
        round_bytes: int | None = None,
    ) -> RebalanceReport:
        """Move to ``new_placement``; collective over the live ranks (``alive[r]`` true).

        Dead ranks must not call it; they are never contacted. ``fresh`` lists
        live ranks whose memory is empty (joined). Staging memory on this rank
        never exceeds ``staging_bytes`` (default :data:`DEFAULT_STAGING_BYTES`);
        each round moves at most ``min(round_bytes, staging_bytes // 2)`` bytes of
        records per rank (default :data:`DEFAULT_ROUND_BYTES`), ``staging_bytes // 4``
        when a large rebalance is planned in layer chunks (README, "Chunks")."""
        t_start = time.perf_counter()
        # Work the caller queued before this call (on its current stream) comes first: rounds and
        # late reads go on that stream; early checkpoint reads, from a thread, wait for this event.
        entry = torch.cuda.Event() if self.device.type == "cuda" else None
        if entry is not None:
            entry.record()
        phases: dict[str, float] = {}
        R = self.world_size
        # -- local validation; errors are shared through the agreement so all ranks fail together
        problem: StoreError | None = None
        try:
            alive_t, fresh_t, staging_bytes, round_bytes = self._check_rebalance_args(
                new_placement, alive, fresh, staging_bytes, round_bytes
            )
        except StoreError as e:
            problem = e
            alive_t = _mask_or_all(alive, R)
            fresh_t = []
        live = [r for r in range(R) if alive_t[r]]
        if self.rank not in live:
            live = sorted([*live, self.rank])
        # -- plan, and take the staging, before the agreement message goes out: a rank that cannot
        #    (out of device memory, say) refuses, so every rank stops before anything moves. The plan
        #    only depends on inputs being agreed; it is dropped if they differ, or recomputed if this
        #    rank's state is replaced (a fresh rank whose root is behind).
        plan_or_error: ChunkedRun | StoreError | None = None
        if problem is None:
            t1 = time.perf_counter()
            plan_or_error = self._prepare_rounds(new_placement, alive_t, fresh_t, staging_bytes, round_bytes)
            phases["plan"] = time.perf_counter() - t1
        if problem is not None:
            status = _REFUSED
        elif isinstance(plan_or_error, StoreError) and self.rank not in fresh_t:
            status = _NOT_PREPARED  # a fresh rank's plan may rest on a stale state: it says nothing yet
        else:
            status = 0
        # -- agreement: every live rank on the same (new placement, alive, fresh, staging, verify);
        #    every non-fresh live rank on the same current state (version, placement, alive mask)
        t0 = time.perf_counter()
        common = _digest_words(
            new_placement.digest() if isinstance(new_placement, Placement) else b"?",
            bytes(alive_t),
            struct.pack(f"<{len(fresh_t)}q", *fresh_t),
            struct.pack("<q", staging_bytes if isinstance(staging_bytes, int) else -1),
            struct.pack("<q", round_bytes if isinstance(round_bytes, int) else -1),
            struct.pack("<?", bool(verify)),
        )
        state = _digest_words(struct.pack("<q", self._version), self._placement.digest(), bytes(self._alive.tolist()))
        row = torch.tensor([status, *common, *state, self._version, time.time_ns()], dtype=torch.int64)
        gather = self.comm.start_allgather_live(live, row, what="rebalance agreement")
        if isinstance(plan_or_error, ChunkedRun):
            plan_or_error.prepack()  # round 0 into staging (no slot written, nothing sent) while messages travel
        table = gather.result()
        phases["agree"] = time.perf_counter() - t0
        if problem is not None:
            raise problem
        if status == _NOT_PREPARED:
            raise plan_or_error
        refused = {live[i]: int(table[i, 0]) for i in range(len(live)) if int(table[i, 0]) != 0}
        if refused:
            why = {_REFUSED: "bad arguments", _NOT_PREPARED: "no plan or no staging memory for it"}
            raise StoreError(
                f"rank {self.rank}: rebalance refused before anything moved by "
                + ", ".join(f"rank {r} ({why.get(c, f'status {c}')})" for r, c in sorted(refused.items()))
            )
        differ = [live[i] for i in range(len(live)) if not torch.equal(table[i, 1:5], table[0, 1:5])]
        if differ:
            raise AgreementError(
                f"rank {self.rank}: ranks {differ} disagree with rank {live[0]} on (new placement, alive, fresh, "
                f"staging_bytes, round_bytes, verify); nothing moved, version stays {self._version}"
            )
        holders = [i for i, r in enumerate(live) if r not in fresh_t]
        if not holders:
            raise StoreError(f"rank {self.rank}: every live rank is fresh; reopen the store with ExpertStore.open")
        ref = holders[0]
        stale = [live[i] for i in holders if not torch.equal(table[i, 5:10], table[ref, 5:10])]
        if stale:
            raise AgreementError(
                f"rank {self.rank}: ranks {stale} hold another version or placement than rank {live[ref]} "
                f"(versions {[int(table[i, 9]) for i in holders]}); nothing moved"
            )
        behind = [
            live[i] for i, r in enumerate(live) if r in fresh_t and not torch.equal(table[i, 5:10], table[ref, 5:10])
        ]
        if behind:
            self._sync_fresh(live[ref], behind)
            if self.rank in behind:  # the speculative plan used the stale state
                t1 = time.perf_counter()
                plan_or_error = self._prepare_rounds(new_placement, alive_t, fresh_t, staging_bytes, round_bytes)
                if isinstance(plan_or_error, ChunkedRun):
                    plan_or_error.prepack()
                phases["plan"] = time.perf_counter() - t1
        if isinstance(plan_or_error, StoreError):
            raise plan_or_error  # deterministic: every live rank raises the same, before anything moves
        created = int(table[0, 10]) / 1e9  # the leader's clock: every rank commits identical bytes
        execution = plan_or_error
        stats = ExecutionStats()
        new_version = self._version + 1
        prepared: list[PreparedManifest] = []
        prepare_error: list[str] = []

        def write_manifest() -> None:
            """The new manifest is fully known: write and fsync it while the last round is in flight.

            A failure here is shared through the completion messages, so no rank commits."""
            plan = execution.plan
            totals = {
                key: sum(getattr(a, key) for a in plan.accounts.values())
                for key in ("bytes_p2p", "bytes_local", "bytes_disk")
            }
            manifest = self._manifest(
                version=new_version,
                parent=self._version,
                reason="rebalance",
                created=created,
                placement=new_placement,
                alive=torch.tensor(alive_t, dtype=torch.bool),
                stats={
                    **totals,
                    "moves": len(plan.moves),
                    "disk_reads": len(plan.disk_reads),
                    "post_copies": len(plan.post_copies),
                    "rounds": execution.rounds,
                    "staging_bytes": staging_bytes,
                    "round_bytes": round_bytes,
                    "live_ranks": len(live),
                    "fresh_ranks": len(fresh_t),
                },
            )
            try:
                prepared.append(self.log.prepare(manifest))
            except StoreError as e:
                prepare_error.append(str(e))

        # -- execute: from here on, bytes move
        disk = dict(slabs=self.slabs, checkpoint=self.checkpoint, staging_bytes=staging_bytes // 4)
        reader: BackgroundCall | None = None
        late: list = []

        def start_disk_reads(plan: RebalancePlan) -> None:
            """Checkpoint reads of a chunk into slots no move reads start at once, one chunk after
            the other in a background thread; the others wait for the rounds (they free the slot)."""
            nonlocal reader
            my_disk = [d for d in plan.disk_reads if d.rank == self.rank]
            read_first = {(m.layer, m.src_slot) for m in plan.moves if m.src_rank == self.rank}
            early = [d for d in my_disk if (d.layer, d.slot) not in read_first]
            late.extend(d for d in my_disk if (d.layer, d.slot) in read_first)
            if early:
                reader = BackgroundCall(_read_after, reader, early, entry, name="expert-store-disk", **disk)

        try:
            t0 = time.perf_counter()
            plan = execution.run(stats, on_plan=start_disk_reads, while_in_flight=write_manifest)
            phases["exchange"] = time.perf_counter() - t0
            phases.update(stats.seconds)  # host_pack / host_wait / host_unpack: host time inside the exchange
            t0 = time.perf_counter()
            if reader is not None:
                reader.result()
            run_disk_reads(late, **disk)  # slots whose old content the moves needed: only now free
            phases["disk_wait"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            my_post = [c for c in plan.post_copies if c.rank == self.rank]
            used = run_post_copies(
                my_post, slabs=self.slabs, budget=staging_bytes // 2, scratch=self._arena(staging_bytes)
            )
            stats.staging_peak = max(stats.staging_peak, used)
            if self.device.type == "cuda":
                self.comm.sync_device(self.device, what="post copies")
            phases["local_copy"] = time.perf_counter() - t0
        except BaseException as e:
            self._broken = f"rebalance to version {self._version + 1} failed while moving bytes: {e}"
            if reader is not None:
                reader.wait()  # no thread writes slots once the call has returned
            _discard(prepared)
            raise
        acct = plan.accounts[self.rank]
        # -- bytes are in place on this rank; adopt the new placement, then check
        self._placement = new_placement
        self._empty = False
        old_alive = self._alive
        self._alive = torch.tensor(alive_t, dtype=torch.bool)
        # completion status: 1 done; _VERIFY_FAILED or _MANIFEST_FAILED stop every rank's commit
        status = _MANIFEST_FAILED if prepare_error else 1
        problem_text = prepare_error[0] if prepare_error else ""
        if verify and status == 1:
            t0 = time.perf_counter()
            changed = sorted((layer, s) for (r, layer, s) in plan.changed if r == self.rank)
            try:
                self.verify(slots=changed)
            except IntegrityError as e:
                status = _VERIFY_FAILED
                problem_text = str(e)
            phases["verify"] = time.perf_counter() - t0
        # -- commit once every live rank has finished
        t0 = time.perf_counter()
        try:
            done = self.comm.allgather_live(
                live, torch.tensor([status], dtype=torch.int64), what="rebalance completion"
            )
        except StoreError as e:
            self._broken = f"rebalance to version {self._version + 1} did not complete on every rank: {e}"
            _discard(prepared)
            raise
        codes = [int(done[i, 0]) for i in range(len(live))]
        if any(c != 1 for c in codes):
            bad_verify = [r for r, c in zip(live, codes) if c == _VERIFY_FAILED]
            bad_write = [r for r, c in zip(live, codes) if c not in (1, _VERIFY_FAILED)]
            reasons = ([f"verification failed on ranks {bad_verify}"] if bad_verify else []) + (
                [f"the manifest could not be written on ranks {bad_write}"] if bad_write else []
            )
            self._broken = f"{'; '.join(reasons)} after rebalance to version {self._version + 1}"
            self._alive = old_alive
            _discard(prepared)
            error = IntegrityError if bad_verify else ManifestError
            raise error(
                f"rank {self.rank}: rebalance not committed: {'; '.join(reasons)}"
                + (f" ({problem_text})" if problem_text else "")
            )
        try:
            prepared[0].publish()
        except BaseException:
            self._broken = f"commit of version {new_version} under {self.root} failed"
            _discard(prepared)
            raise
        self._version = new_version
        if self.keep_versions is not None:
            self.log.prune(keep=self.keep_versions)
        phases["commit"] = time.perf_counter() - t0
        return RebalanceReport(
            version=new_version,
            bytes_p2p=acct.bytes_p2p,
            bytes_local=acct.bytes_local,
            bytes_disk=acct.bytes_disk,
            missing={k: list(v) for k, v in sorted(acct.missing.items())},
            seconds=time.perf_counter() - t_start,
            phase_seconds=phases,
            staging_peak=stats.staging_peak,
            rounds=stats.rounds,
            verified=bool(verify),
            timeline=stats.timeline,
        )

    def _check_rebalance_args(self, new_placement, alive, fresh, staging_bytes, round_bytes):
        """Validate rebalance's arguments on this rank; returns (alive, fresh, staging_bytes, round_bytes)."""
        R = self.world_size
        self._check_usable()
        if not isinstance(new_placement, Placement):
            raise PlacementError(f"new_placement must be an es.Placement, got {type(new_placement).__name__}")
        alive_t = _mask(alive, R)
        try:
            fresh_t = sorted({int(r) for r in fresh})
        except (TypeError, ValueError):
            raise StoreError(f"fresh must be an iterable of rank numbers, got {fresh!r}") from None
        if staging_bytes is None:
            staging_bytes = DEFAULT_STAGING_BYTES
        if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes <= 0:
            raise StoreError(f"staging_bytes must be a positive int, got {staging_bytes!r}")
        if round_bytes is None:
            round_bytes = DEFAULT_ROUND_BYTES
        if isinstance(round_bytes, bool) or not isinstance(round_bytes, int) or round_bytes <= 0:
            raise StoreError(f"round_bytes must be a positive int, got {round_bytes!r}")
        if not alive_t[self.rank]:
            raise StoreError(f"rank {self.rank} is marked dead in `alive` but called rebalance")
        if self._empty and self.rank not in fresh_t:
            raise StoreError(f"rank {self.rank} was joined (holds nothing) but is not listed in fresh")
        mine, new = self._placement, new_placement
        dims = (new.num_layers, new.num_experts, new.num_ranks, new.slots_per_rank)
        if dims != (mine.num_layers, mine.num_experts, mine.num_ranks, mine.slots_per_rank):
            raise PlacementError(
                f"new placement (L, E, R, S) = {dims} differs from the store's "
                f"{(mine.num_layers, mine.num_experts, R, mine.slots_per_rank)}"
            )
        for r in fresh_t:
            if not 0 <= r < R or not alive_t[r]:
                raise StoreError(f"fresh rank {r} is not a live rank")
        new_placement.check_servable(torch.tensor(alive_t))
        return alive_t, fresh_t, staging_bytes, round_bytes

    def _prepare_rounds(self, new_placement: Placement, alive_t, fresh_t, staging_bytes: int, round_bytes: int):
        """A ChunkedRun with its first chunk planned and its staging taken, or the StoreError
        that stopped it (returned, not raised: the store shares it through the agreement).

        Plans are identical on every live rank that has the same inputs."""
        chunks = plan_chunks(
            self._placement,
            new_placement,
            expert_bytes=self.spec.nbytes,
            record_bytes=self.spec.record_bytes,
            staging_bytes=staging_bytes,
            round_bytes=round_bytes,
            old_alive=self._alive,
            alive=alive_t,
            fresh=fresh_t,
            ranks_per_node=self.ranks_per_node,
        )
        try:
            return ChunkedRun(
                chunks,
                rank=self.rank,
                slabs=self.slabs,
                comm=self.comm,
                staging_bytes=staging_bytes,
                arena=self._arena(staging_bytes),
            )
        except StoreError as e:
            return e

    def _sync_fresh(self, ref: int, behind: list[int]) -> None:
        """Fresh ranks whose manifest is older than the live ranks' (a rejoining rank with its own
        root) receive the current manifest from rank ``ref`` and adopt it before anything moves."""
        what = "current manifest for a fresh rank"
        if self.rank == ref:
            data = self.log.path_of(self._version).read_bytes()
            for r in behind:
                self.comm.send_blob(r, data, what=what)
            return
        if self.rank not in behind:
            return
        data = self.comm.recv_blob(ref, what=what)
        m = decode_manifest(data, source=f"current manifest received from rank {ref}")
        if m.spec != self.spec or (m.num_layers, m.num_experts, m.num_ranks, m.slots_per_rank) != (
            self._placement.num_layers,
            self._placement.num_experts,
            self.world_size,
            self._placement.slots_per_rank,
        ):
            raise ManifestError(f"rank {self.rank}: the manifest from rank {ref} describes another store")
        if (self.log.latest() or 0) < m.version:
            self.log.commit(m, adopt=True)
        self._version = m.version
        self._placement = m.placement()
        self._alive = m.alive.clone()
        self._checksums = m.checksums.clone()

    # ------------------------------------------------------------------ commit
    def _manifest(
        self,
        *,
        version: int,
        parent: int | None,
        reason: str,
        stats: dict,
        created: float,
        placement: Placement | None = None,
        alive: torch.Tensor | None = None,
    ) -> Manifest:
        placement = self._placement if placement is None else placement
        return Manifest(
            version=version,
            parent=parent,
            created=created,
            reason=reason,
            spec=self.spec,
            num_layers=placement.num_layers,
            num_experts=placement.num_experts,
            num_ranks=self.world_size,
            slots_per_rank=placement.slots_per_rank,
            ranks_per_node=self.ranks_per_node,
            phy2log=placement.phy2log,
            alive=(self._alive if alive is None else alive).clone(),
            checkpoint=self.checkpoint.to_dict(),
            checksums=self._checksums.clone(),
            stats={k: v for k, v in sorted(stats.items())},
        )

    def _commit(self, *, version: int, parent: int | None, reason: str, stats: dict, created: float | None = None):
        m = self._manifest(
            version=version,
            parent=parent,
            reason=reason,
            stats=stats,
            created=time.time() if created is None else created,
        )
        try:
            self.log.commit(m)
        except BaseException:
            self._broken = f"commit of version {version} under {self.root} failed"
            raise
        self._version = version

    def __repr__(self) -> str:
        L, S = self.layout.num_layers, self.layout.slots
        return (
            f"ExpertStore(root={os.fspath(self.root)!r}, rank={self.rank}/{self.world_size}, version={self._version}, "
            f"L={L}, S={S}, E={self._placement.num_experts}, device={self.device})"
        )


_PRIVATE = object()
_REFUSED = 1  # agreement status of a rank whose arguments were bad
_NOT_PREPARED = 2  # agreement status of a rank that could not plan or take the staging
_VERIFY_FAILED = 2  # completion status of a rank whose changed slots failed their checksums
_MANIFEST_FAILED = 3  # completion status of a rank that could not write the new manifest


def _discard(prepared: list[PreparedManifest]) -> None:
    """Remove the temporary file of a prepared manifest that will not be published."""
    for p in prepared:
        p.discard()


def _read_after(previous: BackgroundCall | None, reads, entry: torch.cuda.Event | None, **disk) -> int:
    """Checkpoint reads after those of ``previous`` (one reader at a time) and, on the GPU, after
    the caller's work queued before the rebalance (``entry``); returns bytes read.

    This runs in its own thread, whose current stream is not the caller's: without the event,
    a read could land in a slot before a kernel the caller queued earlier has used it."""
    done = previous.result() if previous is not None else 0
    if entry is None:
        return done + run_disk_reads(reads, **disk)
    stream = torch.cuda.Stream(disk["slabs"].device)
    stream.wait_event(entry)
    with torch.cuda.stream(stream):
        return done + run_disk_reads(reads, **disk)


def _warm_kernels(slabs: ResidentSlabs) -> None:
    """Compile (or load from Triton's cache) the pack, unpack and checksum kernels of this layout
    now, so the first rebalance does not pay for it (a few hundred ms on a fresh machine)."""
    if slabs.device.type != "cuda":
        return
    layout = slabs.layout
    one = torch.empty(layout.spec.record_bytes, dtype=torch.uint8, device=slabs.device)
    pack_records(slabs.storage, layout, [0], [0], out=one)
    unpack_records(one, slabs.storage, layout, [0], [0])  # the same bytes back: slot 0 is unchanged
    resident_checksums(slabs.storage, layout, [0], [0])
    torch.cuda.synchronize(slabs.device)  # before anything else (checkpoint reads) writes slot 0


def _mask_or_all(alive, n: int) -> tuple[bool, ...]:
    """_mask, or every rank alive when ``alive`` itself is malformed (the error is reported elsewhere)."""
    try:
        return _mask(alive, n)
    except StoreError:
        return (True,) * n


def _mask(alive, n: int) -> tuple[bool, ...]:
    if alive is None:
        return (True,) * n
    if isinstance(alive, torch.Tensor):
        alive = alive.tolist()
    try:
        values = tuple(bool(v) for v in alive)
    except TypeError:
        raise StoreError(f"alive must be a sequence of {n} bools, got {type(alive).__name__}") from None
    if len(values) != n:
        raise StoreError(f"alive must have one entry per rank ({n}), got {len(values)}")
    return values

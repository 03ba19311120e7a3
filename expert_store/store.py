"""ExpertStore: one rank's experts in resident slabs, versioned by manifests.

Symbols: L layers, E logical experts, R ranks (world size), S slots per rank,
P = R * S physical slots; local slot s of rank r is physical slot r * S + s.

Lifecycle:

* :meth:`ExpertStore.create` loads this rank's slots from the checkpoint and
  commits version 1 with a checksum per (layer, logical expert);
* :meth:`ExpertStore.open` reopens the current version and reloads this rank's
  slots (checked against the manifest's checksums);
* :meth:`ExpertStore.join` gives a restarted rank an empty store at the
  current version, to be filled by ``rebalance(..., fresh=(rank,))``;
* :meth:`ExpertStore.rebalance` is collective over the live ranks and reads as
  its five steps: validate, plan, agree, run, commit (version + 1);
* :meth:`ExpertStore.start_rebalance` validates, plans and agrees alike, then
  returns a :class:`~expert_store.job.RebalanceJob` that switches layers between
  forward passes (``job.step()``) and commits once the last one switched.

The committed manifest is the store's one record of its version, placement,
live ranks and checksums. A store never claims a version whose bytes are not in
place: if a call fails after bytes started to move, the store refuses every
further use until it is reopened, and the manifest is not advanced (a rebalance
job that fails commits the layers it switched instead: their bytes are in place). A store is
used by one thread at a time: a call made while another runs raises at once.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from expert_store.kernels import pack_records, resident_checksums, unpack_records

from .checkpoint import Checkpoint
from .checks import check_bool, check_bytes, check_device, check_index, check_int, check_timeout, is_int
from .comm import DEFAULT_TIMEOUT_S, Comm, Kind, call_id
from .errors import AgreementError, IntegrityError, ManifestError, PlacementError, StoreError
from .execute import RebalanceRun, allocate_staging, copy_slots, mismatched_slots
from .layout import ResidentSlabs, SlabLayout
from .manifest import Manifest, ManifestLog, PreparedManifest, check_keep_versions, decode_manifest, store_difference
from .messages import Agreement, Completion, Outcome, Status, digest_words, new_nonce
from .placement import Placement
from .plan import RebalancePlan, plan_chunks
from .spec import ExpertSpec

if TYPE_CHECKING:
    from .job import RebalanceJob

__all__ = ["DEFAULT_ROUND_BYTES", "DEFAULT_STAGING_BYTES", "ExpertStore", "RebalanceReport"]

# 1 GiB: two rounds in flight, under 1% of an H200's memory.
DEFAULT_STAGING_BYTES = 1 << 30
# 256 MiB of records per rank and round (sent + received): small enough that packing
# round k+1 and unpacking round k-1 hide behind the transfer of round k, large enough
# that NCCL runs near its peak (one-way 256 MiB: 320 GB/s vs 353 GB/s at 1 GiB on H200s).
DEFAULT_ROUND_BYTES = 256 << 20


@dataclass
class RebalanceReport:
    """What one rank did in one rebalance.

    Accounting is exact: each distinct expert the new placement puts on this rank that it
    did not hold before is brought once, from a live peer (``bytes_p2p``) or from the
    checkpoint (``bytes_disk``, listed in ``missing``); every other changed slot is a
    local copy (``bytes_local``); unchanged slots cost nothing."""

    version: int
    bytes_p2p: int
    bytes_local: int
    bytes_disk: int
    missing: dict[int, list[int]]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    staging_peak: int = 0
    rounds: int = 0
    verified: bool = True


class _Where(NamedTuple):
    """Where a store lives: its rank in which group, on which device, with which deadline."""

    rank: int | None
    world_size: int | None
    device: object
    group: object
    timeout_s: float


class _Call(NamedTuple):
    """The validated arguments of one rebalance."""

    new: Placement
    alive: tuple[bool, ...]
    fresh: tuple[int, ...]
    staging_bytes: int
    round_bytes: int
    verify: bool
    live: list[int]
    load: torch.Tensor | None = None  # float32 [L, E] on the CPU
    job_layers: int = 0  # start_rebalance's layers_per_step (0: the blocking rebalance)

    def inputs(self) -> tuple[int, int, int, int]:
        """What every live rank must have been given alike."""
        return digest_words(
            self.new.digest(),
            bytes(self.alive),
            struct.pack(f"<{len(self.fresh)}q", *self.fresh),
            struct.pack("<qq?", self.staging_bytes, self.round_bytes, self.verify),
            b"" if self.load is None else b"load" + self.load.numpy().astype("<f4", copy=False).tobytes(),
            struct.pack("<q", self.job_layers),
        )


def _resolve_ranks(rank, world_size, group) -> tuple[int, int]:
    """rank / world_size as given, or from ``group`` (or the default process group when
    torch.distributed is initialized), or 0 / 1 for a single process."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if group is not None or (dist.is_available() and dist.is_initialized()):
            try:
                g_rank, g_size = dist.get_rank(group), dist.get_world_size(group)
            except (RuntimeError, ValueError) as e:
                raise StoreError(f"cannot read rank and world size from the process group: {e}") from None
        else:
            g_rank, g_size = 0, 1
        rank = g_rank if rank is None else rank
        world_size = g_size if world_size is None else world_size
    world_size = check_int(world_size, "world_size", low=1)
    return check_int(rank, "rank", low=0, high=world_size - 1), world_size


class _CallGuard:
    """The context of :meth:`ExpertStore._call` (a class, not a generator: ``job.step()`` enters
    one per forward pass, where a generator context cost several times the host time)."""

    __slots__ = ("during_job", "store", "usable", "what")

    def __init__(self, store: ExpertStore, what: str, usable: bool, during_job: bool) -> None:
        self.store, self.what, self.usable, self.during_job = store, what, usable, during_job

    def __enter__(self) -> None:
        store, what = self.store, self.what
        if store._job is not None and not self.during_job:
            raise StoreError(
                f"rank {store.rank}: {what} called while a rebalance job is open on this store; "
                "finish it first (job.step() until job.done, or job.wait())"
            )
        if not store._lock.acquire(blocking=False):
            raise StoreError(
                f"rank {store.rank}: {what} called while {store._running} is running on this store; "
                "a store is used by one thread at a time"
            )
        store._running = what
        try:
            if store._closed:
                raise StoreError(f"rank {store.rank}: the store under {store.root} is closed")
            if self.usable:
                store._check_usable()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        self.store._running = None
        self.store._lock.release()


class ExpertStore:
    """One rank's experts. Build with :meth:`create`, :meth:`open` or :meth:`join`; release
    with :meth:`close` (or ``with``)."""

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise StoreError("use ExpertStore.create, ExpertStore.open or ExpertStore.join")

    # ------------------------------------------------------------------ setup
    @classmethod
    def _new(cls, root, spec, placement, checkpoint, ranks_per_node, where: _Where, weights) -> ExpertStore:
        self = cls(_token=_PRIVATE)
        self._lock = threading.Lock()
        self._running: str | None = None
        self._closed = False
        self._broken: str | None = None  # set when bytes may not match the version
        self._manifest: Manifest | None = None
        self._job = None  # the open RebalanceJob (start_rebalance), if any
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None  # routing(), made on first use
        if not isinstance(spec, ExpertSpec):
            raise StoreError(f"spec must be an ExpertSpec, got {type(spec).__name__}")
        if not isinstance(placement, Placement):
            raise StoreError(f"placement must be an es.Placement, got {type(placement).__name__}")
        if not isinstance(checkpoint, Checkpoint):
            raise StoreError(f"checkpoint must be an es.Checkpoint, got {type(checkpoint).__name__}")
        if not isinstance(root, (str, os.PathLike)):
            raise StoreError(f"root must be a path, got {type(root).__name__} {root!r}")
        rank, world_size = _resolve_ranks(where.rank, where.world_size, where.group)
        if placement.num_ranks != world_size:
            raise StoreError(
                f"rank {rank}: the placement is for {placement.num_ranks} ranks, world_size is {world_size}"
            )
        if ranks_per_node is not None:
            ranks_per_node = check_int(ranks_per_node, "ranks_per_node", low=1)
        self.root = Path(root)
        self.spec = spec
        self.checkpoint = checkpoint
        self.rank = rank
        self.world_size = world_size
        self.device = check_device(where.device, where=f"rank {rank}")
        self.ranks_per_node = ranks_per_node
        self._placement = placement  # the current manifest's (set with it in _adopt)
        self._empty = False  # joined: this rank's memory holds nothing yet
        self._keep_versions: int | None = None
        self._staging: torch.Tensor | None = None  # reserve_staging()
        self.layout = SlabLayout.build(spec, num_layers=placement.num_layers, slots=placement.slots_per_rank)
        self.log = ManifestLog(self.root)
        timeout_s = check_timeout(where.timeout_s)
        self._comm = Comm(where.group, rank=rank, world_size=world_size, device=self.device, timeout_s=timeout_s)
        try:
            self.slabs = ResidentSlabs(self.layout, self.device, weights=weights)
        except StoreError as e:
            self._comm.close()
            raise type(e)(f"rank {rank}: {e}") from None
        _warm_kernels(self.slabs)
        return self

    def _adopt(self, manifest: Manifest, placement: Placement | None = None) -> None:
        """Make ``manifest`` the store's current version (the one place its state changes);
        ``placement``: its placement when the caller holds it already validated."""
        self._placement = manifest.placement() if placement is None else placement
        self._manifest = manifest
        self._refresh_routing(range(self._placement.num_layers))

    def _refresh_routing(self, layers: Iterable[int]) -> None:
        """Write the current placement's ``layers`` into the routing tensors, in place."""
        layers = list(layers)
        if self._routing is None or not layers:
            return
        index = torch.tensor(layers, dtype=torch.int64, device=self.device)
        for live, rows in zip(self._routing, self._routing_rows(self.placement, layers)):
            live.index_copy_(0, index, rows)

    def _routing_rows(self, p: Placement, layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2phy int64 [n, E, X], logcnt int64 [n, E]) of placement ``p``'s ``layers`` (default
        all) on the store's device, in the layout of :meth:`routing`."""
        layers = list(range(p.num_layers)) if layers is None else layers
        X = p.num_physical - p.num_experts + 1
        log2phy = torch.full((len(layers), p.num_experts, X), -1, dtype=torch.int64)
        log2phy[:, :, : p.max_replicas] = p.log2phy[layers]
        return log2phy.to(self.device), p.logcnt[layers].to(self.device)

    def routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log2phy, logcnt)`` of the placement the slots hold, on the store's device.

        ``log2phy``: int64 [L, E, X], the physical slots of each (layer, logical expert),
        increasing, padded with -1, with X = P - E + 1 (the most replicas any placement of E
        experts in P slots can give one expert, so X never changes); ``logcnt``: int64 [L, E],
        the replicas of each. The same two tensors (same ``data_ptr()``) for the store's life:
        a rebalance updates them in place when it commits, a rebalance job (:meth:`start_rebalance`)
        each time a layer switches, both on the current stream. Allowed while a job is open."""
        with self._call("routing", during_job=True):
            if self._routing is None:
                p = self._placement
                X = p.num_physical - p.num_experts + 1
                self._routing = (
                    torch.full((p.num_layers, p.num_experts, X), -1, dtype=torch.int64, device=self.device),
                    torch.zeros(p.num_layers, p.num_experts, dtype=torch.int64, device=self.device),
                )
                self._refresh_routing(range(p.num_layers))
            return self._routing

    @classmethod
    def create(
        cls,
        root,
        *,
        spec: ExpertSpec,
        placement: Placement,
        checkpoint: Checkpoint,
        rank: int | None = None,
        world_size: int | None = None,
        device="cpu",
        group=None,
        ranks_per_node: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
        loaded: bool = False,
    ) -> ExpertStore:
        """Load this rank's slots from ``checkpoint`` and commit version 1.

        Collective over all R ranks (all are alive at creation). ``rank`` and
        ``world_size`` default to the process group's (one process: 0 and 1).

        ``weights``: the engine's own tensors to keep the slots in, instead of an allocation of
        the store's: spec tensor name -> L tensors (one per MoE layer), each ``[S, *shape]`` of
        the spec's dtype, contiguous, on ``device``, no two sharing memory (SpecError /
        StoreError naming the tensor and layer otherwise). They are used as they are: never
        copied or reallocated; ``weights(name, layer)`` returns that tensor (same ``data_ptr()``)
        for the store's lifetime, rebalances included, and :meth:`close` only drops them.
        ``loaded``: True when ``weights`` already hold this placement's experts (the engine
        loaded them): their bytes are taken as they are and the manifest's checksums computed
        from them; False (default): they are filled from the checkpoint."""
        loaded = check_bool(loaded, "loaded")
        if loaded and weights is None:
            raise StoreError("create(loaded=True) takes the experts from weights=; none were given")
        self = cls._new(
            root, spec, placement, checkpoint, ranks_per_node, _Where(rank, world_size, device, group, timeout_s),
            weights,
        )  # fmt: skip
        live = list(range(self.world_size))
        existing = self.log.latest()
        inputs = digest_words(repr(spec).encode(), placement.digest(), struct.pack("<q", ranks_per_node or 0))
        mine = Agreement(
            Status.EXISTS if existing is not None else Status.READY,
            inputs, (0, 0, 0, 0), 0, time.time_ns(), new_nonce(),
        )  # fmt: skip
        self._comm.begin(call_id(b"create"))
        gather = self._comm.start_gather(live, mine.encode(), kind=Kind.AGREEMENT, what="create agreement")
        rows = self._agreements(gather, "create agreement")
        if existing is not None:
            raise ManifestError(
                f"rank {self.rank}: a store already exists under {self.log.path_of(existing)} (version {existing}); "
                "use ExpertStore.open"
            )
        bad = [r for r, a in zip(live, rows) if a.status != Status.READY]
        if bad:
            raise ManifestError(f"rank {self.rank}: ranks {bad} found an existing store at their root; nothing created")
        differ = [r for r, a in zip(live, rows) if a.inputs != rows[0].inputs]
        if differ:
            raise AgreementError(
                f"rank {self.rank}: ranks {differ} were given another spec, placement or ranks_per_node than rank 0"
            )
        self._comm.begin(call_id(b"create", *(struct.pack("<q", a.nonce) for a in rows)))
        checkpoint.validate(spec, num_layers=placement.num_layers, num_experts=placement.num_experts)
        if not loaded:
            self._load_own_slots()
        checksums = self._gather_checksums(self._own_checksums(), live)
        # Every rank commits the same bytes (a shared root accepts identical commits): the
        # creation time is the leader's.
        m = Manifest(
            version=1, parent=None, created=rows[0].clock_ns / 1e9, reason="create", spec=spec,
            num_layers=placement.num_layers, num_experts=placement.num_experts, num_ranks=self.world_size,
            slots_per_rank=placement.slots_per_rank, ranks_per_node=self.ranks_per_node, phy2log=placement.phy2log,
            alive=torch.ones(self.world_size, dtype=torch.bool), checkpoint=checkpoint.to_dict(), checksums=checksums,
        )  # fmt: skip
        self.log.commit(m)
        self._adopt(m, placement)
        return self

    @classmethod
    def _from_manifest(cls, root, checkpoint, where: _Where, weights) -> ExpertStore:
        if not isinstance(root, (str, os.PathLike)):
            raise StoreError(f"root must be a path, got {type(root).__name__} {root!r}")
        log = ManifestLog(Path(root))
        m = log.read_current()  # checked against its parent; ManifestError naming the file
        if checkpoint is None:
            ck = m.checkpoint
            checkpoint = Checkpoint(ck["path"], names=ck["names"], layers=ck.get("layers"))
        elif not isinstance(checkpoint, Checkpoint):
            raise StoreError(f"checkpoint must be an es.Checkpoint or None, got {type(checkpoint).__name__}")
        else:
            given = checkpoint.to_dict()
            if given["names"] != m.checkpoint["names"] or given["layers"] != m.checkpoint.get("layers"):
                raise StoreError(
                    f"checkpoint name mapping/layers differ from those recorded in {log.path_of(m.version)}"
                )
        placement = m.placement()
        self = cls._new(root, m.spec, placement, checkpoint, m.ranks_per_node, where, weights)
        self._adopt(m, placement)
        return self

    @classmethod
    def open(
        cls,
        root,
        *,
        checkpoint: Checkpoint | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device="cpu",
        group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    ) -> ExpertStore:
        """Reopen the current version and reload this rank's slots (checked against the manifest).

        Not collective: each rank reopens on its own. ``checkpoint=None`` uses the checkpoint
        recorded in the manifest. ``weights``: the engine's tensors to reload the slots into
        (as in :meth:`create`). The way back after a failed call: see the README."""
        self = cls._from_manifest(root, checkpoint, _Where(rank, world_size, device, group, timeout_s), weights)
        m = self._manifest
        if not bool(m.alive[self.rank]):
            raise StoreError(
                f"rank {self.rank} holds no slots in version {m.version} of {self.root} (it was dead); "
                "use ExpertStore.join and a rebalance with fresh=(rank,)"
            )
        self.checkpoint.validate(self.spec, num_layers=m.num_layers, num_experts=m.num_experts)
        self._load_own_slots()
        self._verify_slots(None)
        return self

    @classmethod
    def join(
        cls,
        root,
        *,
        checkpoint: Checkpoint | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device="cpu",
        group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    ) -> ExpertStore:
        """A restarted rank: an empty store at the current version; fill it with
        ``rebalance(..., fresh=(rank,))`` called by every live rank. ``weights``: the engine's
        tensors to keep the slots in (as in :meth:`create`); their bytes count for nothing until then."""
        self = cls._from_manifest(root, checkpoint, _Where(rank, world_size, device, group, timeout_s), weights)
        self._empty = True
        return self

    # ---------------------------------------------------------- one call at a time
    def _call(self, what: str, *, usable: bool = True, during_job: bool = False) -> _CallGuard:
        """Guard of every public call (``with self._call(...)``): one thread at a time, never on a
        closed store, and (unless the call shares the refusal with its peers itself) never on an
        unusable one; while a rebalance job is open, only the calls marked ``during_job``
        (read-only ones, the job's own)."""
        return _CallGuard(self, what, usable, during_job)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StoreError(f"rank {self.rank}: store is unusable ({self._broken}); reopen it with ExpertStore.open")

    def close(self) -> None:
        """Release the checkpoint's files and maps, the staging, the slabs and the waiter threads; the
        store refuses every call afterwards (views handed out keep their memory; adopted ``weights``
        are only dropped, never freed or written). Idempotent."""
        with self._call("close", usable=False):
            if self._closed:
                return
            self._closed = True
            self.checkpoint.close()
            self._comm.close()
            self._staging = None
            self.slabs = None

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- access
    @property
    def version(self) -> int:
        """The current (committed) version; 0 only inside create."""
        return 0 if self._manifest is None else self._manifest.version

    @property
    def placement(self) -> Placement:
        """The placement the slots hold (while a rebalance job is open: layer by layer)."""
        return self._placement if self._job is None else self._job.placement

    @property
    def alive(self) -> torch.Tensor:
        """bool [R]: ranks whose slots are filled in the current version."""
        return self._manifest.alive.clone()

    @property
    def checksums(self) -> torch.Tensor:
        """int64 [L, E]: the manifest's checksum of each (layer, logical expert)."""
        return self._manifest.checksums.clone()

    @property
    def keep_versions(self) -> int | None:
        """After each rebalance commit keep only this many newest versions (None: all)."""
        return self._keep_versions

    @keep_versions.setter
    def keep_versions(self, value: int | None) -> None:
        self._keep_versions = check_keep_versions(value)

    def weights(self, name: str, layer: int) -> torch.Tensor:
        """``[S, *shape]`` zero-copy view of tensor ``name`` in ``layer`` (the engine's own tensor when the
        store was given ``weights``); its address never changes."""
        with self._call("weights", during_job=True):
            return self.slabs.weights(name, layer)

    def local_experts(self) -> torch.Tensor:
        """int64 [L, S]: logical expert in each of this rank's slots (current version)."""
        with self._call("local_experts", during_job=True):
            return self.placement.rank_experts(self.rank)

    # ---------------------------------------------------------------- loading
    def _load_own_slots(self) -> None:
        """Read each distinct expert of this rank once from the checkpoint, then copy duplicates."""
        experts = self._placement.rank_experts(self.rank)
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
        return resident_checksums(self.slabs, self.layout, layers, slots).cpu().view(L, S)

    def _gather_checksums(self, own: torch.Tensor, live: list[int]) -> torch.Tensor:
        """Combine every rank's slot checksums into the [L, E] table (holders must agree)."""
        L, E = self._placement.num_layers, self._placement.num_experts
        experts = self._placement.rank_experts(self.rank)
        table = torch.zeros(L, E, dtype=torch.int64).scatter_(1, experts, own)
        held = torch.zeros(L, E, dtype=torch.int64).scatter_(1, experts, torch.ones_like(own))
        if not torch.equal(torch.gather(table, 1, experts), own):  # duplicates on this rank agree too
            raise IntegrityError(f"rank {self.rank}: two slots of one expert hold different bytes after loading")
        row = torch.cat([table.view(-1), held.view(-1)])
        rows = self._comm.start_gather(live, row, kind=Kind.CHECKSUMS, what="checksum table").result()
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

    # ----------------------------------------------------------------- staging
    def reserve_staging(self, nbytes: int | None = None) -> int:
        """Allocate the rebalance staging now (default :data:`DEFAULT_STAGING_BYTES`) and keep it:
        rebalances with ``staging_bytes <= nbytes`` then allocate no device memory. Call it before
        the engine sizes its KV cache. Returns the bytes reserved; StoreError if they cannot be."""
        with self._call("reserve_staging"):
            nbytes = DEFAULT_STAGING_BYTES if nbytes is None else check_bytes(nbytes, "nbytes")
            self._staging = None  # the old reservation goes first
            self._staging = allocate_staging(nbytes, self.device, self.rank)
            return nbytes

    @property
    def staging_reserved(self) -> int:
        """Bytes of staging held by :meth:`reserve_staging` (0: none)."""
        return 0 if self._staging is None else self._staging.numel()

    def _arena(self, staging_bytes: int) -> torch.Tensor | None:
        """The reserved staging for a rebalance with this budget, or None to allocate."""
        fits = self._staging is not None and self._staging.numel() >= staging_bytes
        return self._staging[:staging_bytes] if fits else None

    # ------------------------------------------------------------------ verify
    def verify(self, *, slots: Iterable[tuple[int, int]] | None = None) -> int:
        """Recompute slot checksums (Triton kernel) and compare them with the manifest.

        Args:
            slots: (layer, local slot) pairs to check; default all of this rank's slots.
        Returns the number of slots checked. Raises IntegrityError naming layer,
        slot and expert at the first mismatch."""
        with self._call("verify", during_job=True):
            return self._verify_slots(slots)

    def _verify_slots(self, slots) -> int:
        if self._empty:
            raise StoreError(f"rank {self.rank}: store was joined and holds nothing yet; rebalance with fresh=(rank,)")
        if not bool(self._manifest.alive[self.rank]):
            raise StoreError(f"rank {self.rank} holds no slots in version {self.version}")
        L, S = self.layout.num_layers, self.layout.slots
        if slots is None:
            pairs = [(layer, s) for layer in range(L) for s in range(S)]
        else:
            pairs = _slot_pairs(slots, L, S)
        experts = self.placement.rank_experts(self.rank)
        bad = mismatched_slots(self.slabs, pairs, experts, self._manifest.checksums)
        if bad:
            layer, s = pairs[bad[0]]
            raise IntegrityError(
                f"rank {self.rank}: layer {layer} slot {s} (physical {self.rank * S + s}) should hold expert "
                f"{int(experts[layer, s])} of version {self.version} but its checksum differs "
                f"({len(bad)} of {len(pairs)} slots differ)"
            )
        return len(pairs)

    # --------------------------------------------------------------- rebalance
    def rebalance(
        self,
        new_placement: Placement,
        *,
        alive: Sequence[bool] | torch.Tensor | None = None,
        fresh: Iterable[int] = (),
        staging_bytes: int | None = None,
        verify: bool = True,
        round_bytes: int | None = None,
        load: torch.Tensor | None = None,
    ) -> RebalanceReport:
        """Move to ``new_placement``; collective over the live ranks (``alive[r]`` true).

        Dead ranks must not call it; they are never contacted. ``fresh`` lists live ranks
        whose memory is empty (joined). Staging memory on this rank never exceeds
        ``staging_bytes`` (default :data:`DEFAULT_STAGING_BYTES`); each round moves at most
        ``min(round_bytes, staging_bytes // 2)`` bytes of records per rank (default
        :data:`DEFAULT_ROUND_BYTES`), ``staging_bytes // 4`` when a large rebalance is
        planned in layer chunks. ``verify`` (default True): every record that arrived from a
        peer or the checkpoint is checked against the manifest's checksum before anything is
        committed (local copies move bytes this rank held already: ``verify()`` checks those).

        ``load``: optional real tensor [L, E] (any device), the measured load per (layer, logical
        expert) the new placement was computed from (e.g. ``eplb.LoadCounter.load()``), finite
        and >= 0. It is recorded as float32 in the new version's manifest (``inspect-store show``
        then reports the placement's balancedness). Every live rank must pass the same values
        (they are part of the agreement: ranks that differ raise AgreementError).

        Every failure raises a StoreError on every live rank; what was committed and how
        to go on is in the README ("When something fails")."""
        with self._call("rebalance", usable=False):  # an unusable store's refusal goes to its peers
            t_start = time.perf_counter()
            # Work queued on the caller's stream comes first: rounds and late reads go on that
            # stream; early checkpoint reads, from a thread, wait for this event.
            entry = torch.cuda.Event() if self.device.type == "cuda" else None
            if entry is not None:
                entry.record()
            phases: dict[str, float] = {}
            call, problem = self._validate(new_placement, alive, fresh, staging_bytes, round_bytes, verify, load)
            t0 = time.perf_counter()
            run = self._plan(call, entry) if problem is None else None
            phases["plan"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows, run = self._agree(call, problem, run, entry)
            phases["agree"] = time.perf_counter() - t0
            report = self._run_and_commit(call, run, created=rows[0].clock_ns / 1e9, phases=phases)
            report.seconds = time.perf_counter() - t_start
            return report

    def start_rebalance(
        self,
        new_placement: Placement,
        *,
        alive: Sequence[bool] | torch.Tensor | None = None,
        fresh: Iterable[int] = (),
        staging_bytes: int | None = None,
        verify: bool = True,
        layers_per_step: int = 1,
        load: torch.Tensor | None = None,
        transfer_group=None,
    ) -> RebalanceJob:
        """Start a rebalance to ``new_placement`` whose bytes move in the background while the
        engine serves; the engine then calls ``job.step()`` once per forward pass.

        Collective over the live ranks, like :meth:`rebalance` (same validation, plan, agreement
        and accounting; ranks given other arguments all raise before anything moves). Returns a
        :class:`~expert_store.job.RebalanceJob` right after the agreement. A background thread
        then stages the layers in order (packs what this rank sends from the live slots, which it
        only reads; exchanges with the peers; reads missing experts from the checkpoint; checks
        what arrived against the manifest when ``verify``). Each ``job.step()``, called by every
        live rank between forward passes on the thread that started the job, switches up to
        ``layers_per_step`` layers that every rank has staged, in layer order, on every live rank
        alike; until the job is done, :attr:`placement` and :meth:`routing` describe what the
        slots hold (the new placement in switched layers, the old one in the others).

        ``staging_bytes`` (default :data:`DEFAULT_STAGING_BYTES`) bounds the staging this rank
        holds at once (the reserved staging of :meth:`reserve_staging` is used when it is large
        enough); staging is taken by whole layers, and a layer whose staging alone does not fit
        makes every live rank raise a StoreError before anything moves. ``fresh`` ranks (joined
        with :meth:`join`) are filled layer by layer like the others; if the job fails, its
        partial version lists them as not alive (their unswitched layers hold nothing).

        ``transfer_group``: the process group of the background transfers, a second group of the
        same ranks as the store's (e.g. ``torch.distributed.new_group(ranks)``, made by every
        process at start-up). Two threads must not post NCCL operations on one communicator
        (their order would differ between ranks and hang them), so on NCCL it is required when
        more than one rank is live; on gloo the default (None) shares the store's group, whose
        messages are tagged apart. Neither should be the engine's own group: its collectives run
        while the job's transfers are in flight.

        While the job is open, only its own ``step()`` / ``wait()`` and the read-only calls
        (:meth:`weights`, :meth:`local_experts`, :meth:`routing`, :meth:`verify` and the
        properties) are allowed; any other call raises StoreError."""
        from .job import RebalanceJob, plan_job

        with self._call("start_rebalance", usable=False):
            t_start = time.perf_counter()
            phases: dict[str, float] = {}
            call, problem = self._validate(new_placement, alive, fresh, staging_bytes, None, verify, load)
            transfers = None
            if problem is None:
                try:
                    call = call._replace(job_layers=check_int(layers_per_step, "layers_per_step", low=1))
                    transfers = self._transfer_comm(transfer_group, call)
                except StoreError as e:
                    problem = e
            t0 = time.perf_counter()
            plan = plan_job(self, call) if problem is None else None
            phases["plan"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                rows, plan = self._agree(call, problem, plan, None, replan=lambda: plan_job(self, call))
            except BaseException:
                if transfers is not None:
                    transfers.close()
                raise
            phases["agree"] = time.perf_counter() - t0
            job = RebalanceJob(self, call, plan, rows, transfers=transfers, phases=phases, t_start=t_start)
            self._job = job
            return job

    def _transfer_comm(self, transfer_group, call: _Call) -> Comm:
        """The messaging of a job's background transfers (see :meth:`start_rebalance`)."""
        comm = self._comm
        if transfer_group is None:
            if comm._nccl and len(call.live) > 1:
                raise StoreError(
                    f"rank {self.rank}: start_rebalance on NCCL needs transfer_group=, a second process group of "
                    "the store's ranks: two threads must not post NCCL operations on one communicator"
                )
            transfer_group = comm.group
        elif transfer_group is comm.group:
            raise StoreError(f"rank {self.rank}: transfer_group must be another process group than the store's")
        return Comm(transfer_group, rank=self.rank, world_size=self.world_size, device=self.device,
                    timeout_s=comm.timeout_s, background=True)  # fmt: skip

    def _validate(self, new_placement, alive, fresh, staging_bytes, round_bytes, verify, load):
        """(call, None), or (a call good enough to tell the peers, the StoreError to raise after)."""
        R = self.world_size
        alive_t = (True,) * R
        try:
            self._check_usable()
            alive_t = _mask(alive, R)
            fresh_t = _ranks(fresh, R)
            staging_bytes = DEFAULT_STAGING_BYTES if staging_bytes is None else staging_bytes
            round_bytes = DEFAULT_ROUND_BYTES if round_bytes is None else round_bytes
            call = _Call(
                new_placement, alive_t, fresh_t,
                check_bytes(staging_bytes, "staging_bytes"), check_bytes(round_bytes, "round_bytes"),
                check_bool(verify, "verify"), [r for r in range(R) if alive_t[r]],
                _load_arg(load, self._placement.num_layers, self._placement.num_experts),
            )  # fmt: skip
            self._check_call(call)
            return call, None
        except StoreError as e:
            live = sorted({r for r in range(R) if alive_t[r]} | {self.rank})
            return _Call(new_placement, alive_t, (), 0, 0, False, live), e

    def _check_call(self, call: _Call) -> None:
        if not isinstance(call.new, Placement):
            raise PlacementError(f"new_placement must be an es.Placement, got {type(call.new).__name__}")
        if not call.alive[self.rank]:
            raise StoreError(f"rank {self.rank} is marked dead in `alive` but called rebalance")
        if self._empty and self.rank not in call.fresh:
            raise StoreError(f"rank {self.rank} was joined (holds nothing) but is not listed in fresh")
        mine, new = self._placement, call.new
        dims = (new.num_layers, new.num_experts, new.num_ranks, new.slots_per_rank)
        if dims != (mine.num_layers, mine.num_experts, mine.num_ranks, mine.slots_per_rank):
            raise PlacementError(
                f"new placement (L, E, R, S) = {dims} differs from the store's "
                f"{(mine.num_layers, mine.num_experts, self.world_size, mine.slots_per_rank)}"
            )
        for r in call.fresh:
            if not call.alive[r]:
                raise StoreError(f"fresh rank {r} is not a live rank")
        new.check_servable(torch.tensor(call.alive))

    def _plan(self, call: _Call, entry) -> RebalanceRun | StoreError:
        """Plan the first chunk and take the staging, before the agreement message goes out: a
        rank that cannot (out of device memory, say) refuses, so every rank stops before anything
        moves. Returns the StoreError instead of raising it (it is shared through the agreement)."""
        chunks = plan_chunks(
            self._placement,
            call.new,
            expert_bytes=self.spec.nbytes,
            record_bytes=self.spec.record_bytes,
            staging_bytes=call.staging_bytes,
            round_bytes=call.round_bytes,
            old_alive=self._manifest.alive,
            alive=call.alive,
            fresh=call.fresh,
            ranks_per_node=self.ranks_per_node,
        )
        try:
            return RebalanceRun(
                chunks,
                rank=self.rank,
                slabs=self.slabs,
                comm=self._comm,
                checkpoint=self.checkpoint,
                staging_bytes=call.staging_bytes,
                arena=self._arena(call.staging_bytes),
                entry=entry,
                round_bytes=call.round_bytes,
            )
        except StoreError as e:
            return e

    def _state(self) -> tuple[int, int, int, int]:
        m = self._manifest
        return digest_words(struct.pack("<q", m.version), self._placement.digest(), bytes(m.alive.tolist()))

    def _agreements(self, gather, what: str) -> list[Agreement]:
        """The decoded rows of an agreement gather in flight."""
        try:
            return [Agreement.decode(row) for row in gather.result()]
        except ValueError as e:
            raise AgreementError(f"rank {self.rank}: {what}: {e}") from None

    def _agree(self, call: _Call, problem, run, entry, *, replan=None) -> tuple[list[Agreement], RebalanceRun]:
        """Every live rank on the same inputs, every non-fresh live rank on the same state; a fresh
        rank whose root is behind receives the current manifest. Raises on every rank alike.

        ``problem``: this rank's bad arguments; ``run``: its plan, or the StoreError that stopped it;
        ``replan()``: makes the plan again (default: a blocking rebalance's, :meth:`_plan`)."""
        if problem is not None:
            status = Status.REFUSED
        elif isinstance(run, StoreError) and self.rank not in call.fresh:
            status = Status.NOT_PREPARED
        else:
            status = Status.READY  # a fresh rank's plan may rest on a stale state: it says nothing yet
        inputs = call.inputs() if problem is None else (0, 0, 0, 0)
        mine = Agreement(status, inputs, self._state(), self.version, time.time_ns(), new_nonce())
        self._comm.begin(call_id(b"rebalance"))
        live = call.live
        gather = self._comm.start_gather(live, mine.encode(), kind=Kind.AGREEMENT, what="rebalance agreement")
        if isinstance(run, RebalanceRun):
            run.prepack()  # round 0 into staging (no slot written, nothing sent) while messages travel
        rows = self._agreements(gather, "rebalance agreement")
        self._comm.begin(call_id(b"rebalance", *(struct.pack("<q", a.nonce) for a in rows)))
        if problem is not None:
            raise problem
        if status == Status.NOT_PREPARED:
            raise run
        refused = {r: a.status for r, a in zip(live, rows) if a.status != Status.READY}
        if refused:
            why = {
                Status.REFUSED: "bad arguments, or a store to reopen",
                Status.NOT_PREPARED: "no plan or no staging memory for it",
            }
            raise StoreError(
                f"rank {self.rank}: rebalance refused before anything moved by "
                + ", ".join(f"rank {r} ({why.get(s, s.name)})" for r, s in sorted(refused.items()))
            )
        differ = [r for r, a in zip(live, rows) if a.inputs != rows[0].inputs]
        if differ:
            raise AgreementError(
                f"rank {self.rank}: ranks {differ} disagree with rank {live[0]} on (new placement, alive, fresh, "
                f"staging_bytes, round_bytes, verify); nothing moved, version stays {self.version}"
            )
        holders = [i for i, r in enumerate(live) if r not in call.fresh]
        if not holders:
            raise StoreError(f"rank {self.rank}: every live rank is fresh; reopen the store with ExpertStore.open")
        ref = rows[holders[0]]
        stale = [live[i] for i in holders if rows[i].state != ref.state]
        if stale:
            raise AgreementError(
                f"rank {self.rank}: ranks {stale} hold another version or placement than rank {live[holders[0]]} "
                f"(versions {[rows[i].version for i in holders]}); nothing moved"
            )
        behind = [r for r, a in zip(live, rows) if r in call.fresh and a.state != ref.state]
        if behind:
            self._sync_fresh(live[holders[0]], behind)
            if self.rank in behind:  # the speculative plan used the stale state
                run = self._plan(call, entry) if replan is None else replan()
                if isinstance(run, RebalanceRun):
                    run.prepack()
        if isinstance(run, StoreError):
            raise run  # deterministic: every live rank raises the same, before anything moves
        return rows, run

    def _sync_fresh(self, ref: int, behind: list[int]) -> None:
        """Fresh ranks whose manifest is older than the live ranks' (a rejoining rank with its own
        root) receive the current manifest from rank ``ref`` and adopt it before anything moves."""
        what = "current manifest for a fresh rank"
        if self.rank == ref:
            data = self.log.path_of(self.version).read_bytes()
            for r in behind:
                self._comm.send_blob(r, data, what=what)
            return
        if self.rank not in behind:
            return
        data = self._comm.recv_blob(ref, what=what)
        m = decode_manifest(data, source=f"current manifest received from rank {ref}")
        differs = store_difference(m, self._manifest)
        if differs is not None:
            raise ManifestError(f"rank {self.rank}: the manifest from rank {ref} describes another store ({differs})")
        if (self.log.latest() or 0) < m.version:
            self.log.commit(m, adopt=True)
        self._adopt(m)

    def _run_and_commit(self, call: _Call, run: RebalanceRun, *, created: float, phases) -> RebalanceReport:
        """Move the bytes, verify what arrived, agree on the outcome, commit version + 1."""
        old = self._manifest
        new_version = old.version + 1
        prepared: list[PreparedManifest] = []
        manifest_error: list[str] = []

        def write_manifest() -> None:
            """The new manifest is fully known: write and fsync it while the last round is in flight.
            A failure here travels with the completion messages, so no rank commits."""
            try:
                manifest = self._next_manifest(call, run.plan, run.rounds.rounds, created, new_version)
                prepared.append(self.log.prepare(manifest))
            except StoreError as e:
                manifest_error.append(str(e))

        def fail(why: str) -> None:
            self._broken = f"rebalance to version {new_version} {why}"
            for p in prepared:
                p.discard()

        try:
            plan = run.run(phases, while_in_flight=write_manifest)
        except BaseException as e:
            fail(f"failed while moving bytes: {e}")
            raise
        self._empty = False
        outcome, problem_text = Outcome.DONE, ""
        if manifest_error:
            outcome, problem_text = Outcome.MANIFEST_FAILED, manifest_error[0]
        elif call.verify:
            t0 = time.perf_counter()
            try:
                run.verify(old.checksums, call.new.rank_experts(self.rank), new_version)
            except IntegrityError as e:
                outcome, problem_text = Outcome.VERIFY_FAILED, str(e)
            phases["verify"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            done = Completion(outcome).encode()
            table = self._comm.start_gather(call.live, done, kind=Kind.COMPLETION, what="rebalance completion").result()
            outcomes = [Completion.decode(row).outcome for row in table]
        except (StoreError, ValueError) as e:
            fail(f"did not complete on every rank: {e}")
            raise e if isinstance(e, StoreError) else AgreementError(f"rank {self.rank}: {e}") from None
        if any(o != Outcome.DONE for o in outcomes):
            bad_verify = [r for r, o in zip(call.live, outcomes) if o == Outcome.VERIFY_FAILED]
            bad_write = [r for r, o in zip(call.live, outcomes) if o == Outcome.MANIFEST_FAILED]
            reasons = ([f"verification failed on ranks {bad_verify}"] if bad_verify else []) + (
                [f"the manifest could not be written on ranks {bad_write}"] if bad_write else []
            )
            fail(f"not committed: {'; '.join(reasons)}")
            error = IntegrityError if bad_verify else ManifestError
            raise error(
                f"rank {self.rank}: rebalance not committed: {'; '.join(reasons)}"
                + (f" ({problem_text})" if problem_text else "")
            )
        try:
            prepared[0].publish()
        except BaseException:
            fail(f"commit under {self.root} failed")
            raise
        self._adopt(prepared[0].manifest, call.new)
        if self._keep_versions is not None:
            self.log.prune(keep=self._keep_versions)
        phases["commit"] = time.perf_counter() - t0
        acct = plan.accounts[self.rank]
        return RebalanceReport(
            version=new_version,
            bytes_p2p=acct.bytes_p2p,
            bytes_local=acct.bytes_local,
            bytes_disk=acct.bytes_disk,
            missing={k: list(v) for k, v in sorted(acct.missing.items())},
            seconds=0.0,
            phase_seconds=phases,
            staging_peak=run.stats.staging_peak,
            rounds=run.stats.rounds,
            verified=call.verify,
        )

    # ------------------------------------------------------------------ manifests
    def _next_manifest(
        self,
        call: _Call,
        plan: RebalancePlan,
        rounds: int,
        created: float,
        version: int,
        *,
        placement: Placement | None = None,
        reason: str = "rebalance",
        extra: Mapping[str, int] | None = None,
    ) -> Manifest:
        """The current manifest moved to ``placement`` (default ``call.new``), with the statistics
        of ``plan`` (the layers moved) and ``extra``."""
        placement = call.new if placement is None else placement
        stats = {
            k: sum(getattr(a, k) for a in plan.accounts.values()) for k in ("bytes_p2p", "bytes_local", "bytes_disk")
        }
        stats.update(moves=len(plan.moves), disk_reads=len(plan.disk_reads), post_copies=len(plan.post_copies),
                     rounds=rounds, staging_bytes=call.staging_bytes, round_bytes=call.round_bytes,
                     live_ranks=len(call.live), fresh_ranks=len(call.fresh), **(extra or {}))  # fmt: skip
        return dataclasses.replace(
            self._manifest, version=version, parent=self.version, created=created, reason=reason,
            phy2log=placement.phy2log, alive=torch.tensor(call.alive, dtype=torch.bool),
            checkpoint=self.checkpoint.to_dict(), stats=dict(sorted(stats.items())), load=call.load,
        )  # fmt: skip

    def __repr__(self) -> str:
        L, S = self.layout.num_layers, self.layout.slots
        return (
            f"ExpertStore(root={os.fspath(self.root)!r}, rank={self.rank}/{self.world_size}, version={self.version}, "
            f"L={L}, S={S}, E={self._placement.num_experts}, device={self.device})"
        )


_PRIVATE = object()


def _warm_kernels(slabs: ResidentSlabs) -> None:
    """Compile (or load from Triton's cache) the pack, unpack and checksum kernels of this layout
    now, so the first rebalance does not pay for it (a few hundred ms on a fresh machine)."""
    if slabs.device.type != "cuda":
        return
    layout = slabs.layout
    one = torch.empty(layout.spec.record_bytes, dtype=torch.uint8, device=slabs.device)
    pack_records(slabs, layout, [0], [0], out=one)
    unpack_records(one, slabs, layout, [0], [0])  # the same bytes back: slot 0 is unchanged
    resident_checksums(slabs, layout, [0], [0])
    torch.cuda.synchronize(slabs.device)  # before anything else (checkpoint reads) writes slot 0


def _mask(alive, n: int) -> tuple[bool, ...]:
    """``alive`` as n bools: None (all), a bool tensor, or a sequence of bools (0 / 1 allowed)."""
    if alive is None:
        return (True,) * n
    if isinstance(alive, torch.Tensor):
        if alive.dtype != torch.bool or alive.dim() != 1:
            raise StoreError(f"alive as a tensor must be bool [{n}], got {alive.dtype} {list(alive.shape)}")
        alive = alive.tolist()
    if isinstance(alive, (str, bytes)) or not isinstance(alive, Sequence):
        raise StoreError(f"alive must be a sequence of {n} bools, got {type(alive).__name__}")
    if len(alive) != n:
        raise StoreError(f"alive must have one entry per rank ({n}), got {len(alive)}")
    for r, v in enumerate(alive):
        if not (isinstance(v, bool) or (is_int(v) and int(v) in (0, 1))):
            raise StoreError(f"alive[{r}] must be True or False, got {type(v).__name__} {v!r}")
    return tuple(bool(v) for v in alive)


def _load_arg(load, L: int, E: int) -> torch.Tensor | None:
    """``load`` as a float32 CPU tensor [L, E] (None stays None); PlacementError naming ``load``."""
    if load is None:
        return None
    if not isinstance(load, torch.Tensor):
        raise PlacementError(f"load must be None or a tensor [{L}, {E}] of expert loads, got {type(load).__name__}")
    if load.dtype == torch.bool or load.is_complex() or tuple(load.shape) != (L, E):
        raise PlacementError(f"load must be a real tensor [{L}, {E}] (layers, logical experts), got {load.dtype} "
                             f"{list(load.shape)}")  # fmt: skip
    t = load.detach().to(device="cpu", dtype=torch.float32)
    bad = ~(torch.isfinite(t) & (t >= 0))
    if bool(bad.any()):
        layer, e = (int(i) for i in bad.nonzero()[0])
        raise PlacementError(
            f"load[{layer}, {e}] = {float(load[layer, e])}: loads must be finite and >= 0 (and fit float32); "
            f"{int(bad.sum())} bad entries"
        )
    return t.contiguous()


def _ranks(fresh, n: int) -> tuple[int, ...]:
    """``fresh`` as sorted distinct ranks in 0..n-1."""
    if isinstance(fresh, (str, bytes)) or not isinstance(fresh, Iterable):
        raise StoreError(f"fresh must be an iterable of rank numbers, got {fresh!r}")
    return tuple(sorted({check_int(r, "fresh rank", low=0, high=n - 1) for r in fresh}))


def _slot_pairs(slots, num_layers: int, num_slots: int) -> list[tuple[int, int]]:
    if isinstance(slots, (str, bytes)) or not isinstance(slots, Iterable):
        raise StoreError(f"slots must be an iterable of (layer, local slot) pairs, got {slots!r}")
    pairs = []
    for i, pair in enumerate(slots):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise StoreError(f"slots[{i}] must be a (layer, local slot) pair, got {pair!r}")
        layer, slot = pair
        pairs.append(
            (check_index(layer, f"slots[{i}] layer", num_layers), check_index(slot, f"slots[{i}] slot", num_slots))
        )
    return pairs

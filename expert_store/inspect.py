"""inspect-store: the operator's view of an expert-store root (its manifests, read only).

    inspect-store summary ROOT [--version N] [--json]
    inspect-store versions ROOT [--json]
    inspect-store show ROOT [--version N] [--layer L] [--json]
    inspect-store diff ROOT A B [--json]
    inspect-store plan ROOT A B [--staging-bytes N] [--round-bytes N] [--fresh R,...] [--json]
    inspect-store plan ROOT PLACEMENT_FILE [--dead R,...] [--fresh R,...] [--staging-bytes N] [--json]
    inspect-store verify ROOT [--checkpoint-bytes] [--checkpoint PATH] [--json]

Symbols: L MoE layers, E logical experts per layer, R ranks, S slots per rank,
P = R * S physical slots; slot p lives on rank p // S.

``plan`` with one argument after ROOT is a dry run: what a rebalance from the
latest version to the placement in that file would move (``phy2log`` int64
[L, P] as JSON or msgpack ``{"phy2log": [[...], ...]}``, or a tensor saved with
``torch.save``); with two, the plan between two committed versions.

*Balancedness* of a placement under a load [L, E] (recorded by
``rebalance(..., load=)``): per layer, the largest GPU load over the mean GPU
load of the live ranks, where a GPU's load is the sum over its slots of
``load[layer, expert] / live replicas of expert``; overall, the sum over
layers of the largest GPU load over the sum of the means (1.0 is perfect).

Every command has a library function returning a JSON-friendly dict with fixed
keys (:func:`summarize`, :func:`list_versions`, :func:`show_placement`,
:func:`diff_versions`, :func:`plan_between`, :func:`plan_placement`,
:func:`verify_store`); ``--json``
prints that dict, otherwise it is rendered as aligned text. Mappings keyed by
a number (layer, rank) are written as lists of objects, so JSON keys are always
the same strings.

Exit codes: 0 success (``verify``: everything verified), 1 a problem was found
(missing root, no or corrupt manifest, a placement file that is missing,
malformed or not servable, failed verification: one line on stderr naming the
file, layer or expert; ``verify`` lists every problem in its report),
2 a usage error (bad option, unknown version, layer or rank). Nothing here writes to
the root; ``verify --checkpoint-bytes`` reads the checkpoint on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import groupby, product
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from expert_store.kernels.reference import slab_checksums_reference

from .checkpoint import Checkpoint
from .checks import MAX_BYTES, check_bytes, check_int, is_int
from .eplb import movement
from .errors import ManifestError, PlacementError, StoreError
from .execute import planned_staging_peak
from .manifest import _FILE_RE, _TMP_RE, Manifest, ManifestLog, store_difference
from .placement import Placement
from .plan import RankAccount, merge_plans, plan_chunks, relay_rounds, round_budget
from .spec import ExpertSpec, dtype_name
from .store import DEFAULT_ROUND_BYTES, DEFAULT_STAGING_BYTES

__all__ = [
    "UsageError",
    "build_parser",
    "diff_versions",
    "list_versions",
    "main",
    "plan_between",
    "plan_placement",
    "show_placement",
    "summarize",
    "verify_store",
]

PROG = "inspect-store"

# Stats a rebalance records: its byte accounting, and what `plan` can recompute and compare.
_BYTES = ("bytes_p2p", "bytes_local", "bytes_disk")
_PLAN_STATS = (*_BYTES, "moves", "disk_reads", "post_copies", "rounds")
# Characters escaped in what is printed: controls (a terminal would act on them) but newline
# and tab on stdout; on stderr also every line break, so that an error stays one line.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


class UsageError(StoreError):
    """A command line that names something the store does not have (exit code 2)."""


def _hex(v: int) -> str:
    """A checksum (int64 bits) as 16 hex digits."""
    return f"{int(v) % (1 << 64):016x}"


def _human(n: Any) -> str:
    """A byte count with a binary unit; anything that is not an int as it is ("-" for None)."""
    if not is_int(n):
        return "-" if n is None else str(n)
    k = min(4, max(0, (abs(n).bit_length() - 1) // 10))  # 1024**k <= |n| < 1024**(k + 1), TiB at most
    return f"{n} B" if k == 0 else f"{n / 1024**k:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[k - 1]}"


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "", right: Sequence[int] = ()
) -> list[str]:
    """Aligned text columns: numbers (and the columns in ``right``) right-aligned, the rest left-aligned."""
    cells = [list(map(str, headers))] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(map(len, column)) for column in zip(*cells)]
    numeric = [i in right or all(isinstance(r[i], (int, float, type(None))) for r in rows) for i in range(len(headers))]
    return [
        (indent + "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric))).rstrip()
        for row in cells
    ]


def _lines(*parts: str | Sequence[str] | None) -> list[str]:
    """The lines of a text report from single lines, blocks of lines (tables) and None (a line left out)."""
    return [line for p in parts if p is not None for line in ([p] if isinstance(p, str) else p)]


def _ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks)) if ranks else "none"


def _span(versions: Sequence[int]) -> str:
    """Compact list of versions: "1..3,7"."""
    # Consecutive versions have the same value minus position: one group per run.
    runs = [[v for _, v in g] for _, g in groupby(enumerate(sorted(versions)), key=lambda iv: iv[1] - iv[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs) or "none"


def _open_log(root: str | os.PathLike) -> ManifestLog:
    """The manifest log of ``root``; raises ManifestError when there is no store there.

    ``root`` may also be the ``manifests`` directory itself."""
    path = Path(root)
    if not path.exists():
        raise ManifestError(f"{path}: no such directory")
    if not path.is_dir():
        raise ManifestError(f"{path}: not a directory (give the store's root)")
    named_manifests = path.name == "manifests" and not (path / "manifests").is_dir()
    if named_manifests and any(_FILE_RE.match(n) for n in os.listdir(path)):
        path = path.parent
    log = ManifestLog(path)
    if not log.versions():
        raise ManifestError(f"{log.dir}: no committed manifest (is {path} an expert-store root?)")
    return log


def _read(log: ManifestLog, version: int | None, what: str = "") -> Manifest:
    """Version ``version`` (None: the latest); a version that is not committed is a usage error."""
    versions = log.versions()
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise UsageError(
            f"version {version}{' ' + what if what else ''} is not committed under {log.root} "
            f"(committed: {_span(versions)})"
        )
    return log.read(version)


def _read_pair(log: ManifestLog, a: int | None, b: int | None) -> tuple[Manifest, Manifest]:
    ma, mb = _read(log, a, "(A)"), _read(log, b, "(B)")
    if _dims(ma) != _dims(mb) or ma.spec != mb.spec:
        raise ManifestError(
            f"{log.path_of(mb.version)}: version {mb.version} has (L, E, R, S) = {_dims(mb)} and spec "
            f"{mb.spec!r}; version {ma.version} in {log.path_of(ma.version)} has {_dims(ma)} and {ma.spec!r}: "
            "not one store"
        )
    return ma, mb


def _read_all(log: ManifestLog) -> tuple[dict[int, Manifest], list[dict[str, Any]]]:
    """Every committed version that reads, and ``{"version", "file", "error"}`` for each that does not."""
    manifests, unreadable = {}, []
    for v in log.versions():
        try:
            manifests[v] = log.read(v)
        except ManifestError as e:
            unreadable.append({"version": v, "file": str(log.path_of(v)), "error": str(e)})
    return manifests, unreadable


def _minus(xs: Sequence[int], ys: Sequence[int]) -> list[int]:
    """The sorted distinct elements of ``xs`` not in ``ys``."""
    return sorted(set(xs) - set(ys))


def _alive_ranks(m: Manifest) -> list[int]:
    return [r for r, a in enumerate(m.alive.tolist()) if a]


def _dims(m: Manifest) -> tuple[int, int, int, int]:
    return (m.num_layers, m.num_experts, m.num_ranks, m.slots_per_rank)


def _spec_json(spec: ExpertSpec) -> dict[str, Any]:
    tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "nbytes": t.nbytes, "record_offset": o}
        for t, o in zip(spec.tensors, spec.record_offsets)
    ]
    return {"tensors": tensors, "nbytes": spec.nbytes, "record_bytes": spec.record_bytes, "word_bytes": spec.word_bytes}


def _checkpoint_json(ck: dict) -> dict[str, Any]:
    names = {k: (v if isinstance(v, str) else list(v)) for k, v in sorted(ck["names"].items())}
    return {"path": ck["path"], "names": names, "layers": None if ck["layers"] is None else list(ck["layers"])}


def _fields(obj: object, *names: str) -> dict[str, Any]:
    return {n: getattr(obj, n) for n in names}


def _header_json(m: Manifest) -> dict[str, Any]:
    created_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created))
    return {**_fields(m, "version", "parent", "created"), "created_iso": created_iso, "reason": m.reason}


def _pair_json(log: ManifestLog, ma: Manifest, mb: Manifest) -> dict[str, Any]:
    return {"root": str(log.root), "a": _header_json(ma), "b": _header_json(mb)}


def _dims_json(m: Manifest) -> dict[str, Any]:
    dims = _fields(m, "num_layers", "num_experts", "num_ranks", "slots_per_rank")
    return {**dims, "num_physical": m.num_ranks * m.slots_per_rank, "ranks_per_node": m.ranks_per_node}


def _replica_stats(m: Manifest) -> dict[str, Any]:
    """Replica counts over every (layer, logical expert); "live" counts slots on live ranks only."""
    L, E, S = m.num_layers, m.num_experts, m.slots_per_rank
    logcnt = m.placement().logcnt.numpy()  # int64 [L, E]
    live_slot = np.repeat(m.alive.numpy(), S)  # bool [P]
    keys = m.phy2log.numpy()[:, live_slot] + np.arange(L, dtype=np.int64)[:, None] * E
    live = np.bincount(keys.reshape(-1), minlength=L * E).reshape(L, E)  # int64 [L, E]
    return {
        "pairs": L * E,
        "min": int(logcnt.min()),
        "max": int(logcnt.max()),
        "mean": round(float(logcnt.mean()), 4),
        "replicated": int((logcnt > 1).sum()),
        "redundant_slots_per_layer": m.num_ranks * S - E,
        "min_live": int(live.min()),
        "single_live": int((live == 1).sum()),
        "no_live": int((live == 0).sum()),
    }


def _balance(phy2log: torch.Tensor, alive: torch.Tensor, load: torch.Tensor | None) -> dict[str, Any] | None:
    """Balancedness of placement ``phy2log`` [L, P] served by the ranks ``alive`` [R] under ``load``
    [L, E] (see the module docstring), rounded to 4 decimals; None without a load. A layer without
    load has balancedness None."""
    if load is None:
        return None
    L, P = phy2log.shape
    R, E = alive.numel(), load.shape[1]
    live_slot = alive.repeat_interleave(P // R)  # bool [P]
    replicas = torch.zeros(L, E, dtype=torch.float64).scatter_add_(
        1, phy2log[:, live_slot], torch.ones(L, int(live_slot.sum()), dtype=torch.float64)
    )  # live replicas [L, E]
    share = load.to(torch.float64) / replicas.clamp(min=1)  # what each replica serves
    gpu = (torch.gather(share, 1, phy2log) * live_slot).view(L, R, P // R).sum(2)[:, alive]  # [L, live R]
    top, mean = gpu.max(1).values, gpu.mean(1)
    ratio = lambda a, b: round(float(a / b), 4) if b > 0 else None
    return {
        "overall": ratio(top.sum(), mean.sum()),
        "layers": [{"layer": la, "balancedness": ratio(top[la], mean[la])} for la in range(L)],
    }


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _balance_text(b: dict[str, Any] | None) -> str:
    """ "1.2345 overall, layers 1.0000..1.5000" (min..max over the layers with load)."""
    if b is None:
        return "no load recorded"
    per = [x["balancedness"] for x in b["layers"] if x["balancedness"] is not None]
    span = f", layers {min(per):.4f}..{max(per):.4f}" if per else ""
    return f"{_ratio(b['overall'])} overall{span}"


def summarize(root: str | os.PathLike, *, version: int | None = None) -> dict[str, Any]:
    """Everything about one version (default: the latest) and the store's history at a glance."""
    log = _open_log(root)
    m = _read(log, version)
    versions = log.versions()
    last = None
    for older in reversed([x for x in versions if x <= m.version]):
        try:
            mo = m if older == m.version else log.read(older)
        except ManifestError:
            continue  # `versions` and `verify` report it; the summary is of version m
        if mo.reason == "rebalance" or mo.stats:
            last = {**_header_json(mo), "stats": dict(mo.stats)}
            break
    alive = _alive_ranks(m)
    return {
        "root": str(log.root),
        **_header_json(m),
        "format_version": m.format_version,
        "spec": _spec_json(m.spec),
        **_dims_json(m),
        "alive": alive,
        "dead": [r for r in range(m.num_ranks) if r not in alive],
        "checkpoint": _checkpoint_json(m.checkpoint),
        "replicas": _replica_stats(m),
        "placement_digest": m.placement().digest().hex(),
        "balancedness": _balance(m.phy2log, m.alive, m.load),
        "last_rebalance": last,
        "versions_kept": len(versions),
        "oldest_version": versions[0],
        "latest_version": versions[-1],
    }


def _render_summary(d: dict[str, Any]) -> list[str]:
    rep, spec, ck, last = d["replicas"], d["spec"], d["checkpoint"], d["last_rebalance"]
    tensors = [
        [t["name"], "x".join(map(str, t["shape"])), *(t[k] for k in ("dtype", "nbytes", "record_offset"))]
        for t in spec["tensors"]
    ]
    width = max(map(len, ck["names"]), default=0)
    names = [
        f"  {name if i == 0 else '':<{width}} <- {t}"
        for name, templates in ck["names"].items()
        for i, t in enumerate([templates] if isinstance(templates, str) else templates)
    ]
    return _lines(
        f"store      {d['root']}",
        f"version    {d['version']} of {d['oldest_version']}..{d['latest_version']} "
        f"({d['versions_kept']} kept), parent {d['parent'] or '-'}",
        f"created    {d['created_iso']}  reason {d['reason']}",
        f"shape      L={d['num_layers']} E={d['num_experts']} R={d['num_ranks']} S={d['slots_per_rank']} "
        f"P={d['num_physical']} ranks/node={d['ranks_per_node'] or '-'}",
        f"alive      {len(d['alive'])}/{d['num_ranks']} ranks: {_ranks_text(d['alive'])}"
        + (f"  (dead: {_ranks_text(d['dead'])})" if d["dead"] else ""),
        f"expert     {spec['nbytes']} B ({_human(spec['nbytes'])}), record {spec['record_bytes']} B, "
        f"word {spec['word_bytes']} B",
        *_table(["tensor", "shape", "dtype", "nbytes", "offset"], tensors, indent="  "),
        f"replicas   min {rep['min']} max {rep['max']} mean {rep['mean']:.2f}; {rep['replicated']} of "
        f"{rep['pairs']} (layer, expert) with >1 replica; {rep['redundant_slots_per_layer']} redundant slots/layer",
        f"live       min {rep['min_live']} live replica(s); {rep['single_live']} (layer, expert) on one live rank only"
        + (f"; {rep['no_live']} WITHOUT a live replica" if rep["no_live"] else ""),
        f"checkpoint {ck['path']}",
        f"  layers   {ck['layers'] if ck['layers'] is not None else 'store layer i = checkpoint layer i'}",
        names,
        f"balance    {_balance_text(d['balancedness'])} (max / mean GPU load under the recorded load)",
        ["rebalance  none yet"] if last is None else _render_rebalance(last),
        f"digest     {d['placement_digest'][:16]}",
    )


def _render_rebalance(last: dict[str, Any]) -> list[str]:
    s = last["stats"]
    rest = " ".join(f"{k}={v}" for k, v in s.items() if k not in _BYTES)
    return _lines(
        f"rebalance  last: version {last['version']} ({last['created_iso']})",
        "  " + ", ".join(f"{k[6:]} {_human(s.get(k))}" for k in _BYTES),
        "  " + rest if rest else None,
    )


def list_versions(root: str | os.PathLike) -> dict[str, Any]:
    """One row per committed version; unreadable versions are listed under ``errors``."""
    log = _open_log(root)
    manifests, errors = _read_all(log)
    rows = [
        {**_header_json(m), "alive": len(_alive_ranks(m)), "num_ranks": m.num_ranks}
        | {k: m.stats.get(k) for k in _BYTES}
        | {"stats": dict(m.stats)}
        for m in manifests.values()
    ]
    return {"root": str(log.root), "versions": rows, "errors": errors}


def _render_versions(d: dict[str, Any]) -> list[str]:
    rows = [
        [r["version"], r["parent"], r["created_iso"], r["reason"], f"{r['alive']}/{r['num_ranks']}"]
        + [r[k] for k in _BYTES]
        + [r["stats"].get(k) for k in ("moves", "rounds")]
        for r in d["versions"]
    ]
    rows += [[e["version"], None, "UNREADABLE", "", "", None, None, None, None, None] for e in d["errors"]]
    rows.sort(key=lambda r: r[0])
    return _table(["version", "parent", "created", "reason", "alive", "p2p", "local", "disk", "moves", "rounds"], rows)


def _checksum_summary(sums: torch.Tensor) -> dict[str, Any]:
    """Summary of an int64 [l, E] checksum table (l = the layers shown)."""
    a = sums.numpy()
    _, counts = np.unique(a, return_counts=True)
    return {
        "shape": list(a.shape),
        "sha256": hashlib.sha256(a.astype("<i8", copy=False).tobytes()).hexdigest(),
        "zero": int((a == 0).sum()),
        # Two (layer, expert) with one checksum: identical bytes, or a table filled wrongly.
        "duplicated": int(counts[counts > 1].sum()),
    }


def show_placement(root: str | os.PathLike, *, version: int | None = None, layer: int | None = None) -> dict[str, Any]:
    """The placement of one version: per layer and rank, the logical expert in each slot
    (``layer``: only that one, and its checksums one by one in the text)."""
    log = _open_log(root)
    m = _read(log, version)
    if layer is not None and not 0 <= layer < m.num_layers:
        raise UsageError(f"layer {layer} is outside [0, {m.num_layers}) in {log.path_of(m.version)}")
    layers = list(range(m.num_layers)) if layer is None else [layer]
    alive, logcnt = m.alive.tolist(), m.placement().logcnt
    out_layers = []
    for lay in layers:
        row = m.phy2log[lay].view(m.num_ranks, m.slots_per_rank).tolist()
        ranks = [{"rank": r, "alive": bool(alive[r]), "experts": row[r]} for r in range(m.num_ranks)]
        out_layers.append({"layer": lay, "ranks": ranks, "checksums": m.checksums[lay].tolist()})
    return {
        "root": str(log.root),
        **_header_json(m),
        **_dims_json(m),
        "layer": layer,
        "layers": out_layers,
        "replicated": [{"layer": lay, "experts": (logcnt[lay] > 1).nonzero().view(-1).tolist()} for lay in layers],
        "checksum_summary": _checksum_summary(m.checksums[layers]),
        "balancedness": _balance(m.phy2log, m.alive, m.load),
    }


def _render_show(d: dict[str, Any]) -> list[str]:
    cs, w, rw = d["checksum_summary"], len(str(d["num_experts"] - 1)), len(str(d["num_ranks"] - 1))
    bal = d["balancedness"]
    placement = []
    for entry in d["layers"]:
        b = None if bal is None else bal["layers"][entry["layer"]]["balancedness"]
        placement.append(f"layer {entry['layer']}" + ("" if bal is None else f"  balancedness {_ratio(b)}"))
        for r in entry["ranks"]:
            ids = " ".join(str(e).rjust(w) for e in r["experts"])
            state, ids = ("alive", ids) if r["alive"] else ("dead ", f"({ids})")
            placement.append(f"  rank {str(r['rank']).rjust(rw)} {state}  {ids}")
    # --layer: that layer's checksums one by one, four to a line
    sums = d["layers"][0]["checksums"] if d["layer"] is not None else []
    cells = [f"e{str(e).rjust(w)} {_hex(c)}" for e, c in enumerate(sums)]
    return _lines(
        f"version {d['version']} (parent {d['parent'] or '-'}, {d['reason']}, {d['created_iso']})  "
        f"L={d['num_layers']} E={d['num_experts']} R={d['num_ranks']} S={d['slots_per_rank']}",
        placement,
        f"balance   {_balance_text(bal)} (max / mean GPU load under the recorded load)",
        f"checksums {cs['shape'][0]} x {cs['shape'][1]} (layer, expert): sha256 {cs['sha256'][:16]}, "
        f"{cs['zero']} zero, {cs['duplicated']} sharing a value",
        ["  " + "  ".join(cells[i : i + 4]) for i in range(0, len(cells), 4)],
    )


def diff_versions(root: str | os.PathLike, a: int | None, b: int | None) -> dict[str, Any]:
    """What changed from version ``a`` to version ``b`` (None: the latest): slots, experts per rank, alive ranks."""
    log = _open_log(root)
    ma, mb = _read_pair(log, a, b)
    R, S = ma.num_ranks, ma.slots_per_rank
    alive_a, alive_b = _alive_ranks(ma), _alive_ranks(mb)
    layers = []
    for lay in range(ma.num_layers):
        oa, ob = ma.phy2log[lay].view(R, S).tolist(), mb.phy2log[lay].view(R, S).tolist()
        changed = [sum(x != y for x, y in zip(oa[r], ob[r])) for r in range(R)]
        ranks = [
            {"rank": r, "slots_changed": n, "added": _minus(ob[r], oa[r]), "removed": _minus(oa[r], ob[r])}
            for r, n in enumerate(changed)
            if n
        ]
        layers.append({"layer": lay, "slots_changed": sum(changed), "ranks": ranks})
    moved = [r for x in layers for r in x["ranks"]]
    return {
        **_pair_json(log, ma, mb),
        "alive": {"a": alive_a, "b": alive_b, "died": _minus(alive_a, alive_b), "revived": _minus(alive_b, alive_a)},
        "slots_changed": sum(x["slots_changed"] for x in layers),
        "experts_added": sum(len(r["added"]) for r in moved),
        "experts_removed": sum(len(r["removed"]) for r in moved),
        "layers": layers,
        "checksums_changed": [
            {"layer": la, "expert": e} for la, e in (ma.checksums != mb.checksums).nonzero().tolist()
        ],
        "checkpoint_changed": _checkpoint_json(ma.checkpoint) != _checkpoint_json(mb.checkpoint),
        "ranks_per_node_changed": ma.ranks_per_node != mb.ranks_per_node,
    }


def _render_diff(d: dict[str, Any]) -> list[str]:
    a, b, al, sums = d["a"], d["b"], d["alive"], d["checksums_changed"]
    ids = lambda xs: " ".join(map(str, xs)) or "-"
    rows = [
        [e["layer"], r["rank"], r["slots_changed"], ids(r["added"]), ids(r["removed"])]
        for e in d["layers"]
        for r in e["ranks"]
    ]
    pairs = " ".join(f"{c['layer']}/{c['expert']}" for c in sums[:16]) + (" ..." if len(sums) > 16 else "")
    return _lines(
        f"diff version {a['version']} ({a['reason']}, {a['created_iso']}) -> version {b['version']} "
        f"({b['reason']}, {b['created_iso']})",
        f"alive      {_ranks_text(al['a'])} -> {_ranks_text(al['b'])}"
        + (f"; died {_ranks_text(al['died'])}" if al["died"] else "")
        + (f"; revived {_ranks_text(al['revived'])}" if al["revived"] else ""),
        f"slots      {d['slots_changed']} changed; per rank and layer {d['experts_added']} expert(s) added, "
        f"{d['experts_removed']} removed",
        "checkpoint changed (path, names or layers)" if d["checkpoint_changed"] else None,
        "ranks_per_node changed" if d["ranks_per_node_changed"] else None,
        f"checksums  {len(sums)} (layer/expert) changed: {pairs}" if sums else None,
        _table(["layer", "rank", "slots", "added", "removed"], rows, indent="  ") if rows else "  placement unchanged",
    )


def _budget(given: int | None, stats: dict, where: Path, key: str, default: int) -> int:
    """The byte budget ``key`` of a plan: ``given``, else as recorded in ``stats`` (of the manifest in
    ``where``), else ``default``."""
    if given is not None:
        return check_bytes(given, "--" + key.replace("_", "-"), error=UsageError)
    v = stats.get(key, default)
    if not is_int(v) or not 0 < v <= MAX_BYTES:
        raise ManifestError(
            f"{where}: stats[{key!r}] = {v!r:.40} is not a byte count in 1..{MAX_BYTES} "
            f"(pass --{key.replace('_', '-')})"
        )
    return v


def plan_between(
    root: str | os.PathLike,
    a: int | None,
    b: int | None,
    *,
    staging_bytes: int | None = None,
    round_bytes: int | None = None,
    fresh: Sequence[int] = (),
) -> dict[str, Any]:
    """What a rebalance from version ``a`` (its placement and alive mask) to version ``b``
    (its placement and alive mask) moves, as :func:`expert_store.plan.plan_rebalance` and
    :func:`~expert_store.plan.schedule_rounds` compute it on every live rank (layer chunk by
    layer chunk, :func:`~expert_store.plan.plan_chunks`).

    ``staging_bytes`` and ``round_bytes`` default to the values recorded in ``b`` (when it
    was made by a rebalance), else the store's defaults; rounds get the store's budget
    (:func:`~expert_store.plan.round_budget`). ``fresh``: live ranks whose memory was
    empty (joined) for that rebalance. ``balancedness``: both placements under the load
    recorded in ``b``, else in ``a`` (None when neither has one). ``movement``: the totals of
    :func:`expert_store.eplb.movement` from ``a``'s placement to ``b``'s (experts brought onto
    ranks, same/other node by the store's ranks_per_node, local copies), liveness aside.
    """
    log = _open_log(root)
    ma, mb = _read_pair(log, a, b)
    where = log.path_of(mb.version)
    fresh = sorted(set(fresh))
    for r in fresh:
        if not 0 <= r < mb.num_ranks or not bool(mb.alive[r]):
            raise UsageError(f"--fresh rank {r} is not a live rank of version {mb.version}")
    d = _plan_report(
        ma, mb.placement(), mb.alive, fresh,
        _budget(staging_bytes, mb.stats, where, "staging_bytes", DEFAULT_STAGING_BYTES),
        _budget(round_bytes, mb.stats, where, "round_bytes", DEFAULT_ROUND_BYTES),
        mb if mb.load is not None else ma, f"{where}: plan {ma.version} -> {mb.version} under {log.root}",
    )  # fmt: skip
    t, recorded = d["totals"], None
    if mb.parent == ma.version and mb.reason == "rebalance":
        rec = {k: mb.stats.get(k) for k in _PLAN_STATS}
        recorded = {"stats": rec} | {k: mb.stats.get(k) for k in ("staging_bytes", "fresh_ranks")}
        recorded["matches"] = all(rec[k] is None or rec[k] == t[k] for k in _PLAN_STATS)
    return {**_pair_json(log, ma, mb), "placement_file": None, "alive_b": _alive_ranks(mb), **d, "recorded": recorded}


def _ranks_arg(ranks: Sequence[int], option: str, R: int) -> list[int]:
    """Sorted distinct ``ranks`` of an option, each a rank of the store (else a usage error)."""
    for r in ranks:
        if not is_int(r) or not 0 <= r < R:
            raise UsageError(f"{option} rank {r} is not a rank of the store (R = {R}: ranks 0..{R - 1})")
    return sorted(set(ranks))


def _placement_file(path: Path, m: Manifest) -> Placement:
    """The placement in ``path`` (JSON or msgpack ``{"phy2log": ...}``, or a tensor, or a dict holding
    one under ``phy2log``, saved with torch.save) for the store of ``m``; PlacementError naming the file."""
    L, P = m.num_layers, m.num_ranks * m.slots_per_rank

    def bad(why: str) -> PlacementError:
        return PlacementError(f"{path}: {why}")

    try:
        data = path.read_bytes()
    except OSError as e:
        looks = str(path).isdigit() or str(path) in ("latest", "current")
        hint = " (to plan between two versions give both: plan ROOT A B)" if looks else ""
        raise bad(f"cannot read the placement file: {e.strerror or e}{hint}") from None
    if data[:4] == b"PK\x03\x04":  # torch.save's zip archive
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged or unsafe file
            raise bad(f"not a readable torch.save file (weights_only=True): {type(e).__name__}: {e}") from None
        what = "a torch.save file"
    elif data.lstrip()[:1] in (b"{", b"["):
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"not valid JSON: {e}") from None
        what = "JSON"
    else:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises many types (ValueError, FormatError, ExtraData, ...)
            raise bad(f"neither JSON, msgpack nor a torch.save file ({type(e).__name__}: {e})") from None
        what = "msgpack"
    if isinstance(obj, dict):
        if "phy2log" not in obj:
            raise bad(f"{what} map without a 'phy2log' key (keys: {sorted(map(str, obj))[:8]})")
        obj = obj["phy2log"]
    elif not (isinstance(obj, torch.Tensor) and what == "a torch.save file"):
        raise bad(f"{what} holding a {type(obj).__name__}, not a map with a 'phy2log' key")
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bool or obj.is_floating_point() or obj.is_complex():
            raise bad(f"phy2log must be an integer tensor, got {obj.dtype}")
        obj = obj.to(torch.int64)
    elif not isinstance(obj, list):
        raise bad(f"phy2log must be a list of L lists of P ints, got {type(obj).__name__}")
    shape = (
        list(obj.shape)
        if isinstance(obj, torch.Tensor)
        else [len(obj), *sorted({len(r) for r in obj if isinstance(r, list)})]
    )
    if shape != [L, P]:
        raise bad(
            f"phy2log has shape {shape}, the store's is [L, P] = [{L}, {P}] (R = {m.num_ranks}, S = {m.slots_per_rank})"
        )
    try:
        return Placement(obj, num_ranks=m.num_ranks, num_experts=m.num_experts)
    except PlacementError as e:
        raise bad(f"not a placement of this store (E = {m.num_experts}): {e}") from None


def plan_placement(
    root: str | os.PathLike,
    placement_file: str | os.PathLike,
    *,
    dead: Sequence[int] = (),
    fresh: Sequence[int] = (),
    staging_bytes: int | None = None,
    round_bytes: int | None = None,
) -> dict[str, Any]:
    """Dry run of ``rebalance``: what a rebalance from the latest version of ``root`` to the placement
    in ``placement_file`` would move, with the rounds and staging that ``ExpertStore.rebalance``
    computes for the same arguments (``alive`` = the latest version's live ranks minus ``dead``,
    ``fresh``, ``staging_bytes`` and ``round_bytes``, defaults the store's). Keys as
    :func:`plan_between`'s, ``b`` None and ``placement_file`` the file. ``balancedness``: the
    current and the new placement under the load recorded in the latest version (None without).

    Raises:
        PlacementError: the file is missing or unreadable, not JSON, msgpack or a torch.save
            file, has no ``phy2log``, or holds one of the wrong dtype, shape or expert ids, or
            one that the live ranks cannot serve; the message names the file.
        UsageError: ``dead`` or ``fresh`` names a rank the store does not have, or ``fresh``
            a rank that is not live.
    """
    log = _open_log(root)
    ma = _read(log, None)
    path, R = Path(placement_file), ma.num_ranks
    dead, fresh = _ranks_arg(dead, "--dead", R), _ranks_arg(fresh, "--fresh", R)
    alive = ma.alive.clone()
    alive[dead] = False
    for r in fresh:
        if not alive[r]:
            why = "given in --dead" if r in dead else f"dead in version {ma.version}"
            raise UsageError(f"--fresh rank {r} is not a live rank of the new placement ({why})")
    if not bool(alive.any()):
        raise UsageError(
            f"--dead {_ranks_text(dead)} leaves no live rank (version {ma.version} has {_ranks_text(_alive_ranks(ma))})"
        )
    new = _placement_file(path, ma)
    try:
        new.check_servable(alive)
    except PlacementError as e:
        raise PlacementError(
            f"{path}: not servable by the live ranks {_ranks_text(alive.nonzero().view(-1).tolist())}: {e}"
        ) from None
    where = log.path_of(ma.version)
    d = _plan_report(
        ma, new, alive, fresh,
        _budget(staging_bytes, {}, where, "staging_bytes", DEFAULT_STAGING_BYTES),
        _budget(round_bytes, {}, where, "round_bytes", DEFAULT_ROUND_BYTES),
        ma, f"{path}: plan {ma.version} -> this placement under {log.root}",
    )  # fmt: skip
    alive_b = alive.nonzero().view(-1).tolist()
    header = {"root": str(log.root), "a": _header_json(ma), "b": None, "placement_file": str(path)}
    return {**header, "alive_b": alive_b, **d, "recorded": None}


def _plan_report(
    ma: Manifest,
    new: Placement,
    alive: torch.Tensor,
    fresh: list[int],
    staging_bytes: int,
    round_bytes: int,
    by_load: Manifest,
    what: str,
) -> dict[str, Any]:
    """The plan from ``ma`` to ``new`` served by ``alive``: totals, per rank, per link, per round, and
    the balancedness of both placements under ``by_load``'s load; StoreErrors prefixed with ``what``."""
    spec = ma.spec
    try:
        chunks = list(
            plan_chunks(
                ma.placement(),
                new,
                expert_bytes=spec.nbytes,
                record_bytes=spec.record_bytes,
                staging_bytes=staging_bytes,
                round_bytes=round_bytes,
                old_alive=ma.alive,
                alive=alive,
                fresh=fresh,
                ranks_per_node=ma.ranks_per_node,
            )
        )
        plan = merge_plans([c[0] for c in chunks])
        # after every chunk: missing experts read once, sent on by their reader
        relays = relay_rounds(
            plan, record_bytes=spec.record_bytes, staging_bytes=staging_bytes, round_bytes=round_bytes
        )
        rounds = [r for c in chunks for r in c[1]] + relays
        budget = round_budget(staging_bytes=chunks[0][2], round_bytes=round_bytes, record_bytes=spec.record_bytes)
    except StoreError as e:
        raise type(e)(f"{what}: {e}") from None
    links = Counter((mv.src_rank, mv.dst_rank) for rnd in rounds for mv in rnd.moves if not mv.is_local)
    sent = Counter(src for src, _ in links.elements())  # records each rank sends
    round_rows = []
    for rnd in rounds:
        n, p2p = len(rnd.moves), sum(not mv.is_local for mv in rnd.moves)
        round_rows.append({"moves": n, "p2p": p2p, "local": n - p2p, "parks": len(rnd.parks)})
    ranks = []
    for r in range(new.num_ranks):
        live, acct = r in plan.accounts, plan.accounts.get(r, RankAccount())  # a dead rank moves nothing
        missing = [{"layer": la, "experts": list(e)} for la, e in sorted(acct.missing.items())]
        peak = planned_staging_peak(
            chunks, rank=r, record_bytes=spec.record_bytes, staging_bytes=staging_bytes, relays=relays
        )
        ranks.append(
            {"rank": r, "alive": live, "fresh": live and (r in fresh or not plan.holders_valid[r])}
            | _fields(acct, *_BYTES)
            | {"bytes_sent": sent[r] * spec.nbytes, "staging_peak": peak if live else 0, "missing": missing}
        )
    n_p2p = sum(not mv.is_local for mv in plan.moves)
    totals = {k: sum(x[k] for x in ranks) for k in _BYTES} | {"moves": len(plan.moves)}
    totals |= {"disk_reads": len(plan.disk_reads), "post_copies": len(plan.post_copies), "rounds": len(rounds)}
    totals |= {"relays": len(plan.relays)}
    balance = None
    if by_load.load is not None:
        balance = {"load_version": by_load.version, "a": _balance(ma.phy2log, ma.alive, by_load.load)}
        balance["b"] = _balance(new.phy2log, alive, by_load.load)
    return {
        "expert_bytes": spec.nbytes,
        "record_bytes": spec.record_bytes,
        "staging_bytes": staging_bytes,
        "round_bytes": round_bytes,
        "round_budget_bytes": budget,
        "staging_peak": max(x["staging_peak"] for x in ranks),
        "alive_a": _alive_ranks(ma),
        "fresh": fresh,
        "totals": {**totals, "moves_p2p": n_p2p, "moves_local": len(plan.moves) - n_p2p},
        "parks": sum(x["parks"] for x in round_rows),
        "ranks": ranks,
        "links": [
            {"src": s, "dst": t, "records": n, "bytes": n * spec.nbytes, "slab_bytes": n * spec.record_bytes}
            for (s, t), n in sorted(links.items())
        ],
        "rounds": round_rows,
        # What the placement change brings onto ranks, counted on the placements (liveness aside).
        "movement": movement(ma.phy2log, new.phy2log, new.num_ranks, ma.ranks_per_node).totals(),
        "balancedness": balance,
    }


def _render_plan(d: dict[str, Any]) -> list[str]:
    t, rec, bal = d["totals"], d["recorded"], d["balancedness"]
    rows = []
    for r in d["ranks"]:
        state = "dead" if not r["alive"] else ("empty" if r["fresh"] else "alive")
        missing = "; ".join(f"L{m['layer']}: {' '.join(map(str, m['experts']))}" for m in r["missing"]) or "-"
        rows.append([r["rank"], state, *(r[k] for k in (*_BYTES, "bytes_sent", "staging_peak")), missing])
    rows.append(["all", "", *(t[k] for k in _BYTES), sum(r[5] for r in rows), d["staging_peak"], ""])
    links = [[x["src"], x["dst"], x["records"], x["bytes"], _human(x["bytes"])] for x in d["links"]]
    target = f"version {d['b']['version']}" if d["placement_file"] is None else f"placement file {d['placement_file']}"
    return _lines(
        f"plan version {d['a']['version']} -> {target}: alive {_ranks_text(d['alive_a'])} -> "
        f"{_ranks_text(d['alive_b'])}" + (f", fresh {_ranks_text(d['fresh'])}" if d["fresh"] else ""),
        f"expert {_human(d['expert_bytes'])} (record {d['record_bytes']} B), staging {_human(d['staging_bytes'])} "
        f"({_human(d['round_budget_bytes'])} per round), staging peak {_human(d['staging_peak'])} per rank",
        _table(
            ["rank", "state", "p2p", "local", "disk", "sent", "staging", "missing (from checkpoint)"],
            rows,
            indent="  ",
            right=[0],
        ),
        f"moves {t['moves']} (p2p {t['moves_p2p']}, local {t['moves_local']}), disk reads {t['disk_reads']}"
        + (f", relays {t['relays']}" if t["relays"] else "")
        + ", "
        f"post copies {t['post_copies']}, rounds {t['rounds']}, parks {d['parks']}",
        "rounds  " + " ".join(f"[{x['p2p']} p2p + {x['local']} local]" for x in d["rounds"][:12])
        if d["rounds"]
        else None,
        ["links (src -> dst)", *_table(["src", "dst", "records", "bytes", ""], links, indent="  ")] if links else None,
        _movement_text(d["movement"]),
        None
        if bal is None
        else f"balance {_ratio(bal['a']['overall'])} -> {_ratio(bal['b']['overall'])} (max / mean GPU load under "
        f"the load recorded in version {bal['load_version']})",
        None if rec is None else _render_recorded(rec, d["b"]["version"]),
    )


def _movement_text(mv: dict[str, Any]) -> str:
    near = "" if mv["same_node"] is None else f" (same node {mv['same_node']}, other node {mv['other_node']})"
    return f"movement: {mv['brought_in']} experts brought in{near}, {mv['local_copies']} local copies"


def _render_recorded(rec: dict[str, Any], version: int) -> str:
    """How a plan compares with the stats that the rebalance which made ``version`` recorded."""
    hint = not rec["matches"] and rec["fresh_ranks"]
    return (
        f"{'matches' if rec['matches'] else 'DIFFERS FROM'} the stats recorded in version {version}: "
        + " ".join(f"{k}={v}" for k, v in rec["stats"].items() if v is not None)
        + (f" ({rec['fresh_ranks']} rank(s) were fresh in that rebalance: pass --fresh)" if hint else "")
    )


def _check_checkpoint_bytes(m: Manifest, path_override: str | None) -> dict[str, Any]:
    """Read every (layer, expert) of ``m``'s checkpoint into one record on the CPU, as the store
    loads it (:meth:`Checkpoint.read_into`), and compare its checksum (torch reference of the
    checksum kernel) with ``m.checksums``."""
    ck = {**m.checkpoint, "path": m.checkpoint["path"] if path_override is None else path_override}
    out: dict[str, Any] = {"path": ck["path"], "checked": 0, "mismatches": [], "errors": []}
    spec = m.spec
    try:
        record = torch.zeros(spec.record_bytes, dtype=torch.uint8)  # padding between tensors stays 0
        ckpt = Checkpoint.from_dict(ck)
    except (RuntimeError, MemoryError) as e:  # a spec whose record is beyond this host's memory
        out["errors"].append(f"cannot allocate an expert record of {spec.record_bytes} bytes: {e}")
        return out
    except StoreError as e:
        out["errors"].append(f"cannot open the checkpoint: {e}")
        return out
    views = spec.record_views(record)
    with ckpt:
        for layer, e in product(range(m.num_layers), range(m.num_experts)):
            try:
                ckpt.read_into(spec, [(layer, e, views)])
            except StoreError as err:
                out["errors"].append(f"layer {layer} expert {e}: {err}")
                continue
            got, want = int(slab_checksums_reference(record, spec, 1)[0]), int(m.checksums[layer, e])
            out["checked"] += 1
            if got != want:
                out["mismatches"].append({"layer": layer, "expert": e, "manifest": want, "checkpoint": got})
    return out


def _check_chain(log: ManifestLog, versions: list[int], manifests: dict[int, Manifest], report: dict) -> None:
    """Parents form one chain; a missing parent is allowed only below the oldest kept version."""
    committed, problems = set(versions), report["problems"]
    for i, v in enumerate(versions):
        m = manifests.get(v)
        if m is None:
            continue
        path, p = log.path_of(v), m.parent
        if p is None:
            if i:
                problems.append(f"{path}: version {v} has no parent, but version(s) {_span(versions[:i])} precede it")
        elif p in committed:
            if p != versions[i - 1]:
                problems.append(
                    f"{path}: the parent of version {v} is {p}, which skips committed version(s) "
                    f"{_span([x for x in versions if p < x < v])} (a fork in the history)"
                )
        elif i == 0:
            report["pruned_below"] = v
            report["notes"].append(f"versions before {v} were pruned (its parent {p} is gone)")
        else:
            problems.append(
                f"{path}: the parent of version {v} is {p}, which is not committed although older version "
                f"{versions[i - 1]} is: a gap in the history that pruning does not explain"
            )


def _check_directory(log: ManifestLog, committed: set[int], report: dict) -> None:
    """Stray temporary files (interrupted commits) and names that are not manifests: warnings."""
    now = time.time()
    for name in sorted(os.listdir(log.dir)):
        p = log.dir / name
        if _TMP_RE.match(name):
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue  # a commit in flight finished meanwhile
            report["temporaries"].append({"file": str(p), "age_s": round(age, 1)})
            report["warnings"].append(
                f"{p}: stray temporary file ({age:.0f} s old), left by an interrupted commit; "
                "ManifestLog.clean_temporaries() removes it"
            )
        elif not ((mt := _FILE_RE.match(name)) and int(mt.group(1)) in committed):
            report["warnings"].append(f"{p}: not a manifest file name (v{{version:08d}}.msgpack); ignored by the store")


def verify_store(
    root: str | os.PathLike, *, checkpoint_bytes: bool = False, checkpoint: str | None = None
) -> dict[str, Any]:
    """Check the whole history of a root: every version decodes, parents form one chain
    (a missing parent is allowed only below the oldest kept version: pruning), every
    version describes the same store (:func:`~expert_store.manifest.store_difference`),
    the latest is readable, no stray temporary files. With ``checkpoint_bytes``, also
    recompute every (layer, expert) checksum from the checkpoint the latest version
    records (``checkpoint`` overrides its path).

    ``ok`` is False when a problem is found; ``warnings`` never make it False.
    """
    log = _open_log(root)
    versions = log.versions()
    latest, latest_path = versions[-1], log.path_of(versions[-1])
    manifests, unreadable = _read_all(log)
    report: dict[str, Any] = {"root": str(log.root), "ok": False, "versions": versions, "latest": latest}
    report |= {"readable": sorted(manifests), "unreadable": unreadable, "pruned_below": None, "temporaries": []}
    report |= {"checkpoint": None, "problems": [e["error"] for e in unreadable], "warnings": [], "notes": []}
    problems, warnings = report["problems"], report["warnings"]
    if latest not in manifests:
        problems.append(f"{latest_path}: the latest version {latest} is unreadable: the store cannot be opened")
    _check_chain(log, versions, manifests, report)
    ref = manifests.get(latest) or next(reversed(manifests.values()), None)
    for v, m in manifests.items():
        if ref is not None and (why := store_difference(ref, m)) is not None:
            problems.append(
                f"{log.path_of(v)}: version {v} and version {ref.version} ({log.path_of(ref.version)}) "
                f"are not one store: {why}"
            )
        older = manifests.get(m.parent) if m.parent is not None else None
        if older is not None and _dims(older) == _dims(m) and not torch.equal(older.checksums, m.checksums):
            n = int((older.checksums != m.checksums).sum())
            warnings.append(f"{log.path_of(v)}: {n} checksum(s) differ from parent version {m.parent}")
    _check_directory(log, set(versions), report)
    if checkpoint_bytes and latest not in manifests:
        problems.append(f"{latest_path}: checkpoint bytes not checked: the latest version is unreadable")
    elif checkpoint_bytes:
        ck = report["checkpoint"] = _check_checkpoint_bytes(manifests[latest], checkpoint)
        src = f"{latest_path} vs checkpoint {ck['path']}"
        problems += [f"{src}: {e}" for e in ck["errors"]]
        for mm in ck["mismatches"]:
            problems.append(
                f"{src}: layer {mm['layer']} expert {mm['expert']}: checksum of the checkpoint bytes is "
                f"{_hex(mm['checkpoint'])}, the manifest records {_hex(mm['manifest'])}"
            )
    report["ok"] = not problems
    return report


def _render_verify(d: dict[str, Any]) -> list[str]:
    out = [
        f"store      {d['root']}",
        f"versions   {_span(d['versions'])} ({len(d['versions'])} committed, {len(d['readable'])} readable), "
        f"latest {d['latest']}",
        *[f"note       {n}" for n in d["notes"]],
    ]
    ck = d["checkpoint"]
    if ck is not None:
        out.append(
            f"checkpoint {ck['path']}: {ck['checked']} (layer, expert) checksummed, {len(ck['mismatches'])} "
            f"mismatch(es), {len(ck['errors'])} error(s)"
        )
    out += [f"warning    {w}" for w in d["warnings"]] + [f"PROBLEM    {p}" for p in d["problems"]]
    out.append("OK" if d["ok"] else f"FAILED: {len(d['problems'])} problem(s)")
    return out


def _plan_command(root: str, targets: list[str], *, dead: list[int] | None, **options: Any) -> dict[str, Any]:
    """``plan ROOT A B`` (:func:`plan_between`) or ``plan ROOT PLACEMENT_FILE`` (:func:`plan_placement`)."""
    if len(targets) == 1:
        return plan_placement(root, targets[0], dead=dead or (), **options)
    if len(targets) != 2:
        raise UsageError(f"plan takes two versions (A B) or one placement file, got {len(targets)} arguments")
    if dead is not None:
        raise UsageError("--dead is for a placement file (plan ROOT PLACEMENT_FILE): versions record their ranks")
    a, b = (_parse_version(t, v) for t, v in zip(targets, "AB"))
    return plan_between(root, a, b, **options)


def _parse_version(text: str, which: str) -> int | None:
    try:
        return _VERSION(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"plan: argument {which}: {e}") from None


# command: (its library function, the text rendering of that function's dict)
_COMMANDS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], list[str]]]] = {
    "summary": (summarize, _render_summary),
    "versions": (list_versions, _render_versions),
    "show": (show_placement, _render_show),
    "diff": (diff_versions, _render_diff),
    "plan": (_plan_command, _render_plan),
    "verify": (verify_store, _render_verify),
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _arg(what: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``parse(text)``, or a usage error saying that ``text`` is not ``what``."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, StoreError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return convert


def _size(text: str) -> int:
    """Bytes, optionally with a binary suffix: 1073741824, 1G, 512M, 64K."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return check_bytes(int(t[:-1] if scale > 1 else t) * scale, "a byte count")


_VERSION = _arg(
    "a version (an int >= 1) or 'latest'",
    lambda t: None if t in ("latest", "current") else check_int(int(t), "version", low=1),
)
_SIZE = _arg(f"a byte count such as 1073741824 or 1G (at most {MAX_BYTES})", _size)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --json given before the command is not overwritten by the sub-parser's default.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p = _Parser(
        prog=PROG,
        parents=[common],
        description="Inspect an expert-store root: its versions, placements, plans and integrity (read only).",
        epilog="Exit codes: 0 ok, 1 a problem was found (message on stderr), 2 usage error.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    def add(name: str, help_: str, *, pair: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.add_argument("root", metavar="ROOT", help="the store's root directory (holds manifests/)")
        for v in ("a", "b") if pair else ():
            sp.add_argument(v, type=_VERSION, metavar=v.upper(), help="a version number, or 'latest'")
        return sp

    version = {"type": _VERSION, "default": None, "metavar": "N", "help": "another version than the latest"}
    add("summary", "current version, spec, shape, alive ranks, checkpoint, replicas, last rebalance").add_argument(
        "--version", **version
    )
    add("versions", "one line per committed version")
    sp = add("show", "the placement: per layer and rank the logical expert in each slot, and the checksums")
    sp.add_argument("--version", **version)
    layer = _arg("an int >= 0", lambda t: check_int(int(t), "layer", low=0))
    sp.add_argument("--layer", type=layer, default=None, metavar="L", help="only this layer")
    add("diff", "what changed between versions A and B", pair=True)
    plan_help = "what a rebalance from version A's placement to version B's moves, or (dry run) from the latest"
    sp = add("plan", plan_help + " version to the placement in PLACEMENT_FILE")
    sp.description = (
        f"{plan_help} version to the placement in PLACEMENT_FILE. Two arguments after ROOT are versions A B "
        "(numbers or 'latest'); one is a placement file: JSON or msgpack {\"phy2log\": [[...], ...]} or an int "
        "tensor [L, P] saved with torch.save. The dry run plans what ExpertStore.rebalance would do with "
        "alive = the latest version's live ranks minus --dead: bytes per link, local copies, checkpoint reads, "
        "rounds, staging peak, and the balancedness of both placements under the load recorded in the latest "
        "version."
    )
    sp.add_argument("targets", nargs="+", metavar="A B | PLACEMENT_FILE", help="two versions, or a placement file")
    for name, what in (("staging", "staging memory per rank"), ("round", "records per rank and round")):
        help_ = f"{what} (1G, 256M, ...); default: as recorded in B, else the store's default"
        sp.add_argument(f"--{name}-bytes", type=_SIZE, default=None, metavar="N", help=help_)
    ranks = _arg("comma-separated rank numbers", lambda t: sorted({int(x) for x in t.split(",") if x.strip()}))
    sp.add_argument(
        "--fresh", type=ranks, action="extend", default=[], metavar="R,...", help="live ranks that are empty (joined)"
    )
    dead_help = "placement file only: ranks dead in the new placement (repeatable)"
    sp.add_argument("--dead", type=ranks, action="extend", default=None, metavar="R,...", help=dead_help)
    sp = add("verify", "check every manifest, the version chain and (optionally) the checkpoint bytes")
    sp.add_argument(
        "--checkpoint-bytes",
        action="store_true",
        help="also read every (layer, expert) from the checkpoint and compare its checksum with the latest manifest",
    )
    sp.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint path instead of the recorded one")
    return p


def _printable(text: object, *, one_line: bool = False) -> str:
    """``text`` safe to print: bytes that were not UTF-8 (file names) and control characters escaped."""
    s = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return (_CONTROL_ONE_LINE if one_line else _CONTROL).sub(lambda mt: repr(mt.group())[1:-1], s)


def _say(message: object) -> None:
    """One line on stderr."""
    sys.stderr.write(f"{PROG}: {_printable(message, one_line=True)}\n")


def _run(args: argparse.Namespace) -> int:
    # Every option's dest is the keyword of the library function of its command.
    options = {k: v for k, v in vars(args).items() if k not in ("command", "root", "json")}
    build, render = _COMMANDS[args.command]
    d = build(args.root, **options)
    sys.stdout.write(
        _printable(json.dumps(d, indent=2) if getattr(args, "json", False) else "\n".join(render(d))) + "\n"
    )
    if args.command == "versions" and d["errors"]:
        for e in d["errors"]:
            _say(e["error"])
        return 1
    if args.command == "verify" and not d["ok"]:
        # The report (stdout) lists every problem; stderr gets one line naming the first.
        _say(f"verify found {len(d['problems'])} problem(s) under {d['root']}; first: {d['problems'][0]}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``inspect-store`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:  # usage and message: two lines, as argparse writes them
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help (0)
        return e.code if isinstance(e.code, int) else 0
    try:
        return _run(args)
    except BrokenPipeError:  # `inspect-store ... | head`
        return 0
    except Exception as e:  # a StoreError names the file at fault, an OSError its path; anything else is a bug
        if isinstance(e, OSError):
            _say(f"{e.filename or args.root}: {e.strerror or e}")
        elif isinstance(e, StoreError):
            _say(e)
        else:
            _say(f"{args.root}: internal error of {PROG} {args.command}, please report it: {type(e).__name__}: {e}")
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())

"""inspect-store: the operator's view of an expert-store root (its manifests, read only).

    inspect-store summary ROOT [--version N] [--json]
    inspect-store versions ROOT [--json]
    inspect-store show ROOT [--version N] [--layer L] [--json]
    inspect-store diff ROOT A B [--json]
    inspect-store plan ROOT A B [--staging-bytes N] [--round-bytes N] [--fresh R,...] [--json]
    inspect-store verify ROOT [--checkpoint-bytes] [--checkpoint PATH] [--json]

Symbols: L MoE layers, E logical experts per layer, R ranks, S slots per rank,
P = R * S physical slots; slot p lives on rank p // S.

Every command has a library function returning a JSON-friendly dict with fixed
keys (:func:`summarize`, :func:`list_versions`, :func:`show_placement`,
:func:`diff_versions`, :func:`plan_between`, :func:`verify_store`); ``--json``
prints that dict, otherwise it is rendered as aligned text. Mappings keyed by
a number (layer, rank) are written as lists of objects, so JSON keys are always
the same strings.

Exit codes: 0 success (``verify``: everything verified), 1 a problem was found
(missing root, no or corrupt manifest, failed verification: one line on stderr
naming the file, layer or expert; ``verify`` lists every problem in its report),
2 a usage error (bad option, unknown version or layer). Nothing here writes to
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expert_store.kernels.reference import slab_checksums_reference

from .checkpoint import Checkpoint
from .errors import ManifestError, StoreError
from .manifest import Manifest, ManifestLog
from .plan import merge_plans, plan_chunks, round_budget
from .spec import ExpertSpec, dtype_name
from .store import DEFAULT_ROUND_BYTES, DEFAULT_STAGING_BYTES

__all__ = [
    "UsageError",
    "build_parser",
    "diff_versions",
    "list_versions",
    "main",
    "plan_between",
    "show_placement",
    "summarize",
    "verify_store",
]

PROG = "inspect-store"

# Leftovers of interrupted commits (ManifestLog writes ".v{version:08d}.<pid>.<random>.tmp").
_TMP_RE = re.compile(r"^\.v\d{8,}\..*\.tmp$")
_FILE_RE = re.compile(r"^v(\d{8,})\.msgpack$")
# Stats a rebalance records that `plan` can recompute and compare.
_PLAN_STATS = ("bytes_p2p", "bytes_local", "bytes_disk", "moves", "disk_reads", "post_copies", "rounds")
# Experts packed per checksum batch in `verify --checkpoint-bytes`: bounds the host slab to
# ~256 MiB whatever the expert size (a DeepSeek-V3 fp8 expert is 44 MB: 6 per batch).
_CHECK_BATCH_BYTES = 256 << 20
_U64 = (1 << 64) - 1


class UsageError(StoreError):
    """A command line that names something the store does not have (exit code 2)."""


# --------------------------------------------------------------------------- helpers


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _hex(v: int) -> str:
    """A checksum (int64 bits) as 16 hex digits."""
    return f"{int(v) & _U64:016x}"


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"  # unreachable


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "", right: Sequence[int] = ()
) -> list[str]:
    """Aligned text columns: numbers (and the columns in ``right``) right-aligned, the rest left-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    numeric = [
        i in right or (bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows))
        for i in range(len(headers))
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    out = []
    for row in cells:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append((indent + "  ".join(parts)).rstrip())
    return out


def _ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks)) if ranks else "none"


def _open_log(root: str | os.PathLike) -> ManifestLog:
    """The manifest log of ``root``; raises ManifestError when there is no store there.

    ``root`` may also be the ``manifests`` directory itself."""
    path = Path(root)
    if not path.exists():
        raise ManifestError(f"{path}: no such directory")
    if not path.is_dir():
        raise ManifestError(f"{path}: not a directory (give the store's root)")
    if (
        not (path / "manifests").is_dir()
        and path.name == "manifests"
        and any(_FILE_RE.match(n) for n in os.listdir(path))
    ):
        path = path.parent
    log = ManifestLog(path)
    if not log.versions():
        raise ManifestError(f"{log.dir}: no committed manifest (is {path} an expert-store root?)")
    return log


def _resolve(log: ManifestLog, version: int | None, what: str = "") -> int:
    versions = log.versions()
    if version is None:
        return versions[-1]
    if version not in versions:
        raise UsageError(
            f"version {version}{' ' + what if what else ''} is not committed under {log.root} "
            f"(committed: {_span(versions)})"
        )
    return version


def _span(versions: Sequence[int]) -> str:
    """Compact list of versions: "1..3,7"."""
    out, i = [], 0
    vs = sorted(versions)
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}..{vs[j]}")
        i = j + 1
    return ",".join(out) if out else "none"


def _alive_ranks(m: Manifest) -> list[int]:
    return [r for r, a in enumerate(m.alive.tolist()) if a]


def _spec_json(spec: ExpertSpec) -> dict[str, Any]:
    return {
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": dtype_name(t.dtype),
                "nbytes": t.nbytes,
                "record_offset": spec.record_offsets[i],
            }
            for i, t in enumerate(spec.tensors)
        ],
        "nbytes": spec.nbytes,
        "record_bytes": spec.record_bytes,
        "word_bytes": spec.word_bytes,
    }


def _checkpoint_json(ck: dict) -> dict[str, Any]:
    return {
        "path": ck["path"],
        "names": {k: (v if isinstance(v, str) else list(v)) for k, v in sorted(ck["names"].items())},
        "layers": None if ck["layers"] is None else list(ck["layers"]),
    }


def _header_json(m: Manifest) -> dict[str, Any]:
    return {
        "version": m.version,
        "parent": m.parent,
        "created": m.created,
        "created_iso": _iso(m.created),
        "reason": m.reason,
    }


def _dims_json(m: Manifest) -> dict[str, Any]:
    return {
        "num_layers": m.num_layers,
        "num_experts": m.num_experts,
        "num_ranks": m.num_ranks,
        "slots_per_rank": m.slots_per_rank,
        "num_physical": m.num_ranks * m.slots_per_rank,
        "ranks_per_node": m.ranks_per_node,
    }


def _dims(m: Manifest) -> tuple[int, int, int, int]:
    return (m.num_layers, m.num_experts, m.num_ranks, m.slots_per_rank)


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


# --------------------------------------------------------------------------- summary


def summarize(root: str | os.PathLike, *, version: int | None = None) -> dict[str, Any]:
    """Everything about one version (default: the latest) and the store's history at a glance."""
    log = _open_log(root)
    v = _resolve(log, version)
    m = log.read(v)
    versions = log.versions()
    last = None
    for older in reversed([x for x in versions if x <= v]):
        mo = m if older == v else log.read(older)
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
        "last_rebalance": last,
        "versions_kept": len(versions),
        "oldest_version": versions[0],
        "latest_version": versions[-1],
    }


def _render_summary(d: dict[str, Any]) -> list[str]:
    rep, spec = d["replicas"], d["spec"]
    out = [
        f"store      {d['root']}",
        f"version    {d['version']} of {d['oldest_version']}..{d['latest_version']} "
        f"({d['versions_kept']} kept), parent {d['parent'] if d['parent'] is not None else '-'}",
        f"created    {d['created_iso']}  reason {d['reason']}",
        f"shape      L={d['num_layers']} E={d['num_experts']} R={d['num_ranks']} S={d['slots_per_rank']} "
        f"P={d['num_physical']} ranks/node={d['ranks_per_node'] if d['ranks_per_node'] else '-'}",
        f"alive      {len(d['alive'])}/{d['num_ranks']} ranks: {_ranks_text(d['alive'])}"
        + (f"  (dead: {_ranks_text(d['dead'])})" if d["dead"] else ""),
        f"expert     {spec['nbytes']} B ({_human(spec['nbytes'])}), record {spec['record_bytes']} B, "
        f"word {spec['word_bytes']} B",
    ]
    out += _table(
        ["tensor", "shape", "dtype", "nbytes", "offset"],
        [
            [t["name"], "x".join(map(str, t["shape"])), t["dtype"], t["nbytes"], t["record_offset"]]
            for t in spec["tensors"]
        ],
        indent="  ",
    )
    out.append(
        f"replicas   min {rep['min']} max {rep['max']} mean {rep['mean']:.2f}; {rep['replicated']} of "
        f"{rep['pairs']} (layer, expert) with >1 replica; {rep['redundant_slots_per_layer']} redundant slots/layer"
    )
    out.append(
        f"live       min {rep['min_live']} live replica(s); {rep['single_live']} (layer, expert) on one live rank only"
        + (f"; {rep['no_live']} WITHOUT a live replica" if rep["no_live"] else "")
    )
    ck = d["checkpoint"]
    out.append(f"checkpoint {ck['path']}")
    out.append(f"  layers   {ck['layers'] if ck['layers'] is not None else 'store layer i = checkpoint layer i'}")
    for name, templates in ck["names"].items():
        for i, t in enumerate([templates] if isinstance(templates, str) else templates):
            out.append(f"  {name if i == 0 else '':<{max(map(len, ck['names']))}} <- {t}")
    last = d["last_rebalance"]
    if last is None:
        out.append("rebalance  none yet")
    else:
        s = last["stats"]
        out.append(f"rebalance  last: version {last['version']} ({last['created_iso']})")
        out.append(
            f"  p2p {_human(s.get('bytes_p2p'))}, local {_human(s.get('bytes_local'))}, "
            f"disk {_human(s.get('bytes_disk'))}"
        )
        rest = [f"{k}={v}" for k, v in s.items() if k not in ("bytes_p2p", "bytes_local", "bytes_disk")]
        if rest:
            out.append("  " + " ".join(rest))
    out.append(f"digest     {d['placement_digest'][:16]}")
    return out


# --------------------------------------------------------------------------- versions


def list_versions(root: str | os.PathLike) -> dict[str, Any]:
    """One row per committed version; unreadable versions are listed under ``errors``."""
    log = _open_log(root)
    rows, errors = [], []
    for v in log.versions():
        try:
            m = log.read(v)
        except ManifestError as e:
            errors.append({"version": v, "file": str(log.path_of(v)), "error": str(e)})
            continue
        s = m.stats
        rows.append(
            {
                **_header_json(m),
                "alive": len(_alive_ranks(m)),
                "num_ranks": m.num_ranks,
                "bytes_p2p": s.get("bytes_p2p"),
                "bytes_local": s.get("bytes_local"),
                "bytes_disk": s.get("bytes_disk"),
                "stats": dict(s),
            }
        )
    return {"root": str(log.root), "versions": rows, "errors": errors}


def _render_versions(d: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["version"],
            r["parent"],
            r["created_iso"],
            r["reason"],
            f"{r['alive']}/{r['num_ranks']}",
            r["bytes_p2p"],
            r["bytes_local"],
            r["bytes_disk"],
            r["stats"].get("moves"),
            r["stats"].get("rounds"),
        ]
        for r in d["versions"]
    ]
    rows += [[e["version"], None, "UNREADABLE", "", "", None, None, None, None, None] for e in d["errors"]]
    rows.sort(key=lambda r: r[0])
    headers = ["version", "parent", "created", "reason", "alive", "p2p", "local", "disk", "moves", "rounds"]
    return _table(headers, rows)


# --------------------------------------------------------------------------- show


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
    """The placement of one version: per layer and rank, the logical expert in each slot."""
    log = _open_log(root)
    m = log.read(_resolve(log, version))
    if layer is not None and not 0 <= layer < m.num_layers:
        raise UsageError(f"layer {layer} is outside [0, {m.num_layers}) in {log.path_of(m.version)}")
    layers = list(range(m.num_layers)) if layer is None else [layer]
    S, alive = m.slots_per_rank, m.alive.tolist()
    p2l = m.phy2log
    out_layers = []
    for lay in layers:
        row = p2l[lay].view(m.num_ranks, S).tolist()
        out_layers.append(
            {
                "layer": lay,
                "ranks": [{"rank": r, "alive": bool(alive[r]), "experts": row[r]} for r in range(m.num_ranks)],
                "checksums": m.checksums[lay].tolist(),
            }
        )
    logcnt = m.placement().logcnt
    return {
        "root": str(log.root),
        **_header_json(m),
        **_dims_json(m),
        "layers": out_layers,
        "replicated": [{"layer": lay, "experts": (logcnt[lay] > 1).nonzero().view(-1).tolist()} for lay in layers],
        "checksum_summary": _checksum_summary(m.checksums[layers]),
    }


def _render_show(d: dict[str, Any], *, one_layer: bool) -> list[str]:
    out = [
        f"version {d['version']} (parent {d['parent'] if d['parent'] is not None else '-'}, {d['reason']}, "
        f"{d['created_iso']})  L={d['num_layers']} E={d['num_experts']} R={d['num_ranks']} "
        f"S={d['slots_per_rank']}"
    ]
    w = len(str(d["num_experts"] - 1))
    rw = len(str(d["num_ranks"] - 1))
    for entry in d["layers"]:
        out.append(f"layer {entry['layer']}")
        for r in entry["ranks"]:
            ids = " ".join(str(e).rjust(w) for e in r["experts"])
            state = "alive" if r["alive"] else "dead "
            out.append(f"  rank {str(r['rank']).rjust(rw)} {state}  {ids if r['alive'] else '(' + ids + ')'}")
    cs = d["checksum_summary"]
    out.append(
        f"checksums {cs['shape'][0]} x {cs['shape'][1]} (layer, expert): sha256 {cs['sha256'][:16]}, "
        f"{cs['zero']} zero, {cs['duplicated']} sharing a value"
    )
    if one_layer:
        entry = d["layers"][0]
        cells = [f"e{str(e).rjust(w)} {_hex(c)}" for e, c in enumerate(entry["checksums"])]
        for i in range(0, len(cells), 4):
            out.append("  " + "  ".join(cells[i : i + 4]))
    return out


# --------------------------------------------------------------------------- diff


def _read_pair(log: ManifestLog, a: int, b: int) -> tuple[Manifest, Manifest]:
    ma = log.read(_resolve(log, a, "(A)"))
    mb = log.read(_resolve(log, b, "(B)"))
    if _dims(ma) != _dims(mb) or ma.spec != mb.spec:
        raise ManifestError(
            f"{log.path_of(mb.version)}: version {mb.version} has (L, E, R, S) = {_dims(mb)} and spec "
            f"{mb.spec!r}; version {ma.version} in {log.path_of(ma.version)} has {_dims(ma)} and {ma.spec!r}: "
            "not one store"
        )
    return ma, mb


def diff_versions(root: str | os.PathLike, a: int, b: int) -> dict[str, Any]:
    """What changed from version ``a`` to version ``b``: slots, experts per rank, alive ranks."""
    log = _open_log(root)
    ma, mb = _read_pair(log, a, b)
    R, S = ma.num_ranks, ma.slots_per_rank
    alive_a, alive_b = ma.alive.tolist(), mb.alive.tolist()
    layers = []
    tot_slots = tot_added = tot_removed = 0
    for lay in range(ma.num_layers):
        oa = ma.phy2log[lay].view(R, S)
        ob = mb.phy2log[lay].view(R, S)
        changed = (oa != ob).sum(dim=1).tolist()  # per rank
        ranks = []
        for r in range(R):
            if not changed[r]:
                continue
            sa, sb = set(oa[r].tolist()), set(ob[r].tolist())
            added, removed = sorted(sb - sa), sorted(sa - sb)
            ranks.append({"rank": r, "slots_changed": changed[r], "added": added, "removed": removed})
            tot_added += len(added)
            tot_removed += len(removed)
        layers.append({"layer": lay, "slots_changed": sum(changed), "ranks": ranks})
        tot_slots += sum(changed)
    sums_changed = (ma.checksums != mb.checksums).nonzero().tolist()
    return {
        "root": str(log.root),
        "a": _header_json(ma),
        "b": _header_json(mb),
        "alive": {
            "a": _alive_ranks(ma),
            "b": _alive_ranks(mb),
            "died": [r for r in range(R) if alive_a[r] and not alive_b[r]],
            "revived": [r for r in range(R) if alive_b[r] and not alive_a[r]],
        },
        "slots_changed": tot_slots,
        "experts_added": tot_added,
        "experts_removed": tot_removed,
        "layers": layers,
        "checksums_changed": [{"layer": la, "expert": e} for la, e in sums_changed],
        "checkpoint_changed": _checkpoint_json(ma.checkpoint) != _checkpoint_json(mb.checkpoint),
        "ranks_per_node_changed": ma.ranks_per_node != mb.ranks_per_node,
    }


def _render_diff(d: dict[str, Any]) -> list[str]:
    a, b, al = d["a"], d["b"], d["alive"]
    out = [
        f"diff version {a['version']} ({a['reason']}, {a['created_iso']}) -> version {b['version']} "
        f"({b['reason']}, {b['created_iso']})",
        f"alive      {_ranks_text(al['a'])} -> {_ranks_text(al['b'])}"
        + (f"; died {_ranks_text(al['died'])}" if al["died"] else "")
        + (f"; revived {_ranks_text(al['revived'])}" if al["revived"] else ""),
        f"slots      {d['slots_changed']} changed; per rank and layer {d['experts_added']} expert(s) added, "
        f"{d['experts_removed']} removed",
    ]
    if d["checkpoint_changed"]:
        out.append("checkpoint changed (path, names or layers)")
    if d["ranks_per_node_changed"]:
        out.append("ranks_per_node changed")
    if d["checksums_changed"]:
        pairs = " ".join(f"{c['layer']}/{c['expert']}" for c in d["checksums_changed"][:16])
        more = len(d["checksums_changed"]) - 16
        out.append(
            f"checksums  {len(d['checksums_changed'])} (layer/expert) changed: {pairs}" + (" ..." if more > 0 else "")
        )
    rows = []
    for entry in d["layers"]:
        for r in entry["ranks"]:
            rows.append(
                [
                    entry["layer"],
                    r["rank"],
                    r["slots_changed"],
                    " ".join(map(str, r["added"])) or "-",
                    " ".join(map(str, r["removed"])) or "-",
                ]
            )
    if rows:
        out += _table(["layer", "rank", "slots", "added", "removed"], rows, indent="  ")
    else:
        out.append("  placement unchanged")
    return out


# --------------------------------------------------------------------------- plan


def plan_between(
    root: str | os.PathLike,
    a: int,
    b: int,
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
    empty (joined) for that rebalance.
    """
    log = _open_log(root)
    ma, mb = _read_pair(log, a, b)
    spec = mb.spec
    recorded_staging = mb.stats.get("staging_bytes")
    if staging_bytes is None:
        staging_bytes = recorded_staging if isinstance(recorded_staging, int) else DEFAULT_STAGING_BYTES
    if isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int) or staging_bytes <= 0:
        raise UsageError(f"--staging-bytes must be a positive int, got {staging_bytes!r}")
    recorded_round = mb.stats.get("round_bytes")
    if round_bytes is None:
        round_bytes = recorded_round if isinstance(recorded_round, int) else DEFAULT_ROUND_BYTES
    if isinstance(round_bytes, bool) or not isinstance(round_bytes, int) or round_bytes <= 0:
        raise UsageError(f"--round-bytes must be a positive int, got {round_bytes!r}")
    for r in fresh:
        if not 0 <= r < mb.num_ranks or not bool(mb.alive[r]):
            raise UsageError(f"--fresh rank {r} is not a live rank of version {mb.version}")
    try:
        chunks = list(
            plan_chunks(
                ma.placement(),
                mb.placement(),
                expert_bytes=spec.nbytes,
                record_bytes=spec.record_bytes,
                staging_bytes=staging_bytes,
                round_bytes=round_bytes,
                old_alive=ma.alive,
                alive=mb.alive,
                fresh=fresh,
                ranks_per_node=mb.ranks_per_node,
            )
        )
        plan = merge_plans([c[0] for c in chunks])
        rounds = [r for c in chunks for r in c[1]]
        budget = round_budget(staging_bytes=chunks[0][2], round_bytes=round_bytes, record_bytes=spec.record_bytes)
    except StoreError as e:
        raise type(e)(f"plan {ma.version} -> {mb.version} under {log.root}: {e}") from None
    links: dict[tuple[int, int], int] = {}
    round_rows = []
    for rnd in rounds:
        p2p = 0
        for mv in rnd.moves:
            if not mv.is_local:
                links[(mv.src_rank, mv.dst_rank)] = links.get((mv.src_rank, mv.dst_rank), 0) + 1
                p2p += 1
        round_rows.append({"moves": len(rnd.moves), "p2p": p2p, "local": len(rnd.moves) - p2p, "parks": len(rnd.parks)})
    sent: dict[int, int] = {}
    for (src, _), n in links.items():
        sent[src] = sent.get(src, 0) + n * spec.nbytes
    ranks = []
    for r in range(mb.num_ranks):
        acct = plan.accounts.get(r)
        if acct is None:
            ranks.append(
                {
                    "rank": r,
                    "alive": False,
                    "fresh": False,
                    "bytes_p2p": 0,
                    "bytes_local": 0,
                    "bytes_disk": 0,
                    "bytes_sent": 0,
                    "missing": [],
                }
            )
            continue
        ranks.append(
            {
                "rank": r,
                "alive": True,
                "fresh": r in set(fresh) or not plan.holders_valid[r],
                "bytes_p2p": acct.bytes_p2p,
                "bytes_local": acct.bytes_local,
                "bytes_disk": acct.bytes_disk,
                "bytes_sent": sent.get(r, 0),
                "missing": [{"layer": la, "experts": list(es)} for la, es in sorted(acct.missing.items())],
            }
        )
    n_p2p = sum(1 for mv in plan.moves if not mv.is_local)
    totals = {
        "bytes_p2p": sum(x["bytes_p2p"] for x in ranks),
        "bytes_local": sum(x["bytes_local"] for x in ranks),
        "bytes_disk": sum(x["bytes_disk"] for x in ranks),
        "moves": len(plan.moves),
        "disk_reads": len(plan.disk_reads),
        "post_copies": len(plan.post_copies),
        "rounds": len(rounds),
    }
    recorded = None
    if mb.parent == ma.version and mb.reason == "rebalance":
        rec = {k: mb.stats.get(k) for k in _PLAN_STATS}
        recorded = {
            "stats": rec,
            "staging_bytes": recorded_staging,
            "fresh_ranks": mb.stats.get("fresh_ranks"),
            "matches": all(rec[k] is None or rec[k] == totals[k] for k in _PLAN_STATS),
        }
    return {
        "root": str(log.root),
        "a": _header_json(ma),
        "b": _header_json(mb),
        "expert_bytes": spec.nbytes,
        "record_bytes": spec.record_bytes,
        "staging_bytes": staging_bytes,
        "round_bytes": round_bytes,
        "round_budget_bytes": budget,
        "alive_a": _alive_ranks(ma),
        "alive_b": _alive_ranks(mb),
        "fresh": sorted(set(fresh)),
        "totals": {**totals, "moves_p2p": n_p2p, "moves_local": len(plan.moves) - n_p2p},
        "parks": sum(x["parks"] for x in round_rows),
        "ranks": ranks,
        "links": [
            {
                "src": s,
                "dst": t,
                "records": n,
                "bytes": n * spec.nbytes,
                "slab_bytes": n * spec.record_bytes,
            }
            for (s, t), n in sorted(links.items())
        ],
        "rounds": round_rows,
        "recorded": recorded,
    }


def _render_plan(d: dict[str, Any]) -> list[str]:
    t = d["totals"]
    out = [
        f"plan version {d['a']['version']} -> {d['b']['version']}: alive {_ranks_text(d['alive_a'])} -> "
        f"{_ranks_text(d['alive_b'])}" + (f", fresh {_ranks_text(d['fresh'])}" if d["fresh"] else ""),
        f"expert {_human(d['expert_bytes'])} (record {d['record_bytes']} B), staging {_human(d['staging_bytes'])} "
        f"({_human(d['round_budget_bytes'])} per round)",
    ]
    rows = []
    for r in d["ranks"]:
        state = "dead" if not r["alive"] else ("empty" if r["fresh"] else "alive")
        missing = "; ".join(f"L{m['layer']}: {' '.join(map(str, m['experts']))}" for m in r["missing"]) or "-"
        rows.append([r["rank"], state, r["bytes_p2p"], r["bytes_local"], r["bytes_disk"], r["bytes_sent"], missing])
    rows.append(
        ["all", "", t["bytes_p2p"], t["bytes_local"], t["bytes_disk"], sum(r["bytes_sent"] for r in d["ranks"]), ""]
    )
    headers = ["rank", "state", "p2p", "local", "disk", "sent", "missing (from checkpoint)"]
    out += _table(headers, rows, indent="  ", right=[0])
    out.append(
        f"moves {t['moves']} (p2p {t['moves_p2p']}, local {t['moves_local']}), disk reads {t['disk_reads']}, "
        f"post copies {t['post_copies']}, rounds {t['rounds']}, parks {d['parks']}"
    )
    if d["rounds"]:
        out.append("rounds  " + " ".join(f"[{x['p2p']} p2p + {x['local']} local]" for x in d["rounds"][:12]))
    if d["links"]:
        out.append("links (src -> dst)")
        out += _table(
            ["src", "dst", "records", "bytes", ""],
            [[x["src"], x["dst"], x["records"], x["bytes"], _human(x["bytes"])] for x in d["links"]],
            indent="  ",
        )
    rec = d["recorded"]
    if rec is not None:
        verdict = "matches" if rec["matches"] else "DIFFERS FROM"
        extra = ""
        if not rec["matches"] and rec["fresh_ranks"]:
            extra = f" ({rec['fresh_ranks']} rank(s) were fresh in that rebalance: pass --fresh)"
        out.append(
            f"{verdict} the stats recorded in version {d['b']['version']}: "
            + " ".join(f"{k}={v}" for k, v in rec["stats"].items() if v is not None)
            + extra
        )
    return out


# --------------------------------------------------------------------------- verify


def _expert_record(expert: dict[str, torch.Tensor], spec: ExpertSpec, out: torch.Tensor, layer: int, e: int) -> str:
    """Pack one expert read from the checkpoint into the record ``out`` (uint8 [record_bytes]);
    returns "" or why it does not match the spec."""
    for i, t in enumerate(spec.tensors):
        x = expert.get(t.name)
        if x is None:
            return f"layer {layer} expert {e}: the checkpoint gives no tensor {t.name!r}"
        if x.dtype != t.dtype or tuple(x.shape) != t.shape:
            return (
                f"layer {layer} expert {e} tensor {t.name!r}: the checkpoint gives {x.dtype} {list(x.shape)}, "
                f"the spec says {t.dtype} {list(t.shape)}"
            )
        off = spec.record_offsets[i]
        out[off : off + t.nbytes] = x.contiguous().reshape(-1).view(torch.uint8)
    return ""


def _check_checkpoint_bytes(m: Manifest, where: str, path_override: str | None) -> dict[str, Any]:
    """Read every (layer, expert) of ``m``'s checkpoint on the CPU and compare its checksum
    (torch reference of the checksum kernel) with ``m.checksums``."""
    record = dict(m.checkpoint)
    if path_override is not None:
        record["path"] = path_override
    out: dict[str, Any] = {"path": record["path"], "checked": 0, "mismatches": [], "errors": []}
    try:
        ckpt = Checkpoint.from_dict(record)
    except StoreError as e:
        out["errors"].append(f"{where}: cannot open the checkpoint it records: {e}")
        return out
    spec, rb = m.spec, m.spec.record_bytes
    batch = max(1, _CHECK_BATCH_BYTES // rb)
    with ckpt:
        for layer in range(m.num_layers):
            for e0 in range(0, m.num_experts, batch):
                experts = list(range(e0, min(m.num_experts, e0 + batch)))
                slab = torch.zeros(len(experts) * rb, dtype=torch.uint8)
                ok = []
                for i, e in enumerate(experts):
                    try:
                        why = _expert_record(ckpt.read_expert(layer, e), spec, slab[i * rb : (i + 1) * rb], layer, e)
                    except StoreError as err:
                        why = f"layer {layer} expert {e}: {err}"
                    if why:
                        out["errors"].append(why)
                    else:
                        ok.append(i)
                if not ok:
                    continue
                sums = slab_checksums_reference(slab, spec, len(experts)).tolist()
                for i in ok:
                    e = experts[i]
                    want = int(m.checksums[layer, e])
                    out["checked"] += 1
                    if sums[i] != want:
                        out["mismatches"].append(
                            {"layer": layer, "expert": e, "manifest": want, "checkpoint": int(sums[i])}
                        )
    return out


def verify_store(
    root: str | os.PathLike, *, checkpoint_bytes: bool = False, checkpoint: str | None = None
) -> dict[str, Any]:
    """Check the whole history of a root: every version decodes, parents form one chain
    (a missing parent is allowed only below the oldest kept version: pruning), every
    version describes the same store, the latest is readable, no stray temporary files.
    With ``checkpoint_bytes``, also recompute every (layer, expert) checksum from the
    checkpoint the latest version records (``checkpoint`` overrides its path).

    ``ok`` is False when a problem is found; ``warnings`` never make it False.
    """
    log = _open_log(root)
    versions = log.versions()
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    manifests: dict[int, Manifest] = {}
    unreadable = []
    for v in versions:
        try:
            manifests[v] = log.read(v)
        except ManifestError as e:
            unreadable.append({"version": v, "file": str(log.path_of(v)), "error": str(e)})
            problems.append(str(e))
    latest = versions[-1]
    if latest not in manifests:
        problems.append(f"{log.path_of(latest)}: the latest version {latest} is unreadable: the store cannot be opened")
    committed = set(versions)
    pruned_below = None
    for i, v in enumerate(versions):
        m = manifests.get(v)
        if m is None:
            continue
        path = log.path_of(v)
        p = m.parent
        if p is None:
            if i:
                problems.append(f"{path}: version {v} has no parent, but version(s) {_span(versions[:i])} precede it")
        elif p in committed:
            if p != versions[i - 1]:
                skipped = [x for x in versions if p < x < v]
                problems.append(
                    f"{path}: the parent of version {v} is {p}, which skips committed version(s) {_span(skipped)} "
                    "(a fork in the history)"
                )
        elif i == 0:
            pruned_below = v
            notes.append(f"versions before {v} were pruned (its parent {p} is gone)")
        else:
            problems.append(
                f"{path}: the parent of version {v} is {p}, which is not committed although older version "
                f"{versions[i - 1]} is: a gap in the history that pruning does not explain"
            )
    ref = manifests.get(latest) or (manifests[max(manifests)] if manifests else None)
    if ref is not None:
        for v, m in manifests.items():
            if _dims(m) != _dims(ref) or m.spec != ref.spec:
                problems.append(
                    f"{log.path_of(v)}: version {v} has (L, E, R, S) = {_dims(m)} and spec {m.spec!r}, version "
                    f"{ref.version} has {_dims(ref)} and {ref.spec!r}: not one store"
                )
        for v, m in sorted(manifests.items()):
            older = manifests.get(m.parent) if m.parent is not None else None
            if older is not None and _dims(older) == _dims(m) and not torch.equal(older.checksums, m.checksums):
                n = int((older.checksums != m.checksums).sum())
                warnings.append(f"{log.path_of(v)}: {n} checksum(s) differ from parent version {m.parent}")
    temporaries = []
    now = time.time()
    for name in sorted(os.listdir(log.dir)):
        p = log.dir / name
        if _TMP_RE.match(name):
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue  # a commit in flight finished meanwhile
            temporaries.append({"file": str(p), "age_s": round(age, 1)})
            warnings.append(
                f"{p}: stray temporary file ({age:.0f} s old), left by an interrupted commit; "
                "ManifestLog.clean_temporaries() removes it"
            )
        elif not (_FILE_RE.match(name) and int(_FILE_RE.match(name).group(1)) in committed):
            warnings.append(f"{p}: not a manifest file name (v{{version:08d}}.msgpack); ignored by the store")
    ck = None
    if checkpoint_bytes:
        if latest in manifests:
            m = manifests[latest]
            ck = _check_checkpoint_bytes(m, str(log.path_of(latest)), checkpoint)
            src = f"{log.path_of(latest)} vs checkpoint {ck['path']}"
            problems += [f"{src}: {e}" for e in ck["errors"]]
            for mm in ck["mismatches"]:
                problems.append(
                    f"{src}: layer {mm['layer']} expert {mm['expert']}: checksum of the checkpoint bytes is "
                    f"{_hex(mm['checkpoint'])}, the manifest records {_hex(mm['manifest'])}"
                )
        else:
            problems.append(f"{log.path_of(latest)}: checkpoint bytes not checked: the latest version is unreadable")
    return {
        "root": str(log.root),
        "ok": not problems,
        "versions": versions,
        "latest": latest,
        "readable": sorted(manifests),
        "unreadable": unreadable,
        "pruned_below": pruned_below,
        "temporaries": temporaries,
        "checkpoint": ck,
        "problems": problems,
        "warnings": warnings,
        "notes": notes,
    }


def _render_verify(d: dict[str, Any]) -> list[str]:
    out = [
        f"store      {d['root']}",
        f"versions   {_span(d['versions'])} ({len(d['versions'])} committed, {len(d['readable'])} readable), "
        f"latest {d['latest']}",
    ]
    out += [f"note       {n}" for n in d["notes"]]
    ck = d["checkpoint"]
    if ck is not None:
        out.append(
            f"checkpoint {ck['path']}: {ck['checked']} (layer, expert) checksummed, {len(ck['mismatches'])} "
            f"mismatch(es), {len(ck['errors'])} error(s)"
        )
    out += [f"warning    {w}" for w in d["warnings"]]
    out += [f"PROBLEM    {p}" for p in d["problems"]]
    out.append("OK" if d["ok"] else f"FAILED: {len(d['problems'])} problem(s)")
    return out


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _version_arg(text: str) -> int | None:
    if text in ("latest", "current"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a version is an int >= 1 or 'latest', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"a version is an int >= 1 or 'latest', got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


def _size_arg(text: str) -> int:
    """Bytes, optionally with a binary suffix: 1073741824, 1G, 512M, 64K."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    if scale > 1:
        t = t[:-1]
    try:
        v = int(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1073741824 or 1G, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive byte count, got {text!r}")
    return v


def _ranks_arg(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rank numbers, got {text!r}") from None


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
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.add_argument("root", metavar="ROOT", help="the store's root directory (holds manifests/)")
        return sp

    sp = add("summary", "current version, spec, shape, alive ranks, checkpoint, replicas, last rebalance")
    sp.add_argument("--version", type=_version_arg, default=None, metavar="N", help="another version than the latest")
    add("versions", "one line per committed version")
    sp = add("show", "the placement: per layer and rank the logical expert in each slot, and the checksums")
    sp.add_argument("--version", type=_version_arg, default=None, metavar="N", help="default: the latest")
    sp.add_argument("--layer", type=_nonneg_int, default=None, metavar="L", help="only this layer")
    sp = add("diff", "what changed between versions A and B")
    sp.add_argument("a", type=_version_arg, metavar="A", help="a version number, or 'latest'")
    sp.add_argument("b", type=_version_arg, metavar="B", help="a version number, or 'latest'")
    sp = add("plan", "what a rebalance from version A's placement to version B's moves")
    sp.add_argument("a", type=_version_arg, metavar="A", help="a version number, or 'latest'")
    sp.add_argument("b", type=_version_arg, metavar="B", help="a version number, or 'latest'")
    sp.add_argument(
        "--staging-bytes",
        type=_size_arg,
        default=None,
        metavar="N",
        help="staging memory per rank (1G, 512M, ...); default: as recorded in B, else 1 GiB",
    )
    sp.add_argument(
        "--round-bytes",
        type=_size_arg,
        default=None,
        metavar="N",
        help="records per rank and round (256M, ...); default: as recorded in B, else 256 MiB",
    )
    sp.add_argument("--fresh", type=_ranks_arg, default=[], metavar="R,...", help="ranks that were empty (joined)")
    sp = add("verify", "check every manifest, the version chain and (optionally) the checkpoint bytes")
    sp.add_argument(
        "--checkpoint-bytes",
        action="store_true",
        help="also read every (layer, expert) from the checkpoint and compare its checksum with the latest manifest",
    )
    sp.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint path instead of the recorded one")
    return p


def _emit(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")


def _run(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)

    def emit(d: dict[str, Any], text: list[str]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(d, indent=2) + "\n")
        else:
            _emit(text)

    cmd = args.command
    if cmd == "summary":
        d = summarize(args.root, version=args.version)
        emit(d, [] if as_json else _render_summary(d))
    elif cmd == "versions":
        d = list_versions(args.root)
        emit(d, [] if as_json else _render_versions(d))
        for e in d["errors"]:
            print(f"{PROG}: {e['error']}", file=sys.stderr)
        return 1 if d["errors"] else 0
    elif cmd == "show":
        d = show_placement(args.root, version=args.version, layer=args.layer)
        emit(d, [] if as_json else _render_show(d, one_layer=args.layer is not None))
    elif cmd in ("diff", "plan"):
        log = _open_log(args.root)
        a, b = _resolve(log, args.a, "(A)"), _resolve(log, args.b, "(B)")
        if cmd == "diff":
            d = diff_versions(args.root, a, b)
            emit(d, [] if as_json else _render_diff(d))
        else:
            d = plan_between(
                args.root, a, b, staging_bytes=args.staging_bytes, round_bytes=args.round_bytes, fresh=args.fresh
            )
            emit(d, [] if as_json else _render_plan(d))
    elif cmd == "verify":
        d = verify_store(args.root, checkpoint_bytes=args.checkpoint_bytes, checkpoint=args.checkpoint)
        emit(d, [] if as_json else _render_verify(d))
        if not d["ok"]:
            # The report (stdout) lists every problem; stderr gets one line naming the first.
            n = len(d["problems"])
            print(f"{PROG}: verify found {n} problem(s) under {d['root']}; first: {d['problems'][0]}", file=sys.stderr)
            return 1
        return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``inspect-store`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help (0)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        return 2
    try:
        return _run(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `inspect-store ... | head`
        return 0
    except OSError as e:
        print(f"{PROG}: {e.filename or args.root}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

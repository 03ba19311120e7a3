"""Versioned manifests: one msgpack file per placement version, committed atomically.

Symbols: L MoE layers, E logical experts per layer, R ranks, S slots per rank,
P = R * S physical slots.

File format (``FORMAT_VERSION`` 1). A manifest file is exactly one msgpack map
with string keys, written in a fixed key order so that the same
:class:`Manifest` always gives the same bytes::

    kind            "expert-store-manifest"
    format_version  1
    version         int in 1..2**63-1
    parent          int in 1..version-1 | nil
    created         float64 (unix seconds, years 1970..9999)
    reason          str
    spec            [{"name", "shape", "dtype"}, ...]       (ExpertSpec.to_list())
    num_layers, num_experts, num_ranks, slots_per_rank       int
    ranks_per_node  int | nil
    phy2log         array int64 [L, P]
    alive           array bool [R]
    checkpoint      {"layers": [int] | nil, "names": {str: str | [str]}, "path": str}
    checksums       array int64 [L, E]
    stats           {str: int | finite float | str | bool}
    load            array float32 [L, E], finite, >= 0      (optional: absent when not recorded)
    sha256          bin 32                                   (always the last entry)

An *array* is ``{"dtype": "int64" | "bool" | "float32", "shape": [...], "data": bin}``
(keys in that order) with ``data`` the raw little-endian bytes (bool: one
byte, 0 or 1). Every other nested map is written with sorted keys. ``load`` is
the measured load per (layer, logical expert) that the rebalance making this
version was given (``rebalance(..., load=)``); a manifest without it has exactly
the bytes it had before the field existed. ``sha256`` is the hash of every byte of the file
before the ``sha256`` entry, so truncation and bit rot are detected even where
msgpack would still parse; the file stays one plain msgpack map that any
msgpack tool can read.

Directory layout: ``<root>/manifests/v{version:08d}.msgpack``. The committed
versions are exactly the files with that name. A commit writes a temporary
file (``.v…tmp``) in the same directory, fsyncs it, links it to its final name
(the commit point: a link never replaces an existing file, so two writers of
one version cannot silently overwrite each other), then fsyncs the directory.
Readers never see a partial file, and a crash at any moment leaves the last
committed version readable; leftover temporary files are ignored and removed
later by :meth:`ManifestLog.clean_temporaries`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from .checks import MAX_BYTES, check_int, is_int
from .errors import ManifestError, PlacementError, SpecError
from .placement import Placement
from .spec import ExpertSpec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_KIND",
    "Manifest",
    "ManifestLog",
    "PreparedManifest",
    "check_keep_versions",
    "decode_manifest",
    "encode_manifest",
    "manifest_to_json",
    "store_difference",
]

FORMAT_VERSION = 1
MANIFEST_KIND = "expert-store-manifest"

# The last entry of every manifest: fixstr "sha256" (0xa6 + 6 bytes), then bin8
# of 32 bytes (0xc4 0x20), then the digest. Fixed length, so the checked range
# (everything before it) is known without parsing.
_SUM_KEY = "sha256"
_SUM_PREFIX = b"\xa6sha256\xc4\x20"
_SUM_LEN = len(_SUM_PREFIX) + 32

_ARRAYS = ("phy2log", "alive", "checksums")
# Optional arrays: left out of the file when None.
_OPTIONAL = ("load",)
# Array dtypes a manifest may hold: their name in the file, and their little-endian numpy dtype.
_ARRAY_DTYPES = {"int64": "<i8", "bool": "u1", "float32": "<f4"}
_TORCH_DTYPES = {torch.int64: "int64", torch.bool: "bool", torch.float32: "float32"}
# The dtype of each array in the file.
_ARRAY_DTYPE_OF = {"phy2log": "int64", "alive": "bool", "checksums": "int64", "load": "float32"}

# Committed versions and the temporaries of commits in flight (or interrupted).
_FILE_RE = re.compile(r"^v(\d{8,})\.msgpack$", re.ASCII)
_TMP_RE = re.compile(r"^\.v\d{8,}\..*\.tmp$", re.ASCII | re.DOTALL)


@dataclass(frozen=True, eq=False)
class Manifest:
    """One version of a store: its placement, live ranks, checkpoint and checksums.

    The fields are those of the file (types and ranges in the module docstring), arrays as torch
    tensors. ``parent`` is the version this one was derived from (None for the first), ``reason``
    why it exists ("create", "rebalance", ...), ``ranks_per_node`` None when unknown, ``phy2log``
    the logical expert in each physical slot, ``alive`` the live ranks, ``checkpoint`` a
    ``Checkpoint.to_dict()``, ``checksums`` the checksum of each (layer, logical expert),
    ``stats`` the rebalance statistics, ``load`` None or float32 [L, E], the measured load per
    (layer, logical expert) the rebalance was given. Only :data:`FORMAT_VERSION` can be written.
    """

    version: int
    parent: int | None
    created: float
    reason: str
    spec: ExpertSpec
    num_layers: int
    num_experts: int
    num_ranks: int
    slots_per_rank: int
    ranks_per_node: int | None
    phy2log: torch.Tensor
    alive: torch.Tensor
    checkpoint: dict
    checksums: torch.Tensor
    stats: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    load: torch.Tensor | None = None

    def placement(self) -> Placement:
        """The validated :class:`Placement` of this version (a new object each call)."""
        return Placement(self.phy2log, num_ranks=self.num_ranks, num_experts=self.num_experts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return all(_same(getattr(self, n), getattr(other, n)) for n in self.__dataclass_fields__)

    __hash__ = None  # type: ignore[assignment]  # holds tensors and dicts

    def __repr__(self) -> str:
        return (
            f"Manifest(version={self.version}, parent={self.parent}, reason={self.reason!r}, "
            f"L={self.num_layers}, E={self.num_experts}, R={self.num_ranks}, S={self.slots_per_rank}, "
            f"alive={int(self.alive.sum()) if isinstance(self.alive, torch.Tensor) else '?'}/{self.num_ranks})"
        )


# Key order of the top-level map (the checksum entry follows them): kind and format_version,
# then every field of Manifest but format_version, in its order.
_FIELDS = ("kind", "format_version", *(f.name for f in fields(Manifest) if f.name != "format_version"))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


# --------------------------------------------------------------------------- validation

_I64_MAX = 2**63 - 1
# Unix seconds from 1970 to the end of year 9999: what gmtime and an ISO 8601 date can show.
_CREATED_MAX = 253_402_300_800.0


def _check(m: Manifest, where: str) -> None:
    """Validate every field of ``m``; errors name ``where`` (a file or "manifest vN")."""

    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg}")

    def count(name: str, v: object, low: int = 1, high: int = _I64_MAX) -> int:
        return check_int(v, name, low=low, high=high, where=where, error=ManifestError)

    def want(name: str, v: object, cls: type, what: str) -> None:
        if not isinstance(v, cls):
            raise bad(f"{name} must be {what}, got {type(v).__name__}")

    if not is_int(m.format_version) or m.format_version != FORMAT_VERSION:
        raise bad(f"format_version must be {FORMAT_VERSION}, got {m.format_version!r}")
    version = count("version", m.version)
    if m.parent is not None and not (is_int(m.parent) and 1 <= m.parent < version):
        raise bad(f"parent must be nil or an int in [1, version={version}), got {m.parent!r}")
    c = m.created
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < _CREATED_MAX:  # NaN fails too
        raise bad(f"created must be unix seconds in [0, {_CREATED_MAX:.0f}) (years 1970..9999), got {c!r}")
    want("reason", m.reason, str, "a str")
    want("spec", m.spec, ExpertSpec, "an ExpertSpec")
    if m.spec.record_bytes > MAX_BYTES:
        raise bad(f"spec: an expert record of {m.spec.record_bytes} bytes is beyond {MAX_BYTES}: {m.spec!r:.200}")
    L, E, R, S = (count(n, getattr(m, n)) for n in ("num_layers", "num_experts", "num_ranks", "slots_per_rank"))
    if m.ranks_per_node is not None:
        count("ranks_per_node", m.ranks_per_node)
    for name, dtype, shape in zip(_ARRAYS, (torch.int64, torch.bool, torch.int64), ((L, R * S), (R,), (L, E))):
        t = getattr(m, name)
        want(name, t, torch.Tensor, "a torch.Tensor")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise bad(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    if m.load is not None:
        want("load", m.load, torch.Tensor, "None or a torch.Tensor")
        if m.load.dtype != torch.float32 or tuple(m.load.shape) != (L, E):
            raise bad(f"load must be None or {torch.float32} {[L, E]}, got {m.load.dtype} {list(m.load.shape)}")
        if not bool((torch.isfinite(m.load) & (m.load >= 0)).all()):
            layer, e = (int(i) for i in (~(torch.isfinite(m.load) & (m.load >= 0))).nonzero()[0])
            raise bad(f"load[{layer}, {e}] = {float(m.load[layer, e])}: loads must be finite and >= 0")
    if not bool(m.alive.any()):
        raise bad("alive names no live rank (a manifest is written by a live rank)")
    try:
        m.placement()
    except PlacementError as e:
        raise bad(f"phy2log is not a valid placement: {e}") from None
    _check_checkpoint(m.checkpoint, L, bad, want)
    want("stats", m.stats, dict, "a dict")
    for k, v in m.stats.items():
        if not isinstance(k, str):
            raise bad(f"stats keys must be str, got {k!r:.80}")
        if is_int(v) and not -(2**63) <= v < 2**64:
            raise bad(f"stats[{k!r}] = {v} does not fit in 64 bits")
        if not isinstance(v, (int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
            raise bad(f"stats[{k!r}] must be an int, a finite float, a str or a bool, got {v!r:.80}")


def _check_checkpoint(ck: Any, num_layers: int, bad: Callable[[str], ManifestError], want: Callable) -> None:
    want("checkpoint", ck, dict, "a dict")
    if set(ck) != {"path", "names", "layers"}:
        raise bad(f"checkpoint must have exactly the keys ['layers', 'names', 'path'], got {sorted(map(str, ck))}")
    want("checkpoint['path']", ck["path"], str, "a str")
    names = ck["names"]
    want("checkpoint['names']", names, dict, "a dict")
    for k, v in names.items():
        if not isinstance(k, str):
            raise bad(f"checkpoint['names'] keys must be str, got {k!r:.80}")
        if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(s, str) for s in v))):
            raise bad(f"checkpoint['names'][{k!r}] must be a str or a non-empty list of str, got {v!r:.80}")
    layers = ck["layers"]
    if layers is not None and not (
        isinstance(layers, list)
        and len(layers) >= num_layers
        and all(is_int(x) and 0 <= x <= _I64_MAX for x in layers)
        and len(set(layers)) == len(layers)
    ):
        raise bad(
            f"checkpoint['layers'] must be None or a list of distinct ints >= 0 mapping the {num_layers} "
            f"store layers, got {layers!r:.80}"
        )


def store_difference(a: Manifest, b: Manifest) -> str | None:
    """None when ``a`` and ``b`` are versions of one store (same spec, L, E, R, S, ranks_per_node and
    checkpoint tensor names), else what differs, e.g. ``"num_experts 8 != 16"``. The placement, live
    ranks, checksums and the checkpoint's path may change from version to version."""

    def names(m: Manifest) -> dict:
        return {k: [v] if isinstance(v, str) else list(v) for k, v in m.checkpoint["names"].items()}

    for name in ("spec", "num_layers", "num_experts", "num_ranks", "slots_per_rank", "ranks_per_node"):
        x, y = getattr(a, name), getattr(b, name)
        if x != y:
            return f"{name} {x!r} != {y!r}"
    if names(a) != names(b):
        return f"checkpoint names {names(a)} != {names(b)}"
    return None


def check_keep_versions(value: object, name: str = "keep_versions") -> int | None:
    """How many manifest versions a store keeps: None (all of them) or an int >= 1 (bool, float,
    0 and negatives refused with a :class:`StoreError` naming ``name``)."""
    return None if value is None else check_int(value, name, low=1)


# --------------------------------------------------------------------------- encoding


def _array(t: torch.Tensor) -> dict[str, Any]:
    name = _TORCH_DTYPES[t.dtype]
    a = t.detach().cpu().contiguous().numpy()
    # astype(..., copy=False) is free on little-endian hosts and byte-swaps elsewhere.
    data = a.astype(_ARRAY_DTYPES[name], copy=False).tobytes()
    return {"dtype": name, "shape": list(t.shape), "data": data}


def _sorted_map(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in sorted(d)}


def encode_manifest(m: Manifest) -> bytes:
    """The file bytes of ``m``; deterministic (same manifest, same bytes).

    Raises:
        ManifestError: a field has the wrong type, shape, dtype or range.
    """
    if not isinstance(m, Manifest):
        raise ManifestError(f"encode_manifest takes a Manifest, got {type(m).__name__}")
    where = f"manifest v{m.version}"
    _check(m, where)
    ck = m.checkpoint
    payload = {"kind": MANIFEST_KIND, "format_version": FORMAT_VERSION} | {k: getattr(m, k) for k in _FIELDS[2:]}
    payload = {k: v for k, v in payload.items() if v is not None or k not in _OPTIONAL}
    payload |= {k: _array(payload[k]) for k in (*_ARRAYS, *_OPTIONAL) if k in payload}  # keeps the key order
    payload |= {"created": float(m.created), "spec": [_sorted_map(t) for t in m.spec.to_list()]}
    payload |= {"checkpoint": {"layers": ck["layers"], "names": _sorted_map(ck["names"]), "path": ck["path"]}}
    payload["stats"] = _sorted_map(m.stats)
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    try:
        body = packer.pack_map_header(len(payload) + 1) + b"".join(
            packer.pack(k) + packer.pack(v) for k, v in payload.items()
        )
    except (OverflowError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: cannot be encoded as msgpack: {e}") from None
    return body + _SUM_PREFIX + hashlib.sha256(body).digest()


# --------------------------------------------------------------------------- decoding


def _decode_array(d: dict, key: str, source: str) -> torch.Tensor:
    a = d[key]
    if not isinstance(a, dict) or set(a) != {"dtype", "shape", "data"}:
        raise ManifestError(f"{source}: array {key!r} must be a map with keys dtype, shape, data; got {a!r:.80}")
    name, shape, data = a["dtype"], a["shape"], a["data"]
    if not isinstance(name, str) or name != _ARRAY_DTYPE_OF[key]:
        raise ManifestError(f"{source}: array {key!r} has unknown dtype {name!r:.60} (expected {_ARRAY_DTYPE_OF[key]})")
    if not isinstance(shape, list) or not all(is_int(x) and 0 <= x <= _I64_MAX for x in shape):
        raise ManifestError(f"{source}: array {key!r} has a malformed shape {shape!r:.80}")
    if not isinstance(data, bytes):
        raise ManifestError(f"{source}: array {key!r} data must be bin, got {type(data).__name__}")
    np_dtype = np.dtype(_ARRAY_DTYPES[name])
    want = math.prod(shape) * np_dtype.itemsize
    if len(data) != want:
        raise ManifestError(
            f"{source}: array {key!r} ({name} {shape}) needs {want} bytes of data, the file holds {len(data)}"
        )
    # astype copies into native byte order and gives torch a writable array.
    arr = np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    if name == "bool" and arr.size and int(arr.max()) > 1:
        raise ManifestError(f"{source}: array {key!r} (bool) holds a byte other than 0 or 1")
    return torch.from_numpy(arr.view(np.bool_) if name == "bool" else arr).reshape(shape)


_SURROGATES = re.compile("[\udc80-\udcff]")


def _is_utf8(v: Any) -> bool:
    """False where a str of ``v`` was not UTF-8 in the file (msgpack decodes those with surrogateescape)."""
    if isinstance(v, str):
        return _SURROGATES.search(v) is None
    if isinstance(v, dict):
        return all(_is_utf8(k) and _is_utf8(x) for k, x in v.items())
    return not isinstance(v, list) or all(map(_is_utf8, v))


def decode_manifest(data: bytes, *, source: str = "<bytes>") -> Manifest:
    """Parse and check manifest file bytes: every field :func:`encode_manifest` would refuse is refused.

    Args:
        data: the file's bytes.
        source: what to call the bytes in error messages (the file's path).

    Raises:
        ManifestError: naming ``source`` and the field, for any corruption (truncated, not
            msgpack, wrong kind, checksum mismatch, a str that is not UTF-8, a missing,
            ill-typed or out-of-range field, array length not matching dtype and shape) or
            a format_version newer than :data:`FORMAT_VERSION`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError(f"{source}: manifest data must be bytes, got {type(data).__name__}")
    data, utf8 = bytes(data), True
    for errors in ("strict", "surrogateescape"):  # the second only to name a field that is not UTF-8
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, unicode_errors=errors)
            break
        except UnicodeDecodeError:
            utf8 = False
        except Exception as e:  # msgpack raises many types (ValueError, FormatError, StackError, ...)
            raise ManifestError(
                f"{source}: not a readable manifest (truncated or not msgpack, {len(data)} bytes): "
                f"{type(e).__name__}: {e}"
            ) from None
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: not a manifest (the file holds a msgpack {type(d).__name__}, not a map)")
    if d.get("kind") != MANIFEST_KIND:
        raise ManifestError(f"{source}: not an expert-store manifest (kind {d.get('kind')!r:.60})")
    fv = d.get("format_version")
    if is_int(fv) and fv > FORMAT_VERSION:
        raise ManifestError(
            f"{source}: format_version {fv} is newer than this expert-store reads ({FORMAT_VERSION}); "
            "upgrade expert-store to read it"
        )
    if (
        len(data) < _SUM_LEN
        or data[-_SUM_LEN:-32] != _SUM_PREFIX
        or d.get(_SUM_KEY) != data[-32:]
        or hashlib.sha256(data[:-_SUM_LEN]).digest() != data[-32:]
    ):
        raise ManifestError(f"{source}: checksum mismatch (the file is corrupt or was truncated)")
    extra = set(d) - set(_FIELDS) - {_SUM_KEY}
    if extra:
        raise ManifestError(f"{source}: unknown field(s) {sorted(extra)}")
    for k in _FIELDS:
        if k not in d:
            if k in _OPTIONAL:
                continue
            raise ManifestError(f"{source}: field {k!r} is missing")
        if not utf8 and not _is_utf8(d[k]):
            raise ManifestError(f"{source}: field {k!r} holds a str that is not UTF-8")
    spec = d["spec"]
    if not isinstance(spec, list) or not all(
        isinstance(t, dict) and set(t) == {"dtype", "name", "shape"} for t in spec
    ):
        raise ManifestError(f"{source}: field 'spec' must be a list of {{dtype, name, shape}} maps, got {spec!r:.80}")
    try:
        spec = ExpertSpec.from_list(spec)
    except SpecError as e:
        raise ManifestError(f"{source}: malformed spec: {e}") from None
    arrays = {k: _decode_array(d, k, source) for k in (*_ARRAYS, *_OPTIONAL) if k in d}
    values = {k: d.get(k) for k in _FIELDS[2:]} | arrays | {"spec": spec}
    if is_int(values["created"]):  # a writer may store whole seconds as an int
        values["created"] = float(values["created"])
    m = Manifest(**values, format_version=fv)
    _check(m, source)
    return m


def manifest_to_json(m: Manifest) -> dict[str, Any]:
    """A JSON-friendly summary of ``m`` for operator tools: the fields of its file (arrays as nested
    lists), and ``created_iso``, ``expert_nbytes`` and ``placement_digest``."""
    j = {"kind": MANIFEST_KIND, "format_version": m.format_version} | {k: getattr(m, k) for k in _FIELDS[2:]}
    j |= {k: j[k].tolist() for k in _ARRAYS} | {"spec": m.spec.to_list(), "stats": dict(m.stats)}
    j["load"] = None if m.load is None else m.load.tolist()
    ck = m.checkpoint
    names = {k: (v if isinstance(v, str) else list(v)) for k, v in ck["names"].items()}
    layers = None if ck["layers"] is None else list(ck["layers"])
    j["checkpoint"] = {"path": ck["path"], "names": names, "layers": layers}
    j["created_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created))
    return j | {"expert_nbytes": m.spec.nbytes, "placement_digest": m.placement().digest().hex()}


# --------------------------------------------------------------------------- the log

# Test seam: called with "written", "synced", "linked" after each step of a
# commit, so that crash tests can kill the process at each point.
_after_step: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


@contextlib.contextmanager
def _os_errors(message: str) -> Iterator[None]:
    """Raise an OSError of the block as ``ManifestError(f"{message}: {error}")``."""
    try:
        yield
    except OSError as e:
        raise ManifestError(f"{message}: {e}") from None


def _read_if_exists(path: Path, message: str) -> bytes | None:
    """The bytes of ``path``, or None where it does not exist; other errors as :func:`_os_errors`."""
    with _os_errors(message), contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    return None


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or unlink in it survives a crash."""
    with _os_errors(f"{path}: cannot open the directory to fsync it"):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some platforms (Windows) and file systems cannot fsync a directory.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise ManifestError(f"{path}: fsync of the directory failed: {e}") from None
    finally:
        os.close(fd)


class ManifestLog:
    """The versions of one store: ``<root>/manifests/v{version:08d}.msgpack``.

    Several ranks may share one root (they commit the same bytes) or each keep its own; both work.
    Methods raise :class:`ManifestError` naming the file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.dir = self.root / "manifests"

    def __repr__(self) -> str:
        return f"ManifestLog({str(self.root)!r})"

    def path_of(self, version: int) -> Path:
        """Where ``version`` is (or would be) committed."""
        version = check_int(version, "a manifest version", low=1, where=str(self.dir), error=ManifestError)
        return self.dir / f"v{version:08d}.msgpack"

    def versions(self) -> list[int]:
        """Committed versions, ascending (temporary files are not versions)."""
        matches = (_FILE_RE.match(n) for n in self._names())
        return sorted(v for mt in matches if mt and mt.group(0) == f"v{(v := int(mt.group(1))):08d}.msgpack")

    def _names(self) -> list[str]:
        with _os_errors(f"{self.dir}: cannot list manifests"), contextlib.suppress(FileNotFoundError):
            return os.listdir(self.dir)
        return []

    def latest(self) -> int | None:
        """The newest committed version, or None if there is none."""
        return max(self.versions(), default=None)

    def read(self, version: int | None = None) -> Manifest:
        """Read and check one version (None: the latest committed).

        A corrupt file raises :class:`ManifestError` naming it; reading never falls back to another
        version."""
        if version is None:
            version = self.latest()
            if version is None:
                raise ManifestError(f"{self.dir}: no committed manifest")
        m = self._load(version)
        if m is None:
            raise ManifestError(f"{self.path_of(version)}: manifest version {version} is not committed")
        return m

    def _load(self, version: int) -> Manifest | None:
        """Version ``version``, or None where its file does not exist."""
        path = self.path_of(version)
        data = _read_if_exists(path, f"{path}: cannot read")
        if data is None:
            if path.is_symlink():
                raise ManifestError(f"{path}: a link to a file that does not exist")
            return None
        m = decode_manifest(data, source=str(path))
        if m.version != version:
            raise ManifestError(f"{path}: the file holds version {m.version}, not {version}")
        return m

    def read_current(self) -> Manifest:
        """Read the latest version and check it against its parent: its version must be
        ``parent + 1`` (a version without parent must be the oldest committed), and a parent
        still on disk must describe the same store (:func:`store_difference`). A parent that is
        gone (pruned, or never received by a rank that adopted a newer version) is fine.

        Raises:
            ManifestError: naming the latest file and its parent's (or the older version's).
        """
        m = self.read()
        path = self.path_of(m.version)
        if m.parent is None:
            older = [v for v in self.versions() if v < m.version]
            if older:
                raise ManifestError(
                    f"{path}: version {m.version} has no parent, but {self.path_of(older[-1])} precedes it"
                )
            return m
        ppath = self.path_of(m.parent)
        if m.version != m.parent + 1:
            raise ManifestError(f"{path}: version {m.version} names parent {m.parent} ({ppath}), not {m.version - 1}")
        try:
            parent = self._load(m.parent)
        except ManifestError as e:
            raise ManifestError(f"{path}: its parent is unreadable: {e}") from None
        why = None if parent is None else store_difference(parent, m)
        if why is not None:
            raise ManifestError(f"{path}: version {m.version} and its parent {ppath} describe different stores: {why}")
        return m

    def _same_as_committed(self, path: Path, data: bytes, version: int) -> bool:
        existing = _read_if_exists(path, f"{path}: cannot read the committed manifest")
        if existing is None:
            return False
        if existing != data:
            raise ManifestError(
                f"{path}: version {version} is already committed with different content (stale writer?)"
            )
        return True

    def commit(self, m: Manifest, *, adopt: bool = False) -> Path:
        """Commit ``m`` atomically as ``path_of(m.version)``; returns that path.

        Re-committing the identical bytes of an existing version is allowed (ranks
        sharing one root all commit the same manifest). ``adopt=True`` takes a
        version received from a peer (a rejoining rank with its own, stale root):
        the parent need not be here, but the version must be newer than the latest.

        Raises:
            ManifestError: the version exists with different content, or
                ``m.parent`` is not the latest committed version.
        """
        prepared = self.prepare(m)
        try:
            return prepared.publish(adopt=adopt)
        finally:
            prepared.discard()

    def prepare(self, m: Manifest) -> PreparedManifest:
        """First half of a commit: write ``m`` to a temporary file and fsync it.

        Nothing is visible to readers until :meth:`PreparedManifest.publish`; a
        rebalance prepares its manifest while the bytes are still moving, so that
        only the link and a directory fsync remain once they are in place."""
        data = encode_manifest(m)
        if not self.dir.is_dir():
            with _os_errors(f"{self.dir}: cannot create the manifest directory"):
                self.dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.dir.parent)
        tmp = self.dir / f".v{m.version:08d}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                _step("written")
                os.fsync(fd)
                _step("synced")
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ManifestError(f"{tmp}: cannot write the manifest: {e}") from None
        return PreparedManifest(self, m, data, tmp)

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        """Make ``tmp`` visible as ``final``: the commit point, a hard link (FileExistsError where
        ``final`` exists); file systems without hard links get an existence check and a rename."""
        try:
            os.link(tmp, final)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise ManifestError(f"{final}: cannot commit the manifest: {e}") from None
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        with _os_errors(f"{final}: cannot commit the manifest"):
            os.replace(tmp, final)

    def clean_temporaries(self, *, older_than: float = 60.0) -> list[Path]:
        """Remove temporary files left by crashed commits, if older than ``older_than`` seconds.

        The age guard keeps the in-flight commits of other ranks sharing the root; a commit takes
        milliseconds. Returns the removed paths."""
        now, removed = time.time(), []
        for p in (self.dir / n for n in self._names() if _TMP_RE.match(n)):
            # FileNotFoundError: another rank removed it.
            with _os_errors(f"{p}: cannot remove the temporary file"), contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime >= older_than:
                    p.unlink()
                    removed.append(p)
        return sorted(removed)

    def prune(self, *, keep: int) -> list[int]:
        """Delete the oldest committed versions beyond the newest ``keep`` (an int >= 1).

        ``keep`` is checked before anything is removed (a :class:`StoreError` naming it). The
        latest version is never deleted. Also removes stale temporary files. Returns the
        versions beyond ``keep`` that are now gone (including any a rank sharing the root
        removed at the same time), ascending.
        """
        keep = check_int(keep, "keep", low=1, where=f"{self.dir}: prune")
        doomed = self.versions()[:-keep]
        for path in map(self.path_of, doomed):
            with _os_errors(f"{path}: cannot delete"), contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.clean_temporaries()
        if doomed:
            _fsync_dir(self.dir)
        return doomed


class PreparedManifest:
    """A manifest written and fsynced under a temporary name, not yet committed."""

    def __init__(self, log: ManifestLog, m: Manifest, data: bytes, tmp: Path) -> None:
        self.log = log
        self.manifest = m
        self.data = data
        self.tmp: Path | None = tmp

    def publish(self, *, adopt: bool = False) -> Path:
        """Second half of a commit: the link that makes the version visible, then a directory fsync."""
        log, m, data = self.log, self.manifest, self.data
        final = log.path_of(m.version)
        if self.tmp is None:
            raise ManifestError(f"{final}: this prepared manifest was already published or discarded")
        try:
            # Listed first, so that a rank sharing this root that commits this version meanwhile is seen below.
            latest = log.latest()
            if log._same_as_committed(final, data, m.version):
                _fsync_dir(log.dir)  # the first writer may have crashed before its own directory fsync
                return final
            if adopt and latest is not None and m.version <= latest:
                raise ManifestError(
                    f"{final}: cannot adopt version {m.version}: this log already has version {latest} "
                    "of another history"
                )
            if not adopt and m.parent != latest:
                raise ManifestError(
                    f"{final}: parent {m.parent} is not the latest committed version ({latest}) of {log.dir}"
                )
            try:
                log._publish(self.tmp, final)
                _step("linked")
            except FileExistsError:
                # Another writer committed this version between our check and the link.
                if not log._same_as_committed(final, data, m.version):
                    raise ManifestError(
                        f"{final}: appeared and vanished while committing (concurrent prune?)"
                    ) from None
        finally:
            self.discard()  # whichever way: ranks sharing a root each wrote a temporary file
        _fsync_dir(log.dir)
        return final

    def discard(self) -> None:
        """Remove the temporary file (after publishing, or when the commit is abandoned)."""
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            self.tmp = None

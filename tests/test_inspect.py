"""inspect-store: every command, text and --json, against stores built with the real API (CPU, one rank)
and against hand-written multi-rank manifests; corrupt files, broken chains and checkpoint checksums."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ckpt_factory as cf
import msgpack
import pytest
import torch
from store_util import expected_accounting, random_placement
from test_manifest import NON_UTF8, Raw, payload_of, seal

import expert_store as es
from expert_store.inspect import main
from expert_store.manifest import encode_manifest
from expert_store.safetensors_file import parse_header

REPO = Path(__file__).resolve().parent.parent
L, E, S = 2, 8, 10


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A DeepSeek-style fp8 checkpoint: 2 MoE layers from checkpoint layer 3, 8 experts."""
    return cf.write_deepseek(tmp_path_factory.mktemp("ds"), H=256, I=128, num_layers=L, num_experts=E)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ds):
    """A one-rank store with three versions: create (contiguous), then two rebalances to random
    placements with a staging budget of 8 records (several rounds). Read only: tests that change
    files work on a copy (see `copy_root`)."""
    root = tmp_path_factory.mktemp("store") / "store"
    gen = torch.Generator().manual_seed(11)
    placements = [es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=S)]
    store = es.ExpertStore.create(root, spec=ds.spec, placement=placements[0], checkpoint=ds.checkpoint())
    reports = []
    for _ in range(2):
        placements.append(random_placement(gen, L=L, E=E, R=1, S=S))
        reports.append(store.rebalance(placements[-1], staging_bytes=8 * ds.spec.record_bytes))
    store.checkpoint.close()
    return root, placements, reports


def copy_root(built, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv) -> tuple[int, dict]:
    rc, out, _ = run(capsys, *argv, "--json")
    return rc, json.loads(out)


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --------------------------------------------------------------------------- summary, versions, show


def test_summary_reports_current_version_spec_and_last_rebalance(capsys, built, ds):
    """summary --json describes the latest manifest exactly (spec sizes, shape, checkpoint mapping,
    replica statistics of its placement) and the stats of the last rebalance equal its report."""
    root, placements, reports = built
    rc, d = run_json(capsys, "summary", root)
    assert rc == 0
    m = es.ManifestLog(root).read()
    assert (d["version"], d["parent"], d["reason"], d["created"]) == (3, 2, "rebalance", m.created)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d["created_iso"])
    assert d["spec"]["nbytes"] == ds.spec.nbytes and d["spec"]["record_bytes"] == ds.spec.record_bytes
    assert [t["name"] for t in d["spec"]["tensors"]] == list(ds.spec.names)
    assert [t["shape"] for t in d["spec"]["tensors"]] == [list(t.shape) for t in ds.spec.tensors]
    assert d["spec"]["tensors"][0]["dtype"] == "float8_e4m3fn"
    assert (d["num_layers"], d["num_experts"], d["num_ranks"], d["slots_per_rank"], d["num_physical"]) == (
        L,
        E,
        1,
        S,
        S,
    )
    assert d["ranks_per_node"] is None and d["alive"] == [0] and d["dead"] == []
    assert d["checkpoint"]["path"] == str(ds.path) and d["checkpoint"]["layers"] == [3, 4]
    assert d["checkpoint"]["names"]["w13"] == ds.names["w13"]
    logcnt = placements[2].logcnt
    rep = d["replicas"]
    assert (rep["min"], rep["max"], rep["replicated"]) == (
        int(logcnt.min()),
        int(logcnt.max()),
        int((logcnt > 1).sum()),
    )
    assert rep["mean"] == pytest.approx(float(logcnt.float().mean()), abs=1e-4)
    assert rep["redundant_slots_per_layer"] == S - E and rep["no_live"] == 0
    last = d["last_rebalance"]
    assert last["version"] == 3
    assert (last["stats"]["bytes_p2p"], last["stats"]["bytes_local"], last["stats"]["bytes_disk"]) == (
        reports[1].bytes_p2p,
        reports[1].bytes_local,
        reports[1].bytes_disk,
    )
    assert (d["versions_kept"], d["oldest_version"], d["latest_version"]) == (3, 1, 3)
    assert d["placement_digest"] == placements[2].digest().hex()

    rc, text, err = run(capsys, "summary", root)
    assert rc == 0 and err == ""
    assert "version    3 of 1..3 (3 kept), parent 2" in text
    assert "L=2 E=8 R=1 S=10 P=10" in text and str(ds.path) in text and "w13_scale" in text

    rc, d1 = run_json(capsys, "summary", root, "--version", "1")
    assert rc == 0 and d1["reason"] == "create" and d1["parent"] is None and d1["last_rebalance"] is None


def test_versions_lists_every_version_with_its_accounting(capsys, built):
    """versions: one row per committed version, parents chained, byte totals equal the reports."""
    root, _, reports = built
    rc, d = run_json(capsys, "versions", root)
    assert rc == 0 and d["errors"] == []
    rows = d["versions"]
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["parent"] for r in rows] == [None, 1, 2]
    assert [r["reason"] for r in rows] == ["create", "rebalance", "rebalance"]
    assert [r["alive"] for r in rows] == [1, 1, 1]
    assert rows[0]["bytes_local"] is None
    for row, rep in zip(rows[1:], reports):
        assert (row["bytes_p2p"], row["bytes_local"], row["bytes_disk"]) == (
            rep.bytes_p2p,
            rep.bytes_local,
            rep.bytes_disk,
        )
        assert row["stats"]["rounds"] > 1  # 8-record staging: several rounds

    rc, text, _ = run(capsys, "versions", root)
    lines = text.splitlines()
    assert rc == 0 and len(lines) == 4 and lines[0].split()[:4] == ["version", "parent", "created", "reason"]
    # aligned: the right-aligned version column ends at the same place on every line
    assert all(ln[6] != " " and ln[7:9] == "  " for ln in lines)
    assert str(reports[1].bytes_local) in lines[3]

    rc, d2 = run_json(capsys, "versions", root)  # --json before the command works too
    rc2, out, _ = run(capsys, "--json", "versions", root)
    assert rc == rc2 == 0 and json.loads(out) == d2


def test_show_prints_each_ranks_slots_and_checksums(capsys, built):
    """show: the experts per rank and layer are exactly phy2log; --layer and --version select."""
    root, placements, _ = built
    m3 = es.ManifestLog(root).read(3)
    rc, d = run_json(capsys, "show", root)
    assert rc == 0 and d["version"] == 3 and [x["layer"] for x in d["layers"]] == [0, 1] and d["layer"] is None
    for entry in d["layers"]:
        lay = entry["layer"]
        assert entry["ranks"] == [{"rank": 0, "alive": True, "experts": placements[2].rank_experts(0)[lay].tolist()}]
        assert entry["checksums"] == m3.checksums[lay].tolist()
    assert d["checksum_summary"]["shape"] == [L, E] and d["checksum_summary"]["zero"] == 0

    rc, d = run_json(capsys, "show", root, "--version", "1", "--layer", "1")
    assert rc == 0 and d["version"] == 1 and len(d["layers"]) == 1 and d["layer"] == 1
    assert d["layers"][0]["ranks"][0]["experts"] == [p % E for p in range(S)]
    assert d["replicated"] == [{"layer": 1, "experts": [0, 1]}]

    rc, text, _ = run(capsys, "show", root, "--layer", "0")
    assert rc == 0 and "layer 0" in text and "layer 1" not in text
    ids = " ".join(str(e) for e in placements[2].rank_experts(0)[0].tolist())
    assert f"rank 0 alive  {ids}" in text
    assert f"{int(m3.checksums[0, 0]) & (2**64 - 1):016x}" in text


# --------------------------------------------------------------------------- diff, plan (store)


def test_diff_counts_changed_slots(capsys, built):
    """diff: changed slots per layer equal phy2log differences; one rank that holds every expert
    gains and loses none; nothing else changed."""
    root, placements, _ = built
    rc, d = run_json(capsys, "diff", root, 1, 3)
    assert rc == 0 and (d["a"]["version"], d["b"]["version"]) == (1, 3)
    want = (placements[0].phy2log != placements[2].phy2log).sum(dim=1).tolist()
    assert [x["slots_changed"] for x in d["layers"]] == want and d["slots_changed"] == sum(want)
    assert (d["experts_added"], d["experts_removed"]) == (0, 0)
    assert d["alive"] == {"a": [0], "b": [0], "died": [], "revived": []}
    assert d["checksums_changed"] == [] and d["checkpoint_changed"] is False

    rc, text, _ = run(capsys, "diff", root, 2, 3)
    assert rc == 0 and "diff version 2" in text and "-> version 3" in text


def test_plan_reproduces_each_rebalance(capsys, built):
    """plan A B recomputes what the rebalance from A to B did: its byte accounting equals the
    store's report and the recorded stats (moves, rounds with the recorded staging budget)."""
    root, _, reports = built
    for a, rep in zip((1, 2), reports):
        rc, d = run_json(capsys, "plan", root, a, a + 1)
        assert rc == 0
        t = d["totals"]
        assert (t["bytes_p2p"], t["bytes_local"], t["bytes_disk"]) == (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk)
        assert d["ranks"][0]["missing"] == [] and d["links"] == []
        assert t["rounds"] == rep.rounds == len(d["rounds"]) and t["moves"] == t["moves_local"]
        assert d["recorded"]["matches"] is True
        assert d["staging_bytes"] == d["recorded"]["staging_bytes"]

    rc, d = run_json(capsys, "plan", root, 1, 2, "--staging-bytes", "1G")
    assert rc == 0 and d["staging_bytes"] == 1 << 30 and d["totals"]["rounds"] == 1
    assert d["totals"]["bytes_local"] == reports[0].bytes_local

    rc, text, _ = run(capsys, "plan", root, 2, 3)
    assert rc == 0 and "matches the stats recorded in version 3" in text and f"{reports[1].bytes_local}" in text

    rc, _, err = run(capsys, "plan", root, 1, 2, "--staging-bytes", 100)  # below two records
    assert rc == 1
    assert_one_line_error(err, "staging")


def test_plan_uses_the_recorded_round_bytes(capsys, tmp_path, ds):
    """A rebalance whose rounds were limited by round_bytes (not by staging): plan A B schedules
    with the same budget, so its rounds match the report; --round-bytes overrides it."""
    root = tmp_path / "store"
    p0 = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=1, slots_per_rank=S)
    store = es.ExpertStore.create(root, spec=ds.spec, placement=p0, checkpoint=ds.checkpoint())
    p1 = random_placement(torch.Generator().manual_seed(5), L=L, E=E, R=1, S=S)
    rep = store.rebalance(p1, staging_bytes=1 << 30, round_bytes=3 * ds.spec.record_bytes)
    store.checkpoint.close()
    assert rep.rounds > 1
    rc, d = run_json(capsys, "plan", root, 1, 2)
    assert rc == 0 and d["totals"]["rounds"] == rep.rounds and d["recorded"]["matches"] is True
    assert d["round_budget_bytes"] == 3 * ds.spec.record_bytes
    rc, d = run_json(capsys, "plan", root, 1, 2, "--round-bytes", "1G")
    assert rc == 0 and d["totals"]["rounds"] == 1 and d["round_budget_bytes"] == 1 << 29  # half the staging


# --------------------------------------------------------------------------- multi-rank manifests


def _synthetic_root(tmp_path, ds) -> tuple[Path, list[es.Placement], list[list[bool]]]:
    """Three hand-written manifests for R=4, S=3: v1 all alive; v2 rank 3 dead (expert 7 of
    layer 0 lived only there); v3 rank 3 back. Checksums are arbitrary (plan/diff ignore them)."""
    R, S3 = 4, 3
    gen = torch.Generator().manual_seed(5)

    def survivors_placement():
        # every expert on ranks 0..2, rank 3's (unfilled) slots arbitrary
        base = random_placement(gen, L=1, E=E, R=3, S=S3).phy2log[0]
        return torch.cat([base, torch.randint(0, E, (S3,), generator=gen)])

    layer0 = [
        torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 7, 2, 3]),
        torch.tensor([0, 7, 2, 3, 4, 5, 6, 1, 1, 7, 2, 3]),
        torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3]),
    ]
    layer1 = [random_placement(gen, L=1, E=E, R=R, S=S3).phy2log[0], survivors_placement()]
    layer1.append(random_placement(gen, L=1, E=E, R=R, S=S3).phy2log[0])
    placements = [
        es.Placement(torch.stack([a, b]).to(torch.int64), num_ranks=R, num_experts=E) for a, b in zip(layer0, layer1)
    ]
    alive = [[True] * 4, [True, True, True, False], [True] * 4]
    root = tmp_path / "synthetic"
    log = es.ManifestLog(root)
    for i, (p, a) in enumerate(zip(placements, alive)):
        log.commit(
            es.Manifest(
                version=i + 1,
                parent=i or None,
                created=1_700_000_000.0 + i,
                reason="create" if i == 0 else "synthetic",
                spec=ds.spec,
                num_layers=L,
                num_experts=E,
                num_ranks=R,
                slots_per_rank=S3,
                ranks_per_node=2,
                phy2log=p.phy2log,
                alive=torch.tensor(a),
                checkpoint=ds.checkpoint().to_dict(),
                checksums=torch.arange(L * E, dtype=torch.int64).view(L, E),
                stats={},
            )
        )
    return root, placements, alive


def test_plan_multi_rank_accounting_links_and_missing(capsys, tmp_path, ds):
    """plan over a rank's death and return: per-rank bytes and missing experts equal the contract's
    accounting computed independently; link bytes into each rank add up to its bytes_p2p; a rank
    dead in A or B is never a source."""
    root, placements, alive = _synthetic_root(tmp_path, ds)
    for a in (1, 2):
        rc, d = run_json(capsys, "plan", root, a, a + 1)
        assert rc == 0 and d["recorded"] is None
        old, new = placements[a - 1], placements[a]
        for r in range(4):
            row = d["ranks"][r]
            if not alive[a][r]:
                assert not row["alive"] and row["bytes_p2p"] == row["bytes_local"] == row["bytes_disk"] == 0
                continue
            want = expected_accounting(
                old, new, rank=r, expert_bytes=ds.spec.nbytes, old_alive=alive[a - 1], alive=alive[a], fresh=(),
                relay_missing=True, ranks_per_node=es.ManifestLog(root).read(a).ranks_per_node,
            )  # fmt: skip
            missing = {m["layer"]: m["experts"] for m in row["missing"]}
            assert (row["bytes_p2p"], row["bytes_local"], row["bytes_disk"], missing) == want, (a, r)
            into = sum(x["bytes"] for x in d["links"] if x["dst"] == r)
            assert into == row["bytes_p2p"]
        for x in d["links"]:
            assert alive[a - 1][x["src"]] and alive[a][x["src"]] and x["src"] != x["dst"]
            assert (
                x["bytes"] == x["records"] * ds.spec.nbytes and x["slab_bytes"] == x["records"] * ds.spec.record_bytes
            )
        assert sum(r["bytes_sent"] for r in d["ranks"]) == d["totals"]["bytes_p2p"]
    rc, d = run_json(capsys, "plan", root, 1, 2)
    assert any(7 in m["experts"] for r in d["ranks"] for m in r["missing"] if m["layer"] == 0)
    assert d["totals"]["bytes_disk"] > 0 and d["totals"]["disk_reads"] > 0
    rc, d = run_json(capsys, "plan", root, 2, 3)
    assert d["ranks"][3]["fresh"] is True  # dead in version 2: holds nothing valid

    rc, text, _ = run(capsys, "plan", root, 1, 2)
    assert rc == 0 and "dead" in text and "links (src -> dst)" in text and "L0: " in text

    rc, _, err = run(capsys, "plan", root, 1, 2, "--fresh", "3")  # rank 3 is dead in version 2
    assert rc == 2 and "--fresh rank 3" in err


def test_diff_multi_rank_alive_and_expert_sets(capsys, tmp_path, ds):
    """diff names the ranks that died and came back, and per rank the experts added and removed."""
    root, placements, _ = _synthetic_root(tmp_path, ds)
    rc, d = run_json(capsys, "diff", root, 1, 2)
    assert rc == 0 and d["alive"]["died"] == [3] and d["alive"]["revived"] == []
    layer0 = {r["rank"]: r for r in d["layers"][0]["ranks"]}
    assert layer0[0]["added"] == [7] and layer0[0]["removed"] == [1] and layer0[0]["slots_changed"] == 1
    assert layer0[2]["added"] == [] and layer0[2]["removed"] == [0] and layer0[2]["slots_changed"] == 1
    assert 3 not in layer0  # its slots are unchanged
    for entry in d["layers"]:
        lay = entry["layer"]
        a = placements[0].phy2log[lay].view(4, 3)
        b = placements[1].phy2log[lay].view(4, 3)
        assert entry["slots_changed"] == int((a != b).sum())
        for r in entry["ranks"]:
            sa, sb = set(a[r["rank"]].tolist()), set(b[r["rank"]].tolist())
            assert (r["added"], r["removed"]) == (sorted(sb - sa), sorted(sa - sb))
    rc, d = run_json(capsys, "diff", root, 2, 3)
    assert d["alive"]["revived"] == [3] and d["alive"]["died"] == []
    rc, text, _ = run(capsys, "diff", root, 1, 2)
    assert rc == 0 and "died 3" in text

    rc, d = run_json(capsys, "summary", root, "--version", "2")
    assert d["dead"] == [3] and d["replicas"]["min_live"] >= 1 and d["ranks_per_node"] == 2
    rc, text, _ = run(capsys, "show", root, "--version", "2", "--layer", "0")
    assert "rank 3 dead   (7 2 3)" in text


# --------------------------------------------------------------------------- verify


def test_verify_good_store_with_checkpoint_bytes(capsys, built):
    """verify passes on a healthy store, and --checkpoint-bytes recomputes every (layer, expert)
    checksum from the recorded checkpoint and finds them equal to the manifest's table."""
    root, _, _ = built
    rc, d = run_json(capsys, "verify", root)
    assert rc == 0 and d["ok"] and d["problems"] == [] and d["versions"] == [1, 2, 3] and d["checkpoint"] is None
    rc, d = run_json(capsys, "verify", root, "--checkpoint-bytes")
    assert rc == 0 and d["ok"]
    assert d["checkpoint"]["checked"] == L * E and d["checkpoint"]["mismatches"] == []
    rc, text, err = run(capsys, "verify", root, "--checkpoint-bytes")
    assert rc == 0 and err == "" and text.rstrip().endswith("OK") and "16 (layer, expert) checksummed" in text


def _corrupt_expert_copy(ds, dst: Path, *, layer: int, expert: int) -> Path:
    """A copy of the checkpoint with one byte of (store layer, expert)'s down_proj flipped."""
    shutil.copytree(ds.path, dst)
    name = f"model.layers.{ds.ckpt_layer(layer)}.mlp.experts.{expert}.down_proj.weight"
    shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    entry = parse_header(dst / shard).tensors[name]
    with open(dst / shard, "r+b") as f:
        f.seek(entry.offset + 17)
        byte = f.read(1)
        f.seek(entry.offset + 17)
        f.write(bytes([byte[0] ^ 0x40]))
    return dst


def test_verify_checkpoint_bytes_names_the_mismatching_expert(capsys, built, ds, tmp_path):
    """A manifest whose recorded checkpoint differs from the bytes its checksums were made from
    fails verify --checkpoint-bytes, naming exactly the (layer, expert) whose bytes differ."""
    root = copy_root(built, tmp_path)
    other = _corrupt_expert_copy(ds, tmp_path / "other", layer=1, expert=5)
    log = es.ManifestLog(root)
    m3 = log.read(3)
    log.commit(
        dataclasses.replace(m3, version=4, parent=3, reason="moved", checkpoint={**m3.checkpoint, "path": str(other)})
    )
    rc, d = run_json(capsys, "verify", root)  # without the bytes check the history is fine
    assert rc == 0 and d["ok"]
    rc, d = run_json(capsys, "verify", root, "--checkpoint-bytes")
    assert rc == 1 and not d["ok"] and d["checkpoint"]["path"] == str(other)
    mm = d["checkpoint"]["mismatches"]
    assert [(x["layer"], x["expert"]) for x in mm] == [(1, 5)]
    assert mm[0]["manifest"] == int(m3.checksums[1, 5]) and mm[0]["checkpoint"] != mm[0]["manifest"]
    rc, text, err = run(capsys, "verify", root, "--checkpoint-bytes")
    assert rc == 1 and "layer 1 expert 5" in text and text.rstrip().endswith("FAILED: 1 problem(s)")
    assert_one_line_error(err, "layer 1 expert 5", "v00000004.msgpack")

    # --checkpoint overrides the recorded path: the original checkpoint matches again
    rc, d = run_json(capsys, "verify", root, "--checkpoint-bytes", "--checkpoint", ds.path)
    assert rc == 0 and d["checkpoint"]["mismatches"] == [] and d["checkpoint"]["checked"] == L * E
    rc, d = run_json(capsys, "verify", root, "--checkpoint-bytes", "--checkpoint", tmp_path / "nowhere")
    assert rc == 1 and "nowhere" in d["problems"][0] and d["checkpoint"]["checked"] == 0


def test_verify_history_pruned_gap_fork_and_temporaries(capsys, built, tmp_path):
    """verify accepts a history whose oldest versions were pruned, warns about stray temporary
    files, and fails on a parent missing in the middle of the history and on a fork."""
    root = copy_root(built, tmp_path)
    log = es.ManifestLog(root)
    tmp = log.dir / ".v00000004.4242.deadbeef.tmp"
    tmp.write_bytes(b"partial")
    rc, d = run_json(capsys, "verify", root)
    assert rc == 0 and d["ok"] and d["temporaries"][0]["file"] == str(tmp)
    assert any("stray temporary file" in w for w in d["warnings"])

    assert log.prune(keep=2) == [1]
    rc, d = run_json(capsys, "verify", root)
    assert rc == 0 and d["ok"] and d["pruned_below"] == 2 and d["versions"] == [2, 3]
    assert "pruned" in d["notes"][0]

    # a fork: version 4 claims version 2 as its parent although version 3 exists
    m3 = log.read(3)
    log.path_of(4).write_bytes(encode_manifest(dataclasses.replace(m3, version=4, parent=2)))
    rc, d = run_json(capsys, "verify", root)
    assert rc == 1 and any("fork" in p and "v00000004.msgpack" in p for p in d["problems"])

    gap = copy_root(built, tmp_path / "gap")
    os.unlink(es.ManifestLog(gap).path_of(2))
    rc, text, err = run(capsys, "verify", gap)
    assert rc == 1 and "gap in the history" in text
    assert_one_line_error(err, "v00000003.msgpack", "parent of version 3 is 2")


# --------------------------------------------------------------------------- errors


def test_corrupt_manifest_is_named_with_exit_1(capsys, built, tmp_path):
    """A corrupt manifest gives exit code 1 and one stderr line naming the file, never a traceback;
    versions and verify still report the readable versions."""
    root = copy_root(built, tmp_path)
    log = es.ManifestLog(root)
    v2 = log.path_of(2)
    data = bytearray(v2.read_bytes())
    data[len(data) // 2] ^= 0x01
    v2.write_bytes(bytes(data))

    rc, out, err = run(capsys, "versions", root)
    assert rc == 1 and "UNREADABLE" in out
    assert_one_line_error(err, str(v2))
    rc, out, err = run(capsys, "versions", root, "--json")
    d = json.loads(out)
    assert rc == 1 and [r["version"] for r in d["versions"]] == [1, 3] and d["errors"][0]["file"] == str(v2)
    rc, _, err = run(capsys, "show", root, "--version", 2)
    assert rc == 1
    assert_one_line_error(err, str(v2))
    rc, _, err = run(capsys, "diff", root, 1, 2)
    assert rc == 1
    assert_one_line_error(err, str(v2))
    rc, d = run_json(capsys, "verify", root)
    assert rc == 1 and d["unreadable"][0]["file"] == str(v2) and d["readable"] == [1, 3]
    assert run(capsys, "summary", root)[0] == 0  # the latest version is fine

    v3 = log.path_of(3)
    v3.write_bytes(v3.read_bytes()[:-40])  # truncated latest
    for cmd in ("summary", "show"):
        rc, out, err = run(capsys, cmd, root)
        assert rc == 1 and out == ""
        assert_one_line_error(err, str(v3))
    rc, d = run_json(capsys, "verify", root)
    assert rc == 1 and any("latest version 3 is unreadable" in p for p in d["problems"])


def test_missing_root_and_empty_root_exit_1(capsys, tmp_path):
    """No root, or a root without committed manifests: one stderr line naming the path, exit 1."""
    for cmd in ("summary", "versions", "show", "verify"):
        rc, out, err = run(capsys, cmd, tmp_path / "absent")
        assert rc == 1 and out == ""
        assert_one_line_error(err, str(tmp_path / "absent"), "no such directory")
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "summary", tmp_path / "empty")
    assert rc == 1
    assert_one_line_error(err, str(tmp_path / "empty" / "manifests"), "no committed manifest")


def test_usage_errors_exit_2(capsys, built):
    """Bad command lines and versions or layers the store does not have are usage errors (exit 2)."""
    root = built[0]
    assert run(capsys)[0] == 2
    assert run(capsys, "--help")[0] == 0
    for argv, needle in [
        (("bogus", root), "invalid choice"),
        (("summary",), "ROOT"),
        (("show", root, "--layer", 2), "layer 2 is outside [0, 2)"),
        (("show", root, "--version", 9), "version 9 is not committed"),
        (("diff", root, 1, 9), "version 9 (B) is not committed"),
        (("diff", root, 0, 1), "int >= 1"),
        (("plan", root, 1, 2, "--staging-bytes", "lots"), "byte count"),
        (("verify", root, "--frobnicate"), "unrecognized arguments"),
    ]:
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and out == "" and needle in err, (argv, err)
    rc, d = run_json(capsys, "diff", root, "latest", 1)  # 'latest' names the newest version
    assert rc == 0 and d["a"]["version"] == 3


def test_tools_script_runs_from_the_checkout(built, tmp_path):
    """tools/inspect-store runs the checkout's expert_store.inspect from any working directory."""
    script = REPO / "tools" / "inspect-store"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(
        [sys.executable, str(script), "summary", str(built[0]), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 3


# --------------------------------------------------------------------------- fuzz: never a traceback

FUZZ_COMMANDS = [
    ("summary",),
    ("summary", "--version", "1"),
    ("versions",),
    ("show",),
    ("show", "--layer", "1"),
    ("diff", "1", "latest"),
    ("plan", "1", "latest"),
    ("verify",),
    ("verify", "--checkpoint-bytes"),
]


def _fuzz_manifest(version: int, parent: int | None) -> es.Manifest:
    """L=2, E=3, R=2, S=2: small enough to run every command hundreds of times."""
    return es.Manifest(
        version=version,
        parent=parent,
        created=1_767_225_600.5 + version,
        reason="rebalance" if parent else "create",
        spec=es.ExpertSpec([es.TensorSpec("w", (4, 8), torch.float32)]),
        num_layers=2,
        num_experts=3,
        num_ranks=2,
        slots_per_rank=2,
        ranks_per_node=1,
        phy2log=torch.tensor([[0, 1, 2, 0], [2, 1, 0, version % 3]], dtype=torch.int64),
        alive=torch.tensor([True, True]),
        checkpoint={"path": "/nonexistent/ckpt", "names": {"w": "l{layer}.e{expert}.w"}, "layers": None},
        checksums=torch.arange(6, dtype=torch.int64).view(2, 3) * version,
        stats={"bytes_p2p": 0, "bytes_local": 128, "bytes_disk": 0, "rounds": 1} if parent else {},
    )


def _set(path: tuple, value: object):
    def mutate(d: dict) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return mutate


_NAN, _INF = float("nan"), float("inf")
# (what to set in version 2's raw msgpack map, value); every entry is well sealed.
FIELD_CASES = [
    *[(("created",), v) for v in (1e300, -1e300, _NAN, _INF, -_INF, -1.0, 1e12, 2**63, "2026", None, True)],
    *[(("version",), v) for v in (2**63, 2**64 - 1, -1, 0, 1, 3, -(2**63))],
    *[(("parent",), v) for v in (2**64 - 1, -5, 0, 2, "1", 1.0)],
    *[(("format_version",), v) for v in (0, -1, 2**64 - 1, 2)],
    *[((k,), v) for k in ("num_layers", "num_experts", "num_ranks", "slots_per_rank") for v in (2**64 - 1, 0, -1)],
    *[(("ranks_per_node",), v) for v in (2**64 - 1, 2**63 - 1, 0, 99, None)],
    *[(("reason",), v) for v in (NON_UTF8, "two\nlines", "\x1b[31mred", "x" * 10_000)],
    *[
        (("stats",), v)
        for v in (
            {"bytes_p2p": 2**64 - 1, "bytes_local": -(2**63), "bytes_disk": 2**63, "rounds": 2**64 - 1},
            {"bytes_p2p": "lots", "bytes_local": 1.5, "bytes_disk": True, "moves": "x", "rounds": -1.0},
            {"bytes_p2p": 1e308, "seconds": _NAN},
            {"seconds": _INF},
            {"staging_bytes": -1},
            {"staging_bytes": 0},
            {"staging_bytes": 2**64 - 1},
            {"staging_bytes": 2**62 + 1},
            {"staging_bytes": "1G"},
            {"round_bytes": 0},
            {"round_bytes": 2**63},
            {"round_bytes": 1.5},
            {"fresh_ranks": "x", "moves": 10**18, "rounds": 0},
            {"x": [1]},
            {"x": {"a": 1}},
            {"x": None},
            {"x": b"raw"},
            {"\n": "\n"},
            [],
            "stats",
        )
    ],
    *[(("spec", 0, "dtype"), v) for v in ("float99", 7, None)],
    *[(("spec", 0, "shape"), v) for v in ([2**40, 2**40], [2**62], [0], [-1], [], "4x8", [1.5])],
    (("spec", 0, "name"), 7),
    (("spec", 0, "extra"), 1),
    (("spec",), []),
    (("spec",), [{"name": "w", "shape": [4, 8], "dtype": "float32"}] * 2),
    (("phy2log", "dtype"), "float32"),
    (("phy2log", "shape"), [2, 5]),
    (("phy2log", "shape"), [4, 2]),
    (("phy2log", "data"), b""),
    (("phy2log", "data"), (99).to_bytes(8, "little") * 8),
    (("phy2log", "data"), (-1).to_bytes(8, "little", signed=True) * 8),
    (("alive", "data"), b"\x00\x00"),
    (("alive", "data"), b"\x02\x01"),
    (("alive", "dtype"), "int64"),
    (("checksums", "shape"), [3, 2]),
    (("checkpoint", "path"), "/x\nnew line"),
    (("checkpoint", "path"), 7),
    (("checkpoint", "layers"), [2**63]),
    (("checkpoint", "layers"), [2**64 - 1, 0]),
    (("checkpoint", "layers"), [-1, 0]),
    (("checkpoint", "layers"), [0]),
    (("checkpoint", "layers"), [1, 1]),
    (("checkpoint", "layers"), [5, 9]),
    (("checkpoint", "names", "w"), []),
    (("checkpoint", "names"), {"w": "a", "other": "b"}),
    (("checkpoint", "names"), {}),
    (
        ("checkpoint",),
        Raw(b"\x83" + b"".join(map(msgpack.packb, ["layers", None, "names", {"w": "x"}, "path"])) + NON_UTF8),
    ),
    (("kind",), "other"),
    (("extra",), 1),
]


def _v2(d: Path) -> Path:
    return d / "v00000002.msgpack"


def _manifest_is_a_directory(d: Path) -> None:
    _v2(d).unlink()
    (_v2(d) / "inner").mkdir(parents=True)


def _dangling_link(d: Path) -> None:
    _v2(d).unlink()
    _v2(d).symlink_to(d / "nowhere")


def _link_loop(d: Path) -> None:
    _v2(d).unlink()
    _v2(d).symlink_to(_v2(d))


def _version_beyond_int64_in_name(d: Path) -> None:
    os.rename(_v2(d), d / f"v{2**64:08d}.msgpack")


def _odd_names(d: Path) -> None:
    for name in (b"\xff\xfe.msgpack", b".v00000003.\xff.tmp", b"v\nnew line.msgpack", b"\x1b[2J"):
        os.close(os.open(os.path.join(os.fsencode(d), name), os.O_CREAT | os.O_WRONLY))


def _manifests_is_a_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_bytes(b"not a directory")


def _root_is_a_file(d: Path) -> None:
    shutil.rmtree(d.parent)
    d.parent.write_bytes(b"")


FILE_CASES = [
    _manifest_is_a_directory,
    _dangling_link,
    _link_loop,
    _version_beyond_int64_in_name,
    _odd_names,
    _manifests_is_a_file,
    _root_is_a_file,
]


def _fuzz_root(tmp_path: Path, mutate) -> tuple[Path, Path]:
    """A root with a good version 1 and a version 2 changed by ``mutate`` (of its raw map, or of the files)."""
    root = tmp_path / "root"
    log = es.ManifestLog(root)
    log.commit(_fuzz_manifest(1, None))
    d = payload_of(_fuzz_manifest(2, 1))
    if isinstance(mutate, tuple):
        _set(*mutate)(d)
    log.path_of(2).write_bytes(seal(d))
    if callable(mutate):
        mutate(log.dir)
    return root, log.path_of(2)


def _no_constants(name: str) -> None:
    raise AssertionError(f"--json printed {name}, which is not JSON")


def _run_every_command(capsys, root: Path, culprits: tuple[str, ...]) -> set[int]:
    codes = set()
    for cmd in FUZZ_COMMANDS:
        for extra in ((), ("--json",)):
            argv = [cmd[0], str(root), *cmd[1:], *extra]
            rc = main(argv)  # an exception escaping main() fails the test with its traceback
            out, err = capsys.readouterr()
            assert rc in (0, 1) and "Traceback" not in err and "internal error" not in err, (argv, rc, err)
            if rc == 1:
                lines = err.splitlines()
                assert len(lines) == 1 and any(c in lines[0] for c in culprits), (argv, err)
            else:
                assert err == "", (argv, err)
            if extra and out:
                json.loads(out, parse_constant=_no_constants)
            codes.add(rc)
    return codes


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: f"{'.'.join(map(str, c[0]))}={c[1]!r:.40}")
def test_fuzz_sealed_fields_never_a_traceback(capsys, tmp_path, case):
    """Every command, text and --json, on a root whose version 2 is well sealed but holds an odd value:
    exit 0 or 1, never a traceback; on exit 1 one stderr line naming version 2's file; --json is JSON."""
    root, v2 = _fuzz_root(tmp_path, case)
    codes = _run_every_command(capsys, root, (str(v2),))
    assert 1 in codes  # verify --checkpoint-bytes cannot open /nonexistent/ckpt


@pytest.mark.parametrize("mutate", FILE_CASES, ids=lambda f: f.__name__.strip("_"))
def test_fuzz_files_never_a_traceback(capsys, tmp_path, mutate):
    """The same for odd files: a manifest that is a directory, a dangling or looping link, a version beyond
    int64 in a file name, names that are not UTF-8 or hold a newline, manifests/ or the root a file."""
    root, _ = _fuzz_root(tmp_path, mutate)
    _run_every_command(capsys, root, (str(root),))


def test_unlistable_directory_is_named(capsys, tmp_path, monkeypatch):
    """A manifests/ directory that cannot be listed (permissions; simulated: the tests may run as root)."""
    root, _ = _fuzz_root(tmp_path, (("reason",), "x"))
    listdir = os.listdir

    def refuse(path="."):
        if Path(path) == root / "manifests":
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    assert _run_every_command(capsys, root, (str(root / "manifests"),)) == {1}


# --------------------------------------------------------------------------- plan ROOT PLACEMENT_FILE (dry run)

GOLDEN = Path(__file__).parent / "golden"
# Load [L, E] of the loaded root: literal values, exact in float32.
LOAD = torch.tensor([[8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 40.0]])


def _loaded_root(tmp_path, ds) -> tuple[Path, list[es.Placement]]:
    """The synthetic root (R=4, S=3) with a version 4: version 3's placement, all ranks alive and
    the load LOAD recorded."""
    root, placements, _ = _synthetic_root(tmp_path, ds)
    log = es.ManifestLog(root)
    m3 = log.read(3)
    log.commit(dataclasses.replace(m3, version=4, parent=3, created=m3.created + 1, reason="rebalance", load=LOAD))
    return root, placements


def _expected_balance(phy2log: torch.Tensor, alive: list[bool], load: torch.Tensor) -> list[float]:
    """Max over mean GPU load per layer, slot by slot (each live replica an equal share)."""
    out = []
    R = len(alive)
    for layer, row in enumerate(phy2log.tolist()):
        S = len(row) // R
        live = [e for p, e in enumerate(row) if alive[p // S]]
        gpus = [
            sum(float(load[layer, e]) / live.count(e) for e in row[r * S : (r + 1) * S]) for r in range(R) if alive[r]
        ]
        out.append(max(gpus) / (sum(gpus) / len(gpus)))
    return out


def _write_placement(path: Path, phy2log, fmt: str) -> Path:
    if fmt == "json":
        path.write_text(json.dumps({"phy2log": phy2log.tolist()}))
    elif fmt == "msgpack":
        path.write_bytes(msgpack.packb({"phy2log": phy2log.tolist()}))
    else:
        torch.save(phy2log, path)
    return path


def test_dry_run_text_is_pinned(capsys, tmp_path, ds):
    """The dry-run report of a fixed store and placement file is pinned (tests/golden/plan_dry_run.txt;
    regenerate with EXPERT_STORE_REGEN_GOLDEN=1 and review the diff)."""
    root, placements = _loaded_root(tmp_path, ds)
    f = _write_placement(tmp_path / "new.json", placements[1].phy2log, "json")
    rc, text, err = run(capsys, "plan", root, f, "--dead", 3, "--staging-bytes", 6 * ds.spec.record_bytes)
    assert rc == 0 and err == ""
    text = text.replace(str(tmp_path), "<tmp>")
    golden = GOLDEN / "plan_dry_run.txt"
    if os.environ.get("EXPERT_STORE_REGEN_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


def test_dry_run_json_accounting_and_balance(capsys, tmp_path, ds):
    """plan ROOT FILE --json: the latest version's alive mask minus --dead, per-rank accounting equal
    to the contract's (independent set arithmetic), link bytes adding up, and the balancedness of both
    placements under the latest version's load computed slot by slot; show and summary report it too."""
    root, placements = _loaded_root(tmp_path, ds)
    old, new = placements[2], placements[1]
    alive = [True, True, True, False]
    f = _write_placement(tmp_path / "new.msgpack", new.phy2log, "msgpack")
    rc, d = run_json(capsys, "plan", root, f, "--dead", 3)
    assert rc == 0 and d["a"]["version"] == 4 and d["b"] is None and d["placement_file"] == str(f)
    assert d["alive_a"] == [0, 1, 2, 3] and d["alive_b"] == [0, 1, 2] and d["recorded"] is None
    assert d["staging_bytes"] == 1 << 30 and d["fresh"] == []
    for r in range(4):
        row = d["ranks"][r]
        if r == 3:
            assert not row["alive"] and row["staging_peak"] == 0 and row["bytes_p2p"] == 0
            continue
        want = expected_accounting(
            old, new, rank=r, expert_bytes=ds.spec.nbytes, old_alive=[True] * 4, alive=alive, fresh=(),
            relay_missing=True, ranks_per_node=es.ManifestLog(root).read(4).ranks_per_node,
        )  # fmt: skip
        missing = {m["layer"]: m["experts"] for m in row["missing"]}
        assert (row["bytes_p2p"], row["bytes_local"], row["bytes_disk"], missing) == want, r
        assert sum(x["bytes"] for x in d["links"] if x["dst"] == r) == row["bytes_p2p"]
    assert d["staging_peak"] == max(r["staging_peak"] for r in d["ranks"]) > 0
    bal = d["balancedness"]
    assert bal["load_version"] == 4
    for key, p, mask in (("a", old, [True] * 4), ("b", new, alive)):
        want = _expected_balance(p.phy2log, mask, LOAD)
        assert [x["balancedness"] for x in bal[key]["layers"]] == [round(w, 4) for w in want]
    rc, text, _ = run(capsys, "plan", root, f, "--dead", 3)
    assert f"balance {bal['a']['overall']:.4f} -> {bal['b']['overall']:.4f}" in text

    rc, s = run_json(capsys, "show", root)
    assert rc == 0 and s["balancedness"] == bal["a"]
    rc, s = run_json(capsys, "summary", root)
    assert rc == 0 and s["balancedness"] == bal["a"]
    rc, text, _ = run(capsys, "summary", root)
    assert f"balance    {bal['a']['overall']:.4f} overall" in text
    rc, s = run_json(capsys, "show", root, "--version", 3)
    assert rc == 0 and s["balancedness"] is None
    rc, text, _ = run(capsys, "show", root, "--version", 3)
    assert "no load recorded" in text

    rc, d2 = run_json(capsys, "plan", root, 3, 4)  # between versions: under the load of version 4
    assert rc == 0 and d2["balancedness"]["load_version"] == 4 and d2["placement_file"] is None


def test_plan_reports_movement(capsys, tmp_path, ds):
    """plan (both forms) reports what the placement change brings onto ranks, as eplb.movement counts
    it on the two placements (same/other node split by the store's ranks_per_node), text and JSON."""
    root, placements = _loaded_root(tmp_path, ds)
    old, new = placements[2], placements[1]
    rpn = es.ManifestLog(root).read(4).ranks_per_node
    want = es.eplb.movement(old.phy2log, new.phy2log, 4, rpn).totals()
    assert want["brought_in"] > 0
    f = _write_placement(tmp_path / "new.json", new.phy2log, "json")
    rc, d = run_json(capsys, "plan", root, f)
    assert rc == 0 and d["movement"] == want
    rc, text, _ = run(capsys, "plan", root, f)
    near = "" if rpn is None else f" (same node {want['same_node']}, other node {want['other_node']})"
    assert f"movement: {want['brought_in']} experts brought in{near}, {want['local_copies']} local copies" in text
    rc, d = run_json(capsys, "plan", root, 3, 4)  # same placement: nothing moves
    assert rc == 0 and d["movement"]["brought_in"] == 0 and d["movement"]["local_copies"] == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_dry_run_equals_the_rebalance(capsys, tmp_path, ds, monkeypatch, chunked):
    """The dry run's totals, rounds and staging peak equal what ExpertStore.rebalance to the same
    placement then reports (one rank; chunked: layer chunks of one layer, as a large rebalance)."""
    import expert_store.plan as plan_module

    if chunked:
        monkeypatch.setattr(plan_module, "CHUNK_MIN_SLOTS", 0)
    gen = torch.Generator().manual_seed(21)
    root = tmp_path / "store"
    store = es.ExpertStore.create(
        root, spec=ds.spec, placement=random_placement(gen, L=L, E=E, R=1, S=S), checkpoint=ds.checkpoint()
    )
    staging = 8 * ds.spec.record_bytes
    for fmt in ("torch", "json"):
        new = random_placement(gen, L=L, E=E, R=1, S=S)
        f = _write_placement(tmp_path / f"p.{fmt}", new.phy2log, fmt)
        rc, d = run_json(capsys, "plan", root, f, "--staging-bytes", staging)
        assert rc == 0
        rep = store.rebalance(new, staging_bytes=staging, verify=False)  # the accounting is the point
        t = d["totals"]
        assert (t["bytes_p2p"], t["bytes_local"], t["bytes_disk"]) == (rep.bytes_p2p, rep.bytes_local, rep.bytes_disk)
        assert (t["rounds"], d["ranks"][0]["staging_peak"]) == (rep.rounds, rep.staging_peak), fmt
        assert t["rounds"] > 1
        rc, after = run_json(capsys, "plan", root, rep.version - 1, rep.version)  # and what it recorded
        assert after["recorded"]["matches"] is True and after["totals"] == t
    store.close()


def _bad_files(tmp_path: Path, ds) -> list[tuple[str, Path, str]]:
    """(case, file, needle) for each malformed placement file of the loaded root (L=2, R=4, S=3, E=8)."""
    good = es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=4, slots_per_rank=3).phy2log
    d = tmp_path / "bad"
    d.mkdir()
    out_of_range = good.clone()
    out_of_range[1, 11] = 8
    unservable = good.clone()
    unservable[0] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 7, 7, 7])  # expert 7 only on rank 3 (--dead 3)
    (d / "garbage.json").write_text('{"phy2log": [[0, 1,')
    (d / "garbage.bin").write_bytes(b"\xc1\xc1\xc1")
    (d / "wrong_key.json").write_text(json.dumps({"placement": good.tolist()}))
    (d / "list.json").write_text(json.dumps(good.tolist()))
    torch.save(good.float(), d / "float.pt")
    torch.save({"weights": good}, d / "key.pt")
    (d / "ragged.json").write_text(json.dumps({"phy2log": [[0] * 12, [0] * 11]}))
    return [
        ("missing", d / "absent.json", "cannot read the placement file"),
        ("bad JSON", d / "garbage.json", "not valid JSON"),
        ("bad msgpack", d / "garbage.bin", "neither JSON, msgpack nor a torch.save file"),
        ("wrong key", d / "wrong_key.json", "without a 'phy2log' key"),
        ("not a map", d / "list.json", "holding a list, not a map"),
        ("float tensor", d / "float.pt", "integer tensor, got torch.float32"),
        ("torch wrong key", d / "key.pt", "without a 'phy2log' key"),
        ("wrong shape", _write_placement(d / "shape.json", good[:, :9], "json"), "shape [2, 9]"),
        ("ragged", d / "ragged.json", "shape [2, 11, 12]"),
        ("out of range", _write_placement(d / "range.json", out_of_range, "json"), "expert id 8 is outside [0, 8)"),
        ("unservable", _write_placement(d / "dead.pt", unservable, "torch"), "not servable by the live ranks 0,1,2"),
    ]


def test_dry_run_bad_placement_files_exit_1(capsys, tmp_path, ds):
    """Every bad placement file is refused with exit code 1 and one stderr line naming the file;
    --dead of an unknown rank and --fresh of a dead rank are usage errors (exit 2) naming the rank."""
    root, _ = _loaded_root(tmp_path, ds)
    for case, f, needle in _bad_files(tmp_path, ds):
        rc, out, err = run(capsys, "plan", root, f, "--dead", 3)
        assert rc == 1 and out == "", (case, err)
        assert_one_line_error(err, str(f), needle)
    good = _write_placement(
        tmp_path / "good.json",
        es.Placement.contiguous(num_layers=L, num_experts=E, num_ranks=4, slots_per_rank=3).phy2log,
        "json",
    )
    for argv, needle in [
        (("--dead", 4), "--dead rank 4 is not a rank of the store (R = 4"),
        (("--dead", 3, "--fresh", 3), "--fresh rank 3 is not a live rank of the new placement (given in --dead)"),
        (("--fresh", 9), "--fresh rank 9 is not a rank"),
        (("--dead", "0,1", "--dead", "2,3"), "leaves no live rank"),
    ]:
        rc, out, err = run(capsys, "plan", root, good, *argv)
        assert rc == 2 and out == "", (argv, err)
        assert_one_line_error(err, needle)
    rc, _, err = run(capsys, "plan", root, 1, 2, "--dead", 3)
    assert rc == 2 and "--dead is for a placement file" in err
    rc, _, err = run(capsys, "plan", root, 1, 2, 3)
    assert rc == 2 and "got 3 arguments" in err
    rc, _, err = run(capsys, "plan", root, 2)  # a version alone is taken as a file name
    assert rc == 1 and "plan ROOT A B" in err

#!/usr/bin/env python3
"""The performance gates of one benchmark run as a Markdown table (the README's).

    pytest tests/benchmarks --benchmark-only --benchmark-json=gates.json
    python tools/gate_table.py gates.json [more.json ...]

One row per gate (a benchmark whose ``extra_info`` carries ``ratio`` and ``target``):
the figure, what it is compared with, ratio, target, and pass, or by how much it missed.
The run's date and devices head the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(data: dict) -> list[list[str]]:
    out = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if "ratio" not in x or "target" not in x:
            continue
        ratio, target = float(x["ratio"]), float(x["target"])
        verdict = "pass" if ratio >= target else f"**miss** by {1 - ratio / target:.0%}"
        out.append([x.get("gate", b["name"]), x.get("figure", ""), x.get("ceiling", ""), f"{ratio:.3g}",
                    f">= {target:g}", verdict])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="files written by --benchmark-json")
    args = ap.parse_args(argv)
    table, heads = [], []
    for path in args.json:
        data = json.loads(path.read_text())
        found = rows(data)
        table += found
        devices = sorted({b["extra_info"].get("device", "?") for b in data["benchmarks"] if "ratio" in b["extra_info"]})
        versions = next((b["extra_info"] for b in data["benchmarks"] if "ratio" in b["extra_info"]), {})
        heads.append(
            f"{data.get('datetime', '?')[:10]}, {'; '.join(devices)}; torch {versions.get('torch', '?')}, "
            f"triton {versions.get('triton', '?')} ({len(found)} gates from {path.name})"
        )
    if not table:
        print("no gates in " + ", ".join(map(str, args.json)), file=sys.stderr)
        return 1
    for h in heads:
        print(f"Measured {h}.")
    print()
    print("| gate | figure | compared with | ratio | target | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

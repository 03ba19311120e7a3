"""Command line: ``python -m expert_store demo`` (also ``expert-store demo``) and
``expert-store inspect ...`` (the same as ``inspect-store ...``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: expert-store demo [options] | expert-store inspect COMMAND ROOT [--json]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "inspect":
        from .inspect import main as inspect_main

        return inspect_main(rest)
    print(f"expert-store: unknown command {command!r}; try: expert-store demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

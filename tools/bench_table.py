#!/usr/bin/env python3
"""Regenerate the targets tables of docs/BENCHMARKS.md from the committed JSON (docs/bench/*.json).

Each table sits between ``<!-- targets:NAME ... -->`` and ``<!-- /targets -->``; its rows, the
figures quoted and the "met" column come from :mod:`edgesplit.bench.verdicts`, the same verdicts
the benchmarks attach to their JSON. After a new run's JSON lands in docs/bench/:

    python tools/bench_table.py            # rewrite the tables in place
    python tools/bench_table.py --check    # exit 1 if a committed table differs (the test suite runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesplit.bench.verdicts import TABLES, render_table  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- targets:(\w+)[^>]*-->\n)(.*?)(<!-- /targets -->)", re.S)


def regenerate(text: str, bench_dir: Path | None = None) -> str:
    """``text`` with every targets block replaced by the table rendered from the JSON."""
    seen = set()

    def table(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"bench_table: unknown targets table '{name}' (known: {', '.join(TABLES)})")
        seen.add(name)
        body = render_table(name) if bench_dir is None else render_table(name, bench_dir)
        return f"{m.group(1)}{body}\n{m.group(4)}"

    out = BLOCK.sub(table, text)
    if missing := set(TABLES) - seen:
        raise SystemExit(f"bench_table: no block for {', '.join(sorted(missing))} in the document")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the document's tables differ")
    p.add_argument("--doc", default=str(DOC))
    a = p.parse_args(argv)
    doc = Path(a.doc)
    text = doc.read_text()
    new = regenerate(text)
    if a.check:
        if new != text:
            print(
                f"{doc}: targets tables differ from docs/bench/*.json; run python tools/bench_table.py", file=sys.stderr
            )
            return 1
        return 0
    if new != text:
        doc.write_text(new)
        print(f"rewrote the targets tables of {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

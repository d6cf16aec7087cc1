"""The README's "What each mechanism buys" table, generated from a committed summary.csv.

    python -m spatial_attention.apps.compare.readme [README.md] [benchmarks/compare]

rewrites the block between ``<!-- compare:start -->`` and ``<!-- compare:end -->`` of the
README from ``<folder>/summary.csv`` (and ``protocol.json`` beside it when present);
``tests/test_readme.py`` holds the committed README and summary equal.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

__all__ = ["readme_block", "update_readme", "START", "END"]

START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def _fmt(v: str, spec: str) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(x) else format(x, spec)


def readme_block(folder: str | Path) -> str:
    """The markdown table of ``folder/summary.csv`` with the seeds each entry has."""
    folder = Path(folder)
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    lines = [
        "| mechanism | seeds | accuracy % | std | vs none (95% CI) | params | MACs |",
        "|---|--:|--:|--:|---|--:|--:|",
    ]
    for r in rows:
        ci = ""
        if r.get("ci_low", "") != "":
            ci = f" [{_fmt(r['ci_low'], '+.2f')}, {_fmt(r['ci_high'], '+.2f')}]"
        diff = _fmt(r.get("diff", ""), "+.2f") + ci + (" *" if r.get("significant") else "")
        lines.append(
            f"| {r['mechanism']} | {r['n']} | {_fmt(r['mean'], '.2f')} | "
            f"{_fmt(r['std'], '.2f')} | {diff} | {int(float(r['params'])):,} | "
            f"{float(r['macs']) / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, folder: str | Path) -> bool:
    """Rewrite the README's block; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path}: no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{readme_block(folder)}{END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    args = sys.argv[1:]
    changed = update_readme(args[0] if args else "README.md",
                            args[1] if len(args) > 1 else "benchmarks/compare")
    print("README table updated" if changed else "README table already current")

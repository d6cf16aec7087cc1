"""The README's "What each mechanism buys" tables, generated from the committed results.

    python -m spatial_attention.apps.compare.readme [README.md] [benchmarks/compare]

rewrites three blocks of the README: ``<!-- compare:start -->`` ... ``end`` from
``<folder>/summary.csv`` (the map protocol); ``<!-- compare-tokens:start -->`` ... from
``<folder>/tokens/summary.csv`` (the token protocol, once it has runs); and
``<!-- claims:start -->`` ... (the papers' claims and what the runs say of them,
:mod:`.claims`) from ``<folder>/results.csv`` and ``<folder>/tokens/results.csv``.
``tests/test_readme.py`` holds the committed README and results equal.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from .claims import claims_table, read_accuracies

__all__ = ["readme_block", "claims_block", "update_readme", "START", "END", "CLAIMS_START",
           "CLAIMS_END", "TOKENS_START", "TOKENS_END", "TOKEN_FOLDER"]

#: where the token protocol's committed results live, inside the benchmark's folder
TOKEN_FOLDER = "tokens"

START, END = "<!-- compare:start -->", "<!-- compare:end -->"
TOKENS_START, TOKENS_END = "<!-- compare-tokens:start -->", "<!-- compare-tokens:end -->"
CLAIMS_START, CLAIMS_END = "<!-- claims:start -->", "<!-- claims:end -->"


def _fmt(v: str, spec: str) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(x) else format(x, spec)


def _mega(v: str) -> str:
    m = _fmt(str(float(v) / 1e6) if v not in ("", None) else "", ".1f")
    return m if m == "-" else m + "M"


def readme_block(folder: str | Path, baseline: str = "none") -> str:
    """The markdown table of ``folder/summary.csv`` with the seeds each entry has; a
    token summary (mixer FLOPs columns) gets those columns too."""
    folder = Path(folder)
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    flops = ("attn_flops_32px", "attn_flops_224px")
    tokens = bool(rows) and flops[0] in rows[0]
    lines = [f"| {'entry' if tokens else 'mechanism'} | seeds | accuracy % | std | "
             f"vs {baseline} (95% CI) | params | MACs |"
             + (" mixer FLOPs 32px | mixer FLOPs 224px |" if tokens else ""),
             "|---|--:|--:|--:|---|--:|--:|" + ("--:|--:|" if tokens else "")]
    for r in rows:
        ci = ""
        if r.get("ci_low", "") != "":
            ci = f" [{_fmt(r['ci_low'], '+.2f')}, {_fmt(r['ci_high'], '+.2f')}]"
        diff = _fmt(r.get("diff", ""), "+.2f") + ci + (" *" if r.get("significant") else "")
        lines.append(
            f"| {r['mechanism']} | {r['n']} | {_fmt(r['mean'], '.2f')} | "
            f"{_fmt(r['std'], '.2f')} | {diff} | {int(float(r['params'])):,} | "
            f"{_mega(r['macs'])} |"
            + ("".join(f" {_mega(r[k])} |" for k in flops) if tokens else ""))
    return "\n".join(lines) + "\n"


def claims_block(folder: str | Path) -> str:
    """The claims table from ``folder/results.csv`` (map protocol) and
    ``folder/tokens/results.csv`` (token protocol; absent until it has runs)."""
    folder = Path(folder)
    return claims_table({"map": read_accuracies(folder / "results.csv"),
                         "tokens": read_accuracies(folder / TOKEN_FOLDER / "results.csv")})


def _replace_block(text: str, start: str, end: str, body: str, path: Path) -> str:
    if start not in text or end not in text:
        raise ValueError(f"{path}: no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def update_readme(readme: str | Path, folder: str | Path) -> bool:
    """Rewrite the README's blocks (map table, claims, token table once there are token
    results); True when any changed."""
    path = Path(readme)
    text = path.read_text()
    new = _replace_block(text, START, END, readme_block(folder), path)
    new = _replace_block(new, CLAIMS_START, CLAIMS_END, claims_block(folder), path)
    tokens = Path(folder) / TOKEN_FOLDER
    if (tokens / "summary.csv").is_file():
        new = _replace_block(new, TOKENS_START, TOKENS_END, readme_block(tokens, "global"),
                             path)
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    args = sys.argv[1:]
    changed = update_readme(args[0] if args else "README.md",
                            args[1] if len(args) > 1 else "benchmarks/compare")
    print("README tables updated" if changed else "README tables already current")

"""The papers' claims that the equal-budget benchmark can test, and what its runs say.

Each claim names two entries of one protocol and what the paper says of them: ``beats``
(the first is more accurate) or ``rivals`` (the first is not less accurate). The
verdict comes from the per-run accuracies in the protocol's ``results.csv``: the
difference of the means (first minus second, in points) with its 95% Welch t interval
(:func:`.stats.welch_interval`, the one the summary tables use):

* ``beats``: ``reproduced`` when the interval lies above 0, ``contradicted`` when it
  lies below, ``not resolved`` when it holds 0;
* ``rivals``: ``not reproduced`` when the interval lies below 0, otherwise
  ``consistent`` (read the interval's width before reading much into it);
* ``not measured yet`` while either entry has fewer than 2 runs.

The claims come from settings other than this benchmark's (ImageNet classification,
COCO or a private detection set, larger networks and schedules); a verdict says what
happens at this benchmark's scale, not whether the paper is right in its own.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import welch_interval

__all__ = ["Claim", "CLAIMS", "verdict", "claims_table", "read_accuracies",
           "accuracies_by_entry"]


@dataclass(frozen=True)
class Claim:
    """``first`` ``kind`` ``second`` in ``protocol`` (``"map"`` or ``"tokens"``)."""

    first: str
    kind: str  # "beats" or "rivals"
    second: str
    protocol: str
    source: str  # who claims it, and in which setting

    def __post_init__(self) -> None:
        if self.kind not in ("beats", "rivals"):
            raise ValueError(f"claim kind must be 'beats' or 'rivals', got {self.kind!r}")
        if self.protocol not in ("map", "tokens"):
            raise ValueError(f"claim protocol must be 'map' or 'tokens', got {self.protocol!r}")


#: the claims issue #17 names, in its order
CLAIMS: tuple[Claim, ...] = (
    Claim("cbam", "beats", "se", "map",
          "CBAM (Woo et al., ECCV 2018): ImageNet classification, ResNets"),
    Claim("gam", "beats", "cbam", "map",
          "GAM (Liu et al., 2021): CIFAR-100 and ImageNet, ResNets"),
    Claim("cpms", "beats", "cbam", "map",
          "the CPMS write-up: YOLOv8 road-defect detection, mAP50 0.874 against "
          "CBAM's 0.822"),
    Claim("generalized_attention_0111", "rivals", "generalized_attention", "map",
          "Zhu et al. (ICCV 2019): the query-key content term E1 is negligible in "
          "self-attention (COCO detection, translation); 0111 drops it from 1111"),
    Claim("boat", "rivals", "global", "tokens",
          "BOAT (Yu et al., BMVC 2022): ImageNet classification, at a fraction of global "
          "attention's cost"),
)


def accuracies_by_entry(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Accuracy in percent of every run (rows with ``mechanism`` and ``accuracy`` as a
    fraction, as ``results.csv`` holds them), by entry."""
    out: dict[str, list[float]] = {}
    for row in rows:
        out.setdefault(str(row["mechanism"]), []).append(100 * float(row["accuracy"]))
    return out


def read_accuracies(results_csv: str | Path) -> dict[str, list[float]]:
    """:func:`accuracies_by_entry` of a ``results.csv``; ``{}`` when the file does not
    exist (a protocol with no run yet)."""
    path = Path(results_csv)
    if not path.is_file():
        return {}
    with path.open() as f:
        return accuracies_by_entry(csv.DictReader(f))


def verdict(claim: Claim, accuracies: Mapping[str, Sequence[float]]
            ) -> tuple[str, tuple[float, float, float] | None]:
    """``(verdict, (difference, low, high) or None)`` of one claim against the runs."""
    a, b = accuracies.get(claim.first, ()), accuracies.get(claim.second, ())
    ci = welch_interval(list(a), list(b))
    if ci is None:
        return "not measured yet", None
    _, low, high = ci
    if claim.kind == "beats":
        if low > 0:
            return "reproduced", ci
        return ("contradicted" if high < 0 else "not resolved"), ci
    return ("not reproduced" if high < 0 else "consistent"), ci


def claims_table(by_protocol: Mapping[str, Mapping[str, Sequence[float]]],
                 claims: Sequence[Claim] = CLAIMS) -> str:
    """Markdown: one row per claim with the seeds behind it, the measured difference
    (first minus second, points, 95% Welch interval) and the verdict."""
    lines = ["| claim | source | seeds | difference (95% CI) | at this scale |",
             "|---|---|--:|---|---|"]
    for c in claims:
        acc = by_protocol.get(c.protocol, {})
        seeds = f"{len(acc.get(c.first, ()))} / {len(acc.get(c.second, ()))}"
        text, ci = verdict(c, acc)
        diff = "-" if ci is None else f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"
        lines.append(f"| {c.first} {c.kind} {c.second} | {c.source} | {seeds} | {diff} "
                     f"| {text} |")
    return "\n".join(lines) + "\n"

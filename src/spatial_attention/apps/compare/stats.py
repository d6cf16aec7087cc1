"""Per-mechanism summaries of the runs: mean, spread, and the difference from the baseline
with a Welch t interval; written as CSV, markdown and a plot.

The t quantile is computed here (scipy is optional for this package): the Student t
CDF is the integral of its density, done with Simpson's rule on a grid fine enough for
six significant digits at any degrees of freedom >= 1, then inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["t_quantile", "welch_interval", "summarise", "markdown", "plot", "SUMMARY_FIELDS"]

BASELINE = "none"

SUMMARY_FIELDS = (
    "mechanism", "n", "mean", "std", "diff", "ci_low", "ci_high", "significant",
    "params", "macs", "train_img_s", "infer_img_s", "peak_mem_mb", "train_seconds",
)


def _t_cdf(x: float, df: float) -> float:
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    # the density is smooth and unimodal, so an even Simpson grid of a few thousand
    # panels is exact to ~1e-9 over the range quantiles ever reach
    n = 4000
    h = x / n
    acc = pdf(0.0) + pdf(x)
    for i in range(1, n):
        acc += (4 if i % 2 else 2) * pdf(i * h)
    return 0.5 + acc * h / 3


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` (real, > 0) degrees of freedom."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if math.isinf(df):
        lo, hi, f = 0.0, 40.0, lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    else:
        lo, hi, f = 0.0, 1.0, lambda x: _t_cdf(x, df)
        while f(hi) < p:  # heavy tails at small df: grow the bracket
            hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def welch_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float, float] | None:
    """``(mean(a) - mean(b), low, high)``: the Welch t interval of the difference of
    means; ``None`` when either sample has fewer than 2 values (no variance estimate)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se2 = va + vb
    if se2 == 0:
        return diff, diff, diff
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(se2)
    return diff, diff - half, diff + half


def _f(row: dict[str, Any], key: str) -> float:
    return float(row[key])


def summarise(rows: Sequence[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per mechanism (baseline first, then in order of first appearance).

    Accuracies are in percent; ``diff`` and its interval are mechanism minus baseline,
    in points; ``significant`` is ``*`` when the 95% interval excludes 0.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["mechanism"]), []).append(r)
    order = sorted(groups, key=lambda m: m != baseline)  # stable: baseline moved first
    base = [100 * _f(r, "accuracy") for r in groups.get(baseline, [])]
    out = []
    for name in order:
        g = groups[name]
        acc = [100 * _f(r, "accuracy") for r in g]
        row: dict[str, Any] = {
            "mechanism": name,
            "n": len(acc),
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else float("nan"),
            "diff": "", "ci_low": "", "ci_high": "", "significant": "",
        }
        if name != baseline and base:
            row["diff"] = statistics.fmean(acc) - statistics.fmean(base)
            ci = welch_interval(acc, base)
            if ci is not None:
                row["ci_low"], row["ci_high"] = ci[1], ci[2]
                row["significant"] = "*" if ci[1] > 0 or ci[2] < 0 else ""
        for key in ("params", "macs"):
            row[key] = int(float(g[0][key]))
        for key in ("train_img_s", "infer_img_s", "peak_mem_mb", "train_seconds"):
            row[key] = statistics.fmean(_f(r, key) for r in g)
        out.append(row)
    return out


def _num(v: Any, fmt: str) -> str:
    if v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


#: how each test-time augmentation is described under the summary table
TTA_TEXT = {
    "none": "without test-time augmentation",
    "flip": "with flip test-time augmentation (mean of the image's and its mirror's "
            "logits)",
    "flip_translate": "with flip + translate test-time augmentation (airbench's: the "
                      "image and its mirror weigh 1/2, the same pair shifted one pixel "
                      "diagonally each way 1/4 per shift, reflect padding)",
}
TTA_SHORT = {"none": "no TTA", "flip": "flip TTA", "flip_translate": "flip + translate TTA"}


def markdown(summary: Sequence[dict[str, Any]], protocol: str, device: str,
             n_test: int = 10_000, tta: str = "flip_translate", baseline: str = BASELINE,
             extra: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> str:
    """The summary table; ``extra`` adds ``(header, key)`` columns holding ready-made
    text, ``notes`` adds lines under the table (the CNN protocol uses neither)."""
    lines = [
        f"Protocol: {protocol}. Device: {device}. Test accuracy on {n_test:,} CIFAR-10 test "
        f"images {TTA_TEXT[tta]}; mean and sample std over seeds. Difference from the "
        f"baseline (`{baseline}`) in points with a 95% Welch t interval; `*` where it "
        "excludes 0. MACs: multiply-adds of one image's forward pass. img/s: training and "
        "inference (each TTA view counted) throughput.",
        "",
        f"| mechanism | seeds | accuracy % ({TTA_SHORT[tta]}) | std | vs {baseline} | 95% CI "
        "| | params | MACs | train img/s | infer img/s | peak MiB |"
        + "".join(f" {h} |" for h, _ in extra),
        "|---|--:|--:|--:|--:|---|---|--:|--:|--:|--:|--:|" + "--:|" * len(extra),
    ]
    for r in summary:
        ci = (f"[{_num(r['ci_low'], '+.2f')}, {_num(r['ci_high'], '+.2f')}]"
              if r["ci_low"] != "" else "-")
        lines.append(
            f"| {r['mechanism']} | {r['n']} | {_num(r['mean'], '.2f')} | "
            f"{_num(r['std'], '.2f')} | {_num(r['diff'], '+.2f')} | {ci} | "
            f"{r['significant']} | {r['params']:,} | {r['macs'] / 1e6:.1f}M | "
            f"{_num(r['train_img_s'], '.0f')} | {_num(r['infer_img_s'], '.0f')} | "
            f"{_num(r['peak_mem_mb'], '.0f')} |"
            + "".join(f" {r.get(key, '-')} |" for _, key in extra)
        )
    if notes:
        lines += [""] + list(notes)
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], path: str | Path, title: str,
         tta: str = "flip_translate", baseline: str = BASELINE) -> None:
    """Accuracy against multiply-adds and against training throughput, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "macs", "multiply-adds per image (M)"),
                           (axes[1], "train_img_s", "training images / s")):
        for r in summary:
            x = r[key] / 1e6 if key == "macs" else r[key]
            err = 0.0 if math.isnan(r["std"]) else r["std"]
            ax.errorbar(x, r["mean"], yerr=err, fmt="o", capsize=3,
                        color="black" if r["mechanism"] == baseline else None)
            ax.annotate(r["mechanism"], (x, r["mean"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy % ({TTA_SHORT[tta]})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

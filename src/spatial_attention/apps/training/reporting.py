"""What a classifier run reports: ``metrics.csv``, ``curves.png``, ``confusion.png`` and
the ``attention/`` overlays of a few validation images.

matplotlib is optional: without it the CSV is still written and the figures are
skipped. The overlays go through :mod:`spatial_attention.viz`, like every other picture
of attention the package draws.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["read_csv_rows", "write_csv_rows", "write_overlays"]

# -- metrics logs -------------------------------------------------------------------------


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a run's metrics CSV (none when the file does not exist yet)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv_rows(
    path: str | os.PathLike, rows: list[dict[str, Any]], fields: list[str] | tuple[str, ...]
) -> None:
    """Rewrite a metrics CSV atomically (temporary file, then rename): a run stopped
    mid-write never leaves a truncated log for ``--resume`` to read."""
    import csv

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    tmp.replace(path)


_CSV_FIELDS = [
    "epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_acc_ema",
    "images_per_s", "epoch_time_s", "unreadable_train", "unreadable_val",
]


def _read_metrics(path: Path) -> list[dict[str, str]]:
    return read_csv_rows(path)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv_rows(path, rows, _CSV_FIELDS)


# -- figures ------------------------------------------------------------------------------


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(rows: list[dict[str, str]], path: Path) -> None:
    try:
        fig = _figure((11, 3.4))
    except ImportError:
        return
    ep = [int(r["epoch"]) for r in rows]

    def col(key):
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(ep, col("train_loss"), "o-", label="train")
    ax1.plot(ep, col("val_loss"), "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(ep, col("train_acc"), "o-", label="train")
    ax2.plot(ep, col("val_acc"), "o-", label="val")
    if any(r.get("val_acc_ema") not in (None, "") for r in rows):
        ax2.plot(ep, col("val_acc_ema"), "o--", label="val (EMA)")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax3.plot(ep, col("images_per_s"), "o-")
    ax3.set(xlabel="epoch", ylabel="images/s", title="throughput")
    for ax in (ax1, ax2):
        ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_confusion(confusion: Tensor, classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    fig = _figure((1.2 + 0.45 * n, 1.0 + 0.4 * n) if n > 10 else (6.5, 5.5))
    ax = fig.subplots()
    cm = confusion.double()
    rates = cm / cm.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _module_grid(model: nn.Module, module: nn.Module, shape: tuple[int, ...],
                 image_hw: tuple[int, int]) -> tuple[int, int] | None:
    layout = getattr(module, "layout", "map")
    if layout == "map" and len(shape) == 4:
        return shape[-2], shape[-1]
    if layout == "tokens" and len(shape) == 4:
        return shape[1], shape[2]
    if len(shape) == 3:
        n = shape[1]
        if hasattr(model, "grid_size"):
            gh, gw = model.grid_size(*image_hw)
            if gh * gw == n:
                return gh, gw
        r = math.isqrt(n)
        if r * r == n:
            return r, r
    return None


@torch.no_grad()
def write_overlays(
    model: nn.Module,
    dataset,
    transform,
    classes: list[str],
    out_dir: Path,
    count: int,
    device: torch.device,
) -> list[Path]:
    """PNG per validation image: the image and where each mechanism attends.

    Uses :func:`~spatial_attention.capture_attention` and each mechanism's
    ``spatial_map``; mechanisms without a spatial map (channel attention such as SE)
    are skipped. Returns the written paths (none when the model has no mechanism with a
    spatial map, or matplotlib is missing).
    """
    from ...capture import attention_modules, capture_attention

    mods = attention_modules(model)
    if not mods or count <= 0 or dataset is None:
        return []
    if importlib.util.find_spec("matplotlib") is None:  # drawing is optional
        return []
    samples = []
    for i in range(len(dataset)):
        img, label, key = dataset[i]
        if label >= 0:
            samples.append((img, label, key))
        if len(samples) == count:
            break
    if not samples:
        return []
    x8 = torch.stack([s[0] for s in samples])
    keys = torch.tensor([s[2] for s in samples])
    x = transform(x8.to(device), keys, 0, train=False)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in mods:
        def hook(mod, inputs, name=name):
            if inputs and isinstance(inputs[0], Tensor):
                shapes.setdefault(name, tuple(inputs[0].shape))
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as maps:
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    H, W = x.shape[-2:]
    panels: list[tuple[str, Tensor]] = []
    for name, m in mods:
        if name not in maps or name not in shapes:
            continue
        grid = _module_grid(model, m, shapes[name], (H, W))
        if grid is None:
            continue
        try:
            smap = type(m).spatial_map(maps[name], grid)  # (B, h, w)
        except ValueError:
            continue  # e.g. channel weights: no spatial map
        if smap.dim() == 3 and smap.shape[0] == len(samples):
            panels.append((name, smap.float().cpu()))
    if not panels:
        return []
    if len(panels) > 6:  # keep the figure readable: evenly spaced, always the last
        pick = np.linspace(0, len(panels) - 1, 6).round().astype(int)
        panels = [panels[i] for i in sorted(set(pick.tolist()))]
    from ...viz import overlay_row

    pred = logits.argmax(1).cpu()
    written = []
    for b, (img, label, key) in enumerate(samples):
        path = out_dir / f"val_{key:05d}.png"
        overlay_row(img.permute(1, 2, 0).numpy(),  # (H, W, 3) uint8
                    [(name, smap[b].numpy()) for name, smap in panels],
                    title=f"true {classes[label]}\npred {classes[int(pred[b])]}", out=path)
        written.append(path)
    return written

"""The docs gallery: every trained mechanism of an equal-budget benchmark folder on the
same test images, one column per mechanism, one row per image.

    spatial-attention viz --gallery runs/compare --out docs/gallery

Each run folder ``<bench>/runs/<mechanism>/seed<k>`` (the lowest finished seed) is
loaded with :func:`~.runs.load_run`; its maps for each image come from
:func:`~.cli.trained_maps` (``attention`` or ``gradient`` mode), the stage maps each
min-max normalised, brought to one size and averaged (so each panel shows where the
mechanism weighs positions across the network). Mechanisms that weigh channels only
(SE, ECA, ...) have no spatial map and get an empty panel saying so. The images are
the first test image of each of ``count`` classes from the benchmark's data cache,
else built-in images. Writes ``gallery.png`` and ``README.md`` into ``out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ... import viz
from ...errors import UsageError
from .cli import CAPTIONS, trained_maps
from .runs import load_run

__all__ = ["gallery_runs", "gallery_images", "write_gallery"]


def gallery_runs(bench: Path) -> list[tuple[str, Path]]:
    """``(mechanism, run dir)`` per mechanism: its lowest finished seed, else its lowest."""
    runs = Path(bench) / "runs"
    if not runs.is_dir():
        raise UsageError(f"--gallery {bench}: no runs/ folder (an equal-budget benchmark "
                         "output folder has runs/<mechanism>/seed<k>)")
    found = []
    for mech in sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "none"):
        seeds = sorted((p for p in mech.glob("seed*") if (p / "checkpoint").is_dir()),
                       key=lambda p: (not (p / "result.json").is_file(),
                                      int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30))
        if seeds:
            found.append((mech.name, seeds[0]))
    if not found:
        raise UsageError(f"--gallery {bench}: no mechanism's run has a checkpoint yet (the "
                         "baseline 'none' has no attention to show)")
    return found


def gallery_images(bench: Path, count: int) -> list[tuple[str, np.ndarray]]:
    """``(label, (H, W, 3) uint8)``: the first test image of ``count`` classes."""
    cache = Path(bench) / "cache" / "cifar10_uint8.pt"
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        classes = list(data.get("classes", []))
        picks = []
        for c in range(min(count, len(classes))):
            idx = int((data["test_y"] == c).nonzero()[0])
            picks.append((classes[c], data["test_x"][idx].permute(1, 2, 0).numpy()))
        if picks:
            return picks
    from ...images import builtin_images, load_image

    names = builtin_images()[:count]
    return [(n, load_image(f"builtin:{n}", size=96)) for n in names]


def _combined(panels: list[tuple[str, np.ndarray]], size: tuple[int, int]) -> np.ndarray:
    ups = []
    for _, m in panels:
        t = torch.from_numpy(viz.normalize_map(m))[None, None]
        ups.append(F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0])
    return viz.normalize_map(torch.stack(ups).mean(0).numpy())


def write_gallery(bench: str | Path, out: str | Path, *, mode: str = "attention",
                  count: int = 4, cmap: str = viz.DEFAULT_CMAP) -> Path:
    """Draw the gallery figure and its page; returns the page's path."""
    bench, out = Path(bench), Path(out)
    if count < 1:
        raise UsageError(f"--count must be positive, got {count}")
    runs = gallery_runs(bench)
    images = gallery_images(bench, count)
    mpl = viz._matplotlib()
    show = 1.6
    fig = viz._figure((show * (len(runs) + 1), show * len(images) + 0.9))
    axes = np.asarray(fig.subplots(len(images), len(runs) + 1, squeeze=False))
    labels = []
    for col, (mech, run_dir) in enumerate(runs, start=1):
        trained = load_run(run_dir)
        labels.append(trained.label)
        for row, (_, image) in enumerate(images):
            ax = axes[row, col]
            try:
                probs, panels = trained_maps(trained, image, mode)
            except UsageError:
                ax.imshow(image)
                ax.text(0.5, 0.5, "no spatial\nmap", transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6})
                panels = None
            if panels:
                m = _combined(panels, image.shape[:2])
                ax.imshow(viz.overlay(image, m, alpha=0.55, cmap=cmap))
                ax.set_xlabel(f"{trained.classes[int(probs.argmax())]}", fontsize=6)
            if row == 0:
                ax.set_title(mech, fontsize=7)
    for row, (label, image) in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("test image" if row == 0 else "", fontsize=7)
        axes[row, 0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=cmap),
                 ax=list(axes[:, 1:].flat), shrink=0.6, label="normalised per panel")
    caption = CAPTIONS[mode].format(fusion="mean", discard=0)
    import textwrap

    text = (f"{caption}; each mechanism's stage maps averaged; under each panel: the "
            "predicted class")
    fig.supxlabel(textwrap.fill(text, width=int(18 * (len(runs) + 1))), fontsize=7)
    png = viz._save_figure(fig, out / "gallery.png", dpi=130)
    protocol = json.loads((bench / "protocol.json").read_text()) if (
        bench / "protocol.json").is_file() else {}
    lines = [
        "# Gallery: where each trained mechanism attends",
        "",
        "Generated by `spatial-attention viz --gallery " + str(bench) + " --out " + str(out)
        + (f" --mode {mode}" if mode != "attention" else "") + "` from the equal-budget "
        "benchmark's runs (CIFAR-10, protocol: "
        + (", ".join(f"{k} {v}" for k, v in protocol.items() if k in ("epochs", "width"))
           or "unknown") + "). One column per mechanism, one row per test image.",
        "",
        f"![gallery]({png.name})",
        "",
        "Runs shown:",
        "",
        *[f"- {lab}" for lab in labels],
        "",
        "Maps of 32x32 images are coarse (the first stage's map is 15x15, the last 3x3); "
        "they show where a mechanism weighs positions in this small network, not what it "
        "would do in a large one.",
        "",
    ]
    page = out / "README.md"
    page.write_text("\n".join(lines))
    return page

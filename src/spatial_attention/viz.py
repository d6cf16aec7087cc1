"""Heatmaps and overlays of attention, and the ``spatial-attention viz`` command.

* :func:`show_heatmaps` draws a grid of attention matrices ``(rows, cols, Q, K)``
  (d2l.ai's convention) that share one colour scale and one colour bar.
* :func:`overlay` blends a spatial map of any size over an image; :func:`overlay_row`
  draws an image beside its overlays (one per mechanism).
* :func:`attention_map` runs a registered mechanism on an image and returns where it
  attends, as an ``(h, w)`` map; ``spatial-attention viz`` saves that as a PNG.

matplotlib is optional (``pip install spatial-attention[viz]``): it is imported only
inside the functions that draw, and figures are drawn on the Agg canvas, so nothing
ever opens a window and the user's own pyplot backend is left alone. Without it the
drawing functions raise :class:`MissingDependencyError`, which is both an
``ImportError`` and a :class:`~spatial_attention.errors.UsageError` (one line, exit 2
on the command line).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import registry
from .capture import capture_attention
from .errors import UsageError
from .images import BUILTIN_PREFIX, builtin_images, load_image

__all__ = [
    "MissingDependencyError",
    "show_heatmaps",
    "overlay",
    "overlay_row",
    "to_float_image",
    "upsample_map",
    "normalize_map",
    "image_features",
    "attention_map",
    "map_panels",
    "head_maps",
    "head_grid",
    "cluster_view",
    "animate_clip",
    "DEFAULT_CMAP",
    "add_arguments",
    "run",
]

INSTALL_HINT = "pip install spatial-attention[viz]"
#: perceptually uniform, readable in grey and by colour-blind readers (jet is neither)
DEFAULT_CMAP = "inferno"
#: what a figure may be saved as (by the file's suffix)
FIGURE_FORMATS = (".png", ".svg")


class MissingDependencyError(ImportError, UsageError):
    """matplotlib is needed to draw and is not installed."""


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"drawing attention needs matplotlib, which is not installed: {INSTALL_HINT}",
            name="matplotlib",
        ) from None
    return matplotlib


def _figure(figsize: tuple[float, float]):
    """A Figure on its own Agg canvas: no pyplot state, no window, any thread."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _prepare_out(out: str | os.PathLike) -> Path:
    path = Path(out).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {path}: {exc.strerror or exc}") from None
    return path


def _check_format(out: str | os.PathLike) -> None:
    suffix = Path(out).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise UsageError(f"{out}: figures are written as {' or '.join(FIGURE_FORMATS)} "
                         f"(by the file's suffix), got {suffix or 'no suffix'!r}")


def _save_figure(fig, out: str | os.PathLike, dpi: int = 120) -> Path:
    _check_format(out)
    path = _prepare_out(out)
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _colormap(name: str):
    mpl = _matplotlib()
    try:
        return mpl.colormaps[name]
    except KeyError:
        raise UsageError(
            f"unknown colormap {name!r} (try jet, viridis, inferno, Reds; see "
            "matplotlib.colormaps)"
        ) from None


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x)


# -- attention matrices ------------------------------------------------------------------
def show_heatmaps(
    matrices: Any,
    xlabel: str,
    ylabel: str,
    titles: Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    cmap: str = "Reds",
    out: str | os.PathLike | None = None,
    *,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
):
    """Draw attention matrices as a grid of heatmaps sharing one colour bar.

    Args:
        matrices: ``(rows, cols, Q, K)`` array or tensor (d2l.ai's convention), e.g.
            ``weights.reshape(1, heads, Q, K)`` for the heads of one sample. ``(Q, K)``
            and ``(cols, Q, K)`` are read as one row.
        xlabel, ylabel: axis labels (keys, queries), written on the outer panels.
        titles: one per column (as in d2l) or one per panel, row by row.
        figsize: inches; default 2.5 per panel, plus room for the colour bar.
        cmap: matplotlib colormap.
        out: when given, save a PNG there (folders are created).
        xticklabels, yticklabels: one label per key / query, e.g. the characters of a
            source and a target sentence.
        vmin, vmax: the shared colour range; default the range of all matrices.

    Returns:
        The matplotlib ``Figure`` (``rows * cols`` heatmap axes + one colour bar axis).
    """
    m = _to_numpy(matrices).astype(np.float32, copy=False)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(
            f"show_heatmaps: expected matrices of shape (rows, cols, Q, K), got {m.shape}"
        )
    if 0 in m.shape:
        raise ValueError(f"show_heatmaps: got an empty array of shape {m.shape}")
    rows, cols, Q, K = m.shape
    if titles is not None and len(titles) not in (cols, rows * cols):
        raise ValueError(
            f"show_heatmaps: {len(titles)} titles for {rows}x{cols} panels (give one per "
            f"column or one per panel)"
        )
    for label, ticks, n in (("xticklabels", xticklabels, K), ("yticklabels", yticklabels, Q)):
        if ticks is not None and len(ticks) != n:
            raise ValueError(f"show_heatmaps: {len(ticks)} {label} for {n} positions")

    mpl = _matplotlib()
    finite = m[np.isfinite(m)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax or 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    norm = mpl.colors.Normalize(vmin=lo, vmax=hi)
    if figsize is None:
        figsize = (2.5 * cols + 1.0, 2.5 * rows)
    # Square cells read best; a long, thin matrix (a few queries over a whole image)
    # would be a sliver, so it fills its panel instead.
    aspect = "equal" if max(Q, K) <= 4 * min(Q, K) else "auto"

    fig = _figure(figsize)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    image = None
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            image = ax.imshow(m[i, j], cmap=cmap, norm=norm, aspect=aspect,
                              interpolation="nearest")
            if i == rows - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
            if titles is not None:
                ax.set_title(titles[j] if len(titles) == cols else titles[i * cols + j])
    if xticklabels is not None:
        axes[0, 0].set_xticks(range(K), [str(t) for t in xticklabels])
    if yticklabels is not None:
        axes[0, 0].set_yticks(range(Q), [str(t) for t in yticklabels])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    if out is not None:
        _save_figure(fig, out)
    return fig


# -- spatial maps on images --------------------------------------------------------------
def to_float_image(image: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8/float or ``(3, H, W)`` tensor/array -> ``(H, W, 3)`` float32 in [0, 1].

    Grey ``(H, W)`` images are repeated to three channels; a fourth (alpha) channel is
    dropped. Floats above 1 are read as 0..255.
    """
    is_tensor = isinstance(image, Tensor)
    arr = _to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and (is_tensor or arr.shape[-1] not in (3, 4)):
        arr = np.moveaxis(arr, 0, -1)  # channels-first tensor or array
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or 0 in arr.shape:
        raise ValueError(
            f"expected an image (H, W, 3) or (3, H, W), got shape {tuple(_to_numpy(image).shape)}"
        )
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    x = np.nan_to_num(arr.astype(np.float32))
    if x.max() > 1.0:
        x = x / 255.0
    return np.clip(x, 0.0, 1.0)


def normalize_map(spatial_map: Any) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant map becomes all zeros, NaNs the minimum."""
    m = _to_numpy(spatial_map).astype(np.float32)
    finite = np.isfinite(m)
    if not finite.any():
        return np.zeros_like(m)
    lo, hi = float(m[finite].min()), float(m[finite].max())
    m = np.where(finite, m, lo)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def upsample_map(spatial_map: Any, size: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` map (leading singleton axes allowed) -> ``(H, W)`` in [0, 1], bilinear."""
    m = _to_numpy(spatial_map).astype(np.float32)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(
            f"expected a spatial map of shape (h, w), got {tuple(_to_numpy(spatial_map).shape)}"
        )
    m = normalize_map(m)  # first, so NaNs never reach the interpolation
    x = torch.from_numpy(m)[None, None]
    up = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return normalize_map(up[0, 0].numpy())


def overlay(
    image: Any,
    spatial_map: Any,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    out: str | os.PathLike | None = None,
) -> np.ndarray:
    """Blend a spatial map over an image.

    Args:
        image: ``(H, W, 3)`` uint8 or float, or a ``(3, H, W)`` tensor.
        spatial_map: ``(h, w)`` of any size (e.g. a 7x7 or 56x56 attention map); it is
            upsampled bilinearly to ``(H, W)`` and normalised to [0, 1].
        alpha: weight of the coloured map (0 = image only, 1 = map only).
        cmap: matplotlib colormap for the map.
        out: when given, save the blend there as a PNG.

    Returns:
        The blend, ``(H, W, 3)`` float32 in [0, 1].
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha!r}")
    img = to_float_image(image)
    m = upsample_map(spatial_map, img.shape[:2])
    heat = _colormap(cmap)(m)[..., :3].astype(np.float32)
    blended = np.clip((1.0 - alpha) * img + alpha * heat, 0.0, 1.0).astype(np.float32)
    if out is not None:
        import matplotlib.image as mpimg

        path = _prepare_out(out)
        try:
            mpimg.imsave(path, blended, format="png")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return blended


def overlay_row(
    image: Any,
    maps: Sequence[tuple[str, Any]],
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    out: str | os.PathLike | None = None,
    dpi: int = 100,
):
    """An image, then each ``(name, (h, w) map)`` of ``maps`` overlaid on it, in one row.

    The figure training and evaluation save per validation image (one panel per
    mechanism of the model). Returns the matplotlib ``Figure``; with ``out``, also
    saves it there as a PNG.
    """
    img = to_float_image(image)
    fig = _figure((2.2 * (len(maps) + 1), 2.6))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(img)
    if title:
        axes[0].set_title(title, fontsize=8)
    for ax, (name, spatial_map) in zip(axes[1:], maps, strict=True):
        ax.imshow(overlay(img, spatial_map, alpha=alpha, cmap=cmap))
        ax.set_title(name, fontsize=7)
    for ax in axes:
        ax.set_axis_off()
    if out is not None:
        _save_figure(fig, out, dpi=dpi)
    return fig


# -- figures of several maps ---------------------------------------------------------------
def _shared_unit(maps: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """Maps scaled to [0, 1] by one range common to all of them, and that range."""
    arrs = [np.nan_to_num(_to_numpy(m).astype(np.float32)) for m in maps]
    lo = min(float(a.min()) for a in arrs)
    hi = max(float(a.max()) for a in arrs)
    span = hi - lo if hi - lo > 1e-12 * max(1.0, abs(hi)) else 1.0
    return [(a - lo) / span for a in arrs], lo, hi


def _blend(img: np.ndarray, unit_map: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(unit_map, dtype=np.float32))[None, None]
    up = F.interpolate(x, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    heat = _colormap(cmap)(np.clip(up.numpy(), 0, 1))[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * img + alpha * heat, 0.0, 1.0)


def map_panels(
    image: Any,
    panels: Sequence[tuple[str, Any]],
    *,
    title: str | None = None,
    caption: str | None = None,
    shared_scale: bool = True,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    colorbar_label: str = "attention",
    out: str | os.PathLike | None = None,
):
    """The image, then one overlay per ``(title, (h, w) map)`` of ``panels``, in a row.

    ``shared_scale`` colours every panel on one range (the colour bar shows it), so
    panels compare; otherwise each is stretched to its own [0, 1]. ``caption`` (written
    under the panels) should say what the maps are. ``out``: ``.png`` or ``.svg``.
    Returns the matplotlib ``Figure``.
    """
    if not panels:
        raise ValueError("map_panels: no maps to draw")
    if out is not None:
        _check_format(out)
    img = to_float_image(image)
    maps = [_to_numpy(m).astype(np.float32).squeeze() for _, m in panels]
    for (name, _), m in zip(panels, maps, strict=True):
        if m.ndim != 2 or 0 in m.shape:
            raise ValueError(f"map_panels: {name!r} is not an (h, w) map: shape {m.shape}")
    if shared_scale:
        units, lo, hi = _shared_unit(maps)
    else:
        units, lo, hi = [normalize_map(m) for m in maps], 0.0, 1.0
    mpl = _matplotlib()
    H, W = img.shape[:2]
    panel = 2.4
    fig = _figure(((len(maps) + 1) * panel * W / max(H, W) + 1.0,
                   panel * H / max(H, W) + (0.9 if caption else 0.5)))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=8)
    for ax, (name, _), u in zip(axes[1:], panels, units, strict=True):
        ax.imshow(_blend(img, u, alpha, cmap))
        ax.set_title(name, fontsize=7)
    for ax in axes:
        ax.set_axis_off()
    label = colorbar_label if shared_scale else f"{colorbar_label} (each panel min-max)"
    fig.colorbar(mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(lo, hi), cmap=cmap),
                 ax=list(axes[1:]), shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=9)
    if caption:
        fig.supxlabel(caption, fontsize=7)
    if out is not None:
        _save_figure(fig, out)
    return fig


def head_maps(weights: Any, size: tuple[int, int], query: int | None = None) -> np.ndarray:
    """``(heads, h, w)``: per head, the attention each key position receives (mean over
    queries, or from the one ``query`` index). ``weights``: ``(heads, Q, K)`` or
    ``(1, heads, Q, K)`` with ``K == h * w``."""
    w = _to_numpy(weights).astype(np.float32)
    if w.ndim == 4 and w.shape[0] == 1:
        w = w[0]
    h, wd = size
    if w.ndim != 3 or w.shape[-1] != h * wd:
        raise ValueError(f"head_maps: expected (heads, Q, {h * wd}) weights over a {h}x{wd} "
                         f"grid, got shape {tuple(_to_numpy(weights).shape)}")
    if query is not None and not 0 <= query < w.shape[1]:
        raise ValueError(f"head_maps: query {query} outside [0, {w.shape[1]})")
    received = w.mean(1) if query is None else w[:, query]
    return received.reshape(w.shape[0], h, wd)


def head_grid(
    weights: Any,
    size: tuple[int, int],
    *,
    image: Any | None = None,
    query: int | None = None,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.6,
    out: str | os.PathLike | None = None,
):
    """One panel per head (see :func:`head_maps`), on one shared colour scale, overlaid
    on ``image`` when given; the caption says what each panel shows."""
    maps = head_maps(weights, size, query)
    what = (f"attention from query {query}" if query is not None
            else "attention each key receives, mean over queries")
    caption = f"{what}, per head; one colour scale for all heads"
    if image is None:
        image = np.full((*size, 3), 0.5, dtype=np.float32)
        alpha = 1.0
    return map_panels(image, [(f"head {i}", m) for i, m in enumerate(maps)], title=title,
                      caption=caption, cmap=cmap, alpha=alpha, out=out)


def cluster_view(image: Any, assignment: Any, *, title: str | None = None,
                 out: str | os.PathLike | None = None, alpha: float = 0.55):
    """Which group or cluster each position belongs to (an ``(h, w)`` integer map, e.g.
    BOAT's feature-space clusters), one colour per group, over the image."""
    a = _to_numpy(assignment)
    a = a.squeeze()
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"cluster_view: expected an (h, w) assignment, got shape {a.shape}")
    if out is not None:
        _check_format(out)
    img = to_float_image(image)
    labels = np.unique(a.astype(np.int64))
    index = np.searchsorted(labels, a.astype(np.int64))
    palette = _colormap("tab20")(np.arange(len(labels)) % 20)[:, :3].astype(np.float32)
    x = torch.from_numpy(index.astype(np.float32))[None, None]
    up = F.interpolate(x, size=img.shape[:2], mode="nearest")[0, 0].numpy().astype(np.int64)
    blended = np.clip((1 - alpha) * img + alpha * palette[up], 0, 1)
    fig = _figure((5.2, 2.8))
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(img)
    ax0.set_title("input", fontsize=8)
    ax1.imshow(blended)
    ax1.set_title(f"{len(labels)} groups", fontsize=8)
    for ax in (ax0, ax1):
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.supxlabel("colour = the group each position is assigned to (positions of one "
                  "colour attend together)", fontsize=7)
    if out is not None:
        _save_figure(fig, out)
    return fig


def animate_clip(frames: Any, maps: Any, out: str | os.PathLike, *, fps: float = 4.0,
                 title: str | None = None, caption: str | None = None,
                 cmap: str = DEFAULT_CMAP, alpha: float = 0.5) -> Path:
    """An animated GIF of a clip: frame ``t`` with its map ``t`` over it, on one colour
    scale for the whole clip. ``frames``: ``(T, H, W, 3)`` or ``(T, 3, H, W)``; ``maps``:
    ``(T, h, w)``. Returns the written path (``.gif``)."""
    if Path(out).suffix.lower() != ".gif":
        raise UsageError(f"{out}: clip animations are written as .gif")
    f = _to_numpy(frames)
    m = _to_numpy(maps).astype(np.float32)
    if f.ndim != 4 or m.ndim != 3 or len(f) != len(m) or len(f) == 0:
        raise ValueError(f"animate_clip: expected frames (T, H, W, 3) and maps (T, h, w) with "
                         f"the same T, got {f.shape} and {m.shape}")
    imgs = [to_float_image(x) for x in f]
    units, lo, hi = _shared_unit(list(m))
    mpl = _matplotlib()
    from matplotlib.animation import PillowWriter

    fig = _figure((3.4, 3.4))
    ax = fig.subplots()
    ax.set_axis_off()
    shown = ax.imshow(_blend(imgs[0], units[0], alpha, cmap))
    fig.colorbar(mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(lo, hi), cmap=cmap), ax=ax,
                 shrink=0.8)
    if caption:
        fig.supxlabel(caption, fontsize=7)
    path = _prepare_out(out)
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi=90):
        for t, (img, u) in enumerate(zip(imgs, units, strict=True)):
            shown.set_data(_blend(img, u, alpha, cmap))
            ax.set_title(f"{title + ': ' if title else ''}frame {t + 1}/{len(imgs)}", fontsize=8)
            writer.grab_frame()
    return path


# -- running a mechanism on an image -----------------------------------------------------
def _token_stride(height: int, width: int, grid: int) -> int:
    # ``grid`` tokens along the short side, and at most 4 * grid along the long one, so
    # an explicit attention matrix stays small (32 x 128 tokens: 16.8 M weights a head).
    return max(1, math.ceil(min(height, width) / grid), math.ceil(max(height, width) / (4 * grid)))


def image_features(image: Any, channels: int = 64, grid: int = 32, seed: int = 0) -> Tensor:
    """Lift an RGB image to ``(1, C, h, w)`` features on a token grid, with no training.

    A fixed stem in place of a trained backbone, so that randomly initialised
    mechanisms see image structure: the image is standardised, passed through a
    seeded random 3x3 convolution (3 -> C) and a ReLU, average-pooled into
    ``stride x stride`` patches (``grid`` tokens along the short side) and standardised
    per channel. The features follow colour and local texture, which is all a random
    mechanism can respond to. Same image and seed, same features.
    """
    if channels < 1 or grid < 1:
        raise UsageError(f"channels and grid must be positive, got {channels} and {grid}")
    x = torch.from_numpy(to_float_image(image)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    H, W = x.shape[-2:]
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, 3, 3, generator=g) / math.sqrt(27.0)
    bias = 0.5 * torch.randn(channels, generator=g)
    y = F.relu(F.conv2d(x, weight, bias, padding=1))  # (1, C, H, W)
    stride = _token_stride(H, W, grid)
    y = F.avg_pool2d(y, stride, stride)  # (1, C, h, w), a partial last patch dropped
    y = (y - y.mean((2, 3), keepdim=True)) / (y.std((2, 3), keepdim=True) + 1e-5)
    return y


def _layout_input(features: Tensor, layout: str) -> Tensor:
    if layout == "map":
        return features  # (B, C, H, W)
    if layout == "tokens":
        return features.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
    return features.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C), row-major


#: the views a multi-view mechanism is shown: the image, then mirrored copies of it
_VIEW_TRANSFORMS = (("image", lambda a: a), ("mirrored", np.fliplr), ("flipped", np.flipud),
                    ("rotated 180", lambda a: np.flipud(np.fliplr(a))))


def _view_images(image: np.ndarray, views: int) -> list[tuple[str, np.ndarray]]:
    if views > len(_VIEW_TRANSFORMS):
        raise UsageError(f"viz shows at most {len(_VIEW_TRANSFORMS)} views, got {views}")
    return [(label, np.ascontiguousarray(f(image))) for label, f in _VIEW_TRANSFORMS[:views]]


def _build(name: str, channels: int, grid: int, seed: int, image: Any):
    """The seeded example module, its inputs, and the image fed in their place: ``(module,
    fed inputs, (h, w), view images)``; a stack of views ``(1, V, h, w, C)`` in the
    tokens layout gets the image and mirrored copies of it (``view images`` lists them;
    one entry for a single-view mechanism)."""
    entry = registry.info(name)
    features = image_features(image, channels=channels, grid=grid, seed=seed)
    h, w = features.shape[-2:]
    feed = _layout_input(features, entry.layout)
    # The example draws random weights and inputs; fork the RNG so they follow ``seed``
    # without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, inputs = entry.cls.example(name, 1, channels, (h, w))
    module.eval()
    inputs = tuple(inputs)
    views = [("image", to_float_image(image))]
    fed = []
    for t in inputs:
        if isinstance(t, Tensor) and t.shape == feed.shape:
            t = feed.to(t.dtype)
        elif (isinstance(t, Tensor) and entry.layout == "tokens" and t.dim() == 5
              and t.shape[0] == 1 and t.shape[2:] == feed.shape[1:]):
            views = _view_images(to_float_image(image), t.shape[1])
            t = torch.cat([_layout_input(image_features(v, channels, grid, seed), "tokens")
                           for _, v in views]).unsqueeze(0).to(t.dtype)
        fed.append(t)
    if not any(a is not b for a, b in zip(fed, inputs, strict=True)):
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, Tensor))
        if entry.layout == "clip":
            # its frames are the right grid; what one still image cannot give is time
            raise UsageError(
                f"{name} takes a clip of frames {registry.LAYOUTS['clip']} (its example: "
                f"{shapes}); one still image has no frames to attend across: "
                f"`spatial-attention viz {name}` pans the image into a clip and writes a GIF"
            )
        raise UsageError(
            f"{name}: none of its example inputs ({shapes}) is a {h}x{w} grid of {channels} "
            f"channels in its {entry.layout} layout {registry.LAYOUTS[entry.layout]}"
        )
    return module, fed, (h, w), views


def multi_view_maps(
    name: str, image: Any, *, channels: int = 64, grid: int = 32, seed: int = 0
) -> tuple[list[tuple[str, np.ndarray]], dict[tuple[int, int], np.ndarray]]:
    """A multi-view mechanism on the image and its mirrored copies, one view each.

    Returns ``(views, maps)``: ``views`` the ``(label, image)`` of every view, ``maps``
    ``(v, u) -> (h, w)`` in [0, 1], the attention view ``v``'s queries pay to view
    ``u``'s positions (the recording class's ``view_maps``; the mean over calls).

    Raises:
        UsageError: the mechanism takes no stack of views or records no view pairs.
    """
    module, fed, (h, w), views = _build(name, channels, grid, seed, image)
    if len(views) < 2:
        raise UsageError(f"{name} takes a single view; use mechanism_maps")
    with torch.no_grad(), capture_attention(module) as records:
        module(*fed)
    owners = dict(module.named_modules())
    collected: dict[tuple[int, int], list[np.ndarray]] = {}
    for rec_name in records:
        reader = type(owners.get(rec_name, module))
        if not hasattr(reader, "view_maps"):
            continue
        for weights in records.calls(rec_name):
            for pair, m in reader.view_maps(weights, (h, w)).items():
                collected.setdefault(pair, []).append(normalize_map(m[0]))
    if not collected:
        raise UsageError(f"{name} recorded no per-view maps")
    return views, {k: normalize_map(np.mean(v, axis=0)) for k, v in collected.items()}


def mechanism_maps(
    name: str, image: Any, *, channels: int = 64, grid: int = 32, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every recorded map of mechanism ``name`` on ``image``, module name -> ``(h, w)``.

    Builds the mechanism with ``cls.example(name, 1, channels, (h, w))`` (random
    weights, seeded), feeds :func:`image_features` in its layout in place of every
    example input of the token shape, records with :func:`capture_attention` and turns
    each record into an ``(h, w)`` map with the recording class's ``spatial_map``.
    Records that have no spatial reading (channel weights, say) are left out; a module
    that ran several times contributes the mean of its calls. Each map is in [0, 1].

    Raises:
        ValueError: unknown ``name`` (with the closest names).
        UsageError: the mechanism records nothing that converts to a spatial map.
    """
    entry = registry.info(name)
    module, fed, (h, w), _ = _build(name, channels, grid, seed, image)
    with torch.no_grad(), capture_attention(module) as records:
        module(*fed)

    owners = dict(module.named_modules())
    maps: dict[str, np.ndarray] = {}
    seen: list[str] = []
    for rec_name in records:
        owner = owners.get(rec_name, module)
        readers = [type(owner)] + ([type(module)] if type(owner) is not type(module) else [])
        converted = []
        for weights in records.calls(rec_name):
            seen.append(f"{rec_name or name} {tuple(weights.shape)}")
            for reader in readers:
                try:
                    m = reader.spatial_map(weights, (h, w))
                except (ValueError, RuntimeError):
                    continue
                if m.dim() == 3 and tuple(m.shape[-2:]) == (h, w):
                    converted.append(normalize_map(m[0]))
                    break
        if converted:
            maps[rec_name] = normalize_map(np.mean(converted, axis=0))
    if not maps:
        what = f"it records {', '.join(seen)}" if seen else "it recorded nothing"
        why = {
            "channel": " (channel attention weighs channels, not places)",
            "branch": " (branch attention weighs kernels, not places)",
            "temporal": " (temporal attention weighs frames, not places)",
        }.get(entry.family, "")
        raise UsageError(f"{name} has no spatial map: {what}, not a {h}x{w} map{why}")
    return maps


def attention_map(
    name: str, image: Any, *, channels: int = 64, grid: int = 32, seed: int = 0
) -> np.ndarray:
    """Where mechanism ``name`` attends on ``image``: an ``(h, w)`` map in [0, 1].

    The mean of :func:`mechanism_maps` (composite mechanisms record several). Random
    weights on a random stem: this shows what the mechanism's *structure* responds to
    (windows, locality, colour contrast), not what a trained model has learned.
    """
    maps = mechanism_maps(name, image, channels=channels, grid=grid, seed=seed)
    return normalize_map(np.mean(list(maps.values()), axis=0))


# -- the command -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?",
                        help="mechanism (see `spatial-attention list`)")
    parser.add_argument(
        "--image",
        default=f"{BUILTIN_PREFIX}astronaut",
        help="an image file, or builtin:NAME with NAME one of "
        f"{', '.join(builtin_images()) or '(none installed)'} (default: %(default)s)",
    )
    parser.add_argument("--out", help="PNG to write (default: NAME_attention.png)")
    parser.add_argument("--size", type=int, default=224,
                        help="resize the image's short side to this (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=64,
                        help="feature channels fed to the mechanism (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=32,
                        help="tokens along the image's short side (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random stem and mechanism (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the map over the image (default: %(default)s)")
    parser.add_argument("--heads", action="store_true",
                        help="token and sequence mechanisms: one panel per head")
    parser.add_argument("--query", type=int,
                        help="with --heads: the attention of this query index only")
    parser.add_argument("--groups", action="store_true",
                        help="mechanisms that group positions (BOAT's feature-space "
                        "clusters): colour each position by its group")
    parser.add_argument("--frames", type=int, default=8,
                        help="clip mechanisms: frames of the clip panned across the image "
                        "(default: %(default)s; written as an animated .gif)")
    parser.add_argument("--cmap", default=DEFAULT_CMAP,
                        help="matplotlib colormap (default: %(default)s, perceptually uniform)")


def _image_label(spec: str) -> str:
    return spec[len(BUILTIN_PREFIX):] if spec.startswith(BUILTIN_PREFIX) else Path(spec).name


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        raise UsageError("name a mechanism (see `spatial-attention list`), or a trained model "
                         "with --run RUN_DIR IMAGE...")
    if args.size < 4:
        raise UsageError(f"--size must be at least 4 pixels, got {args.size}")
    if args.channels < 1:
        raise UsageError(f"--channels must be positive, got {args.channels}")
    if args.grid < 1:
        raise UsageError(f"--grid must be positive, got {args.grid}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    registry.info(args.name)  # an unknown name fails before any work
    _matplotlib()
    _colormap(args.cmap)
    image = load_image(args.image, size=args.size)
    if registry.info(args.name).layout == "clip":
        return _run_clip(args, image)
    out = Path(args.out or f"{args.name}_attention.png")
    _check_format(out)
    if args.heads:
        return _run_heads(args, image, out)
    if args.groups:
        return _run_groups(args, image, out)
    if hasattr(registry.info(args.name).cls, "view_maps"):
        return _run_multi_view(args, image, out)

    maps = mechanism_maps(args.name, image, channels=args.channels, grid=args.grid,
                          seed=args.seed)
    spatial = normalize_map(np.mean(list(maps.values()), axis=0))
    blended = overlay(image, spatial, alpha=args.alpha, cmap=args.cmap)

    h, w = spatial.shape
    H, W = image.shape[:2]
    label = _image_label(args.image)
    panel = 3.2
    fig = _figure((2 * panel * W / max(H, W) + 0.9, panel * H / max(H, W) + 0.8))
    ax_img, ax_map = fig.subplots(1, 2)
    ax_img.imshow(image)
    ax_img.set_title(f"{label} ({W}x{H})", fontsize=9)
    ax_map.imshow(blended)
    ax_map.set_title(f"{args.name}: {h}x{w} map", fontsize=9)
    for ax in (ax_img, ax_map):
        ax.set_axis_off()
    mpl = _matplotlib()
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=args.cmap)
    fig.colorbar(mappable, ax=ax_map, shrink=0.8, label="attention (normalised)")
    fig.suptitle(
        f"{args.name} on {label}: random weights, seed {args.seed}, {args.channels} channels",
        fontsize=10,
    )
    fig.supxlabel(_CAPTIONS.get(registry.info(args.name).layout, _CAPTIONS["map"]), fontsize=7)
    path = _save_figure(fig, out)
    sources = ", ".join(k or args.name for k in maps)
    print(f"wrote {path} ({args.name} on {label}, {h}x{w} map from {sources})")
    return 0


_CAPTIONS = {
    "map": "the mechanism's weight at each position (mean over channels where it has one "
           "per channel), min-max normalised; random weights show structure, not learning",
    "tokens": "attention each position receives as a key, mean over heads and queries, "
              "min-max normalised; random weights show structure, not learning",
}
_CAPTIONS["sequence"] = _CAPTIONS["tokens"]


def _per_head(reader, weights: Tensor, size: tuple[int, int]) -> list[np.ndarray] | None:
    """Per-head maps of one record: the record is cut along its head axis (1 for
    ``(B, heads, Q, K)``, 2 for windowed ``(B, windows, heads, N, N)``) and each slice read
    by the recording class's ``spatial_map``; None when that does not give maps."""
    axes = (1,) if weights.dim() == 4 else (2,) if weights.dim() == 5 else ()
    for axis in axes:
        if weights.shape[axis] < 2:
            continue
        try:
            maps = [reader.spatial_map(t, size) for t in weights.split(1, dim=axis)]
        except (ValueError, RuntimeError):
            continue
        if all(m.dim() == 3 and tuple(m.shape[-2:]) == size for m in maps):
            return [m[0].numpy() for m in maps]
    return None


def _run_heads(args: argparse.Namespace, image: np.ndarray, out: Path) -> int:
    """One panel per head of the first record that splits by head."""
    entry = registry.info(args.name)
    module, fed, (h, w), _ = _build(args.name, args.channels, args.grid, args.seed, image)
    with torch.no_grad(), capture_attention(module) as records:
        module(*fed)
    owners = dict(module.named_modules())
    label = _image_label(args.image)
    for rec_name, weights in records.in_order():
        if args.query is not None and weights.dim() == 4 and weights.shape[-1] == h * w:
            maps = list(head_maps(weights[:1], (h, w), args.query))
            what = f"attention from query {args.query}"
        else:
            maps = _per_head(type(owners.get(rec_name, module)), weights[:1], (h, w))
            what = "attention each position receives as a key, mean over queries"
        if maps:
            map_panels(image, [(f"head {i}", m) for i, m in enumerate(maps)], cmap=args.cmap,
                       alpha=args.alpha, out=out,
                       caption=f"{what}, per head; one colour scale for all heads",
                       title=f"{args.name} ({rec_name or 'module'}) on {label}: random "
                             f"weights, seed {args.seed}")
            print(f"wrote {out} ({args.name}: {len(maps)} heads over a {h}x{w} grid)")
            return 0
    shapes = ", ".join(str(tuple(t.shape)) for _, t in records.in_order()) or "nothing"
    raise UsageError(f"{args.name} ({entry.family}) records nothing that splits by head over "
                     f"its {h}x{w} grid (it records {shapes})")


def _run_groups(args: argparse.Namespace, image: np.ndarray, out: Path) -> int:
    """The first integer record ``(1, heads, h, w)``: each position's group, head 0."""
    module, fed, (h, w), _ = _build(args.name, args.channels, args.grid, args.seed, image)
    with torch.no_grad(), capture_attention(module) as records:
        module(*fed)
    for rec_name, weights in records.in_order():
        if (not weights.dtype.is_floating_point and weights.dim() == 4
                and tuple(weights.shape[-2:]) == (h, w)):
            label = _image_label(args.image)
            cluster_view(image, weights[0, 0], out=out,
                         title=f"{args.name} ({rec_name or 'module'}, head 0) on {label}: "
                               f"random weights, seed {args.seed}")
            print(f"wrote {out} ({args.name}: {int(weights[0, 0].unique().numel())} groups "
                  f"over a {h}x{w} grid)")
            return 0
    shapes = ", ".join(str(tuple(t.shape)) for _, t in records.in_order()) or "nothing"
    raise UsageError(f"{args.name} records no group assignment (it records {shapes})")


def pan_clip(image: np.ndarray, frames: int, travel: float = 0.25) -> list[np.ndarray]:
    """``frames`` views of ``image`` as a camera panning right: crops of ``1 - travel`` of
    the width sliding from the left edge to the right one."""
    if frames < 2:
        raise UsageError(f"a clip needs at least 2 frames, got {frames}")
    H, W = image.shape[:2]
    cw = max(1, int(round(W * (1 - travel))))
    starts = np.linspace(0, W - cw, frames).round().astype(int)
    return [np.ascontiguousarray(image[:, s:s + cw]) for s in starts]


def frame_maps(weights: Tensor, frames: int, size: tuple[int, int]) -> np.ndarray | None:
    """``(T, h, w)`` per-frame maps of a clip record, or None: a time-attention record
    ``(B, heads, h, w, T, T)`` gives the attention each frame receives at each position
    (mean over heads and query frames); a frame-importance record ``(B, T, C, 1, 1)`` the
    mean over channels, the same everywhere in the frame."""
    h, w = size
    if weights.dim() == 6 and tuple(weights.shape[2:4]) == size and weights.shape[-1] == frames:
        return weights[0].float().mean((0, 3)).permute(2, 0, 1).numpy()
    if weights.dim() == 5 and weights.shape[1] == frames and weights.shape[-2:] == (1, 1):
        per_frame = weights[0].float().mean((1, 2, 3))
        return per_frame[:, None, None].expand(frames, h, w).numpy()
    return None


def _run_clip(args: argparse.Namespace, image: np.ndarray) -> int:
    """A clip mechanism on a clip panned across the image, as an animated GIF."""
    out = Path(args.out or f"{args.name}_attention.gif")
    clip = pan_clip(image, args.frames)
    feats = torch.cat([image_features(f, args.channels, args.grid, args.seed) for f in clip])
    h, w = feats.shape[-2:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        cls = registry.info(args.name).cls
        try:  # a mechanism built for a clip length takes it as num_frames
            module, _ = cls.example(args.name, 1, args.channels, (h, w), num_frames=len(clip))
        except TypeError:
            module, _ = cls.example(args.name, 1, args.channels, (h, w))
    module.eval()
    with torch.no_grad(), capture_attention(module) as records:
        module(feats.unsqueeze(0))  # (1, T, C, h, w)
    for _, weights in records.in_order():
        maps = frame_maps(weights, len(clip), (h, w))
        if maps is not None:
            label = _image_label(args.image)
            animate_clip(np.stack([to_float_image(f) for f in clip]), maps, out,
                         cmap=args.cmap, alpha=args.alpha,
                         title=f"{args.name} (random weights)",
                         caption=f"{label} panned into {len(clip)} frames: attention each "
                                 "frame receives (one colour scale over the clip)")
            print(f"wrote {out} ({args.name} over {len(clip)} frames of {label})")
            return 0
    shapes = ", ".join(str(tuple(t.shape)) for _, t in records.in_order()) or "nothing"
    raise UsageError(f"{args.name} records no per-frame map (it records {shapes})")


def _run_multi_view(args: argparse.Namespace, image: np.ndarray, out: Path) -> int:
    """One row per query view: the view, then its attention over every view's positions."""
    views, maps = multi_view_maps(args.name, image, channels=args.channels, grid=args.grid,
                                  seed=args.seed)
    V = len(views)
    H, W = image.shape[:2]
    panel = 2.6
    fig = _figure(((V + 1) * panel * W / max(H, W) + 0.9, V * panel * H / max(H, W) + 0.8))
    axes = np.asarray(fig.subplots(V, V + 1)).reshape(V, V + 1)
    for v, (label, view) in enumerate(views):
        axes[v, 0].imshow(view)
        axes[v, 0].set_title(f"view {v}: {label}", fontsize=8)
        for u, (_, key_view) in enumerate(views):
            ax = axes[v, u + 1]
            if (v, u) in maps:
                ax.imshow(overlay(key_view, maps[(v, u)], alpha=args.alpha, cmap=args.cmap))
                kind = "own (mixed)" if u == v else "cross"
                ax.set_title(f"view {v} -> view {u}: {kind}", fontsize=8)
            else:
                ax.imshow(key_view)
                ax.set_title(f"view {v} -> view {u}: not attended", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    mpl = _matplotlib()
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=args.cmap)
    fig.colorbar(mappable, ax=list(axes[:, 1:].flat), shrink=0.8, label="attention (normalised)")
    label = _image_label(args.image)
    fig.suptitle(f"{args.name} on {V} views of {label}: random weights, seed {args.seed}",
                 fontsize=10)
    path = _save_figure(fig, out)
    print(f"wrote {path} ({args.name} on {V} views of {label}, {len(maps)} view pairs)")
    return 0

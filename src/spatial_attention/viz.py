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
    "add_arguments",
    "run",
]

INSTALL_HINT = "pip install spatial-attention[viz]"


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


def _save_figure(fig, out: str | os.PathLike, dpi: int = 120) -> Path:
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
    cmap: str = "jet",
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
    cmap: str = "jet",
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
                f"{shapes}) and viz draws one still image, which has no frames to attend "
                "across"
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
    parser.add_argument("name", help="mechanism (see `spatial-attention list`)")
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
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap (default: %(default)s)")


def _image_label(spec: str) -> str:
    return spec[len(BUILTIN_PREFIX):] if spec.startswith(BUILTIN_PREFIX) else Path(spec).name


def run(args: argparse.Namespace) -> int:
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
    out = Path(args.out or f"{args.name}_attention.png")
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
    path = _save_figure(fig, out)
    sources = ", ".join(k or args.name for k in maps)
    print(f"wrote {path} ({args.name} on {label}, {h}x{w} map from {sources})")
    return 0


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

"""Windows over channels-last token maps ``(B, H, W, C)``: padding, partition, shift, masks.

Swin Transformer (Liu et al. ICCV 2021, Sec. 3.2) computes self-attention inside
non-overlapping M x M windows, and in every other block shifts the map cyclically by
``floor(M/2)`` so windows straddle the previous partition; tokens that came from
different regions of the unshifted map are then masked from each other. Inputs whose
H, W are not multiples of M are padded at the bottom/right; unlike timm we also mask
the padded tokens out of every softmax, so padding never changes a real token's output.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tracing import building_graph
from .permute import inverse_index

__all__ = [
    "to_2tuple",
    "pad_to_multiple",
    "padding_mask",
    "window_partition",
    "window_reverse",
    "cyclic_shift",
    "region_labels",
    "shifted_window_mask",
    "window_attention_mask",
    "window_token_index",
    "WindowLayout",
    "window_layout",
    "effective_shift",
    "grid_partition",
    "grid_reverse",
    "grid_token_index",
    "grid_attention_mask",
    "grid_layout",
]


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; tuples pass through (validated to length 2)."""
    if isinstance(x, int):
        return (x, x)
    t = tuple(x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {x!r}")
    return (int(t[0]), int(t[1]))


def pad_to_multiple(x: Tensor, multiple: int | tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad ``(B, H, W, C)`` at the bottom/right to multiples of ``multiple``.

    Returns the padded map and ``(pad_h, pad_w)``; no copy when nothing is padded.
    """
    mh, mw = to_2tuple(multiple)
    H, W = x.shape[1], x.shape[2]
    pad_h, pad_w = (-H) % mh, (-W) % mw
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def padding_mask(
    height: int, width: int, pad_h: int, pad_w: int, device: torch.device | None = None
) -> Tensor:
    """``(H + pad_h, W + pad_w)`` boolean map, True on real tokens, False on padding."""
    valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=device)
    valid[:height, :width] = True
    return valid


def window_partition(x: Tensor, window_size: int | tuple[int, int]) -> Tensor:
    """``(B, H, W, C) -> (B * nW, Mh * Mw, C)``, windows in row-major order per image.

    H and W must be multiples of the window (call :func:`pad_to_multiple` first).
    """
    mh, mw = to_2tuple(window_size)
    B, H, W, C = x.shape
    if H % mh or W % mw:
        raise ValueError(
            f"window_partition: map {H}x{W} is not a multiple of window {mh}x{mw}; "
            "pad it with pad_to_multiple first"
        )
    x = x.view(B, H // mh, mh, W // mw, mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, mh * mw, C)


def window_reverse(
    windows: Tensor, window_size: int | tuple[int, int], height: int, width: int
) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, Mh * Mw, C) -> (B, H, W, C)``."""
    mh, mw = to_2tuple(window_size)
    nh, nw = height // mh, width // mw
    C = windows.shape[-1]
    x = windows.view(-1, nh, nw, mh, mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def cyclic_shift(x: Tensor, shift: int | tuple[int, int]) -> Tensor:
    """Roll ``(B, H, W, C)`` by ``-shift`` (towards the top-left), Swin's forward shift.

    ``cyclic_shift(x, -s)`` undoes ``cyclic_shift(x, s)``.
    """
    sh, sw = to_2tuple(shift)
    if sh == 0 and sw == 0:
        return x
    return torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))


def region_labels(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: int | tuple[int, int],
    device: torch.device | None = None,
) -> Tensor:
    """``(H, W)`` integer labels of the regions Swin's shifted partition mixes.

    With the map shifted by ``s``, the last ``M`` rows (and columns) of the padded map
    hold three regions: ``[H-M, H-s)`` and ``[H-s, H)`` came from different places, and
    everything above is one region. Tokens may attend each other only if their labels
    match. Labels are ``3 * row_region + col_region``.
    """
    mh, mw = to_2tuple(window_size)
    sh, sw = to_2tuple(shift)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - mh).long() + (rows >= height - sh).long() * int(sh > 0)
    col_region = (cols >= width - mw).long() + (cols >= width - sw).long() * int(sw > 0)
    if sh == 0:
        row_region = torch.zeros_like(row_region)
    if sw == 0:
        col_region = torch.zeros_like(col_region)
    return row_region[:, None] * 3 + col_region[None, :]


def shifted_window_mask(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: int | tuple[int, int],
    device: torch.device | None = None,
) -> Tensor:
    """Swin's SW-MSA mask: ``(nW, N, N)`` boolean keep mask for a shifted ``H x W`` map.

    ``H``, ``W`` are the (padded) map size, multiples of the window; ``N = Mh * Mw``.
    """
    labels = region_labels(height, width, window_size, shift, device=device)
    win = window_partition(labels[None, :, :, None], window_size)[..., 0]  # (nW, N)
    return win[:, :, None] == win[:, None, :]


def window_attention_mask(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    device: torch.device | None = None,
) -> tuple[Tensor | None, int, int]:
    """Keep mask for (shifted) window attention over an ``H x W`` map of any size.

    Pads to a multiple of the window, shifts, and combines Swin's region mask with the
    padding mask (padded keys are never attended). Returns ``(mask, pad_h, pad_w)`` with
    ``mask`` of shape ``(nW, N, N)``, or ``None`` when no token needs masking, which lets
    the fused kernel skip masking entirely.
    """
    mh, mw = to_2tuple(window_size)
    sh, sw = to_2tuple(shift)
    pad_h, pad_w = (-height) % mh, (-width) % mw
    if not (pad_h or pad_w or sh or sw):
        return None, 0, 0
    Hp, Wp = height + pad_h, width + pad_w
    keep = shifted_window_mask(Hp, Wp, (mh, mw), (sh, sw), device=device)
    if pad_h or pad_w:
        valid = padding_mask(height, width, pad_h, pad_w, device=device)
        valid = cyclic_shift(valid[None, :, :, None], (sh, sw))
        valid_keys = window_partition(valid, (mh, mw))[..., 0]  # (nW, N)
        keep = keep & valid_keys[:, None, :]
    return keep, pad_h, pad_w


def effective_shift(
    height: int, width: int, window_size: int | tuple[int, int], shift: int | tuple[int, int]
) -> tuple[int, int]:
    """The shift Swin actually applies: none along an axis the window already covers.

    The official code and timm drop the shift where the map is no larger than the window
    (stage 4 of a 224 model is 7 x 7 with window 7): shifting a single window only adds
    a mask. Applied per axis, as timm does.
    """
    mh, mw = to_2tuple(window_size)
    sh, sw = to_2tuple(shift)
    return (0 if height <= mh else sh, 0 if width <= mw else sw)


def window_token_index(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Pad + cyclic shift + window partition as one gather, and its inverse.

    Returns ``(gather, scatter)``:

    * ``gather`` ``(nW * N,)``: for each slot of the windowed, shifted, padded map, the
      flat index (into ``H * W``) of the token it holds. ``x.flatten(1, 2)[:, gather]``
      is ``window_partition(cyclic_shift(pad_to_multiple(x)))`` flattened, except that
      padded slots hold token 0 instead of zeros: their keys must be masked out (see
      :func:`window_attention_mask`) and their queries are never read back.
    * ``scatter`` ``(H * W,)``: the slot of every real token, so
      ``windows[:, scatter]`` undoes the gather and crops the padding in one step.

    One ``index_select`` each way replaces ``F.pad`` + ``torch.roll`` + two permuted
    copies. Everything is arithmetic on ``arange``, so it traces and exports.
    """
    mh, mw = to_2tuple(window_size)
    sh, sw = to_2tuple(shift)
    Hp, Wp = height + (-height) % mh, width + (-width) % mw
    # slot (i, j) of the shifted padded map holds padded-map position (i + s) mod size
    src_r = (torch.arange(Hp, device=device) + sh) % Hp
    src_c = (torch.arange(Wp, device=device) + sw) % Wp
    real = (src_r < height)[:, None] & (src_c < width)[None, :]
    flat = torch.where(real, src_r[:, None] * width + src_c[None, :], 0)
    gather = window_partition(flat[None, :, :, None], (mh, mw)).reshape(-1)
    # a real token at (r, c) sits at shifted position ((r - s) mod size), then in
    # window (i // M, j // M) at offset (i % M, j % M)
    i = (torch.arange(height, device=device) - sh) % Hp
    j = (torch.arange(width, device=device) - sw) % Wp
    window = (i // mh)[:, None] * (Wp // mw) + (j // mw)[None, :]
    offset = (i % mh)[:, None] * mw + (j % mw)[None, :]
    scatter = (window * (mh * mw) + offset).reshape(-1)
    return gather, scatter


class WindowLayout(NamedTuple):
    """Everything a windowed layer needs to move one map size in and out of windows.

    ``gather`` ``(nW*N,)`` and ``scatter`` ``(H*W,)``: :func:`window_token_index`.
    ``unscatter`` ``(nW*N,)``: the token each slot holds, ``H*W`` for padding slots; the
    inverse that :func:`~spatial_attention.functional.permute.permute_rows` needs to
    return ``windows[:, scatter]``'s gradient to the slots (padding slots get zero).
    ``keep`` ``(nW, N, N)`` or None: :func:`window_attention_mask`. ``padded``: whether
    the map needed padding (``unscatter`` holds ``H*W`` somewhere).
    """

    gather: Tensor
    scatter: Tensor
    unscatter: Tensor
    keep: Tensor | None
    padded: bool


def window_layout(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
    cache: dict[Any, WindowLayout] | None = None,
) -> WindowLayout:
    """:class:`WindowLayout` of an ``H x W`` map, kept in ``cache`` (a layer's dict,
    bounded at 16 sizes for multi-scale training) except while a graph is being built,
    where it is computed inline so that the graph holds it.

    Cached layouts are built outside ``torch.inference_mode`` whatever the caller's mode,
    so one layout serves inference, ``no_grad`` and training calls alike (the tensors are
    integer and boolean: no dtype enters the key).
    """
    if cache is None or building_graph():
        return _build_layout(height, width, window_size, shift, device)
    key = (height, width, to_2tuple(window_size), shift, device)
    layout = cache.get(key)
    if layout is None:
        # the cache outlives the call: an inference tensor in it would make every later
        # training call fail when autograd saves the index for backward
        with torch.inference_mode(False):
            layout = _build_layout(height, width, window_size, shift, device)
        if len(cache) > 16:
            cache.clear()
        cache[key] = layout
    return layout


def _build_layout(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None,
) -> WindowLayout:
    gather, scatter = window_token_index(height, width, window_size, shift, device)
    keep, pad_h, pad_w = window_attention_mask(height, width, window_size, shift, device)
    unscatter = inverse_index(scatter, gather.numel())
    return WindowLayout(gather, scatter, unscatter, keep, bool(pad_h or pad_w))


# -- grids: MaxViT's dilated partition (Tu et al. ECCV 2022, grid attention) -------------


def grid_partition(x: Tensor, grid_size: int | tuple[int, int]) -> Tensor:
    """``(B, H, W, C) -> (B * nW, Gh * Gw, C)``: a ``Gh x Gw`` grid of tokens ``H / Gh``
    rows and ``W / Gw`` columns apart per group, ``nW = (H / Gh)(W / Gw)`` groups.

    Group ``(a, b)`` (row-major) holds the tokens ``(i * H/Gh + a, j * W/Gw + b)`` in
    row-major ``(i, j)`` order. H and W must be multiples of the grid (pad first).
    """
    gh, gw = to_2tuple(grid_size)
    B, H, W, C = x.shape
    if H % gh or W % gw:
        raise ValueError(
            f"grid_partition: map {H}x{W} is not a multiple of grid {gh}x{gw}; "
            "pad it with pad_to_multiple first"
        )
    x = x.view(B, gh, H // gh, gw, W // gw, C)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, C)


def grid_reverse(
    windows: Tensor, grid_size: int | tuple[int, int], height: int, width: int
) -> Tensor:
    """Inverse of :func:`grid_partition`: ``(B * nW, Gh * Gw, C) -> (B, H, W, C)``."""
    gh, gw = to_2tuple(grid_size)
    C = windows.shape[-1]
    x = windows.view(-1, height // gh, width // gw, gh, gw, C)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, height, width, C)


def grid_token_index(
    height: int,
    width: int,
    grid_size: int | tuple[int, int],
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Pad + grid partition as one gather, and its inverse (the grid counterpart of
    :func:`window_token_index`, same contract).

    ``gather`` ``(nW * N,)``: the flat token index each slot of
    ``grid_partition(pad_to_multiple(x))`` holds, token 0 on padding slots (their keys
    must be masked, their queries are never read back). ``scatter`` ``(H * W,)``: the
    slot of every real token.
    """
    gh, gw = to_2tuple(grid_size)
    Hp, Wp = height + (-height) % gh, width + (-width) % gw
    dh, dw = Hp // gh, Wp // gw  # the dilation: distance between a group's tokens
    a = torch.arange(dh, device=device)[:, None, None, None]
    b = torch.arange(dw, device=device)[None, :, None, None]
    i = torch.arange(gh, device=device)[None, None, :, None]
    j = torch.arange(gw, device=device)[None, None, None, :]
    rows, cols = i * dh + a, j * dw + b  # (dh, 1, gh, 1), (1, dw, 1, gw)
    real = (rows < height) & (cols < width)
    gather = torch.where(real, rows * width + cols, 0).reshape(-1)
    r = torch.arange(height, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]
    group = (r % dh) * dw + (c % dw)
    scatter = (group * (gh * gw) + (r // dh) * gw + (c // dw)).reshape(-1)
    return gather, scatter


def grid_attention_mask(
    height: int,
    width: int,
    grid_size: int | tuple[int, int],
    device: torch.device | None = None,
) -> tuple[Tensor | None, int, int]:
    """Keep mask ``(nW, N, N)`` for grid attention over an ``H x W`` map of any size:
    padded keys are never attended. Returns ``(mask, pad_h, pad_w)``, ``mask`` None when
    nothing is padded. Every group keeps at least its first grid row and column real."""
    gh, gw = to_2tuple(grid_size)
    pad_h, pad_w = (-height) % gh, (-width) % gw
    if not (pad_h or pad_w):
        return None, 0, 0
    valid = padding_mask(height, width, pad_h, pad_w, device=device)
    keys = grid_partition(valid[None, :, :, None], (gh, gw))[..., 0]  # (nW, N)
    keep = keys[:, None, :].expand(-1, gh * gw, -1).contiguous()
    return keep, pad_h, pad_w


def grid_layout(
    height: int,
    width: int,
    grid_size: int | tuple[int, int],
    device: torch.device | None = None,
    cache: dict[Any, WindowLayout] | None = None,
) -> WindowLayout:
    """:class:`WindowLayout` of an ``H x W`` map cut into ``Gh x Gw`` grids, cached as
    :func:`window_layout` caches (the key carries ``"grid"``, so one dict may hold both)."""
    if cache is None or building_graph():
        return _build_grid_layout(height, width, grid_size, device)
    key = ("grid", height, width, to_2tuple(grid_size), device)
    layout = cache.get(key)
    if layout is None:
        with torch.inference_mode(False):  # see window_layout
            layout = _build_grid_layout(height, width, grid_size, device)
        if len(cache) > 16:
            cache.clear()
        cache[key] = layout
    return layout


def _build_grid_layout(
    height: int, width: int, grid_size: int | tuple[int, int], device: torch.device | None
) -> WindowLayout:
    gather, scatter = grid_token_index(height, width, grid_size, device)
    keep, pad_h, pad_w = grid_attention_mask(height, width, grid_size, device)
    unscatter = inverse_index(scatter, gather.numel())
    return WindowLayout(gather, scatter, unscatter, keep, bool(pad_h or pad_w))

"""Neighbourhoods of a channels-last token map ``(B, H, W, C)``: NATTEN's border rule, tiles.

Neighbourhood attention (Hassani et al., CVPR 2023) lets each query attend to a ``k x k``
neighbourhood of keys centred on it; near the border the neighbourhood slides inward so
that every query keeps ``k x k`` real keys (no zero padding). Dilated neighbourhood
attention (Hassani & Shi 2022) takes the neighbourhood inside the query's dilation group,
the positions congruent to it modulo the dilation ``d``: plain NA on each of the ``d``
interleaved sub-maps, each with its own length. Along one axis of length ``L``, query
``i`` in group ``r = i mod d`` (local index ``i // d``, group length ``ceil((L - r) / d)``)
starts its window at local ``clamp(i // d - k // 2, 0, L_r - k)``, as NATTEN's kernels do.
The relative position bias of a (query, key) pair is read at the local offset
``key - query + k - 1`` of a ``(2k - 1)`` table per axis. Every group needs ``L_r >= k``:
the layer pads a shorter map to ``k * d`` first (:func:`neighborhood_padding`).

Two forms of the same sets: :func:`neighborhood_index` (``(H, W, kh, kw)`` key per query,
for the plain path and for captures) and :func:`neighborhood_tiles` (tiles of queries
with the union of their windows as halo keys and a keep mask, for batched GEMMs: no
``N x N`` matrix and no ``k^2`` copies of every key). All indices are arithmetic on
``arange`` with Python-int sizes, so they trace, compile and export.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..tracing import building_graph
from .kernels.halo_attention import HaloAttention, halo_attention_applies
from .kernels.halo_attention import reference as halo_reference
from .windows import to_2tuple

__all__ = [
    "NeighborhoodTiles",
    "axis_window_start",
    "halo_attention",
    "neighborhood_bias_index",
    "neighborhood_index",
    "neighborhood_padding",
    "neighborhood_tiles",
]


def neighborhood_padding(
    height: int, width: int, kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
) -> tuple[int, int]:
    """``(pad_h, pad_w)``: rows and columns the official module adds (zeros, bottom/right,
    before the qkv projection) to an axis shorter than ``k * d``; ``(0, 0)`` otherwise."""
    (kh, kw), (dh, dw) = to_2tuple(kernel_size), to_2tuple(dilation)
    return max(0, kh * dh - height), max(0, kw * dw - width)


def _axis_groups(length: int, kernel: int, dilation: int, device: Any
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: its group ``r``, local index ``i // d`` and group length ``L_r``."""
    pos = torch.arange(length, device=device)
    group = pos % dilation
    group_len = (length - group + dilation - 1) // dilation
    if length < kernel * dilation:
        raise ValueError(
            f"neighborhood: an axis of length {length} is shorter than kernel * dilation "
            f"= {kernel * dilation}; pad it first (neighborhood_padding)")
    return group, pos // dilation, group_len


def axis_window_start(length: int, kernel_size: int, dilation: int = 1,
                      device: Any = None) -> Tensor:
    """``(L,)``: the first key position (in map coordinates) of every query's window along
    one axis; the window is ``start + d * arange(k)``. Needs ``L >= k * d``."""
    group, local, group_len = _axis_groups(length, kernel_size, dilation, device)
    start = torch.minimum((local - kernel_size // 2).clamp_min(0), group_len - kernel_size)
    return start * dilation + group


def neighborhood_index(
    height: int, width: int, kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1, device: Any = None,
) -> Tensor:
    """``(H, W, kh, kw)`` long: the flat key index (into ``H * W``) of neighbour ``(a, b)``
    of every query, in NATTEN's order (row-major over the window)."""
    (kh, kw), (dh, dw) = to_2tuple(kernel_size), to_2tuple(dilation)
    rows = axis_window_start(height, kh, dh, device)[:, None] + dh * torch.arange(
        kh, device=device)  # (H, kh)
    cols = axis_window_start(width, kw, dw, device)[:, None] + dw * torch.arange(
        kw, device=device)  # (W, kw)
    return rows[:, None, :, None] * width + cols[None, :, None, :]


def neighborhood_bias_index(
    height: int, width: int, kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1, device: Any = None,
) -> Tensor:
    """``(H, W, kh, kw)`` long: where each (query, neighbour) pair reads the flattened
    ``(2kh - 1) x (2kw - 1)`` relative position table (local offset key - query + k - 1)."""
    (kh, kw), (dh, dw) = to_2tuple(kernel_size), to_2tuple(dilation)

    def axis(length: int, k: int, d: int) -> Tensor:  # (L, k): offset + k - 1 per axis
        pos = torch.arange(length, device=device)
        start = axis_window_start(length, k, d, device)
        return (start - pos)[:, None] // d + torch.arange(k, device=device) + k - 1

    rows, cols = axis(height, kh, dh), axis(width, kw, dw)
    return rows[:, None, :, None] * (2 * kw - 1) + cols[None, :, None, :]


class NeighborhoodTiles(NamedTuple):
    """A map's queries cut into ``nT`` tiles of ``Q = tq_h * tq_w`` queries, each with the
    ``K = T_h * T_w`` halo keys that hold the union of its queries' windows.

    Tiles come sorted into ``groups`` of one keep pattern each (interior tiles share one;
    the border ones differ by where their windows stop), so one mask serves a group.

    * ``query`` ``(nT, Q)``, ``key`` ``(nT, K)``: flat token indices (into ``H * W``),
      row-major over the tile. ``groups``: the ``(first, stop)`` tile range of each group.
    * ``keep`` ``(P, Q, K)``, one per group: the key lies in the query's window (halo slots
      past the end of a short group repeat a real token and are never kept). ``bias``
      ``(P, Q, K)``: index into the flattened relative position table (0 where not kept).
    * ``output`` ``(H * W,)``: the slot (into ``nT * Q``) whose result each token takes;
      the last tile of a group overlaps its neighbour instead of holding padding.
      ``owner`` ``(nT * Q,)``: the token each slot writes, ``H * W`` for duplicates.
    """

    query: Tensor
    key: Tensor
    groups: tuple[tuple[int, int], ...]
    keep: Tensor
    bias: Tensor
    output: Tensor
    owner: Tensor


class _Axis(NamedTuple):
    query: list[list[int]]  # per tile: query positions
    key: list[list[int]]  # per tile: halo key positions
    pattern: list[int]  # per tile: its keep/offset pattern
    keep: list[list[list[bool]]]  # per pattern (tq, T)
    offset: list[list[list[int]]]  # per pattern (tq, T): local key - query + k - 1
    owns: list[list[bool]]  # per tile and slot: the slot holds its query's result
    tile_of: list[int]  # per position: the tile and slot holding its result
    slot_of: list[int]


def _axis_tiles(length: int, kernel: int, dilation: int, tile: int) -> _Axis:
    """One axis in Python integers (sizes are static: this traces as constants)."""
    lens = [(length - r + dilation - 1) // dilation for r in range(dilation)]
    if min(lens) < kernel:
        raise ValueError(
            f"neighborhood: an axis of length {length} is shorter than kernel * dilation "
            f"= {kernel * dilation}; pad it first (neighborhood_padding)")
    tq = min(tile, min(lens))
    halo = min(tq + kernel - 1, max(lens))
    ax = _Axis([], [], [], [], [], [], [0] * length, [0] * length)
    patterns: dict[tuple, int] = {}
    for r, n in enumerate(lens):
        first = len(ax.query)
        for u in range(-(-n // tq)):
            # tiles start at u * tq, the last one pulled back to end at the group's end
            j0 = min(u * tq, n - tq)
            q_local = range(j0, j0 + tq)
            starts = [min(max(j - kernel // 2, 0), n - kernel) for j in q_local]
            hs = min(starts[0], max(n - halo, 0))
            real = min(n - hs, halo)
            key = (tuple(s - hs for s in starts), tuple(j - hs for j in q_local), real)
            if key not in patterns:
                patterns[key] = len(ax.keep)
                ax.keep.append([[s <= m < s + kernel and m < real for m in range(halo)]
                                for s in key[0]])
                ax.offset.append([[m - j + kernel - 1 if s <= m < s + kernel and m < real
                                   else 0 for m in range(halo)]
                                  for s, j in zip(key[0], key[1], strict=True)])
            ax.pattern.append(patterns[key])
            ax.query.append([j * dilation + r for j in q_local])
            ax.key.append([(hs + m if hs + m < n else 0) * dilation + r for m in range(halo)])
            ax.owns.append([j >= u * tq for j in q_local])
        for j in range(n):
            u = j // tq
            ax.tile_of[j * dilation + r] = first + u
            ax.slot_of[j * dilation + r] = j - min(u * tq, n - tq)
    return ax


def neighborhood_tiles(
    height: int, width: int, kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1, tile: int | tuple[int, int] = 8, device: Any = None,
) -> NeighborhoodTiles:
    """:class:`NeighborhoodTiles` of an ``H x W`` map (each axis ``>= k * d``); ``tile``
    queries per axis (fewer where a dilation group is shorter)."""
    (kh, kw), (dh, dw), (th, tw) = to_2tuple(kernel_size), to_2tuple(dilation), to_2tuple(tile)
    rows, cols = _axis_tiles(height, kh, dh, th), _axis_tiles(width, kw, dw, tw)
    nr, nc = len(rows.query), len(cols.query)
    # tiles ordered by (row pattern, column pattern): each group is one contiguous range
    order = sorted((rows.pattern[a], cols.pattern[b], a, b) for a in range(nr)
                    for b in range(nc))
    groups, pats = [], []
    for i, (pr, pc, _, _) in enumerate(order):
        if not pats or pats[-1] != (pr, pc):
            pats.append((pr, pc))
            groups.append([i, i + 1])
        else:
            groups[-1][1] = i + 1

    def t(v: Any, dtype: torch.dtype = torch.long) -> Tensor:
        return torch.tensor(v, dtype=dtype, device=device)

    a = t([o[2] for o in order])
    b = t([o[3] for o in order])
    query = (t(rows.query)[a][:, :, None] * width + t(cols.query)[b][:, None, :]).flatten(1)
    key = (t(rows.key)[a][:, :, None] * width + t(cols.key)[b][:, None, :]).flatten(1)
    pr = t([p[0] for p in pats])
    pc = t([p[1] for p in pats])
    rkeep, ckeep = t(rows.keep, torch.bool)[pr], t(cols.keep, torch.bool)[pc]
    keep = (rkeep[:, :, None, :, None] & ckeep[:, None, :, None, :]).flatten(3).flatten(1, 2)
    roff, coff = t(rows.offset)[pr], t(cols.offset)[pc]
    bias = (roff[:, :, None, :, None] * (2 * kw - 1) + coff[:, None, :, None, :])
    bias = torch.where(keep, bias.flatten(3).flatten(1, 2), 0)
    owns = (t(rows.owns, torch.bool)[a][:, :, None]
            & t(cols.owns, torch.bool)[b][:, None, :]).reshape(-1)
    owner = torch.where(owns, query.reshape(-1), height * width)
    rank = torch.empty(nr * nc, dtype=torch.long, device=device)
    rank[a * nc + b] = torch.arange(nr * nc, device=device)
    Q, tqw = query.shape[1], len(cols.query[0])
    tile_id = rank[t(rows.tile_of)[:, None] * nc + t(cols.tile_of)[None, :]]
    output = (tile_id * Q + t(rows.slot_of)[:, None] * tqw + t(cols.slot_of)[None, :])
    return NeighborhoodTiles(query, key, tuple(tuple(g) for g in groups), keep, bias,
                             output.reshape(-1), owner)


def cached_tiles(
    cache: dict[Any, NeighborhoodTiles] | None, height: int, width: int,
    kernel_size: tuple[int, int], dilation: tuple[int, int], tile: tuple[int, int],
    device: Any,
) -> NeighborhoodTiles:
    """:func:`neighborhood_tiles`, kept in a layer's ``cache`` (16 sizes at most) except
    while a graph is being built, where the graph computes it; built outside
    ``inference_mode`` so one entry serves every grad mode."""
    if cache is None or building_graph():
        return neighborhood_tiles(height, width, kernel_size, dilation, tile, device)
    key = (height, width, kernel_size, dilation, tile, device)
    tiles = cache.get(key)
    if tiles is None:
        with torch.inference_mode(False):
            tiles = neighborhood_tiles(height, width, kernel_size, dilation, tile, device)
        if len(cache) > 16:
            cache.clear()
        cache[key] = tiles
    return tiles


def halo_attention(rows: Tensor, mask: Tensor, index: tuple[Tensor, Tensor, Tensor],
                   shape: tuple[int, int, int, int, int], scale: float) -> Tensor:
    """``(nT, B, h, Q, d)``: each tile's queries against its halo keys and values, gathered
    from ``rows`` ``(R, d)`` by ``index`` (q, k, v: ``(nT, B*h*Q | B*h*K)``), under the
    finite additive ``mask`` ``(nT, 1 | B, 1 | h, Q, K)``. Eager CPU (no dropout): the
    :class:`~.kernels.halo_attention.HaloAttention` kernel; elsewhere its plain twin."""
    if halo_attention_applies(rows, 0.0):
        return HaloAttention.apply(rows, mask, *index, shape, scale)
    return halo_reference(rows, mask, index, shape, scale)

"""Tiled inference: any image size at the memory of one batch of tiles.

:func:`denoise_tiled` cuts the image into overlapping tiles, runs them in small batches
and blends them with weights that fall off linearly across the overlap. The model pads
each tile to a multiple of 16 itself (:class:`~spatial_attention.models.nbnet.NBNet`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import UsageError

__all__ = ["denoise_tiled", "tile_starts"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)``, adjacent ones
    overlapping by at least ``overlap``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, device: torch.device) -> Tensor:
    """Blend weights along one axis of a tile: rising over ``overlap`` pixels at each end."""
    if overlap <= 0 or length <= 1:
        return torch.ones(length, device=device)
    i = torch.arange(length, device=device, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


@torch.no_grad()
def denoise_tiled(
    model: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 4,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> Tensor:
    """Run ``model`` over ``image`` ``(C, H, W)`` or ``(1, C, H, W)`` tile by tile.

    Tiles of ``tile x tile`` (the whole image when smaller) overlap by ``overlap``
    pixels and are blended with linear ramps; ``batch`` tiles run per call. Peak memory
    is that of one batch of tiles plus two image-sized float32 buffers. ``dtype``
    (e.g. ``torch.bfloat16``) runs the model under autocast on the image's device.
    ``channels_last`` hands the model its tiles in that memory format (the faster one
    for the CPU convolutions; ``benchmarks/denoise.md``), else contiguous NCHW.
    Returns ``image``'s shape in float32.
    """
    if tile < 16 or overlap < 0 or overlap >= tile or batch < 1:
        raise UsageError(f"denoise: need tile >= 16, 0 <= overlap < tile and batch >= 1; "
                         f"got tile={tile}, overlap={overlap}, batch={batch}")
    squeeze = image.dim() == 3
    img = image[None] if squeeze else image
    if img.dim() != 4 or img.shape[0] != 1:
        raise UsageError(f"denoise: expected one image (C, H, W), got {tuple(image.shape)}")
    img = img.float()
    _, C, H, W = img.shape
    th, tw = min(tile, H), min(tile, W)
    boxes = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
    weight = _ramp(th, overlap if H > th else 0, img.device)[:, None] * \
        _ramp(tw, overlap if W > tw else 0, img.device)[None, :]  # (th, tw)
    out = torch.zeros_like(img[0])
    norm = torch.zeros(1, H, W, device=img.device)
    from tqdm import tqdm

    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        tiles = torch.stack([img[0, :, y:y + th, x:x + tw] for y, x in chunk])
        if channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        if dtype is not None:
            with torch.autocast(img.device.type, dtype=dtype):
                pred = model(tiles).float()
        else:
            pred = model(tiles).float()
        for (y, x), p in zip(chunk, pred, strict=True):
            out[:, y:y + th, x:x + tw] += p * weight
            norm[:, y:y + th, x:x + tw] += weight
        bar.update(len(chunk))
    bar.close()
    out = out / norm
    return out if squeeze else out[None]

"""Relative position bias for windowed attention (Swin, Liu et al. ICCV 2021, Eq. 4).

Inside an ``Mh x Mw`` window the offset between two tokens ranges over
``(2Mh - 1) x (2Mw - 1)`` values; a learned table of that many rows (one column per
head) is indexed by the offset and added to the attention scores: ``softmax(QK^T/sqrt(d)
+ B) V``. The index is fixed, so it is computed once and stored as a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .windows import to_2tuple

__all__ = ["relative_position_index", "relative_position_bias"]


def relative_position_index(
    window_size: int | tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """``(N, N)`` long index into a ``((2Mh-1)(2Mw-1), heads)`` table, ``N = Mh * Mw``.

    Same numbering as the official Swin code, so official tables load unchanged:
    ``(dy + Mh - 1) * (2Mw - 1) + (dx + Mw - 1)`` for the offset ``(dy, dx)`` of query
    minus key.
    """
    mh, mw = to_2tuple(window_size)
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(mh, device=device), torch.arange(mw, device=device), indexing="ij"
        )
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + mh - 1) * (2 * mw - 1) + (rel[1] + mw - 1)


def relative_position_bias(table: Tensor, index: Tensor) -> Tensor:
    """Gather ``table`` (``(T, heads)``) at ``index`` (``(N, N)``) -> ``(heads, N, N)``."""
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()

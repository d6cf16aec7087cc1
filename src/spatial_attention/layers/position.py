"""Learned relative position bias for windowed token attention (Swin, Eq. 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..functional.position import relative_position_bias, relative_position_index
from ..functional.windows import to_2tuple


class RelativePositionBias(nn.Module):
    """``(heads, N, N)`` bias for an ``Mh x Mw`` window from a learned table.

    The table has ``(2Mh - 1)(2Mw - 1)`` rows and one column per head, initialised with
    a truncated normal of std 0.02 as in the official Swin code; parameter and buffer
    names (``relative_position_bias_table``, ``relative_position_index``) match it so
    official and timm checkpoints load without renaming.
    """

    def __init__(self, window_size: int | tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size)
        check_positive("relative_position_bias", window=min(self.window_size), num_heads=num_heads)
        mh, mw = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * mh - 1) * (2 * mw - 1), num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size), persistent=True
        )

    def forward(self) -> Tensor:
        return relative_position_bias(
            self.relative_position_bias_table, self.relative_position_index
        )

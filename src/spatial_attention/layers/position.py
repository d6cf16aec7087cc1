"""Position encodings for token attention: Swin's relative position bias (Eq. 4) and the
conditional position encoding generator (PEG) of CPVT / Twins."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..functional.position import relative_position_bias, relative_position_index
from ..functional.windows import to_2tuple
from ..registry import register
from .base import AttentionModule


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


@register(
    "peg",
    family="token_local",
    layout="tokens",
    paper="Chu et al., Conditional Positional Encodings for Vision Transformers (PEG, "
    "Sec. 3.2), as used once per stage in Twins",
    year=2023,
    cost="18·B·H·W·C (3x3 depthwise conv) + B·H·W·C (residual)",
    captures="(B, 1, H, W) mean magnitude of the position code added at each token",
)
class PositionEncodingGenerator(AttentionModule):
    """Conditional position encoding: ``x + DWConv3x3(x)`` on a ``(B, H, W, C)`` map.

    Chu et al., *Conditional Positional Encodings for Vision Transformers* (CPVT), ICLR 2023,
    Sec. 3.2; Twins applies it after the first block of every stage. The code comes from the
    tokens' own neighbourhood, so it follows the input size (no table to interpolate), and
    zero padding at the borders tells tokens where they are.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Args: ``dim`` ``C``;
    ``num_heads`` accepted and ignored (so the token-mixer factories can build it).
    Cost: ``18·B·H·W·C`` (3x3 depthwise conv) ``+ B·H·W·C`` (residual).
    Parameter names ``proj.0.weight/bias`` are Twins' and timm's ``PosConv``.
    attn_impl: ``auto`` (one depthwise ``conv2d`` on the channels-last map), ``explicit`` (the
    sum of nine shifted copies of the zero-padded map, each scaled per channel by its tap);
    records the code's mean magnitude per token.
    """

    layout = "tokens"

    def __init__(self, dim: int, num_heads: int | None = None,
                 attn_impl: str | None = None) -> None:
        # num_heads is accepted (and ignored) so the token-mixer factories can build it
        super().__init__(attn_impl=attn_impl)
        check_positive("peg", dim=dim)
        self.dim = dim
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        conv = self.proj[0]
        fmap = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory
        if self.use_fused:
            code = conv(fmap)
        else:
            H, W = fmap.shape[-2:]
            padded = torch.nn.functional.pad(fmap, (1, 1, 1, 1))
            taps = conv.weight[:, 0]  # (C, 3, 3)
            code = conv.bias.view(1, -1, 1, 1).expand_as(fmap)
            for i in range(3):
                for j in range(3):
                    tap = taps[:, i, j].view(1, -1, 1, 1)
                    code = code + tap * padded[..., i : i + H, j : j + W]
            self.record(code.abs().mean(1, keepdim=True))
        return x + code.permute(0, 2, 3, 1)

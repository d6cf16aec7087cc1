"""EMA on ``(B, C, H, W)``: efficient multi-scale attention with cross-spatial learning.

Ouyang et al., ICASSP 2023. The channels are split into groups (sub-features); within
each group a 1x1 branch encodes the rows and columns (coordinate-attention style, shared
1x1 convolution, GroupNorm) and a 3x3 branch encodes the local neighbourhood. Each
branch's globally pooled, softmax-normalised channel descriptor then weighs the *other*
branch's map (cross-spatial learning), and the sum of the two products is one spatial
gate per group.

Parameter names follow the official ``EMA_attention_module`` (``gn``, ``conv1x1``,
``conv3x3``; ``factor`` is the number of groups), so its state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["EMA"]


@register(
    "ema",
    family="channel_spatial",
    layout="map",
    paper="Ouyang et al., Efficient Multi-Scale Attention Module with Cross-Spatial Learning",
    year=2023,
    cost="18·B·C²·H·W/G (3x3 conv) + 2·B·C²·(H+W)/G (1x1 conv) + 4·B·C·H·W (cross "
         "matmuls) + 12·B·C·H·W (pools, gates, GroupNorm)",
    captures="(B, G, H, W) spatial gate of each channel group",
)
class EMA(AttentionModule):
    """Efficient Multi-scale Attention (Ouyang, He, Zhang, Lv, Zhong, Luo, Jiang, Shao;
    ICASSP 2023, Sec. 2, Fig. 3).

    Groups ``x_g`` of ``C/G`` channels. 1x1 branch: ``[h; w] = conv1x1([AvgPool_W(x_g);
    AvgPool_H(x_g)])`` (the shared encoding of coordinate attention),
    ``x1 = GN(x_g * sigmoid(h) * sigmoid(w))``; 3x3 branch: ``x2 = conv3x3(x_g)``.
    Cross-spatial learning: ``A = softmax(AvgPool(x1)) · x2 + softmax(AvgPool(x2)) · x1``
    (channel softmax, ``(1, C/G) @ (C/G, HW)``), ``y_g = x_g * sigmoid(A)``.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; records the ``(B, G, H, W)`` gates.
    Arguments: ``factor=32`` (the number of groups G, official default).
    Cost: ``18·B·C²·H·W/G + 2·B·C²·(H+W)/G + 16·B·C·H·W``.
    Deviations: where ``channels < factor`` the groups are clamped to ``channels`` (one
    channel each; the official code asserts); a ``channels`` that the groups do not
    divide is a ValueError (the official reshape would silently mix groups or fail).
    The official ``c2`` argument (unused there) is dropped. GroupNorm has one channel per
    group, as in the official code (``GroupNorm(C/G, C/G)``), so ``AvgPool(x1)`` equals
    the GroupNorm bias exactly; the fast path uses that instead of pooling ``x1`` and runs
    the two cross products as batched matmuls.
    ``attn_impl``: auto (as above), explicit (Fig. 3 step by step).
    """

    layout = "map"

    def __init__(self, channels: int, factor: int = 32, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("ema", channels=channels, factor=factor)
        groups = min(factor, channels)
        if channels % groups:
            raise ValueError(
                f"ema: channels {channels} is not divisible by factor {factor} (the number "
                f"of channel groups); pick a factor that divides it")
        self.channels, self.factor, self.groups = channels, factor, groups
        cg = channels // groups
        self.gn = nn.GroupNorm(cg, cg)
        self.conv1x1 = nn.Conv2d(cg, cg, kernel_size=1)
        self.conv3x3 = nn.Conv2d(cg, cg, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        b, c, h, w = x.shape
        g = self.groups
        group_x = x.reshape(b * g, c // g, h, w)  # (BG, C/G, H, W)
        if self.impl == "explicit":
            return self._explicit(group_x).reshape(b, c, h, w)
        # 1x1 branch: row and column descriptors through one shared 1x1 conv
        x_h = group_x.mean(3, keepdim=True)  # (BG, C/G, H, 1)
        x_w = group_x.mean(2, keepdim=True).transpose(2, 3)  # (BG, C/G, W, 1)
        a_h, a_w = self.conv1x1(torch.cat([x_h, x_w], 2)).sigmoid().split([h, w], 2)
        x1 = self.gn(group_x * a_h * a_w.transpose(2, 3))  # (BG, C/G, H, W)
        x2 = self.conv3x3(group_x)  # (BG, C/G, H, W)
        # one channel per GroupNorm group: each channel of x1 averages to its bias
        p1 = torch.softmax(self.gn.bias, 0).expand(b * g, 1, c // g)  # (BG, 1, C/G)
        p2 = torch.softmax(x2.mean((2, 3)), 1).unsqueeze(1)  # (BG, 1, C/G)
        attn = torch.baddbmm(torch.bmm(p2, x1.flatten(2)), p1, x2.flatten(2))  # (BG, 1, HW)
        return (group_x * attn.view(b * g, 1, h, w).sigmoid()).reshape(b, c, h, w)

    def _explicit(self, group_x: Tensor) -> Tensor:
        bg, cg, h, w = group_x.shape
        # 1x1 branch (Fig. 3, left): X Avg Pool and Y Avg Pool, concat, 1x1 conv, split
        x_h = F.adaptive_avg_pool2d(group_x, (h, 1))  # (BG, C/G, H, 1)
        x_w = F.adaptive_avg_pool2d(group_x, (1, w)).permute(0, 1, 3, 2)  # (BG, C/G, W, 1)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))  # (BG, C/G, H+W, 1)
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(group_x * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
        # 3x3 branch (Fig. 3, right)
        x2 = self.conv3x3(group_x)
        # cross-spatial learning: each branch's pooled channel softmax weighs the other
        x11 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).reshape(bg, 1, cg), -1)  # (BG, 1, C/G)
        x12 = x2.reshape(bg, cg, h * w)  # (BG, C/G, HW)
        x21 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).reshape(bg, 1, cg), -1)
        x22 = x1.reshape(bg, cg, h * w)
        weights = (torch.matmul(x11, x12) + torch.matmul(x21, x22)).reshape(bg, 1, h, w)
        gate = weights.sigmoid()  # (BG, 1, H, W)
        self.record(gate.reshape(-1, self.groups, h, w))
        return group_x * gate

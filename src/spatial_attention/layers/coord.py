"""Coordinate attention on ``(B, C, H, W)`` (Hou, Zhou, Feng, CVPR 2021).

Channel attention that keeps one coordinate: the map is pooled along W (one descriptor
per row) and along H (one per column), both strips go through one shared 1x1 bottleneck,
and two 1x1 convolutions turn them back into per-channel gates along H and along W. Their
outer product is a (C, H, W) weight, applied without ever being formed on the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["CoordinateAttention"]


@register(
    "coord",
    family="channel_spatial",
    layout="map",
    paper="Hou et al., Coordinate Attention for Efficient Mobile Network Design (Eq. 2-7)",
    year=2021,
    cost="2·B·C·H·W (pools) + 6·B·C·mip·(H+W) (1x1 convs) + 2·B·C·H·W (scale)",
    captures="(B, C, H, W) weights g_h ⊗ g_w",
)
class CoordinateAttention(AttentionModule):
    """Coordinate attention (Hou, Zhou, Feng, CVPR 2021): gates along H and along W.

    Hou et al., *Coordinate Attention for Efficient Mobile Network Design*, CVPR 2021.
    Eq. 2-3: ``z_h = mean_W(x)`` ``(B, C, H)``, ``z_w = mean_H(x)`` ``(B, C, W)``; Eq. 4:
    ``f = h_swish(BN(F1([z_h, z_w])))`` ``(B, mip, H + W)``; Eq. 5-6: ``g_h = sigmoid(F_h(f_h))``,
    ``g_w = sigmoid(F_w(f_w))``; Eq. 7: ``y = x * g_h * g_w``. ``h_swish(u) = u·relu6(u+3)/6``.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``reduction`` ``r = 32``
    (official), bottleneck ``mip = max(8, C // r)``. Parameters and names as the official
    ``CoordAtt``: ``conv1`` (C -> mip, biased), ``bn1`` (eps 1e-5), ``conv_h``, ``conv_w``
    (mip -> C, biased), so its state dict loads as is.
    Cost: ``2·B·C·H·W`` (pools) ``+ 6·B·C·mip·(H+W)`` (1x1 convs) ``+ 2·B·C·H·W`` (scale).
    Deviation: no separate ``oup`` (the official gate only works with ``oup == inp``).
    attn_impl: ``auto`` (strips pooled by ``mean``, ``hardswish``, the two gates applied in
    turn, in place when no gradient is needed) and ``explicit`` (Eq. 2-7 written out, the
    ``(B, C, H, W)`` weight formed); both record ``g_h ⊗ g_w``.
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 32, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("coord", channels=channels, reduction=reduction)
        self.channels, self.reduction = channels, reduction
        mip = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv_h = nn.Conv2d(mip, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(mip, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        H, W = x.shape[2], x.shape[3]
        # both strips as one (B, C, H + W, 1) column, so the bottleneck and its BN see them
        # together, as the official code does
        z_h = x.mean(3, keepdim=True)  # Eq. 2: (B, C, H, 1)
        z_w = x.mean(2, keepdim=True).transpose(2, 3)  # Eq. 3: (B, C, W, 1)
        u = self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2)))  # (B, mip, H + W, 1)
        if self.impl == "explicit":
            f = u * torch.clamp(u + 3, 0, 6) / 6  # Eq. 4, h_swish
            f_h, f_w = torch.split(f, [H, W], dim=2)  # (B, mip, H, 1), (B, mip, W, 1)
            g_h = torch.sigmoid(self.conv_h(f_h))  # Eq. 5: (B, C, H, 1)
            g_w = torch.sigmoid(self.conv_w(f_w)).transpose(2, 3)  # Eq. 6: (B, C, 1, W)
            weights = g_h * g_w  # (B, C, H, W)
            self.record(weights)
            return x * weights  # Eq. 7
        f_h, f_w = torch.split(F.hardswish(u), [H, W], dim=2)
        g_h = torch.sigmoid(self.conv_h(f_h))  # (B, C, H, 1)
        g_w = torch.sigmoid(self.conv_w(f_w)).transpose(2, 3)  # (B, C, 1, W)
        # no record here: capturing runs the explicit path, and the product would cost a map
        if torch.is_grad_enabled() and (x.requires_grad or g_h.requires_grad):
            return x * g_w * g_h
        # without autograd the second product can overwrite the first: one map-sized buffer
        return (x * g_w).mul_(g_h)

"""CPMS on ``(B, C, H, W)``: multi-scale channel attention, then multi-scale spatial attention.

CPMS was published as an upgrade of CBAM for YOLOv8 (road-defect detection, mAP50 0.80
-> 0.874 against CBAM's 0.822) as "multi-scale channel attention + multi-scale
depthwise-separable-convolution spatial attention", without code and without equations.
This module is *our reconstruction* from that description; what was chosen and why:

* **Multi-scale channel attention** is MS-CAM (Dai et al., Attentional Feature Fusion,
  WACV 2021: a pointwise-bottleneck channel context at the pixel scale plus one at the
  global scale, summed before the sigmoid), the module that goes by this name in the
  YOLO literature, with CBAM's two changes kept: one MLP shared by all scales, and a
  max-pooled global descriptor next to the average-pooled one (``r = 16`` as in CBAM; no
  BatchNorm, as in CBAM's MLP). The pixel scale is what CBAM lacks: a defect covering a
  few pixels moves its own channel gate, where a global descriptor dilutes it.
* **Multi-scale depthwise-separable spatial attention** is CPCA's spatial branch (a 5x5
  depthwise conv, three depthwise strip pairs 1x7/7x1, 1x11/11x1, 1x21/21x1, summed: the
  depthwise half; a 1x1 conv ``conv``: the pointwise half; ``layers/cpca.py``'s
  :class:`~.cpca.DepthwisePyramid`), applied to the channel prior as in CPCA, so the
  spatial map is per channel.
* As a drop-in for CBAM it stays a pure gate: both maps are sigmoids and the output is
  the input rescaled, with no input/output projection (CPCA's shared 1x1 and GELU belong
  to CPCANet's block, not to the attention CBAM is compared with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .cpca import DepthwisePyramid

__all__ = ["ChannelPriorMultiScaleAttention"]


class _MultiScaleChannelGate(nn.Module):
    """``sigmoid(MLP(X) + MLP(AvgPool X) + MLP(MaxPool X))``: one shared MLP, three scales.

    ``MLP = fc2 . ReLU . fc1`` with biased 1x1 convs ``C -> C/r -> C``. The pixel term
    gives a ``(B, C, H, W)`` gate; the pooled terms broadcast over it.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: Tensor, fused: bool) -> Tensor:
        if not fused:
            local = self.mlp(x)  # (B, C, H, W)
            global_avg = self.mlp(F.adaptive_avg_pool2d(x, 1))  # (B, C, 1, 1)
            global_max = self.mlp(F.adaptive_max_pool2d(x, 1))
            return torch.sigmoid(local + global_avg + global_max)
        # fc1 is affine, so fc1(mean(x)) == mean(fc1(x)): the average-pooled term reuses
        # the pixel term's hidden map; fc2 is affine too, so the three hidden maps are
        # summed first and go through fc2 once (its bias three times).
        hidden = self.fc1(x)  # (B, C/r, H, W)
        pooled = torch.cat([hidden.mean((2, 3), keepdim=True),
                            self.fc1(x.amax((2, 3), keepdim=True))], 3)  # (B, C/r, 1, 2)
        mixed = F.relu(hidden) + F.relu(pooled).sum(3, keepdim=True)
        return torch.sigmoid(F.conv2d(mixed, self.fc2.weight, 3 * self.fc2.bias))


@register(
    "cpms",
    family="channel_spatial",
    layout="map",
    paper="CPMS: multi-scale channel + multi-scale depthwise-separable spatial attention, "
    "a CBAM upgrade for YOLOv8 (no public code; our reconstruction on MS-CAM and CPCA)",
    cost="4·B·C²·H·W/r (pixel MLP) + 2·B·C·H·W·(25 + 2·(7+11+21)) (depthwise) "
    "+ 2·B·C²·H·W (pointwise) + B·C·H·W·4 (gates)",
    captures="(B, C, H, W) channel gate, then (B, C, H, W) spatial gate",
)
class ChannelPriorMultiScaleAttention(DepthwisePyramid):
    """CPMS, reconstructed: a multi-scale channel gate, then a CPCA-style spatial gate.

    The published description (a CBAM upgrade for YOLOv8) names two parts and no equations,
    so both are our choices, not the authors' code (the reasons: module docstring)::

        Mc = sigmoid(MLP(X) + MLP(AvgPool X) + MLP(MaxPool X))     (B, C, H, W), MS-CAM + CBAM
        F  = Mc * X                                                 channel prior
        D  = DW5x5(F);  S = D + sum_k DW_kx1(DW_1xk(D)),  k in (7, 11, 21)      CPCA's pyramid
        Ms = sigmoid(PW(S))                                         (B, C, H, W)
        y  = Ms * F

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W``. Args: ``channels``,
    ``reduction`` 16 (as CBAM), ``kernel_sizes`` ``(7, 11, 21)`` (strip pairs).
    Cost: ``4·B·C²·H·W/r`` (pixel MLP) ``+ 2·B·C·H·W·(25 + 2·(7+11+21))`` (depthwise)
    ``+ 2·B·C²·H·W`` (pointwise) ``+ 4·B·C·H·W`` (gates).
    Parameter names: ``ca.fc1``, ``ca.fc2`` (biased 1x1 convs ``C -> C/r -> C``),
    ``dconv5_5``, ``dconv1_k``/``dconvk_1``, ``conv``; hidden width ``max(1, C // reduction)``.
    attn_impl: ``auto`` (one pixel MLP for the three terms: ``fc1``, ``fc2`` are affine, so
    the average-pooled term reuses the pixel term's hidden map and ``fc2`` runs once on the
    summed hidden maps), ``explicit`` (the three MLPs of the formula); the pyramid has one
    path. Records the channel gate, then the spatial gate, both ``(B, C, H, W)``; measured in
    benchmarks/conv_attention.md.
    """

    layout = "map"

    def __init__(
        self, channels: int, reduction: int = 16, kernel_sizes: Sequence[int] = (7, 11, 21),
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        self._build_gated_pyramid("cpms", channels, reduction, kernel_sizes,
                                  _MultiScaleChannelGate)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        channel_gate = self.ca(x, self.use_fused)  # (B, C, H, W)
        prior = channel_gate * x
        spatial_gate = torch.sigmoid(self.conv(self.pyramid(prior)))  # (B, C, H, W)
        self.record(channel_gate)
        self.record(spatial_gate)
        return spatial_gate * prior

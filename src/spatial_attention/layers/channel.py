"""Channel attention on ``(B, C, H, W)``: Squeeze-and-Excitation and ECA.

Both squeeze the map to one descriptor per channel by global average pooling, turn it
into a gate in (0, 1) per channel, and rescale the input with it. They differ in how the
channels interact: SE through a bottleneck MLP, ECA through a 1-D convolution across
neighbouring channels, with no dimensionality reduction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["SqueezeExcite", "EfficientChannelAttention", "eca_kernel_size"]


@register(
    "se",
    family="channel",
    layout="map",
    paper="Hu et al., Squeeze-and-Excitation Networks (Eq. 2-4)",
    year=2018,
    cost="B·C·H·W (pool) + 4·B·C²/r (MLP) + B·C·H·W (scale)",
    captures="(B, C, 1, 1) channel weights",
)
class SqueezeExcite(AttentionModule):
    """Squeeze-and-Excitation (Hu et al. CVPR 2018 / TPAMI 2020, Eq. 2-4).

    Hu et al., *Squeeze-and-Excitation Networks*, CVPR 2018 / TPAMI 2020, Eq. 2-4:
    ``s = sigmoid(W2 relu(W1 GAP(x)))``, ``y = s * x`` with ``W1: C -> C/r``, ``W2: C/r -> C``.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``reduction`` ``r = 16``
    (paper). Cost: ``B·C·H·W`` (pool) ``+ 4·B·C²/r`` (MLP) ``+ B·C·H·W`` (scale).
    Biased fully-connected layers as in the official (Caffe) release; parameter names
    ``fc.0`` / ``fc.2`` follow the common PyTorch port. Deviation: hidden width
    ``max(1, C // r)``, so narrow maps (C < r) work where the official layer would be empty.
    attn_impl: ``auto`` and ``explicit`` are one path (no attention matrix, nothing to fuse
    beyond the pooled ``mean``, channels_last friendly); records the ``(B, C, 1, 1)`` weights.
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 16, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("se", channels=channels, reduction=reduction)
        self.channels = channels
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        weights = torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]  # (B, C, 1, 1)
        self.record(weights)
        return x * weights


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size (Wang et al. 2020, Eq. 12): ``|log2(C)/gamma + b/gamma|_odd``."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register(
    "eca",
    family="channel",
    layout="map",
    paper="Wang et al., ECA-Net: Efficient Channel Attention for Deep CNNs (Eq. 12, 14)",
    year=2020,
    cost="B·C·H·W (pool) + 2·B·C·k (1-D conv) + B·C·H·W (scale)",
    captures="(B, C, 1, 1) channel weights",
)
class EfficientChannelAttention(AttentionModule):
    """ECA (Wang et al. CVPR 2020): a ``k``-tap 1-D conv across pooled channels.

    Wang et al., *ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks*, CVPR 2020: ``w = sigmoid(conv1d_k(GAP(x)))``, ``y = w * x``.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``kernel_size`` (odd; None:
    ``k`` adapts to ``C`` by Eq. 12 with ``gamma``, ``b``, the paper's 2 and 1).
    Cost: ``B·C·H·W`` (pool) ``+ 2·B·C·k`` (1-D conv) ``+ B·C·H·W`` (scale).
    The conv has no bias and pads ``(k - 1) // 2``, as in the official code (parameter name
    ``conv.weight``). attn_impl: ``auto`` and ``explicit`` are one path; records the
    ``(B, C, 1, 1)`` weights.
    """

    layout = "map"

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: int = 2, b: int = 1,
                 attn_impl: str | None = None):
        super().__init__(attn_impl=attn_impl)
        check_positive("eca", channels=channels, gamma=gamma)
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        check_positive("eca", kernel_size=k)
        if k % 2 == 0:
            raise ValueError(f"eca: kernel_size must be odd, got {k}")
        self.channels, self.kernel_size = channels, k
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        pooled = x.mean((2, 3))[:, None, :]  # (B, 1, C): channels become a 1-D signal
        weights = torch.sigmoid(self.conv(pooled)).transpose(1, 2)[..., None]  # (B, C, 1, 1)
        self.record(weights)
        return x * weights

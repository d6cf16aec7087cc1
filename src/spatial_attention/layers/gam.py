"""GAM on ``(B, C, H, W)``: channel and spatial attention without pooling (Liu et al. 2021).

Liu, Shao, Hoffmann, *Global Attention Mechanism: Retain Information to Enhance
Channel-Spatial Interactions* (arXiv 2112.05561) keeps CBAM's order (channel, then
spatial) but pools nothing: the channel gate is an MLP applied at every pixel (a 3-D
permutation to channels-last, so each pixel's channel vector is one token), the spatial
gate two 7x7 convolutions through a ``C/r`` bottleneck. Both gates are full-size
``(B, C, H, W)`` tensors. The cost is convolution, ``2·49·B·H·W·C²/r`` FLOPs per 7x7 layer,
so the fast path is about feeding the convolution and matmul kernels well (no permute
copies, BatchNorm folded into the convolutions in eval, activations in place); under
``torch.autocast`` the convolutions and the MLP run in bfloat16 / float16.

Parameter names: ``channel_attention.mlp.{0,2}``, ``spatial_attention.{conv1,bn1,conv2,bn2}``;
:func:`convert_common_gam_keys` maps the widely copied ``GAM_Attention`` layout
(``channel_attention.{0,2}``, ``spatial_attention.{0,1,3,4}``) onto them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..functional.gates import channel_shuffle
from ..registry import register
from .base import AttentionModule

__all__ = ["GAM", "GAMChannelAttention", "GAMSpatialAttention", "convert_common_gam_keys"]


class GAMChannelAttention(AttentionModule):
    """GAM's channel sub-module (Liu et al. 2021, Sec. 3, Fig. 2): a per-pixel MLP gate.

    ``Mc = sigmoid(P^-1(MLP(P(x))))`` with ``P`` the permutation ``(B, C, H, W) ->
    (B, H, W, C)`` and ``MLP = Linear(C, C/r), ReLU, Linear(C/r, C)`` (biased, ``r = 4``);
    ``y = Mc * x``. The fast path runs the two layers as batched matrix products on the
    map's own layout (no permute copy). Records the ``(B, C, H, W)`` channel gate.
    """

    layout = "map"

    def __init__(self, channels: int, rate: int = 4, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("gam", channels=channels, rate=rate)
        self.channels = channels
        hidden = max(1, channels // rate)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def _logits_fused(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C), already contiguous
            z = F.linear(F.relu_(F.linear(tokens, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
            return z.permute(0, 3, 1, 2)  # a view: channels_last again
        B, C, H, W = x.shape
        w1, w2 = fc1.weight.expand(B, -1, -1), fc2.weight.expand(B, -1, -1)
        h = torch.baddbmm(fc1.bias[:, None], w1, x.reshape(B, C, H * W))  # (B, C/r, HW)
        z = torch.baddbmm(fc2.bias[:, None], w2, F.relu_(h))  # (B, C, HW)
        return z.view(B, C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.use_fused:
            return x * torch.sigmoid_(self._logits_fused(x))
        weights = torch.sigmoid(self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        self.record(weights)  # (B, C, H, W)
        return x * weights


class GAMSpatialAttention(AttentionModule):
    """GAM's spatial sub-module (Liu et al. 2021, Sec. 3, Fig. 3): two 7x7 convolutions.

    ``Ms = sigmoid(BN(conv7x7(ReLU(BN(conv7x7(x))))))`` through ``C -> C/r -> C``
    (``r = 4``), ``y = Ms * x``. With ``groups > 1`` both convolutions are group
    convolutions and a channel shuffle sits between them (the paper's ResNet-50 variant,
    ShuffleNet's placement). The fast path folds BatchNorm into the convolutions in eval.
    Records the ``(B, C, H, W)`` spatial gate.
    """

    layout = "map"

    def __init__(self, channels: int, rate: int = 4, groups: int = 1, kernel_size: int = 7,
                 attn_impl: str | None = None):
        super().__init__(attn_impl=attn_impl)
        check_positive("gam", channels=channels, rate=rate, groups=groups,
                       kernel_size=kernel_size)
        hidden = max(1, channels // rate)
        if channels % groups or hidden % groups:
            raise ValueError(
                f"gam: channels {channels} and hidden width {hidden} (channels // rate) must "
                f"both be divisible by groups {groups}"
            )
        if kernel_size % 2 == 0:
            raise ValueError(f"gam: kernel_size must be odd, got {kernel_size}")
        self.channels, self.groups = channels, groups
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size, padding=pad, groups=groups)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size, padding=pad, groups=groups)
        self.bn2 = nn.BatchNorm2d(channels)

    def _shuffle(self, h: Tensor) -> Tensor:
        return channel_shuffle(h, self.groups) if self.groups > 1 else h

    def _logits_fused(self, x: Tensor) -> Tensor:
        if self.bn1.training or self.bn1.running_mean is None or self.bn2.running_mean is None:
            h = F.relu_(self.bn1(self.conv1(x)))  # batch statistics: cannot fold
            return self.bn2(self.conv2(self._shuffle(h)))
        h = F.relu_(_conv_bn_eval(x, self.conv1, self.bn1))
        return _conv_bn_eval(self._shuffle(h), self.conv2, self.bn2)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.use_fused:
            return x * torch.sigmoid_(self._logits_fused(x))
        h = torch.relu(self.bn1(self.conv1(x)))  # (B, C/r, H, W)
        weights = torch.sigmoid(self.bn2(self.conv2(self._shuffle(h))))
        self.record(weights)  # (B, C, H, W)
        return x * weights


def _conv_bn_eval(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """``bn(conv(x))`` with running statistics, as one convolution with folded weights."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * scale + (bn.bias if bn.bias is not None else 0)
    return F.conv2d(x, conv.weight * scale[:, None, None, None], bias, conv.stride,
                    conv.padding, conv.dilation, conv.groups)


@register(
    "gam",
    family="channel_spatial",
    layout="map",
    paper="Liu, Shao, Hoffmann, Global Attention Mechanism: Retain Information to Enhance "
          "Channel-Spatial Interactions (Sec. 3, Fig. 1-3)",
    year=2021,
    cost="4·B·H·W·C²/r (MLP) + 4·k²·B·H·W·C²/(r·groups) (two k×k convs) + 2·B·C·H·W",
    captures="channel_attention: (B, C, H, W) gate; spatial_attention: (B, C, H, W) gate",
)
class GAM(AttentionModule):
    """Global Attention Mechanism (Liu, Shao, Hoffmann 2021): channel, then spatial, no pooling.

    Liu, Shao, Hoffmann, *Global Attention Mechanism: Retain Information to Enhance
    Channel-Spatial Interactions*, arXiv 2112.05561 (2021), Sec. 3, Fig. 2-3:
    ``x' = Mc(x) * x``, ``y = Ms(x') * x'`` with :class:`GAMChannelAttention` (per-pixel MLP,
    ``C -> C/r -> C``) and :class:`GAMSpatialAttention` (7x7 conv ``C -> C/r``, BN, ReLU,
    7x7 conv ``C/r -> C``, BN), both gates sigmoids.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``rate`` ``r = 4``
    (paper); ``groups`` 1 (``> 1``: the paper's ResNet-50 variant, group convolutions with a
    channel shuffle between them); ``kernel_size`` 7.
    Cost: ``4·B·H·W·C²/r`` (MLP) ``+ 4·k²·B·H·W·C²/(r·groups)`` (two k x k convs)
    ``+ 2·B·C·H·W``.
    Deviations and choices: the widely copied YOLO ``GAM_Attention`` drops the channel gate's
    sigmoid (``x * MLP(x)``) and shuffles the spatial *gate* after its sigmoid; here both
    gates keep the paper's sigmoid (Fig. 2: "followed by a sigmoid") and the shuffle sits
    between the two group convolutions, so the second sees every group (the paper names the
    shuffle, not its place). Convs and MLP are biased (PyTorch defaults, as the common code;
    the paper does not say). Hidden width ``max(1, C // r)``.
    attn_impl: ``auto`` (module docstring: no permute copies, BN folded in eval), ``explicit``;
    records nothing itself, its two sub-modules their ``(B, C, H, W)`` gates. Measured in
    benchmarks/conv_attention.md.
    """

    layout = "map"

    def __init__(self, channels: int, rate: int = 4, groups: int = 1, kernel_size: int = 7,
                 attn_impl: str | None = None):
        super().__init__(attn_impl=attn_impl)
        check_positive("gam", channels=channels, rate=rate, groups=groups)
        self.channels = channels
        self.channel_attention = GAMChannelAttention(channels, rate, attn_impl=attn_impl)
        self.spatial_attention = GAMSpatialAttention(channels, rate, groups, kernel_size,
                                                     attn_impl=attn_impl)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        return self.spatial_attention(self.channel_attention(x))

    def load_common_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load a state dict in the common ``GAM_Attention`` layout (see the module doc)."""
        return self.load_state_dict(convert_common_gam_keys(state_dict), strict=strict)


_COMMON_KEYS = (
    ("channel_attention.0.", "channel_attention.mlp.0."),
    ("channel_attention.2.", "channel_attention.mlp.2."),
    ("spatial_attention.0.", "spatial_attention.conv1."),
    ("spatial_attention.1.", "spatial_attention.bn1."),
    ("spatial_attention.3.", "spatial_attention.conv2."),
    ("spatial_attention.4.", "spatial_attention.bn2."),
)


def convert_common_gam_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename keys of the common ``GAM_Attention`` (``nn.Sequential`` indices) to ours.

    Works at any prefix; other keys pass through. Weights trained with the YOLO copy were
    trained without the channel sigmoid, so they load but compute a different function.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for old, ours in _COMMON_KEYS:
            if new.startswith(old) or f".{old}" in new:
                new = new.replace(old, ours, 1)
                break
        out[new] = value
    return out

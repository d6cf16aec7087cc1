"""CBAM on ``(B, C, H, W)``: a channel gate, then a spatial gate (Woo et al. ECCV 2018).

The channel gate squeezes the map by average *and* max pooling and sends both
descriptors through one shared MLP; the spatial gate squeezes the channels by max and
mean and convolves the two maps with a 7x7 kernel. Both are usable alone
(``channel_gate``, ``spatial_gate``); ``cbam`` runs them in sequence (the paper's best
arrangement, Table 4) and, on its fast path, as one fused product with a custom CPU
backward (:func:`~spatial_attention.functional.gates.cbam_gates`).

Parameter names are ours (snake_case); :func:`convert_official_cbam_keys` maps the
official release's (``Jongchan/attention-module``, ``MODELS/cbam.py``) onto them, for a
single module or a whole ResNet-CBAM checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..functional.gates import ChannelMLP, SpatialConvBN, cbam_gates
from ..registry import register
from .base import AttentionModule

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "convert_official_cbam_keys"]


@register(
    "channel_gate",
    family="channel",
    layout="map",
    paper="Woo et al., CBAM: Convolutional Block Attention Module (channel attention, Eq. 2)",
    year=2018,
    cost="2·B·C·H·W (avg + max pool) + 8·B·C²/r (shared MLP, both descriptors) + B·C·H·W",
    captures="(B, C, 1, 1) channel weights",
)
class ChannelGate(AttentionModule):
    """CBAM's channel attention (Woo et al. 2018, Sec. 3, Eq. 2).

    ``Mc = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))``, ``y = Mc * x``, with one MLP
    ``C -> C/r -> C`` (ReLU between, biased layers, ``r = 16``) shared by both pooled
    descriptors, as in the official code. The fast path runs the MLP once on the two
    descriptors stacked, and a fused backward (no full-size intermediates). Deviation: the
    hidden width is ``max(1, C // r)`` so narrow maps (C < r) work, where the official layer
    would build a zero-width layer.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Records the ``(B, C, 1, 1)`` channel weights.
    Cost: ``4·B·C²/r`` (the MLP on both descriptors) ``+ 3·B·C·H·W``.
    ``attn_impl``: auto (CPU: the gate kernel in ``functional/kernels/cbam_gates.py``),
    explicit. Measured in benchmarks/conv_attention.md.
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 16, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("channel_gate", channels=channels, reduction=reduction)
        self.channels = channels
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def gate(self) -> ChannelMLP:
        """This gate's network for :func:`~spatial_attention.functional.gates.cbam_gates`."""
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return ChannelMLP(fc1.weight, fc1.bias, fc2.weight, fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.use_fused:
            return cbam_gates(x, channel=self.gate())
        avg = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        mx = F.adaptive_max_pool2d(x, 1).flatten(1)  # (B, C)
        weights = torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]  # (B, C, 1, 1)
        self.record(weights)
        return x * weights


@register(
    "spatial_gate",
    family="spatial",
    layout="map",
    paper="Woo et al., CBAM: Convolutional Block Attention Module (spatial attention, Eq. 3)",
    year=2018,
    cost="2·B·C·H·W (max + mean over C) + 4·k²·B·H·W (conv) + B·C·H·W (scale)",
    captures="(B, 1, H, W) spatial map",
)
class SpatialGate(AttentionModule):
    """CBAM's spatial attention (Woo et al. 2018, Sec. 3, Eq. 3).

    ``Ms = sigmoid(BN(conv7x7([MaxPool_c(x); AvgPool_c(x)])))``, ``y = Ms * x``. As in the
    official code: max first, then mean; the convolution ``2 -> 1`` has no bias and pads
    ``k // 2``; it is followed by ``BatchNorm2d(1, eps=1e-5, momentum=0.01)`` and no ReLU
    (the paper's Eq. 3 shows no BatchNorm; the released code and checkpoint have one).
    ``channels`` only validates inputs: the gate has ``2·k² + 2`` parameters at any width.
    The fast path takes the channel max with its index in one vectorised pass and, on CPU,
    a hand-written backward (:func:`~spatial_attention.functional.gates.cbam_gates`).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Records the ``(B, 1, H, W)`` spatial map.
    Cost: ``4·B·k²·H·W`` (the convolution) ``+ 4·B·C·H·W``.
    ``attn_impl``: auto (CPU: the gate kernel), explicit.
    """

    layout = "map"

    def __init__(self, channels: int | None = None, kernel_size: int = 7,
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        if channels is not None:
            check_positive("spatial_gate", channels=channels)
        check_positive("spatial_gate", kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"spatial_gate: kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def gate(self) -> SpatialConvBN:
        """This gate's network for :func:`~spatial_attention.functional.gates.cbam_gates`.

        Call once per forward: like ``nn.BatchNorm2d.forward`` it counts the batch and picks
        the running-statistics update factor.
        """
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or bn.running_mean is None
        tracked = not bn.training or bn.track_running_stats
        return SpatialConvBN(
            self.conv.weight, bn.weight, bn.bias,
            bn.running_mean if tracked else None, bn.running_var if tracked else None,
            batch_stats, momentum, bn.eps,
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.use_fused:
            return cbam_gates(x, spatial=self.gate())
        compress = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], 1)
        weights = torch.sigmoid(self.bn(self.conv(compress)))  # (B, 2, H, W) -> (B, 1, H, W)
        self.record(weights)
        return x * weights


@register(
    "cbam",
    family="channel_spatial",
    layout="map",
    paper="Woo et al., CBAM: Convolutional Block Attention Module (Eq. 1-3)",
    year=2018,
    cost="4·B·C·H·W (pools) + 8·B·C²/r (MLP) + 4·k²·B·H·W (conv) + 2·B·C·H·W (scales)",
    captures="channel_gate: (B, C, 1, 1) channel weights; spatial_gate: (B, 1, H, W) map",
)
class CBAM(AttentionModule):
    """Convolutional Block Attention Module (Woo et al. ECCV 2018, Eq. 1).

    ``x' = Mc(x) * x``, ``y = Ms(x') * x'``: :class:`ChannelGate` then :class:`SpatialGate`
    (reduction 16, 7x7 kernel). ``attn_impl``: auto computes ``x * Mc * Ms`` as one fused
    product (on CPU with the one-buffer backward of ``functional/kernels/cbam_gates.py``);
    explicit runs the two gates in turn, each recording its weights. Measured in
    benchmarks/conv_attention.md.
    Official checkpoints load with :meth:`load_official_state_dict`.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Records nothing itself: ``channel_gate``
    records ``(B, C, 1, 1)`` channel weights and ``spatial_gate`` the ``(B, 1, H, W)`` map.
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7,
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("cbam", channels=channels, reduction=reduction, kernel_size=kernel_size)
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction, attn_impl=attn_impl)
        self.spatial_gate = SpatialGate(channels, kernel_size, attn_impl=attn_impl)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        cg, sg = self.channel_gate, self.spatial_gate
        if self.use_fused and cg.use_fused and sg.use_fused:
            return cbam_gates(x, channel=cg.gate(), spatial=sg.gate())
        return sg(cg(x))

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load one official ``CBAM`` module's state dict (``ChannelGate.mlp.1.weight``, ...)."""
        return self.load_state_dict(convert_official_cbam_keys(state_dict), strict=strict)


#: official CBAM key segment -> ours (the official MLP starts with a parameter-free Flatten,
#: so its Linear layers are ``mlp.1`` and ``mlp.3``; the 7x7 conv sits in a BasicConv)
_OFFICIAL_KEYS = (
    ("ChannelGate.mlp.1.", "channel_gate.mlp.0."),
    ("ChannelGate.mlp.3.", "channel_gate.mlp.2."),
    ("SpatialGate.spatial.conv.", "spatial_gate.conv."),
    ("SpatialGate.spatial.bn.", "spatial_gate.bn."),
)


def convert_official_cbam_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official CBAM keys to ours, wherever they sit in a model's state dict.

    Accepts the official release's checkpoint as saved (``{'state_dict': ...}`` with the
    ``module.`` prefix of ``DataParallel``) or a plain state dict; keys of other layers
    pass through unchanged, so ``layer1.0.cbam.ChannelGate.mlp.1.weight`` becomes
    ``layer1.0.cbam.channel_gate.mlp.0.weight``.
    """
    return rename_key_segments(state_dict, _OFFICIAL_KEYS)

"""Triplet attention on ``(B, C, H, W)``: three rotated Z-pool gates (Misra et al. WACV 2021).

Each branch looks at the tensor from a different side: it pools one of C, H, W away
with max and mean (Z-pool), convolves the two remaining-plane maps with a 7x7 kernel,
normalises and squashes them into a gate over that plane, and scales the tensor. The
three gated tensors are averaged. The official code rotates the tensor (permute +
contiguous copy) so that each branch is CBAM's spatial gate; the fast path here pools
along the right axis in place and applies the three gates as one broadcast product.

Parameter names follow the official ``triplet_attention.py`` (``cw``, ``hc``, ``hw``,
each with ``conv`` and ``bn``); :func:`convert_official_triplet_keys` maps the released
checkpoints' nesting (``cw.conv.conv.weight``, older ``ChannelGateH.spatial.conv.weight``)
onto them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["TripletAttention", "convert_official_triplet_keys"]


class _ZPoolGate(nn.Module):
    """One branch's 2 -> 1 convolution and BatchNorm (official ``AttentionGate``)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, pooled: Tensor) -> Tensor:
        # (B, 2, P, Q) -> (B, 1, P, Q): the gate over one plane of the tensor
        return torch.sigmoid(self.bn(self.conv(pooled)))


def _zpool(x: Tensor, dim: int) -> Tensor:
    """``[max_dim(x); mean_dim(x)]`` stacked on a new axis 1 (max first, as official)."""
    return torch.stack([x.amax(dim), x.mean(dim)], 1)


@register(
    "triplet",
    family="channel_spatial",
    layout="map",
    paper="Misra et al., Rotate to Attend: Convolutional Triplet Attention Module (Sec. 3.2)",
    year=2021,
    cost="6·B·C·H·W (three Z-pools) + 4·k²·B·(C·W + H·C + H·W) (convs) + 4·B·C·H·W (gates)",
    captures="(B, C, H, W) combined gate (the mean of the three branches' gates)",
)
class TripletAttention(AttentionModule):
    """Convolutional triplet attention (Misra, Nalamada, Arasanipalai, Hou; WACV 2021).

    Sec. 3.2, Fig. 3: for branch ``i`` rotate ``x`` so the pooled axis comes first,
    ``w_i = sigmoid(BN(conv_kxk(Z-pool(x_rot))))`` with ``Z-pool = [max; mean]``, and
    ``y = 1/3 (x * w_cw + x * w_hc + x * w_hw)`` (Eq. 1-2; ``1/2`` of the first two with
    ``no_spatial``). Branch ``cw`` pools over H and gates the (C, W) plane, ``hc`` pools
    over W and gates (H, C), ``hw`` pools over C and gates (H, W).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; ``channels`` only validates inputs (the
    module has ``3·(2·k² + 2)`` parameters at any width).
    Arguments: ``kernel_size=7`` (official, fixed there), ``no_spatial=False``.
    Records the ``(B, C, H, W)`` gate the input is multiplied by.
    Cost: ``4·k²·B·(C·W + H·C + H·W)`` (the three convs) ``+ 10·B·C·H·W``.
    Deviations: the official module takes no ``channels``; ``kernel_size`` is exposed
    (odd values only, to keep the official "same" padding). The fast path skips the
    rotations: it pools along the axis directly and multiplies ``x`` once by the summed
    gates, so ``x`` is read twice instead of permuted and copied four times. Its max
    pools use ``amax``, which splits the gradient between tied maxima where ``max`` (the
    official and explicit paths) sends it to one; outputs are the same.
    ``attn_impl``: auto (rotation-free pools, one product), explicit (the rotations).
    """

    layout = "map"

    def __init__(self, channels: int | None = None, kernel_size: int = 7,
                 no_spatial: bool = False, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        if channels is not None:
            check_positive("triplet", channels=channels)
        check_positive("triplet", kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"triplet: kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.no_spatial = channels, kernel_size, no_spatial
        self.cw = _ZPoolGate(kernel_size)
        self.hc = _ZPoolGate(kernel_size)
        self.hw = None if no_spatial else _ZPoolGate(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.impl == "explicit":
            return self._explicit(x)
        # each gate lands in x's own axis order so that the three broadcast together
        w_cw = self.cw(_zpool(x, 2)).transpose(1, 2)  # (B, 2, C, W) -> (B, 1, C, W) -> (B, C, 1, W)
        # (B, 2, H, C) -> (B, 1, H, C) -> (B, C, H, 1)
        w_hc = self.hc(_zpool(x, 3).transpose(2, 3)).permute(0, 3, 2, 1)
        if self.hw is None:
            return x * ((w_cw + w_hc) * 0.5)
        w_hw = self.hw(_zpool(x, 1))  # (B, 2, H, W) -> (B, 1, H, W)
        return x * ((w_cw + w_hc + w_hw) * (1 / 3))

    def _explicit(self, x: Tensor) -> Tensor:
        # Fig. 3 as drawn: rotate, Z-pool over the new first axis, gate, rotate back
        x_cw = x.permute(0, 2, 1, 3)  # (B, H, C, W)
        g_cw = self.cw(torch.cat([x_cw.max(1, keepdim=True).values,
                                  x_cw.mean(1, keepdim=True)], 1))  # (B, 1, C, W)
        y_cw = (x_cw * g_cw).permute(0, 2, 1, 3)
        x_hc = x.permute(0, 3, 2, 1)  # (B, W, H, C)
        g_hc = self.hc(torch.cat([x_hc.max(1, keepdim=True).values,
                                  x_hc.mean(1, keepdim=True)], 1))  # (B, 1, H, C)
        y_hc = (x_hc * g_hc).permute(0, 3, 2, 1)
        gates = [g_cw.permute(0, 2, 1, 3), g_hc.permute(0, 3, 2, 1)]  # (B, C, 1, W), (B, C, H, 1)
        if self.hw is None:
            self.record((gates[0] + gates[1]).expand_as(x) / 2)
            return (y_cw + y_hc) / 2
        g_hw = self.hw(torch.cat([x.max(1, keepdim=True).values,
                                  x.mean(1, keepdim=True)], 1))  # (B, 1, H, W)
        self.record((gates[0] + gates[1] + g_hw) / 3)
        return (y_cw + y_hc + x * g_hw) / 3

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load one official ``TripletAttention`` module's state dict."""
        return self.load_state_dict(convert_official_triplet_keys(state_dict), strict=strict)


#: official key segment -> ours: the gates' ``BasicConv`` adds a level of nesting, and
#: the first release (``MODELS/triplet_attention.py``) named the branches differently
_OFFICIAL_KEYS = (
    ("ChannelGateH.spatial.", "cw."),
    ("ChannelGateW.spatial.", "hc."),
    ("SpatialGate.spatial.", "hw."),
    ("cw.conv.", "cw."),
    ("hc.conv.", "hc."),
    ("hw.conv.", "hw."),
)


def convert_official_triplet_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official triplet-attention keys to ours, wherever they sit in a model.

    Takes a checkpoint as saved (``{'state_dict': ...}``, ``module.`` prefixes) or a
    plain state dict: ``layer1.0.triplet_attention.cw.conv.conv.weight`` becomes
    ``layer1.0.triplet_attention.cw.conv.weight``; other layers' keys pass through.
    """
    return rename_key_segments(state_dict, _OFFICIAL_KEYS)

"""Shuffle attention (SA) on ``(B, C, H, W)`` (Zhang & Yang, ICASSP 2021).

The channels are cut into ``G`` groups; each group is halved. One half gets a channel
gate (its global average, a per-channel scale and shift, a sigmoid), the other a spatial
gate (GroupNorm with one channel a group, a per-channel scale and shift, a sigmoid).
The gated halves are put back together and the channels shuffled in two groups, so the
next layer mixes channel- and spatial-gated features. Six small vectors of ``C/2G``
parameters each.

Parameter names are the official ``sa_layer``'s (``cweight``, ``cbias``, ``sweight``,
``sbias``, ``gn``), so its weights load as they are
(:meth:`ShuffleAttention.load_official_state_dict` also takes the ``{'state_dict': ...}``
wrapping and ``module.`` prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..functional.gates import channel_shuffle
from ..registry import register
from .base import AttentionModule

__all__ = ["ShuffleAttention"]


def _group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` without its Python-side check, which refuses one value a group in
    the whole batch (batch 1 of a 1x1 map, one channel a group) although the norm is
    defined there: ``x - mean = 0``, so the result is the bias."""
    return torch.group_norm(x, groups, weight, bias, eps, torch.backends.cudnn.enabled)


@register(
    "shuffle_attention",
    family="channel_spatial",
    layout="map",
    paper="Zhang & Yang, SA-Net: Shuffle Attention for Deep Convolutional Neural Networks "
          "(Eq. 1-3)",
    year=2021,
    cost="B·C·H·W/2 (pool) + ~3·B·C·H·W (norm, spatial gate) + B·C·H·W (gates) "
         "+ B·C·H·W (shuffle)",
    captures="(B, C/2, 1, 1) channel gates, then (B, C/2, H, W) spatial gates "
             "(the channel and spatial halves of every group, group-major)",
)
class ShuffleAttention(AttentionModule):
    """SA: per group, a channel gate on one half and a spatial gate on the other, shuffled.

    Zhang & Yang, *SA-Net: Shuffle Attention for Deep Convolutional Neural Networks*, ICASSP
    2021. Per group ``X_k`` split into ``X_k1, X_k2`` (``C/2G`` channels each):
    ``s = mean_HW(X_k1)`` (Eq. 1), ``X'_k1 = sigmoid(W1 s + b1) · X_k1`` (Eq. 2),
    ``X'_k2 = sigmoid(W2 · GN(X_k2) + b2) · X_k2`` (Eq. 3, GN with one channel a group,
    eps 1e-5, affine); concatenate, regroup, channel shuffle with 2 groups.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; batch 1 and any ``H, W`` work (GN is per
    sample). Args: ``channels``; ``groups`` ``G = 64`` (official).
    Parameters as the official ``sa_layer``: ``cweight`` (W1, zeros), ``cbias`` (b1, ones),
    ``sweight`` (W2, zeros), ``sbias`` (b2, ones), all ``(1, C/2G, 1, 1)``, and ``gn``.
    Cost: ``B·C·H·W/2`` (pool) ``+ ~3·B·C·H·W`` (norm) ``+ 2·B·C·H·W`` (gates, shuffle).
    ``2·groups`` must divide ``channels`` (ValueError; the official code runs on with
    unequal halves or fails in a reshape). Deviation: ``groups > channels // 2`` is clamped
    to ``channels // 2`` (one channel a half), as ``sge`` clamps, so the default works on
    maps narrower than 128 channels.
    attn_impl: ``auto`` (even ``G``; odd ``G`` runs the explicit path) gathers both halves
    straight in the shuffled order, folds ``W2 · GN + b2`` into the norm's own affine and
    writes the result once; ``explicit`` is Eq. 1-3, concatenation and shuffle as written,
    and records both gates.
    """

    layout = "map"

    def __init__(self, channels: int, groups: int = 64, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("shuffle_attention", channels=channels, groups=groups)
        if channels < 2:
            raise ValueError(f"shuffle_attention: channels must be at least 2 (a channel "
                             f"and a spatial half), got {channels}")
        groups = min(groups, channels // 2)
        if channels % (2 * groups):
            raise ValueError(
                f"shuffle_attention: channels {channels} must be divisible by 2 * groups = "
                f"{2 * groups} (each of the {groups} groups splits into two equal halves)")
        self.channels, self.groups = channels, groups
        half = channels // (2 * groups)  # C / 2G channels in each half of a group
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)  # one channel a group, eps 1e-5, affine

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.impl == "explicit" or self.groups % 2:
            return self._explicit(x)
        B, C, H, W = x.shape
        G, c = self.groups, C // (2 * self.groups)
        # output channel 2m + a is shuffled-in channel a C/2 + m; with G even, m splits into
        # (group pair g', half h, channel j): the view below is x in the output's order
        xo = x.reshape(B, 2, G // 2, 2, c, H * W).permute(0, 2, 3, 4, 1, 5)
        x_ch, x_sp = xo.unbind(2)  # (B, G/2, c, 2, HW) each; unbind's backward is one stack
        gate_c = torch.sigmoid(torch.addcmul(self.cbias.view(c, 1, 1),
                                             x_ch.mean(-1, keepdim=True),
                                             self.cweight.view(c, 1, 1)))  # Eq. 1-2
        # Eq. 3: W2 (gamma GN + beta) + b2 is one affine norm, weight W2 gamma, bias W2 beta + b2
        sw = self.sweight.view(c)
        weight = (sw * self.gn.weight).view(1, c, 1).expand(G // 2, c, 2).reshape(-1)
        bias = (sw * self.gn.bias + self.sbias.view(c)).view(1, c, 1).expand(G // 2, c, 2)
        n = G * c  # the spatial halves, each channel its own group
        z = _group_norm(x_sp.reshape(B, n, H * W), n, weight, bias.reshape(-1), self.gn.eps)
        if torch.is_grad_enabled() and (x.requires_grad or z.requires_grad):
            spatial = torch.sigmoid(z).view_as(x_sp) * x_sp
        else:
            spatial = z.sigmoid_().view_as(x_sp).mul_(x_sp)
        return torch.stack([x_ch * gate_c, spatial], 2).view(B, C, H, W)

    def _explicit(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        G = self.groups
        groups = x.reshape(B * G, C // G, H, W)  # the sub-features X_k
        x1, x2 = groups.chunk(2, dim=1)  # X_k1 (channel half), X_k2 (spatial half)
        s = x1.mean((2, 3), keepdim=True)  # Eq. 1
        gate_c = torch.sigmoid(self.cweight * s + self.cbias)  # Eq. 2
        gn = self.gn
        gate_s = torch.sigmoid(self.sweight * _group_norm(x2, gn.num_groups, gn.weight, gn.bias,
                                                          gn.eps) + self.sbias)  # Eq. 3
        self.record(gate_c.reshape(B, C // 2, 1, 1))
        self.record(gate_s.reshape(B, C // 2, H, W))
        out = torch.cat([x1 * gate_c, x2 * gate_s], dim=1).reshape(B, C, H, W)
        return channel_shuffle(out, 2)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The module with random gate parameters (the official start, zero ``cweight`` and
        ``sweight``, makes both gates the constant ``sigmoid(1)`` and would hide them from
        the tests and benchmarks that use this example) and an input."""
        module, inputs = super().example(name, batch, channels, size, **kwargs)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return module, inputs

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an official ``sa_layer``'s state dict (its keys are ours), accepting the
        ``{'state_dict': ...}`` wrapping and ``module.`` prefixes."""
        return self.load_state_dict(rename_key_segments(state_dict, ()), strict=strict)

"""Spatial Group-wise Enhance on ``(B, C, H, W)`` (Li, Hu, Yang, 2019).

The channels are split into groups, each taken to hold one semantic feature. Within a
group, the similarity of every position's feature vector to the group's global average
says how strongly the feature is present there; normalised over the positions and given a
per-group scale and shift, it becomes a sigmoid gate over space. Two parameters a group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["SpatialGroupEnhance"]


@register(
    "sge",
    family="spatial",
    layout="map",
    paper="Li et al., Spatial Group-wise Enhance: Improving Semantic Feature Learning "
          "in CNNs (Eq. 1-5)",
    year=2019,
    cost="B·C·H·W (pool) + 2·B·C·H·W (similarity) + ~6·B·G·H·W (norm, gate) + B·C·H·W (scale)",
    captures="(B, G, H, W) spatial gate of each group",
)
class SpatialGroupEnhance(AttentionModule):
    """SGE (Li, Hu, Yang, arXiv 1905.09646, 2019): a spatial gate per channel group.

    Li et al., *Spatial Group-wise Enhance: Improving Semantic Feature Learning in
    Convolutional Networks*, 2019. Per group of ``C/G`` channels: ``g = mean_HW(x)`` (Eq. 1),
    ``c_i = g · x_i`` (Eq. 2), ``c^_i = (c_i - mu_c) / (std_c + eps)`` over the positions
    (Eq. 3), ``a_i = gamma c^_i + beta`` (Eq. 4), ``y_i = x_i · sigmoid(a_i)`` (Eq. 5).
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, gate ``(B, G, H, W)``. Args: ``channels``;
    ``groups`` ``G = 64`` (official); ``eps = 1e-5``. ``weight`` (gamma, zeros) and ``bias``
    (beta, ones) are ``(1, G, 1, 1)`` as in the official ``SpatialGroupEnhance``.
    Cost: ``B·C·H·W`` (pool) ``+ 2·B·C·H·W`` (similarity) ``+ ~6·B·G·H·W`` (norm) ``+ B·C·H·W``.
    ``groups`` must divide ``channels`` (ValueError otherwise); ``groups > channels`` is
    clamped to ``channels`` (one channel a group), so the default works on narrow maps.
    As the official code, ``std_c`` is the unbiased (``H·W - 1``) deviation and ``eps`` is
    added to it, not to the variance (the paper's Eq. 3 writes ``1/m``). Deviation: where
    ``H·W = 1`` the official ``std`` is NaN; here ``c^ = 0`` (nothing to normalise).
    attn_impl: ``auto`` (the similarity as one batched product with the group means, no
    map-sized temporary) and ``explicit`` (Eq. 1-5 written out); both record the gate.
    """

    layout = "map"

    def __init__(self, channels: int, groups: int = 64, eps: float = 1e-5,
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("sge", channels=channels, groups=groups, eps=eps)
        groups = min(groups, channels)
        if channels % groups:
            raise ValueError(f"sge: groups {groups} must divide channels {channels}")
        self.channels, self.groups, self.eps = channels, groups, float(eps)
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))  # gamma: the gate starts flat
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))  # beta

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, C, H, W = x.shape
        G = self.groups
        xg = x.reshape(B, G, C // G, H * W)  # (B, G, C/G, HW)
        if self.impl == "explicit":
            g = xg.mean(3, keepdim=True)  # Eq. 1: (B, G, C/G, 1)
            c = (g * xg).sum(2)  # Eq. 2: (B, G, HW)
            c_hat = self._normalise(c)  # Eq. 3
            a = c_hat * self.weight.view(1, G, 1) + self.bias.view(1, G, 1)  # Eq. 4
            gate = torch.sigmoid(a)  # (B, G, HW)
            self.record(gate.view(B, G, H, W))
            return (xg * gate[:, :, None, :]).view(B, C, H, W)  # Eq. 5
        # Eq. 2 as (B, G, 1, C/G) @ (B, G, C/G, HW): no (B, C, H, W) product is kept
        c = torch.matmul(xg.mean(3).unsqueeze(2), xg).squeeze(2)  # (B, G, HW)
        gate = torch.sigmoid(torch.addcmul(self.bias.view(1, G, 1), self._normalise(c),
                                           self.weight.view(1, G, 1)))  # (B, G, HW)
        self.record(gate.view(B, G, H, W))
        return (xg * gate.unsqueeze(2)).view(B, C, H, W)

    def _normalise(self, c: Tensor) -> Tensor:
        """Eq. 3 over the positions (last axis), unbiased std plus ``eps`` as official."""
        centred = c - c.mean(-1, keepdim=True)
        if c.shape[-1] == 1:  # one position: centred is 0, and std's gradient would be NaN
            return centred
        std = centred.square().sum(-1, keepdim=True).div(c.shape[-1] - 1).sqrt()
        return centred / (std + self.eps)

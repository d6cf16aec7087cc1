"""External attention on ``(B, C, H, W)`` (Guo et al. 2021).

Instead of attending among its own positions, every position attends to ``S`` learned
external memory units shared by the whole data set: two linear layers (``M_k``, ``M_v``)
and a double normalisation, linear in the number of positions. This is the block of the
official EANet segmentation head (``MenghaoGuo/EANet``, ``model_torch.py``,
``External_attention``), with its parameter names, so its state dicts load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["ExternalAttention"]


@register(
    "external",
    family="spatial",
    layout="map",
    paper="Guo et al., Beyond Self-attention: External Attention using Two Linear Layers "
          "for Visual Tasks (Eq. 5-6, double normalisation)",
    year=2021,
    cost="4·B·N·C·S (M_k, M_v; + 4·B·N·C² unfused convs) + 3·B·N·S (double norm), N = H·W",
    captures="(B, S, N) attention over the S memory units, N = H·W",
)
class ExternalAttention(AttentionModule):
    """External attention, the EANet head block (Guo, Liu, Mu, Hu, arXiv 2105.02358, 2021).

    Eq. 5-6 with the paper's double normalisation: ``A = M_k F`` ``(B, S, N)``, a softmax
    over the ``N`` positions, then ``A_ij / (1e-9 + sum_s A_sj)`` over the ``S`` units;
    ``F_out = M_v A``. Variant: the official head, ``y = ReLU(x + BN(W_2 M_v A(M_k W_1 x)))``
    with ``W_1`` a biased 1x1 conv (``conv1``), ``M_k``/``M_v`` bias-free 1x1 Conv1d
    (``linear_0``, ``linear_1``), ``W_2`` a bias-free 1x1 conv + BatchNorm (``conv2``).
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``k`` memory units
    (``S`` in the paper, 64). Init as the official code: convs normal(0, sqrt(2 / fan_out)),
    ``M_v = M_k^T`` at start, BN weight 1, bias 0 (eps 1e-5, momentum 0.1).
    Cost: ``4·B·N·C·S + 3·B·N·S`` FLOPs fused (``+ 4·B·N·C²`` unfused).
    Deviations: the official code makes ``linear_1.weight`` a view of ``linear_0``'s storage,
    which ``.cuda()`` then unties; here ``M_v`` starts as a copy of ``M_k^T`` and trains
    on its own (what the official run on a GPU does).
    ``attn_impl``: ``auto`` folds ``W_1`` into ``M_k`` and ``M_v`` into ``W_2`` (both are
    linear and adjacent: ``S·C`` per position instead of ``C² + S·C``, the same map up to
    rounding), ``explicit`` runs the official order and records ``A`` ``(B, S, N)``.
    """

    layout = "map"

    def __init__(self, channels: int, k: int = 64, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("external", channels=channels, k=k)
        self.channels, self.k = channels, k
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.linear_0 = nn.Conv1d(channels, k, 1, bias=False)  # M_k: (S, C, 1)
        self.linear_1 = nn.Conv1d(k, channels, 1, bias=False)  # M_v: (C, S, 1)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv1, self.conv2[0]):
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / conv.out_channels))
        # the official init draws M_k, then overwrites it through the shared view with
        # M_v's draw: std sqrt(2 / C) for both
        nn.init.normal_(self.linear_0.weight, 0.0, math.sqrt(2.0 / self.channels))
        with torch.no_grad():
            self.linear_1.weight.copy_(self.linear_0.weight.transpose(0, 1))
        nn.init.ones_(self.conv2[1].weight)
        nn.init.zeros_(self.conv2[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, C, H, W = x.shape
        if self.impl == "explicit":
            f = self.conv1(x).reshape(B, C, H * W)  # (B, C, N)
            attn = self.linear_0(f)  # (B, S, N): M_k F
            attn = attn.softmax(-1)  # over the N positions
            attn = attn / (1e-9 + attn.sum(1, keepdim=True))  # l1 over the S units
            self.record(attn)
            out = self.linear_1(attn).reshape(B, C, H, W)  # M_v A
            return torch.clamp_min(x + self.conv2(out), 0.0)  # ReLU, see below
        m_k, m_v = self.linear_0.weight[:, :, 0], self.linear_1.weight[:, :, 0]
        w_in = m_k @ self.conv1.weight[:, :, 0, 0]  # (S, C): M_k W_1
        b_in = m_k @ self.conv1.bias  # (S,)
        # batched GEMMs rather than 1x1 convs: CPU convs of these shapes take a slow path
        attn = torch.matmul(w_in, x.reshape(B, C, H * W)) + b_in[:, None]  # (B, S, N)
        attn = attn.softmax(-1)
        attn = attn / (1e-9 + attn.sum(1, keepdim=True))
        w_out = self.conv2[0].weight[:, :, 0, 0] @ m_v  # (C, S): W_2 M_v
        out = self.conv2[1](torch.matmul(w_out, attn).view(B, C, H, W))
        # BatchNorm's backward needs its input, not its output: the residual can reuse
        # the output's memory. The ReLU is clamp_min, whose backward keeps its input, not
        # its result: callers (timm's blocks) add their shortcut to our result in place
        return torch.clamp_min(out.add_(x), 0.0)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The strongest memory-unit affinity per position: every column of ``A`` sums to
        one over the units, so the default mean would be the constant ``1/S``."""
        H, W = size
        return weights.float().amax(1).reshape(-1, H, W)

"""Global context (GC) block on ``(B, C, H, W)`` (Cao et al. 2019).

One query-independent attention map pools the whole feature map into a single context
vector (a simplified non-local block: every query would attend alike anyway), an SE-like
bottleneck with LayerNorm transforms it, and it is fused back into every position by
broadcast addition (default) and/or a sigmoid channel gate. Parameter names follow the
official ``ContextBlock`` (``xvjiarui/GCNet``, mmcv), so its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["GlobalContext"]

_POOLING = ("att", "avg")
_FUSIONS = ("channel_add", "channel_mul")


def _bottleneck(channels: int, planes: int) -> nn.Sequential:
    # LayerNorm over (planes, 1, 1) as in the official code: on a 1x1 map it is a
    # LayerNorm over the bottleneck channels, which the paper found eases optimisation.
    return nn.Sequential(
        nn.Conv2d(channels, planes, kernel_size=1),
        nn.LayerNorm([planes, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, channels, kernel_size=1),
    )


@register(
    "global_context",
    family="channel",
    layout="map",
    paper="Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond "
          "(Eq. 3-4)",
    year=2019,
    cost="2·B·C·H·W (mask conv) + 2·B·C·H·W (pooling) + 4·B·C·P per fusion (P = C·ratio) "
         "+ B·C·H·W (fusion)",
    captures="(B, 1, H, W) context weights (softmax over positions; uniform for 'avg')",
)
class GlobalContext(AttentionModule):
    """Global context block (Cao et al. ICCV-W 2019 / TPAMI 2020, Eq. 3-4).

    Cao, Xu, Lin, Wei, Hu, *GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
    Beyond*, 2019. Eq. 4: ``z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j a_j x_j))`` with
    ``a = softmax_j(W_k x_j)`` (context modelling ``"att"``; ``"avg"``: ``a_j = 1/HW``).
    ``"channel_mul"`` fuses by ``x * sigmoid(transform(context))`` instead; with both,
    the gate comes first, as in the official code.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; the context is ``(B, C, 1, 1)``.
    Args: ``channels``; ``ratio`` (bottleneck ``P = int(C * ratio)``, paper 1/16);
    ``pooling_type`` ``"att"`` | ``"avg"`` (paper ``"att"``); ``fusion_types`` of
    ``"channel_add"``, ``"channel_mul"`` (paper ``("channel_add",)``).
    Init as mmcv: ``conv_mask`` Kaiming (fan_in, zero bias), the last conv of each
    transform zero, so the block starts as the identity.
    Cost: ``4·B·C·H·W`` (mask and pooling) ``+ 4·B·C·P`` per fusion ``+ B·C·H·W``.
    Deviations: ``P = max(1, int(C * ratio))`` so narrow maps work (the official block
    would build a zero-width LayerNorm). Names (``conv_mask``, ``channel_add_conv``,
    ``channel_mul_conv``) match ``ContextBlock``: official weights load as they are.
    ``attn_impl``: ``auto`` (the pooling a batched matmul without autograd, a broadcast
    product with it, whose backward is cheaper; fused multiply-add),
    ``explicit`` (the weighted sum over positions written out); records the
    ``(B, 1, H, W)`` weights.
    """

    layout = "map"

    def __init__(self, channels: int, ratio: float = 1 / 16, pooling_type: str = "att",
                 fusion_types: Sequence[str] = ("channel_add",),
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("global_context", channels=channels, ratio=ratio)
        if pooling_type not in _POOLING:
            raise ValueError(f"global_context: pooling_type must be one of {_POOLING}, "
                             f"got {pooling_type!r}")
        if isinstance(fusion_types, str):
            fusion_types = (fusion_types,)
        fusion_types = tuple(fusion_types)
        if not fusion_types or any(f not in _FUSIONS for f in fusion_types):
            raise ValueError(f"global_context: fusion_types must be a non-empty selection of "
                             f"{_FUSIONS}, got {fusion_types!r}")
        self.channels, self.ratio = channels, ratio
        self.planes = max(1, int(channels * ratio))
        self.pooling_type, self.fusion_types = pooling_type, fusion_types
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1) if pooling_type == "att" else None
        self.channel_add_conv = (_bottleneck(channels, self.planes)
                                 if "channel_add" in fusion_types else None)
        self.channel_mul_conv = (_bottleneck(channels, self.planes)
                                 if "channel_mul" in fusion_types else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for transform in (self.channel_add_conv, self.channel_mul_conv):
            if transform is not None:
                nn.init.zeros_(transform[-1].weight)
                nn.init.zeros_(transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, C, H, W = x.shape
        if self.impl == "explicit":
            if self.conv_mask is not None:
                logits = self.conv_mask(x)  # (B, 1, H, W): W_k x_j
                weights = logits.flatten(1).softmax(-1).view(B, 1, H, W)  # Eq. 3, over j
            else:
                weights = x.new_full((B, 1, H, W), 1.0 / (H * W))
            self.record(weights)
            context = (weights * x).sum((2, 3), keepdim=True)  # (B, C, 1, 1): sum_j a_j x_j
            out = x
            if self.channel_mul_conv is not None:
                out = out * torch.sigmoid(self.channel_mul_conv(context))
            if self.channel_add_conv is not None:
                out = out + self.channel_add_conv(context)  # Eq. 4: broadcast over i
            return out
        if self.conv_mask is not None:
            logits = F.conv2d(x, self.conv_mask.weight, self.conv_mask.bias)  # (B, 1, H, W)
            weights = logits.reshape(B, 1, H * W).softmax(-1)  # (B, 1, N)
            xs = x.reshape(B, C, H * W)  # copies only for channels_last
            if torch.is_grad_enabled():
                # the GEMV's backward is a rank-1 GEMM per sample, slower on the CPU than
                # the broadcast product's elementwise backward
                context = (xs * weights).sum(-1).view(B, C, 1, 1)
            else:
                context = torch.bmm(xs, weights.transpose(1, 2)).view(B, C, 1, 1)
        else:
            context = x.mean((2, 3), keepdim=True)
        if self.channel_mul_conv is None:
            return x + self.channel_add_conv(context)
        gate = torch.sigmoid(self.channel_mul_conv(context))  # (B, C, 1, 1)
        if self.channel_add_conv is None:
            return x * gate
        return torch.addcmul(self.channel_add_conv(context), x, gate)  # one pass over x

"""Branch attention on ``(B, C, H, W)``: Selective Kernel convolution (SK).

Branch attention weighs whole computation paths rather than places or channels of one
map: SK runs the input through several convolutions with different receptive fields and
lets a softmax across the branches pick, per channel, how much of each to keep.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["SelectiveKernel"]


class _SelectAttention(nn.Module):
    """The fuse/select weights of SK: ``fc_reduce`` (W), ``bn``, ``act``, ``fc_select`` (A, B, ...).

    Bias-free 1x1 convs named as in timm's ``SelectiveKernelAttn``; ``fc_select`` stacks
    the per-branch matrices ``A_1 .. A_M`` (each ``C x d``) branch-major.
    """

    def __init__(self, channels: int, num_paths: int, attn_channels: int) -> None:
        super().__init__()
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def compact(self, s: Tensor) -> Tensor:
        """``z = ReLU(BN(W s))`` (Eq. 3): ``(B, C, 1, 1) -> (B, d, 1, 1)``."""
        return self.act(self.bn(self.fc_reduce(s)))


@register(
    "sk",
    family="branch",
    layout="map",
    paper="Li et al., Selective Kernel Networks (Eq. 1-6)",
    year=2019,
    cost="2·B·C²·H·W·9·M/G (branch convs) + B·C·H·W·(2M + 1) (fuse, select) + 2·B·C·d·(M + 1)",
    captures="(B, M, C, 1, 1) branch weights (softmax over M)",
)
class SelectiveKernel(AttentionModule):
    """Selective Kernel convolution (Li et al. CVPR 2019, Sec. 3.1, Eq. 1-6).

    Li et al., *Selective Kernel Networks*, CVPR 2019. *Split*: ``M`` grouped 3x3
    conv + BN + ReLU branches, branch ``m`` dilated by ``dilations[m]`` (the paper's 5x5 is
    its dilated 3x3). *Fuse*: ``s = GAP(sum_m U_m)``, ``z = ReLU(BN(W s))``, ``W: C -> d``,
    ``d = max(C / r, L)``. *Select*: ``a_m = softmax_m(A_m z)`` per channel, ``V = sum_m a_m
    U_m``. SK has its own convolutions: a drop-in for a 3x3 conv (SKNet's bottleneck), not a
    gate after one. Shapes: ``(B, C, H, W) -> (B, out_channels, H / stride, W / stride)``.

    Args (paper defaults): ``channels``; ``out_channels`` (``channels``); ``dilations``
    ``(1, 2)`` (``M = 2``); ``groups`` ``G = 32``; ``reduction`` ``r = 16``; ``min_dim``
    ``L = 32``; ``stride`` 1.
    Cost: ``2·B·C²·H·W·9·M/G`` (branch convs) ``+ B·C·H·W·(2M + 1)`` (fuse, select)
    ``+ 2·B·C·d·(M + 1)``.
    Parameter names are timm's ``SelectiveKernel`` with ``split_input=False`` (``paths.{m}``,
    ``attn.fc_reduce``, ``attn.bn``, ``attn.fc_select``; bias-free 1x1 FCs, BN after ``W``),
    so its state dicts load; timm's ``skresnext50_32x4d`` rounds ``d`` to a multiple of 32,
    equal to ours for power-of-two widths. Deviation: ``gcd(channels, out_channels, groups)``
    groups, so narrow or odd widths work (multiples of 32 unchanged). In training, BN on the
    ``(B, d, 1, 1)`` descriptor needs ``B > 1`` (as in the paper and timm).
    attn_impl: ``auto`` (pooled sum of branch means, one FC, ``addcmul``), ``explicit``
    (Eq. 1-6 as written, records ``(B, M, C, 1, 1)``); measured, with the formulations not
    taken, in benchmarks/conv_attention.md.
    """

    layout = "map"

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        dilations: Sequence[int] = (1, 2),
        groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
        stride: int = 1,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        out_channels = channels if out_channels is None else out_channels
        check_positive("sk", channels=channels, out_channels=out_channels, groups=groups,
                       reduction=reduction, min_dim=min_dim, stride=stride)
        dilations = tuple(int(d) for d in dilations)
        if len(dilations) < 2:
            raise ValueError(f"sk: needs at least two branches (dilations), got {dilations}")
        check_positive("sk", **{f"dilations[{i}]": d for i, d in enumerate(dilations)})
        self.channels, self.out_channels, self.dilations = channels, out_channels, dilations
        self.groups = math.gcd(math.gcd(channels, out_channels), groups)
        self.attn_channels = max(out_channels // reduction, min_dim)
        self.paths = nn.ModuleList(
            nn.Sequential(OrderedDict(
                conv=nn.Conv2d(channels, out_channels, 3, stride=stride, padding=d, dilation=d,
                               groups=self.groups, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(inplace=True),
            ))
            for d in dilations
        )
        self.attn = _SelectAttention(out_channels, len(dilations), self.attn_channels)

    def _branch(self, path: nn.Sequential, x: Tensor) -> Tensor:
        """One branch, ``relu(bn(conv(x)))``. Works around a CPU bug in PyTorch 2.13's
        oneDNN kernels: in bfloat16 (or float16) in the channels_last format, the weight
        gradient of a *grouped, dilated* convolution comes out wrong (relative error ~1.4
        against the float32 gradient at 32x32 maps and up; CIFAR ResNet-18 + SK diverged
        to NaN within an epoch). The format follows the input *or* the weight (a model
        moved to channels_last has channels_last weights), so that convolution runs on
        contiguous copies of both there (tests/test_layers_sk.py checks both cases)."""
        conv = path.conv
        cpu = x.device.type == "cpu"
        low = cpu and (x.dtype in (torch.bfloat16, torch.float16)
                       or torch.is_autocast_enabled("cpu"))
        if low and conv.groups > 1 and max(conv.dilation) > 1 and not (
                x.is_contiguous() and conv.weight.is_contiguous()):
            y = F.conv2d(x.contiguous(), conv.weight.contiguous(), conv.bias, conv.stride,
                         conv.padding, conv.dilation, conv.groups)
        else:
            y = conv(x)
        return path.act(path.bn(y))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        branches = [self._branch(path, x) for path in self.paths]  # M x (B, C, H, W)
        M, C = len(branches), self.out_channels
        # the branch convs stay separate: their dilations differ, and one grouped 5x5 conv
        # holding both does 2.8x the multiply-adds and still needs a BN per branch
        if self.use_fused:
            # U is never formed: its mean is the sum of the branch means; one FC gives every
            # branch's logits, softmax over the branch axis; the weighted sum is M fused
            # multiply-adds, since stacking to (B, M, C, H, W) would copy every map
            s = torch.stack([u.mean((2, 3), keepdim=True) for u in branches], 0).sum(0)
            logits = self.attn.fc_select(self.attn.compact(s))  # (B, M*C, 1, 1)
            weights = logits.unflatten(1, (M, C)).softmax(1)  # (B, M, C, 1, 1)
            out = branches[0] * weights[:, 0]
            for m in range(1, M):
                out = torch.addcmul(out, branches[m], weights[:, m])
            return out
        U = branches[0]
        for u in branches[1:]:
            U = U + u  # Eq. 1
        s = U.mean((2, 3), keepdim=True)  # Eq. 2, (B, C, 1, 1)
        z = self.attn.compact(s)  # Eq. 3, (B, d, 1, 1)
        A = self.attn.fc_select.weight.reshape(M, C, -1)  # per-branch (C, d) matrices
        scores = torch.stack([F.linear(z.flatten(1), A[m]) for m in range(M)], 1)  # (B, M, C)
        e = torch.exp(scores - scores.amax(1, keepdim=True))  # Eq. 5 (shift for stability)
        weights = (e / e.sum(1, keepdim=True))[..., None, None]  # (B, M, C, 1, 1)
        self.record(weights)
        out = weights[:, 0] * branches[0]
        for m in range(1, M):
            out = out + weights[:, m] * branches[m]  # Eq. 6
        return out

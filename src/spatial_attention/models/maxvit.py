"""MaxViT (Tu et al. ECCV 2022), built from ``maxvit_block_attention`` and
``maxvit_grid_attention``.

Architecture as in google-research/maxvit and timm's ``maxvit_*_tf`` models: a stem (3x3
conv stride 2, BatchNorm + GELU, 3x3 conv), four stages of MaxViT blocks, each block an
MBConv (pre-BatchNorm, 1x1 expand x4, BN + GELU, 3x3 depthwise (stride 2 in a stage's first
block), BN + GELU, squeeze-excitation (SiLU, width C/4), 1x1 project; shortcut 2x2
average pool + 1x1 conv when downsampling), then block attention + MLP and grid attention
+ MLP (pre-LayerNorm, eps 1e-5, MLP ratio 4, tanh-GELU), window and grid 7, heads of 32
channels; global average pooling, LayerNorm, a tanh pre-logits layer and the classifier.
GELU is the tanh approximation and BatchNorm eps 1e-3, as in the TF models.

================  ==================  ===========  =====  =======  =======
model             channels            depths       stem   params   FLOPs
================  ==================  ===========  =====  =======  =======
``maxvit_tiny``   64, 128, 256, 512   2, 2, 5, 2   64     31M      5.6G
================  ==================  ===========  =====  =======  =======

(Paper Table 1 / Sec. 4.1, ImageNet-1K at 224; FLOPs are multiply-adds.) Key names are
timm's (``maxvit_tiny_tf_224``) but for the bias table, which sits in the attention, not in
a ``rel_pos`` child: :func:`load_pretrained` maps timm's checkpoints.

Beyond timm: any input size. Strided convolutions and pools pad as TF's SAME (as timm's
``padding='same'``), and the attention pads to multiples of 7 and masks the padding
(timm fixes the partition at ``img_size // 32`` and needs divisible maps).
timm's backbone interface (:mod:`.features`): ``feature_info`` (stem and four stages),
``forward_intermediates``, ``set_grad_checkpointing``, ``device=`` / ``dtype=``.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..layers.maxvit import MaxViTBlockAttention, MaxViTGridAttention, convert_timm_maxvit_keys
from . import register_model
from .common import DropPath, PreNormBlock
from .common import load_pretrained as _load
from .features import (
    GradCheckpointing,
    Indices,
    check_output_fmt,
    checkpointing_now,
    factory_kwargs,
    feature_info,
    feature_take_indices,
    run_blocks,
    to_fmt,
)

__all__ = ["MaxViT", "MaxViTBlock", "MBConv", "load_pretrained", "convert_timm_maxvit"]

_PAPER = "Tu et al., MaxViT: Multi-Axis Vision Transformer"
BN_EPS = 1e-3  # the TF models' BatchNorm epsilon
LN_EPS = 1e-5


def _same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TF's SAME padding for a strided window: total ``max((ceil(n/s) - 1)s + k - n, 0)``,
    the smaller half at the top/left."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF's SAME padding: symmetric at stride 1, computed per input
    size when strided (timm's ``Conv2dSame``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = True) -> None:
        pad = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, pad, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm (eps 1e-3), then tanh-GELU unless ``act=False`` (timm's ``BatchNormAct2d``:
    the same keys as ``nn.BatchNorm2d``)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.act = nn.GELU(approximate="tanh") if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    """MBConv's squeeze-excitation: ``x * sigmoid(fc2(SiLU(fc1(GAP(x)))))`` with 1x1 convs
    (timm's ``SEModule`` names). Not the registered ``se`` (ReLU, linear layers)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class Downsample2d(nn.Module):
    """MBConv's strided shortcut: 2x2 average pool (SAME, zeros averaged in, as timm's
    ``AvgPool2dSame``), then a 1x1 conv where the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(F.avg_pool2d(_same_pad(x, 2, 2), 2, 2))


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation (paper Sec. 3.2; timm's
    ``MbConvBlock`` names): ``shortcut(x) + conv3(SE(dw3x3(conv1(BN(x)))))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4,
                 se_ratio: float = 0.25, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = cout * expand
        self.shortcut = Downsample2d(cin, cout) if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(cin, act=False)
        self.conv1_1x1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm1 = BatchNormAct2d(mid)
        self.conv2_kxk = SameConv2d(mid, mid, 3, stride, groups=mid, bias=False)
        self.norm2 = BatchNormAct2d(mid)
        self.se = SqueezeExcite(mid, int(cout * se_ratio))
        self.conv3_1x1 = nn.Conv2d(mid, cout, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        y = self.se(self.norm2(self.conv2_kxk(y)))
        return self.shortcut(x) + self.drop_path(self.conv3_1x1(y))


def _partition_block(attn: nn.Module, dim: int, drop_path: float) -> PreNormBlock:
    block = PreNormBlock(dim, attn, mlp_ratio=4.0, drop_path=drop_path, norm_eps=LN_EPS)
    block.mlp.act = nn.GELU(approximate="tanh")
    return block


class MaxViTBlock(nn.Module):
    """MBConv, then block attention + MLP, then grid attention + MLP (paper Fig. 2), on
    ``(B, C, H, W)``; the attention halves run on the ``(B, H, W, C)`` view."""

    def __init__(self, cin: int, cout: int, stride: int = 1, partition: int = 7,
                 head_dim: int = 32, drop_path: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.conv = MBConv(cin, cout, stride, drop_path=drop_path)
        heads = cout // head_dim
        self.attn_block = _partition_block(
            MaxViTBlockAttention(cout, heads, partition, attn_drop=attn_drop), cout, drop_path)
        self.attn_grid = _partition_block(
            MaxViTGridAttention(cout, heads, partition, attn_drop=attn_drop), cout, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.attn_grid(self.attn_block(x)).permute(0, 3, 1, 2)


class MaxViTStage(nn.Module):
    """``blocks``: the stage's MaxViT blocks, the first one downsampling."""

    grad_checkpointing = False

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, x, checkpointing_now(self))


class Stem(nn.Module):
    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.conv1 = SameConv2d(cin, width, 3, 2)
        self.norm1 = BatchNormAct2d(width)
        self.conv2 = SameConv2d(width, width, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Head(nn.Module):
    """Global average pool, LayerNorm, ``tanh(pre_logits.fc)``, dropout, ``fc`` (timm's
    ``NormMlpClassifierHead`` names)."""

    def __init__(self, dim: int, hidden: int, num_classes: int, drop: float = 0.0,
                 norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS) if norm else nn.Identity()
        self.pre_logits = (nn.Sequential(OrderedDict(fc=nn.Linear(dim, hidden), act=nn.Tanh()))
                           if hidden else nn.Identity())
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(hidden or dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pre_logits(self.norm(x.mean((2, 3)))))
        return x if pre_logits else self.fc(x)


def _init(module: nn.Module) -> None:
    """The official initialisation: every kernel N(0, 0.02), biases zero."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MaxViT(GradCheckpointing, nn.Module):
    """MaxViT on ``(B, 3, H, W)`` images, any ``H, W``.

    Args:
        img_size: nominal input size (documentation and FLOP counts only).
        in_chans, num_classes, embed_dims, depths, stem_width, head_hidden: the network's
            sizes (``head_hidden`` 0: no pre-logits layer). partition: window and grid
            size (7). head_dim: channels per head (32; ``embed_dims`` its multiples).
            drop_rate: before the classifier. attn_drop_rate: attention weights.
        drop_path_rate: stochastic depth of block ``i`` of ``n`` is ``rate * i / n``, as in
            the official code (0.2 for MaxViT-T in the paper).
        device, dtype: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 5, 2),
        stem_width: int = 64,
        head_hidden: int = 512,
        partition: int = 7,
        head_dim: int = 32,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if len(embed_dims) != len(depths):
            raise ValueError(f"maxvit: embed_dims {tuple(embed_dims)} and depths "
                             f"{tuple(depths)} differ in length")
        check_positive("maxvit", stem_width=stem_width, partition=partition, head_dim=head_dim)
        if any(d % head_dim for d in embed_dims):
            raise ValueError(f"maxvit: embed_dims {tuple(embed_dims)} must be multiples of "
                             f"head_dim {head_dim}")
        self.img_size, self.num_classes = img_size, num_classes
        self.stem = Stem(in_chans, stem_width)
        total, k, stages, cin = sum(depths), 0, [], stem_width
        for dim, depth in zip(embed_dims, depths, strict=True):
            blocks = []
            for j in range(depth):
                blocks.append(MaxViTBlock(cin if j == 0 else dim, dim, 2 if j == 0 else 1,
                                          partition, head_dim, drop_path_rate * k / total,
                                          attn_drop_rate))
                k += 1
            stages.append(MaxViTStage(blocks))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dims[-1]
        self.stage_dims = tuple(embed_dims)
        self.norm = nn.Identity()  # the head norms (timm: no final norm with a head MLP)
        self.head = Head(self.num_features, head_hidden, num_classes, drop_rate)
        self.feature_info = feature_info(
            [stem_width, *embed_dims], [2 ** (i + 1) for i in range(len(depths) + 1)],
            ["stem"] + [f"stages.{i}" for i in range(len(depths))],
        )
        self.apply(_init)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"maxvit: expected images (B, C, H, W), got shape {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``MaxxVit.forward_intermediates``: level 0 is the stem (stride 2),
        levels 1-4 the stages; ``norm`` applies the final norm (an identity here, as in
        timm's models with a head MLP) to the last stage."""
        self._check(x)
        check_output_fmt(output_fmt, "maxvit")
        take, last = feature_take_indices(len(self.stages) + 1, indices, "maxvit")
        x = self.stem(x)
        out = [to_fmt(x, output_fmt, channels_last=False)] if 0 in take else []
        stages = self.stages[:last] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == len(self.stages) else x
                out.append(to_fmt(y, output_fmt, channels_last=False))
        if intermediates_only:
            return out
        return (self.norm(x) if len(stages) == len(self.stages) else x), out

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the head)."""
        take, last = feature_take_indices(len(self.stages) + 1, indices, "maxvit")
        self.stages = self.stages[:last]
        if prune_head:  # pooled features only, nothing left unused
            self.head = Head(self.num_features, 0, 0, norm=False)
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C_4, H/32, W/32)`` features before the head."""
        self._check(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def convert_timm_maxvit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm ``maxvit_*_tf`` keys -> ours: the bias tables move out of ``rel_pos``
    (:func:`~spatial_attention.layers.maxvit.convert_timm_maxvit_keys`)."""
    return convert_timm_maxvit_keys(state)


def load_pretrained(
    model: MaxViT, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> MaxViT:
    """Load a timm ``maxvit_*_tf`` checkpoint (see :func:`models.common.load_pretrained`)."""
    return _load(model, source, convert_timm_maxvit, strict=strict)


@register_model("maxvit_tiny", paper=_PAPER + " (MaxViT-T, Table 1)", year=2022)
def maxvit_tiny(**kwargs: Any) -> MaxViT:
    """MaxViT-T: channels 64-128-256-512, depths 2-2-5-2, stem 64 (30.9M params, 5.6G FLOPs)."""
    return MaxViT(**kwargs)

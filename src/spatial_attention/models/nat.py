"""Neighborhood Attention Transformer (Hassani et al. CVPR 2023), built from
``neighborhood_attention``.

Architecture as in SHI-Labs/Neighborhood-Attention-Transformer ``classification/nat.py``:
a convolutional tokenizer (two 3x3 stride-2 convolutions, ``C/2`` then ``C`` channels, and
a LayerNorm: stride 4), four levels of pre-norm blocks (neighbourhood attention with
kernel 7 and relative position bias, MLP of ratio ``r``, stochastic depth growing
linearly), a 3x3 stride-2 convolution without bias and a LayerNorm between levels (at the
*end* of levels 0-2, as the official code), a final LayerNorm, global average pooling and
a linear head. Sizes (paper and official README, ImageNet-1K at 224, kernel 7):

==============  =====  ===========  ============  =====  =======  =====  ===========
model           C      depths       heads         r      params   FLOPs  layer scale
==============  =====  ===========  ============  =====  =======  =====  ===========
``nat_mini``    64     3, 4, 6, 5   2, 4, 8, 16   3      20M      2.7G   --
``nat_tiny``    64     3, 4, 18, 5  2, 4, 8, 16   3      28M      4.3G   --
``nat_small``   96     3, 4, 18, 5  3, 6, 12, 24  2      51M      7.8G   1e-5
``nat_base``    128    3, 4, 18, 5  4, 8, 16, 32  2      90M      13.7G  1e-5
==============  =====  ===========  ============  =====  =======  =====  ===========

(FLOPs are multiply-adds; the attention counts ``k^2`` keys per query.) State-dict keys
are the official ones (``patch_embed.proj.{0,1}``, ``levels.{i}.blocks.{j}.attn.{qkv,rpb,
proj}``, ``levels.{i}.downsample.reduction``, ``head``), so the released checkpoints load
as they are (:func:`load_pretrained` unwraps ``{'model': ...}`` and ``module.``).
``dilations`` (one list per level) builds DiNAT's layout on the same network. Any input
size runs: the convolutions pad, and a map smaller than the kernel is padded by the
attention as NATTEN's module does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..layers.neighborhood import NeighborhoodAttention
from . import register_model
from .common import PreNormBlock, drop_path_rates, init_transformer_weights
from .common import load_pretrained as _load
from .features import factory_kwargs

__all__ = ["NAT", "NATLayer", "ConvTokenizer", "ConvDownsampler", "load_pretrained"]

_PAPER = "Hassani et al., Neighborhood Attention Transformer"


class ConvTokenizer(nn.Module):
    """``(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C)``: two 3x3 stride-2 convolutions
    (padding 1, with bias) and a LayerNorm over channels."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)``: a 3x3 stride-2 convolution
    without bias, then a LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLayer(PreNormBlock):
    """``x + DropPath(g1 * NA(LN(x)))``, then ``x + DropPath(g2 * MLP(LN(x)))``; the
    per-channel scales ``gamma1``, ``gamma2`` exist only with ``layer_scale`` (NAT-S/B)."""

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int | None = None,
        mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
        drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation or 1,
                                     qkv_bias=qkv_bias, qk_scale=qk_scale,
                                     attn_drop=attn_drop, proj_drop=drop)
        super().__init__(dim, attn, mlp_ratio, drop, drop_path)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.layer_scale:
            return super().forward(x)
        x = x + self.drop_path1(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x)))


class NATLevel(nn.Module):
    """One level: ``blocks`` then, except in the last level, ``downsample``."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class NAT(nn.Module):
    """Neighborhood Attention Transformer on ``(B, 3, H, W)`` images, any ``H, W``.

    Args: ``embed_dim``, ``mlp_ratio``, ``depths``, ``num_heads``, ``drop_path_rate``,
    ``in_chans``, ``kernel_size``, ``dilations`` (per level, per block; None: 1),
    ``num_classes``, ``qkv_bias``, ``qk_scale``, ``drop_rate``, ``attn_drop_rate``,
    ``layer_scale``: as the official ``NAT``. ``device``, ``dtype``: where and in what
    precision to build (``"meta"`` allocates nothing).
    """

    @factory_kwargs
    def __init__(
        self,
        embed_dim: int = 64,
        mlp_ratio: float = 3.0,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads) or (dilations is not None
                                             and len(dilations) != len(depths)):
            raise ValueError(f"nat: depths {tuple(depths)}, num_heads {tuple(num_heads)} "
                             "and dilations must have one entry per level")
        check_positive("nat", embed_dim=embed_dim, kernel_size=kernel_size)
        self.num_classes, self.num_levels = num_classes, len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_levels - 1))
        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        levels, n = [], 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = int(embed_dim * 2**i)
            blocks = [
                NATLayer(dim, heads, kernel_size,
                         None if dilations is None else dilations[i][j], mlp_ratio,
                         qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates[n + j],
                         layer_scale)
                for j in range(depth)
            ]
            down = ConvDownsampler(dim) if i < self.num_levels - 1 else None
            levels.append(NATLevel(blocks, down))
            n += depth
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.apply(init_transformer_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, H/32, W/32, C_4)`` tokens after the final LayerNorm."""
        if x.dim() != 4:
            raise ValueError(f"nat: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


def load_pretrained(
    model: NAT, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> NAT:
    """Load an official NAT / DiNAT checkpoint (its keys are ours; see
    :func:`models.common.load_pretrained` for the wrappings and errors)."""
    return _load(model, source, None, strict=strict)


_SIZES: dict[str, dict[str, Any]] = {
    "mini": dict(embed_dim=64, mlp_ratio=3, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
                 drop_path_rate=0.2),
    "tiny": dict(embed_dim=64, mlp_ratio=3, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16),
                 drop_path_rate=0.2),
    "small": dict(embed_dim=96, mlp_ratio=2, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24),
                  drop_path_rate=0.3, layer_scale=1e-5),
    "base": dict(embed_dim=128, mlp_ratio=2, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32),
                 drop_path_rate=0.5, layer_scale=1e-5),
}


@register_model("nat_mini", paper=_PAPER + " (NAT-Mini)", year=2023)
def nat_mini(**kwargs: Any) -> NAT:
    """NAT-Mini: C 64, depths 3-4-6-5, heads 2-4-8-16, MLP ratio 3, kernel 7 (20M, 2.7G)."""
    return NAT(**{**_SIZES["mini"], **kwargs})


@register_model("nat_tiny", paper=_PAPER + " (NAT-Tiny)", year=2023)
def nat_tiny(**kwargs: Any) -> NAT:
    """NAT-Tiny: C 64, depths 3-4-18-5, heads 2-4-8-16, MLP ratio 3, kernel 7 (28M, 4.3G)."""
    return NAT(**{**_SIZES["tiny"], **kwargs})


@register_model("nat_small", paper=_PAPER + " (NAT-Small)", year=2023)
def nat_small(**kwargs: Any) -> NAT:
    """NAT-Small: C 96, depths 3-4-18-5, heads 3-6-12-24, MLP ratio 2, layer scale 1e-5."""
    return NAT(**{**_SIZES["small"], **kwargs})


@register_model("nat_base", paper=_PAPER + " (NAT-Base)", year=2023)
def nat_base(**kwargs: Any) -> NAT:
    """NAT-Base: C 128, depths 3-4-18-5, heads 4-8-16-32, MLP ratio 2, layer scale 1e-5."""
    return NAT(**{**_SIZES["base"], **kwargs})

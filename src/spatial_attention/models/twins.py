"""Twins (Chu et al. NeurIPS 2021): Twins-PCPVT and Twins-SVT, from ``twins_lsa``,
``twins_gsa`` and ``peg``.

Both are four-stage pyramids: a patch embedding (4x4 conv, then 2x2 convs, each with a
LayerNorm), pre-norm transformer blocks, a position encoding generator (PEG, a 3x3
depthwise conv with residual) after the first block of every stage, a final LayerNorm,
mean pooling and a linear head.

* **PCPVT**: every block is global sub-sampled attention (PVT's spatial reduction,
  sr = 8, 4, 2, 1 by stage) with CPVT's PEG instead of absolute position embeddings.
* **SVT**: blocks alternate locally-grouped self-attention (7x7 windows) and global
  sub-sampled attention (sr = 8, 4, 2, 1): LSA in even blocks, GSA in odd ones.

Sizes (paper Tables 1-2 and 4-5, ImageNet-1K at 224; FLOPs are multiply-adds):

=======================  ================  ============  =========  ======  ======
model                    dims              heads         depths     params  FLOPs
=======================  ================  ============  =========  ======  ======
``twins_pcpvt_small``    64,128,320,512    1,2,5,8       3,4,6,3    24.1M   3.8G
``twins_pcpvt_base``     64,128,320,512    1,2,5,8       3,4,18,3   43.8M   6.7G
``twins_pcpvt_large``    64,128,320,512    1,2,5,8       3,8,27,3   60.9M   9.8G
``twins_svt_small``      64,128,256,512    2,4,8,16      2,2,10,4   24.0M   2.9G
``twins_svt_base``       96,192,384,768    3,6,12,24     2,2,18,2   56.1M   8.6G
``twins_svt_large``      128,256,512,1024  4,8,16,32     2,2,18,2   99.3M   15.1G
=======================  ================  ============  =========  ======  ======

(MLP ratios 8, 8, 4, 4 for PCPVT and 4 for SVT.) State-dict keys are the official
repository's, which timm's ``twins.py`` shares (``patch_embeds``, ``blocks.i.j``,
``pos_block.i.proj.0``, ``norm``, ``head``), so both load without renaming.

Beyond the official code: any input size. Patch embeddings pad to their stride (the
official code floors), LSA pads *and masks* (the official code and timm pad without
masking), GSA keeps the official floor of the reduced grid.

timm's backbone interface (see :mod:`.features`): ``feature_info`` and
``forward_intermediates`` as timm's ``Twins`` (one level per stage; timm names the
modules ``block.i``, the attribute is ``blocks``), ``set_grad_checkpointing`` (per block;
timm's Twins has none), ``device=`` / ``dtype=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers.global_attention import GlobalSubsampledAttention
from ..layers.position import PositionEncodingGenerator
from ..layers.window import WindowAttention
from . import register_model
from .common import PatchEmbed, PreNormBlock, drop_path_rates, init_transformer_weights
from .common import load_pretrained as _load
from .features import (
    GradCheckpointing,
    Indices,
    checkpointing_now,
    factory_kwargs,
    feature_info,
    feature_take_indices,
    run_blocks,
    stage_intermediates,
)

__all__ = ["TwinsBlock", "Twins", "load_pretrained"]

_PAPER = "Chu et al., Twins: Revisiting the Design of Spatial Attention in Vision Transformers"


class TwinsBlock(PreNormBlock):
    """Pre-norm block on ``(B, H, W, C)`` whose mixer is LSA (``window > 1``) or GSA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        window: int | None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        if window:
            attn = WindowAttention(
                dim, num_heads, window_size=window, position_bias=False,
                attn_drop=attn_drop, proj_drop=drop,
            )
        else:
            attn = GlobalSubsampledAttention(
                dim, num_heads, sr_ratio=sr_ratio, attn_drop=attn_drop, proj_drop=drop
            )
        # eps 1e-6 as the official Twins and timm build every block norm; it matters
        # whenever a token's variance is near 1e-5
        super().__init__(dim, attn, mlp_ratio, drop, drop_path, norm_eps=1e-6)


class Twins(GradCheckpointing, nn.Module):
    """Twins-PCPVT (``wss=None``) or Twins-SVT (``wss`` the LSA window per stage).

    Shapes: ``(B, 3, H, W)`` images, any ``H, W`` -> ``(B, num_classes)`` logits.
    ``device``, ``dtype``: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        wss: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        n = len(depths)
        lengths = {len(embed_dims), len(num_heads), len(mlp_ratios), len(sr_ratios)}
        if wss is not None:
            lengths.add(len(wss))
        if lengths != {n}:
            raise ValueError(
                "twins: embed_dims, num_heads, mlp_ratios, depths, sr_ratios (and wss) must "
                f"have one entry per stage; got lengths {sorted(lengths | {n})}"
            )
        self.img_size, self.num_classes = img_size, num_classes
        self.patch_embeds = nn.ModuleList()
        self.pos_drops = nn.ModuleList()
        prev = in_chans
        for i, dim in enumerate(embed_dims):
            self.patch_embeds.append(PatchEmbed(prev, dim, patch_size if i == 0 else 2))
            self.pos_drops.append(nn.Dropout(drop_rate))
            prev = dim
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.blocks = nn.ModuleList()
        k = 0
        for i, depth in enumerate(depths):
            self.blocks.append(nn.ModuleList(
                TwinsBlock(
                    embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i],
                    window=None if wss is None or j % 2 == 1 else wss[i],
                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[k + j],
                )
                for j in range(depth)
            ))
            k += depth
        self.pos_block = nn.ModuleList(PositionEncodingGenerator(d) for d in embed_dims)
        self.num_features = embed_dims[-1]
        self.stage_dims = tuple(embed_dims)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)  # as the official code
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = feature_info(
            embed_dims, [patch_size * 2**i for i in range(n)], [f"blocks.{i}" for i in range(n)]
        )
        self.apply(init_transformer_weights)

    def _stage(self, i: int, x: Tensor) -> Tensor:
        # (B, C, H, W) image or (B, H, W, C) tokens of the previous stage -> (B, h, w, C_i)
        x = self.pos_drops[i](self.patch_embeds[i](x if i == 0 else x.permute(0, 3, 1, 2)))
        blocks, ckpt = self.blocks[i], checkpointing_now(self)
        x = run_blocks(blocks[:1], x, ckpt)
        if len(blocks):  # the PEG follows the stage's first block
            x = self.pos_block[i](x)
        return run_blocks(blocks[1:], x, ckpt)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"twins: expected images (B, C, H, W), got shape {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``Twins.forward_intermediates``: stage outputs ``(B, C_i, H / r_i,
        W / r_i)`` for the levels in ``indices``, the final norm on the last stage only
        (with ``norm``); ``stop_early`` skips the stages after the last level taken.
        Returns the list, or ``(final tokens (B, h, w, C), list)``."""
        self._check(x)
        return stage_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                   intermediates_only, "twins", channels_last=True,
                                   num_stages=len(self.blocks))

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the norm, the head);
        returns the absolute indices."""
        take, last = feature_take_indices(len(self.blocks), indices, "twins")
        # the final norm is sized for the last stage: gone with it
        prune_norm = prune_norm or last < len(self.blocks) - 1
        for name in ("patch_embeds", "pos_drops", "blocks", "pos_block"):
            setattr(self, name, getattr(self, name)[: last + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take

    def forward_features(self, x: Tensor, stages: bool = False) -> Tensor | list[Tensor]:
        """``(B, H/32, W/32, C_4)`` normed tokens; with ``stages=True`` the four stage
        outputs as ``(B, C_i, H_i, W_i)`` maps, for dense heads
        (``forward_intermediates(x, intermediates_only=True)``)."""
        if stages:
            return self.forward_intermediates(x, intermediates_only=True)
        self._check(x)
        for i in range(len(self.blocks)):
            x = self._stage(i, x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


def load_pretrained(
    model: Twins, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> Twins:
    """Load an official or timm Twins checkpoint (the two share key names)."""
    return _load(model, source, None, strict=strict)


_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
              sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), wss=(7, 7, 7, 7))


def _twins(defaults: dict[str, Any], kwargs: dict[str, Any]) -> Twins:
    return Twins(**{**defaults, **kwargs})


@register_model("twins_pcpvt_small", paper=_PAPER + " (Twins-PCPVT-S, Table 1)", year=2021)
def twins_pcpvt_small(**kwargs: Any) -> Twins:
    """Twins-PCPVT-S: GSA everywhere + PEG, depths 3-4-6-3 (24.1M params, 3.8G FLOPs)."""
    return _twins(dict(_PCPVT, depths=(3, 4, 6, 3), drop_path_rate=0.2), kwargs)


@register_model("twins_pcpvt_base", paper=_PAPER + " (Twins-PCPVT-B, Table 1)", year=2021)
def twins_pcpvt_base(**kwargs: Any) -> Twins:
    """Twins-PCPVT-B: depths 3-4-18-3 (43.8M params, 6.7G FLOPs)."""
    return _twins(dict(_PCPVT, depths=(3, 4, 18, 3), drop_path_rate=0.3), kwargs)


@register_model("twins_pcpvt_large", paper=_PAPER + " (Twins-PCPVT-L, Table 1)", year=2021)
def twins_pcpvt_large(**kwargs: Any) -> Twins:
    """Twins-PCPVT-L: depths 3-8-27-3 (60.9M params, 9.8G FLOPs)."""
    return _twins(dict(_PCPVT, depths=(3, 8, 27, 3), drop_path_rate=0.3), kwargs)


@register_model("twins_svt_small", paper=_PAPER + " (Twins-SVT-S, Table 4)", year=2021)
def twins_svt_small(**kwargs: Any) -> Twins:
    """Twins-SVT-S: LSA/GSA alternating, dims 64-512, depths 2-2-10-4 (24M, 2.9G FLOPs)."""
    return _twins(dict(_SVT, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16),
                       depths=(2, 2, 10, 4), drop_path_rate=0.2), kwargs)


@register_model("twins_svt_base", paper=_PAPER + " (Twins-SVT-B, Table 4)", year=2021)
def twins_svt_base(**kwargs: Any) -> Twins:
    """Twins-SVT-B: dims 96-768, depths 2-2-18-2 (56M params, 8.6G FLOPs)."""
    return _twins(dict(_SVT, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                       depths=(2, 2, 18, 2), drop_path_rate=0.3), kwargs)


@register_model("twins_svt_large", paper=_PAPER + " (Twins-SVT-L, Table 4)", year=2021)
def twins_svt_large(**kwargs: Any) -> Twins:
    """Twins-SVT-L: dims 128-1024, depths 2-2-18-2 (99.2M params, 15.1G FLOPs)."""
    return _twins(dict(_SVT, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                       depths=(2, 2, 18, 2), drop_path_rate=0.3), kwargs)


@register_model("twins_svt_micro_cifar", paper=_PAPER + " (scaled down for 32x32 inputs)",
                year=2021)
def twins_svt_micro_cifar(**kwargs: Any) -> Twins:
    """A ~5M-parameter Twins-SVT for CIFAR: patch 2, dims 64-128-256, window 4, sr 4-2-1."""
    return _twins(dict(img_size=32, patch_size=2, embed_dims=(64, 128, 256),
                       num_heads=(2, 4, 8), mlp_ratios=(4, 4, 4), depths=(2, 2, 6),
                       sr_ratios=(4, 2, 1), wss=(4, 4, 4), num_classes=10,
                       drop_path_rate=0.1), kwargs)

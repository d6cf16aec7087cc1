"""Tiny ViT-style classifiers for 32x32 images whose token mixer is any of our mechanisms.

Dosovitskiy et al., *An Image is Worth 16x16 Words* (ICLR 2021), scaled down for CIFAR
the way DeiT-Tiny scales ViT down (Touvron et al. 2021: dim 192, 3 heads, 12 blocks):
a strided-conv patch embedding (patch 2 or 4 instead of 16), a learned position
embedding, pre-norm blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))``, and a global
average pool of the tokens instead of a class token, so token mixers that keep the
spatial grid (windows, local attention) need no special token.

The token mixer is a registered mechanism of layout ``'tokens'`` (built as
``create(name, dim, num_heads)``, ``(B, H, W, C) -> (B, H, W, C)``) or a
``'sequence'`` self-attention that takes ``(dim, num_heads)`` such as ``multi_head``
(the grid is flattened to ``(B, N, C)`` around it). Default: ``multi_head``.

=====================  =====  =====  =====  =====  ===========
model                  patch  dim    depth  heads  params
=====================  =====  =====  =====  =====  ===========
``vit_micro_cifar``    4      96     6      3      0.68M
``vit_tiny_cifar``     4      192    12     3      5.4M
``vit_tiny_p2_cifar``  2      192    12     3      5.4M
=====================  =====  =====  =====  =====  ===========

(10 classes; the MLP ratio is 4 throughout.)

timm's backbone interface (see :mod:`.features`) with timm's ViT levels: one per block, all
at stride ``patch_size``, ``norm`` normalising every level (one norm serves all widths);
``set_grad_checkpointing`` (per block), ``device=`` / ``dtype=``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register_model
from .common import drop_path, drop_path_rates
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

__all__ = [
    "VisionTransformer",
    "resolve_token_mixer",
    "vit_micro_cifar",
    "vit_tiny_cifar",
    "vit_tiny_p2_cifar",
]

Mixer = str | Callable[[int, int], nn.Module]


def resolve_token_mixer(
    mixer: Mixer, **kwargs: Any
) -> tuple[Callable[[int, int], nn.Module], bool]:
    """``(factory(dim, num_heads) -> module, flatten)`` for a name or a callable.

    ``flatten`` is True when the module takes ``(B, N, C)`` (layout ``'sequence'``)
    rather than the ``(B, H, W, C)`` grid. A callable is taken to be a token mixer
    on ``(B, H, W, C)``.
    """
    if callable(mixer) and not isinstance(mixer, str):
        if kwargs:
            raise ValueError("VisionTransformer: mixer_kwargs only apply to a registered name")
        return mixer, False
    if not isinstance(mixer, str):
        raise ValueError(
            "VisionTransformer: token_mixer must be a mechanism name or a callable "
            f"(dim, num_heads) -> module, got {type(mixer).__name__}"
        )
    from ..registry import create, info

    entry = info(mixer)
    if entry.layout == "map":
        raise ValueError(
            f"VisionTransformer: {mixer!r} is a map mechanism (B, C, H, W); the token mixer "
            "must have layout 'tokens' (B, H, W, C) or be a sequence self-attention such as "
            "'multi_head' (see `spatial-attention list --layout tokens`)"
        )
    if entry.layout == "sequence":
        params = [p for p in inspect.signature(entry.cls.__init__).parameters if p != "self"]
        if params[:2] != ["dim", "num_heads"]:
            raise ValueError(
                f"VisionTransformer: sequence mechanism {mixer!r} is not a self-attention "
                f"(dim, num_heads) module (its signature is {entry.signature}); use "
                "'multi_head' or a 'tokens' mechanism"
            )

    def build(dim: int, num_heads: int) -> nn.Module:
        return create(mixer, dim, num_heads, **kwargs)

    return build, entry.layout == "sequence"


class Block(nn.Module):
    """Pre-norm transformer block on the ``(B, H, W, C)`` grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: Callable[[int, int], nn.Module],
        flatten: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = mixer(dim, num_heads)
        self.flatten = flatten
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _mix(self, x: Tensor) -> Tensor:
        if not self.flatten:
            return self.attn(x)
        B, H, W, C = x.shape
        return self.attn(x.reshape(B, H * W, C)).reshape(B, H, W, C)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = x + drop_path(self._mix(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(GradCheckpointing, nn.Module):
    """Patch embedding, pre-norm mixer/MLP blocks, mean pool, linear head.

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``. H and W need not divide the
    patch size (the image is zero-padded on the bottom/right), and need not equal
    ``img_size`` (the position embedding is resized bicubically). Cost per block:
    the mixer's plus ``4 * mlp_ratio * N * dim^2`` FLOPs for the MLP. ``device``,
    ``dtype``: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        token_mixer: Mixer = "multi_head",
        mixer_kwargs: dict[str, Any] | None = None,
        drop_path: float = 0.0,
        attn_layer: Mixer | None = None,
    ) -> None:
        super().__init__()
        for key, v in (("img_size", img_size), ("patch_size", patch_size), ("dim", dim),
                       ("depth", depth), ("num_heads", num_heads),
                       ("num_classes", num_classes)):
            if not v > 0:
                raise ValueError(f"VisionTransformer: {key} must be positive, got {v!r}")
        if dim % num_heads:
            raise ValueError(
                f"VisionTransformer: dim {dim} is not divisible by num_heads {num_heads}"
            )
        if attn_layer is not None:  # the trainer's --attn names the token mixer here
            token_mixer = attn_layer
        factory, flatten = resolve_token_mixer(token_mixer, **(mixer_kwargs or {}))
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_features = dim
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        grid = math.ceil(img_size / patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        # plain Python, so the model builds on the meta device
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.Sequential(
            *(Block(dim, num_heads, factory, flatten, mlp_ratio, r) for r in rates)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.feature_info = feature_info(
            [dim] * depth, [patch_size] * depth, [f"blocks.{i}" for i in range(depth)]
        )

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(H', W')`` for an input of ``height x width`` pixels."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def _pos(self, gh: int, gw: int) -> Tensor:
        pos = self.pos_embed
        if pos.shape[1:3] == (gh, gw):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                            align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def _embed(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"VisionTransformer: expected (B, C, H, W), got shape {tuple(x.shape)}"
            )
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H', W', C)
        return x + self._pos(x.shape[1], x.shape[2])

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, H/p, W/p, dim)`` normalised tokens."""
        return self.norm(run_blocks(self.blocks, self._embed(x), checkpointing_now(self)))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs ``(B, dim, H/p, W/p)`` for the levels in ``indices``, as timm's
        ViT: ``norm`` normalises each; ``stop_early`` skips the blocks after the last level
        taken. Returns the list, or ``(final normed tokens (B, h, w, dim), list)``."""
        check_output_fmt(output_fmt, "VisionTransformer")
        n = len(self.blocks)
        take, last = feature_take_indices(n, indices, "VisionTransformer")
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        x, out, ckpt = self._embed(x), [], checkpointing_now(self)
        for i, block in enumerate(blocks):
            x = run_blocks((block,), x, ckpt)
            if i in take:
                out.append(to_fmt(self.norm(x) if norm else x, output_fmt, channels_last=True))
        if intermediates_only:
            return out
        return (self.norm(x) if len(blocks) == n else x), out

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last level in ``indices`` (and the norm, the head);
        returns the absolute indices."""
        take, last = feature_take_indices(len(self.blocks), indices, "VisionTransformer")
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


_PAPER = "Dosovitskiy et al., An Image is Worth 16x16 Words (ViT), DeiT-Tiny scale for CIFAR"


def _vit(defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})



@register_model("vit_micro_cifar", paper=_PAPER, year=2021)
def vit_micro_cifar(*, img_size: int = 32, **kwargs: Any) -> VisionTransformer:
    """ViT for 32x32, patch 4, dim 96, depth 6, 3 heads (0.68M params): CPU-sized."""
    return _vit(dict(patch_size=4, dim=96, depth=6, num_heads=3, img_size=img_size), kwargs)


@register_model("vit_tiny_cifar", paper=_PAPER, year=2021)
def vit_tiny_cifar(*, img_size: int = 32, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny for 32x32, patch 4 (64 tokens), dim 192, depth 12, 3 heads (5.4M params)."""
    return _vit(dict(patch_size=4, dim=192, depth=12, num_heads=3, img_size=img_size), kwargs)


@register_model("vit_tiny_p2_cifar", paper=_PAPER, year=2021)
def vit_tiny_p2_cifar(*, img_size: int = 32, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny for 32x32, patch 2 (256 tokens), dim 192, depth 12, 3 heads (5.4M params)."""
    return _vit(dict(patch_size=2, dim=192, depth=12, num_heads=3, img_size=img_size), kwargs)

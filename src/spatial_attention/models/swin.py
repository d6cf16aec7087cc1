"""Swin Transformer (Liu et al. ICCV 2021), built from ``window_attention``.

Architecture as in microsoft/Swin-Transformer and timm: a 4x4 patch embedding with
LayerNorm, four stages of pre-norm blocks alternating W-MSA and SW-MSA (shift ``M//2``)
with an MLP of ratio 4, patch merging (2x2 neighbourhood -> LayerNorm(4C) -> linear 4C
-> 2C without bias) between stages, a final LayerNorm, global average pooling and a
linear head. Sizes (paper Table 1, ImageNet-1K at 224, window 7):

================  =====  ===============  ===============  =======  =======
model             C      depths           heads            params   FLOPs
================  =====  ===============  ===============  =======  =======
``swin_tiny``     96     2, 2, 6, 2       3, 6, 12, 24     28M      4.5G
``swin_small``    96     2, 2, 18, 2      3, 6, 12, 24     50M      8.7G
``swin_base``     128    2, 2, 18, 2      4, 8, 16, 32     88M      15.4G
================  =====  ===============  ===============  =======  =======

(FLOPs are multiply-adds, the paper's convention.) State-dict keys are timm's (patch
merging at the *start* of stages 1-3, ``head.fc``); :func:`load_pretrained` also takes
official checkpoints (merging at the *end* of stages 0-2, ``head``, stored
``relative_position_index`` and ``attn_mask`` buffers) and maps them.

Beyond the official code: any input size (patch embedding and merging pad, window
attention pads and masks), and :meth:`SwinTransformer.forward_features` returns the four
stage maps for dense tasks. Blocks are built by ``block_cls``, so variants that add a
branch to every block (BOAT) reuse the whole network.

timm's backbone interface (see :mod:`.features`): ``feature_info`` and
``forward_intermediates`` as timm's ``SwinTransformer`` (one level per stage, the final
norm only on the last), ``set_grad_checkpointing``, ``device=`` / ``dtype=``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..layers.window import WindowAttention
from . import register_model
from .common import PatchEmbed, PreNormBlock, drop_path_rates, init_transformer_weights
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

__all__ = ["SwinBlock", "PatchMerging", "SwinTransformer", "load_pretrained",
           "convert_official_swin"]

_PAPER = "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"


class SwinBlock(PreNormBlock):
    """``x + DropPath((S)W-MSA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))`` on (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        **_: Any,
    ) -> None:
        attn = WindowAttention(
            dim, num_heads, window_size=window_size, shift_size=shift_size,
            qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
        )
        super().__init__(dim, attn, mlp_ratio, drop, drop_path)


class PatchMerging(nn.Module):
    """``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)``: concatenate each 2x2
    neighbourhood (order (0,0), (1,0), (0,1), (1,1) as in the official code), LayerNorm,
    linear without bias. Odd sides are zero-padded (as the official detection code)."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, self.downsample(x), checkpointing_now(self))


class SwinTransformer(GradCheckpointing, nn.Module):
    """Swin Transformer on ``(B, 3, H, W)`` images, any ``H, W``.

    Args:
        img_size: nominal input size (documentation and FLOP counts only; any size runs).
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: as in the
            official code (stochastic depth grows linearly from 0 to ``drop_path_rate``).
        block_cls: the block class, called with ``dim, num_heads, window_size,
            shift_size, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, stage, index``.
        device, dtype: where and in what precision to build (``"meta"`` allocates nothing).
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        block_cls: type[nn.Module] = SwinBlock,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(
                f"swin: depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length"
            )
        check_positive("swin", embed_dim=embed_dim, window_size=window_size)
        self.img_size, self.num_classes = img_size, num_classes
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        dims = [embed_dim * 2**i for i in range(len(depths))]
        stages, k = [], 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            blocks = [
                block_cls(
                    dim=dims[i], num_heads=heads, window_size=window_size,
                    shift_size=0 if j % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=rates[k + j], stage=i, index=j, **block_kwargs,
                )
                for j in range(depth)
            ]
            down = PatchMerging(dims[i - 1], dims[i]) if i > 0 else nn.Identity()
            stages.append(SwinStage(down, blocks))
            k += depth
        self.layers = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.stage_dims = tuple(dims)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Module()
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = feature_info(
            dims, [patch_size * 2**i for i in range(len(dims))],
            [f"layers.{i}" for i in range(len(dims))],
        )
        self.apply(init_transformer_weights)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``SwinTransformer.forward_intermediates``: stage outputs
        ``(B, C_i, H / r_i, W / r_i)`` (``r_i`` = ``feature_info[i]['reduction']``) for the
        levels in ``indices``; ``norm`` applies the final norm to the last stage only (it is
        sized for it); ``stop_early`` skips the stages after the last level taken. Returns
        the list, or ``(final tokens (B, h, w, C), list)``."""
        if x.dim() != 4:
            raise ValueError(f"swin: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        check_output_fmt(output_fmt, "swin")
        take, last = feature_take_indices(len(self.layers), indices, "swin")
        stages = self.layers[: last + 1] if stop_early else self.layers
        x = self.pos_drop(self.patch_embed(x))
        out, n = [], len(self.layers)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                out.append(to_fmt(y, output_fmt, channels_last=True))
        if intermediates_only:
            return out
        return (self.norm(x) if len(stages) == n else x), out

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the norm, the head);
        returns the absolute indices, which stay valid for the pruned model."""
        take, last = feature_take_indices(len(self.layers), indices, "swin")
        # the final norm is sized for the last stage: gone with it
        prune_norm = prune_norm or last < len(self.layers) - 1
        self.layers = self.layers[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head.fc = nn.Identity()
        return take

    def forward_features(self, x: Tensor, stages: bool = False) -> Tensor | list[Tensor]:
        """``(B, H/32, W/32, C_4)`` normed tokens; with ``stages=True`` the four stage
        outputs as ``(B, C_i, H/2^(i+2), W/2^(i+2))`` maps (no final norm), for dense
        heads (FPN, UPerNet): ``forward_intermediates(x, intermediates_only=True)``."""
        if stages:
            return self.forward_intermediates(x, intermediates_only=True)
        if x.dim() != 4:
            raise ValueError(f"swin: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        return self.norm(self.layers(self.pos_drop(self.patch_embed(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        return self.head.fc(x.mean((1, 2)))


_STAGE_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample")


def convert_official_swin(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (microsoft/Swin-Transformer) or timm keys -> ours (timm's layout).

    Official checkpoints merge patches at the end of stages 0-2 (``layers.i.downsample``
    becomes ``layers.(i+1).downsample``), call the classifier ``head`` (``head.fc``
    here) and store the fixed ``relative_position_index`` and ``attn_mask`` buffers,
    which we compute instead. timm checkpoints pass through unchanged.
    """
    official = "layers.0.downsample.reduction.weight" in state
    out = {}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            k = _STAGE_DOWNSAMPLE.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
            if k.startswith("head.") and not k.startswith("head.fc."):
                k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def load_pretrained(
    model: SwinTransformer, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> SwinTransformer:
    """Load an official or timm Swin checkpoint (see :func:`models.common.load_pretrained`)."""
    return _load(model, source, convert_official_swin, strict=strict)


def _swin(defaults: dict[str, Any], kwargs: dict[str, Any]) -> SwinTransformer:
    return SwinTransformer(**{**defaults, **kwargs})


#: the paper's sizes (Table 1), shared by the variants built on Swin (BOAT-Swin)
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                  drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 drop_path_rate=0.5),
}


@register_model("swin_tiny", paper=_PAPER + " (Swin-T, Table 1)", year=2021)
def swin_tiny(**kwargs: Any) -> SwinTransformer:
    """Swin-T: C 96, depths 2-2-6-2, heads 3-6-12-24, window 7 (28.3M params, 4.5G FLOPs)."""
    return _swin(SWIN_SIZES["tiny"], kwargs)


@register_model("swin_small", paper=_PAPER + " (Swin-S, Table 1)", year=2021)
def swin_small(**kwargs: Any) -> SwinTransformer:
    """Swin-S: C 96, depths 2-2-18-2, heads 3-6-12-24, window 7 (49.6M, 8.7G FLOPs)."""
    return _swin(SWIN_SIZES["small"], kwargs)


@register_model("swin_base", paper=_PAPER + " (Swin-B, Table 1)", year=2021)
def swin_base(**kwargs: Any) -> SwinTransformer:
    """Swin-B: C 128, depths 2-2-18-2, heads 4-8-16-32, window 7 (87.8M, 15.4G FLOPs)."""
    return _swin(SWIN_SIZES["base"], kwargs)


@register_model("swin_micro_cifar", paper=_PAPER + " (scaled down for 32x32 inputs)", year=2021)
def swin_micro_cifar(**kwargs: Any) -> SwinTransformer:
    """A ~5M-parameter Swin for CIFAR: patch 2, C 64, depths 2-2-6, heads 2-4-8, window 4."""
    return _swin(dict(img_size=32, patch_size=2, embed_dim=64, depths=(2, 2, 6),
                      num_heads=(2, 4, 8), window_size=4, num_classes=10,
                      drop_path_rate=0.1), kwargs)

"""BiFormer (Zhu et al., CVPR 2023), with the official checkpoints' state-dict keys.

BiFormer (rayleizhu/BiFormer ``models/biformer.py``): a stem of two 3x3 stride-2
convolutions with BatchNorm (GELU between), then four stages, each after a 3x3 stride-2
convolution with BatchNorm (``downsample_layers``). A block, on ``(B, C, H, W)``: a 3x3
depthwise convolution added to its input (``pos_embed``), then pre-norm
``x + BRA(LN(x))``, ``x + MLP(LN(x))`` (LayerNorm eps 1e-6, MLP ratio 3, GELU). Stages
1-3 use bi-level routing attention (7x7 regions, top-k 1, 4, 16, ``qk_dim = dim``, heads
of width 32, LCE 5x5); stage 4 (one 7x7 map at 224) plain attention over every token
with LCE 5x5 on the attention's input, 8 heads, no qkv bias (the official
``AttentionLePE``, its ``topk=-2``). A BatchNorm, global average pooling and a linear
``head`` close the network.

=====================  ===  =============  ==========  ===============  ==================
model                  C    depths         top-k       params (paper)   GMACs 224 (paper)
=====================  ===  =============  ==========  ===============  ==================
``biformer_tiny``      64   2, 2, 8, 2     1, 4, 16    13.14M (13.1M)   2.216 (2.2)
``biformer_small``     64   4, 4, 18, 4    1, 4, 16    25.54M (25.5M)   4.464 (4.5)
``biformer_base``      96   4, 4, 18, 4    1, 4, 16    56.80M (56.8M)   9.759 (9.8)
=====================  ===  =============  ==========  ===============  ==================

(counted on these modules with 1000 classes; the parameters equal the official code's,
multiply-adds by ``apps.bench.count_flops``.)

Keys are the official ones but for BRA's ``QKVLinear`` (``attn.qkv.qkv`` there,
``attn.qkv`` here): :func:`load_pretrained` renames them and names every missing or
unexpected key. Beyond the official: any input size (BRA pads to its 7x7 regions and
masks the padding, see :class:`~spatial_attention.layers.biformer.BiLevelRoutingAttention`;
at 224 nothing is padded and the outputs are the official ones).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..layers.biformer import BiLevelRoutingAttention, convert_official_bra_keys
from ..layers.global_attention import GlobalAttention
from . import register_model
from .common import DropPath, drop_path_rates
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

__all__ = ["BiFormer", "BiFormerBlock", "GlobalAttentionLCE", "load_pretrained"]

_PAPER = "Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention"


class GlobalAttentionLCE(GlobalAttention):
    """BiFormer's last-stage attention: multi-head attention over every token plus a
    depthwise convolution of the *input* tokens, added before the output projection,
    ``proj(Attention(Q, K, V) + LCE(x))`` (the official ``AttentionLePE``). Not a
    registered mechanism itself."""

    registered_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5,
                 attn_impl: str | None = None) -> None:
        super().__init__(dim, num_heads, qkv_bias=False, attn_impl=attn_impl)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C)).view(B, H * W, 3, self.num_heads, self.head_dim)
        out = self._attend(*qkv.permute(2, 0, 3, 1, 4).unbind(0))  # (B, N, C)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        return self.proj_drop(self.proj(out)).view(B, H, W, C)


class BiFormerBlock(nn.Module):
    """``x + DWConv3x3(x)``, then ``x + DropPath(Attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))``
    on ``(B, C, H, W)`` (the attention and MLP on ``(B, H, W, C)``); ``topk > 0`` is BRA,
    ``topk = -2`` :class:`GlobalAttentionLCE` (the official's codes)."""

    def __init__(self, dim: int, num_heads: int, topk: int, n_win: int = 7,
                 mlp_ratio: float = 3.0, side_dwconv: int = 5, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(
                dim, num_heads, n_win=n_win, topk=topk, qk_dim=dim, side_dwconv=side_dwconv)
        elif topk == -2:
            self.attn = GlobalAttentionLCE(dim, side_dwconv=side_dwconv)
        else:
            raise ValueError(f"biformer: topk must be positive (BRA) or -2 (attention with "
                             f"LCE), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # index 1 is the official's optional depthwise conv (off in every released model)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(),
                                 nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormer(GradCheckpointing, nn.Module):
    """BiFormer on ``(B, 3, H, W)`` images, any ``H, W``.

    Args:
        depth, embed_dim, mlp_ratios, topks, n_win, head_dim, side_dwconv,
            drop_path_rate, num_classes, in_chans: as in the official ``BiFormer``
            (``qk_dims = embed_dim``, identity kv down-sampling, no layer scale, pre-norm:
            the released models' settings).
        img_size: nominal input size (documentation and FLOP counts only).
        device, dtype: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        depth: Sequence[int] = (2, 2, 8, 2),
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        head_dim: int = 32,
        side_dwconv: int = 5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(depth) == len(embed_dim) == len(mlp_ratios) == len(topks) == 4:
            raise ValueError(
                f"biformer: depth, embed_dim, mlp_ratios and topks need 4 entries each, got "
                f"{tuple(depth)}, {tuple(embed_dim)}, {tuple(mlp_ratios)}, {tuple(topks)}")
        self.img_size, self.num_classes = img_size, num_classes
        c0 = embed_dim[0]
        stem = nn.Sequential(
            nn.Conv2d(in_chans, c0 // 2, 3, stride=2, padding=1), nn.BatchNorm2d(c0 // 2),
            nn.GELU(), nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1), nn.BatchNorm2d(c0))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, stride=2, padding=1),
                          nn.BatchNorm2d(embed_dim[i + 1]))
            for i in range(3)])
        rates = drop_path_rates(drop_path_rate, sum(depth))
        self.stages = nn.ModuleList()
        k = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                BiFormerBlock(embed_dim[i], embed_dim[i] // head_dim, topks[i], n_win=n_win,
                              mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                              drop_path=rates[k + j])
                for j in range(depth[i])]))
            k += depth[i]
        self.num_features = embed_dim[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = feature_info(embed_dim, (4, 8, 16, 32),
                                         [f"stages.{i}" for i in range(4)])
        self.apply(_init_weights)

    @property
    def num_stages(self) -> int:
        """Stages present (4 unless pruned by :meth:`prune_intermediate_layers`)."""
        return len(self.stages)

    def _stage(self, i: int, x: Tensor) -> Tensor:
        x = self.downsample_layers[i](x)
        return run_blocks(self.stages[i], x, checkpointing_now(self))

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"biformer: expected images (B, C, H, W), got shape "
                             f"{tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``(B, C_i, H / r_i, W / r_i)`` for the levels in ``indices``;
        ``norm`` applies the final BatchNorm to the last stage only, ``stop_early`` skips
        the stages after the last level taken. Returns the list, or ``(final map, list)``."""
        self._check(x)
        return stage_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                   intermediates_only, "biformer", channels_last=False)

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices``, the norm and the head;
        returns the absolute indices."""
        take, last = feature_take_indices(self.num_stages, indices, "biformer")
        self.stages = self.stages[:last + 1]
        self.downsample_layers = self.downsample_layers[:last + 1]
        if prune_norm or last < 3:  # sized for the last stage only
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C_4, H/32, W/32)`` after the final BatchNorm."""
        self._check(x)
        for i in range(4):
            x = self._stage(i, x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).flatten(2).mean(-1))


def _init_weights(m: nn.Module) -> None:
    # the official init: Linear truncated normal (std 0.02), zero bias; LayerNorm 1, 0;
    # convolutions and BatchNorm keep PyTorch's defaults
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def convert_official_biformer_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The official checkpoint's keys as ours: BRA's ``attn.qkv.qkv.*`` -> ``attn.qkv.*``."""
    return convert_official_bra_keys(state_dict)


def load_pretrained(
    model: BiFormer, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True,
) -> BiFormer:
    """Load an official BiFormer checkpoint (``{'model': ...}`` as released, or a state
    dict). ``source``: a path (safetensors, or a torch file read with ``weights_only=True``)
    or a mapping; wrong keys or shapes raise a ValueError naming them."""
    return _load(model, source, convert_official_biformer_keys, strict=strict)


def _build(defaults: dict[str, Any], kwargs: dict[str, Any]) -> BiFormer:
    return BiFormer(**{**defaults, **kwargs})


_TINY = dict(depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512))
_SMALL = dict(depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512))
_BASE = dict(depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768))


@register_model("biformer_tiny", paper=_PAPER + " (BiFormer-T)", year=2023)
def biformer_tiny(**kwargs: Any) -> BiFormer:
    """BiFormer-T: C 64, depths 2-2-8-2, top-k 1-4-16, attention with LCE in stage 4."""
    return _build(_TINY, kwargs)


@register_model("biformer_small", paper=_PAPER + " (BiFormer-S)", year=2023)
def biformer_small(**kwargs: Any) -> BiFormer:
    """BiFormer-S: C 64, depths 4-4-18-4, top-k 1-4-16, attention with LCE in stage 4."""
    return _build(_SMALL, kwargs)


@register_model("biformer_base", paper=_PAPER + " (BiFormer-B)", year=2023)
def biformer_base(**kwargs: Any) -> BiFormer:
    """BiFormer-B: C 96, depths 4-4-18-4, top-k 1-4-16, attention with LCE in stage 4."""
    return _build(_BASE, kwargs)


"""DAT (Xia et al. CVPR 2022): the Deformable Attention Transformer, DAT-T/S/B.

A four-stage pyramid on ``(B, H, W, C)`` tokens: a 4x4 patch embedding (conv + LayerNorm),
pre-norm transformer blocks, 2x2 strided convs (no bias) + LayerNorm between stages, a
final LayerNorm, mean pooling and a linear head. Every stage alternates a local block
with a second one: stages 1-2 pair window attention (``L``, 7x7 windows, Swin's relative
position bias) with shifted window attention (``S``, shift ``ceil(7 / 2) = 4``), stages
3-4 pair it with deformable attention (``D``: :class:`~..layers.deformable_attention.
DeformableAttention`, offset groups 3 and 6 (T/S), offset kernels 5 and 3, range factor
2, the interpolated relative position bias). MLPs have ratio 4.

Sizes (paper Table 1 and the official configs, ImageNet-1K at 224; FLOPs multiply-adds):

=============  ==================  ===========  =========  ==========  ======  =====
model          dims                heads        depths     groups 3-4  params  FLOPs
=============  ==================  ===========  =========  ==========  ======  =====
``dat_tiny``   96,192,384,768      3,6,12,24    2,2,6,2    3, 6        29M     4.6G
``dat_small``  96,192,384,768      3,6,12,24    2,2,18,2   3, 6        50M     9.0G
``dat_base``   128,256,512,1024    4,8,16,32    2,2,18,2   4, 8        88M     15.8G
=============  ==================  ===========  =========  ==========  ======  =====

Built here: 28.3M / 49.7M / 87.9M parameters (the official code's counts; its DAT-T is
28.3M too) and 4.56 / 8.96 / 15.72 G multiply-adds at 224 (``count_flops``).

Official checkpoints (``LeapLabTHU/DAT``, the CVPR 2022 release) load with
:func:`load_pretrained` (:func:`convert_official_dat`: ``layer_norms.{2d, 2d+1}`` become
block ``d``'s ``norm1`` / ``norm2``, ``mlps.d.chunk.linear1/2`` its ``mlp.fc1/fc2``,
window blocks' ``proj_qkv`` / ``proj_out`` its ``attn.qkv`` / ``attn.proj``, deformable
blocks through :func:`~..layers.deformable_attention.convert_official_dat_keys`; the
official ``relative_position_index`` and ``attn_mask`` buffers are dropped: ours are
computed). Init as the official code: PyTorch's defaults (its ``reset_parameters``
visits parameters, not modules, and so changes nothing), position tables trunc-normal
0.01. Beyond the official code: any input size (the patch embedding and downsampling pad
to their stride, windows pad and mask, the deformable bias table stretches to the map).
timm's backbone interface as the other pyramids (:mod:`.features`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.deformable_attention import DeformableAttention, convert_official_dat_keys
from ..layers.window import WindowAttention
from . import register_model
from .common import PatchEmbed, PreNormBlock, drop_path_rates
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

__all__ = ["DATBlock", "DAT", "convert_official_dat", "load_pretrained"]

_PAPER = "Xia et al., Vision Transformer with Deformable Attention"


class DATBlock(PreNormBlock):
    """Pre-norm block on ``(B, H, W, C)`` whose mixer is ``L`` (window), ``S`` (shifted
    window) or ``D`` (deformable attention, its table sized for ``fmap_size``)."""

    def __init__(
        self, kind: str, dim: int, num_heads: int, window: int, fmap_size: tuple[int, int],
        groups: int, ksize: int, offset_range_factor: float, use_pe: bool,
        mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        if kind in ("L", "S"):
            attn: nn.Module = WindowAttention(
                dim, num_heads, window_size=window,
                shift_size=math.ceil(window / 2) if kind == "S" else 0,
                attn_drop=attn_drop, proj_drop=drop)
            with torch.no_grad():  # the official LocalAttention's table init
                nn.init.trunc_normal_(attn.relative_position_bias_table, std=0.01)
        elif kind == "D":
            attn = DeformableAttention(
                dim, num_heads, groups=groups, q_size=fmap_size, ksize=ksize,
                offset_range_factor=offset_range_factor, use_pe=use_pe,
                attn_drop=attn_drop, proj_drop=drop)
        else:
            raise ValueError(f"dat: block kind must be 'L', 'S' or 'D', got {kind!r}")
        super().__init__(dim, attn, mlp_ratio, drop, drop_path)
        self.kind = kind


class DAT(GradCheckpointing, nn.Module):
    """Deformable Attention Transformer (Xia et al. CVPR 2022, Sec. 3.3, Table 1).

    Shapes: ``(B, 3, H, W)`` images, any ``H, W`` -> ``(B, num_classes)`` logits.
    ``stage_spec``: one string of block kinds per stage (``"LS"``, ``"LD"``, ...);
    ``groups``, ``ksizes``, ``offset_range_factor``, ``use_pes``: the deformable blocks'
    settings per stage (ignored in stages without ``D``). ``device``, ``dtype``: where
    and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        stage_spec: Sequence[str] = ("LS", "LS", "LDLDLD", "LD"),
        window_sizes: Sequence[int] = (7, 7, 7, 7),
        groups: Sequence[int] = (1, 1, 3, 6),
        ksizes: Sequence[int] = (9, 7, 5, 3),
        offset_range_factor: Sequence[float] = (2, 2, 2, 2),
        use_pes: Sequence[bool] = (True, True, True, True),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        n = len(depths)
        per_stage = (dims, heads, stage_spec, window_sizes, groups, ksizes,
                     offset_range_factor, use_pes)
        if {len(v) for v in per_stage} != {n}:
            raise ValueError("dat: dims, heads, stage_spec, window_sizes, groups, ksizes, "
                             "offset_range_factor and use_pes need one entry per stage; got "
                             f"lengths {[len(v) for v in per_stage]} for {n} stages")
        if any(len(s) != d for s, d in zip(stage_spec, depths, strict=True)):
            raise ValueError(f"dat: stage_spec {list(stage_spec)} does not match depths "
                             f"{list(depths)} (one block kind per block)")
        self.img_size, self.num_classes = img_size, num_classes
        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        side, k = img_size // patch_size, 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.ModuleList(
                DATBlock(stage_spec[i][j], dims[i], heads[i], window_sizes[i], (side, side),
                         groups[i], ksizes[i], offset_range_factor[i], use_pes[i], mlp_ratio,
                         drop_rate, attn_drop_rate, rates[k + j])
                for j in range(depth)))
            k += depth
            if i < n - 1:
                down = PatchEmbed(dims[i], dims[i + 1], 2, channels_last_input=True)
                down.proj = nn.Conv2d(dims[i], dims[i + 1], 2, 2, bias=False)  # as official
                self.downsamples.append(down)
            side //= 2
        self.num_features = dims[-1]
        self.stage_dims = tuple(dims)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = feature_info(
            dims, [patch_size * 2**i for i in range(n)], [f"stages.{i}" for i in range(n)])

    def _stage(self, i: int, x: Tensor) -> Tensor:
        if i == 0:
            x = self.pos_drop(self.patch_embed(x))  # (B, C, H, W) -> (B, h, w, C_0)
        else:
            x = self.downsamples[i - 1](x)
        return run_blocks(self.stages[i], x, checkpointing_now(self))

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"dat: expected images (B, C, H, W), got shape {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``(B, C_i, H / r_i, W / r_i)`` for the levels in ``indices`` (the
        final norm on the last stage only, with ``norm``); ``stop_early`` skips the stages
        after the last level taken. Returns the list, or ``(final tokens, list)``."""
        self._check(x)
        return stage_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                   intermediates_only, "dat", channels_last=True,
                                   num_stages=len(self.stages))

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last level in ``indices`` (and the norm, the head);
        returns the absolute indices."""
        take, last = feature_take_indices(len(self.stages), indices, "dat")
        prune_norm = prune_norm or last < len(self.stages) - 1
        self.stages = self.stages[: last + 1]
        self.downsamples = self.downsamples[:last]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take

    def forward_features(self, x: Tensor, stages: bool = False) -> Tensor | list[Tensor]:
        """``(B, H/32, W/32, C_4)`` normed tokens; with ``stages=True`` the four stage
        outputs as ``(B, C_i, H_i, W_i)`` maps."""
        if stages:
            return self.forward_intermediates(x, intermediates_only=True)
        self._check(x)
        for i in range(len(self.stages)):
            x = self._stage(i, x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


#: official key patterns -> ours (after the stage/block renumbering below)
_TOP = (
    ("patch_proj.0.", "patch_embed.proj."),
    ("patch_proj.1.norm.", "patch_embed.norm."),
    ("cls_norm.norm.", "norm."),
    ("cls_head.", "head."),
)
_BLOCK = re.compile(r"^stages\.(\d+)\.(layer_norms|mlps|attns)\.(\d+)\.(.*)$")
_DOWN = re.compile(r"^down_projs\.(\d+)\.(0|1\.norm)\.(.*)$")


def convert_official_dat(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official DAT checkpoint's keys (``LeapLabTHU/DAT``, CVPR 2022 release) as ours.

    Accepts the checkpoint as saved (``{'model': ...}``, ``module.`` prefixes); the
    official buffers ``relative_position_index`` and ``attn_mask`` are dropped.
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        for old, ours in _TOP:
            if key.startswith(old):
                key = ours + key[len(old):]
                break
        down = _DOWN.match(key)
        if down:
            i, part, rest = down.groups()
            key = f"downsamples.{i}.{'proj' if part == '0' else 'norm'}.{rest}"
        block = _BLOCK.match(key)
        if block:
            i, kind, d, rest = block.groups()
            d = int(d)
            if kind == "layer_norms":  # two per block: 2d before attention, 2d+1 before MLP
                key = f"stages.{i}.{d // 2}.norm{d % 2 + 1}.{rest.removeprefix('norm.')}"
            elif kind == "mlps":
                rest = rest.replace("chunk.linear1.", "fc1.").replace("chunk.linear2.", "fc2.")
                key = f"stages.{i}.{d}.mlp.{rest}"
            else:
                key = f"stages.{i}.{d}.attn.{rest}"
        out[key] = value
    out = convert_official_dat_keys(out)  # deformable blocks (found by conv_offset keys)
    window = re.compile(r"^(stages\.\d+\.\d+\.attn\.)proj_(qkv|out)\.(.*)$")
    renamed = {}
    for key, value in out.items():
        m = window.match(key)
        if m:
            key = f"{m.group(1)}{'qkv' if m.group(2) == 'qkv' else 'proj'}.{m.group(3)}"
        renamed[key] = value
    return renamed


def load_pretrained(
    model: DAT, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> DAT:
    """Load an official DAT checkpoint (path or state dict) into ``model``."""
    return _load(model, source, convert_official_dat, strict=strict)


def _dat(defaults: dict[str, Any], kwargs: dict[str, Any]) -> DAT:
    return DAT(**{**defaults, **kwargs})


@register_model("dat_tiny", paper=_PAPER + " (DAT-T, Table 1)", year=2022)
def dat_tiny(**kwargs: Any) -> DAT:
    """DAT-T: dims 96-768, depths 2-2-6-2, deformable groups 3, 6 (29M params, 4.6G FLOPs)."""
    return _dat(dict(depths=(2, 2, 6, 2), stage_spec=("LS", "LS", "LD" * 3, "LD"),
                     drop_path_rate=0.2), kwargs)


@register_model("dat_small", paper=_PAPER + " (DAT-S, Table 1)", year=2022)
def dat_small(**kwargs: Any) -> DAT:
    """DAT-S: depths 2-2-18-2 (50M params, 9.0G FLOPs)."""
    return _dat(dict(depths=(2, 2, 18, 2), stage_spec=("LS", "LS", "LD" * 9, "LD"),
                     drop_path_rate=0.3), kwargs)


@register_model("dat_base", paper=_PAPER + " (DAT-B, Table 1)", year=2022)
def dat_base(**kwargs: Any) -> DAT:
    """DAT-B: dims 128-1024, heads 4-32, groups 4, 8, depths 2-2-18-2 (88M, 15.8G FLOPs)."""
    return _dat(dict(dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(1, 1, 4, 8),
                     depths=(2, 2, 18, 2), stage_spec=("LS", "LS", "LD" * 9, "LD"),
                     drop_path_rate=0.5), kwargs)

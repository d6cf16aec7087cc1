"""CSWin Transformer and BOAT-CSWin, with the reference implementations' state-dict keys.

CSWin (Dong et al., CVPR 2022; microsoft/CSWin-Transformer ``models/cswin.py``): a
7x7 stride-4 convolutional stem with LayerNorm (``stage1_conv_embed``), four stages of
pre-norm blocks ``x + CSWinAttn(LN(x))``, ``x + MLP(LN(x))`` (MLP ratio 4), a 3x3
stride-2 convolution with LayerNorm between stages (``merge1..3``), a final LayerNorm,
average pooling and a linear ``head``. Stripe widths 1, 2, 7, 7; the last stage attends
over the whole 7x7 map with one branch.

BOAT-CSWin (Yu et al., BMVC 2022; mahaoyuHKU/pytorch-boat ``BOAT-CSWin/models/
cswin_boat.py``): every even block (0, 2, ...) of every stage adds a feature-space
local attention branch after the stripe attention, ``x + FSLA(LN(x))`` (``norm3``,
``content_attn``).

=====================  ===  =============  =============  ========  ==============
model                  C    depths         heads          params    FLOPs (224)
=====================  ===  =============  =============  ========  ==============
``cswin_tiny``         64   1, 2, 21, 1    2, 4, 8, 16    22.3M     4.3G (paper)
``cswin_small``        64   2, 4, 32, 2    2, 4, 8, 16    34.6M     6.9G (paper)
``cswin_base``         96   2, 4, 32, 2    4, 8, 16, 32   77.4M     15.0G (paper)
``boat_cswin_tiny``    64   1, 2, 21, 1    2, 4, 8, 16    26.4M     see benchmarks/boat.md
``boat_cswin_small``   64   2, 4, 32, 2    2, 4, 8, 16    40.1M
``boat_cswin_base``    96   2, 4, 32, 2    4, 8, 16, 32   89.6M
=====================  ===  =============  =============  ========  ==============

(parameters counted on these modules with 1000 classes, equal to the reference code's
counts; FLOPs are multiply-adds, the papers' convention.)

State-dict keys are the reference's (``stage1.0.qkv``, ``stage1.0.attns.0.get_v``,
``stage1.0.content_attn.qkv``, ``merge1.conv``, ``head``): a block *is* its stripe
attention (:class:`CSWinBlock` subclasses
:class:`~spatial_attention.layers.cswin.CSWinAttention`) so the attention's parameters
sit directly in the block, as in the reference. :func:`load_pretrained` reads the
authors' checkpoints (``{'state_dict': ...}`` from timm's trainer) and names every
missing or unexpected key.

Beyond the reference: any input size (the reference fixes 224 at construction and
asserts square maps). ``reference_quirks=True`` reproduces two behaviours of the BOAT-
CSWin reference that its checkpoints were trained with: FSLA's attention scale of 1.0
(``qk_scale=qkv_bias`` there, i.e. True) instead of ``head_dim ** -0.5``, and, in the
last stage (one 7x7 group per image), FSLA pairing images ``2i`` and ``2i+1`` of the
batch as sibling groups (even batches only). Both are off by default.

timm's backbone interface (see :mod:`.features`; timm has no CSWin, so its Swin's
convention): ``feature_info`` (the outputs of ``stage1..4``, before the merge that follows,
at strides 4-32), ``forward_intermediates``, ``set_grad_checkpointing`` (per block),
``device=`` / ``dtype=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..layers.bilateral import FeatureSpaceLocalAttention
from ..layers.cswin import CSWinAttention
from . import register_model
from .common import DropPath, Mlp, drop_path_rates, init_transformer_weights
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

__all__ = ["CSWinBlock", "MergeBlock", "CSWinTransformer", "load_pretrained"]

_CSWIN = "Dong et al., CSWin Transformer: A General Vision Transformer Backbone with " \
    "Cross-Shaped Windows"
_BOAT = "Yu et al., BOAT: Bilateral Local Attention Vision Transformer"


class CSWinBlock(CSWinAttention):
    """``x + DropPath(CSWinAttn(LN(x)))`` [``+ DropPath(FSLA(LN(x)))``] ``+ DropPath(MLP(LN(x)))``.

    On ``(B, H, W, C)``. ``content=True`` adds BOAT's FSLA branch (``norm3``,
    ``content_attn``). Not a registered mechanism itself (errors name ``CSWinBlock``).
    """

    registered_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        last_stage: bool = False,
        content: bool = False,
        fsla_scale: float | None = None,
        pair_batch: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, split_size=split_size, last_stage=last_stage,
                         qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm1 = nn.LayerNorm(dim)
        self.content = content
        if content:
            self.content_attn = FeatureSpaceLocalAttention(
                dim, num_heads, qkv_bias=qkv_bias, scale=fsla_scale, attn_drop=attn_drop,
                pair_batch=pair_batch,
            )
            self.norm3 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        x = x + self.drop_path(self.mix(self.norm1(x)))
        if self.content:
            x = x + self.drop_path(self.content_attn(self.norm3(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    """``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C')``: 3x3 stride-2 conv, LayerNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class _ToTokens(nn.Module):
    # (B, C, H, W) -> (B, H, W, C); stands where the reference's einops Rearrange stands,
    # so the stem's LayerNorm keeps the key stage1_conv_embed.2
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class CSWinTransformer(GradCheckpointing, nn.Module):
    """CSWin / BOAT-CSWin on ``(B, 3, H, W)`` images, any ``H, W``.

    Args:
        embed_dim, depth, split_size, num_heads, mlp_ratio, qkv_bias, drop_rate,
            attn_drop_rate, drop_path_rate, num_classes, in_chans: as in the reference.
        boat: add FSLA to every even block of every stage (BOAT-CSWin).
        reference_quirks: reproduce the BOAT-CSWin reference's FSLA scale of 1.0 and its
            last-stage batch pairing (see the module docstring).
        img_size: nominal input size (documentation and FLOP counts only).
        device, dtype: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depth: Sequence[int] = (1, 2, 21, 1),
        split_size: Sequence[int] = (1, 2, 7, 7),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        boat: bool = False,
        reference_quirks: bool = False,
    ) -> None:
        super().__init__()
        if not len(depth) == len(split_size) == len(num_heads) == 4:
            raise ValueError(
                f"cswin: depth, split_size and num_heads need 4 entries each, got "
                f"{tuple(depth)}, {tuple(split_size)}, {tuple(num_heads)}"
            )
        self.img_size, self.num_classes = img_size, num_classes
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2), _ToTokens(),
            nn.LayerNorm(embed_dim),
        )
        rates = drop_path_rates(drop_path_rate, sum(depth))
        dims = [embed_dim * 2**i for i in range(4)]
        k = 0
        for i in range(4):
            blocks = [
                CSWinBlock(
                    dims[i], num_heads[i], split_size=split_size[i], mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=rates[k + j], last_stage=i == 3, content=boat and j % 2 == 0,
                    fsla_scale=1.0 if reference_quirks else None,
                    pair_batch=reference_quirks and i == 3,
                )
                for j in range(depth[i])
            ]
            setattr(self, f"stage{i + 1}", nn.ModuleList(blocks))
            if i < 3:
                setattr(self, f"merge{i + 1}", MergeBlock(dims[i], dims[i + 1]))
            k += depth[i]
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = feature_info(dims, (4, 8, 16, 32), [f"stage{i}" for i in range(1, 5)])
        self.apply(init_transformer_weights)

    @property
    def num_stages(self) -> int:
        """Stages present (4 unless pruned by :meth:`prune_intermediate_layers`)."""
        return sum(hasattr(self, f"stage{i}") for i in range(1, 5))

    def _stage(self, i: int, x: Tensor) -> Tensor:
        # stage i (0-based): the stem or the merge before it, then its blocks, on (B, H, W, C)
        x = self.stage1_conv_embed(x) if i == 0 else getattr(self, f"merge{i}")(x)
        return run_blocks(getattr(self, f"stage{i + 1}"), x, checkpointing_now(self))

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"cswin: expected images (B, C, H, W), got shape {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``(B, C_i, H / r_i, W / r_i)`` for the levels in ``indices``, with
        timm's Swin semantics: ``norm`` normalises the last stage only, ``stop_early``
        skips the stages after the last level taken. Returns the list, or ``(final tokens
        (B, h, w, C), list)``."""
        self._check(x)
        return stage_intermediates(self, x, indices, norm, stop_early, output_fmt,
                                   intermediates_only, "cswin", channels_last=True)

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and merges) after the last level in ``indices``, the norm and
        the head; returns the absolute indices."""
        take, last = feature_take_indices(self.num_stages, indices, "cswin")
        for i in range(last + 1, 4):
            for name in (f"merge{i}", f"stage{i + 1}"):
                if hasattr(self, name):
                    delattr(self, name)
        if prune_norm or last < 3:  # sized for the last stage only
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, H/32, W/32, C_4)`` normed tokens."""
        self._check(x)
        for i in range(4):
            x = self._stage(i, x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))


def load_pretrained(
    model: CSWinTransformer, source: str | os.PathLike | Mapping[str, Tensor],
    strict: bool = True,
) -> CSWinTransformer:
    """Load a reference CSWin / BOAT-CSWin checkpoint (keys are the same as ours).

    ``source``: a path (safetensors, or a torch file read with ``weights_only=True``) or
    a state dict; ``{'state_dict': ...}`` and ``module.`` prefixes are unwrapped. Wrong
    keys or shapes raise a ValueError naming them. To reproduce the BOAT-CSWin
    checkpoints' outputs, build the model with ``reference_quirks=True``.
    """
    return _load(model, source, None, strict=strict)


def _build(defaults: dict[str, Any], kwargs: dict[str, Any]) -> CSWinTransformer:
    return CSWinTransformer(**{**defaults, **kwargs})


_TINY = dict(embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)
_SMALL = dict(embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.4)
_BASE = dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)


@register_model("cswin_tiny", paper=_CSWIN + " (CSWin-T)", year=2022)
def cswin_tiny(**kwargs: Any) -> CSWinTransformer:
    """CSWin-T: C 64, depths 1-2-21-1, heads 2-4-8-16, stripes 1-2-7-7."""
    return _build(_TINY, kwargs)


@register_model("cswin_small", paper=_CSWIN + " (CSWin-S)", year=2022)
def cswin_small(**kwargs: Any) -> CSWinTransformer:
    """CSWin-S: C 64, depths 2-4-32-2, heads 2-4-8-16, stripes 1-2-7-7."""
    return _build(_SMALL, kwargs)


@register_model("cswin_base", paper=_CSWIN + " (CSWin-B)", year=2022)
def cswin_base(**kwargs: Any) -> CSWinTransformer:
    """CSWin-B: C 96, depths 2-4-32-2, heads 4-8-16-32, stripes 1-2-7-7."""
    return _build(_BASE, kwargs)


@register_model("boat_cswin_tiny", paper=_BOAT + " (BOAT-CSWin-T)", year=2022)
def boat_cswin_tiny(**kwargs: Any) -> CSWinTransformer:
    """BOAT-CSWin-T: CSWin-T with FSLA in every even block."""
    return _build({**_TINY, "boat": True}, kwargs)


@register_model("boat_cswin_small", paper=_BOAT + " (BOAT-CSWin-S)", year=2022)
def boat_cswin_small(**kwargs: Any) -> CSWinTransformer:
    """BOAT-CSWin-S: CSWin-S with FSLA in every even block."""
    return _build({**_SMALL, "boat": True}, kwargs)


@register_model("boat_cswin_base", paper=_BOAT + " (BOAT-CSWin-B)", year=2022)
def boat_cswin_base(**kwargs: Any) -> CSWinTransformer:
    """BOAT-CSWin-B: CSWin-B with FSLA in every even block."""
    return _build({**_BASE, "boat": True}, kwargs)

"""BOAT-Swin (Yu et al., BMVC 2022): Swin with feature-space local attention added.

The reference (mahaoyuHKU/pytorch-boat, ``BOAT-Swin/models/boat_swin_transformer.py``)
gives every shifted-window block (odd blocks) of stages 1-3 an extra residual branch
after the SW-MSA branch and before the MLP: ``x = x + FSLA(norm4(x))``, with the FSLA
module named ``attnC``. Stage 4 has none (at 224 its 7x7 map fills one window, so the
reference's blocks there are unshifted). As in the reference, the FSLA branch has no
stochastic depth.

The network is :class:`~spatial_attention.models.swin.SwinTransformer` with
:class:`BoatSwinBlock` as its block, so keys are timm's Swin layout plus
``layers.{i}.blocks.{j}.attnC.*`` and ``.norm4.*``; :func:`load_pretrained` maps the
reference's official-Swin layout (patch merging at the end of a stage, ``head``) the
way the Swin loader does.

=====================  ===  ============  ==============  =========================
model                  C    depths        heads           params (1000 classes)
=====================  ===  ============  ==============  =========================
``boat_swin_tiny``     96   2, 2, 6, 2    3, 6, 12, 24    30.3M
``boat_swin_small``    96   2, 2, 18, 2   3, 6, 12, 24    55.2M
``boat_swin_base``     128  2, 2, 18, 2   4, 8, 16, 32    97.6M
=====================  ===  ============  ==============  =========================

(equal to the reference code's counts.) FSLA's group size is the window area (49 for
window 7, as in the paper); the overlap with the sibling group is 20 at that size and
scales with it (``round(20 g / 49)``) for other windows, e.g. the small CIFAR variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers.bilateral import FeatureSpaceLocalAttention
from . import register_model
from .common import load_pretrained as _load
from .swin import SWIN_SIZES, SwinBlock, SwinTransformer, convert_official_swin

__all__ = ["BoatSwinBlock", "load_pretrained", "fsla_overlap"]

_BOAT = "Yu et al., BOAT: Bilateral Local Attention Vision Transformer"


def fsla_overlap(group_size: int) -> int:
    """The sibling overlap for a group size: 20 for 49 (the paper), scaled otherwise."""
    return 20 if group_size == 49 else max(0, round(20 * group_size / 49))


class BoatSwinBlock(SwinBlock):
    """Swin block with BOAT's FSLA branch between the (S)W-MSA and MLP branches.

    The branch exists where ``shift_size > 0`` and ``stage in fsla_stages`` (default
    stages 0-2). ``fsla=False`` builds the plain Swin block (the windows-only ablation).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        stage: int = 0,
        fsla_stages: Sequence[int] = (0, 1, 2),
        fsla: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads, window_size=window_size, shift_size=shift_size,
                         qkv_bias=qkv_bias, attn_drop=attn_drop, **kwargs)
        self.has_fsla = fsla and shift_size > 0 and stage in fsla_stages
        if self.has_fsla:
            g = window_size * window_size
            self.attnC = FeatureSpaceLocalAttention(
                dim, num_heads, group_size=g, overlap=fsla_overlap(g), qkv_bias=qkv_bias,
                attn_drop=attn_drop,
            )
            self.norm4 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        if self.has_fsla:
            x = x + self.attnC(self.norm4(x))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def load_pretrained(
    model: SwinTransformer, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> SwinTransformer:
    """Load a reference BOAT-Swin checkpoint (official Swin layout + ``attnC``/``norm4``).

    Paths are read as safetensors or with ``torch.load(weights_only=True)``; wrong keys or
    shapes raise a ValueError naming them.
    """
    return _load(model, source, convert_official_swin, strict=strict)


def _boat(defaults: dict[str, Any], kwargs: dict[str, Any]) -> SwinTransformer:
    return SwinTransformer(**{**defaults, "block_cls": BoatSwinBlock, **kwargs})


@register_model("boat_swin_tiny", paper=_BOAT + " (BOAT-Swin-T)", year=2022)
def boat_swin_tiny(**kwargs: Any) -> SwinTransformer:
    """BOAT-Swin-T: Swin-T with FSLA in the shifted blocks of stages 1-3 (30.3M params)."""
    return _boat(SWIN_SIZES["tiny"], kwargs)


@register_model("boat_swin_small", paper=_BOAT + " (BOAT-Swin-S)", year=2022)
def boat_swin_small(**kwargs: Any) -> SwinTransformer:
    """BOAT-Swin-S: Swin-S with FSLA in the shifted blocks of stages 1-3."""
    return _boat(SWIN_SIZES["small"], kwargs)


@register_model("boat_swin_base", paper=_BOAT + " (BOAT-Swin-B)", year=2022)
def boat_swin_base(**kwargs: Any) -> SwinTransformer:
    """BOAT-Swin-B: Swin-B with FSLA in the shifted blocks of stages 1-3."""
    return _boat(SWIN_SIZES["base"], kwargs)


@register_model("boat_swin_micro_cifar", paper=_BOAT + " (scaled down for 32x32 inputs)",
                year=2022)
def boat_swin_micro_cifar(**kwargs: Any) -> SwinTransformer:
    """``swin_micro_cifar`` (patch 2, C 64, depths 2-2-6, heads 2-4-8, window 4) with FSLA
    (groups of 16, overlap 7) in the shifted blocks of its first two stages."""
    return _boat(dict(img_size=32, patch_size=2, embed_dim=64, depths=(2, 2, 6),
                      num_heads=(2, 4, 8), window_size=4, num_classes=10,
                      drop_path_rate=0.1, fsla_stages=(0, 1)), kwargs)

"""MV-Swin-T (Sarker et al. 2024): a two-view Swin-V2 style classifier, from ``layers/``.

Architecture as in the reference code (prithuls/MV-Swin-T, ``MVSwinTransformer``):

* each view has its own 4x4 patch embedding (convolution + LayerNorm),
* stages 0 and 1 are *multi-view*: every view keeps its own weights (blocks with
  ``norm1_v``, ``mlp_v``, ``downsample_v``); stage 0 uses per-view Swin-V2 window
  attention, stage 1 the multi-head dynamic attention W-MDA / SW-MDA that mixes self and
  cross-view score maps (``diff_attn_layers = [1]``),
* Swin-V2 blocks: cosine attention with a learned, clamped logit scale and a continuous
  position bias MLP; *post-norm* residuals ``x + DropPath(LN(attn(x)))``,
  ``x + DropPath(LN(MLP(x)))`` whose LayerNorms start at zero (res-post-norm init); the
  MLP activation is ReLU, as in the reference (Swin-V2 itself uses GELU),
* patch merging (Swin-V2 order: 2x2 concat -> linear 4C -> 2C -> LayerNorm(2C)) at the
  end of every stage but the last,
* after stage 1 the two views are fused over the *token* axis: the ``2L`` tokens of both
  views are mapped to ``L`` tokens by one linear layer (``fc_layer_fused``),
* stages 2 and 3 are single-view Swin-V2 stages, then LayerNorm, average pooling, head.

``mvswin_tiny`` is the reference configuration: 384 inputs, window 12, C 96, depths
2-2-6-2, heads 3-6-12-24, one output (the reference applies a sigmoid inside ``forward``;
we return logits, so use ``BCEWithLogitsLoss`` or apply ``sigmoid``), stochastic depth 0.1.
29,746,261 parameters, the count of the reference model (its demo prints 29 million).

Beyond the reference (which asserts the nominal input size everywhere):

* any input size: patch embedding and merging pad, window attention pads and masks,
* the token fusion is defined at the nominal grid (``img_size``); at another grid its
  weight is resampled bilinearly over the output and input token grids (and divided by
  the change in token count, so a constant map keeps its scale), the way ViTs resample
  position embeddings. At the nominal size it is exactly the reference's layer,
* ``num_classes`` > 1 gives a multi-class head (softmax outside), ``share_weights`` one
  set of weights for both views, ``cross_mode="concat"`` the keys-concatenation variant.

Differences at sizes the reference cannot run: where a stage's map is no larger than the
window the reference shrinks the window to the map (and its position-bias coordinates
with it); we keep the window and mask the padding, so only sizes where every stage map is
at least the window (384 with window 12) give the reference's numbers exactly.

Per-view weights are stacked along a leading view axis, so both views run as one batch;
:func:`load_pretrained` maps the reference's ``_1``/``_2`` names onto them.

timm's backbone interface (see :mod:`.features`), with Swin's levels (each stage's blocks'
output, before its patch merging, at strides ``patch_size * 2**i``): a multi-view level is
one map with the views' channels side by side (view 0 first, ``V * C_i`` channels), so a
dense head sees an ordinary ``(B, C, H, W)`` map; ``set_grad_checkpointing`` (per block),
``device=`` / ``dtype=``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..layers.multiview import MultiViewWindowAttention, per_view_linear
from . import register_model
from .common import drop_path_rates
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

__all__ = [
    "MVSwinTransformer",
    "MVSwinBlock",
    "TokenFusion",
    "convert_reference_mvswin",
    "load_pretrained",
]

_PAPER = ("Sarker et al., MV-Swin-T: Mammogram Classification with Multi-view Swin "
          "Transformer")


# -- per-view layers: one weight per view along a leading axis, one batched op ----------
class ViewLinear(nn.Module):
    """``(B, V, ..., Cin) -> (B, V, ..., Cout)`` with view ``v``'s own linear map."""

    def __init__(self, views: int, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(views, cout, cin))
        self.bias = nn.Parameter(torch.zeros(views, cout)) if bias else None
        bound = 1 / math.sqrt(cin)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return per_view_linear(x, self.weight, self.bias)


class ViewNorm(nn.Module):
    """LayerNorm over channels with a per-view scale and shift."""

    def __init__(self, views: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(views, dim))
        self.bias = nn.Parameter(torch.zeros(views, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class ViewMlp(nn.Module):
    """``fc2(drop(ReLU(fc1(x))))`` per view (the reference's ``Mlp`` with ReLU)."""

    def __init__(self, views: int, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = ViewLinear(views, dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = ViewLinear(views, hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth drawn per sample *and* view (the reference has one DropPath per
    view, each drawing its own mask)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty(x.shape[:2] + (1,) * (x.dim() - 2)).bernoulli_(keep)
    return x * mask / keep


class ViewPatchEmbed(nn.Module):
    """``(B, V, 3, H, W) -> (B, V, H/p, W/p, C)``: a ``p x p`` stride-``p`` convolution per
    view (one grouped convolution) and a per-view LayerNorm; sides are zero-padded."""

    def __init__(self, views: int, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.views, self.patch_size = views, patch_size
        self.proj = nn.Conv2d(views * in_chans, views * dim, patch_size, stride=patch_size,
                              groups=views)
        self.norm = ViewNorm(views, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, V, Cin, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, V * Cin, H, W)
        if H % p or W % p:
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        x = self.proj(x)
        x = x.view(B, V, -1, x.shape[-2], x.shape[-1]).permute(0, 1, 3, 4, 2)
        return self.norm(x)


class ViewPatchMerging(nn.Module):
    """``(B, V, H, W, C) -> (B, V, ceil(H/2), ceil(W/2), 2C)``, Swin-V2's order: the 2x2
    neighbourhood concatenated ((0,0), (1,0), (0,1), (1,1)), linear 4C -> 2C without
    bias, then LayerNorm(2C); odd sides are zero-padded."""

    def __init__(self, views: int, dim: int) -> None:
        super().__init__()
        self.reduction = ViewLinear(views, 4 * dim, 2 * dim, bias=False)
        self.norm = ViewNorm(views, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        B, V, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, V, H // 2, 2, W // 2, 2, C).permute(0, 1, 2, 4, 5, 3, 6).flatten(4)
        return self.norm(self.reduction(x))


class MVSwinBlock(nn.Module):
    """Swin-V2 post-norm block on ``(B, V, H, W, C)``, every view with its own weights:
    ``x + DropPath(LN(MDA(x)))``, then ``x + DropPath(LN(MLP(x)))``. With ``views=1`` and
    ``mode="self"`` it is the reference's single-view Swin-V2 block."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift: int, views: int = 2,
        mode: str = "mix", share_weights: bool = False, mlp_ratio: float = 4.0,
        qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
        drop_path: float = 0.0, pretrained_window_size: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = ViewNorm(views, dim)
        self.attn = MultiViewWindowAttention(
            dim, num_heads, window_size=window_size, shift=shift, share_weights=share_weights,
            num_views=views, mode=mode, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=drop, pretrained_window_size=pretrained_window_size,
        )
        self.norm2 = ViewNorm(views, dim)
        self.mlp = ViewMlp(views, dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + _drop_path(self.norm1(self.attn(x)), self.drop_path, self.training)
        return x + _drop_path(self.norm2(self.mlp(x)), self.drop_path, self.training)


class MVStage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, x, checkpointing_now(self))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class TokenFusion(nn.Module):
    """The reference's fusion: ``V`` views of ``L`` tokens -> ``L`` tokens, one linear map
    over the token axis, ``(B, V, h, w, C) -> (B, 1, h, w, C)``.

    ``weight`` is ``(L0, V*L0)`` for the nominal grid ``(h0, w0)``, tokens of view 1 then
    view 2, row-major (the reference's ``fc_layer_fused``). At another grid ``(h, w)`` the
    weight is resampled bilinearly along the output grid and along each view's input
    grid, and scaled by ``L0 / L`` (the number of inputs each output sums changes by
    ``L / L0``); the bias is resampled along the output grid.
    """

    def __init__(self, views: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.views, self.grid = views, grid
        L = grid[0] * grid[1]
        self.weight = nn.Parameter(torch.empty(L, views * L))
        self.bias = nn.Parameter(torch.zeros(L))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def resampled(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """``(h*w, V*h*w)`` weight and ``(h*w,)`` bias for a ``h x w`` token grid."""
        h0, w0 = self.grid
        if (h, w) == (h0, w0):
            return self.weight, self.bias
        V, L0, L = self.views, h0 * w0, h * w

        def resize(t: Tensor) -> Tensor:  # (n, c, h0, w0) -> (n, c, h, w)
            return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)

        w_in = resize(self.weight.reshape(L0, V, h0, w0)).reshape(L0, V * L) * (L0 / L)
        w_out = resize(w_in.T.reshape(1, V * L, h0, w0)).reshape(V * L, L).T
        bias = resize(self.bias.view(1, 1, h0, w0)).reshape(L)
        return w_out, bias

    def forward(self, x: Tensor) -> Tensor:
        B, V, h, w, C = x.shape
        weight, bias = self.resampled(h, w)
        tokens = x.reshape(B, V * h * w, C).transpose(1, 2)  # (B, C, V*L)
        fused = F.linear(tokens, weight, bias)  # (B, C, L)
        return fused.transpose(1, 2).reshape(B, 1, h, w, C)


def _grid_after(size: int, patch: int, merges: int) -> int:
    g = -(-size // patch)
    for _ in range(merges):
        g = -(-g // 2)
    return g


class MVSwinTransformer(GradCheckpointing, nn.Module):
    """MV-Swin-T on two views ``(B, 3, H, W)`` each (or a stack ``(B, V, 3, H, W)``).

    Args:
        img_size: nominal input size; sets the grid of the token fusion (any size runs).
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
        pretrained_window_sizes: as in the reference.
        num_views: views ``V`` (2: CC and MLO).
        multi_view_stages: stages before the fusion (2 in the reference).
        diff_attn_layers: multi-view stages whose attention crosses views (``(1,)``);
            the others attend within each view.
        cross_mode: ``"mix"`` (W-MDA) or ``"concat"`` (see ``multi_view_window_attention``).
        share_weights: one set of attention weights for every view in the multi-view
            stages (norms, MLPs, merging and patch embedding stay per view).

    ``forward`` returns ``(B, num_classes)`` logits; ``forward_features`` the pooled
    features. ``device``, ``dtype``: where and in what precision to build.
    """

    @factory_kwargs
    def __init__(
        self,
        img_size: int | tuple[int, int] = 384,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        num_views: int = 2,
        multi_view_stages: int = 2,
        diff_attn_layers: Sequence[int] = (1,),
        cross_mode: str = "mix",
        share_weights: bool = False,
        pretrained_window_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        name = "mvswin"
        if len(depths) != len(num_heads):
            raise ValueError(
                f"{name}: depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in "
                "length"
            )
        check_positive(name, embed_dim=embed_dim, window_size=window_size,
                       patch_size=patch_size, num_views=num_views)
        n = len(depths)
        if not 1 <= multi_view_stages < n:
            raise ValueError(
                f"{name}: multi_view_stages must be in [1, {n - 1}] (stages before the "
                f"fusion), got {multi_view_stages}"
            )
        if cross_mode not in ("mix", "concat"):
            raise ValueError(f"{name}: cross_mode must be 'mix' or 'concat', got {cross_mode!r}")
        pre = tuple(pretrained_window_sizes or (0,) * n)
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.num_classes, self.num_views = (ih, iw), num_classes, num_views
        self.patch_embed = ViewPatchEmbed(num_views, in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        dims = [embed_dim * 2**i for i in range(n)]

        def stage(i: int, views: int, mode: str, share: bool) -> MVStage:
            first = sum(depths[:i])
            blocks = [
                MVSwinBlock(dims[i], num_heads[i], window_size,
                            0 if j % 2 == 0 else window_size // 2, views=views, mode=mode,
                            share_weights=share, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            drop=drop_rate, attn_drop=attn_drop_rate,
                            drop_path=rates[first + j], pretrained_window_size=pre[i])
                for j in range(depths[i])
            ]
            down = ViewPatchMerging(views, dims[i]) if i < n - 1 else None
            return MVStage(blocks, down)

        cross = "mix" if num_views > 1 else "self"
        self.layers = nn.ModuleList(
            stage(i, num_views, cross_mode if (i in diff_attn_layers and cross != "self")
                  else "self", share_weights)
            for i in range(multi_view_stages)
        )
        grid = (_grid_after(ih, patch_size, multi_view_stages),
                _grid_after(iw, patch_size, multi_view_stages))
        self.fusion = TokenFusion(num_views, grid)
        self.layers_fused = nn.ModuleList(
            stage(i, 1, "self", False) for i in range(multi_view_stages, n)
        )
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        mv = multi_view_stages
        self.feature_info = feature_info(
            [d * (num_views if i < mv else 1) for i, d in enumerate(dims)],
            [patch_size * 2**i for i in range(n)],
            [f"layers.{i}" if i < mv else f"layers_fused.{i - mv}" for i in range(n)],
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's init: truncated normal (0.02) for every linear map, zero biases,
        LayerNorms at (1, 0), then the res-post-norm LayerNorms of every block at (0, 0)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, ViewLinear)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, MultiViewWindowAttention):
                    m.reset_parameters(std=0.02)
                elif isinstance(m, (nn.LayerNorm, ViewNorm)):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            for m in self.modules():
                if isinstance(m, MVSwinBlock):
                    for norm in (m.norm1, m.norm2):
                        norm.weight.zero_()
                        norm.bias.zero_()

    def _views(self, views: tuple[Tensor, ...]) -> Tensor:
        V = self.num_views
        if len(views) == 1 and views[0].dim() == 5:
            x = views[0]
        elif len(views) == V and all(v.dim() == 4 for v in views):
            if len({tuple(v.shape) for v in views}) != 1:
                raise ValueError(
                    f"mvswin: every view must have the same shape (B, C, H, W), got "
                    f"{[tuple(v.shape) for v in views]}"
                )
            x = torch.stack(views, dim=1)
        else:
            raise ValueError(
                f"mvswin: expected {V} images (B, C, H, W) or a stack (B, {V}, C, H, W), got "
                f"{[tuple(getattr(v, 'shape', ())) for v in views]}"
            )
        if x.shape[1] != V:
            raise ValueError(f"mvswin: expected {V} views in dim 1, got shape {tuple(x.shape)}")
        return x

    def forward_features(self, *views: Tensor) -> Tensor:
        """``(B, C_last)`` pooled features of the fused views."""
        x = self.pos_drop(self.patch_embed(self._views(views)))
        for stage in self.layers:
            x = stage(x)
        x = self.fusion(x)
        for stage in self.layers_fused:
            x = stage(x)
        return self.norm(x[:, 0]).mean((1, 2))

    def forward(self, *views: Tensor) -> Tensor:
        return self.head(self.forward_features(*views))

    def _level(self, x: Tensor, norm: bool, output_fmt: str) -> Tensor:
        # (B, V, h, w, C) -> one map, the views' channels side by side
        B, V, h, w, C = x.shape
        y = x[:, 0] if V == 1 else x.permute(0, 2, 3, 1, 4).reshape(B, h, w, V * C)
        return to_fmt(self.norm(y) if norm else y, output_fmt, channels_last=True)

    def forward_intermediates(
        self,
        *views: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs before patch merging for the levels in ``indices``, timm's Swin
        semantics (``norm``: the final norm on the last stage only; ``stop_early``: skip
        what follows the last level taken). The views come as in :meth:`forward`, so the
        options are keyword-only. Returns the list, or ``(final tokens, list)``: the final
        tokens are ``(B, h, w, C)`` (normed) once fused, ``(B, V, h, w, C)`` before."""
        check_output_fmt(output_fmt, "mvswin")
        stages = [*self.layers, *self.layers_fused]
        n, fuse_at = len(stages), len(self.layers)
        take, last = feature_take_indices(n, indices, "mvswin")
        run = last + 1 if stop_early else n
        x = self.pos_drop(self.patch_embed(self._views(views)))
        out = []
        for i in range(run):
            if i == fuse_at:
                x = self.fusion(x)
            x = stages[i].forward_blocks(x)
            if i in take:
                out.append(self._level(x, norm and i == n - 1, output_fmt))
            if i < run - 1 and stages[i].downsample is not None:
                x = stages[i].downsample(x)
        if intermediates_only:
            return out
        if x.shape[1] == 1:
            x = self.norm(x[:, 0]) if run == n else x[:, 0]
        return x, out

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what follows the last level in ``indices`` (later stages, that stage's
        merging, the fusion if no fused stage is left, the norm, the head); returns the
        absolute indices."""
        mv = len(self.layers)
        n = mv + len(self.layers_fused)
        take, last = feature_take_indices(n, indices, "mvswin")
        if last < mv:
            self.layers = self.layers[: last + 1]
            self.layers_fused = nn.ModuleList()
            self.fusion = nn.Identity()  # never reached: forward_intermediates stops first
        else:
            self.layers_fused = self.layers_fused[: last + 1 - mv]
        [*self.layers, *self.layers_fused][-1].downsample = None
        if prune_norm or last < n - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        return take


# -- reference checkpoints --------------------------------------------------------------
_ATTN_NAMES = {
    ("qkv", ".weight"): "qkv_weight",
    ("q_bias", ""): "q_bias",
    ("v_bias", ""): "v_bias",
    ("logit_scale", ""): "logit_scale",
    ("cpb_mlp", ".0.weight"): "cpb_weight1",
    ("cpb_mlp", ".0.bias"): "cpb_bias1",
    ("cpb_mlp", ".2.weight"): "cpb_weight2",
    ("proj", ".weight"): "proj_weight",
    ("proj", ".bias"): "proj_bias",
    ("proj_concat", ".weight"): "mix_weight",
    ("proj_concat", ".bias"): "mix_bias",
}
_MV_ATTN = re.compile(
    r"^(layers\.\d+\.blocks\.\d+\.attn)\.(qkv|q_bias|v_bias|logit_scale|cpb_mlp|proj_concat|"
    r"proj)_(\d+)((?:\.\d)?(?:\.weight|\.bias)?)$"
)
_SV_ATTN = re.compile(
    r"^(layers_fused\.\d+\.blocks\.\d+\.attn)\.(qkv|q_bias|v_bias|logit_scale|cpb_mlp|proj)"
    r"((?:\.\d)?(?:\.weight|\.bias)?)$"
)
_MV_OTHER = re.compile(
    r"^(patch_embed|layers\.\d+\.blocks\.\d+\.(?:norm1|norm2|mlp)|layers\.\d+\.downsample)"
    r"_(\d+)(\..+)$"
)
_DROPPED = ("relative_coords_table", "relative_position_index", "attn_mask")


def convert_reference_mvswin(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference (prithuls/MV-Swin-T) keys -> ours; our own keys pass through.

    The reference names every per-view weight ``<name>_1`` / ``<name>_2`` (``qkv_1``,
    ``norm1_2``, ``patch_embed_1``, ``downsample_2``, ...); ours stacks them along a
    leading view axis (the patch embeddings into one grouped convolution), and the
    single-view stages carry a view axis of 1. ``fc_layer_fused`` is our ``fusion``. The
    fixed buffers (``relative_coords_table``, ``relative_position_index*``,
    ``attn_mask``) are computed, not loaded.
    """
    if not any(k.startswith(("patch_embed_", "fc_layer_fused.")) for k in state):
        return dict(state)  # ours already
    groups: dict[str, dict[int, tuple[str, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key.split(".")[-1].startswith(_DROPPED):
            continue
        if m := _MV_ATTN.match(key):
            ours = f"{m[1]}.{_ATTN_NAMES[(m[2], m[4])]}"
            groups.setdefault(ours, {})[int(m[3]) - 1] = (key, t)
        elif m := _SV_ATTN.match(key):
            out[f"{m[1]}.{_ATTN_NAMES[(m[2], m[3])]}"] = t[None]
        elif m := _MV_OTHER.match(key):
            groups.setdefault(f"{m[1]}{m[3]}", {})[int(m[2]) - 1] = (key, t)
        elif key.startswith("layers_fused.") and ".attn." not in key:
            out[key] = t[None]  # norm1/norm2/mlp/downsample of a single-view stage
        elif key.startswith("fc_layer_fused."):
            out["fusion." + key[len("fc_layer_fused."):]] = t
        else:
            out[key] = t
    views = max((len(g) for g in groups.values()), default=0)
    for key, per_view in groups.items():
        if sorted(per_view) != list(range(views)):
            # a view is missing: keep the reference names, so the loader reports the
            # stacked key as missing and these as unexpected, by name
            out.update(dict(per_view.values()))
            continue
        ordered = [per_view[v][1] for v in range(views)]
        joined = torch.cat(ordered) if key.startswith("patch_embed.proj.") else torch.stack(ordered)
        out[key] = joined
    return out


def load_pretrained(
    model: MVSwinTransformer, source: str | os.PathLike | Mapping[str, Tensor],
    strict: bool = True,
) -> MVSwinTransformer:
    """Load a reference MV-Swin-T checkpoint or one of ours (names every mismatch; see
    :func:`models.common.load_pretrained`)."""
    return _load(model, source, convert_reference_mvswin, strict=strict)


def _mvswin(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MVSwinTransformer:
    return MVSwinTransformer(**{**defaults, **kwargs})


@register_model("mvswin_tiny", paper=_PAPER + " (MV-Swin-T, reference configuration)",
                year=2024)
def mvswin_tiny(**kwargs: Any) -> MVSwinTransformer:
    """MV-Swin-T: two views of 384, window 12, C 96, depths 2-2-6-2, heads 3-6-12-24
    (29.7M params, 39.7 GFLOPs for a pair of views); cross-view W-MDA in stage 1, token
    fusion after it."""
    return _mvswin(dict(img_size=384, window_size=12, embed_dim=96, depths=(2, 2, 6, 2),
                        num_heads=(3, 6, 12, 24), num_classes=1, drop_path_rate=0.1), kwargs)


@register_model("mvswin_micro_cifar", paper=_PAPER + " (scaled down for 32x32 views)",
                year=2024)
def mvswin_micro_cifar(**kwargs: Any) -> MVSwinTransformer:
    """Two-view CIFAR model on swin_micro_cifar's sizes: patch 2, C 64, depths 2-2-6, heads
    2-4-8, window 4; stages 0-1 per view (W-MDA in stage 1), fusion, stage 2 shared."""
    return _mvswin(dict(img_size=32, patch_size=2, window_size=4, embed_dim=64,
                        depths=(2, 2, 6), num_heads=(2, 4, 8), num_classes=10,
                        drop_path_rate=0.1), kwargs)

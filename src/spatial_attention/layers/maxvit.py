"""MaxViT's multi-axis attention on ``(B, H, W, C)``: block and grid attention.

MaxViT (Tu et al., ECCV 2022, Sec. 3.1; google-research/maxvit) splits full 2-D
self-attention into two sparse halves that run one after the other in every block, each
``softmax(Q K^T / sqrt(d) + B) V`` (Eq. 1) with a learned relative position bias ``B``:

* block attention: the map cut into non-overlapping ``P x P`` windows (local mixing);
* grid attention: the map cut into a fixed ``G x G`` grid whose cells are ``H/G`` and
  ``W/G`` apart, so each group of ``G²`` tokens spans the whole map (dilated, global).

Both see ``P²`` (or ``G²``) keys per query, so the cost is linear in ``H·W``. The two
mixers share everything but the partition: one class, two layouts from
:mod:`~spatial_attention.functional.windows`.

The official code and timm require ``H`` and ``W`` divisible by ``P`` (``G``). Here the map
is padded at the bottom/right to a multiple and the padded keys are masked out of every
softmax; a grid then keeps its ``G x G`` positions (the dilation becomes ``ceil(H/G)``), so
real tokens never see padding. Where no padding is needed the outputs equal timm's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive, check_probability
from ..functional.dispatch import attention
from ..functional.permute import permute_rows
from ..functional.position import relative_position_bias, relative_position_index
from ..functional.scoring import additive_mask
from ..functional.windows import (
    WindowLayout,
    grid_layout,
    grid_reverse,
    window_layout,
    window_reverse,
)
from ..registry import register
from .base import AttentionModule
from .window import window_sdpa

__all__ = [
    "MaxViTBlockAttention",
    "MaxViTGridAttention",
    "convert_timm_maxvit_keys",
    "tf_relative_position_index",
]

_PAPER = "Tu et al., MaxViT: Multi-Axis Vision Transformer"
_COST = "8·B·N·C² (qkv, proj) + 4·B·N·P²·C (scores and weighting), N = H·W, P² keys a query"
#: the MaxViT papers' head width: ``num_heads=None`` means ``dim // 32``
HEAD_DIM = 32
REL_POS = ("tf", "swin", None)


def tf_relative_position_index(size: tuple[int, int], device: torch.device | None = None
                               ) -> Tensor:
    """``(N, N)`` index into the flattened ``(heads, 2Mh-1, 2Mw-1)`` table of the official
    MaxViT code (and timm's ``RelPosBiasTf``): offset *key minus query*, row-major.

    That is Swin's numbering (query minus key, :func:`relative_position_index`) mirrored:
    ``(2Mh-1)(2Mw-1) - 1 - index``."""
    mh, mw = size
    return (2 * mh - 1) * (2 * mw - 1) - 1 - relative_position_index(size, device)


class _PartitionAttention(AttentionModule):
    """Multi-head self-attention inside the groups of one partition (block or grid)."""

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")
    layout = "tokens"
    partition: ClassVar[str] = "block"

    def _setup(self, dim: int, num_heads: int | None, size: Any, what: str, rel_pos: str | None,
               qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        name = self.mechanism_name
        check_positive(name, dim=dim)
        if num_heads is None:
            if dim % HEAD_DIM:
                raise ValueError(f"{name}: num_heads=None takes heads of width {HEAD_DIM} "
                                 f"(the paper's), but dim {dim} is not a multiple of it; "
                                 "pass num_heads")
            num_heads = dim // HEAD_DIM
        check_positive(name, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(f"{name}: dim {dim} is not divisible by num_heads {num_heads}")
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
            raise ValueError(f"{name}: {what} must be a positive int or pair, got {size!r}")
        if rel_pos not in REL_POS:
            raise ValueError(f"{name}: rel_pos must be one of {REL_POS}, got {rel_pos!r}")
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.size: tuple[int, int] = (int(pair[0]), int(pair[1]))
        self.rel_pos = rel_pos
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        mh, mw = self.size
        if rel_pos == "tf":  # official MaxViT / timm RelPosBiasTf: (heads, 2Mh-1, 2Mw-1)
            table = torch.empty(num_heads, 2 * mh - 1, 2 * mw - 1)
            index = tf_relative_position_index(self.size)
        elif rel_pos == "swin":  # timm's RelPosBias (maxvit_*_rw): ((2Mh-1)(2Mw-1), heads)
            table = torch.empty((2 * mh - 1) * (2 * mw - 1), num_heads)
            index = relative_position_index(self.size)
        if rel_pos is None:
            self.relative_position_bias_table = None
        else:
            self.relative_position_bias_table = nn.Parameter(table)
            self.register_buffer("relative_position_index", index, persistent=False)
        self._layouts: dict[tuple[Any, ...], WindowLayout] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: every weight N(0, 0.02), biases zero."""
        for layer in (self.qkv, self.proj):
            nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.relative_position_bias_table is not None:
            if self.rel_pos == "tf":
                nn.init.normal_(self.relative_position_bias_table, std=0.02)
            else:
                nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        what = "window_size" if self.partition == "block" else "grid_size"
        return (f"dim={self.dim}, num_heads={self.num_heads}, {what}={self.size}, "
                f"rel_pos={self.rel_pos}, " + super().extra_repr())

    def position_bias(self) -> Tensor | None:
        """``(heads, N, N)`` bias ``B`` of Eq. 1 for one group of ``N = P²`` tokens."""
        table = self.relative_position_bias_table
        if table is None:
            return None
        if self.rel_pos == "swin":
            return relative_position_bias(table, self.relative_position_index)
        n = self.relative_position_index.shape[0]
        return table.flatten(1)[:, self.relative_position_index.reshape(-1)].view(-1, n, n)

    # -- the one place the two partitions differ -----------------------------------
    def _layout(self, H: int, W: int, device: torch.device) -> WindowLayout:
        if self.partition == "block":
            return window_layout(H, W, self.size, (0, 0), device, self._layouts)
        return grid_layout(H, W, self.size, device, self._layouts)

    def _split_heads(self, t: Tensor, H: int, W: int) -> Tensor:
        """``(B, H, W, C) -> (B, nW, heads, N, d)``: one of q, k, v cut into groups and
        heads, as a contiguous copy."""
        B = t.shape[0]
        ph, pw = self.size
        h, d = self.num_heads, self.head_dim
        if self.partition == "block":  # rows as (H/P, P): the group is the first factor
            t = t.view(B, H // ph, ph, W // pw, pw, h, d).permute(0, 1, 3, 5, 2, 4, 6)
        else:  # grid: rows as (G, H/G), the group is the second factor
            t = t.view(B, ph, H // ph, pw, W // pw, h, d).permute(0, 2, 4, 5, 1, 3, 6)
        return t.reshape(B, (H // ph) * (W // pw), h, ph * pw, d)

    def _merge_heads(self, out: Tensor, H: int, W: int) -> Tensor:
        """``(B, nW, heads, N, d) -> (B, H·W, C)``: the reverse partition and the head
        merge as one permuted copy (``window_reverse`` / ``grid_reverse`` of the
        head-merged groups)."""
        B, _, h, _, d = out.shape
        ph, pw = self.size
        if self.partition == "block":  # groups (H/P, W/P), P x P tokens each
            out = out.view(B, H // ph, W // pw, h, ph, pw, d).permute(0, 1, 4, 2, 5, 3, 6)
        else:  # groups (H/G, W/G), token (i, j) of group (a, b) at (i·H/G + a, j·W/G + b)
            out = out.view(B, H // ph, W // pw, h, ph, pw, d).permute(0, 4, 1, 5, 2, 3, 6)
        return out.reshape(B, H * W, h * d)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        N = self.size[0] * self.size[1]
        layout = self._layout(H, W, x.device)
        keep = layout.keep
        nW = layout.gather.numel() // N
        h, d = self.num_heads, self.head_dim
        # q, k, v each copied once into contiguous (B, nW, heads, N, d), which the batched
        # matmuls take as they are. Split off the linear's output (not kept) rather than
        # reshaped from it, so their gradients meet in one concatenation in token order
        if keep is None:  # no padding: qkv on the map, then the groups
            q, k, v = (self._split_heads(t, H, W) for t in self.qkv(x).split(C, -1))
        else:  # pad + partition as one gather; padding slots read token 0, masked as keys
            tokens = permute_rows(x.reshape(B, H * W, C), 1, layout.gather, layout.scatter)
            q, k, v = (t.view(B, nW, N, h, d).transpose(2, 3).contiguous()
                       for t in self.qkv(tokens).split(C, -1))
        mask = self.position_bias()
        if mask is not None:
            mask = mask.to(q.dtype)[None]  # (1, heads, N, N), shared by every group
        if keep is not None:
            blocked = additive_mask(keep, q.dtype)[:, None]  # (nW, 1, N, N)
            mask = blocked if mask is None else mask + blocked
        p = self.attn_drop if self.training else 0.0
        if self.impl != "explicit":
            out = window_sdpa(q, k, v, mask, self.scale, p, self.impl)
        else:
            out, weights = attention(q, k, v, mask, scale=self.scale, dropout_p=p,
                                     impl="explicit", return_weights=True)
            self.record(weights)  # (B, nW, heads, N, N)
        if keep is None:  # heads back to channels and groups back to the map: one copy
            out = self._merge_heads(out, H, W)
        else:
            out = permute_rows(out.transpose(2, 3).reshape(B, nW * N, C), 1, layout.scatter,
                               layout.unscatter, zero_row=layout.padded)
        return self.proj_drop(self.proj(out)).view(B, H, W, C)

    def load_timm_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "",
                             head_first: bool = False, strict: bool = True):
        """Load one timm ``AttentionCl``'s weights: its own state dict, or the keys under
        ``prefix`` (``"stages.0.blocks.0.attn_grid.attn."``) of a whole model's.
        ``head_first``: see :func:`convert_timm_maxvit_keys`."""
        if prefix:
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()
                          if k.startswith(prefix)}
        return self.load_state_dict(
            convert_timm_maxvit_keys(state_dict, head_first, self.head_dim), strict=strict)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Per-group maps ``(B, nW, heads, N, N)`` -> ``(B, H, W)``: the attention each
        token receives, put back where the token sits (square groups, padding cropped)."""
        if weights.dim() != 5:
            return super().spatial_map(weights, size)
        H, W = size
        B, nW, _, N, _ = weights.shape
        m = int(round(N**0.5))
        received = weights.float().mean((2, 3))[..., None]  # (B, nW, N, 1)
        groups_h = -(-H // m)
        if cls.partition == "block":
            full = window_reverse(received.reshape(-1, N, 1), m, groups_h * m, nW // groups_h * m)
        else:
            full = grid_reverse(received.reshape(-1, N, 1), m, groups_h * m, nW // groups_h * m)
        return full[:, :H, :W, 0]


@register(
    "maxvit_block_attention",
    family="token_local",
    layout="tokens",
    paper=_PAPER + " (block attention, Sec. 3.1, Eq. 1)",
    year=2022,
    cost=_COST,
    captures="(B, nW, heads, P², P²) attention weights per P x P block (padded slots included)",
)
class MaxViTBlockAttention(_PartitionAttention):
    """MaxViT block attention: self-attention inside non-overlapping ``P x P`` windows.

    Tu et al., *MaxViT: Multi-Axis Vision Transformer*, ECCV 2022, Sec. 3.1, Eq. 1:
    ``softmax(Q K^T / sqrt(d) + B) V`` in each window, ``B`` a learned relative position bias.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W >= 1``.

    Args:
        dim, num_heads: channels and heads; ``num_heads=None`` gives heads of width 32, the
            paper's (``dim`` must then be a multiple of 32; MaxViT-T: 2, 4, 8, 16 heads).
        window_size: ``P`` or ``(Ph, Pw)``; 7 in the paper.
        rel_pos: ``"tf"`` (official table ``(heads, 2P-1, 2P-1)``, timm's ``RelPosBiasTf``,
            maxvit_*_tf), ``"swin"`` (timm's ``RelPosBias``, maxvit_*_rw) or None.
        qkv_bias: True as in the paper. attn_drop, proj_drop: dropout on weights, output.

    Cost: ``8·B·N·C²`` (qkv, proj) ``+ 4·B·N·P²·C`` (attention), ``N = H·W``.
    Parameter names as timm's ``AttentionCl`` (``qkv``, ``proj``), table
    ``relative_position_bias_table``: ``load_timm_state_dict`` loads timm's weights.
    Init as the official code: weights and table N(0, 0.02), biases zero.
    Deviation: official code and timm need ``H, W`` divisible by ``P``; here the map is
    padded and the padding masked out of the softmax, equal to them where none is needed.
    attn_impl: ``auto`` (SDPA; lean biased kernels in CPU training), ``explicit``,
    ``sdpa``, ``kept_probs``; measured in benchmarks/maxvit.md.
    """

    partition = "block"

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int | tuple[int, int] = 7,
        rel_pos: str | None = "tf",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        self._setup(dim, num_heads, window_size, "window_size", rel_pos, qkv_bias, attn_drop,
                    proj_drop)

    @property
    def window_size(self) -> tuple[int, int]:
        return self.size


@register(
    "maxvit_grid_attention",
    family="token_local",
    layout="tokens",
    paper=_PAPER + " (grid attention, Sec. 3.1, Eq. 1)",
    year=2022,
    cost=_COST,
    captures="(B, nW, heads, G², G²) attention weights per dilated G x G grid group",
)
class MaxViTGridAttention(_PartitionAttention):
    """MaxViT grid attention: self-attention among ``G x G`` tokens spread over the map.

    Tu et al., *MaxViT: Multi-Axis Vision Transformer*, ECCV 2022, Sec. 3.1, Eq. 1: the map
    is cut by a fixed ``G x G`` grid; group ``(a, b)`` holds tokens ``(i·H/G + a, j·W/G + b)``,
    ``i, j < G``, and attends ``softmax(Q K^T / sqrt(d) + B) V`` with ``B`` indexed by the
    grid offset: sparse global mixing. Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``.

    Args:
        dim, num_heads: channels and heads; ``num_heads=None`` gives heads of width 32, the
            paper's (``dim`` must then be a multiple of 32).
        grid_size: ``G`` or ``(Gh, Gw)``; 7 in the paper.
        rel_pos: ``"tf"`` (official, timm ``RelPosBiasTf``), ``"swin"`` (timm ``RelPosBias``)
            or None. qkv_bias: True. attn_drop, proj_drop: dropout on weights, output.

    Cost: ``8·B·N·C²`` (qkv, proj) ``+ 4·B·N·G²·C`` (attention), ``N = H·W``.
    Parameter names as timm's ``AttentionCl``; ``load_timm_state_dict`` loads timm's weights.
    Init as the official code: weights and table N(0, 0.02), biases zero.
    Deviation: official code and timm need ``H, W`` divisible by ``G``; here the map is
    padded to ``G·ceil(H/G)`` rows (``G·ceil(W/G)`` columns), so the dilation is
    ``ceil(H/G)``, and the padded keys are masked out; equal to them where none is needed.
    attn_impl: ``auto`` (SDPA; lean biased kernels in CPU training), ``explicit``,
    ``sdpa``, ``kept_probs``; measured in benchmarks/maxvit.md.
    """

    partition = "grid"

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        grid_size: int | tuple[int, int] = 7,
        rel_pos: str | None = "tf",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        self._setup(dim, num_heads, grid_size, "grid_size", rel_pos, qkv_bias, attn_drop,
                    proj_drop)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.size


#: timm key segment -> ours (timm keeps the table in a ``rel_pos`` child module)
_TIMM_KEYS = (("rel_pos.relative_position_bias_table", "relative_position_bias_table"),)


def convert_timm_maxvit_keys(
    state_dict: Mapping[str, Tensor], head_first: bool = False, head_dim: int = HEAD_DIM
) -> dict[str, Tensor]:
    """Rename timm MaxViT attention keys to ours, wherever they sit in a state dict.

    ``attn.rel_pos.relative_position_bias_table`` becomes
    ``attn.relative_position_bias_table``; ``qkv`` and ``proj`` keep their names. timm's
    ``head_first=True`` configurations (the ``*_rw`` models) lay ``qkv``'s outputs out per
    head, ``(heads, 3, d)``; pass ``head_first=True`` to reorder them to ``(3, heads, d)``,
    ours and the ``*_tf`` models' (``head_dim``: timm's ``dim_head``, 32).
    """
    out = rename_key_segments(state_dict, _TIMM_KEYS)
    if head_first:
        for key, value in out.items():
            if key.endswith(("qkv.weight", "qkv.bias")):
                heads = value.shape[0] // (3 * head_dim)
                rest = value.shape[1:]
                out[key] = (value.reshape(heads, 3, head_dim, *rest).transpose(0, 1)
                            .reshape(value.shape))
    return out

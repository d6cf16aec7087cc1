"""Recurrent criss-cross attention on ``(B, C, H, W)`` (Huang et al. ICCV 2019, CCNet).

Each position attends only to the positions in its own row and column, ``H + W - 1`` of
them instead of all ``H·W``; applying the same module twice (the recurrence) lets every
position reach every other through one intermediate. Scores and weights are therefore
``(B, H, W, H + W)``, never ``(H·W) x (H·W)``.

Parameter names are the official ``CrissCrossAttention``'s (``query_conv``, ``key_conv``,
``value_conv``, ``gamma``), so its weights load as they are;
:meth:`CrissCrossAttention.load_official_state_dict` unwraps saved checkpoints and picks
the module out of a whole CCNet (``prefix="head.cca."``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..registry import register
from ..tracing import exporting_graph
from .base import AttentionModule

__all__ = ["CrissCrossAttention"]


def _diagonal(n: int, device: torch.device) -> Tensor:
    """``(n, n)`` boolean identity (ONNX Runtime has no boolean ``EyeLike``)."""
    i = torch.arange(n, device=device)
    return i[:, None] == i


def _rows(z: Tensor) -> Tensor:
    """``(H, B, W, n) -> (H·B, W, n)``: one matrix per row (a view)."""
    return z.flatten(0, 1)


def _cols(z: Tensor) -> Tensor:
    """``(H, B, W, n) -> (B·W, H, n)``: one matrix per column (a view, batch stride n)."""
    return z.flatten(1, 2).transpose(0, 1)


@register(
    "criss_cross",
    family="spatial",
    layout="map",
    paper="Huang et al., CCNet: Criss-Cross Attention for Semantic Segmentation "
          "(Eq. 1-2, Sec. 3.3)",
    year=2019,
    cost="R·(2·B·H·W·C·(C + 2·Ci) (1x1 convs) + 2·B·H·W·(H + W)·(Ci + C) (scores and "
         "aggregation)), Ci = C / reduction, R = recurrence",
    captures="(B, H, W, H + W) criss-cross weights, once per loop: [..., :H] over the "
             "column (the duplicated self entry 0), [..., H:] over the row",
)
class CrissCrossAttention(AttentionModule):
    """Recurrent criss-cross attention (Huang, Wang, Huang, Huang, Wei, Liu; ICCV 2019).

    Per loop, with 1x1 convs ``Q, K: C -> Ci``, ``V: C -> C``: ``d_{i,u} = Q_u Omega_{i,u}^T``
    over the ``H + W - 1`` positions ``Omega_u`` in ``u``'s row and column (Eq. 1),
    ``A = softmax(D)`` jointly over them, ``H'_u = gamma · sum_i A_{i,u} Phi_{i,u} + H_u``
    (Eq. 2, ``gamma`` a learned scalar as in the official code). As there, the column
    holds all ``H`` positions with ``-inf`` on ``u`` itself (``u`` counts once, in its
    row). RCCA (Sec. 3.3) applies the same module ``recurrence`` times (paper: R = 2).
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``reduction=8``
    (``Ci = C // 8``); ``recurrence=2``. Init as official: PyTorch's conv defaults,
    ``gamma = 0`` (the module starts as the identity).
    Cost per loop: ``2·B·H·W·(C² + 2·C·Ci) + 2·B·H·W·(H + W)·(Ci + C)``.
    Deviation: ``Ci = max(1, C // reduction)`` (zero-width convs there for ``C < 8``).
    Records the ``(B, H, W, H + W)`` joint weights of each loop (``maps.calls(name)``):
    ``[..., :H]`` over the column (self entry 0), ``[..., H:]`` over the row.
    ``attn_impl``: explicit (Eq. 1-2 as einsums over rows and columns, the weights
    recorded); auto (an ``(H, B, W, C)`` layout in which every row and every column is a
    matrix of one strided batch: bmms on views, the 1x1 convs as GEMMs, one transpose in
    and one out for all loops, the self entries masked in place). Neither forms an
    ``(H·W) x (H·W)`` matrix or loops over positions.
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2,
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("criss_cross", channels=channels, reduction=reduction,
                       recurrence=recurrence)
        self.channels, self.reduction, self.recurrence = channels, reduction, recurrence
        self.inter_channels = ci = max(1, channels // reduction)
        self.query_conv = nn.Conv2d(channels, ci, 1)
        self.key_conv = nn.Conv2d(channels, ci, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.impl == "explicit":
            for _ in range(self.recurrence):  # the same weights each loop (RCCA)
                x = self._explicit(x)
            return x
        # the fast path runs in an (H, B, W, C) layout: each row, (h, b), and each
        # column, (b, w), is then one matrix of a batch with a single stride, so every
        # product is a bmm on views, and the 1x1 convs are GEMMs over the last axis;
        # the map is transposed once on the way in and once on the way out
        fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
               and not x.is_contiguous() else torch.contiguous_format)
        t = x.permute(2, 0, 3, 1).contiguous()
        for _ in range(self.recurrence):
            t = self._fast(t)
        return t.permute(1, 3, 0, 2).contiguous(memory_format=fmt)

    def _explicit(self, x: Tensor) -> Tensor:
        H = x.shape[2]
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        d_col = torch.einsum("bchw,bcgw->bhwg", q, k)  # (B, H, W, H): u's column
        d_row = torch.einsum("bchw,bchv->bhwv", q, k)  # (B, H, W, W): u's row
        # u counts once, in its row: -inf on (h, w, h)
        d_col = d_col.masked_fill(_diagonal(H, x.device)[:, None, :], float("-inf"))
        a = torch.softmax(torch.cat([d_col, d_row], -1), -1)  # (B, H, W, H + W), Eq. 1
        self.record(a)
        out = (torch.einsum("bhwg,bcgw->bchw", a[..., :H], v)
               + torch.einsum("bhwv,bchv->bchw", a[..., H:], v))  # Eq. 2
        return self.gamma * out + x

    def _fast(self, t: Tensor) -> Tensor:
        H, B, W, C = t.shape
        q, k, v = (F.linear(t, conv.weight.flatten(1), conv.bias)
                   for conv in (self.query_conv, self.key_conv, self.value_conv))
        d_row = _rows(q) @ _rows(k).transpose(1, 2)  # (HB, W, W)
        d_col = _cols(q) @ _cols(k).transpose(1, 2)  # (BW, H, H)
        self._mask_self(d_col)
        d = torch.cat([d_col.view(B, W, H, H).permute(2, 0, 1, 3), d_row.view(H, B, W, W)], -1)
        # split, not two slices: its backward is one cat, theirs two zero-filled copies
        a_col, a_row = torch.softmax(d, -1).split([H, W], -1)  # (H, B, W, H | W)
        out_row = _rows(a_row) @ _rows(v)  # (HB, W, C)
        out_col = _cols(a_col) @ _cols(v)  # (BW, H, C)
        out = out_row.view(H, B, W, C) + out_col.view(B, W, H, C).permute(2, 0, 1, 3)
        return torch.addcmul(t, out, self.gamma)

    @staticmethod
    def _mask_self(d_col: Tensor) -> None:
        """``-inf`` on each column's own position, in place (the bmm's result is fresh and
        its backward does not read it); the exporters get the same as a masked fill."""
        if exporting_graph():
            d_col.masked_fill_(_diagonal(d_col.shape[-1], d_col.device), float("-inf"))
        else:
            d_col.diagonal(0, -2, -1).fill_(float("-inf"))

    # -- checkpoints, benchmarks and visualisation ----------------------------------------
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "",
                                 strict: bool = True):
        """Load an official ``CrissCrossAttention``'s weights (names are the same).

        Accepts a checkpoint as saved (``{'state_dict': ...}``, ``module.`` prefixes); with
        ``prefix`` (a whole CCNet: ``"head.cca."``) only the keys under it are taken.
        """
        flat = rename_key_segments(state_dict, ())
        if prefix:
            flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        return self.load_state_dict(flat, strict=strict)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The module with ``gamma = 1`` (0 at init hides the attention) and an input."""
        module, inputs = super().example(name, batch, channels, size, **kwargs)
        with torch.no_grad():
            module.gamma.fill_(1.0)
        return module, inputs

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The attention each position receives from its row and column, mean over queries."""
        H, W = size
        if weights.dim() != 4 or weights.shape[1:] != (H, W, H + W):
            raise ValueError(f"criss_cross: a record of shape (B, {H}, {W}, {H + W}) is "
                             f"expected for a {H}x{W} map, got {tuple(weights.shape)}")
        a = weights.float()
        from_col = a[..., :H].sum(1).transpose(1, 2)  # (B, W, H') -> (B, H', W)
        from_row = a[..., H:].sum(2)  # (B, H, W')
        return (from_col + from_row) / (H * W)

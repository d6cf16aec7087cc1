"""Neighbourhood attention (NAT, Hassani et al. CVPR 2023) and its dilated form (DiNAT, 2022).

Each query attends to the ``k x k`` keys nearest it, the window sliding inward at the
borders (NATTEN's rule, :mod:`spatial_attention.functional.neighborhood`); with a dilation
``d`` the window takes every ``d``-th key, inside the query's dilation group. Parameters
carry the names and shapes of NATTEN's ``NeighborhoodAttention2D`` (``qkv``, ``rpb``,
``proj``), the module the official NAT and DiNAT models build on, so their weights load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_divisible, check_positive, check_probability
from ..functional.dispatch import attention
from ..functional.neighborhood import (
    NeighborhoodTiles,
    cached_tiles,
    halo_attention,
    neighborhood_bias_index,
    neighborhood_index,
    neighborhood_padding,
)
from ..functional.scoring import additive_mask
from ..functional.windows import to_2tuple
from ..registry import register
from .base import AttentionModule

__all__ = ["NeighborhoodAttention"]


def _pair(name: str, what: str, value: int | tuple[int, int], least: int
              ) -> tuple[int, int]:
    try:
        pair = to_2tuple(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {what} must be an int or a pair, got {value!r}") from None
    if any(v < least for v in pair) or (what == "kernel_size" and any(v % 2 == 0 for v in pair)):
        rule = "odd and > 1" if what == "kernel_size" else ">= 1"
        raise ValueError(f"{name}: {what} must be {rule} (as NATTEN), got {value!r}")
    return pair


@register(
    "neighborhood_attention",
    family="token_local",
    layout="tokens",
    paper="Hassani et al., Neighborhood Attention Transformer (NA, Sec. 3); "
    "Hassani & Shi, Dilated Neighborhood Attention Transformer (DiNA, Sec. 3)",
    year=2023,
    cost="2·B·N·C·4C (projections) + 4·B·N·k²·C (scores and weighting), N = H·W",
    captures="(B, heads, H, W, kh, kw) weights over each query's neighbours "
    "(where they sit: key_positions)",
)
class NeighborhoodAttention(AttentionModule):
    """Multi-head neighbourhood attention on ``(B, H, W, C)`` (NAT / DiNAT, NATTEN semantics).

    Hassani, Walton, Li, Li, Shi, CVPR 2023 (Sec. 3); Hassani & Shi, arXiv 2209.15001
    (dilation). Per head, ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + B(i, j)) v_j`` over
    the ``k x k`` neighbours ``j`` of ``i`` (every ``d``-th position, the window sliding
    inward at the borders so each query keeps ``k^2`` keys), then ``proj``.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W >= 1``.
    Args: ``dim``, ``num_heads``; ``kernel_size`` (odd > 1, int or pair; 7) and ``dilation``
    (1); ``rel_pos_bias``: the learned ``(heads, 2k-1, 2k-1)`` table ``rpb`` (True as in
    NAT; trunc-normal 0.02); ``qkv_bias``; ``qk_scale`` (``head_dim ** -0.5``);
    ``attn_drop``, ``proj_drop``. The bias is added after the ``1/sqrt(d)`` scaling, as
    the official code does.
    Cost: ``2·B·N·C·4C + 4·B·N·k²·C`` FLOPs, ``N = H·W``: linear in ``N``.
    Small maps: an axis shorter than ``k·d`` is zero-padded at the bottom/right to ``k·d``
    before ``qkv`` and cropped after, unmasked, as NATTEN's module at the papers' release
    (0.14-0.15; later releases refuse such inputs): padded tokens are keys holding the qkv
    bias. Unlike ``window_attention`` this padding is not masked, so official weights give
    the official outputs at every size.
    attn_impl: ``auto``/``sdpa`` (tiles of queries against their halo keys under a keep
    mask, no ``N x N`` matrix; SDPA per tile pattern, in CPU training ``auto`` the
    halo kernel: gather, chunked products, one scatter),
    ``explicit`` (each query's ``k^2`` keys gathered, the softmax written out, recorded),
    ``flex`` (FlexAttention block mask, CUDA eval only, opt-in and not timed on a GPU
    yet; elsewhere ``auto``). Measured in benchmarks/neighborhood_attention.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "flex")

    layout = "tokens"

    #: queries per tile axis of the fast path (each tile meets ``(tile + k - 1)^2`` keys)
    tile: tuple[int, int] = (7, 7)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | tuple[int, int] = 7,
        dilation: int | tuple[int, int] = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "neighborhood_attention"
        check_divisible(name, dim, num_heads)
        self.kernel_size = _pair(name, "kernel_size", kernel_size, 3)
        self.dilation = _pair(name, "dilation", 1 if dilation is None else dilation, 1)
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        if qk_scale is not None:
            check_positive(name, qk_scale=qk_scale)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        kh, kw = self.kernel_size
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._tiles: dict[tuple[Any, ...], NeighborhoodTiles] = {}
        self._block_masks: dict[tuple[Any, ...], Any] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, "
                + super().extra_repr())

    # -- where the neighbours sit ---------------------------------------------------------
    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The map the attention runs on: ``H x W``, an axis shorter than ``k·d`` padded."""
        ph, pw = neighborhood_padding(height, width, self.kernel_size, self.dilation)
        return height + ph, width + pw

    def key_positions(self, height: int, width: int, device: Any = None) -> Tensor:
        """``(H, W, kh, kw, 2)`` long: ``(row, col)`` of every query's neighbours, in the
        order of the recorded weights (rows/cols ``>= H``/``W`` are padding)."""
        Hp, Wp = self.padded_size(height, width)
        index = neighborhood_index(Hp, Wp, self.kernel_size, self.dilation, device)
        index = index[:height, :width]
        return torch.stack((index // Wp, index % Wp), -1)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        Hp, Wp = self.padded_size(H, W)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zeros before qkv, as the official
        h, d = self.num_heads, self.head_dim
        p = self.attn_drop if self.training else 0.0
        impl = self.impl
        if impl == "flex" and not (x.is_cuda and not self.training):
            impl = "auto"  # FlexAttention runs compiled on CUDA in eval only
        # (3, B, heads, Np, d)
        qkv = self.qkv(x).view(B, Hp * Wp, 3, h, d).permute(2, 0, 3, 1, 4)
        if impl in ("auto", "sdpa"):
            out = self._tiled(qkv, H, W, Hp, Wp, p, impl)
            return self.proj_drop(self.proj(out))
        if impl == "explicit":
            out = self._explicit(qkv, H, W, Hp, Wp, p)
        else:
            out = self._flex(qkv.contiguous(), Hp, Wp)
            out = out.view(B, h, Hp, Wp, d)[:, :, :H, :W]
        out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    def _table(self, dtype: torch.dtype) -> Tensor | None:
        return None if self.rpb is None else self.rpb.to(dtype).flatten(1)  # (heads, T)

    def _explicit(self, qkv: Tensor, H: int, W: int, Hp: int, Wp: int, p: float) -> Tensor:
        """The equation as written: gather each query's ``k^2`` keys and values."""
        q, k, v = qkv.unbind(0)  # (B, heads, Np, d)
        B, h, _, d = q.shape
        index = neighborhood_index(Hp, Wp, self.kernel_size, self.dilation, q.device)
        index = index[:H, :W].reshape(H * W, -1)  # (N, k^2) keys of the real queries
        q = q.view(B, h, Hp, Wp, d)[:, :, :H, :W].reshape(B, h, H * W, 1, d)
        keys, values = k[:, :, index], v[:, :, index]  # (B, heads, N, k^2, d)
        scores = (q * self.scale) @ keys.transpose(-2, -1)  # (B, heads, N, 1, k^2)
        table = self._table(scores.dtype)
        if table is not None:
            bias = neighborhood_bias_index(Hp, Wp, self.kernel_size, self.dilation, q.device)
            scores = scores + table[:, bias[:H, :W].reshape(H * W, 1, -1)]
        weights = scores.softmax(-1)
        self.record(weights.view(B, h, H, W, *self.kernel_size))
        if p > 0:
            weights = F.dropout(weights, p=p)
        return (weights @ values).view(B, h, H, W, d)

    def _tiled(self, qkv: Tensor, H: int, W: int, Hp: int, Wp: int, p: float, impl: str
               ) -> Tensor:
        """Tiles of queries against their halo keys: one attention call per group of tiles
        sharing a keep pattern, its mask (bias included) broadcast over the group."""
        _, B, h, Np, d = qkv.shape
        tiles = cached_tiles(self._tiles, Hp, Wp, self.kernel_size, self.dilation,
                             to_2tuple(self.tile), qkv.device)
        nT, Q = tiles.query.shape
        K = tiles.key.shape[1]
        # rows gathered straight from the projection's (B, Np, 3, heads, d) output (no
        # permuted copy), tile-major, batch- then head-minor: a range of tiles is one
        # (tiles * B, heads, Q | K, d) block, its mask broadcast over it
        source = qkv.permute(1, 3, 0, 2, 4)  # (B, Np, 3, heads, d): the linear's layout
        if not source.is_contiguous():
            source = source.contiguous()
        source = source.view(-1, d)
        base = (torch.arange(B, device=qkv.device).view(1, B, 1, 1) * (Np * 3 * h)
                + torch.arange(h, device=qkv.device).view(1, 1, h, 1))
        qi = (tiles.query[:, None, None] * (3 * h) + base).view(nT, -1)
        ki = (tiles.key[:, None, None] * (3 * h) + base).view(nT, -1)
        table = self._table(qkv.dtype)
        masks = []
        for g in range(len(tiles.groups)):
            mask = additive_mask(tiles.keep[g], qkv.dtype)  # (Q, K)
            masks.append(mask if table is None else table[:, tiles.bias[g]] + mask)
        sdpa = "sdpa" if impl == "sdpa" else "auto"
        if torch.is_grad_enabled() and (qkv.requires_grad or table is not None
                                        and table.requires_grad):
            # training: one call over every tile, each tile's mask broadcast over the batch
            # (per-group calls would make autograd concatenate the split gradients)
            counts = torch.tensor([stop - first for first, stop in tiles.groups],
                                  device=qkv.device)
            mask = torch.stack(masks).repeat_interleave(counts, 0, output_size=nT)
            mask = mask.view(nT, 1, -1, Q, K)  # (tiles, 1, heads | 1, Q, K)
            index = (qi, ki + h, ki + 2 * h)
            if impl == "auto" and p == 0.0 and not qkv.is_cuda:
                # the gather, chunks of tiles and a three-way scatter in one kernel
                out = halo_attention(source, mask, index, (nT, B, h, Q, K), self.scale)
            else:
                q, k, v = (source.index_select(0, i.view(-1)).view(nT, B, h, -1, d)
                           for i in index)
                if qkv.is_cuda:  # CUDA's fused kernels take 4-D only
                    q, k, v = (t.flatten(0, 1) for t in (q, k, v))
                    mask = mask.expand(nT, B, h, Q, K).flatten(0, 1)
                out = attention(q, k, v, mask, scale=self.scale, dropout_p=p, impl=sdpa)
        else:
            # inference: each group gathered just before its call (less memory held)
            outs = []
            for (first, stop), mask in zip(tiles.groups, masks, strict=True):
                n = (stop - first) * B
                q, k, v = (source.index_select(0, i[first:stop].reshape(-1) + s * h
                                               ).view(n, h, -1, d)
                           for s, i in enumerate((qi, ki, ki)))
                outs.append(attention(q, k, v, mask.expand(1, h, Q, K), scale=self.scale,
                                      dropout_p=p, impl=sdpa))
            out = torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()
        # each real token's slot, per head (the crop drops padded queries)
        slot = tiles.output.view(Hp, Wp)[:H, :W].reshape(1, -1, 1)
        heads = torch.arange(h, device=qkv.device)
        batch = torch.arange(B, device=qkv.device).view(B, 1, 1)
        slot = ((slot // Q * B + batch) * h + heads) * Q + slot % Q  # (B, N, heads)
        return out.view(-1, d).index_select(0, slot.view(-1)).view(B, H, W, h * d)

    def _flex(self, qkv: Tensor, Hp: int, Wp: int) -> Tensor:
        """FlexAttention over the whole map: NATTEN's rule as a block mask, the bias as a
        ``score_mod`` lookup (compiled on CUDA; eager elsewhere, for checking)."""
        from torch.nn.attention.flex_attention import create_block_mask

        from .window import _flex_attention

        q, k, v = qkv.unbind(0)  # (B, heads, Np, d)
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        dev = q.device
        rows = neighborhood_index(Hp, 1, (kh, 1), (dh, 1), dev)[:, 0, 0, 0]  # window starts
        cols = neighborhood_index(1, Wp, (1, kw), (1, dw), dev)[0, :, 0, 0]
        key = (Hp, Wp, dev)
        block_mask = self._block_masks.get(key)
        if block_mask is None:
            def mask_mod(b, head, qi, ki):
                dr = ki // Wp - rows[qi // Wp]
                dc = ki % Wp - cols[qi % Wp]
                return ((dr >= 0) & (dr < kh * dh) & (dr % dh == 0)
                        & (dc >= 0) & (dc < kw * dw) & (dc % dw == 0))

            outside = (torch.inference_mode(False) if torch.is_inference_mode_enabled()
                       else contextlib.nullcontext())
            with outside:
                block_mask = create_block_mask(mask_mod, None, None, Hp * Wp, Hp * Wp,
                                               device=dev)
            if len(self._block_masks) > 16:
                self._block_masks.clear()
            self._block_masks[key] = block_mask
        score_mod = None
        table = self._table(q.dtype)
        if table is not None:
            def score_mod(score, b, head, qi, ki):
                orow = ((ki // Wp - qi // Wp) // dh + kh - 1).clamp(0, 2 * kh - 2)
                ocol = ((ki % Wp - qi % Wp) // dw + kw - 1).clamp(0, 2 * kw - 2)
                return score + table[head, orow * (2 * kw - 1) + ocol]

        return _flex_attention(dev)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                    scale=self.scale)

    # -- checkpoints and visualisation --------------------------------------------------
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,
                                 prefix: str | None = None):
        """Load NATTEN ``NeighborhoodAttention2D`` weights (``qkv.*``, ``rpb``, ``proj.*``)
        from a module's state dict or a whole model's (NAT: ``levels.{i}.blocks.{j}.attn.``;
        pass ``prefix`` when it holds several). ``{'model' | 'state_dict': ...}`` wrappings
        and the ``module.`` prefix of DataParallel are removed."""
        for wrapper in ("state_dict", "model"):
            if isinstance(state_dict.get(wrapper), Mapping):
                state_dict = state_dict[wrapper]
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                      for k, v in state_dict.items()}
        if prefix is None:
            found = sorted(k[: -len("qkv.weight")] for k in state_dict
                           if k.endswith("qkv.weight"))
            if len(found) > 1:
                raise ValueError(
                    f"neighborhood_attention: the state dict holds {len(found)} attention "
                    f"modules ({', '.join(found[:3])}, ...); pass prefix= to choose one")
            prefix = found[0] if found else ""
        names = set(self.state_dict())
        own = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix) and k[len(prefix):] in names}
        return self.load_state_dict(own, strict=strict)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int],
                    dilation: int | tuple[int, int] = 1) -> Tensor:
        """Record ``(B, heads, H, W, kh, kw)`` -> ``(B, H, W)``: the attention each token
        receives, averaged over heads and queries (pass the module's ``dilation``)."""
        H, W = size
        if weights.dim() != 6 or tuple(weights.shape[2:4]) != (H, W):
            return super().spatial_map(weights, size)
        kh, kw = weights.shape[-2:]
        (dh, dw) = to_2tuple(dilation)
        Hp, Wp = max(H, kh * dh), max(W, kw * dw)
        index = neighborhood_index(Hp, Wp, (kh, kw), (dh, dw), weights.device)[:H, :W]
        B = weights.shape[0]
        received = weights.float().mean(1).reshape(B, -1)  # (B, N * k^2)
        grid = torch.zeros(B, Hp * Wp, device=weights.device)
        grid.index_add_(1, index.reshape(-1), received)
        return grid.view(B, Hp, Wp)[:, :H, :W] / (H * W)

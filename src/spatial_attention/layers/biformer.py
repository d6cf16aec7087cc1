"""BiFormer's bi-level routing attention (BRA) on ``(B, H, W, C)``.

Zhu et al., *BiFormer: Vision Transformer with Bi-Level Routing Attention*, CVPR 2023,
Sec. 3.2 (rayleizhu/BiFormer ``ops/bra_legacy.py``, ``BiLevelRoutingAttention``).
The map is cut into ``S x S`` regions. Region level: region queries and keys are the
mean of their tokens' queries and keys, ``A^r = Q^r (K^r)^T`` is the region affinity,
and each region keeps the ``k`` regions of largest affinity, ``I^r = topk(A^r)``. Token
level: the keys and values of those ``k`` regions are gathered and every token of the
region attends to them, ``O = Attention(Q, K^g, V^g) + LCE(V)``, where LCE is a depthwise
convolution of the values (local context enhancement). Both levels are batched: one
``topk`` for every region of the batch, one row gather of the routed regions' tokens, one
attention call over ``(B*S^2, heads, w^2, k*w^2)`` blocks; no loop over regions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_divisible, check_positive
from ..functional.dispatch import attention
from ..functional.windows import pad_to_multiple, padding_mask, window_partition
from ..registry import register
from .base import AttentionModule

__all__ = ["BiLevelRoutingAttention", "convert_official_bra_keys"]

_NAME = "bi_level_routing_attention"


@register(
    _NAME,
    family="token_global",
    layout="tokens",
    paper="Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention "
    "(CVPR, Sec. 3.2: region-to-region routing, token-to-token attention, LCE)",
    year=2023,
    cost="2·B·N·C·(2·Cqk + 2·C) (qkv, output) + 2·B·S⁴·Cqk (routing) "
    "+ 2·B·N·k·w²·(Cqk + C) (token attention) + 2·B·N·C·s² (LCE)",
    captures="(B, S², k) routed region indices, (B, S², k) routing weights, then the "
    "(B, S², heads, w², k·w²) token attention weights",
)
class BiLevelRoutingAttention(AttentionModule):
    """Bi-level routing attention (Zhu et al. CVPR 2023, Sec. 3.2).

    ``qkv: C -> 2 Cqk + C``; with ``Cqk = qk_dim`` (default ``dim``), regions of
    ``w^2 = (H/S)(W/S)`` tokens: ``Q^r, K^r`` region means, ``A^r = Q^r K^rT * scale``,
    ``I^r`` its ``topk`` columns per row, ``K^g, V^g`` the tokens of those regions,
    ``O = softmax(Q K^gT * scale) V^g + LCE(V)`` per head, then ``wo``.
    Shapes ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Args: ``dim, num_heads``; ``n_win``
    ``S`` regions a side (7); ``topk`` (4; BiFormer-T: 1, 4, 16 in stages 1-3); ``qk_dim``;
    ``qk_scale`` (default ``qk_dim^-0.5``: the official scale, the width of all heads, not
    one head's); ``side_dwconv`` LCE kernel (5, 0 = none); ``param_attention`` ``"qkvo"``
    (``"qkv"``: no ``wo``); routing flags as the official: ``diff_routing`` (gradients through
    the region means, else detached), ``soft_routing`` (gathered k, v scaled by the softmax of
    the ``topk`` affinities), ``param_routing`` (a Linear on ``Q^r, K^r``; needs
    ``diff_routing``); ``kv_downsample_mode`` ``"identity"`` only (BiFormer's setting).
    Cost ``2·B·N·C·(2Cqk+2C) + 2·B·S^4·Cqk + 2·B·N·k·w^2·(Cqk+C) + 2·B·N·C·s^2``.
    Deviation, any size: the official (``auto_pad``) zero-pads ``x`` to multiples of ``S``
    before ``qkv``, so padded tokens carry the bias into the softmax, the region means and
    LCE. Here ``qkv`` runs on the real tokens, q, k, v are zero-padded after it (as the
    official's ``bra_nchw``); padded keys are masked out of the softmax, region means count
    real tokens only (regions with none are routed to last, their keys all masked), and LCE
    convolves the unpadded values. Divisible sizes: the official's output (to rounding).
    Official keys: :meth:`load_official_state_dict`.
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (one row gather, one dispatcher call over
    all regions), ``explicit`` (regions partitioned, routed regions indexed, softmax written
    out and recorded). Routing is one function on both paths.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")
    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        kv_downsample_mode: str = "identity",
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        qk_dim = dim if qk_dim is None else qk_dim
        check_divisible(_NAME, dim, num_heads)
        check_positive(_NAME, n_win=n_win, topk=topk, qk_dim=qk_dim)
        if qk_dim % num_heads:
            raise ValueError(f"{_NAME}: qk_dim {qk_dim} is not divisible by num_heads "
                             f"{num_heads}")
        if topk > n_win * n_win:
            raise ValueError(f"{_NAME}: topk {topk} exceeds the n_win^2 = {n_win * n_win} "
                             f"regions")
        if qk_scale is not None:
            check_positive(_NAME, qk_scale=qk_scale)
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f"{_NAME}: side_dwconv must be 0 (no LCE) or an odd kernel size, "
                             f"got {side_dwconv}")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"{_NAME}: param_attention must be 'qkvo' or 'qkv', got "
                             f"{param_attention!r}")
        if param_routing and not diff_routing:
            raise ValueError(f"{_NAME}: param_routing=True needs diff_routing=True (a routing "
                             "Linear behind detached region means would never train)")
        if diff_routing and not soft_routing:
            raise ValueError(f"{_NAME}: diff_routing=True needs soft_routing=True (hard "
                             "differentiable routing is not defined by the official code)")
        if kv_downsample_mode != "identity":
            raise ValueError(f"{_NAME}: kv_downsample_mode {kv_downsample_mode!r} is not "
                             "offered; 'identity' (BiFormer's setting) only")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.qk_dim = qk_dim
        self.scale = float(qk_scale) if qk_scale else qk_dim**-0.5
        self.param_routing, self.diff_routing = param_routing, diff_routing
        self.soft_routing = soft_routing
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv else None)
        self.router_emb = nn.Linear(qk_dim, qk_dim) if param_routing else None
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
                f"topk={self.topk}, qk_dim={self.qk_dim}, " + super().extra_repr())

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        cq, S = self.qk_dim, self.n_win
        # qkv as three products of its weight's row blocks: the same Linear, without
        # the full-width zero-filled gradient each slice of one (B, H, W, 2Cqk + C)
        # output would take in backward
        wq, wk, wv = self.qkv.weight.split([cq, cq, C])
        bq, bk, bv = self.qkv.bias.split([cq, cq, C])
        q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        # LCE on the values of the real tokens: the conv's own zero padding at the border
        lce = 0.0
        if self.lepe is not None:
            lce = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        (q, k, v), (pad_h, pad_w) = _pad((q, k, v), S)  # zero q, k, v on the padding
        Hp, Wp = H + pad_h, W + pad_w
        region = (Hp // S, Wp // S)
        valid = padding_mask(H, W, pad_h, pad_w, device=x.device) if pad_h or pad_w else None
        r_weight, r_idx = self.route(x, q, k, region, valid)  # (B, S², k) each
        r_weight = r_weight.to(q.dtype)
        if self.impl == "explicit":
            out = self._explicit(q, k, v, region, valid, r_weight, r_idx)
        else:
            out = self._gathered(q, k, v, region, valid, r_weight, r_idx)
        return self.wo(out[:, :H, :W] + lce)

    def route(self, x: Tensor, q: Tensor, k: Tensor, region: tuple[int, int],
              valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Region-to-region routing: the softmax of the ``topk`` affinities and their region
        indices, ``(B, S², k)``, from the input ``(B, H, W, C)`` and its padded queries and
        keys ``(B, Hp, Wp, Cqk)``.

        ``Q^r, K^r`` are the means of each region's queries and keys. In bfloat16/float16
        they are instead ``W_q, W_k`` applied in float32 to the mean of the region's input
        tokens (the same affine map), as a rounding of the affinities could change which
        regions are routed."""
        B, Hp, Wp, cq = q.shape
        S, (rh, rw) = self.n_win, region
        exact = q.dtype in (torch.float32, torch.float64)
        dtype = q.dtype if exact else torch.float32
        emb = self.router_emb
        if not self.diff_routing:
            x, q, k = x.detach(), q.detach(), k.detach()
        with _no_autocast(x.device.type):
            counts, empty = float(rh * rw), None
            if valid is not None:
                counts = valid.view(S, rh, S, rw).sum(3).sum(1).view(S * S, 1)
                empty = counts.view(S * S) == 0  # regions of padding alone
                counts = counts.clamp_min(1).to(dtype)

            def means(t: Tensor) -> Tensor:  # one axis at a time: a joint sum is slow
                c = t.shape[-1]
                return t.view(B, S, rh, S, rw, c).sum(4).sum(2).view(B, S * S, c) / counts

            if exact:
                q_r, k_r = means(q), means(k)
            else:
                w, b = self.qkv.weight[:2 * cq].float(), self.qkv.bias[:2 * cq].float()
                if not self.diff_routing:
                    w, b = w.detach(), b.detach()
                x_r = means(pad_to_multiple(x.float(), S)[0])
                q_r, k_r = F.linear(x_r, w, b).split(cq, dim=-1)
            if emb is not None:
                w_e, b_e = emb.weight.to(dtype), emb.bias.to(dtype)
                q_r, k_r = F.linear(q_r, w_e, b_e), F.linear(k_r, w_e, b_e)
            logits = (q_r * self.scale) @ k_r.transpose(-2, -1)  # (B, S², S²)
            if empty is not None:
                logits = logits.masked_fill(empty, float("-inf"))
            top, r_idx = torch.topk(logits, self.topk, dim=-1)
            return torch.softmax(top, dim=-1), r_idx

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, region: tuple[int, int],
                  valid: Tensor | None, r_weight: Tensor, r_idx: Tensor) -> Tensor:
        """Token-to-token attention as written: regions partitioned, the routed ones indexed,
        softmax formed."""
        B, Hp, Wp, _ = q.shape
        h, S, n = self.num_heads, self.n_win, self.topk
        T = region[0] * region[1]
        q, k, v = (window_partition(t, region).view(B, S * S, T, -1) for t in (q, k, v))
        batch = torch.arange(B, device=q.device)[:, None, None]
        k, v = k[batch, r_idx], v[batch, r_idx]  # (B, S², k, w², ·): the routed regions
        if self.soft_routing:
            k, v = k * r_weight[..., None, None], v * r_weight[..., None, None]
        q = q.reshape(B * S * S, T, h, -1).transpose(1, 2)
        k = k.reshape(B * S * S, n * T, h, -1).transpose(1, 2)
        v = v.reshape(B * S * S, n * T, h, -1).transpose(1, 2)
        mask = None
        if valid is not None:
            real = window_partition(valid[None, ..., None], region).view(S * S, T)
            mask = real[r_idx].reshape(B * S * S, 1, 1, n * T)
        out, weights = attention(q, k, v, mask, scale=self.scale, impl="explicit",
                                 return_weights=True)  # (B S², h, w², C/h)
        self.record(r_idx)
        self.record(r_weight)
        self.record(weights.view(B, S * S, h, T, n * T))
        return self._to_map(out, region, Hp, Wp)

    def _gathered(self, q: Tensor, k: Tensor, v: Tensor, region: tuple[int, int],
                  valid: Tensor | None, r_weight: Tensor, r_idx: Tensor) -> Tensor:
        """Token-to-token attention by row gathers: the routed regions' keys and values
        are read from the map by token index straight into the dispatcher's blocks."""
        B, Hp, Wp, cq = q.shape
        h, S, n = self.num_heads, self.n_win, self.topk
        rh, rw = region
        T = rh * rw
        tokens = _region_tokens(S, region, Wp, q.device)  # (S², w²) flat positions
        offsets = torch.arange(B, device=q.device) * (Hp * Wp)
        rows = (tokens[r_idx] + offsets[:, None, None, None]).view(-1)  # (B S² k w²,)
        k = k.reshape(B * Hp * Wp, cq).index_select(0, rows)
        v = v.reshape(B * Hp * Wp, self.dim).index_select(0, rows)
        if self.soft_routing:
            scale = r_weight.reshape(B * S * S, n, 1, 1)
            k = (k.view(B * S * S, n, T, cq) * scale).view(-1, cq)
            v = (v.view(B * S * S, n, T, self.dim) * scale).view(-1, self.dim)
        k = k.view(B * S * S, n * T, h, -1).transpose(1, 2)  # (B S², h, k w², d)
        v = v.view(B * S * S, n * T, h, -1).transpose(1, 2)
        q = q.reshape(B, S, rh, S, rw, h, cq // h)
        q = q.permute(0, 1, 3, 5, 2, 4, 6).reshape(B * S * S, h, T, cq // h)
        mask = None
        if valid is not None:
            mask = valid.view(-1)[tokens][r_idx].view(B * S * S, 1, 1, n * T)
        out = attention(q, k, v, mask, scale=self.scale, impl=self.impl)
        return self._to_map(out, region, Hp, Wp)

    def _to_map(self, out: Tensor, region: tuple[int, int], Hp: int, Wp: int) -> Tensor:
        """``(B*S², heads, w², C/heads) -> (B, Hp, Wp, C)``."""
        S, (rh, rw) = self.n_win, region
        out = out.view(-1, S, S, self.num_heads, rh, rw, out.shape[-1])
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(-1, Hp, Wp, self.dim)

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an official ``BiLevelRoutingAttention`` state dict (``qkv.qkv.weight``,
        ``router.emb.weight``, ``lepe``, ``wo``); see :func:`convert_official_bra_keys`."""
        return self.load_state_dict(convert_official_bra_keys(state_dict), strict=strict)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """Maps under 14 a side get ``n_win = 2`` regions a side (regions of several tokens)
        and ``topk = 2``; larger maps the official 7 and 4."""
        if min(size) < 14:
            kwargs.setdefault("n_win", 2)
            kwargs.setdefault("topk", 2)
        return super().example(name, batch, channels, size, **kwargs)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The ``(B, S², k)`` routed-index record -> how many regions route to each
        region, spread over its tokens (where the routing sends attention)."""
        H, W = size
        if weights.dim() == 3 and not weights.is_floating_point():
            B, R, _ = weights.shape
            S = math.isqrt(R)
            if S * S == R:
                counts = torch.zeros(B, R, device=weights.device)
                routes = weights.reshape(B, -1)
                counts.scatter_add_(1, routes, torch.ones(routes.shape, device=weights.device))
                rh, rw = -(-H // S), -(-W // S)
                grid = counts.view(B, S, S).repeat_interleave(rh, 1).repeat_interleave(rw, 2)
                return grid[:, :H, :W]
        raise ValueError(f"{cls.__name__}: only the (B, S², k) routed-index record becomes a "
                         f"map, got {tuple(weights.shape)} ({weights.dtype})")


def _no_autocast(device: str) -> AbstractContextManager:
    """Autocast switched off where it is on (and nothing on devices without autocast)."""
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


def _pad(maps: tuple[Tensor, ...], multiple: int) -> tuple[tuple[Tensor, ...], tuple[int, int]]:
    """Each ``(B, H, W, ·)`` map zero-padded at the bottom/right to multiples of ``multiple``."""
    padded = [pad_to_multiple(t, multiple) for t in maps]
    return tuple(t for t, _ in padded), padded[0][1]


def _region_tokens(S: int, region: tuple[int, int], Wp: int, device: torch.device) -> Tensor:
    """``(S², rh*rw)`` flat positions (row-major over ``Hp x Wp``) of each region's tokens."""
    rh, rw = region
    rows = torch.arange(S, device=device)[:, None] * rh + torch.arange(rh, device=device)
    cols = torch.arange(S, device=device)[:, None] * rw + torch.arange(rw, device=device)
    flat = rows[:, None, :, None] * Wp + cols[None, :, None, :]  # (S, S, rh, rw)
    return flat.reshape(S * S, rh * rw)


#: official key segment -> ours (``QKVLinear`` wraps its Linear as ``qkv.qkv``; the
#: routing Linear sits in ``TopkRouting`` as ``router.emb``)
_OFFICIAL_KEYS = (("qkv.qkv.", "qkv."), ("router.emb.", "router_emb."))


def convert_official_bra_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename official BRA keys to ours, wherever the module sits in a state dict.

    Accepts the release's ``{'model': ...}`` and ``{'state_dict': ...}`` wrappings and
    ``module.`` prefixes; ``lepe`` and ``wo`` keep their names, other keys pass through.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    return rename_key_segments(state_dict, _OFFICIAL_KEYS)

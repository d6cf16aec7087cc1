"""CSWin's cross-shaped window attention with LePE on ``(B, H, W, C)``.

CSWin Transformer (Dong et al., CVPR 2022, Sec. 3.2, Eq. 1-3 and Sec. 3.3, Eq. 4-5;
microsoft/CSWin-Transformer, ``LePEAttention`` and the attention half of ``CSWinBlock``)
splits the heads in two: half attend inside vertical stripes (full height, ``sw``
columns), half inside horizontal stripes (``sw`` rows, full width), so every token sees
a cross-shaped region. Each stripe adds the locally-enhanced positional encoding LePE,
a depthwise 3x3 convolution of the values *within the stripe*: ``Attention(Q, K, V) =
softmax(Q K^T / sqrt(d)) V + DWConv(V)`` (Eq. 5). The last stage, where the stripe covers
the map, uses one branch of all heads over the whole map (``last_stage=True``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_divisible, check_positive, check_probability
from ..functional.dispatch import attention
from ..functional.windows import pad_to_multiple, padding_mask, window_partition, window_reverse
from ..registry import register
from .base import AttentionModule

__all__ = ["CSWinAttention", "LePE"]


class LePE(nn.Module):
    """One stripe branch's positional encoding: ``get_v``, a depthwise 3x3 convolution
    (the reference's ``LePEAttention`` holds only this parameter)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.get_v = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, v: Tensor) -> Tensor:
        return self.get_v(v)


@register(
    "cswin_attention",
    family="token_local",
    layout="tokens",
    paper="Dong et al., CSWin Transformer: A General Vision Transformer Backbone with "
    "Cross-Shaped Windows (Sec. 3.2 Eq. 1-3, LePE Sec. 3.3 Eq. 5)",
    year=2022,
    cost="8·B·N·C² (qkv, proj) + 2·B·N·sw·(H+W)·C (stripe attention) + 18·B·N·C (LePE)",
    captures="(B, nW, heads/2, S, S) weights per stripe branch (vertical, then horizontal)",
)
class CSWinAttention(AttentionModule):
    """Cross-shaped window self-attention with LePE (Dong et al. CVPR 2022, Eq. 1-5).

    Dong et al., *CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
    Windows*, CVPR 2022, Sec. 3.2 Eq. 1-3, LePE Sec. 3.3 Eq. 4-5. ``qkv`` maps ``C -> 3C``;
    channels ``[:C/2]`` go to the vertical-stripe branch (``attns.0``, stripes ``H x sw``),
    ``[C/2:]`` to the horizontal one (``attns.1``, ``sw x W``), each with ``num_heads / 2``
    heads of width ``C / num_heads``; in a stripe ``softmax(q k^T * scale) v + LePE(v)``; the
    halves are concatenated and projected by ``proj``.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Args: ``dim``, ``num_heads``;
    ``split_size`` ``sw`` 7; ``last_stage`` (one branch of all heads over the whole map, the
    reference's ``sw x sw`` last stage); ``qkv_bias``; ``scale`` (None: ``d^-0.5``);
    ``attn_drop``, ``proj_drop``.
    Cost: ``8·B·N·C²`` (qkv, proj) ``+ 2·B·N·sw·(H + W)·C`` (each half-width branch attends
    over ``sw·H`` or ``sw·W`` keys) ``+ 18·B·N·C`` (LePE).
    Reference parameter names (``qkv``, ``attns.{i}.get_v``, ``proj``; in a CSWin block they
    sit in the block, see :mod:`spatial_attention.models.cswin`). Deviation: the reference
    asserts a square map of the size fixed at construction; here each branch pads its
    stripes' short side to a multiple of ``sw`` with zero q, k, v, masks the padded keys and
    crops. Zero values are what LePE's zero padding sees at a stripe border anyway, so real
    tokens at a padded border get the same encoding as at any other border.
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (one call per branch over all stripes of
    the batch), ``explicit`` (softmax written out, recorded per branch); measured in
    benchmarks/boat.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int = 7,
        last_stage: bool = False,
        qkv_bias: bool = True,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "cswin_attention"
        check_divisible(name, dim, num_heads)
        check_positive(name, split_size=split_size)
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        branches = 1 if last_stage else 2
        if branches == 2 and (num_heads % 2 or dim % 2):
            raise ValueError(
                f"{name}: two stripe branches need an even num_heads and dim, got dim={dim}, "
                f"num_heads={num_heads} (or pass last_stage=True)"
            )
        self.dim, self.num_heads, self.split_size = dim, num_heads, split_size
        self.last_stage, self.branches = last_stage, branches
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5 if scale is None else float(scale)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attns = nn.ModuleList(LePE(dim // branches) for _ in range(branches))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, split_size={self.split_size}, "
                f"last_stage={self.last_stage}, " + super().extra_repr())

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        return self.mix(x)

    def mix(self, x: Tensor) -> Tensor:
        """The attention itself on a validated ``(B, H, W, C)`` map (blocks call this)."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).view(B, H, W, 3, C)
        width = C // self.branches
        outs = []
        for i, lepe in enumerate(self.attns):
            part = qkv[..., i * width:(i + 1) * width]  # (B, H, W, 3, c)
            if self.branches == 1:
                stripe = (H, W)
            elif i == 0:
                stripe = (H, self.split_size)  # vertical stripes
            else:
                stripe = (self.split_size, W)  # horizontal stripes
            outs.append(self._stripes(part, stripe, lepe))
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return self.proj_drop(self.proj(out))

    def _stripes(self, qkv: Tensor, stripe: tuple[int, int], lepe: LePE) -> Tensor:
        B, H, W, _, c = qkv.shape
        heads = self.num_heads // self.branches
        d = c // heads
        sh, sw = stripe
        padded, (pad_h, pad_w) = pad_to_multiple(qkv.reshape(B, H, W, 3 * c), stripe)
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(padded, stripe)  # (B*nW, S, 3c)
        S = sh * sw
        q, k, v = windows.view(-1, S, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        # LePE: depthwise conv of the values inside each stripe, zero-padded at its border
        v_img = windows[..., 2 * c:].transpose(1, 2).reshape(-1, c, sh, sw)
        pos = lepe(v_img).reshape(-1, heads, d, S).transpose(-2, -1)  # (B*nW, heads, S, d)
        mask = None
        if pad_h or pad_w:
            valid = padding_mask(H, W, pad_h, pad_w, device=qkv.device)[None, :, :, None]
            keys = window_partition(valid, stripe)[..., 0]  # (nW, S)
            mask = keys.repeat(B, 1)[:, None, None, :]  # (B*nW, 1, 1, S)
        p = self.attn_drop if self.training else 0.0
        if self.use_fused:
            out = attention(q, k, v, mask, scale=self.scale, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(q, k, v, mask, scale=self.scale, dropout_p=p,
                                     impl="explicit", return_weights=True)
            self.record(weights.view(B, -1, heads, S, S))
        out = (out + pos).transpose(1, 2).reshape(-1, S, c)
        return window_reverse(out, stripe, Hp, Wp)[:, :H, :W]

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """Two heads at least (one per branch); stripes of width 2 so small maps hold
        several stripes."""
        kwargs.setdefault("num_heads", max(2, 2 * (channels // 64)))
        kwargs.setdefault("split_size", 2 if min(size) < 14 else 7)
        return super().example(name, batch, channels, size, **kwargs)

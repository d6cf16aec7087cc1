"""Polarized self-attention on ``(B, C, H, W)`` (Liu et al. 2021).

Two gates, each keeping one axis at full resolution while collapsing the other: the
channel-only branch pools the map with a softmax over positions into a ``C/2`` vector
and turns it into a ``(B, C, 1, 1)`` gate; the spatial-only branch pools a ``C/2``
query globally, softmaxes it over channels and scores every position into a
``(B, 1, H, W)`` gate. Both end in a sigmoid. Parallel: ``x * A_ch + x * A_sp``;
sequential: the spatial gate is computed on, and applied to, ``x * A_ch``.

The released code (``DeLightCMU/PSA``, ``network/PSA.py``) differs from the paper in
both branches; ``variant="official"`` reproduces it (``PSA_p`` / ``PSA_s``) and
:meth:`PolarizedSelfAttention.load_official_state_dict` maps its parameter names
(``conv_q_right`` ... ``conv_up``) onto ours (``ch_wq`` ... ``ch_wz``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["PolarizedSelfAttention", "convert_official_psa_keys"]

_MODES = ("parallel", "sequential")
_VARIANTS = ("paper", "official")


@register(
    "polarized",
    family="channel_spatial",
    layout="map",
    paper="Liu et al., Polarized Self-Attention: Towards High-quality Pixel-wise "
          "Regression (Sec. 3)",
    year=2021,
    cost="2·B·H·W·C·(1 + 3·C/2) (the four 1x1 convs as written) + B·C² (W_z) "
         "+ ~10·B·C·H·W (softmaxes, pools, gates); the fast path reassociates the convs: "
         "~8·B·C·H·W + O(B·C²)",
    captures="per call, the channel gate A_ch (B, C, 1, 1), then the spatial gate A_sp "
             "(B, 1, H, W) (the latter is maps[name]; maps.calls(name) has both)",
)
class PolarizedSelfAttention(AttentionModule):
    """Polarized self-attention (Liu, Liu, Fan, Huang; arXiv 2107.00782, 2021).

    Channel-only: ``A_ch = sigmoid(LN(W_z(W_v(X) softmax_HW(W_q(X))^T)))`` with
    ``W_q: C -> 1``, ``W_v: C -> C/2``, ``W_z: C/2 -> C``, LayerNorm over ``C``.
    Spatial-only: ``A_sp = sigmoid(softmax_C/2(GAP(W_q'(X)))^T W_v'(X))`` with
    ``W_q', W_v': C -> C/2``. ``mode="parallel"``: ``A_ch ⊙ X + A_sp ⊙ X``;
    ``mode="sequential"`` (default: the official network, ``hrnetv2.py``, builds PSA_s):
    ``A_sp(Y) ⊙ Y``, ``Y = A_ch ⊙ X``. Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    ``variant="official"`` is the released code, for its checkpoints: PSA_p's ``W_z`` is
    a plain conv (no LayerNorm) and its spatial softmax runs over positions after the
    product; PSA_s's ``W_z`` is ``C/2 -> C/8`` conv, LayerNorm, ReLU, ``-> C`` conv, and
    its softmax runs over the positions of each ``W_v'(Y)`` channel (the pooled query
    gets none). Init as official: ``W_q, W_v`` of both branches kaiming-normal
    (fan_in, ReLU gain), no biases; ``W_z`` PyTorch's default, bias only in PSA_s.
    Cost as written: ``2·B·H·W·C·(1 + 3·C/2) + B·C² + ~10·B·C·H·W``.
    Deviations: widths ``max(1, C // 2)`` and ``max(1, C // 8)``; the paper's ``W_z`` has
    no bias (PSA_p's has none; LayerNorm adds the shift).
    Records ``A_ch`` then ``A_sp``. ``attn_impl``: explicit (the convs on the full map, as
    written); auto (each softmax-weighted pool is taken before the linear ``W_v``, and
    ``GAP`` before ``W_q'``, so no ``C/2``-wide map is formed, except official PSA_s's
    softmax over ``W_v'(Y)``; the sequential ``Y`` is folded into the weights).
    """

    layout = "map"

    def __init__(self, channels: int, mode: str = "sequential", variant: str = "paper",
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("polarized", channels=channels)
        if mode not in _MODES:
            raise ValueError(f"polarized: mode must be one of {_MODES}, got {mode!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"polarized: variant must be one of {_VARIANTS}, got {variant!r}")
        self.channels, self.mode, self.variant = channels, mode, variant
        self.inter_channels = half = max(1, channels // 2)
        self.ch_wq = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_wv = nn.Conv2d(channels, half, 1, bias=False)
        if variant == "official" and mode == "sequential":  # PSA_s's bottleneck
            mid = max(1, half // 4)
            self.ch_wz = nn.Sequential(nn.Conv2d(half, mid, 1), nn.LayerNorm([mid, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(mid, channels, 1))
        else:
            self.ch_wz = nn.Conv2d(half, channels, 1, bias=False)
        self.ch_norm = nn.LayerNorm(channels) if variant == "paper" else None
        self.sp_wq = nn.Conv2d(channels, half, 1, bias=False)
        self.sp_wv = nn.Conv2d(channels, half, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.ch_wq, self.ch_wv, self.sp_wq, self.sp_wv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    @property
    def _official_psa_s(self) -> bool:
        return self.variant == "official" and self.mode == "sequential"

    def _channel_gate(self, z: Tensor) -> Tensor:
        """``(B, C/2, 1, 1)`` pooled values -> ``(B, C, 1, 1)`` gate (``W_z``, LN, sigmoid)."""
        z = self.ch_wz(z)
        if self.ch_norm is not None:
            z = self.ch_norm(z.flatten(1)).view_as(z)
        return torch.sigmoid(z)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.impl == "explicit":
            return self._explicit(x)
        B, C, H, W = x.shape
        xf = x.flatten(2)  # (B, C, N)
        # channel-only: W_v(X) p = W_v (X p), p = softmax over positions of W_q(X)
        # (a row vector times X as a bmm: matmul would fold the batch and copy X)
        p = torch.softmax(self.ch_wq.weight.view(1, 1, C).expand(B, 1, C).bmm(xf), -1)
        # X p and GAP(X) as one product: one gradient term for X instead of two
        pool = torch.cat([p, torch.full_like(p, 1 / (H * W))], 1)  # (B, 2, N)
        pooled, mean = xf.bmm(pool.transpose(1, 2)).unbind(-1)  # (B, C) each
        a_ch = self._channel_gate(F.linear(pooled, self.ch_wv.weight.flatten(1))[..., None, None])
        # spatial-only on U = s X (s = 1, or A_ch when sequential; U is never formed)
        s = a_ch.view(B, C) if self.mode == "sequential" else None
        q = F.linear(mean if s is None else s * mean, self.sp_wq.weight.flatten(1))  # (B, C/2)
        wv = self.sp_wv.weight.flatten(1)  # (C/2, C)
        if self._official_psa_s:  # softmax over each W_v'(U) channel: the map is needed
            wv_s = wv if s is None else wv * s.unsqueeze(1)  # (B, C/2, C)
            logits = q.unsqueeze(1) @ torch.softmax(wv_s @ xf, -1)  # (B, 1, N)
        else:
            if self.variant == "paper":
                q = torch.softmax(q, -1)
            r = q @ wv  # (B, C): q^T W_v' U = (W_v'^T q)^T U
            logits = (r if s is None else r * s).unsqueeze(1).bmm(xf)  # (B, 1, N)
            if self.variant == "official":  # PSA_p: softmax over positions of the product
                logits = torch.softmax(logits, -1)
        # the gates act on xf too: every gradient term for X then meets in one buffer
        a_sp = torch.sigmoid(logits)  # (B, 1, N)
        a_ch = a_ch.view(B, C, 1)
        y = torch.addcmul(xf * a_ch, xf, a_sp) if self.mode == "parallel" else xf * a_ch * a_sp
        return y.view(B, C, H, W)

    def _explicit(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        v = self.ch_wv(x).flatten(2)  # (B, C/2, N)
        p = torch.softmax(self.ch_wq(x).flatten(2), -1)  # (B, 1, N)
        a_ch = self._channel_gate((v @ p.transpose(1, 2)).unsqueeze(-1))  # (B, C, 1, 1)
        self.record(a_ch)
        u = x * a_ch if self.mode == "sequential" else x
        q = self.sp_wq(u).mean((2, 3)).unsqueeze(1)  # (B, 1, C/2): GAP
        v = self.sp_wv(u).flatten(2)  # (B, C/2, N)
        if self.variant == "paper":
            logits = torch.softmax(q, -1) @ v
        elif self.mode == "parallel":  # official PSA_p
            logits = torch.softmax(q @ v, -1)
        else:  # official PSA_s
            logits = q @ torch.softmax(v, -1)
        a_sp = torch.sigmoid(logits).view(B, 1, H, W)
        self.record(a_sp)
        return x * a_ch + x * a_sp if self.mode == "parallel" else u * a_sp

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load one official ``PSA_p`` / ``PSA_s`` module's state dict (``variant="official"``,
        the matching ``mode``)."""
        if self.variant != "official":
            raise ValueError("polarized: official checkpoints need variant='official' "
                             f"(this module is variant={self.variant!r})")
        return self.load_state_dict(convert_official_psa_keys(state_dict), strict=strict)


#: official name -> ours: the official ``spatial_pool`` is the channel-only branch
#: (``*_right``, ``conv_up``), its ``channel_pool`` the spatial-only one (``*_left``)
_OFFICIAL_KEYS = (
    ("conv_q_right.", "ch_wq."),
    ("conv_v_right.", "ch_wv."),
    ("conv_up.", "ch_wz."),
    ("conv_q_left.", "sp_wq."),
    ("conv_v_left.", "sp_wv."),
)


def convert_official_psa_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official ``PSA_p`` / ``PSA_s`` keys to ours, wherever they sit in a model.

    ``layer1.0.deattn.conv_up.1.weight`` becomes ``layer1.0.deattn.ch_wz.1.weight``;
    checkpoints as saved (``{'state_dict': ...}``, ``module.``) are unwrapped.
    """
    return rename_key_segments(state_dict, _OFFICIAL_KEYS)

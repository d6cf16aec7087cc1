"""Generalized spatial attention (Zhu et al., ICCV 2019) on maps ``(B, C, H, W)``.

*An Empirical Study of Spatial Attention Mechanisms in Deep Networks* (Zhu, Cheng, Zhang,
Lin, Dai) writes Transformer attention, deformable and dynamic convolution as one
formula (its generalized attention formulation; equation and section numbers are not
cited because they were not checked against the paper): the output at query ``q`` is
``sum_m W_m sum_k A_m(q, k, z_q, x_k) W'_m x_k``, and the attention weight is the
softmax over keys of a sum of four terms:

* E1 ``z_q^T U_m^T V_m^C x_k``: query content and key content,
* E2 ``z_q^T U_m^T V_m^R R_(k-q)``: query content and relative position,
* E3 ``u_m^T V_m^C x_k``: key content only (a learned vector ``u_m``),
* E4 ``v_m^T V_m^R R_(k-q)``: relative position only (a learned vector ``v_m``).

The reference implementation is mmcv's ``GeneralizedAttention``; this module keeps its
constructor arguments, parameter names, initialisation and numerics (but for its E2
without E4 branch, see ``mmcv_compat``), so an mmcv state dict loads unchanged. mmcv's
conventions, all kept:

* no ``1/sqrt(d)`` scaling; keys and values read ``x`` subsampled by ``kv_stride``,
  queries ``x`` subsampled by ``q_stride`` (mmcv's 1x1 average pools, i.e.
  ``x[..., ::s, ::s]``), and the output is resized back bilinearly;
* relative positions are sinusoids of the x and y offsets (in input pixels, times
  ``position_magnitude``) projected by ``appr_geom_fc_x`` / ``appr_geom_fc_y`` and
  divided by ``sqrt(2)``: ``E2 = q . (P_x + P_y)``, ``E4 = geom_bias . (P_x + P_y)``,
  ``E3 = appr_bias . k``;
* ``spatial_range >= 0`` keeps each query to a local window of keys (mmcv's rule,
  :func:`local_keep_mask`); ``gamma`` starts at 0, so the module starts as the identity;
* parameters exist under the same conditions (``query_conv`` iff E1 or E2, ``key_conv``
  iff E1 or E3, ``appr_geom_fc_x/y`` iff E2 or E4, ``appr_bias`` iff E3, ``geom_bias``
  iff E4) and are initialised the same way (Kaiming-uniform with ``a=1``, zero biases);
  mmcv's ``local_constraint_map`` is a fixed 0/1 table, so loading drops that key and
  the mask is computed for the actual input size.

Fast path (``GeneralizedAttention._fast``). E1, with E3 folded in as ``q + appr_bias``,
is one attention call (scale 1, the local window as a boolean mask). E2 and E4 are
separable in the x and y offsets, so for each query they are a row of ``wk`` numbers and
a column of ``hk`` numbers (batched einsums with ``P_x``, ``P_y``). With E1 they are
appended to the query vector and matched by one-hot key coordinates appended to the key
vector, so one batched GEMM yields the whole energy with no broadcast passes over
``Nq x Nk``; without E1 the energy is their broadcast sum. Either way the scores are
materialised, so the probabilities are kept for backward and the work runs in
cache-sized tiles (:func:`~spatial_attention.functional.materialized_attention`). E3
without E1 is folded into the key projection (``appr_bias^T W_k``: one number per key and
head); E3 alone (global) keeps mmcv's one-row shortcut; E4 alone shares one set of
weights across the batch. ``attn_impl="sdpa"`` sends the augmented vectors through fused
SDPA too, zero-padded to one head width (which the CPU flash kernel needs), so no
``Nq x Nk`` tensor is formed. Explicit path: each term materialised as its own
``(B, heads, Nq, Nk)`` energy, summed, masked, softmax; capture records the four terms
(zeros for terms switched off), then the weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..functional.dispatch import deprecated_switch, materialized_attention
from ..functional.kernels.equal_width import equal_width_sdpa
from ..functional.scoring import masked_softmax
from ..registry import register
from .base import AttentionModule

__all__ = [
    "GeneralizedAttention",
    "parse_attention_type",
    "relative_sinusoid",
    "local_keep_mask",
]

_NAME = "generalized_attention"
#: the paper's names of the four terms, in the order of ``attention_type``'s bits
TERMS = ("E1 query-key content", "E2 query content-relative position",
         "E3 key content", "E4 relative position")


def parse_attention_type(attention_type: str, name: str = _NAME) -> tuple[bool, bool, bool, bool]:
    """``'1011'`` -> ``(True, False, True, True)``; a ValueError for anything else."""
    if (
        not isinstance(attention_type, str)
        or len(attention_type) != 4
        or set(attention_type) - {"0", "1"}
        or "1" not in attention_type
    ):
        raise ValueError(
            f"{name}: attention_type must be four characters of '0'/'1' with at least one "
            f"'1' (E1 E2 E3 E4, e.g. '1111', '1000', '0100'), got {attention_type!r}"
        )
    e1, e2, e3, e4 = (c == "1" for c in attention_type)
    return e1, e2, e3, e4


def relative_sinusoid(
    q_len: int,
    k_len: int,
    q_stride: int,
    k_stride: int,
    feat_dim: int,
    magnitude: float = 1.0,
    wave_length: float = 1000.0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sinusoidal embedding of 1-D offsets between query and key positions.

    Query ``i`` sits at ``i * q_stride``, key ``j`` at ``j * k_stride`` (input pixels);
    the offset ``delta = (i q_stride - j k_stride) * magnitude`` is embedded as
    ``[sin(delta / w^(4f/feat_dim)), cos(...)]`` for ``f < feat_dim / 4``: the embedding of
    mmcv's ``get_position_embedding``, one axis at a time. Returns ``(q_len, k_len,
    feat_dim // 2)``; ``feat_dim`` must be a multiple of 4.
    """
    qi = torch.arange(q_len, device=device, dtype=dtype) * q_stride
    kj = torch.arange(k_len, device=device, dtype=dtype) * k_stride
    delta = (qi[:, None] - kj[None, :]) * magnitude  # (q_len, k_len)
    freq = torch.arange(feat_dim // 4, device=device, dtype=dtype) * (4.0 / feat_dim)
    wave = torch.full((), wave_length, device=device, dtype=dtype) ** freq  # (feat_dim/4,)
    phase = delta[..., None] / wave
    return torch.cat((phase.sin(), phase.cos()), dim=-1)


def local_keep_mask(
    q_size: tuple[int, int], kv_size: tuple[int, int], spatial_range: int, kv_stride: int,
    device: torch.device | None = None,
) -> Tensor:
    """``(Hq*Wq, Hk*Wk)`` boolean keep mask of the local range (True = attend).

    mmcv's ``local_constraint_map`` rule, per axis: query index ``i`` (on the query grid)
    may attend key index ``j`` (on the key grid) iff ``max((i - r) // s, 0) <= j <
    (i + r + 1) // s + 1`` with ``r = spatial_range`` and ``s = kv_stride`` (so with
    ``s = 1`` the window spans ``i - r .. i + r + 1``, one key more after the query than
    before it, as in mmcv; kept for weight compatibility). Separable, so
    it is built from two small axis masks without any loop; every query keeps at least
    one key.
    """

    def axis(nq: int, nk: int) -> Tensor:
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        lo = torch.div(i - spatial_range, kv_stride, rounding_mode="floor").clamp(min=0)
        hi = torch.div(i + spatial_range + 1, kv_stride, rounding_mode="floor") + 1
        return (j >= lo) & (j < hi)  # (nq, nk)

    rows = axis(q_size[0], kv_size[0])  # (Hq, Hk)
    cols = axis(q_size[1], kv_size[1])  # (Wq, Wk)
    keep = rows[:, None, :, None] & cols[None, :, None, :]  # (Hq, Wq, Hk, Wk)
    return keep.reshape(q_size[0] * q_size[1], kv_size[0] * kv_size[1])


@register(
    _NAME,
    family="spatial",
    layout="map",
    paper="Zhu et al., An Empirical Study of Spatial Attention Mechanisms in Deep Networks "
    "(generalized attention formulation, terms E1-E4; mmcv GeneralizedAttention)",
    year=2019,
    cost="2·B·C²·(Nq + 2Nk) + 2·B·C²·Nq (1x1 convs) + 2·B·heads·Nq·Nk·(d + hk + wk + dv) "
    "(scores, weighting); Nq = HW/q_stride², Nk = HW/kv_stride²",
    captures="(B, heads, 4, Nq, Nk) the energy of each term E1..E4 (zero if off), then "
    "(B, heads, Nq, Nk) the attention weights",
)
class GeneralizedAttention(AttentionModule):
    """Generalized attention (Zhu et al. ICCV 2019, terms E1-E4) as mmcv computes it.

    Zhu, Cheng, Zhang, Lin, Dai, *An Empirical Study of Spatial Attention Mechanisms in Deep
    Networks*, ICCV 2019 (the formula, unnumbered here, and mmcv's conventions: see the
    module docstring): ``out = x + gamma * proj_conv(concat_m sum_k A_m(q, k)
    value_conv(x)_k)``, ``A_m`` the softmax over keys of the terms ``attention_type`` turns on.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W``.

    Args (mmcv's names and defaults): ``in_channels``; ``num_heads`` 9 (head width
    ``in_channels // num_heads``, floored, so it need not divide); ``spatial_range`` -1
    (global) or ``>= 0`` (local window of keys); ``kv_stride`` 2, ``q_stride`` 1;
    ``position_embedding_dim`` -1 (``in_channels``), ``position_magnitude`` 1;
    ``attention_type`` ``"1111"`` (bits E1 E2 E3 E4; all 15 non-empty subsets work);
    ``mmcv_compat`` False (below).
    Cost: ``2·B·C²·(2Nq + 2Nk)`` (1x1 convs) ``+ 2·B·heads·Nq·Nk·(d + hk + wk + dv)``,
    ``Nq = HW / q_stride²``, ``Nk = HW / kv_stride²``.
    Deviations from mmcv: a local range works for any channels and map size (mmcv: 256 or
    512 channels, maps up to 84 or 42 pixels); E3 alone with a local range gives each query
    its own window (mmcv's shortcut applies query (0, 0)'s to all); E2 without E4 (``0100``,
    ``0110``, ``1100``, ``1110``) is the paper's, where mmcv matches the y term against the
    query at the transposed position: ``mmcv_compat=True`` reproduces that on square query
    maps (ValueError on others, where mmcv fails) and changes nothing else.
    attn_impl: ``auto`` = ``kept_probs`` (the scores exist anyway: probabilities kept, tiled),
    ``explicit`` (each term recorded), ``sdpa`` (no ``Nq x Nk`` tensor: less memory, slower
    on CPU); measured in benchmarks/generalized_attention.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")
    auto_impl = "kept_probs"  # the scores exist anyway (position terms)

    def __init__(
        self,
        in_channels: int,
        spatial_range: int = -1,
        num_heads: int = 9,
        position_embedding_dim: int = -1,
        position_magnitude: float = 1,
        kv_stride: int = 2,
        q_stride: int = 1,
        attention_type: str = "1111",
        memory_efficient: bool | None = None,
        mmcv_compat: bool = False,
        attn_impl: str | None = None,
    ) -> None:
        if memory_efficient is not None:
            deprecated_switch("generalized_attention(memory_efficient=...)", 'attn_impl="sdpa"')
            attn_impl = "sdpa" if memory_efficient else attn_impl
        super().__init__(attn_impl=attn_impl)
        e1, e2, e3, e4 = parse_attention_type(attention_type)
        check_positive(_NAME, in_channels=in_channels, num_heads=num_heads,
                       kv_stride=kv_stride, q_stride=q_stride,
                       position_magnitude=position_magnitude)
        for key, value in (("in_channels", in_channels), ("num_heads", num_heads),
                           ("kv_stride", kv_stride), ("q_stride", q_stride),
                           ("spatial_range", spatial_range)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{_NAME}: {key} must be an int, got {value!r}")
        if num_heads > in_channels:
            raise ValueError(
                f"{_NAME}: in_channels {in_channels} gives no channel per head with "
                f"num_heads {num_heads} (head width is in_channels // num_heads)"
            )
        if spatial_range < -1:
            raise ValueError(
                f"{_NAME}: spatial_range must be -1 (global) or >= 0 (local), got {spatial_range}"
            )
        pos_dim = position_embedding_dim if position_embedding_dim > 0 else in_channels
        if (e2 or e4) and pos_dim % 4:
            raise ValueError(
                f"{_NAME}: the position embedding width must be a multiple of 4 (sin and "
                f"cos of x and y offsets), got {pos_dim} (position_embedding_dim="
                f"{position_embedding_dim}, in_channels={in_channels})"
            )
        self.in_channels, self.num_heads = in_channels, num_heads
        self.spatial_range, self.kv_stride, self.q_stride = spatial_range, kv_stride, q_stride
        self.position_embedding_dim, self.position_magnitude = pos_dim, position_magnitude
        self.attention_type = attention_type
        self.terms = (e1, e2, e3, e4)
        self.mmcv_compat = bool(mmcv_compat)
        # only mmcv's E2-without-E4 branch differs from the paper's formula
        self._transposed_e2y = self.mmcv_compat and e2 and not e4
        self.qk_embed_dim = self.v_dim = in_channels // num_heads
        out_c = self.qk_embed_dim * num_heads

        def conv(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 1, bias=bias)

        if e1 or e2:
            self.query_conv = conv(in_channels, out_c)
        if e1 or e3:
            self.key_conv = conv(in_channels, out_c)
        self.value_conv = conv(in_channels, self.v_dim * num_heads)
        if e2 or e4:
            self.appr_geom_fc_x = nn.Linear(pos_dim // 2, out_c, bias=False)
            self.appr_geom_fc_y = nn.Linear(pos_dim // 2, out_c, bias=False)
        stdv = 1.0 / math.sqrt(self.qk_embed_dim * 2)
        if e3:
            self.appr_bias = nn.Parameter(torch.empty(out_c).uniform_(-stdv, stdv))
        if e4:
            self.geom_bias = nn.Parameter(torch.empty(out_c).uniform_(-stdv, stdv))
        self.proj_conv = conv(self.v_dim * num_heads, in_channels, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
                f"attention_type='{self.attention_type}', kv_stride={self.kv_stride}, "
                f"q_stride={self.q_stride}, spatial_range={self.spatial_range}"
                + (", mmcv_compat=True" if self.mmcv_compat else "") + ", "
                + super().extra_repr())

    @property
    def memory_efficient(self) -> bool:
        """Deprecated: ``attn_impl="sdpa"``."""
        return self.impl == "sdpa"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # mmcv stores its local-range table as a frozen parameter; the mask is recomputed
        # here for the input's size, so that key is dropped when the range is on (with the
        # range off it is left in place and strict loading names it as unexpected).
        if self.spatial_range >= 0:
            state_dict.pop(prefix + "local_constraint_map", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- pieces shared by both paths ---------------------------------------------------
    def _positions(self, hq: int, wq: int, hk: int, wk: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """``P_x`` ``(heads, wq, wk, d)`` and ``P_y`` ``(heads, hq, hk, d)``, over sqrt(2)."""
        z, d = self.num_heads, self.qk_embed_dim
        # The phases reach (map size) radians: in bfloat16 (the conv outputs' dtype under
        # autocast) their sines would be off by up to ~0.1, so the sinusoids are always
        # formed in at least float32, as mmcv does for a float32 input; the projection
        # below then runs in the autocast dtype (or the weights' dtype) like any linear.
        weight = self.appr_geom_fc_x.weight
        kw = dict(device=x.device, dtype=torch.promote_types(weight.dtype, torch.float32))
        args = (self.q_stride, self.kv_stride, self.position_embedding_dim,
                self.position_magnitude)
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device)  # not on meta (FLOP counts)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            emb_x = relative_sinusoid(wq, wk, *args, **kw)  # (wq, wk, pos_dim/2)
            emb_y = relative_sinusoid(hq, hk, *args, **kw)
        if not (autocast and torch.is_autocast_enabled(device)):
            emb_x, emb_y = emb_x.to(weight.dtype), emb_y.to(weight.dtype)
        px = self.appr_geom_fc_x(emb_x).reshape(wq, wk, z, d).permute(2, 0, 1, 3)
        py = self.appr_geom_fc_y(emb_y).reshape(hq, hk, z, d).permute(2, 0, 1, 3)
        return px / math.sqrt(2), py / math.sqrt(2)

    def _heads(self, t: Tensor) -> Tensor:
        """``(B, heads*d, h, w)`` -> ``(B, heads, h*w, d)``."""
        return t.flatten(2).unflatten(1, (self.num_heads, -1)).transpose(-2, -1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.in_channels)
        H, W = x.shape[-2:]
        x_q = x[:, :, :: self.q_stride, :: self.q_stride] if self.q_stride > 1 else x
        x_kv = x[:, :, :: self.kv_stride, :: self.kv_stride] if self.kv_stride > 1 else x
        if self._transposed_e2y and x_q.shape[-2] != x_q.shape[-1]:
            raise ValueError(
                f"{_NAME}: mmcv_compat=True with attention_type '{self.attention_type}' "
                f"needs a square query map, got {tuple(x_q.shape[-2:])} (input "
                f"{H}x{W}, q_stride {self.q_stride}): mmcv's E2-without-E4 branch reads "
                "the query at the transposed position and fails on non-square maps"
            )
        keep = None
        if self.spatial_range >= 0:
            keep = local_keep_mask(x_q.shape[-2:], x_kv.shape[-2:], self.spatial_range,
                                   self.kv_stride, x.device)
        if self.use_fused:
            out = self._fast(x_q, x_kv, keep)
        else:
            out = self._explicit_heads(x_q, x_kv, keep)
        out = self.proj_conv(out)  # (B, C, hq, wq), or (B, C, 1, 1): E3 alone, global
        if self.q_stride > 1 and out.shape[-2:] != (1, 1):
            out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        return torch.addcmul(x, self.gamma, out)  # gamma * out + x

    def _explicit_heads(self, x_q: Tensor, x_kv: Tensor, keep: Tensor | None) -> Tensor:
        e1, e2, e3, e4 = self.terms
        B = x_q.shape[0]
        (hq, wq), (hk, wk) = x_q.shape[-2:], x_kv.shape[-2:]
        q = self._heads(self.query_conv(x_q)) if (e1 or e2) else None  # (B, z, nq, d)
        k = self._heads(self.key_conv(x_kv)) if (e1 or e3) else None  # (B, z, nk, d)
        v = self._heads(self.value_conv(x_kv))  # (B, z, nk, dv)
        px, py = self._positions(hq, wq, hk, wk, x_q) if (e2 or e4) else (None, None)
        out = self._explicit(q, k, v, px, py, keep, (B, hq, wq, hk, wk))
        return out.transpose(-2, -1).reshape(B, -1, hq, wq)

    # -- fast path -----------------------------------------------------------------------
    def _fast(self, x_q: Tensor, x_kv: Tensor, keep: Tensor | None) -> Tensor:
        """``(B, heads*dv, hq, wq)`` (or ``(B, heads*dv, 1, 1)`` for E3 alone, global)."""
        e1, e2, e3, e4 = self.terms
        B, z, d = x_q.shape[0], self.num_heads, self.qk_embed_dim
        (hq, wq), (hk, wk) = x_q.shape[-2:], x_kv.shape[-2:]
        nq, nk = hq * wq, hk * wk
        if self.kv_stride > 1:
            x_kv = x_kv.contiguous()  # one copy for the convs that read it, not one each
        vT = self.value_conv(x_kv).reshape(B, z, -1, nk)  # (B, z, dv, nk), channel-first
        qT = self.query_conv(x_q).reshape(B, z, d, nq) if (e1 or e2) else None
        e3_row = None
        if e3 and not e1:
            # k is only read through appr_bias . k, so fold the vector into the conv:
            # (u_m^T W_k,m) x gives z numbers per key instead of z*d
            w_k = self.key_conv.weight.reshape(z, d, -1)
            w_e3 = (self.appr_bias.reshape(z, 1, d) @ w_k).reshape(z, -1, 1, 1)
            e3_row = F.conv2d(x_kv, w_e3).reshape(B, z, 1, nk)
            if not (e2 or e4) and keep is None:
                # E3 alone: one energy row serves every query (mmcv's shortcut as well)
                weights = torch.softmax(e3_row, dim=-1)  # (B, z, 1, nk)
                return (vT @ weights.transpose(-2, -1)).reshape(B, -1, 1, 1)
        if (e2 or e4) and not e1 and self.impl != "sdpa":
            return self._position_only(qT, vT, e3_row, keep, (B, hq, wq, hk, wk))
        # every term as one dot product of an augmented query and key (module docstring)
        q_aug, k_aug, fixed = self._augmented(qT, vT, e3_row, x_kv, (B, hq, wq, hk, wk))
        if q_aug.shape[0] == 1 and B > 1:  # E4 (+ local range) alone: weights shared
            weights = masked_softmax(q_aug @ k_aug.transpose(-2, -1), mask=keep)[0]
            return self._batch_shared(weights, vT, (B, hq, wq))
        v = vT.transpose(-2, -1)  # (B, z, nk, dv)
        if q_aug.shape[-1] == v.shape[-1] or self.impl == "sdpa":
            out = equal_width_sdpa(q_aug, k_aug, v, keep, scale=1.0)
        else:
            # one GEMM gives the whole energy, then the softmax, probabilities kept for
            # backward; the key's one-hot columns are constants with no gradient product
            out = materialized_attention(q_aug, k_aug, v, keep, constant_key_columns=fixed)
        return out.transpose(-2, -1).reshape(B, -1, hq, wq)  # (B, z*dv, hq, wq)

    def _augmented(self, qT: Tensor | None, vT: Tensor, e3_row: Tensor | None, x_kv: Tensor,
                   sizes: tuple[int, int, int, int, int]) -> tuple[Tensor, Tensor, int]:
        """``[q (+ appr_bias) | 1 | energy_x | energy_y]`` and ``[k | e3 | onehot(kx) |
        onehot(ky)]``, ``(B|1, z, nq, .)`` and ``(B|1, z, nk, .)``, and how many trailing
        key columns are constant. Batch 1 where every part is the same for all samples."""
        e1, e2, e3, e4 = self.terms
        B, hq, wq, hk, wk = sizes
        z, d, nq, nk = self.num_heads, self.qk_embed_dim, hq * wq, hk * wk
        q_parts, k_parts = [], []
        if e1:
            q = qT.transpose(-2, -1)  # (B, z, nq, d)
            q_parts.append(q + self.appr_bias.reshape(z, 1, d) if e3 else q)
            k_parts.append(self.key_conv(x_kv).reshape(B, z, d, nk).transpose(-2, -1))
        elif e3:
            q_parts.append(vT.new_ones(1, 1, 1, 1).expand(B, z, nq, 1))
            k_parts.append(e3_row.transpose(-2, -1))  # (B, z, nk, 1)
        if e2 or e4:
            ex, ey = self._position_energy(qT, sizes)
            n = ex.shape[0]  # 1 when the position energy is the same for every sample
            q_parts += [ex.reshape(n, z, nq, wk), ey.reshape(n, z, nq, hk)]
            # key (ky, kx) reads column kx of energy_x and column ky of energy_y
            eye_x = torch.eye(wk, dtype=vT.dtype, device=vT.device)
            eye_y = torch.eye(hk, dtype=vT.dtype, device=vT.device)
            onehot = torch.cat((eye_x.repeat(hk, 1), eye_y.repeat_interleave(wk, 0)), -1)
            k_parts.append(onehot.expand(n, z, nk, wk + hk))
        batch = 1 if all(t.shape[0] == 1 for t in q_parts + k_parts) and B > 1 else B
        q_aug = torch.cat([t.expand(batch, z, nq, -1) for t in q_parts], -1)
        k_aug = torch.cat([t.expand(batch, z, nk, -1) for t in k_parts], -1)
        return q_aug, k_aug, (hk + wk if (e2 or e4) else 0)

    def _position_only(self, qT, vT, e3_row, keep, sizes) -> Tensor:  # noqa: ANN001
        """The fast path with E2 or E4 and without E1: ``softmax(energy) v``.

        Without the content term there is no product to fold the position terms into:
        the energy is their broadcast sum (and E3's row), ``(B|1, heads, Nq, Nk)``, whose
        backward is two reductions over key rows and columns.
        """
        e1, e2, e3, e4 = self.terms
        B, hq, wq, hk, wk = sizes
        z, nq, nk = self.num_heads, hq * wq, hk * wk
        ex, ey = self._position_energy(qT, sizes)  # (n, z, hq, wq, wk), (n, z, hq, wq, hk)
        n = ex.shape[0]  # 1 when the position energy is the same for every sample
        energy = (ey[..., :, None] + ex[..., None, :]).reshape(n, z, nq, nk)
        if e3:  # then n becomes B
            energy = energy + e3_row  # (B, z, 1, nk): the key-only term, every query
        if keep is not None:
            energy = energy.masked_fill(~keep, torch.finfo(energy.dtype).min)
        if energy.shape[0] == 1 and B > 1:  # E4 alone: the same weights for every sample
            return self._batch_shared(torch.softmax(energy[0], dim=-1), vT, (B, hq, wq))
        out = materialized_attention(None, None, vT.transpose(-2, -1), energy)
        return out.transpose(-2, -1).reshape(B, -1, hq, wq)  # (B, z*dv, hq, wq)

    def _batch_shared(self, weights: Tensor, vT: Tensor, sizes) -> Tensor:  # noqa: ANN001
        """``(heads, nq, nk)`` weights that every sample shares, applied to ``vT``
        ``(B, heads, dv, nk)`` as one GEMM for the whole batch: ``(B, heads*dv, hq, wq)``."""
        B, hq, wq = sizes
        z, nq, nk = weights.shape
        v_heads = vT.transpose(0, 1).reshape(z, -1, nk)  # (z, B*dv, nk)
        out = (v_heads @ weights.transpose(-2, -1)).reshape(z, B, -1, nq)
        return out.transpose(0, 1).reshape(B, -1, hq, wq)

    def _position_energy(self, qT: Tensor | None, sizes) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        """``energy_x`` ``(B|1, z, hq, wq, wk)`` and ``energy_y`` ``(B|1, z, hq, wq, hk)``.

        The E2 and E4 terms of every query against every key column / row: ``(q +
        geom_bias) . P_x`` and ``. P_y`` (one of the two when only E2 or E4 is on). Without
        E2 they do not depend on the sample (leading dimension 1).
        """
        e1, e2, e3, e4 = self.terms
        B, hq, wq, hk, wk = sizes
        z, d = self.num_heads, self.qk_embed_dim
        px, py = self._positions(hq, wq, hk, wk, qT if qT is not None else self.value_conv.weight)
        if e2:
            c = qT.reshape(B, z, d, hq, wq)
            if e4:
                c = c + self.geom_bias.reshape(1, z, d, 1, 1)
            ex = torch.einsum("bzdhw,zwkd->bzhwk", c, px)
            if self._transposed_e2y:  # mmcv: query (w, h) against row h's P_y
                c = c.transpose(-2, -1)
            ey = torch.einsum("bzdhw,zhjd->bzhwj", c, py)
            return ex, ey
        g = self.geom_bias.reshape(z, d)
        ex = torch.einsum("zd,zwkd->zwk", g, px)[None, :, None]  # (1, z, 1, wq, wk)
        ey = torch.einsum("zd,zhjd->zhj", g, py)[None, :, :, None]  # (1, z, hq, 1, hk)
        return ex.expand(1, z, hq, wq, wk), ey.expand(1, z, hq, wq, hk)

    # -- explicit path -------------------------------------------------------------------
    def _explicit(self, q, k, v, px, py, keep, sizes) -> Tensor:  # noqa: ANN001
        e1, e2, e3, e4 = self.terms
        B, hq, wq, hk, wk = sizes
        z, nq, nk = self.num_heads, hq * wq, hk * wk
        zero = v.new_zeros(B, z, nq, nk)
        terms = [zero, zero, zero, zero]
        if e1:  # E1: q . k
            terms[0] = q @ k.transpose(-2, -1)
        if e2:  # E2: q . (P_x + P_y)
            qg = q.reshape(B, z, hq, wq, -1)
            ex = torch.einsum("bzhwd,zwkd->bzhwk", qg, px)
            if self._transposed_e2y:  # mmcv: query (w, h) against row h's P_y
                qg = qg.transpose(2, 3)
            ey = torch.einsum("bzhwd,zhjd->bzhwj", qg, py)
            terms[1] = (ey[..., :, None] + ex[..., None, :]).reshape(B, z, nq, nk)
        if e3:  # E3: appr_bias . k, the same for every query
            u = self.appr_bias.reshape(z, 1, -1)
            terms[2] = (u @ k.transpose(-2, -1)).expand(B, z, nq, nk)
        if e4:  # E4: geom_bias . (P_x + P_y), the same for every sample
            g = self.geom_bias.reshape(z, -1)
            ex = torch.einsum("zd,zwkd->zwk", g, px)  # (z, wq, wk)
            ey = torch.einsum("zd,zhjd->zhj", g, py)  # (z, hq, hk)
            e4_map = ey[:, :, None, :, None] + ex[:, None, :, None, :]  # (z, hq, wq, hk, wk)
            terms[3] = e4_map.reshape(1, z, nq, nk).expand(B, z, nq, nk)
        energy = terms[0] + terms[1] + terms[2] + terms[3]
        weights = masked_softmax(energy, mask=keep)
        if self.capturing:
            self.record(torch.stack(terms, dim=2))
            self.record(weights)
        return weights @ v

    # -- benchmarks and visualisation ----------------------------------------------------
    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any):
        """The module (heads: the largest count <= 8 dividing ``channels``) and an input.

        ``gamma`` is set to 1 (mmcv starts it at 0, where the output is the input and
        would hide the attention from the tests and benchmarks that use this example).
        """
        kwargs.setdefault("num_heads", math.gcd(channels, 8))
        if channels % 4:
            kwargs.setdefault("position_embedding_dim", 4 * max(1, channels // 4))
        module, inputs = super().example(name, batch, channels, size, **kwargs)
        with torch.no_grad():
            module.gamma.fill_(1.0)
        return module, inputs

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The attention each key receives (mean over heads and queries), as ``(B, H, W)``.

        The key grid is ``ceil(H / s) x ceil(W / s)`` for the ``kv_stride`` ``s`` that
        matches the record; it is resized to ``H x W`` (nearest).
        """
        H, W = size
        if weights.dim() == 5:  # the per-term energies: use their sum's softmax instead
            weights = weights.float().sum(2).softmax(-1)
        nk = weights.shape[-1]
        for s in range(1, max(H, W) + 1):
            hk, wk = -(-H // s), -(-W // s)
            if hk * wk == nk:
                received = weights.float().reshape(weights.shape[0], -1, nk).mean(1)
                grid = received.reshape(-1, 1, hk, wk)
                return F.interpolate(grid, size=(H, W), mode="nearest")[:, 0]
        raise ValueError(
            f"{cls.__name__}: a record with {nk} keys matches no key grid of a {H}x{W} map"
        )

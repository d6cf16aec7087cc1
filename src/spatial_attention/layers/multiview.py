"""Multi-view window attention on a stack of views: MV-Swin-T's W-MDA / SW-MDA.

MV-Swin-T (Sarker, Sarker, Bebis, Tavakkoli 2024, "MV-Swin-T: Mammogram Classification
with Multi-view Swin Transformer", Sec. 3 "multi-headed dynamic attention"; code
prithuls/MV-Swin-T, ``DynamicAttention_multiview``) runs two views of one breast (CC and
MLO) through one Swin-V2 style backbone. Inside every (shifted) window of view ``v`` the
query attends with Swin-V2 cosine attention (Liu et al. CVPR 2022, Eq. 2):

* self scores  ``S_v  = cos(q_v, k_v)``, per head ``(h, N, N)``,
* cross scores ``X_v  = cos(q_v, k_u)`` against the same window of the other view ``u``,
* the ``2h`` maps are mixed per head by a learned linear map over the map axis
  (``proj_concat`` in the reference): ``L_v = (A_v [S_v; X_v] + a_v) * tau_v``, with a
  learned per-head logit scale ``tau = exp(min(s, log 100))``,
* plus Swin-V2's continuous position bias ``16 * sigmoid(cpb_mlp(log-spaced coords))``,
  then softmax over the window and a weighted sum of the view's **own** values.

``mode`` chooses the combination:

* ``"mix"`` (default): the reference's W-MDA above.
* ``"concat"``: a plain cross-attention variant: each query attends, in one softmax, to
  the keys *and values* of its window in every view (own view first), with the same
  cosine scores and position bias for every view's keys (views are taken as aligned).
* ``"self"``: no cross-view term, i.e. Swin-V2 window attention run on every view (the
  reference's first stage, ``diff_attn=False``; with one view, Swin-V2's
  ``WindowAttention``).

With more than two views, view ``v``'s other views are taken in the cyclic order
``v+1, v+2, ...``, and the mixing map has ``V*h`` inputs.

Weights: one set per view as in the reference (``qkv``, ``q_bias``/``v_bias``,
``logit_scale``, ``cpb_mlp``, ``proj`` and the mixing map are all ``_1``/``_2`` in the
reference), stored stacked along a leading view axis, or one set shared by every view with
``share_weights=True`` (then swapping the views swaps the outputs).

Input and output: a stacked tensor ``(B, V, H, W, C)`` (returned stacked), or the ``V``
views as separate ``(B, H, W, C)`` arguments (returned as a tuple). Every view must have
the same size; any ``H, W``: windows are padded and the padding is masked.

Fast path: the views are stacked, so pad + shift + partition is one gather for every
view, the per-view projections are one batched matmul, and every window of every view
goes through one computation. ``"self"`` and ``"concat"`` fold the logit scale into the
normalised queries and make one attention call (scale 1, position bias + shift/padding
mask as the float mask). ``"mix"`` cannot: its logits are a learned mix of ``2h`` score
maps, so its fast path computes every self and cross map in one matmul against the
views' stacked keys, mixes them in one einsum and applies one softmax. The explicit path
writes the reference's steps out (separate self and cross maps, concatenation over
heads, a linear map over that axis) and records.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (
    check_divisible,
    check_dtype_matches,
    check_floating,
    check_positive,
    check_probability,
    check_window_shift,
)
from ..functional.dispatch import attention
from ..functional.permute import permute_rows
from ..functional.position import relative_position_index
from ..functional.scoring import additive_mask
from ..functional.windows import WindowLayout, effective_shift, to_2tuple, window_layout
from ..registry import register
from .base import AttentionModule
from .window import WindowAttention, window_sdpa

__all__ = ["MultiViewWindowAttention", "log_spaced_relative_coords", "per_view_linear"]

_PAPER = ("Sarker et al., MV-Swin-T: Mammogram Classification with Multi-view Swin "
          "Transformer")
_COST = ("V·(2·B·N·C·3C + 2·B·N·C²) projections + V²·2·B·N·M²·C scores + "
         "V·B·N·M²·(2V·h·h) head mixing + 2·V·B·N·M²·C weighting, N = H·W")
_MODES = ("mix", "concat", "self")
_LOGIT_CAP = math.log(1.0 / 0.01)  # Swin-V2 clamps the logit scale at 100


def log_spaced_relative_coords(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int] = (0, 0)
) -> Tensor:
    """Swin-V2's log-spaced relative coordinates: ``((2Mh-1)(2Mw-1), 2)``.

    Offsets ``(dy, dx)`` are divided by ``M - 1`` (of the pretraining window if given),
    scaled to ``[-8, 8]`` and mapped by ``sign(t) * log2(1 + |t|) / log2(8)`` (Swin-V2
    Eq. 4). Rows are ordered like :func:`functional.position.relative_position_index`.
    A window side of 1 has only the offset 0 (the reference divides 0 by 0 there).
    """
    mh, mw = window_size
    ph, pw = pretrained_window_size
    dh = (ph if ph > 0 else mh) - 1
    dw = (pw if pw > 0 else mw) - 1
    dy = torch.arange(-(mh - 1), mh, dtype=torch.float32) / max(dh, 1)
    dx = torch.arange(-(mw - 1), mw, dtype=torch.float32) / max(dw, 1)
    grid = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2) * 8
    return torch.sign(grid) * torch.log2(grid.abs() + 1.0) / math.log2(8)


def per_view_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(B, V, ..., Cin) -> (B, V, ..., Cout)``: view ``v`` through ``weight[v]``
    (``(V | 1, Cout, Cin)``) and ``bias[v]`` (``(V | 1, Cout)``).

    One weight for all views is a plain linear layer. Per-view weights run as one
    ``baddbmm`` of ``V`` large products over ``(V, B*..., Cin)``: a broadcast ``matmul``
    against ``(V, Cin, Cout)`` would instead run ``B*V`` small products and reduce the
    weight gradient over the batch afterwards (measured several times slower on CPU).
    """
    if weight.shape[0] == 1:
        return F.linear(x, weight[0], None if bias is None else bias[0])
    B, V = x.shape[:2]
    flat = x.transpose(0, 1).reshape(V, -1, x.shape[-1])  # (V, B*..., Cin)
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias[:, None, :], flat, weight.transpose(1, 2))
    return out.view(V, B, *x.shape[2:-1], -1).transpose(0, 1)


def _uniform_(t: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


@register(
    "multi_view_concat_attention",
    family="multi_view",
    layout="tokens",
    paper=_PAPER + " (keys-concatenation cross-view variant of W-MDA)",
    year=2024,
    cost=_COST,
    captures="(B, V, nW, V, heads, M², M²): one softmax over the window in every view; "
    "axis 3 is the key view (0 own, j view v+j)",
    mode="concat",
)
@register(
    "multi_view_window_attention",
    family="multi_view",
    layout="tokens",
    paper=_PAPER + " (W-MDA / SW-MDA, Sec. 3)",
    year=2024,
    cost=_COST,
    captures="(B, V, nW, V, heads, M², M²): axis 3 index 0 the mixed weights each view "
    "applies to its own values, index j>0 the cross map to view v+j",
)
class MultiViewWindowAttention(AttentionModule):
    """Window attention of ``V`` views within and across views (MV-Swin-T's W-MDA).

    Sarker et al., *MV-Swin-T: Mammogram Classification with Multi-view Swin Transformer*,
    2024, Sec. 3 (reference: prithuls/MV-Swin-T ``DynamicAttention_multiview``), on Swin-V2
    cosine attention (Liu et al. CVPR 2022, Eq. 2); formula and ``mode`` in the module doc.
    Shapes: ``(B, V, H, W, C) -> (B, V, H, W, C)``, or ``V`` tensors ``(B, H, W, C)`` -> a
    tuple of ``V``; any ``H, W >= 1``.

    Args:
        dim, num_heads: channels ``C`` of every view and heads ``h`` (``h`` divides ``C``).
        window_size: ``M`` or ``(Mh, Mw)``; 12 in MV-Swin-T (384 inputs).
        shift: ``0 <= s < M``; 0 is W-MDA, ``M // 2`` SW-MDA (``None``: ``M // 2``);
            dropped along an axis the window covers.
        share_weights: one weight set for all views (default one per view, as the reference).
        num_views: ``V`` (2: CC and MLO). mode: ``"mix"`` (reference), ``"concat"``, ``"self"``.
        qkv_bias: Swin-V2's query and value biases. attn_drop, proj_drop: dropout.
        pretrained_window_size: for the coordinate normalisation, as Swin-V2 (0: this
            window). cpb_hidden: width of the position-bias MLP (512).

    Cost (``N = H·W`` per view): ``V·8·B·N·C²`` projections ``+ 2·V²·B·N·M²·C`` scores
    ``+ 2·V²·h²·B·N·M²`` mixing (``"mix"``) ``+ 2·V·B·N·M²·C`` weighting (``V`` times in
    ``"concat"``). Deviations from the reference: padding is masked (it needs multiples of
    the window); a window side of 1 gets coordinate 0 instead of 0/0; a map no larger than
    the window keeps the window, padded and masked (the reference shrinks it; the same at 384).
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (``"self"`` / ``"concat"``: that kernel;
    ``"mix"``: one batched score-mix-softmax), ``explicit`` (the reference's steps,
    recorded); measured in benchmarks/mvswin.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 12,
        shift: int | tuple[int, int] | None = 0,
        share_weights: bool = False,
        num_views: int = 2,
        mode: str = "mix",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int | tuple[int, int] = 0,
        cpb_hidden: int = 512,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        # the registry binds mode="concat" to its own name: errors name that one
        name = "multi_view_concat_attention" if mode == "concat" else "multi_view_window_attention"
        check_divisible(name, dim, num_heads)
        self.window_size, self.shift = check_window_shift(name, window_size, shift, "shift")
        check_positive(name, num_views=num_views, cpb_hidden=cpb_hidden)
        mh, mw = self.window_size
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        if mode != "self" and num_views < 2:
            raise ValueError(f"{name}: mode {mode!r} needs num_views >= 2, got {num_views}")
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_views, self.mode, self.share_weights = num_views, mode, share_weights
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        P = 1 if share_weights else num_views
        h = num_heads
        self.qkv_weight = nn.Parameter(torch.empty(P, 3 * dim, dim))
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(P, dim))
            self.v_bias = nn.Parameter(torch.zeros(P, dim))
        else:
            self.q_bias = self.v_bias = None
        self.logit_scale = nn.Parameter(torch.full((P, h, 1, 1), math.log(10.0)))
        self.cpb_weight1 = nn.Parameter(torch.empty(P, cpb_hidden, 2))
        self.cpb_bias1 = nn.Parameter(torch.empty(P, cpb_hidden))
        self.cpb_weight2 = nn.Parameter(torch.empty(P, h, cpb_hidden))
        self.proj_weight = nn.Parameter(torch.empty(P, dim, dim))
        self.proj_bias = nn.Parameter(torch.empty(P, dim))
        if mode == "mix":
            self.mix_weight = nn.Parameter(torch.empty(P, h, num_views * h))
            self.mix_bias = nn.Parameter(torch.empty(P, h))
        else:
            self.mix_weight = self.mix_bias = None
        pre = to_2tuple(pretrained_window_size)
        self.pretrained_window_size = pre
        self.register_buffer("relative_coords_table",
                             log_spaced_relative_coords(self.window_size, pre), persistent=False)
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size), persistent=False)
        self._layouts: dict[tuple[Any, ...], WindowLayout] = {}
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """``nn.Linear``'s default init per view (``std=None``), or the reference model's:
        truncated normal ``std`` weights and zero biases for every linear map. The query
        and value biases start at zero and the logit scale at ``log 10`` either way."""
        with torch.no_grad():
            mats = [(self.qkv_weight, None), (self.cpb_weight1, self.cpb_bias1),
                    (self.cpb_weight2, None), (self.proj_weight, self.proj_bias)]
            if self.mix_weight is not None:
                mats.append((self.mix_weight, self.mix_bias))
            for w, b in mats:
                if std is None:
                    _uniform_(w, w.shape[-1])
                    if b is not None:
                        _uniform_(b, w.shape[-1])
                else:
                    nn.init.trunc_normal_(w, std=std)
                    if b is not None:
                        b.zero_()
            if self.q_bias is not None:
                self.q_bias.zero_()
                self.v_bias.zero_()
            self.logit_scale.fill_(math.log(10.0))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift={self.shift}, num_views={self.num_views}, mode={self.mode!r}, "
            f"share_weights={self.share_weights}, " + super().extra_repr()
        )

    # -- input --------------------------------------------------------------------------
    def _stack_views(self, views: tuple[Tensor, ...]) -> tuple[Tensor, bool]:
        name, V = self.mechanism_name, self.num_views
        axes = "(B, V, H, W, C)"
        if len(views) == 1:
            x = views[0]
            if not hasattr(x, "dim"):
                raise ValueError(f"{name}: expected a tensor {axes}, got {type(x).__name__}")
            if x.dim() != 5:
                raise ValueError(
                    f"{name}: expected a 5-D stack of views {axes} or {V} view tensors "
                    f"(B, H, W, C), got one tensor of shape {tuple(x.shape)}"
                )
            stacked = True
        else:
            if len(views) != V:
                raise ValueError(f"{name}: expected {V} views, got {len(views)}")
            for v in views:
                self.check_input(v, self.dim)
            shapes = {tuple(v.shape) for v in views}
            if len(shapes) != 1:
                raise ValueError(
                    f"{name}: every view must have the same shape (B, H, W, C), got "
                    f"{[tuple(v.shape) for v in views]}"
                )
            x, stacked = torch.stack(views, dim=1), False
        if x.shape[1] != V or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: expected {V} views of {self.dim} channels {axes}, got shape "
                f"{tuple(x.shape)}"
            )
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name}: got an empty tensor of shape {tuple(x.shape)}")
        check_floating(name, x)
        check_dtype_matches(name, x, self)
        return x, stacked

    # -- pieces ---------------------------------------------------------------------------
    def _per_view_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``(B, V, T, Cin) -> (B, V, T, Cout)`` with view ``v``'s (or the shared) weight."""
        return per_view_linear(x, weight, bias)

    def _qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias), dim=-1)

    def _tau(self) -> Tensor:
        """``(1, P, 1, h, 1, 1)`` logit scale, clamped at 100 (Swin-V2)."""
        return self.logit_scale.clamp(max=_LOGIT_CAP).exp()[None, :, None]

    def _position_bias(self, dtype: torch.dtype) -> Tensor:
        """``(P, h, N, N)``: ``16 * sigmoid`` of the continuous position bias MLP."""
        coords = self.relative_coords_table.to(dtype)  # (T, 2)
        hidden = torch.relu(torch.matmul(coords, self.cpb_weight1.transpose(1, 2))
                            + self.cpb_bias1[:, None, :])  # (P, T, hidden)
        table = torch.matmul(hidden, self.cpb_weight2.transpose(1, 2))  # (P, T, h)
        n = self.relative_position_index.shape[0]
        bias = table[:, self.relative_position_index.reshape(-1)].view(-1, n, n, self.num_heads)
        return 16 * torch.sigmoid(bias.permute(0, 3, 1, 2))

    def _view_order(self, device: torch.device) -> Tensor:
        """``(V, V)``: row ``v`` lists view ``v`` then the others in cyclic order."""
        r = torch.arange(self.num_views, device=device)
        return (r[:, None] + r[None, :]) % self.num_views

    def _keys_of_all_views(self, t: Tensor) -> Tensor:
        """``(B, V, nW, h, N, d) -> (B, V, nW, h, V*N, d)``: own window first, then the
        same window of the other views (one gather, no loop over views)."""
        B, V, nW, h, N, d = t.shape
        order = self._view_order(t.device).reshape(-1)
        t = t.index_select(1, order).view(B, V, V, nW, h, N, d)
        return t.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, V, nW, h, V * N, d)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, *views: Tensor) -> Tensor | tuple[Tensor, ...]:
        x, stacked = self._stack_views(views)
        B, V, H, W, C = x.shape
        h, d = self.num_heads, self.head_dim
        mh, mw = self.window_size
        N = mh * mw
        shift = effective_shift(H, W, self.window_size, self.shift)
        layout = window_layout(H, W, self.window_size, shift, x.device, self._layouts)
        keep = layout.keep
        nW = layout.gather.numel() // N

        # one gather (pad + shift + partition) whose backward is a gather too; padding
        # slots read token 0, their queries are dropped and their keys masked
        tokens = permute_rows(x.reshape(B, V, H * W, C), 2, layout.gather, layout.scatter)
        qkv = self._per_view_linear(tokens, self.qkv_weight, self._qkv_bias())
        q, k, v = qkv.view(B, V, nW, N, 3, h, d).permute(4, 0, 1, 2, 5, 3, 6).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # each (B, V, nW, h, N, d)
        bias = self._position_bias(q.dtype)[None, :, None]  # (1, P, 1, h, N, N)
        blocked = None if keep is None else additive_mask(keep, q.dtype)[None, None, :, None]
        p = self.attn_drop if self.training else 0.0

        if self.mode == "mix":
            out = self._mix(q, k, v, bias, blocked, p)
        else:
            if self.mode == "concat":
                k, v = self._keys_of_all_views(k), self._keys_of_all_views(v)
                bias = bias.repeat(1, 1, 1, 1, 1, V)
                blocked = None if blocked is None else blocked.repeat(1, 1, 1, 1, 1, V)
            mask = bias if blocked is None else bias + blocked  # (1, P|1, nW|1, h, N, K)
            q = q * self._tau()
            if self.use_fused:
                if mask.shape[1] == 1 and mask.shape[2] == 1:
                    flat = mask[0, 0]  # (1, h, N, K): shared by every view and window
                else:
                    flat = mask[0].expand(V, nW, *mask.shape[3:]).reshape(V * nW, *mask.shape[3:])
                out = window_sdpa(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2),
                                   flat, 1.0, p, self.impl).view(B, V, nW, h, N, d)
            else:
                out, weights = attention(q, k, v, mask, scale=1.0, dropout_p=p, impl="explicit",
                                         return_weights=True)
                K = weights.shape[-1] // N  # views whose keys were attended
                self.record(weights.view(B, V, nW, h, N, K, N).permute(0, 1, 2, 5, 3, 4, 6))

        out = permute_rows(out.transpose(3, 4).reshape(B, V, nW * N, C), 2, layout.scatter,
                           layout.unscatter, zero_row=layout.padded)
        out = self.proj_drop(self._per_view_linear(out, self.proj_weight, self.proj_bias))
        out = out.view(B, V, H, W, C)
        return out if stacked else out.unbind(1)

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, blocked: Tensor | None,
             p: float) -> Tensor:
        """W-MDA: ``softmax((A [S; X] + a) * tau + B + mask) v`` per view and window."""
        B, V, nW, h, N, d = q.shape
        P = self.mix_weight.shape[0]
        tau = self._tau()
        if self.use_fused:
            # every self and cross map in one matmul: (B, V, nW, h, N, V*N)
            scores = q @ self._keys_of_all_views(k).transpose(-2, -1)
            scores = scores.view(B, V, nW, h, N, V, N)
            mixer = self.mix_weight.view(P, h, V, h).expand(V, h, V, h)  # (v, g, u, h)
            logits = torch.einsum("bvwhiuj,vguh->bvwgij", scores, mixer)
            logits = (logits + self.mix_bias[None, :, None, :, None, None]) * tau + bias
            if blocked is not None:
                logits = logits + blocked
            weights = logits.softmax(-1)
            if p > 0:
                weights = F.dropout(weights, p=p)
            return weights @ v
        # explicit: the reference's steps, one tensor op each
        own = q @ k.transpose(-2, -1)  # S: (B, V, nW, h, N, N)
        others = k.index_select(1, self._view_order(q.device)[:, 1:].reshape(-1))
        others = others.view(B, V, V - 1, nW, h, N, d)
        cross = q[:, :, None] @ others.transpose(-2, -1)  # X: (B, V, V-1, nW, h, N, N)
        maps = torch.cat((own, cross.transpose(2, 3).reshape(B, V, nW, (V - 1) * h, N, N)),
                         dim=3)  # (B, V, nW, V*h, N, N), the reference's head-axis concat
        mixer = self.mix_weight.expand(V, h, V * h)[None, :, None, None]
        mixed = torch.matmul(maps.permute(0, 1, 2, 4, 5, 3), mixer.transpose(-2, -1))
        mixed = mixed + self.mix_bias.expand(V, h)[None, :, None, None, None]
        logits = mixed.permute(0, 1, 2, 5, 3, 4) * tau + bias
        cross_logits = cross * tau[:, :, None] + bias[:, :, None]
        if blocked is not None:
            logits = logits + blocked
            cross_logits = cross_logits + blocked[:, :, None]
        weights = F.softmax(logits, dim=-1)
        # recorded: the weights used (axis 3 index 0) and, per other view, where the
        # query's cross scores point inside that view's window
        cross_weights = F.softmax(cross_logits, dim=-1).permute(0, 1, 3, 2, 4, 5, 6)
        self.record(torch.cat((weights[:, :, :, None], cross_weights), dim=3))
        if p > 0:
            weights = F.dropout(weights, p=p)
        return weights @ v

    # -- benchmarks and visualisation ---------------------------------------------------
    @classmethod
    def example(
        cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any
    ) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The mechanism (window 4, 2 views) and a stack of two views ``(B, 2, H, W, C)``."""
        from ..registry import create

        kwargs.setdefault("num_heads", max(1, channels // 32))
        kwargs.setdefault("window_size", 4)
        module = create(name, channels, **kwargs)
        H, W = size
        return module, (torch.randn(batch, module.num_views, H, W, channels),)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The first view's own-view weights as a ``(B, H, W)`` map of attention received
        (unshifted records, as :meth:`WindowAttention.spatial_map`)."""
        if weights.dim() == 7:
            return WindowAttention.spatial_map(weights[:, 0, :, 0], size)
        return super().spatial_map(weights, size)

    @classmethod
    def view_maps(cls, weights: Tensor, size: tuple[int, int]) -> dict[tuple[int, int], Tensor]:
        """Every (query view ``v``, key view ``u``) pair of a record, as ``(B, H, W)`` maps
        of the attention view ``v``'s queries pay to view ``u``'s positions (``u == v``:
        the weights ``v`` applies to its own values). For ``spatial-attention viz``."""
        if weights.dim() != 7:
            raise ValueError(
                f"{cls.__name__}: expected a (B, V, nW, V, heads, N, N) record, got "
                f"{tuple(weights.shape)}"
            )
        V, K = weights.shape[1], weights.shape[3]
        return {(v, (v + j) % V): WindowAttention.spatial_map(weights[:, v, :, j], size)
                for v in range(V) for j in range(K)}

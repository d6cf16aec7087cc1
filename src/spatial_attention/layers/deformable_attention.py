"""Deformable attention of DAT on ``(B, H, W, C)`` (Xia et al. CVPR 2022).

Every query attends to the same ``Hk x Wk`` keys and values, read by bilinear sampling at
a uniform grid of reference points moved by learned offsets (one set of offsets per
group of heads, predicted from the queries by a small convolutional network), with a
relative position bias read from a continuous ``(2H - 1) x (2W - 1)`` table at each
query-to-key displacement. This is ``DAttentionBaseline`` of the official code
(``LeapLabTHU/DAT``, ``models/dat_blocks.py``) in its DAT-T stage-3/4 setting: the
interpolated position bias, no depthwise-conv or fixed position encoding, no
log-spaced continuous bias, offsets on. Two releases of that code normalise the grids
differently; ``version`` picks one (``"dat"``: the CVPR 2022 release that the published
DAT-T/S/B weights go with; ``"dat++"``: the 2023 code of DAT++).

:func:`convert_official_dat_keys` renames the official module's keys (1x1 convs to
linear layers), wherever it sits in a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..checks import check_divisible, check_positive, check_probability
from ..functional.dispatch import attention
from ..functional.kernels.deformable_bias import deformable_bias
from ..registry import register
from .base import AttentionModule

__all__ = ["DeformableAttention", "convert_official_dat_keys"]

_VERSIONS = ("dat", "dat++")


def grid_axis(n: int, version: str, keys: bool, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """Normalised coordinates in ``[-1, 1]`` (``grid_sample``'s frame) of ``n`` grid points.

    ``"dat"`` (CVPR 2022 code): cell centres ``(i + 0.5) / n * 2 - 1`` for the reference
    points (``keys``) and the queries alike. ``"dat++"``: ``(i + 0.5) / (n - 1) * 2 - 1``
    for the reference points, ``i / (n - 1) * 2 - 1`` for the queries; a single point
    (``n == 1``, where that code divides by zero) sits at 0.
    """
    i = torch.arange(n, dtype=dtype, device=device)
    if version == "dat":
        return (i + 0.5) * (2.0 / n) - 1.0
    if n == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return (i + 0.5 if keys else i) * (2.0 / (n - 1)) - 1.0


@register(
    "deformable_attention",
    family="token_global",
    layout="tokens",
    paper="Xia et al., Vision Transformer with Deformable Attention (DAT, Sec. 3.2: "
          "offsets, bilinear sampling, deformable relative position bias)",
    year=2022,
    cost="4·B·N·C² (q, proj) + 4·B·Ns·C² (k, v) + 4·B·N·Ns·C (scores, weighting) "
         "+ ~8·B·heads·N·Ns (bias sampling) + B·Ns·C·(2k² + 4) (offsets), "
         "N = H·W, Ns = Hk·Wk keys (N at stride 1)",
    captures="(B, groups, Hk, Wk, 2) sampling positions (y, x in [-1, 1]), then "
             "(B, heads, N, Ns) attention weights",
)
class DeformableAttention(AttentionModule):
    """Deformable multi-head attention (Xia, Pan, Song, Li, Huang, CVPR 2022, Sec. 3.2).

    ``q = x W_q``; per group of heads, offsets ``Δp = s·tanh(θ(q)) / (Hk, Wk)`` from
    ``θ`` = depthwise ``k x k`` conv (stride ``r``) -> LayerNorm -> GELU -> bias-free 1x1
    conv to 2; ``x~ = φ(x; p + Δp)`` bilinear at the reference grid ``p`` (``Hk x Wk``);
    ``k = x~ W_k``, ``v = x~ W_v``; per head ``softmax(q k^T / sqrt(d) + φ(B^; R)) v`` with
    ``B^`` a learned ``(2Hq - 1) x (2Wq - 1)`` table read bilinearly at the displacements
    ``R`` (query minus key position); then ``W_o``. ``grid_sample`` with
    ``align_corners=True`` for both readings, as the official code.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Args: ``dim``, ``num_heads``;
    ``groups`` offset groups (DAT-T: 3, 6); ``q_size`` the map the table is sized for;
    ``stride`` ``r``; ``ksize`` ``k`` (DAT-T: 5, 3); ``offset_range_factor`` ``s``
    (DAT-T: 2; 0: raw offsets; < 0: ``tanh`` ("dat") or clamp ("dat++") of ``p + Δp``);
    ``use_pe``; ``version`` ("dat" or "dat++", module docstring); ``attn_drop``,
    ``proj_drop``. Init as the official code: PyTorch defaults, table trunc-normal 0.01.
    Cost: ``4·B·N·C² + 4·B·Ns·C² + 4·B·N·Ns·C`` plus bias sampling ``~8·B·heads·N·Ns``.
    Other sizes than ``q_size``: the table is read at the same normalised displacement
    (it stretches to the map), as the "dat++" code does; the "dat" code fails there.
    Positions, offsets and both samplings run in at least float32 (under autocast too).
    Not implemented: ``no_off``, ``dwc_pe``, ``fixed_pe``, ``log_cpb``. Deviation: "dat++"
    puts a one-point axis at 0 (its code divides by zero). Keys: ``q``, ``k``, ``v``, ``proj``,
    ``offset_*``, ``rpe_table``; :meth:`load_official_state_dict`.
    attn_impl: ``auto`` / ``sdpa`` / ``kept_probs`` (the dispatcher, the bias as a float
    mask), ``explicit`` (the official layout, plain softmax; records positions, weights).
    """

    layout = "tokens"
    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        groups: int = 1,
        q_size: int | tuple[int, int] = (14, 14),
        stride: int = 1,
        ksize: int = 5,
        offset_range_factor: float = 2.0,
        use_pe: bool = True,
        version: str = "dat",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "deformable_attention"
        check_divisible(name, dim, num_heads)
        check_positive(name, groups=groups, stride=stride, ksize=ksize)
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        q_size = _pair(q_size)
        check_positive(name, q_size=min(q_size))
        if num_heads % groups:
            raise ValueError(f"{name}: num_heads {num_heads} is not divisible by groups "
                             f"{groups} (each offset group serves whole heads)")
        if version not in _VERSIONS:
            raise ValueError(f"{name}: version must be one of {_VERSIONS}, got {version!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.groups, self.group_dim = groups, dim // groups
        self.scale = self.head_dim**-0.5
        self.q_size, self.stride, self.ksize = (int(q_size[0]), int(q_size[1])), stride, ksize
        self.offset_range_factor = float(offset_range_factor)
        self.version = version
        # "dat++" drops the padding when the kernel tiles the map exactly
        self.padding = 0 if version == "dat++" and ksize == stride else ksize // 2
        Cg = self.group_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.offset_dw = nn.Conv2d(Cg, Cg, ksize, stride, self.padding, groups=Cg)
        self.offset_norm = nn.LayerNorm(Cg)
        self.offset_proj = nn.Linear(Cg, 2, bias=False)  # (dy, dx), as the official order
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        if use_pe:
            Hq, Wq = self.q_size
            self.rpe_table = nn.Parameter(torch.empty(num_heads, 2 * Hq - 1, 2 * Wq - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter("rpe_table", None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, groups={self.groups}, "
                f"q_size={self.q_size}, stride={self.stride}, ksize={self.ksize}, "
                f"offset_range_factor={self.offset_range_factor}, "
                f"use_pe={self.rpe_table is not None}, version={self.version!r}, "
                + super().extra_repr())

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs):
        # the table sized for the map it sees; a few offset groups where the heads allow
        heads = kwargs.setdefault("num_heads", max(1, channels // 32))
        kwargs.setdefault("groups", next(g for g in (3, 2, 1) if heads % g == 0))
        kwargs.setdefault("q_size", size)
        return super().example(name, batch, channels, size, **kwargs)

    # -- shared pieces ---------------------------------------------------------------
    def key_grid_size(self, H: int, W: int) -> tuple[int, int]:
        """``(Hk, Wk)``: the offset network's output size for an ``H x W`` map."""
        k, s, p = self.ksize, self.stride, self.padding
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def _offset_scale(self, Hk: int, Wk: int) -> tuple[float, float] | None:
        """Per-axis factor on ``tanh(offset)`` (y, x), or None (raw offsets)."""
        s = self.offset_range_factor
        if self.version == "dat":
            return (s / Hk, s / Wk) if s > 0 else None
        return (s / max(Hk - 1, 1), s / max(Wk - 1, 1)) if s >= 0 else None

    def _move(self, offset: Tensor, ref: Tensor, scale: tuple[float, float] | None) -> Tensor:
        """Reference points plus offsets (last axis in ``scale``'s order), as the code."""
        if scale is not None:
            factor = torch.tensor(scale, dtype=offset.dtype, device=offset.device)
            return offset.tanh() * factor + ref
        if self.offset_range_factor >= 0:  # "dat" with s == 0: raw offsets
            return offset + ref
        pos = offset + ref
        return pos.tanh() if self.version == "dat" else pos.clamp(-1.0, 1.0)

    def _check_map(self, H: int, W: int) -> tuple[int, int]:
        Hk, Wk = self.key_grid_size(H, W)
        if Hk < 1 or Wk < 1:
            raise ValueError(
                f"deformable_attention: a {H}x{W} map is smaller than the offset network's "
                f"{self.ksize}x{self.ksize} kernel at stride {self.stride} without padding "
                f"(version {self.version!r}); use a larger map or a kernel != stride")
        return Hk, Wk

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        Hk, Wk = self._check_map(H, W)
        if self.impl == "explicit":
            return self._forward_explicit(x, Hk, Wk)
        g, Cg, heads, d = self.groups, self.group_dim, self.num_heads, self.head_dim
        N, Ns = H * W, Hk * Wk
        # positions in at least float32, whatever autocast does to the projections
        pdt = torch.promote_types(x.dtype, torch.float32)
        dev = x.device
        q = self.q(x)  # (B, H, W, C)

        # offsets: one depthwise conv over all C channels (the group weights tiled),
        # channels-last in and out, so no group reshuffle of q is needed
        w = self.offset_dw.weight.repeat(g, 1, 1, 1)
        b = self.offset_dw.bias.repeat(g)
        h = F.conv2d(q.permute(0, 3, 1, 2), w, b, self.stride, self.padding, groups=C)
        h = h.permute(0, 2, 3, 1).unflatten(-1, (g, Cg))  # (B, Hk, Wk, g, Cg)
        h = F.gelu(self.offset_norm(h))
        # the two offset channels swapped to (dx, dy): grid_sample's order from here on
        offset = F.linear(h, self.offset_proj.weight.flip(0)).to(pdt)  # (B, Hk, Wk, g, 2)
        ky = grid_axis(Hk, self.version, True, pdt, dev)
        kx = grid_axis(Wk, self.version, True, pdt, dev)
        ref = torch.stack(torch.meshgrid(kx, ky, indexing="xy"), -1)  # (Hk, Wk, 2): x, y
        scale = self._offset_scale(Hk, Wk)
        pos = self._move(offset, ref[:, :, None], None if scale is None else scale[::-1])
        pos = pos.permute(0, 3, 1, 2, 4)  # (B, g, Hk, Wk, 2), x then y

        # keys and values: sample each group's channels at its positions
        xc = x.permute(0, 3, 1, 2).to(pdt)  # (B, C, H, W), a view of the tokens
        sampled = torch.cat([
            F.grid_sample(xc[:, i * Cg:(i + 1) * Cg], pos[:, i], mode="bilinear",
                          padding_mode="zeros", align_corners=True)
            for i in range(g)], 1)  # (B, C, Hk, Wk)
        sampled = sampled.view(B, C, Ns).to(x.dtype)
        # one token-major copy for both projections (a 1x1 conv here takes the CPU's slow
        # im2col path), then (B, heads, Ns, d) blocks every attention kernel reads as is
        tokens = sampled.transpose(1, 2).reshape(B * Ns, C)
        k = self.k(tokens).view(B, Ns, heads, d).transpose(1, 2).contiguous()
        v = self.v(tokens).view(B, Ns, heads, d).transpose(1, 2).contiguous()
        q = q.view(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)
        # the bias last: in backward its gradient is consumed (and freed) first
        bias = None if self.rpe_table is None else self._bias(pos, H, W, pdt)
        p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, bias, scale=self.scale, dropout_p=p, impl=self.impl)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    def _bias(self, pos: Tensor, H: int, W: int, pdt: torch.dtype) -> Tensor:
        """``φ(B^; R)``, ``(B, heads, N, Ns)``: the table read at ``(query - key) / 2``
        for every pair (one ``grid_sample`` over samples and groups, the grid rebuilt in
        backward rather than kept: :mod:`..functional.kernels.deformable_bias`)."""
        B, g = pos.shape[:2]
        qy = grid_axis(H, self.version, False, pdt, pos.device)
        qx = grid_axis(W, self.version, False, pdt, pos.device)
        queries = torch.stack(torch.meshgrid(qx, qy, indexing="xy"), -1).view(H * W, 2)
        return deformable_bias(self.rpe_table.to(pdt), pos.reshape(B, g, -1, 2), queries)

    def _forward_explicit(self, x: Tensor, Hk: int, Wk: int) -> Tensor:
        """The official layout, step by step: channels first, groups folded into the batch."""
        B, H, W, C = x.shape
        g, Cg, heads, d = self.groups, self.group_dim, self.num_heads, self.head_dim
        pdt = torch.promote_types(x.dtype, torch.float32)
        dev = x.device
        q = self.q(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        h = self.offset_dw(q.reshape(B * g, Cg, H, W))  # (B·g, Cg, Hk, Wk)
        h = F.gelu(self.offset_norm(h.permute(0, 2, 3, 1)))
        offset = self.offset_proj(h).to(pdt)  # (B·g, Hk, Wk, 2): dy, dx
        ky = grid_axis(Hk, self.version, True, pdt, dev)
        kx = grid_axis(Wk, self.version, True, pdt, dev)
        ref = torch.stack(torch.meshgrid(ky, kx, indexing="ij"), -1)  # (Hk, Wk, 2): y, x
        pos = self._move(offset, ref, self._offset_scale(Hk, Wk))  # (B·g, Hk, Wk, 2)
        self.record(pos.view(B, g, Hk, Wk, 2))

        xs = x.permute(0, 3, 1, 2).reshape(B * g, Cg, H, W).to(pdt)
        sampled = F.grid_sample(xs, pos.flip(-1), mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (B·g, Cg, Hk, Wk)
        sampled = sampled.reshape(B, C, Hk * Wk).transpose(1, 2).to(x.dtype)  # (B, Ns, C)
        k, v = self.k(sampled), self.v(sampled)
        q = q.reshape(B, heads, d, H * W).transpose(2, 3)  # (B, heads, N, d)
        k = k.reshape(B, -1, heads, d).transpose(1, 2)  # (B, heads, Ns, d)
        v = v.reshape(B, -1, heads, d).transpose(1, 2)

        bias = None
        if self.rpe_table is not None:
            qy = grid_axis(H, self.version, False, pdt, dev)
            qx = grid_axis(W, self.version, False, pdt, dev)
            qgrid = torch.stack(torch.meshgrid(qy, qx, indexing="ij"), -1)  # (H, W, 2)
            disp = (qgrid.reshape(1, H * W, 1, 2) - pos.reshape(B * g, 1, Hk * Wk, 2)) * 0.5
            table = self.rpe_table.to(pdt)[None].expand(B, -1, -1, -1)
            table = table.reshape(B * g, heads // g, *table.shape[2:])
            bias = F.grid_sample(table, disp.flip(-1), mode="bilinear", padding_mode="zeros",
                                 align_corners=True)  # (B·g, hg, N, Ns)
            bias = bias.reshape(B, heads, H * W, Hk * Wk)
        p = self.attn_drop if self.training else 0.0
        out, weights = attention(q, k, v, bias, scale=self.scale, dropout_p=p,
                                 impl="explicit", return_weights=True)
        self.record(weights)  # (B, heads, N, Ns)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    # -- visualisation and weights ------------------------------------------------------
    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Attention each key receives (mean over heads and queries), at the key's
        reference cell, resized to ``size``; a position record: how far each reference
        point moved (``|Δp|`` averaged over groups), resized likewise."""
        H, W = size
        if weights.dim() == 5 and weights.shape[-1] == 2:  # (B, g, Hk, Wk, 2) positions
            Hk, Wk = weights.shape[2:4]
            ky = grid_axis(Hk, "dat", True, torch.float32, weights.device)
            kx = grid_axis(Wk, "dat", True, torch.float32, weights.device)
            ref = torch.stack(torch.meshgrid(ky, kx, indexing="ij"), -1)
            moved = (weights.float() - ref).norm(dim=-1).mean(1, keepdim=True)
            return F.interpolate(moved, size=(H, W), mode="nearest")[:, 0]
        if weights.dim() != 4:
            return super().spatial_map(weights, size)
        K = weights.shape[-1]
        grid = None  # the key grid: the offset conv's output, ceil / floor / floor + 1
        for r in range(1, max(H, W) + 1):
            for hk, wk in ((-(-H // r), -(-W // r)), (H // r, W // r), (H // r + 1, W // r + 1)):
                if grid is None and hk * wk == K:
                    grid = (hk, wk)
        if grid is None:
            return super().spatial_map(weights, size)
        received = weights.float().reshape(weights.shape[0], -1, K).mean(1)
        received = received.view(-1, 1, *grid)
        return F.interpolate(received, size=(H, W), mode="nearest")[:, 0]

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load one official ``DAttentionBaseline``'s state dict (``proj_q.weight``,
        ``conv_offset.0.weight``, ``rpe_table``, ...)."""
        return self.load_state_dict(convert_official_dat_keys(state_dict), strict=strict)


#: official key tail -> ours, for keys of one DAttentionBaseline (1x1 conv weights become
#: linear weights)
_OFFICIAL_TAILS = (
    ("proj_q.", "q."),
    ("proj_k.", "k."),
    ("proj_v.", "v."),
    ("proj_out.", "proj."),
    ("conv_offset.0.", "offset_dw."),
    ("conv_offset.1.norm.", "offset_norm."),
    ("conv_offset.3.", "offset_proj."),
    ("rpe_table", "rpe_table"),
)


def convert_official_dat_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official ``DAttentionBaseline`` keys to ours, wherever the modules sit in a model.

    A module is recognised by its ``conv_offset.0.weight`` key; its keys are renamed (as
    ``_OFFICIAL_TAILS``) and its 1x1 conv weights ``(out, in, 1, 1)`` become ``(out, in)``;
    other keys pass through.
    Accepts ``{'model': ...}`` / ``{'state_dict': ...}`` as saved, and strips ``module.``.
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    state = {(k[len("module."):] if k.startswith("module.") else k): v
             for k, v in state_dict.items()}
    prefixes = [k[: -len("conv_offset.0.weight")] for k in state
                if k.endswith("conv_offset.0.weight")]
    out: dict[str, Tensor] = {}
    taken: set[str] = set()
    for pre in prefixes:
        for key, value in state.items():
            if not key.startswith(pre) or key in taken:
                continue
            tail = key[len(pre):]
            for old, ours in _OFFICIAL_TAILS:
                if tail.startswith(old):
                    new = ours + tail[len(old):]
                    if old != "conv_offset.0." and new.endswith("weight") and value.dim() == 4:
                        value = value.flatten(1)  # a 1x1 conv as a linear layer
                    out[pre + new] = value
                    taken.add(key)
                    break
    for key, value in state.items():
        if key not in taken:
            out[key] = value
    return out

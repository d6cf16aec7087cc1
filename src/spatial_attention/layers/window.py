"""Window attention on ``(B, H, W, C)``: Swin W-MSA / SW-MSA and Twins LSA.

Swin Transformer (Liu et al. ICCV 2021, Sec. 3.2, Eq. 4; microsoft/Swin-Transformer)
splits the map into non-overlapping ``M x M`` windows and runs multi-head self-attention
inside each, ``softmax(Q K^T / sqrt(d) + B) V`` with a learned relative position bias
``B``; every other block shifts the map cyclically by ``M // 2`` first and masks the
tokens that came from different regions (SW-MSA). Twins-SVT's locally-grouped
self-attention (Chu et al. NeurIPS 2021, Sec. 3.2, Eq. 5; Meituan-AutoML/Twins) is the
same computation without position bias and without shift, window 7.

Any ``H, W``: the map is padded to a multiple of the window and the padded tokens are
masked out of every softmax, so a real token's output never depends on padding. The
official code and timm pad with zeros *without* masking (those zero tokens still get
keys and values from the qkv bias), so at sizes that need padding our outputs differ
from theirs by design; where no padding is needed they are equal.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_divisible, check_probability, check_window_shift
from ..functional.dispatch import attention, deprecated_switch
from ..functional.permute import permute_rows
from ..functional.position import relative_position_bias, relative_position_index
from ..functional.scoring import additive_mask
from ..functional.windows import (
    WindowLayout,
    effective_shift,
    window_layout,
    window_partition,
    window_reverse,
)
from ..registry import register
from .base import AttentionModule

__all__ = ["WindowAttention", "window_sdpa"]

_SWIN = "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
_COST = "2·B·N·C·3C + 2·B·N·C² (projections) + 4·B·N·M²·C (scores and weighting), N = H·W"


@register(
    "shifted_window_attention",
    family="token_local",
    layout="tokens",
    paper=_SWIN + " (SW-MSA, Sec. 3.2, Eq. 4)",
    year=2021,
    cost=_COST,
    captures="(B, nW, heads, M², M²) attention weights per shifted window",
    shift_size=None,
)
@register(
    "twins_lsa",
    family="token_local",
    layout="tokens",
    paper="Chu et al., Twins: Revisiting the Design of Spatial Attention in Vision "
    "Transformers (LSA, Sec. 3.2, Eq. 5)",
    year=2021,
    cost=_COST,
    captures="(B, nW, heads, M², M²) attention weights per window",
    position_bias=False,
)
@register(
    "window_attention",
    family="token_local",
    layout="tokens",
    paper=_SWIN + " (W-MSA, Sec. 3.2, Eq. 4)",
    year=2021,
    cost=_COST,
    captures="(B, nW, heads, M², M²) attention weights per window (padded slots included)",
)
class WindowAttention(AttentionModule):
    """Multi-head self-attention inside (shifted) ``M x M`` windows of a ``(B, H, W, C)`` map.

    Swin (Liu et al. ICCV 2021, Sec. 3.2, Eq. 4): ``softmax(Q K^T / sqrt(d) + B) V`` in each
    window, W-MSA or shifted SW-MSA; Twins LSA (Chu et al. NeurIPS 2021, Sec. 3.2, Eq. 5):
    the same without position bias or shift. Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any
    ``H, W >= 1``.

    Args:
        dim, num_heads: channels ``C`` and heads (``dim`` divisible by ``num_heads``).
        window_size: ``M`` or ``(Mh, Mw)``; 7 in Swin and Twins.
        shift_size: ``0 <= s < M``; 0 is W-MSA, ``M // 2`` SW-MSA (``None``: ``M // 2``);
            dropped along an axis the window covers, as in the official code.
        qkv_bias: True in Swin and Twins. attn_drop, proj_drop: dropout on weights, output.
        position_bias: the learned ``((2Mh-1)(2Mw-1), heads)`` table (False: Twins LSA).

    Cost: ``2·B·N·C·4C`` (projections) ``+ 4·B·N·M²·C`` (attention), ``N = H·W``: linear in N.
    Deviation: the padding up to a multiple of ``M`` is masked out of the softmax (official
    code and timm attend to zero tokens), so outputs differ from theirs only where padding is
    needed. Official parameter names (``qkv``, ``proj``, ``relative_position_bias_table``):
    Swin, Twins and timm weights load; the index is a non-persistent buffer, as in timm.
    attn_impl: ``auto`` (SDPA; lean biased kernels in CPU training), ``explicit``, ``sdpa``,
    ``kept_probs`` (window probabilities kept for backward: CPU training time for memory,
    no gain with a learned bias), ``flex`` (FlexAttention in eval, opt-in: not timed on a GPU
    yet); measured in benchmarks/token_attention.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs", "flex")

    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        shift_size: int | tuple[int, int] | None = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position_bias: bool = True,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "window_attention"
        check_divisible(name, dim, num_heads)
        self.window_size, self.shift_size = check_window_shift(name, window_size, shift_size)
        mh, mw = self.window_size
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        if position_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * mh - 1) * (2 * mw - 1), num_heads)
            )
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer(
                "relative_position_index",
                relative_position_index(self.window_size),
                persistent=False,
            )
        else:
            self.relative_position_bias_table = None
        self._layouts: dict[tuple[Any, ...], WindowLayout] = {}
        self._block_masks: dict[tuple[Any, ...], Any] = {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, "
            f"position_bias={self.relative_position_bias_table is not None}, "
            + super().extra_repr()
        )

    # the switches attn_impl replaced, kept for one release
    @property
    def flex(self) -> bool:
        return self.impl == "flex"

    @flex.setter
    def flex(self, value: bool) -> None:
        deprecated_switch("WindowAttention.flex", 'attn_impl="flex"')
        self.attn_impl = "flex" if value else None

    @property
    def save_probs(self) -> bool:
        return self.impl == "kept_probs"

    @save_probs.setter
    def save_probs(self, value: bool) -> None:
        deprecated_switch("WindowAttention.save_probs", 'attn_impl="kept_probs"')
        self.attn_impl = "kept_probs" if value else None

    def _bias_and_mask(self, keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``(nW | 1, heads, N, N)`` float mask: position bias + shift/padding mask."""
        mask = None
        if self.relative_position_bias_table is not None:
            mask = relative_position_bias(
                self.relative_position_bias_table, self.relative_position_index
            ).to(dtype)[None]  # (1, heads, N, N)
        if keep is not None:
            blocked = additive_mask(keep, dtype)[:, None]  # (nW, 1, N, N)
            mask = blocked if mask is None else mask + blocked
        return mask

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        mh, mw = self.window_size
        N = mh * mw
        shift = effective_shift(H, W, self.window_size, self.shift_size)
        layout = window_layout(H, W, self.window_size, shift, x.device, self._layouts)
        keep = layout.keep
        nW = layout.gather.numel() // N

        # a plain partition is a permuted copy whose backward is a copy too; with a shift
        # and/or padding, one gather (whose backward is a gather as well) saves a roll and
        # a padded copy
        plain = keep is None
        if plain:
            tokens = window_partition(x, self.window_size).view(B, nW * N, C)
        else:
            # padding slots read token 0: their queries are dropped, their keys masked
            tokens = permute_rows(x.reshape(B, H * W, C), 1, layout.gather, layout.scatter)
        qkv = self.qkv(tokens).view(B, nW, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        # bias, shift and padding masks summed into one float mask (nW | 1, heads, N, N),
        # broadcast over the batch (never repeated per image on CPU): every window of the
        # batch then goes through one attention call
        mask = self._bias_and_mask(keep, q.dtype)
        p = self.attn_drop if self.training else 0.0
        impl = self.impl
        if impl == "flex" and not self.training and (
            x.is_cuda or not torch.is_grad_enabled()  # no FlexAttention backward on CPU
        ):
            out = self._flex(q, k, v, keep, (H, W, shift))
        elif impl != "explicit":
            # auto: SDPA in inference and on CUDA; CPU training, where the fused kernel has
            # no gradient for the learned bias, takes the lean four-kernel path
            out = window_sdpa(q, k, v, mask, self.scale, p, "auto" if impl == "flex" else impl)
        else:
            out, weights = attention(
                q, k, v, mask, scale=self.scale, dropout_p=p, impl="explicit",
                return_weights=True,
            )
            self.record(weights)  # (B, nW, heads, N, N)
        out = out.transpose(2, 3).reshape(B * nW, N, C)
        if plain:
            out = window_reverse(out, self.window_size, H, W).reshape(B, H * W, C)
        else:
            out = permute_rows(out.reshape(B, nW * N, C), 1, layout.scatter,
                               layout.unscatter, zero_row=layout.padded)
        return self.proj_drop(self.proj(out)).view(B, H, W, C)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, key: tuple) -> Tensor:
        """All windows of an image as one FlexAttention call over its ``nW * N`` tokens.

        The block mask keeps a query to its own window (and, shifted or padded, to its
        region and real keys); the relative position bias is a ``score_mod`` lookup, so
        no ``(nW, heads, N, N)`` mask is built. Compiled on CUDA; on CPU it runs
        PyTorch's unfused reference (for checking, not speed).
        """
        from torch.nn.attention.flex_attention import create_block_mask

        B, nW, h, N, d = q.shape
        L = nW * N
        cache_key = (*key, q.device)
        block_mask = self._block_masks.get(cache_key)
        if block_mask is None:
            def mask_mod(b, head, qi, ki):
                same = (qi // N) == (ki // N)
                if keep is None:
                    return same
                return same & keep[qi // N, qi % N, ki % N]

            # cached past this call (like the window layouts): never an inference tensor,
            # which a later eval call with grad on CUDA could not save for backward; the
            # context is only entered where needed, so compiled callers never trace it
            outside = (torch.inference_mode(False) if torch.is_inference_mode_enabled()
                       else contextlib.nullcontext())
            with outside:
                block_mask = create_block_mask(mask_mod, None, None, L, L, device=q.device)
            if len(self._block_masks) > 16:
                self._block_masks.clear()
            self._block_masks[cache_key] = block_mask
        score_mod = None
        if self.relative_position_bias_table is not None:
            bias = relative_position_bias(
                self.relative_position_bias_table, self.relative_position_index
            ).to(q.dtype)  # (heads, N, N)

            def score_mod(score, b, head, qi, ki):
                return score + bias[head, qi % N, ki % N]

        def per_image(t: Tensor) -> Tensor:  # (B, nW, h, N, d) -> (B, h, nW*N, d)
            return t.permute(0, 2, 1, 3, 4).reshape(B, h, L, d)

        out = _flex_attention(q.device)(
            per_image(q), per_image(k), per_image(v),
            score_mod=score_mod, block_mask=block_mask, scale=self.scale,
        )
        return out.view(B, h, nW, N, d).transpose(1, 2)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Per-window maps -> ``(B, H, W)``: how much attention each token receives.

        Assumes the record came from a map of ``size`` with this module's default layout
        (unshifted, the windows in row-major order); the padded slots are cropped.
        """
        H, W = size
        if weights.dim() != 5:
            return super().spatial_map(weights, size)
        B, nW, _, N, _ = weights.shape
        m = int(round(N**0.5))
        received = weights.float().mean((2, 3))  # (B, nW, N)
        nh = -(-H // m)
        nw = nW // nh
        grid = received.view(B, nh, nw, m, m).permute(0, 1, 3, 2, 4).reshape(B, nh * m, nw * m)
        return grid[:, :H, :W]


_COMPILED_FLEX: dict[str, Any] = {}


def _flex_attention(device: torch.device):
    """``flex_attention``, compiled once per process on CUDA (its fused kernels come from
    compilation); eager elsewhere."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "called without torch.compile"
                return flex_attention(*args, **kwargs)

        return eager
    if "cuda" not in _COMPILED_FLEX:
        _COMPILED_FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["cuda"]


def window_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float,
    impl: str = "auto", flat_mask: bool | None = None,
) -> Tensor:
    """One attention call over all windows of ``(B, nW, heads, N, d)`` queries and
    ``(B, nW, heads, K, d)`` keys and values (``K = N``, or ``V * N`` for the multi-view
    concatenation).

    A mask shared by every window (bias only) broadcasts as ``(1, heads, N, K)`` over
    ``B * nW`` windows, the 4-D form the fused kernels take. A per-window mask
    ``(nW, heads, N, K)`` broadcasts over the batch axis of the 5-D form on CPU (no
    copy per image); CUDA's fused kernels want 4-D, so there it is expanded to
    ``(B * nW, heads, N, K)``. ``flat_mask`` forces that choice (``None``: 4-D on CUDA),
    so the CUDA form can be checked anywhere. ``impl``: see
    :func:`~spatial_attention.functional.attention`.
    """
    B, nW, h, N, d = q.shape
    if mask is None or mask.shape[0] == 1:
        out = attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask,
            scale=scale, dropout_p=dropout_p, impl=impl,
        )
        return out.view(B, nW, h, N, d)
    if flat_mask is None:
        flat_mask = q.is_cuda
    if flat_mask:
        K = k.shape[-2]  # not N: concatenated views bring V * N keys
        full = mask.expand(B, nW, h, N, K).reshape(B * nW, h, N, K)
        out = attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), full,
            scale=scale, dropout_p=dropout_p, impl=impl,
        )
        return out.view(B, nW, h, N, d)
    return attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, impl=impl)

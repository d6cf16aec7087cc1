"""Sequence attention on ``(B, N, C)``: dot-product, scaled dot-product, additive, multi-head.

The teaching primitives every other mechanism is built from, with d2l.ai's
``valid_lens`` masking (``(B,)`` per sample or ``(B, Q)`` per query).
"""

from __future__ import annotations

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
    check_rank,
    check_valid_lens,
)
from ..functional.dispatch import attention
from ..functional.scoring import additive_scores, masked_softmax, valid_lens_to_mask
from ..registry import register
from .base import AttentionModule

__all__ = ["DotProductAttention", "AdditiveAttention", "MultiHeadAttention"]


def _check_qkv(name: str, queries: Tensor, keys: Tensor, values: Tensor) -> None:
    for label, t in (("queries", queries), ("keys", keys), ("values", values)):
        check_rank(f"{name} {label}", t, 3, "(B, N, C)")
        check_floating(name, t, label)
        if t.numel() == 0:
            raise ValueError(f"{name}: got empty {label} of shape {tuple(t.shape)}")
    if not (queries.shape[0] == keys.shape[0] == values.shape[0]):
        raise ValueError(
            f"{name}: batch sizes differ: queries {queries.shape[0]}, keys {keys.shape[0]}, "
            f"values {values.shape[0]}"
        )
    if keys.shape[1] != values.shape[1]:
        raise ValueError(f"{name}: {keys.shape[1]} keys but {values.shape[1]} values")


@register(
    "dot_product",
    family="sequence",
    layout="sequence",
    paper="Luong et al., Effective Approaches to Attention-based NMT (dot score)",
    year=2015,
    cost="2·B·Q·K·(d + dv)",
    captures="(B, Q, K) attention weights",
    scaled=False,
)
@register(
    "scaled_dot_product",
    family="sequence",
    layout="sequence",
    paper="Vaswani et al., Attention Is All You Need (Eq. 1)",
    year=2017,
    cost="2·B·Q·K·(d + dv)",
    captures="(B, Q, K) attention weights",
    scaled=True,
)
class DotProductAttention(AttentionModule):
    """Dot-product attention ``softmax(q k^T [/ sqrt(d)]) v`` with ``valid_lens`` masking.

    ``scaled=True`` (``scaled_dot_product``) is Vaswani et al., *Attention Is All You Need*,
    NeurIPS 2017, Eq. 1; ``scaled=False`` (``dot_product``) is Luong et al.'s dot score
    (EMNLP 2015). ``forward(queries, keys, values, valid_lens=None)``: ``(B, Q, d)``,
    ``(B, K, d)``, ``(B, K, dv)`` -> ``(B, Q, dv)``; ``valid_lens`` ``(B,)`` or ``(B, Q)``
    (d2l.ai's masking). Args: ``scaled``; ``dropout`` on the weights, in training only.
    Cost: ``2·B·Q·K·(d + dv)``.
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (that kernel), ``explicit`` (records the
    ``(B, Q, K)`` weights).
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "sequence"

    def __init__(self, scaled: bool = True, dropout: float = 0.0,
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_probability("dot_product", dropout=dropout)
        self.scaled = scaled
        self.dropout = dropout

    def forward(
        self, queries: Tensor, keys: Tensor, values: Tensor, valid_lens: Tensor | None = None
    ) -> Tensor:
        _check_qkv(self.mechanism_name, queries, keys, values)
        if queries.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"{self.mechanism_name}: query dim {queries.shape[-1]} != key dim {keys.shape[-1]}"
            )
        valid_lens = check_valid_lens(self.mechanism_name, valid_lens, queries.shape[0],
                                      keys.shape[1], queries.shape[1], queries.device)
        mask = None
        if valid_lens is not None:
            mask = valid_lens_to_mask(valid_lens, queries.shape[1], keys.shape[1], 3)
        scale = None if self.scaled else 1.0
        p = self.dropout if self.training else 0.0
        if self.use_fused:
            return attention(queries, keys, values, mask, scale=scale, dropout_p=p,
                             impl=self.impl)
        out, weights = attention(
            queries,
            keys,
            values,
            mask,
            scale=scale,
            dropout_p=p,
            impl="explicit",
            return_weights=True,
        )
        self.record(weights)
        return out

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs: Any):
        from ..registry import create

        x = torch.randn(batch, size[0] * size[1], channels)
        return create(name, **kwargs), (x, x, x)


@register(
    "additive",
    family="sequence",
    layout="sequence",
    paper="Bahdanau et al., Neural Machine Translation by Jointly Learning to Align and "
    "Translate (additive score)",
    year=2015,
    cost="2·B·Q·K·h (tanh features) + 2·B·(Q·dq + K·dk)·h + 2·B·Q·K·dv",
    captures="(B, Q, K) attention weights",
)
class AdditiveAttention(AttentionModule):
    """Additive (Bahdanau) attention: ``a(q, k) = w_v^T tanh(W_q q + W_k k)``.

    Bahdanau et al., *Neural Machine Translation by Jointly Learning to Align and Translate*,
    ICLR 2015, appendix A.1.2 (``e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j)``), with d2l.ai's
    bias-free projections and ``valid_lens`` masking (``(B,)`` or ``(B, Q)``).
    Shapes: queries ``(B, Q, query_dim)``, keys ``(B, K, key_dim)``, values ``(B, K, dv)``
    -> ``(B, Q, dv)``. Args: ``query_dim``, ``key_dim``, ``hidden_dim`` ``h``; ``dropout``
    on the weights. Cost: ``2·B·Q·K·h`` (tanh features) ``+ 2·B·(Q·dq + K·dk)·h +
    2·B·Q·K·dv``.
    attn_impl: ``auto`` and ``explicit`` are one path: the tanh features dominate and no fused
    kernel computes them (handing the scores to SDPA as a mask was no faster: measured in
    benchmarks/sequence_attention.md). Records the ``(B, Q, K)`` weights.
    """

    layout = "sequence"

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, dropout: float = 0.0,
                 attn_impl: str | None = None):
        super().__init__(attn_impl=attn_impl)
        check_positive("additive", query_dim=query_dim, key_dim=key_dim, hidden_dim=hidden_dim)
        check_probability("additive", dropout=dropout)
        self.W_q = nn.Linear(query_dim, hidden_dim, bias=False)
        self.W_k = nn.Linear(key_dim, hidden_dim, bias=False)
        self.w_v = nn.Linear(hidden_dim, 1, bias=False)
        self.dropout = dropout

    def forward(
        self, queries: Tensor, keys: Tensor, values: Tensor, valid_lens: Tensor | None = None
    ) -> Tensor:
        name = self.mechanism_name
        _check_qkv(name, queries, keys, values)
        if queries.shape[-1] != self.W_q.in_features or keys.shape[-1] != self.W_k.in_features:
            raise ValueError(
                f"{name}: expected query dim {self.W_q.in_features} and key dim "
                f"{self.W_k.in_features}, got {queries.shape[-1]} and {keys.shape[-1]}"
            )
        check_dtype_matches(name, queries, self)
        valid_lens = check_valid_lens(name, valid_lens, queries.shape[0], keys.shape[1],
                                      queries.shape[1], queries.device)
        scores = additive_scores(
            queries, keys, self.W_q.weight, self.W_k.weight, self.w_v.weight[0]
        )  # (B, Q, K)
        p = self.dropout if self.training else 0.0
        mask = None
        if valid_lens is not None:
            mask = valid_lens_to_mask(valid_lens, queries.shape[1], keys.shape[1], 3)
        weights = masked_softmax(scores, mask=mask)
        self.record(weights)
        dropped = F.dropout(weights, p=p) if p > 0 else weights
        return dropped @ values

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs: Any):
        """A decoder of ``H`` steps reading ``H * W`` encoder states of ``C`` channels."""
        from ..registry import create

        H, W = size
        module = create(name, channels, channels, channels, **kwargs)
        keys = torch.randn(batch, H * W, channels)
        return module, (torch.randn(batch, H, channels), keys, keys)


@register(
    "multi_head",
    family="sequence",
    layout="sequence",
    paper="Vaswani et al., Attention Is All You Need (Sec. 3.2.2)",
    year=2017,
    cost="4·B·Q·K·C (scores and weighting) + 8·B·N·C² (projections, self-attention)",
    captures="(B, heads, Q, K) attention weights",
)
class MultiHeadAttention(AttentionModule):
    """Multi-head attention on ``(B, N, C)`` (Vaswani et al. 2017, Sec. 3.2.2).

    Vaswani et al., *Attention Is All You Need*, NeurIPS 2017, Sec. 3.2.2:
    ``MultiHead(Q, K, V) = Concat(head_1..head_h) W_O``, ``head_i = Attention(Q W_Q^i,
    K W_K^i, V W_V^i)`` (Eq. 1), each head of width ``dim / num_heads``.
    ``forward(query, key=None, value=None, valid_lens=None)``: self-attention when ``key`` is
    omitted; ``value`` defaults to ``key``. Shapes: query ``(B, Q, dim)``, key / value
    ``(B, K, kdim / vdim)`` -> ``(B, Q, dim)``.
    Args: ``dim``, ``num_heads``; ``bias`` of the projections; ``dropout`` on the weights;
    ``kdim``, ``vdim`` (default ``dim``). Cost: ``4·B·Q·K·dim`` (attention)
    ``+ 2·B·(Q + 2K)·dim² + 2·B·Q·dim²`` (projections).
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (that kernel), ``explicit`` (records the
    ``(B, heads, Q, K)`` weights); measured against ``shared_workspace`` in
    benchmarks/workspace.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "sequence"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        kdim: int | None = None,
        vdim: int | None = None,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_divisible("multi_head", dim, num_heads)
        check_probability("multi_head", dropout=dropout)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kdim, self.vdim = kdim or dim, vdim or kdim or dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, h, N, d)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        valid_lens: Tensor | None = None,
    ) -> Tensor:
        name = self.mechanism_name
        key = query if key is None else key
        value = key if value is None else value
        _check_qkv(name, query, key, value)
        for label, t, c in (
            ("query", query, self.dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[-1] != c:
                raise ValueError(
                    f"{name}: expected {label} with {c} channels, got {tuple(t.shape)}"
                )
        check_dtype_matches(name, query, self)
        valid_lens = check_valid_lens(name, valid_lens, query.shape[0], key.shape[1],
                                      query.shape[1], query.device)
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )
        mask = None
        if valid_lens is not None:
            mask = valid_lens_to_mask(valid_lens, query.shape[1], key.shape[1], 4)
        p = self.dropout if self.training else 0.0
        if self.use_fused:
            out = attention(q, k, v, mask, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(q, k, v, mask, dropout_p=p, impl="explicit",
                                     return_weights=True)
            self.record(weights)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs: Any):
        from ..registry import create

        kwargs.setdefault("num_heads", max(1, channels // 32))
        module = create(name, channels, **kwargs)
        return module, (torch.randn(batch, size[0] * size[1], channels),)

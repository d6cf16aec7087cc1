"""Attention scores and the masked softmax: the math every mechanism's weights come from.

The dispatcher ``attention()`` lives in :mod:`.attention`; the kernels behind it in
:mod:`.kernels`. (Their old names here keep working.)

Conventions
-----------
* Boolean masks are *keep* masks: ``True`` means "this query may attend to this key",
  exactly as ``F.scaled_dot_product_attention`` reads them.
* Float masks are *added* to the scores (relative position bias, Swin's shift mask).
* A query whose every key is masked gets an all-zero weight row and a zero output, on
  both paths, instead of the NaN a plain ``softmax`` of ``-inf`` gives. Such rows appear
  legitimately (padding queries after a cyclic shift, empty sequences in a batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_valid_lens

__all__ = [
    "sequence_mask",
    "valid_lens_to_mask",
    "masked_softmax",
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "additive_mask",
]


def sequence_mask(valid_lens: Tensor, max_len: int) -> Tensor:
    """``(...,)`` lengths -> ``(..., max_len)`` boolean mask, True on the first ``len``."""
    positions = torch.arange(max_len, device=valid_lens.device)
    return positions < valid_lens.unsqueeze(-1)


def valid_lens_to_mask(valid_lens: Tensor, num_queries: int, num_keys: int, ndim: int) -> Tensor:
    """Broadcastable keep mask for scores of rank ``ndim`` (``(B, *, Q, K)``).

    ``valid_lens`` of shape ``(B,)`` applies one length to every query of a sample;
    ``(B, Q)`` gives one length per query (d2l.ai semantics). Middle dimensions (heads)
    broadcast.
    """
    if valid_lens.dim() == 1:
        lens = valid_lens[:, None].expand(-1, num_queries)
    elif valid_lens.dim() == 2:
        if valid_lens.shape[1] != num_queries:
            raise ValueError(
                f"valid_lens of shape {tuple(valid_lens.shape)} needs one length per query "
                f"(expected (B, {num_queries}))"
            )
        lens = valid_lens
    else:
        raise ValueError(
            f"valid_lens must have shape (B,) or (B, Q), got {tuple(valid_lens.shape)}"
        )
    mask = sequence_mask(lens, num_keys)  # (B, Q, K)
    return mask.reshape(mask.shape[0], *([1] * (ndim - 3)), num_queries, num_keys)


def masked_softmax(
    scores: Tensor, valid_lens: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Softmax over the last axis of ``scores`` (``(B, *, Q, K)``) with masked keys.

    Args:
        scores: attention scores, ``(B, *, Q, K)``.
        valid_lens: ``(B,)`` or ``(B, Q)`` numbers of valid keys (d2l.ai semantics).
        mask: boolean keep mask broadcastable to ``scores`` (True = attend).

    Masked keys get *exactly* zero weight. A row with no valid key (length 0) returns
    zeros rather than NaN or d2l's uniform weights: no key is attended at all.
    """
    if valid_lens is None and mask is None:
        return F.softmax(scores, dim=-1)
    keep = None
    if valid_lens is not None:
        valid_lens = check_valid_lens("masked_softmax", valid_lens, scores.shape[0],
                                      scores.shape[-1], scores.shape[-2], scores.device)
        keep = valid_lens_to_mask(valid_lens, scores.shape[-2], scores.shape[-1], scores.dim())
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}")
        keep = mask if keep is None else keep & mask
    # The most negative finite value keeps the softmax free of inf - inf = NaN, even for
    # rows with no valid key; those rows are zeroed afterwards.
    filled = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return F.softmax(filled, dim=-1).masked_fill(~keep, 0.0)


def dot_product_scores(query: Tensor, key: Tensor) -> Tensor:
    """``q k^T``: ``(..., Q, d) x (..., K, d) -> (..., Q, K)`` (Luong et al. 2015)."""
    return query @ key.transpose(-2, -1)


def scaled_dot_product_scores(query: Tensor, key: Tensor, scale: float | None = None) -> Tensor:
    """``q k^T / sqrt(d)`` (Vaswani et al. 2017, Eq. 1); ``scale`` overrides ``1/sqrt(d)``."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return (query * scale) @ key.transpose(-2, -1)


def additive_scores(
    query: Tensor, key: Tensor, w_query: Tensor, w_key: Tensor, w_v: Tensor
) -> Tensor:
    """Bahdanau et al. 2015 (Eq. 6 of the appendix): ``w_v^T tanh(W_q q + W_k k)``.

    Shapes: query ``(B, Q, dq)``, key ``(B, K, dk)``, ``w_query`` ``(h, dq)``,
    ``w_key`` ``(h, dk)``, ``w_v`` ``(h,)``; returns ``(B, Q, K)``. Cost: the tanh runs
    over ``(B, Q, K, h)``, which no fused kernel avoids; it dominates for long sequences.
    """
    q = F.linear(query, w_query)  # (B, Q, h)
    k = F.linear(key, w_key)  # (B, K, h)
    features = torch.tanh(q.unsqueeze(-2) + k.unsqueeze(-3))  # (B, Q, K, h)
    return features @ w_v  # (B, Q, K)


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep mask -> float mask to add to scores: 0 where kept, a huge negative
    where masked.

    Used where a mask must be *summed* with a learned bias (Swin's relative position bias
    plus its shift and padding masks) before one fused kernel call. The value is half the
    dtype's most negative number, so adding a score can never overflow to ``-inf``:
    masked keys get exactly zero weight, and a row with no kept key stays finite
    (uniform over its masked keys, on both paths) instead of NaN. Such rows belong to
    padding queries, whose outputs are discarded.
    """
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min / 2)


# names that moved to .attention and .kernels, still importable from here
_MOVED = {
    "attention": ("dispatch", "attention"),
    "materialized_attention": ("dispatch", "materialized_attention"),
    "SHORT_KEYS": ("kernels.kept_probs", "SHORT_KEYS"),
    "TILE_BYTES": ("kernels.kept_probs", "TILE_BYTES"),
    "_ShortKeyAttention": ("kernels.kept_probs", "KeptProbsAttention"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module, attr = _MOVED[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


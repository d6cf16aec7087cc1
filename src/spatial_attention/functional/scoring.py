"""Attention scoring, masked softmax and the one SDPA dispatch every mechanism uses.

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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..tracing import building_graph

__all__ = [
    "sequence_mask",
    "valid_lens_to_mask",
    "masked_softmax",
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "attention",
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
        if valid_lens.shape[0] != scores.shape[0]:
            raise ValueError(
                f"valid_lens has batch {valid_lens.shape[0]} but scores have {scores.shape[0]}"
            )
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


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            "attention expects query, key and value of equal rank >= 2 ((..., N, d)), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"attention: query dim {query.shape[-1]} != key dim {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"attention: {key.shape[-2]} keys but {value.shape[-2]} values"
        )


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
    return_weights: bool = False,
    save_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention, fused or explicit, chosen per call.

    ``softmax(q k^T * scale + mask) v`` (Vaswani et al. 2017, Eq. 1).

    Args:
        query: ``(..., Q, d)``; key: ``(..., K, d)``; value: ``(..., K, dv)``.
        mask: boolean keep mask or float additive mask, broadcastable to ``(..., Q, K)``.
        scale: defaults to ``1/sqrt(d)``.
        dropout_p: dropout on the attention weights (pass 0 in eval).
        fused: use ``F.scaled_dot_product_attention`` (never materialises Q x K in its
            flash kernels). ``False`` runs the explicit math, which the tests hold equal.
        return_weights: also return the ``(..., Q, K)`` weights; forces the explicit path.
        save_probs: on CPU, for at most :data:`SHORT_KEYS` keys (windows, clusters),
            trade memory for time: :class:`_ShortKeyAttention` keeps the ``(..., Q, K)``
            probabilities for backward instead of the flash kernel's recomputation
            (forward + backward 30-40% faster for 49-query blocks, peak memory up by
            the probabilities). Ignored where it does not apply (GPU, compile, export,
            autocast, dropout, long keys).

    Returns:
        ``(..., Q, dv)`` and, with ``return_weights``, the weights.

    Cost: ``2 * Q * K * (d + dv)`` FLOPs per batch element and head.
    """
    _check_qkv(query, key, value)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    if fused and not return_weights:
        if save_probs and _short_keys_on_cpu(query, key, dropout_p):
            scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
            return _ShortKeyAttention.apply(query, key, value, mask, scale)
        if _learned_bias_on_cpu(query, mask):
            return _lean_biased_attention(query, key, value, mask, scale, dropout_p)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    scores = scaled_dot_product_scores(query, key, scale)
    if mask is not None and mask.dtype == torch.bool:
        weights = masked_softmax(scores, mask=mask)
    else:
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = dropped @ value
    return (out, weights) if return_weights else out


#: Key lengths up to which CPU attention runs as batched products with a hand-written
#: backward instead of SDPA's flash kernel (see :class:`_ShortKeyAttention`).
SHORT_KEYS = 256


def _short_keys_on_cpu(query: Tensor, key: Tensor, dropout_p: float) -> bool:
    """Eager CPU attention over at most :data:`SHORT_KEYS` keys, in fp32 or fp64, without
    dropout: where :class:`_ShortKeyAttention` can run. Compilers and exporters keep SDPA
    (they fuse it themselves), and so does autocast."""
    return (
        query.device.type == "cpu"
        and key.shape[-2] <= SHORT_KEYS
        and dropout_p == 0.0
        and query.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not building_graph()
    )


class _ShortKeyAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` as batched products, with the backward written out.

    For many small blocks (Swin and Twins windows, BOAT's 49 x 69 leaves, Twins GSA's
    ~49 sub-sampled keys) the CPU flash kernel works tile by tile and is slow in backward:
    on FSLA's (8, 192, 49, 69) leaves it took 52-54 ms forward + backward where this takes
    33-36 (benchmarks/boat.md); on Twins LSA's 49 x 49 windows 26 against 16 ms. It keeps the
    probabilities ``P`` (``Q x K`` per block, ``K <=`` :data:`SHORT_KEYS`) for backward:
    a memory cost the flash kernel avoids (on LSA's windows 43 against 25 MiB created in
    forward + backward), so callers opt in (``attention(..., save_probs=True)``). Then
    ``dS = P * (dO v^T - rowsum(dO * O))``: FlashAttention's identity ``rowsum(dP * P) =
    rowsum(dO * O)`` replaces a pass over ``Q x K`` with one over ``Q x d``. A float mask
    gets its gradient (``dS`` summed to the mask's shape: a learned position bias); a
    boolean keep mask follows :func:`masked_softmax`, so a query with no kept key
    gets zero weights. Swin's biased windows (already on the lean path below) and Twins
    GSA's long query blocks gained under 10% here, so those keep their defaults.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):  # noqa: ANN205
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        empty = None
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            if not bool(mask.any(-1).all()):
                empty = ~mask.any(-1, keepdim=True)
        elif mask is not None:
            scores = scores.add_(mask) if torch.broadcast_shapes(
                scores.shape, mask.shape) == scores.shape else scores + mask
        p = torch.softmax(scores, -1)
        if empty is not None:
            p = p.masked_fill_(empty, 0.0)
        out = torch.matmul(p, v)
        learned = mask is not None and mask.dtype != torch.bool
        ctx.mask_shape = mask.shape if learned else None
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, p, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):  # noqa: ANN205
        q, k, v, p, out = ctx.saved_tensors
        need_q, need_k, need_v, need_mask, _ = ctx.needs_input_grad
        dv = torch.matmul(p.transpose(-2, -1), d_out) if need_v else None
        dq = dk = d_mask = None
        if need_q or need_k or need_mask:
            delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dP * P), over Q x d
            ds = torch.matmul(d_out, v.transpose(-2, -1)).sub_(delta).mul_(p)
            if need_mask and ctx.mask_shape is not None:
                d_mask = ds.sum_to_size(ctx.mask_shape)  # may be ds itself: not scaled below
            # the scale goes on the (Q|K) x d products, a smaller pass than Q x K
            dq = torch.matmul(ds, k).mul_(ctx.scale) if need_q else None
            dk = torch.matmul(ds.transpose(-2, -1), q).mul_(ctx.scale) if need_k else None
        return (_sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), d_mask, None)


def _sum_to(grad: Tensor | None, like: Tensor) -> Tensor | None:
    """A gradient broadcast by matmul back to its input's shape (shared keys, say)."""
    return grad if grad is None or grad.shape == like.shape else grad.sum_to_size(like.shape)


def _learned_bias_on_cpu(query: Tensor, mask: Tensor | None) -> bool:
    """True where SDPA would fall back to its math path anyway: a float mask that needs a
    gradient (a learned position bias) on CPU, whose fused kernel has no mask gradient.
    Rank-5 inputs (windows x batch) never reach the CPU fused kernel either."""
    return (
        mask is not None
        and mask.dtype != torch.bool
        and query.device.type == "cpu"
        and (mask.requires_grad or query.dim() != 4)
        and torch.is_grad_enabled()
    )


def _lean_biased_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float | None, dropout_p: float
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` in four kernels, the mask added in place.

    PyTorch's math fallback scales q and k separately and checks every row for
    all-``-inf`` masks; this sequence skips both (our masks are finite, see
    :func:`additive_mask`), and measured faster forward+backward for Swin's windows on
    CPU (benchmarks/token_attention.md). Same values as the explicit path.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape:
        scores = scores.add_(mask)  # matmul's output is not saved for backward
    else:
        scores = scores + mask
    weights = scores.softmax(-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value


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

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

from ..checks import check_valid_lens
from ..tracing import building_graph

__all__ = [
    "sequence_mask",
    "valid_lens_to_mask",
    "masked_softmax",
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "attention",
    "materialized_attention",
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
            return _ShortKeyAttention.apply(query, key, value, mask, scale, 0)
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
    return key.shape[-2] <= SHORT_KEYS and dropout_p == 0.0 and _kept_probs_apply(query)


def _kept_probs_apply(query: Tensor) -> bool:
    """Eager CPU fp32/fp64 outside autocast: where :class:`_ShortKeyAttention` runs."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not building_graph()
    )


def materialized_attention(
    query: Tensor | None,
    key: Tensor | None,
    value: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    constant_key_columns: int = 0,
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for callers that form the ``Q x K`` scores anyway.

    Where the scores are materialised regardless of the key length (a learned energy
    added to the content term, as generalized attention's position terms), keeping the
    probabilities costs no memory that autograd would not keep too; on CPU this runs
    :class:`_ShortKeyAttention`, whose backward skips the softmax backward's pass over
    ``Q x K`` (``rowsum(dP * P) = rowsum(dO * O)``) and hands a float ``mask`` its
    gradient. Elsewhere (GPU, compile, export, autocast) the same math runs as plain ops.

    ``mask``: a boolean keep mask (a query with no kept key gets zero weights) or a float
    energy added to the scores, broadcastable to ``(..., Q, K)``. ``query`` and ``key``
    may both be None: then the float ``mask`` is the whole energy (``softmax(mask) v``).
    ``constant_key_columns``: the key's last columns are constants that need no gradient
    (one-hot coordinates that select a per-query energy appended to the query, say). The
    CPU path skips their gradient product and returns zeros there; the plain path lets
    autograd compute it as usual, so pass only columns whose gradient is discarded.
    """
    if query is None or key is None:
        if query is not None or key is not None or mask is None or mask.dtype == torch.bool:
            raise ValueError(
                "materialized_attention: without a query and key the energy is a float "
                "mask; pass both query and key, or neither and a float mask"
            )
        if mask.dim() < 2 or mask.shape[-1] != value.shape[-2]:
            raise ValueError(
                f"materialized_attention: an energy of shape {tuple(mask.shape)} does not "
                f"match values of shape {tuple(value.shape)} ((..., Q, K) and (..., K, dv))"
            )
    else:
        _check_qkv(query, key, value)
    if not 0 <= constant_key_columns <= (0 if key is None else key.shape[-1]):
        raise ValueError(
            f"materialized_attention: constant_key_columns must lie in [0, key width], "
            f"got {constant_key_columns}"
        )
    if _kept_probs_apply(value):
        return _ShortKeyAttention.apply(query, key, value, mask, scale, constant_key_columns)
    if query is None:
        return F.softmax(mask, dim=-1) @ value
    return attention(query, key, value, mask, scale=scale, fused=False)


class _ShortKeyAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` as batched products, with the backward written out.

    For many small blocks (Swin and Twins windows, BOAT's 49 x 69 leaves, Twins GSA's
    ~49 sub-sampled keys) the CPU flash kernel works tile by tile and is slow in backward:
    on FSLA's (8, 192, 49, 69) leaves it took 51-54 ms forward + backward where this takes
    33-36; on Twins LSA's 49 x 49 windows 26 against 16 ms (``benchmarks/kept_probs.py``,
    2 threads). It keeps the
    probabilities ``P`` (``Q x K`` per block, ``K <=`` :data:`SHORT_KEYS`) for backward:
    a memory cost the flash kernel avoids (on LSA's windows 43 against 25 MiB created in
    forward + backward), so callers opt in (``attention(..., save_probs=True)``). Then
    ``dS = P * (dO v^T - rowsum(dO * O))``: FlashAttention's identity ``rowsum(dP * P) =
    rowsum(dO * O)`` replaces a pass over ``Q x K`` with one over ``Q x d``. A float mask
    gets its gradient (``dS`` summed to the mask's shape: a learned position bias); a
    boolean keep mask follows :func:`masked_softmax`, so a query with no kept key
    gets zero weights. Swin's biased windows (already on the lean path below) and Twins
    GSA's long query blocks gained under 10% here, so those keep their defaults.

    Where ``q``, ``k`` and ``v`` share their batch dimensions and the probabilities
    exceed a few :data:`TILE_BYTES`, forward and backward run over tiles of blocks
    (a short loop over cache-sized groups, as a fused kernel tiles its work; never one
    iteration per block): each tile's scores, probabilities and score gradient are used
    while still in cache, and only ``P`` goes to memory. In generalized attention
    (``'1111'``, (2, 256, 32, 32)) that took the module's forward + backward from ~55 to
    ~40 ms and its peak memory from 59 to 45 MiB (``benchmarks/generalized_attention.py
    --tile-bytes 0`` against the default); on FSLA's leaves and LSA's windows the cores
    gain a few percent (``benchmarks/kept_probs.py``). ``q`` and
    ``k`` may be None (the float mask is then the whole energy), and
    ``constant_key_columns`` trailing key columns get zero gradient without a product
    (see :func:`materialized_attention`).
    """

    @staticmethod
    def forward(ctx, q: Tensor | None, k: Tensor | None, v: Tensor, mask: Tensor | None,  # noqa: ANN205
                scale: float, constant_key_columns: int = 0):
        learned = mask is not None and mask.dtype != torch.bool
        ctx.mask_shape = mask.shape if learned else None
        ctx.scale, ctx.constant_key_columns = scale, constant_key_columns
        flat = _flat_blocks(q, k, v, mask, (mask if q is None else q).shape[-2])
        if flat is None:  # one block of every shape: the whole batch at once
            p, out = _probs_and_output(q, k, v, mask, scale)
        else:
            fq, fk, fv, fm, lead, step = flat
            n, rows, keys = fv.shape[0], (mask if q is None else q).shape[-2], v.shape[-2]
            p = fv.new_empty(n, rows, keys)
            out = fv.new_empty(n, rows, fv.shape[-1])
            for i in range(0, n, step):  # cache-sized tiles of blocks, not a loop per block
                c = slice(i, i + step)
                _probs_and_output(_tile(fq, c), _tile(fk, c), fv[c], _tile(fm, c), scale,
                                  p_out=p[c], out=out[c])
            p, out = p.view(*lead, rows, keys), out.view(*lead, rows, fv.shape[-1])
        ctx.save_for_backward(q, k, v, p, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):  # noqa: ANN205
        q, k, v, p, out = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        need = (need[0] and q is not None, need[1] and k is not None, need[2],
                need[3] and ctx.mask_shape is not None)
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dP * P), over Q x d
        args = (ctx.scale, ctx.constant_key_columns, need)
        # tiles where the forward kept P for every block (a broadcast energy keeps fewer)
        flat = _flat_blocks(q, k, v, p, p.shape[-2]) if p.shape[:-2] == v.shape[:-2] \
            else None
        if flat is None:
            dq, dk, dv, ds = _block_grads(q, k, v, p, d_out, delta, *args)
            d_mask = ds.sum_to_size(ctx.mask_shape) if need[3] else None  # may be ds itself
            return (_sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), d_mask, None, None)
        fq, fk, fv, _, lead, step = flat
        n = fv.shape[0]
        fp, fo, fd = p.reshape(n, *p.shape[-2:]), d_out.reshape(n, *d_out.shape[-2:]), \
            delta.reshape(n, -1, 1)
        grads = [None if not need[0] else fq.new_empty(fq.shape),
                 None if not need[1] else fk.new_zeros(fk.shape),
                 None if not need[2] else fv.new_empty(fv.shape),
                 None if not need[3] else fp.new_empty(fp.shape)]
        for i in range(0, n, step):
            c = slice(i, i + step)
            outs = [None if g is None else g[c] for g in grads]
            _block_grads(_tile(fq, c), _tile(fk, c), fv[c], fp[c], fo[c], fd[c], *args,
                         outs=outs)
        dq, dk, dv, d_mask = (None if g is None else g.view(*lead, *g.shape[-2:])
                              for g in grads)
        if d_mask is not None:
            d_mask = d_mask.sum_to_size(ctx.mask_shape)
        return (dq, dk, dv, d_mask, None, None)


#: Bytes of probabilities per tile of blocks in :class:`_ShortKeyAttention`: a tile's
#: scores, probabilities and their gradients stay in the cache between the products.
TILE_BYTES = 2 * 2**20


def _flat_blocks(q, k, v, mask, rows: int):  # noqa: ANN001, ANN202
    """``q, k, v, mask`` as ``(n, rows, cols)`` stacks of blocks with a tile step, or None.

    Tiling applies when ``q``, ``k`` and ``v`` share their leading (batch) dimensions
    and the probabilities span more than two tiles; a mask either has them too or none
    (then every tile reads all of it). Otherwise the caller runs the whole batch at once.
    """
    lead = v.shape[:-2]
    n = math.prod(lead)
    step = max(1, TILE_BYTES // max(1, rows * v.shape[-2] * v.element_size()))
    if n < 3 * step or (q is not None and (q.shape[:-2] != lead or k.shape[:-2] != lead)):
        return None

    def flat(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if t.shape[:-2] == lead:
            return t.reshape(n, *t.shape[-2:])
        if all(d == 1 for d in t.shape[:-2]):
            return _Whole(t.reshape(t.shape[-2:]))
        raise _NotFlat

    try:
        return flat(q), flat(k), v.reshape(n, *v.shape[-2:]), flat(mask), lead, step
    except _NotFlat:
        return None


class _NotFlat(Exception):
    pass


class _Whole:
    """A tensor every tile reads whole (a mask without batch dimensions)."""

    def __init__(self, t: Tensor) -> None:
        self.t = t


def _tile(t, c: slice):  # noqa: ANN001, ANN202
    return t if t is None else t.t if isinstance(t, _Whole) else t[c]


def _probs_and_output(q, k, v, mask, scale, p_out=None, out=None):  # noqa: ANN001, ANN202
    """Probabilities and output of one batch of blocks (into ``p_out``/``out`` if given)."""
    empty = None
    if q is None:  # no content term: the float mask is the whole energy
        scores = mask if p_out is None else mask.expand(p_out.shape)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1))
        if scale != 1.0:
            scores = scores.mul_(scale)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            if not bool(mask.any(-1).all()):
                empty = ~mask.any(-1, keepdim=True)
        elif mask is not None:
            scores = scores.add_(mask) if torch.broadcast_shapes(
                scores.shape, mask.shape) == scores.shape else scores + mask
    if p_out is None:
        p = torch.softmax(scores, -1)
    else:
        p = torch.ops.aten._softmax.out(scores, -1, False, out=p_out)
    if empty is not None:
        p = p.masked_fill_(empty, 0.0)
    if out is None:
        return p, torch.matmul(p, v)
    torch.matmul(p, v, out=out)
    return p, out


def _block_grads(q, k, v, p, d_out, delta, scale, fixed, need, outs=None):  # noqa: ANN001, ANN202
    """dq, dk, dv and the energy's gradient ``dS`` of one batch of blocks.

    With ``outs`` (tiles of preallocated gradients) the results are written there.
    """
    need_q, need_k, need_v, need_mask = need
    o_q, o_k, o_v, o_mask = outs if outs is not None else (None,) * 4
    dv = None
    if need_v:
        dv = torch.matmul(p.transpose(-2, -1), d_out, out=o_v)
    dq = dk = ds = None
    if need_q or need_k or need_mask:
        ds = torch.matmul(d_out, v.transpose(-2, -1)).sub_(delta).mul_(p)
        if o_mask is not None:
            o_mask.copy_(ds)
        # the scale goes on the (Q|K) x d products, a smaller pass than Q x K
        if need_q:
            dq = torch.matmul(ds, k, out=o_q)
        if need_k:
            w = q.shape[-1] - fixed  # constant key columns: no product for them
            dk = torch.matmul(ds.transpose(-2, -1), q[..., :w] if fixed else q)
            if o_k is not None:
                o_k[..., :w].copy_(dk)
                dk = o_k
            elif fixed:
                dk = F.pad(dk, (0, fixed))
        if scale != 1.0:
            dq = dq.mul_(scale) if dq is not None else None
            dk = dk.mul_(scale) if dk is not None else None
    return dq, dk, dv, ds


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

"""Kept-probabilities attention: a CPU kernel for many small blocks of attention.

Windows, BOAT's leaves and generalized attention's blocks are short in keys and many
in number; SDPA's CPU flash kernel recomputes the scores in backward tile by tile,
which is slow there. :class:`KeptProbsAttention` keeps the probabilities instead.

The reference twin is :func:`reference` (``functional.attention(..., impl="explicit")``);
``tests/test_functional_scoring.py`` holds the two equal (values, gradients, tiling,
masks, gradcheck). Layers reach this kernel only through ``functional.attention``
(``impl="kept_probs"``) or ``functional.materialized_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...tracing import building_graph

__all__ = ["SHORT_KEYS", "TILE_BYTES", "KeptProbsAttention", "kept_probs_applies",
           "short_keys_on_cpu", "reference"]

#: Key lengths up to which ``attention(..., impl="kept_probs")`` runs this kernel;
#: longer keys go to SDPA (the probabilities would outgrow the cache-sized tiles).
SHORT_KEYS = 256


def short_keys_on_cpu(query: Tensor, key: Tensor, dropout_p: float) -> bool:
    """At most :data:`SHORT_KEYS` keys, no dropout, and :func:`kept_probs_applies`."""
    return key.shape[-2] <= SHORT_KEYS and dropout_p == 0.0 and kept_probs_applies(query)


def kept_probs_applies(query: Tensor) -> bool:
    """Eager CPU fp32/fp64 outside autocast: where the kernel runs. Compilers and
    exporters keep SDPA or plain ops (they fuse those themselves)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not building_graph()
    )


def reference(q: Tensor | None, k: Tensor | None, v: Tensor, mask: Tensor | None,
              scale: float) -> Tensor:
    """The plain twin: ``softmax(q k^T * scale + mask) v`` in autograd ops."""
    from ..dispatch import attention

    if q is None:
        return F.softmax(mask, dim=-1) @ v
    return attention(q, k, v, mask, scale=scale, impl="explicit")


class KeptProbsAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` as batched products, with the backward written out.

    Contract: the same values and gradients as :func:`reference` (the explicit math);
    ``q, k, v`` of shape ``(..., Q|K, d)`` on the CPU in fp32/fp64, outside autocast,
    compile and export; no dropout. It keeps the probabilities ``P`` for backward (a
    memory cost SDPA's flash kernel avoids), and uses ``rowsum(dP * P) = rowsum(dO * O)``
    so the softmax backward is a pass over ``Q x d`` instead of ``Q x K``. A float mask
    gets its gradient (summed to its own shape: a learned bias); a boolean keep mask
    gives a query with no kept key zero weights. ``q`` and ``k`` may be None (the float
    mask is the whole energy); ``constant_key_columns`` trailing key columns get a zero
    gradient without a product. Batches of blocks run in tiles of :data:`TILE_BYTES`
    of probabilities, so each tile's scores and gradients stay in cache. Measured in
    benchmarks/kept_probs.md and benchmarks/generalized_attention.md.
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


#: Bytes of probabilities per tile of blocks in :class:`KeptProbsAttention`: a tile's
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

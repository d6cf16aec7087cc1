"""Halo attention: tiles of queries against gathered halo keys, the gather in the kernel.

Neighbourhood attention's fast path (``layers/neighborhood.py``) cuts the map into tiles
of queries, each scored against the union of their windows (its halo) under a per-tile
keep mask with the relative position bias folded in. In CPU training, left to autograd,
the row gather's backward concatenates the q, k and v gradients and copies the keys'
transposed gradient before scattering them; :class:`HaloAttention` gathers, attends in
cache-sized chunks of tiles (the products of :mod:`.kept_probs`, probabilities kept)
and scatters the three gradients straight into one zero buffer of rows.

The reference twin is :func:`reference` (an ``index_select`` per operand and
``functional.attention(..., impl="explicit")``); ``tests/test_layers_neighborhood.py``
holds the two equal (values and gradients, float64) and the layer's path equal to the
explicit per-query form.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kept_probs import TILE_BYTES, _probs_and_output, kept_probs_applies

__all__ = ["HaloAttention", "halo_attention_applies", "reference"]


def halo_attention_applies(rows: Tensor, dropout_p: float) -> bool:
    """Eager CPU fp32/fp64 outside autocast, compile and export, no dropout."""
    return dropout_p == 0.0 and kept_probs_applies(rows)


def reference(rows: Tensor, mask: Tensor, index: tuple[Tensor, Tensor, Tensor],
              shape: tuple[int, ...], scale: float) -> Tensor:
    """The plain twin: gather, ``softmax(q k^T * scale + mask) v`` in autograd ops."""
    from ..dispatch import attention

    nT, B, h, Q, K = shape
    d = rows.shape[-1]
    q, k, v = (rows.index_select(0, i.reshape(-1)).view(nT, B, h, -1, d) for i in index)
    return attention(q, k, v, mask, scale=scale, impl="explicit")


class HaloAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` of gathered rows, ``(nT, B, h, Q, d)`` out.

    ``rows`` ``(R, d)``: every token's q, k and v rows of every head. ``q_index``
    ``(nT, B*h*Q)`` and ``k_index``, ``v_index`` ``(nT, B*h*K)``: the rows of each tile's
    queries and halo keys and values, ``(B, h, Q|K)``-major inside a tile. ``mask``
    ``(nT, 1 | B, 1 | h, Q, K)``: finite additive energy (keep mask and bias), its
    gradient summed to its shape. Contract: the values and gradients of
    :func:`reference`. Keeps ``q * scale``, ``k``, ``v`` and the probabilities; backward:
    the products per chunk of tiles written into their gradients, then three
    ``index_add_`` into one zero-filled ``rows``-sized gradient.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, mask: Tensor, q_index: Tensor, k_index: Tensor,  # noqa: ANN205
                v_index: Tensor, shape: tuple[int, ...], scale: float):
        nT, B, h, Q, K = shape
        d = rows.shape[-1]
        q = rows.index_select(0, q_index.reshape(-1)).view(nT, B, h, Q, d).mul_(scale)
        k = rows.index_select(0, k_index.reshape(-1)).view(nT, B, h, K, d)
        v = rows.index_select(0, v_index.reshape(-1)).view(nT, B, h, K, d)
        p = rows.new_empty(nT, B, h, Q, K)
        out = rows.new_empty(nT, B, h, Q, d)
        step = max(1, TILE_BYTES // (B * h * Q * K * rows.element_size()))
        for i in range(0, nT, step):  # chunks of tiles whose scores stay in cache
            c = slice(i, i + step)
            _probs_and_output(q[c], k[c], v[c], mask[c], 1.0, p_out=p[c], out=out[c])
        ctx.save_for_backward(q, k, v, p, out, q_index, k_index, v_index)
        ctx.scale, ctx.step, ctx.mask_shape, ctx.rows = scale, step, mask.shape, rows.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):  # noqa: ANN205
        q, k, v, p, out, q_index, k_index, v_index = ctx.saved_tensors
        need_rows, need_mask = ctx.needs_input_grad[:2]
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dP * P)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        d_mask = p.new_empty(ctx.mask_shape) if need_mask else None
        for i in range(0, q.shape[0], ctx.step):  # q holds q * scale
            c = slice(i, i + ctx.step)
            if need_rows:
                torch.matmul(p[c].transpose(-2, -1), d_out[c], out=dv[c])
            ds = torch.matmul(d_out[c], v[c].transpose(-2, -1)).sub_(delta[c]).mul_(p[c])
            if d_mask is not None:
                d_mask[c] = ds.sum_to_size(d_mask[c].shape)
            if need_rows:
                torch.matmul(ds, k[c], out=dq[c]).mul_(ctx.scale)
                torch.matmul(ds.transpose(-2, -1), q[c], out=dk[c])
        d_rows = None
        if need_rows:
            d = q.shape[-1]
            d_rows = q.new_zeros(ctx.rows)
            for index, grad in ((q_index, dq), (k_index, dk), (v_index, dv)):
                d_rows.index_add_(0, index.reshape(-1), grad.view(-1, d))
        return d_rows, d_mask, None, None, None, None, None

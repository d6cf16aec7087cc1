"""DAT's deformable relative position bias, with the displacement grid rebuilt in backward.

``φ(B^; R)`` (Xia et al. CVPR 2022, Sec. 3.2): a learned ``(heads, 2Hq - 1, 2Wq - 1)``
table read bilinearly (``grid_sample``, ``align_corners=True``, zeros outside) at
``R = (query - key) / 2`` for every query of the ``H x W`` map and every sampled key of
its head's offset group. ``R`` has ``B·groups·N·Ns`` points, half as many numbers as the
bias itself; ``grid_sample`` would keep it for its backward. :class:`DeformableBias`
keeps the key positions instead (``Ns`` per group) and rebuilds ``R`` in its backward.

Reference twin: :func:`deformable_bias_reference` (the same ``grid_sample`` in autograd
ops, what exporters and compilers get); ``tests/test_layers_deformable_attention.py``
holds the two equal (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...tracing import building_graph, exporting_graph

__all__ = ["DeformableBias", "deformable_bias", "deformable_bias_reference"]


def _grid(pos: Tensor, queries: Tensor) -> Tensor:
    """``(B·g, N, Ns, 2)``: ``(query - key) / 2`` for every pair, last axis ``(x, y)``."""
    B, g, Ns, _ = pos.shape
    return (queries.view(1, -1, 1, 2) - pos.reshape(B * g, 1, Ns, 2)).mul_(0.5)


def _tables(table: Tensor, B: int, g: int) -> Tensor:
    """The ``(heads, Th, Tw)`` table as ``(B·g, heads/g, Th, Tw)``, one per sample and group."""
    heads, Th, Tw = table.shape
    return table[None].expand(B, -1, -1, -1).reshape(B * g, heads // g, Th, Tw)


def deformable_bias_reference(table: Tensor, pos: Tensor, queries: Tensor) -> Tensor:
    """The plain twin: ``table`` ``(heads, Th, Tw)`` read at ``(queries - pos) / 2``.

    ``pos`` ``(B, groups, Ns, 2)`` key positions, ``queries`` ``(N, 2)`` query positions,
    both ``(x, y)`` in ``[-1, 1]``; head ``h`` reads its group ``h // (heads / groups)``'s
    keys. Returns ``(B, heads, N, Ns)``.
    """
    B, g, Ns, _ = pos.shape
    out = F.grid_sample(_tables(table, B, g), _grid(pos, queries), mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # (B·g, heads/g, N, Ns)
    return out.view(B, table.shape[0], -1, Ns)


class DeformableBias(torch.autograd.Function):
    """:func:`deformable_bias_reference` keeping ``pos`` (not the grid) for backward.

    Contract: the same values and first-order gradients (table and positions) as the
    reference; no gradient for ``queries`` (a constant grid).
    """

    @staticmethod
    def forward(ctx, table: Tensor, pos: Tensor, queries: Tensor) -> Tensor:  # noqa: ANN205
        ctx.save_for_backward(table, pos, queries)
        with torch.no_grad():
            return deformable_bias_reference(table, pos, queries)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        table, pos, queries = ctx.saved_tensors
        B, g, Ns, _ = pos.shape
        heads, Th, Tw = table.shape
        need_table, need_pos = ctx.needs_input_grad[:2]
        grad = grad.reshape(B * g, heads // g, -1, Ns)
        d_tables, d_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad, _tables(table, B, g), _grid(pos, queries), 0, 0, True,
            [need_table, need_pos])  # bilinear, zeros, align_corners
        d_table = d_tables.view(B, heads, Th, Tw).sum(0) if need_table else None
        d_pos = d_grid.sum(1).mul_(-0.5).view(B, g, Ns, 2) if need_pos else None
        return d_table, d_pos, None


def deformable_bias(table: Tensor, pos: Tensor, queries: Tensor) -> Tensor:
    """``(B, heads, N, Ns)`` bias: :class:`DeformableBias` in eager autograd, the
    reference elsewhere (no gradient needed, compile, export)."""
    if building_graph() or exporting_graph() or not torch.is_grad_enabled() or \
            not (table.requires_grad or pos.requires_grad):
        return deformable_bias_reference(table, pos, queries)
    return DeformableBias.apply(table, pos, queries)

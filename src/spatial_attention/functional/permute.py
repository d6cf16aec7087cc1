"""Token reorderings whose backward is a gather too, not an index scatter.

Window attention (shift, padding), BOAT's feature-space clustering and the multi-view
layouts all move tokens by a permutation: ``y = x.index_select(dim, index)``. Autograd
differentiates ``index_select`` as ``index_add`` into a zeroed buffer, which on a CPU is
a fill plus a scatter, a visible share of FSLA's training step (profile in
benchmarks/boat.md). When ``index``
is a permutation (or a permutation plus padding slots that never receive a gradient),
the gradient of every source row sits at exactly one output row, so the backward is one
more gather, ``grad.index_select(dim, inverse)``.

:func:`permute_rows` is that operation. Its contract, which the caller must keep:

* ``inverse[r]`` is the output position that carries source row ``r``'s gradient, or
  ``index.numel()`` for a source row whose gradient is zero (read from an appended zero);
* every *other* output position that reads row ``r`` (``index[o] == r``, ``o !=
  inverse[r]``: a padding slot filled with a real token) receives a zero gradient, which
  holds when its query output is discarded and its key is masked out of every softmax.

Under ``torch.jit`` tracing, ONNX export and ``torch.export`` (graphs for inference) and
when no gradient is needed, it is a plain ``index_select``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..tracing import exporting_graph

__all__ = ["permute_rows", "inverse_index"]


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, index: Tensor, inverse: Tensor,  # noqa: ANN001
                zero_row: bool) -> Tensor:
        ctx.dim, ctx.zero_row = dim, zero_row
        ctx.save_for_backward(inverse)
        return x.index_select(dim, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        dim = ctx.dim
        if ctx.zero_row:
            pad = [0, 0] * (grad.dim() - 1 - dim) + [0, 1]
            grad = F.pad(grad, pad)  # one zero row for the sources nobody reads back
        return grad.index_select(dim, inverse), None, None, None, None


def permute_rows(
    x: Tensor, dim: int, index: Tensor, inverse: Tensor, zero_row: bool = False
) -> Tensor:
    """``x.index_select(dim, index)`` with ``grad.index_select(dim, inverse)`` as backward.

    Args:
        x: the tensor to reorder.
        dim: the axis (non-negative) along which rows move.
        index: ``(M,)`` int64, source row of every output position.
        inverse: ``(x.shape[dim],)`` int64, the output position that carries each source
            row's gradient, or ``M`` where that gradient is zero (see the module doc for
            the contract; :func:`inverse_index` builds it for a permutation).
        zero_row: whether ``inverse`` holds ``M`` anywhere (a static flag, so that
            compiled graphs need not inspect the index).
    """
    dim = dim % x.dim()
    if not (torch.is_grad_enabled() and x.requires_grad) or exporting_graph():
        return x.index_select(dim, index)
    return _PermuteRows.apply(x, dim, index, inverse, zero_row)


def inverse_index(index: Tensor, num_rows: int) -> Tensor:
    """``inverse`` with ``inverse[index[m]] = m``, and ``index.numel()`` for the rows
    ``index`` never names: the position of every row in ``index`` (which must name each
    row at most once), in the form :func:`permute_rows` takes."""
    M = index.numel()
    positions = torch.arange(M, device=index.device)
    inverse = torch.full((num_rows,), M, dtype=torch.long, device=index.device)
    return inverse.scatter_(0, index, positions)

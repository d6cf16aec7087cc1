"""FLOP counting with ``torch.utils.flop_counter``, CPU fused attention included.

``FlopCounterMode`` knows the CUDA attention kernels (flash, memory-efficient, cuDNN)
but not the CPU one that ``F.scaled_dot_product_attention`` dispatches to for 4-D
inputs, ``aten._scaled_dot_product_flash_attention_for_cpu``, nor its backward: on
CPU, every fused mechanism would count 0 FLOPs for its attention. It also counts no
matrix-vector product (``aten.mv``, ``addmv``, ``dot``, ``vdot``), which ``x @ w`` with
a 1-D ``w`` becomes (additive attention's ``w_v^T tanh(...)``). Importing this module
registers formulas for all of them (once; a later PyTorch that has its own keeps them):
``2 M N`` for an ``(M, N)`` matrix times a vector, ``2 n`` for a dot product of length
``n``, like PyTorch's ``2 M N K`` for ``mm``.

Some of PyTorch's formulas are replaced or added, locally, in :func:`count_flops`
(through ``FlopCounterMode(custom_mapping=...)``, leaving the global registry alone):

* the convolution backward, whose weight gradient ignores ``groups`` and so counts a
  depthwise 3x3 convolution over 128 channels 128 times too high. Here each gradient
  (input, weight) costs what the forward costs, whatever the groups;
* the CPU im2col convolution ``aten._slow_conv2d_forward`` (``thnn_conv2d``), whose
  registered formula fails with a TypeError (it expects a ``transposed`` argument the
  op does not have), and its backward ``aten._slow_conv2d_backward``, not counted at all.

Convention (the one PyTorch uses for its CUDA kernels): a multiply-add is 2 FLOPs; only
the two matrix products count, not the softmax, the scale or the mask; a causal mask is
not discounted. For ``q (..., Q, d)``, ``k (..., K, d)``, ``v (..., K, dv)``, with ``n``
the product of the leading dimensions of ``q`` (batch x heads; grouped key/value heads
are broadcast to the query heads):

* forward: ``2 n Q K d`` (``q k^T``) + ``2 n Q K dv`` (weights x ``v``), i.e.
  ``4 B h Q K d`` when ``dv == d``;
* backward: the scores are recomputed (``2 n Q K d``), then ``d(weights)`` and
  ``dv`` (``2 n Q K dv`` each), ``dq`` and ``dk`` (``2 n Q K d`` each): ``2 n Q K (3 d +
  2 dv)``. An explicit (unfused) attention's backward costs ``4 n Q K (d + dv)``, as
  it keeps the weights instead of recomputing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = [
    "sdpa_forward_flops",
    "sdpa_backward_flops",
    "register_cpu_attention_formulas",
    "count_flops",
]

_aten = torch.ops.aten


def _dims(
    query: Sequence[int], key: Sequence[int], value: Sequence[int]
) -> tuple[int, int, int, int, int]:
    """``(n, Q, K, d, dv)`` from the three shapes, checked."""
    if len(query) < 2 or len(key) != len(query) or len(value) != len(query):
        raise ValueError(
            f"attention FLOPs: query, key, value need equal rank >= 2, got {tuple(query)}, "
            f"{tuple(key)}, {tuple(value)}"
        )
    if query[-1] != key[-1] or key[-2] != value[-2]:
        raise ValueError(
            f"attention FLOPs: incompatible shapes q {tuple(query)}, k {tuple(key)}, "
            f"v {tuple(value)}"
        )
    return math.prod(query[:-2]), query[-2], key[-2], query[-1], value[-1]


def sdpa_forward_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int]
) -> int:
    """FLOPs of one attention forward, ``2 n Q K (d + dv)`` (see the module doc)."""
    n, q, k, d, dv = _dims(query, key, value)
    return 2 * n * q * k * (d + dv)


def sdpa_backward_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int]
) -> int:
    """FLOPs of one fused attention backward, ``2 n Q K (3 d + 2 dv)`` (see the module doc)."""
    n, q, k, d, dv = _dims(query, key, value)
    return 2 * n * q * k * (3 * d + 2 * dv)


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_forward_flops(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flops(query, key, value)


def _mv(matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]


def _addmv(bias, matrix, vector, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix[0] * matrix[1]  # the add is not counted, as for addmm


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def register_cpu_attention_formulas() -> None:
    """Teach ``FlopCounterMode`` the CPU fused attention kernels and the matrix-vector
    products (see the module doc). Idempotent.

    Only counter modes created afterwards see the formulas (each copies the registry).
    """
    pairs = (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward),
        ("mv", _mv),
        ("addmv", _addmv),
        ("dot", _dot),
        ("vdot", _dot),
    )
    for op_name, formula in pairs:
        op = getattr(_aten, op_name, None)
        if op is None or op in flop_counter.flop_registry:
            continue
        register_flop_formula(op)(formula)


register_cpu_attention_formulas()


def _conv_backward(
    grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
    groups, output_mask, *args, out_shape=None, **kwargs,
) -> int:
    """Input and weight gradients each cost the forward's ``2 B prod(w) prod(spatial)``.

    ``weight`` is ``(C_out, C_in / groups, *k)`` (transposed: ``(C_in, C_out / groups,
    *k)``), so groups are in it already; ``spatial`` is the output's, or the input's for a
    transposed convolution. The bias gradient is not counted, as in PyTorch.
    """
    spatial = x[2:] if transposed else grad_out[2:]
    forward = 2 * x[0] * math.prod(weight) * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _slow_conv2d(x, weight, *args, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * math.prod(weight) * math.prod(out_shape[2:])


def _slow_conv2d_backward(
    grad_out, x, weight, kernel_size, stride, padding, output_mask=(True, True, True), *args,
    out_shape=None, **kwargs,
) -> int:
    forward = 2 * x[0] * math.prod(weight) * math.prod(grad_out[2:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_LOCAL_FORMULAS = {
    _aten.convolution_backward: _conv_backward,
    _aten._slow_conv2d_forward: _slow_conv2d,
    _aten._slow_conv2d_backward: _slow_conv2d_backward,
}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` under a ``FlopCounterMode``; ``(total FLOPs, result)``.

    ``fn`` is any callable: a module, a model, a closure that runs a training step (the
    backward's FLOPs are counted too). The count is PyTorch's, with the CPU fused
    attention kernels, matrix-vector products and convolution backward put right (see
    the module doc). Convention: one multiply-add is 2 FLOPs, and only matrix products
    and convolutions count (softmax, norms, activations: 0). Papers that quote "FLOPs"
    for a model usually mean multiply-adds: halve this to compare. The tensors may live
    on the meta device (shapes only, nothing computed); ``spatial-attention bench`` uses
    it for its GFLOPs columns.

    >>> import torch
    >>> from spatial_attention.models import create_model
    >>> flops, logits = count_flops(create_model("resnet10_cifar"), torch.randn(1, 3, 32, 32))
    """
    mapping = dict(_LOCAL_FORMULAS)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result

"""Lean biased attention: ``softmax(q k^T * scale + bias) v`` in four kernels on the CPU.

SDPA has no CPU fused kernel that returns a gradient for a float mask, so with a learned
position bias in training it falls back to its math path, which scales q and k apart
and scans every row for all-``-inf`` masks. Our masks are finite (``additive_mask``), so
both are unnecessary. Contract: the same values and gradients as the explicit path
(``functional.attention(..., impl="explicit")``), held equal by the window tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["learned_bias_on_cpu", "lean_biased_attention"]


def learned_bias_on_cpu(query: Tensor, mask: Tensor | None) -> bool:
    """True where SDPA would take its math fallback on the CPU with a float mask: a
    learned bias in training (the fused kernel returns no mask gradient), or rank-5
    inputs (windows x batch), which never reach the fused kernel, in any grad mode: in
    eval, the fallback's input checks alone were ~12% of Swin's shifted-window forward."""
    return (
        mask is not None
        and mask.dtype != torch.bool
        and query.device.type == "cpu"
        and (query.dim() != 4 or (mask.requires_grad and torch.is_grad_enabled()))
    )


def lean_biased_attention(
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
